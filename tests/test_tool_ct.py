"""ct_analysis: registry, modality guard, failures as results, planted findings, examples, overlay, speed.

Planted findings use the chest phantom directly (blurred, with noise: ~0.5 s a case) plus one case
generated end to end on a small grid (64 x 96 x 96, DICOM series) and the committed example cases
(NIfTI and DICOM, thick slices, metal, contrast). The tool never sees the truth: it only gets the
Volume; truth is read here to check it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from core.case import Modality, StudyFormat, load_case
from core.catalogue import load_catalogue
from core.imaging.load import load_study
from core.imaging.types import Volume
from core.synth.chest import PlantedFinding, make_chest_phantom
from core.synth.cohort import CasePlan, CohortOptions, generate_case
from tools.base import ModalityMismatch, RunContext
from tools.ct_analysis import MAX_WORK_VOXELS, CTAnalysis
from tools.registry import get_tool, tool_classes, tools_for

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cases"
OPTS = CohortOptions.for_grid((64, 96, 96))
MEASUREMENT_LABELS = {"lung_volume", "contrast_enhancement", "image_quality", "cardiothoracic_ratio"}


def phantom(findings=(), seed=0, metal=None, contrast=False):
    """A phantom CT with roughly the cohort's blur and noise, and its planted-finding records."""
    rng = np.random.default_rng(seed)
    ph = make_chest_phantom(rng, list(findings), shape=OPTS.ct_shape, spacing=OPTS.ct_spacing, metal=metal,
                            contrast=contrast)
    a = ndi.gaussian_filter(ph.hu, (0.5, 0.8, 0.8)) + rng.normal(0, 25, ph.hu.shape)
    if ph.metal is not None and ph.metal.any():  # reconstructed metal stays far above bone (cf. the examples)
        a[ph.metal] = 6000.0
    return Volume(array=a.astype(np.float32), spacing=OPTS.ct_spacing, source=Path("<phantom>")), ph


@pytest.fixture(scope="module")
def tool():
    return CTAnalysis(device="cpu")


def run(tool, vol, **kw):
    return tool.run(vol, ctx=RunContext(study_id="ct", modality=Modality.CT, **kw))


def by_label(res):
    return {f.label: f for f in res.findings}


@pytest.fixture(scope="module")
def normal_result(tool):
    vol, _ = phantom(seed=1)
    return run(tool, vol)


@pytest.fixture(scope="module")
def generated_case(tmp_path_factory):
    """One case end to end: phantom, CT acquisition (FBP, noise), DICOM series on disk, truth. A
    contrast-enhanced study (the embolism work-up) with an 18 mm nodule and no emboli."""
    out = tmp_path_factory.mktemp("ct_cases")
    case = generate_case(5, 2, out, OPTS, plan=CasePlan("pulmonary_embolism", findings=["lung_nodule"],
                                                        ct_format=StudyFormat.DICOM_SERIES))
    return out / case.id


# ------------------------------------------------------------------ contract

def test_registered_for_ct():
    assert "ct_analysis" in tool_classes()
    assert "ct_analysis" in tools_for(Modality.CT)
    assert "ct_analysis" not in tools_for(Modality.XR)
    t = get_tool("ct_analysis", device="cpu")
    assert isinstance(t, CTAnalysis) and t.model_name.startswith("classical CT analysis")


@pytest.mark.parametrize("modality", [Modality.XR, Modality.WSI])
def test_wrong_modality_is_refused(tool, modality):
    vol, _ = phantom()
    with pytest.raises(ModalityMismatch):
        tool.run(vol, ctx=RunContext(study_id="xr", modality=modality))


@pytest.mark.parametrize("make, words", [
    (lambda: Volume(np.full((40, 64, 64), np.nan, np.float32), (5.0, 5.0, 5.0), Path("x")), "non-finite"),
    (lambda: Volume(np.zeros((64, 64), np.float32), (1.0, 1.0, 1.0), Path("x")), "3-D"),
    (lambda: Volume(np.zeros((40, 64, 64), np.float32), (5.0, 5.0, 5.0), Path("x")), "contrast"),
    (lambda: Volume(np.zeros((40, 64, 64), np.float32), (0.0, 5.0, 5.0), Path("x")), "spacing"),
    (lambda: "not a volume", "Volume"),
])
def test_corrupt_input_is_a_failed_result(tool, make, words):
    res = run(tool, make())
    assert res.status == "failed" and res.findings == []
    assert words in res.error and res.id == "ct_analysis:ct"


def test_bad_params_are_a_failed_result(tool):
    vol, _ = phantom()
    res = tool.run(vol, {"min_lesion_mm": -3}, ctx=RunContext(study_id="ct", modality=Modality.CT))
    assert res.status == "failed" and "min_lesion_mm" in res.error


def test_labels_are_catalogue_keys_or_measurements(normal_result):
    cat = load_catalogue()
    for f in normal_result.findings:
        assert f.label in cat.findings or f.label in MEASUREMENT_LABELS, f.label
        assert f.probability is None  # classical measurements carry no probabilities


# ------------------------------------------------------------------ findings

def test_normal_reports_pertinent_negatives(normal_result):
    assert normal_result.status == "ok", normal_result.error
    f = by_label(normal_result)
    for key in ("lung_nodule", "lung_mass", "consolidation", "pleural_effusion", "pneumothorax", "cavitation",
                "emphysema", "cardiomegaly", "pericardial_effusion", "medical_material"):
        assert key in f and f[key].present is False, (key, f.get(key))
    assert 2500 < f["lung_volume"].value < 6000  # mL, both lungs
    assert 0.35 < f["cardiomegaly"].value < 0.55  # a normal cardiothoracic ratio is measured
    assert "absent" in normal_result.summary


@pytest.mark.parametrize("planted, key, where", [
    (PlantedFinding("pneumothorax", side="right", severity=0.5), "pneumothorax", "right hemithorax"),
    (PlantedFinding("pneumothorax", side="left", severity=0.3), "pneumothorax", "left hemithorax"),
    (PlantedFinding("pleural_effusion", side="left", severity=0.6), "pleural_effusion", "left pleural space"),
    (PlantedFinding("pleural_effusion", side="right", severity=0.4), "pleural_effusion", "right pleural space"),
    (PlantedFinding("lung_nodule", side="left", size_mm=20), "lung_nodule", None),
    (PlantedFinding("lung_mass", side="right", size_mm=45), "lung_mass", None),
    (PlantedFinding("cardiomegaly", severity=0.6), "cardiomegaly", "heart"),
    (PlantedFinding("emphysema", severity=0.6), "emphysema", "upper lobes"),
    (PlantedFinding("pericardial_effusion", severity=0.5), "pericardial_effusion", "pericardium"),
])
def test_planted_finding_is_found_where_it_is(tool, planted, key, where):
    vol, ph = phantom([planted], seed=3)
    res = run(tool, vol)
    assert res.status == "ok", res.error
    f = by_label(res)[key]
    truth = next(r for r in ph.findings if r["key"] == key)
    assert f.present, (key, f)
    assert f.location == (where or truth["location"]), (f.location, truth["location"])
    if key in ("lung_nodule", "lung_mass"):
        assert abs(f.value - truth["size_mm"]) <= 0.3 * truth["size_mm"], (f.value, truth["size_mm"])
    # a focal or one-sided finding does not spill into unrelated positives
    for other in ("pneumothorax", "pleural_effusion", "lung_nodule", "lung_mass", "consolidation"):
        if other != key:
            assert not by_label(res)[other].present, other


def test_no_embolus_verdict_without_contrast(normal_result):
    f = by_label(normal_result)
    assert not f["contrast_enhancement"].present
    assert "pulmonary_embolus" not in f  # not examinable without contrast: no false negative evidence


def test_metal_is_reported_with_a_reliability_note(tool):
    vol, _ = phantom(seed=2, metal="spinal_hardware")
    f = by_label(run(tool, vol))
    assert f["medical_material"].present and "streak" in f["medical_material"].detail
    assert "metal" in f["image_quality"].detail
    assert not f["pneumothorax"].present and not f["lung_mass"].present


def test_generated_dicom_case(tool, generated_case):
    case = load_case(generated_case)
    study = next(s for s in case.studies if s.modality == Modality.CT)
    vol = load_study(generated_case, study)
    truth = next(f for f in case.truth.findings if f.label == "lung_nodule")
    res = run(tool, vol, acquisition=dict(study.acquisition))
    assert res.status == "ok", res.error
    f = by_label(res)
    assert f["lung_nodule"].present and f["lung_nodule"].location == truth.location
    assert abs(f["lung_nodule"].value - truth.size_mm) <= 0.3 * truth.size_mm, (f["lung_nodule"].value, truth.size_mm)
    assert f["contrast_enhancement"].present and f["contrast_enhancement"].value > 180
    for key in ("pulmonary_embolus", "lung_mass", "pleural_effusion", "pneumothorax", "consolidation",
                "coronary_artery_calcification", "arterial_wall_calcification"):
        assert not f[key].present, key


EXPECTED = {  # example case -> (finding, location or None) the tool must report present
    "s2026-0000": [("consolidation", "right"), ("pleural_effusion", "right pleural space")],  # NIfTI
    "s2026-0001": [("contrast_enhancement", None), ("pulmonary_embolus", "right and left")],  # DICOM, contrast
    "s2026-0002": [("lung_mass", "left upper lobe"), ("medical_material", None)],  # DICOM, spinal hardware
    "s2026-0003": [("emphysema", "upper lobes")],  # NIfTI, 6 mm slices
    "s2026-0004": [("cardiomegaly", "heart"), ("pleural_effusion", "right pleural space"),
                   ("medical_material", None)],  # pacemaker streaks
}


@pytest.mark.parametrize("case_id", sorted(EXPECTED))
def test_example_cases(tool, case_id):
    folder = EXAMPLES / case_id
    case = load_case(folder)
    study = next(s for s in case.studies if s.modality == Modality.CT)
    vol = load_study(folder, study)
    cpu = time.process_time()
    res = run(tool, vol, acquisition=dict(study.acquisition))
    cpu = time.process_time() - cpu
    assert res.status == "ok", res.error
    assert cpu < 2.0, f"{cpu:.2f} s of CPU for a {vol.shape} volume"
    f = by_label(res)
    for key, where in EXPECTED[case_id]:
        assert f[key].present, (key, f[key])
        if where:
            assert where in (f[key].location or ""), (key, f[key].location)
    truth = {t.label for t in case.truth.findings if t.study_id == study.id}
    for key in ("lung_nodule", "pneumothorax", "cavitation"):  # none planted in the examples
        assert key in truth or not f[key].present, key


def test_large_volume_is_resampled(tool):
    vol, ph = phantom([PlantedFinding("lung_nodule", side="right", size_mm=22)], seed=5)
    big = np.repeat(np.repeat(np.repeat(vol.array, 2, 0), 2, 1), 2, 2)  # thin slices, small pixels
    assert big.size > MAX_WORK_VOXELS
    sp = tuple(s / 2 for s in vol.spacing)
    res = run(tool, Volume(big, sp, Path("<big>")))
    f = by_label(res)
    assert res.status == "ok" and "resampled" in f["image_quality"].detail
    assert f["lung_nodule"].present and f["lung_nodule"].location == ph.findings[0]["location"]


# ------------------------------------------------------------------ overlay

def test_overlay_written_when_asked(tool, tmp_path):
    vol, _ = phantom([PlantedFinding("lung_nodule", side="right", size_mm=20)], seed=6)
    res = tool.run(vol, {"write_overlay": True},
                   ctx=RunContext(study_id="ct", modality=Modality.CT, artefact_dir=tmp_path))
    assert res.status == "ok", res.error
    [art] = res.artefacts
    assert art.id == "ct_analysis:ct:overlay" and art.kind == "png"
    from PIL import Image

    with Image.open(tmp_path / art.path) as im:
        assert im.size[0] >= 200 and im.mode == "RGB"
        px = np.asarray(im)
    assert ((px[..., 0] > 200) & (px[..., 1] < 80)).any()  # the nodule's red outline is drawn


def test_no_overlay_unless_asked(tool, tmp_path):
    vol, _ = phantom(seed=7)
    res = tool.run(vol, {"write_overlay": False}, ctx=RunContext(study_id="ct", modality=Modality.CT,
                                                                 artefact_dir=tmp_path))
    assert res.artefacts == [] and not list(tmp_path.iterdir())
    assert run(tool, vol).artefacts == []  # no artefact folder: nothing written
