"""Whole-slide images opened lazily: `open_slide(path) -> Slide`, and `tissue_mask`.

Backends: tiffslide (tifffile + imagecodecs) first; OpenSlide as a fallback for formats tiffslide
cannot parse (MIRAX, VMS/VMU, some odd TIFF layouts). Whatever the backend, the object obeys the
`Slide` protocol of `core.imaging.types`:

- `level_dimensions` are (width, height); level 0 is the highest resolution.
- `read_region(x, y, level, width, height)` takes x, y in level-0 pixels (OpenSlide's rule: the
  level origin is x / downsample, rounded down) and returns uint8 RGB `[height, width, 3]`.
  Parts outside the image are padded white (glass), as an OpenSlide region composited on white.
- `mpp` is microns per pixel at level 0, or None when the file records none (or a value that
  cannot be a microscope's, such as the 72 dpi default of image editors).

Bad input raises `CaseDataError(file, field, problem)`: a missing file, a file that is not a
slide (text renamed .svs), a truncated file whose tiles point past its end, a level out of range.
A plain, untiled, single-level TIFF (a small photo or crop) is accepted: it opens as a one-level
slide, read lazily strip by strip; `properties["grandrounds.tiled"]` is False for it.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CaseDataError

__all__ = ["WholeSlide", "open_slide", "tissue_mask"]

# Microns per pixel outside this range cannot come from a slide scanner or microscope camera
# (e.g. 72 dpi = 352.8 um/px is an image editor's default), so it is reported as unknown.
_MPP_PLAUSIBLE = (0.01, 100.0)
# Whole-level reads (thumbnail, read_level) go in horizontal bands of about this many pixels.
_BAND_PIXELS = 4_000_000


def _plausible_mpp(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or not (_MPP_PLAUSIBLE[0] <= v <= _MPP_PLAUSIBLE[1]):
        return None
    return v


def _to_rgb_uint8(arr: np.ndarray, file: Path) -> np.ndarray:
    """Any [h, w, c] / [h, w] pixel block -> uint8 RGB; alpha composited onto white."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr.astype(np.uint32) * 255 + 32767) // 65535
            arr = arr.astype(np.uint8)
        elif arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        else:
            raise CaseDataError(file, "pixels", f"unsupported sample type {arr.dtype}; expected 8-bit")
    c = arr.shape[2]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 2:  # grey + alpha
        grey, alpha = arr[..., :1].astype(np.uint16), arr[..., 1:2].astype(np.uint16)
        out = (grey * alpha + 255 * (255 - alpha) + 127) // 255
        return np.repeat(out.astype(np.uint8), 3, axis=2)
    if c == 3:
        return np.ascontiguousarray(arr)
    if c == 4:
        rgb, alpha = arr[..., :3].astype(np.uint16), arr[..., 3:4].astype(np.uint16)
        return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    raise CaseDataError(file, "pixels", f"{c} samples per pixel; expected grey, RGB or RGBA")


class WholeSlide:
    """A lazily read whole-slide image (see module docstring). Use `open_slide` to make one."""

    def __init__(self, source: Path, backend: str, handle: Any):
        self.source = source
        self.backend = backend  # "tiffslide" | "openslide"
        self._h = handle
        self._closed = False
        if backend == "tiffslide":
            props = dict(handle.properties)
            self._dims = [tuple(int(v) for v in d) for d in handle.level_dimensions]
            self._ds = [float(v) for v in handle.level_downsamples]
            self._mpp = _plausible_mpp(props.get("tiffslide.mpp-x"))
            self.vendor = props.get("tiffslide.vendor") or "unknown"
        else:
            props = dict(handle.properties)
            self._dims = [tuple(int(v) for v in d) for d in handle.level_dimensions]
            self._ds = [float(v) for v in handle.level_downsamples]
            self._mpp = _plausible_mpp(props.get("openslide.mpp-x"))
            self.vendor = props.get("openslide.vendor") or "unknown"
        self.properties: dict[str, Any] = props

    # -- protocol ---------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self._dims)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        return list(self._dims)  # type: ignore[arg-type]

    @property
    def level_downsamples(self) -> list[float]:
        return list(self._ds)

    @property
    def mpp(self) -> float | None:
        return self._mpp

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._dims[0]  # type: ignore[return-value]

    def _check_level(self, level: Any) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise CaseDataError(self.source, "level", f"level must be an integer, got {level!r}")
        if not 0 <= int(level) < self.level_count:
            raise CaseDataError(
                self.source, "level", f"level {level} out of range 0..{self.level_count - 1}"
            )
        return int(level)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.source}: slide is closed")

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """uint8 RGB [height, width, 3]; x, y in level-0 pixels; outside the image is white."""
        self._check_open()
        level = self._check_level(level)
        try:
            x, y, width, height = (int(v) for v in (x, y, width, height))
        except (TypeError, ValueError) as e:
            raise CaseDataError(self.source, "region", f"non-integer region: {e}") from None
        if width < 0 or height < 0:
            raise CaseDataError(self.source, "region", f"negative size {width}x{height}")
        out = np.full((height, width, 3), 255, np.uint8)
        if width == 0 or height == 0:
            return out
        if self.backend == "openslide":
            return self._read_openslide(x, y, level, width, height)
        ds = self._ds[level]
        lw, lh = self._dims[level]
        lx, ly = math.floor(x / ds), math.floor(y / ds)  # level-`level` origin of the region
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + width, lw), min(ly + height, lh)
        if cx1 <= cx0 or cy1 <= cy0:
            return out  # entirely outside: glass
        # tiffslide maps location -> int(location / ds): pass x itself when inside, else 0.
        loc = (x if lx >= 0 else 0, y if ly >= 0 else 0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = self._h.read_region(
                    loc, level, (cx1 - cx0, cy1 - cy0), as_array=True, padding=False
                )
        except CaseDataError:
            raise
        except Exception as e:  # decoder / truncated data errors come in many types
            raise CaseDataError(
                self.source, "pixels", f"cannot decode level {level} region at ({x}, {y}): "
                f"{type(e).__name__}: {e}"
            ) from None
        arr = _to_rgb_uint8(np.asarray(arr), self.source)
        if arr.shape[:2] != (cy1 - cy0, cx1 - cx0):
            raise CaseDataError(
                self.source, "pixels", f"level {level} returned {arr.shape[:2]} pixels, "
                f"expected {(cy1 - cy0, cx1 - cx0)}"
            )
        out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = arr
        return out

    def _read_openslide(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            img = self._h.read_region((x, y), level, (width, height))
        except Exception as e:
            raise CaseDataError(
                self.source, "pixels", f"cannot decode level {level} region at ({x}, {y}): "
                f"{type(e).__name__}: {e}"
            ) from None
        # OpenSlide returns RGBA, transparent outside the scanned area.
        return _to_rgb_uint8(np.asarray(img), self.source)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed `downsample` (OpenSlide's rule)."""
        best = 0
        for i, d in enumerate(self._ds):
            if d <= downsample * (1 + 1e-6):
                best = i
        return best

    def read_level(self, level: int, max_pixels: int | None = None) -> np.ndarray:
        """The whole of one level as uint8 RGB, read in horizontal bands."""
        level = self._check_level(level)
        w, h = self._dims[level]
        if max_pixels is not None and w * h > max_pixels:
            raise CaseDataError(
                self.source, "level", f"level {level} is {w}x{h} px, more than {max_pixels} px"
            )
        ds = self._ds[level]
        out = np.empty((h, w, 3), np.uint8)
        band = max(1, _BAND_PIXELS // max(w, 1))
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            # level-0 y for level row r0: ceil so that floor(y / ds) == r0 despite rounding
            y0 = math.ceil(r0 * ds - 1e-9)
            while math.floor(y0 / ds) > r0:
                y0 -= 1
            while math.floor(y0 / ds) < r0:
                y0 += 1
            out[r0:r1] = self.read_region(0, y0, level, w, r1 - r0)
        return out

    def thumbnail(self, max_size: int = 512) -> np.ndarray:
        """uint8 RGB image of the whole slide, longest side `max_size` (never enlarged)."""
        self._check_open()
        if int(max_size) < 1:
            raise CaseDataError(self.source, "max_size", f"must be >= 1, got {max_size}")
        max_size = int(max_size)
        w0, h0 = self._dims[0]
        scale = min(1.0, max_size / max(w0, h0))
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        level = self.best_level_for_downsample(max(w0 / tw, h0 / th))
        lw, lh = self._dims[level]
        # integer block-mean by f per band (bounded memory), then a final exact resize
        f = max(1, min(lw // tw, lh // th))
        band = max(f, (_BAND_PIXELS // max(lw, 1)) // f * f)
        ds = self._ds[level]
        parts = []
        for r0 in range(0, lh, band):
            r1 = min(lh, r0 + band)
            y0 = math.ceil(r0 * ds - 1e-9)
            while math.floor(y0 / ds) > r0:
                y0 -= 1
            while math.floor(y0 / ds) < r0:
                y0 += 1
            blk = self.read_region(0, y0, level, lw, r1 - r0)
            if f > 1:
                hh, ww = (blk.shape[0] // f) * f, (lw // f) * f
                if hh == 0:
                    continue
                b = blk[:hh, :ww].astype(np.float32).reshape(hh // f, f, ww // f, f, 3)
                blk = b.sum(axis=3).sum(axis=1) * (1.0 / (f * f))
            parts.append(blk.astype(np.float32, copy=False))
        small = np.concatenate(parts, axis=0)
        if small.shape[:2] != (th, tw):
            from skimage.transform import resize

            small = resize(small, (th, tw), order=1, anti_aliasing=True, preserve_range=True)
        return np.clip(np.rint(small), 0, 255).astype(np.uint8)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._h.close()
            except Exception:
                pass

    def __enter__(self) -> "WholeSlide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"WholeSlide({str(self.source)!r}, backend={self.backend}, levels={self._dims}, "
            f"mpp={self._mpp})"
        )


def _validate_tiff_layout(ts: Any, path: Path) -> dict[str, Any]:
    """Check the pyramid's pages: samples, tile data inside the file. Returns extra properties."""
    tf = ts.ts_tifffile
    size = os.path.getsize(path)
    idx = int(ts.properties.get("tiffslide.series-index", 0) or 0)
    series = tf.series[idx]
    tiled = True
    for lvl, level in enumerate(series.levels):
        for page in level.pages:
            if page is None:
                raise CaseDataError(path, "pyramid", f"level {lvl} has a missing page")
            if not getattr(page, "is_tiled", False):
                tiled = False
            offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            counts = np.asarray(page.databytecounts, dtype=np.int64)
            if offsets.size == 0:
                raise CaseDataError(path, "pyramid", f"level {lvl} has no image data")
            end = int((offsets + counts).max())
            if end > size:
                raise CaseDataError(
                    path, "file", f"truncated: level {lvl} data runs to byte {end} "
                    f"but the file has {size} bytes"
                )
            if page.compression != 1 and int((counts == 0).sum()) == counts.size:
                raise CaseDataError(path, "pyramid", f"level {lvl} has no tile data")
    return {"grandrounds.tiled": tiled}


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return False


class _quiet_tifffile:  # noqa: N801 - used as a context manager
    """tifffile logs "<TiffFile ...> contains no pages" and similar to stderr (Python's last-resort
    handler) for files it then refuses; the refusal is reported as a CaseDataError naming the file."""

    def __enter__(self) -> None:
        self._log, self._flt = logging.getLogger("tifffile"), _DropRecords()
        self._log.addFilter(self._flt)

    def __exit__(self, *exc: object) -> None:
        self._log.removeFilter(self._flt)


def open_slide(path: str | os.PathLike[str]) -> WholeSlide:
    """Open a whole-slide image lazily (SVS, generic/pyramidal TIFF, OpenSlide formats)."""
    p = Path(path)
    if not p.exists():
        raise CaseDataError(p, "file", "does not exist")
    if p.is_dir():
        raise CaseDataError(p, "file", "is a directory, not a slide file")
    if p.stat().st_size == 0:
        raise CaseDataError(p, "file", "is empty")
    errors: list[str] = []
    slide: WholeSlide | None = None
    try:
        import tiffslide

        with warnings.catch_warnings(), _quiet_tifffile():
            warnings.simplefilter("ignore")
            ts = tiffslide.TiffSlide(p)
            try:
                extra = _validate_tiff_layout(ts, p)
                slide = WholeSlide(p, "tiffslide", ts)
                slide.properties.update(extra)
            except Exception:
                ts.close()
                raise
    except CaseDataError:
        raise  # a TIFF we understood and found broken: no point asking OpenSlide
    except Exception as e:
        errors.append(f"tiffslide: {type(e).__name__}: {e}")
    if slide is None:
        try:
            import openslide

            osl = openslide.OpenSlide(str(p))
            slide = WholeSlide(p, "openslide", osl)
            slide.properties["grandrounds.tiled"] = True
        except Exception as e:
            errors.append(f"openslide: {type(e).__name__}: {e}")
    if slide is None:
        detail = "; ".join(m[:200] for m in errors)
        raise CaseDataError(p, "format", f"not a readable whole-slide image ({detail})")
    # probe: decode one tile of the smallest level and the last pixel of level 0, so that a
    # corrupt codec stream is reported now, naming the file, not deep inside a tool later
    try:
        last = slide.level_count - 1
        slide.read_region(0, 0, last, 1, 1)
        w0, h0 = slide.level_dimensions[0]
        slide.read_region(w0 - 1, h0 - 1, 0, 1, 1)
    except Exception:
        slide.close()
        raise
    return slide


def tissue_mask(slide: Any, level: int | None = None, *, max_size: int = 1024) -> np.ndarray:
    """Boolean tissue mask: Otsu threshold on HSV saturation of a low-resolution image.

    `level=None` uses `slide.thumbnail(max_size)`; otherwise the whole given level is read
    (refused above 64 Mpx). The mask's scale relative to level 0 is
    `slide.level_dimensions[0][0] / mask.shape[1]`. The Otsu threshold is kept within
    [0.04, 0.15] saturation, so a blank slide gives no tissue and a crop full of tissue gives
    all tissue rather than half of it. Near-black pixels (pen, scanner padding) are not tissue.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    if level is None:
        rgb = slide.thumbnail(max_size)
    else:
        if hasattr(slide, "read_level"):
            rgb = slide.read_level(level, max_pixels=64_000_000)
        else:
            w, h = slide.level_dimensions[level]
            rgb = slide.read_region(0, 0, level, w, h)
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)  # HSV S
    val = mx / 255.0  # HSV V
    sat = ndi.uniform_filter(sat, size=3)
    valid = val > 0.15
    if valid.sum() > 16 and np.ptp(sat[valid]) > 1e-6:
        t = float(threshold_otsu(sat[valid]))
    else:
        t = 0.15
    t = min(max(t, 0.04), 0.15)
    mask = (sat > t) & valid
    # tidy: drop specks, fill small holes (sizes relative to the mask)
    from skimage.morphology import remove_small_holes, remove_small_objects

    min_obj = max(4, mask.size // 20000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = remove_small_objects(mask, min_obj)
        mask = remove_small_holes(mask, min_obj)
    return mask
