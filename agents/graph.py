"""The consultation, as a LangGraph graph.

    intake -> planner -> tools -> knowledge -> diagnostician x N (fan-out) -> evaluator
        evaluator --agree--> finalise -> record -> END
        evaluator --disagree, rounds left--> consult -> diagnostician x N -> evaluator ...
        evaluator --disagree, rounds spent--> human_review (interrupt) --approve/override--> finalise
                                                           --send back--> diagnostician x N -> evaluator

Checkpoints go to sqlite; every case is a thread, so a paused review survives a restart and
resumes with `Command(resume=decision)`.
"""
from __future__ import annotations

import operator
import sqlite3
from pathlib import Path
from typing import Annotated, TypedDict

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send, interrupt

from agents.diagnostician import PERSONAS, diagnose
from agents.evaluator import check_claim, evaluate
from agents.intake import intake
from agents.planner import plan_tools
from agents.review import parse_decision, review_payload
from agents.run_tools import run_planned
from agents.schemas import Claim, Plan, Ranked, ReviewDecision, RoundRecord, Verdict
from agents.services import Services
from agents.views import case_views
from core.catalogue import load_catalogue
from tools.case_retrieval import configure as configure_case_index


def _merge(a: dict | None, b: dict | None) -> dict:
    return {**(a or {}), **(b or {})}


class ConsultState(TypedDict, total=False):
    case_dir: str
    case_id: str
    summary: str
    domain: str
    studies: list[dict]
    warnings: list[str]
    plan: dict
    tool_results: list[dict]
    insights: list[dict]
    round: int
    opinions: Annotated[dict[str, dict], _merge]  # "round:agent" -> Opinion
    history: Annotated[list[dict], operator.add]  # RoundRecord per round
    review: dict | None
    send_back: bool
    verdict: dict | None


class DiagnosticianInput(TypedDict):
    agent_index: int
    state: dict


def build_graph(services: Services, checkpointer=None):
    cat = load_catalogue()
    settings = services.settings
    configure_case_index(settings.case_index_dir)  # no index there: case_retrieval is simply not planned
    panel = services.llms.for_role("diagnosticians")
    panel_cfg = [c for _, c in settings.llm.backend_for("diagnosticians")]

    def n_intake(state: ConsultState) -> dict:
        out = intake(state["case_dir"])
        services.emit(f"intake: {out['case_id']} ({out['domain']}, studies: "
                      f"{', '.join(s['id'] + ' ' + s['modality'] for s in out['studies'])})")
        for w in out["warnings"]:
            services.emit(f"warning: {w}")
        return {**out, "round": 1}

    def n_planner(state: ConsultState) -> dict:
        if not services.use_tools:
            return {"plan": Plan(calls=[]).model_dump()}
        llm = services.llms.for_role("planner")[0]
        p = plan_tools(state["summary"], state["studies"], llm)
        services.emit("plan: " + ", ".join(f"{c.tool} on {c.study_id}" for c in p.calls) +
                      (f" (rejected: {'; '.join(p.rejected)})" if p.rejected else ""))
        return {"plan": p.model_dump()}

    def n_tools(state: ConsultState) -> dict:
        calls = Plan.model_validate(state["plan"]).calls
        art = services.artefact_root / state["case_id"] if services.artefact_root else None
        key = (state["case_dir"], tuple((c.tool, c.study_id) for c in calls))
        if services.tool_cache is not None and key in services.tool_cache:
            results = services.tool_cache[key]
        else:
            results = run_planned(state["case_dir"], calls, art, services.tool_device, settings.tool_workers)
            if services.tool_cache is not None:
                services.tool_cache[key] = results
        for r in results:
            services.emit(f"tool {r.id}: {r.status} in {r.seconds:.2f} s — " + (r.summary or r.error or ""))
        return {"tool_results": [r.model_dump() for r in results]}

    def n_knowledge(state: ConsultState) -> dict:
        ins = services.knowledge.retrieve(state["summary"], state["domain"], state.get("tool_results", []))
        if ins:
            services.emit(f"knowledge: {len(ins)} insight(s) retrieved")
        return {"insights": ins}

    def fan_out(state: ConsultState) -> list[Send]:
        return [Send("diagnostician", {"agent_index": i, "state": dict(state)}) for i in range(len(panel))]

    def n_diagnostician(inp: DiagnosticianInput) -> dict:
        i, st = inp["agent_index"], inp["state"]
        persona = PERSONAS[i % len(PERSONAS)]
        agent = f"{persona.name}-{i + 1}"
        rnd = st.get("round", 1)
        ops = st.get("opinions", {})
        peers = [o for k, o in ops.items() if o["round"] == rnd - 1 and o["agent"] != agent] if rnd > 1 else []
        previous = ops.get(f"{rnd - 1}:{agent}")
        views = []
        if panel[i].vision and services.artefact_root is not None:
            views = case_views(st.get("tool_results", []), services.artefact_root / st["case_id"],
                               max_images=panel_cfg[i].max_images)
        op = diagnose(agent=agent, persona=persona, llm=panel[i], cat=cat, domain=st["domain"],
                      summary=st["summary"], tool_results=st.get("tool_results", []),
                      insights=st.get("insights", []), round_=rnd, peers=peers, previous=previous,
                      write_rationale=settings.llm_rationale, views=views)
        services.emit(f"round {rnd} {agent} ({op.model}): {cat.diseases[op.diagnosis].name} "
                      f"p={op.differential[0].probability:.2f}")
        return {"opinions": {f"{rnd}:{agent}": op.model_dump()}}

    def n_evaluator(state: ConsultState) -> dict:
        rnd = state.get("round", 1)
        current = [o for o in state["opinions"].values() if o["round"] == rnd]
        rec = evaluate(current, rnd, cat, settings.agreement)
        services.emit(f"evaluator round {rnd}: {'agree' if rec.agree else 'disagree'} {rec.votes}")
        return {"history": [rec.model_dump()]}

    def route(state: ConsultState) -> str:
        last = state["history"][-1]
        if last["agree"]:
            return "finalise"
        if state.get("send_back") or state.get("round", 1) >= settings.max_rounds:
            return "human_review"
        return "consult"

    def n_consult(state: ConsultState) -> dict:
        return {"round": state.get("round", 1) + 1}

    def n_human_review(state: ConsultState) -> dict:
        rnd = state.get("round", 1)
        panel_dx = {o["diagnosis"] for o in state["opinions"].values() if o["round"] == rnd}
        raw = interrupt(review_payload(state))
        d = parse_decision(raw, cat, panel_dx)
        if d.action == "send_back":
            return {"review": d.model_dump(), "send_back": True, "round": rnd + 1}
        return {"review": d.model_dump(), "send_back": False}

    def route_review(state: ConsultState):
        return fan_out(state) if state.get("send_back") else "finalise"

    def n_finalise(state: ConsultState) -> dict:
        v = finalise(state, cat)
        services.emit(f"verdict: {v.diagnosis_name} (confidence {v.confidence:.2f}, {v.decided_by})")
        return {"verdict": v.model_dump()}

    def n_record(state: ConsultState) -> dict:
        return {}  # learning reads finished threads' verdicts (issue 5); nothing to do per case yet

    g = StateGraph(ConsultState)
    for name, fn in [("intake", n_intake), ("planner", n_planner), ("tools", n_tools), ("knowledge", n_knowledge),
                     ("diagnostician", n_diagnostician), ("evaluator", n_evaluator), ("consult", n_consult),
                     ("human_review", n_human_review), ("finalise", n_finalise), ("record", n_record)]:
        g.add_node(name, fn)
    g.add_edge(START, "intake")
    g.add_edge("intake", "planner")
    g.add_edge("planner", "tools")
    g.add_edge("tools", "knowledge")
    g.add_conditional_edges("knowledge", fan_out, ["diagnostician"])
    g.add_edge("diagnostician", "evaluator")
    g.add_conditional_edges("evaluator", route, ["finalise", "consult", "human_review"])
    g.add_conditional_edges("consult", fan_out, ["diagnostician"])
    g.add_conditional_edges("human_review", route_review, ["diagnostician", "finalise"])
    g.add_edge("finalise", "record")
    g.add_edge("record", END)
    return g.compile(checkpointer=checkpointer)


def finalise(state: dict, cat) -> Verdict:
    rnd = state.get("round", 1)
    current = [o for o in state["opinions"].values() if o["round"] == rnd]
    review = ReviewDecision.model_validate(state["review"]) if state.get("review") else None
    history = [RoundRecord.model_validate(h) for h in state.get("history", [])]
    votes = history[-1].votes if history else {}
    if review and review.action in ("approve", "override"):
        dx, decided = review.diagnosis, f"reviewer: {review.reviewer} ({review.action})"
    else:
        counts: dict[str, int] = {}
        for v in votes.values():
            counts[v] = counts.get(v, 0) + 1
        dx = max(counts, key=counts.get)
        kind = "unanimous" if counts[dx] == len(votes) else "majority"
        decided = f"agents ({kind}, round {rnd})"
    mean: dict[str, float] = {}
    for o in current:
        for r in o["differential"]:
            mean[r["diagnosis"]] = mean.get(r["diagnosis"], 0.0) + r["probability"] / len(current)
    failures = [f"{r['id']}: {r['error']}" for r in state.get("tool_results", []) if r["status"] != "ok"]
    # A failed tool is missing evidence: it lowers confidence, and is named in the verdict.
    confidence = mean.get(dx, 0.0) * (0.85 ** len(failures))
    results = {r["id"]: r for r in state.get("tool_results", [])}
    insight_ids = {i["id"] for i in state.get("insights", [])}
    claims: list[Claim] = []
    seen = set()
    for o in current:
        if o["diagnosis"] != dx:
            continue
        for c in o["rationale"]:
            claim = Claim.model_validate(c)
            if claim.statement in seen:
                continue
            seen.add(claim.statement)
            claims.append(claim.model_copy(update={"valid": check_claim(claim, results, insight_ids, cat)}))
    valid = sum(bool(c.valid) for c in claims) / len(claims) if claims else None
    diff = sorted(mean.items(), key=lambda kv: kv[1], reverse=True)[:5]
    return Verdict(case_id=state["case_id"], diagnosis=dx, diagnosis_name=cat.diseases[dx].name,
                   differential=[Ranked(diagnosis=k, probability=round(p, 4)) for k, p in diff],
                   confidence=round(min(max(confidence, 0.0), 1.0), 4), rationale=claims, tool_failures=failures,
                   tools_used=[r["id"] for r in state.get("tool_results", []) if r["status"] == "ok"],
                   agreement_history=history, decided_by=decided, review=review,
                   warnings=state.get("warnings", []), citations_valid=valid)


def open_checkpointer(path: str | Path) -> SqliteSaver:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), check_same_thread=False)
    return SqliteSaver(conn)
