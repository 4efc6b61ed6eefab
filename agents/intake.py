"""Intake: load the case as agents may see it (no truth, de-identified) and summarise it as data.

Free text from the case (history, prior report) is untrusted: instruction-like sentences are
removed and recorded as warnings, and the rest is wrapped in <case> tags that every system prompt
declares to be data.
"""
from __future__ import annotations

import re
from pathlib import Path

from core.case import Case, Modality, load_case

_INSTRUCTION = re.compile(
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
        (removed if _INSTRUCTION.search(sent) else kept).append(sent)
    return " ".join(s for s in kept if s.strip()), removed


def domain_of(case: Case) -> str:
    return "pathology" if any(s.modality == Modality.WSI for s in case.studies) else "chest"


def summarise(case: Case) -> tuple[str, list[str]]:
    """The case as prompt text (data only) and warnings about removed text."""
    c = case.for_agents()
    warnings: list[str] = []
    history, bad = neutralise(c.presentation.history)
    warnings += [f"history: removed instruction-like text: {b[:80]!r}" for b in bad]
    prior, bad = neutralise(c.prior_report or "")
    warnings += [f"prior report: removed instruction-like text: {b[:80]!r}" for b in bad]
    complaint, bad = neutralise(c.presentation.complaint)
    warnings += [f"complaint: removed instruction-like text: {b[:80]!r}" for b in bad]
    v = c.presentation.vitals
    vitals = ", ".join(f"{k.replace('_', ' ')} {val:g}" for k, val in v.model_dump().items() if val is not None)
    labs = "; ".join(f"{lab.name} {lab.value:g} {lab.unit}" + (f" (ref {lab.reference})" if lab.reference else "")
                     for lab in c.presentation.labs)
    studies = "; ".join(f"{s.id}: {s.modality.value} {s.body_region}, {neutralise(s.description)[0]}".rstrip(", ")
                        for s in c.studies)
    lines = [f"Patient: {c.patient.age}-year-old {dict(F='female', M='male').get(c.patient.sex, 'patient')}",
             f"Complaint: {complaint or 'not given'}", f"History: {history or 'none given'}",
             f"Vitals: {vitals or 'not recorded'}", f"Labs: {labs or 'none'}", f"Studies: {studies}"]
    if prior:
        lines.append(f"Prior report: {prior}")
    return "<case>\n" + "\n".join(lines) + "\n</case>", warnings


def intake(case_dir: str | Path) -> dict:
    case = load_case(Path(case_dir))
    summary, warnings = summarise(case)
    return {"case_id": case.id, "summary": summary, "domain": domain_of(case), "warnings": warnings,
            "studies": [{"id": s.id, "modality": s.modality.value, "description": s.description,
                         "acquisition": dict(s.acquisition)} for s in case.studies]}
