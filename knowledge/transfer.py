"""Moving knowledge between installations and models: JSON lines, one insight per line."""
from __future__ import annotations

import json
from pathlib import Path

from knowledge.schema import Insight
from knowledge.store import KnowledgeStore


def export_jsonl(store: KnowledgeStore, path: Path, version: int | None = None) -> int:
    items = store.insights(version)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(i.model_dump_json() + "\n" for i in items))
    tmp.replace(path)
    return len(items)


def import_jsonl(store: KnowledgeStore, path: Path, note: str = "") -> int:
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                items.append(Insight.model_validate_json(line))
            except ValueError as e:
                from core.errors import CaseDataError

                raise CaseDataError(path, f"line {n}", str(e).splitlines()[0]) from None
    models = sorted({i.source_model for i in items})
    return store.publish(items, note=note or f"imported from {Path(path).name}", source_model=",".join(models))


def diff(store: KnowledgeStore, a: int, b: int) -> tuple[list[Insight], list[Insight]]:
    """(only in a, only in b), comparing insight text per disease and kind."""
    key = lambda i: (i.disease, i.kind, i.text)  # noqa: E731
    A = {key(i): i for i in store.insights(a)}
    B = {key(i): i for i in store.insights(b)}
    return [A[k] for k in A.keys() - B.keys()], [B[k] for k in B.keys() - A.keys()]
