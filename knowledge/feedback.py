"""Human feedback: cases a reviewer decided become solved cases for the next learn run."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from langgraph.checkpoint.sqlite import SqliteSaver

from knowledge.learn import SolvedCase


def reviewed_cases(state_db: str | Path) -> list[SolvedCase]:
    saver = SqliteSaver(sqlite3.connect(str(state_db), check_same_thread=False))
    latest: dict[str, dict] = {}
    for cp in saver.list(None):  # newest first per thread
        tid = cp.config["configurable"]["thread_id"]
        if tid not in latest:
            latest[tid] = cp.checkpoint["channel_values"]
    out = []
    for vals in latest.values():
        v, r = vals.get("verdict"), vals.get("review")
        if v and r and r.get("action") in ("approve", "override"):
            out.append(SolvedCase(vals["case_id"], r["diagnosis"], vals["domain"], vals["summary"],
                                  vals.get("tool_results", [])))
    saver.conn.close()
    return out
