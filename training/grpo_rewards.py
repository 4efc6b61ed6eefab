"""GRPO rewards (MedReason-R1): format, answer correctness, validity. TRL calls each with the batch's
completions and the dataset's columns as keyword lists; each returns one float per completion.

Completions are `<think>...</think><answer>...</answer>`. An answer is read as a choice by its
letter ("B", "B)", "(B) right") or its text (case, spacing and punctuation ignored).
"""
from __future__ import annotations

import re

THINK_ANSWER = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.S)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
LETTERS = "ABCDEFGH"


def completion_text(c) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}], standard ones as str."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        content = c[-1].get("content", "")
        if isinstance(content, list):  # VLM messages: content blocks
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return str(c)


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def parse_answer(text: str) -> str | None:
    m = ANSWER.search(text)
    return m.group(1).strip() if m else None


def match_choice(answer: str | None, choices: list[str]) -> str | None:
    """The choice an answer names, or None (no answer, or not one of the choices)."""
    if answer is None or not choices:
        return None
    a = _norm(answer)
    by_text = {_norm(c): c for c in choices}
    if a in by_text:
        return by_text[a]
    m = re.fullmatch(r"\(?([a-h])\)?(?:\s+(.*))?", a)
    if m:
        i = LETTERS.lower().index(m.group(1))
        if i < len(choices) and (m.group(2) is None or _norm(m.group(2)) == _norm(choices[i])):
            return choices[i]
    return None


def format_reward(completions, **kwargs) -> list[float]:
    return [1.0 if THINK_ANSWER.match(completion_text(c)) else 0.0 for c in completions]


def accuracy_reward(completions, answer, choices, **kwargs) -> list[float]:
    out = []
    for c, truth, ch in zip(completions, answer, choices):
        got = match_choice(parse_answer(completion_text(c)), list(ch))
        out.append(1.0 if got is not None and _norm(got) == _norm(truth) else 0.0)
    return out


def _roi_side(roi, width) -> str | None:
    if not roi or not width:
        return None
    return "right" if (float(roi[0]) + float(roi[2])) / 2 < float(width) / 2 else "left"


def validity_reward(completions, choices, roi=None, image_width=None, kind=None, **kwargs) -> list[float]:
    """1 when the answer is one of the candidates and, for a location question with an ROI box, names
    the side the box is on (or bilateral): an answer the question or the image rules out earns nothing."""
    n = len(completions)
    roi, image_width, kind = roi or [None] * n, image_width or [None] * n, kind or [None] * n
    out = []
    for c, ch, r, w, k in zip(completions, choices, roi, image_width, kind):
        got = match_choice(parse_answer(completion_text(c)), list(ch))
        ok = got is not None
        if ok and k == "location" and got in ("right", "left"):
            side = _roi_side(r, w)
            ok = side is None or side == got
        out.append(1.0 if ok else 0.0)
    return out


REWARDS = [format_reward, accuracy_reward, validity_reward]
