"""A radiograph with a prior CT of the same patient: register the CT to the film, synthesise the other view.

XraySyn's second use (arXiv 2012.02407): a plain film is one projection; with a prior CT the
missing view can be rendered at the pose the film was taken in. Steps:
1. the film -> line integrals, by inverting the display curve (`core.physics.drr.exposure_curve`;
   NCC is blind to its scale), binned to at most `detector_px` per side;
2. camera from the film: its pixel pitch, source-to-detector distance (DICOM's
   DistanceSourceToDetector when present, else chest radiography's 180 cm), the detector just
   behind the patient (`view_geometry`'s convention); the CT starts at the film's nominal view;
3. `tools.xraysyn.register_pose`: Adam on 1 - NCC of the CT's DRR (through the water beam-hardening
   curve, as the film is polychromatic) against the film, coarse to fine,
   the coarsest level restarted from rotations 4 deg about each axis (NCC has local optima);
4. the orthogonal view (lateral for PA/AP, PA for a lateral) rendered from the CT at the registered
   patient pose.

`RunContext.case_studies`/`case_dir` give the tool the case's CT; `applies` plans it only when the
case has one. Findings report the registration (NCC before and after, pose offset); they make no
diagnostic claim: the CT is prior, the film is now.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from core.case import Modality, Study
from core.physics.drr import (VIEW_ROTATIONS, drr, euler_to_matrix, exposure_curve, hu_to_attenuation,
                              matrix_to_euler, view_geometry, water_hardening_curve)
from core.physics.materials import DEFAULT_SPECTRUM
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register
from tools.xraysyn import SOURCE_TO_DET_MM, Geometry, PoseEstimate, _png, ncc, pool_to, register_pose

_K = 1.0 - math.exp(-0.5)  # exposure_curve's display scale at L = L_ref
SECOND_VIEW = {"PA": "LAT", "AP": "LAT", "LAT": "PA"}
RELIABLE_NCC = 0.9  # below this the registered pose (and the rendered view) is not trustworthy


def film_line_integrals(img: np.ndarray) -> np.ndarray:
    """Display image in [0, 1] (brighter = more attenuation) -> line integrals up to scale: the inverse
    of `exposure_curve` (L / L_ref = -2 ln(1 - img (1 - e^-0.5))); saturated pixels stay finite."""
    x = np.clip(np.asarray(img, dtype=np.float64), 0.0, 0.999)
    return (-2.0 * np.log1p(-x * _K)).astype(np.float32)


def film_geometry(rad_shape: tuple[int, int], rad_spacing, ct_shape, ct_spacing, view: str,
                  source_to_det_mm: float, max_px: int) -> tuple[Geometry, int]:
    """(camera for the binned film, binning factor). The pitch is the film's (mean of row and col)."""
    f = max(1, math.ceil(max(rad_shape) / max_px))
    det = (rad_shape[0] // f, rad_shape[1] // f)
    nominal = view_geometry(tuple(ct_shape), ct_spacing, "LAT" if view == "LAT" else "PA", det, source_to_det_mm)
    pitch = f * float(np.mean([float(s) for s in rad_spacing]))
    return Geometry(source_to_det_mm=source_to_det_mm, source_to_iso_mm=nominal["source_to_iso_mm"],
                    det_shape=det, det_spacing_mm=pitch), f


def other_view_pose(rotation, translation, view: str, second: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The patient posed as registered in `view`, turned into `second` about the isocentre.

    Registered x = R1 (v - c) + t1 in `view`'s frame; the patient's pose in the PA frame is
    P = V^-1 R1, V^-1 t1; the second view's camera sees V2 P, V2 V^-1 t1."""
    R1 = euler_to_matrix(torch.as_tensor(rotation, dtype=torch.float64))
    V = euler_to_matrix(torch.tensor(VIEW_ROTATIONS[view], dtype=torch.float64))
    V2 = euler_to_matrix(torch.tensor(VIEW_ROTATIONS[second], dtype=torch.float64))
    M = V2 @ V.T
    return matrix_to_euler(M @ R1), M @ torch.as_tensor(translation, dtype=torch.float64)


class PriorCTRegistration(BaseModel):
    view: str
    second_view: str
    ncc_initial: float  # the CT's DRR at the film's nominal view
    ncc_registered: float
    pose: PoseEstimate
    rotation_offset_deg: float  # from the nominal view
    translation_offset_mm: float
    film_px: tuple[int, int]  # after binning
    second_view_image: Any = None  # display image (np.ndarray)
    registered_drr: Any = None  # display image on the film's binned grid


def register_film_to_ct(film: np.ndarray, film_spacing, view: str, hu: np.ndarray, ct_spacing, *,
                        source_to_det_mm: float = SOURCE_TO_DET_MM, detector_px: int = 128,
                        init_rotation=None, init_translation=(0.0, 0.0, 0.0),
                        levels: tuple[tuple[int, int], ...] = ((4, 40), (2, 40), (1, 20)),
                        restart_deg: float = 4.0, polychromatic: bool = True, second_px: int | None = None,
                        device: str | torch.device = "cpu") -> PriorCTRegistration:
    """Register a CT (HU, (Z, Y, X) LPS, spacing (z, y, x) mm) to a film (display image, (row, col)
    spacing mm) taken in `view` ("PA", "AP" or "LAT"), then render the orthogonal view.
    polychromatic: the film is a real exposure, so the DRR is passed through the water beam-hardening
    curve before it is compared (without it the depth comes out ~3-4 mm off on phantom films)."""
    view = view.upper()
    if view not in SECOND_VIEW:
        raise ValueError(f"film view must be one of {sorted(SECOND_VIEW)}, got {view!r}")
    film = np.asarray(film, dtype=np.float32)
    if view == "AP":
        film = film[:, ::-1]  # `radiograph_from_ct` displays AP mirrored; undo to the camera's own frame
    mu = torch.as_tensor(hu_to_attenuation(torch.as_tensor(np.asarray(hu, dtype=np.float32))), device=device)
    geo, f = film_geometry(film.shape, film_spacing, mu.shape, ct_spacing, view, source_to_det_mm, detector_px)
    target = torch.as_tensor(film_line_integrals(film), device=device)[None, None]
    target = F.avg_pool2d(target[..., :geo.det_shape[0] * f, :geo.det_shape[1] * f], f)[0, 0] if f > 1 else target[0, 0]
    # finer CT sampling than the binned film resolves only costs time
    mu, sp = pool_to(mu, ct_spacing, 0.75 * geo.det_spacing_mm * geo.source_to_iso_mm / geo.source_to_det_mm)
    rot0 = VIEW_ROTATIONS[view] if init_rotation is None else tuple(init_rotation)
    with torch.no_grad():
        initial = float(ncc(drr(mu, sp, rotation=rot0, translation=init_translation, **geo.model_dump()), target))
    response = (lambda L: water_hardening_curve(L, DEFAULT_SPECTRUM)) if polychromatic else None
    est = register_pose(target, mu, sp, geo, init_rotation=rot0, init_translation=init_translation, levels=levels,
                        restart_deg=restart_deg, response=response)
    from tools.xraysyn import pose_error

    d_rot, d_t = pose_error(est.rotation, est.translation, VIEW_ROTATIONS[view], (0.0, 0.0, 0.0))
    second = SECOND_VIEW[view]
    r2, t2 = other_view_pose(est.rotation, est.translation, view, second)
    n2 = second_px or max(geo.det_shape)
    geo2 = view_geometry(tuple(mu.shape), sp, second, (n2, n2), source_to_det_mm)
    with torch.no_grad():
        L2 = drr(mu, sp, rotation=r2.to(mu), translation=t2.to(mu), **geo2).cpu().numpy()
        L1 = drr(mu, sp, rotation=torch.tensor(est.rotation).to(mu), translation=torch.tensor(est.translation).to(mu),
                 **geo.model_dump()).cpu().numpy()
    return PriorCTRegistration(view=view, second_view=second, ncc_initial=initial, ncc_registered=est.ncc, pose=est,
                               rotation_offset_deg=d_rot, translation_offset_mm=d_t,
                               film_px=tuple(geo.det_shape), second_view_image=exposure_curve(L2)[0],
                               registered_drr=exposure_curve(L1)[0])


# ----------------------------------------------------------------------------- the tool

class PriorCTViewsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    detector_px: int = Field(128, ge=32, le=512)  # film binned to this many pixels per side for registration
    steps_scale: float = Field(1.0, gt=0.0, le=4.0)  # multiplies the Adam steps at every level


def _ct_studies(studies) -> list[Study]:
    return [s for s in studies if Modality(s.modality if isinstance(s, Study) else s["modality"]) == Modality.CT]


@register
class PriorCTViews(Tool):
    name = "prior_ct_views"
    description = ("For a radiograph when the case also has a CT: registers the CT to the film (2D/3D, gradient "
                   "descent on DRR similarity) and synthesises the orthogonal view (lateral for a PA film) from the "
                   "CT at the registered pose. Renders and aligns; does not diagnose.")
    modalities = frozenset({Modality.XR})
    Params = PriorCTViewsParams
    model_name = "2D/3D registration: trilinear cone-beam DRR, Adam on NCC"
    version = "1"

    @classmethod
    def relevance(cls, study: dict, complaint: str) -> str | None:
        return None  # needs the case's CT: see `applies`

    @classmethod
    def applies(cls, study: dict, complaint: str, studies: list[dict]) -> str | None:
        cts = _ct_studies(studies)
        if not cts:
            return None
        return f"radiograph with a CT in the same case ({cts[0]['id']}): register it and render the other view"

    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        from core.imaging.load import load_study
        from tools.ct_analysis import validated_volume

        p: PriorCTViewsParams = params  # type: ignore[assignment]
        cts = _ct_studies(ctx.case_studies)
        if not cts or ctx.case_dir is None:
            raise ValueError(f"study {ctx.study_id}: the case has no CT to register (case_studies/case_dir not given)")
        ct_study = cts[0]
        ct = load_study(ctx.case_dir, ct_study)
        hu, spacing, _ = validated_volume(ct)
        view = str(getattr(study, "view", "PA") or "PA").upper()
        if view not in SECOND_VIEW:
            raise ValueError(f"{getattr(study, 'source', ctx.study_id)}: view {view!r} is not PA, AP or LAT")
        sdd = float(study.metadata.get("source_to_detector_mm") or SOURCE_TO_DET_MM)
        lv = tuple((f, max(1, round(n * p.steps_scale))) for f, n in ((4, 40), (2, 40), (1, 20)))
        reg = register_film_to_ct(study.array, study.spacing, view, hu, spacing, source_to_det_mm=sdd,
                                  detector_px=p.detector_px, levels=lv, device=self.device)
        reliable = reg.ncc_registered >= RELIABLE_NCC
        second = "left lateral" if reg.second_view == "LAT" else "PA"
        caveat = "" if reliable else (f" Registration is NOT reliable (NCC < {RELIABLE_NCC}): the CT may be of "
                                      "another region or the patient changed; do not read the rendered view as "
                                      "this film's.")
        findings = [
            Finding(label="prior_ct_registration", value=round(reg.ncc_registered, 4), unit="NCC",
                    detail=f"CT {ct_study.id} registered to this {view} film: DRR similarity {reg.ncc_initial:.3f} "
                           f"at the nominal view -> {reg.ncc_registered:.3f} after {reg.pose.steps} steps; patient "
                           f"pose differs from the nominal view by {reg.rotation_offset_deg:.1f} deg and "
                           f"{reg.translation_offset_mm:.0f} mm.{caveat}"),
            Finding(label="synthetic_second_view", present=reliable, value=1, unit="view",
                    detail=f"{second} radiograph rendered from the prior CT at the registered pose: anatomy as of "
                           "the CT, not of this film."),
        ]
        artefacts: list[Artefact] = []
        if ctx.artefact_dir is not None:
            out = Path(ctx.artefact_dir)
            out.mkdir(parents=True, exist_ok=True)
            key = f"{ctx.study_id}_prior_ct".replace("/", "_")
            _png(reg.second_view_image, out / f"{key}_{reg.second_view.lower()}.png",
                 f"{second} from CT {ct_study.id}", "A" if reg.second_view == "LAT" else "R")
            _png(_checkerboard(study.array, reg.registered_drr, view), out / f"{key}_overlay.png",
                 "film / registered CT DRR", "R")
            artefacts = [
                Artefact(id=f"{self.name}:{ctx.study_id}:{reg.second_view.lower()}", kind="png",
                         path=f"{key}_{reg.second_view.lower()}.png",
                         description=f"{second} view rendered from the prior CT at the registered pose"),
                Artefact(id=f"{self.name}:{ctx.study_id}:overlay", kind="png", path=f"{key}_overlay.png",
                         description="checkerboard of the film and the registered CT DRR (alignment check)"),
            ]
        return findings, artefacts


def _checkerboard(film: np.ndarray, drr_img: np.ndarray, view: str, tiles: int = 8) -> np.ndarray:
    """Alternating tiles of the film and the registered DRR on the DRR's grid (edges line up if aligned)."""
    film = np.asarray(film, dtype=np.float32)
    if view == "AP":
        film = film[:, ::-1]
    h, w = drr_img.shape
    fy, fx = film.shape[0] // h, film.shape[1] // w
    small = film[:h * fy, :w * fx].reshape(h, fy, w, fx).mean((1, 3)) if fy > 1 or fx > 1 else film[:h, :w]
    yy, xx = np.meshgrid(np.arange(h) * tiles // h, np.arange(w) * tiles // w, indexing="ij")
    out = np.where((yy + xx) % 2 == 0, small, drr_img)
    return out[:, ::-1] if view == "AP" else out
