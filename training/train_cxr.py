"""Train the chest-radiograph finding CNN (tools/cxr_analysis.py) on synthetic radiographs.

    python -m training.train_cxr --n-train 800 --n-val 300 --epochs 24 --out checkpoints/cxr_findings.pt

Data, made on the fly and cached as .npz (a rerun with the same data arguments skips generation):
a procedural chest phantom (core/synth/chest.py) on a coarse grid with the cohort's field of view,
projected with `radiograph_from_ct` straight to the CNN's 128 x 128 input (the DRR is resampled
anyway; at this size it matches a 256 x 256 cohort radiograph area-downsampled to within ~0.005 mean
absolute intensity). Each case draws from its own SeedSequence([seed, index]).
- validation (and evals): cohort-like cases, findings sampled as core/synth/cohort.py does
  (weighted disease, `sample_findings`, random side, severity 0.3-0.9, metal at the cohort rate).
- training: a mix of cohort-like cases and "enriched" cases whose findings (radiograph-visible ones,
  plus CT-only distractors) are drawn independently, so rare findings are seen and co-occurrence
  is not learnt as a shortcut; more metal; wider severity range.
Augmentation per batch: small affine (scale, rotation, shift), mild gamma and contrast, blur, noise.

Training: BCE on the class-map head's LSE-pooled logits, AdamW, one warm-up epoch then cosine decay
over as many epochs as fit `--time-budget-min` (the warm-up epoch's CPU time / threads, so a
shared machine does not shorten training); the epoch with the best
mean validation AUC is kept. Then: head bias shifted by log-odds(cohort prevalence) - log-odds
(training prevalence), so probabilities are calibrated for cohort-like data; per-finding thresholds
maximise F1 on validation; normal ranges of the classical measurements are taken from the
validation cases without the findings that move them. Saved: float16 weights (.pt) + json metadata.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.cxr_analysis import (INPUT_SIZE, WORK_SIZE, CXRNet, measure, normalise, square_resize)

MODEL_MAJOR = "1"  # CXRNet architecture/label-set generation; the weight digest follows it
GENERATOR_VERSION = "cxrgen-1"  # bump when the sampling/rendering below changes (invalidates caches)
_SIDED = ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass", "consolidation", "atelectasis", "cavitation")


def xr_keys() -> list[str]:
    from core.catalogue import load_catalogue

    return [k for k, f in load_catalogue().findings.items() if f.xr]


# ------------------------------------------------------------------ sampling

@dataclass
class CaseDraw:
    planted: list  # PlantedFinding
    metal: str | None
    sex: str
    contrast: bool
    labels: set[str]
    disease: str


def draw_case(rng: np.random.Generator, *, enriched: bool = False, metal_rate: float = 0.15) -> CaseDraw:
    """One case's findings. Cohort-like unless `enriched` (independent findings, for training)."""
    from core.catalogue import load_catalogue
    from core.synth.chest import FINDING_KEYS, PlantedFinding
    from core.synth.cohort import METAL_KINDS, _weighted, sample_findings

    cat = load_catalogue()
    xr = set(xr_keys())
    if enriched:
        keys = [k for k in xr if k != "medical_material" and rng.random() < 0.2]
        keys += [k for k in FINDING_KEYS if k not in xr and rng.random() < 0.06]  # CT-only distractors
        if "lung_mass" in keys and "lung_nodule" in keys and rng.random() < 0.5:
            keys.remove("lung_nodule")
        disease, contrast, sev = "enriched", bool(rng.random() < 0.3), (0.2, 1.0)
    else:
        d = _weighted(rng, cat.chest_diseases())
        keys = sample_findings(rng, d)
        disease, contrast, sev = d.key, d.contrast, (0.3, 0.9)
    metal = str(rng.choice(METAL_KINDS)) if rng.random() < metal_rate else None
    sex = "F" if rng.random() < 0.5 else "M"
    planted = []
    for k in keys:
        if k == "medical_material":
            continue
        side = str(rng.choice(("right", "left"))) if k in _SIDED else "bilateral"
        planted.append(PlantedFinding(key=k, side=side, severity=float(rng.uniform(*sev))))
    labels = {k for k in keys if k in xr} | ({"medical_material"} if metal else set())
    return CaseDraw(planted, metal, sex, contrast, labels, disease)


def render_case(seed: int, index: int, *, enriched_rate: float, metal_rate: float,
                shape: tuple[int, int, int], out_shape: tuple[int, int]) -> tuple[np.ndarray, list[str], float, float]:
    """(radiograph, labels, pixel spacing mm, 1.0 if an enriched draw else 0.0) for case `index` of dataset `seed`."""
    from core.physics.drr import radiograph_from_ct
    from core.synth.chest import make_chest_phantom

    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    enriched = bool(rng.random() < enriched_rate)
    spacing = (240.0 / shape[0], 358.4 / shape[1], 358.4 / shape[2])  # the cohort's field of view
    for _ in range(5):
        c = draw_case(rng, enriched=enriched, metal_rate=metal_rate)
        try:
            ph = make_chest_phantom(rng, c.planted, shape=shape, spacing=spacing, contrast=c.contrast,
                                    metal=c.metal, sex=c.sex, age=int(rng.integers(25, 85)))
            break
        except ValueError:  # "no room to plant finding" on an unlucky combination: draw again
            continue
    else:  # pragma: no cover
        raise RuntimeError(f"could not draw case {seed}/{index}")
    img, pix = radiograph_from_ct(ph.hu, spacing, view="PA", out_shape=out_shape)
    return img, sorted(c.labels), float(pix[0]), 1.0 if enriched else 0.0


def case_sides(seed: int, index: int, *, enriched_rate: float, metal_rate: float) -> tuple[dict[str, str], set[str]]:
    """Replay case `index`'s draw (no rendering): {finding: side} for one-sided findings, and its labels.

    Matches `render_case` unless that case needed a redraw (rare); callers compare the labels."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    enriched = bool(rng.random() < enriched_rate)
    c = draw_case(rng, enriched=enriched, metal_rate=metal_rate)
    return {f.key: f.side for f in c.planted if f.side in ("right", "left")}, c.labels


def _worker_init() -> None:
    torch.set_num_threads(1)


def _render_chunk(job: tuple) -> list:
    seed, indices, kw = job
    return [render_case(seed, i, **kw) for i in indices]


def make_dataset(seed: int, n: int, *, enriched_rate: float, metal_rate: float, shape=(64, 96, 96),
                 out_shape=(INPUT_SIZE, INPUT_SIZE), workers: int = 2, cache_dir: Path | None = None,
                 keys: list[str] | None = None, verbose: bool = True) -> dict[str, np.ndarray]:
    """images [n, H, W] float32, labels [n, K] float32 (K = keys), spacing [n], enriched [n]; cached."""
    keys = keys or xr_keys()
    kw = dict(enriched_rate=float(enriched_rate), metal_rate=float(metal_rate), shape=tuple(int(s) for s in shape),
              out_shape=tuple(int(s) for s in out_shape))
    tag = json.dumps({"gen": GENERATOR_VERSION, "seed": seed, "n": n, "keys": keys, **kw}, sort_keys=True)
    cache = Path(cache_dir or Path(tempfile.gettempdir()) / "grandrounds_cxr_cache")
    f = cache / f"cxr_{hashlib.sha1(tag.encode()).hexdigest()[:16]}.npz"
    if f.exists():
        z = np.load(f)
        if verbose:
            print(f"  dataset seed={seed} n={n}: cached {f}", flush=True)
        return {k: z[k].astype(np.float32) if k == "images" else z[k] for k in z.files}
    t0 = time.perf_counter()
    chunks = [list(range(i, min(i + 25, n))) for i in range(0, n, 25)]
    results: list = []
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as ex:
            for k, part in enumerate(ex.map(_render_chunk, [(seed, c, kw) for c in chunks])):
                results += part
                if verbose and (k + 1) % 8 == 0:
                    print(f"  rendered {len(results)}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        for c in chunks:
            results += _render_chunk((seed, c, kw))
    images = np.stack([r[0] for r in results]).astype(np.float32)
    labels = np.array([[1.0 if k in r[1] else 0.0 for k in keys] for r in results], np.float32)
    out = {"images": images, "labels": labels, "spacing": np.array([r[2] for r in results], np.float32),
           "enriched": np.array([r[3] for r in results], np.float32), "keys": np.array(keys)}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{**out, "images": images.astype(np.float16)})
    tmp.replace(f)
    if verbose:
        print(f"  dataset seed={seed} n={n}: rendered in {time.perf_counter() - t0:.0f} s -> {f}", flush=True)
    return out


def cohort_prevalence(keys: list[str], metal_rate: float = 0.15, n: int = 20000, seed: int = 12345) -> np.ndarray:
    """P(label) under cohort-like sampling (label draws only, no rendering)."""
    rng = np.random.default_rng(seed)
    cnt = np.zeros(len(keys))
    for _ in range(n):
        lab = draw_case(rng, metal_rate=metal_rate).labels
        cnt += [k in lab for k in keys]
    return cnt / n


# ------------------------------------------------------------------ metrics

def auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney with tied ranks); nan when a class is missing."""
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(np.asarray(s, float))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def best_f1_threshold(y: np.ndarray, p: np.ndarray, lo: float = 0.05, hi: float = 0.95) -> tuple[float, float, float, float]:
    """Threshold in [lo, hi] maximising F1 on (y, p); returns (threshold, f1, sensitivity, specificity)."""
    y = np.asarray(y).astype(bool)
    best = (0.5, -1.0, float("nan"), float("nan"))
    for t in np.unique(np.clip(np.concatenate([p, np.linspace(lo, hi, 91)]), lo, hi)):
        pred = p >= t
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best[1] + 1e-9:
            sens = tp / max(int(y.sum()), 1)
            spec = int((~pred & ~y).sum()) / max(int((~y).sum()), 1)
            best = (float(t), f1, sens, spec)
    return best


# ------------------------------------------------------------------ training

def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x [B, 1, H, W] in [0, 1] -> augmented copy (affine, mild gamma/contrast, blur, noise)."""
    B = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (B,)), generator=g)

    ang = u(-4, 4) * math.pi / 180
    sc = u(0.93, 1.07)
    tx, ty = u(-0.05, 0.05), u(-0.05, 0.05)
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity changes stay small: the radiographs are exposure-normalised, and absolute lung density
    # is the cue for emphysema and a collapsed lung (strong gamma augmentation erased it)
    x = x.clamp(0, 1) ** u(0.9, 1.1).view(B, 1, 1, 1)
    x = (x - 0.5) * u(0.95, 1.05).view(B, 1, 1, 1) + 0.5 + u(-0.02, 0.02).view(B, 1, 1, 1)
    blur = torch.rand(B, generator=g) < 0.3
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.02).view(B, 1, 1, 1)
    return x.clamp(0, 1)


@torch.no_grad()
def predict_logits(net: CXRNet, images: np.ndarray, batch: int = 128) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        out.append(net(normalise(torch.from_numpy(images[i:i + batch])[:, None])).numpy())
    return np.concatenate(out)


@dataclass
class TrainArgs:
    n_train: int = 800
    n_val: int = 300
    epochs: int = 24  # an upper bound: time_budget_min usually decides
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 1701
    val_seed: int = 1702
    enriched_rate: float = 0.5
    train_metal_rate: float = 0.3
    cohort_metal_rate: float = 0.15
    phantom_shape: tuple[int, int, int] = (64, 96, 96)
    widths: tuple[int, ...] = (16, 32, 64, 128)
    lse_r: float = 5.0
    dropout: float = 0.1
    workers: int = 2
    threads: int = 2
    time_budget_min: float = 6.0  # training time (CPU time / threads, data excluded) the epoch count is fitted to
    cache_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "grandrounds_cxr_cache"))
    out: str = "checkpoints/cxr_findings.pt"


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    d = TrainArgs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, val in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(val, tuple):
            ap.add_argument(flag, type=int, nargs=len(val) if name == "phantom_shape" else "+", default=val)
        else:
            ap.add_argument(flag, type=type(val), default=val)
    ns = ap.parse_args(argv)
    kw = vars(ns)
    kw["phantom_shape"], kw["widths"] = tuple(kw["phantom_shape"]), tuple(kw["widths"])
    return TrainArgs(**kw)


def train(args: TrainArgs) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    keys = xr_keys()
    print(f"findings ({len(keys)}): {', '.join(keys)}", flush=True)
    tr = make_dataset(args.seed, args.n_train, enriched_rate=args.enriched_rate, metal_rate=args.train_metal_rate,
                      shape=args.phantom_shape, workers=args.workers, cache_dir=Path(args.cache_dir), keys=keys)
    va = make_dataset(args.val_seed, args.n_val, enriched_rate=0.0, metal_rate=args.cohort_metal_rate,
                      shape=args.phantom_shape, workers=args.workers, cache_dir=Path(args.cache_dir), keys=keys)
    t_data = time.perf_counter() - t_start
    xtr, ytr = torch.from_numpy(tr["images"])[:, None], torch.from_numpy(tr["labels"])
    yva = va["labels"]
    print(f"train positives: {dict(zip(keys, ytr.sum(0).int().tolist()))}")
    print(f"val positives:   {dict(zip(keys, yva.sum(0).astype(int).tolist()))}", flush=True)

    net = CXRNet(len(keys), widths=args.widths, lse_r=args.lse_r, dropout=args.dropout)
    n_params = sum(p.numel() for p in net.parameters())
    prev_tr = ytr.mean(0).clamp(1e-3, 1 - 1e-3)
    with torch.no_grad():
        net.head.bias.copy_(torch.log(prev_tr / (1 - prev_tr)))  # start at the prior
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(xtr) / args.batch_size)
    # schedule: one linear warm-up epoch, then cosine decay over the epochs that fit the time budget
    # (measured on the warm-up epoch), so a slow or shared machine still ends on a small learning rate
    planned = args.epochs
    g = torch.Generator().manual_seed(args.seed)
    best = (-1.0, None, -1)
    history = []
    t_train0 = time.perf_counter()
    cpu0 = time.process_time()
    for ep in range(args.epochs):
        if ep >= planned:
            break
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        tot = 0.0
        for i in range(steps_per_epoch):
            if ep == 0:
                lr = args.lr * (0.1 + 0.9 * i / steps_per_epoch)
            else:
                frac = ((ep - 1) * steps_per_epoch + i) / max((planned - 1) * steps_per_epoch, 1)
                lr = args.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
            for grp in opt.param_groups:
                grp["lr"] = lr
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb = normalise(augment(xtr[idx], g))
            loss = F.binary_cross_entropy_with_logits(net(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(idx)
        lv = predict_logits(net, va["images"])
        aucs = [auc(yva[:, k], lv[:, k]) for k in range(len(keys))]
        mean_auc = float(np.nanmean(aucs))
        vloss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(lv), torch.from_numpy(yva)))
        history.append({"epoch": ep + 1, "train_loss": round(tot / len(xtr), 4), "val_loss": round(vloss, 4),
                        "val_mean_auc": round(mean_auc, 4)})
        el = time.perf_counter() - t_train0
        if ep == 0:  # CPU seconds / threads: what the epoch would take on an idle machine, unlike wall time
            work = (time.process_time() - cpu0) / max(args.threads, 1)
            fit = int(args.time_budget_min * 60 / max(work, 1e-3))
            planned = max(min(args.epochs, fit), min(args.epochs, 3))
            if planned < args.epochs:
                print(f"time budget {args.time_budget_min} min at {work:.0f} s/epoch (CPU time / {args.threads} threads): "
                      f"{planned} epochs, not {args.epochs}")
        print(f"epoch {ep + 1:2d}/{planned}  train {tot / len(xtr):.4f}  val {vloss:.4f}  "
              f"mean AUC {mean_auc:.3f}  ({el:.0f} s)", flush=True)
        if mean_auc > best[0]:
            best = (mean_auc, {k: v.detach().clone() for k, v in net.state_dict().items()}, ep + 1)
    t_train = time.perf_counter() - t_train0
    t_train_cpu = time.process_time() - cpu0
    net.load_state_dict(best[1])

    # prior shift: training mix -> cohort-like prevalence, folded into the head's bias
    prev_co = np.clip(cohort_prevalence(keys, args.cohort_metal_rate), 1e-3, 1 - 1e-3)
    shift = np.log(prev_co / (1 - prev_co)) - np.log(prev_tr.numpy() / (1 - prev_tr.numpy()))
    with torch.no_grad():
        net.head.bias += torch.from_numpy(shift.astype(np.float32))  # LSE pooling is shift-equivariant
    lv = predict_logits(net, va["images"])
    pv = 1 / (1 + np.exp(-lv))
    per = {}
    thresholds = {}
    for k, key in enumerate(keys):
        y = yva[:, k]
        a = auc(y, pv[:, k])
        if y.sum() >= 3:
            thr, f1, sens, spec = best_f1_threshold(y, pv[:, k])
        else:
            thr, f1, sens, spec = 0.5, float("nan"), float("nan"), float("nan")
        thresholds[key] = round(thr, 4)
        per[key] = {"val_auc": round(a, 4), "val_positives": int(y.sum()), "threshold": round(thr, 4),
                    "val_f1": round(f1, 4), "val_sensitivity": round(sens, 4), "val_specificity": round(spec, 4),
                    "cohort_prevalence": round(float(prev_co[k]), 4), "train_prevalence": round(float(prev_tr[k]), 4),
                    "val_mean_p": round(float(pv[:, k].mean()), 4)}

    normals = classical_normals(va, keys)
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in net.state_dict().items()}
    digest = hashlib.sha1(b"".join(v.numpy().tobytes() for v in sd.values())).hexdigest()[:8]
    version = f"{MODEL_MAJOR}-{digest}"  # short: `tools list` prints it in a narrow column

    meta = {
        "version": version, "trained_on": date.today().isoformat(), "findings": keys, "thresholds": thresholds,
        "normals": normals,
        "val_auc": {k: per[k]["val_auc"] for k in keys},
        "val_mean_auc": round(float(np.nanmean([per[k]["val_auc"] for k in keys])), 4),
        "per_finding": per, "best_epoch": best[2], "epochs_run": len(history), "history": history, "parameters": n_params,
        "config": {"widths": list(args.widths), "lse_r": args.lse_r, "input_size": INPUT_SIZE},
        "training_args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
        "generator": GENERATOR_VERSION,
        "seconds": {"data": round(t_data, 1), "train": round(t_train, 1),
                    "train_cpu": round(t_train_cpu, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "findings": keys, "config": meta["config"], "version": version,
                "thresholds": thresholds, "normals": normals}, out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(f"\nsaved {out} ({out.stat().st_size / 1e6:.2f} MB, {n_params} parameters), version {version}")
    print("| finding | val AUC | positives | threshold | sens | spec |\n|---|---|---|---|---|---|")
    for k in keys:
        p = per[k]
        print(f"| {k} | {p['val_auc']:.3f} | {p['val_positives']} | {p['threshold']:.2f} | "
              f"{p['val_sensitivity']:.2f} | {p['val_specificity']:.2f} |")
    print(f"mean val AUC {meta['val_mean_auc']:.3f}; seconds {meta['seconds']}")
    return meta


def classical_normals(va: dict, keys: list[str]) -> dict:
    """Normal ranges of the classical measurements from validation cases without the findings that move them."""
    y = va["labels"]
    col = {k: i for i, k in enumerate(keys)}
    rows = []
    for img, sp in zip(va["images"], va["spacing"]):
        work, scale, _ = square_resize(img, WORK_SIZE)
        m, _ = measure(work, (float(sp) * scale, float(sp) * scale))
        rows.append(m)
    no_cardio = (y[:, col["cardiomegaly"]] == 0) & (y[:, col["pleural_effusion"]] == 0)
    clear = y[:, [col[k] for k in keys if k not in ("emphysema", "cardiomegaly", "medical_material")]].sum(1) == 0

    def vals(name, sel):
        v = np.array([r[name] for r, s in zip(rows, sel) if s and r[name] is not None], float)
        return v[np.isfinite(v)]

    ctr = vals("cardiothoracic_ratio", no_cardio)
    ctr_c = vals("cardiothoracic_ratio", ~no_cardio & (y[:, col["cardiomegaly"]] == 1))
    out = {"cardiothoracic_ratio": {"upper": round(float(np.percentile(ctr, 97.5)), 4) if len(ctr) > 10 else 0.5,
                                    "mean": round(float(ctr.mean()), 4) if len(ctr) else None,
                                    "n": int(len(ctr)),
                                    "cardiomegaly_mean": round(float(ctr_c.mean()), 4) if len(ctr_c) else None}}
    for name in ("lung_area_asymmetry", "lung_density_asymmetry"):
        v = vals(name, clear)
        out[name] = {"mean": round(float(v.mean()), 4), "sd": round(float(max(v.std(), 1e-3)), 4), "n": int(len(v))}
    return out


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
