"""Train the chest-radiograph report generator (tools/report_generation.py): knowledge-enhanced and baseline.

    python -m training.train_report_gen --out-dir runs/report_gen                  # both models (~30 min, 1 thread)
    python -m training.train_report_gen --out-dir runs/report_gen --ship-only --ship checkpoints/report_gen.pt

Steps (data, graph and the language model are cached under --out-dir; the two captioners are retrained):
1. data: cohort-faithful (radiograph, report) pairs (training/report_gen_data.py), train and validation seeds;
2. frozen visual features from the cxr_analysis CNN (checkpoints/cxr_findings.pt, copied into the bundle);
3. vocabulary (IU words seen >= 3 times + every training-report word) and the general knowledge graph:
   catalogue findings + anatomy words; edges = positive PMI of findings through the catalogue's diseases
   (P(i, j) = sum_d pi_d P(i|d) P(j|d)), positive PMI of IU co-occurrence (MeSH major terms through
   core.iu_reports.mesh_labels, plus rule-read mentions for findings no MeSH label covers), and positive
   PMI of finding / anatomy co-mention within IU and training-report sentences; self loops; rows normalised;
4. language-model pretraining of the decoder on the IU report text (next word, no image; --lm-minutes);
5. image -> report training of the baseline (no knowledge) and the knowledge-enhanced model from those
   weights, on canonically ordered targets (--no-canonical: the reports as written); each training case's
   neighbours come from the training bank with the case itself excluded, and a quarter of the cases train
   with their knowledge masked. One warm-up epoch, cosine decay over the epochs that fit --train-minutes of
   CPU time; the epoch with the lowest validation loss is kept. Bundles are float16 (.pt).
Measured on a shared 2-core machine, one thread: rendering 960 + 64 pairs ~15 min (0.7-1.5 s each), graph
60 s, LM 3 CPU-min, each captioner 5 CPU-min (7-9 min wall under load).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.report_generation import (HEADERS, PAD, SPECIALS, Backbone, Bank, GenConfig, KnowledgeBatch, KnowledgeGraph,
                                     ReportGenerator, Vocab, build_model, canonical_order, retrieval_embedding,
                                     save_bundle, sentences, tokenize)
from training.report_gen_data import make_pairs

ANATOMY = {  # node -> words that mention it (the first one names the node)
    "upper lobe": ("upper", "apical", "apex", "apices"), "middle lobe": ("middle", "lingula", "lingular"),
    "lower lobe": ("lower", "base", "bases", "basilar", "basal"), "right": ("right",), "left": ("left",),
    "hilum": ("hilar", "hilum", "hila"), "mediastinum": ("mediastinum", "mediastinal"),
    "heart": ("heart", "cardiac"), "pleural space": ("pleural", "pleura"), "hemithorax": ("hemithorax",),
    "costophrenic angle": ("costophrenic",), "diaphragm": ("diaphragm", "hemidiaphragm", "diaphragmatic"),
    "aorta": ("aorta", "aortic"), "spine": ("spine", "thoracic", "vertebral"), "retrocardiac": ("retrocardiac",),
}


@dataclass
class Args:
    out_dir: Path = Path("runs/report_gen")
    seed: int = 4100  # training pairs
    val_seed: int = 4101
    n_train: int = 960
    n_val: int = 64
    d: int = 128
    lm_minutes: float = 3.0  # IU language-model pretraining budget (CPU time / threads)
    train_minutes: float = 5.0  # per model
    max_epochs: int = 60
    epochs: int = 0  # fixed epoch count; 0 = as many as fit train_minutes (measured on the first epoch)
    batch: int = 32
    lr: float = 5e-4
    canonical: bool = True  # train on canonically ordered FINDINGS (tools/report_generation.canonical_order)
    ship: Path | None = None
    models: tuple[str, ...] = ("baseline", "knowledge")


# ------------------------------------------------------------------ features, vocabulary, graph

def cxr_backbone(path: Path = Path("checkpoints/cxr_findings.pt")) -> tuple[Backbone, dict]:
    from tools.cxr_analysis import load_model

    net, ck = load_model(path, "cpu")
    cfg = {"n_out": len(ck["findings"]), "widths": list(ck["config"]["widths"]), "lse_r": float(ck["config"]["lse_r"]),
           "findings": list(ck["findings"]), "version": ck.get("version", "")}
    return Backbone(net), cfg


@torch.no_grad()
def features(backbone: Backbone, images: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    fs, ls = [], []
    for i in range(0, len(images), batch):
        f, lg = backbone(torch.from_numpy(np.asarray(images[i:i + batch], np.float32)))
        fs.append(f)
        ls.append(lg)
    return torch.cat(fs), torch.cat(ls)


def build_vocab(iu_tokens: list[list[str]], train_tokens: list[list[str]], min_iu: int = 3) -> Vocab:
    c = Counter(t for toks in iu_tokens for t in toks)
    words = {w for w, n in c.items() if n >= min_iu} | {t for toks in train_tokens for t in toks}
    words |= set(HEADERS) | {":"}
    return Vocab([*SPECIALS, *sorted(words)])


def _ppmi(joint: np.ndarray, pi: np.ndarray, pj: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log(joint / np.outer(pi, pj))
    return np.nan_to_num(np.maximum(v, 0.0), nan=0.0, posinf=0.0, neginf=0.0)


def build_graph(iu_reports: list, train_reports: list[str]) -> KnowledgeGraph:
    from core.catalogue import load_catalogue
    from core.iu_reports import mesh_labels
    from core.reports import read_findings

    cat = load_catalogue()
    chest = cat.chest_diseases()
    fkeys = sorted({k for d in chest for k in d.findings} | {k for k, f in cat.findings.items() if f.xr})
    nodes = fkeys + list(ANATOMY)
    n, nf = len(nodes), len(fkeys)
    fi = {k: i for i, k in enumerate(fkeys)}
    # 1. through the catalogue's diseases (findings independent given the disease)
    pi = np.array([d.weight for d in chest]) / sum(d.weight for d in chest)
    P = np.array([[d.findings.get(k, 0.0) for k in fkeys] for d in chest])
    w_cat = _ppmi(np.einsum("d,di,dj->ij", pi, P, P), pi @ P, pi @ P)
    np.fill_diagonal(w_cat, 0)
    # 2. IU report co-occurrence: MeSH major terms (human coding), rule-read mentions where no label exists
    by_label: dict[str, list[str]] = {}
    for k in fkeys:
        if cat.findings[k].ct_rate:
            by_label.setdefault(cat.findings[k].ct_rate, []).append(k)
    unlabelled = [k for k in fkeys if not cat.findings[k].ct_rate]
    X = np.zeros((len(iu_reports), nf))
    for r_i, r in enumerate(iu_reports):
        for lab in set().union(*(mesh_labels(m) for m in r.mesh_major)) if r.mesh_major else set():
            for k in by_label.get(lab, []):
                X[r_i, fi[k]] = 1
        read = read_findings(r.text, cat)
        for k in unlabelled:
            if read.get(k) == "present":
                X[r_i, fi[k]] = 1
    C = X.T @ X
    N = len(X) + 1.0
    w_iu = _ppmi((C + 1e-9) / N, (X.sum(0) + 1) / N, (X.sum(0) + 1) / N) * (C >= 3)
    np.fill_diagonal(w_iu, 0)
    # 3. finding / anatomy co-mention within sentences (IU and training reports)
    sents = [s for t in [r.text for r in iu_reports] + list(train_reports)
             for s in re.split(r"(?<=[.])\s+|\n", t) if s.strip()]
    Y = np.zeros((len(sents), n))
    for s_i, s in enumerate(sents):
        words = set(re.findall(r"[a-z]+", s.lower()))
        for k, how in read_findings(s, cat).items():
            if k in fi and how != "absent":
                Y[s_i, fi[k]] = 1
        for a_i, (_, ws) in enumerate(ANATOMY.items()):
            if words & set(ws):
                Y[s_i, nf + a_i] = 1
    Cs, Ns = Y.T @ Y, len(Y) + 1.0
    w_an = _ppmi((Cs + 1e-9) / Ns, (Y.sum(0) + 1) / Ns, (Y.sum(0) + 1) / Ns) * (Cs >= 3)
    mask = np.zeros((n, n), bool)
    mask[:nf, nf:] = mask[nf:, :nf] = True  # only finding <-> anatomy edges from this source
    W = np.zeros((n, n))
    W[:nf, :nf] = w_cat + w_iu
    W += w_an * mask
    W = W + np.eye(n)
    A = W / W.sum(1, keepdims=True)
    names = [cat.findings[k].name for k in fkeys] + list(ANATOMY)
    return KnowledgeGraph(nodes=nodes, kinds=["finding"] * nf + ["anatomy"] * len(ANATOMY), names=names,
                          adjacency=np.round(A, 5).tolist(),
                          provenance={"catalogue_diseases": len(chest), "iu_reports": len(iu_reports),
                                      "sentences": len(sents), "edges_catalogue": int((w_cat > 0).sum()),
                                      "edges_iu": int((w_iu > 0).sum()), "edges_anatomy": int((w_an * mask > 0).sum())})


def finding_labels(reports: list[str], graph: KnowledgeGraph) -> torch.Tensor:
    """[N, n_nodes] 1 where the report asserts (present or hedged) a finding node."""
    from core.reports import read_findings

    out = torch.zeros(len(reports), len(graph.nodes))
    pos = {k: i for i, k in enumerate(graph.nodes)}
    for r_i, t in enumerate(reports):
        for k, how in read_findings(t).items():
            if how != "absent" and k in pos:
                out[r_i, pos[k]] = 1
    return out


def make_bank(ids, reports, emb, vocab: Vocab, graph: KnowledgeGraph) -> Bank:
    sents = [[[vocab.stoi.get(w, 3) for w in s] for s in sentences(tokenize(r))] for r in reports]
    return Bank(ids, emb, sents, finding_labels(reports, graph), reports)


def encode_batch(token_lists: list[list[str]], vocab: Vocab, max_len: int) -> torch.Tensor:
    seqs = [vocab.encode(t, max_len) for t in token_lists]
    L = max(len(s) for s in seqs)
    return torch.tensor([s + [PAD] * (L - len(s)) for s in seqs])


# ------------------------------------------------------------------ training loops

def _cpu_seconds() -> float:
    return time.process_time() / max(torch.get_num_threads(), 1)


def lm_loss(model: ReportGenerator, ids: torch.Tensor, enc=None, bias=None) -> torch.Tensor:
    logits = model.decode(ids[:, :-1], enc, bias)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD)


def pretrain_lm(model: ReportGenerator, ids: torch.Tensor, minutes: float, batch: int = 32, lr: float = 1e-3,
                seed: int = 0, log=print) -> list[float]:
    """Next-word pretraining of the decoder's language side (no image: cross-attention skipped)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    t0, losses = _cpu_seconds(), []
    model.train()
    while _cpu_seconds() - t0 < minutes * 60:
        perm = torch.randperm(len(ids), generator=g)
        tot, seen = 0.0, 0
        for i in range(0, len(ids) - batch + 1, batch):
            b = ids[perm[i:i + batch]]
            b = b[:, : int((b != PAD).sum(1).max())]
            loss = lm_loss(model, b)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach()) * len(b)
            seen += len(b)
            if _cpu_seconds() - t0 > minutes * 60:
                break
        losses.append(tot / max(seen, 1))
        log(f"  LM epoch {len(losses)}: loss {losses[-1]:.3f} ({_cpu_seconds() - t0:.0f} s)")
    return losses


@dataclass
class Split:
    feats: torch.Tensor
    logits: torch.Tensor
    ids: torch.Tensor  # token ids [N, L]
    kb: KnowledgeBatch | None


def batch_loss(model: ReportGenerator, s: Split, idx: torch.Tensor) -> torch.Tensor:
    b = s.ids[idx]
    b = b[:, : int((b != PAD).sum(1).max())]
    # knowledge dropout: some cases train without their knowledge, so the visual path stays competent alone
    use = model.training and s.kb is not None and model.c.knowledge_dropout > 0
    drop = torch.rand(len(idx)) < model.c.knowledge_dropout if use else False
    enc, bias = model.memory(s.feats[idx], s.logits[idx], s.kb.index(idx) if s.kb is not None else None,
                             mask_knowledge=drop)
    return lm_loss(model, b, enc, bias)


def length_batches(ids: torch.Tensor, batch: int, g: torch.Generator, pool: int = 4) -> list[torch.Tensor]:
    """Shuffled full batches, lengths sorted within pools of `pool` batches (less padding), batch order shuffled."""
    perm = torch.randperm(len(ids), generator=g)
    lens = (ids != PAD).sum(1)
    out = []
    for i in range(0, len(perm), batch * pool):
        chunk = perm[i:i + batch * pool]
        chunk = chunk[torch.argsort(lens[chunk])]
        out += [chunk[j:j + batch] for j in range(0, len(chunk) - batch + 1, batch)]
    return [out[int(j)] for j in torch.randperm(len(out), generator=g)]


@torch.no_grad()
def eval_loss(model: ReportGenerator, s: Split, batch: int = 64) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(s.ids), batch):
        idx = torch.arange(i, min(i + batch, len(s.ids)))
        tot += float(batch_loss(model, s, idx)) * len(idx)
        n += len(idx)
    return tot / n


def train_captioner(model: ReportGenerator, tr: Split, va: Split, *, minutes: float, max_epochs: int, batch: int,
                    lr: float, epochs: int = 0, seed: int = 0, log=print) -> dict:
    """One warm-up epoch, then cosine decay over `epochs` (0: as many as fit `minutes` of CPU time)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    t0, hist = _cpu_seconds(), []
    best, best_state = math.inf, None
    steps_per_epoch = max(len(tr.ids) // batch, 1)
    n_epochs = [epochs or max_epochs]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / steps_per_epoch)
        * 0.5 * (1 + math.cos(math.pi * min(s / (n_epochs[0] * steps_per_epoch), 1.0))))
    ep = 0
    while ep < n_epochs[0]:
        model.train()
        tot = 0.0
        for idx in length_batches(tr.ids, batch, g):
            loss = batch_loss(model, tr, idx)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += float(loss.detach()) * batch
        vl = eval_loss(model, va)
        hist.append({"epoch": ep + 1, "train_loss": round(tot / (steps_per_epoch * batch), 4), "val_loss": round(vl, 4),
                     "cpu_s": round(_cpu_seconds() - t0, 1)})
        log(f"  epoch {ep + 1}: train {hist[-1]['train_loss']:.3f} val {vl:.3f} ({hist[-1]['cpu_s']:.0f} s)")
        if vl < best:
            best, best_state = vl, {k: v.clone() for k, v in model.state_dict().items()}
        ep += 1
        if ep == 1 and not epochs:
            n_epochs[0] = int(min(max_epochs, max(2, minutes * 60 // max(hist[0]["cpu_s"], 1e-3))))
    model.load_state_dict(best_state)
    model.eval()
    return {"best_val_loss": round(best, 4), "epochs": len(hist), "history": hist}


# ------------------------------------------------------------------ the whole run

def prepare(a: Args, log=print) -> dict:
    """Data, features, vocabulary, graph and the retrieval bank (all cached under out_dir)."""
    from core.iu_reports import read_iu_reports

    data_dir = a.out_dir / "data"
    tr = make_pairs(a.seed, a.n_train, data_dir)
    va = make_pairs(a.val_seed, a.n_val, data_dir)
    backbone, bcfg = cxr_backbone()
    f_tr, l_tr = features(backbone, tr["images"])
    f_va, l_va = features(backbone, va["images"])
    iu = read_iu_reports()
    iu_tok = [tokenize(r.text) for r in iu]
    target = canonical_order if a.canonical else (lambda t: t)
    tr_tok = [tokenize(target(t)) for t in tr["reports"]]
    vocab = build_vocab(iu_tok, tr_tok)
    graph_file = a.out_dir / f"graph_{a.seed}_{a.n_train}.json"
    if graph_file.is_file():
        graph = KnowledgeGraph.model_validate_json(graph_file.read_text())
    else:
        t0 = time.perf_counter()
        graph = build_graph(iu, tr["reports"])
        graph_file.parent.mkdir(parents=True, exist_ok=True)
        graph_file.write_text(graph.model_dump_json())
        log(f"graph: {len(graph.nodes)} nodes, {graph.provenance} ({time.perf_counter() - t0:.0f} s)")
    e_tr = torch.cat([f_tr.mean(1), f_tr.amax(1), l_tr], 1)
    stats = {"mean": e_tr.mean(0), "std": e_tr.std(0).clamp(min=1e-4)}
    bank = make_bank(tr["ids"], tr["reports"], retrieval_embedding(f_tr, l_tr, stats), vocab, graph)
    return dict(tr=tr, va=va, backbone=backbone, bcfg=bcfg, feats=(f_tr, l_tr, f_va, l_va), iu_tok=iu_tok,
                tr_tok=tr_tok, va_tok=[tokenize(target(t)) for t in va["reports"]], vocab=vocab, graph=graph,
                stats=stats, bank=bank)


def knowledge_for(bank: Bank, emb: torch.Tensor, ids: list[str] | None, cfg: GenConfig) -> KnowledgeBatch:
    idx, sims = bank.query(emb, max(cfg.k_neighbours, cfg.k_facts), ids)
    return bank.knowledge(idx, sims, k_sents=cfg.k_neighbours, max_sents=cfg.max_sents)


def run(a: Args, log=print) -> dict:
    torch.manual_seed(a.seed)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    p = prepare(a, log)
    vocab, graph, bank, stats = p["vocab"], p["graph"], p["bank"], p["stats"]
    f_tr, l_tr, f_va, l_va = p["feats"]
    base_cfg = GenConfig(vocab_size=len(vocab), d=a.d, n_nodes=len(graph.nodes), knowledge=False)
    # 4. language-model pretraining, shared by both models (cached)
    lm_file = a.out_dir / f"lm_d{a.d}_v{len(vocab)}.pt"
    lm = build_model(base_cfg, None, vocab)
    if lm_file.is_file():
        lm.load_state_dict(torch.load(lm_file, weights_only=True))
        lm_hist = json.loads(lm_file.with_suffix(".json").read_text())
    else:
        ids = encode_batch(p["iu_tok"], vocab, base_cfg.max_len)
        t0 = time.perf_counter()
        lm_hist = {"losses": pretrain_lm(lm, ids, a.lm_minutes, seed=a.seed, log=log)}
        lm_hist["seconds"] = round(time.perf_counter() - t0, 1)
        torch.save(lm.state_dict(), lm_file)
        lm_file.with_suffix(".json").write_text(json.dumps(lm_hist))
    results = {"lm": lm_hist}
    tr_ids = encode_batch(p["tr_tok"], vocab, base_cfg.max_len)
    va_ids = encode_batch(p["va_tok"], vocab, base_cfg.max_len)
    e_va = retrieval_embedding(f_va, l_va, stats)
    for name in a.models:
        cfg = base_cfg.model_copy(update={"knowledge": name == "knowledge"})
        out = a.out_dir / f"{name}.pt"
        model = build_model(cfg, graph, vocab)
        missing = model.load_state_dict(lm.state_dict(), strict=False)
        kb_tr = knowledge_for(bank, bank.emb, p["tr"]["ids"], cfg) if cfg.knowledge else None  # self excluded
        kb_va = knowledge_for(bank, e_va, None, cfg) if cfg.knowledge else None
        t0 = time.perf_counter()
        log(f"{name}: {sum(x.numel() for x in model.parameters()) / 1e6:.2f} M parameters "
            f"({len(missing.missing_keys)} tensors new after LM init)")
        rep = train_captioner(model, Split(f_tr, l_tr, tr_ids, kb_tr), Split(f_va, l_va, va_ids, kb_va),
                              minutes=a.train_minutes, max_epochs=a.max_epochs, batch=a.batch, lr=a.lr,
                              epochs=a.epochs, seed=a.seed, log=log)
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        meta = {"version": f"1-{name}-{date.today().isoformat()}", "model": name, "seed": a.seed,
                "canonical_order": a.canonical,
                "data": {"train": f"{a.n_train} cohort-like pairs, seed {a.seed} (training/report_gen_data.py)",
                         "val": f"{a.n_val} pairs, seed {a.val_seed}",
                         "lm": f"{len(p['iu_tok'])} IU reports (torchxrayvision NLMCXR, CC BY-NC-ND 4.0)"},
                "backbone_config": p["bcfg"], "vocab_size": len(vocab), "graph_nodes": len(graph.nodes),
                "training": rep, "lm": lm_hist}
        save_bundle(out, model, p["backbone"], vocab, bank, stats, graph if cfg.knowledge else None, meta)
        results[name] = {**rep, "path": str(out), "meta": meta}
        log(f"{name}: best val loss {rep['best_val_loss']} after {rep['epochs']} epochs, {rep['seconds']:.0f} s "
            f"-> {out}")
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    return results


def ship(out_dir: Path, dest: Path) -> dict:
    """Copy out_dir/knowledge.pt to dest with a JSON sidecar: seed, data, training, and the eval's metrics
    (out_dir/eval.json, written by evals/report_generation.py) when present."""
    import shutil

    src = out_dir / "knowledge.pt"
    side = dict(torch.load(src, map_location="cpu", weights_only=True)["meta"])
    ev = out_dir / "eval.json"
    if ev.is_file():
        side["metrics"] = json.loads(ev.read_text())
    shutil.copyfile(src, dest)
    dest.with_suffix(".json").write_text(json.dumps(side, indent=1))
    print(f"shipped {dest} ({dest.stat().st_size / 1e6:.2f} MB)")
    return side


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = Args()
    for k, v in asdict(d).items():
        if k in ("ship", "models"):
            continue
        if isinstance(v, bool):
            ap.add_argument("--" + k.replace("_", "-"), action=argparse.BooleanOptionalAction, default=v)
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v) if not isinstance(v, Path) else Path, default=v)
    ap.add_argument("--ship", type=Path, default=None, help="copy the knowledge model here (+ .json sidecar)")
    ap.add_argument("--ship-only", action="store_true", help="ship the model already in --out-dir, no training")
    ap.add_argument("--models", default="baseline,knowledge")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    if ns.ship_only:
        return ship(ns.out_dir, ns.ship or Path("checkpoints/report_gen.pt"))
    a = Args(**{k: v for k, v in vars(ns).items() if k not in ("models", "ship_only")},
             models=tuple(ns.models.split(",")))
    res = run(a)
    if a.ship and "knowledge" in res:
        ship(a.out_dir, a.ship)
    return res


if __name__ == "__main__":
    main()
