"""cxr_analysis on a fresh synthetic test set: per-finding AUC of the CNN vs a classical baseline.

    python -m evals.tool_cxr --n 100 --seed 99

Test set: cohort-like cases (findings sampled as core/synth/cohort.py does, metal at the cohort's
rate) on the cohort's own CT grid (96 x 128 x 128, the training data used a coarser grid) projected
to 256 x 256 PA radiographs, from a seed the training never used. Every image goes through
`CXRAnalysis.run` end to end, as in a consult.

Baseline, measured in the same run on the same images: an L2 logistic regression on the tool's
classical measurements alone (CTR, area and density asymmetry, per-side densities and areas, lung
fraction), scored out-of-fold (5-fold, stratified) on the test set itself, so it is tuned on the
test distribution: an optimistic baseline. ratio = CNN AUC / max(baseline AUC, 0.5), the better of
the LR and the prevalence baseline (a constant score, AUC 0.5).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from core.case import Modality
from core.imaging.types import Radiograph
from evals.stats import ece
from tools.base import RunContext
from tools.cxr_analysis import CXRAnalysis, WORK_SIZE, classical_features, measure, square_resize
from training.train_cxr import auc as _rank_auc
from training.train_cxr import case_sides, make_dataset, xr_keys


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    y = np.asarray(y).astype(int)
    if y.min() == y.max():
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:  # numpy/scipy rank statistic, same value
        return _rank_auc(y, s)
    return float(roc_auc_score(y, s))


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """L2-penalised logistic regression by Newton's method (intercept unpenalised); X standardised."""
    Xb = np.hstack([np.ones((len(X), 1)), X])
    w = np.zeros(Xb.shape[1])
    pen = np.full(Xb.shape[1], l2)
    pen[0] = 0.0
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(Xb @ w, -30, 30)))
        g = Xb.T @ (p - y) + pen * w
        H = (Xb * (p * (1 - p))[:, None]).T @ Xb + np.diag(pen + 1e-6)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def oof_logistic(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Out-of-fold scores, folds stratified by label."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), int)
    for cls in (0, 1):
        idx = rng.permutation(np.nonzero(y == cls)[0])
        fold[idx] = np.arange(len(idx)) % folds
    out = np.zeros(len(y))
    for f in range(folds):
        tr, te = fold != f, fold == f
        if y[tr].min() == y[tr].max():
            out[te] = y[tr].mean()
            continue
        mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-9
        w = fit_logistic((X[tr] - mu) / sd, y[tr])
        out[te] = np.hstack([np.ones((te.sum(), 1)), (X[te] - mu) / sd]) @ w
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    keys = xr_keys()
    print(f"test set: seed {args.seed}, n {args.n}, cohort grid (96, 128, 128) -> 256 x 256 PA", flush=True)
    ds = make_dataset(args.seed, args.n, enriched_rate=0.0, metal_rate=0.15, shape=(96, 128, 128),
                      out_shape=(256, 256), workers=args.workers, keys=keys)
    y = ds["labels"]
    tool = CXRAnalysis(device=args.device)
    t0 = time.perf_counter()
    tool.load()
    tool._loaded = True
    load_s = time.perf_counter() - t0
    probs = np.zeros((args.n, len(keys)))
    present = np.zeros((args.n, len(keys)), bool)
    feats, secs, failed = [], [], 0
    side_hits, side_total = 0, 0  # one-sided findings the tool called present: did it name the right side?
    for i in range(args.n):
        rad = Radiograph(array=ds["images"][i], spacing=(float(ds["spacing"][i]),) * 2, source=Path("<eval>"))
        r = tool.run(rad, ctx=RunContext(study_id=f"t{i}", modality=Modality.XR))
        secs.append(r.seconds)
        if r.status != "ok":
            failed += 1
            print(f"  case {i}: failed: {r.error}")
            continue
        by = {f.label: f for f in r.findings}
        for k, key in enumerate(keys):
            probs[i, k] = by[key].probability
            present[i, k] = by[key].present
        sides, labels = case_sides(args.seed, i, enriched_rate=0.0, metal_rate=0.15)
        if labels == {k for k, v in zip(keys, y[i]) if v}:
            for key, side in sides.items():
                if key in by and by[key].present and by[key].location:
                    side_total += 1
                    side_hits += by[key].location.startswith(side)
        work, scale, _ = square_resize(ds["images"][i], WORK_SIZE)
        m, _ = measure(work, (float(ds["spacing"][i]) * scale,) * 2)
        feats.append(classical_features(m))
    X = np.array(feats, float)
    rows = []
    for k, key in enumerate(keys):
        yk = y[:, k]
        cnn = roc_auc(yk, probs[:, k])
        base = roc_auc(yk, oof_logistic(X, yk)) if yk.sum() >= 2 and yk.sum() <= len(yk) - 2 else float("nan")
        pos = yk.astype(bool)
        sens = float(present[pos, k].mean()) if pos.any() else float("nan")
        spec = float((~present[~pos, k]).mean()) if (~pos).any() else float("nan")
        rows.append({"finding": key, "positives": int(yk.sum()), "cnn_auc": cnn, "baseline_auc": base,
                     # against the better of the classical LR and the prevalence baseline (AUC 0.5): with few
                     # positives the out-of-fold LR can fall below chance, which would inflate the ratio
                     "ratio": cnn / max(base, 0.5) if base == base else float("nan"),
                     "sensitivity": sens, "specificity": spec,
                     "mean_p": float(probs[:, k].mean()), "prevalence": float(yk.mean())})
    ctr_auc = roc_auc(y[:, keys.index("cardiomegaly")], X[:, 0])
    mean_cnn = float(np.nanmean([r["cnn_auc"] for r in rows]))
    mean_base = float(np.nanmean([r["baseline_auc"] for r in rows]))
    mean_floor = float(np.nanmean([max(r["baseline_auc"], 0.5) for r in rows]))
    calib = ece(probs.ravel(), y.ravel())
    print("\n| finding | positives | CNN AUC | classical LR AUC | ratio CNN / max(LR, 0.5) | sens @thr | spec @thr "
          "| mean p | prevalence |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['finding']} | {r['positives']} | {r['cnn_auc']:.3f} | {r['baseline_auc']:.3f} | "
              f"{r['ratio']:.2f} | {r['sensitivity']:.2f} | {r['specificity']:.2f} | {r['mean_p']:.3f} | "
              f"{r['prevalence']:.3f} |")
    print(f"| **mean** | | **{mean_cnn:.3f}** | **{mean_base:.3f}** | **{mean_cnn / mean_floor:.2f}** | | | | |")
    print(f"\nCTR alone (no fitting) for cardiomegaly: AUC {ctr_auc:.3f}")
    print(f"calibration (ECE over all finding probabilities): {calib:.3f}")
    print(f"side named correctly for one-sided findings called present: {side_hits}/{side_total}")
    print(f"failed runs: {failed}/{args.n}; model load {load_s:.2f} s; mean {np.mean(secs):.3f} s per image "
          f"(median {np.median(secs):.3f}) on {tool.device}; checkpoint version {tool.version}")
    out = {"n": args.n, "seed": args.seed, "rows": rows, "mean_cnn_auc": mean_cnn, "mean_baseline_auc": mean_base,
           "ctr_auc_cardiomegaly": ctr_auc, "ece": calib, "side_correct": [side_hits, side_total], "failed": failed, "load_seconds": load_s,
           "seconds_per_image": float(np.mean(secs)), "version": tool.version}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
