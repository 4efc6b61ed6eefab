"""Run the planned tool calls, turning every failure into a named failed result.

Per study: the study is loaded once; restoration tools (stage "restore": metal-artefact reduction,
then slice synthesis) run in their `order`, each on the previous one's output; the analysis tools
then run in parallel threads on the restored study, and their results name what restored it. A
failed restoration is reported and the analysis falls back to the study as acquired.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agents.schemas import PlannedCall
from core.case import Modality, load_case
from core.errors import CaseDataError
from core.imaging.load import load_study
from tools.base import RunContext, ToolResult
from tools.registry import get_tool


def _failed(call: PlannedCall, device: str, error: str) -> ToolResult:
    tool = get_tool(call.tool, device)
    return ToolResult(id=f"{call.tool}:{call.study_id}", tool=call.tool, study_id=call.study_id, status="failed",
                      error=error, model=tool.model_name, version=tool.version, device=tool.device)


def _study_pipeline(case_dir: Path, study_id: str, calls: list[PlannedCall], artefact_dir: Path | None,
                    device: str, workers: int) -> list[ToolResult]:
    case = load_case(case_dir)
    study = case.study(study_id)
    try:
        loaded = load_study(case_dir, study)
    except CaseDataError as e:
        return [_failed(c, device, f"could not load study: {e}") for c in calls]

    def ctx() -> RunContext:
        return RunContext(study_id=study.id, modality=Modality(study.modality), artefact_dir=artefact_dir,
                          case_id=case.id, acquisition=dict(study.acquisition), case_dir=case_dir,
                          case_studies=tuple(case.studies))

    restore = sorted((c for c in calls if get_tool(c.tool, device).stage == "restore"),
                     key=lambda c: get_tool(c.tool, device).order)
    analyse = [c for c in calls if c not in restore]
    results: list[ToolResult] = []
    current, restored_by = loaded, []
    try:
        for c in restore:
            cx = ctx()
            r = get_tool(c.tool, device).run(current, None, ctx=cx)
            results.append(r.model_copy(update={"input_from": list(restored_by)}))
            if r.status == "ok" and cx.restored is not None:
                current = cx.restored
                restored_by.append(r.id)

        def one(c: PlannedCall) -> ToolResult:
            r = get_tool(c.tool, device).run(current, None, ctx=ctx())
            return r.model_copy(update={"input_from": list(restored_by)})

        if analyse:
            with ThreadPoolExecutor(max(1, min(workers, len(analyse)))) as ex:
                results += list(ex.map(one, analyse))
    finally:
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
    return results


def run_planned(case_dir: str | Path, calls: list[PlannedCall], artefact_dir: Path | None = None,
                device: str = "auto", workers: int = 2) -> list[ToolResult]:
    if artefact_dir is not None:
        artefact_dir.mkdir(parents=True, exist_ok=True)
    if not calls:
        return []
    by_study: dict[str, list[PlannedCall]] = {}
    for c in calls:
        by_study.setdefault(c.study_id, []).append(c)
    with ThreadPoolExecutor(max(1, min(workers, len(by_study)))) as ex:
        per = list(ex.map(lambda sid: _study_pipeline(Path(case_dir), sid, by_study[sid], artefact_dir, device,
                                                      workers), by_study))
    order = {(c.tool, c.study_id): i for i, c in enumerate(calls)}
    return sorted((r for rs in per for r in rs), key=lambda r: order.get((r.tool, r.study_id), len(order)))
