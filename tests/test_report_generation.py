"""report_generation: knowledge attention and its graph bias, retrieval, training, metrics, the shipped
checkpoint on example radiographs, the tool and its failures."""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.case import Modality, load_case
from core.catalogue import load_catalogue
from core.errors import CaseDataError
from core.imaging.load import load_study
from core.imaging.types import Radiograph
from tools.base import ModalityMismatch, RunContext
from tools.report_generation import (CHECKPOINT, Bank, GenConfig, KnowledgeAttention, KnowledgeBatch, KnowledgeGraph,
                                     ReportGeneration, ReportGenerator, detokenize, metric_text, tokenize)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "cases"
XR_KEYS = [k for k, f in load_catalogue().findings.items() if f.xr]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ a tiny model

def tiny(knowledge: bool = True, seed: int = 0) -> tuple[ReportGenerator, KnowledgeGraph]:
    torch.manual_seed(seed)
    n = 5
    a = torch.rand(n, n) + torch.eye(n)
    graph = KnowledgeGraph(nodes=["f0", "f1", "f2", "upper lobe", "heart"], kinds=["finding"] * 3 + ["anatomy"] * 2,
                           names=["w4", "w5", "w6", "w7", "w8"], adjacency=(a / a.sum(1, keepdim=True)).tolist())
    cfg = GenConfig(vocab_size=30, d=32, heads=2, ff=64, enc_layers=1, dec_layers=1, rm_d=16, mem_feat=16, max_len=20,
                    feat_ch=8, grid=4, n_logits=3, knowledge=knowledge, n_nodes=n, k_neighbours=2, max_sents=2,
                    dropout=0.0)
    return ReportGenerator(cfg, graph, [[4 + i] for i in range(n)]).eval(), graph


def tiny_inputs(B: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats, logits = torch.randn(B, 4, 8, generator=g), torch.randn(B, 3, generator=g)
    inp = torch.randint(4, 30, (B, 7), generator=g)
    kb = KnowledgeBatch(sent_ids=torch.randint(4, 30, (B, 4, 5), generator=g),
                        sent_bias=torch.log(torch.full((B, 4), 0.5)),
                        facts=torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0]] * B))
    return feats, logits, inp, kb


def test_knowledge_attention_masked_keys_equal_visual_only():
    att = KnowledgeAttention(16, 2, 0.0).eval()
    x, vis, extra = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 4, 16)
    bias = torch.cat([torch.zeros(2, 7), torch.full((2, 4), -math.inf)], 1)
    torch.testing.assert_close(att(x, torch.cat([vis, extra], 1), bias), att(x, vis, None), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(att(x, torch.cat([vis, extra], 1), torch.zeros(2, 11)), att(x, vis, None), atol=1e-4)


def test_graph_bias_changes_outputs_and_masking_gives_the_baseline_path():
    model, _ = tiny()
    feats, logits, inp, kb = tiny_inputs()
    with torch.no_grad():
        out = model(feats, logits, inp, kb)
        bias = model.graph_bias(kb.facts)
        assert bias.shape == (3, 5) and torch.isfinite(bias).all()
        other = model(feats, logits, inp, kb, graph_bias=bias.flip(1) * 3)
        assert (out - other).abs().max() > 1e-4  # the decoder reads the graph bias
        model.adj.copy_(torch.eye(5))  # a different graph: different node embeddings and bias
        assert (model(feats, logits, inp, kb) - out).abs().max() > 1e-4
        masked = model(feats, logits, inp, kb, mask_knowledge=True)
        baseline_path = model(feats, logits, inp, None)
    torch.testing.assert_close(masked, baseline_path, atol=1e-5, rtol=1e-5)
    assert (masked - out).abs().max() > 1e-4


def test_graph_bias_follows_the_retrieved_findings_along_edges():
    model, graph = tiny()
    with torch.no_grad():
        model.adj.copy_(torch.tensor([[.5, .5, 0, 0, 0], [0, 1., 0, 0, 0], [0, 0, .5, 0, .5], [0, 0, 0, 1., 0],
                                      [0, 0, 0, 0, 1.]]))
        b = model.graph_bias(torch.tensor([[1.0, 0, 0, 0, 0]]))[0]
    assert b[0] == b[1] and b[1] > b[2]  # f0 was retrieved; f1 is its neighbour; f2 is unrelated


def test_retrieval_excludes_the_query_case():
    emb = torch.eye(4) + 0.1
    bank = Bank(["a", "b", "c", "d"], emb, [[[5, 6]], [[7]], [[8]], [[9]]], torch.eye(4), ["r"] * 4)
    idx, _ = bank.query(emb[:2], k=2)
    assert idx[0, 0] == 0 and idx[1, 0] == 1  # without exclusion a case is its own nearest neighbour
    idx, sims = bank.query(emb[:2], k=3, exclude=["a", "b"])
    assert 0 not in idx[0].tolist() and 1 not in idx[1].tolist() and torch.isfinite(sims).all()
    kb = bank.knowledge(idx, sims, max_sents=1, sent_len=3)
    assert kb.sent_ids.shape == (2, 3, 3) and torch.isfinite(kb.sent_bias).all()
    assert kb.facts[0, 0] == 0 and torch.allclose(kb.facts.sum(1), torch.ones(2))


def test_short_training_lowers_the_loss():
    from training.train_report_gen import Split, eval_loss, train_captioner

    model, _ = tiny()
    g = torch.Generator().manual_seed(0)
    n = 32
    feats, logits = torch.randn(n, 4, 8, generator=g), torch.randn(n, 3, generator=g)
    # the report depends on the image: token 10 + (sign of feature 0) repeated, then EOS
    word = 10 + (feats[:, 0, 0] > 0).long()
    ids = torch.cat([torch.ones(n, 1, dtype=torch.long), word[:, None].repeat(1, 5), torch.full((n, 1), 2)], 1)
    kb = KnowledgeBatch(torch.randint(4, 30, (n, 4, 5), generator=g), torch.zeros(n, 4), torch.rand(n, 5, generator=g))
    tr, va = Split(feats, logits, ids, kb), Split(feats[:8], logits[:8], ids[:8], kb.index(torch.arange(8)))
    before = eval_loss(model, va)
    rep = train_captioner(model, tr, va, minutes=5, max_epochs=6, epochs=6, batch=8, lr=3e-3, log=lambda *_: None)
    assert rep["best_val_loss"] < 0.5 * before
    assert rep["history"][-1]["train_loss"] < rep["history"][0]["train_loss"]


# ------------------------------------------------------------------ text and metrics

def test_tokenize_detokenize_round_trip():
    text = "TECHNIQUE: PA chest radiograph.\nFINDINGS: No pleural effusion. A 12 mm nodule, right upper lobe.\n" \
           "IMPRESSION: Lung nodule."
    toks = tokenize(text)
    assert toks[:2] == ["findings", ":"] and "technique" not in toks and "12" in toks
    assert detokenize(toks) == ("FINDINGS: No pleural effusion. A 12 mm nodule, right upper lobe.\n"
                                "IMPRESSION: Lung nodule.")
    assert metric_text(toks).startswith("no pleural effusion .")


def test_pycocoevalcap_on_known_strings():
    from evals.report_generation import ce_scores, nlg_scores

    ref = ["the heart is enlarged . no pleural effusion .", "small right pneumothorax ."]
    same = nlg_scores(ref, ref)
    assert same["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    assert same["CIDEr"] > 1.0
    other = nlg_scores(ref, ["alpha beta gamma delta epsilon", "zeta eta theta iota"])
    assert other["BLEU-1"] < 1e-6 and other["BLEU-4"] < 1e-6 and other["ROUGE-L"] == 0 and other["CIDEr"] == 0
    ce = ce_scores(["Cardiomegaly. No pleural effusion.", "Right pneumothorax."],
                   ["Cardiomegaly. Right pleural effusion.", "No pneumothorax."], XR_KEYS)
    assert ce["CE-P"] == pytest.approx(0.5) and ce["CE-R"] == pytest.approx(0.5)


@pytest.mark.slow
def test_meteor_on_known_strings():
    from evals.report_generation import meteor_scorer, nlg_scores

    if shutil.which("java") is None:
        pytest.fail("METEOR runs pycocoevalcap's jar and needs Java: apt-get install -y default-jre-headless")

    ref, m = ["the heart is enlarged . no pleural effusion ."], meteor_scorer()
    assert nlg_scores(ref, ref, m)["METEOR"] == pytest.approx(1.0, abs=1e-3)
    assert nlg_scores(ref, ["alpha beta gamma"], m)["METEOR"] < 1e-6


# ------------------------------------------------------------------ the shipped checkpoint and the tool

@pytest.fixture(scope="module")
def tool():
    assert CHECKPOINT.is_file(), f"{CHECKPOINT} missing: python -m training.train_report_gen --ship {CHECKPOINT}"
    torch.set_num_threads(1)
    return ReportGeneration(device="cpu")


def _ctx(case_id="", sid="xr"):
    return RunContext(study_id=sid, modality=Modality.XR, case_id=case_id)


def _example_radiographs():
    out = []
    for folder in sorted(EXAMPLES.iterdir()):
        case = load_case(folder)
        xr = [s for s in case.studies if s.modality == Modality.XR]
        if xr:
            truth = {f.label for f in case.truth.findings if f.label in XR_KEYS}
            out.append((folder.name, load_study(folder, xr[0]), truth))
    return out


def test_shipped_checkpoint_and_sidecar():
    import json

    assert CHECKPOINT.stat().st_size < 6e6
    meta = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert meta["seed"] and meta["data"]["train"] and "metrics" in meta
    assert ReportGeneration.available()


def test_draft_reports_mention_planted_findings_more_often_than_chance(tool):
    """Behavioural: on the example radiographs, the drafts' positive findings match the case's own
    planted findings more often than they match the other cases' (a shuffle baseline)."""
    from evals.report_generation import positives

    cases = _example_radiographs()
    assert len(cases) >= 5
    drafts = []
    for cid, rad, _ in cases:
        r = tool.run(rad, None, ctx=_ctx(cid))
        assert r.status == "ok", r.error
        text = next(f.detail for f in r.findings if f.label == "draft_report").split("\n[")[0]
        assert len(text.split()) >= 4
        drafts.append(positives(text, XR_KEYS))
    truths = [t for *_, t in cases]
    hits = sum(len(d & t) for d, t in zip(drafts, truths))
    shuffled = np.mean([sum(len(drafts[i] & truths[(i + s) % len(cases)]) for i in range(len(cases)))
                        for s in range(1, len(cases))])
    assert hits > shuffled and hits >= 2


def test_tool_returns_a_draft_that_is_citable_but_not_evidence(tool):
    from agents.evidence import observations

    cid, rad, _ = _example_radiographs()[0]
    r = tool.run(rad, {"knowledge": True}, ctx=_ctx(cid))
    assert r.status == "ok" and r.id == "report_generation:xr" and r.version and r.version != "untrained"
    draft = [f for f in r.findings if f.label == "draft_report"]
    assert len(draft) == 1 and "IMPRESSION:" in draft[0].detail and "similar training cases" in draft[0].detail
    mentions = [f for f in r.findings if f.label.startswith("draft_report:")]
    assert mentions and all(f.label.split(":", 1)[1] in load_catalogue().findings for f in mentions)
    assert observations([r.model_dump()], load_catalogue()) == []  # citable text only, never counted as evidence
    assert r.summary.startswith("Draft report")
    plain = tool.run(rad, {"knowledge": False}, ctx=_ctx(cid))
    assert plain.status == "ok" and "similar training cases" not in plain.findings[0].detail


def test_bad_inputs_give_clear_errors(tool, tmp_path):
    r = tool.run(None, None, ctx=_ctx())
    assert r.status == "failed" and "missing" in r.error
    blank = Radiograph(array=np.zeros((64, 64), np.float32), spacing=(1.0, 1.0), source=Path("<blank>"), view="PA")
    r = tool.run(blank, None, ctx=_ctx())
    assert r.status == "failed" and "blank" in r.error
    lateral = Radiograph(array=np.random.default_rng(0).random((64, 64), np.float32), spacing=(1.0, 1.0),
                         source=Path("lat.png"), view="LAT")
    r = tool.run(lateral, None, ctx=_ctx())
    assert r.status == "failed" and "lat.png: view is lateral" in r.error
    r = tool.run(blank, {"beam": 3}, ctx=_ctx())
    assert r.status == "failed" and "beam" in r.error
    with pytest.raises(ModalityMismatch):
        tool.run(blank, None, ctx=RunContext(study_id="ct", modality=Modality.CT))
    folder = tmp_path / "case"
    shutil.copytree(EXAMPLES / "s2026-0000", folder, ignore=shutil.ignore_patterns("ct*"))
    (folder / "cxr.png").unlink()
    case = load_case(folder)
    with pytest.raises(CaseDataError, match="cxr.png"):
        load_study(folder, next(s for s in case.studies if s.modality == Modality.XR))


def test_unavailable_without_a_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(ReportGeneration, "checkpoint", tmp_path / "none.pt")
    assert not ReportGeneration.available()
    r = ReportGeneration(device="cpu").run(None, None, ctx=_ctx())
    assert r.status == "failed" and "train_report_gen" in r.error
