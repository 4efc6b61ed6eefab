"""XraySyn-style uses of the differentiable DRR (arXiv 2012.02407): radiographs synthesised from a CT.

- `pose_sweep`: novel views of one CT at rotations about the patient's long axis (PA, obliques,
  lateral) on one detector, so views share a scale.
- `suppress_bone` / `bone_suppression`: a DRR with voxels above a HU threshold replaced by soft
  tissue, next to the full DRR (what a bone-suppressed radiograph should look like).
- `register_pose`: 2D/3D pose registration: recover the rigid pose of the CT from a radiograph by Adam on
  1 - NCC of DRR line integrals, coarse to fine (binned detector and pooled volume first).
- `XraySyn` (tool "xraysyn", CT): PA, left lateral and bone-suppressed PA radiographs as PNGs,
  rendered with the two-material polychromatic model; findings describe the rendering only.

Images here are line integrals P = -ln(I/I0) (brighter = more attenuation); `exposure_curve` turns
them into display images. Geometry: `core.physics.drr` (fixed camera, the volume moves).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from core.case import Modality
from core.physics.drr import VIEW_ROTATIONS, drr, euler_to_matrix, exposure_curve, transmission, view_geometry
from core.physics.materials import DEFAULT_SPECTRUM
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

SOURCE_TO_DET_MM = 1800.0  # chest radiography's 180 cm


def ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation over the last two dims (batched), in [-1, 1]."""
    a = a - a.mean((-2, -1), keepdim=True)
    b = b - b.mean((-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1))).clamp_min(1e-12)


class Geometry(BaseModel):
    """A fixed camera for `drr` (keyword names as there)."""

    model_config = ConfigDict(extra="forbid")
    source_to_det_mm: float
    source_to_iso_mm: float
    det_shape: tuple[int, int]
    det_spacing_mm: float

    def binned(self, f: int) -> "Geometry":
        """The same detector with f x f pixels binned (pixel centres stay consistent)."""
        return self.model_copy(update=dict(det_shape=(self.det_shape[0] // f, self.det_shape[1] // f),
                                           det_spacing_mm=self.det_spacing_mm * f))


def sweep_geometry(shape: tuple[int, int, int], spacing, det_px: int,
                   source_to_det_mm: float = SOURCE_TO_DET_MM) -> Geometry:
    """Square detector just beyond the volume's bounding sphere, sized so the sphere's shadow fills
    it: every rotation about the isocentre fits, at one magnification."""
    r = 0.5 * math.sqrt(sum((n * float(s)) ** 2 for n, s in zip(shape, spacing)))
    sid = source_to_det_mm - (r + 10.0)
    return Geometry(source_to_det_mm=source_to_det_mm, source_to_iso_mm=sid, det_shape=(det_px, det_px),
                    det_spacing_mm=2 * r * source_to_det_mm / (sid - r) / det_px)


def pool_to(volume: torch.Tensor, spacing, voxel_mm: float, air: float = 0.0,
            ) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Area-downsample (Z, Y, X) so voxels are about `voxel_mm`: finer sampling than the detector
    resolves is wasted work. `air`: the value of air (0 for attenuation, -1000 for HU)."""
    f = [max(1, int(voxel_mm / float(s))) for s in spacing]
    sp = tuple(float(s) * k for s, k in zip(spacing, f))
    if all(k == 1 for k in f):
        return volume, sp  # type: ignore[return-value]
    # pad with air (adds nothing to a line integral) to whole windows, split evenly so the box's
    # centre, the isocentre, stays put (ceil_mode would grow the box at one end and shift it)
    pad = [(-n) % k for n, k in zip(volume.shape[-3:], f)]
    v = F.pad(volume[None, None], [p for q in reversed(pad) for p in (q // 2, q - q // 2)], value=air)
    pooled = F.avg_pool3d(v, kernel_size=f, stride=f)[0, 0]
    return pooled, sp  # type: ignore[return-value]


def line_integrals(hu: torch.Tensor, spacing, geometry: Geometry, rotation, *, polychromatic: bool = True,
                   translation=(0.0, 0.0, 0.0)) -> torch.Tensor:
    """P = -ln(I/I0) of a HU volume at one or a batch of poses."""
    spectrum = DEFAULT_SPECTRUM if polychromatic else None
    I = transmission(hu, spacing, spectrum=spectrum, rotation=rotation, translation=translation,
                     **geometry.model_dump())
    return -torch.log(I.clamp_min(1e-30))


def pose_sweep(hu: torch.Tensor, spacing, angles_deg=(0.0, 45.0, 90.0), *, det_px: int = 192,
               polychromatic: bool = True) -> dict[float, torch.Tensor]:
    """Novel views: angle 0 = PA, 90 = left lateral (the source turns about the patient's long axis
    from behind the patient towards the patient's right), in between obliques; one batched render."""
    geo = sweep_geometry(tuple(hu.shape), spacing, det_px)
    rot = torch.tensor([[0.0, 0.0, -math.radians(a)] for a in angles_deg], dtype=hu.dtype, device=hu.device)
    with torch.no_grad():
        P = line_integrals(hu, spacing, geo, rot, polychromatic=polychromatic).reshape(len(rot), *geo.det_shape)
    return {float(a): P[i] for i, a in enumerate(angles_deg)}


def suppress_bone(hu: torch.Tensor, threshold_hu: float = 300.0, soft_tissue_hu: float = 40.0) -> torch.Tensor:
    """Voxels above `threshold_hu` become soft tissue: bone (and anything as dense) disappears
    while the body outline and the soft-tissue path length are kept."""
    return torch.where(hu > threshold_hu, torch.full_like(hu, soft_tissue_hu), hu)


def bone_suppression(hu: torch.Tensor, spacing, geometry: Geometry, rotation=(0.0, 0.0, 0.0), *,
                     threshold_hu: float = 300.0, polychromatic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, bone-suppressed) line-integral images at one pose."""
    with torch.no_grad():
        full = line_integrals(hu, spacing, geometry, rotation, polychromatic=polychromatic)
        free = line_integrals(suppress_bone(hu, threshold_hu), spacing, geometry, rotation,
                              polychromatic=polychromatic)
    return full, free


# ----------------------------------------------------------------------------- 2D/3D registration

class PoseEstimate(BaseModel):
    rotation: tuple[float, float, float]  # radians (rx, ry, rz), `euler_to_matrix` convention
    translation: tuple[float, float, float]  # mm
    ncc: float  # at the finest level
    steps: int
    seconds: float


def pose_error(rot_a, t_a, rot_b, t_b) -> tuple[float, float]:
    """(geodesic rotation error in degrees, translation error in mm) between two poses."""
    Ra, Rb = (euler_to_matrix(torch.as_tensor(r, dtype=torch.float64)) for r in (rot_a, rot_b))
    cos = ((Ra.T @ Rb).trace() - 1) / 2
    deg = math.degrees(math.acos(float(cos.clamp(-1.0, 1.0))))
    return deg, float(np.linalg.norm(np.subtract(t_a, t_b)))


def _descend(rot: torch.Tensor, trans: torch.Tensor, target: torch.Tensor, mu: torch.Tensor, spacing,
             geometry: Geometry, f: int, n: int, lr_rotation: float, lr_translation: float, response=None) -> float:
    """n Adam steps on 1 - NCC at binning f (in place on rot, trans); the last NCC."""
    geo = geometry.binned(f)
    tgt = F.avg_pool2d(target[None, None], f)[0, 0] if f > 1 else target
    vol, sp = pool_to(mu, spacing, f * min(float(s) for s in spacing))
    opt = torch.optim.Adam([{"params": [rot], "lr": lr_rotation}, {"params": [trans], "lr": lr_translation}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n)
    loss = torch.tensor(float("nan"))
    for _ in range(n):
        opt.zero_grad()
        L = drr(vol, sp, rotation=rot, translation=trans, **geo.model_dump())
        loss = 1 - ncc(response(L) if response is not None else L, tgt)
        loss.backward()
        opt.step()
        sched.step()
    return 1 - float(loss.detach())


def register_pose(target: torch.Tensor, mu: torch.Tensor, spacing, geometry: Geometry, *,
                  init_rotation=(0.0, 0.0, 0.0), init_translation=(0.0, 0.0, 0.0),
                  levels: tuple[tuple[int, int], ...] = ((4, 60), (2, 60), (1, 30)),
                  lr_rotation: float = 0.02, lr_translation: float = 2.0, restart_deg: float = 0.0,
                  response=None) -> PoseEstimate:
    """Pose of `mu` (1/mm, (Z, Y, X)) whose DRR (line integrals at `geometry`) matches `target`.

    levels: (binning factor, Adam steps), coarse to fine; at binning f the detector has f x f
    pixels binned and the volume is pooled f-fold (the finest level uses `mu` as given).
    Learning rates fall by half per level and cosine-anneal within one. restart_deg > 0: the
    coarsest level also starts from the initial rotation turned +-restart_deg about each axis
    (7 starts) and the best NCC goes on: NCC has local optima a few degrees out. response: a
    differentiable map of the DRR's line integrals before NCC (e.g. the water beam-hardening curve, so a
    monochromatic DRR matches a real, polychromatic film; NCC alone is blind only to affine maps)."""
    t0 = time.perf_counter()
    base = torch.tensor(init_rotation, dtype=mu.dtype, device=mu.device)
    offsets = [torch.zeros(3)]
    if restart_deg > 0:
        offsets += [s * math.radians(restart_deg) * torch.eye(3)[k] for k in range(3) for s in (1.0, -1.0)]
    best = None
    f0, n0 = levels[0]
    for off in offsets:
        rot = (base + off.to(base)).clone().requires_grad_(True)
        trans = torch.tensor(init_translation, dtype=mu.dtype, device=mu.device, requires_grad=True)
        score = _descend(rot, trans, target, mu, spacing, geometry, f0, n0, lr_rotation, lr_translation, response)
        if best is None or score > best[0]:
            best = (score, rot, trans)
    score, rot, trans = best  # type: ignore[misc]
    steps = n0 * len(offsets)
    for i, (f, n) in enumerate(levels[1:], start=1):
        score = _descend(rot, trans, target, mu, spacing, geometry, f, n, lr_rotation / 2 ** i,
                         lr_translation / 2 ** i, response)
        steps += n
    return PoseEstimate(rotation=tuple(rot.detach().tolist()), translation=tuple(trans.detach().tolist()),
                        ncc=score, steps=steps, seconds=time.perf_counter() - t0)


class RegistrationTrials(BaseModel):
    n: int
    success_rate: float  # rotation error < success_deg and translation error < success_mm
    rotation_error_deg: list[float]
    translation_error_mm: list[float]
    initial_rotation_error_deg: list[float]
    initial_translation_error_mm: list[float]
    seconds_per_trial: float


def registration_trials(mu: torch.Tensor, spacing, geometry: Geometry, *, n: int = 10, max_deg: float = 10.0,
                        max_mm: float = 20.0, seed: int = 0, success_deg: float = 1.0, success_mm: float = 2.0,
                        **kwargs: Any) -> RegistrationTrials:
    """Random perturbations (uniform in +-max_deg per axis, +-max_mm per axis) of the identity pose:
    render the target there, register from the identity, score the recovered pose."""
    g = torch.Generator().manual_seed(seed)
    errs, init_errs, t0 = [], [], time.perf_counter()
    for _ in range(n):
        r_true = ((torch.rand(3, generator=g) * 2 - 1) * math.radians(max_deg)).to(mu)
        t_true = ((torch.rand(3, generator=g) * 2 - 1) * max_mm).to(mu)
        with torch.no_grad():
            target = drr(mu, spacing, rotation=r_true, translation=t_true, **geometry.model_dump())
        est = register_pose(target, mu, spacing, geometry, **kwargs)
        errs.append(pose_error(est.rotation, est.translation, r_true.tolist(), t_true.tolist()))
        init_errs.append(pose_error((0, 0, 0), (0, 0, 0), r_true.tolist(), t_true.tolist()))
    ok = [r < success_deg and t < success_mm for r, t in errs]
    return RegistrationTrials(n=n, success_rate=sum(ok) / max(n, 1),
                              rotation_error_deg=[e[0] for e in errs], translation_error_mm=[e[1] for e in errs],
                              initial_rotation_error_deg=[e[0] for e in init_errs],
                              initial_translation_error_mm=[e[1] for e in init_errs],
                              seconds_per_trial=(time.perf_counter() - t0) / max(n, 1))


# ----------------------------------------------------------------------------- the tool

class XraySynParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    detector_px: int = Field(192, ge=64, le=1024)  # square detector; ~1 s per view at 192 on one CPU core
    polychromatic: bool = True  # two-material 120 kVp model; False: Beer-Lambert at the effective energy
    bone_threshold_hu: float = Field(300.0, ge=150.0, le=2000.0)


def _png(img: np.ndarray, path: Path, label: str, marker: str) -> None:
    im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
    d = ImageDraw.Draw(im)
    d.text((4, 4), label, fill=(255, 255, 0))
    d.text((4, im.size[1] - 14), marker, fill=(255, 255, 255))
    im.save(path)


@register
class XraySyn(Tool):
    name = "xraysyn"
    description = ("Synthesises radiographs from a CT (differentiable DRR, water/bone polychromatic model): PA, left "
                   "lateral and bone-suppressed PA views for comparison with plain films. Renders; does not diagnose.")
    modalities = frozenset({Modality.CT})
    Params = XraySynParams
    model_name = "DRR: trilinear cone beam, 120 kVp water/bone"
    version = "1"

    @classmethod
    def relevance(cls, study: dict, complaint: str) -> str | None:
        desc = str(study.get("description") or "").lower()
        if any(w in desc for w in ("chest", "thora", "lung", "pulmon")):
            return "chest CT: radiograph views of it, to compare with plain films"
        return None

    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        from tools.ct_analysis import validated_volume  # its loader checks (intercept, non-finite voxels)

        p: XraySynParams = params  # type: ignore[assignment]
        a, spacing, _ = validated_volume(study)
        hu = torch.as_tensor(a, device=self.device)
        n = (p.detector_px, p.detector_px)
        hu, sp = pool_to(hu, spacing, max(s * k for s, k in zip(spacing, hu.shape)) / p.detector_px, air=-1000.0)
        geo = {v: Geometry(**view_geometry(tuple(hu.shape), sp, v, n)) for v in ("PA", "LAT")}
        with torch.no_grad():
            P = [line_integrals(hu, sp, geo[v], VIEW_ROTATIONS[v], polychromatic=p.polychromatic).cpu().numpy()
                 for v in ("PA", "LAT")]
            free = line_integrals(suppress_bone(hu, p.bone_threshold_hu), sp, geo["PA"], VIEW_ROTATIONS["PA"],
                                  polychromatic=p.polychromatic).cpu().numpy()
        pa, l_ref = exposure_curve(P[0])
        thr = f"{p.bone_threshold_hu:.0f} HU"
        views = {"pa": (pa, "PA (synthesised)", "R"),
                 "lateral": (exposure_curve(P[1])[0], "left lateral (synthesised)", "A"),
                 "pa_bone_suppressed": (exposure_curve(free, l_ref)[0], f"PA, bone > {thr} suppressed", "R")}
        body = P[0] > 0.05 * P[0].max()
        bone_share = float((P[0] - free)[body].sum() / max(P[0][body].sum(), 1e-9))
        model = ("two-material (water/bone) 120 kVp polychromatic" if p.polychromatic
                 else "monochromatic effective-energy")
        findings = [
            Finding(label="synthetic_radiographs", value=3, unit="views",
                    detail=f"PA, left lateral and bone-suppressed PA radiographs rendered from the CT: cone beam, "
                           f"{SOURCE_TO_DET_MM:.0f} mm source to detector, {p.detector_px} px detector (PA pitch "
                           f"{geo['PA'].det_spacing_mm:.2f} mm), {model}. Renderings for viewing, not measurements."),
            Finding(label="drr_bone_attenuation_share", value=round(bone_share, 3), unit="fraction",
                    detail=f"share of the PA attenuation inside the body removed when voxels above {thr} are "
                           "replaced by soft tissue (full minus bone-suppressed PA)"),
        ]
        artefacts: list[Artefact] = []
        if ctx.artefact_dir is not None:
            out = Path(ctx.artefact_dir)
            out.mkdir(parents=True, exist_ok=True)
            for key, (img, label, marker) in views.items():
                rel = f"{ctx.study_id}_xraysyn_{key}.png".replace("/", "_")
                _png(img, out / rel, label, marker)
                artefacts.append(Artefact(id=f"{self.name}:{ctx.study_id}:{key}", kind="png", path=rel,
                                          description=f"{label} radiograph rendered from the CT ({model})"))
        return findings, artefacts
