"""The disease catalogue and the report writer/reader agree with each other."""
from __future__ import annotations

import numpy as np
import pytest

from core.catalogue import load_catalogue
from core.reports import PlantedMention, read_findings, write_report

CAT = load_catalogue()


def test_catalogue_has_enough_diseases_with_overlapping_findings():
    assert len(CAT.chest_diseases()) >= 10 and len(CAT.pathology_diseases()) >= 3
    # no single finding gives the answer: each disease's key findings also occur in another disease
    for d in CAT.chest_diseases():
        for f in d.key_findings:
            others = [o.key for o in CAT.chest_diseases() if o.key != d.key and o.findings.get(f, 0) > 0]
            assert others, (d.key, f)
    # labs overlap too: an elevated D-dimer is not unique to embolism
    assert sum(1 for d in CAT.diseases.values() if "d_dimer" in d.labs) >= 4


@pytest.mark.parametrize("text,key", [("CHF", "heart_failure"), ("Pulmonary Embolism", "pulmonary_embolism"),
                                      ("community acquired pneumonia", "pneumonia"), ("pneumonai", "pneumonia"),
                                      ("LUSC", "lung_squamous_cell_carcinoma"), ("a sprained ankle", None)])
def test_disease_names_normalise(text, key):
    assert CAT.normalise_disease(text) == key


def test_reader_handles_negation_uncertainty_and_scope():
    text = ("FINDINGS: No pleural effusion or pneumothorax. A 12 mm solid nodule in the right upper lobe. "
            "Possible ground-glass opacity in the left lower lobe. Consolidation cannot be excluded. "
            "Emphysema, but no bronchiectasis.\nIMPRESSION: Right upper lobe nodule.")
    got = read_findings(text)
    assert got == {"pleural_effusion": "absent", "pneumothorax": "absent", "lung_nodule": "present",
                   "ground_glass_opacity": "uncertain", "consolidation": "uncertain", "emphysema": "present",
                   "bronchiectasis": "absent"}


@pytest.mark.parametrize("seed", range(40))
def test_written_reports_read_back_as_planted(seed):
    rng = np.random.default_rng(seed)
    pool = [k for k, f in CAT.findings.items() if f.ct_rate or k in ("pneumothorax", "pulmonary_embolus", "cavitation")]
    keys = list(rng.choice(pool, size=int(rng.integers(0, 4)), replace=False))
    mentions = [PlantedMention(k, "right lower lobe", float(rng.uniform(5, 50)), "right") for k in keys]
    report = write_report(mentions, rng, modality="CT", technique="CT chest.", hedge_rate=0.3,
                          metal="pacemaker" if "medical_material" in keys else None)
    got = read_findings(report)
    for k in keys:
        assert got.get(k) in ("present", "uncertain"), (k, report)
    for k, v in got.items():
        if k not in keys:
            # mass and nodule share a label; anything else not planted must read as absent
            assert v == "absent" or {k, *keys} >= {"lung_mass", "lung_nodule"}, (k, v, report)
    assert "IMPRESSION:" in report and "FINDINGS:" in report
