"""The segmentation tool inside the consultation graph: on a CT case the planner runs ct_segmentation, and
the verdict's evidence claims cite its volumes (in mL), checked by the evaluator as valid.

The panel is the scripted backend of tests/test_graph.py (every diagnostician prefers pneumonia, so the
path is fixed); the tools are the real ones, run on the example case s2026-0000 (community-acquired
pneumonia: right consolidation and a large right pleural effusion, both planted in the CT phantom).
"""
import re
from pathlib import Path

import pytest
import torch

from agents.consult import Consultation
from agents.diagnostician import _evidence_statement
from agents.evidence import observations, supporting
from core.case import Modality, load_case
from core.catalogue import load_catalogue
from core.config import load_settings
from tests.test_graph import PNEUMONIA, ScriptedPool

CAT = load_catalogue()
ML = re.compile(r"(\d+(?:\.\d+)?) mL")


@pytest.fixture(scope="module")
def consulted(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("seg_graph")
    s = load_settings(env={})
    c = Consultation(s, tmp / "state.sqlite", llms=ScriptedPool(s, [["pneumonia"]] * 3), artefact_root=tmp / "art")
    out = c.run(PNEUMONIA)
    state = c.state(out.thread_id)
    c.close()
    return out.verdict, state, tmp


def _ct_study_id() -> str:
    return next(st.id for st in load_case(PNEUMONIA).studies if st.modality == Modality.CT)


def test_the_graph_runs_the_segmentation_tool_on_the_ct(consulted):
    verdict, state, tmp = consulted
    seg_id = f"ct_segmentation:{_ct_study_id()}"
    assert verdict.diagnosis == "pneumonia" and seg_id in verdict.tools_used and verdict.tool_failures == []
    seg = next(r for r in state["tool_results"] if r["id"] == seg_id)
    found = {f["label"]: f for f in seg["findings"] if f.get("present", True)}
    # the planted lesions are segmented and measured
    assert found["pleural_effusion"]["unit"] == "mL" and found["pleural_effusion"]["value"] > 50
    assert found["consolidation"]["unit"] == "mL" and found["consolidation"]["value"] > 20
    assert list((tmp / "art").rglob("*_seg.nii.gz")), "the label map was not written"


def test_the_verdict_cites_a_segmentation_volume_in_a_valid_claim(consulted):
    verdict, state, _ = consulted
    seg_id = f"ct_segmentation:{_ct_study_id()}"
    seg = next(r for r in state["tool_results"] if r["id"] == seg_id)
    volumes = {f"{f['value']:.3g} mL": f["label"] for f in seg["findings"]
               if f.get("present", True) and f.get("unit") == "mL" and f.get("value") is not None}
    cited = [c for c in verdict.rationale if seg_id in c.cites and ML.search(c.statement)]
    assert cited, [(c.statement, c.cites) for c in verdict.rationale]
    # the volume in the statement is the segmentation's own measurement of the finding the claim names
    hits = [(c, v) for c in cited for v in volumes if f"{v} by ct_segmentation" in c.statement or
            (c.cites == [seg_id] and v in c.statement)]
    assert hits, ([c.statement for c in cited], volumes)
    for c, v in hits:
        name = CAT.findings[volumes[v]].name
        assert name.lower() in c.statement.lower()
        assert c.valid is True, c
    assert verdict.citations_valid is not None and verdict.citations_valid > 0


def _obs(source, label, present=True, value=None, unit=None, probability=None, location=None):
    f = {"label": label, "present": present, "value": value, "unit": unit, "probability": probability,
         "location": location}
    return {"id": source, "status": "ok", "findings": [f]}


def test_one_claim_per_finding_citing_every_tool_that_agrees():
    results = [
        _obs("ct_analysis:ct", "pleural_effusion", value=233.7, unit="mL", location="right pleural space"),
        _obs("ct_segmentation:ct", "pleural_effusion", value=263.3, unit="mL"),
        _obs("ct_analysis:ct", "cavitation", present=False),
        # favours pneumonia too (a low probability), but says "present": it is not cited for "no cavitation"
        _obs("cxr_analysis:xr", "cavitation", present=True, probability=0.11),
    ]
    d, rival = CAT.diseases["pneumonia"], CAT.diseases["tuberculosis"]
    picked = supporting(d, rival, observations(results, CAT))
    assert [o["key"] for o in picked] == ["cavitation", "pleural_effusion"]  # once each, not once per tool
    assert picked[0]["source"] == "ct_analysis:ct" and picked[0]["also"] == []
    eff = picked[1]
    assert eff["source"] == "ct_analysis:ct" and [a["source"] for a in eff["also"]] == ["ct_segmentation:ct"]
    text = _evidence_statement(eff, d, rival, CAT)
    assert text.startswith("Pleural effusion (234 mL by ct_analysis; 263 mL by ct_segmentation), right pleural space")
    # a single measuring tool keeps the short form
    only = supporting(d, rival, observations(results[1:2], CAT))[0]
    assert _evidence_statement(only, d, rival, CAT).startswith("Pleural effusion (263 mL) favours")
