"""CT-CLIP: model shapes and unit-norm embeddings, zero-shot probabilities, the tool on a phantom CT
with the shipped checkpoint, modality guard, missing checkpoint, retrieval metrics on hand-made
inputs, and a short training run whose loss falls."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.case import Modality
from core.catalogue import CT_RATE_LABELS, load_catalogue
from core.imaging.types import Volume
from tools.base import ModalityMismatch, RunContext

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "ctclip.pt"


@pytest.fixture(scope="module", autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def phantom_volume() -> Volume:
    from core.synth.chest import PlantedFinding, make_chest_phantom

    shape, spacing = (40, 64, 64), (6.0, 5.6, 5.6)
    ph = make_chest_phantom(np.random.default_rng(5), [PlantedFinding("pleural_effusion", side="right", severity=0.9)],
                            shape=shape, spacing=spacing)
    return Volume(array=ph.hu, spacing=spacing, source=Path("<phantom>"))


@pytest.fixture(scope="module")
def untrained():
    from tools.ctclip import DEFAULT_CONFIG, build_model

    torch.manual_seed(0)
    m = build_model(DEFAULT_CONFIG).eval()
    m.config = dict(DEFAULT_CONFIG)
    return m


def test_preprocess_grid_and_range(phantom_volume):
    from tools.ctclip import FOV_MM, GRID, preprocess, resample_hu

    x = preprocess(phantom_volume)
    assert x.shape == (2, *GRID) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # a volume already on the model grid and field of view passes through unchanged
    a = np.random.default_rng(0).normal(0, 100, GRID).astype(np.float32)
    assert np.allclose(resample_hu(a, tuple(f / g for f, g in zip(FOV_MM, GRID))), a)
    with pytest.raises(ValueError, match="3-D"):
        preprocess(Volume(array=np.zeros((8, 8)), spacing=(1, 1, 1), source=Path("x")))


def test_model_shapes_and_unit_norm(untrained, phantom_volume):
    from tools.ctclip import GRID, image_embedding, image_embeddings, text_embedding

    out = untrained.encode_image(torch.zeros(2, 2, *GRID), patches=True)
    assert out["logits"].shape == (2, 18)
    assert out["embedding"].shape == (2, 128)
    assert out["patches"].shape[0] == 2 and out["patches"].shape[2] == 128
    e = image_embedding(untrained, phantom_volume)
    assert e.ndim == 1 and e.dtype == np.float32 and abs(np.linalg.norm(e) - 1) < 1e-4
    E = image_embeddings(untrained, [phantom_volume, phantom_volume])
    assert E.shape == (2, 128) and np.allclose(E[0], e, atol=1e-5)
    T = text_embedding(untrained, ["FINDINGS: Right pleural effusion. No pneumothorax.\nIMPRESSION: Effusion.",
                                   "Normal study."])
    assert T.shape == (2, 128) and T.dtype == np.float32
    assert np.allclose(np.linalg.norm(T, axis=1), 1, atol=1e-4)
    n = sum(p.numel() for p in untrained.parameters())
    assert n < 2.2e6  # float16 < 4.4 MB


def test_zero_shot_probabilities(untrained, phantom_volume):
    from tools.ctclip import prompts, zero_shot

    z = zero_shot(untrained, phantom_volume)
    assert list(z) == list(CT_RATE_LABELS)
    assert all(0.0 <= p <= 1.0 for p in z.values())
    assert prompts("lung nodule") == ("Lung nodule.", "not lung nodule.")


def test_split_sentences_drops_headers_and_technique():
    from tools.ctclip import split_sentences

    s = split_sentences("TECHNIQUE: CT chest without contrast.\nFINDINGS: A nodule. No effusion.\nIMPRESSION: Nodule.")
    assert s == ["A nodule.", "No effusion.", "Nodule."]


def test_label_keys_use_catalogue_findings():
    from tools.ctclip import label_keys

    keys = label_keys()
    cat = load_catalogue()
    assert keys["pleural effusion"] == "pleural_effusion"
    assert keys["coronary artery wall calcification"] == "coronary_artery_calcification"
    assert keys["lung nodule"] == "lung_nodule_or_mass"  # nodule and mass both count: not one finding
    assert sum(k in cat.findings for k in keys.values()) == 17


def test_tool_on_phantom_ct_with_shipped_checkpoint(phantom_volume):
    from agents.evidence import observations
    from tools.registry import get_tool, tools_for

    assert "ctclip_zeroshot" in tools_for(Modality.CT)
    assert "ctclip_zeroshot" not in tools_for(Modality.XR)
    tool = get_tool("ctclip_zeroshot", device="cpu")
    r = tool.run(phantom_volume, ctx=RunContext(study_id="ct", modality=Modality.CT))
    assert r.status == "ok", r.error
    assert len(r.findings) == 18
    assert all(f.probability is not None and 0 <= f.probability <= 1 for f in r.findings)
    assert r.version != "untrained"
    # only readouts with validation AUC >= EVIDENCE_MIN_AUC and a single catalogue finding become disease evidence
    from tools.ctclip import EVIDENCE_MIN_AUC, label_keys

    aucs = tool.meta["val"]["per_label_auc_silver"]
    trusted = {label_keys()[lab] for lab, auc in aucs.items() if auc >= EVIDENCE_MIN_AUC}
    trusted &= set(load_catalogue().findings)
    obs = observations([r.model_dump()], load_catalogue())
    assert {o["key"] for o in obs} == trusted and 5 <= len(trusted) < 17
    assert all(f.label.startswith("ct_rate:") for f in r.findings if f.label not in trusted
               and f.label != "lung_nodule_or_mass")


def test_tool_refuses_wrong_modality(phantom_volume):
    from tools.registry import get_tool

    tool = get_tool("ctclip_zeroshot", device="cpu")
    with pytest.raises(ModalityMismatch):
        tool.run(phantom_volume, ctx=RunContext(study_id="xr", modality=Modality.XR))


def test_missing_checkpoint_is_a_clear_error(tmp_path, phantom_volume):
    from tools.ctclip import CTCLIPZeroShot, load_ctclip

    with pytest.raises(FileNotFoundError, match="training.train_ctclip"):
        load_ctclip(tmp_path / "nope.pt")

    class Missing(CTCLIPZeroShot):
        checkpoint = tmp_path / "nope.pt"

    r = Missing(device="cpu").run(phantom_volume, ctx=RunContext(study_id="ct", modality=Modality.CT))
    assert r.status == "failed" and "training.train_ctclip" in r.error


def test_platt_calibration_stays_finite_on_separable_scores():
    from tools.ctclip import calibrate
    from training.train_ctclip import fit_platt

    logit = np.array([-30.0, -20.0, -10.0, 10.0, 20.0, 30.0])  # saturated and perfectly separable
    a, b = fit_platt(logit, np.array([0, 0, 0, 1, 1, 1]))
    assert np.isfinite([a, b]).all() and 0 < a < 10
    p = calibrate(logit, (a, b))
    assert (p[:3] < 0.5).all() and (p[3:] > 0.5).all()
    # an uninformative score: the slope shrinks and the intercept finds the base rate
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.2).astype(float)
    a, b = fit_platt(rng.normal(0, 3, 400), y)
    assert abs(a) < 0.2 and calibrate(0.0, (a, b)) == pytest.approx(0.2, abs=0.06)


def test_map_at_k_is_mean_jaccard_of_top_k():
    from evals.ctclip import jaccard, map_at_k

    assert jaccard([1, 1, 0], [1, 0, 0]) == 0.5
    assert jaccard([0, 0], [0, 0]) == 1.0
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 1]])
    emb = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    m = map_at_k(emb, labels, ks=(1, 2))
    # top-1 (self excluded): 0->1 (J=1), 1->0 (1), 2->3 (1/2), 3->2 (1/2): mean 0.75
    assert m[1] == pytest.approx(0.75)
    # top-2: 0->{1,3}: (1+0)/2; 1->{0,3}: (1+0)/2; 2->{3,1}: (0.5+0)/2; 3->{2,1}: (0.5+0)/2
    assert m[2] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    # gallery keeps only images with a label (CT-CLIP): an unlabelled query scores 0 against it
    m0 = map_at_k(np.array([[1.0, 0.0], [1.0, 0.1]]), np.array([[0, 0], [1, 0]]), ks=(1,))
    assert m0[1] == pytest.approx(0.0)  # query 1 has no candidate but itself: left out


def test_recall_at_k_known_answers():
    from evals.ctclip import recall_at_k

    img = np.eye(4)
    txt = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 1.0, 0.1], [0, 0, 0, 1.0]])
    r = recall_at_k(txt, img, ks=(1, 2))
    # report 0 -> image 0 first; 1 -> image 2 first, own image 1 tied with 0 and 3: rank 1 (ties favour own);
    # report 2 -> image 2 first; report 3 -> image 3 first
    assert r[1] == pytest.approx(0.75)
    assert r[2] == pytest.approx(1.0)


def test_short_training_run_lowers_loss(tmp_path):
    from training.train_ctclip import TrainArgs, Trainer, augment, clip_loss, make_dataset
    from tools.ctclip import DEFAULT_CONFIG, build_model

    data = make_dataset(77, 6, enriched_rate=1.0, grid=(16, 32, 32), cache_dir=tmp_path, verbose=False)
    assert data["hu"].shape == (6, 16, 32, 32) and len(data["reports"]) == 6 and data["truth"].shape == (6, 18)
    torch.manual_seed(0)
    model = build_model(DEFAULT_CONFIG)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = augment(torch.from_numpy(data["hu"]), g)
    y = torch.from_numpy(data["truth"].astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    import torch.nn.functional as F

    losses = []
    for _ in range(8):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.8
    # the CLIP loss on the same batch with random text vectors also falls
    txt = torch.nn.functional.normalize(torch.randn(6, 128), dim=-1)
    l0 = clip_loss(model.encode_image(x)["embedding"], txt, model.scale()).item()
    for _ in range(6):
        loss = clip_loss(model.encode_image(x)["embedding"], txt, model.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < l0
    assert TrainArgs().labels == "rules" and Trainer  # the entry's defaults: silver labels from rules
