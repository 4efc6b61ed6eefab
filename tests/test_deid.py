"""De-identification: no PHI reaches metadata or logs; dates, UIDs and ages handled per PS3.15."""
from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import config as pdconfig
from pydicom.data import get_testdata_file

from core.deid import (
    date_offset_days,
    deidentify,
    hash_uid,
    patient_key,
    phi_values,
    pseudonym,
    safe_metadata,
)
from core.errors import CaseDataError
from core.imaging.dicom import load_dicom_image, load_dicom_series, write_dicom_radiograph, write_dicom_series
from core.imaging.types import Radiograph, Volume

JOHN = {"name": "DOE^JOHN", "id": "PID123", "birth_date": "19500101", "sex": "M", "age": 74}
JANE = {"name": "ROE^JANE", "id": "PID999", "birth_date": "19610704", "sex": "F", "age": 62}
EXTRA_PHI = {
    "InstitutionName": "SAINT ELSEWHERE HOSPITAL",
    "InstitutionAddress": "12 ELM STREET SPRINGFIELD",
    "ReferringPhysicianName": "HOUSE^GREGORY",
    "OperatorsName": "NURSE^RATCHED",
    "StationName": "CTSCANNER7ROOM",
    "DeviceSerialNumber": "SN-88442211",
    "AccessionNumber": "ACC778899",
    "OtherPatientIDs": "MRN-5551212",
    "PatientAddress": "742 EVERGREEN TERRACE",
    "StudyDescription": "CT CHEST FOR JOHN DOE",
    "SeriesDescription": "JOHNS SERIES",
    "ImageComments": "patient John Doe called 555-0199",
}
PRIVATE_TEXT = "PRIVATE-VENDOR-SECRET-DOEJOHN"
PHI_STRINGS = ["DOE^JOHN", "DOE", "JOHN", "PID123", "19500101", *EXTRA_PHI.values(), PRIVATE_TEXT,
               "Doe", "John"]


def _vol(shape=(3, 8, 8)) -> Volume:
    arr = np.linspace(-900, 900, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    return Volume(array=arr, spacing=(2.0, 0.7, 0.7), source=Path("<mem>"), origin=(0.0, 0.0, 0.0))


def _add_phi(ds: pydicom.Dataset) -> None:
    for kw, v in EXTRA_PHI.items():
        setattr(ds, kw, v)
    block = ds.private_block(0x0019, "ACME SECRETS", create=True)
    block.add_new(0x01, "LO", PRIVATE_TEXT)
    block.add_new(0x02, "DS", "42")


def _write_series(folder: Path, patient: dict, *, study_date="20240115", uid_seed="s1", phi=True,
                  study_uid=None, series_number=1) -> list[Path]:
    paths = write_dicom_series(_vol(), folder, patient=patient, study_date=study_date, uid_seed=uid_seed,
                               study_uid=study_uid, series_number=series_number)
    if phi:
        for p in paths:
            ds = pydicom.dcmread(p)
            _add_phi(ds)
            ds.save_as(p)
    return paths


def _leaks(text: str) -> list[str]:
    return [s for s in PHI_STRINGS if s in text]


def test_phi_is_really_in_the_files(tmp_path):
    """Guard: the fixture carries the identity we then check is gone."""
    p = _write_series(tmp_path / "s", JOHN)[0]
    ds = pydicom.dcmread(p)
    found = phi_values(ds)
    assert {"DOE^JOHN", "PID123", "19500101", PRIVATE_TEXT, "SAINT ELSEWHERE HOSPITAL"} <= found
    assert any(e.tag.is_private for e in ds)


def test_loaded_volume_metadata_and_logs_hold_no_phi(tmp_path, caplog):
    _write_series(tmp_path / "s", JOHN)
    (tmp_path / "s" / "notes.txt").write_text("skipped side file")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    pdconfig.debug(True, default_handler=False)  # pydicom's debug log quotes every element value
    try:
        vol = load_dicom_series(tmp_path / "s")
    finally:
        pdconfig.debug(False, default_handler=False)
    md = vol.metadata
    dumped = json.dumps(md) + repr(md) + repr(vol)
    assert _leaks(dumped) == []
    assert _leaks(caplog.text) == [], caplog.text[:2000]
    assert md["deidentified"] is True
    assert md["patient_sex"] == "M" and md["patient_age"] == 74
    assert "study_date_shifted" in md and md["study_date_shifted"] != "2024-01-15"
    assert md["modality"] == "CT"
    for key in md:  # an allowlist: nothing named after identity fields
        assert not any(w in key.lower() for w in ("name", "institution", "address", "physician", "birth"))


def test_loaded_radiograph_metadata_holds_no_phi(tmp_path, caplog):
    rad = Radiograph(array=np.full((20, 20), 0.5, np.float32), spacing=(0.2, 0.2), source=Path("<mem>"))
    p = write_dicom_radiograph(rad, tmp_path / "cxr.dcm", patient=JOHN, study_date="20240115", uid_seed="r")
    ds = pydicom.dcmread(p)
    _add_phi(ds)
    ds.save_as(p)
    caplog.set_level(logging.DEBUG)
    out = load_dicom_image(p)
    assert _leaks(json.dumps(out.metadata) + repr(out.metadata) + caplog.text) == []


def test_real_file_identity_does_not_reach_metadata(tmp_path):
    src = get_testdata_file("CT_small.dcm", download=False)
    raw = pydicom.dcmread(src)
    secrets = {str(raw.PatientName), str(raw.PatientID), str(raw.InstitutionName)}
    assert all(len(s) >= 3 for s in secrets)
    shutil.copy(src, tmp_path / "a.dcm")
    vol = load_dicom_series(tmp_path)
    text = json.dumps(vol.metadata)
    assert not [s for s in secrets if s in text]


def test_deidentified_dataset_is_clean_and_private_tags_removed(tmp_path):
    p = _write_series(tmp_path / "s", JOHN)[0]
    ds = pydicom.dcmread(p)
    clean, md = deidentify(ds)
    assert phi_values(clean) == {clean.PatientID}  # only the pseudonym is left
    assert not any(e.tag.is_private for e in clean)
    for kw in EXTRA_PHI:
        assert kw not in clean, kw
    assert "PatientBirthDate" not in clean
    assert str(clean.PatientName) == ""
    assert clean.PatientID == pseudonym("id:PID123") != "PID123"
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.LongitudinalTemporalInformationModified == "MODIFIED"
    # nothing identifying anywhere in the written-out bytes either
    out = tmp_path / "clean.dcm"
    clean.save_as(out)
    blob = out.read_bytes()
    for s in ["DOE^JOHN", "PID123", "19500101", PRIVATE_TEXT, "SAINT ELSEWHERE", "ACME SECRETS"]:
        assert s.encode() not in blob, s
    # the original is untouched (copy=True default)
    assert str(ds.PatientName) == "DOE^JOHN" and "InstitutionName" in ds


def test_private_tags_inside_sequences_removed():
    ds = pydicom.Dataset()
    ds.PatientID = "PID123"
    item = pydicom.Dataset()
    item.CodeValue = "123"
    blk = item.private_block(0x0011, "ACME", create=True)
    blk.add_new(0x10, "LO", PRIVATE_TEXT)
    item.PersonName = "DOE^JOHN"
    ds.ProcedureCodeSequence = [item]
    clean, _ = deidentify(ds)
    inner = clean.ProcedureCodeSequence[0]
    assert inner.CodeValue == "123"
    assert not any(e.tag.is_private for e in inner)
    assert "PersonName" not in inner


def _shifted(vol: Volume) -> dt.date:
    return dt.date.fromisoformat(vol.metadata["study_date_shifted"])


def test_date_shift_consistent_per_patient_and_differs_between_patients(tmp_path):
    _write_series(tmp_path / "j1", JOHN, study_date="20240115", uid_seed="j1")
    _write_series(tmp_path / "j2", JOHN, study_date="20240301", uid_seed="j2")
    _write_series(tmp_path / "r1", JANE, study_date="20240115", uid_seed="r1")
    j1, j2, r1 = (load_dicom_series(tmp_path / n) for n in ("j1", "j2", "r1"))
    # interval between John's two studies preserved exactly
    assert (_shifted(j2) - _shifted(j1)).days == (dt.date(2024, 3, 1) - dt.date(2024, 1, 15)).days
    john_offset = (_shifted(j1) - dt.date(2024, 1, 15)).days
    jane_offset = (_shifted(r1) - dt.date(2024, 1, 15)).days
    assert john_offset == date_offset_days("id:PID123")
    assert jane_offset == date_offset_days("id:PID999")
    assert john_offset != jane_offset
    assert -3650 <= john_offset <= -366 and -3650 <= jane_offset <= -366
    # every date of the dataset moves by the same amount; times of day are kept
    ds = pydicom.dcmread(sorted((tmp_path / "j1").glob("*.dcm"))[0])
    clean, _ = deidentify(ds)
    expect = (dt.date(2024, 1, 15) + dt.timedelta(days=john_offset)).strftime("%Y%m%d")
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        assert clean.data_element(kw).value == expect, kw
    assert clean.StudyTime == ds.StudyTime


def test_salt_changes_the_shift_and_pseudonym():
    assert date_offset_days("id:PID123", salt="a") == date_offset_days("id:PID123", salt="a")
    shifts = {date_offset_days("id:PID123", salt=s) for s in ("a", "b", "c", "d")}
    assert len(shifts) > 1
    assert pseudonym("id:PID123", "a") != pseudonym("id:PID123", "b")


def test_uids_hashed_deterministically_and_references_kept(tmp_path):
    study_uid = "1.2.840.99999.1.1"
    a = _write_series(tmp_path / "a", JOHN, uid_seed="a", study_uid=study_uid, series_number=1)
    b = _write_series(tmp_path / "b", JOHN, uid_seed="b", study_uid=study_uid, series_number=2)
    da, db = pydicom.dcmread(a[0]), pydicom.dcmread(b[0])
    ca1, _ = deidentify(da)
    ca2, _ = deidentify(da)
    cb, _ = deidentify(db)
    for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        new = ca1.data_element(kw).value
        assert new == ca2.data_element(kw).value  # deterministic
        assert new != da.data_element(kw).value  # replaced
        assert new == hash_uid(da.data_element(kw).value)
        assert new.startswith("2.25.") and len(new) <= 64
        assert all(part.isdigit() and (part == "0" or not part.startswith("0")) for part in new.split("."))
    assert ca1.StudyInstanceUID == cb.StudyInstanceUID  # same study stays one study
    assert ca1.SeriesInstanceUID != cb.SeriesInstanceUID
    assert ca1.SOPClassUID == da.SOPClassUID  # class UIDs are not identifiers
    assert ca1.file_meta.MediaStorageSOPInstanceUID == ca1.SOPInstanceUID
    assert ca1.file_meta.TransferSyntaxUID == da.file_meta.TransferSyntaxUID
    other_salt, _ = deidentify(da, salt="another-secret")
    assert other_salt.SOPInstanceUID != ca1.SOPInstanceUID


@pytest.mark.parametrize("patient,expect_md,expect_tag", [
    ({"id": "OLD1", "birth_date": "19200101", "sex": "F", "age": 95}, "90+", "090Y"),
    ({"id": "OLD2", "birth_date": "19300615", "sex": "F", "age": 90}, "90+", "090Y"),
    ({"id": "OLD3", "birth_date": "19340101", "sex": "F", "age": 89}, 89, "089Y"),
    # no PatientAge: derived from birth date and study date (2024-01-15), still capped
    ({"id": "OLD4", "birth_date": "19200101", "sex": "M"}, "90+", "090Y"),
    ({"id": "OLD5", "birth_date": "19340116", "sex": "M"}, 89, "089Y"),
])
def test_age_over_89_capped(tmp_path, patient, expect_md, expect_tag):
    p = write_dicom_series(_vol((1, 4, 4)), tmp_path / "s", patient=patient, study_date="20240115",
                           uid_seed=patient["id"])[0]
    ds = pydicom.dcmread(p)
    clean, md = deidentify(ds)
    assert md["patient_age"] == expect_md
    assert clean.PatientAge == expect_tag
    assert load_dicom_series(tmp_path / "s").metadata["patient_age"] == expect_md


def test_burned_in_annotation_refused(tmp_path):
    paths = _write_series(tmp_path / "s", JOHN)
    ds = pydicom.dcmread(paths[1])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(paths[1])
    with pytest.raises(CaseDataError) as e:
        load_dicom_series(tmp_path / "s")
    assert e.value.field == "BurnedInAnnotation"
    assert e.value.file == str(paths[1])
    assert _leaks(str(e.value).replace(str(tmp_path), "")) == []


def test_burned_in_annotation_refused_for_radiograph(tmp_path):
    rad = Radiograph(array=np.zeros((8, 8), np.float32), spacing=(0.2, 0.2), source=Path("<mem>"))
    p = write_dicom_radiograph(rad, tmp_path / "cxr.dcm", patient=JOHN, study_date="20240115", uid_seed="r")
    ds = pydicom.dcmread(p)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(p)
    with pytest.raises(CaseDataError) as e:
        load_dicom_image(p)
    assert e.value.field == "BurnedInAnnotation"


def test_safe_metadata_is_an_allowlist():
    ds = pydicom.Dataset()
    ds.PatientName = "DOE^JOHN"
    ds.InstitutionName = "SAINT ELSEWHERE HOSPITAL"
    ds.Modality = "CT"
    ds.KVP = "120"
    ds.ContrastBolusAgent = "OMNIPAQUE given by Dr DOE"
    md = safe_metadata(ds)
    assert md["modality"] == "CT" and md["kvp"] == 120.0
    assert md["contrast_agent"] is True
    assert _leaks(json.dumps(md)) == []


def test_patient_key_falls_back_to_name_and_birth_date():
    a, b = pydicom.Dataset(), pydicom.Dataset()
    a.PatientName, a.PatientBirthDate = "DOE^JOHN", "19500101"
    b.PatientName, b.PatientBirthDate = "DOE^JOHN", "19500101"
    assert patient_key(a) == patient_key(b)
    b.PatientBirthDate = "19500102"
    assert patient_key(a) != patient_key(b)
    clean, _ = deidentify(a)
    assert clean.PatientID.startswith("ANON-") and "JOHN" not in clean.PatientID


def test_case_folder_end_to_end_no_phi_in_case_json_metadata_logs_or_validate(tmp_path, caplog):
    """A case folder whose DICOM files carry a full identity: nothing of it survives into the Case
    object, its JSON (as stored and as agents see it), the loaded images' metadata, any log line
    (pydicom's debug log included), or `cases validate` output (error lines included)."""
    import yaml
    from typer.testing import CliRunner

    from app import app
    from core.case import load_case
    from core.imaging.load import load_study

    def make(folder: Path) -> Path:
        _write_series(folder / "ct", JOHN)
        rad = Radiograph(array=np.full((20, 20), 0.5, np.float32), spacing=(0.2, 0.2), source=Path("<mem>"))
        p = write_dicom_radiograph(rad, folder / "cxr.dcm", patient=JOHN, study_date="20240115", uid_seed="r")
        ds = pydicom.dcmread(p)
        _add_phi(ds)
        ds.save_as(p)
        (folder / "case.yaml").write_text(yaml.safe_dump({
            "id": folder.name, "patient": {"age": 74, "sex": "M"}, "presentation": {"complaint": "cough"},
            "studies": [{"id": "ct", "modality": "CT", "body_region": "chest", "path": "ct", "format": "dicom-series"},
                        {"id": "xr", "modality": "XR", "body_region": "chest", "path": "cxr.dcm", "format": "dicom"}],
            "truth": {"diagnosis": "normal"}}))
        return folder

    good = make(tmp_path / "cases" / "good")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    pdconfig.debug(True, default_handler=False)
    try:
        case = load_case(good)
        loaded = [load_study(good, s) for s in case.studies]
    finally:
        pdconfig.debug(False, default_handler=False)
    assert "DOE^JOHN" in str(pydicom.dcmread(good / "cxr.dcm").PatientName)  # the files do carry it
    text = (case.model_dump_json() + case.for_agents().model_dump_json() + repr(case)
            + "".join(json.dumps(x.metadata, default=str) + repr(x) for x in loaded) + caplog.text)
    assert _leaks(text) == [], _leaks(text)
    assert all(x.metadata["deidentified"] is True for x in loaded)
    # error paths: a truncated slice and a burned-in annotation, reported by `cases validate`
    bad = make(tmp_path / "cases" / "truncated")
    victim = sorted((bad / "ct").glob("*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-40])
    burned = make(tmp_path / "cases" / "burned")
    ds = pydicom.dcmread(burned / "cxr.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(burned / "cxr.dcm")
    r = CliRunner().invoke(app, ["cases", "validate", str(tmp_path / "cases")])
    assert r.exit_code == 1
    out = r.output.replace(str(tmp_path), "")
    assert "/truncated/ct/" in out and "/burned/cxr.dcm: BurnedInAnnotation:" in out, out
    assert _leaks(out + caplog.text) == [], out
