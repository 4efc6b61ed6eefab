"""ct_segmentation: metrics on hand-made masks, measurement logic, sliding-window shapes, the modality
guard, and the shipped checkpoint on a held-out phantom (lungs, a planted effusion and nodule)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.case import Modality
from core.imaging.types import Volume
from tools.base import ModalityMismatch, RunContext
from tools.segmentation import CHECKPOINT, CLASS_INDEX, CTSegmentation, SegParams, measure, segment

HELD_OUT_SEED = 7777  # evals/tool_segmentation.py's seed; training uses 1000+ and 2000
SHAPE, SPACING = (64, 96, 96), (3.75, 3.7333, 3.7333)  # the cohort's field of view on a 64 x 96 x 96 grid


# ------------------------------------------------------------------ metrics (evals/tool_segmentation.dice_hd95)

def _cube(shape, start, size=10):
    m = np.zeros(shape, np.uint8)
    z, y, x = start
    m[z:z + size, y:y + size, x:x + size] = 1
    return m


@pytest.mark.parametrize("axis,spacing,expect_hd", [(2, (1.0, 1.0, 1.5), 3.0), (0, (2.5, 1.0, 1.0), 5.0)])
def test_dice_and_hd95_of_shifted_cubes(axis, spacing, expect_hd):
    from evals.tool_segmentation import dice_hd95

    shape = (20, 20, 20)
    a = _cube(shape, (4, 4, 4))
    off = [4, 4, 4]
    off[axis] += 2  # 10-voxel cubes shifted by 2 voxels: overlap 8/10 -> Dice 0.8
    b = _cube(shape, tuple(off))
    d, h, tp, pp = dice_hd95(b, a, spacing, [1])[1]
    assert tp and pp
    assert d == pytest.approx(0.8, abs=1e-6)
    # every face point normal to the shift is 2 voxels from the other cube's surface (> 5% of points)
    assert h == pytest.approx(expect_hd, abs=1e-4)


def test_metrics_identical_and_missing():
    from evals.tool_segmentation import dice_hd95

    a = _cube((16, 16, 16), (3, 3, 3), 6)
    d, h, _, _ = dice_hd95(a, a, (1, 1, 1), [1])[1]
    assert d == pytest.approx(1.0) and h == pytest.approx(0.0)
    d, h, tp, pp = dice_hd95(np.zeros_like(a), a, (1, 1, 1), [1])[1]
    assert tp and not pp and d == pytest.approx(0.0) and np.isnan(h)


# ------------------------------------------------------------------ measurement logic (no model)

def test_measure_sides_sizes_and_volumes():
    lab = np.zeros((40, 60, 60), np.uint8)
    lab[5:35, 10:50, 5:28] = CLASS_INDEX["lung_right"]  # low x = patient's right
    lab[5:35, 10:50, 32:55] = CLASS_INDEX["lung_left"]
    zz, yy, xx = np.ogrid[:40, :60, :60]
    ball = (zz - 28) ** 2 + (yy - 25) ** 2 + (xx - 15) ** 2 <= 3 ** 2  # 7 voxels = 14 mm across, right upper
    lab[ball] = CLASS_INDEX["lung_lesion"]
    lab[6:14, 40:50, 34:54] = CLASS_INDEX["pleural_effusion"]  # left, posterior, basal
    sp = (2.0, 2.0, 2.0)
    f = {x.label: x for x in measure(lab, sp)}
    assert f["lung_nodule"].present and not f["lung_mass"].present
    assert f["lung_nodule"].location == "right upper lobe"
    assert 12.0 <= f["lung_nodule"].value <= 17.0 and f["lung_nodule"].unit == "mm"
    eff = f["pleural_effusion"]
    assert eff.present and eff.location == "left pleural space" and eff.unit == "mL"
    assert eff.value == pytest.approx(8 * 10 * 20 * 8 / 1000.0, rel=1e-6)
    assert "1 component" in eff.detail
    for k in ("consolidation", "pneumothorax", "atelectasis"):
        assert not f[k].present
    assert f["lung_volume_right"].value == pytest.approx(((lab == CLASS_INDEX["lung_right"]).sum()) * 8 / 1000, abs=0.1)


# ------------------------------------------------------------------ the shipped model

@pytest.fixture(scope="module")
def tool():
    if not CHECKPOINT.exists():
        pytest.fail(f"{CHECKPOINT} missing: run python -m training.train_segmentation")
    torch.set_num_threads(1)
    t = CTSegmentation(device="cpu")
    t.load()
    t._loaded = True
    return t


@pytest.fixture(scope="module")
def phantom():
    """A held-out phantom with a right pleural effusion and a left 20 mm nodule, through the CT simulation."""
    from core.physics import simulate_ct_acquisition
    from core.synth.chest import PlantedFinding, make_chest_phantom
    from core.synth.cohort import case_rng
    from tools.segmentation import target_from_phantom

    rng = case_rng(HELD_OUT_SEED, 999)
    ph = make_chest_phantom(rng, [PlantedFinding("pleural_effusion", "right", severity=0.6),
                                  PlantedFinding("lung_nodule", "left", size_mm=20.0)], shape=SHAPE, spacing=SPACING)
    hu = simulate_ct_acquisition(ph.hu, SPACING[1], rng=rng)["recon_hu"].astype(np.float32)
    return Volume(array=hu, spacing=SPACING, source=Path("phantom")), target_from_phantom(ph.organs, ph.lesions, ph.findings)


def test_checkpoint_small_and_versioned(tool):
    assert CHECKPOINT.stat().st_size < 5e6
    assert tool.version != "untrained" and "UNet" in tool.model_name


def test_sliding_window_odd_shape(tool):
    rng = np.random.default_rng(0)
    hu = rng.normal(-500, 300, (37, 71, 83)).astype(np.float32)
    out = segment(tool.net, hu, (3.1, 3.3, 2.9), tool.config)
    assert out.shape == hu.shape and out.dtype == np.uint8
    small = segment(tool.net, hu[:9, :20, :33], (2.0, 2.0, 2.0), tool.config)  # smaller than the ROI: padded
    assert small.shape == (9, 20, 33)


def test_wrong_modality_refused(tool):
    xr = Volume(array=np.zeros((4, 32, 32), np.float32), spacing=(1, 1, 1), source=Path("x"))
    with pytest.raises(ModalityMismatch):
        tool.run(xr, ctx=RunContext(study_id="xr", modality=Modality.XR))


def test_held_out_phantom(tool, phantom, tmp_path):
    from core.imaging.nifti import load_mask_nifti
    from evals.tool_segmentation import dice_hd95

    vol, truth = phantom
    t0 = time.perf_counter()
    res = tool.run(vol, SegParams(), ctx=RunContext(study_id="ct", modality=Modality.CT, artefact_dir=tmp_path))
    secs = time.perf_counter() - t0
    assert res.status == "ok", res.error
    assert secs < 15.0  # ~1-2 s on an idle core for 64 x 96 x 96; generous for a loaded CI box
    f = {x.label: x for x in res.findings}
    # the planted right effusion, with the right side
    assert f["pleural_effusion"].present and "right" in f["pleural_effusion"].location
    assert f["pleural_effusion"].value > 20
    # the planted 20 mm left nodule
    assert f["lung_nodule"].present and ("left" in f["lung_nodule"].location or "lingula" in f["lung_nodule"].location)
    assert 10 <= f["lung_nodule"].value <= 35
    assert not f["pneumothorax"].present
    # label map written on the volume's grid; lung Dice against the phantom's truth
    nii = [a for a in res.artefacts if a.kind == "nifti"][0]
    assert nii.path == "ct_seg.nii.gz"
    lab = load_mask_nifti(tmp_path / nii.path)
    assert lab.shape == vol.shape
    assert (tmp_path / "ct_seg_overlay.png").is_file()
    m = dice_hd95(lab, truth, SPACING, [CLASS_INDEX["lung_right"], CLASS_INDEX["lung_left"]])
    for c, (d, h, _, _) in m.items():
        assert d > 0.85, (c, d)
        assert h < 15.0, (c, h)
