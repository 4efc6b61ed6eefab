"""Cases per minute for `grandrounds batch`, sequential vs concurrent, measured in one run.

    python -m evals.batch_throughput --cases examples/cases --concurrency 2

Each setting runs the full batch (tools on, embedded model) into a fresh run folder; model load
and tool warm-up are paid once before timing so both settings start warm.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from agents.batch import find_cases, run_batch
from core.config import load_settings


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=Path, default=Path("examples/cases"))
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--no-tools", action="store_true")
    args = ap.parse_args(argv)
    settings = load_settings()
    n = len(find_cases(args.cases))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = find_cases(args.cases)[:1]
        warm_dir = Path(tmp) / "warm"
        warm_dir.mkdir()
        shutil.copytree(warm[0], warm_dir / warm[0].name)
        run_batch(warm_dir, Path(tmp) / "warmup", settings, use_tools=not args.no_tools)
        for conc in (1, args.concurrency):
            s = run_batch(args.cases, Path(tmp) / f"c{conc}", settings, concurrency=conc, use_tools=not args.no_tools)
            rows.append({"concurrency": conc, "cases": n, "seconds": s["seconds"], "cases_per_min": s["cases_per_min"]})
            print(rows[-1], flush=True)
    print("\n| concurrency | cases | seconds | cases/min |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['cases']} | {r['seconds']:.1f} | {r['cases_per_min']:.2f} |")
    print(f"\nratio concurrent/sequential: x{rows[1]['cases_per_min'] / rows[0]['cases_per_min']:.2f}; "
          f"goal >= 4 cases/min with tools on")
    return rows


if __name__ == "__main__":
    main()
