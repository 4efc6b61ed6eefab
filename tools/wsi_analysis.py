"""Whole-slide H&E analysis of lung: classical colour-deconvolution features + a small learned classifier.

Pipeline (pixels only; the slide's pyramid and mpp, nothing from the generator or the file name):

1. Overview at ~4 um/px (the slide's thumbnail): stained-tissue mask (`core.imaging.slide.tissue_mask`),
   reported as `tissue_fraction`, and the tissue *envelope* (the mask closed over airspaces up to
   ~120 um wide, holes filled), which says where airspace counts as lung rather than glass.
2. Tiles of 256x256 px at ~1 um/px over the envelope (the pyramid level nearest 1 um/px, block-averaged
   when the level is finer, e.g. a single-level 0.5 um/px scan), each read with 32 um of context so
   lumina and pearls cut by a tile edge are judged whole; at most `max_tiles`, spread evenly.
3. Per tile, `skimage.color.rgb2hed` colour deconvolution and:
   - nuclei: connected components of the thresholded haematoxylin channel -> nuclear pixel density,
     nuclei per area, nuclear area mean / CV (pleomorphism), large nuclei, mean haematoxylin;
   - airspace: glass-white pixels inside the envelope (alveolar-space fraction: normal architecture);
   - lumina: white holes of gland size whose 20 um rim is nucleus-rich *in every quadrant* and not a
     thin septum (gland formation);
   - keratin: eosin-bright (relative to the slide's plain-tissue median), anuclear, red-cell-free, solid,
     round regions with an inscribed radius >= 15 um and nearly no glass around them (keratin pearls).
   A tile is tumour-like when it is cellular (nuclear density) and solid (little airspace).
4. Slide features pool the tiles (tumour-like tiles for the cytology features). A multinomial logistic
   regression (checkpoints/wsi_classifier.json, fitted on synthetic slides by `fit_from_synthetic`) gives
   P(normal_lung / lung_adenocarcinoma / lung_squamous_cell_carcinoma); four small binary logistic models
   turn the proxies into P(gland_formation), P(keratinisation), P(nuclear_atypia),
   P(normal_alveolar_architecture). A Mahalanobis check flags slides unlike the training slides and
   shrinks every probability towards chance.

Refit: ``python -m tools.wsi_analysis --fit --n 72 --seed 11`` (writes the checkpoint; the models assume
the default `WSIParams`).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "wsi_classifier.json"
CLASSES = ("normal_lung", "lung_adenocarcinoma", "lung_squamous_cell_carcinoma")
FEATURE_VERSION = "6"

TARGET_MPP = 1.0  # analysis resolution, um/px
OVERVIEW_MPP = 4.0
DEFAULT_MPP = 0.5  # assumed level-0 mpp when the file records none (a 20x scan)
WHITE = 215  # min(R,G,B) above this is glass / airspace / lumen
H_NUC = 0.08  # rgb2hed haematoxylin above this is a nuclear pixel
MIN_NUC_UM2 = 8.0  # smaller haematoxylin specks are noise, not nuclei
BIG_NUC_UM2 = 50.0  # larger than any normal lung nucleus (septal, endothelial: ~20-35 um^2)
ENVELOPE_CLOSE_UM = 60.0  # airspaces narrower than 2x this are inside the tissue envelope
GLAND_AREA_UM2 = (100.0, 30000.0)
GLAND_RIM_UM = 20.0
GLAND_RIM_NUC = 0.2  # rim nuclear fraction that makes a white hole a lumen
GLAND_RIM_QMIN = 0.1  # nuclear fraction of the rim's poorest quadrant: ringed all round
GLAND_RIM_THICK_UM = 8.0  # and stained rim area per edge length (alveoli: thin septa, ~3-6 um)
KERATIN_E_REL = 1.25  # eosin above this x the slide's stained-pixel median
KERATIN_CLEAR_UM = 5.0  # keratin pixels are at least this far from a nucleus or red cell
RBC_BG_DELTA = 0.15  # red-cell pixels: OD_B/OD_G this much above the slide's plain-tissue median
KERATIN_R_UM = 15.0  # a pearl's anuclear core has an inscribed radius of at least this
KERATIN_COMPACT = 3.0  # region area at most this many inscribed-disk areas
KERATIN_RING_WHITE = 0.35  # at most this much glass within 12 um around it
TILE_MARGIN_UM = 32.0  # context read around each tile: lumina and pearls cut by its edge are judged whole
TUMOUR_TILE_DENSITY = 0.09  # nuclear pixels per stained pixel of a tumour-like tile
TUMOUR_TILE_AIR = 0.45  # and at most this airspace fraction

FEATURES = (
    "air_frac",  # airspace (white, not lumen) pixels / envelope pixels, all tiles
    "nuc_density",  # nuclear pixels / stained pixels, all tiles
    "tumour_tile_frac",
    "t_nuc_density",  # the same in tumour-like tiles (all tiles when none)
    "t_nuclei_per_10k",  # nuclei per 10 000 um^2 of stained tissue
    "t_nuc_area_log",  # log mean nuclear area (um^2)
    "t_nuc_area_cv",  # nuclear area coefficient of variation (pleomorphism)
    "t_nuc_h",  # mean haematoxylin of nuclear pixels (hyperchromasia)
    "t_air_frac",
    "gland_per_mm2",  # nucleus-rimmed lumina per mm^2 of envelope
    "gland_lumen_frac",  # their area / envelope
    "rim_qmin_top3",  # mean of the 3 best poorest-quadrant rim nuclear fractions of lumen-sized holes
    "keratin_frac",  # keratin-pearl-like area / stained area
    "keratin_per_mm2",
    "t_eosin_rel",  # mean eosin of non-nuclear stained pixels / slide reference, tumour tiles
    "big_nuc_per_mm2",  # nuclei >= BIG_NUC_UM2 per mm^2 of stained tissue, all tiles (a small tumour focus)
    "nuc_area_p90_log",  # log 90th-percentile nuclear area, all tiles
)

# model inputs taken as log1p(scale * x): counts per mm2 and small area fractions
LOG_SCALE = {"gland_per_mm2": 1.0, "keratin_per_mm2": 1.0, "big_nuc_per_mm2": 1.0, "gland_lumen_frac": 100.0,
             "keratin_frac": 100.0}

# binary finding models: which features feed each, and which training classes count as positive
FINDING_MODELS = {
    "gland_formation": (("gland_per_mm2", "gland_lumen_frac", "rim_qmin_top3"), ("lung_adenocarcinoma",)),
    "keratinisation": (("keratin_frac", "keratin_per_mm2", "t_eosin_rel"), ("lung_squamous_cell_carcinoma",)),
    "nuclear_atypia": (("t_nuc_density", "t_nuc_area_log", "t_nuc_area_cv", "t_nuc_h", "tumour_tile_frac",
                        "big_nuc_per_mm2", "nuc_area_p90_log"),
                       ("lung_adenocarcinoma", "lung_squamous_cell_carcinoma")),
    "normal_alveolar_architecture": (("air_frac", "tumour_tile_frac", "nuc_density"), ("normal_lung",)),
}


class WSIParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tiles: int = Field(48, ge=1, le=400)
    tile_px: int = Field(256, ge=64, le=1024)  # at the analysis resolution (~1 um/px)
    min_tile_tissue: float = Field(0.25, ge=0.0, le=1.0)  # envelope cover a tile needs to be sampled
    heatmap: bool = True  # write a thumbnail + tumour-tile heatmap PNG when ctx.artefact_dir is set


# ---------------------------------------------------------------------------------------------
# overview: tissue, envelope, stain reference
# ---------------------------------------------------------------------------------------------
class _Pic:
    """A thumbnail posing as a slide, so `tissue_mask` can run on an image already read."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb

    def thumbnail(self, max_size: int = 512) -> np.ndarray:
        return self.rgb


def _disk_close(mask: np.ndarray, r: float) -> np.ndarray:
    """Binary closing by a disk of radius r px (distance transforms; no border artefacts)."""
    from scipy import ndimage as ndi

    if r < 0.5 or not mask.any():
        return mask.copy()
    p = int(math.ceil(r)) + 2
    m = np.pad(mask, p)
    dil = ndi.distance_transform_edt(~m) <= r
    ero = ndi.distance_transform_edt(dil) > r
    return ero[p:-p, p:-p] | mask


@dataclass
class Overview:
    rgb: np.ndarray
    mpp: float  # um per overview px
    tissue: np.ndarray  # stained tissue
    envelope: np.ndarray  # tissue with enclosed airspaces
    e_ref: float  # median eosin of stained overview pixels (a fallback; tiles give the reference)


def overview(slide: Any, mpp0: float) -> Overview:
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    from core.imaging.slide import tissue_mask

    w0, h0 = slide.level_dimensions[0]
    side = max(w0, h0)
    max_size = int(min(2048, max(64, math.ceil(side * mpp0 / OVERVIEW_MPP))))
    rgb = np.asarray(slide.thumbnail(max_size))
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        raise ValueError(f"thumbnail has shape {rgb.shape}, expected [h, w, 3]")
    ov_mpp = mpp0 * w0 / rgb.shape[1]
    tissue = tissue_mask(_Pic(rgb))
    env = _disk_close(tissue, ENVELOPE_CLOSE_UM / ov_mpp)
    env = ndi.binary_fill_holes(env)
    stained = tissue & (rgb.min(axis=2) < WHITE)
    if stained.sum() >= 16:
        e_ref = float(np.median(rgb2hed(rgb[stained][None])[0][:, 1]))
    else:
        e_ref = 0.05
    return Overview(rgb, ov_mpp, tissue, env, max(e_ref, 1e-3))


# ---------------------------------------------------------------------------------------------
# tiles
# ---------------------------------------------------------------------------------------------
@dataclass
class TileStats:
    x0: int  # level-0 px
    y0: int
    size0: float  # tile edge in level-0 px
    env_px: int = 0
    stained_px: int = 0
    white_px: int = 0
    nuc_px: int = 0
    nuc_h_sum: float = 0.0
    eos_sum: float = 0.0
    eos_px: int = 0
    areas: np.ndarray = field(default_factory=lambda: np.zeros(0))
    glands: int = 0
    gland_px: int = 0
    keratin_px: int = 0
    pearls: int = 0
    holes: list = field(default_factory=list)  # (area um2, rim nuclear fraction, rim um, poorest quadrant)
    kregions: list = field(default_factory=list)  # (inscribed radius um, area / disk, ring white, eosin rel)

    @property
    def air_px(self) -> int:  # airspace: glass inside the envelope that is not a gland lumen
        return max(self.white_px - self.gland_px, 0)

    @property
    def air(self) -> float:
        return self.air_px / max(self.env_px, 1)

    @property
    def density(self) -> float:
        return self.nuc_px / max(self.stained_px, 1)

    @property
    def tumour_like(self) -> bool:
        return self.stained_px > 0.1 * self.env_px and self.density > TUMOUR_TILE_DENSITY and self.air < TUMOUR_TILE_AIR


def _pick_level(slide: Any, mpp0: float) -> tuple[int, int, float]:
    """(level, integer block factor, analysis mpp) nearest TARGET_MPP without going coarser than 1.25x."""
    ds = [float(d) for d in slide.level_downsamples]
    ok = [i for i, d in enumerate(ds) if d <= TARGET_MPP / mpp0 * 1.25]
    lvl = max(ok, key=lambda i: ds[i]) if ok else int(np.argmin(ds))
    mpp_l = mpp0 * float(slide.level_downsamples[lvl])
    f = max(1, int(round(TARGET_MPP / mpp_l)))
    return lvl, f, mpp_l * f


def _block_mean(rgb: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return rgb
    h, w = (rgb.shape[0] // f) * f, (rgb.shape[1] // f) * f
    b = rgb[:h, :w].astype(np.float32).reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3))
    return np.clip(np.rint(b), 0, 255).astype(np.uint8)


def _in_core(lab: np.ndarray, n: int, m: int) -> np.ndarray:
    """Per label 1..n: does its centroid fall in the tile's core (the padded array less margin m)?"""
    if n == 0:
        return np.zeros(0, bool)
    flat = lab.ravel()
    cnt = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    yy, xx = np.indices(lab.shape)
    cy = np.bincount(flat, yy.ravel(), minlength=n + 1)[1:] / cnt
    cx = np.bincount(flat, xx.ravel(), minlength=n + 1)[1:] / cnt
    hi_y, hi_x = lab.shape[0] - m, lab.shape[1] - m
    return (cy >= m) & (cy < hi_y) & (cx >= m) & (cx < hi_x)


def tile_pass1(rgb: np.ndarray, env: np.ndarray, mpp: float, ts: TileStats, margin: int = 0) -> dict:
    """Deconvolve one analysis-resolution tile (uint8 RGB, with `margin` px of context on every side)
    within its envelope mask: pixel counts and nuclei of the core, lumina centred in the core.

    Returns the arrays pass 2 (keratin, which needs the slide's eosin reference) works on."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed

    a_um2 = mpp * mpp
    m = int(margin)
    core = np.zeros(env.shape, bool)
    core[m : env.shape[0] - m, m : env.shape[1] - m] = True
    hed = rgb2hed(rgb).astype(np.float32)
    H, E = hed[..., 0], hed[..., 1]
    white = rgb.min(axis=2) >= WHITE
    stained = ~white & env
    ts.env_px, ts.stained_px = int((env & core).sum()), int((stained & core).sum())
    ts.white_px = int((white & env & core).sum())
    od = -np.log((rgb.astype(np.float32) + 1.0) * (1.0 / 256.0))
    # red cells absorb blue relative to green more than eosin does: OD_B / OD_G (slide-relative in pass 2)
    bg = od[..., 2] / np.maximum(od[..., 1], 1e-3)
    arr = dict(E=E, white=white, stained=stained, nuc=np.zeros_like(white), plain=np.zeros_like(white),
               bg=bg, od_g=od[..., 1], margin=m)
    if not stained.any():
        return arr
    # nuclei (areas of those centred in the core, whole even where they cross into the margin)
    nuc = ndi.binary_opening((H > H_NUC) & stained)
    lab, n = ndi.label(nuc)
    if n:
        areas = np.bincount(lab.ravel(), minlength=n + 1)[1:] * a_um2
        keep = areas >= MIN_NUC_UM2
        ts.areas = areas[keep & _in_core(lab, n, m)]
        nuc &= np.concatenate([[False], keep])[lab]
    ts.nuc_px = int((nuc & core).sum())
    ts.nuc_h_sum = float(H[nuc & core].sum())
    plain = stained & ~ndi.binary_dilation(nuc, iterations=2)
    ts.eos_px = int((plain & core).sum())
    ts.eos_sum = float(E[plain & core].sum())
    arr.update(nuc=nuc, plain=plain & core)
    # lumina: white holes inside the envelope, centred in the core and not cut by the padded tile's edge,
    # with a thick nucleus-rich rim
    holes = white & env
    wl, nw = ndi.label(holes)
    if nw:
        dist, (iy, ix) = ndi.distance_transform_edt(~holes, return_indices=True)
        near = wl[iy, ix]
        rim = stained & (dist <= GLAND_RIM_UM / mpp) & (near > 0)
        idx = np.arange(1, nw + 1)
        rim_n = ndi.sum(rim, near, idx)
        rim_nuc = ndi.sum(rim & nuc, near, idx) / np.maximum(rim_n, 1)
        perim = ndi.sum(holes & ~ndi.binary_erosion(holes), wl, idx)
        thick = rim_n / np.maximum(perim, 1) * mpp  # um of stained rim per um of lumen edge
        area = np.bincount(wl.ravel(), minlength=nw + 1)[1:] * a_um2
        edge = np.zeros(nw + 1, bool)
        edge[np.unique(np.concatenate([wl[0], wl[-1], wl[:, 0], wl[:, -1]]))] = True
        # a lumen is ringed all round: the rim's nuclear fraction in its poorest quadrant (seen from
        # the hole's centroid); a space beside a nest or a tissue edge has a bare side
        cnt = np.maximum(np.bincount(wl.ravel(), minlength=nw + 1), 1)
        yy, xx = np.indices(wl.shape)
        cy = np.bincount(wl.ravel(), yy.ravel(), minlength=nw + 1) / cnt
        cx = np.bincount(wl.ravel(), xx.ravel(), minlength=nw + 1) / cnt
        rl = near[rim]
        q = rl * 4 + 2 * (yy[rim] > cy[rl]) + (xx[rim] > cx[rl])
        qn = np.bincount(q, minlength=4 * (nw + 1)).reshape(-1, 4)
        qk = np.bincount(q, weights=nuc[rim], minlength=4 * (nw + 1)).reshape(-1, 4)
        qmin = np.where(qn >= 10, qk / np.maximum(qn, 1), 0.0).min(axis=1)[1:]
        sized = ((area >= GLAND_AREA_UM2[0]) & (area <= GLAND_AREA_UM2[1]) & ~edge[1:] & (rim_n * a_um2 >= 200)
                 & _in_core(wl, nw, m))
        ts.holes += [(float(a_), float(r_), float(t_), float(q_)) for a_, r_, t_, q_, k_ in
                     zip(area, rim_nuc, thick, qmin, sized) if k_]
        gl = sized & (rim_nuc >= GLAND_RIM_NUC) & (thick >= GLAND_RIM_THICK_UM) & (qmin >= GLAND_RIM_QMIN)
        ts.glands = int(gl.sum())
        ts.gland_px = int((area[gl] / a_um2).sum())
        arr["glands"] = np.concatenate([[False], gl])[wl]
    return arr


def tile_pass2(arr: dict, mpp: float, e_ref: float, bg_ref: float, ts: TileStats) -> TileStats:
    """Keratin: solid (no glass within 3 um), anuclear and free of red cells (5 um clear), eosin-bright
    regions, round (area <= KERATIN_COMPACT inscribed disks), inscribed radius >= KERATIN_R_UM, nearly no
    glass around them, centred in the tile's core; eosin relative to the slide's plain-tissue median
    `e_ref`, red cells relative to its plain-tissue OD_B/OD_G median `bg_ref`."""
    from scipy import ndimage as ndi

    if not arr["stained"].any():
        return ts
    nuc, white = arr["nuc"], arr["white"]
    Es = ndi.gaussian_filter(arr["E"], 2.0 / mpp)
    rbc = ndi.binary_opening(arr["stained"] & ~nuc & (arr["bg"] > bg_ref + RBC_BG_DELTA) & (arr["od_g"] > 0.5))
    blockers = nuc | rbc
    far = ndi.distance_transform_edt(~blockers) > KERATIN_CLEAR_UM / mpp if blockers.any() else np.ones_like(nuc)
    solid = ndi.distance_transform_edt(~white) > 3.0 / mpp if white.any() else np.ones_like(nuc)
    cand = arr["stained"] & far & solid & (Es > KERATIN_E_REL * e_ref)
    cand = ndi.binary_opening(cand, iterations=2)
    if not cand.any():
        return ts
    kl, nk = ndi.label(cand)
    idx = np.arange(1, nk + 1)
    r = ndi.distance_transform_edt(cand)
    rmax = np.zeros(nk + 1)
    np.maximum.at(rmax, kl[cand], r[cand])
    rmax = rmax[1:] * mpp
    keep = (rmax >= 0.6 * KERATIN_R_UM) & _in_core(kl, nk, arr["margin"])
    if not keep.any():
        return ts
    area = np.bincount(kl.ravel(), minlength=nk + 1)[1:] * mpp * mpp
    # its surroundings (12 um): a pearl sits deep in a nest, a vessel wall or septum borders glass
    d, (iy, ix) = ndi.distance_transform_edt(~cand, return_indices=True)
    near = kl[iy, ix]
    ring = (d > 0) & (d <= 12.0 / mpp)
    ring_n = ndi.sum(ring, near, idx)
    ring_white = ndi.sum(ring & white, near, idx) / np.maximum(ring_n, 1)
    e_rel = ndi.mean(Es, kl, idx) / e_ref
    compact = area / (np.pi * rmax**2)
    ts.kregions += [(float(a_), float(b_), float(c_), float(e_)) for a_, b_, c_, e_, k_ in
                    zip(rmax, compact, ring_white, e_rel, keep) if k_]
    # a pearl is a round plug, not a band (vessel walls, septa): area within a few inscribed disks
    big = keep & (rmax >= KERATIN_R_UM) & (compact <= KERATIN_COMPACT) & (ring_white <= KERATIN_RING_WHITE)
    if big.any():
        ts.pearls = int(big.sum())
        arr["keratin"] = np.concatenate([[False], big])[kl]
        ts.keratin_px = int(arr["keratin"].sum())
    return ts


def _tiles(slide: Any, ov: Overview, mpp0: float, p: WSIParams) -> tuple[list[TileStats], float, float, list]:
    lvl, f, mpp_a = _pick_level(slide, mpp0)
    ds = float(slide.level_downsamples[lvl])
    T = p.tile_px
    M = int(round(TILE_MARGIN_UM / mpp_a))  # context around each tile, analysis px
    P = T + 2 * M
    size0 = T * f * ds  # tile edge in level-0 px
    w0, h0 = slide.level_dimensions[0]
    nx, ny = max(1, math.ceil(w0 / size0)), max(1, math.ceil(h0 / size0))
    s_ov = ov.envelope.shape[1] / w0  # overview px per level-0 px
    env_f = ov.envelope.astype(np.float32)
    cands = []
    for j in range(ny):
        for i in range(nx):
            a0, a1 = int(j * size0 * s_ov), int(math.ceil((j + 1) * size0 * s_ov))
            b0, b1 = int(i * size0 * s_ov), int(math.ceil((i + 1) * size0 * s_ov))
            blk = env_f[a0:a1, b0:b1]
            if blk.size == 0:
                continue
            cover = float(blk.sum()) / max(1.0, (size0 * s_ov) ** 2)  # outside the slide counts as glass
            cands.append((cover, i, j))
    sel = [c for c in cands if c[0] >= p.min_tile_tissue]
    if not sel:
        sel = sorted((c for c in cands if c[0] > 0), reverse=True)[: max(1, p.max_tiles // 4)]
    sel.sort(key=lambda c: (c[2], c[1]))
    if len(sel) > p.max_tiles:  # evenly spread over the tissue, deterministic
        sel = [sel[k] for k in np.linspace(0, len(sel) - 1, p.max_tiles).round().astype(int)]
    out: list[TileStats] = []
    arrs: list[dict] = []
    step0 = size0 / T  # level-0 px per analysis px
    for cover, i, j in sel:
        x0, y0 = int(round(i * size0)), int(round(j * size0))
        xp, yp = int(round(x0 - M * step0)), int(round(y0 - M * step0))  # padded origin (may be < 0: glass)
        rgb = np.asarray(slide.read_region(xp, yp, lvl, P * f, P * f))
        if rgb.shape != (P * f, P * f, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"read_region returned {rgb.shape} {rgb.dtype}, expected ({P * f}, {P * f}, 3) uint8")
        rgb = _block_mean(rgb, f)
        # envelope for this padded tile, sampled from the overview; nothing outside the slide
        gy = yp + (np.arange(P) + 0.5) * step0
        gx = xp + (np.arange(P) + 0.5) * step0
        ys = np.clip((gy * s_ov).astype(int), 0, ov.envelope.shape[0] - 1)
        xs = np.clip((gx * s_ov).astype(int), 0, ov.envelope.shape[1] - 1)
        env = ov.envelope[ys[:, None], xs[None, :]]
        env &= ((gy >= 0) & (gy < h0))[:, None] & ((gx >= 0) & (gx < w0))[None, :]
        ts = TileStats(x0, y0, size0)
        arrs.append(tile_pass1(rgb, env, mpp_a, ts, margin=M))
        out.append(ts)
    # the slide's eosin reference: median over plain (non-nuclear) stained tissue at analysis resolution
    plain = [a["E"][a["plain"]][::7] for a in arrs]
    plain = np.concatenate(plain) if plain else np.zeros(0)
    e_ref = max(float(np.median(plain)) if plain.size >= 50 else ov.e_ref, 1e-3)
    bgs = [a["bg"][a["plain"]][::7] for a in arrs]
    bgs = np.concatenate(bgs) if bgs else np.zeros(0)
    bg_ref = float(np.median(bgs)) if bgs.size >= 50 else 0.45
    for a, ts in zip(arrs, out):
        tile_pass2(a, mpp_a, e_ref, bg_ref, ts)
    return out, mpp_a, e_ref, [lvl, f]


# ---------------------------------------------------------------------------------------------
# slide features
# ---------------------------------------------------------------------------------------------
def slide_features(tiles: list[TileStats], mpp_a: float, e_ref: float) -> dict[str, float]:
    a_um2 = mpp_a * mpp_a
    env = sum(t.env_px for t in tiles)
    st = sum(t.stained_px for t in tiles)
    tum = [t for t in tiles if t.tumour_like]
    tt = tum or tiles
    t_st = sum(t.stained_px for t in tt)
    areas = np.concatenate([t.areas for t in tt]) if tt else np.zeros(0)
    t_nuc = sum(t.nuc_px for t in tt)
    qmins = sorted((h[3] for t in tiles for h in t.holes), reverse=True)[:3]
    all_areas = np.concatenate([t.areas for t in tiles])
    env_mm2 = max(env * a_um2 / 1e6, 1e-6)
    w_env = [t.env_px for t in tiles]
    f = dict(
        air_frac=sum(t.air_px for t in tiles) / max(env, 1),
        nuc_density=sum(t.nuc_px for t in tiles) / max(st, 1),
        tumour_tile_frac=sum(t.env_px for t in tum) / max(sum(w_env), 1),
        t_nuc_density=t_nuc / max(t_st, 1),
        t_nuclei_per_10k=len(areas) / max(t_st * a_um2 / 1e4, 1e-6),
        t_nuc_area_log=math.log(float(areas.mean())) if len(areas) else math.log(MIN_NUC_UM2),
        t_nuc_area_cv=float(areas.std() / areas.mean()) if len(areas) > 1 else 0.0,
        t_nuc_h=sum(t.nuc_h_sum for t in tt) / max(t_nuc, 1) if t_nuc else 0.0,
        t_air_frac=sum(t.air_px for t in tt) / max(sum(t.env_px for t in tt), 1),
        gland_per_mm2=sum(t.glands for t in tiles) / env_mm2,
        gland_lumen_frac=sum(t.gland_px for t in tiles) / max(env, 1),
        rim_qmin_top3=float(np.mean(qmins)) if qmins else 0.0,
        keratin_frac=sum(t.keratin_px for t in tiles) / max(st, 1),
        keratin_per_mm2=sum(t.pearls for t in tiles) / env_mm2,
        t_eosin_rel=(sum(t.eos_sum for t in tt) / max(sum(t.eos_px for t in tt), 1)) / e_ref,
        big_nuc_per_mm2=float((all_areas >= BIG_NUC_UM2).sum()) / max(st * a_um2 / 1e6, 1e-6),
        nuc_area_p90_log=math.log(float(np.percentile(all_areas, 90))) if len(all_areas) else math.log(MIN_NUC_UM2),
    )
    return {k: float(f[k]) for k in FEATURES}


def analyse_slide(slide: Any, params: WSIParams | None = None) -> dict[str, Any]:
    """Features of one slide (no model): the part the classifier is fitted on."""
    p = params or WSIParams()
    if slide.level_count < 1 or not slide.level_dimensions:
        raise ValueError("slide has no levels")
    w0, h0 = (int(v) for v in slide.level_dimensions[0])
    if w0 < 16 or h0 < 16:
        raise ValueError(f"slide is {w0}x{h0} px: too small to analyse")
    mpp = slide.mpp
    mpp0 = float(mpp) if mpp else DEFAULT_MPP
    ov = overview(slide, mpp0)
    tiles, mpp_a, e_ref, read = _tiles(slide, ov, mpp0, p)
    feats = slide_features(tiles, mpp_a, e_ref) if tiles else {k: 0.0 for k in FEATURES}
    return dict(features=feats, tiles=tiles, overview=ov, mpp0=mpp0, w0=w0, h0=h0, mpp_known=bool(mpp),
                mpp_a=mpp_a, e_ref=e_ref, read=read, tissue_fraction=float(ov.tissue.mean()),
                envelope_fraction=float(ov.envelope.mean()))


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))


def load_checkpoint(path: Path = CHECKPOINT) -> dict:
    ck = json.loads(Path(path).read_text())
    if ck.get("feature_version") != FEATURE_VERSION or list(ck["features"]) != list(FEATURES):
        raise ValueError(f"{path}: fitted on other features (version {ck.get('feature_version')}); refit with "
                         f"python -m tools.wsi_analysis --fit")
    return ck


def _x(feats: dict[str, float], names) -> np.ndarray:
    """Model inputs: the named features, counts and small fractions on a log scale."""
    return np.array([math.log1p(LOG_SCALE[k] * feats[k]) if k in LOG_SCALE else feats[k] for k in names], np.float64)


def predict(ck: dict, feats: dict[str, float]) -> dict[str, Any]:
    """Class probabilities, finding probabilities and the out-of-distribution check for slide features.

    Features far from the synthetic training slides (Mahalanobis distance^2 above the checkpoint's
    threshold) are flagged and every probability is shrunk towards chance (uniform over the classes,
    0.5 for a finding) with weight w = threshold / d2: less confident, same order."""
    z = (_x(feats, ck["features"]) - np.array(ck["scaler"]["mean"])) / np.array(ck["scaler"]["std"])
    d2 = float(z @ np.array(ck["ood"]["precision"]) @ z)
    w = min(1.0, ck["ood"]["threshold"] / max(d2, 1e-9))
    m = ck["classifier"]
    pcs = _softmax(np.array(m["coef"]) @ z + np.array(m["intercept"]))
    pc = {c: float(w * v + (1 - w) / len(pcs)) for c, v in zip(m["classes"], pcs)}
    pf = {}
    for key, fm in ck["findings"].items():
        zi = (_x(feats, fm["features"]) - np.array(fm["mean"])) / np.array(fm["std"])
        pf[key] = w * _sigmoid(float(np.dot(fm["coef"], zi)) + fm["intercept"]) + (1 - w) * 0.5
    return dict(classes=pc, findings=pf, d2=d2, weight=w, ood=w < 1.0)


def _fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, C: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial (or binary, n_classes=2 -> one row) L2 logistic regression on standardised X."""
    try:
        from sklearn.linear_model import LogisticRegression

        m = LogisticRegression(C=C, max_iter=5000)
        m.fit(X, y)
        return m.coef_, m.intercept_
    except ImportError:  # numpy gradient descent fallback
        k = n_classes if n_classes > 2 else 1
        W, b = np.zeros((k, X.shape[1])), np.zeros(k)
        Y = np.eye(n_classes)[y] if k > 1 else y[:, None].astype(float)
        lam = 1.0 / (C * len(X))
        for _ in range(20000):
            Z = X @ W.T + b
            P = _softmax(Z) if k > 1 else 1 / (1 + np.exp(-Z))
            G = (P - Y) / len(X)
            W -= 0.5 * (G.T @ X + lam * W)
            b -= 0.5 * G.sum(axis=0)
        return W, b


def fit_checkpoint(F: list[dict[str, float]], labels: list[str], meta: dict, C: float = 1.0) -> dict:
    X = np.array([_x(f, FEATURES) for f in F])
    y = np.array([CLASSES.index(c) for c in labels])
    mu, sd = X.mean(axis=0), X.std(axis=0) + 1e-9
    Z = (X - mu) / sd
    coef, icpt = _fit_logreg(Z, y, len(CLASSES), C)
    # out-of-distribution: Mahalanobis distance on the standardised features (shrunk covariance)
    prec = np.linalg.inv(np.cov(Z.T) + 0.1 * np.eye(Z.shape[1]))
    d2 = np.einsum("ij,jk,ik->i", Z, prec, Z)
    ck = dict(version="1", feature_version=FEATURE_VERSION, features=list(FEATURES),
              log_scale=dict(LOG_SCALE), **meta,
              scaler=dict(mean=mu.round(8).tolist(), std=sd.round(8).tolist()),
              ood=dict(precision=np.round(prec, 6).tolist(), threshold=float(round(2.0 * np.quantile(d2, 0.99), 3)),
                       train_d2_max=float(round(d2.max(), 3)), rule="2 x the 99th percentile of training d2"),
              classifier=dict(classes=list(CLASSES), coef=np.round(coef, 6).tolist(),
                              intercept=np.round(icpt, 6).tolist(), C=C),
              findings={})
    for key, (cols, pos) in FINDING_MODELS.items():
        Xi = X[:, [FEATURES.index(c) for c in cols]]
        m_, s_ = Xi.mean(axis=0), Xi.std(axis=0) + 1e-9
        yb = np.isin(np.array(labels), pos).astype(int)
        cf, ic = _fit_logreg((Xi - m_) / s_, yb, 2, C)
        ck["findings"][key] = dict(features=list(cols), positive=list(pos), mean=m_.round(8).tolist(),
                                   std=s_.round(8).tolist(), coef=np.round(cf[0], 6).tolist(),
                                   intercept=float(np.round(ic[0], 6)))
    pc = [predict(ck, f)["classes"] for f in F]
    ck["train_accuracy"] = float(np.mean([max(p, key=p.get) == c for p, c in zip(pc, labels)]))
    return ck


SIZES = ((1536, 1024), (2048, 1536), (3072, 2048))


def synthetic_features(n: int, seed: int, sizes=SIZES, workdir: Path | None = None,
                       log=print) -> tuple[list, list, list]:
    """Generate `n` synthetic slides (classes cycled, sizes cycled), analyse each; (features, labels, secs)."""
    import tempfile

    from core.imaging.slide import open_slide
    from core.synth.slides import make_slide

    F, L, S = [], [], []
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for k in range(n):
            cls = CLASSES[k % len(CLASSES)]
            size = sizes[(k // len(CLASSES)) % len(sizes)]
            path = Path(tmp) / f"s{k}.tiff"
            make_slide(np.random.default_rng(rng.integers(2**63)), cls, path, size=size)
            t0 = time.perf_counter()
            with open_slide(path) as s:
                f = analyse_slide(s)["features"]
            S.append(time.perf_counter() - t0)
            path.unlink()
            F.append(f)
            L.append(cls)
            if log:
                log(f"[{k + 1}/{n}] {cls} {size} {S[-1]:.2f}s")
    return F, L, S


def fit_from_synthetic(n: int = 72, seed: int = 11, out: Path = CHECKPOINT, C: float = 1.0,
                       cache: Path | None = None) -> dict:
    """Generate `n` synthetic slides from `seed`, fit the models, write the checkpoint. `cache`: a JSON
    file of the training features, reused when it matches (n, seed, feature version), else written."""
    key = dict(n=n, seed=seed, feature_version=FEATURE_VERSION, sizes=[list(s) for s in SIZES])
    F = L = None
    if cache is not None and cache.exists():
        c = json.loads(cache.read_text())
        if c.get("key") == key:
            F, L = c["features"], c["labels"]
    if F is None:
        F, L, _ = synthetic_features(n, seed)
        if cache is not None:
            cache.write_text(json.dumps(dict(key=key, features=F, labels=L)))
    ck = fit_checkpoint(F, L, dict(training_seed=seed, n_train=n, train_sizes=[list(s) for s in SIZES],
                                   fitted_by="tools.wsi_analysis.fit_from_synthetic"), C=C)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ck, indent=1) + "\n")
    return ck


# ---------------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------------
def _heatmap_png(res: dict, path: Path) -> None:
    from PIL import Image

    ov = res["overview"]
    img = ov.rgb.astype(np.float32).copy()
    sc = ov.rgb.shape[1] / res["w0"]  # overview px per level-0 px
    for t in res["tiles"]:
        a0, b0 = int(t.y0 * sc), int(t.x0 * sc)
        a1, b1 = int(math.ceil((t.y0 + t.size0) * sc)), int(math.ceil((t.x0 + t.size0) * sc))
        col = np.array([220, 30, 30] if t.tumour_like else [30, 160, 60], np.float32)
        img[a0:a1, b0:b1] = 0.6 * img[a0:a1, b0:b1] + 0.4 * col
        for sl in ((slice(a0, a0 + 1), slice(b0, b1)), (slice(a0, a1), slice(b0, b0 + 1))):
            img[sl] = col
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


@register
class WSIAnalysis(Tool):
    name = "wsi_analysis"
    description = ("H&E lung whole-slide analysis: tissue detection, tile colour deconvolution (nuclear density, "
                   "size and pleomorphism, gland lumina, keratin pearls, alveolar airspace), tumour-tile fraction, "
                   "and P(normal lung / adenocarcinoma / squamous cell carcinoma) from a small logistic model")
    modalities = frozenset({Modality.WSI})
    Params = WSIParams
    model_name = "colour-deconvolution features + multinomial logistic regression"
    version = "1"

    def load(self) -> None:
        self.ck = load_checkpoint()

    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        p: WSIParams = params  # type: ignore[assignment]
        res = analyse_slide(study, p)
        f = res["features"]
        tiles = res["tiles"]
        findings = [
            Finding(label="tissue_fraction", value=round(res["tissue_fraction"], 4), unit=None,
                    detail=f"stained tissue of the slide area; envelope incl. airspaces "
                           f"{res['envelope_fraction']:.3f}; {len(tiles)} tiles at {res['mpp_a']:.2f} um/px"
                           + ("" if res["mpp_known"] else f"; mpp unknown, {DEFAULT_MPP} um/px assumed")),
        ]
        if not tiles or sum(t.stained_px for t in tiles) == 0:
            findings.append(Finding(label="no_tissue", present=True, detail="no stained tissue found to analyse"))
            return findings, []
        pr = predict(self.ck, f)
        pc, pf = pr["classes"], pr["findings"]
        ntum = sum(t.tumour_like for t in tiles)
        findings.append(Finding(label="tumour_tile_fraction", value=round(f["tumour_tile_frac"], 4), unit=None,
                                present=ntum > 0, detail=f"{ntum}/{len(tiles)} sampled tiles cellular and solid"))
        findings.append(Finding(label="nuclear_density", value=round(f["nuc_density"], 5), unit=None,
                                detail="haematoxylin-positive nuclear pixels per stained tissue pixel, all tiles"))
        values = dict(
            gland_formation=(f["gland_per_mm2"], "per mm2", f"nucleus-rimmed lumina {f['gland_per_mm2']:.1f}/mm2, "
                             f"lumen fraction {f['gland_lumen_frac']:.3f}"),
            keratinisation=(f["keratin_per_mm2"], "per mm2", f"eosinophilic anuclear compact regions "
                            f"{f['keratin_per_mm2']:.1f}/mm2, {100 * f['keratin_frac']:.2f}% of stained area"),
            nuclear_atypia=(math.exp(f["t_nuc_area_log"]), "um2",
                            f"mean nuclear area {math.exp(f['t_nuc_area_log']):.0f} um2, CV {f['t_nuc_area_cv']:.2f}, "
                            f"nuclear density {f['t_nuc_density']:.3f} (tumour-like tiles)"),
            normal_alveolar_architecture=(f["air_frac"], None, f"airspace fraction of tissue envelope "
                                          f"{f['air_frac']:.2f}"),
        )
        for key in ("gland_formation", "keratinisation", "nuclear_atypia", "normal_alveolar_architecture"):
            v, unit, det = values[key]
            findings.append(Finding(label=key, present=pf[key] >= 0.5, probability=round(pf[key], 4),
                                    value=round(float(v), 4), unit=unit, detail=det))
        for cls in CLASSES:
            findings.append(Finding(label=f"slide_class:{cls}", present=pc[cls] == max(pc.values()),
                                    probability=round(pc[cls], 4)))
        if pr["ood"]:
            findings.append(Finding(label="out_of_distribution", value=round(pr["d2"], 2), unit="Mahalanobis d2",
                                    detail=f"slide features unlike the synthetic training slides (threshold "
                                           f"{self.ck['ood']['threshold']:.1f}); probabilities shrunk towards chance "
                                           f"(weight {pr['weight']:.2f})"))
        artefacts = []
        if ctx.artefact_dir is not None and p.heatmap:
            out = Path(ctx.artefact_dir)
            out.mkdir(parents=True, exist_ok=True)
            name = f"{self.name}_{ctx.study_id}_tiles.png".replace("/", "_")
            _heatmap_png(res, out / name)
            artefacts.append(Artefact(id=f"{self.name}:{ctx.study_id}:tiles", kind="png", path=name,
                                      description="slide thumbnail; sampled tiles red = tumour-like, green = other"))
        return findings, artefacts

    def summarise(self, findings: list[Finding]) -> str:
        by = {f.label: f for f in findings}
        if "slide_class:normal_lung" not in by:
            return super().summarise(findings)
        cls = max((f for f in findings if f.label.startswith("slide_class:")), key=lambda f: f.probability or 0)
        head = f"Slide most consistent with {cls.label.split(':', 1)[1].replace('_', ' ')} (p={cls.probability:.2f})."
        rest = [f for f in findings if not f.label.startswith("slide_class:")]
        return head + " " + super().summarise(rest)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Fit the WSI slide classifier on synthetic slides")
    ap.add_argument("--fit", action="store_true", help="generate slides, fit, write the checkpoint")
    ap.add_argument("--n", type=int, default=72)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--cache", type=Path, default=None, help="JSON file caching the training features")
    a = ap.parse_args(argv)
    if not a.fit:
        ap.error("nothing to do: pass --fit")
    ck = fit_from_synthetic(a.n, a.seed, a.out, a.C, a.cache)
    print(f"wrote {a.out}: train accuracy {ck['train_accuracy']:.3f} on {a.n} slides (seed {a.seed})")


if __name__ == "__main__":
    main()
