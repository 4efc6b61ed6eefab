"""The synthetic cohort end to end: cases validate, images carry their truth, PHI never leaks."""
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from core.case import Modality, load_case
from core.catalogue import load_catalogue
from core.imaging.load import load_study
from core.imaging.nifti import load_mask_nifti
from core.imaging.slide import open_slide
from core.reports import read_findings
from core.synth.chest import ORGAN_LABELS
from core.synth.cohort import (EXAMPLE_OPTIONS, EXAMPLE_PLANS, EXAMPLE_SEED, CohortOptions, generate_case,
                               generate_cohort, generate_examples)
from core.validate import validate_cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    ids = generate_examples(out)
    return out, {i: load_case(out / i) for i in ids}


def _by_dx(cases, dx):
    return next((cid, c) for cid, c in cases.items() if c.truth.diagnosis == dx)


def test_examples_validate_and_cover_every_modality_and_format(examples):
    out, cases = examples
    n, problems = validate_cases(out)
    assert n == len(EXAMPLE_PLANS) and problems == []
    forms = {(s.modality, s.format) for c in cases.values() for s in c.studies}
    mods = {m for m, _ in forms}
    assert {Modality.CT, Modality.XR, Modality.WSI} <= mods
    assert len({f for _, f in forms}) >= 5  # nifti, dicom-series, png, dicom, tiff


def _ct(out, cid, case):
    study = next(s for s in case.studies if s.id == "ct")
    vol = load_study(out / cid, study)
    masks = {m.kind: load_mask_nifti(out / cid / m.path) for m in case.truth.masks}
    return vol, masks


def test_lesion_masks_sit_on_the_lesions(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "pneumonia")
    vol, masks = _ct(out, cid, case)
    assert masks["lesions"].shape == vol.array.shape == masks["organs"].shape
    lung = np.isin(masks["organs"], [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]]) & (masks["lesions"] == 0)
    assert vol.array[lung].mean() < -650
    labels = {v: int(k) for k, v in next(m for m in case.truth.masks if m.kind == "lesions").labels.items()}
    consolidation = masks["lesions"] == labels["consolidation"]
    assert vol.array[consolidation].mean() > -350  # airless lung after reconstruction noise and bronchograms
    effusion = masks["lesions"] == labels["pleural_effusion"]
    assert -60 < np.median(vol.array[effusion]) < 80


def test_metal_streaks_only_where_the_metal_is(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "lung_cancer")
    vol, masks = _ct(out, cid, case)
    metal_slices = (vol.array > 2000).any(axis=(1, 2))
    assert metal_slices.any() and not metal_slices.all()
    liver_or_heart = np.isin(masks["organs"], [ORGAN_LABELS["heart"], ORGAN_LABELS["liver"]])

    def noise(sel):
        return np.std(vol.array[sel & liver_or_heart & (masks["lesions"] == 0)])

    with_metal = np.zeros_like(liver_or_heart)
    with_metal[metal_slices] = True
    assert noise(with_metal) > 1.5 * noise(~with_metal)


def test_thick_slices_have_thick_spacing(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "copd")
    vol, masks = _ct(out, cid, case)
    assert vol.spacing[0] == pytest.approx(2 * EXAMPLE_OPTIONS.ct_spacing[0], abs=0.01)
    assert vol.array.shape[0] == EXAMPLE_OPTIONS.ct_shape[0] // 2
    assert case.studies[0].acquisition["slice_thickness_mm"] == pytest.approx(vol.spacing[0])


def test_reports_mention_what_was_planted(examples):
    _, cases = examples
    cat = load_catalogue()
    for case in cases.values():
        for study_id, text in case.truth.reports.items():
            read = read_findings(text, cat)
            present = {k for k, status in read.items() if status != "absent"}
            planted = {f.label for f in case.truth.findings if f.study_id == study_id}
            assert planted <= present, (case.id, study_id, planted - present)
            if study_id == "xr":
                assert all(cat.findings[k].xr for k in present if k in cat.findings), (case.id, present)


def test_radiograph_shows_dark_lungs_and_bright_mediastinum(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "pneumonia")
    rad = load_study(out / cid, next(s for s in case.studies if s.modality == Modality.XR)).array
    h, w = rad.shape
    mid = rad[h // 3: 2 * h // 3, w // 2 - w // 20: w // 2 + w // 20].mean()
    lungs = np.concatenate([rad[h // 3: 2 * h // 3, w // 5: w // 3], rad[h // 3: 2 * h // 3, 2 * w // 3: 4 * w // 5]])
    assert 0.0 <= rad.min() and rad.max() <= 1.0
    assert mid > lungs.mean() + 0.1


def test_dicom_identity_is_stripped_on_load(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "pulmonary_embolism")
    raw = pydicom.dcmread(next((out / cid / "ct").glob("*.dcm")))
    name, pid = str(raw.PatientName), str(raw.PatientID)
    assert name and pid  # the files carry a (fake) identity, as real exports do
    vol = load_study(out / cid, case.studies[0])
    dumped = json.dumps(vol.metadata, default=str) + repr(vol)
    for phi in (name, pid, str(raw.PatientBirthDate), name.split("^")[0]):
        assert phi not in dumped
    yaml_text = (out / cid / "case.yaml").read_text()
    assert name.split("^")[0] not in yaml_text and pid not in yaml_text


def test_contrast_case_shows_the_embolus(examples):
    out, cases = examples
    cid, case = _by_dx(cases, "pulmonary_embolism")
    vol, masks = _ct(out, cid, case)
    pa = (masks["organs"] == ORGAN_LABELS["pulmonary_artery"]) & (masks["lesions"] == 0)
    labels = {v: int(k) for k, v in next(m for m in case.truth.masks if m.kind == "lesions").labels.items()}
    clot = masks["lesions"] == labels["pulmonary_embolus"]
    assert np.median(vol.array[pa]) > np.median(vol.array[clot]) + 120


def test_slides_are_pyramids_with_tumour_boxes(examples):
    out, cases = examples
    for dx in ("lung_adenocarcinoma", "lung_squamous_cell_carcinoma"):
        cid, case = _by_dx(cases, dx)
        with open_slide(out / cid / case.studies[0].path) as s:
            assert s.level_count >= 2 and s.dimensions == EXAMPLE_OPTIONS.slide_size
            assert case.truth.roi_boxes
            x0, y0, x1, y1 = case.truth.roi_boxes[0].box
            assert 0 <= x0 < x1 <= s.dimensions[0] and 0 <= y0 < y1 <= s.dimensions[1]
            cx, cy = int((x0 + x1) / 2) - 32, int((y0 + y1) / 2) - 32
            patch = s.read_region(cx, cy, 0, 64, 64)
            assert patch.shape == (64, 64, 3) and patch.std() > 5


def test_case_generation_is_deterministic(examples, tmp_path):
    out, cases = examples
    generate_case(EXAMPLE_SEED, 0, tmp_path, EXAMPLE_OPTIONS, plan=replace(EXAMPLE_PLANS[0]))
    cid = next(iter(cases))
    assert (tmp_path / cid / "case.yaml").read_text() == (out / cid / "case.yaml").read_text()
    a = load_study(tmp_path / cid, cases[cid].studies[0]).array
    b = load_study(out / cid, cases[cid].studies[0]).array
    assert np.array_equal(a, b)


SMALL = CohortOptions.for_grid((40, 48, 48), xr_shape=(96, 96), slide_size=(1024, 768))


def test_cohort_resumes_and_cleans_partial_folders(tmp_path):
    ids = generate_cohort(3, 7, tmp_path, SMALL)
    assert len(ids) == 3
    keep = tmp_path / ids[0] / "case.yaml"
    mtime = keep.stat().st_mtime_ns
    import shutil
    shutil.rmtree(tmp_path / ids[1])
    (tmp_path / f".{ids[1]}.partial").mkdir()  # a crash mid-case leaves this behind
    assert generate_cohort(3, 7, tmp_path, SMALL) == ids
    assert keep.stat().st_mtime_ns == mtime
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    assert validate_cases(tmp_path) == (3, [])


def test_cli_generate_and_validate(tmp_path):
    from app import app

    r = CliRunner().invoke(app, ["cases", "generate", "--out", str(tmp_path), "--n", "2", "--seed", "3",
                                 "--ct-size", "40,48,48", "--pathology-fraction", "0"])
    assert r.exit_code == 0, r.output
    assert len([p for p in tmp_path.iterdir() if (p / "case.yaml").is_file()]) == 2
    assert "[ct, xr]" in r.output  # each case's studies are listed (not eaten as Rich markup)
    r = CliRunner().invoke(app, ["cases", "validate", str(tmp_path)])
    assert r.exit_code == 0 and "2 case folder(s) OK" in r.output
    r = CliRunner().invoke(app, ["cases", "generate", "--out", str(tmp_path), "--ct-size", "40,48,64"])
    assert r.exit_code != 0 and "square" in r.output


def test_dicom_birth_date_agrees_with_age_at_the_study_date(examples):
    """The fake identity's birth date follows from the study date and the patient's age, not from
    today's date (which made a seeded cohort depend on the year it was generated in)."""
    import datetime as dt

    out, cases = examples
    files = sorted(out.glob("*/cxr.dcm")) + sorted(out.glob("*/ct/IM00001.dcm"))
    assert len(files) >= 3
    for f in files:
        ds = pydicom.dcmread(f)
        born, seen = (dt.datetime.strptime(str(v), "%Y%m%d").date() for v in (ds.PatientBirthDate, ds.StudyDate))
        age = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
        assert f"{age:03d}Y" == ds.PatientAge, f
        assert age == cases[f.relative_to(out).parts[0]].patient.age
