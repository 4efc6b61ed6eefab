"""Evaluator: normalise each diagnostician's answer to the catalogue, decide agreement, check citations."""
from __future__ import annotations

import re
from collections import Counter

from agents.evidence import SIMILAR_PREFIX
from agents.schemas import Claim, RoundRecord
from core.catalogue import Catalogue
from core.reports import NEGATION_CUES, read_findings

SLIDE_PREFIX = "slide_class:"
_INFERENCE = re.compile(r",?\s*\b(?:which\s+)?(?:favou?rs?|favou?ring|supports?|supporting|suggests?|suggesting|"
                        r"points?\s+to|argues?\s+for|is\s+consistent\s+with|consistent\s+with)\b", re.I)


def _slide_class_mention(statement: str, cited_tools: list[dict]) -> tuple[str, bool] | None:
    """The first slide class (of those the cited tools report) the statement names, and whether it says it is
    present: "No lung squamous cell carcinoma (p=0.02) favours ..." -> (lung_squamous_cell_carcinoma, False).
    Only the first is read: the rest of such a sentence names the diagnosis it favours, not tool evidence."""
    classes = {f["label"][len(SLIDE_PREFIX):] for r in cited_tools for f in r.get("findings", [])
               if f["label"].startswith(SLIDE_PREFIX)}
    low, best = statement.lower(), None
    for c in classes:
        m = re.search(r"\b" + re.escape(c.replace("_", " ")).replace(r"\ ", r"[\s_-]+") + r"\b", low)
        if m and (best is None or m.start() < best[1]):
            best = (c, m.start())
    if best is None:
        return None
    before = " " + re.split(r"[.;:]", low[:best[1]])[-1]
    return best[0], not any(cue in before for cue in NEGATION_CUES)


def normalise(diagnosis: str, cat: Catalogue) -> str | None:
    return diagnosis if diagnosis in cat.diseases else cat.normalise_disease(diagnosis)


def evaluate(opinions: list[dict], round_: int, cat: Catalogue, rule: str = "all") -> RoundRecord:
    votes = {o["agent"]: normalise(o["diagnosis"], cat) or o["diagnosis"] for o in opinions}
    counts = Counter(votes.values())
    top, n = counts.most_common(1)[0]
    agree = n == len(votes) if rule == "all" else n > len(votes) / 2
    return RoundRecord(round=round_, votes=votes, agree=agree)


_PATTERNS: dict[int, list[tuple[re.Pattern, str]]] = {}


def _disease_patterns(cat: Catalogue) -> list[tuple[re.Pattern, str]]:
    if id(cat) in _PATTERNS:
        return _PATTERNS[id(cat)]
    pats = []
    for key, d in cat.diseases.items():
        for name in d.names():
            words = re.escape(name.lower()).replace(r"\ ", r"[\s-]+")
            pats.append((re.compile(rf"\b{words}\b", re.I), key, len(name)))
    pats.sort(key=lambda p: -p[2])  # longest first
    _PATTERNS[id(cat)] = [(p, k) for p, k, _ in pats]
    return _PATTERNS[id(cat)]


def diseases_named(text: str, cat: Catalogue) -> tuple[set[str], str]:
    """(catalogue diseases named in text, the text with those names blanked out)."""
    found = set()
    for pat, key in _disease_patterns(cat):
        if pat.search(text):
            found.add(key)
            text = pat.sub(" ", text)
    return found, text


def _retrieved_verdicts(tools: list[dict]) -> dict[str, tuple[int, int]]:
    """disease -> (count, k) from cited similar-case retrieval results."""
    out = {}
    for r in tools:
        for f in r.get("findings", []):
            if f["label"].startswith(SIMILAR_PREFIX) and f.get("value") is not None and f.get("probability"):
                k = round(f["value"] / f["probability"])
                out[f["label"][len(SIMILAR_PREFIX):]] = (int(f["value"]), int(k))
    return out


def _similar_claim_holds(statement: str, verdicts: dict[str, tuple[int, int]], cat: Catalogue) -> tuple[bool, str]:
    """A claim citing similar-case retrieval must name a verdict the retrieval reported, and any
    "a/b similar ... cases were X" it states must match the retrieved counts. Returns (holds, the
    statement with disease names removed, for the finding check)."""
    named, rest = diseases_named(statement, cat)
    if not named & set(verdicts):
        return False, rest
    for a, b, tail in re.findall(r"(\d+)\s*(?:/|of|out of)\s*(\d+)\s+(?:of\s+the\s+)?(?:most\s+)?similar[^.;]*?"
                                 r"(?:were|was|had)\s+([^.;,]+)", statement, re.I):
        said, _ = diseases_named(tail, cat)
        for dx in said:
            if verdicts.get(dx, (0, int(b))) != (int(a), int(b)):
                return False, rest
    return True, rest


def check_claim(claim: Claim, results: dict[str, dict], insight_ids: set[str], cat: Catalogue) -> bool:
    """A claim holds when every cited id exists (ok tool result or insight) and, where it names
    catalogue findings (or a slide class of a cited pathology tool), a cited tool result reports them the
    same way (present/absent). A claim
    citing similar-case retrieval must also name a verdict the retrieved cases had (with the
    counts the retrieval reported, if it gives any)."""
    if not claim.cites:
        return False
    for c in claim.cites:
        if c not in insight_ids and (c not in results or results[c]["status"] != "ok"):
            return False
    cited_tools = [results[c] for c in claim.cites if c in results]
    statement = claim.statement
    verdicts = _retrieved_verdicts(cited_tools)
    if verdicts:
        holds, statement = _similar_claim_holds(statement, verdicts, cat)
        if not holds:
            return False
    slide = _slide_class_mention(statement, cited_tools)
    if slide is not None:
        cls, present = slide
        if not any(f["label"] == SLIDE_PREFIX + cls and bool(f.get("present", True)) == present
                   for r in cited_tools for f in r.get("findings", [])):
            return False
        statement = re.sub(re.escape(cls.replace("_", " ")), " ", statement, flags=re.I)
    # read the evidence, not the inference: "favours"/"suggests" are hedges to a report reader and would
    # make every "X favours Y" claim's finding uncertain, hence unchecked
    evidence = _INFERENCE.split(statement, maxsplit=1)[0]
    mentioned = read_findings(evidence if evidence.strip() else statement, cat)
    if slide is not None and not mentioned:
        return True  # rests on the slide class, checked above
    if verdicts and not mentioned:
        return True  # rests on the retrieved verdicts, checked above
    if not mentioned:
        return not cited_tools  # an insight-only claim; a tool citation must say which finding it rests on
    for key, status in mentioned.items():
        if status == "uncertain":
            continue
        want = status == "present"
        if not any(f["label"] == key and bool(f.get("present", True)) == want
                   for r in cited_tools for f in r.get("findings", [])):
            return False
    return True
