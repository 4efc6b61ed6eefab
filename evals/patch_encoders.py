"""Linear probe of the patch encoders on held-out synthetic slides: does pretraining help?

    python -m evals.patch_encoders --n-per-class 6 --seed 2027

Makes `--n-per-class` synthetic slides per class (core.synth.slides, seeds unrelated to the
training slides), runs every encoder on the same tile grid (128 px at 1 um/px, at most
`--max-tiles` tissue tiles per slide, zarr-cached in --work-dir), mean-pools each slide's tile
features and scores a standardised multinomial logistic regression by leave-one-slide-out accuracy
and log loss. The learned encoders are measured twice: with their shipped checkpoints and at a
seeded random initialisation of the same architecture.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def loo_probe(X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000))
    proba = cross_val_predict(clf, X, y, cv=LeaveOneOut(), method="predict_proba")
    classes = np.unique(y)
    return {"accuracy": float(accuracy_score(y, classes[proba.argmax(1)])),
            "log_loss": float(log_loss(y, proba, labels=classes))}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from core.imaging.wsi_tiles import TileParams, slide_features_many
    from core.synth.slides import write_slides
    from tools.patch_encoders import get_encoder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-per-class", type=int, default=6)
    p.add_argument("--seed", type=int, default=2027)
    p.add_argument("--slide-size", type=int, nargs=2, default=[2048, 1536])
    p.add_argument("--max-tiles", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", type=Path, default=Path("runs/patch_probe"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    data = write_slides(a.n_per_class, a.seed, tuple(a.slide_size), a.work_dir / "slides", prefix="probe")
    encoders = {"hed_texture": get_encoder("hed_texture"),
                "cnn_simclr": get_encoder("cnn_simclr", device="cpu"),
                "cnn_simclr (random init)": get_encoder("cnn_simclr", device="cpu", pretrained=False),
                "vit_mae": get_encoder("vit_mae", device="cpu"),
                "vit_mae (random init)": get_encoder("vit_mae", device="cpu", pretrained=False)}
    params = TileParams(target_mpp=1.0, tile_px=128, max_tiles=a.max_tiles)
    pooled: dict[str, list[np.ndarray]] = {k: [] for k in encoders}
    for path, _ in data:
        for k, sf in zip(encoders, slide_features_many(path, list(encoders.values()), params,
                                                       cache_dir=a.work_dir / "features", progress=False)):
            pooled[k].append(sf.features.mean(axis=0))
    y = np.array([c for _, c in data])
    rows = {k: {**loo_probe(np.stack(v), y), "dim": int(encoders[k].dim), "version": encoders[k].version}
            for k, v in pooled.items()}
    print(f"\nLeave-one-slide-out linear probe, {len(data)} held-out synthetic slides "
          f"({a.n_per_class}/class, seed {a.seed}), mean-pooled tile features, {time.perf_counter() - t0:.0f} s")
    print(f"{'encoder':28s} {'dim':>5s} {'accuracy':>9s} {'log loss':>9s}")
    for k, r in rows.items():
        print(f"{k:28s} {r['dim']:5d} {r['accuracy']:9.3f} {r['log_loss']:9.3f}")
    out = {"n_slides": len(data), "seed": a.seed, "params": params.model_dump(), "results": rows}
    if a.json:
        a.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
