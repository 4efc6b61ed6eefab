"""Whole-slide patch pipeline: tissue -> tile grid at a chosen magnification -> batched reading ->
features from a patch encoder, cached per slide in zarr.

- Tissue: `core.imaging.slide.tissue_mask` (Otsu on HSV saturation) on an overview read from a low
  pyramid level at about `mask_mpp` um/px, closed over airspaces narrower than 2 x `close_um`
  (alveoli, gland lumina: lung tissue is mostly air) and small holes filled. A tile needs
  `min_tissue` of that envelope and `min_stained` of stained tissue.
- Grid: square tiles of `tile_px` px at `target_mpp` um/px (default: the encoder's own). Pixels come
  from the coarsest level not coarser than the target (never upsampled unless level 0 is coarser),
  resized when that level's mpp differs. Tiles whose tissue cover is below `min_tissue` are dropped;
  `max_tiles` keeps that many spread evenly over the raster order, so the choice is deterministic.
- Features: `encoder.encode(uint8 [B, H, W, 3]) -> float32 [B, dim]` (any object with the
  `TileEncoder` attributes; `tools.patch_encoders` has the implementations), batch by batch.
  `slide_features_many` runs several encoders on one grid, reading each tile once (the
  per-tile alignment a fusion of encoders needs).
- Cache: `<cache_dir>/<slide stem>-<key>.zarr` with `features`, `xy0` (level-0 px, top-left),
  `xy_um` and `tissue`; the key hashes the slide's content fingerprint (size + first and last MiB,
  so a renamed or copied slide still hits), the encoder's name and version and the tile
  parameters. It is written under a temporary name and renamed when complete: a crash leaves only
  a `*.tmp-*` folder, which is never read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.errors import CaseDataError

__all__ = ["TileParams", "TileGrid", "SlideFeatures", "TileEncoder", "tile_grid", "tissue_masks", "read_tiles",
           "resize_tiles", "iter_tile_batches", "encode_tiles", "slide_features", "slide_features_many",
           "cache_path", "file_fingerprint"]

log = logging.getLogger(__name__)
CACHE_FORMAT = "1"  # bump when the stored layout or the grid rule changes
_FINGERPRINT_BYTES = 1 << 20


class TileEncoder(Protocol):
    name: str
    version: str
    dim: int
    tile_px: int
    mpp: float

    def encode(self, tiles: np.ndarray) -> np.ndarray: ...


class TileParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    target_mpp: float | None = Field(None, gt=0)  # um/px of the tiles; None = the encoder's
    tile_px: int | None = Field(None, ge=16, le=4096)  # tile edge at target_mpp; None = the encoder's
    min_tissue: float = Field(0.5, ge=0.0, le=1.0)  # tissue cover (envelope, airspaces included) a tile needs
    min_stained: float = Field(0.05, ge=0.0, le=1.0)  # and stained cover: no tile of nothing but airspace
    max_tiles: int | None = Field(None, ge=1)
    overlap: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of the tile edge shared by neighbours
    mask_mpp: float = Field(4.0, gt=0)  # tissue detection resolution, um/px
    # airspaces, lumina and holes narrower than 2 * close_um inside tissue count as tissue (lung!)
    close_um: float = Field(60.0, ge=0)
    default_mpp: float = Field(0.5, gt=0)  # level-0 mpp assumed when the file records none

    def resolved(self, encoder: TileEncoder) -> "TileParams":
        return self.model_copy(update={"target_mpp": self.target_mpp or float(encoder.mpp),
                                       "tile_px": self.tile_px or int(encoder.tile_px)})


class TileGrid(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    level: int
    level_mpp: float
    read_px: int  # tile edge read at `level`, resized to tile_px when different
    tile_px: int
    mpp: float  # um/px of the tiles handed to the encoder
    mpp0: float  # level-0 um/px (the file's, or the assumed default)
    mpp_known: bool
    size0: float  # tile edge in level-0 px
    xy0: np.ndarray  # [N, 2] int64, level-0 px of each tile's top-left corner
    tissue: np.ndarray  # [N] float32 tissue cover

    @property
    def xy_um(self) -> np.ndarray:
        return self.xy0.astype(np.float64) * self.mpp0

    def __len__(self) -> int:
        return int(self.xy0.shape[0])


class SlideFeatures(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    slide: str
    key: str
    encoder: str
    encoder_version: str
    params: TileParams
    level: int
    mpp: float
    mpp_known: bool
    features: np.ndarray  # [N, dim] float32 (rounded through the stored dtype)
    xy0: np.ndarray  # [N, 2] int64 level-0 px
    xy_um: np.ndarray  # [N, 2] float64 um from the slide's origin
    tissue: np.ndarray  # [N] float32
    from_cache: bool
    seconds: float


# ------------------------------------------------------------------ grid

def tissue_masks(slide: Any, params: TileParams, mpp0: float) -> tuple[np.ndarray, np.ndarray]:
    """(stained tissue from `tissue_mask`, its envelope: closed over airspaces and small holes)."""
    import warnings

    from skimage.morphology import closing, disk, remove_small_holes

    from core.imaging.slide import tissue_mask

    w0, h0 = slide.level_dimensions[0]
    max_size = int(min(4096, max(64, math.ceil(max(w0, h0) * mpp0 / params.mask_mpp))))
    stained = tissue_mask(slide, max_size=max_size)
    r = params.close_um / (w0 * mpp0 / stained.shape[1])  # in mask pixels
    envelope = stained
    if r >= 1:
        envelope = stained | closing(stained, disk(int(round(r))), mode="ignore").astype(bool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            envelope = remove_small_holes(envelope, int(math.pi * (2 * r) ** 2))
    return stained, envelope


def _cover(mask: np.ndarray, xy0: np.ndarray, size0: float, w0: int, h0: int) -> np.ndarray:
    """Mean of the mask over each tile's footprint (summed-area table), at least one mask pixel."""
    mh, mw = mask.shape
    sx, sy = w0 / mw, h0 / mh
    sat = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    c0 = np.clip(np.rint(xy0[:, 0] / sx).astype(np.int64), 0, mw - 1)
    r0 = np.clip(np.rint(xy0[:, 1] / sy).astype(np.int64), 0, mh - 1)
    c1 = np.clip(np.maximum(c0 + 1, np.rint((xy0[:, 0] + size0) / sx).astype(np.int64)), 1, mw)
    r1 = np.clip(np.maximum(r0 + 1, np.rint((xy0[:, 1] + size0) / sy).astype(np.int64)), 1, mh)
    total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return (total / ((r1 - r0) * (c1 - c0))).astype(np.float32)


def tile_grid(slide: Any, params: TileParams) -> TileGrid:
    """The tissue tiles of `slide` for resolved `params` (target_mpp and tile_px set)."""
    if params.target_mpp is None or params.tile_px is None:
        raise ValueError("tile_grid needs resolved params: call params.resolved(encoder) first")
    mpp0 = slide.mpp or params.default_mpp
    ds = [float(d) for d in slide.level_downsamples]
    want = params.target_mpp / mpp0
    # 10% slack: pyramids store rounded level sizes, so a nominal 4x level reads as 4.0003x
    finer = [i for i, d in enumerate(ds) if d <= want * 1.1]
    level = max(finer, key=lambda i: ds[i]) if finer else int(np.argmin(ds))
    level_mpp = mpp0 * ds[level]
    read_px = max(1, round(params.tile_px * params.target_mpp / level_mpp))
    size0 = read_px * ds[level]
    stride0 = size0 * (1.0 - params.overlap)
    w0, h0 = slide.level_dimensions[0]
    nx = int((w0 - size0) // stride0) + 1 if w0 >= size0 else 0
    ny = int((h0 - size0) // stride0) + 1 if h0 >= size0 else 0
    gy, gx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    xy0 = np.stack([np.rint(gx.ravel() * stride0), np.rint(gy.ravel() * stride0)], 1).astype(np.int64)
    cover = stained = np.zeros(len(xy0), np.float32)
    if len(xy0):
        masks = tissue_masks(slide, params, mpp0)
        stained, cover = (_cover(m, xy0, size0, w0, h0) for m in masks)
    keep = np.nonzero((cover >= max(params.min_tissue, 1e-6)) & (stained >= params.min_stained))[0]
    if params.max_tiles is not None and len(keep) > params.max_tiles:
        keep = keep[np.unique(np.linspace(0, len(keep) - 1, params.max_tiles).round().astype(np.int64))]
    return TileGrid(level=level, level_mpp=level_mpp, read_px=read_px, tile_px=params.tile_px,
                    mpp=params.target_mpp, mpp0=mpp0, mpp_known=slide.mpp is not None, size0=size0,
                    xy0=xy0[keep].reshape(-1, 2), tissue=cover[keep])


# ------------------------------------------------------------------ reading and encoding

def resize_tiles(tiles: np.ndarray, px: int) -> np.ndarray:
    """uint8 [B, h, w, 3] -> uint8 [B, px, px, 3]; PIL's resampling is antialiased when shrinking."""
    if tiles.shape[1:3] == (px, px):
        return tiles
    from PIL import Image

    out = np.empty((tiles.shape[0], px, px, 3), np.uint8)
    for i, t in enumerate(tiles):
        out[i] = np.asarray(Image.fromarray(t).resize((px, px), Image.Resampling.BILINEAR))
    return out


def read_tiles(slide: Any, grid: TileGrid, idx: np.ndarray | list[int]) -> np.ndarray:
    """uint8 [len(idx), tile_px, tile_px, 3] for the given grid rows."""
    raw = np.stack([slide.read_region(int(x), int(y), grid.level, grid.read_px, grid.read_px)
                    for x, y in grid.xy0[np.asarray(idx, np.int64)]]) if len(idx) else \
        np.zeros((0, grid.read_px, grid.read_px, 3), np.uint8)
    return resize_tiles(raw, grid.tile_px)


def iter_tile_batches(slide: Any, grid: TileGrid, batch_size: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(grid rows, uint8 tiles) in raster order, `batch_size` at a time."""
    for s in range(0, len(grid), batch_size):
        idx = np.arange(s, min(s + batch_size, len(grid)))
        yield idx, read_tiles(slide, grid, idx)


def encode_tiles(slide: Any, grid: TileGrid, encoders: Sequence[TileEncoder], *, batch_size: int = 64,
                 progress: bool = True, desc: str | None = None) -> list[np.ndarray]:
    """float32 [N, encoder.dim] per encoder for every tile of the grid; each tile is read once."""
    from tqdm.auto import tqdm

    outs = [np.zeros((len(grid), int(e.dim)), np.float32) for e in encoders]
    with tqdm(total=len(grid), unit="tile", disable=not progress, desc=desc) as bar:
        for idx, tiles in iter_tile_batches(slide, grid, batch_size):
            for e, out in zip(encoders, outs):
                f = np.asarray(e.encode(tiles), np.float32)
                if f.shape != (len(idx), e.dim):
                    raise ValueError(f"encoder {e.name} returned {f.shape}, expected {(len(idx), e.dim)}")
                out[idx] = f
            bar.update(len(idx))
    return outs


# ------------------------------------------------------------------ cache

def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and a hash of the first and last MiB: cheap on a multi-GB file, blind to its name."""
    try:
        size = path.stat().st_size
        h = hashlib.sha256()
        with path.open("rb") as f:
            h.update(f.read(_FINGERPRINT_BYTES))
            if size > _FINGERPRINT_BYTES:
                f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
                h.update(f.read(_FINGERPRINT_BYTES))
    except FileNotFoundError:
        raise CaseDataError(path, "file", "does not exist") from None
    except IsADirectoryError:
        raise CaseDataError(path, "file", "is a directory, not a slide file") from None
    except OSError as e:
        raise CaseDataError(path, "file", f"cannot read: {e.strerror or e}") from None
    return {"size": size, "sha256_head_tail": h.hexdigest()}


def _key(fingerprint: dict[str, Any], encoder: TileEncoder, params: TileParams,
         dtype: str) -> tuple[str, dict[str, Any]]:
    ident = {"format": CACHE_FORMAT, "slide": fingerprint, "encoder": encoder.name,
             "encoder_version": str(encoder.version), "dim": int(encoder.dim),
             "params": params.model_dump(), "dtype": dtype}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24], ident


def cache_path(cache_dir: str | Path, slide_path: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"{Path(slide_path).stem}-{key}.zarr"


def _load(p: Path, key: str) -> dict[str, Any] | None:
    import zarr

    if not (p / "zarr.json").is_file():
        return None
    try:
        g = zarr.open_group(str(p), mode="r")
        attrs = dict(g.attrs)
        if attrs.get("key") != key or not attrs.get("complete"):
            return None
        return {"attrs": attrs, **{k: g[k][:] for k in ("features", "xy0", "xy_um", "tissue")}}
    except Exception as e:  # an unreadable cache is re-made, not fatal
        log.warning("ignoring unreadable feature cache %s: %s", p, e)
        return None


def _store(p: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    import zarr

    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f"{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        g = zarr.open_group(str(tmp), mode="w")
        for k, a in arrays.items():
            g.create_array(k, data=a, chunks=(max(1, min(len(a), 4096)),) + a.shape[1:])
        g.attrs.update({**attrs, "complete": True})
        if p.exists():  # a stale or broken cache of the same key
            shutil.rmtree(p, ignore_errors=True)
        os.rename(tmp, p)
    except OSError:
        if not (p / "zarr.json").exists():
            raise
    finally:
        if tmp.exists():  # another process renamed first, or we failed part-way
            shutil.rmtree(tmp, ignore_errors=True)


def slide_features_many(path: str | Path, encoders: Sequence[TileEncoder], params: TileParams, *,
                        cache_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True,
                        dtype: Literal["float16", "float32"] = "float16") -> list[SlideFeatures]:
    """Tile features of one slide for several encoders on one grid (params with target_mpp and tile_px
    set; each encoder resizes to its own input), in the encoders' order. Cached encoders are loaded;
    the others share one pass over the slide's tiles."""
    t0 = time.perf_counter()
    if params.target_mpp is None or params.tile_px is None:
        raise ValueError("slide_features_many needs params with target_mpp and tile_px set")
    path = Path(path)
    fingerprint = file_fingerprint(path)
    keys = [_key(fingerprint, e, params, dtype) for e in encoders]
    found = [_load(cache_path(cache_dir, path, k), k) if cache_dir is not None else None for k, _ in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    results: dict[int, dict[str, Any]] = {i: f for i, f in enumerate(found) if f is not None}
    if todo:
        from core.imaging.slide import open_slide

        with open_slide(path) as slide:
            grid = tile_grid(slide, params)
            feats = encode_tiles(slide, grid, [encoders[i] for i in todo], batch_size=batch_size,
                                 progress=progress, desc=f"{path.name} ({', '.join(encoders[i].name for i in todo)})")
        meta = {"level": grid.level, "mpp": grid.mpp, "mpp_known": grid.mpp_known}
        for i, f in zip(todo, feats):
            arrays = {"features": f.astype(dtype), "xy0": grid.xy0, "xy_um": grid.xy_um, "tissue": grid.tissue}
            if cache_dir is not None:
                key, ident = keys[i]
                _store(cache_path(cache_dir, path, key), arrays, {"key": key, "ident": ident, **meta})
            results[i] = {**arrays, "attrs": meta}
    seconds = time.perf_counter() - t0
    out = []
    for i, e in enumerate(encoders):
        r = results[i]
        out.append(SlideFeatures(
            slide=str(path), key=keys[i][0], encoder=e.name, encoder_version=str(e.version), params=params,
            features=np.asarray(r["features"], np.float32), xy0=np.asarray(r["xy0"], np.int64),
            xy_um=np.asarray(r["xy_um"], np.float64), tissue=np.asarray(r["tissue"], np.float32),
            from_cache=i not in todo, seconds=seconds, **{k: r["attrs"][k] for k in ("level", "mpp", "mpp_known")}))
    return out


def slide_features(path: str | Path, encoder: TileEncoder, params: TileParams | None = None, *,
                   cache_dir: str | Path | None = None, batch_size: int = 64, progress: bool = True,
                   dtype: Literal["float16", "float32"] = "float16") -> SlideFeatures:
    """Tile features of one slide (params default to the encoder's magnification and tile size),
    from the zarr cache when it holds them, else encoded and stored."""
    return slide_features_many(path, [encoder], (params or TileParams()).resolved(encoder), cache_dir=cache_dir,
                               batch_size=batch_size, progress=progress, dtype=dtype)[0]
