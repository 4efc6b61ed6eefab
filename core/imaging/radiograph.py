"""Projection radiographs from PNG (8/16-bit grayscale, RGB converted) or DICOM.

Intensity: 8-bit values / 255, 16-bit values / 65535 (full bit range, so a PNG written by
`write_radiograph_png` reads back exactly). PNG carries no photometric tag: it is taken as
displayed (bright = dense). RGB/palette images become luma (ITU-R 601) with a metadata flag.

Pixel spacing, in order: the PNG pHYs chunk when its unit is the metre and the value is
plausible (0.01-5 mm); else the `spacing` argument; else DEFAULT_RADIOGRAPH_SPACING_MM with
`metadata["spacing_assumed"] = True`. `metadata["spacing_source"]` says which.
"""
from __future__ import annotations

import logging
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import CaseDataError
from core.imaging.dicom import DEFAULT_RADIOGRAPH_SPACING_MM, load_dicom_image
from core.imaging.types import Radiograph

log = logging.getLogger(__name__)

MAX_PIXELS = 120_000_000  # a radiograph is at most ~ 5000 x 5000; more is a mistake or a bomb
_VIEWS = {"PA": "PA", "AP": "AP", "LAT": "LAT", "LATERAL": "LAT", "LL": "LAT", "RL": "LAT"}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _spacing_arg(spacing: Any, path: Path) -> tuple[float, float] | None:
    if spacing is None:
        return None
    try:
        vals = [float(spacing)] * 2 if np.isscalar(spacing) else [float(v) for v in spacing]
    except (TypeError, ValueError):
        raise CaseDataError(path, "spacing", "pixel spacing must be a number or (row, col) in mm") from None
    if len(vals) != 2 or not all(np.isfinite(vals)) or min(vals) <= 0:
        raise CaseDataError(path, "spacing", "pixel spacing must be positive (row, col) in mm")
    return vals[0], vals[1]


def _png_spacing(info: dict) -> tuple[float, float] | None:
    dpi = info.get("dpi")
    if not dpi or len(dpi) != 2:
        return None
    try:
        dx, dy = float(dpi[0]), float(dpi[1])
    except (TypeError, ValueError):
        return None
    if dx <= 0 or dy <= 0:
        return None
    row, col = round(25.4 / dy, 6), round(25.4 / dx, 6)
    if not (0.01 <= row <= 5 and 0.01 <= col <= 5):
        return None
    return row, col


def _to_unit(img: Image.Image, path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    md: dict[str, Any] = {"png_mode": img.mode}
    mode = img.mode
    if mode in {"1", "L", "LA"}:
        g = img.getchannel(0) if mode == "LA" else img.convert("L") if mode == "1" else img
        return np.asarray(g, dtype=np.float64) / 255.0, {**md, "bit_depth": 8}
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float64) / 65535.0, {**md, "bit_depth": 16}
    if mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise CaseDataError(path, "(pixels)", "32-bit integer image with values outside 0..65535")
        return a / 65535.0, {**md, "bit_depth": 16}
    if mode in {"P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"}:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64)
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
            a = rgb[..., 0]
        else:
            a = rgb @ np.array([0.299, 0.587, 0.114])
        return a / 255.0, {**md, "bit_depth": 8, "converted_from": mode}
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.all(np.isfinite(a)):
            raise CaseDataError(path, "(pixels)", "float image with NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), {**md, "intensity_normalisation": "minmax"}
    raise CaseDataError(path, "(mode)", f"image mode {mode} is not supported")


def load_png(path: str | Path, *, spacing: float | tuple[float, float] | None = None,
             view: str | None = None) -> Radiograph:
    """A PNG radiograph (no DICOM sniffing: the file must be a PNG)."""
    path = Path(path)
    if not path.is_file():
        raise CaseDataError(path, "path", "file not found" if not path.exists() else "not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format != "PNG":
                    raise CaseDataError(path, "(format)", f"{img.format} image; a radiograph file must be PNG or DICOM")
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise CaseDataError(path, "(size)", f"{w}x{h} pixels is too large for a radiograph")
                if getattr(img, "n_frames", 1) > 1:
                    raise CaseDataError(path, "(frames)", "multi-frame image; a radiograph is one frame")
                img.load()
                info = dict(img.info)
                arr, md = _to_unit(img, path)
    except CaseDataError:
        raise
    except UnidentifiedImageError:
        raise CaseDataError(path, "(file)", "not an image file PIL can identify (PNG expected)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CaseDataError(path, "(size)", "image is too large (decompression bomb guard)") from None
    except (OSError, ValueError, SyntaxError, EOFError, zlib.error, MemoryError) as e:
        raise CaseDataError(path, "(file)", f"cannot decode the image ({type(e).__name__}: truncated or corrupt?)") from None
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise CaseDataError(path, "(pixels)", f"expected a 2-D grayscale image, got shape {arr.shape}")
    sp = _png_spacing(info)
    if sp is not None:
        md["spacing_source"] = "png_phys"
    else:
        sp = _spacing_arg(spacing, path)
        if sp is not None:
            md["spacing_source"] = "argument"
        else:
            sp = (DEFAULT_RADIOGRAPH_SPACING_MM, DEFAULT_RADIOGRAPH_SPACING_MM)
            md["spacing_source"] = "default"
            md["spacing_assumed"] = True
    v = _VIEWS.get(str(view or "").strip().upper())
    if v is None:
        v = "PA"
        md["view_assumed"] = True
    md["source_format"] = "png"
    md["deidentified"] = True  # PNG pixels only: text chunks are not read into metadata
    return Radiograph(array=np.clip(arr, 0, 1).astype(np.float32), spacing=sp, source=path, view=v, metadata=md)


def load_radiograph(path: str | Path, *, spacing: float | tuple[float, float] | None = None,
                    view: str | None = None, salt: str | bytes | None = None) -> Radiograph:
    """PNG or DICOM radiograph -> Radiograph (float32 [0, 1], bright = attenuating)."""
    path = Path(path)
    if not path.is_file():
        raise CaseDataError(path, "path", "file not found" if not path.exists() else "not a file")
    if _is_dicom(path):
        return load_dicom_image(path, salt=salt, view=view, spacing=_spacing_arg(spacing, path))
    return load_png(path, spacing=spacing, view=view)


def write_radiograph_png(rad: Radiograph, path: str | Path) -> Path:
    """16-bit grayscale PNG (round(array * 65535)) with the pixel spacing in pHYs."""
    path = Path(path)
    a = np.asarray(rad.array, dtype=np.float64)
    if a.ndim != 2 or min(a.shape) < 1:
        raise CaseDataError(path, "rad.array", f"expected a 2-D array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise CaseDataError(path, "rad.array", "contains NaN or infinite values")
    row, col = (float(s) for s in rad.spacing)
    if row <= 0 or col <= 0:
        raise CaseDataError(path, "rad.spacing", "spacing must be positive")
    img = Image.fromarray(np.rint(np.clip(a, 0, 1) * 65535).astype(np.uint16))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", dpi=(25.4 / col, 25.4 / row))
    return path


__all__ = ["load_radiograph", "load_png", "write_radiograph_png", "MAX_PIXELS"]
