"""The CLI as a user meets it: diagnose streams and prints a verdict, --json prints only JSON, errors are one line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE = ROOT / "examples" / "cases" / "s2026-0006"  # a slide case: quick


def _gr(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "app", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.slow
def test_diagnose_json_is_a_verdict_and_nothing_else(tmp_path):
    r = _gr("diagnose", str(CASE), "--json", "--state", str(tmp_path / "s.sqlite"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out.get("status") == "awaiting_review" or out["case_id"] == "s2026-0006"
    if "diagnosis" in out:
        assert out["diagnosis"] in ("lung_adenocarcinoma", "lung_squamous_cell_carcinoma", "benign_lung_tissue")
        assert 0 <= out["confidence"] <= 1 and out["agreement_history"]


def test_bad_case_is_one_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "case.yaml").write_text("id: bad\npatient: {age: 300, sex: M}\n")
    r = _gr("diagnose", str(bad), "--state", str(tmp_path / "s.sqlite"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "case.yaml" in r.stderr and "patient.age" in r.stderr


def test_bad_setting_names_the_key(tmp_path):
    r = _gr("--set", "llm.roles.planner=nowhere", "diagnose", str(CASE), "--state", str(tmp_path / "s.sqlite"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nowhere" in r.stderr


def test_tools_list_names_the_registry():
    from tools.registry import tool_classes

    r = _gr("tools", "list")
    assert r.returncode == 0, r.stderr
    for name in tool_classes():
        assert name in r.stdout
