"""The tool contract: every imaging tool is a `Tool` subclass in one module, registered by name.

A tool declares `name`, `description`, the `modalities` it accepts, a pydantic `Params` model and
its model name/version, and implements `analyse`. `run` wraps it: modality guard (a wrong-modality
study raises `ModalityMismatch` before any work), lazy `load()` once, timing, and failure capture
(an exception inside `analyse` becomes a `failed` ToolResult naming the error, never a crash).
Findings use catalogue finding keys as labels where one applies, so agents and evals can compare.
"""
from __future__ import annotations

import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.case import Modality
from core.device import pick_device


class EmptyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Finding(BaseModel):
    label: str  # a catalogue finding key where one applies (e.g. "lung_nodule"), else a measurement name
    present: bool = True
    value: float | None = None  # a measurement (volume, diameter, ratio, HU, fraction)
    unit: str | None = None
    probability: float | None = Field(None, ge=0, le=1)  # model tools: P(label present)
    location: str | None = None  # anatomical words: "right lower lobe", "left pleural space"
    detail: str | None = None


class Artefact(BaseModel):
    id: str
    kind: Literal["png", "nifti", "json", "tiff"]
    path: str  # relative to the run's artefact folder
    description: str = ""
    # png: [x0, y0, x1, y1] in the image's pixels, the region a reader should zoom into (a lesion, an effusion);
    # a vision-language panel member sees it magnified as an inset (agents/views.py)
    roi: list[float] | None = Field(None, min_length=4, max_length=4)


class ToolResult(BaseModel):
    id: str  # citation id: "<tool>:<study_id>", what rationales cite
    tool: str
    study_id: str
    status: Literal["ok", "failed"]
    error: str | None = None
    findings: list[Finding] = Field(default_factory=list)
    summary: str = ""  # a few sentences for prompts, built from the findings
    artefacts: list[Artefact] = Field(default_factory=list)
    model: str = ""
    version: str = ""
    device: str = "cpu"
    seconds: float = 0.0
    input_from: list[str] = Field(default_factory=list)  # ids of the restoration results this ran on

    def positives(self) -> list[Finding]:
        return [f for f in self.findings if f.present]


class ModalityMismatch(ValueError):
    """A study of a modality the tool does not accept: a planning bug, refused before any work."""


@dataclass
class RunContext:
    study_id: str
    modality: Modality
    artefact_dir: Path | None = None  # where to write overlays; None = write nothing
    case_id: str = ""
    acquisition: dict | None = None  # the Study's acquisition facts (contrast, slice thickness, mpp)
    restored: Any = None  # a restoration tool puts its output study here; later tools on the study receive it
    case_dir: Path | None = None  # the case folder, for tools that read another study of the case
    case_studies: tuple = ()  # the case's Study entries (a radiograph's tool may use the case's CT)


class Tool(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    modalities: ClassVar[frozenset[Modality]]
    Params: ClassVar[type[BaseModel]] = EmptyParams
    model_name: ClassVar[str] = "classical image analysis"
    version: ClassVar[str] = "1"
    # "restore" tools (metal-artefact reduction, slice synthesis) run first, in `order`, each on the
    # previous one's output; "analyse" tools then receive the restored study.
    stage: ClassVar[Literal["restore", "analyse"]] = "analyse"
    order: ClassVar[int] = 0

    def __init__(self, device: str = "auto"):
        self.device = pick_device(device)
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load weights (once, lazily, on first run). Classical tools have none."""

    @classmethod
    def available(cls) -> bool:
        """Whether the tool can run in this installation at all (e.g. similar-case retrieval needs a built
        index). An unavailable tool is left off the planner's menu and never planned."""
        return True

    @classmethod
    def relevance(cls, study: dict, complaint: str) -> str | None:
        """Why the planner's rule wants this tool for a study (`study`: id, modality, description,
        acquisition), or None. Default: a modality's standard analysis always runs; conditional
        tools (metal-artefact reduction, slice interpolation) override this."""
        return f"standard {cls.name} for {study['modality']}"

    @classmethod
    def applies(cls, study: dict, complaint: str, studies: list[dict]) -> str | None:
        """`relevance` with the whole case in view (`studies`: every study of the case, as `study`).
        Tools that need another study of the case (a radiograph's prior CT) override this."""
        return cls.relevance(study, complaint)

    @abstractmethod
    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        """The tool's work on a loaded study (Volume | Radiograph | Slide)."""

    def summarise(self, findings: list[Finding]) -> str:
        parts = []
        for f in findings:
            s = f.label.replace("_", " ") + ("" if f.present else " absent")
            if f.value is not None:
                s += f" {f.value:.3g}{(' ' + f.unit) if f.unit else ''}"
            if f.probability is not None:
                s += f" (p={f.probability:.2f})"
            if f.location:
                s += f", {f.location}"
            parts.append(s)
        return "; ".join(parts) + "." if parts else "No measurable findings."

    def run(self, study: Any, params: BaseModel | dict | None = None, *, ctx: RunContext) -> ToolResult:
        if ctx.modality not in self.modalities:
            raise ModalityMismatch(f"tool {self.name} accepts {sorted(m.value for m in self.modalities)}, "
                                   f"not {ctx.modality.value} (study {ctx.study_id})")
        base = dict(id=f"{self.name}:{ctx.study_id}", tool=self.name, study_id=ctx.study_id,
                    model=self.model_name, version=self.version, device=self.device)
        t0 = time.perf_counter()
        try:
            p = params if isinstance(params, BaseModel) else self.Params.model_validate(params or {})
            with self._lock:
                if not self._loaded:
                    self.load()
                    self._loaded = True
            base.update(model=self.model_name, version=self.version)  # load() may set them from a checkpoint
            findings, artefacts = self.analyse(study, p, ctx)
        except ModalityMismatch:
            raise
        except Exception as e:  # a failed tool is evidence too: named, never hidden
            last = traceback.extract_tb(e.__traceback__)[-1]
            return ToolResult(**base, status="failed", seconds=time.perf_counter() - t0,
                              error=f"{type(e).__name__}: {e} (at {Path(last.filename).name}:{last.lineno})")
        return ToolResult(**base, status="ok", findings=findings, summary=self.summarise(findings),
                          artefacts=artefacts, seconds=time.perf_counter() - t0)
