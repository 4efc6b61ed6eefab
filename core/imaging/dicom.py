"""DICOM in and out: series -> Volume, single image -> Radiograph, and writers for synthetic cohorts.

Every file is de-identified as it is read (`core.deid`); only safe acquisition facts reach
`metadata`. Bad input raises `CaseDataError(file, field, problem)` and nothing else.

Policies (decided here, relied on by tests):
- Files: every non-hidden regular file in the folder is read. A file that is not DICOM is an
  error when it is named `*.dcm`; any other non-DICOM file (a README, a thumbnail) is skipped
  and counted in `metadata["skipped_files"]`. `DICOMDIR` is skipped.
- Slices are ordered by ImagePositionPatient projected on the slice normal, never by
  InstanceNumber. Irregular slice gaps (more than 1 % or 0.01 mm off the median gap, e.g. a
  missing slice) are an ERROR: a Volume has one z spacing and silent resampling would misplace
  anatomy. Duplicate positions and sheared stacks (gantry tilt) are errors too.
- z spacing comes from the positions; for a single slice from SpacingBetweenSlices, else
  SliceThickness, else 1 mm (with `metadata["z_spacing_source"] == "assumed"`).
- Reorientation is to the closest canonical LPS axes (like nibabel's as_closest_canonical);
  an oblique series is accepted and its deviation recorded in `metadata["obliquity_deg"]`.
- BurnedInAnnotation == "YES" is refused with CaseDataError (see core.deid).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import struct
import threading
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pydicom
from pydicom import config as _pdcfg
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from core.deid import deidentify
from core.errors import CaseDataError
from core.imaging.types import Radiograph, Volume

log = logging.getLogger(__name__)

DEFAULT_RADIOGRAPH_SPACING_MM = 0.2  # typical flat-panel detector pitch; used only when nothing says
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG", "MG", "IO", "PX", "OT", "SC", "XA", "RF"})
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
_NOT_IMAGE_SOP_WORDS = ("Directory", "Structured Report", "SR Storage", "RT Plan", "RT Structure",
                        "Waveform", "Segmentation", "Presentation State", "Key Object")
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError,
                AttributeError, NotImplementedError, OverflowError, struct.error, zlib.error,
                UnicodeError, RuntimeError, AssertionError)

_LOCK = threading.RLock()


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return False


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Read without pydicom validating (its warnings and log lines quote element values = PHI)."""
    with _LOCK:
        old = _pdcfg.settings.reading_validation_mode
        pdlog = logging.getLogger("pydicom")
        flt = _DropRecords()
        pdlog.addFilter(flt)
        _pdcfg.settings.reading_validation_mode = _pdcfg.IGNORE
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            _pdcfg.settings.reading_validation_mode = old
            pdlog.removeFilter(flt)


def _looks_like_image(ds: Dataset) -> bool:
    return "PixelData" in ds and "Rows" in ds and "Columns" in ds


def _read(path: Path, *, required: bool) -> Dataset | None:
    """Read one file. Not DICOM: CaseDataError when `required`, else None. Call inside _quiet_pydicom."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no 128-byte preamble: old-style files are still DICOM if they parse as an image
    except _READ_ERRORS as e:
        raise CaseDataError(path, "(file)", f"unreadable or truncated DICOM file ({type(e).__name__})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
        if _looks_like_image(ds) and ("SOPClassUID" in ds or "Modality" in ds):
            _ = ds.Rows, ds.Columns  # force parsing of the values
            return ds
    except _READ_ERRORS:
        pass
    if required:
        raise CaseDataError(path, "(file)", "not a DICOM file (no DICM preamble and no readable image header)")
    return None


def _check_single_image(ds: Dataset, path: Path) -> None:
    sop_name = str(getattr(ds.get("SOPClassUID"), "name", "") or "")
    if "DirectoryRecordSequence" in ds or any(w in sop_name for w in _NOT_IMAGE_SOP_WORDS):
        raise CaseDataError(path, "SOPClassUID", f"not an image ({sop_name or 'no pixel data'})")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise CaseDataError(path, "PixelData", "float pixel data is not supported")
        raise CaseDataError(path, "PixelData", "no pixel data (not an image, or the file is truncated)")
    for kw in ("Rows", "Columns"):
        v = ds.get(kw)
        if not isinstance(v, int) or v <= 0:
            raise CaseDataError(path, kw, "missing or not a positive integer")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise CaseDataError(path, "NumberOfFrames", "not an integer") from None
    if frames != 1:
        raise CaseDataError(path, "NumberOfFrames", f"multi-frame object ({frames} frames); "
                            "only single-frame images are supported (one file per slice)")
    spp = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if spp != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise CaseDataError(path, "PhotometricInterpretation",
                            f"{photometric or 'unknown'} with {spp} samples per pixel; a grayscale "
                            "(MONOCHROME1/2) image is required")


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values through the modality LUT (RescaleSlope/Intercept): float64 [rows, cols]."""
    try:
        arr = ds.pixel_array
    except ValueError as e:
        problem = "pixel data is truncated or inconsistent with Rows/Columns/BitsAllocated"
        if "less than expected" not in str(e) and "truncat" not in str(e).lower():
            problem = "pixel data cannot be decoded (corrupt or inconsistent header)"
        raise CaseDataError(path, "PixelData", problem) from None
    except Exception as e:  # noqa: BLE001 - decoder plugins raise anything; the user gets one line
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts_name = getattr(ts, "name", None) or "unknown transfer syntax"
        raise CaseDataError(path, "PixelData", f"cannot decode pixel data ({ts_name}; {type(e).__name__})") from None
    if arr.ndim != 2 or arr.shape != (ds.Rows, ds.Columns):
        raise CaseDataError(path, "PixelData", f"decoded shape {arr.shape} is not Rows x Columns")
    try:
        out = pydicom.pixels.apply_modality_lut(arr, ds)
    except Exception as e:  # noqa: BLE001
        raise CaseDataError(path, "RescaleSlope", f"cannot apply the modality LUT / rescale ({type(e).__name__})") from None
    out = np.asarray(out, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        raise CaseDataError(path, "RescaleSlope", "rescaled pixel values are not finite")
    return out


def _floats(ds: Dataset, kw: str, n: int, path: Path, required: bool = True) -> np.ndarray | None:
    v = ds.get(kw)
    if v is None or v == "":
        if required:
            raise CaseDataError(path, kw, "missing")
        return None
    try:
        seq = [v] if isinstance(v, (str, int, float)) else list(v)
        vals = np.array([float(x) for x in seq])
    except (TypeError, ValueError):
        raise CaseDataError(path, kw, f"expected {n} numbers") from None
    if vals.shape != (n,) or not np.all(np.isfinite(vals)):
        raise CaseDataError(path, kw, f"expected {n} finite numbers, got {len(vals)}")
    return vals


class _Slice:
    __slots__ = ("path", "pos", "row_dir", "col_dir", "ps", "rows", "cols", "series", "modality",
                 "pixels", "md", "sbs", "thick", "iop_assumed")


def _slice_from(path: Path, ds: Dataset, salt: str | bytes | None) -> _Slice:
    _check_single_image(ds, path)
    clean, md = deidentify(ds, source=path, salt=salt, copy=False)
    s = _Slice()
    s.path, s.md = path, md
    s.rows, s.cols = int(clean.Rows), int(clean.Columns)
    s.series = str(clean.get("SeriesInstanceUID", "") or "")
    s.modality = str(clean.get("Modality", "") or "").strip().upper()
    iop = _floats(clean, "ImageOrientationPatient", 6, path, required=False)
    s.iop_assumed = iop is None
    if iop is None:
        iop = np.array([1.0, 0, 0, 0, 1.0, 0])
    r, c = iop[:3], iop[3:]
    if not (0.99 < np.linalg.norm(r) < 1.01 and 0.99 < np.linalg.norm(c) < 1.01 and abs(r @ c) < 0.01):
        raise CaseDataError(path, "ImageOrientationPatient", "row and column directions are not orthonormal")
    s.row_dir, s.col_dir = r / np.linalg.norm(r), c / np.linalg.norm(c)
    pos = _floats(clean, "ImagePositionPatient", 3, path, required=False)
    s.pos = pos
    ps = _floats(clean, "PixelSpacing", 2, path, required=False)
    if ps is None:
        ps = _floats(clean, "ImagerPixelSpacing", 2, path, required=False)
    if ps is None or np.any(ps <= 0):
        raise CaseDataError(path, "PixelSpacing", "missing or not positive")
    s.ps = ps
    s.sbs = md.get("spacing_between_slices_mm")
    s.thick = md.get("slice_thickness_mm")
    s.pixels = _pixels(clean, path)
    return s


def _reorient(arr: np.ndarray, dirs: list[np.ndarray], spacing: list[float], slice_pos: list[np.ndarray],
              source: Path) -> tuple[np.ndarray, tuple[float, float, float], tuple[float, float, float], float]:
    """Stack [slice, row, col] with LPS axis directions `dirs` -> canonical [z, y, x] (to S, P, L).

    `slice_pos[k]` is the LPS position of pixel [0, 0] of slice k.
    Returns (array, spacing zyx, origin xyz of the new voxel [0, 0, 0], obliquity in degrees).
    """
    world = [int(np.argmax(np.abs(d))) for d in dirs]  # 0 = x (L), 1 = y (P), 2 = z (S)
    if sorted(world) != [0, 1, 2]:
        raise CaseDataError(source, "ImageOrientationPatient",
                            "orientation is too oblique to map onto patient axes (45 degree ambiguity)")
    obliq = max(float(np.degrees(np.arccos(min(1.0, abs(d[w]))))) for d, w in zip(dirs, world))
    order = [0, 0, 0]
    for i, w in enumerate(world):
        order[2 - w] = i  # new axis 0 = z (w 2), 1 = y, 2 = x
    flips = [bool(dirs[i][world[i]] < 0) for i in range(3)]
    out = arr
    for i in range(3):
        if flips[i]:
            out = np.flip(out, axis=i)
    out = np.ascontiguousarray(np.transpose(out, order))
    idx = [arr.shape[i] - 1 if flips[i] else 0 for i in range(3)]
    pos = corner_position(slice_pos, idx, dirs, spacing)
    sp = tuple(float(spacing[order[t]]) for t in range(3))
    return out, sp, (float(pos[0]), float(pos[1]), float(pos[2])), obliq  # type: ignore[return-value]


def corner_position(slice_pos: list[np.ndarray], idx: list[int], dirs: list[np.ndarray],
                    spacing: list[float]) -> np.ndarray:
    """LPS position of voxel idx=(k, r, c) of a stack whose slice k's pixel [0, 0] is slice_pos[k]."""
    return slice_pos[idx[0]] + idx[1] * spacing[1] * dirs[1] + idx[2] * spacing[2] * dirs[2]


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


def load_dicom_series(folder: str | Path, *, salt: str | bytes | None = None) -> Volume:
    """A folder of single-frame DICOM slices -> de-identified Volume in canonical LPS [z, y, x]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseDataError(folder, "path", "not a folder; a dicom-series study names a folder of slice files")
    slices: list[_Slice] = []
    skipped: list[str] = []
    with _quiet_pydicom():
        for p in _dicom_files(folder):
            if p.name.upper() == "DICOMDIR":
                skipped.append(p.name)
                continue
            ds = _read(p, required=p.suffix.lower() == ".dcm")
            if ds is None:
                skipped.append(p.name)
                continue
            slices.append(_slice_from(p, ds, salt))
    if skipped:
        log.warning("%s: skipped %d non-DICOM file(s): %s", folder, len(skipped), ", ".join(skipped[:5]))
    if not slices:
        raise CaseDataError(folder, "(folder)", "no DICOM slices in this folder")
    return _assemble(folder, slices, skipped)


def _assemble(folder: Path, slices: list[_Slice], skipped: list[str]) -> Volume:
    first = slices[0]
    for s in slices[1:]:
        pair = f"{first.path.name} vs {s.path.name}"
        if s.series != first.series:
            n = len({x.series for x in slices})
            raise CaseDataError(folder, "SeriesInstanceUID",
                                f"the folder mixes {n} series ({pair}); put each series in its own folder")
        if s.modality != first.modality:
            raise CaseDataError(folder, "Modality", f"mixed modalities {first.modality} and {s.modality} ({pair})")
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise CaseDataError(folder, "Rows/Columns", f"mixed image sizes {first.rows}x{first.cols} and "
                                f"{s.rows}x{s.cols} ({pair})")
        if not (np.allclose(s.row_dir, first.row_dir, atol=1e-3) and np.allclose(s.col_dir, first.col_dir, atol=1e-3)):
            raise CaseDataError(folder, "ImageOrientationPatient", f"mixed orientations ({pair}); "
                                "a series must be one stack of parallel slices")
        if not np.allclose(s.ps, first.ps, rtol=1e-3, atol=1e-4):
            raise CaseDataError(folder, "PixelSpacing", f"mixed pixel spacings ({pair})")
    if first.modality and first.modality not in VOLUME_MODALITIES:
        raise CaseDataError(first.path, "Modality", f"{first.modality} is not a cross-sectional modality "
                            f"({', '.join(sorted(VOLUME_MODALITIES))}); a radiograph is format 'dicom'")
    normal = np.cross(first.row_dir, first.col_dir)
    n = len(slices)
    z_source = "positions"
    if n > 1:
        for s in slices:
            if s.pos is None:
                raise CaseDataError(s.path, "ImagePositionPatient", "missing; needed to order the slices")
            if s.iop_assumed:
                raise CaseDataError(s.path, "ImageOrientationPatient", "missing; needed to order the slices")
        slices.sort(key=lambda s: float(s.pos @ normal))
        proj = np.array([float(s.pos @ normal) for s in slices])
        gaps = np.diff(proj)
        k = int(np.argmin(gaps))
        if gaps[k] < 1e-3:
            raise CaseDataError(folder, "ImagePositionPatient", f"{slices[k].path.name} and {slices[k + 1].path.name} "
                                "lie at the same position (duplicate slice or two acquisitions)")
        dz = float(np.median(gaps))
        tol = max(0.01 * dz, 0.01)
        bad = np.abs(gaps - dz) > tol
        if np.any(bad):
            j = int(np.argmax(np.abs(gaps - dz)))
            raise CaseDataError(folder, "ImagePositionPatient",
                                f"irregular slice spacing: gap {gaps[j]:.3f} mm between {slices[j].path.name} and "
                                f"{slices[j + 1].path.name}, median {dz:.3f} mm (missing slice?); "
                                "a volume needs evenly spaced slices")
        steps = np.diff(np.stack([s.pos for s in slices]), axis=0)
        inplane = steps - np.outer(steps @ normal, normal)
        if np.max(np.linalg.norm(inplane, axis=1)) > max(0.01 * dz, 0.01):
            raise CaseDataError(folder, "ImagePositionPatient", "slice positions are sheared against the slice "
                                "normal (gantry tilt); resample to an orthogonal stack first")
    else:
        s = first
        if s.sbs and s.sbs > 0:
            dz, z_source = float(s.sbs), "SpacingBetweenSlices"
        elif s.thick and s.thick > 0:
            dz, z_source = float(s.thick), "SliceThickness"
        else:
            dz, z_source = 1.0, "assumed"
        if s.pos is None:
            s.pos = np.zeros(3)
    stack = np.stack([s.pixels for s in slices]).astype(np.float32)
    dirs = [normal, first.col_dir, first.row_dir]  # array axes: slice, row index, column index
    spacing = [dz, float(first.ps[0]), float(first.ps[1])]  # PixelSpacing = (between rows, between columns)
    positions = [s.pos for s in slices]
    arr, sp, origin, obliq = _reorient(stack, dirs, spacing, positions, folder)
    md = dict(slices[0].md)
    md.update({
        "source_format": "dicom-series",
        "n_slices": n,
        "z_spacing_source": z_source,
        "orientation": {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(np.abs(normal)))],
        "units": "HU" if first.modality == "CT" else "scanner units",
    })
    if obliq > 0.01:
        md["obliquity_deg"] = round(obliq, 3)
    if first.iop_assumed:
        md["orientation_assumed"] = True
    if skipped:
        md["skipped_files"] = len(skipped)
    log.debug("%s: loaded %d slice(s), shape %s, spacing %s", folder, n, arr.shape, sp)
    return Volume(array=arr, spacing=sp, source=folder, origin=origin, metadata=md)


# --------------------------------------------------------------------------------------------
# single radiograph


def _view(raw: Any) -> str | None:
    v = str(raw or "").strip().upper()
    if v in {"PA", "AP"}:
        return v
    if v in {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "L", "R"}:
        return "LAT"
    return None


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    f = function.strip().upper()
    if f == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if f == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        width = 1.0
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first_number(v: Any) -> float | None:
    if v is None or v == "":
        return None
    if hasattr(v, "__len__") and not isinstance(v, str):
        if not len(v):
            return None
        v = v[0]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _to_unit(values: np.ndarray, ds: Dataset, path: Path) -> tuple[np.ndarray, str]:
    """Modality-LUT output -> [0, 1] by VOI LUT, else window, else min/max."""
    seq = ds.get("VOILUTSequence")
    if seq and len(seq) and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        try:
            out = pydicom.pixels.apply_voi(values, ds, 0).astype(np.float64)
            lut = np.asarray(seq[0].LUTData, dtype=np.float64)
            lo, hi = float(lut.min()), float(lut.max())
        except Exception as e:  # noqa: BLE001
            raise CaseDataError(path, "VOILUTSequence", f"cannot apply the VOI LUT ({type(e).__name__})") from None
        if hi > lo:
            return np.clip((out - lo) / (hi - lo), 0, 1), "voi_lut"
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
        return _window(values, center, width, fn), "window"
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values), "minmax"
    return (values - lo) / (hi - lo), "minmax"


def load_dicom_image(path: str | Path, *, salt: str | bytes | None = None, view: str | None = None,
                     spacing: float | tuple[float, float] | None = None) -> Radiograph:
    """One DICOM radiograph (CR/DX/...) -> de-identified Radiograph in [0, 1], bone bright.

    Header values win over `view` / `spacing` (which the case may give as fall-backs).
    """
    path = Path(path)
    if not path.is_file():
        raise CaseDataError(path, "path", "file not found" if not path.exists() else "not a file")
    with _quiet_pydicom():
        ds = _read(path, required=True)
        assert ds is not None
        _check_single_image(ds, path)
        modality = str(ds.get("Modality", "") or "").strip().upper()
        if modality and modality not in RADIOGRAPH_MODALITIES:
            hint = "use format dicom-series" if modality in VOLUME_MODALITIES else "not a projection radiograph"
            raise CaseDataError(path, "Modality", f"{modality} is not a radiograph ({hint})")
        clean, md = deidentify(ds, source=path, salt=salt, copy=False)
        values = _pixels(clean, path)
        unit, how = _to_unit(values, clean, path)
    photometric = str(clean.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    md.update({"source_format": "dicom", "intensity_normalisation": how})
    sp: tuple[float, float] | None = None
    for kw in ("ImagerPixelSpacing", "PixelSpacing"):
        v = md.get("imager_pixel_spacing_mm" if kw == "ImagerPixelSpacing" else "pixel_spacing_mm")
        if v and len(v) == 2 and min(v) > 0:
            sp, md["spacing_source"] = (float(v[0]), float(v[1])), kw
            break
    if sp is None:
        if spacing is not None:
            sp = (float(spacing), float(spacing)) if np.isscalar(spacing) else tuple(map(float, spacing))  # type: ignore[arg-type]
            md["spacing_source"] = "argument"
        else:
            sp = (DEFAULT_RADIOGRAPH_SPACING_MM, DEFAULT_RADIOGRAPH_SPACING_MM)
            md["spacing_source"] = "default"
            md["spacing_assumed"] = True
    v = _view(clean.get("ViewPosition")) or _view(view)
    if v is None:
        v = "PA"
        md["view_assumed"] = True
    arr = np.clip(unit, 0.0, 1.0).astype(np.float32)
    return Radiograph(array=arr, spacing=sp, source=path, view=v, metadata=md)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# writers (synthetic cohorts)


def _seed_text(uid_seed: Any, rng: Any) -> str:
    if uid_seed is not None:
        return str(uid_seed)
    if rng is not None:
        return str(int(rng.integers(0, 2**62)))
    return uuid.uuid4().hex


def make_uid(seed: str, *parts: Any) -> str:
    """Deterministic UID under the 2.25 arc from a seed and parts."""
    h = hashlib.sha256(("|".join([seed, *map(str, parts)])).encode()).digest()
    return "2.25." + str(int.from_bytes(h[:16], "big"))


def _da(value: Any, field: str) -> str:
    if isinstance(value, _dt.datetime):
        value = value.date()
    if isinstance(value, _dt.date):
        return value.strftime("%Y%m%d")
    s = str(value or "").replace("-", "").strip()
    if s and (len(s) != 8 or not s.isdigit()):
        raise CaseDataError("<writer>", field, "a date must be YYYYMMDD, YYYY-MM-DD or a date object")
    return s


def _base_dataset(sop_class: str, sop_uid: str, modality: str, patient: dict, study_date: Any,
                  study_time: str, study_uid: str, series_uid: str, series_number: int,
                  series_description: str, study_description: str, acquisition: dict | None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    date = _da(study_date, "study_date")
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = str(study_time)
    ds.AccessionNumber = ""
    ds.Modality = modality
    acq = dict(acquisition or {})
    ds.Manufacturer = str(acq.get("manufacturer", "GrandRounds Synthetic"))
    ds.ManufacturerModelName = str(acq.get("manufacturer_model", f"Synth{modality}"))
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    p = patient or {}
    ds.PatientName = str(p.get("name", "") or "")
    ds.PatientID = str(p.get("id", "") or "")
    ds.PatientBirthDate = _da(p.get("birth_date", ""), "patient.birth_date")
    sex = str(p.get("sex", "") or "").upper()[:1]
    ds.PatientSex = sex if sex in {"M", "F", "O"} else ""
    if p.get("age") is not None:
        ds.PatientAge = f"{int(p['age']):03d}Y"
    ds.BodyPartExamined = str(acq.get("body_part", "CHEST")).upper()
    ds.BurnedInAnnotation = "NO"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    if "kvp" in acq:
        ds.KVP = float(acq["kvp"])
    if "tube_current_ma" in acq:
        ds.XRayTubeCurrent = int(acq["tube_current_ma"])
    agent = acq.get("contrast_agent")
    if agent:
        ds.ContrastBolusAgent = "IODINATED CONTRAST" if agent is True else str(agent)
        ds.ContrastBolusRoute = "IV"
    return ds


def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    patient: dict,
    study_date: Any,
    uid_seed: Any = None,
    rng: Any = None,
    series_description: str = "",
    slice_thickness: float | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    study_time: str = "090000",
    study_description: str = "",
    modality: str = "CT",
    acquisition: dict | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write `volume` as axial single-frame CT (or MR) Image Storage files, one per z slice.

    HU are rounded to integers and stored as int16 with RescaleIntercept (-1024 when it fits).
    UIDs derive from `uid_seed` (or one draw of `rng`): same seed, same files. Pass the same
    `study_uid` to put several series in one study. `acquisition` may give kvp, tube_current_ma,
    convolution_kernel, contrast_agent (bool or name), body_part, manufacturer, manufacturer_model.
    Returns the paths written, in slice order (slice 0 = most inferior).
    """
    folder = Path(folder)
    arr = np.asarray(volume.array)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise CaseDataError(folder, "volume.array", f"expected a 3-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CaseDataError(folder, "volume.array", "contains NaN or infinite values")
    modality = modality.upper()
    if modality not in {"CT", "MR"}:
        raise CaseDataError(folder, "modality", "write_dicom_series writes CT or MR")
    dz, dy, dx = (float(v) for v in volume.spacing)
    if min(dz, dy, dx) <= 0:
        raise CaseDataError(folder, "volume.spacing", "spacings must be positive")
    hu = np.rint(arr.astype(np.float64))
    intercept = -1024.0
    if hu.min() - intercept < -32768 or hu.max() - intercept > 32767:
        intercept = float(np.round((hu.min() + hu.max()) / 2))
        if hu.min() - intercept < -32768 or hu.max() - intercept > 32767:
            raise CaseDataError(folder, "volume.array", "value range too wide for 16-bit storage")
    stored = (hu - intercept).astype("<i2")
    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("*.dcm"))
    if existing:
        if not overwrite:
            raise CaseDataError(folder, "(folder)", f"already holds {len(existing)} .dcm file(s); pass overwrite=True")
        for p in existing:
            p.unlink()
    seed = _seed_text(uid_seed, rng)
    study_uid = study_uid or make_uid(seed, "study")
    series_uid = make_uid(seed, "series", series_number)
    for_uid = make_uid(seed, "frame-of-reference")
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    acq = dict(acquisition or {})
    ox, oy, oz = (float(v) for v in volume.origin)
    paths = []
    for k in range(arr.shape[0]):
        sop_uid = make_uid(seed, "sop", series_number, k)
        ds = _base_dataset(sop_class, sop_uid, modality, patient, study_date, study_time, study_uid,
                           series_uid, series_number, series_description, study_description, acq)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        z = oz + k * dz
        ds.ImagePositionPatient = [round(ox, 6), round(oy, 6), round(z, 6)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 6)
        ds.SliceThickness = float(slice_thickness if slice_thickness is not None else dz)
        ds.SpacingBetweenSlices = dz
        ds.PixelSpacing = [dy, dx]
        if modality == "CT":
            ds.ConvolutionKernel = str(acq.get("convolution_kernel", "STANDARD"))
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(arr.shape[1]), int(arr.shape[2])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = intercept
        ds.RescaleSlope = 1
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"IM{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_dicom_radiograph(
    rad: Radiograph,
    path: str | Path,
    *,
    patient: dict,
    study_date: Any,
    uid_seed: Any = None,
    rng: Any = None,
    series_description: str = "",
    study_uid: str | None = None,
    series_number: int = 1,
    study_time: str = "090000",
    study_description: str = "",
    photometric: str = "MONOCHROME2",
    acquisition: dict | None = None,
) -> Path:
    """Write a DX (for presentation) file: 16-bit unsigned, window that maps stored/65535 back exactly.

    `photometric="MONOCHROME1"` stores inverted values (for testing readers of such files).
    """
    path = Path(path)
    a = np.asarray(rad.array, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 1:
        raise CaseDataError(path, "rad.array", f"expected a 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise CaseDataError(path, "rad.array", "contains NaN or infinite values")
    photometric = photometric.upper()
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise CaseDataError(path, "photometric", "MONOCHROME1 or MONOCHROME2")
    a = np.clip(a, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        a = 1.0 - a
    stored = np.rint(a * 65535).astype("<u2")
    seed = _seed_text(uid_seed, rng)
    study_uid = study_uid or make_uid(seed, "study")
    sop_class = DigitalXRayImageStorageForPresentation
    ds = _base_dataset(sop_class, make_uid(seed, "sop", series_number, 0), "DX", patient, study_date,
                       study_time, study_uid, make_uid(seed, "series", series_number), series_number,
                       series_description, study_description, acquisition)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    view = str(rad.view or "PA").upper()
    ds.ViewPosition = {"LAT": "LL"}.get(view, view)
    ds.PatientOrientation = ["L", "F"] if view != "LAT" else ["A", "F"]
    ds.ImagerPixelSpacing = [float(rad.spacing[0]), float(rad.spacing[1])]
    ds.PixelSpacing = [float(rad.spacing[0]), float(rad.spacing[1])]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(a.shape[0]), int(a.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 32767.5, 65535, "LINEAR_EXACT"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = [
    "load_dicom_series", "load_dicom_image", "write_dicom_series", "write_dicom_radiograph",
    "make_uid", "DEFAULT_RADIOGRAPH_SPACING_MM", "RADIOGRAPH_MODALITIES", "VOLUME_MODALITIES",
]
