"""The embedded diagnostician before and after GRPO, on held-out cases, through the engine it runs on (llama.cpp).

    python -m evals.grpo --data runs/grpo/solved_*.jsonl --adapter checkpoints/smollm2_grpo_lora.gguf

Held-out rows: the same case split `training/grpo.py` trains on the rest of (`--held-out`, `--seed`).
Per model (SmolLM2-135M-Instruct GGUF without and with the GGUF LoRA adapter), greedy generation:
- valid format: `<think>...</think><answer>...</answer>`;
- valid answer: the answer is one of the candidate diagnoses;
- accuracy: the answer is the truth;
and the panel's own use of the model, scoring mode: the length-normalised log-likelihood of each
candidate name as the reply to the same prompt without the answer-format instruction (what
`agents/diagnostician.py` reads), accuracy of its argmax. 95% Wilson intervals; paired counts
(cases only one of the two gets right) with an exact two-sided sign test.

`--panel` instead runs one diagnostician as the panel does, on the held-out cases' stored tool results, without
and with the adapter; `--panel --reasoning` puts the adapted model on it in reasoning mode.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import binomtest

from evals.stats import wilson
from training.grpo_data import ANSWER_FORMAT
from training.grpo_rewards import THINK_ANSWER, match_choice, parse_answer


def _score_messages(row: dict) -> list[dict]:
    msgs = [dict(m) for m in row["prompt"]]
    msgs[-1]["content"] = msgs[-1]["content"].replace(" " + ANSWER_FORMAT, "")
    return msgs


def run_model(rows: list[dict], adapter: Path | None, *, max_tokens: int, threads: int, score: bool) -> list[dict]:
    from agents.llm.llama_cpp import LlamaCppBackend

    be = LlamaCppBackend(name="eval", model="", n_ctx=2048, n_threads=threads, seed=0,
                         lora=str(adapter) if adapter else None, max_tokens=max_tokens, temperature=0.0)
    out = []
    for r in rows:
        text = be.chat(r["prompt"], max_tokens=max_tokens, temperature=0.0)
        ans = match_choice(parse_answer(text), r["choices"])
        rec = {"case_id": r["case_id"], "truth": r["answer"], "text": text,
               "format": bool(THINK_ANSWER.match(text)), "valid": ans is not None, "correct": ans == r["answer"]}
        if score:
            s = be.score_options(_score_messages(r), r["choices"])
            best = max(s.scores, key=lambda x: x.mean_logprob).option
            rec.update(score_pred=best, score_correct=best == r["answer"])
        out.append(rec)
    return out


def run_panel(cases: list, adapter: Path | None, *, threads: int, reasoning: bool = False) -> list[dict]:
    """One diagnostician as the panel runs it (radiologist persona: the model's option likelihoods, calibrated,
    plus the guideline evidence term and the prior), on the cases' stored tool results. `reasoning`: the model
    reasons and answers one candidate instead (`reasoning = true` on a backend), its likelihoods only where it
    gives no valid answer."""
    from agents.diagnostician import PERSONAS, diagnose
    from agents.llm.llama_cpp import LlamaCppBackend
    from agents.llm.reasoning import ReasoningBackend
    from core.catalogue import load_catalogue

    cat = load_catalogue()
    be = LlamaCppBackend(name="eval", model="", n_ctx=2048, n_threads=threads, seed=0,
                         lora=str(adapter) if adapter else None)
    if reasoning:
        be = ReasoningBackend(name="eval", model=be.model, inner=be)
    out = []
    for c in cases:
        op = diagnose(agent="a", persona=PERSONAS[0], llm=be, cat=cat, domain=c.domain, summary=c.summary,
                      tool_results=c.tool_results, insights=[], round_=1, peers=[], previous=None,
                      write_rationale=False)
        out.append({"case_id": c.case_id, "truth": c.diagnosis, "panel_pred": op.diagnosis,
                    "panel_correct": op.diagnosis == c.diagnosis,
                    **({"answered": be.answered} if reasoning else {})})
    return out


def _summary(recs: list[dict]) -> dict:
    n = len(recs)
    res = {"n": n}
    for k in ("format", "valid", "correct", "score_correct", "panel_correct"):
        if recs and k in recs[0]:
            x = sum(r[k] for r in recs)
            p, lo, hi = wilson(x, n)
            res[k] = {"k": x, "rate": p, "ci95": [lo, hi]}
    return res


def paired(a: list[dict], b: list[dict], key: str) -> dict:
    only_a = sum(x[key] and not y[key] for x, y in zip(a, b))
    only_b = sum(y[key] and not x[key] for x, y in zip(a, b))
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_before": only_a, "only_after": only_b, "sign_test_p": p}


def main(argv: list[str] | None = None) -> dict:
    from training.grpo import text_splits

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, nargs="+", required=True)
    ap.add_argument("--adapter", type=Path, required=True, help="the GGUF LoRA (training/grpo.py --ship)")
    ap.add_argument("--cold-start", type=Path, default=None, help="also score the cold-start-only adapter "
                    "(format SFT with random answers), to tell GRPO's share of the change from the cold start's")
    ap.add_argument("--held-out", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-score", action="store_true", help="skip the scoring-mode accuracy")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--panel", action="store_true", help="instead: one diagnostician as the panel runs it (option "
                    "likelihoods + evidence term + prior) without and with the adapter")
    ap.add_argument("--reasoning", action="store_true", help="--panel: the adapted model in reasoning mode (it "
                    "answers one candidate after <think>) against the base model's likelihoods")
    args = ap.parse_args(argv)
    if args.panel:
        return panel_main(args)
    _, rows = text_splits(args.data, args.held_out, args.seed)
    rows = rows[: args.limit] if args.limit else rows
    print(f"{len(rows)} held-out cases; greedy generation, max {args.max_tokens} tokens; llama.cpp, "
          f"{args.threads} thread(s)")
    results, t = {}, {}
    models = [("before", None), ("after", args.adapter)] + ([("cold_start", args.cold_start)] if args.cold_start else [])
    for name, adapter in models:
        t0 = time.perf_counter()
        results[name] = run_model(rows, adapter, max_tokens=args.max_tokens, threads=args.threads,
                                  score=not args.no_score)
        t[name] = time.perf_counter() - t0
    keys = [k for k in ("format", "valid", "correct", "score_correct") if k in results["before"][0]]
    out = {"n": len(rows), "seconds": t, **{k: _summary(v) for k, v in results.items()},
           "paired": {k: paired(results["before"], results["after"], k) for k in keys}}
    if "cold_start" in results:
        out["paired_vs_cold_start"] = {k: paired(results["cold_start"], results["after"], k) for k in keys}
    cs = "cold_start" in results
    print(f"\n| metric | before GRPO |{' cold start only |' if cs else ''} after GRPO | only before / only after "
          f"(sign test p) |\n|---|---|{'---|' if cs else ''}---|---|")
    for k, label in (("format", "valid format"), ("valid", "answer among candidates"), ("correct", "accuracy"),
                     ("score_correct", "accuracy, scoring mode (the panel's use)")):
        if k not in out["before"]:
            continue
        b, a, pr = out["before"][k], out["after"][k], out["paired"][k]
        fmt = lambda s: f"{s['rate']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] ({s['k']}/{out['n']})"  # noqa: E731
        mid = f" {fmt(out['cold_start'][k])} |" if cs else ""
        print(f"| {label} | {fmt(b)} |{mid} {fmt(a)} | {pr['only_before']} / {pr['only_after']} "
              f"(p={pr['sign_test_p']:.3g}) |")
    if cs:
        print("after GRPO vs cold start only (only cold start / only after, p): " + "; ".join(
            f"{k} {v['only_before']}/{v['only_after']} (p={v['sign_test_p']:.3g})"
            for k, v in out["paired_vs_cold_start"].items()))
    print("\ntime: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    for name in results:
        print(f"example ({name}): {results[name][0]['text'][:200]!r}")
    if args.json:
        args.json.write_text(json.dumps({**out, "records": results}, indent=1))
    return out


def panel_main(args) -> dict:
    from training.grpo_data import load_cases, split_cases

    _, test = split_cases(load_cases(args.data), args.held_out, args.seed)
    test = test[: args.limit] if args.limit else test
    res, t = {}, {}
    for name, adapter in (("before", None), ("after", args.adapter)):
        t0 = time.perf_counter()
        res[name] = run_panel(test, adapter, threads=args.threads, reasoning=args.reasoning and adapter is not None)
        t[name] = time.perf_counter() - t0
    out = {"n": len(test), "seconds": t, **{k: _summary(v) for k, v in res.items()},
           "paired": paired(res["before"], res["after"], "panel_correct")}
    b, a, pr = out["before"]["panel_correct"], out["after"]["panel_correct"], out["paired"]
    print(f"{len(test)} held-out cases, one diagnostician (radiologist persona, evidence term on), llama.cpp"
          + (f"; with the adapter in reasoning mode (a valid answer on {res['after'][-1]['answered']} of "
             f"{len(test)} cases, likelihoods on the rest)" if args.reasoning and test else ""))
    print(f"panel accuracy without the adapter {b['rate']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}] ({b['k']}), "
          f"with it {a['rate']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] ({a['k']}); only without / only with "
          f"{pr['only_before']} / {pr['only_after']} (p={pr['sign_test_p']:.3g}); "
          + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    if args.json:
        args.json.write_text(json.dumps({**out, "records": res}, indent=1))
    return out


if __name__ == "__main__":
    main()
