"""core.physics: projector vs skimage, adjointness, gradients, FBP, polychromatic metal CT, DRR."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, rescale

from core.physics import (
    DEFAULT_SPECTRUM, FILTERS, MASS_ATTENUATION, MU_WATER, TABLE_KEV, FanBeam, ParallelBeam, Projector,
    drr, effective_mu, fbp, hu_to_mu, mass_attenuation, mu_to_hu, radiograph_from_ct, simulate_ct_acquisition,
)

N = 129  # odd: skimage's rotation centre (n // 2) is then the geometric centre we use


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    ph = rescale(shepp_logan_phantom(), N / 400, anti_aliasing=True)[:N, :N]
    assert ph.shape == (N, N)
    return ph.astype(np.float64)


@pytest.fixture(scope="module")
def par_projector() -> Projector:
    return Projector(ParallelBeam(180, N, 1.0), (N, N), 1.0)


def _disc_mask(n: int) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    return yy ** 2 + xx ** 2 <= ((n - 1) / 2) ** 2


def _psnr(a: np.ndarray, ref: np.ndarray, m: np.ndarray) -> float:
    return float(10 * np.log10(ref[m].max() ** 2 / np.mean((a[m] - ref[m]) ** 2)))


# ----------------------------------------------------------------------------- projector

def test_parallel_forward_matches_skimage_radon(phantom, par_projector):
    theta = np.degrees(par_projector.geometry.angles())
    ref = radon(phantom, theta, circle=True).T            # skimage: (n_det, n_angles)
    ours = par_projector.forward(torch.tensor(phantom, dtype=torch.float32)).numpy()
    assert ours.shape == (180, N)
    nrmse = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert nrmse < 0.01, nrmse
    # the angle convention matters: a sinogram flipped in t is far off
    assert np.linalg.norm(ours[:, ::-1] - ref) / np.linalg.norm(ref) > 0.1


@pytest.mark.parametrize("filt", FILTERS)
def test_fbp_matches_skimage_iradon(phantom, par_projector, filt):
    theta = np.degrees(par_projector.geometry.angles())
    sino = radon(phantom, theta, circle=True)
    ref = iradon(sino, theta, circle=True, filter_name=filt)
    ours = fbp(torch.tensor(sino.T.copy()), par_projector, filt).numpy()
    m = _disc_mask(N)
    p_ours, p_ref = _psnr(ours, phantom, m), _psnr(ref, phantom, m)
    assert p_ours > p_ref - 0.5, (p_ours, p_ref)
    assert p_ours > 20.0
    # fbp of our own projection reconstructs the phantom too
    own = fbp(par_projector.forward(torch.tensor(phantom)), par_projector, filt).numpy()
    assert _psnr(own, phantom, m) > p_ref - 1.0


def test_fbp_units_with_non_unit_pixels():
    """mu in 1/mm survives forward + FBP for 0.7 mm pixels and 0.5 mm detector pitch."""
    n, ps = 96, 0.7
    yy, xx = (np.mgrid[:n, :n] - (n - 1) / 2) * ps
    mu = np.where(xx ** 2 + yy ** 2 <= 25.0 ** 2, 0.02, 0.0)
    P = Projector(ParallelBeam(240, 200, 0.5), (n, n), ps)
    sino = P.forward(torch.tensor(mu))
    centre_ray = sino[:, 100].numpy()          # t = +0.25 mm: chord ~ 50 mm of mu 0.02
    assert np.allclose(centre_ray, 0.02 * 2 * math.sqrt(25 ** 2 - 0.25 ** 2), rtol=0.02)
    rec = fbp(sino, P, "ramp").numpy()
    inner = xx ** 2 + yy ** 2 <= 18.0 ** 2
    assert abs(rec[inner].mean() - 0.02) < 0.02 * 0.01
    assert abs(rec[xx ** 2 + yy ** 2 >= 30.0 ** 2].mean()) < 0.02 * 0.02


def _fan_projector(n: int = 32) -> Projector:
    g = FanBeam(n_angles=90, n_det=61, det_spacing=0.012, source_to_iso_mm=60.0, source_to_det_mm=100.0)
    return Projector(g, (n, n), 1.0)


@pytest.mark.parametrize("kind", ["parallel", "fan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adjointness(kind, dtype):
    P = Projector(ParallelBeam(50, 45, 0.9), (32, 28), 1.1) if kind == "parallel" else _fan_projector()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, *P.image_shape, generator=g, dtype=dtype)
    y = torch.rand(3, *P.sino_shape, generator=g, dtype=dtype)
    lhs = (P.forward(x) * y).sum()
    rhs = (x * P.adjoint(y)).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-4
    assert abs(lhs) > 0


def test_batched_cached_and_moved():
    P = Projector(ParallelBeam(20, 17, 1.0), (12, 12), 1.0)
    x = torch.rand(4, 12, 12)
    batched = P.forward(x)
    singles = torch.stack([P.forward(xi) for xi in x])
    assert batched.shape == (4, 20, 17) and P.forward(x[0]).shape == (20, 17)
    assert torch.allclose(batched, singles, atol=1e-6)
    Q = Projector(ParallelBeam(20, 17, 1.0), (12, 12), 1.0).to("cpu")
    assert Q._op is P._op                                  # built once per (geometry, shape, pixel)
    assert torch.allclose(Q.forward(x), batched)
    with pytest.raises(ValueError):
        P.forward(torch.rand(13, 12))


def test_gradcheck_forward_adjoint_fbp():
    P = Projector(ParallelBeam(7, 11, 1.0), (8, 8), 1.0)
    x = torch.rand(2, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 7, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(P.forward, (x,))
    assert torch.autograd.gradcheck(P.adjoint, (y,))
    for filt in FILTERS:
        assert torch.autograd.gradcheck(lambda s: fbp(s, P, filt), (y,))
    F = Projector(FanBeam(12, 9, 0.15, 30.0, 50.0), (8, 8), 1.0)
    yf = torch.rand(1, 12, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: fbp(s, F), (yf,))


def test_fan_beam_reconstruction(phantom):
    n = 65
    ph = rescale(phantom, n / N, anti_aliasing=True)[:n, :n]
    half_fan = math.asin(0.5 * math.hypot(n, n) / 150.0) * 1.02
    g = FanBeam(n_angles=360, n_det=181, det_spacing=2 * half_fan / 180, source_to_iso_mm=150.0,
                source_to_det_mm=250.0)
    P = Projector(g, (n, n), 1.0)
    sino = P.forward(torch.tensor(ph))
    assert sino.shape == (360, 181)
    rec = fbp(sino, P).numpy()
    par = Projector(ParallelBeam(180, n, 1.0), (n, n), 1.0)
    rec_par = fbp(par.forward(torch.tensor(ph)), par).numpy()
    m = _disc_mask(n)
    assert _psnr(rec, ph, m) > _psnr(rec_par, ph, m) - 1.5
    assert _psnr(rec, ph, m) > 20.0
    short = Projector(FanBeam(90, 61, 0.012, 60.0, 100.0, angle_range=math.pi), (32, 32), 1.0)
    with pytest.raises(ValueError):
        fbp(torch.zeros(90, 61), short)


@pytest.mark.slow
def test_matrix_build_time_256():
    g = ParallelBeam(360, 256, 1.0)
    t0 = time.perf_counter()
    P = Projector(g, (256, 256), 1.0)
    assert time.perf_counter() - t0 < 10.0
    assert P.forward(torch.ones(256, 256)).shape == (360, 256)


# ----------------------------------------------------------------------------- materials

def test_attenuation_tables_and_hu():
    for m, tab in MASS_ATTENUATION.items():
        assert np.allclose(mass_attenuation(m, TABLE_KEV), tab, rtol=1e-9)
        v = mass_attenuation(m, [25.0, 70.0])
        assert tab[0] > v[0] > tab[1] and tab[4] > v[1] > tab[5]    # monotone between knots
    e, w = DEFAULT_SPECTRUM.arrays()
    assert abs(w.sum() - 1) < 1e-9 and 45 < (e * w).sum() < 60 and e.max() < 120
    assert abs(effective_mu("water") - MU_WATER) / MU_WATER < 1e-3
    assert 0.018 < MU_WATER < 0.022
    assert effective_mu("iron") > effective_mu("titanium") > effective_mu("bone") > MU_WATER
    hu = np.array([-1000.0, 0.0, 1000.0])
    assert np.allclose(hu_to_mu(hu), [0.0, MU_WATER, 2 * MU_WATER])
    assert np.allclose(mu_to_hu(hu_to_mu(hu)), hu)
    assert torch.allclose(mu_to_hu(hu_to_mu(torch.tensor(hu))), torch.tensor(hu, dtype=torch.float64))


def _pelvis(n: int = 128, ps: float = 2.0):
    yy, xx = (np.mgrid[:n, :n] - (n - 1) / 2) * ps
    hu = np.full((n, n), -1000.0, np.float32)
    hu[(xx / 110) ** 2 + (yy / 85) ** 2 <= 1] = 40.0
    spine = xx ** 2 + (yy - 50) ** 2 <= 12 ** 2
    hu[spine] = 900.0
    metal = ((np.abs(xx) - 45) ** 2 + (yy - 5) ** 2) <= 5 ** 2     # two titanium rods
    return hu, metal, xx, yy


@pytest.fixture(scope="module")
def metal_sim():
    hu, metal, xx, yy = _pelvis()
    vol = np.stack([hu, hu])
    mask = np.stack([metal, np.zeros_like(metal)])
    out = simulate_ct_acquisition(vol, 2.0, mask, "titanium", rng=np.random.default_rng(7))
    return out, hu, metal, xx, yy


def test_metal_simulation_streaks_and_accuracy(metal_sim):
    out, hu, metal, xx, yy = metal_sim
    rec = out["recon_hu"]
    assert rec.shape == (2, 128, 128) and rec.dtype == np.float32
    soft = binary_erosion(hu == 40.0, iterations=3)
    clean = rec[1]
    err = clean - hu
    assert abs(err[soft].mean()) < 5.0                       # no bias: water BHC, HU scale right
    assert np.abs(err[soft]).mean() < 20.0                   # within noise
    # soft tissue between the rods, away from the metal (>= 20 mm)
    roi = (xx ** 2 + (yy - 5) ** 2) <= 12 ** 2
    assert np.all(hu[roi] == 40.0)
    std_metal, std_clean = rec[0][roi].std(), clean[roi].std()
    assert std_metal > 2.0 * std_clean, (std_metal, std_clean)
    band = (np.abs(yy - 5) <= 2) & (np.abs(xx) <= 25)       # the dark band between the two implants
    assert rec[0][band].mean() < clean[band].mean() - 80
    assert rec[0][metal].mean() > 3000                        # titanium reconstructs very bright


def test_metal_trace_and_sinograms(metal_sim):
    out, hu, metal, xx, yy = metal_sim
    g, P = out["geometry"], out["projector"]
    trace = out["metal_trace"]
    assert trace.shape == (2, g.n_angles, g.n_det) and trace.dtype == bool
    assert not trace[1].any()
    assert 0.05 < trace[0].mean() < 0.5
    expected = P.forward(torch.tensor(metal, dtype=torch.float32)).numpy() > 0.5
    assert trace[0][expected].all()
    s, ideal = out["sinogram"], out["sinogram_ideal"]
    assert s.shape == ideal.shape == trace.shape
    # without metal the corrected noisy sinogram scatters around the ideal one
    assert abs((s[1] - ideal[1]).mean()) < 0.01 and np.abs(s[1] - ideal[1]).mean() < 0.05
    # with metal, beam hardening pulls the corrected line integrals well below the ideal ones
    assert (ideal[0] - s[0])[trace[0]].mean() > 0.5


def test_simulation_reproducible():
    hu, metal, _, _ = _pelvis(48, 5.0)
    a = simulate_ct_acquisition(hu[None], 5.0, metal[None], rng=np.random.default_rng(3), n_angles=60)
    b = simulate_ct_acquisition(hu[None], 5.0, metal[None], rng=np.random.default_rng(3), n_angles=60)
    c = simulate_ct_acquisition(hu[None], 5.0, metal[None], rng=np.random.default_rng(4), n_angles=60)
    assert np.array_equal(a["recon_hu"], b["recon_hu"])
    assert not np.array_equal(a["recon_hu"], c["recon_hu"])


@pytest.mark.slow
def test_simulation_speed_96_slices():
    hu, metal, _, _ = _pelvis()
    vol = np.repeat(hu[None], 96, 0)
    mask = np.zeros(vol.shape, bool)
    mask[::3] = metal
    simulate_ct_acquisition(vol[:2], 2.0, mask[:2], rng=np.random.default_rng(0))   # build matrices
    t0 = time.perf_counter()
    out = simulate_ct_acquisition(vol, 2.0, mask, rng=np.random.default_rng(0))
    assert time.perf_counter() - t0 < 15.0
    assert out["recon_hu"].shape == (96, 128, 128)


# ----------------------------------------------------------------------------- DRR

def _cube_volume():
    vol = torch.zeros(48, 48, 48)
    vol[4:44, 4:44, 4:44] = 0.02         # 40 voxels of 2.5 mm = 100 mm cube, voxel-aligned faces
    return vol


def test_drr_central_ray_and_gradients():
    vol = _cube_volume()
    L = drr(vol, (2.5, 2.5, 2.5), det_shape=(33, 33), det_spacing_mm=5.0)
    assert L.shape == (33, 33)
    assert abs(L[16, 16].item() - 0.02 * 100.0) / 2.0 < 0.02
    assert L[0, 0].item() == pytest.approx(0.0, abs=1e-6)     # outside the cube's shadow
    # rotating 45 degrees about z: the central ray crosses the cube's diagonal, 100 * sqrt(2) mm
    L45 = drr(vol, (2.5, 2.5, 2.5), rotation=(0.0, 0.0, math.pi / 4), det_shape=(33, 33), det_spacing_mm=2.0)
    assert abs(L45[16, 16].item() - 0.02 * 100 * math.sqrt(2)) / (2 * math.sqrt(2)) < 0.02

    trans = torch.tensor([4.0, 10.0, -3.0], requires_grad=True)
    rot = torch.tensor([0.05, -0.02, 0.1], requires_grad=True)
    vol_g = vol.clone().requires_grad_(True)
    target = drr(vol, (2.5, 2.5, 2.5), det_shape=(33, 33))
    img = drr(vol_g, (2.5, 2.5, 2.5), rotation=rot, translation=trans, det_shape=(33, 33))
    loss = ((img - target) ** 2).sum()
    loss.backward()
    for g in (trans.grad, rot.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert torch.isfinite(vol_g.grad).all() and vol_g.grad.abs().sum() > 0


def test_drr_orientation_and_batch():
    vol = torch.zeros(2, 20, 20, 20)
    vol[0, 14:18, 8:12, 14:18] = 0.05   # superior (high z) and patient-left (high x) blob
    vol[1] = vol[0]
    L = drr(vol, (5.0, 5.0, 5.0), det_shape=(41, 41), det_spacing_mm=4.0,
            translation=torch.tensor([[0.0, 0.0, 0.0], [20.0, 0.0, 0.0]]))
    assert L.shape == (2, 41, 41)
    r, c = np.unravel_index(int(L[0].argmax()), (41, 41))
    assert r < 20 and c > 20                                   # head up, patient's left on the right
    c0 = (L[0].sum(0) * torch.arange(41)).sum() / L[0].sum()
    c1 = (L[1].sum(0) * torch.arange(41)).sum() / L[1].sum()
    mag = 1020.0 / 870.0
    assert abs((c1 - c0).item() * 4.0 - 20.0 * mag) < 2.0     # +x translation moves right, magnified


def _chest(Z=60, Y=70, X=90, s=4.0, marker_hu=1500.0):
    z, y, x = np.mgrid[:Z, :Y, :X].astype(np.float32)
    x, y, z = (x - (X - 1) / 2) * s, (y - (Y - 1) / 2) * s, (z - (Z - 1) / 2) * s
    hu = np.full((Z, Y, X), -1000.0, np.float32)
    hu[(x / 170) ** 2 + (y / 120) ** 2 <= 1] = 30.0
    lungs = ((np.abs(x) - 75) / 55) ** 2 + ((y + 5) / 80) ** 2 + (z / 100) ** 2 <= 1
    hu[lungs] = -850.0
    spine = x ** 2 + (y - 85) ** 2 <= 18 ** 2
    hu[spine] = 800.0
    marker = (np.abs(x - 120) < 14) & (np.abs(y + 70) < 14) & (z > 70) & (z < 110)
    hu[marker] = marker_hu
    return hu, (s, s, s)


def test_radiograph_from_ct_chest():
    hu, spacing = _chest()
    img, (dr, dc) = radiograph_from_ct(hu, spacing, "PA", (128, 160))
    assert img.shape == (128, 160) and img.dtype == np.float32
    assert img.min() >= 0.0 and img.max() <= 1.0 and dr == dc > 0
    cols = img[40:90]                                          # mid-chest rows
    c_mid = img.shape[1] // 2
    spine_col = cols[:, c_mid - 2:c_mid + 3].mean()
    lung_cols = np.concatenate([cols[:, c_mid - 28:c_mid - 18], cols[:, c_mid + 18:c_mid + 28]], 1).mean()
    assert spine_col > lung_cols + 0.1                         # bone/mediastinum brighter than lung
    assert img[:, :5].max() < 0.05                             # air beside the body is dark
    # the anterior, superior, patient-left marker: top right on PA and AP, top left (anterior) on LAT
    plain, _ = _chest(marker_hu=30.0)
    for view, shape, right in (("PA", (128, 160), True), ("AP", (128, 160), True), ("LAT", (128, 128), False)):
        with_marker, _ = radiograph_from_ct(hu, spacing, view, shape)
        without, _ = radiograph_from_ct(plain, spacing, view, shape)
        r, c = np.unravel_index(int(np.argmax(with_marker - without)), shape)
        assert r < shape[0] // 2 and (c > shape[1] // 2) == right, (view, r, c)
