"""Chest radiograph analysis: classical lung-field measurements plus a small multi-label CNN.

Two parts, both on a frontal (PA/AP) radiograph as `core.imaging.types.Radiograph` describes it
([rows, cols] in [0, 1], brighter = denser, rows head -> feet, patient's left on the viewer's right):

(a) Classical measurements on a 256 x 256 working copy (padded to square, resampled):
    lung fields = dark basins enclosed by brighter tissue (grayscale hole filling gives seeds; a
    threshold between lung and soft-tissue levels grows them; the two largest components, the one
    on the viewer's left being the patient's right lung). From them: cardiothoracic ratio (widest
    heart shadow across the lower lung rows, measured from the mediastinal midline, over the widest
    lung-field span), right/left lung-field area asymmetry and mean-density asymmetry (over each
    field's convex hull, so a dense region inside a field counts). Normal ranges come from the
    checkpoint metadata (measured on normal validation radiographs); a value outside flags the
    measurement present, with the side it points to.
(b) CXRNet, a ~0.29 M parameter CNN trained from scratch on synthetic radiographs
    (training/train_cxr.py), input 128 x 128: P(present) for each radiograph-visible catalogue
    finding. Its head gives a coarse class map per finding; where the map's evidence lies (left or
    right of the midline, upper/middle/lower zone) gives the side and zone of a present finding.
    `present` = probability >= the per-finding threshold chosen on validation data.

Weights load lazily (`load`) from checkpoints/cxr_findings.pt onto the tool's device; the json next
to it carries version, finding order, thresholds and normal ranges.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "cxr_findings.pt"
INPUT_SIZE = 128  # CNN input (square)
WORK_SIZE = 256  # classical measurements
PIX_MEAN, PIX_STD = 0.45, 0.30  # fixed input normalisation (images are already exposure-normalised)
# Used when the checkpoint json has no normal ranges (e.g. before training): the usual clinical limit
# for the CTR, and loose limits for the asymmetries.
DEFAULT_NORMALS = {"cardiothoracic_ratio": {"upper": 0.5},
                   "lung_area_asymmetry": {"mean": 0.0, "sd": 0.08},
                   "lung_density_asymmetry": {"mean": 0.0, "sd": 0.02}}
LATERAL_FINDINGS = {"lung_nodule", "lung_mass", "consolidation", "pleural_effusion", "pneumothorax",
                    "atelectasis", "cavitation", "medical_material"}


# ------------------------------------------------------------------ input handling

def validated_array(study: Any) -> np.ndarray:
    """The radiograph's pixels as float32 [rows, cols] in [0, 1]; ValueError for anything unusable."""
    arr = getattr(study, "array", None)
    if arr is None:
        raise ValueError(f"expected a Radiograph (with .array), got {type(study).__name__}")
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"radiograph array must be 2-D [rows, cols], got shape {a.shape}")
    if min(a.shape) < 32:
        raise ValueError(f"radiograph too small for analysis: {a.shape}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"radiograph pixels must be numeric, got {a.dtype}")
    a = a.astype(np.float32)
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"radiograph has {bad} non-finite pixels (NaN/inf)")
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-6:
        raise ValueError("radiograph is blank (constant intensity)")
    if lo < -1e-3 or hi > 1 + 1e-3:  # off-contract intensities: stretch rather than clip away detail
        a = (a - lo) / (hi - lo)
    return np.clip(a, 0.0, 1.0)


def square_resize(a: np.ndarray, size: int) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Zero-pad to square (centred), resample to size x size (area when shrinking).

    Returns the image, the scale (input pixels per output pixel) and the (row, col) padding offsets."""
    r, c = a.shape
    n = max(r, c)
    pr, pc = (n - r) // 2, (n - c) // 2
    sq = np.zeros((n, n), np.float32)
    sq[pr:pr + r, pc:pc + c] = a
    if n == size:
        return sq, 1.0, (pr, pc)
    t = torch.from_numpy(sq)[None, None]
    mode = dict(mode="area") if n > size else dict(mode="bilinear", align_corners=False)
    out = F.interpolate(t, size=(size, size), **mode)[0, 0].numpy()
    return np.ascontiguousarray(out, np.float32), n / size, (pr, pc)


def model_input(a: np.ndarray) -> np.ndarray:
    """[0, 1] radiograph -> the CNN's 128 x 128 input (before normalisation)."""
    return square_resize(a, INPUT_SIZE)[0]


# ------------------------------------------------------------------ classical measurements

@dataclass
class LungFields:
    right: np.ndarray  # bool masks on the working image (patient's right = viewer's left)
    left: np.ndarray
    body: np.ndarray
    midline: float  # column of the mediastinal midline
    threshold: float
    ctr: float | None = None
    heart_width_px: float | None = None
    thorax_width_px: float | None = None
    heart_rows: tuple[int, int] | None = None  # rows of the widest right / left heart extents
    heart_cols: tuple[float, float] | None = None  # columns of those extents
    thorax_row: int | None = None
    thorax_cols: tuple[int, int] | None = None
    ctr_note: str | None = None  # why the CTR may be off (an opacified lung base hides a heart border)


def _grey_holes(a: np.ndarray) -> np.ndarray:
    """Depth of each enclosed dark basin (grayscale hole filling by reconstruction)."""
    from skimage.morphology import reconstruction

    p = np.pad(a, 2)
    seed = p.copy()
    seed[2:-2, 2:-2] = p.max()
    return (reconstruction(seed, p, method="erosion") - p)[2:-2, 2:-2]


def _otsu(v: np.ndarray) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(v)) if v.size and v.max() > v.min() else float(v.mean() if v.size else 0.0)


def lung_fields(img: np.ndarray) -> LungFields:
    """Segment the two lung fields of a square working image and measure the heart and thorax."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    g = ndi.gaussian_filter(img.astype(np.float64), 1.0)
    lab, n = ndi.label(g > 0.08)
    if n == 0:
        raise ValueError("no body outline found (image is dark)")
    sizes = np.bincount(lab.ravel())[1:]
    body = ndi.binary_fill_holes(lab == int(sizes.argmax()) + 1)
    if body.sum() < 0.05 * body.size:
        raise ValueError("no body outline found (bright region too small)")
    cols = np.nonzero(body.any(0))[0]
    w = int(cols[-1] - cols[0] + 1)
    centre = (cols[0] + cols[-1]) / 2
    empty = np.zeros_like(body)

    h = _grey_holes(g)
    hb = h[body]
    if hb.max() < 0.02:
        return LungFields(empty, empty.copy(), body, centre, float("nan"))
    seeds = (h > _otsu(hb)) & body
    lung_ref = float(np.median(g[seeds]))
    brighter = g[body & ~seeds & (g > lung_ref)]
    tissue = float(np.median(brighter)) if brighter.size else lung_ref + 0.3
    t = lung_ref + 0.6 * (tissue - lung_ref)

    # the lung fields sit inside the rib cage: drop the outer band of the body on every row (its
    # thin lateral edges are as dark as lung) and a thin rim all round
    core = ndi.binary_erosion(body, iterations=max(2, int(0.03 * w)))
    rows_any = body.any(1)
    first = np.where(rows_any, body.argmax(1), 0)
    last = np.where(rows_any, body.shape[1] - 1 - body[:, ::-1].argmax(1), 0)
    margin = int(round(0.08 * w))
    cc = np.arange(body.shape[1])[None, :]
    core &= (cc >= first[:, None] + margin) & (cc <= last[:, None] - margin)
    cand = ndi.binary_opening((g < t) & core, structure=disk(2))
    lung = ndi.binary_propagation(seeds & cand, mask=cand)
    lab, n = ndi.label(lung)
    if n == 0:
        return LungFields(empty, empty.copy(), body, centre, t)
    sizes = np.bincount(lab.ravel())[1:]
    order = [int(i) + 1 for i in np.argsort(sizes)[::-1] if sizes[i] >= 0.01 * body.sum()][:2]
    comps = [ndi.binary_fill_holes(lab == i) for i in order]
    if len(comps) == 1:  # one field: split at the body centre if it spans it, else the other is missing
        m = comps[0]
        if m[:, : int(centre)].sum() > 0.2 * m.sum() and m[:, int(centre):].sum() > 0.2 * m.sum():
            comps = [m & (cc < centre), m & (cc >= centre)]
        else:
            comps.append(empty.copy())
    ccol = [np.nonzero(m)[1].mean() if m.any() else centre for m in comps]
    if len(comps) == 2 and comps[1].any() and not comps[0].any():
        comps = comps[::-1]
    if not comps[1].any():  # one field found: its side is where it lies
        right, left = (comps[0], comps[1]) if ccol[0] < centre else (comps[1], comps[0])
    else:
        right, left = (comps[0], comps[1]) if ccol[0] < ccol[1] else (comps[1], comps[0])
    lf = LungFields(right, left, body, centre, t)
    _heart_and_thorax(lf)
    return lf


def _heart_and_thorax(lf: LungFields) -> None:
    R, L = lf.right, lf.left
    if not (R.any() and L.any()):
        return
    both = np.nonzero(R.any(1) & L.any(1))[0]
    if len(both) < 10:
        return
    W = R.shape[1]
    r_lat = R[both].argmax(1)
    r_med = W - 1 - R[both, ::-1].argmax(1)
    l_med = L[both].argmax(1)
    l_lat = W - 1 - L[both, ::-1].argmax(1)
    span = l_lat - r_lat
    i = int(span.argmax())
    lf.thorax_width_px = float(span[i] + 1)
    lf.thorax_row, lf.thorax_cols = int(both[i]), (int(r_lat[i]), int(l_lat[i]))
    top, bot = int(both[0]), int(both[-1])
    H = bot - top
    bot_r, bot_l = int(np.nonzero(R.any(1))[0][-1]), int(np.nonzero(L.any(1))[0][-1])
    if abs(bot_r - bot_l) > 0.12 * H:
        short = "right" if bot_r < bot_l else "left"
        lf.ctr_note = f"{short} lung base not aerated: a heart border may be hidden, the CTR is less reliable"
    upper = (both >= top + 0.1 * H) & (both <= top + 0.45 * H)
    mid = float(np.median((r_med[upper] + l_med[upper]) / 2)) if upper.any() else lf.midline
    lf.midline = mid
    wr, wl = r_med - r_lat + 1, l_lat - l_med + 1
    heart = (both >= top + 0.45 * H) & (both <= bot - 0.05 * H) & (wr >= 0.5 * wr.max()) & (wl >= 0.5 * wl.max())
    if heart.sum() < 3:
        return
    re = mid - r_med[heart]
    le = l_med[heart] - mid
    ir, il = int(re.argmax()), int(le.argmax())
    rows = both[heart]
    lf.heart_width_px = float(max(re[ir], 0) + max(le[il], 0))
    lf.heart_rows = (int(rows[ir]), int(rows[il]))
    lf.heart_cols = (float(r_med[heart][ir]), float(l_med[heart][il]))
    lf.ctr = lf.heart_width_px / lf.thorax_width_px


def _hull(m: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    return convex_hull_image(m) if m.sum() >= 3 else m


def measure(img: np.ndarray, px_mm: tuple[float, float] = (1.0, 1.0)) -> tuple[dict, LungFields]:
    """Classical measurements on a square working image; px_mm = (row, col) mm per working pixel."""
    lf = lung_fields(img)
    px_area_cm2 = px_mm[0] * px_mm[1] / 100.0
    ar, al = float(lf.right.sum()) * px_area_cm2, float(lf.left.sum()) * px_area_cm2
    out: dict[str, Any] = {
        "right_area_cm2": ar, "left_area_cm2": al,
        "lung_area_asymmetry": (ar - al) / (ar + al) if ar + al > 0 else None,
        "cardiothoracic_ratio": lf.ctr,
        "heart_width_mm": lf.heart_width_px * px_mm[1] if lf.heart_width_px is not None else None,
        "thorax_width_mm": lf.thorax_width_px * px_mm[1] if lf.thorax_width_px is not None else None,
        "right_density": None, "left_density": None, "lung_density_asymmetry": None,
        "lung_fraction": float((lf.right | lf.left).sum() / max(lf.body.sum(), 1)),
        "ctr_note": lf.ctr_note,
    }
    if lf.right.any() and lf.left.any():
        dr, dl = float(img[_hull(lf.right)].mean()), float(img[_hull(lf.left)].mean())
        out.update(right_density=dr, left_density=dl, lung_density_asymmetry=dr - dl)
    return out, lf


def classical_features(meas: dict) -> list[float]:
    """A fixed-length feature vector from `measure` output (missing values -> neutral)."""
    def v(k, d=0.0):
        x = meas.get(k)
        return float(x) if x is not None and math.isfinite(x) else d
    return [v("cardiothoracic_ratio", 0.5), v("lung_area_asymmetry"), v("lung_density_asymmetry"),
            v("right_density", 0.4), v("left_density", 0.4), v("lung_fraction", 0.3),
            v("right_area_cm2") / 100.0, v("left_area_cm2") / 100.0]


CLASSICAL_FEATURES = ("cardiothoracic_ratio", "lung_area_asymmetry", "lung_density_asymmetry", "right_density",
                      "left_density", "lung_fraction", "right_area_dm2", "left_area_dm2")


# ------------------------------------------------------------------ the CNN

def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CXRNet(nn.Module):
    """A strided stem (128 -> 32 px), three double-conv stages (-> 8 px), a 1x1 class-map head and
    log-sum-exp pooling.

    The class maps [B, K, 8, 8] localise the evidence per finding; LSE pooling (r) sits between
    average pooling (small r) and max pooling (large r), so small lesions still count."""

    def __init__(self, n_out: int, widths: tuple[int, ...] = (16, 32, 64, 128), lse_r: float = 5.0,
                 dropout: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = widths[0]
        for i, w in enumerate(widths[1:]):
            layers += _conv(c, w) + _conv(w, w)
            if i < len(widths) - 2:
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Conv2d(c, n_out, 1)
        self.lse_r = float(lse_r)

    def class_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(x)))

    def pool(self, maps: torch.Tensor) -> torch.Tensor:
        r = self.lse_r
        flat = maps.flatten(2)
        return (torch.logsumexp(r * flat, dim=-1) - math.log(flat.shape[-1])) / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.class_maps(x))


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - PIX_MEAN) / PIX_STD


def read_metadata(path: Path = CHECKPOINT) -> dict:
    j = Path(path).with_suffix(".json")
    try:
        return json.loads(j.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_model(path: Path = CHECKPOINT, device: str = "cpu") -> tuple[CXRNet, dict]:
    ck = torch.load(path, map_location=device, weights_only=True)
    cfg = ck["config"]
    net = CXRNet(len(ck["findings"]), widths=tuple(cfg["widths"]), lse_r=cfg["lse_r"], dropout=0.0)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    net.to(device).eval()
    return net, ck


# ------------------------------------------------------------------ the tool

class CXRParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overlay: bool = True  # write the PNG overlay when the run has an artefact folder


def _zone(row_frac: float) -> str:
    return "upper" if row_frac < 1 / 3 else "middle" if row_frac < 2 / 3 else "lower"


@register
class CXRAnalysis(Tool):
    name = "cxr_analysis"
    # short words: `grandrounds tools list` squeezes its table columns to the terminal's width
    description = ("Chest X-ray (PA/AP): lung fields, heart size ratio, side-to-side area and density; "
                   "a CNN gives P(present) with side for the X-ray findings.")
    modalities = frozenset({Modality.XR})
    Params = CXRParams
    model_name = "CXR CNN + lung-field measures"
    version = str(read_metadata(CHECKPOINT).get("version", "untrained"))  # class-level too: `tools list` reads it
    checkpoint: Path = CHECKPOINT

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        self.meta = read_metadata(self.checkpoint)
        self.version = str(self.meta.get("version", "untrained"))
        self.net: CXRNet | None = None
        self.findings_order: list[str] = []
        self.thresholds: dict[str, float] = {}

    def load(self) -> None:
        if not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"CXR checkpoint {self.checkpoint} not found: run "
                                    f"`python -m training.train_cxr --out {self.checkpoint}`")
        self.net, ck = load_model(self.checkpoint, self.device)
        self.findings_order = list(ck["findings"])
        meta = read_metadata(self.checkpoint) or {}
        self.meta = {**meta, **{k: v for k, v in ck.items() if k not in ("state_dict",)}}
        self.version = str(self.meta.get("version", self.version))
        th = self.meta.get("thresholds") or {}
        self.thresholds = {k: float(th.get(k, 0.5)) for k in self.findings_order}

    # the CNN part, reusable by evals: [N, 128, 128] inputs -> probabilities [N, K], class maps [N, K, 8, 8]
    @torch.no_grad()
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.net is not None
        t = normalise(torch.as_tensor(np.asarray(x, np.float32), device=self.device)[:, None])
        maps = self.net.class_maps(t)
        probs = torch.sigmoid(self.net.pool(maps))
        return probs.float().cpu().numpy(), maps.float().cpu().numpy()

    def analyse(self, study: Any, params: CXRParams, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        view = str(getattr(study, "view", "PA") or "PA").upper()
        if view == "LAT":
            raise ValueError("lateral radiograph: this tool reads frontal (PA/AP) views only")
        a = validated_array(study)
        sp = getattr(study, "spacing", None) or (1.0, 1.0)
        work, scale, _ = square_resize(a, WORK_SIZE)
        px_mm = (float(sp[0]) * scale, float(sp[1]) * scale)
        meas, lf = measure(work, px_mm)
        probs, maps = self.predict(model_input(a)[None])
        findings = self._model_findings(probs[0], maps[0], lf, view)
        findings += self._measurement_findings(meas, view)
        artefacts = []
        if params.overlay and ctx.artefact_dir is not None:
            artefacts.append(self._overlay(work, lf, probs[0], ctx))
        return findings, artefacts

    def summarise(self, findings: list[Finding]) -> str:
        model = [f for f in findings if f.probability is not None]
        meas = [f for f in findings if f.probability is None]
        pos = [f"{f.label.replace('_', ' ')} (p={f.probability:.2f}{', ' + f.location if f.location else ''})"
               for f in sorted(model, key=lambda f: -f.probability) if f.present]
        neg = [f"{f.label.replace('_', ' ')} (p={f.probability:.2f})" for f in model if not f.present]
        parts = [("CNN positive: " + "; ".join(pos)) if pos else "CNN: no finding above its threshold"]
        m = []
        for f in meas:
            if f.value is None:
                m.append(f"{f.label.replace('_', ' ')} not measurable")
                continue
            s = f"{f.label.replace('_', ' ')} {f.value:.3g}"
            if f.label == "cardiothoracic_ratio":
                s += " (enlarged)" if f.present else " (normal)"
            elif f.present and f.location:
                s += f" ({f.location})"
            m.append(s)
        if m:
            parts.append("Measurements: " + "; ".join(m))
        if neg:
            parts.append("Below threshold: " + "; ".join(neg))
        return ". ".join(parts) + "."

    def _side_zone(self, cmap: np.ndarray, lf: LungFields, one_sided: float = 0.6) -> tuple[str, str]:
        """Where a class map's evidence lies: patient side (by the midline; `one_sided` = the share of
        the evidence a side needs) and lung zone."""
        r = self.net.lse_r if self.net is not None else 5.0
        w = np.exp(r * (cmap - cmap.max()))
        w = torch.from_numpy(w.astype(np.float32))[None, None]
        w = F.interpolate(w, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
        w /= w.sum() + 1e-12
        cols = np.arange(WORK_SIZE)
        right_mass = float(w[:, cols < lf.midline].sum())  # viewer's left = patient's right
        side = "right" if right_mass > one_sided else "left" if right_mass < 1 - one_sided else "bilateral"
        lungs = lf.right | lf.left
        rows = np.nonzero(lungs.any(1))[0]
        top, bot = (rows[0], rows[-1]) if len(rows) else (0, WORK_SIZE - 1)
        peak = float((w.sum(1) * np.arange(WORK_SIZE)).sum())
        frac = (peak - top) / max(bot - top, 1)
        return side, _zone(min(max(frac, 0.0), 1.0))

    def _model_findings(self, probs: np.ndarray, maps: np.ndarray, lf: LungFields, view: str) -> list[Finding]:
        out = []
        for i, key in enumerate(self.findings_order):
            p = float(np.clip(probs[i], 0.0, 1.0))
            thr = self.thresholds.get(key, 0.5)
            present = p >= thr
            loc = None
            if present:
                # diffuse findings are called one-sided only on strong evidence
                side, zone = self._side_zone(maps[i], lf, 0.6 if key in LATERAL_FINDINGS else 0.8)
                if key == "cardiomegaly":
                    loc = "heart"
                elif key == "emphysema":
                    loc = "both lungs" if side == "bilateral" else f"{side} lung predominantly"
                elif key == "pleural_effusion":
                    loc = "both pleural spaces" if side == "bilateral" else f"{side} pleural space"
                elif key == "pneumothorax":
                    loc = "both hemithoraces" if side == "bilateral" else f"{side} hemithorax"
                elif key == "medical_material":
                    loc = f"projected over the {'central' if side == 'bilateral' else side} chest, {zone} zone"
                else:
                    loc = f"{'both lungs' if side == 'bilateral' else side + ' lung'}, {zone} zone"
            detail = f"CNN P(present) vs threshold {thr:.2f} chosen on validation data"
            if key == "cardiomegaly" and view == "AP":
                detail += "; AP view magnifies the heart"
            out.append(Finding(label=key, present=present, probability=round(p, 4), location=loc, detail=detail))
        return out

    def _measurement_findings(self, meas: dict, view: str) -> list[Finding]:
        normals = {**DEFAULT_NORMALS, **(self.meta.get("normals") or {})}
        out = []
        ctr = meas.get("cardiothoracic_ratio")
        if ctr is not None:
            upper = float(normals["cardiothoracic_ratio"]["upper"])
            det = (f"heart {meas['heart_width_mm']:.0f} mm / thorax {meas['thorax_width_mm']:.0f} mm; "
                   f"upper normal {upper:.2f}")
            if view == "AP":
                det += " (AP view: overestimates)"
            if meas.get("ctr_note"):
                det += "; " + meas["ctr_note"]
            out.append(Finding(label="cardiothoracic_ratio", present=ctr > upper, value=round(ctr, 3),
                               location="heart", detail=det))
        else:
            out.append(Finding(label="cardiothoracic_ratio", present=False, value=None,
                               detail="not measurable: both lung fields were not segmented"))
        asym = meas.get("lung_area_asymmetry")
        if asym is not None:
            nrm = normals["lung_area_asymmetry"]
            z = (asym - float(nrm["mean"])) / max(float(nrm["sd"]), 1e-6)
            smaller = "right" if z < 0 else "left"
            out.append(Finding(label="lung_area_asymmetry", present=abs(z) > 2.5, value=round(asym, 3),
                               location=f"{smaller} lung field smaller" if abs(z) > 2.5 else None,
                               detail=(f"(right - left) / (right + left) lung-field area; right "
                                       f"{meas['right_area_cm2']:.0f} cm2, left {meas['left_area_cm2']:.0f} cm2; "
                                       f"z = {z:+.1f} against normal radiographs")))
        dens = meas.get("lung_density_asymmetry")
        if dens is not None:
            nrm = normals["lung_density_asymmetry"]
            z = (dens - float(nrm["mean"])) / max(float(nrm["sd"]), 1e-6)
            denser = "right" if z > 0 else "left"
            out.append(Finding(label="lung_density_asymmetry", present=abs(z) > 2.5, value=round(dens, 4),
                               location=f"{denser} lung field denser" if abs(z) > 2.5 else None,
                               detail=(f"mean right - left lung-field intensity (0-1 scale); right "
                                       f"{meas['right_density']:.3f}, left {meas['left_density']:.3f}; "
                                       f"z = {z:+.1f} against normal radiographs")))
        return out

    def _overlay(self, work: np.ndarray, lf: LungFields, probs: np.ndarray, ctx: RunContext) -> Artefact:
        from PIL import Image, ImageDraw
        from skimage.segmentation import find_boundaries

        up = 2  # draw at 512 px so lines and text are legible
        rgb = np.repeat((work * 255).astype(np.uint8)[..., None], 3, -1)
        for m, colour in ((lf.right, (0, 220, 90)), (lf.left, (0, 170, 255))):
            if m.any():
                rgb[find_boundaries(m, mode="inner")] = colour
        im = Image.fromarray(rgb).resize((WORK_SIZE * up, WORK_SIZE * up), Image.NEAREST)
        d = ImageDraw.Draw(im)
        if lf.thorax_cols is not None:
            y = lf.thorax_row * up
            d.line([(lf.thorax_cols[0] * up, y), (lf.thorax_cols[1] * up, y)], fill=(255, 200, 0), width=2)
        if lf.heart_cols is not None:
            d.line([(lf.midline * up, 10), (lf.midline * up, WORK_SIZE * up - 10)], fill=(200, 200, 200), width=1)
            for row, col in zip(lf.heart_rows, lf.heart_cols):
                d.line([(lf.midline * up, row * up), (col * up, row * up)], fill=(255, 60, 60), width=2)
        text = [f"CTR {lf.ctr:.2f}" if lf.ctr is not None else "CTR n/a"]
        text += [f"{k}: {p:.2f}" for k, p in zip(self.findings_order, probs) if p >= self.thresholds.get(k, 0.5)]
        d.text((6, 6), "\n".join(text), fill=(255, 255, 0))
        d.text((6, WORK_SIZE * up - 16), "R", fill=(255, 255, 255))
        out_dir = Path(ctx.artefact_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        rel = f"{ctx.study_id}_cxr_overlay.png"
        im.save(out_dir / rel)
        return Artefact(id=f"{self.name}:{ctx.study_id}:overlay", kind="png", path=rel,
                        description="lung-field outlines (green right, blue left), heart extents (red) from the "
                                    "midline, widest thorax (yellow); CTR and positive findings")
