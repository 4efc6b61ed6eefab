"""Train FuseCPath (tools/fusecpath.py): per-encoder ABMIL teachers first, then the fused student.

    python -m training.train_fusecpath --features DIR --out runs/fusecpath/fusecpath.pt
    python -m training.train_fusecpath --slides --n-train 60 --n-val 24 --n-test 30 --out checkpoints/fusecpath.pt
    python -m training.train_fusecpath --synthetic --seed 0 --out runs/fusecpath/fusecpath.pt
    python -m training.train_fusecpath --synthetic --benchmark --seeds 0,1,2,3,4 --out runs/fusecpath_bench

Features: a directory of per-slide .npz files (one [N, d_e] array per encoder over the same tiles,
`coords` [N, 2], `label`), split stratified by `--seed` into train / val (early stopping) / test.
`--slides` makes synthetic H&E slides (core.synth.slides) and runs them through the tile pipeline and the
patch encoders; `--synthetic` makes multi-view feature bags directly (`synthetic_bags`, fast, for tests). Every model is trained one slide per
step (bags differ in size) with AdamW and early stopping on the validation CE; `--cpu-seconds` caps the
process CPU time of the whole run, shared evenly by the models still to train. Writes the student
checkpoint and a JSON sidecar (config, seed, metrics). `--benchmark` runs `evaluate` per seed instead
(one JSON per seed under `--out`, a re-run skips seeds done): each single-encoder ABMIL, concat-ABMIL,
FuseCPath and its three ablations, accuracy and macro one-vs-rest AUC on the test split.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split

from core.device import pick_device
from tools.fusecpath import (ABMIL, SLIDE_GRID, FilterConfig, FuseConfig, Selection, SlideBag, TileScorer, build_student,
                             check_bags, consensus_clusters, distillation_loss, fit_scorer, load_bags,
                             save_checkpoint, select_tiles, to_tensors)

SYNTH_DIMS = {"enc_a": 48, "enc_b": 64, "enc_c": 32}
SYNTH_CLASSES = ["class_0", "class_1", "class_2"]


# ---------------------------------------------------------------- synthetic multi-view bags

def synthetic_bags(n: int, seed: int, dims: dict[str, int] = SYNTH_DIMS, world: int = 0,
                   tiles: tuple[int, int] = (80, 160), signal: tuple[float, float] = (0.05, 0.2),
                   leak: float = 0.05, noise: float = 1.0, nuisance: float = 1.0,
                   ) -> tuple[list[SlideBag], list[np.ndarray]]:
    """`n` slides of 3 balanced classes and their tiles' truth masks (True = carries class signal).

    `world` fixes what the encoders are (prototypes, projections) so that train / val / test drawn with
    different `seed`s share it. A slide is a grid patch of tiles; a contiguous blob (`signal` fraction)
    is tumour of the slide's class, the rest one of 4 background tissues found in every class. Encoder i
    sees tumour of classes i and i+1 (mod 3) nearly alike (only `leak` of their difference), so one
    encoder alone cannot tell that pair apart while any two together can. Every encoder adds its own
    tile noise and a slide-level nuisance offset (think stain batch) in a few dims of its own.
    """
    wr = np.random.default_rng([world, 7919])
    lat, n_cls, n_bg = 12, len(SYNTH_CLASSES), 4
    views = {}
    for i, e in enumerate(dims):
        own = wr.normal(size=(n_cls, lat))
        proto = own * 1.3
        a, b = i % n_cls, (i + 1) % n_cls
        shared = wr.normal(size=lat) * 1.3
        proto[a], proto[b] = shared + leak * own[a], shared + leak * own[b]
        bg = wr.normal(size=(n_bg, lat)) * 1.3
        proj = wr.normal(size=(dims[e], lat)) / math.sqrt(lat)
        nuis = np.linalg.qr(wr.normal(size=(dims[e], 6)))[0]
        views[e] = (proto, bg, proj, nuis)
    rng = np.random.default_rng([world, seed, 104729])
    labels = rng.permutation(np.arange(n) % n_cls)
    bags, truth = [], []
    for s, y in enumerate(labels):
        m = int(rng.integers(*tiles))
        cells = rng.choice(24 * 24, m, replace=False)
        coords = np.stack([cells // 24, cells % 24], 1) * 256
        d = np.linalg.norm(coords - coords[rng.integers(m)], axis=1)
        sig = np.zeros(m, bool)
        sig[np.argsort(d, kind="stable")[: max(1, round(rng.uniform(*signal) * m))]] = True
        tissue = rng.integers(n_bg, size=m)
        feats = {}
        for e, (proto, bg, proj, nuis) in views.items():
            z = np.where(sig[:, None], proto[y], bg[tissue]) + noise * rng.normal(size=(m, lat))
            offset = nuis @ rng.normal(size=6) * nuisance * 3
            jitter = rng.normal(size=(m, 6)) @ nuis.T * nuisance
            feats[e] = z @ proj.T + offset + jitter + 0.2 * rng.normal(size=(m, dims[e]))
        bags.append(SlideBag(slide_id=f"synth-{world}-{seed}-{s:04d}", features=feats, coords=coords, label=int(y)))
        truth.append(sig)
    return bags, truth


# ---------------------------------------------------------------- training

class TrainConfig(BaseModel):
    lr: float = 5e-4
    weight_decay: float = 1e-4
    max_epochs: int = 40
    patience: int = 6
    device: str = "cpu"


class Item(NamedTuple):
    feats: dict[str, torch.Tensor]
    clusters: torch.Tensor | None
    label: int


class Budget:
    """A process-CPU-time budget shared evenly by the models still to train."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, time.process_time()

    def deadline(self, models_left: int) -> float | None:
        if self.seconds is None:
            return None
        left = self.seconds - (time.process_time() - self.start)
        return time.process_time() + max(left, 0.0) / max(models_left, 1)


def make_items(bags: list[SlideBag], encoders: list[str], sels: list[Selection] | None, device: str) -> list[Item]:
    return [Item(*to_tensors(b, encoders, s, device), int(b.label))
            for b, s in zip(bags, sels or [None] * len(bags))]


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


@torch.no_grad()
def predict_logits(net: nn.Module, items: list[Item]) -> torch.Tensor:
    net.eval()
    return torch.stack([net(it.feats, it.clusters).logits for it in items]).cpu()


def fit(net: nn.Module, train: list[Item], val: list[Item], tcfg: TrainConfig, seed: int,
        teacher_logits: torch.Tensor | None = None, fcfg: FuseConfig | None = None,
        deadline: float | None = None) -> tuple[nn.Module, dict]:
    """One slide per step; keeps the weights of the epoch with the lowest validation CE.

    teacher_logits [n_train, M, C]: when given, CE + distill_weight * distillation_loss per slide.
    """
    net = net.to(tcfg.device)
    opt = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    y_val = torch.tensor([it.label for it in val])
    best, best_state, bad, epochs, out_of_time = math.inf, copy.deepcopy(net.state_dict()), 0, 0, False
    confidence = fcfg is not None and fcfg.teacher_weighting == "confidence"
    for epochs in range(1, tcfg.max_epochs + 1):
        net.train()
        for i in rng.permutation(len(train)):
            it = train[i]
            logits = net(it.feats, it.clusters).logits[None]
            y = torch.tensor([it.label], device=logits.device)
            loss = F.cross_entropy(logits, y)
            if teacher_logits is not None:
                t = teacher_logits[i][:, None, :].to(logits.device)
                loss = loss + fcfg.distill_weight * distillation_loss(logits, t, y if confidence else None,
                                                                      fcfg.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if deadline is not None and time.process_time() > deadline:
                out_of_time = True
                break
        v = F.cross_entropy(predict_logits(net, val), y_val).item()
        if v < best - 1e-4:
            best, best_state, bad = v, copy.deepcopy(net.state_dict()), 0
        else:
            bad += 1
        if bad >= tcfg.patience or out_of_time:
            break
    net.load_state_dict(best_state)
    return net.eval(), {"epochs": epochs, "val_loss": best, "out_of_time": out_of_time}


def metrics(logits: torch.Tensor, labels: list[int], n_classes: int) -> dict[str, float]:
    p = torch.softmax(logits, -1).numpy()
    acc = float(accuracy_score(labels, p.argmax(1)))
    try:
        auc = float(roc_auc_score(labels, p, multi_class="ovr", average="macro", labels=list(range(n_classes)))
                    if n_classes > 2 else roc_auc_score(labels, p[:, 1]))
    except ValueError:  # a class absent from the test labels
        auc = float("nan")
    return {"accuracy": acc, "auc": auc, "n": len(labels)}


class Prepared(NamedTuple):
    scorer: TileScorer
    filtered: list[list[Selection]]  # per split (train, val, test)
    unfiltered: list[list[Selection]]


def prepare(splits: list[list[SlideBag]], cfg: FuseConfig, seed: int) -> Prepared:
    """The tile scorer (train slides only) and each slide's filtered and unfiltered selections."""
    scorer = fit_scorer(splits[0], cfg.encoders, len(cfg.classes), seed=seed)
    filt, unfilt = [], []
    for bags in splits:
        labels = [consensus_clusters([b.features[e] for e in cfg.encoders], cfg.filter.n_clusters, cfg.filter.seed)
                  for b in bags]
        filt.append([select_tiles(b, cfg.encoders, cfg.filter, scorer, True, lab) for b, lab in zip(bags, labels)])
        unfilt.append([select_tiles(b, cfg.encoders, cfg.filter, scorer, False, lab) for b, lab in zip(bags, labels)])
    return Prepared(scorer, filt, unfilt)


def train_teachers(train: list[Item], val: list[Item], cfg: FuseConfig, tcfg: TrainConfig, seed: int,
                   budget: Budget, models_left: int, log: Callable[[str], None] = print) -> dict[str, ABMIL]:
    teachers = {}
    for j, e in enumerate(cfg.encoders):
        net = seeded(seed, lambda: ABMIL([e], cfg.dims, len(cfg.classes), cfg.width, cfg.dropout))
        teachers[e], info = fit(net, train, val, tcfg, seed, deadline=budget.deadline(models_left - j))
        log(f"teacher abmil[{e}]: {info}")
    return teachers


def train_student(cfg: FuseConfig, prep: Prepared, splits: list[list[SlideBag]], train_all: list[Item],
                  teachers: dict[str, ABMIL], tcfg: TrainConfig, seed: int,
                  deadline: float | None) -> tuple[nn.Module, dict, list[Item]]:
    """The student per cfg's switches; returns it, its fit info and its test items.

    train_all: the training slides with every tile, which the teachers see (as slide-level models would).
    """
    sels = prep.filtered if cfg.use_filter else prep.unfiltered
    train, val, test = (make_items(b, cfg.encoders, s, tcfg.device) for b, s in zip(splits, sels))
    t_logits = None
    if cfg.distill:
        t_logits = torch.stack([predict_logits(teachers[e], train_all) for e in cfg.encoders], 1)
    net = seeded(seed, lambda: build_student(cfg))
    net, info = fit(net, train, val, tcfg, seed, t_logits, cfg, deadline)
    return net, info, test


def evaluate(train: list[SlideBag], val: list[SlideBag], test: list[SlideBag], classes: list[str],
             seed: int = 0, tcfg: TrainConfig | None = None, base: FuseConfig | None = None,
             cpu_seconds: float | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Train every model on `train` (early stopping on `val`) and score each on `test`.

    Keys: `abmil[<encoder>]` per encoder, `concat_abmil`, `fusecpath`, and the ablations `no_filter`
    (all tiles), `no_reembed` (filtered tiles concatenated, ABMIL over tiles), `no_distill` (CE only).
    Values: accuracy, macro one-vs-rest AUC, n. `base` sets encoders, widths and filter (its own
    ablation switches are overridden per variant); by default every encoder of the bags.
    """
    tcfg = tcfg or TrainConfig()
    encoders = base.encoders if base else sorted(train[0].features)
    dims = check_bags(train + val + test, encoders)
    cfg = (base.model_copy(update={"dims": dims, "use_filter": True, "re_embed": True, "distill": True}) if base
           else FuseConfig(encoders=encoders, dims=dims, classes=classes))
    budget = Budget(cpu_seconds)
    n_models = len(encoders) + 5
    splits = [train, val, test]
    items_all = [make_items(b, encoders, None, tcfg.device) for b in splits]
    y_test = [int(b.label) for b in test]
    res = {}
    teachers = train_teachers(items_all[0], items_all[1], cfg, tcfg, seed, budget, n_models, log)
    for e, t in teachers.items():
        res[f"abmil[{e}]"] = metrics(predict_logits(t, items_all[2]), y_test, len(classes))
    concat = seeded(seed, lambda: ABMIL(encoders, dims, len(classes), cfg.width, cfg.dropout))
    concat, _ = fit(concat, items_all[0], items_all[1], tcfg, seed, deadline=budget.deadline(5))
    res["concat_abmil"] = metrics(predict_logits(concat, items_all[2]), y_test, len(classes))
    prep = prepare(splits, cfg, seed)
    variants = {"fusecpath": {}, "no_filter": {"use_filter": False}, "no_reembed": {"re_embed": False},
                "no_distill": {"distill": False}}
    for j, (name, flags) in enumerate(variants.items()):
        vcfg = cfg.model_copy(update=flags)
        net, info, test_items = train_student(vcfg, prep, splits, items_all[0], teachers, tcfg, seed,
                                              budget.deadline(4 - j))
        res[name] = metrics(predict_logits(net, test_items), y_test, len(classes))
        log(f"{name}: {info} -> {res[name]}")
    return res


# ---------------------------------------------------------------- CLI

def slide_splits(sizes: tuple[int, int, int], seed: int, slide_size: tuple[int, int], work: Path,
                 encoders: list[str], grid: dict, device: str = "cpu") -> tuple[list[list[SlideBag]], list[str]]:
    """train / val / test bags from synthetic H&E slides (core.synth.slides), each split its own slide seed;
    slides and features are kept under `work`, so a second run (or another seed's) reuses them."""
    from core.synth.slides import SLIDE_CLASSES, write_slides
    from tools.fusecpath import slide_bags
    from tools.patch_encoders import get_encoder

    classes = list(SLIDE_CLASSES)
    encs = [get_encoder(e, device=device) for e in encoders]
    splits = []
    for k, n in enumerate(sizes):
        per = max(1, n // len(classes))
        slides = write_slides(per, 1000 * seed + k, slide_size, work / "slides", prefix="fc")
        splits.append(slide_bags(slides, classes, encs, grid, cache_dir=work / "features"))
    return splits, classes


def load_splits(args) -> tuple[list[list[SlideBag]], list[str]]:
    """train / val / test bags for one seed: synthetic slides, synthetic bags (same world, distinct draws)
    or a stratified split of a feature folder."""
    if args.slides:
        return slide_splits((args.n_train, args.n_val, args.n_test), args.seed, tuple(args.slide_size),
                            Path(args.work_dir), args.encoders.split(","), slide_grid(args))
    if args.synthetic:
        lo, hi = (float(v) for v in args.signal.split(","))
        draws = [synthetic_bags(n, args.seed * 3 + k, world=args.world, signal=(lo, hi), noise=args.noise)[0]
                 for k, n in enumerate((args.n_train, args.n_val, args.n_test))]
        return draws, list(SYNTH_CLASSES)
    bags, classes = load_bags(Path(args.features))
    y = [b.label for b in bags]
    rest, test = train_test_split(bags, test_size=args.test_frac, stratify=y, random_state=args.seed)
    train, val = train_test_split(rest, test_size=args.val_frac / (1 - args.test_frac),
                                  stratify=[b.label for b in rest], random_state=args.seed)
    return [train, val, test], classes


def slide_grid(args) -> dict:
    return {**SLIDE_GRID, "max_tiles": args.max_tiles}


def _table(runs: list[dict[str, dict[str, float]]]) -> str:
    lines = [f"{'model':<18} {'accuracy':>15} {'macro AUC':>15}   (mean ± sd over {len(runs)} seeds)"]
    for name in runs[0]:
        acc = np.array([r[name]["accuracy"] for r in runs])
        auc = np.array([r[name]["auc"] for r in runs])
        sd = (acc.std(ddof=1), np.nanstd(auc, ddof=1)) if len(runs) > 1 else (0.0, 0.0)
        lines.append(f"{name:<18} {acc.mean():7.3f} ± {sd[0]:5.3f} {np.nanmean(auc):7.3f} ± {sd[1]:5.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--features", help="directory of per-slide .npz files")
    src.add_argument("--synthetic", action="store_true", help="synthetic multi-view bags")
    src.add_argument("--slides", action="store_true", help="synthetic H&E slides through the tile pipeline and "
                     "the patch encoders (--n-train etc. count slides)")
    ap.add_argument("--encoders", default="hed_texture,cnn_simclr,vit_mae", help="with --slides")
    ap.add_argument("--slide-size", type=int, nargs=2, default=[3072, 2304], help="with --slides: level-0 px")
    ap.add_argument("--max-tiles", type=int, default=SLIDE_GRID["max_tiles"], help="with --slides: tiles per slide")
    ap.add_argument("--work-dir", default="runs/fusecpath_slides", help="with --slides: slides + feature cache")
    ap.add_argument("--out", default="runs/fusecpath/fusecpath.pt",
                    help="checkpoint path (with --benchmark: a directory, one seed_<n>.json per seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benchmark", action="store_true", help="evaluate every model and ablation per seed")
    ap.add_argument("--seeds", default="0,1,2", help="with --benchmark")
    ap.add_argument("--n-train", type=int, default=90)
    ap.add_argument("--n-val", type=int, default=30)
    ap.add_argument("--n-test", type=int, default=90)
    ap.add_argument("--world", type=int, default=0, help="synthetic: which encoders / prototypes")
    ap.add_argument("--signal", default="0.05,0.2", help="synthetic: range of a slide's tumour-tile fraction")
    ap.add_argument("--noise", type=float, default=1.0, help="synthetic: tile noise (latent sd)")
    ap.add_argument("--val-frac", type=float, default=0.15)
    ap.add_argument("--test-frac", type=float, default=0.25)
    ap.add_argument("--keep", type=float, default=0.5, help="tiles kept per slide: fraction (<=1) or count")
    ap.add_argument("--n-clusters", type=int, default=8)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--no-filter", action="store_true")
    ap.add_argument("--no-reembed", action="store_true")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--cpu-seconds", type=float, default=None, help="process CPU-time budget of the run")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    tcfg = TrainConfig(lr=args.lr, max_epochs=args.epochs, patience=args.patience, device=pick_device(args.device))
    filt = FilterConfig(n_clusters=args.n_clusters, keep=args.keep, seed=args.seed)

    def base(splits, classes) -> FuseConfig:
        encoders = sorted(splits[0][0].features)
        return FuseConfig(encoders=encoders, dims=check_bags([b for s in splits for b in s], encoders),
                          classes=classes, width=args.width, filter=filt, use_filter=not args.no_filter,
                          re_embed=not args.no_reembed, distill=not args.no_distill,
                          tile_grid=slide_grid(args) if args.slides else None)

    if args.benchmark:  # one JSON per seed under --out: a re-run skips the seeds already done
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            path = out / f"seed_{seed}.json"
            if not path.exists():
                args.seed = seed
                splits, classes = load_splits(args)
                cfg = base(splits, classes).model_copy(update={"filter": filt.model_copy(update={"seed": seed})})
                t1 = time.process_time()
                res = evaluate(*splits, classes, seed=seed, tcfg=tcfg, base=cfg, cpu_seconds=args.cpu_seconds,
                               log=lambda s: print(f"[seed {seed}] {s}", flush=True))
                path.write_text(json.dumps({"seed": seed, "results": res, "args": vars(args),
                                            "config": cfg.model_dump(), "train": tcfg.model_dump(),
                                            "cpu_seconds": time.process_time() - t1}, indent=2))
            runs.append(json.loads(path.read_text())["results"])
        print(_table(runs))
        return

    t0 = time.time()
    splits, classes = load_splits(args)
    cfg = base(splits, classes)
    budget = Budget(args.cpu_seconds)
    items_all = [make_items(b, cfg.encoders, None, tcfg.device) for b in splits]
    teachers = train_teachers(items_all[0], items_all[1], cfg, tcfg, args.seed, budget, len(cfg.encoders) + 1)
    prep = prepare(splits, cfg, args.seed)
    net, info, test_items = train_student(cfg, prep, splits, items_all[0], teachers, tcfg, args.seed,
                                          budget.deadline(1))
    y_test = [int(b.label) for b in splits[2]]
    res = {f"abmil[{e}]": metrics(predict_logits(t, items_all[2]), y_test, len(classes)) for e, t in teachers.items()}
    res["student"] = metrics(predict_logits(net, test_items), y_test, len(classes))
    out = Path(args.out)
    save_checkpoint(out, cfg, net, prep.scorer)
    meta = {"model": "fusecpath", "config": cfg.model_dump(), "seed": args.seed, "train": tcfg.model_dump(),
            "fit": info, "test_metrics": res, "n_slides": [len(s) for s in splits],
            "source": "synthetic" if args.synthetic else str(args.features), "seconds": time.time() - t0}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(res, indent=2))
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
