"""Grand Rounds command line (`grandrounds`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from core.errors import CaseDataError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(help="Grand Rounds: LLM agents consult on medical-imaging cases.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
cases_app = typer.Typer(help="Make and check case folders.", no_args_is_help=True)
app.add_typer(cases_app, name="cases")
tools_app = typer.Typer(help="The imaging tools.", no_args_is_help=True)
app.add_typer(tools_app, name="tools")
review_app = typer.Typer(help="The queue of cases waiting for a human decision.", no_args_is_help=True)
app.add_typer(review_app, name="review")
knowledge_app = typer.Typer(help="Learned diagnostic knowledge (MACD), versioned in ChromaDB.", no_args_is_help=True)
app.add_typer(knowledge_app, name="knowledge")

ctclip_app = typer.Typer(help="CT-CLIP: CT image/report embeddings and the similar-case index.", no_args_is_help=True)
app.add_typer(ctclip_app, name="ctclip")

_CONFIG: dict = {"path": None, "overrides": []}


@app.callback()
def _global(
    config: Annotated[Path | None, typer.Option("--config", help="Settings file (default ./grandrounds.toml).")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a setting: KEY=VALUE (repeatable), "
                                                          "e.g. --set llm.roles.planner=server")] = [],  # noqa: B006
) -> None:
    _CONFIG.update(path=config, overrides=list(set_))


def _settings():
    from core.config import load_settings

    return load_settings(_CONFIG["path"], _CONFIG["overrides"])


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console)


@cases_app.command("generate")
def cases_generate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write case folders into.")],
    n: Annotated[int, typer.Option("--n", help="Number of cases.", min=1)] = 20,
    seed: Annotated[int, typer.Option(help="Cohort seed; case i is the same for a seed whatever n is.")] = 0,
    start: Annotated[int, typer.Option(help="Index of the first case (to extend a cohort).", min=0)] = 0,
    workers: Annotated[int, typer.Option(help="Processes generating in parallel.", min=1)] = 1,
    ct_size: Annotated[str, typer.Option(help="Thin-slice CT grid z,y,x.")] = "96,128,128",
    pathology_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.2,
    metal_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.15,
    thick_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.25,
    examples: Annotated[bool, typer.Option("--examples", help="Write the fixed example set instead.")] = False,
) -> None:
    """Generate a seeded synthetic cohort (chest CT + radiograph, pathology slides) with ground truth."""
    from core.synth.cohort import EXAMPLE_PLANS, CohortOptions, generate_cohort, generate_examples

    try:
        shape = tuple(int(v) for v in ct_size.split(","))
        assert len(shape) == 3 and min(shape) >= 32 and shape[1] == shape[2]
    except (ValueError, AssertionError):
        raise typer.BadParameter("give three integers >= 32 with y == x (square pixels), e.g. 96,128,128",
                                 param_hint="--ct-size") from None
    t0 = time.perf_counter()
    total = len(EXAMPLE_PLANS) if examples else n
    with _progress() as prog:
        task = prog.add_task("generating cases", total=total)

        def tick(case) -> None:
            prog.advance(task)
            # markup=False: "[ct, xr]" would otherwise be read as a Rich style tag and vanish
            prog.console.log(f"{case.id}: {case.truth.diagnosis} [{', '.join(s.id for s in case.studies)}]",
                             markup=False, highlight=False)

        if examples:
            ids = generate_examples(out, on_case=tick)
        else:
            opts = CohortOptions.for_grid(shape, pathology_fraction=pathology_fraction, metal_rate=metal_rate,
                                 thick_rate=thick_rate)
            ids = generate_cohort(n, seed, out, opts, workers=workers, start=start, on_case=tick)
            prog.update(task, completed=total)
    dt = time.perf_counter() - t0
    console.print(f"{len(ids)} cases in {out} ({dt:.1f} s)")


@cases_app.command("validate")
def cases_validate(
    folder: Annotated[Path, typer.Argument(help="A case folder, or a folder of case folders.")],
    images: Annotated[bool, typer.Option("--images/--no-images", help="Also open every image.")] = True,
) -> None:
    """Check case folders: schema, paths, and that every image loads. One line per problem."""
    from core.validate import validate_cases

    n, problems = validate_cases(folder, check_images=images)
    for p in problems:
        console.print(str(p), markup=False, highlight=False, soft_wrap=True)
    if problems:
        err_console.print(f"{len(problems)} problem(s) in {n} case folder(s)")
        raise typer.Exit(1)
    console.print(f"{n} case folder(s) OK")


@tools_app.command("list")
def tools_list() -> None:
    """The registry: name, modalities, model and version, device."""
    from rich.table import Table

    from core.device import pick_device
    from tools.registry import tool_classes

    t = Table()
    t.add_column("tool", no_wrap=True)
    for col in ("modalities", "model", "version", "device", "description"):
        t.add_column(col, overflow="fold")
    dev = pick_device(_settings().device)
    for name, cls in tool_classes().items():
        t.add_row(name, ", ".join(m.value for m in cls.modalities), cls.model_name, cls.version, dev,
                  cls.description.split(". ")[0])
    console.print(t)


def _verdict_panel(v) -> None:
    from rich.panel import Panel

    lines = [f"[bold]{v.diagnosis_name}[/bold]  confidence {v.confidence:.2f}  — {v.decided_by}",
             "differential: " + ", ".join(f"{d.diagnosis} {d.probability:.2f}" for d in v.differential)]
    for c in v.rationale:
        mark = "" if c.valid else " [red](unsupported)[/red]"
        lines.append(f"• {c.statement} [dim][{', '.join(c.cites)}][/dim]{mark}")
    if v.tool_failures:
        lines.append("[red]tool failures:[/red] " + "; ".join(v.tool_failures))
    for w in v.warnings:
        lines.append(f"[yellow]warning:[/yellow] {w}")
    console.print(Panel("\n".join(lines), title=f"verdict {v.case_id}"))


@app.command()
def diagnose(
    case: Annotated[Path, typer.Argument(help="A case folder (with case.yaml).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print only the verdict as JSON.")] = False,
    state: Annotated[Path, typer.Option(help="Checkpoint database (the review queue lives here).")] = Path(
        "runs/diagnose/state.sqlite"),
    no_tools: Annotated[bool, typer.Option("--no-tools", help="Diagnose from the presentation alone.")] = False,
    no_knowledge: Annotated[bool, typer.Option("--no-knowledge", help="Ignore learned knowledge.")] = False,
) -> None:
    """Run the consultation on one case, streaming the agents' steps."""
    from agents.consult import Consultation

    from core.case import load_case

    load_case(case)  # a bad case is a one-line error before any model loads
    c = Consultation(_settings(), state, artefact_root=state.parent / "artefacts", use_tools=not no_tools,
                     knowledge=_knowledge_source(not no_knowledge), on_event=None if as_json else (lambda m: console.print(f"[dim]›[/dim] {m}", highlight=False)))
    try:
        out = c.run(case)
    finally:
        c.close()
    if out.verdict is None:
        if as_json:
            console.print_json(data={"status": "awaiting_review", "thread_id": out.thread_id})
        else:
            console.print(f"[yellow]The panel did not agree: waiting for human review.[/yellow] "
                          f"grandrounds review show {out.thread_id} --state {state}")
        return
    if as_json:
        print(out.verdict.model_dump_json(indent=2))
    else:
        _verdict_panel(out.verdict)


@app.command()
def batch(
    cases: Annotated[Path, typer.Argument(help="A folder of case folders.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (runs/<name>); re-running resumes.")],
    concurrency: Annotated[int, typer.Option(min=1, help="Cases in flight at once.")] = 1,
    no_tools: Annotated[bool, typer.Option("--no-tools")] = False,
    no_knowledge: Annotated[bool, typer.Option("--no-knowledge", help="Ignore learned knowledge.")] = False,
) -> None:
    """Diagnose every case in a folder: results.jsonl, summary.csv, report.html; resumable."""
    from agents.batch import run_batch

    with _progress() as prog:
        task = prog.add_task("diagnosing", total=None)

        def start(total: int, skipped: int) -> None:
            prog.update(task, total=total, completed=skipped)
            if skipped:
                prog.console.print(f"resuming: {skipped} case(s) already done")

        def case_done(row: dict) -> None:
            prog.advance(task)
            v = row.get("verdict")
            what = v["diagnosis_name"] + f" ({v['confidence']:.2f})" if v else row["status"]
            prog.console.print(f"{row['case_id']}: {what}", highlight=False)

        summary = run_batch(cases, out, _settings(), concurrency=concurrency, use_tools=not no_tools,
                            knowledge=_knowledge_source(not no_knowledge), on_start=start, on_case=case_done)
    console.print(f"{summary['ran']} case(s) in {summary['seconds']:.0f} s ({summary['cases_per_min']:.1f}/min), "
                  f"{summary['skipped']} skipped; {out / 'report.html'}")


@app.command()
def chat(
    case: Annotated[Path, typer.Argument(help="A case folder.")],
    state: Annotated[Path, typer.Option()] = Path("runs/chat/state.sqlite"),
    question: Annotated[list[str], typer.Option("--ask", help="Ask non-interactively (repeatable).")] = [],  # noqa: B006
) -> None:
    """Terminal consultation: the panel runs, then ask follow-up questions (`/tool NAME` re-runs a tool)."""
    from agents.chat import ChatSession
    from agents.consult import Consultation
    from core.case import load_case

    load_case(case)
    c = Consultation(_settings(), state, artefact_root=state.parent / "artefacts",
                     on_event=lambda m: console.print(f"[dim]› {m}[/dim]", highlight=False))
    try:
        session = ChatSession(c, case)
        if session.state.get("verdict"):
            from agents.schemas import Verdict

            _verdict_panel(Verdict.model_validate(session.state["verdict"]))
        asked = iter(question) if question else None
        while True:
            q = next(asked, None) if asked else console.input("[bold]you>[/bold] ")
            if q is None or q.strip() in ("", "/quit", "/exit"):
                break
            try:
                for piece in session.ask(q):
                    console.print(piece, end="", markup=False, highlight=False)
            except ValueError as e:
                console.print(f"[red]{e}[/red]")
            console.print()
    except (EOFError, KeyboardInterrupt):
        console.print()
    finally:
        c.close()


def _run_consultation(state: Path):
    from agents.consult import Consultation

    if not state.is_file():
        raise CaseDataError(state, "file", "no checkpoint database here (run diagnose or batch first)")
    return Consultation(_settings(), state)


@review_app.command("list")
def review_list(state: Annotated[Path, typer.Option(help="Checkpoint database, e.g. runs/demo/state.sqlite")]
                = Path("runs/diagnose/state.sqlite")) -> None:
    """Cases waiting for a human decision."""
    from rich.table import Table

    c = _run_consultation(state)
    t = Table("thread", "case", "round", "panel votes")
    for o in c.pending_reviews():
        t.add_row(o.thread_id, o.review["case_id"], str(o.review["round"]),
                  ", ".join(f"{x['agent']}: {x['diagnosis']}" for x in o.review["opinions"]))
    console.print(t)
    c.close()


@review_app.command("show")
def review_show(thread: str, state: Annotated[Path, typer.Option()] = Path("runs/diagnose/state.sqlite")) -> None:
    """One waiting case: summary, tool evidence, each diagnostician's differential and rationale."""
    c = _run_consultation(state)
    o = next((x for x in c.pending_reviews() if x.thread_id == thread), None)
    c.close()
    if o is None:
        raise CaseDataError(state, "thread", f"{thread} is not waiting for review")
    r = o.review
    console.print(r["summary"], markup=False)
    for t in r["tool_results"]:
        console.print(f"[{t['id']}] {t['status']}: {t['summary'] or t['error']}", markup=False)
    for op in r["opinions"]:
        console.print(f"[bold]{op['agent']}[/bold] ({op['model']}): " +
                      ", ".join(f"{d['diagnosis']} {d['probability']:.2f}" for d in op["differential"]))
        for cl in op["rationale"]:
            console.print(f"   • {cl['statement']} [{', '.join(cl['cites'])}]", markup=False)


@review_app.command("decide")
def review_decide(
    thread: str,
    reviewer: Annotated[str, typer.Option(help="Your name, recorded with the decision.")],
    approve: Annotated[str | None, typer.Option(help="Approve one of the panel's diagnoses.")] = None,
    override: Annotated[str | None, typer.Option(help="Enter another diagnosis (any catalogue disease).")] = None,
    send_back: Annotated[bool, typer.Option("--send-back", help="Another consultation round.")] = False,
    reason: Annotated[str, typer.Option()] = "",
    state: Annotated[Path, typer.Option()] = Path("runs/diagnose/state.sqlite"),
) -> None:
    """Decide a waiting case; the graph resumes from its checkpoint."""
    from agents.batch import append_result, outcome_row, write_summary

    if sum(x is not None and x is not False for x in (approve, override, send_back or None)) != 1:
        raise typer.BadParameter("give exactly one of --approve, --override, --send-back")
    action = "approve" if approve else "override" if override else "send_back"
    c = _run_consultation(state)
    try:
        out = c.decide(thread, {"action": action, "diagnosis": approve or override, "reviewer": reviewer,
                                "reason": reason})
    except ValueError as e:
        raise CaseDataError(state, "decision", str(e)) from None
    finally:
        c.close()
    results = state.parent / "results.jsonl"
    if results.is_file():  # a batch run: its results and summary follow the decision
        case_id = thread.split(":")[0]
        append_result(results, outcome_row(case_id, out, 0.0))
        write_summary(state.parent)
    if out.verdict:
        _verdict_panel(out.verdict)
    else:
        console.print("Sent back: the panel disagreed again and the case is back in the queue.")


def _store(path: Path | None):
    from knowledge.store import KnowledgeStore

    return KnowledgeStore(path or _settings().knowledge_dir)


def _knowledge_source(use: bool):
    """The store's current version for the graph, when one exists and the user did not opt out."""
    if not use:
        return None
    from knowledge.apply import StoreKnowledge

    settings = _settings()
    if not (Path(settings.knowledge_dir) / "versions.json").is_file():
        return None
    store = _store(None)
    return StoreKnowledge(store) if store.current_version() else None


@knowledge_app.command("learn")
def knowledge_learn(
    cases: Annotated[Path, typer.Option("--cases", help="Solved cases (with truth) to learn from.")],
    store: Annotated[Path | None, typer.Option(help="Store folder (default: settings.knowledge_dir).")] = None,
    seed: Annotated[int, typer.Option(help="Learn/validation split seed.")] = 0,
    feedback: Annotated[list[Path], typer.Option(help="Run state.sqlite whose reviewer decisions to learn from.")]
    = [],  # noqa: B006
    no_llm: Annotated[bool, typer.Option("--no-llm", help="Statistics only (no LLM-written criteria).")] = False,
    panel_check: Annotated[bool, typer.Option(help="Validate the LLM-written criteria with the diagnostician "
                                              "panel on the validation split (slower; without it they are not "
                                              "validated).")] = True,
) -> None:
    """Learn a new knowledge version: tool statistics + LLM criteria, refined on a validation split."""
    from agents.batch import find_cases
    from agents.llm.factory import BackendPool
    from knowledge.feedback import reviewed_cases
    from knowledge.learn import learn

    settings = _settings()
    dirs = find_cases(cases)
    fb = [c for db in feedback for c in reviewed_cases(db)]
    pool = BackendPool(settings)
    llm = None if no_llm else pool.for_role("knowledge")[0]
    panel = pool.for_role("diagnosticians") if llm is not None and panel_check else None
    with _progress() as prog:
        task = prog.add_task("running tools on solved cases", total=len(dirs))
        v, report = learn(dirs, _store(store), llm, seed=seed, feedback=fb, on_case=lambda _: prog.advance(task),
                          panel=panel)
    console.print(f"knowledge version {v}: {report['kept']} insights kept of {report['candidates']} "
                  f"({report['learn_cases']} learn cases incl. {len(fb)} reviewed, {report['validation_cases']} "
                  f"validation); evidence-only validation accuracy {report['accuracy_all']:.3f} -> "
                  f"{report['accuracy_final']:.3f}")
    if "panel" in report:
        pr = report["panel"]
        kept = sorted(dx for dx, g in pr["criteria_groups"].items() if g["kept"])
        console.print(f"panel validation accuracy: statistics "
                      f"{pr['accuracy_statistics']:.3f}, all criteria {pr['accuracy_all']:.3f}, kept "
                      f"{pr['accuracy_final']:.3f}; criteria kept for: {', '.join(kept) or 'none'}")


@knowledge_app.command("show")
def knowledge_show(store: Annotated[Path | None, typer.Option()] = None,
                   version: Annotated[int | None, typer.Option()] = None) -> None:
    """The insights of a version (default: current), with provenance and validation gain."""
    from rich.table import Table

    s = _store(store)
    m = s.manifest()
    console.print(f"current version {m['current']}; versions: " +
                  ", ".join(f"v{x['version']} ({x['n']}, {x['created']})" for x in m["versions"]))
    t = Table("id", "disease", "kind", "model", "text", "cases", "gain")
    for i in s.insights(version):
        t.add_row(i.id, i.disease, i.kind, i.source_model, i.text, str(len(i.provenance)),
                  "" if i.validation_gain is None else f"{i.validation_gain:+.3f}")
    console.print(t)


@knowledge_app.command("diff")
def knowledge_diff(a: int, b: int, store: Annotated[Path | None, typer.Option()] = None) -> None:
    """What changed between two versions."""
    from knowledge.transfer import diff

    only_a, only_b = diff(_store(store), a, b)
    for i in only_a:
        console.print(f"[red]- v{a}[/red] {i.disease} ({i.kind}): {i.text}", highlight=False)
    for i in only_b:
        console.print(f"[green]+ v{b}[/green] {i.disease} ({i.kind}): {i.text}", highlight=False)


@knowledge_app.command("export")
def knowledge_export(path: Path, store: Annotated[Path | None, typer.Option()] = None,
                     version: Annotated[int | None, typer.Option()] = None) -> None:
    """Write a version as JSON lines (move knowledge between installations or models)."""
    from knowledge.transfer import export_jsonl

    console.print(f"{export_jsonl(_store(store), path, version)} insights -> {path}")


@knowledge_app.command("import")
def knowledge_import(path: Path, store: Annotated[Path | None, typer.Option()] = None) -> None:
    """Publish the insights of a JSON-lines file as a new version."""
    from knowledge.transfer import import_jsonl

    if not path.is_file():
        raise CaseDataError(path, "file", "does not exist")
    console.print(f"imported as version {import_jsonl(_store(store), path)}")


@ctclip_app.command("index")
def ctclip_index(
    folder: Annotated[Path, typer.Argument(help="A folder of past case folders (or one case folder).")],
    results: Annotated[Path | None, typer.Option("--results", help="A run's results.jsonl: index its final "
                                                 "verdicts instead of the cases' truth diagnoses.")] = None,
    index: Annotated[Path | None, typer.Option("--index", help="Index folder (default: settings.case_index_dir).")]
    = None,
    embedder: Annotated[str, typer.Option(help="Image embedder: ctclip (the trained checkpoint) or hu-histogram "
                                          "(a classical baseline).")] = "ctclip",
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Empty the index first (needed after the embedder "
                                          "or its checkpoint changed).")] = False,
) -> None:
    """Index past cases' CT studies for similar-case retrieval (resumable: unchanged cases are skipped).

    The indexed cases are known past cases: their verdicts and reports are what the case_retrieval tool
    shows the panel. Never index the cases you will evaluate on."""
    from tools.case_retrieval import EMBEDDERS, build_index

    if embedder not in EMBEDDERS:
        raise typer.BadParameter(f"one of {', '.join(sorted(EMBEDDERS))}", param_hint="--embedder")
    settings = _settings()
    where = index or settings.case_index_dir
    from core.device import pick_device

    with _progress() as prog:
        task = prog.add_task("indexing cases", total=None)

        def one(case_id: str, status: str) -> None:
            prog.advance(task)
            if status.startswith("skipped"):
                prog.console.print(f"{case_id}: {status}", markup=False, highlight=False, soft_wrap=True)

        rep = build_index(folder, where, results_jsonl=results, embedder=embedder, device=pick_device(settings.device),
                          rebuild=rebuild, on_start=lambda n: prog.update(task, total=n), on_case=one)
    console.print(f"index {where} ({rep.embedder} {rep.version}): {rep.added} added, {rep.updated} updated, "
                  f"{rep.unchanged} unchanged, {rep.no_ct} without CT, {len(rep.skipped)} skipped; {rep.total} "
                  f"cases indexed; {rep.seconds:.1f} s ({rep.rate:.2f} cases/s)", highlight=False)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind (default settings web.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default settings web.port).", min=1, max=65535)] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Checkpoints, review queue, uploads, "
                                                                   "results (default settings web.run_dir).")] = None,
    review_only: Annotated[bool, typer.Option("--review-only", help="Only the review queue; no model is loaded.")]
    = False,
    no_knowledge: Annotated[bool, typer.Option("--no-knowledge", help="Ignore learned knowledge.")] = False,
) -> None:
    """The web page: chat consultation and the review queue (log in with a token or a user's password)."""
    import uvicorn

    from web.server import create_app

    settings = _settings()
    web = settings.web.model_copy(update={k: v for k, v in (("host", host), ("port", port), ("run_dir", run_dir))
                                          if v is not None})
    settings = settings.model_copy(update={"web": web})
    application = create_app(settings, knowledge=None if review_only else _knowledge_source(not no_knowledge),
                             review_only=review_only)
    url = f"http://{web.host}:{web.port}/"
    if application.state.generated_token:
        console.print(f"No {web.token_env} and no \\[web.users] set: this run's access token is "
                      f"[bold]{application.state.generated_token}[/bold]", highlight=False)
    console.print(f"Grand Rounds on {url} (run folder {web.run_dir}); users: `python -m web.auth NAME` prints a "
                  f"password hash for \\[web.users]", highlight=False)
    if web.host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(f"warning: listening on {web.host}, not loopback: put TLS in front of it")
    uvicorn.run(application, host=web.host, port=web.port, log_level="info")


def main() -> None:
    try:
        app()
    except CaseDataError as e:  # bad input is a message, never a traceback
        err_console.print(f"error: {e}", markup=False, highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
