"""A radiograph with a prior CT: planning, 2D/3D registration of the CT to the film, the synthesised second view."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agents.planner import plan_tools
from agents.run_tools import run_planned
from agents.schemas import PlannedCall
from core.case import Case, Modality, Patient, Presentation, Study, StudyFormat, write_case
from core.imaging.nifti import write_nifti
from core.imaging.radiograph import write_radiograph_png
from core.imaging.types import Radiograph, Volume
from core.physics.drr import exposure_curve, radiograph_from_ct, view_geometry
from core.synth.chest import PlantedFinding, make_chest_phantom
from tools.prior_ct_views import film_line_integrals, other_view_pose, register_film_to_ct
from tools.xraysyn import Geometry, line_integrals, ncc, pose_error

torch.set_num_threads(1)
SHAPE, SPACING = (48, 64, 64), (5.0, 5.6, 5.6)


@pytest.fixture(scope="module")
def phantom():
    rng = np.random.default_rng(3)
    return make_chest_phantom(rng, [PlantedFinding("pleural_effusion", side="right", severity=0.8)],
                              shape=SHAPE, spacing=SPACING)


def _film(hu: np.ndarray, rotation, translation, n: int = 96) -> tuple[np.ndarray, float]:
    geo = view_geometry(hu.shape, SPACING, "PA", (n, n))
    with torch.no_grad():
        L = line_integrals(torch.as_tensor(hu), SPACING, Geometry(**geo), rotation, translation=translation)
    return exposure_curve(L.numpy())[0], geo["det_spacing_mm"]


def test_film_line_integrals_invert_the_display_curve():
    L = np.linspace(0.0, 3.0, 50)
    img, l_ref = exposure_curve(L, l_ref=2.0)
    back = film_line_integrals(img) * l_ref
    assert np.allclose(back[L < 2.0], L[L < 2.0], atol=1e-3)  # exact below the display's clip point


def test_other_view_pose_turns_the_patient_about_the_isocentre():
    r, t = other_view_pose((0.0, 0.0, 0.0), (10.0, 0.0, 5.0), "PA", "LAT")
    assert torch.allclose(r, torch.tensor([0.0, 0.0, -math.pi / 2], dtype=torch.float64), atol=1e-9)
    assert torch.allclose(t, torch.tensor([0.0, -10.0, 5.0], dtype=torch.float64), atol=1e-9)  # x shift -> depth
    r2, t2 = other_view_pose(r.tolist(), t.tolist(), "LAT", "PA")  # and back
    assert pose_error(r2.tolist(), t2.tolist(), (0, 0, 0), (10.0, 0.0, 5.0)) == pytest.approx((0.0, 0.0), abs=1e-6)


def test_registers_a_shifted_patient_and_renders_the_true_lateral(phantom):
    r_true, t_true = (0.03, -0.04, 0.05), (8.0, 4.0, -10.0)
    film, pitch = _film(phantom.hu, r_true, t_true)
    noisy_ct = phantom.hu + np.random.default_rng(0).normal(0, 25, phantom.hu.shape).astype(np.float32)
    reg = register_film_to_ct(film, (pitch, pitch), "PA", noisy_ct, SPACING, detector_px=96)
    assert reg.ncc_registered > reg.ncc_initial + 0.02 and reg.ncc_registered > 0.99
    rot_err, _ = pose_error(reg.pose.rotation, reg.pose.translation, r_true, t_true)
    dt = np.subtract(reg.pose.translation, t_true)
    # depth (dt[1], along the beam) shows only as magnification: it needs the beam-hardening-matched DRR
    assert rot_err < 1.0 and np.linalg.norm(dt) < 2.0, (rot_err, dt)
    # the rendered lateral matches the patient's true lateral better than the CT's lateral at the nominal pose
    n = reg.second_view_image.shape[0]
    r2, t2 = other_view_pose(r_true, t_true, "PA", "LAT")
    geo = Geometry(**view_geometry(SHAPE, SPACING, "LAT", (n, n)))
    hu = torch.as_tensor(phantom.hu)
    with torch.no_grad():
        truth = exposure_curve(line_integrals(hu, SPACING, geo, r2.float(), translation=t2.float()).numpy())[0]
        nominal = exposure_curve(line_integrals(hu, SPACING, geo, (0.0, 0.0, -math.pi / 2)).numpy())[0]
    got = float(ncc(torch.as_tensor(reg.second_view_image), torch.as_tensor(truth)))
    assert got > float(ncc(torch.as_tensor(nominal), torch.as_tensor(truth))) + 0.01 and got > 0.98


def test_ap_film_is_read_in_its_mirrored_display(phantom):
    img, (pitch, _) = radiograph_from_ct(phantom.hu, SPACING, view="AP", out_shape=(96, 96))
    as_ap = register_film_to_ct(img, (pitch, pitch), "AP", phantom.hu, SPACING, detector_px=96,
                                levels=((2, 20), (1, 10)))
    assert as_ap.ncc_initial > 0.99 and as_ap.rotation_offset_deg < 1.0 and as_ap.second_view == "LAT"
    with pytest.raises(ValueError, match="view"):
        register_film_to_ct(img, (pitch, pitch), "OBLIQUE", phantom.hu, SPACING)


def _case(tmp_path: Path, hu: np.ndarray | None, film: np.ndarray, pitch: float) -> Path:
    d = tmp_path / "case"
    d.mkdir()
    studies = []
    if hu is not None:
        write_nifti(Volume(array=hu.astype(np.float32), spacing=SPACING, source=d), d / "ct.nii.gz")
        studies.append(Study(id="ct", modality=Modality.CT, body_region="chest", path="ct.nii.gz",
                             format=StudyFormat.NIFTI, description="CT chest"))
    write_radiograph_png(Radiograph(array=film, spacing=(pitch, pitch), source=d, view="PA"), d / "cxr.png")
    studies.append(Study(id="xr", modality=Modality.XR, body_region="chest", path="cxr.png", format=StudyFormat.PNG,
                         description="PA chest radiograph", acquisition={"view": "PA"}))
    write_case(Case(id="c1", patient=Patient(age=60, sex="F"), presentation=Presentation(complaint="dyspnoea"),
                    studies=studies), d)
    return d


def test_planned_only_with_a_ct_and_run_through_the_graph(tmp_path: Path, phantom):
    film, pitch = _film(phantom.hu, (0.0, 0.02, 0.0), (5.0, 0.0, 0.0))
    d = _case(tmp_path, phantom.hu, film, pitch)
    studies = [s.model_dump(mode="json") for s in Case.model_validate(
        __import__("yaml").safe_load((d / "case.yaml").read_text())).studies]
    plan = plan_tools("", studies, None)
    assert ("prior_ct_views", "xr") in {(c.tool, c.study_id) for c in plan.calls}
    assert not any(c.tool == "prior_ct_views" for c in plan_tools("", studies[1:], None).calls)

    out = tmp_path / "art"
    res = run_planned(d, [PlannedCall(tool="prior_ct_views", study_id="xr", reason="test")], artefact_dir=out)[0]
    assert res.status == "ok", res.error
    reg = next(f for f in res.findings if f.label == "prior_ct_registration")
    assert reg.value > 0.98 and "CT ct registered to this PA film" in reg.detail
    assert next(f for f in res.findings if f.label == "synthetic_second_view").present
    pngs = {a.id.split(":")[-1]: np.asarray(Image.open(out / a.path).convert("L")) for a in res.artefacts}
    assert set(pngs) == {"lat", "overlay"} and pngs["lat"].std() > 20


def test_without_a_ct_the_tool_fails_by_name(tmp_path: Path, phantom):
    film, pitch = _film(phantom.hu, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), n=64)
    d = _case(tmp_path, None, film, pitch)
    res = run_planned(d, [PlannedCall(tool="prior_ct_views", study_id="xr", reason="test")])[0]
    assert res.status == "failed" and "study xr: the case has no CT" in res.error
