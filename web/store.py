"""The web run's own records (run_dir/web.sqlite): who owns which consultation, and every review decision.

`review_decisions` is append-only (triggers refuse UPDATE and DELETE): each decision is a new row,
with `applied` saying whether the graph resumed with it. Nothing is ever overwritten, so a second
reviewer's read, a concurrent click or a decision on an already-decided case is kept as it was made.
Rows read back carry `version`: 1, 2, 3 ... per consultation thread, in the order they were made.
"""
from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS review_decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    thread_id TEXT NOT NULL,
    case_id TEXT NOT NULL,
    round INTEGER,
    reviewer TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('approve', 'override', 'send_back')),
    diagnosis TEXT,
    reason TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    applied INTEGER NOT NULL CHECK (applied IN (0, 1)),
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS review_decisions_thread ON review_decisions (thread_id, round);
CREATE TRIGGER IF NOT EXISTS review_decisions_no_update BEFORE UPDATE ON review_decisions
BEGIN SELECT RAISE(ABORT, 'review_decisions is append-only'); END;
CREATE TRIGGER IF NOT EXISTS review_decisions_no_delete BEFORE DELETE ON review_decisions
BEGIN SELECT RAISE(ABORT, 'review_decisions is append-only'); END;
CREATE TABLE IF NOT EXISTS web_threads (
    thread_id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    user TEXT NOT NULL,
    case_id TEXT NOT NULL,
    case_dir TEXT NOT NULL,
    artefact_root TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""
# each decision's version within its thread (1 = the first decision ever made on that consultation)
_VERSIONED = ("SELECT *, ROW_NUMBER() OVER (PARTITION BY thread_id ORDER BY id) AS version "
              "FROM review_decisions")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class WebStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)

    # -- consultations started from the page, bound to the browser session that started them
    def add_thread(self, thread_id: str, session_id: str, user: str, case_id: str, case_dir: Path,
                   artefact_root: Path) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT INTO web_threads VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (thread_id, session_id, user, case_id, str(case_dir), str(artefact_root), _now()))

    def thread(self, thread_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM web_threads WHERE thread_id = ?", (thread_id,)).fetchone()
        return dict(row) if row else None

    def threads_of(self, session_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM web_threads WHERE session_id = ? ORDER BY created_at",
                                    (session_id,)).fetchall()
        return [dict(r) for r in rows]

    # -- review decisions
    def add_decision(self, *, thread_id: str, case_id: str, round_: int | None, reviewer: str, action: str,
                     diagnosis: str | None, reason: str, applied: bool, note: str = "") -> dict:
        with self._lock, self._db:
            cur = self._db.execute(
                "INSERT INTO review_decisions (thread_id, case_id, round, reviewer, action, diagnosis, reason, "
                "created_at, applied, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (thread_id, case_id, round_, reviewer, action, diagnosis, reason, _now(), int(applied), note))
            row = self._db.execute(f"SELECT * FROM ({_VERSIONED}) WHERE id = ?", (cur.lastrowid,)).fetchone()
        return _decision(row)

    def decisions(self, thread_id: str | None = None) -> list[dict]:
        with self._lock:
            if thread_id is None:
                rows = self._db.execute(f"SELECT * FROM ({_VERSIONED}) ORDER BY id").fetchall()
            else:
                rows = self._db.execute(f"SELECT * FROM ({_VERSIONED}) WHERE thread_id = ? ORDER BY id",
                                        (thread_id,)).fetchall()
        return [_decision(r) for r in rows]

    def readers(self, thread_id: str, round_: int) -> set[str]:
        """Reviewers who have read this review round and whose reads have not been applied yet."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT reviewer FROM review_decisions WHERE thread_id = ? AND round = ? "
                                    "AND applied = 0", (thread_id, round_)).fetchall()
        return {r[0] for r in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _decision(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["applied"] = bool(d["applied"])
    return d
