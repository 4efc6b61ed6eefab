"""Guideline evidence: how well each candidate disease explains the tools' findings.

The catalogue's P(finding | disease) plays the part of a guideline (MACD's baseline prompts carry
the same knowledge as text). Tool findings with a probability count as soft evidence; hard
findings count as present/absent; findings the tools did not examine count for nothing. Similar
past cases' verdicts (case retrieval) count as weak evidence for those diagnoses.
"""
from __future__ import annotations

import math

from core.catalogue import Catalogue, DiseaseDef

_FLOOR, _CEIL = 0.02, 0.98
_UNLISTED = 0.03  # a finding the catalogue does not list for a disease: rare, not impossible
# How many solved cases the guideline value is worth when a learned statistic updates it (p_finding).
PRIOR_CASES = 10
# Similar-case retrieval (tools/case_retrieval.py) reports the share of the k most similar past cases
# with each verdict ("similar_verdict:<disease>"). It counts as weak evidence: a disease gains
# SIMILAR_WEIGHT * log(share / floor) (a verdict no neighbour had gains nothing), so 5/5 neighbours
# add ~1.2 nats and 1/5 ~0.35, less than one well-measured finding, since neighbours' verdicts
# largely echo the same image features the other tools measure.
SIMILAR_PREFIX = "similar_verdict:"
SIMILAR_WEIGHT = 0.5
_SIMILAR_FLOOR = 0.1


def p_finding(d: DiseaseDef, key: str, learned: dict | None = None) -> float:
    """P(the tools report `key` | d): the catalogue's guideline value, updated by a learned statistic
    when one exists (it knows the tools' real sensitivity). The update is Bayesian: the guideline
    counts as PRIOR_CASES pseudo-cases, so a rate seen on 5 cases moves it a third of the way and a
    rate seen on 100 nearly all the way (learning from a handful of cases must not replace a guideline)."""
    prior = d.findings.get(key, _UNLISTED)
    if learned and (d.key, key) in learned:
        rate, n = learned[(d.key, key)]
        prior = (rate * n + prior * PRIOR_CASES) / (n + PRIOR_CASES)
    return min(max(prior, _FLOOR), _CEIL)


def learned_rates(insights: list[dict]) -> dict:
    """(disease, finding) -> (rate the tools reported it, number of cases) from statistic insights."""
    out = {}
    for i in insights:
        if i.get("kind") == "statistic" and i.get("finding") and i.get("rate_with") is not None:
            out[(i["disease"], i["finding"])] = (float(i["rate_with"]), int(i.get("support") or 0))
    return out


def observations(tool_results: list[dict], cat: Catalogue) -> list[dict]:
    """Catalogue-keyed observations from ok tool results: key, p (P(present) per the tool), source id."""
    obs = []
    for r in tool_results:
        if r.get("status") != "ok":
            continue
        for f in r.get("findings", []):
            label = f["label"]
            if label.startswith(("slide_class:", SIMILAR_PREFIX)) and f.get("probability") is not None:
                obs.append({"key": label, "p": float(f["probability"]), "source": r["id"], "finding": f})
            elif label in cat.findings:
                p = f.get("probability")
                p = (1.0 if f.get("present", True) else 0.0) if p is None else float(p)
                obs.append({"key": label, "p": p, "source": r["id"], "finding": f})
    return obs


def log_likelihood(d: DiseaseDef, obs: list[dict], learned: dict | None = None) -> float:
    ll = 0.0
    for o in obs:
        if o["key"].startswith(SIMILAR_PREFIX):
            if o["key"][len(SIMILAR_PREFIX):] == d.key:
                ll += SIMILAR_WEIGHT * math.log(max(o["p"], _SIMILAR_FLOOR) / _SIMILAR_FLOOR)
            continue
        if o["key"].startswith("slide_class:"):
            if d.slide_class:
                cls = o["key"].split(":", 1)[1]
                q = min(max(o["p"], 1e-3), 1 - 1e-3)
                ll += math.log(q) if cls == d.slide_class else 0.0
            continue
        pf = p_finding(d, o["key"], learned)
        ll += math.log(o["p"] * pf + (1 - o["p"]) * (1 - pf))
    return ll


def supporting(d: DiseaseDef, rival: DiseaseDef | None, obs: list[dict], n: int = 3) -> list[dict]:
    """The findings that most favour d over its rival (largest log-likelihood ratio), one per finding:
    for each key its strongest observation, with `also` = the other tools' observations of that key
    that report it the same way (present / absent) and also favour d, so a claim can cite them too."""
    def lr(o):
        one = log_likelihood(d, [o])
        return one - (log_likelihood(rival, [o]) if rival else 0.0)

    best: dict[str, dict] = {}
    for o in sorted((o for o in obs if lr(o) > 0), key=lr, reverse=True):
        first = best.setdefault(o["key"], {**o, "also": []})
        if first["source"] != o["source"] and \
                bool(o["finding"].get("present", True)) == bool(first["finding"].get("present", True)):
            first["also"].append(o)
    return list(best.values())[:n]
