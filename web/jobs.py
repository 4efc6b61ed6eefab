"""One consultation started from the page: runs the graph in a worker thread, buffers its steps as events.

The graph is streamed (`stream_mode="updates"`) so each node's output arrives as it finishes: the
text steps come from the consultation's `on_event`, and the structured parts (study thumbnails after
intake, tool overlays after the tools, each opinion, the verdict or the review request) are added
from the node updates. The page reads the buffer over server-sent events and may reconnect.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from agents.chat import ChatSession
from agents.consult import Consultation
from core.catalogue import load_catalogue
from core.errors import CaseDataError

log = logging.getLogger(__name__)


@dataclass
class Event:
    id: int
    kind: str  # step | image | opinion | verdict | review | ready | error | end
    data: dict


def one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, CaseDataError) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


@dataclass
class ConsultJob:
    thread_id: str
    case_id: str
    case_dir: Path
    artefact_root: Path
    make_consultation: Callable[..., Consultation]
    slots: threading.Semaphore
    on_finished: Callable[["ConsultJob"], None] | None = None
    events: list[Event] = field(default_factory=list)
    done: bool = False
    started: float = field(default_factory=time.time)
    consultation: Consultation | None = None
    chat: ChatSession | None = None
    ask_lock: threading.Lock = field(default_factory=threading.Lock)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, kind: str, **data) -> None:
        with self._lock:
            self.events.append(Event(len(self.events) + 1, kind, data))

    def since(self, n: int) -> list[Event]:
        with self._lock:
            return self.events[n:]

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"consult-{self.thread_id}", daemon=True).start()

    def artefact_url(self, rel: str) -> str:
        return f"/api/threads/{quote(self.thread_id, safe='')}/artefacts/{quote(rel)}"

    def _run(self) -> None:
        if not self.slots.acquire(blocking=False):
            self.emit("step", text="queued: another consultation is running; this one starts when it ends")
            self.slots.acquire()
        try:
            self._consult()
        except Exception as e:  # noqa: BLE001 - every failure becomes one line on the page, never a hang
            log.exception("consultation %s failed", self.thread_id)
            self.emit("error", message=one_line(e))
        finally:
            self.slots.release()
            if self.on_finished:  # before "end": when the page sees the end, the run's results have the case
                try:
                    self.on_finished(self)
                except Exception:  # noqa: BLE001
                    log.exception("recording %s failed", self.thread_id)
            self.emit("end")
            self.done = True

    def _consult(self) -> None:
        from agents.run_report import study_thumbnails

        cat = load_catalogue()
        c = self.consultation = self.make_consultation(on_event=lambda m: self.emit("step", text=str(m)),
                                                       artefact_root=self.artefact_root)
        cfg = {"configurable": {"thread_id": self.thread_id}}
        for update in c.graph.stream({"case_dir": str(self.case_dir.resolve())}, cfg, stream_mode="updates"):
            for node, value in update.items():
                if node.startswith("__") or not isinstance(value, dict):
                    continue
                if node == "intake":
                    for caption, b64 in study_thumbnails(self.case_dir):
                        self.emit("image", caption=caption, src="data:image/png;base64," + b64, source="study")
                elif node == "tools":
                    for r in value.get("tool_results", []):
                        self._overlays(r)
                elif node == "diagnostician":
                    for op in (value.get("opinions") or {}).values():
                        self.emit("opinion", agent=op["agent"], model=op["model"], round=op["round"],
                                  diagnosis=op["diagnosis"], name=cat.diseases[op["diagnosis"]].name,
                                  differential=op["differential"][:3], rationale=op["rationale"])
        self._finish(c, cfg)

    def restore(self) -> None:
        """Rebuild the page's view of a consultation from its checkpoint (after a restart); runs nothing."""
        from agents.run_report import study_thumbnails

        c = self.consultation = self.make_consultation(on_event=None, artefact_root=self.artefact_root)
        cfg = {"configurable": {"thread_id": self.thread_id}}
        try:
            values = c.graph.get_state(cfg).values
            if not values.get("summary"):
                self.emit("error", message="this consultation never got past intake; start it again")
                return
            self.emit("step", text="restored from the checkpoint (the live step log is not kept across restarts)")
            for caption, b64 in study_thumbnails(self.case_dir):
                self.emit("image", caption=caption, src="data:image/png;base64," + b64, source="study")
            for r in values.get("tool_results", []):
                self.emit("step", text=f"tool {r['id']}: {r['status']} — {r.get('summary') or r.get('error') or ''}")
                self._overlays(r)
            self._finish(c, cfg)
        except Exception as e:  # noqa: BLE001
            log.exception("restoring %s failed", self.thread_id)
            self.emit("error", message=one_line(e))
        finally:
            self.emit("end")
            self.done = True

    def _overlays(self, r: dict) -> None:
        for a in r.get("artefacts", []):
            if a.get("kind") == "png":
                self.emit("image", caption=f"{r['id']}: {a.get('description') or a['id']}",
                          src=self.artefact_url(a["path"]), source=r["id"])

    def _finish(self, c: Consultation, cfg: dict) -> None:
        snap = c.graph.get_state(cfg)
        verdict = snap.values.get("verdict")
        if verdict:
            self.emit("verdict", verdict=verdict)
        else:
            pending = [i.value for t in snap.tasks for i in (t.interrupts or ())]
            if pending:
                self.emit("review", round=pending[0]["round"],
                          votes={o["agent"]: o["diagnosis"] for o in pending[0]["opinions"]})
        self.chat = ChatSession(c, self.case_dir, self.thread_id)  # the thread has state: no second run
        self.emit("ready")

    def close(self) -> None:
        if self.consultation is not None:  # the backends are shared by every job: only this job's database link
            self.consultation.checkpointer.conn.close()
