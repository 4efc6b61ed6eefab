"""Batch diagnosis over a folder of cases into runs/<name>/, resumable.

runs/<name>/results.jsonl  one line per finished case (appended atomically; a later line for the
                           same case, e.g. after review, supersedes an earlier one)
runs/<name>/summary.csv    one row per case, rewritten from results.jsonl
runs/<name>/report.html    self-contained page with per-case verdicts and images
runs/<name>/state.sqlite   graph checkpoints and the review queue
runs/<name>/artefacts/     tool outputs per case
"""
from __future__ import annotations

import csv
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from agents.consult import Consultation, Outcome
from core.case import CASE_FILE
from core.config import Settings
from core.errors import CaseDataError

_append_lock = threading.Lock()


def find_cases(folder: Path) -> list[Path]:
    folder = Path(folder)
    if (folder / CASE_FILE).is_file():
        return [folder]
    if not folder.is_dir():
        raise CaseDataError(folder, "folder", "does not exist or is not a folder")
    return sorted(p for p in folder.iterdir() if (p / CASE_FILE).is_file())


def read_results(path: Path) -> dict[str, dict]:
    """Latest line per case; a torn last line (killed mid-write) is ignored."""
    out: dict[str, dict] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "case_id" in row:
            out[row["case_id"]] = row
    return out


def append_result(path: Path, row: dict) -> None:
    data = (json.dumps(row, default=str) + "\n").encode()
    with _append_lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not path.read_bytes().endswith(b"\n"):
                data = b"\n" + data  # a previous run died mid-line: start clean
            os.write(fd, data)  # one write on an O_APPEND fd: the line lands whole or not at all
            os.fsync(fd)
        finally:
            os.close(fd)


def outcome_row(case_id: str, out: Outcome, seconds: float) -> dict:
    row = {"case_id": case_id, "thread_id": out.thread_id, "seconds": round(seconds, 2)}  # case_dir added by caller
    if out.verdict is not None:
        row.update(status="decided", verdict=out.verdict.model_dump())
    else:
        row.update(status="awaiting_review", review=out.review and {
            "round": out.review["round"], "votes": {o["agent"]: o["diagnosis"] for o in out.review["opinions"]}})
    return row


def write_summary(run: Path, cases: dict[str, Path] | None = None) -> Path:
    rows = read_results(run / "results.jsonl")
    path = run / "summary.csv"
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "status", "diagnosis", "confidence", "decided_by", "rounds", "tool_failures",
                    "citations_valid", "truth", "correct", "seconds"])
        for cid, r in sorted(rows.items()):
            v = r.get("verdict") or {}
            truth = r.get("truth")
            w.writerow([cid, r["status"], v.get("diagnosis", ""), v.get("confidence", ""), v.get("decided_by", ""),
                        len(v.get("agreement_history", [])) or (r.get("review") or {}).get("round", ""),
                        len(v.get("tool_failures", [])), v.get("citations_valid", ""), truth or "",
                        "" if not truth or not v else int(truth == v.get("diagnosis")), r.get("seconds", "")])
    tmp.replace(path)
    return path


def run_batch(cases_dir: Path, run: Path, settings: Settings, *, concurrency: int = 1, use_tools: bool = True,
              on_start: Callable[[int, int], None] | None = None, on_case: Callable[[dict], None] | None = None,
              on_event=None, with_truth: bool = True, knowledge=None) -> dict:
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    results = run / "results.jsonl"
    cases = find_cases(cases_dir)
    done = read_results(results)
    todo = [c for c in cases if c.name not in done]
    if on_start:
        on_start(len(cases), len(cases) - len(todo))
    consult = Consultation(settings, run / "state.sqlite", artefact_root=run / "artefacts", use_tools=use_tools,
                           on_event=on_event, knowledge=knowledge)
    t0 = time.perf_counter()
    finished = 0

    def one(case_dir: Path) -> dict:
        s = time.perf_counter()
        try:
            out = consult.run(case_dir, thread_id=f"{case_dir.name}:{os.urandom(4).hex()}")
            row = outcome_row(case_dir.name, out, time.perf_counter() - s)
            row["case_dir"] = str(case_dir.resolve())
        except CaseDataError as e:
            row = {"case_id": case_dir.name, "status": "invalid", "error": str(e),
                   "seconds": round(time.perf_counter() - s, 2)}
        if with_truth:  # evals read truth here, after the agents are done; agents never see it
            try:
                from core.case import load_case

                t = load_case(case_dir).truth
                row["truth"] = t.diagnosis if t else None
            except CaseDataError:
                pass
        append_result(results, row)
        return row

    try:
        with ThreadPoolExecutor(max(1, concurrency)) as ex:
            pending = set()
            it = iter(todo)
            for c in it:  # keep at most `concurrency` cases in flight so an interrupt loses only those
                pending.add(ex.submit(one, c))
                if len(pending) >= concurrency:
                    break
            while pending:
                finished_now, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished_now:
                    row = f.result()
                    finished += 1
                    if on_case:
                        on_case(row)
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.add(ex.submit(one, nxt))
    finally:
        write_summary(run)
        from agents.run_report import write_report

        write_report(run)
        consult.close()
    dt = time.perf_counter() - t0
    return {"cases": len(cases), "skipped": len(cases) - len(todo), "ran": finished, "seconds": dt,
            "cases_per_min": finished / dt * 60 if dt > 0 and finished else 0.0}
