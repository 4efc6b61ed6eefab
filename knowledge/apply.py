"""Applying knowledge in the graph: the retrieve-knowledge node's source.

Statistic insights for findings the tools reported are all returned (they carry numbers the
diagnosticians use); criteria are the top-k nearest to the case summary, model-specific first.
Only `prompt_k` of them go into prompts, to fit a small model's context.
"""
from __future__ import annotations

import numpy as np

from core.catalogue import load_catalogue
from knowledge.schema import Insight
from knowledge.store import KnowledgeStore, embed


def arrange(criteria: list[Insight], stats: list[Insight], prompt_k: int) -> list[dict]:
    """Criteria first (nearest to the case), then statistics by effect size; the first `prompt_k`
    go into prompts as text, all statistics feed the evidence term as numbers."""
    cat = load_catalogue()
    stats = sorted(stats, key=lambda i: abs((i.rate_with or 0) - (i.rate_without or 0)), reverse=True)
    out = []
    for n, i in enumerate(criteria + stats):
        d = i.model_dump()
        d["in_prompt"] = n < prompt_k
        d["disease_name"] = cat.diseases[i.disease].name if i.disease in cat.diseases else i.disease
        out.append(d)
    return out


def _reported(evidence: list[dict]) -> set[str]:
    return {f["label"] for r in evidence if r.get("status") == "ok" for f in r.get("findings", [])}


class StoreKnowledge:
    def __init__(self, store: KnowledgeStore, *, model: str | None = None, k: int = 5, prompt_k: int = 4,
                 version: int | None = None):
        self.store, self.model, self.k, self.prompt_k, self.version = store, model, k, prompt_k, version

    def retrieve(self, summary: str, domain: str, evidence: list[dict], k: int | None = None) -> list[dict]:
        reported = _reported(evidence)
        stats = [i for i in self.store.insights(self.version)
                 if i.kind == "statistic" and i.domain == domain and i.finding in reported]
        crit = self.store.query(summary, domain=domain, model=self.model, k=k or self.k, version=self.version,
                                kinds=["general", "rare"])
        return arrange(crit, stats, self.prompt_k)


class InsightIndex:
    """The same retrieval over an unpublished list of insights (refinement tries candidate sets
    before anything is written to the store). Embeddings are computed once and shared by subsets."""

    def __init__(self, insights: list[Insight], *, model: str | None = None, k: int = 5, prompt_k: int = 4,
                 _emb: np.ndarray | None = None, _queries: dict | None = None):
        self.insights, self.model, self.k, self.prompt_k = list(insights), model, k, prompt_k
        texts = [i.text for i in self.insights]
        self._emb = _emb if _emb is not None else (embed(texts) if texts else np.zeros((0, 1)))
        self._queries = {} if _queries is None else _queries

    def subset(self, keep: list[int]) -> "InsightIndex":
        return InsightIndex([self.insights[n] for n in keep], model=self.model, k=self.k, prompt_k=self.prompt_k,
                            _emb=self._emb[keep] if keep else np.zeros((0, 1)), _queries=self._queries)

    def retrieve(self, summary: str, domain: str, evidence: list[dict], k: int | None = None) -> list[dict]:
        k = k or self.k
        reported = _reported(evidence)
        stats = [i for i in self.insights if i.kind == "statistic" and i.domain == domain and i.finding in reported]
        if summary not in self._queries:
            self._queries[summary] = embed([summary])[0]
        q = self._queries[summary]
        cand = sorted(((float(self._emb[n] @ q), i) for n, i in enumerate(self.insights)
                       if i.kind != "statistic" and i.domain == domain and not i.retired), key=lambda si: -si[0])
        crit = [i for _, i in cand[:k * 3]]
        if self.model:
            crit.sort(key=lambda i: i.source_model not in (self.model, "data"))
        return arrange(crit[:k], stats, self.prompt_k)
