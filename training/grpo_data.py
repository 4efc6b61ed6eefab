"""Diagnosis prompts for GRPO in text mode, built from the cohort's real tool findings.

    python -m training.grpo_data --n 160 --seed 6262 --out runs/grpo/solved.jsonl [--start 0]

1. a synthetic cohort (`core.synth.cohort`), then intake + the planner's rule + the tools on each case
   (`knowledge.learn.collect`), one JSON line per case appended as it finishes (resumable; several
   processes may each take a `--start`/`--n` slice into their own file);
2. `diagnosis_example`: the panel's own prompt (system prompt, case summary, evidence lines) with the
   domain's candidate diagnoses and the answer format, and the truth for the accuracy reward.

Tools that only render (xraysyn, prior_ct_views) are left out of collection: their findings carry no
diagnostic evidence and they are the slowest.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from agents.diagnostician import SYSTEM, _evidence_text
from core.catalogue import Catalogue, load_catalogue
from knowledge.learn import SolvedCase

RENDER_ONLY_TOOLS = frozenset({"xraysyn", "prior_ct_views"})
ANSWER_FORMAT = ("Think briefly inside <think></think>, then give exactly one candidate name inside "
                 "<answer></answer>.")


def candidates(domain: str, cat: Catalogue) -> list[str]:
    return [d.name for d in cat.diseases.values() if d.domain == domain]


def diagnosis_example(case: SolvedCase, cat: Catalogue | None = None) -> dict:
    """One GRPO row: chat `prompt`, the truth's name as `answer`, the candidate names as `choices`."""
    cat = cat or load_catalogue()
    names = candidates(case.domain, cat)
    user = (f"{case.summary}\n{_evidence_text(case.tool_results, [])}\n"
            f"Candidate diagnoses: {'; '.join(names)}.\nWhat is the single most likely diagnosis? {ANSWER_FORMAT}")
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
            "answer": cat.diseases[case.diagnosis].name, "choices": names, "case_id": case.case_id}


def load_cases(paths: list[Path]) -> list[SolvedCase]:
    out: dict[str, SolvedCase] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                c = SolvedCase(**json.loads(line))
                out[c.case_id] = c
    return [out[k] for k in sorted(out)]


def split_cases(cases: list[SolvedCase], held_out: float = 0.3, seed: int = 0) -> tuple[list, list]:
    """(train, held-out) by case, stratified by diagnosis so every class is in both where it can be."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for dx in sorted({c.diagnosis for c in cases}):
        group = [c for c in cases if c.diagnosis == dx]
        idx = rng.permutation(len(group))
        k = int(round(held_out * len(group))) if len(group) > 1 else 0
        test += [group[i] for i in idx[:k]]
        train += [group[i] for i in idx[k:]]
    return train, test


def collect_cases(cohort: Path, n: int, seed: int, out: Path, start: int = 0) -> int:
    from agents.intake import intake
    from agents.planner import plan_tools
    from agents.run_tools import run_planned
    from core.case import load_case
    from core.synth.cohort import CohortOptions, generate_cohort

    opts = CohortOptions.for_grid((64, 96, 96), xr_shape=(192, 192), slide_size=(2048, 1536))
    ids = generate_cohort(n, seed, cohort, opts, start=start)
    done = {json.loads(x)["case_id"] for x in out.read_text().splitlines() if x.strip()} if out.is_file() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0, added = time.perf_counter(), 0
    for cid in sorted(ids):
        if cid in done:
            continue
        d = cohort / cid
        case = load_case(d)
        if case.truth is None:
            continue
        info = intake(d)
        calls = [c for c in plan_tools(info["summary"], info["studies"], None).calls
                 if c.tool not in RENDER_ONLY_TOOLS]
        results = [r.model_dump() for r in run_planned(d, calls)]
        row = SolvedCase(case.id, case.truth.diagnosis, info["domain"], info["summary"], results)
        with out.open("a") as f:  # one line per finished case: a stopped run resumes
            f.write(json.dumps(asdict(row)) + "\n")
        added += 1
        print(f"{cid} {case.truth.diagnosis} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return added


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=160)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, default=6262)
    ap.add_argument("--cohort", type=Path, default=Path("runs/grpo/cohort"))
    ap.add_argument("--out", type=Path, default=Path("runs/grpo/solved.jsonl"))
    ap.add_argument("--rows", type=Path, nargs="+", default=None, help="instead: write the GRPO training rows of "
                    "these collected files (the split training/grpo.py uses) to --out, for a machine without the "
                    "tool stack")
    ap.add_argument("--held-out", type=float, default=0.3)
    args = ap.parse_args(argv)
    if args.rows:
        from training.grpo import text_splits
        train, test = text_splits(args.rows, args.held_out, 0)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in train))
        print(f"{len(train)} training rows -> {args.out} ({len(test)} held out)")
        return
    import torch
    torch.set_num_threads(1)
    print(f"collected {collect_cases(args.cohort, args.n, args.seed, args.out, args.start)} cases into {args.out}")


if __name__ == "__main__":
    main()
