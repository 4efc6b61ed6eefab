"""Does learned knowledge help? Test-split accuracy without knowledge, with knowledge learned by
the same model, with statistics only, and with knowledge transferred from another engine.

    python -m evals.knowledge --n 150 --seed 5150

The cohort is split by seed: 60% learn+validation (split 70/30 by the learn step, so 42/18 of
the whole) and 40% test. Knowledge is learned on learn, refined on validation (statistics by the
evidence scorer, LLM-written criteria by the panel itself, and the whole set against the panel
without knowledge: a set that does worse than nothing is not published), then the full consultation (tools on)
runs on test under each condition, every case in a fresh thread, all conditions sharing one set
of tool results. 95% Wilson intervals; paired difference counts.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from agents.llm.factory import BackendPool, backend_from_config
from core.config import BackendConfig, load_settings
from core.synth.cohort import CohortOptions, generate_cohort
from evals.diagnosis import metrics, run_condition
from evals.stats import wilson
from knowledge.apply import StoreKnowledge
from knowledge.learn import VerdictCache, collect, learn, load_solved, save_solved, split
from knowledge.store import KnowledgeStore
from knowledge.transfer import export_jsonl, import_jsonl


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=5150)
    ap.add_argument("--cohort", type=Path, default=Path("runs/knowledge_cohort"))
    ap.add_argument("--out", type=Path, default=Path("runs/eval_knowledge"))
    ap.add_argument("--no-panel-check", action="store_true", help="refine criteria without the panel "
                    "(the previous, evidence-only refinement)")
    ap.add_argument("--transfer-engine", default="transformers", help="backend kind that writes the transferred "
                    "knowledge ('none' to skip)")
    ap.add_argument("--conditions", default="", help="comma-separated subset of no_knowledge, same_model, "
                    "statistics_only, transferred (default all): several processes can share one --out, each "
                    "running a part, and a last run with all of them resumes every part and prints the table")
    args = ap.parse_args(argv)
    wanted = set(args.conditions.split(",")) if args.conditions else {"no_knowledge", "same_model", "statistics_only",
                                                                      "transferred"}
    ids = generate_cohort(args.n, args.seed, args.cohort, CohortOptions.for_grid((64, 96, 96), xr_shape=(192, 192),
                                                                               slide_size=(2048, 1536)))
    rng = np.random.default_rng(args.seed)
    order = [args.cohort / ids[i] for i in rng.permutation(len(ids))]
    n_learn, n_val = int(0.4 * len(order)), int(0.2 * len(order))
    learn_dirs, test_dirs = order[:n_learn + n_val], order[n_learn + n_val:]
    settings = load_settings(overrides=["llm_rationale=false"])
    pool = BackendPool(settings)
    local = pool.for_role("knowledge")[0]
    panel = None if args.no_panel_check else pool.for_role("diagnosticians")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"  # everything below resumes from here: solved cases, panel answers, stores, test rows
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    fit_dirs, val_dirs = split(learn_dirs, args.seed)
    solved = []
    for name, dirs in (("learn", fit_dirs), ("validation", val_dirs)):  # tools run once for every learn run
        path = work / f"solved_{name}.jsonl"
        if not path.is_file():
            save_solved(collect(dirs), path)
        solved.append(load_solved(path))
    print(f"tools on {len(learn_dirs)} learn+validation cases: {time.perf_counter() - t0:.0f} s", flush=True)
    cache = VerdictCache(work / "panel_verdicts.jsonl")

    def learned(name: str, llm) -> tuple[KnowledgeStore, int, dict]:
        store, rep_path = KnowledgeStore(work / name), work / f"{name}.report.json"
        if rep_path.is_file() and store.current_version():
            return store, store.current_version(), json.loads(rep_path.read_text())
        v, rep = learn(learn_dirs, store, llm, seed=args.seed, panel=panel,
                       solved=tuple(solved), cache=cache)
        rep_path.write_text(json.dumps(rep, indent=1, default=str))
        print(f"{name} refinement:", json.dumps(rep.get("panel", {})), flush=True)
        return store, v, rep

    stores = {}
    if "same_model" in wanted:
        stores["same_model"] = learned("same", local)
    if "statistics_only" in wanted:
        stores["statistics_only"] = learned("stats", None)
    if args.transfer_engine != "none" and "transferred" in wanted:
        # refined by the panel that will use it; the other engine runs the same weights, so its own
        # panel would score alike, only slower
        src, _, rep = learned("other_src", backend_from_config("other", BackendConfig(kind=args.transfer_engine)))
        dst = KnowledgeStore(work / "transferred")
        if not dst.current_version():
            export_jsonl(src, work / "transfer.jsonl")
            import_jsonl(dst, work / "transfer.jsonl")
        stores[f"transferred_from_{args.transfer_engine}"] = (dst, dst.current_version(), rep)
    results, rows_by = {}, {}
    tool_cache: dict = {}  # every condition sees the same tool results; only the knowledge differs
    if "no_knowledge" in wanted:
        rows_by["no_knowledge"] = run_condition(test_dirs, True, settings, pool, work / "none.sqlite",
                                                log=work / "test_no_knowledge.jsonl", tool_cache=tool_cache)
    for name, (store, v, rep) in stores.items():
        rows_by[name] = run_condition(test_dirs, True, settings, pool, work / f"{name}.sqlite",
                                      knowledge=StoreKnowledge(store, version=v), log=work / f"test_{name}.jsonl",
                                      tool_cache=tool_cache)
    if "no_knowledge" not in rows_by:
        print("part done:", ", ".join(rows_by), flush=True)
        return {}
    base = {r["case"]: r["top1"] == r["truth"] for r in rows_by["no_knowledge"]}
    for name, rows in rows_by.items():
        m = metrics(rows)
        hits = {r["case"]: r["top1"] == r["truth"] for r in rows}
        m["gained"] = sum(hits[c] and not base[c] for c in base)
        m["lost"] = sum(base[c] and not hits[c] for c in base)
        if name in stores:
            m["insights"] = stores[name][2]["kept"]
        results[name] = m
        print(name, json.dumps({k: (round(v[0], 3) if isinstance(v, tuple) else v) for k, v in m.items()}), flush=True)
    print(f"\nsplit: learn+validation {len(learn_dirs)}, test {len(test_dirs)} (seed {args.seed})")
    print("| condition | top-1 [95% CI] | top-3 | review rate | gained | lost | insights |\n|---|---|---|---|---|---|---|")
    for name, m in results.items():
        t = m["top1"]
        print(f"| {name} | {t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] | {m['top3'][0]:.3f} | {m['review'][0]:.3f} | "
              f"{m['gained']} | {m['lost']} | {m.get('insights', '')} |")
    b = results["no_knowledge"]["top1"][0]
    for name in stores:
        print(f"gain {name}: {results[name]['top1'][0] - b:+.3f} top-1")
    (args.out / "metrics.json").write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
