"""Paired (radiograph, report) data for the report generator, cohort-faithful and cached.

Training pairs replay the cohort generator's radiograph branch (core/synth/cohort.py `_chest_studies`):
a chest disease drawn by weight, its findings by `sample_findings`, sides as the cohort draws them,
metal at the cohort rate, the phantom on the evals' (64, 96, 96) grid, and the XR report written by
`write_report` from the phantom's own finding records (locations, sizes). Two shortcuts keep this fast
enough for CPU training: no CT acquisition (the radiograph never sees it) and the DRR is projected
straight to the CNN's 128 x 128 input, as training/train_cxr.py does. Held-out evaluation uses real
case folders instead (`cohort_cases`), loaded the way the tool receives them.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

GENERATOR_VERSION = "rgdata-1"  # bump when sampling/rendering below changes (invalidates caches)
GRID = (64, 96, 96)
_SIDED = ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass", "consolidation", "atelectasis", "cavitation")


def render_pair(seed: int, index: int, out_shape: tuple[int, int] = (128, 128)) -> dict:
    """One cohort-like chest case: radiograph [H, W] in [0, 1], XR report text, truth XR finding keys."""
    from core.catalogue import load_catalogue
    from core.physics.drr import radiograph_from_ct
    from core.reports import write_report
    from core.synth.chest import PlantedFinding, make_chest_phantom
    from core.synth.cohort import METAL_KINDS, CohortOptions, _mentions, _weighted, case_rng, sample_findings

    cat, opts = load_catalogue(), CohortOptions.for_grid(GRID)
    rng = case_rng(seed, index)
    xr = {k for k, f in cat.findings.items() if f.xr}
    for _ in range(5):
        d = _weighted(rng, cat.chest_diseases())
        metal = str(rng.choice(METAL_KINDS)) if rng.random() < opts.metal_rate else None
        planted = [PlantedFinding(key=k, side=str(rng.choice(("right", "left"))) if k in _SIDED else "bilateral",
                                  severity=float(rng.uniform(0.3, 0.9)))
                   for k in sample_findings(rng, d) if k != "medical_material"]
        try:
            ph = make_chest_phantom(rng, planted, shape=opts.ct_shape, spacing=opts.ct_spacing, contrast=d.contrast,
                                    metal=metal, sex="F" if rng.random() < 0.5 else "M",
                                    age=int(np.clip(rng.normal(*d.age), 18, 95)))
            break
        except ValueError:  # "no room to plant finding": draw the case again
            continue
    else:  # pragma: no cover
        raise RuntimeError(f"could not draw case {seed}/{index}")
    found = list(ph.findings)
    if metal:
        found.append({"key": "medical_material", "location": metal.replace("_", " "), "side": ""})
    img, _ = radiograph_from_ct(ph.hu, opts.ct_spacing, view="PA", out_shape=out_shape)
    report = write_report(_mentions(found, xr), rng, modality="XR", technique="PA chest radiograph.", metal=metal,
                          cat=cat)
    return {"id": f"rg{seed}-{index:04d}", "image": np.asarray(img, np.float32), "report": report,
            "truth": sorted({f["key"] for f in found if f["key"] in xr}), "disease": d.key}


CHUNK = 80  # cases per cache file: a larger n reuses the smaller n's files


def _chunk(seed: int, start: int, n: int, cache_dir: Path, verbose: bool) -> dict:
    tag = json.dumps({"gen": GENERATOR_VERSION, "seed": seed, "start": start, "n": n, "grid": GRID}, sort_keys=True)
    f = Path(cache_dir) / f"pairs_{seed}_{start:05d}_{n}_{hashlib.sha1(tag.encode()).hexdigest()[:10]}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return {"images": z["images"].astype(np.float32), **json.loads(str(z["meta"]))}
    t0 = time.perf_counter()
    rows = [render_pair(seed, i) for i in range(start, start + n)]
    meta = {"ids": [r["id"] for r in rows], "reports": [r["report"] for r in rows],
            "truth": [r["truth"] for r in rows], "disease": [r["disease"] for r in rows]}
    images = np.stack([r["image"] for r in rows])
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images.astype(np.float16), meta=np.array(json.dumps(meta)))
    tmp.replace(f)
    if verbose:
        print(f"  pairs {start}-{start + n - 1} (seed {seed}) in {time.perf_counter() - t0:.0f} s -> {f}", flush=True)
    return {"images": images.astype(np.float16).astype(np.float32), **meta}


def make_pairs(seed: int, n: int, cache_dir: Path, *, verbose: bool = True) -> dict:
    """n rendered pairs {ids, images [n, 128, 128] float32, reports, truth, disease}, cached in chunks."""
    parts = [_chunk(seed, s, min(CHUNK, n - s), cache_dir, verbose) for s in range(0, n, CHUNK)]
    out = {"images": np.concatenate([p["images"] for p in parts])}
    for k in ("ids", "reports", "truth", "disease"):
        out[k] = [x for p in parts for x in p[k]]
    return out


if __name__ == "__main__":  # render caches ahead of training: python -m training.report_gen_data SEED N [SEED N ...]
    import sys

    import torch

    torch.set_num_threads(1)
    a = sys.argv[1:]
    for s, n in zip(a[::2], a[1::2]):
        make_pairs(int(s), int(n), Path("runs/report_gen/data"))
