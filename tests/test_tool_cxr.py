"""cxr_analysis: registry, modality guard, checkpoint, measurements and CNN on planted findings,
example cases, overlay artefact, failures as results."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.case import Modality, load_case
from core.catalogue import load_catalogue
from core.imaging.load import load_study
from core.imaging.types import Radiograph
from tools.base import ModalityMismatch, RunContext
from tools.registry import get_tool, tool_classes, tools_for

ROOT = Path(__file__).resolve().parents[1]
XR_KEYS = [k for k, f in load_catalogue().findings.items() if f.xr]
COHORT_SHAPE, COHORT_SPACING = (96, 128, 128), (2.5, 2.8, 2.8)  # CohortOptions defaults


@pytest.fixture(scope="module")
def tool():
    import torch

    torch.set_num_threads(2)
    return get_tool("cxr_analysis", device="cpu")


def _xr_ctx(sid="xr", artefact_dir=None):
    return RunContext(study_id=sid, modality=Modality.XR, artefact_dir=artefact_dir)


def _radiograph(findings=(), seed=3) -> Radiograph:
    from core.physics.drr import radiograph_from_ct
    from core.synth.chest import make_chest_phantom

    ph = make_chest_phantom(np.random.default_rng(seed), list(findings), shape=COHORT_SHAPE, spacing=COHORT_SPACING)
    img, pix = radiograph_from_ct(ph.hu, COHORT_SPACING, view="PA", out_shape=(256, 256))
    return Radiograph(array=img, spacing=pix, source=Path("<phantom>"), view="PA")


@pytest.fixture(scope="module")
def phantoms():
    from core.synth.chest import PlantedFinding

    return {"normal": _radiograph(),
            "cardiomegaly": _radiograph([PlantedFinding("cardiomegaly", severity=0.9)]),
            "effusion": _radiograph([PlantedFinding("pleural_effusion", side="right", severity=0.9)])}


def _by_label(result):
    return {f.label: f for f in result.findings}


def test_registered_for_xr():
    assert "cxr_analysis" in tool_classes()
    assert "cxr_analysis" in tools_for(Modality.XR)
    assert "cxr_analysis" not in tools_for(Modality.CT)


def test_modality_guard(tool, phantoms):
    with pytest.raises(ModalityMismatch):
        tool.run(phantoms["normal"], ctx=RunContext(study_id="ct", modality=Modality.CT))


def test_checkpoint_loads_with_metadata(tool):
    from tools.cxr_analysis import CHECKPOINT, read_metadata

    assert CHECKPOINT.exists() and CHECKPOINT.stat().st_size < 2_000_000
    tool.load()
    assert tool.net is not None and sum(p.numel() for p in tool.net.parameters()) < 1_000_000
    assert set(tool.findings_order) == set(XR_KEYS)
    meta = read_metadata(CHECKPOINT)
    assert set(meta["thresholds"]) == set(XR_KEYS)
    assert all(0 < t < 1 for t in meta["thresholds"].values())
    assert set(meta["val_auc"]) == set(XR_KEYS)
    assert tool.version == meta["version"] != "untrained"


def test_cardiomegaly_raises_ctr_and_probability(tool, phantoms):
    normal = _by_label(tool.run(phantoms["normal"], ctx=_xr_ctx()))
    big = _by_label(tool.run(phantoms["cardiomegaly"], ctx=_xr_ctx()))
    assert big["cardiothoracic_ratio"].value > normal["cardiothoracic_ratio"].value
    assert big["cardiomegaly"].probability > normal["cardiomegaly"].probability
    assert 0.3 < normal["cardiothoracic_ratio"].value < 0.6


def test_right_effusion_raises_effusion_probability(tool, phantoms):
    normal = _by_label(tool.run(phantoms["normal"], ctx=_xr_ctx()))
    eff = _by_label(tool.run(phantoms["effusion"], ctx=_xr_ctx()))
    assert eff["pleural_effusion"].probability > normal["pleural_effusion"].probability
    # the right field is denser than the left compared with the normal radiograph
    assert eff["lung_density_asymmetry"].value > normal["lung_density_asymmetry"].value


def test_example_cases_xr(tool):
    seen = 0
    for folder in sorted((ROOT / "examples" / "cases").iterdir()):
        case = load_case(folder)
        for s in case.studies:
            if s.modality != Modality.XR:
                continue
            r = tool.run(load_study(folder, s), ctx=_xr_ctx(s.id))
            assert r.status == "ok", r.error
            got = _by_label(r)
            for k in XR_KEYS:
                assert k in got and 0.0 <= got[k].probability <= 1.0
            assert "cardiothoracic_ratio" in got
            assert r.id == f"cxr_analysis:{s.id}" and r.version == tool.version and r.summary
            seen += 1
    assert seen >= 5


def test_overlay_artefact(tool, phantoms, tmp_path):
    r = tool.run(phantoms["cardiomegaly"], ctx=_xr_ctx("xr", artefact_dir=tmp_path))
    assert r.status == "ok"
    (a,) = r.artefacts
    assert a.id == "cxr_analysis:xr:overlay" and a.kind == "png"
    p = tmp_path / a.path
    assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tool.run(phantoms["normal"], ctx=_xr_ctx("xr")).artefacts == []  # no folder, nothing written


@pytest.mark.parametrize("array, words", [
    (np.full((64, 64), np.nan, np.float32), "non-finite"),
    (np.zeros((8, 64, 64), np.float32), "2-D"),
    (np.full((64, 64), 0.5, np.float32), "blank"),
])
def test_corrupt_radiograph_fails_as_result(tool, array, words):
    r = tool.run(Radiograph(array=array, spacing=(1.0, 1.0), source=Path("<bad>")), ctx=_xr_ctx())
    assert r.status == "failed" and words in r.error
    assert r.findings == []


def test_nan_patch_and_lateral_view_fail(tool, phantoms):
    a = phantoms["normal"].array.copy()
    a[100:110, 100:110] = np.nan
    r = tool.run(Radiograph(array=a, spacing=(1.76, 1.76), source=Path("<bad>")), ctx=_xr_ctx())
    assert r.status == "failed" and "non-finite" in r.error
    lat = Radiograph(array=phantoms["normal"].array, spacing=(1.76, 1.76), source=Path("<lat>"), view="LAT")
    r = tool.run(lat, ctx=_xr_ctx())
    assert r.status == "failed" and "lateral" in r.error
