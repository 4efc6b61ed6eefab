"""Radiology report text: the cohort's templated reports, and a negation-aware rule reader.

The reader (`read_findings`) is the rule-based baseline that LLM label extraction is measured
against; the generator's tests use it to prove reports agree with the planted findings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from core.catalogue import Catalogue, load_catalogue

Mention = Literal["present", "absent", "uncertain"]

NEGATION_CUES = [
    "no evidence of", "no convincing", "no definite", "negative for", "free of", "without",
    "no ", "not ", "absent", "resolved", "rather than", "there is no", "neither", "nor ",
]
UNCERTAIN_CUES = [
    "possible", "possibly", "probable", "probably", "may represent", "may reflect", "could represent",
    "cannot be excluded", "can not be excluded", "not excluded", "suspicious for", "questionable",
    "likely", "suggestive of", "concerning for", "equivocal", "favour", "favor", "presumed",
]
_SCOPE_BREAK = re.compile(r"\b(but|however|although|though|while|which|with the exception of)\b|;")


@dataclass(frozen=True)
class PlantedMention:
    """What a report should say about one finding."""

    key: str
    location: str = ""
    size_mm: float | None = None
    side: str = ""


# ---------------------------------------------------------------- reading

def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if p.strip()]


def _synonym_patterns(cat: Catalogue) -> list[tuple[re.Pattern, str]]:
    pats = []
    for key, f in cat.findings.items():
        for name in f.names():
            words = re.escape(name.lower()).replace(r"\ ", r"[\s-]+").replace(r"\-", r"[\s-]*")
            pats.append((re.compile(rf"\b{words}\b"), key, len(name)))
    pats.sort(key=lambda p: -p[2])  # longest first, so "pulmonary nodule" beats "nodule"
    return [(p, k) for p, k, _ in pats]


def read_findings(text: str, cat: Catalogue | None = None) -> dict[str, Mention]:
    """Findings mentioned in a report, each present / absent / uncertain (NegEx-style scopes).

    A finding mentioned several times keeps its most positive reading (present > uncertain >
    absent), since reports negate in the pertinent negatives what they may assert elsewhere.
    """
    cat = cat or load_catalogue()
    rank = {"absent": 0, "uncertain": 1, "present": 2}
    out: dict[str, Mention] = {}
    pats = _synonym_patterns(cat)
    for sent in _sentences(text):
        s = sent.lower()
        taken: list[tuple[int, int]] = []
        for pat, key in pats:
            for m in pat.finditer(s):
                if any(a < m.end() and m.start() < b for a, b in taken):
                    continue  # part of a longer synonym already read
                taken.append((m.start(), m.end()))
                # the cue's scope runs from the cue to the finding, unless a break intervenes
                before = s[: m.start()]
                brk = list(_SCOPE_BREAK.finditer(before))
                scope = before[brk[-1].end():] if brk else before
                after = s[m.end():]
                abrk = _SCOPE_BREAK.search(after)
                post = after[: abrk.start()] if abrk else after
                label: Mention = "present"
                if any(c in f" {scope}" for c in NEGATION_CUES):
                    excluded = "not excluded" in post or "cannot be excluded" in post
                    label = "uncertain" if excluded else "absent"
                elif any(c in scope or c in post for c in UNCERTAIN_CUES):
                    label = "uncertain"
                prev = out.get(key)
                if prev is None or rank[label] > rank[prev]:
                    out[key] = label
    return out


# ---------------------------------------------------------------- writing

_SIZE = lambda mm: f"{mm / 10:.1f} cm" if mm and mm >= 30 else f"{mm:.0f} mm" if mm else ""  # noqa: E731

_TEMPLATES: dict[str, list[str]] = {
    "lung_nodule": ["A {size} solid nodule in the {loc}.", "{Size} pulmonary nodule, {loc}.",
                    "There is a {size} nodular opacity in the {loc}."],
    "lung_mass": ["A {size} spiculated mass in the {loc}.", "{Size} mass lesion in the {loc} with irregular margins.",
                  "Large {size} pulmonary mass, {loc}."],
    "consolidation": ["Consolidation in the {loc} with air bronchograms.", "Dense airspace consolidation of the {loc}.",
                      "There is lobar consolidation involving the {loc}."],
    "ground_glass_opacity": ["Patchy ground-glass opacity in the {loc}.", "Ground glass opacities in the {loc}.",
                             "Hazy ground-glass opacification of the {loc}."],
    "pleural_effusion": ["{Side} pleural effusion.", "A {sev} {side_l} pleural effusion.",
                         "{Side} pleural fluid with dependent layering."],
    "pneumothorax": ["{Side} pneumothorax.", "A {sev} {side_l} pneumothorax with a visible pleural line.",
                     "{Side} pneumothorax measuring {size} at its widest."],
    "pericardial_effusion": ["Pericardial effusion.", "A {sev} pericardial effusion.", "Pericardial fluid is present."],
    "emphysema": ["Centrilobular emphysema, upper-lobe predominant.", "Emphysematous changes in both upper lobes.",
                  "Emphysema is present."],
    "pulmonary_embolus": ["Filling defect in the {loc} pulmonary artery, consistent with pulmonary embolus.",
                          "Acute pulmonary emboli in the {loc} pulmonary artery.",
                          "There is a filling defect in the {loc} pulmonary arterial branch."],
    "cardiomegaly": ["Cardiomegaly.", "The heart is enlarged.", "Enlarged cardiac silhouette."],
    "lymphadenopathy": ["Mediastinal lymphadenopathy, the largest node {size} in short axis.",
                        "Enlarged {loc} lymph nodes up to {size}.", "Hilar and mediastinal lymphadenopathy."],
    "atelectasis": ["Subsegmental atelectasis in the {loc}.", "Atelectasis of the {loc}.", "Volume loss with atelectasis, {loc}."],
    "arterial_wall_calcification": ["Aortic wall calcification.", "Atherosclerotic calcification of the thoracic aorta."],
    "coronary_artery_calcification": ["Coronary artery calcification.", "Coronary artery calcifications are noted."],
    "hiatal_hernia": ["Small hiatal hernia.", "A hiatus hernia is present."],
    "bronchiectasis": ["Bronchiectasis in the {loc}.", "Cylindrical bronchiectasis, {loc}."],
    "interlobular_septal_thickening": ["Interlobular septal thickening.", "Smooth septal thickening in both lungs."],
    "peribronchial_thickening": ["Peribronchial thickening.", "Bronchial wall thickening in the lower lobes."],
    "mosaic_attenuation": ["Mosaic attenuation of the lungs.", "Mosaic attenuation pattern in both lungs."],
    "pulmonary_fibrotic_sequela": ["Subpleural reticulation with fibrotic changes, basal predominant.",
                                   "Fibrotic changes with honeycombing in the lower lobes."],
    "cavitation": ["A thick-walled cavity in the {loc}.", "Cavitary lesion in the {loc}."],
    "medical_material": ["{Metal} in place.", "Metallic hardware ({metal_l}) is noted."],
    "gland_formation": ["Tumour cells form glands and acini.", "Gland formation is seen."],
    "keratinisation": ["Keratin pearls and intercellular bridges are seen.", "Keratinisation is present."],
    "nuclear_atypia": ["Nuclei are enlarged, with marked nuclear pleomorphism.", "Marked nuclear atypia."],
    "normal_alveolar_architecture": ["Alveolar architecture is preserved.", "Unremarkable lung parenchyma."],
}
_HEDGES = ["Probable {x}", "Possible {x}", "Findings suspicious for {x}"]
_NEGATIVES = ["No {name}.", "There is no {name}.", "No evidence of {name}.", "No definite {name}."]
_CT_NEG_POOL = ["pleural_effusion", "pneumothorax", "consolidation", "lung_nodule", "pericardial_effusion",
                "lymphadenopathy", "cardiomegaly", "pulmonary_embolus", "emphysema"]
_XR_NEG_POOL = ["pleural_effusion", "pneumothorax", "consolidation", "cardiomegaly"]
_METAL_TEXT = {"spinal_hardware": "spinal fixation hardware", "pacemaker": "a cardiac pacemaker",
               "port": "a port catheter", "sternal_wires": "sternal wires"}


def _finding_sentence(m: PlantedMention, rng: np.random.Generator, hedge: bool, metal: str | None) -> str:
    tpl = str(rng.choice(_TEMPLATES[m.key]))
    side = {"right": "right", "left": "left", "bilateral": "bilateral"}.get(m.side, "")
    sev = str(rng.choice(["small", "moderate", "large"])) if "{sev}" in tpl else ""
    size = _SIZE(m.size_mm) or str(rng.choice(["small", "moderate"]))
    metal_l = _METAL_TEXT.get(metal or "", "surgical material")
    text = tpl.format(size=size, Size=size[:1].upper() + size[1:], loc=m.location or "lungs",
                      Side=(side or "right").capitalize(), side_l=side or "right", sev=sev,
                      Metal=metal_l[:1].upper() + metal_l[1:], metal_l=metal_l)
    if hedge:
        bare = re.sub(r"^(there is an? |there are |an? )", "", text[:1].lower() + text[1:])
        text = str(rng.choice(_HEDGES)).format(x=bare)
    return text


def write_report(mentions: list[PlantedMention], rng: np.random.Generator, *, modality: str,
                 technique: str = "", impression_dx: str | None = None, metal: str | None = None,
                 hedge_rate: float = 0.15, cat: Catalogue | None = None) -> str:
    """A templated report consistent with `mentions`: each is asserted (some hedged), a few
    absent findings from the modality's pool are negated, and the impression sums up."""
    cat = cat or load_catalogue()
    present = {m.key for m in mentions}
    lines = [f"TECHNIQUE: {technique}"] if technique else []
    body = [_finding_sentence(m, rng, bool(rng.random() < hedge_rate), metal) for m in mentions]
    if modality in ("CT", "XR"):
        pool = [k for k in (_CT_NEG_POOL if modality == "CT" else _XR_NEG_POOL) if k not in present]
        # mass and nodule read as the same CT-RATE label: never deny one while asserting the other
        if present & {"lung_mass", "lung_nodule"}:
            pool = [k for k in pool if k not in ("lung_mass", "lung_nodule")]
        for k in rng.permutation(pool)[: int(rng.integers(2, 5))] if pool else []:
            body.append(str(rng.choice(_NEGATIVES)).format(name=cat.findings[k].name))
    if metal and modality == "CT":
        body.append(f"Streak artefact from {_METAL_TEXT.get(metal, 'metal')} degrades the adjacent images.")
    order = rng.permutation(len(body))
    lines.append("FINDINGS: " + " ".join(body[i] for i in order))
    if mentions:
        main = ", ".join(cat.findings[m.key].name for m in mentions[:3])
        imp = main[:1].upper() + main[1:] + "."
        if impression_dx:
            imp += " " + str(rng.choice(["Findings are consistent with {d}.", "Appearances suggest {d}.",
                                         "In the clinical context, {d} is favoured."])).format(d=impression_dx)
    else:
        imp = str(rng.choice(["No acute cardiopulmonary abnormality.", "Normal study.",
                              "No acute abnormality."]))
    lines.append("IMPRESSION: " + imp)
    return "\n".join(lines)
