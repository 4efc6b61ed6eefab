"""The web page: chat consultation and the review queue (`grandrounds serve`).

FastAPI serves plain HTML/JS pages and a JSON API; consultations and follow-up answers stream as
server-sent events (sse-starlette). Everything except /login needs a signed session cookie.

    run_dir/state.sqlite     graph checkpoints (the review queue is every thread paused for a human)
    run_dir/web.sqlite       thread ownership per browser session, and every review decision
    run_dir/results.jsonl    one line per finished consultation and per applied decision
    run_dir/uploads/         uploaded case folders
    run_dir/artefacts/       tool outputs, one folder per consultation
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.sessions import SessionMiddleware

from agents.consult import Consultation
from agents.review import parse_decision
from core.case import load_case
from core.catalogue import load_catalogue
from core.config import Settings
from core.errors import CaseDataError
from web.auth import check_token, verify_password
from web.jobs import ConsultJob, one_line
from web.store import WebStore
from web.uploads import FORM_FIELDS, MAX_IMAGES, UploadError, case_from_form, extract_case_zip

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
SECRET_ENV = "GRANDROUNDS_WEB_SECRET"  # session-signing key; without it each process makes its own
SESSION_HOURS = 12
JOBS_IN_MEMORY = 64  # finished consultations kept with their event log and chat; older ones are restored on use
CSP = ("default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")

# make_consultation(state_db, on_event=None, artefact_root=None) -> Consultation
ConsultationFactory = Callable[..., Consultation]


class AskBody(BaseModel):
    question: str = Field(min_length=1, max_length=2000)


class DecisionBody(BaseModel):
    action: str
    diagnosis: str | None = None
    reason: str = Field("", max_length=4000)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_line(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}"


# ---------------------------------------------------------------- ASGI middleware (outermost first)
class SecurityHeaders:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(msg):
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"same-origin"), (b"cache-control", b"no-store")]
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with_headers)


class RequireLogin:
    """No session user: pages redirect to /login, the API answers 401. Cross-origin writes are refused."""

    def __init__(self, app, public: tuple[str, ...] = ("/login",)):
        self.app = app
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and "origin" in headers:
            if urlsplit(headers["origin"]).netloc != headers.get("host"):
                return await _error(403, "cross-origin request refused")(scope, receive, send)
        path = scope["path"]
        if path in self.public or (scope.get("session") or {}).get("user"):
            return await self.app(scope, receive, send)
        if path.startswith("/api/"):
            return await _error(401, "login required")(scope, receive, send)
        return await RedirectResponse("/login?next=" + quote(path), status_code=303)(scope, receive, send)


class _TooBig(Exception):
    pass


class BodyLimit:
    """Uploads over the limit get 413 before (Content-Length) or while (streamed body) they arrive."""

    def __init__(self, app, max_bytes: int, paths: tuple[str, ...]):
        self.app, self.max_bytes, self.paths = app, max_bytes, paths

    def _message(self, size: int | None) -> str:
        limit = self.max_bytes / 2**20
        got = f"{size / 2**20:.1f} MB is" if size is not None else "the upload is"
        return f"upload: {got} over the {limit:g} MB limit (settings web.upload_max_mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await _error(413, self._message(int(v)))(scope, receive, send)
        seen, started = 0, False

        async def counting_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooBig
            return msg

        async def tracking_send(msg):
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooBig:
            if not started:
                await _error(413, self._message(None))(scope, receive, send)


# ---------------------------------------------------------------- the application
def create_app(settings: Settings, *, make_consultation: ConsultationFactory | None = None, knowledge=None,
               review_only: bool = False, token: str | None = None, secret: str | None = None,
               jobs_in_parallel: int = 1) -> FastAPI:
    """The web app on `settings.web` (run_dir, cases_dir, users, token env, upload limit, reads per review).

    make_consultation: `(state_db, on_event=None, artefact_root=None) -> Consultation`, e.g. with a
    scripted backend pool in tests; by default every consultation shares one lazily loaded BackendPool.
    review_only: no consultations or chat (no model is ever loaded); the review queue works as usual.
    """
    web = settings.web
    run_dir = Path(web.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_db = run_dir / "state.sqlite"
    results = run_dir / "results.jsonl"
    cat = load_catalogue()
    users = dict(web.users)
    token = token or os.environ.get(web.token_env) or None
    generated_token = None
    if not token and not users:  # nobody could log in: make a one-process token, printed by `serve`
        token = generated_token = secrets.token_urlsafe(24)
    max_upload = int(web.upload_max_mb * 2**20)

    if make_consultation is None:
        from agents.llm.factory import BackendPool

        pool: list[BackendPool] = []
        pool_lock = threading.Lock()

        def make_consultation(db, on_event=None, artefact_root=None):
            with pool_lock:
                if not pool:
                    pool.append(BackendPool(settings))  # models load on first use, not here
            return Consultation(settings, db, artefact_root=artefact_root, on_event=on_event, llms=pool[0],
                                knowledge=knowledge)

        def close_models():
            for p in pool:
                p.close()
    else:
        def close_models():
            pass

    store = WebStore(run_dir / "web.sqlite")
    review = make_consultation(state_db)  # listing and deciding: no model is loaded for either
    jobs: OrderedDict[str, ConsultJob] = OrderedDict()
    jobs_lock = threading.Lock()
    slots = threading.Semaphore(max(1, jobs_in_parallel))
    decide_locks: dict[str, threading.Lock] = {}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        with jobs_lock:
            for j in jobs.values():
                if j.done:
                    j.close()
        review.checkpointer.conn.close()
        store.close()
        close_models()

    app = FastAPI(title="Grand Rounds", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.generated_token = generated_token
    # add_middleware wraps: the last added runs first. Order on a request: headers, session, login, upload size.
    app.add_middleware(BodyLimit, max_bytes=max_upload, paths=("/api/consultations",))
    app.add_middleware(RequireLogin)
    app.add_middleware(SessionMiddleware, secret_key=secret or os.environ.get(SECRET_ENV) or secrets.token_urlsafe(32),
                       session_cookie="grandrounds_session", max_age=SESSION_HOURS * 3600, same_site="lax")
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -------------------------------------------------- helpers
    def examples() -> dict[str, Path]:
        from agents.batch import find_cases

        try:
            return {p.name: p for p in find_cases(Path(web.cases_dir))}
        except CaseDataError:
            return {}

    def record_outcome(case_id: str, thread_id: str, out, seconds: float, **extra) -> None:
        from agents.batch import append_result, outcome_row, write_summary

        row = outcome_row(case_id, out, seconds)
        row.update(extra)
        append_result(results, row)
        write_summary(run_dir)

    def job_finished(job: ConsultJob) -> None:
        snap = job.consultation.graph.get_state({"configurable": {"thread_id": job.thread_id}}) \
            if job.consultation else None
        if snap is None or not snap.values.get("case_id"):
            return
        record_outcome(job.case_id, job.thread_id, job.consultation._outcome(job.thread_id),
                       time.time() - job.started, case_dir=str(job.case_dir.resolve()), source="web")

    def remember(job: ConsultJob) -> None:
        with jobs_lock:
            jobs[job.thread_id] = job
            while len(jobs) > JOBS_IN_MEMORY:
                old_id = next((t for t, j in jobs.items() if j.done), None)
                if old_id is None:
                    break
                jobs.pop(old_id).close()

    def owned(request: Request, thread_id: str) -> dict:
        rec = store.thread(thread_id)
        if rec is None or rec["session_id"] != request.session.get("sid"):
            raise HTTPException(404, f"no consultation {thread_id} in this session")
        return rec

    def job_for(rec: dict) -> ConsultJob:
        with jobs_lock:
            job = jobs.get(rec["thread_id"])
        if job is not None:
            return job
        job = ConsultJob(rec["thread_id"], rec["case_id"], Path(rec["case_dir"]), Path(rec["artefact_root"]),
                         lambda **kw: make_consultation(state_db, **kw), slots)
        job.restore()  # after a restart (or eviction): from the checkpoint, without running anything
        remember(job)
        return job

    def artefact_file(root: Path, rel: str) -> FileResponse:
        root = root.resolve()
        p = (root / rel).resolve()
        if root not in p.parents or p.suffix.lower() != ".png" or not p.is_file():
            raise HTTPException(404, "no such image")
        return FileResponse(p, media_type="image/png")

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's (e.g. a form with too many files)
    async def http_error(_request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    # -------------------------------------------------- login
    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/"):  # noqa: A002
        return HTMLResponse(_login_html("", next, bool(users), bool(token)))

    @app.post("/login")
    async def login(request: Request):
        form = await request.form(max_files=0, max_fields=8)
        name = str(form.get("username") or "").strip()[:80]
        password, tok = str(form.get("password") or ""), str(form.get("token") or "")
        nxt = str(form.get("next") or "/")
        nxt = nxt if nxt.startswith("/") and not nxt.startswith("//") else "/"
        who = None
        if tok:
            problem = ("name: give your name; it is recorded with review decisions" if not name else
                       f"name: {name} has an account here; log in with its password" if name in users else None)
            if problem:  # a token holder cannot sign review decisions with a user's name
                return HTMLResponse(_login_html(problem, nxt, bool(users), bool(token)), status_code=400)
            if check_token(tok, token):
                who = name
        elif name in users and password and await run_in_threadpool(verify_password, password, users[name]):
            who = name
        if who is None:
            await asyncio.sleep(0.3)  # a little friction for guessing
            return HTMLResponse(_login_html("wrong name, password or token", nxt, bool(users), bool(token)),
                                status_code=401)
        request.session.clear()
        request.session.update(user=who, sid=secrets.token_urlsafe(18))
        return RedirectResponse(nxt, status_code=303)

    @app.post("/logout")
    async def logout(request: Request):
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -------------------------------------------------- pages
    @app.get("/")
    async def page_consult():
        return FileResponse(STATIC / "index.html")

    @app.get("/review")
    async def page_queue():
        return FileResponse(STATIC / "review.html")

    @app.get("/review/{thread_id}")
    async def page_case(thread_id: str):
        return FileResponse(STATIC / "case.html")

    # -------------------------------------------------- consultations (session-bound)
    @app.get("/api/me")
    async def me(request: Request):
        return {"user": request.session["user"], "review_only": review_only, "reads_required": web.reads_required,
                "upload_max_mb": web.upload_max_mb}

    @app.get("/api/cases")
    def list_cases():
        out = []
        for name, path in examples().items():
            try:
                c = load_case(path)
            except CaseDataError as e:
                out.append({"name": name, "error": str(e)})
                continue
            out.append({"name": name, "complaint": c.presentation.complaint,
                        "studies": [f"{s.id} {s.modality.value}" for s in c.studies]})
        return {"cases": out}

    @app.post("/api/consultations")
    async def start_consultation(request: Request):
        if review_only:
            return _error(503, "this server runs review-only: no consultations (start it without --review-only)")
        form = await request.form(max_files=MAX_IMAGES + 1, max_fields=len(FORM_FIELDS) + MAX_IMAGES + 4)
        upload, example = form.get("file"), str(form.get("case") or "")
        images = [f for f in form.getlist("images") if not isinstance(f, str) and f.filename]
        dest = run_dir / "uploads" / uuid.uuid4().hex[:16]
        if upload is not None and not isinstance(upload, str) and upload.filename:  # a zipped case folder
            name = Path(upload.filename).name or "upload.zip"
            try:
                case_dir = await run_in_threadpool(extract_case_zip, upload.file, name, dest, max_upload)
            except UploadError as e:
                return _error(400, str(e))
        elif images or form.get("complaint") is not None:  # images and a form
            modalities = [str(m) for m in form.getlist("modality")]
            files = [(f.filename, f.file, modalities[i] if i < len(modalities) else "auto")
                     for i, f in enumerate(images)]
            fields = {k: str(form.get(k) or "") for k in FORM_FIELDS}
            try:
                case_dir = await run_in_threadpool(case_from_form, fields, files, dest, max_upload)
            except UploadError as e:
                return _error(400, str(e))
        elif example:
            case_dir = examples().get(example)
            if case_dir is None:
                return _error(400, f"case: no example case named {example!r} in {web.cases_dir}")
        else:
            return _error(400, "case: pick an example case, upload a zipped case folder, or upload images "
                               "with the form")
        try:
            case = load_case(case_dir)
        except CaseDataError as e:
            return _error(400, str(e))
        thread_id = f"{case.id}:{uuid.uuid4().hex[:12]}"
        artefacts = run_dir / "artefacts" / thread_id.replace(":", "_")
        store.add_thread(thread_id, request.session["sid"], request.session["user"], case.id, case_dir, artefacts)
        job = ConsultJob(thread_id, case.id, Path(case_dir), artefacts, lambda **kw: make_consultation(state_db, **kw),
                         slots, on_finished=job_finished)
        remember(job)
        job.start()
        return {"thread_id": thread_id, "case_id": case.id}

    @app.get("/api/consultations")
    async def my_consultations(request: Request):
        return {"consultations": [{"thread_id": r["thread_id"], "case_id": r["case_id"], "created_at": r["created_at"]}
                                  for r in store.threads_of(request.session["sid"])]}

    @app.get("/api/threads/{thread_id}")
    def thread_state(request: Request, thread_id: str):
        rec = owned(request, thread_id)
        job = job_for(rec)
        st = review.state(thread_id)
        return {"thread_id": thread_id, "case_id": rec["case_id"], "done": job.done, "verdict": st.get("verdict"),
                "tool_results": [{k: r.get(k) for k in ("id", "status", "summary", "error")}
                                 for r in st.get("tool_results", [])]}

    @app.get("/api/threads/{thread_id}/events")
    async def thread_events(request: Request, thread_id: str):
        rec = owned(request, thread_id)
        job = await run_in_threadpool(job_for, rec)
        last = request.headers.get("last-event-id", "0")
        start = int(last) if last.isdigit() else 0

        async def gen():
            n = start
            while True:
                for ev in job.since(n):
                    n = ev.id
                    yield {"id": str(ev.id), "event": ev.kind, "data": json.dumps(ev.data)}
                if job.done and not job.since(n):
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)

        return EventSourceResponse(gen(), ping=15)

    @app.post("/api/threads/{thread_id}/ask")
    async def ask(request: Request, thread_id: str, body: AskBody):
        rec = owned(request, thread_id)
        if review_only:
            return _error(503, "this server runs review-only: no chat")
        job = await run_in_threadpool(job_for, rec)
        if not job.done:
            return _error(409, "the consultation is still running; ask when it has finished")
        if job.chat is None:
            return _error(409, "this consultation failed; start a new one to ask questions")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the page went away and the loop with it
                pass

        def work():  # runs to the end even if the page goes away, so the chat's lock is always released
            with job.ask_lock:
                try:
                    for piece in job.chat.ask(body.question):
                        put(("piece", piece))
                except ValueError as e:  # e.g. `/tool` with an unknown name
                    put(("error", one_line(e) if not isinstance(e, CaseDataError) else str(e)))
                except Exception as e:  # noqa: BLE001
                    log.exception("chat on %s failed", thread_id)
                    put(("error", one_line(e)))
                finally:
                    put(("end", ""))

        threading.Thread(target=work, name=f"ask-{thread_id}", daemon=True).start()

        async def gen():
            while True:
                kind, text = await queue.get()
                yield {"event": kind, "data": json.dumps(text)}
                if kind == "end":
                    return

        return EventSourceResponse(gen(), ping=15)

    @app.get("/api/threads/{thread_id}/artefacts/{rel:path}")
    def thread_artefact(request: Request, thread_id: str, rel: str):
        rec = owned(request, thread_id)
        return artefact_file(Path(rec["artefact_root"]) / rec["case_id"], rel)

    # -------------------------------------------------- review queue (every logged-in user is a reviewer)
    def queue_item(o) -> dict:
        r = o.review
        ops = r["opinions"]
        dx = {op["diagnosis"] for op in ops}
        own = [next((d["probability"] for d in op["differential"] if d["diagnosis"] == op["diagnosis"]),
                    max((d["probability"] for d in op["differential"]), default=0.0)) for op in ops]
        uncertainty = 1.0 - sum(own) / len(own) if own else 1.0
        return {"thread_id": o.thread_id, "case_id": r["case_id"], "round": r["round"], "distinct": len(dx),
                "uncertainty": round(uncertainty, 4),
                "votes": [{"agent": op["agent"], "diagnosis": op["diagnosis"],
                           "name": cat.diseases[op["diagnosis"]].name} for op in ops],
                "reads": sorted(store.readers(o.thread_id, r["round"])), "reads_required": web.reads_required}

    @app.get("/api/reviews")
    def review_queue():
        items = [queue_item(o) for o in review.pending_reviews()]
        items.sort(key=lambda i: (-i["distinct"], -i["uncertainty"], i["thread_id"]))
        return {"reviews": items, "reads_required": web.reads_required}

    def artefact_root_of(thread_id: str) -> Path:
        rec = store.thread(thread_id)
        return Path(rec["artefact_root"]) if rec else run_dir / "artefacts"  # a batch run's layout

    @app.get("/api/reviews/{thread_id}")
    def review_case(thread_id: str):
        out = review._outcome(thread_id)
        st = review.state(thread_id)
        if not st:
            raise HTTPException(404, f"no thread {thread_id}")
        images = []
        if out.review is not None:
            from agents.run_report import study_thumbnails

            case_dir = Path(st.get("case_dir", ""))
            if case_dir.is_dir():
                images += [{"caption": c, "src": "data:image/png;base64," + b, "source": "study"}
                           for c, b in study_thumbnails(case_dir)]
            for r in st.get("tool_results", []):
                for a in r.get("artefacts", []):
                    if a.get("kind") == "png":
                        images.append({"caption": f"{r['id']}: {a.get('description') or a['id']}", "source": r["id"],
                                       "src": f"/api/reviews/{quote(thread_id, safe='')}/artefacts/{quote(a['path'])}"})
        return {"thread_id": thread_id, "case_id": st.get("case_id"), "waiting": out.review is not None,
                "review": out.review, "verdict": out.verdict.model_dump() if out.verdict else None,
                "images": images, "decisions": store.decisions(thread_id), "reads_required": web.reads_required,
                "diseases": [{"key": k, "name": d.name}
                             for k, d in sorted(cat.diseases.items(), key=lambda kv: kv[1].name)],
                "names": {k: d.name for k, d in cat.diseases.items()}}

    @app.get("/api/reviews/{thread_id}/artefacts/{rel:path}")
    def review_artefact(thread_id: str, rel: str):
        st = review.state(thread_id)
        if not st.get("case_id"):
            raise HTTPException(404, "no such image")
        return artefact_file(artefact_root_of(thread_id) / st["case_id"], rel)

    @app.get("/api/decisions")
    def all_decisions():
        return {"decisions": store.decisions()}

    @app.post("/api/reviews/{thread_id}/decisions")
    def decide(request: Request, thread_id: str, body: DecisionBody):
        reviewer = request.session["user"]
        raw = {"action": body.action, "diagnosis": body.diagnosis or None, "reviewer": reviewer,
               "reason": body.reason.strip()}
        with jobs_lock:
            lock = decide_locks.setdefault(thread_id, threading.Lock())
        with lock:  # one decision at a time per case: the first to reach the reads required resumes the graph
            st = review.state(thread_id)
            if not st:
                return _error(404, f"no thread {thread_id}")
            out = review._outcome(thread_id)
            case_id = st.get("case_id", thread_id.split(":")[0])
            if out.review is None:  # decided already (e.g. a concurrent reviewer): keep this read, apply nothing
                try:
                    d = parse_decision(raw, cat, set(cat.diseases))
                except ValidationError as e:
                    return _error(400, _validation_line(e))
                except ValueError as e:
                    return _error(400, str(e))
                by = out.verdict.decided_by if out.verdict else "nobody yet"
                row = store.add_decision(thread_id=thread_id, case_id=case_id, round_=None, reviewer=reviewer,
                                         action=d.action, diagnosis=d.diagnosis, reason=d.reason, applied=False,
                                         note=f"not applied: the case was no longer waiting for review ({by})")
                return {"decision": row, "applied": False, "status": "already_decided",
                        "message": f"Your decision is recorded; the case had already been decided ({by})."}
            try:  # validate before storing: a bad decision is an error message, never a row
                d = parse_decision(raw, cat, {o["diagnosis"] for o in out.review["opinions"]})
            except ValidationError as e:
                return _error(400, _validation_line(e))
            except ValueError as e:
                return _error(400, str(e))
            if d.action == "send_back" and not d.reason:
                return _error(400, "reason: say why the case goes back to the panel")
            rnd = out.review["round"]
            readers = store.readers(thread_id, rnd) | {reviewer}
            fields = dict(thread_id=thread_id, case_id=case_id, round_=rnd, reviewer=reviewer, action=d.action,
                          diagnosis=d.diagnosis, reason=d.reason)
            if len(readers) < web.reads_required:
                row = store.add_decision(**fields, applied=False,
                                         note=f"read {len(readers)} of {web.reads_required}")
                return {"decision": row, "applied": False, "status": "waiting_for_reads",
                        "message": f"Recorded: {len(readers)} of {web.reads_required} reads; the case resumes "
                                   f"when {web.reads_required - len(readers)} more reviewer(s) decide."}
            try:
                new = review.decide(thread_id, d)
            except Exception as e:  # noqa: BLE001 - the read is kept, marked not applied
                log.exception("resuming %s failed", thread_id)
                row = store.add_decision(**fields, applied=False, note=f"not applied: {one_line(e)}")
                return _error(500, f"decision recorded (#{row['id']}) but the consultation did not resume: "
                                   f"{one_line(e)}")
            row = store.add_decision(**fields, applied=True,
                                     note=f"applied after {len(readers)} read(s)")
            record_outcome(case_id, thread_id, new, 0.0, case_dir=st.get("case_dir"), source="review",
                           review_decision_id=row["id"])
            return {"decision": row, "applied": True, "status": "decided" if new.verdict else "sent_back",
                    "verdict": new.verdict.model_dump() if new.verdict else None,
                    "message": (f"Decided: {new.verdict.diagnosis_name} ({new.verdict.decided_by})." if new.verdict
                                else "Sent back: the panel disagreed again and the case is back in the queue.")}

    return app


def _login_html(error: str, nxt: str, has_users: bool, has_token: bool) -> str:
    from html import escape

    err = f"<p class='error' role='alert'>{escape(error)}</p>" if error else ""
    hint = [] if has_users else ["<p class='hint'>No user accounts are configured: log in with the access token "
                                 "(printed by <code>grandrounds serve</code>, or the value of its token env var).</p>"]
    pw = ("<fieldset><legend>Password</legend><input id='password' name='password' type='password' "
          "autocomplete='current-password' aria-label='password'></fieldset>") if has_users else ""
    tok = (f"<fieldset><legend>{'or ' if has_users else ''}access token</legend><input id='token' name='token' "
           "type='password' autocomplete='off' aria-label='token'></fieldset>") if has_token else ""
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Grand Rounds — log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">
<style>body{{font-family:system-ui,sans-serif;max-width:26em;margin:4em auto;padding:0 1em;color:#1d2733}}
h1{{font-size:1.5em}}label{{display:block;margin:.6em 0 .2em}}input{{width:100%;padding:.45em;box-sizing:border-box}}
button{{margin-top:1em;padding:.5em 1.2em}}.error{{color:#a11;font-weight:600}}.hint{{color:#555;font-size:.9em}}
fieldset{{border:1px solid #ccd;border-radius:6px;margin:1em 0}}</style></head><body>
<h1>Grand Rounds</h1>{err}{''.join(hint)}
<form method="post" action="/login"><input type="hidden" name="next" value="{escape(nxt)}">
<label for="username">Name</label><input id="username" name="username" autocomplete="username" required>
{pw}{tok}<button type="submit">Log in</button></form></body></html>"""
