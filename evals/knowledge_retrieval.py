"""Knowledge retrieval latency: p50/p95 query time at 1k and 10k insights (goal p95 <= 50 ms).

    python -m evals.knowledge_retrieval

Query = embed the case summary (MiniLM, CPU) + Chroma top-k with version/domain filters: the
retrieve-knowledge node's work. An exact cosine search (torch) over the same vectors is
timed in the same run as the baseline (same embedding, exact search).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.catalogue import load_catalogue
from knowledge.schema import Insight
from knowledge.store import KnowledgeStore, embed


def synthetic_insights(n: int, seed: int = 0) -> list[Insight]:
    cat = load_catalogue()
    rng = np.random.default_rng(seed)
    dz = [d for d in cat.diseases.values() if d.domain == "chest"]
    fs = list(cat.findings.values())
    out = []
    for i in range(n):
        d, f, g = dz[rng.integers(len(dz))], fs[rng.integers(len(fs))], fs[rng.integers(len(fs))]
        out.append(Insight(text=f"{f.name.capitalize()} with {g.name} points to {d.name} (criterion {i}).",
                           disease=d.key, kind="general" if i % 3 else "rare", source_model="bench"))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args(argv)
    queries = [f"{a}-year-old with {c}, CT shows consolidation and effusion" for a, c in
               zip(range(20, 20 + args.queries), ["fever"] * args.queries)]
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            s = KnowledgeStore(Path(tmp))
            t0 = time.perf_counter()
            s.publish(synthetic_insights(n))
            build = time.perf_counter() - t0
            for q in queries[:10]:  # warm-up: first calls pay for lazy loading, not for the search
                s.query(q, domain="chest", k=5)
            lat = []
            for q in queries:
                t = time.perf_counter()
                s.query(q, domain="chest", k=5)
                lat.append((time.perf_counter() - t) * 1000)
            got = s.collection(s.current_version()).get(include=["embeddings"])
            # torch, not numpy: a BLAS thread pool beside torch's spins on 2 cores and triples the time
            E = torch.from_numpy(np.asarray(got["embeddings"], dtype=np.float32))
            base = []
            for q in queries:
                t = time.perf_counter()
                qv = torch.from_numpy(embed([q])[0])
                torch.topk(E @ qv, 5)
                base.append((time.perf_counter() - t) * 1000)
            rows.append({"n": n, "build_s": build, "p50_ms": float(np.percentile(lat, 50)),
                         "p95_ms": float(np.percentile(lat, 95)), "exact_p95_ms": float(np.percentile(base, 95))})
            print(rows[-1], flush=True)
    print("\n| insights | build s | p50 ms | p95 ms | exact search p95 ms (same embedding) | store/exact p95 |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['build_s']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['exact_p95_ms']:.1f} | "
              f"x{r['p95_ms'] / r['exact_p95_ms']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
