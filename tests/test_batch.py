"""Batch runs: outputs, resume after a kill, torn result lines, invalid cases."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agents.batch import append_result, read_results

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "cases"


def _cases(tmp_path, ids):
    d = tmp_path / "cases"
    d.mkdir()
    for i in ids:
        shutil.copytree(EXAMPLES / i, d / i)
    return d


def _batch(cases, run, *extra):
    return [sys.executable, "-m", "app", "batch", str(cases), "--out", str(run), "--no-tools", *extra]


@pytest.mark.slow
def test_killed_batch_resumes_without_redoing_finished_cases(tmp_path):
    cases = _cases(tmp_path, ["s2026-0000", "s2026-0003", "s2026-0005", "s2026-0006"])
    run = tmp_path / "run"
    p = subprocess.Popen(_batch(cases, run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = run / "results.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (results.is_file() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)  # no clean-up at all: the worst case
    p.wait()
    first = read_results(results)
    assert 1 <= len(first) < 4
    r = subprocess.run(_batch(cases, run), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{len(first)} case(s) already done" in r.stdout
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert sorted(x["case_id"] for x in lines) == sorted(p.name for p in cases.iterdir())  # each exactly once
    for cid, row in first.items():  # finished cases kept as they were
        assert read_results(results)[cid] == row
    csv_rows = (run / "summary.csv").read_text().splitlines()
    assert len(csv_rows) == 5
    html = (run / "report.html").read_text()
    assert all(i in html for i in ("s2026-0000", "s2026-0006")) and "data:image/png;base64," in html


def test_torn_last_line_is_ignored_and_never_glued_to_the_next(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"case_id": "a", "status": "decided"})
    with path.open("a") as f:
        f.write('{"case_id": "b", "sta')  # killed mid-write
    assert set(read_results(path)) == {"a"}
    append_result(path, {"case_id": "c", "status": "decided"})
    assert set(read_results(path)) == {"a", "c"}


def test_invalid_case_is_reported_not_fatal(tmp_path):
    cases = _cases(tmp_path, ["s2026-0006"])
    bad = cases / "broken"
    bad.mkdir()
    (bad / "case.yaml").write_text("id: broken\npatient: {age: 300, sex: M}\n")
    r = subprocess.run(_batch(cases, tmp_path / "run"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    rows = read_results(tmp_path / "run" / "results.jsonl")
    assert rows["broken"]["status"] == "invalid" and "patient.age" in rows["broken"]["error"]
    assert rows["s2026-0006"]["status"] in ("decided", "awaiting_review")
