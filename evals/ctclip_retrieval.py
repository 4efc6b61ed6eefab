"""Similar-case retrieval latency: p50/p95 per query at 1k and 10k indexed cases, Chroma vs numpy.

    python -m evals.ctclip_retrieval [--sizes 1000,10000] [--dim D] [--queries 200]
    python -m evals.ctclip_retrieval --cases DIR [--embedder hu-histogram]   # + end-to-end build rate

A query is what the case_retrieval tool does after embedding the CT: `CaseIndex.query` (Chroma HNSW,
cosine, top k + the consulted case's exclusion, metadata and report fetched). Vectors are random
unit vectors of the CT-CLIP embedding size (`--dim`; default: the checkpoint's or tools/ctclip.py's
default config's, else 256): latency
does not depend on what the vectors mean. A brute-force numpy search (matrix product + argpartition)
over the same vectors is timed in the same run as the baseline, and Chroma's recall@k against it
is reported (HNSW is approximate). Build rate: vectors inserted per second (batched upserts), and
with --cases the end-to-end rate of `build_index` (load CT, embed, upsert) on real case folders.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from core.catalogue import load_catalogue
from tools.case_retrieval import CaseIndex, build_index


def embedding_dim() -> int:
    """CT-CLIP's embedding size (its checkpoint's, else its default config's), else 256."""
    try:
        from tools import ctclip

        if Path(ctclip.CHECKPOINT).is_file():
            _, meta = ctclip.load_ctclip(ctclip.CHECKPOINT, device="cpu")
            return int(meta["config"]["embed_dim"])
        return int(ctclip.DEFAULT_CONFIG["embed_dim"])
    except Exception:  # noqa: BLE001 - no CT-CLIP here: the default size
        pass
    return 256


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def bench_size(n: int, dim: int, queries: int, k: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    dx = [d.key for d in load_catalogue().chest_diseases()]
    E = unit_vectors(n, dim, rng)
    ids = [f"bench-{i:06d}" for i in range(n)]
    report = ("TECHNIQUE: CT chest without intravenous contrast. FINDINGS: lobar consolidation. "
              "IMPRESSION: Findings are consistent with community-acquired pneumonia.")
    with tempfile.TemporaryDirectory() as tmp:
        idx = CaseIndex(Path(tmp) / "index", embedder="bench-random", version="1")
        t0 = time.perf_counter()
        idx.add_many({"case_id": ids[i], "embedding": E[i], "verdict": dx[i % len(dx)], "source": "truth",
                      "report": report} for i in range(n))
        build = time.perf_counter() - t0
        Q = unit_vectors(queries, dim, rng)
        excl = [ids[int(j)] for j in rng.integers(0, n, queries)]
        idx.query(Q[0], k=k, exclude_case_id=excl[0])  # warm-up
        lat, got = [], []
        for q, e in zip(Q, excl):
            t = time.perf_counter()
            hits = idx.query(q, k=k, exclude_case_id=e)
            lat.append((time.perf_counter() - t) * 1000)
            got.append([h.case_id for h in hits])
        base, truth = [], []
        id_arr = np.array(ids)
        for q, e in zip(Q, excl):
            t = time.perf_counter()
            s = E @ q
            s[int(e.split("-")[1])] = -np.inf  # the consulted case's exclusion
            top = np.argpartition(-s, k)[:k]
            top = top[np.argsort(-s[top])]
            base.append((time.perf_counter() - t) * 1000)
            truth.append(list(id_arr[top]))
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)]))
    return {"n": n, "dim": dim, "build_s": build, "insert_per_s": n / build,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "numpy_p50_ms": float(np.percentile(base, 50)), "numpy_p95_ms": float(np.percentile(base, 95)),
            "recall": recall}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000", help="index sizes to time ('' for none)")
    ap.add_argument("--dim", type=int, default=None, help="embedding size (default: CT-CLIP's, else 256)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--cases", type=Path, default=None, help="also time build_index on these case folders")
    ap.add_argument("--embedder", default="hu-histogram", help="for --cases: ctclip | hu-histogram")
    args = ap.parse_args(argv)
    dim = args.dim or embedding_dim()
    print(f"threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; dim {dim}; k {args.k}; "
          f"{args.queries} queries per size", flush=True)
    rows = []
    for n in (int(x) for x in args.sizes.split(",") if x.strip()):
        rows.append(bench_size(n, dim, args.queries, args.k))
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    print("\n| cases | dim | insert/s | Chroma p50 ms | Chroma p95 ms | numpy p50 ms | numpy p95 ms | "
          "Chroma/numpy p50 | Chroma/numpy p95 | recall@k |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['dim']} | {r['insert_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['numpy_p50_ms']:.2f} | {r['numpy_p95_ms']:.2f} | x{r['p50_ms'] / r['numpy_p50_ms']:.1f} | "
              f"x{r['p95_ms'] / r['numpy_p95_ms']:.1f} | {r['recall']:.3f} |")
    if args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            rep = build_index(args.cases, Path(tmp) / "index", embedder=args.embedder)
        print(f"\nbuild_index end to end ({args.embedder} {rep.version}) on {args.cases}: {rep.added} cases "
              f"embedded in {rep.seconds:.1f} s = {rep.rate:.2f} cases/s (embedding {rep.embed_seconds:.1f} s; "
              f"{rep.no_ct} without CT, {len(rep.skipped)} skipped)")
    return rows


if __name__ == "__main__":
    main()
