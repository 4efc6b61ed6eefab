"""Synthetic H&E whole-slide images of lung: pyramidal tiled TIFFs with ROI truth.

`make_slide(rng, cls, path)` writes one slide and returns its metadata (the truth). Classes:

- ``normal_lung``: alveolar parenchyma, thin eosinophilic septa around empty airspaces, sparse
  small septal nuclei, capillary red cells, a few alveolar macrophages and small vessels.
- ``lung_adenocarcinoma``: acinar glands with lumina lined by columnar cells whose enlarged,
  vesicular nuclei (nucleoli) sit basally, oriented radially, in pale desmoplastic stroma.
- ``lung_squamous_cell_carcinoma``: solid nests of polygonal cells with pink glassy cytoplasm,
  pale intercellular clefts crossed by bridges, pleomorphic hyperchromatic nuclei, a darker
  basaloid rim, and keratin pearls (concentric lamellated eosinophilic whorls).

Tumour slides mix tumour regions with normal lung (the fraction varies); stains vary per slide.

How it is drawn (fast on two cores): structure is computed as *continuous* fields at 1/4
resolution (Voronoi distances from jittered grids for alveoli, cells and glands; smooth noise for
tissue pieces, tumour regions and nests; wavy phase fields for collagen fibres). The fields are
upsampled bilinearly band by band and thresholded at full resolution, so edges are crisp.
Nuclei, red cells and macrophages are stamped from small sprite banks. Colour comes from
Beer-Lambert optical density: I = I0 * 10^-(c_H * h + c_E * e + c_R * r) with per-slide stain
vectors. A 4096x3072 slide takes ~1-2 s on two cores and ~1.5-2.5 MB (JPEG tiles, YCbCr 4:2:0).

File layout: a tiled TIFF with the pyramid as reduced-resolution pages (SubFileType 1) after
level 0, each level 2x smaller; resolution tags in px/cm give the mpp (tiffslide and OpenSlide
both report levels and mpp). The file carries no class label; the returned dict is the truth.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["SLIDE_CLASSES", "make_slide", "write_slides"]

SLIDE_CLASSES = ("normal_lung", "lung_adenocarcinoma", "lung_squamous_cell_carcinoma")

_F = 4  # structure fields are computed at 1/_F of level-0 resolution
_LN10 = math.log(10.0)


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    v = np.clip(np.asarray(v, np.float64), 0.01, None)
    return v / np.linalg.norm(v)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, zero mean, unit std, float32. sigma in pixels of `shape`."""
    h, w = shape
    k = max(1, int(sigma // 3))  # draw coarser and zoom for large sigma
    hs, ws = h // k + 3, w // k + 3
    small = rng.standard_normal((hs, ws)).astype(np.float32)
    small = ndi.gaussian_filter(small, sigma / k, mode="wrap")
    if k > 1:
        small = ndi.zoom(small, k, order=1, prefilter=False)
    out = small[:h, :w]
    out = out - out.mean()
    return (out / (out.std() + 1e-8)).astype(np.float32)


def _jittered_grid(rng: np.random.Generator, w: float, h: float, s: float, jitter: float):
    """Seeds of a jittered grid covering [-s, w+s] x [-s, h+s]; returns (sx, sy, nx, ny, ox)."""
    nx, ny = int(math.ceil(w / s)) + 3, int(math.ceil(h / s)) + 3
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    sx = (gx - 1 + 0.5 + jitter * (rng.random((ny, nx)) - 0.5)) * s
    sy = (gy - 1 + 0.5 + jitter * (rng.random((ny, nx)) - 0.5)) * s
    return sx.astype(np.float32), sy.astype(np.float32), nx, ny


def _voronoi2(X: np.ndarray, Y: np.ndarray, sx: np.ndarray, sy: np.ndarray, s: float):
    """Nearest and second-nearest seed distances and nearest seed id (flat) for points X, Y.

    Seeds come from `_jittered_grid` (grid offset by one cell); candidates are the 3x3
    neighbouring grid cells, which is exact enough for a jitter below ~0.8.
    """
    ny, nx = sx.shape
    ci = np.clip(np.floor(X / s).astype(np.int32) + 1, 1, nx - 2)
    cj = np.clip(np.floor(Y / s).astype(np.int32) + 1, 1, ny - 2)
    d1 = np.full(X.shape, np.inf, np.float32)
    d2 = np.full(X.shape, np.inf, np.float32)
    idx = np.zeros(X.shape, np.int32)
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            k = (cj + dj) * nx + (ci + di)
            d = np.hypot(X - sx.ravel()[k], Y - sy.ravel()[k])
            closer = d < d1
            d2 = np.where(closer, d1, np.minimum(d2, d))
            idx = np.where(closer, k, idx)
            d1 = np.minimum(d1, d)
    return d1, d2, idx


class _Up:
    """Bilinear upsampling of 1/4-resolution fields to a level-0 window (rows r0:r1, low-res
    columns j0:j1 -> level-0 columns 4*j0 : 4*j1), using slices rather than gathers: for
    x = 4j + k the source coordinate is j + (2k - 3) / 8, so the weights repeat every 4 px."""

    _W = ((0, 3 / 8), (0, 1 / 8), (1, 7 / 8), (1, 5 / 8))  # (offset into padded row, left weight)

    def __init__(self, W: int, H: int, Wl: int, Hl: int):
        assert _F == 4
        self.W, self.Wl, self.Hl = W, Wl, Hl
        c = np.clip((np.arange(H) + 0.5) / _F - 0.5, 0, Hl - 1)
        self.y0 = np.minimum(np.floor(c).astype(np.int64), max(Hl - 2, 0))
        self.y1 = np.minimum(self.y0 + 1, Hl - 1)
        self.wy = (c - self.y0).astype(np.float32)[:, None]
        self.yn = np.clip(np.rint(c), 0, Hl - 1).astype(np.int64)

    def window(self, r0: int, r1: int, j0: int, j1: int) -> "_Win":
        return _Win(self, r0, r1, j0, j1)


class _Win:
    def __init__(self, up: _Up, r0: int, r1: int, j0: int, j1: int):
        self.up, self.r0, self.r1, self.j0, self.j1 = up, r0, r1, j0, j1
        self.width = min(up.W, 4 * j1) - 4 * j0
        self._cache: dict[int, np.ndarray] = {}

    def _cols(self, R: np.ndarray) -> np.ndarray:
        j0, j1, Wl = self.j0, self.j1, self.up.Wl
        n = j1 - j0
        left = R[:, j0 - 1 : j0] if j0 > 0 else R[:, :1]
        right = R[:, j1 : j1 + 1] if j1 < Wl else R[:, Wl - 1 : Wl]
        P = np.concatenate([left, R[:, j0:j1], right], axis=1)
        out = np.empty((R.shape[0], n, 4), np.float32)
        for k, (o, wl) in enumerate(_Up._W):
            a = P[:, o : o + n]
            out[:, :, k] = a + (P[:, o + 1 : o + 1 + n] - a) * np.float32(1 - wl)
        return out.reshape(R.shape[0], 4 * n)[:, : self.width]

    def lin(self, f: np.ndarray) -> np.ndarray:
        key = id(f)
        if key not in self._cache:
            u, r0, r1 = self.up, self.r0, self.r1
            a = f[u.y0[r0:r1]].astype(np.float32, copy=False)
            R = a + (f[u.y1[r0:r1]] - a) * u.wy[r0:r1]
            self._cache[key] = self._cols(R)
        return self._cache[key]

    def near(self, f: np.ndarray) -> np.ndarray:
        R = f[self.up.yn[self.r0 : self.r1]][:, self.j0 : self.j1]
        return np.repeat(R, 4, axis=1)[:, : self.width]


def _lookup(f: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nearest 1/_F field value at level-0 positions x, y."""
    hl, wl = f.shape
    i = np.clip(np.rint((y + 0.5) / _F - 0.5).astype(np.int64), 0, hl - 1)
    j = np.clip(np.rint((x + 0.5) / _F - 0.5).astype(np.int64), 0, wl - 1)
    return f[i, j]


def _candidates(rng: np.random.Generator, W: int, H: int, spacing_px: float, jitter: float = 0.8):
    """Jittered-grid candidate positions (level-0 px) with roughly `spacing_px` between them."""
    nx, ny = int(W / spacing_px) + 1, int(H / spacing_px) + 1
    gx, gy = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32))
    x = (gx + 0.5 + jitter * (rng.random((ny, nx), np.float32) - 0.5)) * spacing_px
    y = (gy + 0.5 + jitter * (rng.random((ny, nx), np.float32) - 0.5)) * spacing_px
    return x.ravel(), y.ravel()


# ---------------------------------------------------------------------------------------------
# sprites: (S, S, 4) float32 with channels alpha, H, E, R (red-cell stain)
# ---------------------------------------------------------------------------------------------
class _Bank:
    def __init__(self) -> None:
        self.sprites: list[np.ndarray] = []

    def add(self, sp: np.ndarray) -> int:
        self.sprites.append(sp.astype(np.float32))
        return len(self.sprites) - 1


def _nucleus(
    rng: np.random.Generator, L: float, Wd: float, ang: float, *, dark: float,
    chrom: float, rim: float, irr: float, nucleoli: int, px_um: float,
) -> np.ndarray:
    """One nucleus: ellipse (long axis L px along `ang`), irregular outline, chromatin texture."""
    S = int(math.ceil(max(L, Wd) * (1.0 + irr) + 6)) | 1
    c = S // 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1].astype(np.float32)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    r = np.sqrt((u / (L / 2)) ** 2 + (v / (Wd / 2)) ** 2)
    phi = np.arctan2(v, u)
    if irr > 0:
        wob = np.zeros_like(r)
        for k in (2, 3, 4):
            wob += rng.normal(0, irr / k) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
        r = r / (1.0 + wob)
    rad = min(L, Wd) / 2
    alpha = np.clip((1.0 - r) * rad / 1.1 + 0.5, 0, 1)
    tex = ndi.gaussian_filter(rng.standard_normal((S, S)).astype(np.float32), 0.35 * px_um + 0.4)
    tex /= tex.std() + 1e-6
    h = dark * (1.0 + chrom * tex)
    if rim > 0:  # vesicular: chromatin pushed to the membrane, pale centre
        h *= 1.0 - rim * np.clip(1.0 - r / 0.75, 0, 1) ** 0.7
        h += rim * dark * 0.6 * np.exp(-(((r - 0.9) / 0.12) ** 2))
    for _ in range(nucleoli):
        rr = rng.uniform(0, 0.4)
        th = rng.uniform(0, 2 * np.pi)
        nx, ny = rr * L / 2 * math.cos(th), rr * Wd / 2 * math.sin(th)
        px, py = nx * math.cos(ang) - ny * math.sin(ang), nx * math.sin(ang) + ny * math.cos(ang)
        nr = rng.uniform(0.5, 0.9) * px_um
        h = h + dark * 0.9 * np.exp(-(((xx - px) ** 2 + (yy - py) ** 2) / (nr * nr)))
    sp = np.zeros((S, S, 4), np.float32)
    sp[..., 0] = alpha
    sp[..., 1] = np.clip(h, 0, None) * alpha
    sp[..., 2] = 0.12 * alpha  # nuclei take a little eosin too (purple rather than pure blue)
    return sp


def _rbc(rng: np.random.Generator, px_um: float) -> np.ndarray:
    d = rng.uniform(6.5, 8.0) * px_um
    e = rng.uniform(0.75, 1.0)
    ang = rng.uniform(0, np.pi)
    S = int(math.ceil(d + 4)) | 1
    c = S // 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1].astype(np.float32)
    u = xx * math.cos(ang) + yy * math.sin(ang)
    v = -xx * math.sin(ang) + yy * math.cos(ang)
    r = np.sqrt((u / (d / 2)) ** 2 + (v / (d * e / 2)) ** 2)
    alpha = np.clip((1 - r) * d / 2 / 0.9 + 0.5, 0, 1)
    dens = 0.75 - 0.3 * np.exp(-((r / 0.45) ** 2))  # biconcave: paler centre
    sp = np.zeros((S, S, 4), np.float32)
    sp[..., 0] = alpha
    sp[..., 3] = dens * alpha * rng.uniform(0.85, 1.15)
    sp[..., 2] = 0.1 * alpha
    return sp


def _macrophage(rng: np.random.Generator, px_um: float) -> np.ndarray:
    d = rng.uniform(14, 22) * px_um
    S = int(math.ceil(d * 1.2 + 4)) | 1
    c = S // 2
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1].astype(np.float32)
    phi = np.arctan2(yy, xx)
    wob = 1 + 0.08 * np.cos(3 * phi + rng.uniform(0, 6.3)) + 0.05 * np.cos(5 * phi + rng.uniform(0, 6.3))
    r = np.hypot(xx, yy) / (d / 2) / wob
    alpha = np.clip((1 - r) * d / 2 / 1.2 + 0.5, 0, 1)
    gran = ndi.gaussian_filter(rng.standard_normal((S, S)).astype(np.float32), 0.6)
    gran /= gran.std() + 1e-6
    sp = np.zeros((S, S, 4), np.float32)
    sp[..., 0] = alpha
    sp[..., 2] = alpha * (0.26 + 0.06 * gran)
    pig = (gran > 1.6) & (rng.random() < 0.5)  # some carry dark (anthracotic) granules
    sp[..., 1] = alpha * (0.05 + 0.5 * pig)
    sp[..., 3] = alpha * 0.25 * pig
    nd = rng.uniform(6, 8) * px_um
    off = rng.uniform(0.1, 0.25) * d
    th = rng.uniform(0, 2 * np.pi)
    rn = np.hypot(xx - off * math.cos(th), yy - off * math.sin(th)) / (nd / 2)
    na = np.clip((1 - rn) * nd / 2 / 0.9 + 0.5, 0, 1)
    sp[..., 1] = np.maximum(sp[..., 1], na * 0.85)
    return sp


# ---------------------------------------------------------------------------------------------
# the slide
# ---------------------------------------------------------------------------------------------
def make_slide(
    rng: np.random.Generator,
    cls: str,
    path: str | Path,
    *,
    size: tuple[int, int] = (4096, 3072),
    mpp: float = 0.5,
    levels: int | None = None,
    tile: int = 256,
    quality: int = 85,
) -> dict[str, Any]:
    """Write a synthetic pyramidal H&E TIFF of class `cls` to `path`; return its truth.

    size: (width, height) of level 0 in px; mpp: microns per pixel at level 0; levels: number
    of pyramid levels (each 2x smaller), None = halve until the longest side <= 1024 (3 levels
    for 4096x3072); tile: tile edge in px (multiple of 16); quality: JPEG quality.

    Returns a JSON-able dict: cls, path, size, mpp, levels, level_dimensions,
    tissue_fraction (of the slide area), tumour_fraction (of the tissue), tumour_boxes
    ([x, y, w, h] in level-0 px, one per tumour region), keratin_pearls ([x, y, r] level-0 px,
    squamous only), n_glands (adenocarcinoma), n_nuclei, stain (the per-slide stain vectors).
    """
    if cls not in SLIDE_CLASSES:
        raise ValueError(f"cls must be one of {SLIDE_CLASSES}, got {cls!r}")
    W, H = (int(v) for v in size)
    if W < 64 or H < 64:
        raise ValueError(f"size must be at least 64x64, got {size}")
    if not (mpp > 0):
        raise ValueError(f"mpp must be positive, got {mpp}")
    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if levels is None:
        levels = 1
        while max(W, H) / 2 ** (levels - 1) > 1024 and min(W, H) / 2**levels >= 16:
            levels += 1
    levels = int(levels)
    if levels < 1 or min(W, H) // 2 ** (levels - 1) < 1:
        raise ValueError(f"levels={levels} is too many for size {size}")
    path = Path(path)

    img, truth = _render(rng, cls, W, H, float(mpp))
    _write_pyramid(img, path, levels, float(mpp), tile, quality)
    dims = [(W >> i, H >> i) for i in range(levels)]
    truth.update(
        cls=cls,
        path=str(path),
        size=[W, H],
        mpp=float(mpp),
        levels=levels,
        level_dimensions=[list(d) for d in dims],
    )
    return truth


def write_slides(n_per_class: int, seed: int, size: tuple[int, int], folder: Path, prefix: str = "slide"
                 ) -> list[tuple[Path, str]]:
    """`n_per_class` slides per class in `folder` (classes interleaved), each with its truth as a JSON
    sidecar; slides already there are kept, so a killed run resumes. Returns (path, class) pairs."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n_per_class * len(SLIDE_CLASSES)):
        cls = SLIDE_CLASSES[i % len(SLIDE_CLASSES)]
        p = folder / f"{prefix}_{seed}_{size[0]}x{size[1]}_{i:03d}_{cls}.tiff"
        if not p.is_file():
            part = p.with_name(p.name + ".part.tiff")  # a killed run leaves no half-written slide
            truth = make_slide(np.random.default_rng(np.random.SeedSequence([seed, i])), cls, part, size=size)
            truth["path"] = str(p)
            p.with_suffix(".json").write_text(json.dumps(truth, default=float))
            part.rename(p)
        out.append((p, cls))
    return out


def _write_pyramid(img: np.ndarray, path: Path, levels: int, mpp: float, tile: int, quality: int) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    big = img.nbytes * 1.4 > 2**32 - 2**25
    kw = dict(
        tile=(tile, tile),
        compression="jpeg",
        compressionargs={"level": int(quality)},
        photometric="rgb",  # input colour space; tifffile stores JPEG as YCbCr 4:2:0
        resolutionunit="CENTIMETER",
        metadata=None,
        software="grandrounds.synth",
    )
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        cur = img
        for i in range(levels):
            res = 1e4 / (mpp * 2**i)  # px per cm
            if i == 0:
                tw.write(cur, resolution=(res, res), description=f"Grand Rounds synthetic H&E; mpp={mpp:g}", **kw)
            else:
                tw.write(cur, resolution=(res, res), subfiletype=1, **kw)
            if i + 1 < levels:
                h2, w2 = cur.shape[0] // 2, cur.shape[1] // 2
                c = cur[: 2 * h2, : 2 * w2]
                s = c[0::2, 0::2].astype(np.uint16) + c[1::2, 0::2] + c[0::2, 1::2] + c[1::2, 1::2]
                s += 2
                s >>= 2
                cur = s.astype(np.uint8)


def _render(rng: np.random.Generator, cls: str, W: int, H: int, mpp: float):
    Wl, Hl = -(-W // _F), -(-H // _F)
    um_l = mpp * _F  # microns per low-res pixel
    px_um = 1.0 / mpp  # level-0 px per micron
    mind = min(Wl, Hl)
    Yl, Xl = np.mgrid[0:Hl, 0:Wl].astype(np.float32)
    tumour_cls = cls != "normal_lung"

    # ---- stains (per slide) ----------------------------------------------------------------
    # wide enough that mean colour alone is a poor class cue (protocols and scanners differ)
    h_od = _unit(np.array([0.62, 0.72, 0.32]) + rng.normal(0, 0.06, 3))
    e_od = _unit(np.array([0.10, 0.92, 0.38]) + rng.normal(0, 0.07, 3))
    r_od = _unit(np.array([0.11, 0.74, 0.66]) + rng.normal(0, 0.03, 3))
    h_k = rng.uniform(0.7, 1.3)
    e_k = rng.uniform(0.6, 1.4)
    bg_od = rng.uniform(0.006, 0.03, 3)

    # ---- tissue pieces ----------------------------------------------------------------------
    n_pieces = int(rng.integers(1, 4))
    field = np.full((Hl, Wl), -10.0, np.float32)
    edge = _smooth_noise(rng, (Hl, Wl), 0.07 * mind) * 0.6 + _smooth_noise(rng, (Hl, Wl), 0.015 * mind) * 0.3
    for k in range(n_pieces):
        if n_pieces == 1:
            cx, cy = rng.uniform(0.4, 0.6), rng.uniform(0.4, 0.6)
            rx, ry = rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
        else:
            cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
            rx, ry = rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
        th = rng.uniform(0, np.pi)
        dx, dy = (Xl / Wl - cx), (Yl / Hl - cy)
        u = dx * math.cos(th) + dy * math.sin(th)
        v = -dx * math.sin(th) + dy * math.cos(th)
        f = 1.0 - np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
        field = np.maximum(field, f)
    field = field + 0.3 * edge
    border = np.minimum.reduce([Xl / Wl, 1 - Xl / Wl, Yl / Hl, 1 - Yl / Hl])
    field -= 3.0 * np.clip((0.04 - border) / 0.04, 0, None)
    cover = rng.uniform(0.3, 0.55)
    tissue_f = (field - np.quantile(field, 1.0 - cover)).astype(np.float32)
    tissue = tissue_f > 0
    tissue_fraction = float(tissue.mean())

    # ---- tumour regions ---------------------------------------------------------------------
    tumour = np.zeros((Hl, Wl), bool)
    boxes: list[list[int]] = []
    if tumour_cls and tissue.any():
        target = rng.uniform(0.2, 0.75)
        reg = _smooth_noise(rng, (Hl, Wl), 0.12 * mind) + 0.35 * _smooth_noise(rng, (Hl, Wl), 0.04 * mind)
        thr = np.quantile(reg[tissue], 1.0 - target)
        tumour = tissue & (reg > thr)
        lab, n = ndi.label(tumour)
        if n:
            areas = ndi.sum(tumour, lab, index=np.arange(1, n + 1))
            min_area = (250.0 / um_l) ** 2
            keep = np.zeros(n + 1, bool)
            keep[1:] = areas >= min_area
            if not keep.any():
                keep[1 + int(np.argmax(areas))] = True
            tumour = keep[lab]
            holes = ndi.binary_fill_holes(tumour) & ~tumour  # fill only small enclaves
            hl, hn = ndi.label(holes)
            if hn:
                ha = ndi.sum(holes, hl, index=np.arange(1, hn + 1))
                tumour |= np.concatenate([[False], ha < min_area])[hl]
            tumour &= tissue
    tumour_soft = ndi.gaussian_filter(tumour.astype(np.float32), 1.0) - 0.5
    tum_low = tumour & tissue
    if tum_low.any():
        lab, n = ndi.label(tum_low)
        pad = 4 * _F  # soft edge and nuclei overhanging the region's last low-res pixel
        for sl in ndi.find_objects(lab):
            y0, y1 = sl[0].start * _F - pad, sl[0].stop * _F + pad
            x0, x1 = sl[1].start * _F - pad, sl[1].stop * _F + pad
            x0, y0 = max(0, x0), max(0, y0)
            x1, y1 = min(W, x1), min(H, y1)
            boxes.append([int(x0), int(y0), int(x1 - x0), int(y1 - y0)])
    tumour_fraction = float(tum_low.sum() / max(1, tissue.sum())) if tumour_cls else 0.0
    normal_low = tissue & ~tum_low

    # ---- alveolar parenchyma (everywhere; used where tissue is not tumour) -----------------
    s_alv = rng.uniform(90, 150) / um_l
    wx = _smooth_noise(rng, (Hl, Wl), 0.45 * s_alv) * 0.3 * s_alv
    wy = _smooth_noise(rng, (Hl, Wl), 0.45 * s_alv) * 0.3 * s_alv
    sx, sy, _, _ = _jittered_grid(rng, Wl, Hl, s_alv, 0.8)
    d1, d2, _ = _voronoi2(Xl + wx, Yl + wy, sx, sy, s_alv)
    hw = rng.uniform(1.6, 2.6) * (1.0 + 1.3 * np.clip(_smooth_noise(rng, (Hl, Wl), 1.2 * s_alv), 0, None))
    hw += 1.2 * np.clip(_smooth_noise(rng, (Hl, Wl), 0.15 * s_alv), 0, None)  # knobs, thick spots
    alv_f = ((d2 - d1) * 0.5 * um_l - hw).astype(np.float32)  # um; < 0 on a septum
    brk = _smooth_noise(rng, (Hl, Wl), 0.25 * s_alv)  # broken septa: alveolar ducts
    alv_f = np.maximum(alv_f, (brk - 1.8) * 25.0).astype(np.float32)
    gy_, gx_ = np.gradient(d2 - d1)
    alv_ang = (np.arctan2(gy_, gx_) + np.pi / 2).astype(np.float32)  # along the septum

    # vessels in normal lung
    n_ves = int(rng.poisson(max(0.5, normal_low.sum() * um_l**2 / 1e6 * 2.0))) if normal_low.any() else 0
    ves_rel = np.full((Hl, Wl), 10.0, np.float32)
    ves_list = []
    if n_ves:
        ys, xs = np.nonzero(normal_low)
        pick = rng.choice(len(xs), size=min(n_ves, len(xs)), replace=False)
        for p in pick:
            R = rng.uniform(25, 70) / um_l
            cx, cy = float(xs[p]), float(ys[p])
            a0, a1 = int(max(0, cy - 2 * R)), int(min(Hl, cy + 2 * R + 1))
            b0, b1 = int(max(0, cx - 2 * R)), int(min(Wl, cx + 2 * R + 1))
            rr = np.hypot(Xl[a0:a1, b0:b1] - cx, Yl[a0:a1, b0:b1] - cy) / R
            ves_rel[a0:a1, b0:b1] = np.minimum(ves_rel[a0:a1, b0:b1], rr)
            ves_list.append((cx * _F, cy * _F, R * _F))
    ves_rel *= 1.0 + 0.06 * _smooth_noise(rng, (Hl, Wl), 3.0)
    wall_t = rng.uniform(0.25, 0.4)

    # ---- collagen fibres (stroma texture) ---------------------------------------------------
    # two families of wavy fibres in orientation domains, broken into bundles
    th1 = rng.uniform(0, np.pi)
    lam1, lam2 = rng.uniform(4.5, 7), rng.uniform(3.5, 5.5)
    th2 = th1 + rng.uniform(0.7, 1.3) * rng.choice([-1, 1])
    warp = _smooth_noise(rng, (Hl, Wl), 25 / um_l) * rng.uniform(8, 14)
    warp += _smooth_noise(rng, (Hl, Wl), 8 / um_l) * 2.5
    u1 = ((Xl * math.cos(th1) + Yl * math.sin(th1)) * um_l + warp) * (2 * np.pi / lam1)
    u2 = ((Xl * math.cos(th2) + Yl * math.sin(th2)) * um_l - warp) * (2 * np.pi / lam2)
    u1, u2 = u1.astype(np.float32), u2.astype(np.float32)
    dom = np.clip(_smooth_noise(rng, (Hl, Wl), 60 / um_l) * 1.5 + 0.5, 0, 1).astype(np.float32)
    bundle = _smooth_noise(rng, (Hl, Wl), 5 / um_l).astype(np.float32)
    fib_ang = th1 + np.pi / 2

    # ---- class-specific structure -----------------------------------------------------------
    glands_q = None
    nest_f = None
    sq = None
    pearls: list[list[float]] = []
    n_glands = 0
    if cls == "lung_adenocarcinoma":
        s_g = rng.uniform(115, 185) / um_l
        gwx = _smooth_noise(rng, (Hl, Wl), 0.5 * s_g) * 0.12 * s_g
        gwy = _smooth_noise(rng, (Hl, Wl), 0.5 * s_g) * 0.12 * s_g
        gsx, gsy, _, _ = _jittered_grid(rng, Wl, Hl, s_g, 0.7)
        XW, YW = Xl + gwx, Yl + gwy
        _, _, gidx = _voronoi2(XW, YW, gsx, gsy, s_g)
        ng = gsx.size
        present = rng.random(ng) < 0.85
        R_um = s_g * um_l * rng.uniform(0.3, 0.45, ng)
        t_um = np.minimum(rng.uniform(16, 28, ng), 0.7 * R_um)
        aspect = rng.uniform(0.6, 1.0, ng)
        gth = rng.uniform(0, np.pi, ng)
        dx = XW - gsx.ravel()[gidx]
        dy = YW - gsy.ravel()[gidx]
        c, s = np.cos(gth)[gidx], np.sin(gth)[gidx]
        uu, vv = dx * c + dy * s, (-dx * s + dy * c) / aspect[gidx]
        rho = np.hypot(uu, vv) * um_l * (1.0 + 0.07 * _smooth_noise(rng, (Hl, Wl), 0.08 * s_g))
        inner = (R_um - t_um)[gidx]
        glands_q = np.where(present[gidx], (rho - inner) / t_um[gidx], 10.0).astype(np.float32)
        gland_ang = np.arctan2(dy, dx).astype(np.float32)
        glands_q = np.where(tum_low, glands_q, 10.0).astype(np.float32)  # no glands outside tumour
        gl_seed_in = _lookup(tum_low.astype(np.uint8), gsx.ravel() * _F, gsy.ravel() * _F) > 0
        n_glands = int((present & gl_seed_in).sum())
    elif cls == "lung_squamous_cell_carcinoma":
        nest_raw = _smooth_noise(rng, (Hl, Wl), 90 / um_l) + 0.3 * _smooth_noise(rng, (Hl, Wl), 30 / um_l)
        if tum_low.any():
            q = np.quantile(nest_raw[tum_low], 1.0 - rng.uniform(0.6, 0.85))
        else:
            q = 10.0
        nest_m = tum_low & (nest_raw > q)
        lab, n = ndi.label(nest_m)
        if n:  # drop nest crumbs under ~(40 um)^2
            areas = ndi.sum(nest_m, lab, index=np.arange(1, n + 1))
            nest_m = np.concatenate([[False], areas >= (40 / um_l) ** 2])[lab]
        # signed distance to the nest edge, um: > 0 inside a nest
        nest_f = ((ndi.distance_transform_edt(nest_m) - ndi.distance_transform_edt(~nest_m)) * um_l
                  ).astype(np.float32)
        s_c = rng.uniform(16, 23) / um_l
        csx, csy, _, _ = _jittered_grid(rng, Wl, Hl, s_c, 0.85)
        cd1, cd2, cidx = _voronoi2(Xl, Yl, csx, csy, s_c)
        ker = rng.random(csx.size) ** 3
        cell_e = (0.32 + 0.16 * ker)[cidx].astype(np.float32)
        cleft = ((cd2 - cd1) * 0.5 * um_l).astype(np.float32)
        sumd = ((cd1 + cd2) * um_l).astype(np.float32)
        # keratin pearls: centres deep inside nests
        nest_area_mm2 = (nest_f > 0).sum() * um_l**2 / 1e6
        n_p = int(rng.poisson(nest_area_mm2 * rng.uniform(8, 18)))
        deep = np.nonzero(nest_f > 35.0)
        if len(deep[0]):
            n_p = max(1, n_p)  # a keratinising SCC shows at least one pearl where nests allow
        prel = np.full((Hl, Wl), 10.0, np.float32)
        pdist = np.zeros((Hl, Wl), np.float32)
        if n_p and len(deep[0]):
            order = rng.permutation(len(deep[0]))
            for p in order[: 40 * n_p]:
                if len(pearls) >= n_p:
                    break
                cx, cy = float(deep[1][p]), float(deep[0][p])
                R = min(rng.uniform(20, 55), nest_f[int(cy), int(cx)] - 8) / um_l
                if any(math.hypot(cx - a, cy - b) < 2.3 * max(R, r) for a, b, r in ((pp[0] / _F, pp[1] / _F, pp[2] / _F) for pp in pearls)):
                    continue
                a0, a1 = int(max(0, cy - 2 * R)), int(min(Hl, cy + 2 * R + 1))
                b0, b1 = int(max(0, cx - 2 * R)), int(min(Wl, cx + 2 * R + 1))
                dd = np.hypot(Xl[a0:a1, b0:b1] - cx, Yl[a0:a1, b0:b1] - cy)
                rr = dd / R
                sub = rr < prel[a0:a1, b0:b1]
                prel[a0:a1, b0:b1] = np.where(sub, rr, prel[a0:a1, b0:b1])
                pdist[a0:a1, b0:b1] = np.where(sub, dd * um_l, pdist[a0:a1, b0:b1])
                pearls.append([cx * _F + _F / 2, cy * _F + _F / 2, R * _F])
        prel *= 1.0 + 0.08 * _smooth_noise(rng, (Hl, Wl), 4.0)
        whorl = (_smooth_noise(rng, (Hl, Wl), 3.0) * 4.0 + _smooth_noise(rng, (Hl, Wl), 1.2) * 1.5
                 ).astype(np.float32)
        sq = dict(cleft=cleft, sumd=sumd, cell_e=cell_e, prel=prel, pdist=pdist, whorl=whorl,
                  csx=csx, csy=csy, lam_k=rng.uniform(3.5, 6.0), lam_b=rng.uniform(2.0, 3.0))

    # ---- nuclei and other cells (sprites) ---------------------------------------------------
    bank = _Bank()
    NB = 16  # orientation bins over pi
    pos_x: list[np.ndarray] = []
    pos_y: list[np.ndarray] = []
    spr: list[np.ndarray] = []

    def oriented_bank(nvar, make):
        base = len(bank.sprites)
        for _ in range(nvar):
            st = rng.bit_generator.state  # same shape noise across angles of one variant
            for b in range(NB):
                rng.bit_generator.state = st
                bank.add(make(b * np.pi / NB))
        return base

    def place(x, y, ids):
        if len(x):
            pos_x.append(np.asarray(x, np.float32))
            pos_y.append(np.asarray(y, np.float32))
            spr.append(np.asarray(ids, np.int64))

    def angle_ids(base, nvar, ang, n):
        b = (np.round(np.mod(ang, np.pi) / (np.pi / NB)).astype(np.int64)) % NB
        return base + rng.integers(0, nvar, n) * NB + b

    # normal lung: septal cells, capillary red cells, macrophages
    nv = 6
    b_sep = oriented_bank(nv, lambda a: _nucleus(
        rng, rng.uniform(7, 10) * px_um, rng.uniform(3.2, 4.5) * px_um, a, dark=rng.uniform(0.85, 1.1),
        chrom=0.15, rim=0.0, irr=0.05, nucleoli=0, px_um=px_um))
    x, y = _candidates(rng, W, H, 11 * px_um)
    ok = (_lookup(alv_f, x, y) < 1.0) & _lookup(normal_low, x, y) & (rng.random(x.size) < 0.3)
    ok &= _lookup(ves_rel, x, y) > 1.05
    place(x[ok], y[ok], angle_ids(b_sep, nv, _lookup(alv_ang, x[ok], y[ok]), int(ok.sum())))

    b_rbc = len(bank.sprites)
    for _ in range(8):
        bank.add(_rbc(rng, px_um))
    x, y = _candidates(rng, W, H, 9 * px_um)
    ok = (_lookup(alv_f, x, y) < -0.5) & _lookup(normal_low, x, y) & (rng.random(x.size) < 0.12)
    place(x[ok], y[ok], b_rbc + rng.integers(0, 8, int(ok.sum())))

    b_mac = len(bank.sprites)
    for _ in range(6):
        bank.add(_macrophage(rng, px_um))
    x, y = _candidates(rng, W, H, 70 * px_um)
    ok = (_lookup(alv_f, x, y) > 8) & _lookup(normal_low, x, y) & (rng.random(x.size) < 0.12)
    ok &= _lookup(ves_rel, x, y) > 1.1
    place(x[ok], y[ok], b_mac + rng.integers(0, 6, int(ok.sum())))

    # vessels: red cells in lumen, smooth-muscle nuclei in the wall
    if ves_list:
        x, y = _candidates(rng, W, H, 6.5 * px_um)
        vr = _lookup(ves_rel, x, y)
        ok = (vr < 1 - wall_t - 0.03) & (rng.random(x.size) < 0.55)
        place(x[ok], y[ok], b_rbc + rng.integers(0, 8, int(ok.sum())))
        b_smc = oriented_bank(4, lambda a: _nucleus(
            rng, rng.uniform(10, 14) * px_um, rng.uniform(2.5, 3.5) * px_um, a, dark=1.0,
            chrom=0.15, rim=0.0, irr=0.03, nucleoli=0, px_um=px_um))
        x, y = _candidates(rng, W, H, 9 * px_um)
        vr = _lookup(ves_rel, x, y)
        ok = (vr > 1 - wall_t) & (vr < 0.97) & (rng.random(x.size) < 0.5)
        vx = np.array([v[0] for v in ves_list], np.float32)
        vy = np.array([v[1] for v in ves_list], np.float32)
        xo, yo = x[ok], y[ok]
        if len(xo):
            near = np.argmin((xo[:, None] - vx) ** 2 + (yo[:, None] - vy) ** 2, axis=1)
            tang = np.arctan2(yo - vy[near], xo - vx[near]) + np.pi / 2
            place(xo, yo, angle_ids(b_smc, 4, tang, len(xo)))

    # tumour stroma: fibroblasts along the fibres, lymphocytes
    if tumour_cls:
        stroma_low = tum_low.copy()
        if glands_q is not None:
            stroma_low &= glands_q > 1.15
        if nest_f is not None:
            stroma_low &= nest_f < -4.0
        b_fib = oriented_bank(4, lambda a: _nucleus(
            rng, rng.uniform(11, 16) * px_um, rng.uniform(2.3, 3.3) * px_um, a, dark=1.0,
            chrom=0.12, rim=0.0, irr=0.05, nucleoli=0, px_um=px_um))
        x, y = _candidates(rng, W, H, 14 * px_um)
        ok = _lookup(stroma_low, x, y) & (rng.random(x.size) < 0.3)
        place(x[ok], y[ok], angle_ids(b_fib, 4, fib_ang + rng.normal(0, 0.25, int(ok.sum())), int(ok.sum())))
        b_lym = len(bank.sprites)
        for _ in range(8):
            d = rng.uniform(5.5, 7.0) * px_um
            bank.add(_nucleus(rng, d, d * rng.uniform(0.85, 1.0), rng.uniform(0, np.pi), dark=1.35,
                              chrom=0.1, rim=0.0, irr=0.04, nucleoli=0, px_um=px_um))
        x, y = _candidates(rng, W, H, 10 * px_um)
        infl = np.clip(_lookup(_smooth_noise(rng, (Hl, Wl), 40 / um_l), x, y), 0, None)
        ok = _lookup(stroma_low, x, y) & (rng.random(x.size) < 0.06 + 0.25 * infl)
        place(x[ok], y[ok], b_lym + rng.integers(0, 8, int(ok.sum())))

    if cls == "lung_adenocarcinoma":
        nv = 10
        b_ad = oriented_bank(nv, lambda a: _nucleus(
            rng, rng.uniform(11, 16) * px_um, rng.uniform(6, 8.5) * px_um, a,
            dark=rng.uniform(0.75, 1.05), chrom=0.3, rim=rng.uniform(0.3, 0.6), irr=0.07,
            nucleoli=int(rng.random() < 0.7), px_um=px_um))
        x, y = _candidates(rng, W, H, 6.2 * px_um, jitter=0.6)
        qq = _lookup(glands_q, x, y)
        ok = ((qq > 0.4) & (qq < 0.93) & (rng.random(x.size) < 0.85)) | (
            (qq > 0.12) & (qq <= 0.4) & (rng.random(x.size) < 0.2))
        ang = _lookup(gland_ang, x[ok], y[ok])
        place(x[ok], y[ok], angle_ids(b_ad, nv, ang, int(ok.sum())))

    if sq is not None:
        nv = 14
        b_sq = len(bank.sprites)
        for _ in range(nv):
            L = float(np.clip(rng.lognormal(math.log(11.0), 0.22), 7, 19))
            bank.add(_nucleus(rng, L * px_um, L * rng.uniform(0.65, 0.95) * px_um, rng.uniform(0, np.pi),
                              dark=rng.uniform(1.0, 1.45), chrom=0.35, rim=rng.uniform(0, 0.3),
                              irr=rng.uniform(0.05, 0.16), nucleoli=int(rng.random() < 0.35), px_um=px_um))
        b_flat = oriented_bank(4, lambda a: _nucleus(
            rng, rng.uniform(10, 14) * px_um, rng.uniform(3, 4.2) * px_um, a, dark=1.15, chrom=0.15,
            rim=0.0, irr=0.04, nucleoli=0, px_um=px_um))
        x = (sq["csx"].ravel() * _F + _F / 2 - 0.5) + rng.normal(0, 1.0 * px_um, sq["csx"].size)
        y = (sq["csy"].ravel() * _F + _F / 2 - 0.5) + rng.normal(0, 1.0 * px_um, sq["csx"].size)
        inside = (x >= 0) & (y >= 0) & (x < W) & (y < H)
        x, y = x[inside], y[inside]
        nf = _lookup(nest_f, x, y)
        pr = _lookup(sq["prel"], x, y)
        ok = (nf > 3.0) & (pr > 1.0) & (rng.random(x.size) < 0.88)
        shell = ok & (pr < 1.55)
        body = ok & ~shell
        place(x[body], y[body], b_sq + rng.integers(0, nv, int(body.sum())))
        if shell.any():
            pcx = np.array([p[0] for p in pearls], np.float32)
            pcy = np.array([p[1] for p in pearls], np.float32)
            xs_, ys_ = x[shell], y[shell]
            near = np.argmin((xs_[:, None] - pcx) ** 2 + (ys_[:, None] - pcy) ** 2, axis=1)
            tang = np.arctan2(ys_ - pcy[near], xs_ - pcx[near]) + np.pi / 2
            place(xs_, ys_, angle_ids(b_flat, 4, tang, len(xs_)))

    px_all = np.concatenate(pos_x) if pos_x else np.zeros(0, np.float32)
    py_all = np.concatenate(pos_y) if pos_y else np.zeros(0, np.float32)
    sp_all = np.concatenate(spr) if spr else np.zeros(0, np.int64)
    sizes = np.array([s.shape[0] for s in bank.sprites], np.int64)
    cx_all = np.rint(px_all).astype(np.int64)
    cy_all = np.rint(py_all).astype(np.int64)
    half = sizes[sp_all] // 2 if len(sp_all) else np.zeros(0, np.int64)
    top = cy_all - half
    order = np.argsort(top, kind="stable")
    cx_all, cy_all, sp_all, half, top = cx_all[order], cy_all[order], sp_all[order], half[order], top[order]
    maxs = int(sizes.max()) if len(sizes) else 0

    # ---- full-resolution composition, band by band ------------------------------------------
    up = _Up(W, H, Wl, Hl)
    img = np.empty((H, W, 3), np.uint8)
    med = rng.standard_normal((Hl, Wl)).astype(np.float32)
    sec = _smooth_noise(rng, (Hl, Wl), 2.0)
    i0_const = 255.0 * np.exp(-_LN10 * bg_od)
    hv = (h_od * h_k * _LN10).astype(np.float32)
    ev = (e_od * e_k * _LN10).astype(np.float32)
    rv = (r_od * _LN10).astype(np.float32)
    e_str0 = 0.27 if cls == "lung_adenocarcinoma" else 0.33  # desmoplastic vs collagenous
    BAND = 256
    for r0 in range(0, H, BAND):
        r1 = min(H, r0 + BAND)
        bh = r1 - r0
        grain_all = rng.standard_normal((bh, W), dtype=np.float32)
        # only the columns that hold tissue (+ margin for sprites) are rendered; the rest is glass
        cols = np.nonzero((tissue_f[up.y0[r0] : up.y1[r1 - 1] + 1] > 0).any(axis=0))[0]
        if cols.size:
            j0, j1 = max(0, int(cols[0]) - 10), min(Wl, int(cols[-1]) + 11)
        else:
            j0 = j1 = 0
        for c0, c1 in ((0, 4 * j0), (min(W, 4 * j1), W)):
            if c1 > c0:
                g = grain_all[:, c0:c1, None] * 1.6 + (i0_const + 0.5).astype(np.float32)
                img[r0:r1, c0:c1] = np.clip(g, 0, 255).astype(np.uint8)
        if j1 == j0:
            continue
        win = up.window(r0, r1, j0, j1)
        x_off, Ww = 4 * j0, win.width
        grain = grain_all[:, x_off : x_off + Ww]
        Hc = np.zeros((bh, Ww), np.float32)
        Ec = np.zeros((bh, Ww), np.float32)
        Rc = np.zeros((bh, Ww), np.float32)
        tis = win.lin(tissue_f) > 0
        mednz = win.lin(med)
        tum = (win.lin(tumour_soft) > 0) & tis if tumour_cls else np.zeros_like(tis)
        nor = tis & ~tum
        # normal lung
        alv = win.lin(alv_f)
        vr = win.lin(ves_rel)
        sep = np.clip(0.5 - alv / 1.2, 0, 1)  # soft septum edge (~1 um)
        e_sep = 0.40 * (1 + 0.12 * mednz + 0.06 * grain)
        Ec += np.where(nor, sep * e_sep, 0)
        Hc += np.where(nor, sep * 0.035, 0)
        if ves_list:
            wall = nor & (vr < 1.0) & (vr > 1 - wall_t)
            lumen = nor & (vr <= 1 - wall_t)
            f1 = 0.5 + 0.5 * np.sin(win.lin(u1))
            Ec = np.where(wall, 0.46 * (0.85 + 0.2 * f1) * (1 + 0.08 * grain), Ec)
            Hc = np.where(wall, 0.04, Hc)
            Ec = np.where(lumen, 0.03 + 0.05 * np.clip(mednz, 0, None), Ec)
            Hc = np.where(lumen, 0.0, Hc)
        if tumour_cls:
            dm = win.lin(dom)
            f1 = np.sin(win.lin(u1))
            f2 = np.sin(win.lin(u2))
            fib = np.clip(dm * f1 + (1 - dm) * f2, -1, 1)
            bd = win.lin(bundle)
            gapz = np.clip(0.5 - bd, 0, 1)  # pale loose spaces between bundles
            e_str = e_str0 * (0.88 + 0.18 * fib * np.clip(bd + 0.6, 0, 1)) * (1 - 0.5 * gapz)
            e_str *= 1 + 0.08 * mednz + 0.05 * grain
            h_str = 0.03 + 0.02 * np.clip(win.lin(sec), 0, None)
            Ec = np.where(tum, e_str, Ec)
            Hc = np.where(tum, h_str, Hc)
        if glands_q is not None:
            q = win.lin(glands_q)
            epi = tum & (q >= 0) & (q < 1)
            lum = tum & (q < 0)
            apical = np.exp(-((q / 0.06) ** 2))
            Ec = np.where(epi, 0.24 * (1 + 0.15 * mednz + 0.06 * grain) + 0.12 * apical, Ec)
            Hc = np.where(epi, 0.09 + 0.02 * mednz, Hc)
            secr = np.clip(win.lin(sec) - 1.0, 0, None)
            Ec = np.where(lum, 0.015 + 0.15 * secr, Ec)
            Hc = np.where(lum, 0.02 * secr, Hc)
        if sq is not None:
            nf = win.lin(nest_f)
            nest = tum & (nf > 0)
            rim = np.clip(1.0 - nf / 14.0, 0, 1)  # basaloid outer layer
            cl = win.lin(sq["cleft"])
            sd = win.lin(sq["sumd"])
            ce = win.near(sq["cell_e"])
            bridge = np.sin(sd * (2 * np.pi / sq["lam_b"])) > 0.1
            gap = np.clip(1.2 - cl / 0.9, 0, 1) * np.where(bridge, 0.35, 1.0)
            e_c = ce * (1 - 0.4 * rim) * (1 + 0.06 * mednz + 0.04 * grain) * (1 - 0.8 * gap)
            h_c = 0.035 + 0.11 * rim
            pr = win.lin(sq["prel"])
            core = pr < 1.0
            pdd = win.lin(sq["pdist"])
            wh = win.lin(sq["whorl"])
            lam_ = 0.50 + 0.12 * np.cos(pdd * (2 * np.pi / sq["lam_k"]) + wh) + 0.05 * mednz
            lam_ *= 1.0 - 0.25 * np.clip(1.0 - pdd / 12.0, 0, 1)  # paler, glassy centre
            e_c = np.where(core, lam_ * (1 + 0.05 * grain), e_c)
            h_c = np.where(core, 0.02 + 0.03 * np.clip(pr - 0.8, 0, None), h_c)
            shell = (pr >= 1.0) & (pr < 1.5)
            e_c = np.where(shell, np.maximum(e_c, 0.42 * (1 - 0.8 * gap)), e_c)
            Ec = np.where(nest, e_c, Ec)
            Hc = np.where(nest, h_c, Hc)
            Rc = np.where(nest & core, 0.03, Rc)
        # cells
        lay = np.zeros((bh, Ww, 4), np.float32)
        lo = np.searchsorted(top, r0 - maxs, side="left")
        hi = np.searchsorted(top, r1, side="left")
        for i in range(lo, hi):
            sp = bank.sprites[sp_all[i]]
            S = sp.shape[0]
            ty = int(top[i]) - r0
            tx = int(cx_all[i] - half[i]) - x_off
            ya, yb = max(0, ty), min(bh, ty + S)
            xa, xb = max(0, tx), min(Ww, tx + S)
            if ya >= yb or xa >= xb:
                continue
            sub = lay[ya:yb, xa:xb]
            np.maximum(sub, sp[ya - ty : yb - ty, xa - tx : xb - tx], out=sub)
        A = lay[..., 0]
        Hc = Hc * (1 - A) + lay[..., 1] * (1 + 0.08 * grain)
        Ec = Ec * (1 - 0.75 * A) + lay[..., 2]
        Rc = Rc * (1 - A) + lay[..., 3]
        Hc = np.where(tis, Hc, 0)
        Ec = np.where(tis, Ec, 0)
        Rc = np.where(tis, Rc, 0)
        out = img[r0:r1, x_off : x_off + Ww]
        for ch in range(3):
            od = Hc * hv[ch] + Ec * ev[ch] + Rc * rv[ch]
            val = i0_const[ch] * np.exp(-od) + grain * 1.6
            out[..., ch] = np.clip(val + 0.5, 0, 255).astype(np.uint8)

    truth = dict(
        tissue_fraction=tissue_fraction,
        tumour_fraction=tumour_fraction,
        tumour_boxes=boxes,
        keratin_pearls=[[float(a), float(b), float(r)] for a, b, r in pearls],
        n_glands=n_glands,
        n_nuclei=int(len(sp_all)),
        stain=dict(h=h_od.round(4).tolist(), e=e_od.round(4).tolist(), h_scale=round(float(h_k), 4),
                   e_scale=round(float(e_k), 4)),
    )
    return img, truth
