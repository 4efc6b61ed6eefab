"""Self-supervised pretraining of the small patch encoders (tools/patch_encoders.py), two objectives:

    python -m training.train_patch_encoders --n-slides 15 --seed 7 --minutes 3.5 --out-dir checkpoints

- `cnn_simclr`: SimCLR. Two views of each tile: a random crop (35-100% of the 128 um field, aspect
  3:4-4:3) resampled to 64 px, a random flip and rot90, HED stain jitter (per-stain scale and
  shift in `skimage.color.rgb2hed` space), brightness/contrast jitter and, half the time, a Gaussian
  blur; NT-Xent loss (temperature 0.2) on a 2-layer projection head, which is dropped afterwards.
- `vit_mae`: masked autoencoding. The whole 128 px tile (flip, rot90, milder stain jitter), 75% of
  its 16 px patches hidden; MSE on the hidden patches' per-patch normalised pixels.

Data: `--n-slides` synthetic H&E slides (core.synth.slides.make_slide, classes in turn, slide i
from SeedSequence([seed, i])), or every slide in `--slides-dir`; tissue tiles of 128 px at 1 um/px
(core.imaging.wsi_tiles, 50% overlap, at most `--tiles-per-slide` spread over each slide). Tiles are
cached in --work-dir as .npz, keyed by the data arguments. Labels are never used.

Budget: each encoder trains until `--minutes` of this process's CPU time (divided by --threads) are
spent, so a busy machine does not cut training short; with `--device cuda` it is wall time. The
learning rate follows a cosine over that budget. Writes <out-dir>/patch_<name>.pt (fp16 weights +
architecture + the tiles' channel mean/std) and a .json sidecar (command, seed, data, loss curve).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.imaging.wsi_tiles import TileParams, read_tiles, tile_grid
from tools.patch_encoders import CNN_ARCH, TRAIN_COMMAND, VIT_ARCH, build_net, checkpoint_path

DATA_VERSION = "1"  # bump when tile extraction changes (invalidates the tile cache)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms")


# ------------------------------------------------------------------ data

def training_tiles(a: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """uint8 [N, 128, 128, 3] tissue tiles at 1 um/px and a description of where they came from."""
    from core.imaging.slide import open_slide

    params = TileParams(target_mpp=1.0, tile_px=128, min_tissue=0.5, overlap=0.5, max_tiles=a.tiles_per_slide)
    spec = {"version": DATA_VERSION, "params": params.model_dump(),
            "source": str(a.slides_dir) if a.slides_dir else {"synthetic": a.n_slides, "seed": a.seed,
                                                              "size": list(a.slide_size)}}
    work = Path(a.work_dir)
    cache = work / f"tiles-{hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]}.npz"
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return z["tiles"], json.loads(str(z["info"]))
    if a.slides_dir:
        paths = sorted(p for p in Path(a.slides_dir).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
        classes = ["unlabelled"] * len(paths)
    else:
        from core.synth.slides import SLIDE_CLASSES, make_slide

        (work / "slides").mkdir(parents=True, exist_ok=True)
        paths, classes = [], []
        for i in range(a.n_slides):
            cls = SLIDE_CLASSES[i % len(SLIDE_CLASSES)]
            p = work / "slides" / f"train_{a.seed}_{a.slide_size[0]}x{a.slide_size[1]}_{i:03d}_{cls}.tiff"
            if not p.is_file():
                part = p.with_name(p.name + ".part.tiff")  # a killed run leaves no half-written slide
                make_slide(np.random.default_rng(np.random.SeedSequence([a.seed, i])), cls, part,
                           size=tuple(a.slide_size))
                part.rename(p)
            paths.append(p)
            classes.append(cls)
    tiles = []
    for p in paths:
        with open_slide(p) as s:
            g = tile_grid(s, params)
            tiles.append(read_tiles(s, g, np.arange(len(g))))
        print(f"  {p.name}: {len(g)} tiles", flush=True)
    out = np.concatenate(tiles)
    info = {**spec, "slides": len(paths), "tiles": int(len(out)),
            "classes": {c: classes.count(c) for c in sorted(set(classes))}}
    work.mkdir(parents=True, exist_ok=True)
    np.savez(cache, tiles=out, info=json.dumps(info))
    return out, info


# ------------------------------------------------------------------ augmentation (batched, on device)

def _hed_matrices(device):
    from skimage.color import hed_from_rgb, rgb_from_hed

    return (torch.tensor(hed_from_rgb, dtype=torch.float32, device=device),
            torch.tensor(rgb_from_hed, dtype=torch.float32, device=device))


def hed_jitter(x: torch.Tensor, g: torch.Generator, scale: float, shift: float) -> torch.Tensor:
    """Per-sample, per-stain affine jitter of skimage's rgb2hed concentrations; x in [0, 1], [B, 3, H, W]."""
    to_hed, to_rgb = _hed_matrices(x.device)
    b = len(x)
    log_adjust = math.log(1e-6)
    od = torch.log(x.clamp_min(1e-6)) / log_adjust  # rgb2hed's optical density
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed).clamp_min(0)
    alpha = 1 + (torch.rand(b, 3, 1, 1, generator=g, device=x.device) * 2 - 1) * scale
    beta = (torch.rand(b, 3, 1, 1, generator=g, device=x.device) * 2 - 1) * shift
    hed = (hed * alpha + beta).clamp_min(0)
    return torch.exp(torch.einsum("bdhw,dc->bchw", hed, to_rgb) * log_adjust).clamp(0, 1)


def crop_flip_rot(x: torch.Tensor, out_px: int, g: torch.Generator, min_area: float) -> torch.Tensor:
    """Random resized crop, flip and rot90 in one resampling (affine grid per sample)."""
    b, dev = len(x), x.device
    u = lambda *s: torch.rand(*s, generator=g, device=dev)  # noqa: E731
    area = min_area + (1 - min_area) * u(b)
    ratio = torch.exp((u(b) * 2 - 1) * math.log(4 / 3))
    sx, sy = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
    tx, ty = (u(b) * 2 - 1) * (1 - sx), (u(b) * 2 - 1) * (1 - sy)
    k = torch.randint(0, 4, (b,), generator=g, device=dev).float() * (math.pi / 2)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    c, s = torch.cos(k), torch.sin(k)
    theta = torch.stack([torch.stack([c * sx * flip, -s * sy, tx], 1), torch.stack([s * sx * flip, c * sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, 3, out_px, out_px], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def photometric(x: torch.Tensor, g: torch.Generator, strong: bool) -> torch.Tensor:
    from monai.networks.layers import GaussianFilter

    b, dev = len(x), x.device
    x = hed_jitter(x, g, 0.15 if strong else 0.05, 0.01 if strong else 0.005)
    if strong:
        gain = 1 + (torch.rand(b, 1, 1, 1, generator=g, device=dev) * 2 - 1) * 0.2
        bias = (torch.rand(b, 1, 1, 1, generator=g, device=dev) * 2 - 1) * 0.08
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + bias).clamp(0, 1)
        sel = torch.rand(b, generator=g, device=dev) < 0.5
        if sel.any():
            sigma = float(0.3 + 1.2 * torch.rand(1, generator=g, device=dev))
            x[sel] = GaussianFilter(2, sigma).to(dev)(x[sel])
    return x


# ------------------------------------------------------------------ objectives

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = (z @ z.T) / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def mae_loss(mae, x: torch.Tensor, patch: int) -> torch.Tensor:
    from einops import rearrange

    pred, mask = mae(x)
    target = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class _SimCLR(torch.nn.Module):
    def __init__(self, arch: dict):
        super().__init__()
        d = arch["block_inplanes"][-1]
        self.backbone = build_net(arch)
        self.head = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(inplace=True),
                                        torch.nn.Linear(d, arch["proj_dim"]))


# ------------------------------------------------------------------ training loop

def train_one(name: str, tiles: np.ndarray, info: dict, a: argparse.Namespace, dev: torch.device) -> dict:
    base = CNN_ARCH if name == "cnn_simclr" else VIT_ARCH
    x01 = tiles[:: max(1, len(tiles) // 512)].astype(np.float32) / 255.0
    arch = {**base, "mean": x01.mean(axis=(0, 1, 2)).round(4).tolist(),
            "std": x01.std(axis=(0, 1, 2)).round(4).tolist()}
    torch.manual_seed(a.seed)
    g = torch.Generator(device=dev).manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = (_SimCLR(arch) if name == "cnn_simclr" else build_net(arch)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    mean = torch.tensor(arch["mean"], device=dev).view(1, 3, 1, 1)
    std = torch.tensor(arch["std"], device=dev).view(1, 3, 1, 1)
    budget = a.minutes * 60
    t0, cpu0 = time.perf_counter(), time.process_time()
    def spent() -> float:
        return time.perf_counter() - t0 if dev.type == "cuda" else (time.process_time() - cpu0) / a.threads

    losses: list[float] = []
    step = 0
    while spent() < budget and (a.max_steps is None or step < a.max_steps):
        for pg in opt.param_groups:  # cosine over the time budget, short warm-up
            pg["lr"] = a.lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(spent() / budget, 1)))
        idx = rng.choice(len(tiles), size=min(a.batch_size, len(tiles)), replace=False)
        x = torch.from_numpy(tiles[idx]).to(dev).permute(0, 3, 1, 2).float() / 255.0
        if name == "cnn_simclr":
            views = [photometric(crop_flip_rot(x, arch["tile_px"], g, 0.35), g, strong=True) for _ in range(2)]
            z = model.head(model.backbone((torch.cat(views) - mean) / std))
            loss = nt_xent(z[: len(x)], z[len(x):], a.temperature)
        else:
            v = photometric(crop_flip_rot(x, arch["tile_px"], g, 1.0), g, strong=False)
            loss = mae_loss(model, (v - mean) / std, arch["patch"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % a.log_every == 0:
            print(f"  [{name}] step {step} loss {np.mean(losses[-a.log_every:]):.4f} "
                  f"({spent():.0f}/{budget:.0f} s)", flush=True)
    net = model.backbone if name == "cnn_simclr" else model
    out = Path(a.out_dir) / checkpoint_path(name).name
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().half().cpu() for k, v in net.state_dict().items()}
    torch.save({"arch": arch, "version": "1", "state_dict": weights}, out)
    w = max(1, len(losses) // 20)
    smooth = [float(np.mean(losses[i:i + w])) for i in range(0, len(losses), w)]
    meta = {
        "name": name, "file": out.name, "version": "1",
        "sha256_8": hashlib.sha256(out.read_bytes()).hexdigest()[:8], "bytes": out.stat().st_size,
        "trained_on": date.today().isoformat(),
        "command": f"{TRAIN_COMMAND} " + " ".join(sys.argv[1:]),
        "seed": a.seed, "data": info, "arch": arch,
        "params": int(sum(p.numel() for p in net.parameters())),
        "objective": "SimCLR NT-Xent" if name == "cnn_simclr" else "MAE masked-patch MSE (normalised pixels)",
        "batch_size": a.batch_size, "lr": a.lr, "weight_decay": a.weight_decay,
        "temperature": a.temperature if name == "cnn_simclr" else None,
        "steps": step, "samples_seen": step * a.batch_size, "device": dev.type, "threads": a.threads,
        "cpu_seconds": round(time.process_time() - cpu0, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
        "loss": {"first10": float(np.mean(losses[:10])), "last10": float(np.mean(losses[-10:])),
                 "min": float(np.min(losses)), "curve_every_steps": w, "curve": [round(v, 4) for v in smooth]},
        "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"[{name}] {step} steps, loss {meta['loss']['first10']:.4f} -> {meta['loss']['last10']:.4f}, "
          f"{meta['cpu_seconds']} CPU s, {meta['wall_seconds']} wall s -> {out} ({meta['bytes'] / 1e6:.2f} MB)")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoders", nargs="+", default=["cnn_simclr", "vit_mae"], choices=["cnn_simclr", "vit_mae"])
    p.add_argument("--slides-dir", type=Path, default=None, help="train on these slides instead of synthetic ones")
    p.add_argument("--n-slides", type=int, default=15)
    p.add_argument("--slide-size", type=int, nargs=2, default=[3072, 2304], metavar=("W", "H"))
    p.add_argument("--tiles-per-slide", type=int, default=256)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--minutes", type=float, default=3.5, help="per encoder: CPU time / threads (wall time on cuda)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path("runs/patch_encoders"))
    p.add_argument("--out-dir", type=Path, default=Path("checkpoints"))
    p.add_argument("--log-every", type=int, default=10)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    from core.device import pick_device

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(pick_device(a.device))
    t0 = time.perf_counter()
    tiles, info = training_tiles(a)
    print(f"{len(tiles)} tiles from {info['slides']} slides ({time.perf_counter() - t0:.0f} s)", flush=True)
    return [train_one(n, tiles, info, a, dev) for n in a.encoders]


if __name__ == "__main__":
    main()
