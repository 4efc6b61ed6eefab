"""Draft chest-radiograph reports: a knowledge-enhanced transformer (Yang et al., "Knowledge Matters",
arXiv 2112.15009) on an R2Gen decoder, its no-knowledge baseline, and the `report_generation` tool.

Model (`ReportGenerator`):
- Visual encoder: the cxr_analysis CNN (CXRNet, copied into this checkpoint and frozen) gives an 8 x 8
  grid of 128-channel features and its pooled per-finding logits; 64 grid tokens + 1 logit token ->
  a 2-layer transformer encoder.
- Decoder (R2Gen, Chen et al. 2020): causal self-attention, cross-attention, feed-forward, with a
  relational memory (3 slots, updated from each previous word) driving every layer norm
  (memory-driven conditional layer norm). Its language side is pretrained on the IU report text.
- Knowledge (off in the baseline): one knowledge-enhanced multi-head attention per decoder layer
  attends, in a single softmax, over [visual tokens | general knowledge | specific knowledge]:
    general  = graph node embeddings (catalogue findings + anatomy words; edges from the catalogue's
               P(finding | disease), IU co-occurrence and finding-anatomy co-mentions), refined by a
               graph-attention layer whose bias is log(adjacency); in the decoder each node gets an
               attention bias beta * log(eps + A^T s), s = the retrieved cases' findings spread over the
               graph, so nodes related to what similar cases showed are attended to.
    specific = facts from the reports of the most similar training cases (cosine of z-scored pooled
               image features; the query case itself is excluded): the sentences of the 3 nearest and
               the finding labels of the 8 nearest (similarity-weighted scores, one fact key per finding).
  With every knowledge key masked the attention is exactly the baseline's cross-attention; training masks
  a quarter of the cases' knowledge so the visual path stays competent on its own.
Training targets have their FINDINGS sentences in a canonical order (`canonical_order`); metrics compare
with the original reports. Measured (evals/report_generation.py, 200 held-out cohort radiographs): the
knowledge model and the baseline are level (micro CE-F1 0.725 vs 0.741, paired bootstrap CI of the
difference spans 0): on this synthetic cohort the retrieved cases are found with the same CNN features the
decoder reads, so they add little that the image does not already say.

The tool returns the draft as citable text (`draft_report`) plus `draft_report:<finding>` mentions read
from it. Those labels are deliberately not catalogue keys, so agents/evidence.py does not count them:
the draft re-reads the same CNN features cxr_analysis already reports (counting both would double-count
one image), and the retrieved neighbours' reports add population co-occurrence that the evidence
scorer's P(finding | disease) already holds.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.cxr_analysis import CXRNet, model_input, normalise, validated_array
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "report_gen.pt"
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
TOKEN_RE = re.compile(r"[a-z]+(?:-[a-z]+)*|\d+(?:\.\d+)?|[.,:;]")
HEADERS = ("findings", "impression")


# ------------------------------------------------------------------ text

def report_body(text: str) -> str:
    """FINDINGS and IMPRESSION sections of a report (the generation target); TECHNIQUE is dropped."""
    keep = [ln for ln in text.splitlines() if not ln.strip().upper().startswith("TECHNIQUE")]
    return " ".join(" ".join(keep).split())


def canonical_order(text: str) -> str:
    """FINDINGS sentences reordered: positive or hedged mentions first, then negations, each in catalogue
    order; IMPRESSION untouched. A training-target choice: the cohort writes its sentences in random order,
    and greedy decoding of a random order lets the frequent negations crowd out the positive findings."""
    from core.catalogue import load_catalogue
    from core.reports import read_findings

    order = {k: i for i, k in enumerate(load_catalogue().findings)}

    def rank(sent: str) -> tuple[int, int]:
        read = read_findings(sent)
        if not read:
            return 2, 0
        key = min(read, key=lambda k: order.get(k, 1 << 20))
        return (0 if read[key] != "absent" else 1), order.get(key, 1 << 20)

    out = []
    for ln in text.splitlines():
        head, sep, body = ln.partition(":")
        if head.strip().upper() == "FINDINGS" and sep:
            sents = [s for s in re.split(r"(?<=\.)\s+", body.strip()) if s]
            ln = f"{head}: " + " ".join(sorted(sents, key=rank))
        out.append(ln)
    return "\n".join(out)


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(report_body(text).lower())


def detokenize(tokens: list[str]) -> str:
    """Tokens -> readable report: section headers upper-cased on their own lines, sentences capitalised."""
    s = " ".join(tokens)
    s = re.sub(r" ([.,:;])", r"\1", s)
    for h in HEADERS:
        s = re.sub(rf"(^| ){h}:", lambda m: ("\n" if m.group(1) else "") + h.upper() + ":", s)
    return re.sub(r"(^|[.:]\s+|\n)([a-z])", lambda m: m.group(1) + m.group(2).upper(), s).strip()


def metric_text(tokens: list[str]) -> str:
    """What NLG metrics compare: lower-case tokens without the section headers (shared by every method)."""
    out, i = [], 0
    while i < len(tokens):
        if tokens[i] in HEADERS and i + 1 < len(tokens) and tokens[i + 1] == ":":
            i += 2
            continue
        out.append(tokens[i])
        i += 1
    return " ".join(out)


def sentences(tokens: list[str]) -> list[list[str]]:
    out, cur = [], []
    for t in metric_text(tokens).split():
        cur.append(t)
        if t == ".":
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


class Vocab:
    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: list[str], max_len: int) -> list[int]:
        """BOS + ids (+ EOS), truncated to max_len + 1 ids (inputs and targets are shifted views)."""
        return [BOS] + [self.stoi.get(t, UNK) for t in tokens][: max_len - 1] + [EOS]

    def decode(self, ids: list[int]) -> list[str]:
        out = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.itos[i])
        return out


# ------------------------------------------------------------------ knowledge

class KnowledgeGraph(BaseModel):
    """General knowledge: finding and anatomy nodes, a row-normalised adjacency with self loops."""
    model_config = ConfigDict(extra="forbid")
    nodes: list[str]  # catalogue finding keys, then anatomy terms
    kinds: list[Literal["finding", "anatomy"]]
    names: list[str]  # the words each node's embedding starts from
    adjacency: list[list[float]]
    provenance: dict[str, Any] = Field(default_factory=dict)


@dataclass
class KnowledgeBatch:
    """Specific knowledge for a batch: the neighbours' sentences and finding scores."""
    sent_ids: torch.Tensor  # [B, S, L] token ids of the retrieved cases' sentences (PAD-filled)
    sent_bias: torch.Tensor  # [B, S] log(neighbour weight); -inf for padding
    facts: torch.Tensor  # [B, n_nodes] similarity-weighted share of neighbours whose report asserts the node

    def index(self, idx) -> "KnowledgeBatch":
        return KnowledgeBatch(self.sent_ids[idx], self.sent_bias[idx], self.facts[idx])

    def to(self, device) -> "KnowledgeBatch":
        return KnowledgeBatch(self.sent_ids.to(device), self.sent_bias.to(device), self.facts.to(device))


class Bank:
    """Training cases for retrieval: unit image embeddings, their sentences (ids) and finding labels."""

    def __init__(self, ids: list[str], emb: torch.Tensor, sents: list[list[list[int]]], labels: torch.Tensor,
                 reports: list[str]):
        self.ids, self.emb, self.sents, self.labels, self.reports = list(ids), F.normalize(emb.float(), dim=1), \
            sents, labels.float(), list(reports)

    def query(self, emb: torch.Tensor, k: int, exclude: list[str | None] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k bank rows by cosine similarity; row i never returns the bank entry named exclude[i]."""
        sim = F.normalize(emb.float(), dim=1) @ self.emb.T
        if exclude is not None:
            pos = {c: j for j, c in enumerate(self.ids)}
            for i, c in enumerate(exclude):
                if c is not None and c in pos:
                    sim[i, pos[c]] = -math.inf
        s, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        return idx, s

    def knowledge(self, idx: torch.Tensor, sims: torch.Tensor, *, k_sents: int = 3, max_sents: int = 6,
                  sent_len: int = 16, tau: float = 0.05) -> KnowledgeBatch:
        """Sentences of the first k_sents neighbours, fact scores over all of them (rows sorted by similarity)."""
        facts = torch.einsum("bk,bkn->bn", torch.softmax(sims / tau, dim=1), self.labels[idx])
        idx, sims = idx[:, :k_sents], sims[:, :k_sents]
        B, k = idx.shape
        w = torch.softmax(sims / tau, dim=1)  # closer neighbours weigh more
        ids = torch.full((B, k * max_sents, sent_len), PAD, dtype=torch.long)
        bias = torch.full((B, k * max_sents), -math.inf)
        for b in range(B):
            for r in range(k):
                for s, sent in enumerate(self.sents[int(idx[b, r])][:max_sents]):
                    sent = sent[:sent_len]
                    ids[b, r * max_sents + s, :len(sent)] = torch.tensor(sent)
                    bias[b, r * max_sents + s] = math.log(float(w[b, r]) + 1e-6)
        return KnowledgeBatch(ids, bias, facts)

    def to_state(self) -> dict:
        return {"ids": self.ids, "emb": self.emb.half(), "sents": self.sents, "labels": self.labels.to(torch.uint8),
                "reports": self.reports}

    @classmethod
    def from_state(cls, st: dict) -> "Bank":
        return cls(st["ids"], st["emb"].float(), st["sents"], st["labels"].float(), st["reports"])


# ------------------------------------------------------------------ model

class GenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int
    d: int = 128
    heads: int = 4
    ff: int = 256
    enc_layers: int = 1
    dec_layers: int = 2
    rm_slots: int = 3
    rm_d: int = 64
    mem_feat: int = 64
    max_len: int = 80
    dropout: float = 0.1
    feat_ch: int = 128  # CXRNet feature channels
    grid: int = 64  # CXRNet feature grid (8 x 8)
    n_logits: int = 10
    knowledge: bool = True
    n_nodes: int = 0
    k_neighbours: int = 3  # whose sentences are keys
    k_facts: int = 8  # whose finding labels are averaged into the fact scores (a smoother kNN estimate)
    max_sents: int = 6
    knowledge_dropout: float = 0.25  # training: share of cases whose knowledge keys are masked
    graph_eps: float = 0.05


class RelationalMemory(nn.Module):
    """R2Gen's relational memory: slots attend over [slots; previous word], gated like an LSTM.

    Written out by hand (not nn.MultiheadAttention): it runs once per word, and on a CPU the module
    call overhead dominated a 3-slot attention."""

    def __init__(self, d_in: int, d: int, slots: int, heads: int, out: int):
        super().__init__()
        self.h = heads
        self.inp = nn.Linear(d_in, d)  # the memory runs narrower than the decoder: it is the sequential part
        self.init = nn.Parameter(torch.eye(slots, d))
        self.qkv, self.y_kv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.w, self.u = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.proj = nn.Linear(slots * d, out)

    def start(self, batch: int) -> torch.Tensor:
        return self.init.expand(batch, -1, -1)

    def step(self, m: torch.Tensor, ykv: torch.Tensor, yw: torch.Tensor) -> torch.Tensor:
        """m [B, S, d]; ykv, yw: the previous word's key/value and gate terms (precomputed for all words)."""
        B, S, d = m.shape
        q, k, v = self.qkv(m).chunk(3, -1)
        yk, yv = ykv.chunk(2, -1)
        k, v = torch.cat([k, yk[:, None]], 1), torch.cat([v, yv[:, None]], 1)
        split = lambda t: t.view(B, t.shape[1], self.h, -1).transpose(1, 2)  # noqa: E731
        a = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // self.h), -1) @ split(v)
        z = self.o(a.transpose(1, 2).reshape(B, S, d)) + m
        z = z + self.mlp(z)
        gi, gf = (yw[:, None] + self.u(torch.tanh(m))).chunk(2, -1)
        return torch.sigmoid(gi) * torch.tanh(z) + torch.sigmoid(gf) * m

    def forward(self, emb: torch.Tensor, m: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """emb [B, T, d] (each position's input word) -> memory features [B, T, out] and the last state."""
        m = self.start(emb.shape[0]) if m is None else m
        emb = self.inp(emb)
        ykv, yw = self.y_kv(emb), self.w(emb)
        states = []
        for t in range(emb.shape[1]):
            m = self.step(m, ykv[:, t], yw[:, t])
            states.append(m.flatten(1))
        return self.proj(torch.stack(states, 1)), m


class MCLN(nn.Module):
    """Memory-driven conditional layer norm: gamma and beta shifted by the relational memory."""

    def __init__(self, d: int, mem: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.delta = nn.Linear(mem, 2 * d)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        dg, db = self.delta(mem).chunk(2, -1)
        return self.ln(x) * (1 + dg) + db


class KnowledgeAttention(nn.Module):
    """Multi-head attention over concatenated [visual | knowledge] keys with an additive per-key bias
    (0 for visual keys, graph/retrieval-derived for knowledge keys, -inf = masked), one softmax."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.h, self.q, self.kv, self.o = heads, nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.p = dropout

    def forward(self, x: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.h, -1).transpose(1, 2)
        k, v = (t.view(B, keys.shape[1], self.h, -1).transpose(1, 2) for t in self.kv(keys).chunk(2, -1))
        mask = None if bias is None else bias[:, None, None, :].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, T, d))


class DecoderLayer(nn.Module):
    def __init__(self, c: GenConfig):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(c.d, c.heads, dropout=c.dropout, batch_first=True)
        self.cross = KnowledgeAttention(c.d, c.heads, c.dropout)
        self.ff = nn.Sequential(nn.Linear(c.d, c.ff), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(c.ff, c.d))
        self.n1, self.n2, self.n3 = (MCLN(c.d, c.mem_feat) for _ in range(3))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, mem, causal, pad, enc=None, enc_bias=None):
        h = self.n1(x, mem)
        x = x + self.drop(self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0])
        if enc is not None:  # language-model pretraining runs without an image
            x = x + self.drop(self.cross(self.n2(x, mem), enc, enc_bias))
        return x + self.drop(self.ff(self.n3(x, mem)))


class ReportGenerator(nn.Module):
    def __init__(self, c: GenConfig, graph: KnowledgeGraph | None = None,
                 node_tokens: list[list[int]] | None = None):
        super().__init__()
        self.c = c
        d = c.d
        self.embed = nn.Embedding(c.vocab_size, d, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)  # tied with the output: unit-norm rows, x sqrt(d) on input
        self.pos = nn.Embedding(c.max_len + 1, d)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.rm = RelationalMemory(d, c.rm_d, c.rm_slots, 2, c.mem_feat)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.dec_layers))
        self.final = MCLN(d, c.mem_feat)
        self.vis_in = nn.Linear(c.feat_ch, d)
        self.vis_cls = nn.Linear(c.n_logits, d)
        self.vis_pos = nn.Parameter(torch.zeros(c.grid + 1, d))
        enc_layer = nn.TransformerEncoderLayer(d, c.heads, c.ff, c.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc_layer, c.enc_layers, enable_nested_tensor=False)
        self.enc_norm = nn.LayerNorm(d)
        if c.knowledge:
            assert graph is not None and node_tokens is not None and len(graph.nodes) == c.n_nodes
            L = max(len(t) for t in node_tokens)
            self.register_buffer("node_tok", torch.tensor([t + [PAD] * (L - len(t)) for t in node_tokens]))
            self.register_buffer("adj", torch.tensor(graph.adjacency, dtype=torch.float32))
            self.register_buffer("is_finding", torch.tensor([k == "finding" for k in graph.kinds]))
            self.node_id = nn.Parameter(torch.zeros(c.n_nodes, d))
            self.graph_attn = nn.MultiheadAttention(d, c.heads, batch_first=True)
            self.graph_ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c.ff), nn.ReLU(), nn.Linear(c.ff, d))
            self.sent_proj = nn.Linear(d, d)
            self.sent_rank = nn.Embedding(c.k_neighbours * c.max_sents, d)
            self.fact_proj, self.fact_val = nn.Linear(d, d), nn.Parameter(torch.zeros(d))
            self.kind = nn.Embedding(3, d)  # general node, sentence, fact
            self.k_norm = nn.LayerNorm(d)
            self.beta = nn.Parameter(torch.tensor(1.0))

    # ---- parts
    def encode(self, feats: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """CXRNet features [B, 64, C] and pooled logits [B, K] -> visual memory [B, 65, d]."""
        v = torch.cat([self.vis_in(feats), self.vis_cls(logits)[:, None]], 1) + self.vis_pos
        return self.enc_norm(self.encoder(v))

    def _mean_embed(self, ids: torch.Tensor) -> torch.Tensor:
        m = (ids != PAD).float().unsqueeze(-1)
        return (self.embed(ids) * m).sum(-2) / m.sum(-2).clamp(min=1)

    def general_nodes(self) -> torch.Tensor:
        """Graph node embeddings [n, d]: name words + id, one graph-attention layer biased by log(A)."""
        x = self._mean_embed(self.node_tok) + self.node_id
        x = x + self.graph_attn(x[None], x[None], x[None], attn_mask=torch.log(self.adj + 1e-3),
                                need_weights=False)[0][0]
        return x + self.graph_ff(x)

    def graph_bias(self, facts: torch.Tensor) -> torch.Tensor:
        """Per-case node bias [B, n]: beta * log(eps + A^T s / max), s = the retrieved findings."""
        r = facts @ self.adj
        r = r / r.amax(1, keepdim=True).clamp(min=1e-6)
        return self.beta * torch.log(self.c.graph_eps + r)

    def knowledge_keys(self, kb: KnowledgeBatch, graph_bias: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        B = kb.facts.shape[0]
        nodes = self.general_nodes()
        g = (nodes + self.kind.weight[0]).expand(B, -1, -1)
        S = kb.sent_ids.shape[1]
        s = self.sent_proj(self._mean_embed(kb.sent_ids)) + self.sent_rank.weight[:S] + self.kind.weight[1]
        f = self.fact_proj(nodes)[None] + kb.facts[..., None] * self.fact_val + self.kind.weight[2]
        keys = self.k_norm(torch.cat([g, s, f], 1))
        gb = self.graph_bias(kb.facts) if graph_bias is None else graph_bias
        fb = torch.where((kb.facts > 0) & self.is_finding, torch.log(kb.facts.clamp(min=1e-6)),
                         torch.full_like(kb.facts, -math.inf))
        return keys, torch.cat([gb, kb.sent_bias, fb], 1)

    def memory(self, feats, logits, kb: KnowledgeBatch | None = None, graph_bias: torch.Tensor | None = None,
               mask_knowledge: bool | torch.Tensor = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys for the decoder's cross-attention and their bias (None = visual only, the baseline path).
        `mask_knowledge`: True, or a [B] bool tensor of the cases whose knowledge keys are masked."""
        enc = self.encode(feats, logits)
        if not self.c.knowledge or kb is None:
            return enc, None
        keys, kbias = self.knowledge_keys(kb, graph_bias)
        if isinstance(mask_knowledge, torch.Tensor):
            kbias = kbias.masked_fill(mask_knowledge[:, None], -math.inf)
        elif mask_knowledge:
            kbias = torch.full_like(kbias, -math.inf)
        bias = torch.cat([torch.zeros(enc.shape[:2], device=enc.device), kbias], 1)
        return torch.cat([enc, keys], 1), bias

    def decode(self, inp: torch.Tensor, enc: torch.Tensor | None = None, enc_bias: torch.Tensor | None = None,
               mem: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids [B, T] -> next-word logits [B, T, V]; `mem` = the relational memory's features if known."""
        T = inp.shape[1]
        x = self.embed(inp) * math.sqrt(self.c.d)
        if mem is None:
            mem = self.rm(x)[0]
        x = x + self.pos.weight[:T]
        causal = torch.triu(torch.full((T, T), -math.inf, device=inp.device), 1)
        pad = torch.zeros(inp.shape, device=inp.device).masked_fill(inp == PAD, -math.inf)
        for layer in self.layers:
            x = layer(x, mem, causal, pad, enc, enc_bias)
        return self.final(x, mem) @ self.embed.weight.T

    def forward(self, feats, logits, inp, kb: KnowledgeBatch | None = None, **kw) -> torch.Tensor:
        enc, bias = self.memory(feats, logits, kb, **kw)
        return self.decode(inp, enc, bias)

    @torch.no_grad()
    def generate(self, feats, logits, kb: KnowledgeBatch | None = None, max_len: int | None = None,
                 block_ngram: int = 0) -> list[list[int]]:
        """Greedy decoding; block_ngram > 0 forbids repeating an n-gram (off by default: templated reports
        legitimately repeat short n-grams such as "in the right lower lobe")."""
        max_len = max_len or self.c.max_len
        enc, bias = self.memory(feats, logits, kb)
        B = feats.shape[0]
        seq = torch.full((B, 1), BOS, dtype=torch.long, device=feats.device)
        done = torch.zeros(B, dtype=torch.bool, device=feats.device)
        seen: list[set] = [set() for _ in range(B)]
        mems, m = [], None
        for _ in range(max_len):
            f, m = self.rm(self.embed(seq[:, -1:]) * math.sqrt(self.c.d), m)  # one memory step per new word
            mems.append(f)
            lp = self.decode(seq, enc, bias, torch.cat(mems, 1))[:, -1]
            lp[:, PAD] = lp[:, BOS] = lp[:, UNK] = -math.inf
            n1 = block_ngram - 1
            if block_ngram and seq.shape[1] >= n1:
                for b in range(B):
                    prefix = tuple(seq[b, -n1:].tolist())
                    for (p, w) in seen[b]:
                        if p == prefix:
                            lp[b, w] = -math.inf
            nxt = lp.argmax(-1).masked_fill(done, PAD)
            if block_ngram and seq.shape[1] >= n1:
                for b in range(B):
                    seen[b].add((tuple(seq[b, -n1:].tolist()), int(nxt[b])))
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == EOS
            if bool(done.all()):
                break
        return [s[1:].tolist() for s in seq]


# ------------------------------------------------------------------ frozen visual backbone

class Backbone(nn.Module):
    """CXRNet up to its class maps: 8 x 8 x 128 features and the LSE-pooled logits."""

    def __init__(self, net: CXRNet):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 128, 128] in [0, 1] -> feats [B, 64, 128], logits [B, K]."""
        f = self.net.features(normalise(x[:, None]))
        return f.flatten(2).transpose(1, 2), self.net.pool(self.net.head(f))


def retrieval_embedding(feats: torch.Tensor, logits: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Image embedding for neighbour search: z-scored [mean, max] pooled features and logits."""
    e = torch.cat([feats.mean(1), feats.amax(1), logits], 1)
    return (e - stats["mean"]) / stats["std"]


# ------------------------------------------------------------------ loading and inference

@dataclass
class Loaded:
    model: ReportGenerator
    backbone: Backbone
    vocab: Vocab
    bank: Bank
    stats: dict[str, torch.Tensor]
    graph: KnowledgeGraph | None
    meta: dict


def node_token_ids(graph: KnowledgeGraph, vocab: Vocab) -> list[list[int]]:
    return [[vocab.stoi.get(w, UNK) for w in TOKEN_RE.findall(n.lower())] or [UNK] for n in graph.names]


def build_model(cfg: GenConfig, graph: KnowledgeGraph | None, vocab: Vocab) -> ReportGenerator:
    return ReportGenerator(cfg, graph, node_token_ids(graph, vocab) if (cfg.knowledge and graph) else None)


def save_bundle(path: Path, model: ReportGenerator, backbone: Backbone, vocab: Vocab, bank: Bank,
                stats: dict, graph: KnowledgeGraph | None, meta: dict) -> None:
    half = lambda sd: {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}  # noqa: E731
    torch.save({"config": model.c.model_dump(), "state_dict": half(model.state_dict()),
                "backbone": {"state_dict": half(backbone.net.state_dict()), "config": meta.get("backbone_config", {})},
                "vocab": vocab.itos, "bank": bank.to_state(), "stats": {k: v.float() for k, v in stats.items()},
                "graph": graph.model_dump() if graph else None, "meta": meta}, path)


def load_bundle(path: Path = CHECKPOINT, device: str = "cpu") -> Loaded:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = GenConfig.model_validate(ck["config"])
    vocab = Vocab(ck["vocab"])
    graph = KnowledgeGraph.model_validate(ck["graph"]) if ck.get("graph") else None
    model = build_model(cfg, graph, vocab)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    bcfg = ck["backbone"]["config"]
    net = CXRNet(int(bcfg["n_out"]), widths=tuple(bcfg["widths"]), lse_r=float(bcfg["lse_r"]), dropout=0.0)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["backbone"]["state_dict"].items()})
    return Loaded(model.to(device).eval(), Backbone(net).to(device), vocab, Bank.from_state(ck["bank"]),
                  {k: v.to(device) for k, v in ck["stats"].items()}, graph, ck.get("meta", {}))


def read_metadata(path: Path = CHECKPOINT) -> dict:
    try:
        return json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@torch.no_grad()
def generate_reports(m: Loaded, images: np.ndarray, case_ids: list[str | None] | None = None, *,
                     knowledge: bool = True, batch: int = 64) -> list[dict]:
    """[N, 128, 128] model inputs -> per image: text, tokens, neighbour ids and similarities."""
    out, device = [], next(m.model.parameters()).device
    for i in range(0, len(images), batch):
        x = torch.as_tensor(np.asarray(images[i:i + batch], np.float32), device=device)
        feats, logits = m.backbone(x)
        c = m.model.c
        idx, sims = m.bank.query(retrieval_embedding(feats, logits, m.stats).cpu(), max(c.k_neighbours, c.k_facts),
                                 None if case_ids is None else case_ids[i:i + batch])  # the bank lives on the CPU
        kb = m.bank.knowledge(idx, sims, k_sents=c.k_neighbours, max_sents=c.max_sents).to(device) \
            if knowledge and c.knowledge else None
        for j, ids in enumerate(m.model.generate(feats, logits, kb)):
            toks = m.vocab.decode(ids)
            out.append({"text": detokenize(toks), "tokens": toks,
                        "neighbours": [(m.bank.ids[int(r)], round(float(s), 3))
                                       for r, s in zip(idx[j, :c.k_neighbours], sims[j, :c.k_neighbours])]})
    return out


# ------------------------------------------------------------------ the tool

class ReportParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    knowledge: bool = True  # False: the same model with its knowledge keys left out


@register
class ReportGeneration(Tool):
    name = "report_generation"
    description = ("Chest X-ray (PA/AP): a draft report (findings, impression) from a knowledge-enhanced "
                   "transformer; citable text, not counted as evidence.")
    modalities = frozenset({Modality.XR})
    Params = ReportParams
    model_name = "knowledge-enhanced report generator (R2Gen decoder)"
    version = str(read_metadata(CHECKPOINT).get("version", "untrained"))
    checkpoint: Path = CHECKPOINT

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        self.m: Loaded | None = None

    @classmethod
    def available(cls) -> bool:
        return Path(cls.checkpoint).is_file()

    def load(self) -> None:
        if not Path(self.checkpoint).is_file():
            raise FileNotFoundError(f"report generator checkpoint {self.checkpoint} not found: run "
                                    f"`python -m training.train_report_gen --ship {self.checkpoint}`")
        self.m = load_bundle(self.checkpoint, self.device)
        self.version = str(self.m.meta.get("version", self.version))

    def analyse(self, study: Any, params: ReportParams, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        if study is None:
            raise ValueError(f"no radiograph loaded for study {ctx.study_id}: the image is missing")
        if str(getattr(study, "view", "PA") or "PA").upper() == "LAT":
            raise ValueError(f"{getattr(study, 'source', ctx.study_id)}: view is lateral; this tool reads frontal "
                             "(PA/AP) views only")
        x = model_input(validated_array(study))[None]
        assert self.m is not None
        from core.reports import read_findings

        r = generate_reports(self.m, x, [ctx.case_id or None], knowledge=params.knowledge)[0]
        if not r["tokens"]:
            raise RuntimeError("the generator produced an empty report")
        nb = ", ".join(f"{c} ({s:.2f})" for c, s in r["neighbours"])
        out = [Finding(label="draft_report", detail=r["text"] + (f"\n[similar training cases: {nb}]"
                                                                  if params.knowledge else ""))]
        sents = [s.strip() for s in re.split(r"(?<=[.])\s+|\n", r["text"]) if s.strip()]
        for key, how in sorted(read_findings(r["text"]).items()):
            said = next((s for s in sents if read_findings(s).get(key)), "")
            out.append(Finding(label=f"draft_report:{key}", present=how != "absent",
                               detail=f"draft report says {how}: \"{said}\""))
        return out, []

    def summarise(self, findings: list[Finding]) -> str:
        draft = next((f.detail for f in findings if f.label == "draft_report"), "")
        return "Draft report (generated, not evidence): " + " ".join((draft or "").split("\n[")[0].split())
