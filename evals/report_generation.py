"""Report generation on held-out cohort radiographs: knowledge-enhanced vs R2Gen-style baseline vs nearest neighbour.

    python -m evals.report_generation            # loads runs/report_gen/{baseline,knowledge}.pt, trains if absent
    python -m evals.report_generation --retrain          # train both first (training/train_report_gen.py defaults)

Held-out cases are real case folders written by the cohort generator (core/synth/cohort.py `generate_case`,
the evals' grid) and read through core's loaders as the tool receives them. By default each case's plan is
drawn as the cohort draws it, redrawn while it is a pathology case, and limited to the radiograph (no CT:
the CT acquisition would triple the time and the generator never sees it); `--full-cohort` runs
`generate_cohort` itself and keeps the cases that have a radiograph. Training pairs come from other seeds.

Metrics: pycocoevalcap BLEU-1..4, METEOR (its jar, Java), ROUGE-L and CIDEr-D on lower-case tokens without
section headers; clinical efficacy (CE): the negation-aware rule reader (core.reports.read_findings) reads the
radiograph-visible catalogue findings from generated and reference report, present or hedged = positive;
precision / recall / F1 micro over (case, finding) pairs and macro over findings with any positive.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tools.report_generation import (detokenize, generate_reports, load_bundle, metric_text, retrieval_embedding,
                                     tokenize)


# ------------------------------------------------------------------ metrics

def meteor_scorer():
    """pycocoevalcap's METEOR (a Java subprocess, ~20 s to start): make one and reuse it."""
    import shutil

    from pycocoevalcap.meteor.meteor import Meteor

    if shutil.which("java") is None:
        raise RuntimeError("METEOR runs pycocoevalcap's Java jar and no `java` is on PATH: install a JRE "
                           "(apt-get install default-jre-headless) or pass --no-meteor")
    return Meteor()


def nlg_scores(refs: list[str], gens: list[str], meteor=None) -> dict[str, float]:
    """pycocoevalcap corpus scores for pre-tokenised, space-joined strings (METEOR when a scorer is given)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [r or "."] for i, r in enumerate(refs)}
    res = {i: [g or "."] for i, g in enumerate(gens)}  # empty hypotheses break the scorers
    b, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"BLEU-{i + 1}": float(v) for i, v in enumerate(b)}
    if meteor is not None:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def positives(text: str, keys: list[str]) -> set[str]:
    from core.reports import read_findings

    return {k for k, how in read_findings(text).items() if how != "absent" and k in keys}


def ce_scores(refs: list[str], gens: list[str], keys: list[str]) -> dict[str, float]:
    R = np.array([[k in positives(t, keys) for k in keys] for t in refs])
    G = np.array([[k in positives(t, keys) for k in keys] for t in gens])
    tp, fp, fn = (R & G).sum(0), (~R & G).sum(0), (R & ~G).sum(0)
    p = tp.sum() / max(tp.sum() + fp.sum(), 1)
    r = tp.sum() / max(tp.sum() + fn.sum(), 1)
    has = R.sum(0) > 0
    pk = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    rk = tp / np.maximum(tp + fn, 1)
    fk = np.where(pk + rk > 0, 2 * pk * rk / np.maximum(pk + rk, 1e-12), 0.0)
    return {"CE-P": float(p), "CE-R": float(r), "CE-F1": float(2 * p * r / max(p + r, 1e-12)),
            "CE-P macro": float(pk[has].mean()), "CE-R macro": float(rk[has].mean()),
            "CE-F1 macro": float(fk[has].mean()), "per_finding_f1": dict(zip(keys, np.round(fk, 3).tolist()))}


def micro_f1_diff_ci(refs, gen_a, gen_b, keys, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Paired bootstrap over cases of micro CE-F1(a) - CE-F1(b)."""
    R = np.array([[k in positives(t, keys) for k in keys] for t in refs])
    A = np.array([[k in positives(t, keys) for k in keys] for t in gen_a])
    B = np.array([[k in positives(t, keys) for k in keys] for t in gen_b])

    def f1(idx, G):
        tp, fp, fn = (R[idx] & G[idx]).sum(), (~R[idx] & G[idx]).sum(), (R[idx] & ~G[idx]).sum()
        return 2 * tp / max(2 * tp + fp + fn, 1)

    rng = np.random.default_rng(seed)
    all_idx = np.arange(len(R))
    boots = [f1(i, A) - f1(i, B) for i in (rng.integers(0, len(R), len(R)) for _ in range(n))]
    return float(f1(all_idx, A) - f1(all_idx, B)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


# ------------------------------------------------------------------ held-out cases

def xr_cases(n: int, seed: int, out_dir: Path, full_cohort: bool = False) -> list[Path]:
    """Case folders with a chest radiograph (resumable: finished folders are kept)."""
    from core.catalogue import load_catalogue
    from core.synth.cohort import CohortOptions, draw_plan, generate_case, generate_cohort

    opts = CohortOptions.for_grid((64, 96, 96), xr_shape=(192, 192), slide_size=(2048, 1536))
    out_dir = Path(out_dir)
    if full_cohort:
        from core.case import Modality, load_case

        ids = [c for c in generate_cohort(n, seed, out_dir, opts)
               if any(s.modality == Modality.XR for s in load_case(out_dir / c).studies)]  # not the slide cases
    else:
        cat, ids = load_catalogue(), []
        for i in range(n):
            cid = f"s{seed}-{i:04d}"
            if not (out_dir / cid / "case.yaml").is_file():
                rng = np.random.default_rng(np.random.SeedSequence([seed, i, 1]))
                plan = draw_plan(rng, opts, cat)
                while plan.studies == "wsi":
                    plan = draw_plan(rng, opts, cat)
                plan.studies = "xr"
                generate_case(seed, i, out_dir, opts, plan=plan)
            ids.append(cid)
    return [out_dir / c for c in sorted(ids)]


def load_xr(folder: Path) -> tuple[np.ndarray, str, list[str]]:
    """(model input [128, 128], reference XR report, truth XR finding keys) of one case folder."""
    from core.case import load_case
    from core.catalogue import load_catalogue
    from core.imaging.load import load_study
    from tools.cxr_analysis import model_input, validated_array

    case = load_case(folder)
    study = next(s for s in case.studies if s.modality.value == "XR")
    rad = load_study(folder, study)
    xr = {k for k, f in load_catalogue().findings.items() if f.xr}
    truth = sorted({f.label for f in case.truth.findings if f.label in xr}) if case.truth else []
    return model_input(validated_array(rad)), case.truth.reports.get("xr", ""), truth


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--test-seed", type=int, default=4242)
    ap.add_argument("--cohort", type=Path, default=Path("runs/report_gen/test_cohort"))
    ap.add_argument("--full-cohort", action="store_true", help="generate_cohort with CT too (slower)")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("runs/report_gen"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--no-meteor", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    paths = {m: args.ckpt_dir / f"{m}.pt" for m in ("baseline", "knowledge")}
    todo = [m for m, p in paths.items() if args.retrain or not p.is_file()]
    if todo:
        from training.train_report_gen import Args, run

        print(f"training {todo} into {args.ckpt_dir}", flush=True)
        run(Args(out_dir=args.ckpt_dir, models=tuple(todo)))
    t_train = time.perf_counter() - t0
    folders = xr_cases(args.n_test, args.test_seed, args.cohort / ("full" if args.full_cohort else "xr"),
                       args.full_cohort)
    rows = [load_xr(f) for f in folders]
    t_data = time.perf_counter() - t0 - t_train
    images = np.stack([r[0] for r in rows])
    refs = [metric_text(tokenize(r[1])) for r in rows]
    ref_texts = [r[1] for r in rows]
    ids = [f.name for f in folders]
    know, base = load_bundle(paths["knowledge"]), load_bundle(paths["baseline"])
    gens: dict[str, list[dict]] = {}
    t1 = time.perf_counter()
    gens["knowledge"] = generate_reports(know, images, ids)
    gens["baseline (R2Gen-style)"] = generate_reports(base, images, ids)
    gens["knowledge model, knowledge masked"] = generate_reports(know, images, ids, knowledge=False)
    with torch.no_grad():  # nearest training report by the same image embedding the knowledge model retrieves with
        f, lg = know.backbone(torch.from_numpy(images))
        idx, _ = know.bank.query(retrieval_embedding(f, lg, know.stats), 1)
    gens["nearest-neighbour report"] = [{"tokens": tokenize(know.bank.reports[int(i)]),
                                         "text": detokenize(tokenize(know.bank.reports[int(i)]))} for i in idx[:, 0]]
    t_gen = time.perf_counter() - t1
    from core.catalogue import load_catalogue

    keys = [k for k, f_ in load_catalogue().findings.items() if f_.xr]
    results = {}
    meteor = None if args.no_meteor else meteor_scorer()
    for name, g in gens.items():
        hyp = [metric_text(x["tokens"]) for x in g]
        results[name] = {**nlg_scores(refs, hyp, meteor),
                         **ce_scores(ref_texts, [x["text"] for x in g], keys),
                         "mean_tokens": float(np.mean([len(h.split()) for h in hyp]))}
    results["reference"] = {"mean_tokens": float(np.mean([len(r.split()) for r in refs]))}
    diff = micro_f1_diff_ci(ref_texts, [x["text"] for x in gens["knowledge"]],
                            [x["text"] for x in gens["baseline (R2Gen-style)"]], keys)
    cols = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CE-P", "CE-R", "CE-F1",
            "CE-P macro", "CE-R macro", "CE-F1 macro"]
    cols = [c for c in cols if c in results["knowledge"]]
    print(f"\n{len(rows)} held-out cohort radiographs (seed {args.test_seed}); training pairs: "
          f"{know.meta.get('data', {}).get('train', '?')}")
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name in gens:
        print(f"| {name} | " + " | ".join(f"{results[name][c]:.3f}" for c in cols) + " |")
    print(f"\nmicro CE-F1 knowledge - baseline: {diff[0]:+.3f} [95% paired bootstrap {diff[1]:+.3f}, {diff[2]:+.3f}]")
    kf, bf = results["knowledge"]["per_finding_f1"], results["baseline (R2Gen-style)"]["per_finding_f1"]
    print("per-finding CE-F1 (knowledge / baseline): " + ", ".join(f"{k} {kf[k]:.2f}/{bf[k]:.2f}" for k in keys))
    for i in range(2):
        print(f"\n[{ids[i]}] reference: {' '.join(ref_texts[i].split())}\n  knowledge: {gens['knowledge'][i]['text']!r}"
              f"\n  baseline: {gens['baseline (R2Gen-style)'][i]['text']!r}")
    total = time.perf_counter() - t0
    print(f"\ntime: training {t_train:.0f} s, test data {t_data:.0f} s, generation {t_gen:.0f} s, total {total:.0f} s")
    out = {"n_test": len(rows), "test_seed": args.test_seed, "results": results, "ce_f1_diff_knowledge_baseline": diff,
           "seconds": round(total, 1), "full_cohort": args.full_cohort}
    (args.ckpt_dir / "eval.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
