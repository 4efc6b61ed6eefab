"""The case: one folder with `case.yaml` and its image files.

`truth` is for evals and knowledge learning only; `Case.for_agents()` is what agents see.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.errors import CaseDataError

CASE_FILE = "case.yaml"


class Modality(str, Enum):
    CT = "CT"
    XR = "XR"
    WSI = "WSI"
    MR = "MR"


class StudyFormat(str, Enum):
    DICOM_SERIES = "dicom-series"  # folder of single-slice DICOM files
    DICOM = "dicom"  # one DICOM file (radiograph)
    NIFTI = "nifti"
    PNG = "png"
    SVS = "svs"
    TIFF = "tiff"


FORMATS_BY_MODALITY: dict[Modality, set[StudyFormat]] = {
    Modality.CT: {StudyFormat.DICOM_SERIES, StudyFormat.NIFTI},
    Modality.MR: {StudyFormat.DICOM_SERIES, StudyFormat.NIFTI},
    Modality.XR: {StudyFormat.PNG, StudyFormat.DICOM},
    Modality.WSI: {StudyFormat.SVS, StudyFormat.TIFF},
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False)


class Patient(_Model):
    age: int = Field(ge=0, le=120)
    sex: Literal["F", "M", "U"]


class Vitals(_Model):
    heart_rate: float | None = Field(None, ge=0, le=300, description="beats/min")
    resp_rate: float | None = Field(None, ge=0, le=80, description="breaths/min")
    temperature_c: float | None = Field(None, ge=25, le=45)
    systolic_bp: float | None = Field(None, ge=0, le=300, description="mmHg")
    diastolic_bp: float | None = Field(None, ge=0, le=200, description="mmHg")
    spo2: float | None = Field(None, ge=0, le=100, description="% on room air")


class Lab(_Model):
    name: str = Field(min_length=1)
    value: float
    unit: str
    reference: str | None = None  # e.g. "4.0-11.0"


class Presentation(_Model):
    complaint: str = Field(min_length=1)
    history: str = ""
    vitals: Vitals = Field(default_factory=Vitals)
    labs: list[Lab] = Field(default_factory=list)


class Study(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    modality: Modality
    body_region: str = Field(min_length=1)
    path: str = Field(min_length=1, description="relative to the case folder")
    format: StudyFormat
    description: str = ""
    acquisition: dict[str, float | str | bool] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"path {v!r} escapes the case folder; give it relative to case.yaml")
        return v


class TruthFinding(_Model):
    label: str  # a finding key of the catalogue
    study_id: str | None = None
    location: str = ""
    size_mm: float | None = None
    mask_label: int | None = None  # value of this finding in the study's lesion mask


class RoiBox(_Model):
    study_id: str
    label: str
    box: list[float] = Field(min_length=4, max_length=6)  # [x0, y0, x1, y1] or 3D with z


class MaskRef(_Model):
    study_id: str
    kind: Literal["organs", "lesions"]
    path: str  # relative to the case folder, NIfTI in the study's geometry
    labels: dict[int, str] = Field(default_factory=dict)  # value -> organ name or finding key

    _relative = field_validator("path")(Study._relative.__func__)


class Truth(_Model):
    diagnosis: str  # a disease key of the catalogue
    findings: list[TruthFinding] = Field(default_factory=list)
    masks: list[MaskRef] = Field(default_factory=list)
    roi_boxes: list[RoiBox] = Field(default_factory=list)
    reports: dict[str, str] = Field(default_factory=dict)  # study id -> the study's true report


class Case(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # no leading dot: ids name folders
    patient: Patient
    presentation: Presentation
    studies: list[Study] = Field(default_factory=list)
    prior_report: str | None = None
    truth: Truth | None = None

    def for_agents(self) -> "Case":
        """The case as agents may see it: no truth."""
        return self.model_copy(update={"truth": None}, deep=True)

    def study(self, study_id: str) -> Study:
        for s in self.studies:
            if s.id == study_id:
                return s
        raise KeyError(study_id)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def parse_case(data: object, source: str | Path) -> Case:
    """Validate parsed YAML; the first problem becomes a CaseDataError naming its field."""
    try:
        return Case.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise CaseDataError(source, _field_path(err["loc"]), err["msg"]) from None


def case_problems(data: object, source: str | Path) -> list[CaseDataError]:
    """Every schema problem, one per field (for `cases validate`)."""
    try:
        Case.model_validate(data)
        return []
    except ValidationError as e:
        return [CaseDataError(source, _field_path(x["loc"]), x["msg"]) for x in e.errors()]


def read_case_yaml(folder: str | Path) -> object:
    folder = Path(folder)
    f = folder / CASE_FILE
    if not f.is_file():
        raise CaseDataError(f, "(file)", "no case.yaml in this folder")
    try:
        return yaml.safe_load(f.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CaseDataError(f, "(yaml)", f"not valid YAML: {e}") from None


def load_case(folder: str | Path) -> Case:
    """Read and validate `folder/case.yaml` (schema only; images are loaded by `core.imaging`)."""
    folder = Path(folder)
    case = parse_case(read_case_yaml(folder), folder / CASE_FILE)
    for i, s in enumerate(case.studies):
        resolve_study_path(folder, s, f"studies[{i}].path")
    return case


def resolve_study_path(folder: str | Path, study_or_path: Study | str, field: str = "path") -> Path:
    """Absolute path of a file named in case.yaml, refusing anything outside the case folder."""
    folder = Path(folder).resolve()
    rel = study_or_path.path if isinstance(study_or_path, Study) else study_or_path
    p = (folder / rel).resolve()
    if folder != p and folder not in p.parents:
        raise CaseDataError(folder / CASE_FILE, field, f"path {rel!r} escapes the case folder")
    return p


def write_case(case: Case, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / CASE_FILE
    data = case.model_dump(mode="json", exclude_none=True)
    tmp = f.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(f)
    return f
