"""Report -> CT-RATE abnormality labels: LLM vs rules, on synthetic and on real report text.

(a) synthetic: chest CT reports written the way the cohort writes them (sample_findings +
    write_report, metal at the cohort's rate), scored against ct_rate_vector(truth findings).
    The rule reader shares the report writer's vocabulary, so it is an upper bound here.
(b) IU: the Indiana University chest X-ray reports inside the torchxrayvision wheel (FINDINGS +
    IMPRESSION), scored against their human-coded major MeSH terms mapped to the CT-RATE labels
    (core/iu_reports.py documents the mapping); reports tagged "No Indexing" are left out. Rules run
    over all of them, the LLM over a seeded sample of --n-iu (CPU time); rules are also scored on
    that same sample, so the two are compared on the same reports.

Per label: ROC AUC (sklearn; only labels with both classes in the reference count — the table
says how many) and F1 at 0.5; macro = unweighted mean over the counted labels. NaN rows (failed
LLM extractions) are left out of that method's scores and counted. Throughput is reports/s of
extraction (cache hits are not counted).

    python -m evals.label_extraction --n-synthetic 200 --n-iu 200
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from core.catalogue import CT_RATE_LABELS, load_catalogue
from core.reports import PlantedMention, write_report

_LOCATIONS = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe",
              "lingula", "both lower lobes"]


def synthetic_reports(n: int, seed: int = 0, metal_rate: float = 0.15) -> tuple[list[str], np.ndarray]:
    """n cohort-style CT reports and their 0/1 CT-RATE truth (ct_rate_vector of the planted findings)."""
    from core.synth.cohort import METAL_KINDS, case_rng, sample_findings

    cat = load_catalogue()
    diseases = cat.chest_diseases()
    w = np.array([d.weight for d in diseases], dtype=float)
    texts, truth = [], []
    for i in range(n):
        rng = case_rng(seed, i)
        d = diseases[int(rng.choice(len(diseases), p=w / w.sum()))]
        keys = [k for k in sample_findings(rng, d) if k != "medical_material"]  # planted through metal
        metal = str(rng.choice(METAL_KINDS)) if rng.random() < metal_rate else None
        mentions = [PlantedMention(k, str(rng.choice(_LOCATIONS)), float(rng.uniform(4, 45)),
                                   str(rng.choice(["right", "left", "bilateral"]))) for k in keys]
        if metal:
            mentions.append(PlantedMention("medical_material", metal.replace("_", " ")))
            keys.append("medical_material")
        texts.append(write_report(mentions, rng, modality="CT", technique="CT chest.",
                                  impression_dx=d.name if rng.random() < 0.5 else None, metal=metal, cat=cat))
        truth.append(cat.ct_rate_vector(keys))
    return texts, np.array(truth, dtype=float)


def score(y: np.ndarray, s: np.ndarray) -> dict:
    """Per-label and macro AUC / F1@0.5 over rows without NaN."""
    from sklearn.metrics import f1_score, roc_auc_score

    ok = ~np.isnan(s).any(axis=1)
    y, s = y[ok], s[ok]
    per = {}
    for j, lab in enumerate(CT_RATE_LABELS):
        pos = int(y[:, j].sum())
        row = {"n_pos": pos, "auc": float("nan"), "f1": float("nan")}
        if 0 < pos < len(y):
            row["auc"] = float(roc_auc_score(y[:, j], s[:, j]))
            row["f1"] = float(f1_score(y[:, j], s[:, j] >= 0.5, zero_division=0))
        per[lab] = row
    counted = [lab for lab, r in per.items() if not np.isnan(r["auc"])]
    return {"n": int(ok.sum()), "n_nan": int((~ok).sum()), "labels_counted": len(counted),
            "macro_auc": float(np.mean([per[lab]["auc"] for lab in counted])) if counted else float("nan"),
            "macro_f1": float(np.mean([per[lab]["f1"] for lab in counted])) if counted else float("nan"),
            "per_label": per}


def _run(texts, method, backend, args, tag) -> tuple[np.ndarray, dict]:
    from agents.labels import extract_labels

    info: dict = {}
    cache = os.path.join(args.cache_dir, f"{tag}-{method}.jsonl") if args.cache_dir else None
    s = extract_labels(texts, method, backend=backend, progress=args.progress, llm_mode=args.llm_mode,
                       cache=cache, info=info)
    info.pop("failures", None)
    info["n_extracted"] = info.pop("n")  # `n` in the scores is the reports scored (NaN rows left out)
    return s, info


def _table(results: dict) -> str:
    cols = [(k, m) for k in results for m in results[k]["methods"]]
    head = "| label | " + " | ".join(f"{k} {m} AUC / F1" for k, m in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for lab in CT_RATE_LABELS:
        cells = []
        for k, m in cols:
            r = results[k]["methods"][m]["per_label"][lab]
            cells.append("—" if np.isnan(r["auc"]) else f"{r['auc']:.3f} / {r['f1']:.3f} (n+={r['n_pos']})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    for what in ("macro_auc", "macro_f1", "labels_counted", "n", "n_nan", "reports_per_s"):
        cells = []
        for k, m in cols:
            v = results[k]["methods"][m][what]
            cells.append(f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append(f"| **{what}** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-synthetic", type=int, default=200)
    ap.add_argument("--n-iu", type=int, default=300, help="seeded sample of IU reports for the LLM (rules: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="rules,llm")
    ap.add_argument("--llm-mode", choices=["structured", "score"], default="structured")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: up to 8 cores)")
    ap.add_argument("--cache-dir", default=None, help="JSONL caches here, so a rerun resumes")
    ap.add_argument("--iu-archive", default=None, help="NLMCXR_reports.tgz (default: the installed torchxrayvision's)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]

    backend = None
    if "llm" in methods:
        from agents.labels import default_backend

        backend = default_backend(args.threads)
    results: dict = {}
    t_all = time.perf_counter()
    try:
        if args.n_synthetic > 0:
            texts, y = synthetic_reports(args.n_synthetic, args.seed)
            res = {"n_reports": len(texts), "methods": {}}
            for m in methods:
                s, info = _run(texts, m, backend, args, f"synthetic-s{args.seed}-n{len(texts)}")
                res["methods"][m] = {**score(y, s), **info}
            results["synthetic"] = res
        if args.n_iu > 0:
            from core.iu_reports import read_iu_reports

            reports = [r for r in read_iu_reports(args.iu_archive) if r.indexed]
            y_all = np.stack([r.reference() for r in reports])
            texts_all = [r.text for r in reports]
            rng = np.random.default_rng(args.seed)
            pick = np.sort(rng.choice(len(reports), size=min(args.n_iu, len(reports)), replace=False))
            res_all = {"n_reports": len(reports), "methods": {}}
            res_s = {"n_reports": len(pick), "methods": {}}
            if "rules" in methods:
                s, info = _run(texts_all, "rules", None, args, "iu-all")
                res_all["methods"]["rules"] = {**score(y_all, s), **info}
                res_s["methods"]["rules"] = {**score(y_all[pick], s[pick]), **info}
            if "llm" in methods:
                s, info = _run([texts_all[i] for i in pick], "llm", backend, args, "iu-sample")
                res_s["methods"]["llm"] = {**score(y_all[pick], s), **info}
            if res_all["methods"]:
                results["iu_all"] = res_all
            results["iu_sample"] = res_s
    finally:
        if backend is not None:
            backend.close()

    llm = f"LLM: {backend.model}, {args.llm_mode} mode" if backend else "no LLM"
    print(f"\nCT-RATE label extraction ({llm}), {time.perf_counter() - t_all:.0f} s in all")
    print(_table(results))
    for k, r in results.items():
        for m, v in r["methods"].items():
            print(f"{k:10s} {m:5s}: macro AUC {v['macro_auc']:.3f} over {v['labels_counted']} labels, "
                  f"macro F1@0.5 {v['macro_f1']:.3f}, {v['n']} reports ({v['n_nan']} failed), "
                  f"{v['reports_per_s']:.2f} reports/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
