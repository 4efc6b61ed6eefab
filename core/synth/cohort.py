"""Synthetic cohort: whole case folders (case.yaml + images + truth) from the disease catalogue.

Each case draws from its own `SeedSequence([seed, index])`, so a case does not depend on how
many others were generated or in which order, and workers can run in parallel.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from core.case import (Case, Lab, MaskRef, Modality, Patient, Presentation, RoiBox, Study, StudyFormat,
                       Truth, TruthFinding, Vitals, write_case)
from core.catalogue import Catalogue, DiseaseDef, load_catalogue
from core.reports import PlantedMention, write_report

StudySet = Literal["ct+xr", "xr", "wsi"]

METAL_KINDS = ("spinal_hardware", "pacemaker", "port", "sternal_wires")
_METAL_HISTORY = {"spinal_hardware": "thoracic spinal fusion for scoliosis", "pacemaker": "dual-chamber pacemaker",
                  "port": "chemotherapy port", "sternal_wires": "previous coronary artery bypass grafting"}
_SIDES = ("right", "left")


@dataclass
class CohortOptions:
    ct_shape: tuple[int, int, int] = (96, 128, 128)  # thin-slice grid [z, y, x]
    ct_spacing: tuple[float, float, float] = (2.5, 2.8, 2.8)  # mm
    xr_shape: tuple[int, int] = (256, 256)
    slide_size: tuple[int, int] = (4096, 3072)  # (w, h) at level 0
    pathology_fraction: float = 0.2
    metal_rate: float = 0.15
    thick_rate: float = 0.25
    thick_factor: int = 2  # thick slices = this many thin slices averaged (2 × 2.5 mm = 5 mm)
    dicom_rate: float = 0.5
    xr_only_rate: float = 0.05
    photons_per_ray: float = 2e5

    @classmethod
    def for_grid(cls, ct_shape: tuple[int, int, int], **kw) -> "CohortOptions":
        """Options whose CT grid keeps the standard 240 mm x 358 mm field of view at any matrix size."""
        z, y, x = ct_shape
        return cls(ct_shape=tuple(ct_shape), ct_spacing=(240.0 / z, 358.4 / y, 358.4 / x), **kw)


@dataclass
class CasePlan:
    """What one case will be; drawn from the rng, or fixed (examples, tests)."""

    disease: str
    studies: StudySet = "ct+xr"
    metal: str | None = None
    thick: bool = False
    ct_format: StudyFormat = StudyFormat.NIFTI
    xr_format: StudyFormat = StudyFormat.PNG
    findings: list[str] | None = None  # None: sample from the disease's probabilities
    extra: dict = field(default_factory=dict)


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _weighted(rng: np.random.Generator, items: list[DiseaseDef]) -> DiseaseDef:
    w = np.array([d.weight for d in items], dtype=float)
    return items[int(rng.choice(len(items), p=w / w.sum()))]


def draw_plan(rng: np.random.Generator, opts: CohortOptions, cat: Catalogue) -> CasePlan:
    if rng.random() < opts.pathology_fraction:
        return CasePlan(disease=_weighted(rng, cat.pathology_diseases()).key, studies="wsi")
    d = _weighted(rng, cat.chest_diseases())
    xr_only = rng.random() < opts.xr_only_rate
    return CasePlan(
        disease=d.key,
        studies="xr" if xr_only else "ct+xr",
        metal=str(rng.choice(METAL_KINDS)) if rng.random() < opts.metal_rate else None,
        thick=bool(rng.random() < opts.thick_rate),
        ct_format=StudyFormat.DICOM_SERIES if rng.random() < opts.dicom_rate else StudyFormat.NIFTI,
        xr_format=StudyFormat.DICOM if xr_only or rng.random() < 0.3 else StudyFormat.PNG,
    )


def sample_findings(rng: np.random.Generator, d: DiseaseDef) -> list[str]:
    keys = [k for k, p in d.findings.items() if rng.random() < p]
    if d.key_findings and not set(keys) & set(d.key_findings):
        keys.append(str(rng.choice(d.key_findings)))
    if "lung_mass" in keys and "lung_nodule" in keys and rng.random() < 0.5:
        keys.remove("lung_nodule")
    return keys


def sample_presentation(rng: np.random.Generator, d: DiseaseDef, cat: Catalogue,
                        metal: str | None) -> tuple[Patient, Presentation]:
    age = int(np.clip(rng.normal(*d.age), 18, 95))
    sex = "F" if rng.random() < 0.5 else "M"
    vitals = {}
    for k, (mu, sd) in {**cat.normal_vitals, **d.vitals}.items():
        v = rng.normal(mu, sd)
        vitals[k] = round(float(np.clip(v, 0, 100 if k == "spo2" else 300)), 1)
    vitals["diastolic_bp"] = round(min(vitals["diastolic_bp"], vitals["systolic_bp"] - 15), 1)
    labs = []
    # the disease's labs plus a few routine ones drawn from health, so labs alone don't name it
    routine = [k for k in ("wbc", "crp", "hemoglobin", "d_dimer") if k not in d.labs]
    for key in [*d.labs, *rng.permutation(routine)[: int(rng.integers(1, 3))]]:
        lab = cat.labs[key]
        mu, sd = d.labs.get(key, lab.normal)
        value = max(lab.min, float(rng.normal(mu, sd)))
        labs.append(Lab(name=lab.name, value=round(value, 2), unit=lab.unit, reference=lab.reference))
    history = [str(h) for h in rng.permutation(d.history)[: int(rng.integers(1, 3))]]
    if metal:
        history.append(_METAL_HISTORY[metal])
    pres = Presentation(complaint=str(rng.choice(d.complaints)), history=_sentence_case("; ".join(history)) + ".",
                        vitals=Vitals(**vitals), labs=labs)
    return Patient(age=age, sex=sex), pres


def _fake_identity(rng: np.random.Generator, patient: Patient) -> dict:
    """Identifying values that go into DICOM headers only, so de-identification has work to do.

    The birth year is left for `_birth_date` to fix from the study date (not from today's date,
    which would make a seeded cohort depend on the year it is generated in)."""
    first = str(rng.choice(["Ann", "Ravi", "Maria", "John", "Wei", "Fatima", "Olu", "Sven", "Lucia", "Omar"]))
    last = str(rng.choice(["Smith", "Okafor", "Garcia", "Chen", "Novak", "Haddad", "Kowalski", "Silva", "Ito"]))
    return {"name": f"{last}^{first}", "id": f"MRN{rng.integers(10**6, 10**7)}",
            "birth_month_day": (int(rng.integers(1, 13)), int(rng.integers(1, 29))),
            "sex": patient.sex, "age": patient.age}


def _birth_date(identity: dict, study_date: str) -> dict:
    """The identity with a birth date that makes the patient `age` on `study_date` (YYYYMMDD)."""
    out = {k: v for k, v in identity.items() if k != "birth_month_day"}
    month, day = identity["birth_month_day"]
    year = int(study_date[:4]) - int(identity["age"])
    if (month, day) > (int(study_date[4:6]), int(study_date[6:8])):
        year -= 1  # no birthday yet in the study year
    out["birth_date"] = f"{year}{month:02d}{day:02d}"
    return out


def _sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]  # str.capitalize() would lower-case "COPD"


def _mentions(findings: list[dict], keys: set[str] | None = None) -> list[PlantedMention]:
    seen, out = set(), []
    for f in findings:
        if (keys is None or f["key"] in keys) and f["key"] not in seen:
            seen.add(f["key"])
            out.append(PlantedMention(f["key"], f.get("location", ""), f.get("size_mm"), f.get("side", "")))
    return out


def _prior_report(rng: np.random.Generator, d: DiseaseDef, cat: Catalogue) -> str | None:
    """An older study's report: context a clinician would have, never the current answer."""
    when = f"{int(rng.integers(3, 25))} months ago"
    if d.key in ("lung_cancer", "lung_adenocarcinoma", "lung_squamous_cell_carcinoma"):
        size = int(rng.integers(6, 12))
        return f"Prior CT chest ({when}): {size} mm solid nodule in the {rng.choice(['right', 'left'])} upper lobe. Follow-up CT recommended."
    if d.key in ("copd", "interstitial_lung_disease") and rng.random() < 0.6:
        what = "mild centrilobular emphysema" if d.key == "copd" else "mild subpleural reticulation at the bases"
        return f"Prior CT chest ({when}): {what}. No focal consolidation."
    if rng.random() < 0.35:
        return f"Prior chest radiograph ({when}): lungs clear. Heart size normal. No pleural effusion."
    return None


def _thicken(arr: np.ndarray, f: int, how: str) -> np.ndarray:
    z = arr.shape[0] // f * f
    slabs = arr[:z].reshape(z // f, f, *arr.shape[1:])
    if how == "mean":
        return slabs.mean(axis=1).astype(arr.dtype)
    if how == "max":
        return slabs.max(axis=1)
    return slabs[:, f // 2]


def _chest_studies(rng, case_dir: Path, plan: CasePlan, d: DiseaseDef, opts: CohortOptions,
                   cat: Catalogue, identity: dict, finding_keys: list[str]):
    from core.imaging.dicom import write_dicom_radiograph, write_dicom_series
    from core.imaging.nifti import write_nifti
    from core.imaging.radiograph import write_radiograph_png
    from core.imaging.types import Radiograph, Volume
    from core.physics import radiograph_from_ct, simulate_ct_acquisition
    from core.synth.chest import ORGAN_LABELS, PlantedFinding, make_chest_phantom

    planted = []
    for k in finding_keys:
        if k == "medical_material":
            continue  # planted through `metal`
        side = str(rng.choice(_SIDES)) if k in ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass",
                                                  "consolidation", "atelectasis", "cavitation") else "bilateral"
        planted.append(PlantedFinding(key=k, side=side, severity=float(rng.uniform(0.3, 0.9))))
    metal = plan.metal
    ph = make_chest_phantom(rng, planted, shape=opts.ct_shape, spacing=opts.ct_spacing,
                            contrast=d.contrast, metal=metal, sex=identity["sex"], age=identity["age"])
    found = list(ph.findings)
    if metal:
        found.append({"key": "medical_material", "location": metal.replace("_", " "), "side": ""})
    studies, truth_findings, masks, boxes, reports = [], [], [], [], {}
    study_date = f"{2020 + int(rng.integers(0, 6))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
    identity = _birth_date(identity, study_date)

    if plan.studies == "ct+xr":
        acq = simulate_ct_acquisition(ph.hu, opts.ct_spacing[1], metal_mask=ph.metal,
                                      photons_per_ray=opts.photons_per_ray, rng=rng)
        hu, organs, lesions = acq["recon_hu"], ph.organs, ph.lesions
        spacing = opts.ct_spacing
        if plan.thick:
            f = opts.thick_factor
            hu, organs, lesions = _thicken(hu, f, "mean"), _thicken(organs, f, "mid"), _thicken(lesions, f, "max")
            spacing = (spacing[0] * f, *spacing[1:])
        vol = Volume(array=hu.astype(np.float32), spacing=spacing, source=case_dir / "ct")
        thickness = spacing[0]
        technique = (f"CT chest {'with' if d.contrast else 'without'} intravenous contrast, "
                     f"{thickness:g} mm slices.")
        acquisition = {"slice_thickness_mm": thickness, "contrast": d.contrast, "metal": bool(metal)}
        if plan.ct_format == StudyFormat.DICOM_SERIES:
            write_dicom_series(vol, case_dir / "ct", patient=identity, study_date=study_date, rng=rng,
                               series_description=technique, slice_thickness=thickness)
            ct_path = "ct"
        else:
            write_nifti(vol, case_dir / "ct.nii.gz")
            ct_path = "ct.nii.gz"
        studies.append(Study(id="ct", modality=Modality.CT, body_region="chest", path=ct_path,
                             format=plan.ct_format, description=technique, acquisition=acquisition))
        write_nifti(Volume(array=organs, spacing=spacing, source=case_dir), case_dir / "ct_organs.nii.gz",
                    dtype=np.uint8)
        write_nifti(Volume(array=lesions, spacing=spacing, source=case_dir), case_dir / "ct_lesions.nii.gz",
                    dtype=np.uint8)
        masks += [MaskRef(study_id="ct", kind="organs", path="ct_organs.nii.gz",
                          labels={v: k for k, v in ORGAN_LABELS.items()}),
                  MaskRef(study_id="ct", kind="lesions", path="ct_lesions.nii.gz",
                          labels={f["mask_label"]: f["key"] for f in ph.findings if f.get("mask_label")})]
        for f in ph.findings:
            truth_findings.append(TruthFinding(label=f["key"], study_id="ct", location=f.get("location", ""),
                                               size_mm=f.get("size_mm"), mask_label=f.get("mask_label")))
            if f.get("bbox"):
                z0, y0, x0, z1, y1, x1 = f["bbox"]
                if plan.thick:
                    z0, z1 = z0 // opts.thick_factor, max(z0 // opts.thick_factor + 1, z1 // opts.thick_factor)
                boxes.append(RoiBox(study_id="ct", label=f["key"], box=[x0, y0, z0, x1, y1, z1]))
        if metal:
            truth_findings.append(TruthFinding(label="medical_material", study_id="ct", location=metal.replace("_", " ")))
        reports["ct"] = write_report(_mentions(found), rng, modality="CT", technique=technique,
                                     impression_dx=d.name if rng.random() < 0.5 else None, metal=metal, cat=cat)

    img, pix = radiograph_from_ct(ph.hu, opts.ct_spacing, view="PA", out_shape=opts.xr_shape)
    rad = Radiograph(array=img, spacing=pix, source=case_dir, view="PA")
    if plan.xr_format == StudyFormat.DICOM:
        write_dicom_radiograph(rad, case_dir / "cxr.dcm", patient=identity, study_date=study_date, rng=rng)
        xr_path = "cxr.dcm"
    else:
        write_radiograph_png(rad, case_dir / "cxr.png")
        xr_path = "cxr.png"
    studies.append(Study(id="xr", modality=Modality.XR, body_region="chest", path=xr_path,
                         format=plan.xr_format, description="PA chest radiograph", acquisition={"view": "PA"}))
    xr_keys = {k for k, f in cat.findings.items() if f.xr}
    reports["xr"] = write_report(_mentions(found, xr_keys), rng, modality="XR", technique="PA chest radiograph.",
                                 metal=metal, cat=cat)
    if plan.studies == "xr":
        truth_findings += [TruthFinding(label=f["key"], study_id="xr", location=f.get("location", ""))
                           for f in found if f["key"] in xr_keys]
    return studies, truth_findings, masks, boxes, reports


def _pathology_studies(rng, case_dir: Path, d: DiseaseDef, opts: CohortOptions, cat: Catalogue,
                       finding_keys: list[str]):
    from core.synth.slides import make_slide

    meta = make_slide(rng, d.slide_class, case_dir / "slide.tiff", size=opts.slide_size)
    studies = [Study(id="wsi", modality=Modality.WSI, body_region="lung", path="slide.tiff", format=StudyFormat.TIFF,
                     description="H&E, lung biopsy", acquisition={"mpp": float(meta.get("mpp", 0.5))})]
    findings = [TruthFinding(label=k, study_id="wsi") for k in finding_keys]
    boxes = [RoiBox(study_id="wsi", label="tumour", box=[float(x), float(y), float(x + w), float(y + h)])
             for x, y, w, h in meta.get("tumour_boxes", [])]  # make_slide gives [x, y, w, h]
    text = write_report([PlantedMention(k) for k in finding_keys], rng, modality="WSI", cat=cat)
    report = text.replace("IMPRESSION:", "DIAGNOSIS:", 1).split("DIAGNOSIS:")[0] + f"DIAGNOSIS: {d.name}."
    return studies, findings, boxes, {"wsi": report}


def generate_case(seed: int, index: int, out_dir: Path, opts: CohortOptions | None = None,
                  plan: CasePlan | None = None) -> Case:
    """Write one case folder `out_dir/<case id>` and return its Case. Overwrites a partial folder."""
    opts, cat = opts or CohortOptions(), load_catalogue()
    rng = case_rng(seed, index)
    plan = plan or draw_plan(rng, opts, cat)
    d = cat.disease(plan.disease)
    case_id = f"s{seed}-{index:04d}"
    case_dir = Path(out_dir) / case_id
    tmp_dir = Path(out_dir) / f".{case_id}.partial"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    finding_keys = plan.findings if plan.findings is not None else sample_findings(rng, d)
    if plan.metal and "medical_material" not in finding_keys:
        finding_keys = [*finding_keys, "medical_material"]
    patient, pres = sample_presentation(rng, d, cat, plan.metal)
    identity = _fake_identity(rng, patient)
    if d.domain == "pathology":
        studies, findings, boxes, reports = _pathology_studies(rng, tmp_dir, d, opts, cat, finding_keys)
        masks = []
    else:
        studies, findings, masks, boxes, reports = _chest_studies(rng, tmp_dir, plan, d, opts, cat, identity,
                                                                  finding_keys)
    case = Case(id=case_id, patient=patient, presentation=pres, studies=studies,
                prior_report=_prior_report(rng, d, cat),
                truth=Truth(diagnosis=d.key, findings=findings, masks=masks, roi_boxes=boxes, reports=reports))
    write_case(case, tmp_dir)
    shutil.rmtree(case_dir, ignore_errors=True)
    tmp_dir.replace(case_dir)  # a case folder exists whole or not at all
    return case


def generate_cohort(n: int, seed: int, out_dir: Path, opts: CohortOptions | None = None, *,
                    workers: int = 1, start: int = 0,
                    on_case: Callable[[Case], None] | None = None) -> list[str]:
    """Generate cases start..start+n-1; already-finished case folders are kept (resumable)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(start, start + n) if not (out_dir / f"s{seed}-{i:04d}" / "case.yaml").is_file()]
    done = [f"s{seed}-{i:04d}" for i in range(start, start + n) if i not in todo]
    if workers <= 1:
        for i in todo:
            c = generate_case(seed, i, out_dir, opts)
            done.append(c.id)
            if on_case:
                on_case(c)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, initializer=_one_thread) as ex:
            futs = [ex.submit(generate_case, seed, i, out_dir, opts) for i in todo]
            for fut in as_completed(futs):
                c = fut.result()
                done.append(c.id)
                if on_case:
                    on_case(c)
    return sorted(done)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


# A handful of committed examples covering every modality, format and tool.
EXAMPLE_SEED = 2026
EXAMPLE_PLANS: list[CasePlan] = [
    CasePlan("pneumonia", ct_format=StudyFormat.NIFTI, findings=["consolidation", "pleural_effusion"]),
    CasePlan("pulmonary_embolism", ct_format=StudyFormat.DICOM_SERIES, findings=["pulmonary_embolus", "atelectasis"]),
    CasePlan("lung_cancer", metal="spinal_hardware", ct_format=StudyFormat.DICOM_SERIES,
             findings=["lung_mass", "lymphadenopathy"]),
    CasePlan("copd", thick=True, ct_format=StudyFormat.NIFTI, findings=["emphysema", "peribronchial_thickening"]),
    CasePlan("heart_failure", metal="pacemaker", xr_format=StudyFormat.DICOM,
             findings=["cardiomegaly", "pleural_effusion", "interlobular_septal_thickening"]),
    CasePlan("pneumothorax", studies="xr", xr_format=StudyFormat.DICOM, findings=["pneumothorax"]),
    CasePlan("lung_adenocarcinoma", studies="wsi"),
    CasePlan("lung_squamous_cell_carcinoma", studies="wsi"),
]
EXAMPLE_OPTIONS = CohortOptions(ct_shape=(80, 112, 112), ct_spacing=(3.0, 3.2, 3.2), slide_size=(3072, 2048))


def generate_examples(out_dir: Path, on_case: Callable[[Case], None] | None = None) -> list[str]:
    ids = []
    for i, plan in enumerate(EXAMPLE_PLANS):
        c = generate_case(EXAMPLE_SEED, i, out_dir, EXAMPLE_OPTIONS, plan=replace(plan))
        ids.append(c.id)
        if on_case:
            on_case(c)
    return ids
