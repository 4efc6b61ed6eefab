"""CT-CLIP ablation on a held-out synthetic test set: supervised head vs CLIP zero-shot vs CLIP + alignment.

    python -m evals.ctclip --ckpt-dir runs/ctclip --n 200 --seed 9199

Test set: cohort-like chest phantoms with their reports (training/train_ctclip.py `make_dataset`,
no enriched cases, metal at the cohort's rate) from a seed training never used; labels = the
planted findings mapped to the 18 CT-RATE labels (truth, not silver). Variants (training writes
them to --ckpt-dir): `supervised` (stage 1; read out through its classifier head, which is not
zero-shot), `clip` and `clip_align` (read out zero-shot with CT-CLIP's prompt pair).

Metrics, as CT-CLIP's scripts define them (ibrahimethemhamamci/CT-CLIP, scripts/):
- AUC per label (ROC, `zero_shot.py` + `eval.py`), macro mean over the labels with both classes in
  the test set.
- image -> image "MAP@K" (`image_to_image.py`): for every query image, the mean label-set Jaccard
  similarity (|A & B| / |A | B| over the 18 labels) between the query and each of its K nearest
  images (cosine), averaged over queries. It is NOT classic mean average precision (no ranks, no
  precision-at-hit). Gallery: the test images with at least one label, as in CT-CLIP; unlike
  CT-CLIP's script, a query is left out of its own gallery (a self-match would score Jaccard 1).
  The supervised variant has no trained projection: its retrieval uses the pooled encoder features.
- report -> image Recall@K (`text_to_image.py`): the fraction of reports whose own image is among
  the K images most similar to the report's embedding.
- random baselines from the same run: the same retrieval metrics on random Gaussian embeddings
  (mean over --random-draws draws; Recall@K's expectation is K/n), and AUC of random scores.
- silver labels: if evals.label_extraction exists, its LLM-vs-rules AUC on a small set
  (`label_extraction_summary`); otherwise the row says the hook is empty.
The table goes to stdout; the JSON (all numbers, per-label AUCs) to --out.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from core.catalogue import CT_RATE_LABELS

VARIANTS = (("supervised", "supervised only", "head"), ("clip", "+CLIP", "zero-shot"),
            ("clip_align", "+CLIP+align", "zero-shot"))


# ------------------------------------------------------------------ metrics

def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Label-set Jaccard of two 0/1 vectors (CT-CLIP's `calc_similarity`); two empty sets count 1."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def map_at_k(emb: np.ndarray, labels: np.ndarray, ks=(5, 10), exclude_self: bool = True,
             gallery_needs_label: bool = True) -> dict[int, float]:
    """CT-CLIP's image->image "MAP@K": mean over queries of the mean Jaccard of the top-K retrieved."""
    e = np.asarray(emb, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    y = np.asarray(labels).astype(bool)
    gallery = np.nonzero(y.any(1))[0] if gallery_needs_label else np.arange(len(y))
    sim = e @ e[gallery].T  # [n, G]
    if exclude_self:
        sim[gallery, np.arange(len(gallery))] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")
    out = {}
    for k in ks:
        vals = []
        for q in range(len(y)):
            top = [int(gallery[j]) for j in order[q, :k] if np.isfinite(sim[q, j])]
            if top:  # a query whose gallery is only itself has nothing to retrieve
                vals.append(np.mean([jaccard(y[q], y[j]) for j in top]))
        out[int(k)] = float(np.mean(vals)) if vals else float("nan")
    return out


def recall_at_k(text_emb: np.ndarray, img_emb: np.ndarray, ks=(5, 10)) -> dict[int, float]:
    """Report->image Recall@K: share of reports i whose image i is among the K most similar images."""
    sim = np.asarray(text_emb, np.float64) @ np.asarray(img_emb, np.float64).T
    own = np.diag(sim)
    rank = (sim > own[:, None]).sum(1)  # images strictly more similar than the report's own (ties favour it)
    return {int(k): float((rank < k).mean()) for k in ks}


def random_baselines(labels: np.ndarray, ks=(5, 10), d: int = 128, draws: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = len(labels)
    maps = {k: [] for k in ks}
    recs = {k: [] for k in ks}
    aucs = []
    from training.train_ctclip import macro_auc

    for _ in range(draws):
        m = map_at_k(rng.standard_normal((n, d)), labels, ks)
        r = recall_at_k(rng.standard_normal((n, d)), rng.standard_normal((n, d)), ks)
        for k in ks:
            maps[k].append(m[k])
            recs[k].append(r[k])
        aucs.append(macro_auc(labels, rng.random(labels.shape))[0])
    return {"map": {k: float(np.mean(v)) for k, v in maps.items()},
            "recall": {k: float(np.mean(v)) for k, v in recs.items()},
            "recall_expected": {k: k / n for k in ks}, "macro_auc": float(np.mean(aucs)), "draws": draws}


def label_extraction_summary(n: int, threads: int = 2, seed: int = 0, cache_dir: str | None = None,
                             llm_mode: str = "score") -> dict:
    """Hook: LLM-vs-rules silver-label macro AUC on n synthetic CT reports, from evals.label_extraction
    (another issue's module); a clear status instead when it is missing or fails."""
    try:
        from evals import label_extraction
    except ImportError:
        return {"status": "hook empty: evals.label_extraction is not installed"}
    argv = ["--n-synthetic", str(n), "--n-iu", "0", "--methods", "rules,llm", "--threads", str(threads),
            "--seed", str(seed), "--llm-mode", llm_mode] + (["--cache-dir", cache_dir] if cache_dir else [])
    try:
        res = label_extraction.main(argv)
    except SystemExit as e:  # an argparse mismatch: say so rather than fail the whole eval
        return {"status": f"evals.label_extraction.main({argv}) exited: {e}"}
    except Exception as e:  # noqa: BLE001 - the LLM may be unavailable; the CT-CLIP numbers stand alone
        return {"status": f"evals.label_extraction failed: {type(e).__name__}: {e}"}
    methods = (res.get("synthetic") or {}).get("methods") or {}
    out: dict = {"status": "ok", "n": n, "argv": argv}
    for m, v in methods.items():
        out[f"{m} macro AUC"] = float(v.get("macro_auc", float("nan")))
        out[f"{m} failed"] = int(v.get("n_nan", 0))
    return out


# ------------------------------------------------------------------ the run

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-dir", default="runs/ctclip")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=9199)
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10])
    ap.add_argument("--random-draws", type=int, default=20)
    ap.add_argument("--label-extraction-n", type=int, default=100, help="0 = skip the LLM-vs-rules row")
    ap.add_argument("--label-llm-mode", choices=["structured", "score"], default="score")
    ap.add_argument("--label-cache-dir", default=None, help="label-extraction JSONL caches (a rerun resumes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default="runs/ctclip_eval/ctclip.json")
    return ap.parse_args(argv)


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.3f}"


def main(argv: list[str] | None = None) -> dict:
    import torch

    from tools.ctclip import encode_inputs, load_ctclip, text_embedding, zero_shot_probs
    from training.train_ctclip import inputs, macro_auc, make_dataset

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    test = make_dataset(a.seed, a.n, enriched_rate=0.0, metal_rate=0.15, workers=a.workers,
                        cache_dir=Path(a.cache_dir) if a.cache_dir else None)
    y = test["truth"].astype(np.float32)
    ks = tuple(a.ks)
    res: dict = {"n": a.n, "seed": a.seed, "positives": dict(zip(CT_RATE_LABELS, y.sum(0).astype(int).tolist())),
                 "gallery_size": int(y.any(1).sum()), "variants": {},
                 "note": "MAP@K = mean label-set Jaccard of the top-K retrieved (CT-CLIP's image_to_image.py), "
                         "not classic average precision"}
    for key, name, readout in VARIANTS:
        path = Path(a.ckpt_dir) / f"{key}.pt"
        if not path.is_file():
            res["variants"][key] = {"status": f"missing {path}"}
            continue
        model, meta = load_ctclip(path, a.device)
        enc = encode_inputs(model, inputs(test["hu"], [tuple(w) for w in meta["config"]["windows"]]))
        if readout == "head":
            scores = 1 / (1 + np.exp(-enc["logits"]))
            emb = enc["pooled"]
            rec = None
        else:
            scores = zero_shot_probs(model, enc["embedding"])
            emb = enc["embedding"]
            rec = recall_at_k(text_embedding(model, test["reports"]), emb, ks)
        m, per = macro_auc(y, scores)
        res["variants"][key] = {
            "name": name, "readout": readout, "version": meta.get("version"), "macro_auc": m,
            "per_label_auc": {lab: (None if math.isnan(v) else v) for lab, v in zip(CT_RATE_LABELS, per)},
            "map_at_k": map_at_k(emb, y, ks), "recall_at_k": rec,
            "retrieval_embedding": "pooled encoder features" if readout == "head" else "image projection",
            "val_macro_auc_silver": (meta.get("val") or {}).get("macro_auc_silver")}
        v = res["variants"][key]
        print(f"{name} ({readout}): macro AUC {m:.3f}, MAP@K {v['map_at_k']}, R@K {rec}", flush=True)
    res["random"] = random_baselines(y, ks, draws=a.random_draws, seed=a.seed)
    res["label_extraction"] = {"status": "pending"}
    _write(res, a, y, ks, final=False)  # the CT-CLIP numbers stand even if the LLM step below is cut short
    res["label_extraction"] = (label_extraction_summary(a.label_extraction_n, max(a.threads, 2), cache_dir=a.label_cache_dir,
                                                        llm_mode=a.label_llm_mode) if a.label_extraction_n > 0
                               else {"status": "skipped (--label-extraction-n 0)"})
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return _write(res, a, y, ks, final=True)


def _write(res: dict, a, y: np.ndarray, ks, final: bool) -> dict:
    """Build the table (metrics down, variants across), print it when final, write JSON + .md."""
    cols = [(k, n, r) for k, n, r in VARIANTS if "macro_auc" in res["variants"].get(k, {})]
    head = "| metric | " + " | ".join(f"{n} ({r})" for _, n, r in cols) + " | random |"
    lines = [head, "|" + "---|" * (len(cols) + 2)]
    rnd = res["random"]
    lines.append("| macro AUC | " + " | ".join(_fmt(res["variants"][k]["macro_auc"]) for k, _, _ in cols)
                 + f" | {_fmt(rnd['macro_auc'])} |")
    for k_ in ks:
        lines.append(f"| MAP@{k_} (Jaccard) | " + " | ".join(_fmt(res["variants"][k]["map_at_k"][k_]) for k, _, _ in cols)
                     + f" | {_fmt(rnd['map'][k_])} |")
    for k_ in ks:
        lines.append(f"| report->image R@{k_} | "
                     + " | ".join(_fmt((res["variants"][k]["recall_at_k"] or {}).get(k_)) for k, _, _ in cols)
                     + f" | {_fmt(rnd['recall'][k_])} (K/n {k_ / a.n:.3f}) |")
    for i, lab in enumerate(CT_RATE_LABELS):
        lines.append(f"| AUC {lab} (pos {int(y[:, i].sum())}) | "
                     + " | ".join(_fmt(res["variants"][k]["per_label_auc"][lab]) for k, _, _ in cols) + " | 0.5 |")
    le = res["label_extraction"]
    le_txt = (", ".join(f"{k} {v:.3f}" for k, v in le.items() if isinstance(v, float))
              + f" (n={le.get('n')} synthetic reports)") if le.get("status") == "ok" else le.get("status", "")
    lines.append(f"| silver labels: LLM vs rules, macro AUC vs truth | {le_txt} |" + " |" * len(cols))
    table = "\n".join(lines)
    res["table"] = table
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=float) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    if not final:
        return res
    print(f"CT-CLIP ablation, test n={a.n} (seed {a.seed}), gallery {res['gallery_size']} images with >= 1 label")
    print("MAP@K here is CT-CLIP's metric: mean label-set Jaccard over the top-K retrieved, not classic AP.")
    print(table)
    print(f"wrote {out} ({res.get('seconds')} s)")
    return res


if __name__ == "__main__":
    main()
