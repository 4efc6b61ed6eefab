"""The disease catalogue (core/catalogue.yaml) as typed data, and name normalisation."""
from __future__ import annotations

import difflib
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

CATALOGUE_FILE = Path(__file__).with_name("catalogue.yaml")
# CT-RATE's 18 abnormality columns (Hamamci et al.), lower-cased, in the dataset's order.
CT_RATE_LABELS = (
    "medical material", "arterial wall calcification", "cardiomegaly", "pericardial effusion",
    "coronary artery wall calcification", "hiatal hernia", "lymphadenopathy", "emphysema", "atelectasis",
    "lung nodule", "lung opacity", "pulmonary fibrotic sequela", "pleural effusion", "mosaic attenuation pattern",
    "peribronchial thickening", "consolidation", "bronchiectasis", "interlobular septal thickening")


class FindingDef(BaseModel):
    key: str
    name: str
    synonyms: list[str] = Field(default_factory=list)
    ct_rate: str | None = None  # CT-RATE abnormality label this finding counts towards
    xr: bool = False  # visible on a chest radiograph

    def names(self) -> list[str]:
        return [self.name, self.key.replace("_", " "), *self.synonyms]


class LabDef(BaseModel):
    key: str
    name: str
    unit: str
    reference: str
    normal: tuple[float, float]  # mean, sd in health
    min: float = 0.0


class DiseaseDef(BaseModel):
    key: str
    name: str
    synonyms: list[str] = Field(default_factory=list)
    domain: Literal["chest", "pathology"]
    weight: float = 1.0
    age: tuple[float, float]
    contrast: bool = False
    key_findings: list[str] = Field(default_factory=list)  # at least one is planted
    findings: dict[str, float] = Field(default_factory=dict)  # P(finding | disease)
    complaints: list[str]
    history: list[str]
    vitals: dict[str, tuple[float, float]] = Field(default_factory=dict)
    labs: dict[str, tuple[float, float]] = Field(default_factory=dict)
    slide_class: str | None = None

    def names(self) -> list[str]:
        return [self.name, self.key.replace("_", " "), *self.synonyms]


class Catalogue(BaseModel):
    findings: dict[str, FindingDef]
    labs: dict[str, LabDef]
    normal_vitals: dict[str, tuple[float, float]]
    diseases: dict[str, DiseaseDef]

    @model_validator(mode="after")
    def _consistent(self) -> "Catalogue":
        for d in self.diseases.values():
            for f in [*d.findings, *d.key_findings]:
                if f not in self.findings:
                    raise ValueError(f"disease {d.key}: unknown finding {f!r}")
            for lab in d.labs:
                if lab not in self.labs:
                    raise ValueError(f"disease {d.key}: unknown lab {lab!r}")
        return self

    def disease(self, key: str) -> DiseaseDef:
        return self.diseases[key]

    def chest_diseases(self) -> list[DiseaseDef]:
        return [d for d in self.diseases.values() if d.domain == "chest"]

    def pathology_diseases(self) -> list[DiseaseDef]:
        return [d for d in self.diseases.values() if d.domain == "pathology"]

    def ct_rate_labels(self) -> list[str]:
        """The 18 CT-RATE abnormality labels, in CT-RATE's column order."""
        present = {f.ct_rate for f in self.findings.values() if f.ct_rate}
        missing = [lab for lab in CT_RATE_LABELS if lab not in present]
        if missing:
            raise ValueError(f"catalogue maps no finding to CT-RATE label(s) {missing}")
        return list(CT_RATE_LABELS)

    def ct_rate_vector(self, finding_keys) -> list[int]:
        """0/1 per CT-RATE label for a set of catalogue finding keys (several findings may count
        towards one label, e.g. lung mass -> lung nodule; findings without a label are ignored)."""
        hit = {self.findings[k].ct_rate for k in finding_keys if k in self.findings}
        return [int(lab in hit) for lab in CT_RATE_LABELS]

    def normalise_disease(self, text: str, cutoff: float = 0.85) -> str | None:
        """Map a free-text diagnosis to a catalogue key (exact name/synonym, then close match)."""
        return _lookup(text, {k: d.names() for k, d in self.diseases.items()}, cutoff)

    def normalise_finding(self, text: str, cutoff: float = 0.85) -> str | None:
        return _lookup(text, {k: f.names() for k, f in self.findings.items()}, cutoff)


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _lookup(text: str, names: dict[str, list[str]], cutoff: float) -> str | None:
    table = {}
    for key, ns in names.items():
        for n in ns:
            table.setdefault(_norm(n), key)  # first definition wins on a shared synonym
    t = _norm(text)
    if t in table:
        return table[t]
    close = difflib.get_close_matches(t, list(table), n=1, cutoff=cutoff)
    return table[close[0]] if close else None


@lru_cache(maxsize=4)
def load_catalogue(path: Path = CATALOGUE_FILE) -> Catalogue:
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for section in ("findings", "labs", "diseases"):
        for key, entry in raw[section].items():
            entry["key"] = key
    return Catalogue.model_validate(raw)
