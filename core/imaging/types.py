"""Loaded studies: what a loader hands to tools. De-identified by construction.

Conventions fixed here, for every loader and every tool:
- `Volume.array` is float32 Hounsfield units indexed `[z, y, x]` in LPS patient space:
  x grows to the patient's Left, y to Posterior, z to Superior (DICOM's frame, axes reversed).
  Slice 0 is the most inferior. `spacing` is (z, y, x) in mm.
- `Radiograph.array` is float32 in [0, 1], brighter = more attenuation (bone white), indexed
  `[row, col]`; `spacing` is (row, col) in mm at the detector.
- `Slide` reads lazily; `read_region` returns uint8 RGB `[h, w, 3]`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    source: Path
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # (x, y, z) mm of voxel [0,0,0], LPS
    metadata: dict[str, Any] = field(default_factory=dict)  # acquisition facts only, no PHI

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


@dataclass
class Radiograph:
    array: np.ndarray
    spacing: tuple[float, float]
    source: Path
    view: str = "PA"  # PA | AP | LAT
    metadata: dict[str, Any] = field(default_factory=dict)


class Slide(Protocol):
    """A whole-slide image opened lazily. Level 0 is the highest resolution."""

    source: Path

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> list[tuple[int, int]]: ...  # (width, height) per level

    @property
    def level_downsamples(self) -> list[float]: ...

    @property
    def mpp(self) -> float | None: ...  # microns per pixel at level 0

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 [height, width, 3]; x, y in level-0 pixel coordinates (OpenSlide's rule)."""
        ...

    def thumbnail(self, max_size: int = 512) -> np.ndarray: ...

    def close(self) -> None: ...
