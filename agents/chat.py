"""Chat consultation on a case: questions after (or instead of waiting for) the panel's verdict.

The assistant answers from the case summary, the tool evidence and the verdict; it re-runs tools
when asked (`/tool NAME [STUDY]`, or a question naming a tool or asking to re-measure/re-run).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from agents.consult import Consultation
from agents.diagnostician import DATA_RULE
from agents.planner import plan_tools
from agents.run_tools import run_planned
from agents.schemas import PlannedCall
from tools.registry import tool_classes

SYSTEM = ("You are the grand-rounds consultant answering a clinician's questions about one case. Answer from "
          "the case, the tool evidence and the panel's verdict; cite evidence ids in brackets. " + DATA_RULE)
_RERUN = re.compile(r"\b(re-?run|re-?measure|run (the )?tools?|measure again|analy[sz]e again)\b", re.I)


class ChatSession:
    def __init__(self, consultation: Consultation, case_dir: str | Path, thread_id: str | None = None):
        self.c = consultation
        self.case_dir = Path(case_dir)
        out = self.c.run(self.case_dir, thread_id) if thread_id is None or not self.c.state(thread_id) else None
        self.thread_id = out.thread_id if out else thread_id
        self.state = dict(self.c.state(self.thread_id))
        self.turns: list[dict] = []
        self.llm = self.c.services.llms.for_role("reporter")[0]

    def tools_requested(self, question: str) -> list[PlannedCall]:
        q = question.strip()
        names = tool_classes()
        if q.startswith("/tool"):
            parts = q.split()
            name = parts[1] if len(parts) > 1 else ""
            if name not in names:
                raise ValueError(f"no tool {name!r}; tools: {', '.join(names)}")
            studies = [s for s in self.state["studies"] if len(parts) < 3 or s["id"] == parts[2]]
            from core.case import Modality

            return [PlannedCall(tool=name, study_id=s["id"], reason="asked in chat") for s in studies
                    if Modality(s["modality"]) in names[name].modalities]
        named = [n for n in names if n in q or n.replace("_", " ") in q.lower()]
        if named or _RERUN.search(q):
            plan = plan_tools(self.state["summary"], self.state["studies"], None)
            return [c for c in plan.calls if not named or c.tool in named]
        return []

    def _evidence(self) -> str:
        rows = [f"[{r['id']}] " + (r["summary"] if r["status"] == "ok" else f"FAILED: {r['error']}")
                for r in self.state.get("tool_results", [])]
        v = self.state.get("verdict")
        verdict = (f"Panel verdict: {v['diagnosis_name']} (confidence {v['confidence']:.2f}, {v['decided_by']})"
                   if v else "Panel verdict: pending human review")
        return "Evidence:\n" + "\n".join(rows or ["(none)"]) + "\n" + verdict

    def ask(self, question: str) -> Iterator[str]:
        calls = self.tools_requested(question)
        if calls:  # a re-run sees the study as the panel did: the plan's restorations go first
            planned = [PlannedCall.model_validate(c) for c in (self.state.get("plan") or {}).get("calls", [])]
            restore = [c for c in planned if tool_classes()[c.tool].stage == "restore"
                       and any(c.study_id == x.study_id for x in calls) and c.tool not in {x.tool for x in calls}]
            calls = restore + calls
            art = self.c.services.artefact_root / self.state["case_id"] if self.c.services.artefact_root else None
            fresh = {r.id: r.model_dump() for r in run_planned(self.case_dir, calls, art)}
            merged = {r["id"]: r for r in self.state.get("tool_results", [])}
            merged.update(fresh)
            self.state["tool_results"] = list(merged.values())
            for rid, r in fresh.items():
                yield f"[ran {rid}: {r['status']}; {r['summary'] or r['error']}]\n"
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{self.state['summary']}\n{self._evidence()}"},
                {"role": "assistant", "content": "I have the case and the evidence. What would you like to know?"},
                *self.turns[-6:], {"role": "user", "content": question}]
        answer = []
        for piece in self.llm.stream(msgs, max_tokens=200):
            answer.append(piece)
            yield piece
        self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": "".join(answer)}]
