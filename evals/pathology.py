"""Slide classification on held-out synthetic H&E slides: single encoders, concatenation, FuseCPath.

    python -m evals.pathology --n-slides 180 --seeds 0,1,2

One pool of synthetic lung slides (core.synth.slides; normal / adenocarcinoma / squamous, slide seed
`--pool-seed`, unrelated to the slides the shipped checkpoint was trained on) goes through the tile
pipeline and every patch encoder once (zarr-cached under --work-dir). Per seed a stratified split of
the pool into train / val / test (`--split`) and `training.train_fusecpath.evaluate` trains on train
(early stopping on val) and scores on test: ABMIL on each single encoder, ABMIL on the concatenated
encoders, FuseCPath, and FuseCPath without (i) the clustering filter, (ii) cluster re-embedding,
(iii) distillation. The shipped checkpoint (what the tool runs) is scored on the same test slides,
and its attention is checked against the slides' tumour boxes: the share of its top-k tiles that
lie in tumour against the tumour share of all tiles (tumour slides only).
Prints mean ± sd over seeds; --json writes every number.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def tile_in_tumour(coords: np.ndarray, size0: float, boxes: list) -> np.ndarray:
    """[N] whether each tile's centre lies in one of the slide's tumour boxes ([x, y, w, h], level-0 px)."""
    c = coords + size0 / 2
    inside = np.zeros(len(coords), bool)
    for x, y, w, h in boxes:
        inside |= (c[:, 0] >= x) & (c[:, 0] < x + w) & (c[:, 1] >= y) & (c[:, 1] < y + h)
    return inside


def shipped_scores(bags, slides, classes, top_k: int) -> dict:
    """The shipped checkpoint on these bags: accuracy, AUC, and attention on tumour (tumour slides)."""
    from tools.fusecpath import CHECKPOINT, load_checkpoint, top_tiles
    from training.train_fusecpath import metrics

    import torch

    model = load_checkpoint(CHECKPOINT)
    if model.cfg.classes != classes:
        raise ValueError(f"{CHECKPOINT}: classes {model.cfg.classes} differ from the eval's {classes}")
    grid = model.cfg.tile_grid
    logits, hit, base = [], [], []
    for bag, (path, _) in zip(bags, slides):
        pred = model.predict(bag)
        logits.append(np.log(np.clip([pred.probabilities[c] for c in classes], 1e-9, 1)))
        truth = json.loads(Path(path).with_suffix(".json").read_text())
        if truth["cls"] != "normal_lung" and truth["tumour_boxes"]:
            size0 = grid["tile_px"] * grid["target_mpp"] / truth["mpp"]
            inside = tile_in_tumour(bag.coords, size0, truth["tumour_boxes"])
            hit.append(inside[top_tiles(pred, top_k)].mean())
            base.append(inside.mean())
    out = metrics(torch.tensor(np.array(logits)), [b.label for b in bags], len(classes))
    out.update(top_tiles_in_tumour=float(np.mean(hit)), tiles_in_tumour=float(np.mean(base)), n_tumour=len(hit))
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch
    from sklearn.model_selection import train_test_split

    from core.synth.slides import SLIDE_CLASSES, write_slides
    from tools.fusecpath import CHECKPOINT, SLIDE_GRID, FilterConfig, FuseConfig, check_bags, load_checkpoint, \
        slide_bags
    from tools.patch_encoders import get_encoder
    from training.train_fusecpath import TrainConfig, evaluate

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-slides", type=int, default=180, help="pool size (a multiple of 3)")
    ap.add_argument("--split", default="90,30,60", help="train,val,test slides per seed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--pool-seed", type=int, default=4242)
    ap.add_argument("--slide-size", type=int, nargs=2, default=[3072, 2304])
    ap.add_argument("--encoders", default=None, help="default: the shipped checkpoint's")
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", type=Path, default=Path("runs/eval_pathology"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    shipped = load_checkpoint(CHECKPOINT)
    encoders = a.encoders.split(",") if a.encoders else shipped.cfg.encoders
    grid = shipped.cfg.tile_grid or SLIDE_GRID
    classes = list(SLIDE_CLASSES)
    slides = write_slides(a.n_slides // len(classes), a.pool_seed, tuple(a.slide_size), a.work_dir / "slides",
                          prefix="eval")
    needed = list(dict.fromkeys(encoders + shipped.cfg.encoders))  # the shipped model's too, for its row
    bags = slide_bags(slides, classes, [get_encoder(e, device="cpu") for e in needed], grid,
                      cache_dir=a.work_dir / "features")
    t_data = time.perf_counter() - t0
    dims = check_bags(bags, encoders)
    n_tr, n_va, n_te = (int(v) for v in a.split.split(","))
    if n_tr + n_va + n_te > len(bags):
        raise SystemExit(f"--split {a.split} needs {n_tr + n_va + n_te} slides, the pool has {len(bags)}")
    y = [b.label for b in bags]
    runs, ship = [], []
    for seed in (int(s) for s in a.seeds.split(",")):
        idx = np.arange(len(bags))
        rest, test = train_test_split(idx, test_size=n_te, stratify=y, random_state=seed)
        train, val = train_test_split(rest, train_size=n_tr, test_size=n_va, stratify=[y[i] for i in rest],
                                      random_state=seed)
        base = FuseConfig(encoders=encoders, dims=dims, classes=classes, width=shipped.cfg.width,
                          heads=shipped.cfg.heads, filter=FilterConfig(**{**shipped.cfg.filter.model_dump(),
                                                                          "seed": seed}))
        res = evaluate([bags[i] for i in train], [bags[i] for i in val], [bags[i] for i in test], classes,
                       seed=seed, tcfg=TrainConfig(), base=base, log=lambda s, seed=seed: print(f"[seed {seed}] {s}",
                                                                                                flush=True))
        res["shipped checkpoint"] = shipped_scores([bags[i] for i in test], [slides[i] for i in test], classes,
                                                   a.top_k)
        runs.append(res)
        print(f"[seed {seed}] " + ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in res.items()), flush=True)
    names = list(runs[0])
    print(f"\nHeld-out synthetic slides: pool {len(bags)} ({a.n_slides // 3}/class, slide size {a.slide_size}), "
          f"split train/val/test {a.split} per seed, seeds {a.seeds}; encoders {', '.join(encoders)}; "
          f"data {t_data:.0f} s, total {time.perf_counter() - t0:.0f} s")
    print(f"{'model':<22} {'accuracy':>15} {'macro AUC':>15}")
    table = {}
    for n in names:
        acc = np.array([r[n]["accuracy"] for r in runs])
        auc = np.array([r[n]["auc"] for r in runs])
        sd = (acc.std(ddof=1), auc.std(ddof=1)) if len(runs) > 1 else (0.0, 0.0)
        table[n] = {"accuracy": float(acc.mean()), "accuracy_sd": float(sd[0]), "auc": float(auc.mean()),
                    "auc_sd": float(sd[1])}
        print(f"{n:<22} {acc.mean():7.3f} ± {sd[0]:5.3f} {auc.mean():7.3f} ± {sd[1]:5.3f}")
    hit = np.mean([r["shipped checkpoint"]["top_tiles_in_tumour"] for r in runs])
    base = np.mean([r["shipped checkpoint"]["tiles_in_tumour"] for r in runs])
    print(f"shipped checkpoint attention: top-{a.top_k} tiles in tumour {hit:.3f} vs all tiles {base:.3f} "
          f"(tumour slides of the test splits; x{hit / max(base, 1e-9):.2f})")
    out = {"args": {k: str(v) for k, v in vars(a).items()}, "encoders": encoders, "grid": grid, "runs": runs,
           "table": table, "attention": {"top_in_tumour": hit, "all_in_tumour": base}}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
