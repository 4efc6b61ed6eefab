"""The one error type for bad input: it names the file and the field, never a traceback."""
from __future__ import annotations

from pathlib import Path


class CaseDataError(ValueError):
    """Input that cannot be used: `file: field: problem`, printable as one line."""

    def __init__(self, file: str | Path, field: str, problem: str):
        self.file = str(file)
        self.field = field
        self.problem = " ".join(str(problem).split())  # one line, always
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.problem}"


class ConfigError(CaseDataError):
    """A configuration value that cannot be used (file or env var, dotted key, problem)."""
