"""CT-RATE-VQA-style question-answer pairs from cases (reports, truth, masks), as a `datasets` image folder.

    python -m training.vqa <cases folder> <out folder> [--no-zoom] [--seed 0]
    datasets.load_dataset("imagefolder", data_dir=<out folder>)  # columns: image + metadata.jsonl's

Per image (a CT's axial slice through a lesion, lung window; or the radiograph), MedReason-R1's four
kinds (arXiv 2510.19626):
- presence: "Is there <finding> in this image?" yes/no; positives from the truth, negatives from
  findings the modality shows that the case does not have;
- location: which side a lesion is on (right / left / bilateral), from the truth's location;
- type: which abnormality the outlined region shows (multiple choice over finding names);
- diagnosis: the case's diagnosis, multiple choice over the domain's candidates.
ROI boxes come from the truth's lesion-mask boxes ([x0, y0, x1, y1] on the slice); with zoom on,
the image carries the region outlined and magnified (`core.imaging.roi_zoom`). Every row keeps its
`choices`, `answer` and `roi` for the rewards. Report text is never copied into a question.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from core.case import Case, Modality, load_case
from core.catalogue import Catalogue, load_catalogue
from core.errors import CaseDataError
from core.imaging.load import load_study
from core.imaging.roi_zoom import ZoomConfig, embed_roi

SIDES = ("right", "left", "bilateral")
LETTERS = "ABCDEFGH"


def lung_window(hu: np.ndarray, level: float = -500.0, width: float = 1500.0) -> np.ndarray:
    lo = level - width / 2
    return (np.clip((hu - lo) / width, 0, 1) * 255).round().astype(np.uint8)


def side_of(location: str) -> str | None:
    loc = location.lower()
    if "bilateral" in loc or ("right" in loc and "left" in loc):
        return "bilateral"
    return next((s for s in ("right", "left") if re.search(rf"\b{s}\b", loc)), None)


def box_side(box: list[float], width: int) -> str:
    """Patient side of a box on an axial slice or PA film displayed radiologically (patient's right on
    the image's left): its centre column against the midline."""
    c = (float(box[0]) + float(box[2])) / 2
    return "right" if c < width / 2 else "left"


def multiple_choice(question: str, choices: list[str]) -> str:
    opts = "; ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))
    return f"{question} Options: {opts}."


def _ct_rows(case: Case, study, hu: np.ndarray, cat: Catalogue, rng: np.random.Generator) -> list[dict]:
    from core.synth.chest import FINDING_KEYS

    truth = case.truth
    boxes = [b for b in truth.roi_boxes if b.study_id == study.id and len(b.box) == 6]
    present = {f.label for f in truth.findings if f.study_id == study.id}
    rows = []
    targets = boxes or [None]
    for b in targets:
        z = int((b.box[2] + b.box[5]) // 2) if b else hu.shape[0] // 2
        z = min(max(z, 0), hu.shape[0] - 1)
        img = lung_window(hu[z])
        roi = [float(b.box[0]), float(b.box[1]), float(b.box[3]) + 1, float(b.box[4]) + 1] if b else None
        base = dict(case_id=case.id, study_id=study.id, modality="CT", slice=z, roi=roi,
                    roi_label=b.label if b else None)
        if b:
            absent = [k for k in FINDING_KEYS if k not in present and k in cat.findings]
            rows.append({**base, "kind": "presence", "image": img, "answer": "yes", "choices": ["yes", "no"],
                         "question": f"Is there {cat.findings[b.label].name.lower()} in this image?"})
            if absent:
                k = str(rng.choice(absent))
                rows.append({**base, "kind": "presence", "image": img, "answer": "no", "choices": ["yes", "no"],
                             "question": f"Is there {cat.findings[k].name.lower()} in this image?"})
            loc = next((f.location for f in truth.findings if f.label == b.label and f.study_id == study.id), "")
            side = side_of(loc)
            if side:
                rows.append({**base, "kind": "location", "image": img, "answer": side, "choices": list(SIDES),
                             "question": multiple_choice(f"On which side is the {cat.findings[b.label].name.lower()}?",
                                                         list(SIDES))})
            others = [cat.findings[k].name for k in rng.permutation(absent)[:3]]
            choices = [cat.findings[b.label].name, *others]
            rng.shuffle(choices)
            rows.append({**base, "kind": "type", "image": img, "answer": cat.findings[b.label].name, "choices": choices,
                         "question": multiple_choice("Which abnormality does the outlined region show?", choices)})
    return rows


def _xr_rows(case: Case, study, img: np.ndarray, cat: Catalogue, rng: np.random.Generator) -> list[dict]:
    xr_keys = [k for k, f in cat.findings.items() if f.xr]
    present = sorted({f.label for f in case.truth.findings if f.label in xr_keys})
    img8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    base = dict(case_id=case.id, study_id=study.id, modality="XR", slice=None, roi=None, roi_label=None)
    rows = []
    for k in present[:2]:
        rows.append({**base, "kind": "presence", "image": img8, "answer": "yes", "choices": ["yes", "no"],
                     "question": f"Is there {cat.findings[k].name.lower()} on this radiograph?"})
    for k in rng.permutation([k for k in xr_keys if k not in present])[:max(1, len(present[:2]))]:
        rows.append({**base, "kind": "presence", "image": img8, "answer": "no", "choices": ["yes", "no"],
                     "question": f"Is there {cat.findings[str(k)].name.lower()} on this radiograph?"})
    return rows


def case_rows(case_dir: Path, cat: Catalogue, rng: np.random.Generator) -> list[dict]:
    case = load_case(case_dir)
    if case.truth is None:
        return []
    rows: list[dict] = []
    first_image = None
    for s in case.studies:
        if Modality(s.modality) == Modality.CT:
            vol = load_study(case_dir, s)
            new = _ct_rows(case, s, vol.array, cat, rng)
        elif Modality(s.modality) == Modality.XR:
            new = _xr_rows(case, s, load_study(case_dir, s).array, cat, rng)
        else:
            continue  # slides: a patch-level VQA would need region truth the cohort does not have
        rows += new
        first_image = first_image if first_image is not None else (new[0] if new else None)
    dom = next(iter({cat.diseases[case.truth.diagnosis].domain}))
    if first_image is not None:
        names = [d.name for d in cat.diseases.values() if d.domain == dom and d.key != case.truth.diagnosis]
        choices = [cat.diseases[case.truth.diagnosis].name, *[str(x) for x in rng.permutation(names)[:3]]]
        rng.shuffle(choices)
        q = multiple_choice(f"A {case.patient.age}-year-old presents with {case.presentation.complaint}. "
                            "Which diagnosis best fits the image?", choices)
        rows.append({**{k: first_image[k] for k in ("case_id", "study_id", "modality", "slice", "roi", "roi_label",
                                                      "image")},
                     "kind": "diagnosis", "question": q, "answer": cat.diseases[case.truth.diagnosis].name,
                     "choices": choices})
    return rows


def build_vqa(cases: Path, out: Path, *, zoom: ZoomConfig | None = ZoomConfig(), seed: int = 0,
              limit: int | None = None) -> int:
    """Write `out/images/*.png` and `out/metadata.jsonl`; returns the number of rows."""
    cat = load_catalogue()
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    dirs = sorted(p.parent for p in Path(cases).glob("*/case.yaml"))[:limit]
    n = 0
    tmp = out / "metadata.jsonl.tmp"
    with tmp.open("w") as meta:
        for d in dirs:
            for r in case_rows(d, cat, rng):
                img = Image.fromarray(r.pop("image")).convert("RGB")
                if zoom is not None and r["roi"] is not None:
                    img = embed_roi(img, r["roi"], zoom)
                name = f"images/{r['case_id']}_{r['study_id']}_{n:05d}.png"
                img.save(out / name)
                meta.write(json.dumps({"file_name": name, **r, "zoom": zoom is not None and r["roi"] is not None})
                           + "\n")
                n += 1
    tmp.replace(out / "metadata.jsonl")
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--no-zoom", action="store_true", help="global image only, no ROI inset")
    ap.add_argument("--inset", type=float, default=0.4, help="inset side as a fraction of the image side")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    zoom = None if args.no_zoom else ZoomConfig(inset_fraction=args.inset)
    try:
        n = build_vqa(args.cases, args.out, zoom=zoom, seed=args.seed, limit=args.limit)
    except CaseDataError as e:  # one line naming the file and field; the previous metadata.jsonl is kept
        raise SystemExit(f"error: {e}") from None
    print(f"{n} question-answer pairs in {args.out} (load with datasets.load_dataset('imagefolder', "
          f"data_dir='{args.out}'))")


if __name__ == "__main__":
    main()
