"""One entry point from a case's study to a loaded, de-identified image.

Every failure is a `CaseDataError(file, field, problem)`: library exceptions are caught here
and converted (their messages are not copied for DICOM, where they may quote header values).
"""
from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from typing import Any, Union

from core.case import CASE_FILE, FORMATS_BY_MODALITY, Modality, Study, StudyFormat, resolve_study_path
from core.errors import CaseDataError
from core.imaging.types import Radiograph, Slide, Volume

log = logging.getLogger(__name__)

Loaded = Union[Volume, Radiograph, Slide]

# DICOM Modality values that fit each study modality
_DICOM_MODALITIES: dict[Modality, set[str]] = {
    Modality.CT: {"CT"},
    Modality.MR: {"MR"},
    Modality.XR: {"CR", "DX", "DR", "RG", "MG", "IO", "PX", "OT", "SC", "XA", "RF"},
}


def _library_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, ValueError, EOFError, KeyError, IndexError, TypeError,
                                       AttributeError, NotImplementedError, RuntimeError, MemoryError,
                                       OverflowError, struct.error, zlib.error, UnicodeError, AssertionError]
    try:
        from pydicom.errors import InvalidDicomError
        errs.append(InvalidDicomError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from nibabel.filebasedimages import ImageFileError
        from nibabel.spatialimages import HeaderDataError
        errs += [ImageFileError, HeaderDataError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from PIL import UnidentifiedImageError
        errs.append(UnidentifiedImageError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def _acq(study: Study, *keys: str) -> Any:
    for k in keys:
        if k in study.acquisition:
            return study.acquisition[k]
    return None


def load_study(case_folder: str | Path, study: Study, *, salt: str | bytes | None = None) -> Loaded:
    """Load `study` of the case in `case_folder`: Volume (CT/MR), Radiograph (XR) or Slide (WSI)."""
    case_folder = Path(case_folder)
    fmt = StudyFormat(study.format)
    modality = Modality(study.modality)
    field = f"studies[{study.id}]"
    allowed = FORMATS_BY_MODALITY.get(modality, set())
    if fmt not in allowed:
        names = ", ".join(sorted(f.value for f in allowed))
        raise CaseDataError(case_folder / CASE_FILE, f"{field}.format",
                            f"format {fmt.value!r} does not fit modality {modality.value} (use one of: {names})")
    path = resolve_study_path(case_folder, study, f"{field}.path")
    if not path.exists():
        raise CaseDataError(path, f"{field}.path", "file or folder not found")
    try:
        out = _dispatch(path, fmt, study, salt)
    except CaseDataError:
        raise
    except _library_errors() as e:
        detail = type(e).__name__
        if fmt not in (StudyFormat.DICOM, StudyFormat.DICOM_SERIES):
            detail += ": " + " ".join(str(e).split())[:200]
        raise CaseDataError(path, "(file)", f"cannot read this {fmt.value} study ({detail})") from None
    except Exception as e:  # noqa: BLE001 - last line of defence: no traceback reaches a user
        log.debug("%s: unexpected %s while loading a %s study", path, type(e).__name__, fmt.value)
        raise CaseDataError(path, "(file)", f"cannot read this {fmt.value} study "
                            f"(unexpected {type(e).__name__})") from None
    _check_modality(out, modality, path)
    return out


def _dispatch(path: Path, fmt: StudyFormat, study: Study, salt: str | bytes | None) -> Loaded:
    if fmt is StudyFormat.DICOM_SERIES:
        from core.imaging.dicom import load_dicom_series

        if not path.is_dir():
            raise CaseDataError(path, "path", "a dicom-series study names a folder of slice files")
        return load_dicom_series(path, salt=salt)
    if fmt is StudyFormat.NIFTI:
        from core.imaging.nifti import load_nifti

        return load_nifti(path)
    if fmt in (StudyFormat.PNG, StudyFormat.DICOM):
        from core.imaging.dicom import load_dicom_image
        from core.imaging.radiograph import _spacing_arg, load_png

        spacing = _acq(study, "pixel_spacing_mm", "pixel_spacing")
        view = _acq(study, "view", "view_position")
        if path.is_dir():
            raise CaseDataError(path, "path", f"a {fmt.value} study names one file, not a folder")
        if fmt is StudyFormat.DICOM:
            return load_dicom_image(path, salt=salt, view=view, spacing=_spacing_arg(spacing, path))
        return load_png(path, spacing=spacing, view=view)
    if fmt in (StudyFormat.SVS, StudyFormat.TIFF):
        try:
            from core.imaging.slide import open_slide
        except ImportError:
            raise CaseDataError(path, "format", "whole-slide support is not available in this install") from None
        return open_slide(path)
    raise CaseDataError(path, "format", f"unsupported format {fmt.value!r}")  # pragma: no cover


def _check_modality(out: Loaded, modality: Modality, path: Path) -> None:
    """The DICOM header's Modality must agree with what case.yaml says."""
    md = getattr(out, "metadata", None)
    if not isinstance(md, dict):
        return
    dicom_modality = md.get("modality")
    expected = _DICOM_MODALITIES.get(modality)
    if dicom_modality and expected and dicom_modality not in expected:
        raise CaseDataError(path, "Modality", f"the DICOM header says {dicom_modality} but case.yaml says "
                            f"{modality.value}")


__all__ = ["load_study", "Loaded"]
