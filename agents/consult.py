"""Running consultations: one case, pending reviews, decisions. The CLI and the web page call these."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph.types import Command

from agents.graph import build_graph, open_checkpointer
from agents.llm.factory import BackendPool
from agents.review import parse_decision
from agents.schemas import ReviewDecision, Verdict
from agents.services import Services
from core.catalogue import load_catalogue
from core.config import Settings


@dataclass
class Outcome:
    thread_id: str
    verdict: Verdict | None  # None while waiting for a human
    review: dict | None  # the review request payload, when paused


class Consultation:
    """A compiled graph bound to its services and a sqlite checkpoint file."""

    def __init__(self, settings: Settings, state_db: str | Path, *, artefact_root: Path | None = None,
                 on_event=None, use_tools: bool = True, llms: BackendPool | None = None, knowledge=None,
                 tool_cache: dict | None = None):
        self.services = Services(settings=settings, llms=llms or BackendPool(settings), artefact_root=artefact_root,
                                 use_tools=use_tools, on_event=on_event, tool_cache=tool_cache)
        if knowledge is not None:
            self.services.knowledge = knowledge
        self.checkpointer = open_checkpointer(state_db)
        self.graph = build_graph(self.services, self.checkpointer)

    def _outcome(self, thread_id: str) -> Outcome:
        snap = self.graph.get_state({"configurable": {"thread_id": thread_id}})
        pending = [i.value for t in snap.tasks for i in (t.interrupts or ())]
        v = snap.values.get("verdict")
        return Outcome(thread_id, Verdict.model_validate(v) if v else None, pending[0] if pending else None)

    def run(self, case_dir: str | Path, thread_id: str | None = None) -> Outcome:
        thread_id = thread_id or f"{Path(case_dir).name}:{uuid.uuid4().hex[:8]}"
        cfg = {"configurable": {"thread_id": thread_id}}
        self.graph.invoke({"case_dir": str(Path(case_dir).resolve())}, cfg)
        return self._outcome(thread_id)

    def decide(self, thread_id: str, decision: ReviewDecision | dict[str, Any]) -> Outcome:
        d = decision if isinstance(decision, ReviewDecision) else ReviewDecision.model_validate(decision)
        out = self._outcome(thread_id)
        if out.review is None:
            raise ValueError(f"thread {thread_id} is not waiting for review")
        # Validate before resuming: a resume value is stored with the checkpoint, so a bad one must never enter.
        d = parse_decision(d, load_catalogue(), {o["diagnosis"] for o in out.review["opinions"]})
        self.graph.invoke(Command(resume=d.model_dump()), {"configurable": {"thread_id": thread_id}})
        return self._outcome(thread_id)

    def state(self, thread_id: str) -> dict:
        return self.graph.get_state({"configurable": {"thread_id": thread_id}}).values

    def threads(self) -> list[str]:
        seen: dict[str, None] = {}
        for cp in self.checkpointer.list(None):
            seen.setdefault(cp.config["configurable"]["thread_id"], None)
        return list(seen)

    def pending_reviews(self) -> list[Outcome]:
        return [o for o in (self._outcome(t) for t in self.threads()) if o.review is not None]

    def close(self) -> None:
        self.services.llms.close()
        self.checkpointer.conn.close()
