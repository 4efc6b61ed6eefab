"""What the graph's nodes need besides their state: settings, LLM backends, tools, knowledge, paths."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agents.llm.factory import BackendPool
from core.config import Settings


class KnowledgeSource(Protocol):
    def retrieve(self, summary: str, domain: str, evidence: list[dict], k: int = 5) -> list[dict]:
        """Insights relevant to a case: dicts with id, text, disease, kind."""
        ...


class NoKnowledge:
    """Until learned knowledge lands (issue 5): nothing retrieved, same interface."""

    def retrieve(self, summary: str, domain: str, evidence: list[dict], k: int = 5) -> list[dict]:
        return []


@dataclass
class Services:
    settings: Settings
    llms: BackendPool
    knowledge: KnowledgeSource = field(default_factory=NoKnowledge)
    artefact_root: Path | None = None  # runs/<name>/artefacts; None = tools write no artefacts
    use_tools: bool = True  # evals turn tools off to measure what they add
    tool_device: str = "auto"
    on_event: object = None  # callable(str) for streaming progress to a CLI, or None
    # evals run one case under several conditions; tools are deterministic, so their results can be
    # shared between runs (key: case folder + planned calls). None: always run.
    tool_cache: dict | None = None

    def emit(self, text: str) -> None:
        if callable(self.on_event):
            self.on_event(text)
