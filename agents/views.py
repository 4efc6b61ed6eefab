"""The case's key images for a vision-language panel member (e.g. a MedReason-R1 checkpoint served by vLLM).

A backend configured with `vision = true` gets, next to the same case text as the others, the PNG views the
tools drew (the CT key slice with its outlines, the radiograph overlay, DRRs, the slide attention map, ...);
where a tool marked a region of interest, the zoomed region is embedded as an inset — MedReason-R1's global +
local input (core.imaging.roi_zoom). Each image is labelled with the evidence id of the tool result it came
from, so a rationale can cite what it saw. The images are our own renderings of pixel data that passed
de-identification (an image declaring burned-in annotation is refused at load), never the source files.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from agents.llm.base import Message
from core.imaging.roi_zoom import ZoomConfig, embed_roi


@dataclass(frozen=True)
class View:
    cite: str  # the tool result id a rationale cites
    artefact: str  # the artefact id the image came from
    description: str
    png: bytes
    zoomed: bool  # an ROI inset is embedded

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode()


def case_views(tool_results: list[dict], artefact_dir: str | Path | None, *, max_images: int = 4,
               max_side: int = 768, zoom: ZoomConfig = ZoomConfig()) -> list[View]:
    """Up to `max_images` PNG views from the successful tool results, those with a region of interest first
    (then in the order the tools ran). An image missing or unreadable on disk is passed over, and one whose ROI
    does not fit it is shown without the inset: the text still carries every finding, so a consultation never
    fails for a picture."""
    if artefact_dir is None:
        return []
    found = [(r["id"], a) for r in tool_results if r.get("status") == "ok"
             for a in r.get("artefacts", []) if a.get("kind") == "png"]
    found.sort(key=lambda ra: ra[1].get("roi") is None)  # stable: keeps the tools' order within each group
    views = []
    for cite, a in found:
        if len(views) >= max_images:
            break
        try:
            with Image.open(Path(artefact_dir) / a["path"]) as im:
                im = im.convert("RGB")
        except (OSError, SyntaxError):  # missing, truncated or not an image (PIL raises SyntaxError for some)
            continue
        roi = a.get("roi")
        try:
            im = embed_roi(im, roi, zoom) if roi is not None else im
        except ValueError:  # the box is not inside this image
            roi = None
        if max(im.size) > max_side:  # vision encoders tile large images into many tokens
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        views.append(View(cite, a["id"], a.get("description", ""), buf.getvalue(), roi is not None))
    return views


def with_views(messages: list[Message], views: list[View]) -> list[Message]:
    """The conversation with the views attached to its last user message, as OpenAI-style content parts
    (a label naming the evidence id, then the image), the message's own text last."""
    if not views:
        return messages
    i = max(k for k, m in enumerate(messages) if m["role"] == "user")
    parts: list[dict] = []
    for v in views:
        inset = " (region of interest outlined, magnified in the inset)" if v.zoomed else ""
        parts.append({"type": "text", "text": f"Image [{v.cite}]: {v.description}{inset}"})
        parts.append({"type": "image_url", "image_url": {"url": v.data_url()}})
    parts.append({"type": "text", "text": messages[i]["content"]})
    return [*messages[:i], {**messages[i], "content": parts}, *messages[i + 1:]]
