"""Case schema, case.yaml errors and `cases validate` on malformed input."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.case import Case, CaseDataError, load_case, parse_case, write_case
from core.validate import validate_cases

GOOD = {
    "id": "c1",
    "patient": {"age": 61, "sex": "F"},
    "presentation": {"complaint": "fever and cough", "vitals": {"heart_rate": 101, "spo2": 93},
                     "labs": [{"name": "white cell count", "value": 14.2, "unit": "10^9/L"}]},
    "studies": [{"id": "xr", "modality": "XR", "body_region": "chest", "path": "cxr.png", "format": "png"}],
    "prior_report": "Prior chest radiograph: clear lungs.",
    "truth": {"diagnosis": "pneumonia", "findings": [{"label": "consolidation", "study_id": "xr"}]},
}


def _write(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.yaml").write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return folder


def test_round_trip_and_truth_hidden_from_agents(tmp_path):
    case = parse_case(GOOD, "case.yaml")
    write_case(case, tmp_path / "c1")
    again = load_case(tmp_path / "c1")
    assert again == case
    seen = again.for_agents()
    assert seen.truth is None and again.truth is not None
    assert "pneumonia" not in seen.model_dump_json()


@pytest.mark.parametrize("patch,field", [
    ({"patient": {"age": "old", "sex": "F"}}, "patient.age"),
    ({"patient": {"age": 61}}, "patient.sex"),
    ({"studies": [{**GOOD["studies"][0], "modality": "PET"}]}, "studies[0].modality"),
    ({"studies": [{**GOOD["studies"][0], "path": "../../etc/passwd"}]}, "studies[0].path"),
    ({"studies": [{**GOOD["studies"][0], "path": "/etc/passwd"}]}, "studies[0].path"),
    ({"presentation": {"complaint": "x", "labs": [{"name": "crp", "value": "high", "unit": "mg/L"}]}},
     "presentation.labs[0].value"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_fields_are_named(patch, field):
    with pytest.raises(CaseDataError) as e:
        parse_case({**GOOD, **patch}, "cases/c1/case.yaml")
    assert e.value.field == field
    assert str(e.value).startswith("cases/c1/case.yaml: " + field + ":")
    assert "\n" not in str(e.value)


def test_symlink_escaping_case_folder_is_refused(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"x")
    folder = _write(tmp_path / "c1", GOOD)
    (folder / "cxr.png").symlink_to(outside)
    with pytest.raises(CaseDataError, match="escapes the case folder"):
        load_case(folder)


def test_validate_reports_every_problem_one_line_each(tmp_path):
    _write(tmp_path / "missing_fields", {"id": "a", "patient": {"age": 200}})
    _write(tmp_path / "bad_yaml", "id: [unclosed\n  patient: {")
    _write(tmp_path / "missing_image", GOOD)
    (tmp_path / "no_case_yaml").mkdir()
    n, problems = validate_cases(tmp_path)
    assert n == 4
    text = [str(p) for p in problems]
    assert all("\n" not in t for t in text)
    assert any("missing_fields/case.yaml: patient.age:" in t for t in text)
    assert any("missing_fields/case.yaml: patient.sex:" in t for t in text)
    assert any("missing_fields/case.yaml: presentation:" in t for t in text)
    assert any("bad_yaml/case.yaml: (yaml): not valid YAML" in t for t in text)
    assert any("missing_image/case.yaml: studies[0].path: 'cxr.png' does not exist" in t for t in text)
    assert any("no_case_yaml/case.yaml: (file): no case.yaml" in t for t in text)


def test_cli_validate_prints_lines_not_tracebacks(tmp_path):
    _write(tmp_path / "bad", {"id": "a", "patient": {"age": "x", "sex": "F"}, "presentation": {"complaint": "c"}})
    r = subprocess.run([sys.executable, "app.py", "cases", "validate", str(tmp_path)], capture_output=True,
                       text=True, cwd=Path(__file__).parents[1])
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert f"{tmp_path}/bad/case.yaml: patient.age:" in r.stdout


def test_case_json_schema_is_exportable():
    schema = Case.model_json_schema()
    assert "truth" in schema["properties"] and "studies" in schema["properties"]


def test_load_study_refuses_nifti_for_an_xr_study(tmp_path):
    """The schema accepts any format per study; the modality/format pairing is checked by load_study."""
    from core.case import Modality, Study, StudyFormat
    from core.imaging.load import load_study

    data = {**GOOD, "studies": [{**GOOD["studies"][0], "path": "cxr.nii.gz", "format": "nifti"}]}
    case = parse_case(data, "case.yaml")  # the model itself does not refuse the combination
    study = case.study("xr")
    assert study.modality is Modality.XR and study.format is StudyFormat.NIFTI
    (tmp_path / "cxr.nii.gz").write_bytes(b"never opened")
    with pytest.raises(CaseDataError) as e:
        load_study(tmp_path, study)
    assert e.value.field == "studies[xr].format"
    assert "nifti" in e.value.problem and "XR" in e.value.problem
    assert e.value.file == str(tmp_path / "case.yaml")
