"""The web page: login, uploads, session isolation, the review queue and its decisions, and a real browser.

The API tests drive the graph with a scripted panel (no model, a second or two each); the browser
test starts `grandrounds serve` and runs the embedded model with tools on in headless Chromium.
"""
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agents.consult import Consultation
from agents.llm.base import Completion, LLMBackend, OptionScore
from agents.llm.factory import BackendPool
from core.catalogue import load_catalogue
from core.config import load_settings
from web.auth import hash_password, verify_password
from web.server import create_app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "cases"
PNEUMONIA = EXAMPLES / "s2026-0000"
CAT = load_catalogue()
TOKEN = "test-token-7f3a"
SPLIT = [["pneumonia"], ["lung_cancer"], ["tuberculosis"]]  # three answers: maximal disagreement
AGREE = [["pneumonia"]] * 3


class Panelist(LLMBackend):
    """Prefers its scripted diagnosis (answers[0] alone, answers[1] once shown colleagues' opinions).

    Flat on the content-free calibration prompt, so the preference survives the diagnostician's
    calibration (which subtracts the score the model gives with no case at all)."""

    def __init__(self, name: str, answers: list[str]):
        super().__init__(name=name, model=f"scripted-{name}")
        self.answers = answers

    def _complete(self, messages, *, max_tokens, temperature, json_schema):
        if json_schema:
            return Completion('{"tools": []}' if "tools" in json_schema.get("properties", {}) else '{"claims": []}',
                              1, 1, 0.0)
        return Completion("The panel favours the scripted answer; see the evidence above.", 1, 1, 0.0)

    def _score(self, messages, options):
        text = messages[-1]["content"]
        if "\nN/A\n" in text:  # the calibration prompt: no preference
            return [OptionScore(o, 0.0, 1) for o in options], 1
        consulted = "Colleagues' current opinions" in text
        want = CAT.diseases[self.answers[min(int(consulted), len(self.answers) - 1)]].name
        return [OptionScore(o, 0.0 if o == want else -60.0, 1) for o in options], 1


class Panel(BackendPool):
    def __init__(self, settings, scripts):
        super().__init__(settings)
        self.panel = [Panelist(f"d{i}", s) for i, s in enumerate(scripts)]

    def for_role(self, role):
        return self.panel if role == "diagnosticians" else [self.panel[0]]


def _settings(tmp_path, *overrides):
    return load_settings(env={}, overrides=[f"web.run_dir='{tmp_path / 'run'}'", f"web.cases_dir='{EXAMPLES}'",
                                            "max_rounds=1", *overrides])


def _factory(settings, scripts, use_tools=False):
    def make(db, on_event=None, artefact_root=None):
        return Consultation(settings, db, llms=Panel(settings, scripts), use_tools=use_tools, on_event=on_event,
                            artefact_root=artefact_root)
    return make


def _seed_waiting(settings, scripts=SPLIT, case=PNEUMONIA, use_tools=False) -> str:
    """A thread paused for human review in the web run's state database (with tools: their results,
    overlays in the run's artefacts folder, and opinions citing them, as a batch run leaves them)."""
    run = Path(settings.web.run_dir)
    c = _factory(settings, scripts, use_tools)(run / "state.sqlite",
                                               artefact_root=run / "artefacts" if use_tools else None)
    try:
        out = c.run(case)
    finally:
        c.close()
    assert out.review is not None, "the scripted split panel should wait for review"
    return out.thread_id


def _login(client, name="ann", token=TOKEN):
    r = client.post("/login", data={"username": name, "token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    return client


def _events(client, thread_id, timeout=60.0) -> list[tuple[str, object]]:
    out, kind = [], None
    t0 = time.time()
    with client.stream("GET", f"/api/threads/{thread_id}/events") as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind:
                out.append((kind, json.loads(line.split(":", 1)[1])))
                kind = None
            assert time.time() - t0 < timeout, "the consultation did not finish"
    return out


@pytest.fixture
def make_client(tmp_path):
    apps = []

    def make(*overrides, scripts=SPLIT, **kw):
        s = _settings(tmp_path, *overrides)
        app = create_app(s, make_consultation=kw.pop("make_consultation", _factory(s, scripts)), token=TOKEN, **kw)
        main = TestClient(app)
        main.__enter__()  # runs the lifespan (closed below)
        apps.append(main)
        main.settings = s
        main.other = lambda: TestClient(app)  # a second browser: its own cookie jar, its own session
        return main

    yield make
    for c in apps:
        c.__exit__(None, None, None)


# ---------------------------------------------------------------- access
def test_nothing_is_served_without_login(make_client):
    c = make_client("web.upload_max_mb=0.1")
    for path in ["/", "/review", "/review/x:1", "/static/consult.js", "/static/style.css"]:
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
    for path in ["/api/me", "/api/cases", "/api/reviews", "/api/consultations", "/api/threads/x/events",
                 "/api/decisions"]:
        r = c.get(path)
        assert r.status_code == 401 and r.json() == {"error": "login required"}, path
    assert c.post("/api/reviews/x/decisions", json={"action": "send_back"}).status_code == 401
    big = c.post("/api/consultations", files={"file": ("big.zip", b"0" * 300_000, "application/zip")})
    assert big.status_code == 401  # login first: the upload limit is nobody's business before that
    page = c.get("/login")
    assert page.status_code == 200 and "token" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]


def test_bad_token_and_wrong_password_are_refused(make_client):
    pw_hash = hash_password("correct horse", iterations=1000)
    c = make_client(f"web.users={{dr_osler = '{pw_hash}'}}")
    r = c.post("/login", data={"username": "ann", "token": "wrong"}, follow_redirects=False)
    assert r.status_code == 401 and "wrong name, password or token" in r.text
    assert c.get("/api/me").status_code == 401
    r = c.post("/login", data={"username": "", "token": TOKEN}, follow_redirects=False)
    assert r.status_code == 400 and "name:" in r.text  # token logins name the reviewer
    r = c.post("/login", data={"username": "dr_osler", "token": TOKEN}, follow_redirects=False)
    assert r.status_code == 400 and "log in with its password" in r.text  # the token cannot sign as a user
    r = c.post("/login", data={"username": "dr_osler", "password": "wrong horse"}, follow_redirects=False)
    assert r.status_code == 401 and c.get("/api/me").status_code == 401
    r = c.post("/login", data={"username": "nobody", "password": "correct horse"}, follow_redirects=False)
    assert r.status_code == 401
    r = c.post("/login", data={"username": "dr_osler", "password": "correct horse", "next": "//evil.example/"},
               follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    assert c.get("/api/me").json()["user"] == "dr_osler"
    # the session cookie is signed: a forged one is not a login
    other = c.other()
    other.cookies.set("grandrounds_session", "eyJ1c2VyIjogImV2ZSJ9.forged.signature")
    assert other.get("/api/me").status_code == 401
    # cross-origin writes are refused even with a session
    assert c.post("/logout", headers={"origin": "http://evil.example"}).status_code == 403
    c.post("/logout")
    assert c.get("/api/me").status_code == 401


def test_password_hashes():
    h = hash_password("s3cret", iterations=2000)
    assert h.startswith("pbkdf2_sha256$2000$") and h.count("$") == 3
    assert verify_password("s3cret", h) and not verify_password("s3cret!", h)
    assert not verify_password("s3cret", "md5$1$x$y") and not verify_password("s3cret", "garbage")
    assert hash_password("s3cret", iterations=2000) != h  # salted
    out = subprocess.run([sys.executable, "-m", "web.auth"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "usage: python -m web.auth NAME" in out.stderr


# ---------------------------------------------------------------- uploads
def _zip(files: dict[str, bytes | str | Path]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            if isinstance(data, Path):
                z.write(data, name)
            else:
                z.writestr(name, data)
    return buf.getvalue()


def _case_files(prefix="mycase/", case=PNEUMONIA) -> dict:
    return {prefix + p.name: p for p in case.iterdir() if p.is_file()}


def _upload(c, name, data):
    return c.post("/api/consultations", files={"file": (name, data, "application/zip")})


def test_upload_validation_gives_one_line_errors(make_client):
    c = _login(make_client("web.upload_max_mb=3"))
    run = Path(c.settings.web.run_dir)
    cases = {
        "slip.zip": (_zip({"mycase/case.yaml": (PNEUMONIA / "case.yaml").read_text(), "../evil.txt": "x"}),
                     ["slip.zip", "../evil.txt", "escapes"]),
        "abs.zip": (_zip({"/etc/evil.txt": "x"}), ["abs.zip", "/etc/evil.txt", "absolute"]),
        "empty.zip": (_zip({"notes.txt": "no case here"}), ["empty.zip", "case.yaml", "not found"]),
        "notzip.zip": (b"PK but not really a zip", ["notzip.zip", "not a zip archive"]),
        "badfield.zip": (_zip({"c/case.yaml": (PNEUMONIA / "case.yaml").read_text().replace("age: 43", "age: old")}),
                         ["badfield.zip", "c/case.yaml", "patient.age"]),
        "nofile.zip": (_zip({"c/case.yaml": (PNEUMONIA / "case.yaml").read_text()}),
                       ["nofile.zip", "c/case.yaml", "studies[0].path", "does not exist"]),
        "two.zip": (_zip({"a/case.yaml": "id: a", "b/case.yaml": "id: b"}), ["two.zip", "2 cases"]),
    }
    for name, (data, words) in cases.items():
        r = _upload(c, name, data)
        assert r.status_code == 400, (name, r.text)
        msg = r.json()["error"]
        assert "\n" not in msg and all(w in msg for w in words), (name, msg)
    big = os.urandom(int(3.2 * 2**20))
    r = _upload(c, "big.zip", _zip({"c/case.yaml": "x", "c/noise.bin": big}))
    assert r.status_code == 413 and "over the 3 MB limit" in r.json()["error"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        for _ in range(4):
            yield os.urandom(2**20)

    r = c.post("/api/consultations", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "over the 3 MB limit" in r.json()["error"]
    assert not (run.parent / "evil.txt").exists() and not (run / "evil.txt").exists()
    leftovers = [p for p in (run / "uploads").rglob("*") if p.is_file()] if (run / "uploads").exists() else []
    assert leftovers == []  # refused uploads leave nothing behind
    assert c.get("/api/consultations").json()["consultations"] == []
    r = c.post("/api/consultations", data={"case": "../../etc"})
    assert r.status_code == 400 and "no example case named" in r.json()["error"]


def test_a_valid_upload_runs_a_consultation_that_streams(make_client):
    c = _login(make_client(scripts=AGREE))
    r = _upload(c, "s2026-0000.zip", _zip(_case_files("s2026-0000/")))
    assert r.status_code == 200, r.text
    tid = r.json()["thread_id"]
    assert tid.startswith("s2026-0000:")
    events = _events(c, tid)
    kinds = [k for k, _ in events]
    steps = [d["text"] for k, d in events if k == "step"]
    assert steps[0].startswith("intake: s2026-0000") and any(s.startswith("evaluator round 1: agree") for s in steps)
    assert sum(k == "image" for k in kinds) == 2  # the CT's mid slice and the radiograph
    assert all(d["src"].startswith("data:image/png;base64,") for k, d in events if k == "image")
    assert sum(k == "opinion" for k in kinds) == 3
    verdict = next(d["verdict"] for k, d in events if k == "verdict")
    assert verdict["diagnosis"] == "pneumonia"
    assert kinds[-2:] == ["ready", "end"]
    # a follow-up question streams an answer from the chat session of this thread
    with c.stream("POST", f"/api/threads/{tid}/ask", json={"question": "Why pneumonia?"}) as s:
        body = s.read().decode()
    assert "event: piece" in body and "scripted answer" in body and body.rstrip().endswith('data: ""')
    with c.stream("POST", f"/api/threads/{tid}/ask", json={"question": "/tool no_such_tool"}) as s:
        body = s.read().decode()
    assert "event: error" in body and "no tool 'no_such_tool'" in body
    rows = [json.loads(x) for x in (Path(c.settings.web.run_dir) / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["thread_id"] == tid and rows[-1]["status"] == "decided" and rows[-1]["source"] == "web"


FORM = {"age": "43", "sex": "M", "complaint": "pleuritic chest pain and fever", "history": "3 days; smoker",
        "temperature_c": "39.0", "spo2": "92.9",
        "labs": "C-reactive protein: 183.2 mg/L (<5)\nwhite cell count: 14.6 10^9/L"}


def _form_upload(c, fields, images):
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    return c.post("/api/consultations", data=fields, files=files)


def test_images_and_a_form_make_a_case_that_runs(make_client):
    c = _login(make_client("web.upload_max_mb=3", scripts=AGREE))
    run = Path(c.settings.web.run_dir)
    cxr = (PNEUMONIA / "cxr.png").read_bytes()
    for fields, images, words in [
        ({**FORM, "age": "old"}, [("cxr.png", cxr)], ["form: patient.age", "integer"]),
        ({**FORM, "complaint": ""}, [("cxr.png", cxr)], ["form: presentation.complaint"]),
        ({**FORM, "labs": "CRP high"}, [("cxr.png", cxr)], ["form: labs: line 1", "name: value unit"]),
        ({**FORM, "case_id": "../etc"}, [("cxr.png", cxr)], ["form: case_id"]),
        ({**FORM, "modality": "CT"}, [("cxr.png", cxr)], ["images[0] cxr.png: modality", "CT"]),
        (FORM, [("photo.jpg", b"x")], ["images[0] photo.jpg", "'.jpg' is not accepted"]),
        (FORM, [("cxr.png", b"not a png")], ["images: cxr.png", "PNG expected"]),
        (FORM, [], ["form: images: add at least one image"]),
        (FORM, [(f"x{i}.png", cxr) for i in range(9)], ["form: images: 9 files; at most 8"]),
        (FORM, [(f"x{i}.png", b"x") for i in range(12)], ["Too many files"]),  # refused by the form parser
    ]:
        r = _form_upload(c, fields, images)
        assert r.status_code == 400, (fields, r.text)
        msg = r.json()["error"]
        assert "\n" not in msg and all(w in msg for w in words), msg
    leftovers = [p for p in (run / "uploads").rglob("*") if p.is_file()] if (run / "uploads").exists() else []
    assert leftovers == []  # refused forms leave nothing behind
    r = _form_upload(c, {**FORM, "case_id": "walk-in-7"},
                     [("../../chest x-ray.PNG", cxr), ("ct.nii.gz", (PNEUMONIA / "ct.nii.gz").read_bytes())])
    assert r.status_code == 200, r.text
    tid = r.json()["thread_id"]
    assert tid.startswith("walk-in-7:")
    events = _events(c, tid)
    steps = [d["text"] for k, d in events if k == "step"]
    assert steps[0].startswith("intake: walk-in-7") and "studies: xr XR, ct CT" in steps[0]
    assert sum(k == "image" for k, _ in events) == 2 and any(k == "verdict" for k, _ in events)
    folders = [p.parent for p in (run / "uploads").rglob("case.yaml")]
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == ["case.yaml", "ct.nii.gz", "xr.png"]
    from core.case import load_case
    case = load_case(folders[0])
    assert case.patient.age == 43 and case.presentation.vitals.spo2 == 92.9
    assert [(x.name, x.value, x.reference) for x in case.presentation.labs] == [
        ("C-reactive protein", 183.2, "<5"), ("white cell count", 14.6, None)]
    assert case.studies[0].description == "XR uploaded as chest x-ray.PNG" and case.truth is None
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert rows[-1]["thread_id"] == tid and rows[-1]["source"] == "web"


def test_binds_loopback_by_default():
    assert load_settings(env={}).web.host == "127.0.0.1"


# ---------------------------------------------------------------- isolation
def test_sessions_never_see_each_others_consultations(make_client):
    a = _login(make_client(scripts=AGREE), "ann")
    tid = a.post("/api/consultations", data={"case": "s2026-0000"}).json()["thread_id"]
    _events(a, tid)
    for b in (_login(a.other(), "bob"), _login(a.other(), "ann")):  # another user, and the same name elsewhere
        assert b.get("/api/consultations").json()["consultations"] == []
        for r in (b.get(f"/api/threads/{tid}"), b.get(f"/api/threads/{tid}/events"),
                  b.post(f"/api/threads/{tid}/ask", json={"question": "what is it?"}),
                  b.get(f"/api/threads/{tid}/artefacts/overlay.png")):
            assert r.status_code == 404 and "in this session" in r.json()["error"]
    assert a.get(f"/api/threads/{tid}").json()["verdict"]["diagnosis"] == "pneumonia"
    assert [x["thread_id"] for x in a.get("/api/consultations").json()["consultations"]] == [tid]
    r = a.get(f"/api/threads/{tid}/artefacts/..%2F..%2Fweb.sqlite")
    assert r.status_code == 404


# ---------------------------------------------------------------- review queue
def test_queue_is_sorted_by_disagreement_then_uncertainty(make_client):
    c = make_client()
    s = c.settings
    two = _seed_waiting(s, [["pneumonia"], ["pneumonia"], ["lung_cancer"]])
    three = _seed_waiting(s, SPLIT)
    _login(c)
    q = c.get("/api/reviews").json()["reviews"]
    assert [i["thread_id"] for i in q] == [three, two]
    assert [i["distinct"] for i in q] == [3, 2] and all(0 <= i["uncertainty"] <= 1 for i in q)
    case = c.get(f"/api/reviews/{three}").json()
    assert case["waiting"] and len(case["review"]["opinions"]) == 3
    assert {o["diagnosis"] for o in case["review"]["opinions"]} == {"pneumonia", "lung_cancer", "tuberculosis"}
    assert any(i["caption"].startswith("ct:") for i in case["images"])
    assert c.get("/api/reviews/nope:1").status_code == 404


def test_two_concurrent_decisions_are_both_kept_and_one_applied(make_client):
    c = make_client()
    tid = _seed_waiting(c.settings)
    ann, bob = _login(c, "ann"), _login(c.other(), "bob")
    barrier = threading.Barrier(2)
    answers = {}

    def decide(who, client, body):
        barrier.wait()
        answers[who] = client.post(f"/api/reviews/{tid}/decisions", json=body)

    ts = [threading.Thread(target=decide, args=("ann", ann, {"action": "approve", "diagnosis": "pneumonia"})),
          threading.Thread(target=decide, args=("bob", bob, {"action": "override", "diagnosis": "sarcoidosis",
                                                             "reason": "non-caseating granulomas"}))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert {w: r.status_code for w, r in answers.items()} == {"ann": 200, "bob": 200}
    body = {w: r.json() for w, r in answers.items()}
    assert sorted(b["applied"] for b in body.values()) == [False, True]
    winner = next(w for w, b in body.items() if b["applied"])
    loser = next(w for w, b in body.items() if not b["applied"])
    assert body[loser]["status"] == "already_decided"
    rows = c.get("/api/decisions").json()["decisions"]
    assert sorted(r["reviewer"] for r in rows) == ["ann", "bob"] and sum(r["applied"] for r in rows) == 1
    verdict = c.get(f"/api/reviews/{tid}").json()["verdict"]
    assert verdict["decided_by"].startswith(f"reviewer: {winner}")
    assert c.get("/api/reviews").json()["reviews"] == []
    results = [json.loads(x) for x in (Path(c.settings.web.run_dir) / "results.jsonl").read_text().splitlines()]
    applied = next(r for r in rows if r["applied"])
    assert results[-1]["thread_id"] == tid and results[-1]["status"] == "decided"
    assert results[-1]["review_decision_id"] == applied["id"] and results[-1]["verdict"]["review"]["reviewer"] == winner
    # the decision log is append-only
    db = sqlite3.connect(Path(c.settings.web.run_dir) / "web.sqlite")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE review_decisions SET applied = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM review_decisions")
    db.close()


def test_the_graph_resumes_after_the_required_reads_with_the_latest_decision(make_client):
    c = make_client("web.reads_required=2")
    tid = _seed_waiting(c.settings)
    ann, bob = _login(c, "ann"), _login(c.other(), "bob")
    url = f"/api/reviews/{tid}/decisions"
    r = ann.post(url, json={"action": "approve", "diagnosis": "pneumonia"}).json()
    assert r["status"] == "waiting_for_reads" and not r["applied"]
    r = ann.post(url, json={"action": "approve", "diagnosis": "lung_cancer"}).json()  # same reader again
    assert r["status"] == "waiting_for_reads"
    assert c.get("/api/reviews").json()["reviews"][0]["reads"] == ["ann"]
    r = bob.post(url, json={"action": "approve", "diagnosis": "tuberculosis", "reason": "cavitation"}).json()
    assert r["applied"] and r["status"] == "decided" and r["verdict"]["diagnosis"] == "tuberculosis"
    rows = c.get(f"/api/reviews/{tid}").json()["decisions"]
    assert [(x["version"], x["reviewer"], x["diagnosis"], x["applied"]) for x in rows] == [
        (1, "ann", "pneumonia", False), (2, "ann", "lung_cancer", False), (3, "bob", "tuberculosis", True)]
    assert all(x["created_at"].endswith("+00:00") for x in rows)  # when, in UTC, with who: every read kept


def test_bad_decisions_are_refused_and_not_stored_and_send_back_runs_a_round(make_client):
    c = make_client()
    tid = _seed_waiting(c.settings)
    _login(c)
    url = f"/api/reviews/{tid}/decisions"
    for body, words in [({"action": "approve", "diagnosis": "sarcoidosis"}, "use override"),
                        ({"action": "override", "diagnosis": "dragon pox"}, "not in the catalogue"),
                        ({"action": "maybe"}, "action"),
                        ({"action": "send_back"}, "reason")]:
        r = c.post(url, json=body)
        assert r.status_code == 400 and words in r.json()["error"], (body, r.text)
    assert c.get("/api/decisions").json()["decisions"] == []
    r = c.post(url, json={"action": "send_back", "reason": "look at the radiograph again"}).json()
    assert r["applied"] and r["status"] == "sent_back"  # the scripted panel stays split: back in the queue
    q = c.get("/api/reviews").json()["reviews"]
    assert [(i["thread_id"], i["round"], i["reads"]) for i in q] == [(tid, 2, [])]
    results = (Path(c.settings.web.run_dir) / "results.jsonl").read_text().splitlines()
    assert json.loads(results[-1])["status"] == "awaiting_review"


def test_review_only_mode_lists_and_decides_without_loading_a_model(make_client, tmp_path, monkeypatch):
    from agents.llm import llama_cpp

    s = _settings(tmp_path)
    tid = _seed_waiting(s)

    def no_model(self):
        raise AssertionError("a model was loaded in review-only mode")

    monkeypatch.setattr(llama_cpp.LlamaCppBackend, "_load", no_model)
    c = make_client(make_consultation=None, review_only=True)  # the real backend pool, as `serve --review-only`
    _login(c)
    assert [i["thread_id"] for i in c.get("/api/reviews").json()["reviews"]] == [tid]
    assert c.get(f"/api/reviews/{tid}").json()["waiting"]
    r = c.post(f"/api/reviews/{tid}/decisions", json={"action": "approve", "diagnosis": "pneumonia"})
    assert r.status_code == 200 and r.json()["verdict"]["diagnosis"] == "pneumonia"
    r = c.post("/api/consultations", data={"case": "s2026-0000"})
    assert r.status_code == 503 and "review-only" in r.json()["error"]


# ---------------------------------------------------------------- a real browser on the real server
ARTEFACTS = ROOT / "runs" / "test_artefacts" / "web"
CHROMIUM_HELP = ("Chromium is needed for the web page's browser test and was not found on PATH. Install the "
                 "Debian package (no download from the internet at test time): `apt-get install -y chromium`; "
                 "the Python driver comes with the test extra: `pip install -e '.[test]'` (playwright). "
                 "Do not run `playwright install`: the test uses the system Chromium.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_browser_consultation_chat_and_review(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(CHROMIUM_HELP)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[test]'. " + CHROMIUM_HELP)
    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    ARTEFACTS.mkdir(parents=True)
    run = tmp_path / "run"
    s = _settings(tmp_path)
    seeded = _seed_waiting(s, use_tools=True)  # a split panel waiting in the queue, citing its tools' results
    port = _free_port()
    log = (ARTEFACTS / "server.log").open("w")
    env = {**os.environ, "GRANDROUNDS_WEB_TOKEN": TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "app", "--set", f"web.cases_dir='{EXAMPLES}'", "serve",
                               "--port", str(port), "--run-dir", str(run), "--no-knowledge"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    shots = []

    def shot(page, name):
        path = ARTEFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        shots.append(path)

    try:
        import httpx

        for _ in range(120):
            try:
                if httpx.get(base + "/login", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, (ARTEFACTS / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(base + "/")
            assert page.url.startswith(base + "/login")
            page.fill("#username", "Dr Osler")
            page.fill("#token", "wrong")
            page.click("button[type=submit]")
            expect(page.locator(".error")).to_contain_text("wrong name, password or token")
            page.fill("#username", "Dr Osler")
            page.fill("#token", TOKEN)
            page.click("button[type=submit]")
            expect(page.locator("#user")).to_have_text("Dr Osler")

            # chat consultation on the example case: real embedded model, tools on
            page.select_option("#case", "s2026-0000")
            t0 = time.time()
            page.click("#run-example")
            expect(page.locator("#steps li").first).to_contain_text("intake: s2026-0000")
            expect(page.locator("#images img").first).to_be_visible()
            expect(page.locator("#status")).to_have_text("finished", timeout=600_000)  # ~20 s on an idle 2-core box
            consult_s = time.time() - t0
            expect(page.locator("#error")).to_have_text("")
            expect(page.locator("#verdict, #awaiting-review")).to_have_count(1)
            steps = page.locator("#steps li").all_inner_texts()
            assert any(x.startswith("plan:") for x in steps) and any(x.startswith("evaluator round") for x in steps)
            assert sum(" p=" in x for x in steps) >= 3  # each diagnostician's opinion
            expect(page.locator("#steps li.opinion[data-agent='sceptic-3']").first).to_contain_text("differential:")
            expect(page.locator("#images img[data-source='study']").first).to_be_visible()  # slice, radiograph
            overlays = page.locator("#images img:not([data-source='study'])")  # the tools' overlays
            expect(overlays.first).to_be_visible()
            assert overlays.first.get_attribute("src").startswith("/api/threads/")
            assert page.evaluate("() => [...document.querySelectorAll('#images img')]"
                                 ".every(i => i.complete && i.naturalWidth > 0)")  # every image loaded
            shot(page, "1_consultation")

            page.fill("#question", "What is the most likely diagnosis, and why?")
            page.click("#ask-button")
            expect(page.locator(".answer")).to_have_text(re.compile(r"\w{3}"), timeout=300_000)  # streaming in
            expect(page.locator(".answer.done")).to_have_count(1, timeout=600_000)
            assert not page.locator(".answer .error").count(), page.locator(".answer").inner_text()
            shot(page, "2_follow_up")

            # images and a form instead of a case folder: a radiograph, the patient and the complaint
            page.click("#form-details summary")
            page.set_input_files("#form-images", str(PNEUMONIA / "cxr.png"))
            expect(page.locator("#image-list select")).to_have_count(1)
            page.fill("#case_id", "walk-in-1")
            page.fill("#age", "61")
            page.select_option("#sex", "F")
            page.fill("#complaint", "productive cough and fever")
            page.fill("#labs", "C-reactive protein: 150 mg/L (<5)")
            page.click("#run-form")
            expect(page.locator("#steps li").first).to_contain_text("intake: walk-in-1 (chest, studies: xr XR)")
            expect(page.locator("#status")).to_have_text("finished", timeout=600_000)
            expect(page.locator("#error")).to_have_text("")
            expect(page.locator("#verdict, #awaiting-review")).to_have_count(1)
            expect(page.locator("#images img:not([data-source='study'])").first).to_be_visible()  # cxr overlay
            shot(page, "3_form_upload")

            # the review queue: the seeded split panel, decided by this reviewer
            page.click("text=Review queue")
            row = page.locator(f"tr[data-thread='{seeded}']")
            expect(row).to_be_visible()
            expect(row).to_contain_text("3")  # three distinct diagnoses
            shot(page, "4_review_queue")
            row.locator("a").click()
            expect(page.locator(".opinion-col")).to_have_count(3)
            # side by side, each claim citing evidence listed below it; the tools' overlays load
            review = page.evaluate(f"async () => (await fetch('/api/reviews/{seeded}')).json()")["review"]
            assert len(review["tool_results"]) >= 3  # the planned imaging tools, each one evidence item
            expect(page.locator("#evidence li[id^='ev-']")).to_have_count(len(review["tool_results"]))
            for col in page.locator(".opinion-col").all():
                assert col.locator("a.cite[href^='#ev-']").count() >= 1, col.inner_text()
            expect(page.locator("#images img[src*='/artefacts/']").first).to_be_visible()
            assert page.evaluate("() => [...document.querySelectorAll('#images img')]"
                                 ".every(i => i.complete && i.naturalWidth > 0)")
            page.check("input[value='approve:pneumonia']")
            page.fill("#reason", "lobar consolidation with fever and raised CRP")
            shot(page, "5_review_case")
            page.click("#submit-decision")
            expect(page.locator("#result")).to_contain_text("Decided: community-acquired pneumonia")
            expect(page.locator("#result")).to_be_visible()
            expect(page.locator("#decide-section")).to_be_hidden()  # decided: nothing left to decide
            expect(page.locator("#decisions tbody tr")).to_have_count(1)
            expect(page.locator("#decisions tbody tr")).to_contain_text("Dr Osler")
            shot(page, "6_decided")
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        for path in shots:
            print(f"screenshot: {path}")
    rows = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    decided = [r for r in rows if r["thread_id"] == seeded]
    assert decided and decided[-1]["status"] == "decided" and decided[-1]["verdict"]["diagnosis"] == "pneumonia"
    assert decided[-1]["verdict"]["review"]["reviewer"] == "Dr Osler"
    assert decided[-1]["verdict"]["review"]["reason"] == "lobar consolidation with fever and raised CRP"
    assert any(r["thread_id"].startswith("s2026-0000:") and r.get("source") == "web" for r in rows)
    assert any(r["thread_id"].startswith("walk-in-1:") and r.get("source") == "web" for r in rows)
    assert f"running on http://127.0.0.1:{port}" in (ARTEFACTS / "server.log").read_text()  # loopback by default
    print(f"consultation in the browser: {consult_s:.1f} s")
