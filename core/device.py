"""Device choice in one place: `auto` takes CUDA when present, CPU always works."""
from __future__ import annotations


def pick_device(preference: str = "auto") -> str:
    import torch

    if preference == "cpu":
        return "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"
