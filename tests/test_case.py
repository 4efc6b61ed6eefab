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


def _malformed_cases(root: Path) -> dict[str, tuple[str, str]]:
    """One case folder per kind of malformed input; name -> (file the line must name, its field)."""
    import gzip
    import os
    import struct

    import nibabel as nib
    import numpy as np
    import pydicom

    base = {"patient": {"age": 60, "sex": "F"}, "presentation": {"complaint": "cough"}}

    def case(name, *studies, **extra):
        return _write(root / name, {"id": name, **base, "studies": list(studies), **extra})

    def study(sid, modality, path, fmt):
        return {"id": sid, "modality": modality, "body_region": "chest", "path": path, "format": fmt}

    expect: dict[str, tuple[str, str]] = {}
    # truncated DICOM: pydicom's own CT_small.dcm, cut in half inside its pixel data
    ct_small = (Path(pydicom.__file__).parent / "data" / "test_files" / "CT_small.dcm").read_bytes()
    d = case("truncated_dicom", study("ct", "CT", "ct", "dicom-series"))
    (d / "ct").mkdir()
    (d / "ct" / "s1.dcm").write_bytes(ct_small[: len(ct_small) // 2])
    expect["truncated_dicom"] = ("ct/s1.dcm", "PixelData")
    # NIfTI whose header is wrong: sizeof_hdr, magic, dim, and a gzip cut short
    vol = np.zeros((6, 6, 6), np.int16)
    for name, off, fmt, val, field in [("nifti_sizeof_hdr", 0, "<i", 999, "sizeof_hdr"),
                                       ("nifti_magic", 344, "4s", b"xyz\0", "magic"),
                                       ("nifti_dim", 42, "<h", -6, "dim"),
                                       ("nifti_datatype", 70, "<h", 9999, "header")]:
        d = case(name, study("ct", "CT", "ct.nii", "nifti"))
        nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "ct.nii")
        raw = bytearray((d / "ct.nii").read_bytes())
        raw[off: off + struct.calcsize(fmt)] = struct.pack(fmt, val)
        (d / "ct.nii").write_bytes(bytes(raw))
        expect[name] = ("ct.nii", field)
    d = case("nifti_gz_truncated", study("ct", "CT", "ct.nii.gz", "nifti"))
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, (40, 40, 40)).astype(np.int16), np.diag([-1, -1, 1, 1])),
             d / "ct.nii.gz")
    whole = gzip.decompress((d / "ct.nii.gz").read_bytes())
    (d / "ct.nii.gz").write_bytes(gzip.compress(whole)[: len(gzip.compress(whole)) // 2])
    expect["nifti_gz_truncated"] = ("ct.nii.gz", "data")
    # YAML with a missing field, and with a wrong-typed one
    _write(root / "yaml_missing", "id: yaml_missing\npatient: {age: 61, sex: F}\n")
    expect["yaml_missing"] = ("case.yaml", "presentation")
    _write(root / "yaml_wrong_type", "id: yaml_wrong_type\npatient: {age: old, sex: F}\npresentation: {complaint: c}\n")
    expect["yaml_wrong_type"] = ("case.yaml", "patient.age")
    # a text file named .svs
    d = case("text_svs", {**study("wsi", "WSI", "slide.svs", "svs"), "body_region": "lung"})
    (d / "slide.svs").write_text("this is not a slide\n" * 50)
    expect["text_svs"] = ("slide.svs", "format")
    d = case("empty_tiff_svs", {**study("wsi", "WSI", "slide.svs", "svs"), "body_region": "lung"})
    (d / "slide.svs").write_bytes(b"II*\0" + bytes(100))  # a TIFF header and nothing else
    expect["empty_tiff_svs"] = ("slide.svs", "format")
    # paths escaping the case folder: ../, absolute, and a symlink pointing outside
    outside = root.parent / f"{root.name}_outside.png"
    outside.write_bytes(b"\x89PNG\r\n\x1a\n")
    case("escape_dotdot", study("xr", "XR", f"../{outside.name}", "png"))
    expect["escape_dotdot"] = ("case.yaml", "studies[0].path")
    case("escape_absolute", study("xr", "XR", str(outside), "png"))
    expect["escape_absolute"] = ("case.yaml", "studies[0].path")
    d = case("escape_symlink", study("xr", "XR", "cxr.png", "png"))
    os.symlink(outside, d / "cxr.png")
    expect["escape_symlink"] = ("case.yaml", "studies[0].path")
    case("escape_mask", truth={"diagnosis": "normal", "masks": [
        {"study_id": "ct", "kind": "organs", "path": "../x.nii.gz"}]})
    expect["escape_mask"] = ("case.yaml", "truth.masks[0].path")
    return expect


def test_cli_validate_malformed_inputs_one_line_each_naming_the_file(tmp_path):
    """Issue 2's list of malformed inputs, through the real CLI: one line per problem, each naming
    its file and field; no traceback and no stray library output on stderr."""
    root = tmp_path / "cases"
    expect = _malformed_cases(root)
    r = subprocess.run([sys.executable, "app.py", "cases", "validate", str(root)], capture_output=True,
                       text=True, cwd=Path(__file__).parents[1], timeout=300)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [f"{len(r.stdout.splitlines())} problem(s) in {len(expect)} case "
                                             "folder(s)"], r.stderr
    lines = r.stdout.splitlines()
    for name, (file, field) in expect.items():
        mine = [ln for ln in lines if ln.startswith(f"{root}/{name}/")]
        assert len(mine) == 1, (name, mine)
        assert mine[0].startswith(f"{root}/{name}/{file}: {field}: "), (name, mine)
    assert len(lines) == len(expect)
