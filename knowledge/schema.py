"""An insight: one piece of learned diagnostic knowledge, with where it came from."""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

Kind = Literal["general", "rare", "statistic"]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Insight(BaseModel):
    id: str = ""  # content hash + version, filled by `with_id`
    text: str = Field(min_length=1)
    disease: str  # catalogue key ("*" for cross-disease)
    domain: Literal["chest", "pathology"] = "chest"
    kind: Kind
    source_model: str  # the model that wrote it ("data" for statistics computed from tool outputs)
    version: int = 0
    provenance: list[str] = Field(default_factory=list)  # case ids it was learned from
    validation_gain: float | None = None  # accuracy change on the validation split when it is used
    created: str = Field(default_factory=now)
    retired: str | None = None
    # statistic insights carry their numbers so diagnosticians can use them, not only read them
    finding: str | None = None
    rate_with: float | None = None  # P(tool reports finding | disease) on the learn split
    rate_without: float | None = None  # P(tool reports finding | other diseases)
    support: int | None = None  # cases of this disease behind rate_with

    def with_id(self) -> "Insight":
        h = hashlib.sha1(f"{self.kind}|{self.disease}|{self.text}".encode()).hexdigest()[:12]
        return self.model_copy(update={"id": f"insight:v{self.version}:{h}"})
