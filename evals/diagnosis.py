"""Diagnostic accuracy of the consultation on a generated cohort, with and without tools.

    python -m evals.diagnosis --n 100 --seed 4242 --cohort runs/eval_cohort

Prints, per condition: top-1 / top-3 accuracy, first-round agreement, review rate, citation
validity and ECE, with 95% intervals (Wilson for rates, bootstrap for ECE and validity). Every
case runs in a fresh graph thread. Cases still split after the last round count with the panel's
pooled differential (what the agents would hand the reviewer).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from agents.consult import Consultation
from agents.llm.factory import BackendPool
from core.case import load_case
from core.config import load_settings
from core.synth.cohort import CohortOptions, generate_cohort
from evals.stats import bootstrap, ece, wilson

DEFAULT_SEED = 4242


def pooled(opinions: list[dict]) -> list[tuple[str, float]]:
    mean: dict[str, float] = {}
    for o in opinions:
        for r in o["differential"]:
            mean[r["diagnosis"]] = mean.get(r["diagnosis"], 0.0) + r["probability"] / len(opinions)
    return sorted(mean.items(), key=lambda kv: kv[1], reverse=True)


def run_condition(cases: list[Path], use_tools: bool, settings, pool, state_db: Path, knowledge=None,
                  log: Path | None = None, tool_cache: dict | None = None) -> list[dict]:
    c = Consultation(settings, state_db, llms=pool, use_tools=use_tools, knowledge=knowledge, tool_cache=tool_cache)
    logged = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log and log.is_file() else []
    rows = list({r["case"]: r for r in logged}.values())  # a case logged twice (two processes) counts once
    done = {r["case"] for r in rows}  # resume: cases already in the log are kept, not rerun
    for case_dir in cases:
        if case_dir.name in done:
            continue
        truth = load_case(case_dir).truth.diagnosis
        t0 = time.perf_counter()
        out = c.run(case_dir)  # a fresh thread per case: nothing carries over
        st = c.state(out.thread_id)
        if out.verdict:
            v = out.verdict
            diff = [(d.diagnosis, d.probability) for d in v.differential]
            row = dict(top1=v.diagnosis, conf=v.confidence, reviewed=False, claims=[c.valid for c in v.rationale],
                       agree1=v.agreement_history[0].agree)
        else:
            rnd = st["round"]
            diff = pooled([o for o in st["opinions"].values() if o["round"] == rnd])
            row = dict(top1=diff[0][0], conf=diff[0][1], reviewed=True, claims=[], agree1=st["history"][0]["agree"])
        row.update(case=case_dir.name, truth=truth, top3=[d for d, _ in diff[:3]], seconds=time.perf_counter() - t0,
                   rounds=st["round"])
        rows.append(row)
        if log is not None:  # progressive, so a long eval can be read while it runs
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
    c.checkpointer.conn.close()
    return rows


def metrics(rows: list[dict]) -> dict:
    n = len(rows)
    top1 = [r["top1"] == r["truth"] for r in rows]
    claims = [c for r in rows for c in r["claims"]]
    m = {"n": n, "top1": wilson(sum(top1), n), "top3": wilson(sum(r["truth"] in r["top3"] for r in rows), n),
         "agreement": wilson(sum(r["agree1"] for r in rows), n), "review": wilson(sum(r["reviewed"] for r in rows), n),
         "citation_validity": wilson(sum(bool(c) for c in claims), len(claims)),
         "ece": bootstrap(list(zip([r["conf"] for r in rows], top1)),
                          lambda xs: ece(np.array([x[0] for x in xs]), np.array([x[1] for x in xs]))),
         "sec_per_case": float(np.mean([r["seconds"] for r in rows]))}
    return m


def _fmt(t) -> str:
    return f"{t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}]" if isinstance(t, tuple) else f"{t:.3g}" if isinstance(t, float) else str(t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--cohort", type=Path, default=Path("runs/eval_cohort"))
    ap.add_argument("--out", type=Path, default=Path("runs/eval_diagnosis"))
    ap.add_argument("--ct-size", default="64,96,96")
    ap.add_argument("--conditions", default="tools,no_tools")
    ap.add_argument("--resume", action="store_true", help="keep cases already in each condition's log")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.ct_size.split(","))
    ids = generate_cohort(args.n, args.seed, args.cohort, CohortOptions.for_grid(shape, xr_shape=(192, 192),
                                                                                  slide_size=(2048, 1536)))
    cases = [args.cohort / i for i in ids]
    settings = load_settings()
    pool = BackendPool(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for cond in args.conditions.split(","):
        log = args.out / f"{cond}.jsonl"
        if not args.resume:
            log.unlink(missing_ok=True)
        rows = run_condition(cases, cond == "tools", settings, pool, args.out / f"{cond}.sqlite", log=log)
        results[cond] = metrics(rows)
        print(cond, json.dumps({k: _fmt(v) for k, v in results[cond].items()}), flush=True)
    keys = ["n", "top1", "top3", "agreement", "review", "citation_validity", "ece", "sec_per_case"]
    print("\n| condition | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for cond, m in results.items():
        print(f"| {cond} | " + " | ".join(_fmt(m[k]) for k in keys) + " |")
    chance = 1 / 11
    print(f"\nchance top-1 (11 chest diseases) ≈ {chance:.3f}; values are point [95% CI]")
    (args.out / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
