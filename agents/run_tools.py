"""Run the planned tool calls (in parallel threads), turning every failure into a named failed result."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agents.schemas import PlannedCall
from core.case import Modality, load_case
from core.errors import CaseDataError
from core.imaging.load import load_study
from tools.base import RunContext, ToolResult
from tools.registry import get_tool


def _one(case_dir: Path, call: PlannedCall, artefact_dir: Path | None, device: str) -> ToolResult:
    case = load_case(case_dir)
    study = case.study(call.study_id)
    tool = get_tool(call.tool, device)
    try:
        loaded = load_study(case_dir, study)
    except CaseDataError as e:
        return ToolResult(id=f"{call.tool}:{call.study_id}", tool=call.tool, study_id=call.study_id,
                          status="failed", error=f"could not load study: {e}", model=tool.model_name,
                          version=tool.version, device=tool.device)
    ctx = RunContext(study_id=study.id, modality=Modality(study.modality), artefact_dir=artefact_dir,
                     case_id=case.id, acquisition=dict(study.acquisition))
    try:
        return tool.run(loaded, None, ctx=ctx)
    finally:
        close = getattr(loaded, "close", None)
        if callable(close):
            close()


def run_planned(case_dir: str | Path, calls: list[PlannedCall], artefact_dir: Path | None = None,
                device: str = "auto", workers: int = 2) -> list[ToolResult]:
    if artefact_dir is not None:
        artefact_dir.mkdir(parents=True, exist_ok=True)
    if not calls:
        return []
    with ThreadPoolExecutor(max(1, min(workers, len(calls)))) as ex:
        return list(ex.map(lambda c: _one(Path(case_dir), c, artefact_dir, device), calls))
