"""The real restoration tools inside the planned pipeline, on the committed example cases."""
from pathlib import Path

import pytest

from agents.planner import plan_tools
from agents.run_tools import run_planned
from core.case import load_case
from core.imaging.load import load_study
from core.imaging.nifti import load_nifti

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cases"


def _plan(case_dir: Path):
    return plan_tools("", [s.model_dump(mode="json") for s in load_case(case_dir).studies], None)


def test_metal_case_is_restored_before_analysis(tmp_path):
    case = EXAMPLES / "s2026-0002"  # CT with spinal hardware
    plan = _plan(case)
    assert {c.tool for c in plan.calls if c.study_id == "ct"} == {"mar", "ct_analysis", "ct_segmentation",
                                                                  "ctclip_zeroshot", "xraysyn"}
    res = {r.tool: r for r in run_planned(case, plan.calls, tmp_path, device="cpu")}
    assert res["mar"].status == "ok", res["mar"].error
    metal = next(f for f in res["mar"].findings if f.label == "medical_material")
    assert metal.present and metal.value > 0 and metal.unit == "mL"
    assert res["ct_analysis"].input_from == ["mar:ct"] and res["ct_segmentation"].input_from == ["mar:ct"]
    assert res["xraysyn"].status == "ok" and res["xraysyn"].input_from == ["mar:ct"]  # radiographs of the restored CT
    assert res["cxr_analysis"].input_from == []
    assert (tmp_path / "ct_mar.nii.gz").stat().st_size > 0


@pytest.mark.slow
def test_thick_case_gets_thin_slices_that_analysis_reads(tmp_path):
    case = EXAMPLES / "s2026-0003"  # 6 mm slices
    plan = _plan(case)
    assert "slice_synthesis" in {c.tool for c in plan.calls} and "mar" not in {c.tool for c in plan.calls}
    res = {r.tool: r for r in run_planned(case, plan.calls, tmp_path, device="cpu")}
    assert res["slice_synthesis"].status == "ok", res["slice_synthesis"].error
    thick = load_study(case, load_case(case).study("ct"))
    (f,) = res["slice_synthesis"].findings
    assert f.present and f.value == pytest.approx(thick.spacing[0] / 2)
    assert res["ct_analysis"].input_from == ["slice_synthesis:ct"]
    thin = load_nifti(tmp_path / "ct_saint.nii.gz")
    assert thin.array.shape == (2 * thick.array.shape[0], *thick.array.shape[1:])
    assert thin.spacing[0] == pytest.approx(thick.spacing[0] / 2, abs=1e-3)
