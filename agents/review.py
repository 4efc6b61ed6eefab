"""Human review: the graph pauses with `interrupt`; the queue is every thread paused there."""
from __future__ import annotations

from typing import Any

from agents.schemas import ReviewDecision
from core.catalogue import Catalogue


def review_payload(state: dict) -> dict:
    return {"case_id": state["case_id"], "summary": state["summary"], "round": state.get("round", 1),
            "opinions": [o for o in state.get("opinions", {}).values() if o["round"] == state.get("round", 1)],
            "history": state.get("history", []), "tool_results": [
                {"id": r["id"], "status": r["status"], "summary": r.get("summary", ""), "error": r.get("error")}
                for r in state.get("tool_results", [])]}


def parse_decision(raw: Any, cat: Catalogue, panel: set[str]) -> ReviewDecision:
    d = raw if isinstance(raw, ReviewDecision) else ReviewDecision.model_validate(raw)
    if d.action in ("approve", "override"):
        key = d.diagnosis if d.diagnosis in cat.diseases else cat.normalise_disease(d.diagnosis or "")
        if key is None:
            raise ValueError(f"diagnosis {d.diagnosis!r} is not in the catalogue")
        if d.action == "approve" and key not in panel:
            raise ValueError(f"approve must pick one of the panel's diagnoses {sorted(panel)}; use override")
        d = d.model_copy(update={"diagnosis": key})
    return d
