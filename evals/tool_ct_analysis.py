"""ct_analysis against the synthetic cohort's truth: per-finding sensitivity / specificity vs a trivial baseline.

    python -m evals.tool_ct_analysis --n 60 --seed 11

Test set: a cohort drawn as core/synth/cohort.py draws it (diseases by weight, findings by the
catalogue's P(finding | disease), metal, thick slices and DICOM/NIfTI at the cohort's rates) but every
case with a CT (no pathology-only or radiograph-only cases), on the cohort's CT grid unless --grid
says otherwise. It is generated once into --out and reused when present. Every CT goes through
`load_study` and `CTAnalysis.run` end to end, as in a consult.

Truth: the case's truth findings for study "ct". For each catalogue finding the tool examines:
positives, sensitivity, specificity, balanced accuracy, and the same for the trivial baseline
'always absent' (balanced accuracy 0.5; its accuracy is the majority-class rate), run on the same
cases, so the gain is a ratio. pulmonary_embolus is scored on contrast-enhanced studies only (the
tool does not examine it without contrast). For true positives of lateral findings the side the tool
names is compared with the truth's; for nodules and masses the measured diameter with size_mm.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from core.case import Modality, load_case
from core.imaging.load import load_study
from core.synth.cohort import CohortOptions, generate_cohort
from tools.base import RunContext
from tools.ct_analysis import CTAnalysis

KEYS = ("lung_nodule", "lung_mass", "cavitation", "consolidation", "ground_glass_opacity", "emphysema",
        "pleural_effusion", "pneumothorax", "cardiomegaly", "pericardial_effusion", "pulmonary_embolus",
        "lymphadenopathy", "arterial_wall_calcification", "coronary_artery_calcification", "medical_material")
LATERAL = ("lung_nodule", "lung_mass", "cavitation", "consolidation", "pleural_effusion", "pneumothorax")


def _side(text: str | None) -> str:
    t = (text or "").lower()
    if "bilateral" in t or "both" in t or ("right" in t and "left" in t):
        return "bilateral"
    if "right" in t:
        return "right"
    if "left" in t or "lingula" in t:
        return "left"
    return ""


def cohort(n: int, seed: int, out: Path, grid: tuple[int, int, int] | None, workers: int) -> list[Path]:
    opts = (CohortOptions.for_grid(grid) if grid else CohortOptions())
    opts.pathology_fraction, opts.xr_only_rate = 0.0, 0.0
    t0 = time.perf_counter()
    todo = [i for i in range(n) if not (out / f"s{seed}-{i:04d}" / "case.yaml").is_file()]
    if todo:
        print(f"generating {len(todo)} of {n} cases into {out} (grid {opts.ct_shape}) ...", flush=True)
        generate_cohort(n, seed, out, opts, workers=workers)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    return [out / f"s{seed}-{i:04d}" for i in range(n)]


def evaluate(case_dirs: list[Path], tool: CTAnalysis | None = None) -> dict:
    tool = tool or CTAnalysis(device="cpu")
    recs = []
    for d in case_dirs:
        case = load_case(d)
        st = next((s for s in case.studies if s.modality == Modality.CT), None)
        if st is None:
            continue
        vol = load_study(d, st)
        r = tool.run(vol, ctx=RunContext(study_id=st.id, modality=Modality.CT, case_id=case.id,
                                         acquisition=dict(st.acquisition)))
        truth = {}
        for f in case.truth.findings:
            if f.study_id == st.id:
                truth.setdefault(f.label, f)
        recs.append({"case": case.id, "status": r.status, "error": r.error, "seconds": r.seconds,
                     "contrast": bool(st.acquisition.get("contrast")), "thick": float(vol.spacing[0]) >= 4.5,
                     "metal": bool(st.acquisition.get("metal")),
                     "truth": {k: {"location": v.location, "size_mm": v.size_mm} for k, v in truth.items()},
                     "found": {f.label: {"present": f.present, "value": f.value, "location": f.location, "detail": f.detail}
                               for f in r.findings}})
    return score(recs)


def score(recs: list[dict]) -> dict:
    ok = [r for r in recs if r["status"] == "ok"]
    rows = []
    for key in KEYS:
        rs = [r for r in ok if (r["contrast"] if key == "pulmonary_embolus" else True)]
        y = np.array([key in r["truth"] for r in rs], bool)
        pred = np.array([bool(r["found"].get(key, {}).get("present")) for r in rs], bool)
        n, pos = len(rs), int(y.sum())
        tp, fn = int((pred & y).sum()), int((~pred & y).sum())
        fp, tn = int((pred & ~y).sum()), int((~pred & ~y).sum())
        sens = tp / pos if pos else float("nan")
        spec = tn / (n - pos) if n - pos else float("nan")
        bal = np.nanmean([sens, spec]) if n else float("nan")
        acc = (tp + tn) / n if n else float("nan")
        base_acc = (n - pos) / n if n else float("nan")  # always absent
        side_ok, side_n, size_err = 0, 0, []
        for r in rs:
            if key in r["truth"] and r["found"].get(key, {}).get("present"):
                t, f = r["truth"][key], r["found"][key]
                if key in LATERAL and _side(t["location"]):
                    side_n += 1
                    side_ok += int(_side(t["location"]) == _side(f["location"]))
                if key in ("lung_nodule", "lung_mass") and t["size_mm"] and f["value"]:
                    size_err.append((f["value"] - t["size_mm"]) / t["size_mm"])
        rows.append({"finding": key, "n": n, "positives": pos, "tp": tp, "fp": fp, "sensitivity": sens,
                     "specificity": spec, "balanced_accuracy": float(bal), "baseline_balanced_accuracy": 0.5,
                     "ratio": float(bal) / 0.5 if bal == bal else float("nan"), "accuracy": acc,
                     "baseline_accuracy": base_acc, "side_agreement": (side_ok / side_n) if side_n else float("nan"),
                     "side_n": side_n,
                     "size_error_mean_abs": float(np.mean(np.abs(size_err))) if size_err else float("nan"),
                     "size_error_bias": float(np.mean(size_err)) if size_err else float("nan"),
                     "size_n": len(size_err)})
    secs = [r["seconds"] for r in ok]
    return {"cases": len(recs), "failed": [(r["case"], r["error"]) for r in recs if r["status"] != "ok"],
            "thick": sum(r["thick"] for r in recs), "metal": sum(r["metal"] for r in recs),
            "contrast": sum(r["contrast"] for r in recs), "rows": rows,
            "mean_seconds": float(np.mean(secs)) if secs else float("nan"),
            "max_seconds": float(np.max(secs)) if secs else float("nan"), "records": recs}


def print_table(res: dict) -> None:
    f = lambda v, d=2: "-" if v != v else f"{v:.{d}f}"  # noqa: E731
    print(f"\n{res['cases']} CT studies ({res['thick']} thick-slice, {res['metal']} with metal, "
          f"{res['contrast']} contrast-enhanced); failed runs: {len(res['failed'])}")
    print("\n| finding | n | positives | sens | spec | bal. acc | always-absent bal. acc | ratio | acc | "
          "always-absent acc | side agreement | size error (mean abs, bias) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        size = f"{100 * r['size_error_mean_abs']:.0f}%, {100 * r['size_error_bias']:+.0f}% (n={r['size_n']})" \
            if r["size_n"] else "-"
        side = f"{f(r['side_agreement'])} (n={r['side_n']})" if r["side_n"] else "-"
        print(f"| {r['finding']} | {r['n']} | {r['positives']} | {f(r['sensitivity'])} | {f(r['specificity'])} | "
              f"{f(r['balanced_accuracy'])} | 0.50 | {f(r['ratio'])} | {f(r['accuracy'])} | "
              f"{f(r['baseline_accuracy'])} | {side} | {size} |")
    scored = [r for r in res["rows"] if r["positives"] and r["positives"] < r["n"]]
    mb = float(np.mean([r["balanced_accuracy"] for r in scored])) if scored else float("nan")
    print(f"| **mean over {len(scored)} findings with positives** | | | | | **{f(mb)}** | 0.50 | **{f(mb / 0.5)}** | | | | |")
    print(f"\nseconds per case: mean {res['mean_seconds']:.2f}, max {res['max_seconds']:.2f}")
    for c, e in res["failed"]:
        print(f"  failed {c}: {e}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--grid", default="", help="CT grid z,y,x (default: the cohort's 96,128,128)")
    ap.add_argument("--out", type=Path, default=None, help="cohort folder (reused when present)")
    ap.add_argument("--cases", type=Path, nargs="*", default=None, help="evaluate these case folders instead")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.workers))
    grid = tuple(int(v) for v in args.grid.split(",")) if args.grid else None
    if args.cases:
        dirs = sorted(args.cases)
    else:
        tag = "x".join(map(str, grid)) if grid else "default"
        out = args.out or Path("/tmp/grandrounds_evals") / f"ct_cohort_s{args.seed}_{tag}"
        out.mkdir(parents=True, exist_ok=True)
        dirs = cohort(args.n, args.seed, out, grid, args.workers)
    t0 = time.perf_counter()
    res = evaluate(dirs)
    print_table(res)
    print(f"(evaluation wall time {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in res.items()}, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
