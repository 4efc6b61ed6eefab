"""Filtered back-projection speed: core.physics `fbp` vs skimage `iradon`, same sinogram.

    python -m evals.fbp_speed [--size 256] [--views 360] [--repeats 5]

A Shepp-Logan phantom (skimage.data, resized to size x size, made odd-sized by one row/col of
zeros so skimage's centre is the geometric centre, as core/physics/projector.py explains) is
projected with skimage `radon` at `views` angles over 180 degrees; both methods reconstruct that
same sinogram with the ramp filter. Times are medians over `repeats` runs; our system-matrix
(back-projection operator) build is timed separately: "warm" excludes it (cached per geometry,
as in training and in the tool), "cold" = warm + build. PSNR of both against the phantom
(data range 1). Speed ratio = iradon median / fbp warm median, and iradon / (fbp cold of one run).
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch


def _psnr(x: np.ndarray, ref: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(x, 0, 1) - ref) ** 2)))


def main(argv: list[str] | None = None) -> dict:
    from skimage.data import shepp_logan_phantom
    from skimage.transform import iradon, radon, resize

    from core.physics import projector as P

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--views", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="slices per batched fbp call")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    ph = resize(shepp_logan_phantom(), (args.size, args.size), order=1, anti_aliasing=True).astype(np.float64)
    n = args.size + (1 - args.size % 2)
    img = np.zeros((n, n))
    img[:args.size, :args.size] = ph
    theta_deg = np.arange(args.views) * 180.0 / args.views
    sino = radon(img, theta=theta_deg, circle=False)  # (n_det, views); skimage's centre bin is n_det // 2
    ours_sino = sino[1:] if sino.shape[0] % 2 == 0 else sino  # odd: centre (n-1)/2, as ParallelBeam
    n_det = ours_sino.shape[0]

    geom = P.ParallelBeam(args.views, n_det, 1.0, math.pi)
    t0 = time.perf_counter()
    proj = P.Projector(geom, (n, n), 1.0)
    t_sys = time.perf_counter() - t0  # forward operator (not used by fbp; reported for completeness)
    t0 = time.perf_counter()
    P._backprojection_op(geom, (n, n), 1.0).torch(False, torch.float32, torch.device("cpu"))
    t_build = time.perf_counter() - t0
    s_t = torch.as_tensor(ours_sino.T.copy(), dtype=torch.float32)  # (views, n_det)

    ours, sk = [], []
    rec_ours = rec_sk = None
    with torch.no_grad():
        P.fbp(s_t, proj, "ramp")  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rec_ours = P.fbp(s_t, proj, "ramp").numpy()
            ours.append(time.perf_counter() - t0)
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        rec_sk = iradon(sino, theta=theta_deg, filter_name="ramp", circle=False, output_size=n)
        sk.append(time.perf_counter() - t0)
    with torch.no_grad():  # a batch of slices (what training and the tool do): one sparse matmul
        sb = s_t[None].repeat(args.batch, 1, 1)
        tb = []
        for _ in range(max(2, args.repeats // 2)):
            t0 = time.perf_counter()
            P.fbp(sb, proj, "ramp")
            tb.append(time.perf_counter() - t0)
    t_batch = float(np.median(tb)) / args.batch
    t_ours, t_sk = float(np.median(ours)), float(np.median(sk))
    p_ours = _psnr(rec_ours[:args.size, :args.size], ph)
    p_sk = _psnr(rec_sk[:args.size, :args.size], ph)
    res = {"size": n, "views": args.views, "n_det": n_det, "threads": torch.get_num_threads(),
           "fbp_warm_s": t_ours, "fbp_backprojector_build_s": t_build, "fbp_cold_s": t_ours + t_build,
           "forward_matrix_build_s": t_sys, "iradon_s": t_sk, "psnr_fbp_db": p_ours, "psnr_iradon_db": p_sk,
           "speedup_warm": t_sk / t_ours, "speedup_cold": t_sk / (t_ours + t_build),
           "fbp_batched_per_slice_s": t_batch, "speedup_batched": t_sk / t_batch}
    print(f"FBP of a {n}x{n} Shepp-Logan, {args.views} parallel views, {n_det} detector bins, ramp filter, "
          f"CPU, torch threads {res['threads']}; medians of {args.repeats} runs\n")
    print("| method | time (s) | PSNR vs phantom (dB) |")
    print("|---|---|---|")
    print(f"| skimage iradon | {t_sk:.3f} | {p_sk:.2f} |")
    print(f"| core.physics fbp (operator cached) | {t_ours:.4f} | {p_ours:.2f} |")
    print(f"| core.physics fbp, batch of {args.batch} slices, per slice | {t_batch:.4f} | {p_ours:.2f} |")
    print(f"| core.physics fbp incl. operator build ({t_build:.2f} s, once per geometry) | {t_ours + t_build:.3f} | {p_ours:.2f} |")
    print(f"\nspeed ratio iradon / fbp: {res['speedup_warm']:.1f}x (cached operator), "
          f"{res['speedup_cold']:.2f}x (including the one-off build), {res['speedup_batched']:.1f}x per slice batched; "
          f"forward (Joseph) matrix build, not used by fbp: {t_sys:.2f} s")
    return res


if __name__ == "__main__":
    main()
