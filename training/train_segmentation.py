"""Train the 3-D chest CT segmentation UNet of tools/segmentation.py on procedural chest phantoms.

    python -m training.train_segmentation --out checkpoints/segmentation.pt --n-train 64 --epochs 40

The shipped checkpoint is two rounds on CPU (1 thread, `nice`), ~24 min in all; see "reproduce" in
checkpoints/segmentation.json:
    round 1: --out /tmp/round1.pt --n-train 64 --n-sim 24 --epochs 40 --max-minutes 13
    round 2 (lesion-focused fine-tuning, new volumes): --init /tmp/round1.pt --seed 1 --enrich 0.95
             --lesion-weight 3 --lesion-p 0.75 --lr 1.5e-3 --max-minutes 11

Data: phantoms from core/synth/chest.py with findings drawn as the cohort draws them (disease by
catalogue weight, findings by P(finding | disease), sides at random), enriched so that every other
volume also carries one of the segmented lesion keys (nodule, mass, consolidation, effusion,
pneumothorax, atelectasis). Training volumes come from `case_rng(TRAIN_SEED, i)` and validation
volumes from `case_rng(VAL_SEED, i)`; evals/tool_segmentation.py uses another seed (EVAL_SEED there).
Most volumes are drawn directly on the working grid (4 mm) from the phantom HU; `--n-sim` of them are
drawn on the cohort's CT grid, passed through the CT acquisition simulation (core.physics: Poisson
noise, beam hardening, metal streaks, FBP) and resized to the working grid as the tool does.

Augmentation (MONAI, on HU of each crop): Gaussian noise (std up to 80 HU), Gaussian smoothing (up to
1.2 voxels in-plane, 1.5 across slices: thick slices), intensity shift/scale. No left-right flips:
the labels are sided. Crops of `--roi` (48 x 64 x 64 voxels at 4 mm); 60% centred on a lesion voxel
when the volume has one. Loss: `monai.losses.DiceCELoss` (softmax, batch Dice). AdamW with a
warm-up and cosine decay whose progress is max(step fraction, time fraction) so a `--max-minutes`
stop still ends annealed. Writes the checkpoint (state dict + config, < 1 MB) and a JSON with the
config, train time, loss curve and held-out Dice per class.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from tools.segmentation import CLASSES, DEFAULT_CONFIG, FINDING_TO_CLASS, build_model, segment, target_from_phantom

TRAIN_SEED = 1000
VAL_SEED = 2000
FOV_MM = (240.0, 358.4, 358.4)  # the cohort's CT field of view (z, y, x)
LESION_KEYS = ("lung_nodule", "lung_mass", "consolidation", "pleural_effusion", "pneumothorax", "atelectasis")
LATERAL = ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass", "consolidation", "atelectasis", "cavitation")


def draw_findings(rng: np.random.Generator, enrich: float = 0.5):
    """(planted findings, contrast) as the cohort draws a chest case, plus an extra lesion key with p=enrich."""
    from core.catalogue import load_catalogue
    from core.synth.chest import FINDING_KEYS, PlantedFinding
    from core.synth.cohort import _weighted, sample_findings

    cat = load_catalogue()
    d = _weighted(rng, cat.chest_diseases())
    keys = [k for k in sample_findings(rng, d) if k in FINDING_KEYS]
    if rng.random() < enrich:
        k = str(rng.choice(LESION_KEYS))
        if k not in keys:
            keys.append(k)
    planted = []
    for k in keys:
        side = str(rng.choice(("right", "left"))) if k in LATERAL else "bilateral"
        planted.append(PlantedFinding(key=k, side=side, severity=float(rng.uniform(0.2, 0.95))))
    return planted, bool(d.contrast)


def make_volume(rng: np.random.Generator, config: dict, simulate: bool = False,
                cohort_shape=(96, 128, 128), enrich: float = 0.5) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(HU, class map) on the working grid, and the phantom's finding records."""
    from core.synth.chest import make_chest_phantom

    planted, contrast = draw_findings(rng, enrich)
    metal = str(rng.choice(("spinal_hardware", "pacemaker", "port", "sternal_wires"))) if rng.random() < 0.12 else None
    sex = "F" if rng.random() < 0.5 else "M"
    sp = tuple(float(s) for s in config["spacing_mm"])
    if not simulate:
        shape = tuple(int(round(f / s)) for f, s in zip(FOV_MM, sp))
        spacing = tuple(f / n for f, n in zip(FOV_MM, shape))
        ph = make_chest_phantom(rng, planted, shape=shape, spacing=spacing, contrast=contrast, metal=metal, sex=sex)
        return ph.hu, target_from_phantom(ph.organs, ph.lesions, ph.findings), ph.findings
    from monai.transforms import Resize

    from core.physics import simulate_ct_acquisition
    from tools.segmentation import working_shape

    spacing = tuple(f / n for f, n in zip(FOV_MM, cohort_shape))
    ph = make_chest_phantom(rng, planted, shape=cohort_shape, spacing=spacing, contrast=contrast, metal=metal, sex=sex)
    hu = simulate_ct_acquisition(ph.hu, spacing[1], metal_mask=ph.metal, rng=rng)["recon_hu"]
    lab = target_from_phantom(ph.organs, ph.lesions, ph.findings)
    ws = working_shape(hu.shape, spacing, sp)
    hu_w = Resize(ws, mode="trilinear", align_corners=False)(torch.as_tensor(hu[None], dtype=torch.float32))
    lab_w = Resize(ws, mode="nearest")(torch.as_tensor(lab[None], dtype=torch.float32))
    return (np.asarray(torch.as_tensor(hu_w)[0], np.float32), np.asarray(torch.as_tensor(lab_w)[0], np.uint8),
            ph.findings)


def augmenter():
    from monai.transforms import (Compose, RandGaussianNoise, RandGaussianSmooth, RandScaleIntensity,
                                  RandShiftIntensity)

    return Compose([
        RandGaussianSmooth(sigma_x=(0.2, 1.5), sigma_y=(0.2, 1.2), sigma_z=(0.2, 1.2), prob=0.5),  # x here = axis 0 (z)
        RandGaussianNoise(prob=0.9, mean=0.0, std=80.0, sample_std=True),
        RandGaussianSmooth(sigma_x=(0.3, 0.8), sigma_y=(0.3, 0.8), sigma_z=(0.3, 0.8), prob=0.3),  # correlated noise
        RandShiftIntensity(offsets=30.0, prob=0.5),
        RandScaleIntensity(factors=0.05, prob=0.5),
    ])


def sample_crop(rng: np.random.Generator, hu: np.ndarray, lab: np.ndarray, roi, lesion_p: float = 0.6):
    """A roi-sized crop (padded with air / background when the volume is smaller)."""
    pad = [(0, max(0, r - s)) for r, s in zip(roi, hu.shape)]
    if any(p[1] for p in pad):
        hu = np.pad(hu, pad, constant_values=-1000.0)
        lab = np.pad(lab, pad, constant_values=0)
    lesion_cls = [CLASSES.index(c) for c in set(FINDING_TO_CLASS.values())]
    starts = None
    if rng.random() < lesion_p:
        idx = np.argwhere(np.isin(lab, lesion_cls))
        if len(idx):
            c = idx[rng.integers(len(idx))]
            starts = [int(np.clip(c[i] - roi[i] // 2 + rng.integers(-roi[i] // 4, roi[i] // 4 + 1), 0, hu.shape[i] - roi[i]))
                      for i in range(3)]
    if starts is None:
        starts = [int(rng.integers(0, hu.shape[i] - roi[i] + 1)) for i in range(3)]
    sl = tuple(slice(s, s + r) for s, r in zip(starts, roi))
    return hu[sl], lab[sl]


def dice_per_class(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> list[float]:
    """monai DiceMetric per class (NaN where a class is absent from the truth)."""
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    p = one_hot(torch.as_tensor(pred[None, None].astype(np.int64)), n_classes)
    t = one_hot(torch.as_tensor(truth[None, None].astype(np.int64)), n_classes)
    m = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    return [float(v) for v in m(p, t)[0]]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("checkpoints/segmentation.pt"))
    ap.add_argument("--n-train", type=int, default=64)
    ap.add_argument("--n-sim", type=int, default=8, help="of the training volumes, this many through CT simulation")
    ap.add_argument("--n-val", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=40, help="passes of n-train crops")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--roi", type=int, nargs=3, default=DEFAULT_CONFIG["roi"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop training after this long (0 = no limit)")
    ap.add_argument("--enrich", type=float, default=0.5, help="P(an extra segmented lesion key) per volume")
    ap.add_argument("--lesion-weight", type=float, default=1.0, help="loss weight of lesion classes (others 1)")
    ap.add_argument("--lesion-p", type=float, default=0.6, help="P(a crop is centred on a lesion voxel)")
    ap.add_argument("--init", type=Path, default=None, help="start from this checkpoint (fine-tuning)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    set_determinism(seed=args.seed)
    from core.synth.cohort import case_rng

    config = {**DEFAULT_CONFIG, "roi": list(args.roi)}
    t0 = time.perf_counter()
    data = []
    for i in range(args.n_train):
        sim = i < args.n_sim
        hu, lab, _ = make_volume(case_rng(TRAIN_SEED + args.seed, i), config, simulate=sim, enrich=args.enrich)
        data.append((hu, lab))
    val = [make_volume(case_rng(VAL_SEED, i), config, simulate=False) for i in range(args.n_val)]
    t_data = time.perf_counter() - t0
    counts = np.zeros(len(CLASSES), int)
    for _, lab in data:
        counts += np.bincount(lab.ravel(), minlength=len(CLASSES)) > 0
    print(f"data: {args.n_train} train ({args.n_sim} simulated) + {args.n_val} val volumes in {t_data:.0f} s; "
          f"volumes per class: {dict(zip(CLASSES, counts.tolist()))}", flush=True)

    dev = torch.device(args.device)
    net = build_model(config)
    if args.init:
        net.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=False)["state_dict"])
    net = net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    cw = torch.ones(len(CLASSES))
    for c in set(FINDING_TO_CLASS.values()):
        cw[CLASSES.index(c)] = args.lesion_weight
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=cw.to(dev))
    aug = augmenter()
    aug.set_random_state(seed=args.seed)
    rng = np.random.default_rng(args.seed)
    steps = max(1, args.epochs * args.n_train // args.batch)
    warm = min(50, steps // 10 + 1)
    limit = args.max_minutes * 60.0
    losses, t1, step = [], time.perf_counter(), 0
    win = config["windows_hu"]
    from tools.segmentation import window_channels

    net.train()
    while step < steps:
        elapsed = time.perf_counter() - t1
        frac = max(step / steps, elapsed / limit if limit else 0.0)
        if frac >= 1.0:
            break
        lr = args.lr * (min(1.0, (step + 1) / warm)) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        xs, ys = [], []
        for _ in range(args.batch):
            hu, lab = data[int(rng.integers(len(data)))]
            ch, cl = sample_crop(rng, hu, lab, args.roi, args.lesion_p)
            h = torch.as_tensor(aug(torch.as_tensor(ch[None].copy())))[0]
            xs.append(window_channels(h, win))
            ys.append(torch.as_tensor(cl[None].astype(np.int64)))
        x, y = torch.stack(xs).to(dev), torch.stack(ys).to(dev)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            print(f"step {step}/{steps}  loss {np.mean(losses[-50:]):.4f}  lr {lr:.2e}  "
                  f"{time.perf_counter() - t1:.0f} s", flush=True)
    t_train = time.perf_counter() - t1

    # held-out Dice on the validation phantoms (with noise like the cohort's reconstruction)
    net.eval()
    vrng = np.random.default_rng(VAL_SEED)
    dices = []
    for hu, lab, _ in val:
        noisy = hu + vrng.normal(0, 40, hu.shape).astype(np.float32)
        pred = segment(net, noisy, config["spacing_mm"], config, device=str(dev))
        dices.append(dice_per_class(pred, lab, len(CLASSES)))
    d = np.array(dices, float)
    val_dice = {c: (None if np.all(np.isnan(d[:, i])) else round(float(np.nanmean(d[:, i])), 4))
                for i, c in enumerate(CLASSES)}
    val_n = {c: int(np.sum(~np.isnan(d[:, i]))) for i, c in enumerate(CLASSES)}
    print("held-out Dice:", json.dumps(val_dice), flush=True)

    init_meta = None
    if args.init and args.init.with_suffix(".json").is_file():
        im = json.loads(args.init.with_suffix(".json").read_text())
        init_meta = {"version": im.get("version"), "train": {k: v for k, v in im.get("train", {}).items()
                                                            if k != "loss_curve"}, "data": im.get("data")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    version = f"seg-unet-{dt.date.today().isoformat()}-s{args.seed}"
    torch.save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "config": config,
                "version": version}, args.out)
    meta = {
        "version": version, "model": "MONAI UNet 3-D", "config": config,
        "data": {"train_seed": TRAIN_SEED + args.seed, "val_seed": VAL_SEED, "n_train": args.n_train,
                 "n_sim": args.n_sim, "n_val": args.n_val, "fov_mm": FOV_MM,
                 "volumes_per_class": dict(zip(CLASSES, counts.tolist()))},
        "train": {"init": str(args.init) if args.init else None, "init_meta": init_meta,
                  "enrich": args.enrich, "lesion_weight": args.lesion_weight, "lesion_p": args.lesion_p,
                  "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "steps_planned": steps,
                  "steps_done": step, "max_minutes": args.max_minutes, "device": args.device,
                  "threads": args.threads, "seed": args.seed, "data_seconds": round(t_data, 1),
                  "train_seconds": round(t_train, 1),
                  "loss_first50": round(float(np.mean(losses[:50])), 4) if losses else None,
                  "loss_last50": round(float(np.mean(losses[-50:])), 4) if losses else None,
                  "loss_curve": [round(float(np.mean(losses[i:i + 50])), 4) for i in range(0, len(losses), 50)]},
        "heldout_dice": val_dice, "heldout_n": val_n,
        "heldout_note": "val phantoms (seed VAL_SEED) on the 4 mm grid with 40 HU Gaussian noise; Dice by monai DiceMetric",
        "checkpoint_bytes": args.out.stat().st_size,
    }
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {args.out} ({meta['checkpoint_bytes'] / 1e6:.2f} MB) and .json; train {t_train:.0f} s", flush=True)
    return meta


if __name__ == "__main__":
    main()
