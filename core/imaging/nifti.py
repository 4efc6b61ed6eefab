"""NIfTI in and out (nibabel), in the project's canonical LPS [z, y, x] order.

NIfTI world space is RAS+. `nib.as_closest_canonical` turns the voxel axes into (R, A, S)
increasing; our Volume wants axes (S, P, L) increasing in the order [z, y, x], so the canonical
array is flipped in its first two axes (R->L, A->P) and transposed. The writer goes the other
way with an LPS-ordered affine (x axis to patient Left is -R in world), so load(write(v)) == v.

Nothing from the header's free-text fields (descrip, aux_file, intent_name, db_name) reaches
`metadata`: they can hold names. Spacings and origins are rounded (NIfTI stores
them as float32): spacings to 1e-6 mm, origins to 1e-4 mm.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from core.errors import CaseDataError
from core.imaging.types import Volume

log = logging.getLogger(__name__)

_NIFTI1_MAGIC = {b"n+1\x00"}
_NIFTI2_MAGIC = b"n+2\x00\r\n\x1a\n"
_LIB_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error,
               struct.error, TypeError, IndexError, MemoryError)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return False


@contextlib.contextmanager
def _quiet_nibabel() -> Iterator[None]:
    """Silence nibabel's header checker ("sizeof_hdr should be 348; set ...").

    nibabel's own `LoggingOutputSuppressor` only removes the handler of `nibabel.global`; the
    records then propagate to the root logger, and with no handler there Python's last-resort
    handler still prints them to stderr, unattributed. A filter on the logger drops them at source;
    the problems they describe are checked and reported here, naming the file.
    """
    nblog = logging.getLogger("nibabel.global")
    flt = _DropRecords()
    nblog.addFilter(flt)
    try:
        yield
    finally:
        nblog.removeFilter(flt)


def _suffix_ok(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _check_raw_header(path: Path) -> None:
    """sizeof_hdr and magic straight from the bytes (nibabel silently 'fixes' some of these)."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise CaseDataError(path, "(file)", f"cannot read the file ({type(e).__name__}: not gzip or truncated)") from None
    if len(head) < 348:
        raise CaseDataError(path, "header", f"file has {len(head)} bytes, shorter than a NIfTI header (348)")
    le, be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
    size = le if le in (348, 540) else be
    if size == 348:
        if head[344:348] not in _NIFTI1_MAGIC:
            raise CaseDataError(path, "magic", f"NIfTI-1 magic is {head[344:348]!r}, expected b'n+1\\x00' "
                                "(corrupted header, or a split .hdr/.img pair)")
    elif size == 540:
        if len(head) < 540 or head[4:12] != _NIFTI2_MAGIC:
            raise CaseDataError(path, "magic", "NIfTI-2 magic is wrong (corrupted header)")
    else:
        raise CaseDataError(path, "sizeof_hdr", f"is {le}, expected 348 (NIfTI-1) or 540 (NIfTI-2): "
                            "not a NIfTI file or a corrupted header")


def _open(path: str | Path) -> tuple[Path, Any, tuple[int, ...]]:
    """Validated, canonical (RAS) image and its 3-D shape."""
    path = Path(path)
    if not path.is_file():
        raise CaseDataError(path, "path", "file not found" if not path.exists() else "not a file")
    if not _suffix_ok(path):
        raise CaseDataError(path, "path", "a NIfTI file must be named .nii or .nii.gz")
    _check_raw_header(path)
    try:
        with _quiet_nibabel():
            img = nib.load(str(path))
    except _LIB_ERRORS as e:
        raise CaseDataError(path, "header", f"not a readable NIfTI header ({type(e).__name__})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseDataError(path, "header", f"{type(img).__name__} is not a NIfTI image")
    hdr = img.header
    dim = [int(x) for x in hdr["dim"]]
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1 : dim[0] + 1]):
        raise CaseDataError(path, "dim", f"invalid dim field {dim}")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise CaseDataError(path, "dim", f"{len(shape)}-D image {shape}; a volume needs 3 dimensions")
    if any(s != 1 for s in shape[3:]):
        raise CaseDataError(path, "dim", f"{len(shape)}-D image {shape} holds more than one volume; "
                            "give a single 3-D volume")
    try:
        dtype = hdr.get_data_dtype()
    except _LIB_ERRORS:
        raise CaseDataError(path, "datatype", "unknown NIfTI datatype code") from None
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise CaseDataError(path, "datatype", f"{dtype} is not a scalar numeric type (RGB/complex not supported)")
    aff = img.affine
    if aff is None or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise CaseDataError(path, "sform/qform", "the voxel-to-world affine is missing, singular or not finite "
                            "(check pixdim and the qform/sform)")
    try:
        with _quiet_nibabel():
            canon = nib.as_closest_canonical(img)
    except (OSError, EOFError, zlib.error) as e:  # reorienting reads the voxels: a truncated file ends here
        raise CaseDataError(path, "data", f"cannot read the voxel data ({type(e).__name__}: truncated file?)") from None
    except _LIB_ERRORS as e:
        raise CaseDataError(path, "sform/qform", f"cannot reorient ({type(e).__name__})") from None
    return path, canon, tuple(int(s) for s in canon.shape[:3])


def _data(path: Path, canon: Any, dtype: type) -> np.ndarray:
    try:
        if len(canon.shape) > 3:
            arr = np.asarray(canon.dataobj[(Ellipsis,) + (0,) * (len(canon.shape) - 3)])
        else:
            arr = np.asanyarray(canon.dataobj)
        arr = np.asarray(arr, dtype=dtype) if dtype is not None else np.asarray(arr)
    except _LIB_ERRORS as e:
        raise CaseDataError(path, "data", f"cannot read the voxel data ({type(e).__name__}: truncated file?)") from None
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise CaseDataError(path, "data", "contains NaN or infinite values (check scl_slope/scl_inter)")
    return arr


def _ras_to_lps_zyx(arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[::-1, ::-1, :].transpose(2, 1, 0))


def _lps_zyx_to_ras(arr: np.ndarray) -> np.ndarray:
    return arr.transpose(2, 1, 0)[::-1, ::-1, :]


def _geometry(canon: Any) -> tuple[tuple[float, float, float], tuple[float, float, float], float]:
    aff = np.asarray(canon.affine, dtype=np.float64)
    zooms = np.linalg.norm(aff[:3, :3], axis=0)  # per RAS voxel axis
    nx, ny = canon.shape[0], canon.shape[1]
    corner = aff @ np.array([nx - 1, ny - 1, 0, 1.0])  # RAS of our voxel [0, 0, 0]
    spacing = (round(float(zooms[2]), 6), round(float(zooms[1]), 6), round(float(zooms[0]), 6))
    origin = (round(float(-corner[0]), 4), round(float(-corner[1]), 4), round(float(corner[2]), 4))
    cosines = np.abs(aff[:3, :3] / zooms)
    obliq = float(np.degrees(np.arccos(np.clip(np.min(np.diag(cosines)), -1, 1))))
    return spacing, origin, obliq  # type: ignore[return-value]


def load_nifti(path: str | Path) -> Volume:
    """A 3-D NIfTI (or 4-D with one volume) -> Volume: float32 (HU for CT), LPS [z, y, x]."""
    path, canon, _ = _open(path)
    data = _data(path, canon, np.float32)
    arr = _ras_to_lps_zyx(data)
    spacing, origin, obliq = _geometry(canon)
    md: dict[str, Any] = {
        "source_format": "nifti",
        "units": "HU (assumed for CT)",
        "stored_dtype": str(canon.header.get_data_dtype()),
        "deidentified": True,
    }
    slope, inter = canon.header.get_slope_inter()
    if slope is not None and (slope != 1 or (inter or 0) != 0):
        md["rescaled"] = True
    if obliq > 0.01:
        md["obliquity_deg"] = round(obliq, 3)
    log.debug("%s: loaded NIfTI, shape %s, spacing %s", path, arr.shape, spacing)
    return Volume(array=arr, spacing=spacing, source=path, origin=origin, metadata=md)


def load_mask_nifti(path: str | Path, like: Volume | None = None) -> np.ndarray:
    """An integer label mask in the same orientation as `load_nifti` gives: uint8 (or int32).

    With `like`, the mask's shape must equal the image's.
    """
    path, canon, _ = _open(path)
    data = _data(path, canon, None)
    if data.dtype.kind == "f":
        if not np.all(data == np.round(data)):
            raise CaseDataError(path, "data", "mask values must be integer labels")
    if data.size and data.min() < 0:
        raise CaseDataError(path, "data", "mask labels must not be negative")
    out_dtype = np.uint8 if (not data.size or data.max() <= 255) else np.int32
    arr = _ras_to_lps_zyx(data.astype(out_dtype))
    if like is not None and arr.shape != tuple(like.shape):
        raise CaseDataError(path, "dim", f"mask shape {arr.shape} does not match the image shape {tuple(like.shape)}")
    return arr


def volume_affine_ras(volume: Volume) -> np.ndarray:
    """Voxel [x, y, z] (our LPS axes, array transposed) -> RAS world mm."""
    sz, sy, sx = (float(s) for s in volume.spacing)
    ox, oy, oz = (float(o) for o in volume.origin)
    return np.array([[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1.0]])


def write_nifti(volume: Volume, path: str | Path, dtype: Any = np.int16) -> Path:
    """Write `volume` (or a mask Volume) as NIfTI-1 with a correct LPS->RAS affine.

    dtype int16 (HU, rounded) or uint8 (masks), or float32 for exact values.
    """
    path = Path(path)
    if not _suffix_ok(path):
        raise CaseDataError(path, "path", "a NIfTI file must be named .nii or .nii.gz")
    arr = np.asarray(volume.array)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise CaseDataError(path, "volume.array", f"expected a 3-D array, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise CaseDataError(path, "volume.array", "contains NaN or infinite values")
    if min(float(s) for s in volume.spacing) <= 0:
        raise CaseDataError(path, "volume.spacing", "spacings must be positive")
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        vals = np.rint(arr) if arr.dtype.kind == "f" else arr
        info = np.iinfo(dt)
        if vals.size and (vals.min() < info.min or vals.max() > info.max):
            raise CaseDataError(path, "volume.array", f"values {vals.min()}..{vals.max()} do not fit {dt}")
        data = vals.astype(dt)
    elif dt.kind == "f":
        data = arr.astype(dt)
    else:
        raise CaseDataError(path, "dtype", f"{dt} is not supported (int16, uint8, float32)")
    aff = volume_affine_ras(volume)
    img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), aff)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header["descrip"] = b"grandrounds"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


__all__ = ["load_nifti", "load_mask_nifti", "write_nifti", "volume_affine_ras"]
