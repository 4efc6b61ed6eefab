"""Untrusted free text (case history, prior reports, retrieved past reports) on its way into prompts.

Instruction-like sentences are removed and returned so the caller can record them; what remains is
still data, and every prompt wraps or quotes it as such.
"""
from __future__ import annotations

import re

INSTRUCTION = re.compile(
    r"(ignore|disregard|forget|override)\b.{0,40}\b(instruction|prompt|rule|previous|above|system)"
    r"|\byou are now\b|\bas an ai\b|\bsystem prompt\b|\bnew instructions?\b|^\s*(system|assistant)\s*:"
    r"|\b(diagnos[ei]s?|answer|respond|reply|output|say)\b.{0,25}\b(must|should) (be|say)\b"
    r"|\b(always|only) (answer|diagnose|respond|say)\b|\bdiagnose (this|the) (case|patient) as\b",
    re.IGNORECASE)


def neutralise(text: str) -> tuple[str, list[str]]:
    """(text with instruction-like sentences removed, the removed sentences)."""
    if not text:
        return "", []
    kept, removed = [], []
    for sent in re.split(r"(?<=[.!?])\s+|\n+", text):
        (removed if INSTRUCTION.search(sent) else kept).append(sent)
    return " ".join(s for s in kept if s.strip()), removed
