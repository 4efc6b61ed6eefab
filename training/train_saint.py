"""Train SAINT slice synthesis (tools/saint.py) on synthetic chest CT phantoms.

    python -m training.train_saint --out checkpoints/saint.pt --n-volumes 12 --factors 2,3,4,5,6 --epochs 20

Data: `--n-volumes` thin-slice phantoms (core/synth/chest.py), each from its own
SeedSequence([seed, i]), with 0-3 random planted findings, a thin z spacing drawn from 1.0-2.5 mm
(the anatomy always spans ~240 mm, so 96-240 slices), 112 x 112 in-plane at 3.2 mm (the cohort's
field of view), a slight blur and 0-20 HU Gaussian noise so they look reconstructed. Thick inputs
are made on the fly for a random factor from `--factors` and a random slice convention (slab mean,
as the cohort's thick studies, 60%; or every f-th slice, the paper's protocol, 40%).

Stage 1 (marginal SR): batches of coronal or sagittal patches (16 thick rows x 96 columns), L1 in
the [0, 1] intensity scale (HU window -1024..2048), Adam with cosine decay.
Stage 2 (fusion): random [z, 64, 64] blocks (10 thick slices); the frozen stage-1 net makes the
coronal- and sagittal-derived blocks, the fusion net is trained with L1 after the consistency step.
Held-out check: phantoms from seed + 10_000 (slab convention, x2 and x4): PSNR of SAINT vs cubic
interpolation along z on the synthesised slices. Saved: float16 weights (.pt) + json metadata.
One `--epochs` = `--steps-per-epoch` stage-1 steps and half as many stage-2 steps.
"""
from __future__ import annotations

import argparse
import math
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from tools.saint import (CHECKPOINT, SAINT, baseline_interp, consistency, fusion_input, interpolate, save_model,
                         thicken, thin_target, to_unit)

FINDINGS = ("lung_nodule", "lung_mass", "consolidation", "ground_glass_opacity", "pleural_effusion", "emphysema",
            "cardiomegaly", "arterial_wall_calcification", "coronary_artery_calcification", "bronchiectasis",
            "cavitation", "atelectasis")
INPLANE = (112, 3.2)


def make_thin_volume(seed_seq, sz: float | None = None, noise: float | None = None) -> tuple[np.ndarray, float]:
    """A thin-slice phantom (HU float32 [Z, 112, 112]) and its z spacing."""
    from core.synth.chest import PlantedFinding, make_chest_phantom

    rng = np.random.default_rng(seed_seq)
    sz = float(rng.uniform(1.0, 2.5)) if sz is None else float(sz)
    nz = int(round(240.0 / sz))
    keys = list(rng.choice(FINDINGS, size=int(rng.integers(0, 4)), replace=False))
    planted = [PlantedFinding(key=str(k), side=str(rng.choice(["right", "left"])),
                              severity=float(rng.uniform(0.3, 0.9))) for k in keys]
    ph = make_chest_phantom(rng, planted, shape=(nz, INPLANE[0], INPLANE[0]), spacing=(sz, INPLANE[1], INPLANE[1]),
                            contrast=bool(rng.random() < 0.3), sex=str(rng.choice(["M", "F"])))
    sigma = float(rng.uniform(0, 20)) if noise is None else float(noise)
    hu = ndi.gaussian_filter(ph.hu, (0.5 * 1.25 / sz, 0.6, 0.6)) + rng.normal(0, sigma, ph.hu.shape)
    return hu.astype(np.float32), sz


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def cubic_z(thick: np.ndarray, factor: int, mode: str) -> np.ndarray:
    return baseline_interp(thick, factor, mode, 3)


class Sampler:
    def __init__(self, vols: list[np.ndarray], factors: list[int], rng: np.random.Generator, p_slab: float = 0.6):
        self.vols = [torch.from_numpy(np.clip(to_unit(v), -0.2, 1.2).astype(np.float32)) for v in vols]
        self.factors, self.rng, self.p_slab = factors, rng, p_slab

    def config(self) -> tuple[int, str]:
        return int(self.rng.choice(self.factors)), ("slab" if self.rng.random() < self.p_slab else "sample")

    def _window(self, Z: int, n_in: int, f: int, mode: str) -> tuple[int, int]:
        n_thin = n_in * f if mode == "slab" else (n_in - 1) * f + 1
        z0 = int(self.rng.integers(0, Z - n_thin + 1))
        return z0, n_thin

    def stage1(self, batch: int, n_in: int = 16, width: int = 96):
        f, mode = self.config()
        lrs, hrs = [], []
        for _ in range(batch):
            v = self.vols[int(self.rng.integers(len(self.vols)))]
            Z, Y, X = v.shape
            z0, n = self._window(Z, n_in, f, mode)
            plane = self.rng.random() < 0.5
            i = int(self.rng.integers(int(0.1 * Y), int(0.9 * Y)))
            c0 = int(self.rng.integers(0, X - width + 1))
            img = v[z0:z0 + n, i, c0:c0 + width] if plane else v[z0:z0 + n, c0:c0 + width, i]
            if self.rng.random() < 0.5:
                img = img.flip(-1)
            lrs.append(torch.from_numpy(thicken(img.numpy(), f, mode)))
            hrs.append(img)
        return torch.stack(lrs)[:, None], torch.stack(hrs)[:, None], f, mode

    def stage2(self, n_in: int = 10, size: int = 64):
        f, mode = self.config()
        v = self.vols[int(self.rng.integers(len(self.vols)))]
        Z, Y, X = v.shape
        z0, n = self._window(Z, n_in, f, mode)
        y0 = int(self.rng.integers(0, Y - size + 1))
        x0 = int(self.rng.integers(0, X - size + 1))
        hr = v[z0:z0 + n, y0:y0 + size, x0:x0 + size]
        return torch.from_numpy(thicken(hr.numpy(), f, mode)), hr, f, mode


def _cosine(opt, step: int, total: int, lr0: float, warm: int = 50):
    lr = lr0 * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    for g in opt.param_groups:
        g["lr"] = lr


def evaluate_heldout(model: SAINT, vols: list[np.ndarray], factors=(2, 4), mode: str = "slab") -> dict:
    out = {}
    for f in factors:
        s, c = [], []
        for v in vols:
            thick = thicken(v, f, mode)
            gt = to_unit(thin_target(v, f, mode))
            pred = to_unit(interpolate(thick, f, model, mode))
            cub = to_unit(cubic_z(thick, f, mode))
            sl = slice(f, gt.shape[0] - f)  # leave out the end slabs (extrapolation)
            clip = lambda a: np.clip(a, 0, 1)[sl, 8:-8, 8:-8]  # noqa: E731
            s.append(psnr(clip(pred), clip(gt)))
            c.append(psnr(clip(cub), clip(gt)))
        out[f"x{f}"] = {"saint_psnr": round(float(np.mean(s)), 3), "cubic_psnr": round(float(np.mean(c)), 3)}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--n-volumes", type=int, default=12)
    ap.add_argument("--factors", default="2,3,4,5,6")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ch", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--fusion-ch", type=int, default=16)
    ap.add_argument("--n-heldout", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is ~10x faster than 2 on a shared 2-core machine for these small convs)")
    ap.add_argument("--version", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    factors = [int(x) for x in args.factors.split(",") if x.strip()]
    t_start = time.time()

    vols = [make_thin_volume(np.random.SeedSequence([args.seed, i]))[0] for i in range(args.n_volumes)]
    t_data = time.time() - t_start
    print(f"{len(vols)} thin phantoms in {t_data:.1f} s: z slices {[v.shape[0] for v in vols]}", flush=True)
    rng = np.random.default_rng(args.seed)
    sampler = Sampler(vols, factors, rng)
    model = SAINT(ch=args.ch, blocks=args.blocks, fusion_ch=args.fusion_ch).to(dev)

    # ---- stage 1
    n1 = args.epochs * args.steps_per_epoch
    opt = torch.optim.Adam(model.sr.parameters(), lr=args.lr)
    losses1, run = [], 0.0
    t1 = time.time()
    for step in range(n1):
        _cosine(opt, step, n1, args.lr)
        lr, hr, f, mode = sampler.stage1(args.batch)
        loss = F.l1_loss(model.sr(lr.to(dev), f, mode), hr.to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        run += loss.item()
        if (step + 1) % args.steps_per_epoch == 0:
            losses1.append(round(run / args.steps_per_epoch, 6))
            print(f"stage 1 epoch {len(losses1)}/{args.epochs}: L1 {losses1[-1]:.5f} ({time.time() - t1:.0f} s)",
                  flush=True)
            run = 0.0
    t1 = time.time() - t1

    # ---- stage 2 (stage 1 frozen)
    model.sr.eval()
    for p in model.sr.parameters():
        p.requires_grad_(False)
    n2 = max(1, n1 // 2)
    spe2 = max(1, args.steps_per_epoch // 2)
    opt = torch.optim.Adam(model.fusion.parameters(), lr=args.lr)
    losses2, base2, run, runb = [], [], 0.0, 0.0
    t2 = time.time()
    for step in range(n2):
        _cosine(opt, step, n2, args.lr)
        lr, hr, f, mode = sampler.stage2()
        lr, hr = lr.to(dev), hr.to(dev)
        with torch.no_grad():
            cor = model.sr(lr.permute(1, 0, 2)[:, None], f, mode)[:, 0].permute(1, 0, 2)
            sag = model.sr(lr.permute(2, 0, 1)[:, None], f, mode)[:, 0].permute(1, 2, 0)
        fused = model.fusion(fusion_input(cor, sag))[:, 0]
        fused = consistency(fused.permute(1, 0, 2), lr.permute(1, 0, 2), f, mode).permute(1, 0, 2)
        loss = F.l1_loss(fused, hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run += loss.item()
        with torch.no_grad():
            runb += F.l1_loss(0.5 * (cor + sag), hr).item()
        if (step + 1) % spe2 == 0:
            losses2.append(round(run / spe2, 6))
            base2.append(round(runb / spe2, 6))
            print(f"stage 2 epoch {len(losses2)}: L1 {losses2[-1]:.5f} (mean of planes {base2[-1]:.5f}, "
                  f"{time.time() - t2:.0f} s)", flush=True)
            run = runb = 0.0
    t2 = time.time() - t2
    model.eval().cpu()

    held = [make_thin_volume(np.random.SeedSequence([args.seed + 10_000, i]), sz=1.25, noise=10.0)[0]
            for i in range(args.n_heldout)]
    metrics = evaluate_heldout(model, held) if held else {}
    print("held-out (seed + 10000, slab, PSNR dB on synthesised slices):", metrics, flush=True)
    total = time.time() - t_start
    meta = {
        "version": args.version or f"saint-{date.today().isoformat()}-s{args.seed}",
        "model": "SAINT (marginal SR with distance-generated kernels + 2.5-D residual fusion)",
        "paper": "Peng et al. 2020, arXiv 2001.00704",
        "config": {**model.config, "factors": factors, "n_volumes": args.n_volumes, "epochs": args.epochs,
                   "steps_per_epoch": args.steps_per_epoch, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                   "intensity_window_hu": [-1024, 2048], "conventions": ["slab", "sample"],
                   "device": args.device, "threads": torch.get_num_threads()},
        "train_seconds": {"data": round(t_data, 1), "stage1": round(t1, 1), "stage2": round(t2, 1),
                          "total": round(total, 1)},
        "losses": {"stage1_l1": losses1, "stage2_l1": losses2, "stage2_mean_of_planes_l1": base2},
        "heldout": {"seed": args.seed + 10_000, "n": len(held), "thin_mm": 1.25, "mode": "slab",
                    "psnr_db": metrics},
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    save_model(model, args.out, meta)
    print(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB) in {total:.0f} s", flush=True)
    return meta


if __name__ == "__main__":
    main()
