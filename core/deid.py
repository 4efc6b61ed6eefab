"""DICOM de-identification after the DICOM PS3.15 Annex E basic profile.

Options applied on top of the basic profile (PS3.15 Table E.1-1 column names):
- *Retain Longitudinal Temporal Information with Modified Dates*: every DA / DT value is shifted
  by a whole number of days that is fixed per patient (derived from a salted hash of the original
  PatientID), so one patient's series stay aligned and every interval is preserved exactly.
  Times of day (TM) are kept: the shift is whole days, so a time never needs to move.
- *Retain Patient Characteristics*: age (capped: older than 89 becomes 90, "90+" in the
  metadata), sex, size and weight are kept.
- *Retain Device Identity* only as far as manufacturer and model name (serial numbers, station
  names and device IDs go).
- *Retain UIDs* is NOT applied: every instance UID is replaced by a salted hash (``2.25.<int>``),
  consistently, so references between objects and series stay intact.

Everything else the basic profile names is removed: names (every PN element anywhere), IDs,
addresses, telephone numbers, institution and physician names, free text (every LT / ST / UT
element, plus the descriptions and comments in :data:`PHI_KEYWORDS`), other patient IDs,
device serial numbers, overlays and curves, and every private element.

Burned-in annotation: an image whose ``BurnedInAnnotation`` is ``"YES"`` is refused with a
:class:`~core.errors.CaseDataError` (field ``BurnedInAnnotation``); there is no flag to ignore.

The salt comes from the ``GRANDROUNDS_DEID_SALT`` environment variable, else a built-in default.
A deployment that handles real data must set its own secret salt: with the public default, a
person who knows a patient's original ID can recompute that patient's pseudonym and date shift.

Nothing in this module logs or raises with an element *value*; messages name keywords only.
"""
from __future__ import annotations

import copy as _copy
import datetime as _dt
import hashlib
import os
import re
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from core.errors import CaseDataError

SALT_ENV = "GRANDROUNDS_DEID_SALT"
DEFAULT_SALT = "grandrounds-deid-v1"
DEID_METHOD = "GR PS3.15 basic; modified dates; patient chars; hashed UIDs"

# Keywords removed wherever they occur (top level and inside sequences). PatientName and
# PatientID are replaced (empty / pseudonym) rather than left out: both are type 2 in most IODs.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {
        # patient identity
        "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
        "TypeOfPatientID", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
        "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate", "PatientBirthTime",
        "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar",
        "PatientAlternativeCalendar", "PatientAddress", "PatientTelephoneNumbers",
        "PatientTelecomInformation", "CountryOfResidence", "RegionOfResidence",
        "PatientReligiousPreference", "EthnicGroup", "Occupation", "MilitaryRank",
        "BranchOfService", "MedicalRecordLocator", "PatientInsurancePlanCodeSequence",
        "PatientPrimaryLanguageCodeSequence", "PatientComments", "AdditionalPatientHistory",
        "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus", "LastMenstrualDate",
        "SpecialNeeds", "PatientState", "PatientInstitutionResidence", "ResponsiblePerson",
        "ResponsiblePersonRole", "ResponsibleOrganization", "PersonName", "PersonAddress",
        "PersonTelephoneNumbers", "PersonTelecomInformation", "ReferencedPatientSequence",
        "ReferencedPatientPhotoSequence", "PatientTransportArrangements", "AdmissionID",
        "IssuerOfAdmissionIDSequence", "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence", "DischargeDiagnosisDescription", "ServiceEpisodeID",
        "ServiceEpisodeDescription", "IssuerOfServiceEpisodeIDSequence", "CurrentPatientLocation",
        "AssignedLocation", "VisitComments", "PatientSexNeutered",
        # visit, order and study identifiers
        "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID", "RequestedProcedureID",
        "PerformedProcedureStepID", "ScheduledProcedureStepID", "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest", "OrderEnteredBy", "OrderEntererLocation",
        "OrderCallbackPhoneNumber", "OrderCallbackTelecomInformation", "RequestAttributesSequence",
        "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
        # people and places
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
        "InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence",
        "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
        "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName",
        "ConsultingPhysicianIdentificationSequence", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "PerformingPhysicianName",
        "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "OperatorsName",
        "OperatorIdentificationSequence", "RequestingPhysician", "RequestingService",
        "ScheduledPerformingPhysicianName", "ContentCreatorName",
        "ContentCreatorIdentificationCodeSequence", "VerifyingObserverName",
        "VerifyingObserverSequence", "VerifyingObserverIdentificationCodeSequence",
        "VerifyingOrganization", "AuthorObserverSequence", "ParticipantSequence",
        "CustodialOrganizationSequence", "HumanPerformerName", "HumanPerformerOrganization",
        "IntendedRecipientsOfResultsIdentificationSequence", "DistributionName",
        "DistributionAddress", "ReviewerName", "EvaluatorName", "SecondaryReviewerName",
        # devices and stations
        "DeviceSerialNumber", "DeviceUID", "DeviceID", "StationName", "StationAETitle",
        "PerformedStationName", "PerformedStationAETitle", "PerformedLocation",
        "ScheduledStationName", "ScheduledStationAETitle", "ScheduledProcedureStepLocation",
        "DetectorID", "GantryID", "PlateID", "CassetteID",
        "SourceSerialNumber", "TransducerIdentificationSequence", "SourceApplicationEntityTitle",
        "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
        # free text that can hold PHI
        "StudyDescription", "SeriesDescription", "ImageComments", "FrameComments",
        "AcquisitionComments", "DerivationDescription", "PerformedProcedureStepDescription",
        "ScheduledProcedureStepDescription", "RequestedProcedureDescription",
        "RequestedProcedureComments", "ReasonForStudy", "ReasonForTheRequestedProcedure",
        "ReasonForRequestedProcedureCodeSequence", "ImagingServiceRequestComments",
        "InterpretationText", "InterpretationDiagnosisDescription", "ResultsComments",
        "TextComments", "TextString", "TopicTitle", "TopicSubject", "TopicAuthor",
        "TopicKeywords", "ProtocolName", "AcquisitionDeviceProcessingDescription",
        "IdentifyingComments", "StudyComments", "ClinicalTrialSponsorName",
        "ClinicalTrialProtocolName", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
        "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointDescription",
        "ClinicalTrialCoordinatingCenterName", "ClinicalTrialSeriesDescription",
        "CommentsOnThePerformedProcedureStep", "ContentSequence", "GraphicAnnotationSequence",
        "ModifiedAttributesSequence",
        "OriginalAttributesSequence", "DigitalSignaturesSequence", "EncryptedAttributesSequence",
        "DataSetTrailingPadding", "TimezoneOffsetFromUTC",
    }
)

# UI elements that name a class or syntax (not an instance): never replaced.
_KEEP_UID_KEYWORDS = frozenset(
    {
        "SOPClassUID", "MediaStorageSOPClassUID", "TransferSyntaxUID", "ImplementationClassUID",
        "ReferencedSOPClassUID", "ReferencedSOPClassUIDInFile", "RelatedGeneralSOPClassUID",
        "OriginalSpecializedSOPClassUID", "CodingSchemeUID", "ContextGroupExtensionCreatorUID",
        "MappingResourceUID", "PrivateInformationCreatorUID", "ReferencedTransferSyntaxUIDInFile",
    }
)
_FREE_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_NO_CONTRAST = frozenset({"", "NONE", "NO", "N/A", "NA", "NIL", "0", "-"})


def _salt(salt: str | bytes | None) -> bytes:
    if salt is None:
        salt = os.environ.get(SALT_ENV) or DEFAULT_SALT
    return salt if isinstance(salt, bytes) else str(salt).encode("utf-8")


def _digest(kind: str, value: str, salt: str | bytes | None) -> bytes:
    return hashlib.sha256(_salt(salt) + b"\x00" + kind.encode() + b"\x00" + value.encode("utf-8")).digest()


def hash_uid(uid: str, salt: str | bytes | None = None) -> str:
    """A replacement UID, the same for the same input and salt (``2.25.`` + 128-bit integer)."""
    return "2.25." + str(int.from_bytes(_digest("uid", str(uid).strip(), salt)[:16], "big"))


def patient_key(ds: Dataset) -> str:
    """What the date shift and pseudonym hang on: the original PatientID (else name + birth date)."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return "id:" + pid
    return "nb:" + str(ds.get("PatientName", "") or "").strip() + "|" + str(ds.get("PatientBirthDate", "") or "")


def date_offset_days(key: str, salt: str | bytes | None = None) -> int:
    """Days added to every date of this patient: between -3650 and -366 (always into the past)."""
    return -(366 + int.from_bytes(_digest("date", key, salt)[:8], "big") % 3285)


def pseudonym(key: str, salt: str | bytes | None = None) -> str:
    return "ANON-" + _digest("pid", key, salt).hex()[:12].upper()


def shift_da(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``); None when it is not a date (the caller removes it)."""
    v = str(value).strip()
    if not v:
        return ""
    v = v.replace(".", "")  # ACR-NEMA style YYYY.MM.DD
    if not re.fullmatch(r"\d{8}", v):
        return None
    try:
        d = _dt.date(int(v[:4]), int(v[4:6]), int(v[6:8]))
        return (d + _dt.timedelta(days=days)).strftime("%Y%m%d")
    except (ValueError, OverflowError):
        return None


def shift_dt(value: str, days: int) -> str | None:
    """Shift the date part of a DT value; the time of day and any precision/offset are kept."""
    v = str(value).strip()
    if not v:
        return ""
    if len(v) < 8 or not v[:8].isdigit():
        return None  # year or year-month only: cannot be shifted by days, so it is removed
    head = shift_da(v[:8], days)
    return None if head is None else head + v[8:]


def _parse_da(value: Any) -> _dt.date | None:
    v = str(value or "").strip().replace(".", "")
    if not re.fullmatch(r"\d{8}", v):
        return None
    try:
        return _dt.date(int(v[:4]), int(v[4:6]), int(v[6:8]))
    except ValueError:
        return None


def _age_years(ds: Dataset) -> int | None:
    """Age in whole years from PatientAge, else from birth date and study date."""
    raw = str(ds.get("PatientAge", "") or "").strip().upper()
    m = re.fullmatch(r"(\d{1,3})\s*([DWMY]?)", raw)
    if m:
        n, unit = int(m.group(1)), m.group(2) or "Y"
        return {"Y": n, "M": n // 12, "W": n // 52, "D": n // 365}[unit]
    born = _parse_da(ds.get("PatientBirthDate"))
    when = None
    for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        when = _parse_da(ds.get(kw))
        if when:
            break
    if born and when and when >= born:
        return when.year - born.year - ((when.month, when.day) < (born.month, born.day))
    return None


def check_burned_in(ds: Dataset, source: str | Path) -> None:
    """Refuse an image that says it carries burned-in annotation (text in the pixels)."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise CaseDataError(
            source,
            "BurnedInAnnotation",
            "the image has burned-in annotation (text in the pixels may identify the patient); "
            "refused: remove the annotation and set BurnedInAnnotation to NO",
        )


def _first(v: Any) -> Any:
    if isinstance(v, (MultiValue, list, tuple)):
        return v[0] if len(v) else None
    return v


def _num(v: Any) -> float | None:
    v = _first(v)
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f and abs(f) != float("inf") else None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, (MultiValue, list, tuple)):
        v = "\\".join(str(x) for x in v)
    s = re.sub(r"[\x00-\x1f\x7f]", " ", str(v)).strip()
    return s[:64] or None


def _nums(v: Any) -> list[float] | None:
    if v is None or v == "":
        return None
    seq = list(v) if isinstance(v, (MultiValue, list, tuple)) else [v]
    out = [_num(x) for x in seq]
    return None if not out or any(x is None for x in out) else out  # type: ignore[return-value]


def contrast_present(ds: Dataset) -> bool:
    agent = str(ds.get("ContrastBolusAgent", "") or "").strip().upper()
    if agent not in _NO_CONTRAST:
        return True
    seq = ds.get("ContrastBolusAgentSequence")
    return bool(seq) and len(seq) > 0


def safe_metadata(ds: Dataset, days: int | None = None) -> dict[str, Any]:
    """Acquisition facts that identify no one, read from an allowlist of attributes.

    `days` is the patient's date shift; with it, the shifted study date is included.
    """
    md: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if value is not None and value != [] and value != "":
            md[key] = value

    put("modality", _text(ds.get("Modality")))
    put("sop_class", _text(getattr(ds.get("SOPClassUID"), "name", None)))
    put("manufacturer", _text(ds.get("Manufacturer")))
    put("manufacturer_model", _text(ds.get("ManufacturerModelName")))
    put("body_part", _text(ds.get("BodyPartExamined")))
    put("image_type", _text(ds.get("ImageType")))
    put("patient_position", _text(ds.get("PatientPosition")))
    put("view_position", _text(ds.get("ViewPosition")))
    put("laterality", _text(ds.get("ImageLaterality") or ds.get("Laterality")))
    put("kvp", _num(ds.get("KVP")))
    put("tube_current_ma", _num(ds.get("XRayTubeCurrent")))
    put("exposure_mas", _num(ds.get("Exposure")))
    put("exposure_time_ms", _num(ds.get("ExposureTime")))
    put("ctdi_vol_mgy", _num(ds.get("CTDIvol")))
    put("spiral_pitch", _num(ds.get("SpiralPitchFactor")))
    put("slice_thickness_mm", _num(ds.get("SliceThickness")))
    put("spacing_between_slices_mm", _num(ds.get("SpacingBetweenSlices")))
    put("pixel_spacing_mm", _nums(ds.get("PixelSpacing")))
    put("imager_pixel_spacing_mm", _nums(ds.get("ImagerPixelSpacing")))
    put("convolution_kernel", _text(ds.get("ConvolutionKernel")))
    put("filter_type", _text(ds.get("FilterType")))
    put("contrast_agent", contrast_present(ds))
    put("contrast_route", _text(ds.get("ContrastBolusRoute")) if contrast_present(ds) else None)
    put("magnetic_field_strength_t", _num(ds.get("MagneticFieldStrength")))
    put("repetition_time_ms", _num(ds.get("RepetitionTime")))
    put("echo_time_ms", _num(ds.get("EchoTime")))
    put("inversion_time_ms", _num(ds.get("InversionTime")))
    put("flip_angle_deg", _num(ds.get("FlipAngle")))
    put("scanning_sequence", _text(ds.get("ScanningSequence")))
    put("mr_acquisition_type", _text(ds.get("MRAcquisitionType")))
    put("photometric_interpretation", _text(ds.get("PhotometricInterpretation")))
    put("rows", int(ds.Rows) if ds.get("Rows") is not None else None)
    put("columns", int(ds.Columns) if ds.get("Columns") is not None else None)
    put("bits_stored", int(ds.BitsStored) if ds.get("BitsStored") is not None else None)
    put("window_center", _num(ds.get("WindowCenter")))
    put("window_width", _num(ds.get("WindowWidth")))
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    put("patient_sex", sex if sex in {"M", "F", "O"} else None)
    age = _age_years(ds)
    if age is not None:
        md["patient_age"] = "90+" if age > 89 else age
    if days is not None:
        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            shifted = shift_da(str(ds.get(kw, "") or ""), days)
            if shifted:
                md["study_date_shifted"] = f"{shifted[:4]}-{shifted[4:6]}-{shifted[6:]}"
                break
    md["deidentified"] = True
    return md


def _is_curve_or_overlay(tag) -> bool:
    group = tag.group
    return (0x5000 <= group <= 0x50FF and group % 2 == 0) or (0x6000 <= group <= 0x60FF and group % 2 == 0)


def _clean(ds: Dataset, days: int, salt: str | bytes | None) -> None:
    """Strip, shift and replace in place, recursing into sequences."""
    for elem in list(ds):
        tag, kw, vr = elem.tag, elem.keyword, elem.VR
        if tag.is_private or _is_curve_or_overlay(tag) or kw in PHI_KEYWORDS:
            del ds[tag]
            continue
        if vr == "PN" or vr in _FREE_TEXT_VRS:
            del ds[tag]
            continue
        if vr == "SQ":
            for item in elem.value or []:
                _clean(item, days, salt)
            continue
        value = elem.value
        if value is None or value == "":
            continue
        if vr == "UI":
            if kw in _KEEP_UID_KEYWORDS:
                continue
            vals = list(value) if isinstance(value, (MultiValue, list)) else [value]
            new = [v if str(v) in UID_dictionary else hash_uid(str(v), salt) for v in vals]
            ds[tag].value = new if len(new) > 1 else new[0]
        elif vr in ("DA", "DT"):
            fn = shift_da if vr == "DA" else shift_dt
            vals = list(value) if isinstance(value, (MultiValue, list)) else [value]
            out = [fn(str(v), days) for v in vals]
            if any(o is None for o in out):
                del ds[tag]  # an unparseable date cannot be shifted, so it cannot stay
            else:
                ds[tag].value = out if len(out) > 1 else out[0]
        elif kw == "ContrastBolusAgent":
            ds[tag].value = "" if str(value).strip().upper() in _NO_CONTRAST else "PRESENT"


def deidentify(
    ds: Dataset,
    *,
    source: str | Path = "<dataset>",
    salt: str | bytes | None = None,
    copy: bool = True,
) -> tuple[Dataset, dict[str, Any]]:
    """De-identify one DICOM dataset; return (cleaned dataset, safe acquisition metadata).

    Raises CaseDataError (field BurnedInAnnotation) for an image with burned-in annotation.
    `copy=False` cleans `ds` in place (cheaper for a series read only to be converted).
    """
    check_burned_in(ds, source)
    key = patient_key(ds)
    days = date_offset_days(key, salt)
    metadata = safe_metadata(ds, days)
    age = _age_years(ds)
    sex = str(ds.get("PatientSex", "") or "").strip().upper()

    out = _copy.deepcopy(ds) if copy else ds
    _clean(out, days, salt)

    out.PatientName = ""
    out.PatientID = pseudonym(key, salt)
    if sex in {"M", "F", "O"}:
        out.PatientSex = sex
    if age is not None:
        out.PatientAge = f"{min(age, 90):03d}Y"
    elif "PatientAge" in out:
        del out.PatientAge
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.DeidentificationMethod = DEID_METHOD
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for kw in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                   "ReceivingApplicationEntityTitle", "PrivateInformation",
                   "PrivateInformationCreatorUID"):
            if kw in meta:
                delattr(meta, kw)
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out, metadata


def phi_values(ds: Dataset) -> set[str]:
    """Every identifying string value in `ds` (for tests and audits): PN, PHI keywords, private text."""
    found: set[str] = set()

    def visit(d: Dataset) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    visit(item)
                continue
            if elem.VR == "PN" or elem.keyword in PHI_KEYWORDS or elem.tag.is_private or elem.VR in _FREE_TEXT_VRS:
                vals = elem.value if isinstance(elem.value, (MultiValue, list)) else [elem.value]
                for v in vals:
                    if isinstance(v, (str, bytes)) or v.__class__.__name__ == "PersonName":
                        s = v.decode("latin-1", "replace") if isinstance(v, bytes) else str(v)
                        s = s.strip(" \x00")
                        if len(s) >= 3:
                            found.add(s)

    visit(ds)
    return found


__all__ = [
    "PHI_KEYWORDS", "deidentify", "safe_metadata", "check_burned_in", "hash_uid",
    "date_offset_days", "pseudonym", "patient_key", "shift_da", "shift_dt", "contrast_present",
    "phi_values",
]
