"""FuseCPath (arXiv 2510.27237): one slide classifier over several heterogeneous patch encoders.

A slide arrives as a multi-encoder bag (`SlideBag`): for each encoder a float32 [N, d_e] array of the
same N tiles in the same order, plus tile coords [N, 2]. Three parts, each switchable for ablations:

1. Multi-view clustering filter (`select_tiles`): k-means in every encoder's (L2-normalised) view, a
   consensus clustering of those partitions, then a `keep` budget per slide: per consensus cluster the
   tiles nearest its centroid (representative), the rest of the budget by discriminativeness: the class
   separability, on the training slides, of the tile's code in a codebook over the joint view
   (`fit_scorer`); background tissue that occurs in every class scores low.
2. Cluster-level re-embedding (`FuseCPath`): per kept cluster and per encoder a gated-attention pool of
   the encoder's projected tiles -> one token per (cluster, encoder); a cross-attention from a cluster
   query over its encoder tokens fuses them -> one token per cluster; gated-attention ABMIL over the
   cluster tokens -> class logits. Attention is exposed per cluster, per encoder and per tile.
3. Collaborative distillation (`distillation_loss`): slide-level teachers (one ABMIL per encoder,
   trained first) teach the fused student, CE + T^2 * KL(teacher_T || student_T), the teachers weighted
   per slide by their confidence in the true label (see the function).

The paper distils from slide-level foundation models; none ships here, so the teachers are ABMILs trained
on each encoder's tiles, which are also the single-encoder baselines. `ABMIL` over concatenated encoders
is the simple-concatenation baseline and the "no re-embedding" ablation. Training: training/train_fusecpath.py.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sklearn.cluster import KMeans

from core.case import Modality
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

VERSION = "1"


class SlideBag(BaseModel):
    """One slide's tiles as seen by several encoders; every encoder must describe the same tiles."""
    model_config = ConfigDict(arbitrary_types_allowed=True)

    slide_id: str
    features: dict[str, np.ndarray]
    coords: np.ndarray
    label: int | None = None

    @field_validator("features", mode="before")
    @classmethod
    def _float32(cls, v: dict) -> dict:
        return {str(k): np.ascontiguousarray(np.asarray(x, dtype=np.float32)) for k, x in dict(v).items()}

    @field_validator("coords", mode="before")
    @classmethod
    def _coords(cls, v) -> np.ndarray:
        return np.asarray(v)

    @model_validator(mode="after")
    def _same_tiles(self) -> SlideBag:
        if not self.features:
            raise ValueError(f"slide {self.slide_id}: no encoder features")
        if self.coords.ndim != 2 or self.coords.shape[1] != 2:
            raise ValueError(f"slide {self.slide_id}: coords must be [N, 2], got shape {self.coords.shape}")
        n = len(self.coords)
        if n == 0:
            raise ValueError(f"slide {self.slide_id}: no tiles")
        for name, x in self.features.items():
            if x.ndim != 2:
                raise ValueError(f"slide {self.slide_id}: encoder '{name}' features must be [N, d], got {x.shape}")
            if x.shape[0] != n:
                raise ValueError(f"slide {self.slide_id}: encoder '{name}' has {x.shape[0]} tiles but coords has "
                                 f"{n}; every encoder must describe the same tiles in the same order")
            if not np.isfinite(x).all():
                raise ValueError(f"slide {self.slide_id}: encoder '{name}' features contain NaN or inf")
        return self

    @property
    def n_tiles(self) -> int:
        return len(self.coords)


def check_bags(bags: list[SlideBag], encoders: list[str]) -> dict[str, int]:
    """Every bag has every encoder at one width; returns the widths."""
    dims: dict[str, int] = {}
    for b in bags:
        for e in encoders:
            if e not in b.features:
                raise ValueError(f"slide {b.slide_id}: encoder '{e}' missing (has {sorted(b.features)})")
            d = b.features[e].shape[1]
            if dims.setdefault(e, d) != d:
                raise ValueError(f"slide {b.slide_id}: encoder '{e}' has width {d}, other slides {dims[e]}")
    return dims


def load_bags(directory: Path, classes: list[str] | None = None) -> tuple[list[SlideBag], list[str]]:
    """Per-slide .npz files: one [N, d_e] array per encoder, `coords` [N, 2], `label` (class name or index)."""
    files = sorted(Path(directory).glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"{directory}: no .npz slide feature files")
    raw = []
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            if "coords" not in z or "label" not in z:
                raise ValueError(f"{f}: needs arrays 'coords' and 'label' (has {sorted(z.files)})")
            feats = {k: z[k] for k in z.files if k not in ("coords", "label", "slide_id")}
            raw.append((f.stem, feats, z["coords"], z["label"].item()))
    if classes is None:
        names = {r[3] for r in raw if isinstance(r[3], str)}
        classes = sorted(names) if names else [str(i) for i in range(max(int(r[3]) for r in raw) + 1)]
    index = {c: i for i, c in enumerate(classes)}
    bags = []
    for sid, feats, coords, lab in raw:
        if isinstance(lab, str) and lab not in index:
            raise ValueError(f"slide {sid}: label '{lab}' not among classes {classes}")
        bags.append(SlideBag(slide_id=sid, features=feats, coords=coords,
                             label=index[lab] if isinstance(lab, str) else int(lab)))
    return bags, list(classes)


# ---------------------------------------------------------------- 1. multi-view clustering filter

class FilterConfig(BaseModel):
    n_clusters: int = Field(8, ge=1)  # per encoder view and for the consensus
    keep: float = Field(0.5, gt=0)  # <= 1: fraction of a slide's tiles; > 1: a tile count
    representative_share: float = Field(0.3, ge=0, le=1)  # of the budget, spent on tiles nearest centroids
    seed: int = 0


class Selection(NamedTuple):
    keep: np.ndarray  # [m] tile indices into the bag, ascending
    clusters: np.ndarray  # [m] dense consensus cluster ids 0..K-1 of the kept tiles


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def consensus_clusters(views: list[np.ndarray], k: int, seed: int) -> np.ndarray:
    """Per-view k-means on unit-norm features, then k-means on the stacked one-hot memberships.

    For stacked one-hots ||h_i - h_j||^2 = 2 V (1 - C_ij), C the views' co-association matrix, so this
    is consensus clustering of C without the N x N matrix (10^4-tile slides would need gigabytes), and
    each encoder votes once whatever its width or feature scale.
    """
    k = min(k, len(views[0]))
    onehots = []
    for i, x in enumerate(views):
        lab = KMeans(k, n_init=2, random_state=seed + i).fit_predict(_unit(x))
        onehots.append(np.eye(k, dtype=np.float32)[lab])
    return KMeans(k, n_init=2, random_state=seed).fit_predict(np.concatenate(onehots, 1))


def joint_view(feats: dict[str, np.ndarray], encoders: list[str]) -> np.ndarray:
    """Unit-norm views side by side, each scaled by 1/sqrt(V): squared distances are the views' mean."""
    return np.concatenate([_unit(feats[e]) for e in encoders], 1) / math.sqrt(len(encoders))


class TileScorer(NamedTuple):
    encoders: list[str]
    centroids: np.ndarray  # [K, sum d_e] codebook over the training tiles' joint view
    code_score: np.ndarray  # [K] KL(p(class | code) || prior)
    prior: np.ndarray  # [C]


def fit_scorer(bags: list[SlideBag], encoders: list[str], n_classes: int, n_codes: int = 32, seed: int = 0,
               max_tiles: int = 20000) -> TileScorer:
    """Class separability of tile clusters, measured on the training slides.

    A codebook (k-means) over the training tiles' joint view; each code's class distribution counts
    its tiles by slide label. Tissue found in every class (background, stroma) gets codes near the prior,
    class-specific tissue codes far from it. A per-tile linear model with slide labels as tile labels was
    the first try: it cannot give one tissue the prior and another a class (signal-tile AUC 0.71 on the
    synthetic bags against 1.0 for the codebook).
    """
    rng = np.random.default_rng(seed)
    per = max(1, max_tiles // len(bags))
    picks = [rng.choice(b.n_tiles, min(per, b.n_tiles), replace=False) for b in bags]
    y = np.concatenate([np.full(len(p), b.label) for b, p in zip(bags, picks)])
    if len(np.unique(y)) < 2:
        raise ValueError("fit_scorer needs slides of at least two classes")
    z = np.concatenate([joint_view({e: b.features[e][p] for e in encoders}, encoders) for b, p in zip(bags, picks)])
    km = KMeans(min(n_codes, len(z)), n_init=2, random_state=seed).fit(z)
    counts = np.ones((km.n_clusters, n_classes))  # Laplace: a code seen on a few slides is not certain
    np.add.at(counts, (km.labels_, y), 1)
    p = counts / counts.sum(1, keepdims=True)
    prior = np.bincount(y, minlength=n_classes) / len(y)
    score = (p * np.log(p / np.clip(prior, 1e-6, 1))).sum(1)
    return TileScorer(list(encoders), km.cluster_centers_.astype(np.float32), score.astype(np.float32),
                      prior.astype(np.float32))


def discriminativeness(feats: dict[str, np.ndarray], scorer: TileScorer) -> np.ndarray:
    """[N] the class separability of each tile's nearest code."""
    z = joint_view(feats, scorer.encoders)
    d2 = (z ** 2).sum(1, keepdims=True) - 2 * z @ scorer.centroids.T + (scorer.centroids ** 2).sum(1)
    return scorer.code_score[d2.argmin(1)]


def budget(n: int, keep: float) -> int:
    return max(1, min(n, round(keep * n) if keep <= 1 else int(keep)))


def select_tiles(bag: SlideBag, encoders: list[str], cfg: FilterConfig, scorer: TileScorer | None = None,
                 use_filter: bool = True, labels: np.ndarray | None = None) -> Selection:
    """Consensus clusters of the bag (or the given ones) and the tiles kept (all when `use_filter` is False)."""
    views = [bag.features[e] for e in encoders]
    if labels is None:
        labels = consensus_clusters(views, cfg.n_clusters, cfg.seed)
    n = bag.n_tiles
    if not use_filter:
        return Selection(np.arange(n), np.unique(labels, return_inverse=True)[1])
    m = budget(n, cfg.keep)
    z = joint_view(bag.features, encoders)
    ids = np.unique(labels)
    cent = np.stack([z[labels == c].mean(0) for c in ids])
    dist = np.linalg.norm(z - cent[np.searchsorted(ids, labels)], axis=1)
    chosen = np.zeros(n, bool)
    n_rep = int(cfg.representative_share * m) // len(ids)
    for c in ids:
        members = np.flatnonzero(labels == c)
        chosen[members[np.argsort(dist[members], kind="stable")[:n_rep]]] = True
    # the most discriminative fill the budget, ties (and everything, without a scorer) to the most typical
    score = discriminativeness(bag.features, scorer) if scorer is not None else np.zeros(n)
    rest = np.flatnonzero(~chosen)
    chosen[rest[np.lexsort((dist[rest], -score[rest]))[: m - int(chosen.sum())]]] = True
    keep = np.flatnonzero(chosen)
    return Selection(keep, np.unique(labels[keep], return_inverse=True)[1])


# ---------------------------------------------------------------- 2. models

class Output(NamedTuple):
    logits: torch.Tensor  # [C]
    tile_attention: torch.Tensor  # [n] over the tiles given, sums to 1
    cluster_attention: torch.Tensor | None = None  # [K], sums to 1
    encoder_weights: torch.Tensor | None = None  # [K, E], each row sums to 1


class GatedAttention(nn.Module):
    """Ilse et al. 2018: score = w . (tanh(V h) * sigmoid(U h))."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.v, self.u, self.w = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)


def _project(d_in: int, width: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Dropout(dropout))


class ABMIL(nn.Module):
    """Gated-attention MIL over tiles; several encoders are layer-normed each and concatenated."""

    def __init__(self, encoders: list[str], dims: dict[str, int], n_classes: int, width: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.encoders = list(encoders)
        self.norms = nn.ModuleList(nn.LayerNorm(dims[e]) for e in self.encoders)
        self.embed = _project(sum(dims[e] for e in self.encoders), width, dropout)
        self.attn, self.head = GatedAttention(width, width // 2), nn.Linear(width, n_classes)

    def forward(self, feats: dict[str, torch.Tensor], clusters: torch.Tensor | None = None) -> Output:
        h = self.embed(torch.cat([nm(feats[e]) for nm, e in zip(self.norms, self.encoders)], -1))
        a = torch.softmax(self.attn(h), 0)
        return Output(self.head(a @ h), a)


def segment_softmax(scores: torch.Tensor, seg: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax of `scores` within each segment id of `seg` (ids 0..k-1, every id present)."""
    mx = torch.full((k,), -torch.inf, dtype=scores.dtype, device=scores.device)
    mx = mx.scatter_reduce(0, seg, scores.detach(), "amax")  # a shift only: no gradient needed
    e = torch.exp(scores - mx[seg])
    return e / torch.zeros(k, dtype=e.dtype, device=e.device).index_add(0, seg, e)[seg]


class FuseCPath(nn.Module):
    """Cluster-level re-embedding of every encoder, cross-attention fusion per cluster, ABMIL over clusters."""

    def __init__(self, encoders: list[str], dims: dict[str, int], n_classes: int, width: int = 128,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.encoders = list(encoders)
        self.embed = nn.ModuleList(nn.Sequential(nn.LayerNorm(dims[e]), _project(dims[e], width, dropout))
                                   for e in self.encoders)
        self.pool = nn.ModuleList(GatedAttention(width, width // 2) for _ in self.encoders)
        self.source = nn.Parameter(torch.randn(len(self.encoders), width) * 0.02)  # which encoder a token is
        self.query = nn.Parameter(torch.zeros(1, 1, width))
        self.fuse = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.attn, self.head = GatedAttention(width, width // 2), nn.Linear(width, n_classes)

    def forward(self, feats: dict[str, torch.Tensor], clusters: torch.Tensor | None = None) -> Output:
        if clusters is None:
            raise ValueError("FuseCPath needs the consensus cluster of every tile")
        k = int(clusters.max()) + 1
        tokens, within = [], []
        for e, embed, pool in zip(self.encoders, self.embed, self.pool):
            h = embed(feats[e])
            a = segment_softmax(pool(h), clusters, k)
            tokens.append(torch.zeros(k, h.shape[1], dtype=h.dtype, device=h.device)
                          .index_add(0, clusters, a[:, None] * h))
            within.append(a)
        t = torch.stack(tokens, 1) + self.source  # [K, E, w]
        mean = t.mean(1, keepdim=True)
        fused, beta = self.fuse(self.query + mean, t, t, need_weights=True)  # beta [K, 1, E], head-averaged
        f = self.norm((fused + mean).squeeze(1))
        alpha = torch.softmax(self.attn(f), 0)
        beta = beta.squeeze(1)
        tile = alpha[clusters] * (beta[clusters] * torch.stack(within, 1)).sum(1)
        return Output(self.head(alpha @ f), tile, alpha, beta)


# ---------------------------------------------------------------- 3. collaborative distillation

def distillation_loss(student: torch.Tensor, teachers: torch.Tensor, labels: torch.Tensor | None = None,
                      temperature: float = 2.0) -> torch.Tensor:
    """T^2 * sum_t w_t KL(softmax(teacher_t / T) || softmax(student / T)), mean over the batch.

    student [B, C], teachers [M, B, C]. With `labels`, w = softmax over teachers of -CE(teacher, label)
    per slide (confidence-aware multi-teacher KD): each encoder's teacher is trusted on the slides where
    it sees the class, where a fixed per-teacher weight (e.g. validation accuracy) cannot tell. Without
    labels the teachers weigh the same.
    """
    log_s = F.log_softmax(student / temperature, -1).expand_as(teachers)
    log_t = F.log_softmax(teachers / temperature, -1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [M, B]
    if labels is None:
        w = torch.full_like(kl, 1.0 / teachers.shape[0])
    else:
        ce = torch.stack([F.cross_entropy(t, labels, reduction="none") for t in teachers])
        w = torch.softmax(-ce, 0).detach()
    return temperature ** 2 * (w * kl).sum(0).mean()


# ---------------------------------------------------------------- config, inference, checkpoint

class FuseConfig(BaseModel):
    encoders: list[str]
    dims: dict[str, int]
    classes: list[str]
    width: int = 128
    heads: int = 4
    dropout: float = 0.1
    use_filter: bool = True
    re_embed: bool = True
    distill: bool = True
    temperature: float = 2.0
    distill_weight: float = 1.0
    teacher_weighting: Literal["confidence", "uniform"] = "confidence"
    filter: FilterConfig = FilterConfig()
    tile_grid: dict[str, Any] | None = None  # wsi_tiles.TileParams the features were made with (slides only)

    @model_validator(mode="after")
    def _dims(self) -> FuseConfig:
        missing = [e for e in self.encoders if e not in self.dims]
        if missing:
            raise ValueError(f"no width given for encoder(s) {missing}")
        if self.re_embed and self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


def build_student(cfg: FuseConfig) -> nn.Module:
    if cfg.re_embed:
        return FuseCPath(cfg.encoders, cfg.dims, len(cfg.classes), cfg.width, cfg.heads, cfg.dropout)
    return ABMIL(cfg.encoders, cfg.dims, len(cfg.classes), cfg.width, cfg.dropout)


class SlidePrediction(BaseModel):
    slide_id: str
    label: str
    probabilities: dict[str, float]
    tile_attention: list[float]  # one per tile of the bag (0 for tiles the filter dropped), sums to 1
    kept: list[int]
    cluster_of_kept: list[int]
    cluster_attention: list[float] | None = None


def to_tensors(bag: SlideBag, encoders: list[str], sel: Selection | None = None,
               device: str = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    idx = sel.keep if sel is not None else slice(None)
    feats = {e: torch.from_numpy(bag.features[e][idx]).to(device) for e in encoders}
    return feats, (torch.from_numpy(np.asarray(sel.clusters, np.int64)).to(device) if sel is not None else None)


class FuseCPathModel:
    """A trained student with its filter: what a tool or an eval loads to classify slides."""

    def __init__(self, cfg: FuseConfig, net: nn.Module, scorer: TileScorer | None, device: str = "cpu"):
        self.cfg, self.net, self.scorer, self.device = cfg, net.to(device).eval(), scorer, device

    def select(self, bag: SlideBag) -> Selection:
        return select_tiles(bag, self.cfg.encoders, self.cfg.filter, self.scorer, self.cfg.use_filter)

    @torch.no_grad()
    def predict(self, bag: SlideBag) -> SlidePrediction:
        check_bags([bag], self.cfg.encoders)
        sel = self.select(bag)
        out = self.net(*to_tensors(bag, self.cfg.encoders, sel, self.device))
        p = torch.softmax(out.logits, -1).cpu().numpy().astype(float)
        tile = np.zeros(bag.n_tiles)
        tile[sel.keep] = out.tile_attention.cpu().numpy()
        return SlidePrediction(
            slide_id=bag.slide_id, label=self.cfg.classes[int(p.argmax())],
            probabilities=dict(zip(self.cfg.classes, p.tolist())), tile_attention=tile.tolist(),
            kept=sel.keep.tolist(), cluster_of_kept=sel.clusters.tolist(),
            cluster_attention=None if out.cluster_attention is None else out.cluster_attention.cpu().tolist())


def save_checkpoint(path: Path, cfg: FuseConfig, net: nn.Module, scorer: TileScorer | None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    blob = {"version": VERSION, "config": cfg.model_dump(),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    if scorer is not None:
        blob["scorer"] = {"encoders": scorer.encoders, "centroids": torch.from_numpy(scorer.centroids),
                          "code_score": torch.from_numpy(scorer.code_score), "prior": torch.from_numpy(scorer.prior)}
    torch.save(blob, path)


def load_checkpoint(path: Path, device: str = "cpu") -> FuseCPathModel:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = FuseConfig.model_validate(blob["config"])
    net = build_student(cfg)
    net.load_state_dict(blob["state_dict"])
    sc = blob.get("scorer")
    scorer = None if sc is None else TileScorer(list(sc["encoders"]), sc["centroids"].numpy(),
                                                sc["code_score"].numpy(), sc["prior"].numpy())
    return FuseCPathModel(cfg, net, scorer, device)


# ---------------------------------------------------------------- slides -> bags

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "fusecpath.pt"
SLIDE_GRID = {"target_mpp": 1.0, "tile_px": 128, "max_tiles": 160}  # one grid shared by every encoder


def bag_from_slide(path: Path, encoders: list, grid: dict[str, Any] | None = None, *, label: int | None = None,
                   cache_dir: Path | None = None, progress: bool = False) -> SlideBag:
    """Every encoder's features of one slide's tissue tiles (read once, zarr-cached when `cache_dir`)."""
    from core.case import CaseDataError
    from core.imaging.wsi_tiles import TileParams, slide_features_many

    feats = slide_features_many(path, encoders, TileParams(**(grid or SLIDE_GRID)), cache_dir=cache_dir,
                                progress=progress)
    if len(feats[0].xy0) == 0:
        raise CaseDataError(Path(path), "tissue", "no tissue tile found to classify (blank or unstained slide?)")
    return SlideBag(slide_id=Path(path).stem, features={e.name: f.features for e, f in zip(encoders, feats)},
                    coords=feats[0].xy0, label=label)


def slide_bags(slides: list[tuple[Path, str]], classes: list[str], encoders: list, grid: dict[str, Any] | None = None,
               cache_dir: Path | None = None) -> list[SlideBag]:
    """(path, class name) pairs -> labelled bags, with a progress bar over the slides."""
    from tqdm.auto import tqdm

    return [bag_from_slide(p, encoders, grid, label=classes.index(c), cache_dir=cache_dir)
            for p, c in tqdm(slides, desc="slides -> features", unit="slide")]


# ---------------------------------------------------------------- the tool

class FuseCPathParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(6, ge=1, le=24)  # highest-attention tiles reported as evidence
    heatmap: bool = True


def top_tiles(pred: SlidePrediction, k: int) -> list[int]:
    att = np.asarray(pred.tile_attention)
    return [int(i) for i in np.argsort(-att, kind="stable")[:k] if att[i] > 0]


def heatmap_png(slide: Any, bag: SlideBag, pred: SlidePrediction, size0: float, top: list[int], path: Path,
                max_size: int = 768) -> None:
    """Thumbnail with each kept tile tinted by its attention (red = most attended) and the top tiles boxed."""
    from PIL import Image, ImageDraw

    thumb = slide.thumbnail(max_size).astype(np.float32)
    sc = thumb.shape[1] / slide.dimensions[0]
    att = np.asarray(pred.tile_attention)
    peak = att.max() if att.max() > 0 else 1.0
    red = np.array([220.0, 20.0, 20.0])
    for i in pred.kept:
        x0, y0 = bag.coords[i] * sc
        a0, b0, a1, b1 = int(y0), int(x0), int(math.ceil(y0 + size0 * sc)), int(math.ceil(x0 + size0 * sc))
        w = 0.15 + 0.6 * att[i] / peak
        thumb[a0:a1, b0:b1] = (1 - w) * thumb[a0:a1, b0:b1] + w * red
    img = Image.fromarray(np.clip(thumb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for rank, i in enumerate(top, 1):
        x0, y0 = bag.coords[i] * sc
        draw.rectangle([x0, y0, x0 + size0 * sc, y0 + size0 * sc], outline=(255, 220, 0), width=2)
        draw.text((x0 + 2, y0 + 1), str(rank), fill=(255, 255, 255))
    img.save(path)


def patches_png(slide: Any, bag: SlideBag, size0: float, top: list[int], path: Path, px: int = 160) -> None:
    """The top-attention tiles side by side, at full resolution, in rank order."""
    from PIL import Image

    s = int(round(size0))
    tiles = [Image.fromarray(slide.read_region(int(bag.coords[i][0]), int(bag.coords[i][1]), 0, s, s)).resize((px, px))
             for i in top]
    sheet = Image.new("RGB", (px * len(tiles) + 4 * (len(tiles) - 1), px), (255, 255, 255))
    for j, t in enumerate(tiles):
        sheet.paste(t, (j * (px + 4), 0))
    sheet.save(path)


@register
class WSIFuseCPath(Tool):
    name = "wsi_fusecpath"
    description = ("H&E whole-slide subtype (normal lung / adenocarcinoma / squamous cell carcinoma) from several "
                   "heterogeneous patch encoders fused by FuseCPath (clustering filter, cluster re-embedding, "
                   "distilled from per-encoder slide models); attention heatmap and the most-attended tiles")
    modalities = frozenset({Modality.WSI})
    Params = FuseCPathParams
    model_name = "FuseCPath"
    version = VERSION

    @classmethod
    def available(cls) -> bool:
        return CHECKPOINT.is_file()

    def load(self) -> None:
        import hashlib

        from tools.patch_encoders import get_encoder

        self.model = load_checkpoint(CHECKPOINT, device=self.device)
        self.encoders = [get_encoder(e, device=self.device) for e in self.model.cfg.encoders]
        self.model_name = f"FuseCPath over {' + '.join(self.model.cfg.encoders)}"
        self.version = f"{VERSION}/{hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest()[:10]}"

    def analyse(self, study: Any, params: BaseModel, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        p: FuseCPathParams = params  # type: ignore[assignment]
        grid = self.model.cfg.tile_grid or SLIDE_GRID
        bag = bag_from_slide(study.source, self.encoders, grid)
        pred = self.model.predict(bag)
        mpp0 = study.mpp or 0.5
        size0 = grid["tile_px"] * grid["target_mpp"] / mpp0
        top = top_tiles(pred, p.top_k)
        best = max(pred.probabilities.values())
        findings = [Finding(label=f"slide_class:{c}", present=q == best, probability=round(q, 4))
                    for c, q in pred.probabilities.items()]
        um = mpp0
        for rank, i in enumerate(top, 1):
            x, y = bag.coords[i] * um
            findings.append(Finding(
                label="attention_tile", value=round(pred.tile_attention[i], 4), unit="attention share",
                location=f"x {x:.0f}-{x + size0 * um:.0f} um, y {y:.0f}-{y + size0 * um:.0f} um",
                detail=f"rank {rank} of {len(pred.kept)} kept tiles ({bag.n_tiles} tissue tiles)"))
        artefacts = []
        if ctx.artefact_dir is not None and p.heatmap:
            out = Path(ctx.artefact_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{self.name}_{ctx.study_id}".replace("/", "_")
            heatmap_png(study, bag, pred, size0, top, out / f"{stem}_attention.png")
            patches_png(study, bag, size0, top, out / f"{stem}_top_tiles.png")
            artefacts = [
                Artefact(id=f"{self.name}:{ctx.study_id}:attention", kind="png", path=f"{stem}_attention.png",
                         description="slide thumbnail; kept tiles tinted by FuseCPath attention (red = most "
                                     "attended), top tiles boxed and numbered"),
                Artefact(id=f"{self.name}:{ctx.study_id}:top_tiles", kind="png", path=f"{stem}_top_tiles.png",
                         description=f"the {len(top)} most-attended tiles, rank order, full resolution")]
        return findings, artefacts

    def summarise(self, findings: list[Finding]) -> str:
        cls = [f for f in findings if f.label.startswith("slide_class:")]
        best = max(cls, key=lambda f: f.probability or 0)
        others = ", ".join(f"{f.label.split(':', 1)[1].replace('_', ' ')} {f.probability:.2f}"
                           for f in cls if f is not best)
        tiles = [f for f in findings if f.label == "attention_tile"]
        where = "; ".join(f"#{j} {f.location}" for j, f in enumerate(tiles[:3], 1))
        return (f"Fused slide model: most consistent with {best.label.split(':', 1)[1].replace('_', ' ')} "
                f"(p={best.probability:.2f}; {others}). Most-attended tiles: {where}.")
