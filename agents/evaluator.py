"""Evaluator: normalise each diagnostician's answer to the catalogue, decide agreement, check citations."""
from __future__ import annotations

from collections import Counter

from agents.schemas import Claim, RoundRecord
from core.catalogue import Catalogue
from core.reports import read_findings


def normalise(diagnosis: str, cat: Catalogue) -> str | None:
    return diagnosis if diagnosis in cat.diseases else cat.normalise_disease(diagnosis)


def evaluate(opinions: list[dict], round_: int, cat: Catalogue, rule: str = "all") -> RoundRecord:
    votes = {o["agent"]: normalise(o["diagnosis"], cat) or o["diagnosis"] for o in opinions}
    counts = Counter(votes.values())
    top, n = counts.most_common(1)[0]
    agree = n == len(votes) if rule == "all" else n > len(votes) / 2
    return RoundRecord(round=round_, votes=votes, agree=agree)


def check_claim(claim: Claim, results: dict[str, dict], insight_ids: set[str], cat: Catalogue) -> bool:
    """A claim holds when every cited id exists (ok tool result or insight) and, where it names
    catalogue findings, a cited tool result reports them the same way (present/absent)."""
    if not claim.cites:
        return False
    for c in claim.cites:
        if c not in insight_ids and (c not in results or results[c]["status"] != "ok"):
            return False
    mentioned = read_findings(claim.statement, cat)
    cited_tools = [results[c] for c in claim.cites if c in results]
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
