"""CT metal-artefact reduction: LI and NMAR baselines, DuDoNet (Lin et al. 2019, arXiv 1907.00273).

Everything runs on one axial slice at a time on a fixed square working grid (`GRID` px over
`FOV_MM`, parallel beam `N_ANGLES` views over pi, detector covering the diagonal), using the one
physics implementation in core/physics (`Projector` forward projection, `fbp` as the
differentiable Radon inversion layer).

Baselines:
- `linear_interpolation(sino, trace)` (LI): per view, detector values inside the metal trace are
  replaced by linear interpolation between the nearest unaffected bins on either side.
- `nmar(...)` (Meyer et al. 2010, Med. Phys. 37:5482): prior image = the (smoothed) LI image
  thresholded into air / soft tissue / bone (bone keeps its values, metal becomes soft tissue);
  its forward projection normalises the sinogram, LI runs in the normalised domain, and the
  result is denormalised.

DuDoNet (`DuDoNet`): SE-Net, a small mask-pyramid U-Net on the LI sinogram with the metal trace as
an input channel at every scale, whose output replaces only the trace (residual on LI there);
RIL = `fbp` (differentiable); IE-Net, a small U-Net on [RIL image, LI image] giving a residual on
the LI image (variant "v1", the paper). The shipped checkpoint is variant "v2", our "DuDoNet with
an NMAR prior input" after DuDoNet++ (Lyu et al. 2020, arXiv 2001.00340: mask pyramid + the
metal-corrupted image as input): the SE-Net also sees the NMAR sinogram; the IE-Net (mask
pyramid) sees [RIL, LI, NMAR, uncorrected image, metal mask] and outputs per-pixel softmax weights
over those four images plus a residual, so it can keep the acquired image where artefacts are
mild (titanium) and use the sinogram-domain corrections where they are strong (steel). Losses
(`dudonet_losses`): sinogram L1 + Radon-consistency L1 (RIL image of the SE-Net output vs the
clean image) + image L1, metal pixels excluded. Images are in units of mu / mu_water (water 1,
air 0); sinograms are line integrals / `SINO_SCALE`.

The tool (`MetalArtefactReduction`, "mar", stage "restore"): per slice, metal = HU > `METAL_HU`
(connected components of at least `MIN_METAL_VOXELS` in 3-D) that also reach `LOCAL_FRAC` of the
local in-plane maximum (drops the blurred bright rim next to dense steel; `detect_metal`). Slices with metal are resampled to
the grid, their sinogram is derived by forward-projecting the HU image (mu), the trace is the
rays through the (dilated) metal mask, LI -> SE-Net -> RIL -> IE-Net, and the correction (output
minus input on the grid) is resampled back and added to the native slice; metal voxels are put
back. Slices without metal are untouched. Training data come from `make_training_pair`
(synthetic phantoms or any clean HU slice + random metal, simulated with
`simulate_ct_acquisition`); training/train_dudonet.py trains, evals/restoration_mar.py scores.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from scipy import ndimage as ndi
from torch import nn

from core.case import Modality
from core.physics.materials import MU_WATER, hu_to_mu, mu_to_hu, simulate_ct_acquisition
from core.physics.projector import ParallelBeam, Projector, fbp
from core.synth.chest import FINDING_KEYS, METAL_KINDS, PlantedFinding, make_chest_phantom
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "dudonet.pt"
GRID = 96  # working grid (px) for the networks
FOV_MM = 358.4  # square field of view of the working grid (the cohort's 128 x 2.8 mm)
N_ANGLES = 144
METAL_HU = 2500.0  # metal threshold on reconstructed HU
MIN_METAL_VOXELS = 3
LOCAL_FRAC, LOCAL_PX = 0.45, 5  # metal rim rejection in detect_metal
SINO_SCALE = 4.0  # line integrals / SINO_SCALE feed the SE-Net
FILTER = "ramp"


# ------------------------------------------------------------------ geometry

def grid_projector(grid: int = GRID, fov_mm: float = FOV_MM, n_angles: int = N_ANGLES,
                   device: str | torch.device = "cpu") -> Projector:
    """The parallel-beam projector of the working grid (n_det covers the diagonal, as
    simulate_ct_acquisition's default)."""
    ps = fov_mm / grid
    n_det = int(math.ceil(math.hypot(grid, grid))) + 2
    return Projector(ParallelBeam(int(n_angles), n_det, ps, math.pi), (grid, grid), ps, device)


def metal_trace(mask: torch.Tensor | np.ndarray, projector: Projector) -> torch.Tensor:
    """Rays through the metal: (H, W) or (B, H, W) mask -> bool sinogram (same rule as the simulation)."""
    m = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask, device=projector.device)
    return projector.forward(m.float()) > 1e-6


# ------------------------------------------------------------------ baselines

def linear_interpolation(sino, trace):
    """LI: per view (row), replace detector bins inside `trace` by linear interpolation between the
    nearest unaffected bins; trace bins beyond the last clean bin take that bin's value.
    sino, trace: (n_angles, n_det) or (B, n_angles, n_det); numpy or torch (returns the same type)."""
    is_t = torch.is_tensor(sino)
    s = sino.detach().cpu().numpy() if is_t else np.asarray(sino)
    t = trace.detach().cpu().numpy() if torch.is_tensor(trace) else np.asarray(trace)
    t = t.astype(bool)
    out = np.array(s, dtype=np.float32, copy=True, order="C")
    flat, tf = out.reshape(-1, out.shape[-1]), t.reshape(-1, t.shape[-1])
    x = np.arange(out.shape[-1])
    for r in np.flatnonzero(tf.any(1)):
        bad = tf[r]
        good = ~bad
        if not good.any():
            continue
        flat[r, bad] = np.interp(x[bad], x[good], flat[r, good])
    if is_t:
        return torch.as_tensor(out, device=sino.device, dtype=sino.dtype)
    return out


def nmar(sino, trace, projector: Projector, li_image_mu=None, *, mu_water: float = MU_WATER,
         air_hu: float = -500.0, bone_hu: float = 400.0, smooth_px: float = 0.5):
    """Normalised MAR (Meyer et al. 2010). sino: (A, D) line integrals (numpy), trace: bool (A, D).
    li_image_mu: the LI reconstruction (mu, 1/mm), computed when None. Returns the NMAR sinogram."""
    sino = np.asarray(sino, np.float32)
    if li_image_mu is None:
        li_image_mu = fbp(torch.as_tensor(linear_interpolation(sino, trace)), projector, FILTER).numpy()
    hu = mu_to_hu(ndi.gaussian_filter(np.asarray(li_image_mu, np.float64), smooth_px), mu_water)
    prior = np.zeros_like(hu)  # air
    soft = (hu >= air_hu) & (hu < bone_hu)
    prior[soft] = 0.0  # water-equivalent soft tissue
    prior[hu < air_hu] = -1000.0
    bone = hu >= bone_hu
    prior[bone] = hu[bone]
    prior_sino = projector.forward(torch.as_tensor(hu_to_mu(prior, mu_water), dtype=torch.float32)).numpy()
    ok = prior_sino > 1e-3
    norm = np.where(ok, sino / np.where(ok, prior_sino, 1.0), 1.0).astype(np.float32)
    norm_li = linear_interpolation(norm, trace)
    out = np.where(ok, norm_li * prior_sino, linear_interpolation(sino, trace))
    return np.where(trace, out, sino).astype(np.float32)


# ------------------------------------------------------------------ networks

def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))


class UNet(nn.Module):
    """A small U-Net (avg-pool down, bilinear up, skip concatenation) for any input size (padded to
    a multiple of 2**depth, cropped back). mask_pyramid: the last input channel (a mask) is
    max-pooled and concatenated again at every encoder scale (DuDoNet's mask-pyramid SE-Net)."""

    def __init__(self, cin: int, cout: int, base: int = 16, depth: int = 3, mask_pyramid: bool = False):
        super().__init__()
        self.depth, self.mask_pyramid = depth, mask_pyramid
        extra = 1 if mask_pyramid else 0
        ch = [base * 2 ** i for i in range(depth + 1)]
        self.enc = nn.ModuleList([_block(cin, ch[0])] + [_block(ch[i - 1] + extra, ch[i]) for i in range(1, depth + 1)])
        self.dec = nn.ModuleList([_block(ch[i + 1] + ch[i], ch[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(ch[0], cout, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        k = 2 ** self.depth
        ph, pw = (-H) % k, (-W) % k
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        m = x[:, -1:]
        skips = []
        h = self.enc[0](x)
        for i in range(1, self.depth + 1):
            skips.append(h)
            h = F.avg_pool2d(h, 2)
            if self.mask_pyramid:
                m = F.max_pool2d(m, 2)
                h = torch.cat([h, m], 1)
            h = self.enc[i](h)
        for j, dec in enumerate(self.dec):
            s = skips[-1 - j]
            h = F.interpolate(h, size=s.shape[-2:], mode="bilinear", align_corners=False)
            h = dec(torch.cat([h, s], 1))
        return self.head(h)[..., :H, :W]


IE_CANDIDATES = ("se", "li", "nmar", "unc")  # the images the v2 IE-Net blends (see DuDoNet)


class DuDoNet(nn.Module):
    """SE-Net -> RIL (fbp) -> IE-Net. forward(inp) with inp = `prepare_inputs(...)`'s dict: s_li
    (B, A, D) line integrals, trace (B, A, D) bool, x_li (B, H, W) LI image in mu/mu_water (and for
    variant "v2": s_nmar, x_nmar, x_unc, metal); returns (s_se, x_se, x_out).

    variant "v1" (Lin et al. 2019): SE-Net on [LI sinogram, trace]; IE-Net on [RIL image, LI
    image], residual on the LI image.
    variant "v2" (ours: DuDoNet++-style inputs, Lyu et al. 2020 arXiv 2001.00340, "DuDoNet with an
    NMAR prior input"): SE-Net on [LI sinogram, NMAR sinogram, trace] (mask pyramid), output still
    replaces only the trace (residual on LI there); IE-Net (mask pyramid on the metal mask) on
    [RIL image, LI image, NMAR image, uncorrected (metal-corrupted) image, metal mask]. Its head
    gives a residual plus per-pixel softmax weights over the candidate images (`IE_CANDIDATES`:
    RIL, LI, NMAR, uncorrected): x_out = sum_k w_k x_k + r. With the zero-initialised head the
    start is their mean; the network learns where to keep the acquired image (mild artefacts, e.g.
    titanium) and where to trust the sinogram-domain corrections (steel streaks)."""

    def __init__(self, projector: Projector, base_se: int = 16, base_ie: int = 16, depth: int = 3,
                 mu_water: float = MU_WATER, variant: str = "v1"):
        super().__init__()
        if variant not in ("v1", "v2"):
            raise ValueError(f"unknown DuDoNet variant {variant!r}")
        self.projector, self.mu_water, self.variant = projector, mu_water, variant
        if variant == "v1":
            self.se = UNet(2, 1, base_se, depth, mask_pyramid=True)
            self.ie = UNet(2, 1, base_ie, depth)
        else:
            self.se = UNet(3, 1, base_se, depth, mask_pyramid=True)
            self.ie = UNet(len(IE_CANDIDATES) + 1, 1 + len(IE_CANDIDATES), base_ie, depth, mask_pyramid=True)

    @property
    def needs_nmar(self) -> bool:
        return self.variant == "v2"

    def ril(self, s: torch.Tensor, projector: Projector | None = None) -> torch.Tensor:
        """Radon inversion layer: line integrals -> mu / mu_water."""
        return fbp(s, projector or self.projector, FILTER) / self.mu_water

    def forward(self, inp: dict[str, torch.Tensor], projector: Projector | None = None):
        """projector: the grid's geometry at another pixel size (same grid and views), else the training one."""
        s_li, x_li = inp["s_li"], inp["x_li"]
        m = inp["trace"].float()[:, None]
        sn = s_li[:, None] / SINO_SCALE
        if self.variant == "v1":
            s_se = (sn + m * self.se(torch.cat([sn, m], 1)))[:, 0] * SINO_SCALE
            x_se = self.ril(s_se, projector)
            return s_se, x_se, x_li + self.ie(torch.stack([x_se, x_li], 1))[:, 0]
        snm = inp["s_nmar"][:, None] / SINO_SCALE
        s_se = (sn + m * self.se(torch.cat([sn, snm, m], 1)))[:, 0] * SINO_SCALE
        x_se = self.ril(s_se, projector)
        cand = torch.stack([x_se, x_li, inp["x_nmar"], inp["x_unc"]], 1)
        h = self.ie(torch.cat([cand, inp["metal"].float()[:, None]], 1))
        w = torch.softmax(h[:, 1:], 1)
        return s_se, x_se, (w * cand).sum(1) + h[:, 0]


def dudonet_losses(out, s_gt: torch.Tensor, x_gt: torch.Tensor, metal: torch.Tensor,
                   trace: torch.Tensor) -> dict[str, torch.Tensor]:
    """L1 losses (DuDoNet eq. 4, unit weights): sinogram (in the trace, SINO_SCALE units),
    Radon consistency (RIL image vs clean) and image, both outside the metal."""
    s_se, x_se, x_out = out
    keep = (~metal).float()
    tr = trace.float()
    l_se = ((s_se - s_gt).abs() * tr).sum() / tr.sum().clamp_min(1) / SINO_SCALE
    l_rc = ((x_se - x_gt).abs() * keep).sum() / keep.sum().clamp_min(1)
    l_ie = ((x_out - x_gt).abs() * keep).sum() / keep.sum().clamp_min(1)
    return {"sino": l_se, "radon": l_rc, "image": l_ie, "total": l_se + l_rc + l_ie}


def build_model(config: dict, device: str = "cpu") -> DuDoNet:
    proj = grid_projector(config.get("grid", GRID), config.get("fov_mm", FOV_MM), config.get("n_angles", N_ANGLES), device)
    return DuDoNet(proj, config.get("base_se", 16), config.get("base_ie", 16), config.get("depth", 3),
                   variant=config.get("variant", "v1")).to(device)


def load_model(path: Path = CHECKPOINT, device: str = "cpu") -> tuple[DuDoNet, dict]:
    ck = torch.load(path, map_location=device, weights_only=True)
    net = build_model(ck["config"], device)
    net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
    net.eval()
    return net, ck


def read_metadata(path: Path = CHECKPOINT) -> dict:
    try:
        return json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------ the per-slice pipeline

def detect_metal(hu: np.ndarray, threshold: float = METAL_HU, min_voxels: int = MIN_METAL_VOXELS,
                 local_frac: float = LOCAL_FRAC, local_px: int = LOCAL_PX) -> np.ndarray:
    """Metal voxels: HU > threshold, connected components (26-connected in 3-D, 8 in 2-D) of at
    least `min_voxels`, minus the bright rim around dense metal: a voxel is kept only if it reaches
    `local_frac` of the highest HU within `local_px` x `local_px` pixels in its slice (a local
    half-maximum edge). The reconstruction blurs a 15 000 HU steel object into its neighbours
    (5-10 000 HU), which a fixed threshold counts as metal (+30-220 % volume on steel phantoms);
    with the local criterion the found volume is within ~25 % of the true one. local_frac=0
    switches it off."""
    hu = np.asarray(hu)
    m = hu > threshold
    if not m.any():
        return m
    if local_frac > 0:
        size = (local_px, local_px) if hu.ndim == 2 else (1,) * (hu.ndim - 2) + (local_px, local_px)
        m &= hu >= local_frac * ndi.maximum_filter(np.where(m, hu, threshold), size=size)
    lab, n = ndi.label(m, structure=np.ones((3,) * m.ndim, bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[lab]


def prepare_inputs(hu_grid: np.ndarray, metal_grid: np.ndarray, projector: Projector,
                   sino: np.ndarray | None = None, mu_water: float = MU_WATER,
                   with_nmar: bool = False) -> dict[str, torch.Tensor]:
    """Network inputs for a batch of grid slices (B, G, G) HU with metal masks (B, G, G):
    the sinogram (the acquisition's when given, else the forward projection of the HU image),
    the trace of the 1-px-dilated metal, the LI sinogram and LI image, the uncorrected image
    `x_unc` (the input HU image, metal pixels replaced by the LI image's) - images in mu / mu_water -
    and, with `with_nmar`, the NMAR sinogram and image (`s_nmar`, `x_nmar`)."""
    hu_grid = np.asarray(hu_grid, np.float32)
    if hu_grid.ndim == 2:
        hu_grid, metal_grid = hu_grid[None], np.asarray(metal_grid)[None]
        sino = None if sino is None else np.asarray(sino)[None]
    dil = np.stack([ndi.binary_dilation(m, np.ones((3, 3), bool)) if m.any() else m for m in np.asarray(metal_grid, bool)])
    dev = projector.device
    if sino is None:
        mu = torch.as_tensor(np.clip(hu_to_mu(hu_grid, mu_water), 0, None), device=dev)
        s = projector.forward(mu)
    else:
        s = torch.as_tensor(np.asarray(sino, np.float32), device=dev)
    trace = metal_trace(torch.as_tensor(dil, device=dev), projector)
    s_li = linear_interpolation(s, trace)
    x_li = fbp(s_li, projector, FILTER) / mu_water
    metal_t = torch.as_tensor(dil, device=dev)
    x_unc = torch.as_tensor(np.clip(hu_grid, -1024.0, 2000.0) / 1000.0 + 1.0, device=dev)
    x_unc = torch.where(metal_t, x_li, x_unc)
    out = {"sino": s, "trace": trace, "s_li": s_li, "x_li": x_li, "x_unc": x_unc, "metal": metal_t}
    if with_nmar:
        sn, tn, xl = s.cpu().numpy(), trace.cpu().numpy(), x_li.cpu().numpy() * mu_water
        s_nmar = torch.as_tensor(np.stack([nmar(sn[i], tn[i], projector, xl[i], mu_water=mu_water)
                                           for i in range(len(sn))]), device=dev)
        out["s_nmar"] = s_nmar
        out["x_nmar"] = fbp(s_nmar, projector, FILTER) / mu_water
    return out


def random_metal_mask(rng: np.random.Generator, body: np.ndarray, pixel_mm: float) -> np.ndarray:
    """CNNMAR-style random metal in a slice: 1-3 objects (discs, ellipses, rods; 3-16 mm) placed on
    body pixels (`body`: bool (H, W))."""
    H, W = body.shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    m = np.zeros((H, W), bool)
    cand = np.argwhere(ndi.binary_erosion(body, iterations=3) if body.sum() > 200 else body)
    if cand.size == 0:
        cand = np.argwhere(np.ones((H, W), bool))[H * W // 2:H * W // 2 + 1]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = cand[rng.integers(len(cand))]
        a = rng.uniform(1.5, 8.0) / pixel_mm
        b = a * rng.uniform(0.3, 1.0) if rng.random() < 0.6 else a
        if rng.random() < 0.25:  # a rod
            a, b = rng.uniform(8, 25) / pixel_mm, rng.uniform(1.0, 2.5) / pixel_mm
        th = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
        v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
        m |= (u / max(a, 0.6)) ** 2 + (v / max(b, 0.6)) ** 2 <= 1.0
    return m


def phantom_metal_slices(rng: np.random.Generator, n: int, grid: int = GRID, fov_mm: float = FOV_MM,
                   slices_per_volume: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """n clean HU slices (n, G, G) and metal masks (n, G, G) from chest phantoms."""
    ps = fov_mm / grid
    hus, masks = [], []
    while len(hus) < n:
        seed = int(rng.integers(2**31))
        kind = str(rng.choice(METAL_KINDS)) if rng.random() < 0.5 else None
        keys = list(rng.choice(FINDING_KEYS, size=int(rng.integers(0, 3)), replace=False))
        planted = [PlantedFinding(k, side=str(rng.choice(["left", "right"]))) for k in keys]
        nz = 24
        kw = dict(shape=(nz, grid, grid), spacing=(240.0 / nz, ps, ps), sex=str(rng.choice(["M", "F"])))
        clean = make_chest_phantom(np.random.default_rng(seed), planted, **kw)
        own = (make_chest_phantom(np.random.default_rng(seed), planted, metal=kind, **kw).metal
               if kind else np.zeros(clean.hu.shape, bool))
        zs = rng.choice(np.arange(3, nz - 3), size=slices_per_volume, replace=False)
        for z in zs:
            m = own[z] if own[z].sum() >= 2 and rng.random() < 0.7 else random_metal_mask(rng, clean.hu[z] > -500, ps)
            hus.append(np.clip(clean.hu[z], -1024, 2000))
            masks.append(m)
    return np.stack(hus[:n]).astype(np.float32), np.stack(masks[:n])


def make_training_pair(hu_clean: np.ndarray, metal: np.ndarray, pixel_mm: float, rng: np.random.Generator,
                       material: str | None = None, photons: float | None = None, n_angles: int = N_ANGLES) -> dict:
    """Simulate a batch of grid slices (B, G, G) with and without `metal` (B, G, G bool) at the
    working grid's geometry. Returns HU images (metal recon, clean recon), the acquired metal
    sinogram and the clean sinogram."""
    G = hu_clean.shape[-1]
    n_det = int(math.ceil(math.hypot(G, G))) + 2
    material = material or str(rng.choice(["titanium", "iron", "steel"], p=[0.5, 0.25, 0.25]))
    photons = photons or float(rng.choice([1e5, 2e5, 5e5]))
    seed = int(rng.integers(2**31))
    kw = dict(n_angles=n_angles, n_det=n_det, photons_per_ray=photons)
    a = simulate_ct_acquisition(hu_clean, pixel_mm, metal_mask=metal, metal_material=material,
                                rng=np.random.default_rng(seed), **kw)
    c = simulate_ct_acquisition(hu_clean, pixel_mm, rng=np.random.default_rng(seed + 1), **kw)
    return {"hu_metal": a["recon_hu"], "hu_clean": c["recon_hu"], "sino_metal": a["sinogram"],
            "sino_clean": c["sinogram"], "metal": metal.astype(bool), "material": material}


def to_grid(img: np.ndarray, spacing_yx: tuple[float, float], grid: int = GRID, order: int = 1,
            fill: float = -1000.0) -> tuple[np.ndarray, dict]:
    """Pad a (H, W) slice to a square physical field of view (centred) and resample to grid x grid.
    Returns the grid image and what `from_grid` needs. Anti-aliased for downsampling."""
    from skimage.transform import resize

    H, W = img.shape
    sy, sx = float(spacing_yx[0]), float(spacing_yx[1])
    fov = max(H * sy, W * sx)
    ny, nx = int(round(fov / sy)), int(round(fov / sx))
    py, px = (ny - H) // 2, (nx - W) // 2
    pad = np.full((ny, nx), fill, np.float32)
    pad[py:py + H, px:px + W] = img
    aa = order > 0 and (ny > grid or nx > grid)
    g = resize(pad, (grid, grid), order=order, anti_aliasing=aa, preserve_range=True).astype(np.float32)
    return g, {"shape": (H, W), "padded": (ny, nx), "offset": (py, px), "pixel_mm": fov / grid}


def from_grid(g: np.ndarray, info: dict, order: int = 1) -> np.ndarray:
    from skimage.transform import resize

    full = resize(g, info["padded"], order=order, preserve_range=True, anti_aliasing=False)
    (H, W), (py, px) = info["shape"], info["offset"]
    return full[py:py + H, px:px + W].astype(np.float32)


@torch.no_grad()
def dudonet_correct(net: DuDoNet, hu_grid: np.ndarray, metal_grid: np.ndarray, sino: np.ndarray | None = None,
                    batch: int = 8, pixel_mm: float | None = None) -> np.ndarray:
    """Corrected HU (B, G, G) for grid slices with metal (metal pixels keep the input's values).
    pixel_mm: the grid's true pixel size (default the training one), so line integrals keep their
    physical scale."""
    proj = net.projector
    if pixel_mm is not None and abs(pixel_mm - proj.pixel_size_mm) > 1e-6:
        G = proj.image_shape[0]
        proj = grid_projector(G, G * pixel_mm, proj.geometry.n_angles, proj.device)
    hu_grid = np.asarray(hu_grid, np.float32)
    single = hu_grid.ndim == 2
    if single:
        hu_grid, metal_grid = hu_grid[None], np.asarray(metal_grid)[None]
        sino = None if sino is None else np.asarray(sino)[None]
    outs = []
    for i in range(0, len(hu_grid), batch):
        inp = prepare_inputs(hu_grid[i:i + batch], metal_grid[i:i + batch], proj,
                             None if sino is None else sino[i:i + batch], net.mu_water, net.needs_nmar)
        _, _, x = net(inp, proj)
        outs.append(((x - 1.0) * 1000.0).cpu().numpy())
    out = np.concatenate(outs, 0)
    m = np.asarray(metal_grid, bool)
    out[m] = hu_grid[m]
    return out[0] if single else out


# ------------------------------------------------------------------ the tool

class MARParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metal_hu: float = METAL_HU
    write_outputs: bool = True  # corrected NIfTI + before/after PNG when ctx.artefact_dir is set


def metal_location(volume_mask: np.ndarray, spacing: tuple[float, float, float]) -> str:
    """Approximate anatomical words for the bulk of the metal: the largest in-plane component on
    the slice with most metal (so a pacemaker's generator, not its lead, sets the place). LPS: x to
    the patient's left, y posterior; the slice centre is taken as the body's centre."""
    Z, H, W = volume_mask.shape
    if not volume_mask.any():
        return "unknown"
    z = int(np.argmax(volume_mask.reshape(Z, -1).sum(1)))
    lab, n = ndi.label(volume_mask[z], structure=np.ones((3, 3), bool))
    comp = lab == (int(np.argmax(np.bincount(lab.ravel())[1:])) + 1)
    yc, xc = np.array(np.nonzero(comp)).mean(1)
    x = (xc - (W - 1) / 2) * spacing[2]
    y = (yc - (H - 1) / 2) * spacing[1]
    side = "left" if x > 0 else "right"
    if abs(x) < 30 and y > 10:
        return "spine"
    if abs(x) < 30 and y < -50:
        return "sternum"
    if abs(x) < 45 and abs(y) <= 50:
        return "mediastinum"
    if y < -40:
        return f"{side} anterior chest wall"
    if abs(x) > 120:
        return f"{side} shoulder" if z > 0.7 * Z else f"{side} lateral chest wall"
    return f"{side} hemithorax"


@register
class MetalArtefactReduction(Tool):
    name = "mar"
    description = ("CT metal-artefact reduction (DuDoNet, dual-domain): finds metal, corrects the "
                   "streaks on slices that have it; later CT tools read the corrected volume.")
    modalities = frozenset({Modality.CT})
    Params = MARParams
    model_name = "DuDoNet (SE-Net + RIL + IE-Net)"
    version = str(read_metadata(CHECKPOINT).get("version", "untrained"))
    stage = "restore"
    order = 0
    checkpoint: Path = CHECKPOINT

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        self.meta = read_metadata(self.checkpoint)
        self.version = str(self.meta.get("version", "untrained"))
        self.net: DuDoNet | None = None

    @classmethod
    def relevance(cls, study: dict, complaint: str) -> str | None:
        acq = study.get("acquisition") or {}
        if acq.get("metal"):
            return "metal in the scanned field: reduce metal artefacts before analysis"
        desc = str(study.get("description") or "").lower()
        for w in ("metal", "hardware", "prosthe", "pacemaker", "implant"):
            if w in desc:
                return f"study description mentions {w}: reduce metal artefacts before analysis"
        return None

    def load(self) -> None:
        if not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"DuDoNet checkpoint {self.checkpoint} not found: run "
                                    f"`python -m training.train_dudonet --out {self.checkpoint}`")
        self.net, ck = load_model(self.checkpoint, self.device)
        self.meta = {**read_metadata(self.checkpoint), **{k: v for k, v in ck.items() if k != "state_dict"}}
        self.version = str(self.meta.get("version", self.version))
        cfg = self.meta.get("config", {})
        self.model_name = f"DuDoNet {cfg.get('variant', 'v1')} {cfg.get('grid', GRID)} px"

    def correct_volume(self, hu: np.ndarray, spacing: tuple[float, float, float],
                       metal: np.ndarray) -> np.ndarray:
        """Corrected copy of `hu` (Z, H, W): slices with metal go through DuDoNet on the grid."""
        assert self.net is not None
        out = np.array(hu, dtype=np.float32, copy=True)
        zs = np.flatnonzero(metal.reshape(metal.shape[0], -1).any(1))
        if zs.size == 0:
            return out
        G = self.net.projector.image_shape[0]
        grids, masks, infos = [], [], []
        for z in zs:
            g, info = to_grid(hu[z], spacing[1:], G)
            mg, _ = to_grid(metal[z].astype(np.float32), spacing[1:], G, fill=0.0)
            grids.append(g)
            masks.append(mg > 0.05)
            infos.append(info)
        grids, masks = np.stack(grids), np.stack(masks)
        # the largest field of view of the slices sets one physical pixel size for the batch
        corr = dudonet_correct(self.net, np.clip(grids, -1024, None), masks, pixel_mm=infos[0]["pixel_mm"])
        for i, z in enumerate(zs):
            delta = np.where(masks[i], 0.0, corr[i] - grids[i]).astype(np.float32)
            sl = out[z] + from_grid(delta, infos[i])
            sl[metal[z]] = hu[z][metal[z]]
            out[z] = sl
        return out

    def analyse(self, study: Any, params: MARParams, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        from core.imaging.types import Volume

        arr = getattr(study, "array", None)
        if arr is None or np.asarray(arr).ndim != 3:
            raise ValueError("MAR needs a 3-D CT volume (Volume with array [z, y, x] in HU)")
        hu = np.asarray(arr, np.float32)
        spacing = tuple(float(s) for s in study.spacing)
        metal = detect_metal(hu, params.metal_hu)
        if not metal.any():
            return [Finding(label="metal_artefact_reduced", present=False,
                            detail=f"no metal (no voxels above {params.metal_hu:g} HU); volume left as is"),
                    Finding(label="medical_material", present=False)], []
        corrected = self.correct_volume(hu, spacing, metal)
        n_slices = int(metal.reshape(metal.shape[0], -1).any(1).sum())
        ctx.restored = Volume(array=corrected, spacing=study.spacing, source=study.source,
                              origin=getattr(study, "origin", (0.0, 0.0, 0.0)),
                              metadata={**dict(getattr(study, "metadata", {}) or {}),
                                        "restored_by": f"mar {self.version}"})
        vol_ml = float(metal.sum() * spacing[0] * spacing[1] * spacing[2] / 1000.0)
        loc = metal_location(metal, spacing)
        findings = [
            Finding(label="metal_artefact_reduced", present=True, value=round(vol_ml, 2), unit="mL", location=loc,
                    detail=f"{n_slices} slices corrected"),
            Finding(label="medical_material", present=True, value=round(vol_ml, 2), unit="mL", location=loc,
                    detail=f"metal (> {params.metal_hu:g} HU) on {n_slices} slices"),
        ]
        artefacts: list[Artefact] = []
        if params.write_outputs and ctx.artefact_dir is not None:
            artefacts = self._write(hu, corrected, metal, ctx)
        return findings, artefacts

    def _write(self, before: np.ndarray, after: np.ndarray, metal: np.ndarray, ctx: RunContext) -> list[Artefact]:
        from PIL import Image

        from core.imaging.nifti import write_nifti

        out_dir = Path(ctx.artefact_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rel_nii = f"{ctx.study_id}_mar.nii.gz"
        write_nifti(ctx.restored, out_dir / rel_nii)
        z = int(np.argmax(metal.reshape(metal.shape[0], -1).sum(1)))

        def win(a):  # soft-tissue-ish window [-400, 600] HU
            return (np.clip((a + 400.0) / 1000.0, 0, 1) * 255).astype(np.uint8)

        img = np.concatenate([win(before[z]), np.full((before.shape[1], 4), 255, np.uint8), win(after[z])], 1)
        rel_png = f"{ctx.study_id}_mar_slice.png"
        im = Image.fromarray(img)
        if im.width < 512:
            s = max(1, 512 // im.width)
            im = im.resize((im.width * s, im.height * s), Image.BILINEAR)
        im.save(out_dir / rel_png)
        return [Artefact(id=f"{self.name}:{ctx.study_id}:nifti", kind="nifti", path=rel_nii,
                         description="metal-artefact-reduced CT volume (HU)"),
                Artefact(id=f"{self.name}:{ctx.study_id}:slice", kind="png", path=rel_png,
                         description=f"slice {z} before (left) and after (right) metal-artefact reduction, "
                                     f"window -400..600 HU")]
