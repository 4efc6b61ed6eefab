"""Planner: the LLM proposes tools for the case; a rule checks every proposal and fills gaps.

The rule: a tool runs on a study only if it accepts the study's modality, and every study gets the
tools whose `relevance` says they apply (so a weak planner can never leave a study unexamined).
A tool that is not `available()` here (similar-case retrieval without a built index) is not offered.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, create_model

from agents.diagnostician import SYSTEM  # shared with the panel, so the case text is a cached prefix
from agents.llm.base import LLMBackend, LLMError
from agents.schemas import Plan, PlannedCall
from core.case import Modality
from tools.registry import tool_classes



def _proposal_model(names: list[str]) -> type[BaseModel]:
    return create_model("ToolProposal", tools=(list[Literal[tuple(names)]], Field(max_length=len(names))))


def plan_tools(summary: str, studies: list[dict], llm: LLMBackend | None, complaint: str = "") -> Plan:
    classes = tool_classes()
    usable = {n: c for n, c in classes.items()
              if any(Modality(s["modality"]) in c.modalities for s in studies) and c.available()}
    proposed: list[str] = []
    if llm is not None and usable:
        menu = "\n".join(f"- {n}: {c.description} (modalities: {', '.join(m.value for m in c.modalities)})"
                         for n, c in usable.items())
        try:
            ans = llm.structured([{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": f"{summary}\nAvailable tools:\n{menu}\n"
                                                              "Plan the imaging analysis: which tools should run?"}],
                                 _proposal_model(list(usable)), max_tokens=64, retries=0)
            proposed = list(dict.fromkeys(ans.tools))
        except LLMError:
            proposed = []  # the rule below still plans every study
    calls, rejected = [], []
    for name in proposed:
        if name not in usable:
            rejected.append(f"{name}: no study of a modality it accepts")
    for s in studies:
        mod = Modality(s["modality"])
        for name, cls in usable.items():
            if mod not in cls.modalities:
                continue
            why = cls.applies(s, complaint, studies)
            if name in proposed and why:
                calls.append(PlannedCall(tool=name, study_id=s["id"], reason=f"proposed by planner; rule: {why}"))
            elif name in proposed:
                rejected.append(f"{name} on {s['id']}: rule finds it not applicable")
            elif why:
                calls.append(PlannedCall(tool=name, study_id=s["id"], reason=f"added by rule: {why}"))
    return Plan(calls=calls, proposed=proposed, rejected=rejected)
