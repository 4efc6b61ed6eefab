"""Does learned knowledge help? Test-split accuracy without knowledge, with knowledge learned by
the same model, with statistics only, and with knowledge transferred from another engine.

    python -m evals.knowledge --n 150 --seed 5150

The cohort is split by seed: 60% learn+validation (split 70/30 by the learn step, so 42/18 of
the whole) and 40% test. Knowledge is learned on learn, refined on validation (statistics by the
evidence scorer, LLM-written criteria by the panel itself), then the full consultation (tools on)
runs on test under each condition, every case in a fresh thread, all conditions sharing one set
of tool results. 95% Wilson intervals; paired difference counts.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from agents.llm.factory import BackendPool, backend_from_config
from core.config import BackendConfig, load_settings
from core.synth.cohort import CohortOptions, generate_cohort
from evals.diagnosis import metrics, run_condition
from evals.stats import wilson
from knowledge.apply import StoreKnowledge
from knowledge.learn import collect, learn, split
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
    args = ap.parse_args(argv)
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
    tmp = Path(tempfile.mkdtemp(dir=args.out))
    t0 = time.perf_counter()
    fit_dirs, val_dirs = split(learn_dirs, args.seed)
    solved = (collect(fit_dirs), collect(val_dirs))  # tools run once; every learn run below reuses them
    print(f"tools on {len(learn_dirs)} learn+validation cases: {time.perf_counter() - t0:.0f} s", flush=True)
    stores = {}
    same = KnowledgeStore(tmp / "same")
    v, rep = learn(learn_dirs, same, local, seed=args.seed, panel=panel, solved=solved)
    stores["same_model"] = (same, v, rep)
    print("same_model refinement:", json.dumps(rep.get("panel", {})), flush=True)
    stats = KnowledgeStore(tmp / "stats")
    v, rep = learn(learn_dirs, stats, None, seed=args.seed, solved=solved)
    stores["statistics_only"] = (stats, v, rep)
    if args.transfer_engine != "none":
        other = backend_from_config("other", BackendConfig(kind=args.transfer_engine))
        src = KnowledgeStore(tmp / "other_src")
        # refined by the panel that will use it; the other engine runs the same weights, so its own
        # panel would score alike, only slower
        _, rep = learn(learn_dirs, src, other, seed=args.seed, panel=panel, solved=solved)
        print("transferred refinement:", json.dumps(rep.get("panel", {})), flush=True)
        export_jsonl(src, tmp / "transfer.jsonl")
        dst = KnowledgeStore(tmp / "transferred")
        v = import_jsonl(dst, tmp / "transfer.jsonl")
        stores[f"transferred_from_{args.transfer_engine}"] = (dst, v, rep)
    results, rows_by = {}, {}
    tool_cache: dict = {}  # every condition sees the same tool results; only the knowledge differs
    rows_by["no_knowledge"] = run_condition(test_dirs, True, settings, pool, tmp / "none.sqlite", tool_cache=tool_cache)
    for name, (store, v, rep) in stores.items():
        rows_by[name] = run_condition(test_dirs, True, settings, pool, tmp / f"{name}.sqlite",
                                      knowledge=StoreKnowledge(store, version=v), tool_cache=tool_cache)
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
