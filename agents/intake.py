"""Intake: load the case as agents may see it (no truth, de-identified) and summarise it as data.

Free text from the case (history, prior report) is untrusted: instruction-like sentences are
removed and recorded as warnings, and the rest is wrapped in <case> tags that every system prompt
declares to be data.
"""
from __future__ import annotations

from pathlib import Path

from core.case import Case, Modality, load_case
from core.untrusted import INSTRUCTION as _INSTRUCTION, neutralise  # noqa: F401 (re-exported)


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
