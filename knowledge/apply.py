"""Applying knowledge in the graph: the retrieve-knowledge node's source.

Statistic insights for findings the tools reported are all returned (they carry numbers the
diagnosticians use); criteria are the top-k nearest to the case summary, model-specific first.
Only `prompt_k` of them go into prompts, to fit a small model's context.
"""
from __future__ import annotations

from core.catalogue import load_catalogue
from knowledge.store import KnowledgeStore


class StoreKnowledge:
    def __init__(self, store: KnowledgeStore, *, model: str | None = None, k: int = 5, prompt_k: int = 4,
                 version: int | None = None):
        self.store, self.model, self.k, self.prompt_k, self.version = store, model, k, prompt_k, version

    def retrieve(self, summary: str, domain: str, evidence: list[dict], k: int | None = None) -> list[dict]:
        cat = load_catalogue()
        reported = {f["label"] for r in evidence if r.get("status") == "ok" for f in r.get("findings", [])}
        stats = [i for i in self.store.insights(self.version)
                 if i.kind == "statistic" and i.domain == domain and i.finding in reported]
        crit = [i for i in self.store.query(summary, domain=domain, model=self.model, k=k or self.k,
                                            version=self.version) if i.kind != "statistic"]
        stats.sort(key=lambda i: abs((i.rate_with or 0) - (i.rate_without or 0)), reverse=True)
        out = []
        for n, i in enumerate(crit + stats):
            d = i.model_dump()
            d["in_prompt"] = n < self.prompt_k
            d["disease_name"] = cat.diseases[i.disease].name if i.disease in cat.diseases else i.disease
            out.append(d)
        return out
