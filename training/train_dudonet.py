"""Train DuDoNet (tools/mar.py) on synthetic chest-phantom slices with inserted metal.

    python -m training.train_dudonet --out checkpoints/dudonet.pt            # the shipped checkpoint
    python -m training.train_dudonet --n-train 32 --epochs 1 --out /tmp/d.pt # smoke test

Data (made on the fly, held in memory): chest phantoms (core/synth/chest.py, random sex/findings)
on the working grid; each slice gets metal, either the phantom's own hardware (METAL_KINDS, same
anatomy drawn with and without it) or CNNMAR-style random discs/ellipses/rods
(`random_metal_mask`). `make_training_pair` simulates each slice twice with
`simulate_ct_acquisition` (titanium / iron / steel, random dose): with metal (input) and without
(clean target). Half the samples use the acquired sinogram as input (the DuDoNet protocol), half
the forward projection of the reconstructed HU image (what the tool can derive from a volume);
the sinogram target matches (clean acquired sinogram / projection of the clean image). The metal
mask given to the network is the thresholded reconstruction (HU > METAL_HU) united with the true
metal, as in evals/restoration_mar.py. Each chunk of 8 slices gets its own material and dose, so
titanium rods, steel pacemakers, iron wires etc. are mixed as in the held-out eval. Variant "v2"
(default) also gets the NMAR sinogram / image and the uncorrected image (tools.mar.DuDoNet).
Schedule: linear warm-up + cosine decay over --epochs; after every epoch the held-out PSNR is
measured (slices from a seed range never used for training, PSNR outside the metal) and the best
epoch's weights are saved; training stops early after --patience epochs without improvement or
when --max-minutes would be exceeded. --init fine-tunes from a checkpoint (the shipped v2.0 is
11 epochs at lr 2e-3, then 5 epochs at 5e-4 on a fresh 640-slice set with --seed 1).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from core.physics.materials import hu_to_mu
from tools.mar import (CHECKPOINT, FOV_MM, GRID, METAL_HU, N_ANGLES, build_model, detect_metal,
                       dudonet_losses, make_training_pair, phantom_metal_slices, prepare_inputs)

VERSION = "2.0"
HELDOUT_SEED = 900_001  # evals use 910_000+; training seeds are args.seed * 1000 + i


INPUT_KEYS = ("s_li", "trace", "x_li", "x_unc", "metal", "s_nmar", "x_nmar")


def make_dataset(rng: np.random.Generator, n: int, projector, reproject_frac: float = 0.5,
                 chunk: int = 8, with_nmar: bool = True) -> dict[str, torch.Tensor]:
    """Network inputs and targets for n slices (tensors on the projector's device). Each chunk of
    `chunk` slices gets its own random metal material (titanium / iron / steel) and dose."""
    grid = projector.image_shape[0]
    hu, metal = phantom_metal_slices(rng, n, grid, grid * projector.pixel_size_mm)
    ps = projector.pixel_size_mm
    parts: dict[str, list] = {}
    for i in range(0, n, chunk):
        pr = make_training_pair(hu[i:i + chunk], metal[i:i + chunk], ps, rng,
                                n_angles=projector.geometry.n_angles)
        det = np.stack([(h > METAL_HU) | m for h, m in zip(pr["hu_metal"], pr["metal"])])  # as the eval
        reproj = rng.random() < reproject_frac
        inp = prepare_inputs(pr["hu_metal"], det, projector, None if reproj else pr["sino_metal"],
                             with_nmar=with_nmar)
        if reproj:
            s_gt = projector.forward(torch.as_tensor(np.clip(hu_to_mu(pr["hu_clean"]), 0, None), device=projector.device))
        else:
            s_gt = torch.as_tensor(pr["sino_clean"], device=projector.device)
        row = {k: inp[k] for k in INPUT_KEYS if k in inp}
        row.update(s_gt=s_gt, x_gt=torch.as_tensor(pr["hu_clean"] / 1000.0 + 1.0, device=projector.device),
                   hu_metal=torch.as_tensor(pr["hu_metal"]), hu_clean=torch.as_tensor(pr["hu_clean"]))
        for k, v in row.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v, 0) for k, v in parts.items()}


def psnr_outside(x_hu: np.ndarray, ref_hu: np.ndarray, metal: np.ndarray, lo: float = -1000.0, hi: float = 1000.0) -> float:
    """PSNR (dB) over non-metal pixels, HU window [lo, hi] scaled to [0, 1]."""
    a = np.clip((x_hu - lo) / (hi - lo), 0, 1)[~metal]
    b = np.clip((ref_hu - lo) / (hi - lo), 0, 1)[~metal]
    return float(10 * np.log10(1.0 / max(np.mean((a - b) ** 2), 1e-12)))


@torch.no_grad()
def heldout_psnr(net, data: dict[str, torch.Tensor], batch: int = 16) -> dict[str, float]:
    """Mean PSNR outside the (dilated) metal of uncorrected, LI, NMAR (when in `data`) and DuDoNet."""
    net.eval()
    x = torch.cat([net({k: v[i:i + batch] for k, v in data.items() if k in INPUT_KEYS})[2]
                   for i in range(0, len(data["x_li"]), batch)])
    out: dict[str, list] = {"uncorrected": [], "LI": [], "DuDoNet": []}
    if "x_nmar" in data:
        out["NMAR"] = []
    for i in range(len(x)):
        m = data["metal"][i].cpu().numpy()
        ref = data["hu_clean"][i].numpy()
        out["uncorrected"].append(psnr_outside(data["hu_metal"][i].numpy(), ref, m))
        out["LI"].append(psnr_outside((data["x_li"][i].cpu().numpy() - 1) * 1000, ref, m))
        if "x_nmar" in data:
            out["NMAR"].append(psnr_outside((data["x_nmar"][i].cpu().numpy() - 1) * 1000, ref, m))
        out["DuDoNet"].append(psnr_outside((x[i].cpu().numpy() - 1) * 1000, ref, m))
    return {k: round(float(np.mean(v)), 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=CHECKPOINT)
    ap.add_argument("--variant", default="v2", choices=["v1", "v2"], help="see tools.mar.DuDoNet")
    ap.add_argument("--n-train", type=int, default=640)
    ap.add_argument("--n-heldout", type=int, default=32)
    ap.add_argument("--size", type=int, default=GRID, help="working grid (px); the tool reads it from the checkpoint")
    ap.add_argument("--epochs", type=int, default=12, help="length of the cosine schedule")
    ap.add_argument("--max-minutes", type=float, default=0, help="stop training after this long (0 = no limit)")
    ap.add_argument("--patience", type=int, default=4, help="stop after this many epochs without a better held-out PSNR")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps with linear warm-up")
    ap.add_argument("--base", type=int, default=12, help="U-Net base channels (SE-Net and IE-Net)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights (fine-tuning; same config)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default; 1 is fastest on a shared 2-core box)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = {"grid": args.size, "fov_mm": FOV_MM, "n_angles": N_ANGLES if args.size == 96 else
              2 * int(math.ceil(args.size * 0.75)), "base_se": args.base, "base_ie": args.base, "depth": 3,
              "variant": args.variant}
    net = build_model(config, args.device)
    if args.init is not None:
        from tools.mar import load_model
        init_net, ck = load_model(args.init, args.device)
        if ck["config"] != config:
            raise SystemExit(f"--init {args.init}: config {ck['config']} differs from {config}")
        net.load_state_dict(init_net.state_dict())
    proj = net.projector

    t0 = time.perf_counter()
    nm = net.needs_nmar
    train = make_dataset(np.random.default_rng(args.seed * 1000 + 1), args.n_train, proj, with_nmar=nm)
    held = make_dataset(np.random.default_rng(HELDOUT_SEED), args.n_heldout, proj, with_nmar=True)
    t_data = time.perf_counter() - t0
    print(f"data: {args.n_train} train + {args.n_heldout} held-out slices in {t_data:.0f} s", flush=True)

    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps = max(args.epochs * math.ceil(args.n_train / args.batch), 1)
    warm = max(int(args.warmup * steps), 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(max(k - warm, 0) / max(steps - warm, 1), 1.0)))))  # linear warm-up, cosine decay
    g = torch.Generator().manual_seed(args.seed)
    history, val_history = [], []
    best = {"psnr": -math.inf, "epoch": 0, "state": None, "heldout": {}}
    t1 = time.perf_counter()
    stop = ""
    for ep in range(args.epochs):
        net.train()
        perm = torch.randperm(args.n_train, generator=g)
        sums, n = {}, 0
        for b in range(0, args.n_train, args.batch):
            idx = perm[b:b + args.batch]
            out = net({k: v[idx] for k, v in train.items() if k in INPUT_KEYS})
            L = dudonet_losses(out, train["s_gt"][idx], train["x_gt"][idx], train["metal"][idx], train["trace"][idx])
            opt.zero_grad()
            L["total"].backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            for k, v in L.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n += 1
        rec = {k: round(v / n, 5) for k, v in sums.items()}
        history.append(rec)
        val = heldout_psnr(net, held)
        val_history.append(val["DuDoNet"])
        if val["DuDoNet"] > best["psnr"]:
            best = {"psnr": val["DuDoNet"], "epoch": ep + 1, "heldout": val,
                    "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
        el = time.perf_counter() - t1
        print(f"epoch {ep + 1}/{args.epochs}: {rec}  held-out {val}  lr {sched.get_last_lr()[0]:.2e}  ({el:.0f} s)",
              flush=True)
        if ep + 1 - best["epoch"] >= args.patience:
            stop = f"no better held-out PSNR for {args.patience} epochs"
        elif args.max_minutes and el * (ep + 2) / (ep + 1) > args.max_minutes * 60:
            stop = f"time budget {args.max_minutes:g} min"
        if stop and ep + 1 < args.epochs:
            print(f"stopping after epoch {ep + 1}: {stop}", flush=True)
            break
    t_train = time.perf_counter() - t1
    if best["state"] is not None:
        net.load_state_dict(best["state"])
    psnr = best["heldout"] or heldout_psnr(net, held)
    print(f"best epoch {best['epoch']}: held-out PSNR outside metal (dB, [-1000, 1000] HU): {psnr}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().to(torch.float16) for k, v in net.state_dict().items()}
    meta = {"version": VERSION, "config": config, "train": {
        "n_train": args.n_train, "n_heldout": args.n_heldout, "epochs_run": len(history), "epochs_schedule": args.epochs,
        "best_epoch": best["epoch"], "stopped": stop or "schedule done", "batch": args.batch, "lr": args.lr,
        "init": str(args.init) if args.init else None, "schedule": "linear warm-up + cosine", "seed": args.seed, "device": args.device,
        "data_seconds": round(t_data, 1), "train_seconds": round(t_train, 1), "threads": torch.get_num_threads(),
        "note": "CPU shared with other jobs: wall times are noisy"},
        "final_losses": history[best["epoch"] - 1] if history and best["epoch"] else (history[-1] if history else {}),
        "loss_history": history, "heldout_psnr_history_db": val_history, "heldout_psnr_db": psnr,
        "paper": "Lin et al., DuDoNet: Dual Domain Network for CT Metal Artifact Reduction, CVPR 2019 (arXiv 1907.00273); "
                 "v2 inputs after DuDoNet++ (Lyu et al., arXiv 2001.00340) plus an NMAR prior input (ours)"}
    torch.save({"state_dict": state, "config": config, "version": VERSION}, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.out.with_suffix('.json')}")
    return meta


if __name__ == "__main__":
    main()
