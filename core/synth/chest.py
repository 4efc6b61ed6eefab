"""Procedural chest CT phantom with planted, measurable findings.

Anatomy is drawn in millimetres (so any shape/spacing gives the same patient) in the LPS frame of
core/imaging/types.py: array [z, y, x], x to the patient's left, y posterior, z superior, slice 0
inferior. Every planted finding gets its own label in `lesions` and a record (location words,
size, volume, mean HU, voxel bbox) that reports, truth and tool evals read. HU values follow the
usual clinical ranges (air -1000, lung -850, fat -100, fluid 0-20, soft tissue 40, contrast-
enhanced blood ~280, cortical bone ~700+, metal > 3000).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

ORGAN_LABELS: dict[str, int] = {
    "body": 1, "lung_right": 2, "lung_left": 3, "heart": 4, "aorta": 5, "pulmonary_artery": 6,
    "spine": 7, "ribs": 8, "trachea": 9, "liver": 10, "sternum": 11, "esophagus": 12,
}
FINDING_KEYS = (
    "lung_nodule", "lung_mass", "consolidation", "ground_glass_opacity", "pleural_effusion", "pneumothorax",
    "pericardial_effusion", "emphysema", "pulmonary_embolus", "cardiomegaly", "lymphadenopathy", "atelectasis",
    "arterial_wall_calcification", "coronary_artery_calcification", "hiatal_hernia", "bronchiectasis",
    "interlobular_septal_thickening", "peribronchial_thickening", "mosaic_attenuation",
    "pulmonary_fibrotic_sequela", "cavitation",
)
METAL_KINDS = ("spinal_hardware", "pacemaker", "port", "sternal_wires")
METAL_HU = 3071.0  # top of the 12-bit CT range; the acquisition replaces these voxels with titanium
# Planting order: diffuse patterns first so focal lesions drawn later stay whole.
_ORDER = {k: i for i, k in enumerate((
    "emphysema", "mosaic_attenuation", "interlobular_septal_thickening", "pulmonary_fibrotic_sequela",
    "ground_glass_opacity", "bronchiectasis", "peribronchial_thickening", "cardiomegaly", "pericardial_effusion",
    "pleural_effusion", "pneumothorax", "atelectasis", "consolidation", "lung_mass", "cavitation", "lung_nodule",
    "lymphadenopathy", "pulmonary_embolus", "hiatal_hernia", "arterial_wall_calcification",
    "coronary_artery_calcification"))}


@dataclass(frozen=True)
class PlantedFinding:
    key: str
    side: str = "bilateral"  # right | left | bilateral
    size_mm: float | None = None  # focal lesions: diameter; None = drawn from severity
    severity: float = 0.5  # 0..1, scales extent


@dataclass
class ChestPhantom:
    hu: np.ndarray  # float32 [z, y, x]
    spacing: tuple[float, float, float]
    organs: np.ndarray  # uint8 labels, ORGAN_LABELS
    lesions: np.ndarray  # uint8, one label per planted finding (see findings[i]["mask_label"])
    findings: list[dict] = field(default_factory=list)
    metal: np.ndarray | None = None  # bool, voxels of metal hardware
    metal_kind: str | None = None
    contrast: bool = False


class _Grid:
    """Voxel-centre coordinates in mm, centred in x/y; z from the inferior edge."""

    def __init__(self, shape, spacing):
        self.shape, self.spacing = tuple(shape), tuple(float(s) for s in spacing)
        nz, ny, nx = self.shape
        sz, sy, sx = self.spacing
        self.z = ((np.arange(nz) + 0.5) * sz)[:, None, None]
        self.y = ((np.arange(ny) + 0.5) * sy - ny * sy / 2)[None, :, None]
        self.x = ((np.arange(nx) + 0.5) * sx - nx * sx / 2)[None, None, :]
        self.voxel_ml = sz * sy * sx / 1000.0

    def ellipsoid(self, c, r):
        """c = (x, y, z) mm, r = (rx, ry, rz) mm."""
        return (((self.x - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2 + ((self.z - c[2]) / r[2]) ** 2) <= 1.0

    def tube(self, p0, p1, radius):
        """Solid cylinder between points p0, p1 (x, y, z mm)."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        d = p1 - p0
        L2 = float(d @ d)
        t = ((self.x - p0[0]) * d[0] + (self.y - p0[1]) * d[1] + (self.z - p0[2]) * d[2]) / L2
        t = np.clip(t, 0.0, 1.0)
        dist2 = (self.x - p0[0] - t * d[0]) ** 2 + (self.y - p0[1] - t * d[1]) ** 2 + (self.z - p0[2] - t * d[2]) ** 2
        return dist2 <= radius ** 2

    def smooth_noise(self, rng, sigma_mm):
        n = rng.standard_normal(self.shape).astype(np.float32)
        sig = [max(sigma_mm / s, 0.5) for s in self.spacing]
        n = ndimage.gaussian_filter(n, sig)
        return n / (n.std() + 1e-6)


def _side_sign(side: str) -> float:
    return -1.0 if side == "right" else 1.0  # x grows to the patient's left


def _lobe(side: str, z: float, y: float, lung_z: tuple[float, float]) -> str:
    lo, hi = lung_z
    f = (z - lo) / max(hi - lo, 1.0)
    if f > 0.55:
        lobe = "upper lobe"
    elif f < 0.35 or y > 40:
        lobe = "lower lobe"
    else:
        lobe = "middle lobe" if side == "right" else "lingula"
    return "lingula" if lobe == "lingula" else f"{side} {lobe}"


def make_chest_phantom(rng: np.random.Generator, findings: list[PlantedFinding] | tuple = (), *,
                       shape: tuple[int, int, int] = (80, 112, 112),
                       spacing: tuple[float, float, float] = (3.0, 3.2, 3.2),
                       contrast: bool = False, metal: str | None = None, sex: str = "M", age: int = 55,
                       ) -> ChestPhantom:
    """A chest CT (HU) with organ labels and the requested findings planted and measured."""
    for f in findings:
        if f.key not in FINDING_KEYS:
            raise ValueError(f"unknown finding key {f.key!r}; expected one of {FINDING_KEYS}")
    if metal is not None and metal not in METAL_KINDS:
        raise ValueError(f"unknown metal kind {metal!r}; expected one of {METAL_KINDS}")
    g = _Grid(shape, spacing)
    height = shape[0] * spacing[0]
    zs = height / 240.0  # anatomy is laid out for a 240 mm tall field
    scale = (0.92 if sex == "F" else 1.0) * float(rng.uniform(0.95, 1.05))
    keys = {f.key for f in findings}
    blood = 280.0 if contrast else 40.0

    hu = np.full(shape, -1000.0, np.float32)
    organs = np.zeros(shape, np.uint8)
    lesions = np.zeros(shape, np.uint8)

    # Body: fat shell around muscle.
    ax, ay = 160 * scale, 112 * scale
    body = ((g.x / ax) ** 2 + (g.y / ay) ** 2 <= 1.0) & np.ones(shape, bool)
    inner = ((g.x / (ax - 14)) ** 2 + (g.y / (ay - 12)) ** 2 <= 1.0) & body
    tissue_tex = 8.0 * g.smooth_noise(rng, 6.0)
    hu[body] = -100.0
    hu[inner] = 40.0
    hu += np.where(body, tissue_tex, 0.0)
    organs[body] = ORGAN_LABELS["body"]

    # Lungs: ellipsoids carved by mediastinum and spine.
    lung_z = (38 * zs, 236 * zs)
    lz_c, lz_r = (lung_z[0] + lung_z[1]) / 2, (lung_z[1] - lung_z[0]) / 2
    lung_c = {s: (_side_sign(s) * 70 * scale, 4.0, lz_c) for s in ("right", "left")}
    lung_r = (58 * scale, 84 * scale, lz_r)
    cardio = "cardiomegaly" in keys
    heart_c = (18 * scale, -22 * scale, 88 * zs)
    heart_r = np.array([58, 48, 46]) * scale * np.array([1.0, 1.0, zs])
    if cardio:
        sev = next(f.severity for f in findings if f.key == "cardiomegaly")
        heart_r = heart_r * np.array([1.25 + 0.25 * sev, 1.12, 1.1])
    heart = g.ellipsoid(heart_c, heart_r)
    mediastinum = (np.abs(g.x - 6) < 24 * scale) & (g.y < 60) & (g.z > 130 * zs)
    spine_c = (0.0, 72 * scale)
    spine = ((g.x - spine_c[0]) ** 2 + (g.y - spine_c[1]) ** 2 <= (19 * scale) ** 2) & np.ones(shape, bool)
    lungs = {}
    for s in ("right", "left"):
        m = g.ellipsoid(lung_c[s], lung_r) & inner & ~heart & ~mediastinum & ~spine
        m &= ~(((g.x - spine_c[0]) ** 2 / (34 * scale) ** 2 + (g.y - spine_c[1]) ** 2 / (30 * scale) ** 2) <= 1)
        lungs[s] = m
    lung_any = lungs["right"] | lungs["left"]
    parenchyma = -860.0 + 18.0 * g.smooth_noise(rng, 4.0)
    vessels = g.smooth_noise(rng, 3.0)
    hu[lung_any] = parenchyma[lung_any]
    vessel_mask = lung_any & (vessels > 2.1)
    hu[vessel_mask] = -150.0 + 60.0 * vessels[vessel_mask]
    organs[lungs["right"]] = ORGAN_LABELS["lung_right"]
    organs[lungs["left"]] = ORGAN_LABELS["lung_left"]

    # Liver below the right hemidiaphragm.
    liver = g.ellipsoid((-45 * scale, 0, 10 * zs), (100 * scale, 95 * scale, 55 * zs)) & inner & ~lung_any
    hu[liver] = 60.0 + (40.0 if contrast else 0.0) + tissue_tex[liver]
    organs[liver] = ORGAN_LABELS["liver"]

    # Heart: myocardium around a blood pool.
    pool = g.ellipsoid(heart_c, heart_r - 9)
    hu[heart] = 45.0
    hu[pool] = blood
    organs[heart] = ORGAN_LABELS["heart"]

    # Airways and oesophagus.
    carina = (0.0, 8 * scale, 168 * zs)
    trachea = g.tube(carina, (0.0, -4 * scale, height), 9 * scale)
    bronchi = {s: g.tube(carina, (_side_sign(s) * 42 * scale, 20 * scale, 148 * zs), 6 * scale) for s in ("right", "left")}
    airway = trachea | bronchi["right"] | bronchi["left"]
    wall = ndimage.binary_dilation(airway, iterations=1) & ~airway
    hu[wall] = 40.0
    hu[airway] = -1000.0
    organs[trachea] = ORGAN_LABELS["trachea"]
    eso = g.tube((6 * scale, 48 * scale, 0), (6 * scale, 48 * scale, height), 7 * scale) & inner
    hu[eso] = 35.0
    organs[eso] = ORGAN_LABELS["esophagus"]

    # Great vessels.
    top = 205 * zs
    asc = g.tube((-8 * scale, -18 * scale, heart_c[2]), (-8 * scale, -18 * scale, top), 15 * scale)
    arch = g.tube((-8 * scale, -18 * scale, top), (22 * scale, 45 * scale, top), 13 * scale)
    desc = g.tube((22 * scale, 45 * scale, top), (22 * scale, 45 * scale, 0), 12 * scale)
    aorta = (asc | arch | desc) & inner & ~spine & ~airway
    hu[aorta] = blood
    organs[aorta] = ORGAN_LABELS["aorta"]
    pa_top = 150 * zs
    pa_trunk = (14 * scale, -20 * scale, pa_top)
    hilum = {s: (_side_sign(s) * 52 * scale, 8 * scale, pa_top - 6 * zs) for s in ("right", "left")}
    pa = g.tube((14 * scale, -30 * scale, heart_c[2] + 20 * zs), pa_trunk, 13 * scale)
    for s in ("right", "left"):
        pa |= g.tube(pa_trunk, hilum[s], 10 * scale)
    pa &= inner & ~airway & ~aorta
    hu[pa] = blood
    organs[pa] = ORGAN_LABELS["pulmonary_artery"]

    # Skeleton: vertebrae with discs, ribs, sternum.
    disc = (np.mod(g.z, 26 * zs) < 5 * zs) & np.ones(shape, bool)
    hu[spine] = np.where(disc[spine], 90.0, 230.0)
    cortex = spine & ~(((g.x - spine_c[0]) ** 2 + (g.y - spine_c[1]) ** 2 <= (15 * scale) ** 2))
    hu[cortex & ~disc] = 750.0
    canal = ((g.x ** 2 + (g.y - (spine_c[1] + 27 * scale)) ** 2) <= (8 * scale) ** 2) & inner
    posterior_el = (((g.x ** 2) / (22 * scale) ** 2 + (g.y - (spine_c[1] + 28 * scale)) ** 2 / (14 * scale) ** 2) <= 1) & inner
    hu[posterior_el & ~canal & ~disc] = 600.0
    hu[canal] = 15.0
    organs[spine | posterior_el] = ORGAN_LABELS["spine"]
    rr = np.sqrt((g.x / (ax - 20)) ** 2 + (g.y / (ay - 18)) ** 2)
    ang = np.arctan2(g.y, g.x)  # anterior is negative y
    rib_ring = (np.abs(rr - 1.0) < 6.0 / (ay - 18)) & (np.sin(ang) > -0.55)
    rib_z = g.z + 30 * zs * (np.sin(ang) - 1) / 2  # ribs slope down from the spine to the front
    rib_levels = (np.mod(rib_z - 10 * zs, 24 * zs) < 8 * zs) & (rib_z > 25 * zs)
    ribs = rib_ring & rib_levels
    hu[ribs] = 650.0
    organs[ribs] = ORGAN_LABELS["ribs"]
    sternum = (np.abs(g.x) < 15 * scale) & (np.abs(g.y + (ay - 20)) < 6) & (g.z > 80 * zs) & (g.z < 215 * zs)
    hu[sternum] = 420.0
    organs[sternum] = ORGAN_LABELS["sternum"]

    ctx = dict(g=g, rng=rng, hu=hu, lesions=lesions, lungs=lungs, lung_any=lung_any, lung_z=lung_z, zs=zs,
               scale=scale, heart=heart, heart_c=heart_c, heart_r=heart_r, aorta=aorta, pa=pa, hilum=hilum,
               pa_trunk=pa_trunk, carina=carina, blood=blood, inner=inner, airway=airway, contrast=contrast,
               spine_c=spine_c, eso=eso)
    records = []
    for label, f in enumerate(sorted(findings, key=lambda f: _ORDER[f.key]), start=1):
        rec = _PLANTERS[f.key](ctx, f, label)
        rec.update(key=f.key, mask_label=label)
        rec.setdefault("side", f.side)
        records.append(rec)

    metal_mask = np.zeros(shape, bool)
    if metal:
        metal_mask = _metal(ctx, metal)
        hu[metal_mask] = METAL_HU

    out = []
    for rec in records:
        m = lesions == rec["mask_label"]
        n = int(m.sum())
        if n == 0:  # fully overdrawn by a later finding: keep the finding, drop the mask reference
            rec["mask_label"], rec["bbox"], rec["volume_ml"], rec["mean_hu"] = None, None, 0.0, None
        else:
            zz, yy, xx = np.nonzero(m)
            rec["bbox"] = (int(zz.min()), int(yy.min()), int(xx.min()), int(zz.max()) + 1, int(yy.max()) + 1, int(xx.max()) + 1)
            rec["volume_ml"] = round(n * g.voxel_ml, 2)
            rec["mean_hu"] = round(float(hu[m].mean()), 1)
        out.append(rec)
    return ChestPhantom(hu=np.clip(hu, -1024, METAL_HU).astype(np.float32), spacing=g.spacing, organs=organs,
                        lesions=lesions, findings=out, metal=metal_mask, metal_kind=metal, contrast=contrast)


# ------------------------------------------------------------------ planters

def _paint(ctx, mask, label, value):
    ctx["hu"][mask] = value if np.isscalar(value) else value[mask]
    ctx["lesions"][mask] = label


def _sides(f: PlantedFinding) -> tuple[str, ...]:
    return ("right", "left") if f.side == "bilateral" else (f.side if f.side in ("right", "left") else "right",)


def _point_in(ctx, region: np.ndarray, margin_mm: float):
    """A random voxel centre (x, y, z mm) at least margin_mm inside region (falls back to region)."""
    g, rng = ctx["g"], ctx["rng"]
    it = max(1, int(round(margin_mm / min(g.spacing[1:]))))
    core = ndimage.binary_erosion(region, iterations=it)
    cand = np.argwhere(core if core.any() else region)
    if len(cand) == 0:
        raise ValueError("no room to plant finding")
    z, y, x = cand[rng.integers(len(cand))]
    return float(g.x[0, 0, x]), float(g.y[0, y, 0]), float(g.z[z, 0, 0])


def _blob(ctx, c, diameter, lobulation=0.0):
    g, rng = ctx["g"], ctx["rng"]
    r = diameter / 2
    m = g.ellipsoid(c, (r, r * rng.uniform(0.85, 1.0), r * rng.uniform(0.85, 1.0)))
    for _ in range(int(lobulation * 4)):
        off = rng.normal(0, r * 0.45, 3)
        m |= g.ellipsoid(c + off, (r * 0.55,) * 3)
    return m


def _focal(ctx, f, label, lo, hi, value, lobulation=0.0):
    side = _sides(f)[0]
    d = f.size_mm or lo + (hi - lo) * f.severity
    c = np.array(_point_in(ctx, ctx["lungs"][side], d / 2 + 4))
    m = _blob(ctx, c, d, lobulation) & ctx["inner"]
    _paint(ctx, m, label, value)
    return {"side": side, "size_mm": round(float(d)), "location": _lobe(side, c[2], c[1], ctx["lung_z"])}, m, c


def _nodule(ctx, f, label):
    return _focal(ctx, f, label, 6, 26, 35.0)[0]


def _mass(ctx, f, label):
    return _focal(ctx, f, label, 32, 60, 38.0, lobulation=0.8)[0]


def _cavitation(ctx, f, label):
    rec, m, c = _focal(ctx, f, label, 26, 46, 40.0)
    lumen = ctx["g"].ellipsoid(c, (rec["size_mm"] * 0.28,) * 3) & m
    ctx["hu"][lumen] = -1000.0  # the cavity keeps the lesion label: it is part of the finding
    return rec


def _lung_region(ctx, side, zlo, zhi, post=None):
    g = ctx["g"]
    lo, hi = ctx["lung_z"]
    m = ctx["lungs"][side] & (g.z >= lo + zlo * (hi - lo)) & (g.z <= lo + zhi * (hi - lo))
    if post is not None:
        m &= g.y > post
    return m


def _consolidation(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    side = _sides(f)[0]
    upper = rng.random() < 0.35
    region = _lung_region(ctx, side, 0.55, 1.0) if upper else _lung_region(ctx, side, 0.0, 0.5)
    c = np.array(_point_in(ctx, region, 10))
    r = 22 + 30 * f.severity
    m = g.ellipsoid(c, (r, r * 1.2, r)) & region
    val = 28.0 + 10 * ctx["g"].smooth_noise(rng, 5.0)
    _paint(ctx, m, label, val)
    bronchogram = m & (g.smooth_noise(rng, 2.5) > 1.6)
    ctx["hu"][bronchogram] = -900.0
    loc = _lobe(side, c[2], c[1], ctx["lung_z"])
    return {"side": side, "location": loc, "size_mm": round(2 * r)}


def _ggo(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    patches = g.smooth_noise(rng, 12.0) > (1.3 - 0.9 * f.severity)
    m = patches & ctx["lung_any"] & (ctx["hu"] < -500)
    if f.side in ("right", "left"):
        m &= ctx["lungs"][f.side]
    _paint(ctx, m, label, -600.0 + 30 * g.smooth_noise(rng, 3.0))
    return {"location": "both lungs" if f.side == "bilateral" else f"{f.side} lung"}


def _effusion(ctx, f, label):
    g = ctx["g"]
    recs = []
    for side in _sides(f):
        lung = ctx["lungs"][side]
        ys = g.y[0, :, 0][lung.any(axis=(0, 2))]
        depth = 20 + 45 * f.severity
        m = lung & (g.y > ys.max() - depth) & (g.z < ctx["lung_z"][0] + (100 + 40 * f.severity) * ctx["zs"])
        _paint(ctx, m, label, 12.0)
        recs.append(side)
    side = recs[0] if len(recs) == 1 else "bilateral"
    return {"side": side, "location": f"{side} pleural space"}


def _pneumothorax(ctx, f, label):
    g = ctx["g"]
    side = _sides(f)[0]
    lung = ctx["lungs"][side]
    it = max(1, int(round((6 + 24 * f.severity) / g.spacing[1])))
    rim = lung & ~ndimage.binary_erosion(lung, iterations=it)
    cy = g.y[0, :, 0][lung.any(axis=(0, 2))].mean()
    m = rim & ((g.y < cy) | (g.z > ctx["lung_z"][1] - 40 * ctx["zs"]))  # non-dependent: anterior and apical
    _paint(ctx, m, label, -1000.0)
    collapsed = lung & ~m
    ctx["hu"][collapsed] += 90.0  # the deflated lung is denser
    return {"side": side, "location": f"{side} hemithorax", "size_mm": round(it * g.spacing[1])}


def _pericardial(ctx, f, label):
    g = ctx["g"]
    t = 5 + 15 * f.severity
    shell = g.ellipsoid(ctx["heart_c"], ctx["heart_r"] + t) & ~ctx["heart"] & ctx["inner"] & ~ctx["aorta"] & ~ctx["pa"]
    _paint(ctx, shell, label, 12.0)
    ctx["lungs"]["right"] &= ~shell
    ctx["lungs"]["left"] &= ~shell
    return {"location": "pericardium", "size_mm": round(t)}


def _emphysema(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    lo, hi = ctx["lung_z"]
    upper = ctx["lung_any"] & (g.z > lo + 0.45 * (hi - lo)) & (ctx["hu"] < -600)
    holes = upper & (g.smooth_noise(rng, 2.5) > (1.4 - 0.8 * f.severity))
    _paint(ctx, holes, label, -975.0 + 8 * g.smooth_noise(rng, 1.0))
    ctx["hu"][ctx["lung_any"] & ~holes & (ctx["hu"] < -600)] -= 35.0
    return {"location": "upper lobes"}


def _embolus(ctx, f, label):
    g = ctx["g"]
    recs = []
    for side in _sides(f):
        a, b = np.array(ctx["pa_trunk"]), np.array(ctx["hilum"][side])
        t0 = 0.45 + 0.25 * ctx["rng"].random()
        p0, p1 = a + (b - a) * t0, a + (b - a) * min(t0 + 0.25 + 0.2 * f.severity, 1.0)
        m = g.tube(p0, p1, 7 * ctx["scale"]) & ctx["pa"]
        _paint(ctx, m, label, 45.0)
        recs.append(side)
    side = recs[0] if len(recs) == 1 else "bilateral"
    return {"side": side, "location": {"right": "right", "left": "left"}.get(side, "right and left")}


def _cardiomegaly(ctx, f, label):
    _paint(ctx, ctx["heart"].copy(), label, ctx["hu"])  # label the enlarged heart itself; HU unchanged
    return {"location": "heart", "side": ""}


def _nodes(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    stations = [("paratracheal", (-14, -6, 185)), ("subcarinal", (0, 14, 152)),
                ("right hilar", (-48, 4, 140)), ("left hilar", (48, 4, 140))]
    n = 2 + int(round(2 * f.severity))
    picks = rng.choice(len(stations), size=min(n, len(stations)), replace=False)
    m = np.zeros(g.shape, bool)
    biggest = 0.0
    for i in picks:
        name, (x, y, z) = stations[i]
        d = float(rng.uniform(14, 18 + 14 * f.severity))
        biggest = max(biggest, d)
        m |= g.ellipsoid((x * ctx["scale"], y * ctx["scale"], z * ctx["zs"]), (d / 2, d / 2 * 0.9, d / 2 * 1.2))
    m &= ~ctx["airway"] & ~ctx["aorta"] & ctx["inner"]
    _paint(ctx, m, label, 42.0)
    where = "hilar" if all("hilar" in stations[i][0] for i in picks) else "mediastinal"
    return {"location": where, "size_mm": round(biggest)}


def _atelectasis(ctx, f, label):
    g = ctx["g"]
    side = _sides(f)[0]
    region = _lung_region(ctx, side, 0.0, 0.35)
    ys = g.y[0, :, 0][region.any(axis=(0, 2))]
    m = region & (g.y > ys.max() - (8 + 14 * f.severity))
    _paint(ctx, m, label, 5.0)
    return {"side": side, "location": f"{side} lower lobe"}


def _calc(ctx, label, wall, n, hu_val):
    g, rng = ctx["g"], ctx["rng"]
    cand = np.argwhere(wall)
    m = np.zeros(g.shape, bool)
    for z, y, x in cand[rng.choice(len(cand), size=min(n, len(cand)), replace=False)]:
        m[z, max(y - 1, 0):y + 1, max(x - 1, 0):x + 1] = True
    _paint(ctx, m, label, hu_val)


def _aortic_calc(ctx, f, label):
    wall = ctx["aorta"] & ~ndimage.binary_erosion(ctx["aorta"], iterations=1)
    _calc(ctx, label, wall, 6 + int(14 * f.severity), 650.0)
    return {"location": "thoracic aorta", "side": ""}


def _coronary_calc(ctx, f, label):
    g = ctx["g"]
    surf = ctx["heart"] & ~ndimage.binary_erosion(ctx["heart"], iterations=1)
    surf &= (g.z > ctx["heart_c"][2]) & (g.y < ctx["heart_c"][1])  # anterior-superior: the coronary course
    _calc(ctx, label, surf, 3 + int(8 * f.severity), 550.0)
    return {"location": "coronary arteries", "side": ""}


def _hernia(ctx, f, label):
    g = ctx["g"]
    r = 16 + 14 * f.severity
    c = (6 * ctx["scale"], 40 * ctx["scale"], ctx["lung_z"][0] + 12 * ctx["zs"])
    m = g.ellipsoid(c, (r, r * 0.8, r * 0.9)) & ctx["inner"] & ~ctx["aorta"]
    _paint(ctx, m, label, 20.0)
    ctx["hu"][m & (g.z > c[2] + r * 0.3)] = -1000.0  # gas cap over fluid
    return {"location": "retrocardiac", "side": "", "size_mm": round(2 * r)}


def _bronchiectasis(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    m_all = np.zeros(g.shape, bool)
    lumen_all = np.zeros(g.shape, bool)
    for side in _sides(f) if f.side != "bilateral" else ("right", "left"):
        region = _lung_region(ctx, side, 0.0, 0.55)
        for _ in range(2 + int(3 * f.severity)):
            p0 = np.array(_point_in(ctx, region, 12))
            p1 = p0 + rng.normal(0, 1, 3) * np.array([12, 12, 20])
            outer = g.tube(p0, p1, 7.0) & region
            lumen = g.tube(p0, p1, 4.5) & region
            m_all |= outer
            lumen_all |= lumen
    _paint(ctx, m_all, label, 30.0)
    ctx["hu"][lumen_all] = -1000.0
    return {"location": "lower lobes" if f.side == "bilateral" else f"{f.side} lower lobe"}


def _septal(ctx, f, label):
    g = ctx["g"]
    lung = ctx["lung_any"]
    peripheral = lung & ~ndimage.binary_erosion(lung, iterations=max(2, int(20 / g.spacing[1])))
    period = 15.0
    lines = (np.abs(np.mod(g.x, period) - period / 2) < 1.2) | (np.abs(np.mod(g.z, period) - period / 2) < 1.2)
    m = peripheral & lines & (ctx["hu"] < -500) & (g.smooth_noise(ctx["rng"], 15.0) > -0.3 - f.severity)
    _paint(ctx, m, label, -250.0)
    return {"location": "both lungs", "side": "bilateral"}


def _peribronchial(ctx, f, label):
    g = ctx["g"]
    m = np.zeros(g.shape, bool)
    for side in ("right", "left"):
        a = np.array(ctx["hilum"][side])
        for dz in (-30, -55):
            b = a + np.array([_side_sign(side) * 25, 15, dz * ctx["zs"]])
            outer, lumen = g.tube(a, b, 6.0), g.tube(a, b, 3.2)
            m |= outer & ~lumen & ctx["lung_any"]
    _paint(ctx, m, label, 20.0)
    return {"location": "lower lobes", "side": "bilateral"}


def _mosaic(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    pattern = g.smooth_noise(rng, 14.0)
    lung = ctx["lung_any"] & (ctx["hu"] < -600)
    dark = lung & (pattern > 0.5 - 0.4 * f.severity)
    _paint(ctx, dark, label, ctx["hu"] - 70.0)
    ctx["hu"][lung & ~dark] += 60.0
    return {"location": "both lungs", "side": "bilateral"}


def _fibrosis(ctx, f, label):
    g, rng = ctx["g"], ctx["rng"]
    lung = ctx["lung_any"]
    lo, hi = ctx["lung_z"]
    sub = lung & ~ndimage.binary_erosion(lung, iterations=max(2, int((10 + 20 * f.severity) / g.spacing[1])))
    sub &= g.z < lo + 0.5 * (hi - lo)
    tex = g.smooth_noise(rng, 2.0)
    _paint(ctx, sub, label, np.where(tex > 0.6, -950.0, -300.0 + 80 * tex))
    return {"location": "lung bases", "side": "bilateral"}


_PLANTERS = {
    "lung_nodule": _nodule, "lung_mass": _mass, "cavitation": _cavitation, "consolidation": _consolidation,
    "ground_glass_opacity": _ggo, "pleural_effusion": _effusion, "pneumothorax": _pneumothorax,
    "pericardial_effusion": _pericardial, "emphysema": _emphysema, "pulmonary_embolus": _embolus,
    "cardiomegaly": _cardiomegaly, "lymphadenopathy": _nodes, "atelectasis": _atelectasis,
    "arterial_wall_calcification": _aortic_calc, "coronary_artery_calcification": _coronary_calc,
    "hiatal_hernia": _hernia, "bronchiectasis": _bronchiectasis, "interlobular_septal_thickening": _septal,
    "peribronchial_thickening": _peribronchial, "mosaic_attenuation": _mosaic,
    "pulmonary_fibrotic_sequela": _fibrosis,
}
assert set(_PLANTERS) == set(FINDING_KEYS)


def _metal(ctx, kind: str) -> np.ndarray:
    g, s, zs = ctx["g"], ctx["scale"], ctx["zs"]
    sx, sy = ctx["spine_c"]
    w = max(1.6, 0.55 * max(g.spacing))  # wires stay at least one voxel thick on coarse grids
    if kind == "spinal_hardware":  # paired pedicle-screw rods beside the spinous processes
        m = g.tube((-14 * s, sy + 30 * s, 60 * zs), (-14 * s, sy + 30 * s, 200 * zs), 3.0)
        m |= g.tube((14 * s, sy + 30 * s, 60 * zs), (14 * s, sy + 30 * s, 200 * zs), 3.0)
        for z in (80, 130, 180):
            for side in (-1, 1):
                m |= g.tube((side * 14 * s, sy + 30 * s, z * zs), (side * 8 * s, sy - 5 * s, z * zs), 2.5)
    elif kind == "pacemaker":  # generator in the left pectoral pocket, lead into the right ventricle
        c = np.array([95 * s, -90 * s, 195 * zs])
        m = (np.abs(g.x - c[0]) < 20) & (np.abs(g.y - c[1]) < 4) & (np.abs(g.z - c[2]) < 22 * zs)
        m |= g.tube(c, (-8 * s, -30 * s, 170 * zs), w) | g.tube((-8 * s, -30 * s, 170 * zs), ctx["heart_c"], w)
    elif kind == "port":  # chest port in the right infraclavicular pocket
        c = np.array([-70 * s, -92 * s, 200 * zs])
        m = (((g.x - c[0]) ** 2 + (g.z - c[2]) ** 2) <= 14 ** 2) & (np.abs(g.y - c[1]) < 5)
        m |= g.tube(c, (-10 * s, -15 * s, 185 * zs), w)
    else:  # sternal wires: loops at several levels
        m = np.zeros(g.shape, bool)
        for z in np.linspace(100, 200, 5) * zs:
            m |= (np.abs(g.z - z) < w) & (np.abs(np.hypot(g.x, g.y + 90 * s) - 18) < w) & (g.y < -80 * s)
    return m & ctx["inner"] | (m & (ctx["hu"] > -200))
