"""`cases validate`: every problem in a folder of cases, one line each, naming file and field."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.case import CASE_FILE, Case, case_problems, read_case_yaml, resolve_study_path
from core.catalogue import load_catalogue
from core.errors import CaseDataError


def case_folders(root: str | Path) -> list[Path]:
    """`root` itself when it is a case, else its visible sub-folders (each should be a case)."""
    root = Path(root)
    if (root / CASE_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise CaseDataError(root, "(folder)", "no such folder of cases")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_study_data(folder: Path, case: Case) -> list[CaseDataError]:
    from core.imaging.load import load_study
    from core.imaging.nifti import load_mask_nifti
    from core.imaging.types import Volume

    problems, shapes = [], {}
    for i, s in enumerate(case.studies):
        try:
            study = load_study(folder, s)
            if isinstance(study, Volume):
                shapes[s.id] = study.shape
                if not np.isfinite(study.array).all():
                    problems.append(CaseDataError(study.source, f"studies[{i}]", "volume has non-finite values"))
            elif hasattr(study, "read_region"):
                try:
                    w, h = study.level_dimensions[-1]
                    study.read_region(0, 0, study.level_count - 1, min(w, 64), min(h, 64))
                finally:
                    study.close()
        except CaseDataError as e:
            problems.append(e)
    truth = case.truth
    if truth is None:
        return problems
    cat = load_catalogue()
    src = folder / CASE_FILE
    if truth.diagnosis not in cat.diseases:
        problems.append(CaseDataError(src, "truth.diagnosis", f"{truth.diagnosis!r} is not in the disease catalogue"))
    ids = {s.id for s in case.studies}
    for j, f in enumerate(truth.findings):
        if f.label not in cat.findings:
            problems.append(CaseDataError(src, f"truth.findings[{j}].label", f"{f.label!r} is not a catalogue finding"))
        if f.study_id is not None and f.study_id not in ids:
            problems.append(CaseDataError(src, f"truth.findings[{j}].study_id", f"no study {f.study_id!r}"))
    for j, m in enumerate(truth.masks):
        field = f"truth.masks[{j}]"
        if m.study_id not in ids:
            problems.append(CaseDataError(src, f"{field}.study_id", f"no study {m.study_id!r}"))
            continue
        try:
            path = resolve_study_path(folder, m.path, f"{field}.path")
            mask = load_mask_nifti(path)
            if m.study_id in shapes and tuple(mask.shape) != tuple(shapes[m.study_id]):
                problems.append(CaseDataError(path, field, f"mask shape {mask.shape} differs from study "
                                                           f"{m.study_id!r} shape {shapes[m.study_id]}"))
        except CaseDataError as e:
            problems.append(e)
    return problems


def validate_case_folder(folder: str | Path, check_images: bool = True) -> list[CaseDataError]:
    folder = Path(folder)
    try:
        data = read_case_yaml(folder)
    except CaseDataError as e:
        return [e]
    problems = case_problems(data, folder / CASE_FILE)
    if problems:
        return problems
    case = Case.model_validate(data)
    for i, s in enumerate(case.studies):
        try:
            p = resolve_study_path(folder, s, f"studies[{i}].path")
            if not p.exists():
                problems.append(CaseDataError(folder / CASE_FILE, f"studies[{i}].path", f"{s.path!r} does not exist"))
        except CaseDataError as e:
            problems.append(e)
    if problems or not check_images:
        return problems
    return _check_study_data(folder, case)


def validate_cases(root: str | Path, check_images: bool = True) -> tuple[int, list[CaseDataError]]:
    """(number of case folders, problems). Never raises for bad data."""
    try:
        folders = case_folders(root)
    except CaseDataError as e:
        return 0, [e]
    problems: list[CaseDataError] = []
    for f in folders:
        problems += validate_case_folder(f, check_images)
    return len(folders), problems
