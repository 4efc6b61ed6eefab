"""Small statistics for evals: Wilson intervals, bootstrap intervals, expected calibration error."""
from __future__ import annotations

import math

import numpy as np


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, max(0.0, c - h), min(1.0, c + h)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    if len(conf) == 0:
        return float("nan")
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    return float(sum(abs(conf[idx == b].mean() - correct[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def bootstrap(values: list, stat, n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    vals = list(values)
    if not vals:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = [stat([vals[i] for i in rng.integers(0, len(vals), len(vals))]) for _ in range(n)]
    return float(stat(vals)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))
