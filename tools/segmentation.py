"""3-D chest CT segmentation (MONAI UNet): organs and focal/pleural lesions, measured in mL / mm.

Model: `monai.networks.nets.UNet` (3-D, channels (8, 16, 32, 64), strides 2, one residual unit per
level), 2 input channels (lung window -1000..200 HU and soft-tissue window -150..250 HU, both
scaled to 0..1 with `ScaleIntensityRange`), 14 output classes (`CLASSES`). Trained by
`training/train_segmentation.py` on procedural chest phantoms (core/synth/chest.py) with noise,
blur and intensity augmentation; weights in checkpoints/segmentation.pt (+ .json metadata).

Pipeline (`segment`):
  preprocess   HU -> two windows (MONAI `ScaleIntensityRange`), `Resize` (trilinear) to the
               training spacing (4 mm isotropic by default) keeping the field of view;
  inference    `monai.inferers.sliding_window_inference` with the training ROI (48 x 64 x 64 at
               4 mm), Gaussian blending, any volume size (padded by MONAI where smaller);
  back         softmax probabilities resized (trilinear) to the input grid, then argmax (large
               inputs: argmax at the working grid, nearest-neighbour back, to bound memory);
  post         organs: largest connected component per class (`KeepLargestConnectedComponent`);
               lesions: components below a per-class minimum volume removed (scipy.ndimage).

Label map classes (index = value in the written NIfTI): see `CLASSES`. A lesion class overrides the
organ it sits in, so "lung_right" is the right lung without the effusion / consolidation / nodule
voxels inside its pleural envelope. Nodules, masses and cavitating lesions share the class
"lung_lesion"; each component is reported as lung_nodule (< `mass_mm` longest axial diameter) or
lung_mass.

Findings: organ volumes (`lung_volume_right`, `lung_volume_left`, `heart_volume`, `aorta_volume`,
`pulmonary_artery_volume`, mL), and for each lesion key (lung_nodule, lung_mass, consolidation,
pleural_effusion, pneumothorax, atelectasis) present/absent with the volume in mL (nodule/mass:
longest axial diameter in mm), location words from the largest component's centroid (side from the
lungs' midline; lobe for focal lesions, zone for the rest), and the component count in `detail`.

Known limits: trained on synthetic phantoms only (no real-CT labels), 4 mm working grid, so nodules
under ~6 mm are at the resolution limit; lobes are assigned by position (z fraction of the lung
height and depth, the rule of core/synth/chest.py), not by fissures.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "segmentation.pt"

CLASSES: tuple[str, ...] = (
    "background", "lung_right", "lung_left", "heart", "aorta", "pulmonary_artery", "trachea", "liver", "spine",
    "lung_lesion", "consolidation", "pleural_effusion", "pneumothorax", "atelectasis",
)
CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
# phantom organ label name (core/synth/chest.ORGAN_LABELS) -> class; organs not listed are background
ORGAN_TO_CLASS = {"lung_right": "lung_right", "lung_left": "lung_left", "heart": "heart", "aorta": "aorta",
                  "pulmonary_artery": "pulmonary_artery", "trachea": "trachea", "liver": "liver", "spine": "spine"}
# planted finding key -> lesion class; findings not listed keep the organ label underneath them
FINDING_TO_CLASS = {"lung_nodule": "lung_lesion", "lung_mass": "lung_lesion", "cavitation": "lung_lesion",
                    "consolidation": "consolidation", "pleural_effusion": "pleural_effusion",
                    "pneumothorax": "pneumothorax", "atelectasis": "atelectasis"}
ORGAN_CLASSES = tuple(CLASS_INDEX[c] for c in ("lung_right", "lung_left", "heart", "aorta", "pulmonary_artery",
                                                 "trachea", "liver", "spine"))
LESION_CLASSES = tuple(CLASS_INDEX[c] for c in ("lung_lesion", "consolidation", "pleural_effusion",
                                                  "pneumothorax", "atelectasis"))
ORGAN_VOLUME_LABELS = {"lung_right": "lung_volume_right", "lung_left": "lung_volume_left",
                       "heart": "heart_volume", "aorta": "aorta_volume",
                       "pulmonary_artery": "pulmonary_artery_volume"}

DEFAULT_CONFIG: dict[str, Any] = {
    "arch": "monai.networks.nets.UNet",
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
    "windows_hu": [[-1000.0, 200.0], [-150.0, 250.0]],
    "spacing_mm": [4.0, 4.0, 4.0],
    "roi": [48, 64, 64],
    "classes": list(CLASSES),
}
# above this many (voxels x classes) the probabilities are not resized to the input grid
MAX_PROB_ELEMENTS = 120_000_000


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def build_model(config: dict | None = None) -> torch.nn.Module:
    from monai.networks.nets import UNet

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    return UNet(spatial_dims=3, in_channels=len(cfg["windows_hu"]), out_channels=len(cfg["classes"]),
                channels=tuple(cfg["channels"]), strides=tuple(cfg["strides"]),
                num_res_units=int(cfg["num_res_units"]))


def read_metadata(path: Path = CHECKPOINT) -> dict:
    p = Path(path).with_suffix(".json")
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def load_model(path: Path = CHECKPOINT, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    ck = torch.load(path, map_location=device, weights_only=False)
    cfg = {**DEFAULT_CONFIG, **ck.get("config", {})}
    net = build_model(cfg)
    net.load_state_dict(ck["state_dict"])
    net.to(device).eval()
    return net, {**ck, "config": cfg}


# ---------------------------------------------------------------------------------------------
# labels from phantoms (training and evals)
# ---------------------------------------------------------------------------------------------

def target_from_phantom(organs: np.ndarray, lesions: np.ndarray, findings: list[dict]) -> np.ndarray:
    """The class map (uint8, CLASSES) of a phantom's organ and lesion label maps."""
    from core.synth.chest import ORGAN_LABELS

    out = np.zeros(organs.shape, np.uint8)
    for organ, cls in ORGAN_TO_CLASS.items():
        out[organs == ORGAN_LABELS[organ]] = CLASS_INDEX[cls]
    for f in findings:
        cls = FINDING_TO_CLASS.get(f.get("key", ""))
        if cls and f.get("mask_label"):
            out[lesions == f["mask_label"]] = CLASS_INDEX[cls]
    return out


def target_from_masks(organs: np.ndarray, lesions: np.ndarray, lesion_labels: dict[int, str]) -> np.ndarray:
    """As `target_from_phantom`, from a cohort case's mask files (lesion label -> finding key)."""
    return target_from_phantom(organs, lesions, [{"key": k, "mask_label": int(v)} for v, k in lesion_labels.items()])


# ---------------------------------------------------------------------------------------------
# preprocessing / inference / post-processing
# ---------------------------------------------------------------------------------------------

def working_shape(shape, spacing, target_spacing) -> tuple[int, int, int]:
    return tuple(max(8, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))  # type: ignore


def window_channels(hu: np.ndarray | torch.Tensor, windows) -> torch.Tensor:
    """(C, Z, Y, X) float32: one MONAI `ScaleIntensityRange` (clipped to 0..1) per HU window."""
    from monai.transforms import ScaleIntensityRange

    t = torch.as_tensor(np.asarray(hu, np.float32) if not isinstance(hu, torch.Tensor) else hu, dtype=torch.float32)
    chans = [ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(t[None]) for lo, hi in windows]
    return torch.cat([torch.as_tensor(c) for c in chans], 0)


def preprocess(hu: np.ndarray, spacing, config: dict) -> torch.Tensor:
    """(C, z, y, x) float32 at the training spacing (MONAI `Resize`, trilinear, same field of view)."""
    from monai.transforms import Resize

    x = window_channels(hu, config["windows_hu"])
    shape = working_shape(hu.shape, spacing, config["spacing_mm"])
    if tuple(shape) != tuple(hu.shape):
        x = torch.as_tensor(Resize(spatial_size=shape, mode="trilinear", align_corners=False, anti_aliasing=False)(x))
    return x.float()


@torch.no_grad()
def predict_probs(net: torch.nn.Module, x: torch.Tensor, roi, device: str = "cpu", overlap: float = 0.25,
                  sw_batch_size: int = 2) -> torch.Tensor:
    """Softmax probabilities (K, z, y, x) of a preprocessed (C, z, y, x) input, by sliding window."""
    from monai.inferers import sliding_window_inference

    inp = x[None].to(device)
    logits = sliding_window_inference(inp, roi_size=tuple(roi), sw_batch_size=sw_batch_size, predictor=net,
                                      overlap=overlap, mode="gaussian")
    return torch.softmax(torch.as_tensor(logits).float(), 1)[0].cpu()


def probs_to_labels(probs: torch.Tensor, out_shape) -> np.ndarray:
    """Argmax on `out_shape` (probabilities resized there when affordable, else nearest labels)."""
    import torch.nn.functional as F

    out_shape = tuple(int(s) for s in out_shape)
    if tuple(probs.shape[1:]) == out_shape:
        return probs.argmax(0).numpy().astype(np.uint8)
    if probs.shape[0] * math.prod(out_shape) <= MAX_PROB_ELEMENTS:
        up = F.interpolate(probs[None], size=out_shape, mode="trilinear", align_corners=False)[0]
        return up.argmax(0).numpy().astype(np.uint8)
    lab = probs.argmax(0)[None, None].float()
    return F.interpolate(lab, size=out_shape, mode="nearest")[0, 0].numpy().astype(np.uint8)


def postprocess(labels: np.ndarray, spacing, min_lesion_ml: dict[int, float] | None = None) -> np.ndarray:
    """Largest connected component per organ class (MONAI); lesion components under a minimum volume removed."""
    from monai.transforms import KeepLargestConnectedComponent

    lab = torch.as_tensor(labels[None].astype(np.int64))
    lab = KeepLargestConnectedComponent(applied_labels=list(ORGAN_CLASSES), is_onehot=False, independent=True)(lab)
    out = np.asarray(torch.as_tensor(lab)[0].numpy(), np.uint8)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    mins = min_lesion_ml or {}
    for c in LESION_CLASSES:
        m = out == c
        if not m.any():
            continue
        cc, n = ndi.label(m)
        sizes = np.bincount(cc.ravel(), minlength=n + 1) * voxel_ml
        small = sizes < mins.get(c, 0.0)
        small[0] = False
        out[small[cc]] = 0
    return out


def segment(net: torch.nn.Module, hu: np.ndarray, spacing, config: dict, device: str = "cpu",
            min_lesion_ml: dict[int, float] | None = None, overlap: float = 0.25) -> np.ndarray:
    """Class map (uint8, CLASSES) on the input grid of an HU volume [z, y, x] with spacing (z, y, x) mm."""
    import torch.nn.functional as F

    x = preprocess(np.asarray(hu, np.float32), spacing, config)
    probs = predict_probs(net, x, config["roi"], device=device, overlap=overlap)
    if probs.shape[0] * math.prod(hu.shape) <= MAX_PROB_ELEMENTS:
        return postprocess(probs_to_labels(probs, hu.shape), spacing, min_lesion_ml)
    # large input (e.g. 512 x 512 slices): post-process on the working grid, nearest-neighbour back
    w_spacing = tuple(n * s / m for n, s, m in zip(hu.shape, spacing, probs.shape[1:]))
    lab = postprocess(probs.argmax(0).numpy().astype(np.uint8), w_spacing, min_lesion_ml)
    up = F.interpolate(torch.as_tensor(lab)[None, None].float(), size=tuple(hu.shape), mode="nearest")
    return up[0, 0].numpy().astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def longest_axial_diameter(mask: np.ndarray, spacing) -> float:
    """Longest in-plane distance (mm) between voxel centres of a component, over its axial slices (+1 voxel)."""
    best = 0.0
    for z in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1)):
        sl = mask[z]
        edge = sl & ~ndi.binary_erosion(sl)
        pts = np.argwhere(edge).astype(np.float64) * np.array(spacing[1:])
        if len(pts) > 400:
            pts = pts[:: int(math.ceil(len(pts) / 400))]
        if len(pts):
            d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
            best = max(best, float(d) + float(np.mean(spacing[1:])))
    return best


class _Frame:
    """Side / lobe / zone words from voxel coordinates, using the segmented lungs as the frame."""

    def __init__(self, labels: np.ndarray, spacing):
        self.spacing = spacing
        lungs = (labels == CLASS_INDEX["lung_right"]) | (labels == CLASS_INDEX["lung_left"])
        for c in LESION_CLASSES:
            lungs |= labels == c  # lesions sit inside the lung envelope
        nz, ny, nx = labels.shape
        r = np.argwhere(labels == CLASS_INDEX["lung_right"])
        lft = np.argwhere(labels == CLASS_INDEX["lung_left"])
        if len(r) and len(lft):
            self.mid_x = (r[:, 2].mean() + lft[:, 2].mean()) / 2
        else:
            self.mid_x = (nx - 1) / 2
        if lungs.any():
            zz = np.flatnonzero(lungs.reshape(nz, -1).any(1))
            self.z_lo, self.z_hi = float(zz.min()), float(zz.max())
            yy = np.flatnonzero(lungs.any(axis=(0, 2)))
            self.y_mid = float(yy.min() + yy.max()) / 2
        else:
            self.z_lo, self.z_hi, self.y_mid = 0.0, float(nz - 1), (ny - 1) / 2

    def side(self, x: float) -> str:
        return "left" if x > self.mid_x else "right"  # x grows to the patient's left

    def z_frac(self, z: float) -> float:
        return (z - self.z_lo) / max(self.z_hi - self.z_lo, 1.0)

    def zone(self, z: float) -> str:
        f = self.z_frac(z)
        return "upper" if f > 0.6 else ("lower" if f < 0.33 else "middle")

    def lobe(self, side: str, z: float, y: float) -> str:
        f = self.z_frac(z)
        y_mm = (y - self.y_mid) * self.spacing[1]  # posterior positive
        if f > 0.55:
            return f"{side} upper lobe"
        if f < 0.35 or y_mm > 40:
            return f"{side} lower lobe"
        return "right middle lobe" if side == "right" else "lingula"


class SegParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mass_mm: float = Field(30.0, ge=10.0, le=100.0)  # focal lesion longest diameter: nodule < mass_mm <= mass
    # smaller components of a lesion class are dropped; set on held-out tuning phantoms (seed 3000, not the
    # eval's 7777): false components there were <= 0.8 mL focal, <= 7 mL consolidation, <= 11 mL fluid,
    # <= 15 mL free air, 11 mL atelectasis; true regions >= 1.9 mL focal, >= 84 mL consolidation, >= 190 mL
    # effusion, >= 500 mL pneumothorax, 13-26 mL atelectasis. 0.3 mL ~ an 8 mm sphere: smaller nodules are not reported
    min_focal_ml: float = Field(0.3, ge=0.0, le=50.0)
    min_consolidation_ml: float = Field(10.0, ge=0.0, le=500.0)
    min_effusion_ml: float = Field(15.0, ge=0.0, le=500.0)
    min_pneumothorax_ml: float = Field(30.0, ge=0.0, le=500.0)
    min_atelectasis_ml: float = Field(10.0, ge=0.0, le=500.0)
    overlap: float = Field(0.25, ge=0.0, lt=1.0)  # sliding-window overlap
    write_outputs: bool = True  # label-map NIfTI + overlay PNG when ctx.artefact_dir is set


def min_lesion_table(p: SegParams) -> dict[int, float]:
    return {CLASS_INDEX["lung_lesion"]: p.min_focal_ml, CLASS_INDEX["consolidation"]: p.min_consolidation_ml,
            CLASS_INDEX["pleural_effusion"]: p.min_effusion_ml, CLASS_INDEX["pneumothorax"]: p.min_pneumothorax_ml,
            CLASS_INDEX["atelectasis"]: p.min_atelectasis_ml}


def measure(labels: np.ndarray, spacing, mass_mm: float = 30.0) -> list[Finding]:
    """Organ volumes and per-lesion-key findings from a class map."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    frame = _Frame(labels, spacing)
    out: list[Finding] = []
    for cls, label in ORGAN_VOLUME_LABELS.items():
        n = int((labels == CLASS_INDEX[cls]).sum())
        out.append(Finding(label=label, present=n > 0, value=round(n * voxel_ml, 1), unit="mL",
                           location=cls.replace("_", " "), detail="segmented volume in the field of view"))

    def comps(cls: str):
        cc, n = ndi.label(labels == CLASS_INDEX[cls])
        if n == 0:
            return []
        sizes = np.bincount(cc.ravel())[1:]
        coms = ndi.center_of_mass(np.ones_like(cc), cc, range(1, n + 1))
        res = [dict(i=i + 1, ml=float(sizes[i] * voxel_ml), com=coms[i], cc=cc) for i in range(n)]
        return sorted(res, key=lambda d: -d["ml"])

    # focal lesions: nodules and masses by longest axial diameter
    focal = comps("lung_lesion")
    for d in focal:
        d["diam"] = longest_axial_diameter(d["cc"] == d["i"], spacing)
    for key, keep in (("lung_nodule", lambda d: d["diam"] < mass_mm), ("lung_mass", lambda d: d["diam"] >= mass_mm)):
        sel = sorted([d for d in focal if keep(d)], key=lambda d: -d["diam"])
        if not sel:
            out.append(Finding(label=key, present=False, detail="no component"))
            continue
        big = sel[0]
        z, y, x = big["com"]
        side = frame.side(x)
        sides = {frame.side(d["com"][2]) for d in sel}
        others = ", ".join(f"{d['diam']:.0f} mm {frame.lobe(frame.side(d['com'][2]), d['com'][0], d['com'][1])}"
                           for d in sel[1:6])
        out.append(Finding(label=key, present=True, value=round(big["diam"], 1), unit="mm",
                           location=frame.lobe(side, z, y),
                           detail=f"{len(sel)} component(s), {'bilateral' if len(sides) > 1 else side}; largest "
                                  f"{big['diam']:.0f} mm, {big['ml']:.2f} mL" + (f"; others: {others}" if others else "")))

    where = {"consolidation": lambda s, z: f"{s} {frame.zone(z)} zone",
             "pleural_effusion": lambda s, z: f"{s} pleural space",
             "pneumothorax": lambda s, z: f"{s} hemithorax",
             "atelectasis": lambda s, z: f"{s} {frame.zone(z)} zone"}
    for key, words in where.items():
        cs = comps(key)
        if not cs:
            out.append(Finding(label=key, present=False, detail="no component"))
            continue
        per_side: dict[str, float] = {}
        for d in cs:
            s = frame.side(d["com"][2])
            per_side[s] = per_side.get(s, 0.0) + d["ml"]
        total = sum(per_side.values())
        z, y, x = cs[0]["com"]
        side = frame.side(x)
        # a side holding >= 25% of the total counts: bilateral when both do
        sides = sorted(s for s, v in per_side.items() if v >= 0.25 * total)
        loc = words(side, z) if len(sides) < 2 else words("bilateral", z).replace("bilateral pleural space",
                                                                                 "bilateral pleural spaces")
        vols = ", ".join(f"{s} {v:.1f} mL" for s, v in sorted(per_side.items()))
        out.append(Finding(label=key, present=True, value=round(total, 1), unit="mL", location=loc,
                           detail=f"{len(cs)} component(s); {vols}"))
    return out


# ---------------------------------------------------------------------------------------------
# the tool
# ---------------------------------------------------------------------------------------------

@register
class CTSegmentation(Tool):
    name = "ct_segmentation"
    description = ("3-D chest CT segmentation (MONAI UNet): lungs, heart, great vessels and lesions "
                   "(nodule/mass, consolidation, pleural effusion, pneumothorax, atelectasis) with volumes "
                   "in mL, nodule diameters and locations; writes the label map.")
    modalities = frozenset({Modality.CT})
    Params = SegParams
    model_name = "MONAI 3-D UNet (8-16-32-64), 14 classes"
    version = str(read_metadata(CHECKPOINT).get("version", "untrained"))
    stage = "analyse"
    order = 10
    checkpoint: Path = CHECKPOINT

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        self.meta = read_metadata(self.checkpoint)
        self.version = str(self.meta.get("version", "untrained"))
        self.net: torch.nn.Module | None = None
        self.config: dict = dict(DEFAULT_CONFIG)

    def load(self) -> None:
        if not Path(self.checkpoint).exists():
            raise FileNotFoundError(f"segmentation checkpoint {self.checkpoint} not found: run "
                                    f"`python -m training.train_segmentation --out {self.checkpoint}`")
        self.net, ck = load_model(self.checkpoint, self.device)
        self.config = ck["config"]
        self.meta = {**read_metadata(self.checkpoint), **{k: v for k, v in ck.items() if k != "state_dict"}}
        self.version = str(self.meta.get("version", self.version))
        ch = "-".join(str(c) for c in self.config["channels"])
        self.model_name = f"MONAI 3-D UNet ({ch}), {len(self.config['classes'])} classes, " \
                          f"{self.config['spacing_mm'][0]:g} mm"

    def segment_volume(self, hu: np.ndarray, spacing, params: SegParams | None = None) -> np.ndarray:
        p = params or SegParams()
        assert self.net is not None, "load() first"
        return segment(self.net, hu, spacing, self.config, device=self.device,
                       min_lesion_ml=min_lesion_table(p), overlap=p.overlap)

    def analyse(self, study: Any, params: SegParams, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        from tools.ct_analysis import validated_volume

        hu, spacing, notes = validated_volume(study)
        labels = self.segment_volume(hu, spacing, params)
        findings = measure(labels, spacing, params.mass_mm)
        if notes:
            findings.append(Finding(label="image_quality", present=True, detail="; ".join(notes)))
        artefacts: list[Artefact] = []
        if params.write_outputs and ctx.artefact_dir is not None:
            artefacts = self._write(study, hu, labels, spacing, ctx)
        return findings, artefacts

    def _write(self, study: Any, hu: np.ndarray, labels: np.ndarray, spacing, ctx: RunContext) -> list[Artefact]:
        from PIL import Image

        from core.imaging.nifti import write_nifti
        from core.imaging.types import Volume

        out_dir = Path(ctx.artefact_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = ctx.study_id.replace("/", "_")
        rel_nii = f"{stem}_seg.nii.gz"
        write_nifti(Volume(array=labels.astype(np.uint8), spacing=tuple(spacing),
                           source=Path(getattr(study, "source", out_dir)),
                           origin=tuple(getattr(study, "origin", (0.0, 0.0, 0.0)))),
                    out_dir / rel_nii, dtype=np.uint8)
        lesion = np.isin(labels, LESION_CLASSES)
        if lesion.any():
            cc, n = ndi.label(lesion)
            big = int(np.argmax(np.bincount(cc.ravel())[1:])) + 1
            z = int(np.argmax((cc == big).reshape(cc.shape[0], -1).sum(1)))
            why = f"through the largest lesion ({CLASSES[int(np.bincount(labels[cc == big]).argmax())]})"
        else:
            lungs = np.isin(labels, (CLASS_INDEX["lung_right"], CLASS_INDEX["lung_left"]))
            z = int(np.argmax(lungs.reshape(lungs.shape[0], -1).sum(1))) if lungs.any() else labels.shape[0] // 2
            why = "with the largest lung area (no lesion segmented)"
        grey = (np.clip((hu[z] + 1000.0) / 1400.0, 0, 1) * 255).astype(np.float32)  # -1000..400 HU
        rgb = np.repeat(grey[..., None], 3, -1)
        for c, col in _COLOURS.items():
            m = labels[z] == c
            if m.any():
                a = 0.55 if c in LESION_CLASSES else 0.3
                rgb[m] = (1 - a) * rgb[m] + a * np.array(col, np.float32)
                edge = m & ~ndi.binary_erosion(m)
                rgb[edge] = col
        im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        if im.width < 512:
            s = max(1, 512 // im.width)
            im = im.resize((im.width * s, im.height * s), Image.NEAREST)
        rel_png = f"{stem}_seg_overlay.png"
        im.save(out_dir / rel_png)
        legend = ", ".join(f"{CLASSES[c]}={_NAMES[c]}" for c in _COLOURS if (labels[z] == c).any())
        return [Artefact(id=f"{self.name}:{ctx.study_id}:nifti", kind="nifti", path=rel_nii,
                         description="segmentation label map (uint8): " +
                                     ", ".join(f"{i}={c}" for i, c in enumerate(CLASSES) if i)),
                Artefact(id=f"{self.name}:{ctx.study_id}:overlay", kind="png", path=rel_png,
                         description=f"axial slice {z} {why}; window -1000..400 HU; {legend}")]


_COLOURS = {CLASS_INDEX["lung_right"]: (60, 120, 255), CLASS_INDEX["lung_left"]: (60, 200, 255),
            CLASS_INDEX["heart"]: (255, 80, 80), CLASS_INDEX["aorta"]: (255, 160, 0),
            CLASS_INDEX["pulmonary_artery"]: (170, 80, 255), CLASS_INDEX["lung_lesion"]: (255, 255, 0),
            CLASS_INDEX["consolidation"]: (0, 255, 0), CLASS_INDEX["pleural_effusion"]: (0, 255, 200),
            CLASS_INDEX["pneumothorax"]: (255, 0, 255), CLASS_INDEX["atelectasis"]: (255, 128, 200)}
_NAMES = {CLASS_INDEX["lung_right"]: "blue", CLASS_INDEX["lung_left"]: "light blue", CLASS_INDEX["heart"]: "red",
          CLASS_INDEX["aorta"]: "orange", CLASS_INDEX["pulmonary_artery"]: "purple",
          CLASS_INDEX["lung_lesion"]: "yellow", CLASS_INDEX["consolidation"]: "green",
          CLASS_INDEX["pleural_effusion"]: "cyan", CLASS_INDEX["pneumothorax"]: "magenta",
          CLASS_INDEX["atelectasis"]: "pink"}
