"""MedReason-R1's zoom-in input (arXiv 2510.19626): the global image with the zoomed disease region embedded.

One image carries both scales, so a VLM with a single image slot sees the whole study and the lesion
at full resolution. The region is outlined on the global image and magnified into an inset in a
corner away from it (or the corner asked for), with a border so the two cannot be confused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Corner = Literal["auto", "top-left", "top-right", "bottom-left", "bottom-right"]


@dataclass(frozen=True)
class ZoomConfig:
    inset_fraction: float = 0.4  # inset side / image side
    margin: float = 0.25  # context kept around the box, as a fraction of its size on each side
    min_box_px: int = 12  # tiny boxes are grown to this before the margin
    corner: Corner = "auto"  # auto: the corner farthest from the box
    outline: tuple[int, int, int] = (255, 210, 0)
    border_px: int = 2


def _corner_for(box, w: int, h: int, corner: Corner) -> str:
    if corner != "auto":
        return corner
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return ("top" if cy > h / 2 else "bottom") + "-" + ("left" if cx > w / 2 else "right")


def crop_box(box, w: int, h: int, cfg: ZoomConfig) -> tuple[int, int, int, int]:
    """The box grown by the margin (and to a square, so the inset is not distorted), clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(x1 - x0, y1 - y0, cfg.min_box_px) * (1 + 2 * cfg.margin)
    side = min(side, w, h)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), w - side)))
    top = int(round(min(max(cy - side / 2, 0), h - side)))
    return left, top, left + int(round(side)), top + int(round(side))


def embed_roi(image: Image.Image | np.ndarray, box, cfg: ZoomConfig = ZoomConfig()) -> Image.Image:
    """RGB image: `image` with `box` ([x0, y0, x1, y1] in pixels) outlined and its zoomed crop inset."""
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    im = im.convert("RGB")
    w, h = im.size
    if not (0 <= float(box[0]) < float(box[2]) <= w and 0 <= float(box[1]) < float(box[3]) <= h):
        raise ValueError(f"ROI box {list(box)[:4]} is not inside the {w}x{h} image")
    crop = crop_box(box, w, h, cfg)
    side = max(8, int(round(cfg.inset_fraction * min(w, h))))
    inset = im.crop(crop).resize((side, side), Image.Resampling.LANCZOS)
    out = im.copy()
    d = ImageDraw.Draw(out)
    d.rectangle([crop[0], crop[1], crop[2] - 1, crop[3] - 1], outline=cfg.outline, width=1)
    where = _corner_for(box, w, h, cfg.corner)
    b = cfg.border_px
    x = b if where.endswith("left") else w - side - b
    y = b if where.startswith("top") else h - side - b
    d.rectangle([x - b, y - b, x + side + b - 1, y + side + b - 1], fill=cfg.outline)
    out.paste(inset, (x, y))
    return out
