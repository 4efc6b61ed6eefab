"""The tool registry: name -> Tool class, instances created lazily and shared per device."""
from __future__ import annotations

import importlib

from core.case import Modality
from tools.base import Tool

# Modules that define tools; imported on first use so `tools list` stays fast and optional deps stay optional.
TOOL_MODULES = ["tools.mar", "tools.saint", "tools.ct_analysis", "tools.segmentation", "tools.cxr_analysis",
                "tools.wsi_analysis", "tools.fusecpath", "tools.ctclip", "tools.case_retrieval", "tools.xraysyn",
                "tools.prior_ct_views", "tools.report_generation"]
_CLASSES: dict[str, type[Tool]] = {}
_INSTANCES: dict[tuple[str, str], Tool] = {}


def register(cls: type[Tool]) -> type[Tool]:
    if cls.name in _CLASSES and _CLASSES[cls.name] is not cls:
        raise ValueError(f"two tools named {cls.name!r}")
    _CLASSES[cls.name] = cls
    return cls


def _import_all() -> None:
    for m in TOOL_MODULES:
        try:
            importlib.import_module(m)
        except ModuleNotFoundError as e:
            if e.name != m:  # the module exists but a dependency of it is missing: say so
                raise


def tool_classes() -> dict[str, type[Tool]]:
    _import_all()
    return dict(sorted(_CLASSES.items()))


def get_tool(name: str, device: str = "auto") -> Tool:
    classes = tool_classes()
    if name not in classes:
        raise KeyError(f"no tool {name!r}; registered: {sorted(classes)}")
    key = (name, device)
    if key not in _INSTANCES:
        _INSTANCES[key] = classes[name](device=device)
    return _INSTANCES[key]


def tools_for(modality: Modality) -> list[str]:
    return [n for n, c in tool_classes().items() if modality in c.modalities]
