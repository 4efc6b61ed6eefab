"""Chest CT analysis by classical image processing: HU thresholds, morphology, connected components.

Works on a `core.imaging.types.Volume` (float32 HU, [z, y, x] in LPS: x to the patient's left, y
posterior, z superior, slice 0 inferior; spacing (z, y, x) mm) and nothing else: no masks, no truth,
no learned weights. Every number is measured from the image, so the agents can quote it. Volumes
above ~3 M voxels are block-averaged first; an 80 x 112 x 112 volume takes ~0.3 s of CPU.

Pipeline (s1 = 1.2 mm Gaussian, s2 = 3 mm Gaussian for fluid vs soft tissue):
  body       the largest component above -400 HU, holes filled slice by slice;
  lungs      air (< -400 HU) inside the body without the trachea (followed down from the top slice
             as a small round air column until it branches) and without small air pockets; split
             into right / left at the body's midline;
  lung space each lung's per-slice convex hull, less the mediastinum (dense tissue reaching the
             region between the two hulls, carried a few mm up/down so hilar vessels go with it);
  lesions    components of > -350 HU inside a lung space whose solid core (> -100 HU) is at least
             min_lesion_mm across: one large enclosed air pocket -> cavitation; >= 30 mm with air
             bronchograms, chest-wall contact or an irregular shape -> consolidation; round ones at
             the hilum -> lymphadenopathy; otherwise nodule (< 30 mm) or mass, with the longest
             axial diameter, volume, mean HU and lobe (the words of core/synth/chest.py `_lobe`);
  GGO        -700 .. -300 HU lung voxels (opened: vessel rims and lines drop out), lung fraction;
  emphysema  LAA-950 (% of aerated lung below -950 HU): diffuse, or upper-lobe predominant;
  effusion   per (z, x) column, the run of fluid-density voxels (s2 -60 .. 28 HU) behind the
             posterior-most aerated voxel: volume and depth of the dependent layer;
  pneumothorax  free air (s1 < -950 HU, median < -985 HU: no lung markings, unlike emphysema) in
             a layer >= 6 mm thick on the lung's outer surface;
  heart      per slice, the gap between the two lungs' medial borders in the rows where the heart
             bulges them (not the tapering tips); widest gap / widest lung span = cardiothoracic
             ratio; the attenuation 3-9 mm inside both borders tells pericardial fluid (< 18 HU)
             from myocardium (~40 HU), and the fluid rim is taken out of the heart for the ratio;
  contrast   the bright end of the cardiac silhouette > 180 HU; then emboli: soft tissue (-60 ..
             140 HU) next to enhanced blood in the hilar lobar arteries (below the carina,
             behind the pulmonary trunk, lateral to the mediastinum);
  calcium    small foci > 350 HU and > 250 HU above their surroundings (thick slices: 250 / 170;
             contrast: above the blood pool), outside bone, metal and lungs: on the heart's surface
             -> coronary, elsewhere (ascending aorta, arch, descending aorta) -> aortic wall;
  metal      voxels > 2500 HU; streaks from metal lower the reliability of nearby measurements.

Each catalogue finding the tool examines is reported once, present or absent (pertinent
negatives), with its largest or most representative measurement and all instances in `detail`, so
nothing is double counted. Findings it cannot judge are left out rather than reported absent:
pulmonary emboli without contrast, and lymph nodes (only hilar ones that bulge into the lung are
seen; mediastinal nodes have the attenuation of the mediastinum). Measurements without a
catalogue key use plain labels: lung_volume, contrast_enhancement, image_quality.

Known limits (synthetic cohort): consolidation against the heart or spine is largely missed (it is
not enclosed by aerated lung); nodules under ~15 mm are missed (intrapulmonary vessels make 5-10 mm
solid blobs too); hilar nodes are found in about a quarter of cases; thick slices blur calcified
plaque below the thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

# ---------------------------------------------------------------------------------------------
# thresholds (HU unless stated); calibrated on synthetic cohorts (seed 7), never on truth masks
# at run time
# ---------------------------------------------------------------------------------------------
AIR_HU = -400.0  # air / aerated lung vs everything else
DENSE_HU = -350.0  # lesion (soft tissue, partial volume included) inside the lung space
GGO_RANGE = (-700.0, -300.0)
LAA_HU = -950.0
PTX_HU = -950.0
FLUID_RANGE = (-60.0, 28.0)  # on the heavy-smoothed image: pleural fluid (~0-15 HU) vs muscle (~40)
CONTRAST_HU = 180.0
CALC_HU = 350.0
METAL_HU = 2500.0
MAX_WORK_VOXELS = 3_000_000  # larger volumes are resampled (block-averaged) to about this many


class CTParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # smallest focal lesion reported: equivalent diameter of its solid (> -100 HU) core. Vessels seen
    # in cross-section make 5-9 mm "cores" too, so classical CAD cannot go much lower without vessel tracking
    min_lesion_mm: float = Field(10.0, ge=2.0, le=50.0)
    mass_mm: float = Field(30.0, ge=10.0, le=100.0)  # nodule < mass_mm <= mass
    ctr_upper: float = Field(0.55, ge=0.3, le=0.9)  # cardiothoracic ratio above this: cardiomegaly
    laa_emphysema_pct: float = Field(6.0, ge=0.1, le=60.0)  # LAA-950 % above this: emphysema
    ggo_fraction: float = Field(0.05, ge=0.001, le=0.9)  # GGO volume / lung volume above this: present
    # pleural fluid volume and depth above these: present (the posterior chest-wall muscle, partial-volumed
    # with fat, reads as ~20-35 mL of 'fluid' 15-20 mm deep in every normal scan)
    effusion_ml: float = Field(75.0, ge=1.0, le=2000.0)
    effusion_depth_mm: float = Field(25.0, ge=1.0, le=200.0)
    pneumothorax_ml: float = Field(8.0, ge=1.0, le=2000.0)
    write_overlay: bool = True  # one axial PNG with outlines when ctx.artefact_dir is set


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------

def validated_volume(study: Any) -> tuple[np.ndarray, tuple[float, float, float], list[str]]:
    """HU array float32 [z, y, x], spacing (z, y, x) mm, notes; ValueError for anything unusable."""
    arr = getattr(study, "array", None)
    if arr is None:
        raise ValueError(f"expected a Volume (with .array and .spacing), got {type(study).__name__}")
    a = np.asarray(arr)
    if a.ndim != 3:
        raise ValueError(f"CT array must be 3-D [z, y, x], got shape {a.shape}")
    if min(a.shape[1:]) < 32 or a.shape[0] < 4:
        raise ValueError(f"CT volume too small for analysis: {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"CT voxels must be numeric, got {a.dtype}")
    sp = getattr(study, "spacing", None)
    try:
        spacing = tuple(float(s) for s in sp)  # type: ignore[union-attr]
    except TypeError:
        raise ValueError(f"CT spacing missing or not a sequence: {sp!r}") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and 0.05 < s < 50 for s in spacing):
        raise ValueError(f"CT spacing must be three positive mm values (z, y, x), got {sp!r}")
    a = a.astype(np.float32, copy=True)
    notes = []
    bad = ~np.isfinite(a)
    nbad = int(bad.sum())
    if nbad:
        if nbad > 0.01 * a.size:
            raise ValueError(f"CT volume has {nbad} non-finite voxels ({100 * nbad / a.size:.1f}%)")
        idx = ndi.distance_transform_edt(bad, return_distances=False, return_indices=True)
        a = a[tuple(idx)]
        notes.append(f"{nbad} non-finite voxels replaced by their nearest neighbours")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 100:
        raise ValueError(f"CT volume has no contrast (HU range {lo:.0f}..{hi:.0f})")
    p1 = float(np.percentile(a[:, ::4, ::4], 1))
    if lo >= -50 and p1 < 150 and hi > 900:  # stored values without the -1024 rescale intercept
        a -= 1024.0
        notes.append("values looked like raw stored CT numbers (no air below 0); shifted by -1024 HU")
    elif p1 > -500:
        notes.append(f"little air in the volume (1st percentile {p1:.0f} HU): not a usual chest CT, "
                     "measurements unreliable")
    return a, spacing, notes


def _working_grid(a: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Block-average a large volume down to <= MAX_WORK_VOXELS (thin slices first), for speed."""
    if a.size <= MAX_WORK_VOXELS:
        return a, spacing
    fz = fy = 1
    while a.size / (fz * fy * fy) > MAX_WORK_VOXELS:
        if spacing[0] * fz < 2.4 and spacing[0] * fz <= spacing[1] * fy:
            fz += 1
        else:
            fy += 1
    nz, ny, nx = (a.shape[0] // fz) * fz, (a.shape[1] // fy) * fy, (a.shape[2] // fy) * fy
    b = a[:nz, :ny, :nx].reshape(nz // fz, fz, ny // fy, fy, nx // fy, fy).mean(axis=(1, 3, 5))
    return b.astype(np.float32), (spacing[0] * fz, spacing[1] * fy, spacing[2] * fy)


# ---------------------------------------------------------------------------------------------
# morphology helpers (2-D per axial slice, vectorised over z)
# ---------------------------------------------------------------------------------------------
_CROSS2 = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)  # in-plane 4-connectivity
_SQUARE2 = np.ones((1, 3, 3), bool)


_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]


def fill_holes_2d(m: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (background regions not touching the slice's y/x border)."""
    lab, n = ndi.label(~m, structure=_PLANE)
    if n == 0:
        return m.copy()
    border = np.unique(np.concatenate([lab[:, 0, :].ravel(), lab[:, -1, :].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    keep = np.ones(n + 1, bool)
    keep[border] = False
    keep[0] = False
    return m | keep[lab]


def fill_holes_3d(m: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(~m)
    if n <= 1:
        return m.copy()
    border = np.unique(np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel(),
                                       lab[:, :, 0].ravel(), lab[:, :, -1].ravel()]))
    keep = np.ones(n + 1, bool)
    keep[border] = False
    keep[0] = False
    return m | keep[lab]


def dilate_2d(m: np.ndarray, k: int) -> np.ndarray:
    """In-plane dilation by ~k voxels (alternating cross / square: an octagon, close to a disk)."""
    for i in range(k):
        m = ndi.binary_dilation(m, structure=_SQUARE2 if i % 2 else _CROSS2)
    return m


def _convex_minorant(y: np.ndarray, x: np.ndarray) -> tuple[list, list]:
    """Vertices of the lower convex chain of points sorted by y (monotone chain)."""
    hy: list = []
    hx: list = []
    for yi, xi in zip(y.tolist(), x.tolist()):
        while len(hy) >= 2 and (hx[-1] - hx[-2]) * (yi - hy[-2]) >= (xi - hx[-2]) * (hy[-1] - hy[-2]):
            hy.pop()
            hx.pop()
        hy.append(yi)
        hx.append(xi)
    return hy, hx


def hull_2d(m: np.ndarray) -> np.ndarray:
    """Convex hull of every axial slice (row-wise: convex minorant of the left ends, concave
    majorant of the right ends)."""
    out = np.zeros_like(m)
    xs = np.arange(m.shape[2])[None]
    for z in np.nonzero(m.any(axis=(1, 2)))[0]:
        sl = m[z]
        rows = np.nonzero(sl.any(1))[0]
        sub = sl[rows]
        left = sub.argmax(1).astype(float)
        right = (sl.shape[1] - 1 - sub[:, ::-1].argmax(1)).astype(float)
        ly, lx = _convex_minorant(rows, left)
        ry, rx = _convex_minorant(rows, -right)
        yy = np.arange(rows[0], rows[-1] + 1)
        lo = np.interp(yy, ly, lx)
        hi = -np.interp(yy, ry, rx)
        out[z, rows[0]:rows[-1] + 1] = (xs >= lo[:, None] - 1e-6) & (xs <= hi[:, None] + 1e-6)
    return out


def _largest(lab: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(lab.shape, bool)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    return lab == int(sizes.argmax())


# ---------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------

@dataclass
class Anatomy:
    a: np.ndarray  # HU, working grid
    s1: np.ndarray  # light smoothing
    s2: np.ndarray  # heavy smoothing (fluid vs soft tissue)
    spacing: tuple[float, float, float]
    body: np.ndarray
    lung: dict[str, np.ndarray]  # aerated lung per side (air < -400, trachea removed)
    space: dict[str, np.ndarray]  # lung space per side (aerated + enclosed)
    trachea: np.ndarray
    midline_x: float  # voxel column of the body midline
    center_y: float  # voxel row of the body centre
    lung_z: tuple[float, float]  # mm from the inferior edge: lowest / highest aerated-lung slice centres
    carina_z: int | None = None  # slice where the tracked trachea ended
    notes: list[str] = field(default_factory=list)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def z_mm(self, z: float) -> float:
        return (z + 0.5) * self.spacing[0]

    def y_mm(self, y: float) -> float:  # relative to the body centre, posterior positive
        return (y - self.center_y) * self.spacing[1]

    def x_mm(self, x: float) -> float:  # relative to the midline, patient's left positive
        return (x - self.midline_x) * self.spacing[2]

    def side_of(self, x: float) -> str:
        return "right" if x < self.midline_x else "left"

    def lobe(self, side: str, z: float, y: float) -> str:
        """Lobe words as core/synth/chest.py `_lobe` writes them (z, y voxel indices)."""
        lo, hi = self.lung_z
        f = (self.z_mm(z) - lo) / max(hi - lo, 1.0)
        if f > 0.55:
            lobe = "upper lobe"
        elif f < 0.35 or self.y_mm(y) > 40:
            lobe = "lower lobe"
        else:
            lobe = "middle lobe" if side == "right" else "lingula"
        return "lingula" if lobe == "lingula" else f"{side} {lobe}"


def _track_trachea(air: np.ndarray, body: np.ndarray, midline_x: float, sy: float,
                   sx: float) -> tuple[np.ndarray, int | None]:
    """The trachea: a small round air column near the midline, followed down from the top slice
    until it branches or merges with lung. Returns the mask and the last slice tracked."""
    nz = air.shape[0]
    out = np.zeros(air.shape, bool)
    px_mm2 = sy * sx
    prev = None
    last = None
    for z in range(nz - 1, -1, -1):
        lab, n = ndi.label(air[z])
        if n == 0:
            if prev is not None:
                break
            continue
        idx = np.arange(1, n + 1)
        areas = ndi.sum_labels(np.ones_like(lab), lab, idx) * px_mm2
        if prev is None:
            cx = np.array(ndi.mean(np.indices(lab.shape)[1], lab, idx))
            ok = (areas > 40) & (areas < 1200) & (np.abs(cx - midline_x) * sx < 30)
            if not ok.any():
                if z < nz - 6:  # no trachea-like column near the top: give up
                    break
                continue
            pick = idx[ok][np.argmin(np.abs(cx[ok] - midline_x))]
            comp = lab == pick
            area0 = areas[pick - 1]
        else:
            ov = np.unique(lab[prev & (lab > 0)])
            if len(ov) != 1:  # branched (carina) or lost
                break
            comp = lab == ov[0]
            if comp.sum() * px_mm2 > 2.5 * max(area0, 150):  # merged with lung
                break
        out[z] = comp
        prev = ndi.binary_dilation(comp, iterations=1)
        last = z
    return out, last


def segment(a: np.ndarray, spacing: tuple[float, float, float]) -> Anatomy:
    sz, sy, sx = spacing
    s1 = ndi.gaussian_filter(a, sigma=(min(0.6, 1.2 / sz), 1.2 / sy, 1.2 / sx), truncate=2.5)
    s2 = ndi.gaussian_filter(a, sigma=(min(1.0, 3.0 / sz), 3.0 / sy, 3.0 / sx), truncate=2.5)
    notes: list[str] = []
    dense = s1 > AIR_HU
    lab, n = ndi.label(dense)
    body = fill_holes_2d(_largest(lab, n))
    if body.sum() < 0.05 * body.size:
        raise ValueError("no body found (too little tissue above -400 HU)")
    zz = np.nonzero(body.any(axis=(1, 2)))[0]
    yy, xx = np.nonzero(body[zz[len(zz) // 2]])
    midline_x, center_y = float(xx.mean()), float(yy.mean())

    air = (s1 < AIR_HU) & body
    trachea, carina = _track_trachea(air, body, midline_x, sy, sx)
    air &= ~trachea
    lab, n = ndi.label(air)
    if n == 0:
        raise ValueError("no aerated lung found inside the body")
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * (sz * sy * sx / 1000.0)
    sizes[0] = 0
    keep = np.nonzero(sizes >= max(50.0, 0.05 * sizes.max()))[0]
    lungs_all = np.isin(lab, keep)
    if sizes.max() < 50.0:
        raise ValueError(f"no lungs found (largest air region {sizes.max():.0f} mL)")
    cols = np.arange(a.shape[2])[None, None, :]
    lung = {"right": lungs_all & (cols < midline_x), "left": lungs_all & (cols >= midline_x)}
    zl = np.nonzero(lungs_all.sum(axis=(1, 2)) * sy * sx > 100.0)[0]
    if len(zl) == 0:
        zl = np.nonzero(lungs_all.any(axis=(1, 2)))[0]
    lung_z = ((zl[0] + 0.5) * sz, (zl[-1] + 0.5) * sz)
    # lung space: each lung's per-slice convex hull, less the mediastinum (dense tissue that
    # reaches the region between the two hulls: heart, great vessels, spine, hila)
    hull = {side: hull_2d(m) for side, m in lung.items()}
    central = hull_2d(lung["right"] | lung["left"]) & ~hull["right"] & ~hull["left"]
    dense_in = (s1 > DENSE_HU) & body & (hull["right"] | hull["left"] | central)
    lab, n = ndi.label(dense_in, structure=_PLANE)
    med_ids = np.unique(lab[central & dense_in])
    keep = np.zeros(n + 1, bool)
    keep[med_ids] = True
    keep[0] = False
    mediastinal = keep[lab]
    # structures that leave the mediastinum obliquely (hilar vessels) look detached on their
    # first/last slices: extend the mediastinum through dense tissue for a few mm in 3-D
    zline = np.zeros((3, 3, 3), bool)
    zline[:, 1, 1] = True
    for _ in range(max(1, int(round(6.0 / sz)))):
        mediastinal = ndi.binary_dilation(mediastinal, structure=zline) & dense_in
    space = {side: (lung[side] | (hull[side] & body & ~mediastinal)) for side in lung}
    both = space["right"] & space["left"]  # hulls that overlap: split at the midline
    space["right"] &= ~(both & (cols >= midline_x))
    space["left"] &= ~(both & (cols < midline_x))
    return Anatomy(a=a, s1=s1, s2=s2, spacing=spacing, body=body, lung=lung, space=space, trachea=trachea,
                   midline_x=midline_x, center_y=center_y, lung_z=lung_z, carina_z=carina, notes=notes)


# ---------------------------------------------------------------------------------------------
# analyses
# ---------------------------------------------------------------------------------------------

@dataclass
class Lesion:
    side: str
    location: str
    diameter_mm: float  # longest axial diameter (second moments of the largest axial section)
    eq_diameter_mm: float  # diameter of the sphere of the same volume
    core_mm: float  # equivalent diameter of the solid core (> -100 HU)
    volume_ml: float
    mean_hu: float
    air_fraction: float  # enclosed air / filled lesion volume
    cavity_mm: float  # equivalent diameter of the largest enclosed air pocket
    pocket_share: float  # largest pocket / all enclosed air
    wall_contact: float  # fraction of the lesion's in-plane border on non-lung (chest wall, mediastinum)
    centre: tuple[float, float, float]  # voxel (z, y, x)
    kind: str = ""  # lung_nodule | lung_mass | consolidation | cavitation | lymphadenopathy | "" (rejected)
    mask: np.ndarray | None = None  # bool, in the bbox
    bbox: tuple[slice, ...] | None = None


def _axial_major_mm(m2: np.ndarray, sy: float, sx: float) -> float:
    yy, xx = np.nonzero(m2)
    if len(yy) < 3:
        return float(max(sy, sx)) * max(len(yy), 1)
    c = np.cov(np.stack([yy * sy, xx * sx]))
    ev = np.linalg.eigvalsh(c)
    return float(4.0 * math.sqrt(max(ev[-1], 0.0)))


def _eqd(ml: float) -> float:
    return (6.0 * ml * 1000.0 / math.pi) ** (1.0 / 3.0)


def bone_mask(an: Anatomy) -> np.ndarray:
    """Cortical bone (> 450 HU) with what it encloses (marrow, canal), grown by one voxel."""
    b = fill_holes_2d(an.s1 > 450.0)
    return dilate_2d(b, 1)


def find_lesions(an: Anatomy, p: CTParams, bone: np.ndarray) -> list[Lesion]:
    sz, sy, sx = an.spacing
    out = []
    for side in ("right", "left"):
        space = an.space[side]
        cand = space & (an.s1 > DENSE_HU) & ~bone
        lab, n = ndi.label(cand)
        if n == 0:
            continue
        other = ~space  # chest wall, mediastinum, the other lung
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            if sl is None:
                continue
            sl = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in sl)
            m = lab[sl] == i
            vol = int(m.sum()) * an.voxel_ml
            if _eqd(vol) < 0.8 * p.min_lesion_mm:
                continue
            core_ml = int((m & (an.s1[sl] > -100.0)).sum()) * an.voxel_ml
            core = _eqd(core_ml)
            if core < p.min_lesion_mm:
                continue  # no solid centre: vessels, septal lines, fibrotic strands, partial volume
            filled = fill_holes_3d(m) | fill_holes_2d(m)
            inner_air = filled & ~m & (an.s1[sl] < AIR_HU)
            n_air = int(inner_air.sum())
            air_frac = n_air / max(int(filled.sum()), 1)
            cav, share = 0.0, 0.0
            if n_air:
                alab, _ = ndi.label(inner_air)
                counts = np.bincount(alab.ravel())[1:]
                cav = _eqd(counts.max() * an.voxel_ml)
                share = counts.max() / n_air
            areas = filled.sum(axis=(1, 2))
            zmax = int(areas.argmax())
            dia = _axial_major_mm(filled[zmax], sy, sx)
            if (areas > 0).sum() == 1 and dia < 2 * p.min_lesion_mm:
                continue  # one-slice specks
            shell = ndi.binary_dilation(filled, structure=_CROSS2) & ~filled
            touching = float((shell & other[sl]).sum()) / max(int(shell.sum()), 1)
            zc, yc, xc = (np.array(ndi.center_of_mass(filled)) + [s.start for s in sl])
            les = Lesion(side=side, location=an.lobe(side, zc, yc), diameter_mm=round(dia, 1),
                         eq_diameter_mm=round(_eqd(vol), 1), core_mm=round(core, 1),
                         volume_ml=round(float(filled.sum()) * an.voxel_ml, 2),
                         mean_hu=round(float(an.a[sl][m].mean()), 1), air_fraction=round(air_frac, 4),
                         cavity_mm=round(cav, 1), pocket_share=round(share, 3), wall_contact=round(touching, 3),
                         centre=(float(zc), float(yc), float(xc)), mask=filled, bbox=sl)
            les.kind = classify_lesion(les, an, p)
            if les.kind:
                out.append(les)
    return out


def classify_lesion(les: Lesion, an: Anatomy, p: CTParams) -> str:
    elong = les.diameter_mm / max(les.eq_diameter_mm, 1e-6)
    if les.cavity_mm >= 12.0 and les.pocket_share >= 0.5 and les.diameter_mm >= 15.0:
        return "cavitation"
    big = les.diameter_mm >= p.mass_mm
    if big and (les.air_fraction >= 0.005 or les.wall_contact >= 0.2 or elong > 1.9):
        return "consolidation"
    if elong > (1.9 if big else 1.6):
        return ""  # not round: a vessel, bronchus or band seen along its length
    if _is_nodal(les, an):
        return "lymphadenopathy"
    return "lung_mass" if big else "lung_nodule"


def _is_nodal(les: Lesion, an: Anatomy) -> bool:
    """A round soft-tissue lesion at the hilum (beside the main pulmonary artery, below the carina)."""
    if an.carina_z is None:
        return False
    z, y, x = les.centre
    dz = (z - an.carina_z) * an.spacing[0]
    dx = abs(an.x_mm(x))
    dy = an.y_mm(y)
    return -45.0 <= dz <= -20.0 and 35.0 <= dx <= 60.0 and abs(dy) <= 15.0 and les.wall_contact < 0.15


# ---------------------------------------------------------------------------------------------
# diffuse lung findings
# ---------------------------------------------------------------------------------------------

def _side_words(sides: list[str], one: str, both: str) -> str:
    s = sorted(set(sides))
    return both if len(s) == 2 else one.format(side=s[0]) if s else ""


def ground_glass(an: Anatomy, lesion_mask: np.ndarray, ptx: np.ndarray) -> dict:
    """-700 .. -300 HU voxels of the lung space, opened (vessel rims, lines and lesion edges drop out)."""
    out = {}
    for side in ("right", "left"):
        lung = an.space[side] & ~lesion_mask & ~ptx
        g = lung & (an.s1 > GGO_RANGE[0]) & (an.s1 < GGO_RANGE[1])
        g = ndi.binary_opening(g, structure=_SQUARE2)
        vol = float(lung.sum()) * an.voxel_ml
        out[side] = (float(g.sum()) * an.voxel_ml, vol)
    return out


def emphysema(an: Anatomy, ptx: np.ndarray, ptx_sides: tuple[str, ...] = ()) -> dict:
    """LAA-950: % of aerated lung below -950 HU (trachea, pneumothorax excluded); upper/lower split.
    A lung with a pneumothorax is left out (free air at its edges reads as LAA) unless both have one."""
    if ptx.any():  # the pneumothorax and its partial-volume rim are not lung
        ptx = dilate_2d(ptx, max(1, int(round(6.0 / an.spacing[1]))))
    sides = [s for s in ("right", "left") if s not in ptx_sides] or ["right", "left"]
    lung = np.zeros(an.a.shape, bool)
    for s in sides:
        lung |= an.lung[s]
    lung &= ~ptx
    if not lung.any():
        return {"laa": 0.0, "upper": 0.0, "lower": 0.0, "p15": None, "sides": sides}
    low = lung & (an.s1 < LAA_HU)
    lo, hi = an.lung_z
    zmid = int((lo + 0.5 * (hi - lo)) / an.spacing[0])
    up_l, lo_l = lung[zmid:], lung[:zmid]
    frac = lambda l, m: 100.0 * float(m.sum()) / max(int(l.sum()), 1)  # noqa: E731
    return {"laa": frac(lung, low), "upper": frac(up_l, low[zmid:]), "lower": frac(lo_l, low[:zmid]),
            "p15": float(np.percentile(an.s1[lung][::7], 15)), "sides": sides}


def pneumothorax(an: Anatomy, p: CTParams) -> tuple[dict, np.ndarray]:
    """Air without lung markings (< -950 HU after 3 mm smoothing) in a thick layer on the lung surface."""
    sz, sy, sx = an.spacing
    res, mask = {}, np.zeros(an.a.shape, bool)
    for side in ("right", "left"):
        lung = an.lung[side]
        cand = lung & (an.s1 < PTX_HU)
        cand = ndi.binary_opening(cand, structure=_CROSS2, iterations=1)
        lab, n = ndi.label(cand)
        if n == 0:
            res[side] = (0.0, 0.0)
            continue
        # the layer must lie on the lung's outer surface (touch the chest wall side, not the hilum)
        outside = ~an.space[side] & an.body & ~ndi.binary_dilation(an.space["left" if side == "right" else "right"])
        edge = dilate_2d(outside, max(2, int(round(10.0 / sx))))
        sizes = np.bincount(lab.ravel(), minlength=n + 1)
        touch = np.bincount(lab[edge & cand].ravel(), minlength=n + 1)
        best_vol, best_depth = 0.0, 0.0
        for i in range(1, n + 1):
            vol = sizes[i] * an.voxel_ml
            if vol < 2.0 or touch[i] < 0.05 * sizes[i]:
                continue
            sl = ndi.find_objects((lab == i).astype(np.uint8))[0]
            comp = lab[sl] == i
            depth = float(ndi.distance_transform_edt(np.pad(comp, 1), sampling=(max(sz, 1e-3) * 50, sy, sx)).max()) * 2
            if depth < 6.0:
                continue  # thin: partial volume along the pleura or emphysematous spaces
            if float(np.median(an.s1[sl][comp])) > -985.0:
                continue  # emphysematous lung: very low attenuation, but not free air (-1000 HU)
            mask[sl] |= comp
            best_vol += vol
            best_depth = max(best_depth, depth)
        res[side] = (best_vol, best_depth)
    return res, mask


def _posterior_runs(an: Anatomy, side: str, tissue: np.ndarray, reach_mm: float = 10.0):
    """Per (z, x) column: where a run of `tissue` starts behind the posterior-most aerated voxel of
    the lung (within reach_mm of it: the partial-volume step) and how many voxels it lasts."""
    ny = an.a.shape[1]
    yy = np.arange(ny)[None, :, None]
    lung = an.lung[side]
    has = lung.any(axis=1)  # [z, x]
    last = np.where(has, ny - 1 - lung[:, ::-1, :].argmax(axis=1), -1)[:, None, :]
    reach = max(2, int(round(reach_mm / an.spacing[1])))
    near = tissue & (yy > last) & (yy <= last + reach)
    has = has & near.any(axis=1)
    start = np.where(has, near.argmax(axis=1), ny)
    stop = (yy > start[:, None, :]) & ~tissue
    first_stop = np.where(stop.any(axis=1), stop.argmax(axis=1), ny)
    run = np.where(has, np.clip(first_stop - start, 0, None), 0)
    return start, run


def _paint_runs(shape, start, run, ok) -> np.ndarray:
    m = np.zeros(shape, bool)
    zz, xx = np.nonzero(ok)
    for z, x in zip(zz, xx):
        m[z, start[z, x]:start[z, x] + run[z, x], x] = True
    return m


def pleural_fluid(an: Anatomy, lesion_mask: np.ndarray, bone: np.ndarray) -> tuple[dict, np.ndarray]:
    """Dependent fluid: in each (z, x) column, the run of fluid-density voxels (heavy smoothing,
    -60 .. 28 HU) straight behind the posterior-most aerated lung voxel."""
    sy = an.spacing[1]
    res, mask = {}, np.zeros(an.a.shape, bool)
    fluid_hu = (an.s2 > FLUID_RANGE[0]) & (an.s2 < FLUID_RANGE[1]) & an.body & ~bone & ~lesion_mask
    for side in ("right", "left"):
        start, run = _posterior_runs(an, side, fluid_hu)
        run_mm = run * sy
        col_ok = run_mm >= 6.0
        mask |= _paint_runs(an.a.shape, start, run, col_ok)
        depth = float(np.percentile(run_mm[col_ok], 90)) if col_ok.sum() >= 3 else 0.0
        res[side] = (int((run * col_ok).sum()) * an.voxel_ml, depth, int(col_ok.sum()))
    return res, mask


# ---------------------------------------------------------------------------------------------
# heart, mediastinum, vessels
# ---------------------------------------------------------------------------------------------

@dataclass
class Heart:
    ctr: float | None = None
    heart_mm: float = 0.0
    thorax_mm: float = 0.0
    z: int | None = None  # slice of the widest cardiac silhouette
    row: int | None = None
    cols: tuple[int, int] | None = None  # medial lung borders (right lung, left lung) on that row
    zone_z: tuple[int, int] | None = None  # slices where the silhouette is near its widest
    centre_y: float | None = None
    pericardial_mm: float = 0.0
    pericardial_hu: float | None = None
    blood_hu: float | None = None


def heart_and_ctr(an: Anatomy) -> Heart:
    sz, sy, sx = an.spacing
    R, L = an.space["right"], an.space["left"]
    nz, ny, nx = R.shape
    xs = np.arange(nx)
    r_has, l_has = R.any(axis=2), L.any(axis=2)  # [z, y]
    r_med = np.where(r_has, nx - 1 - R[:, :, ::-1].argmax(axis=2), -1)  # right lung's medial border
    l_med = np.where(l_has, L.argmax(axis=2), -1)
    both = r_has & l_has & (l_med > r_med)
    gap = np.where(both, l_med - r_med - 1, 0) * sx
    # the heart lies in the lower half of the lungs' height (above it: hila, great vessels)
    lo, hi = an.lung_z
    ztop = int((lo + 0.5 * (hi - lo)) / sz)
    gap[ztop:] = 0
    # the heart sits in the anterior mediastinum and bulges the lungs outwards: keep rows in front of
    # the body centre and away from the rows where the lungs taper to their anterior / posterior tips
    # (there the gap between the lungs grows towards the tip and is not the heart)
    m = max(1, int(round(12.0 / sy)))
    rows = np.arange(ny)[None, :]
    first = np.where(both.any(axis=1), both.argmax(axis=1), ny)[:, None]
    last = np.where(both.any(axis=1), ny - 1 - both[:, ::-1].argmax(axis=1), -1)[:, None]
    ok = (rows >= first + m) & (rows <= last - m) & (rows <= an.center_y + 25.0 / sy)
    gap = np.where(ok, gap, 0)
    h = Heart()
    if gap.max() <= 0:
        return h
    per_z = gap.max(axis=1)
    z = int(per_z.argmax())
    row = int(gap[z].argmax())
    h.heart_mm = float(per_z[z])
    h.z, h.row, h.cols = z, row, (int(r_med[z, row]), int(l_med[z, row]))
    # thorax: widest span of the two lungs (outer borders) on any slice
    r_out = np.where(R.any(axis=1), R.argmax(axis=1), nx).min(axis=1)  # per z
    l_out = np.where(L.any(axis=1), nx - 1 - L[:, :, ::-1].argmax(axis=1), -1).max(axis=1)
    span = np.where((r_out < nx) & (l_out >= 0), l_out - r_out + 1, 0) * sx
    h.thorax_mm = float(span.max())
    if h.thorax_mm > 0:
        h.ctr = h.heart_mm / h.thorax_mm
    zone = np.nonzero(per_z >= 0.85 * h.heart_mm)[0]
    h.zone_z = (int(zone.min()), int(zone.max()))
    rows = np.nonzero(gap[z] >= 0.85 * h.heart_mm)[0]
    h.centre_y = float(rows.mean())
    # blood pool attenuation: the bright end (80th percentile) of the cardiac silhouette between the
    # lungs over its widest slices and rows (enhanced blood ~250-300 HU, unenhanced ~40 HU)
    vals = []
    for zz in range(h.zone_z[0], h.zone_z[1] + 1):
        for yy in np.nonzero(gap[zz] >= 0.85 * h.heart_mm)[0]:
            a0, a1 = int(r_med[zz, yy]), int(l_med[zz, yy])
            vals.append(an.s2[zz, yy, a0 + 1:a1])
    h.blood_hu = float(np.percentile(np.concatenate(vals), 80)) if vals else None
    # pericardial fluid: inward from each lung border over the widest rows, after the partial-volume
    # step (first voxel above -200 HU), the attenuation 3-9 mm deeper: myocardium (~45 HU) normally,
    # fluid (~10-20 HU) when a pericardial effusion separates heart and lung
    runs, bands = [], []
    kmax = max(4, int(round(35.0 / sx)))
    reach = max(2, int(round(9.0 / sx)))
    d0, d1 = max(1, int(round(3.0 / sx))), max(1, int(round(9.0 / sx)))
    for zz in range(h.zone_z[0], h.zone_z[1] + 1):
        for yy in np.nonzero(gap[zz] >= 0.85 * h.heart_mm)[0]:
            a0, a1 = int(r_med[zz, yy]), int(l_med[zz, yy])
            for prof in (an.s1[zz, yy, a0 + 1:a0 + 1 + kmax], an.s1[zz, yy, max(a1 - kmax, 0):a1][::-1]):
                if len(prof) < reach + d1 + 1:
                    continue
                up = prof[:reach] > -200.0
                if not up.any():
                    continue
                c = int(up.argmax())
                bands.append(float(prof[c + d0:c + d1 + 1].mean()))
                fl = prof[c:] < FLUID_RANGE[1]
                runs.append((int(fl.argmin()) if not fl.all() else len(fl)) * sx)
    if bands:
        h.pericardial_mm = float(np.median(runs))
        h.pericardial_hu = float(np.median(bands))
    return h


def contrast_phase(an: Anatomy, heart: Heart, ctx_contrast: Any) -> tuple[bool, str]:
    blood = heart.blood_hu
    if blood is not None and blood > CONTRAST_HU:
        return True, f"enhanced blood pool {blood:.0f} HU"
    why = f"blood pool {blood:.0f} HU" if blood is not None else "blood pool not found"
    if ctx_contrast is True:
        return False, why + "; acquisition says contrast was given but the blood pool is not enhanced"
    return False, why


def pulmonary_emboli(an: Anatomy, bone: np.ndarray) -> dict:
    """Filling defects: non-enhanced soft tissue continuing an enhanced pulmonary artery into the
    hilum (hilar slab below the carina), by side."""
    sz, sy, sx = an.spacing
    res = {"right": 0.0, "left": 0.0}
    if an.carina_z is None:
        return res
    z0 = max(0, an.carina_z - int(round(45.0 / sz)))
    z1 = min(an.a.shape[0], an.carina_z + 1)
    sl = slice(z0, z1)
    s1 = an.s1[sl]
    enh = (s1 > 170.0) & ~bone[sl] & an.body[sl]
    soft = (s1 > -60.0) & (s1 < 140.0) & ~bone[sl] & an.body[sl]
    near_enh = ndi.binary_dilation(enh, iterations=2)
    for side in ("right", "left"):
        # hilar territory: within the lung's convex hull, outside aerated lung
        hull = hull_2d(an.lung[side][sl])
        zone = hull & ~an.lung[side][sl]
        cand = soft & zone & near_enh
        cand = ndi.binary_opening(cand, structure=_CROSS2)
        lab, n = ndi.label(cand)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        sizes = np.bincount(lab.ravel())[1:] * an.voxel_ml
        coms = ndi.center_of_mass(cand, lab, idx)
        # the lobar pulmonary arteries run laterally behind the trunk at the hilum; soft tissue in
        # front (around the trunk, the top of the heart) is myocardium or mediastinum, not thrombus
        keep = [sizes[i] for i, (zc, yc, xc) in enumerate(coms)
                if -10.0 <= an.y_mm(yc) <= 15.0 and abs(an.x_mm(xc)) >= 22.0]
        res[side] = float(sum(keep))
    return res


def calcifications(an: Anatomy, bone: np.ndarray, metal: np.ndarray, heart: Heart, contrast: bool = False) -> dict:
    """Small dense foci outside bone and lungs, in the mediastinum: > 350 HU and > 250 HU above their
    smoothed surroundings (thick slices average a thin plaque with its neighbours: 250 / 170 HU there).
    A focus counts with >= 2 voxels or a peak >= 450 HU (single noisy voxels in an enhanced blood
    pool do not). On the heart's anterior / lateral surface -> coronary; elsewhere (ascending aorta
    just right of the midline, arch above the heart, descending aorta beside the spine) -> aortic."""
    sz, sy, sx = an.spacing
    thick = sz >= 4.0
    lo_hu, excess = (250.0, 170.0) if thick else (CALC_HU, 250.0)
    if contrast and heart.blood_hu is not None:  # plaque must stand out from enhanced blood too
        lo_hu = max(lo_hu, heart.blood_hu + 180.0)
    lungs = an.space["right"] | an.space["left"]
    inner = an.body & ~lungs
    near_metal = ndi.binary_dilation(metal, iterations=max(1, int(round(35.0 / sx)))) if metal.any() else metal
    excl = ndi.binary_dilation(bone, structure=_SQUARE2, iterations=1) | near_metal
    cand = (an.a > lo_hu) & (an.a - an.s2 > excess) & inner & ~excl
    cand &= hull_2d(an.lung["right"] | an.lung["left"])  # the mediastinum, not the chest wall
    lab, n = ndi.label(cand)
    out: dict = {"coronary": [], "aortic": []}
    if n == 0:
        return out
    idx = np.arange(1, n + 1)
    counts = np.bincount(lab.ravel())[1:]
    peaks = ndi.maximum(an.a, lab, idx)
    coms = ndi.center_of_mass(cand, lab, idx)
    top = (heart.zone_z[1] + int(round(30.0 / sz))) if heart.zone_z is not None else -1
    for i, (zc, yc, xc) in enumerate(coms):
        vol = counts[i] * an.voxel_ml * 1000.0  # mm^3
        if vol > 400.0 or not (counts[i] >= 2 or peaks[i] >= 450.0):
            continue
        dx, dy = an.x_mm(xc), an.y_mm(yc)
        ascending = -24.0 < dx < 4.0 and -40.0 < dy < 0.0
        coronary = heart.zone_z is not None and heart.zone_z[0] - 2 <= zc <= top and dy < -15.0 and not ascending
        out["coronary" if coronary else "aortic"].append((vol, (int(round(zc)), int(round(yc)), int(round(xc)))))
    return out


def metal_hardware(an: Anatomy) -> tuple[np.ndarray, dict]:
    m = an.a > METAL_HU
    n = int(m.sum())
    if n == 0:
        return m, {}
    zz, yy, xx = np.nonzero(m)
    lo, hi = an.lung_z
    f = ((zz.mean() + 0.5) * an.spacing[0] - lo) / max(hi - lo, 1.0)
    level = "upper" if f > 0.6 else "lower" if f < 0.3 else "mid"
    dx = an.x_mm(xx.mean())
    side = "midline" if abs(dx) < 25 else ("left" if dx > 0 else "right")
    dy = an.y_mm(yy.mean())
    ap = "posterior" if dy > 40 else "anterior" if dy < -40 else "central"
    return m, {"volume_ml": n * an.voxel_ml, "where": f"{level} chest, {side}, {ap}", "voxels": n}


# ---------------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------------

def _lesion_text(l: Lesion) -> str:
    s = f"{l.diameter_mm:.0f} mm {l.location} ({l.volume_ml:.1f} mL, mean {l.mean_hu:.0f} HU"
    if l.kind == "cavitation":
        s += f", cavity {l.cavity_mm:.0f} mm, wall ~{max(l.diameter_mm - l.cavity_mm, 0) / 2:.0f} mm"
    elif l.air_fraction >= 0.005:
        s += f", air bronchograms {100 * l.air_fraction:.1f}%"
    return s + ")"


def _lobes(ls: list[Lesion]) -> str:
    seen = []
    for l in sorted(ls, key=lambda l: -l.volume_ml):
        if l.location not in seen:
            seen.append(l.location)
    return ", ".join(seen[:3])


def _roi_on_slice(z: int, lesions: list[Lesion], fluid: np.ndarray, ptx: np.ndarray) -> list[float] | None:
    """[x0, y0, x1, y1] on axial slice z: the largest lesion cut there, else the drawn fluid or air."""
    best, box = 0, None
    for l in lesions:
        zz = z - l.bbox[0].start
        if 0 <= zz < l.mask.shape[0] and l.mask[zz].sum() > best:
            ys, xs = np.nonzero(l.mask[zz])
            best = int(l.mask[zz].sum())
            y0, x0 = l.bbox[1].start, l.bbox[2].start
            box = [float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1), float(y0 + ys.max() + 1)]
    if box is None and (fluid[z].any() or ptx[z].any()):
        ys, xs = np.nonzero(fluid[z] | ptx[z])
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    return box


@register
class CTAnalysis(Tool):
    name = "ct_analysis"
    description = ("Classical chest CT analysis (HU thresholds, morphology, connected components): lung "
                   "segmentation and volumes; nodules/masses with size, volume, HU and lobe; consolidation, "
                   "cavitation, ground-glass opacity, emphysema (LAA-950), pleural effusion, pneumothorax; "
                   "cardiothoracic ratio, pericardial fluid; filling defects when contrast-enhanced; vascular "
                   "calcification; metal hardware. Reports pertinent negatives.")
    modalities = frozenset({Modality.CT})
    Params = CTParams
    model_name = "classical CT analysis (HU thresholds, connected components)"
    version = "1"

    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        p: CTParams = params  # type: ignore[assignment]
        a, spacing, notes = validated_volume(study)
        thick, shape0 = spacing[0], a.shape
        a, spacing = _working_grid(a, spacing)
        if a.shape != shape0:
            notes.append(f"resampled to {spacing[0]:.1f} x {spacing[1]:.1f} x {spacing[2]:.1f} mm for analysis")
        an = segment(a, spacing)
        an.notes += notes
        metal, metal_info = metal_hardware(an)
        bone = bone_mask(an)
        lesions = find_lesions(an, p, bone)
        lesion_mask = np.zeros(a.shape, bool)
        for l in lesions:
            lesion_mask[l.bbox] |= l.mask
        ptx, ptx_mask = pneumothorax(an, p)
        fluid, fluid_mask = pleural_fluid(an, lesion_mask, bone)
        ggo = ground_glass(an, lesion_mask, ptx_mask)
        emph = emphysema(an, ptx_mask, tuple(sd for sd in ("right", "left") if ptx[sd][0] >= p.pneumothorax_ml))
        heart = heart_and_ctr(an)
        acq = ctx.acquisition or {}
        contrast, contrast_why = contrast_phase(an, heart, acq.get("contrast"))
        pe = pulmonary_emboli(an, bone) if contrast else None
        calc = calcifications(an, bone, metal, heart, contrast)

        F: list[Finding] = []
        vr, vl = (float(an.lung[s].sum()) * an.voxel_ml for s in ("right", "left"))
        sr, sl_ = (float(an.space[s].sum()) * an.voxel_ml for s in ("right", "left"))
        F.append(Finding(label="lung_volume", value=round(vr + vl), unit="mL",
                         detail=f"aerated lung right {vr:.0f} mL, left {vl:.0f} mL; lung space (with lesions) "
                                f"right {sr:.0f} mL, left {sl_:.0f} mL"))
        # focal lesions and consolidation
        by = {k: [l for l in lesions if l.kind == k] for k in
              ("lung_nodule", "lung_mass", "cavitation", "consolidation", "lymphadenopathy")}
        for key in ("lung_nodule", "lung_mass", "cavitation"):
            ls = sorted(by[key], key=lambda l: -l.diameter_mm)
            if ls:
                top = ls[0]
                det = f"{len(ls)} found: " + "; ".join(_lesion_text(l) for l in ls[:4])
                F.append(Finding(label=key, value=top.diameter_mm, unit="mm", location=top.location, detail=det))
            else:
                F.append(Finding(label=key, present=False,
                                 detail=f"no {'cavitating lesion' if key == 'cavitation' else key.replace('_', ' ')} "
                                        f"with a solid core >= {p.min_lesion_mm:.0f} mm"))
        cons = by["consolidation"]
        if cons:
            vol = sum(l.volume_ml for l in cons)
            biggest = sorted(cons, key=lambda l: -l.volume_ml)[:3]
            det = f"{len(cons)} region(s), {vol:.0f} mL: " + "; ".join(_lesion_text(l) for l in biggest)
            F.append(Finding(label="consolidation", value=round(vol, 1), unit="mL", location=_lobes(cons), detail=det))
        else:
            F.append(Finding(label="consolidation", present=False, detail="no airspace consolidation >= 30 mm"))
        # hilar nodes: round soft tissue beside the hilar vessels. A collapsed lung (pneumothorax) bares
        # the hilum, so none are called on that side. Mediastinal nodes cannot be told from the other
        # mediastinal soft tissue without contrast, so a miss is no evidence: absence is not reported.
        nodes = [l for l in by["lymphadenopathy"] if ptx[l.side][0] < p.pneumothorax_ml]
        if nodes:
            top = max(nodes, key=lambda l: l.eq_diameter_mm)
            F.append(Finding(label="lymphadenopathy", value=top.eq_diameter_mm, unit="mm",
                             location=f"{top.side} hilar",
                             detail=f"{len(nodes)} round soft-tissue mass(es) at the hilum: "
                                    + "; ".join(_lesion_text(l) for l in nodes[:3])))
        # diffuse lung
        g_sides = [s for s in ("right", "left") if ggo[s][1] > 0 and ggo[s][0] / ggo[s][1] >= p.ggo_fraction]
        g_vol = ggo["right"][0] + ggo["left"][0]
        g_frac = g_vol / max(ggo["right"][1] + ggo["left"][1], 1e-6)
        F.append(Finding(label="ground_glass_opacity", present=bool(g_sides), value=round(g_vol, 1), unit="mL",
                         location=_side_words(g_sides, "{side} lung", "both lungs") or None,
                         detail=f"{100 * g_frac:.1f}% of the lung between -700 and -300 HU "
                                f"(right {ggo['right'][0]:.0f} mL, left {ggo['left'][0]:.0f} mL)"))
        up = emph["upper"] > 1.3 * emph["lower"]
        # diffuse (>= threshold) or upper-lobe predominant (centrilobular pattern; mosaic attenuation and
        # air trapping lower the whole lung more evenly)
        emph_on = emph["laa"] >= p.laa_emphysema_pct or (
            emph["upper"] >= 0.4 * p.laa_emphysema_pct and emph["upper"] >= 2.5 * emph["lower"])
        which = "lung" if len(emph["sides"]) == 2 else emph["sides"][0] + " lung (the other has a pneumothorax)"
        emph_detail = (f"low-attenuation area below -950 HU: {emph['laa']:.1f}% of aerated {which} (upper "
                       f"{emph['upper']:.1f}%, lower {emph['lower']:.1f}%); 15th percentile {emph['p15']:.0f} HU"
                       if emph["p15"] is not None else "no aerated lung")
        F.append(Finding(label="emphysema", present=emph_on, value=round(emph["laa"], 2),
                         unit="% LAA-950", location=("upper lobes" if up else "both lungs") if emph_on else None,
                         detail=emph_detail))
        e_sides = [s for s in ("right", "left") if fluid[s][0] >= p.effusion_ml and fluid[s][1] >= p.effusion_depth_mm]
        e_vol = sum(fluid[s][0] for s in e_sides)
        F.append(Finding(label="pleural_effusion", present=bool(e_sides),
                         value=round(e_vol, 1), unit="mL",
                         location=_side_words(e_sides, "{side} pleural space", "bilateral pleural spaces") or None,
                         detail=f"dependent fluid-density layer behind the lung: right {fluid['right'][0]:.0f} mL "
                                f"(depth {fluid['right'][1]:.0f} mm), left {fluid['left'][0]:.0f} mL (depth "
                                f"{fluid['left'][1]:.0f} mm); present at >= {p.effusion_ml:.0f} mL and "
                                f"{p.effusion_depth_mm:.0f} mm depth"))
        p_sides = [s for s in ("right", "left") if ptx[s][0] >= p.pneumothorax_ml]
        F.append(Finding(label="pneumothorax", present=bool(p_sides),
                         value=round(sum(ptx[s][0] for s in p_sides), 1) if p_sides else 0.0, unit="mL",
                         location=_side_words(p_sides, "{side} hemithorax", "both hemithoraces") or None,
                         detail=f"air without lung markings along the lung surface: right {ptx['right'][0]:.0f} mL "
                                f"(depth {ptx['right'][1]:.0f} mm), left {ptx['left'][0]:.0f} mL (depth "
                                f"{ptx['left'][1]:.0f} mm)"))
        # heart
        # a pericardial effusion: fluid (< 18 HU; myocardium reads 35-45, or more with contrast) 3-9 mm
        # inside both cardiac borders, at least 6 mm thick
        peri = heart.pericardial_hu is not None and heart.pericardial_hu < 18.0 and heart.pericardial_mm >= 6.0
        if heart.ctr is not None:
            heart_mm = heart.heart_mm - (2 * heart.pericardial_mm if peri else 0.0)
            ctr = heart_mm / heart.thorax_mm
            F.append(Finding(label="cardiomegaly", present=ctr > p.ctr_upper, value=round(ctr, 3), unit="ratio",
                             location="heart" if ctr > p.ctr_upper else None,
                             detail=f"cardiothoracic ratio on axial CT: heart {heart_mm:.0f} mm / widest lung span "
                                    f"{heart.thorax_mm:.0f} mm; upper normal {p.ctr_upper:.2f}"
                                    + (f"; the cardiac silhouette with the pericardial fluid is {heart.heart_mm:.0f} mm "
                                       f"(ratio {heart.ctr:.2f})" if peri else "")))
            F.append(Finding(label="pericardial_effusion", present=peri, value=round(heart.pericardial_mm, 1), unit="mm",
                             location="pericardium" if peri else None,
                             detail=f"attenuation 3-9 mm inside the cardiac borders {heart.pericardial_hu:.0f} HU (fluid "
                                    f"< 18 HU), low-attenuation rim {heart.pericardial_mm:.0f} mm" if heart.pericardial_hu
                                    is not None else "not measured"))
        else:
            F.append(Finding(label="cardiothoracic_ratio", present=False,
                             detail="not measurable: lungs not both segmented"))
        F.append(Finding(label="contrast_enhancement", present=contrast, value=heart.blood_hu and round(heart.blood_hu),
                         unit="HU", detail=contrast_why))
        if pe is not None:
            pe_sides = [s for s in ("right", "left") if pe[s] >= 0.3]
            F.append(Finding(label="pulmonary_embolus", present=bool(pe_sides),
                             value=round(sum(pe[s] for s in pe_sides), 2) if pe_sides else 0.0, unit="mL",
                             location={"right": "right", "left": "left"}.get(pe_sides[0]) if len(pe_sides) == 1
                             else ("right and left" if pe_sides else None),
                             detail=f"non-enhancing filling defect in the hilar pulmonary arteries: right "
                                    f"{pe['right']:.2f} mL, left {pe['left']:.2f} mL"))
        for key, k in (("coronary_artery_calcification", "coronary"), ("arterial_wall_calcification", "aortic")):
            foci = calc[k]
            F.append(Finding(label=key, present=len(foci) >= 2, value=float(len(foci)), unit="foci",
                             location=("coronary arteries" if k == "coronary" else "thoracic aorta") if foci else None,
                             detail=f"{len(foci)} calcified focus/foci, {sum(f[0] for f in foci):.0f} mm3 (present "
                                    "at >= 2)" + ("; foci within 35 mm of metal ignored" if metal_info else "")))
        if metal_info:
            F.append(Finding(label="medical_material", value=round(metal_info["volume_ml"], 2), unit="mL",
                             location=metal_info["where"],
                             detail=f"{metal_info['voxels']} voxels > {METAL_HU:.0f} HU; streak artefacts from metal lower "
                                    "the reliability of nearby measurements"))
        else:
            F.append(Finding(label="medical_material", present=False, detail=f"no voxels > {METAL_HU:.0f} HU"))
        quality = list(an.notes)
        if thick >= 4.5:
            quality.append(f"thick slices ({thick:g} mm): small nodules and thin layers are partial-volumed")
        if metal_info:
            quality.append("metal streak artefacts")
        if quality:
            F.append(Finding(label="image_quality", present=True, detail="; ".join(quality)))

        artefacts = []
        if p.write_overlay and ctx.artefact_dir is not None:
            cols = np.arange(a.shape[2])[None, None, :]
            fluid_draw = np.zeros_like(fluid_mask)
            for sd in e_sides:  # outline only the effusions called present
                fluid_draw |= fluid_mask & ((cols < an.midline_x) if sd == "right" else (cols >= an.midline_x))
            artefacts.append(self._overlay(an, lesions, fluid_draw, ptx_mask, metal, heart, F, ctx))
        return F, artefacts

    def _overlay(self, an: Anatomy, lesions: list[Lesion], fluid_mask: np.ndarray, ptx_mask: np.ndarray,
                 metal: np.ndarray, heart: Heart, findings: list[Finding], ctx: RunContext) -> Artefact:
        from PIL import Image, ImageDraw

        # a representative slice: the biggest lesion, else the most fluid/air, else the heart
        if lesions:
            z = int(round(max(lesions, key=lambda l: l.volume_ml).centre[0]))
        elif fluid_mask.any() or ptx_mask.any():
            z = int((fluid_mask | ptx_mask).sum(axis=(1, 2)).argmax())
        elif heart.z is not None:
            z = heart.z
        else:
            z = an.a.shape[0] // 2
        sl = an.a[z]
        g = (np.clip((sl + 1000.0) / 1400.0, 0, 1) * 255).astype(np.uint8)  # -1000 .. 400 HU
        rgb = np.repeat(g[..., None], 3, -1)

        def edge(m):
            return m & ~ndi.binary_erosion(m)

        rgb[edge(an.space["right"][z])] = (0, 200, 80)
        rgb[edge(an.space["left"][z])] = (0, 150, 255)
        if fluid_mask[z].any():
            rgb[edge(fluid_mask[z])] = (0, 230, 230)
        if ptx_mask[z].any():
            rgb[edge(ptx_mask[z])] = (255, 230, 0)
        for l in lesions:
            zz = z - l.bbox[0].start
            if 0 <= zz < l.mask.shape[0] and l.mask[zz].any():
                m = np.zeros(sl.shape, bool)
                m[l.bbox[1], l.bbox[2]] = l.mask[zz]
                rgb[edge(m)] = (255, 40, 40)
        rgb[metal[z]] = (255, 0, 255)
        roi = _roi_on_slice(z, lesions, fluid_mask, ptx_mask)
        # display with square pixels, 3x
        sy, sx = an.spacing[1], an.spacing[2]
        h, w = sl.shape
        scale = 3.0
        im = Image.fromarray(rgb).resize((int(w * scale * sx / min(sy, sx)), int(h * scale * sy / min(sy, sx))),
                                         Image.NEAREST)
        d = ImageDraw.Draw(im)
        pos = [f.label.replace("_", " ") + (f" {f.value:.3g}{f.unit or ''}" if f.value is not None else "")
               for f in findings if f.present and f.label not in ("lung_volume", "image_quality", "contrast_enhancement")]
        d.text((6, 6), f"slice {z} / {an.a.shape[0]}\n" + "\n".join(pos[:10]), fill=(255, 255, 0))
        d.text((6, im.size[1] - 16), "R", fill=(255, 255, 255))
        out_dir = Path(ctx.artefact_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rel = f"{ctx.study_id}_ct_overlay.png".replace("/", "_")
        im.save(out_dir / rel)
        if roi is not None:  # slice pixels -> display pixels
            fx, fy = im.size[0] / w, im.size[1] / h
            roi = [roi[0] * fx, roi[1] * fy, roi[2] * fx, roi[3] * fy]
        return Artefact(id=f"{self.name}:{ctx.study_id}:overlay", kind="png", path=rel, roi=roi,
                        description=f"axial slice {z}: lung space (green right, blue left), lesions (red), pleural "
                                    "fluid (cyan), pneumothorax (yellow), metal (magenta); positive findings listed")
