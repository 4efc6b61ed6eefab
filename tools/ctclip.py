"""CT-CLIP on chest CT: a small 3D image encoder aligned with report text, read out zero-shot.

The recipe follows arXiv 2509.13175 ("supervised pre-training with LLM-extracted silver labels,
then vanilla CLIP") at toy scale, with SimCroP's (arXiv 2509.08311) sentence <-> patch alignment as
an optional extra loss; training/train_ctclip.py trains it, evals/ctclip.py measures it.

Image encoder: MONAI's 3D ResNet-18 (`ResNet(block="basic", layers=[2, 2, 2, 2])`) at reduced
width, block_inplanes (16, 32, 64, 96) instead of (64, 128, 256, 512), and a 3^3 stride-2 stem
instead of 7^3: ~1.6 M parameters in all, so the float16 checkpoint stays near 3 MB and a training
run fits a 2-core CPU. Input: the CT `Volume` (HU, [z, y, x], spacing mm) resampled to the cohort's
field of view (240 x 358.4 x 358.4 mm) on a 40 x 80 x 80 grid (6 x 4.5 x 4.5 mm voxels; area-
averaged when shrinking, trilinear when enlarging, centre-cropped / padded with air), then two
windows as two channels: lung (L -600 / W 1500) and mediastinal (L 40 / W 400), each mapped to
[-1, 1]. The grid is the CPU budget's choice (measured: a training step of 16 volumes takes
~1.5 s on 2 busy cores at 40 x 80 x 80, about the same as at 32 x 64 x 64, where fixed costs
dominate): fine patterns (septal lines, small calcifications, peribronchial cuffs) are at or below
its voxel size, and the evals show it.

Text encoder: all-MiniLM-L6-v2 (core/text_embedding.py, offline), frozen, on the CPU. A report is
split into sentences; each sentence's MiniLM embedding goes through a trainable MLP projection and
the report's embedding is the normalised mean of its sentences' projections. Why frozen: the 22 M
parameter text model would be fourteen times the image encoder and cost most of a CPU training run for
a few hundred templated reports; frozen, the training reports' sentence embeddings are computed
once and cached, and the projection head (~0.13 M parameters) does the adapting. Why sentences:
MiniLM blurs negation inside one long input; per sentence, "No pleural effusion." and "Pleural
effusion." stay separate vectors, a one-sentence prompt lives in the same space as a report, and
SimCroP's alignment needs the sentences anyway.

Heads: a linear classifier on the pooled features (18 CT-RATE labels; stage 1 trains it on the
silver labels), image and text projections into a shared 128-d space, a learnable temperature,
and a patch projection of the layer-3 feature map (3 x 5 x 5 = 75 patches at this grid) for the
alignment loss.

Zero-shot readout, as CT-CLIP's `scripts/zero_shot.py` does it: for each label, a softmax over the
(temperature-scaled) similarities of the image with "{Label}." and "not {label}."; P(present) is
the first entry. The tool `ctclip_zeroshot` passes that softmax's logit, scale x (sim("X.") -
sim("not X.")), through a per-label Platt calibration and threshold fitted on validation data
(kept in checkpoints/ctclip.json) and reports each label under
its catalogue finding key where exactly one finding maps to it (CT-RATE's "lung nodule" counts both
nodules and masses, so it stays `lung_nodule_or_mass` and does not enter disease evidence).
"""
from __future__ import annotations

import functools
import json
import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from core.case import Modality
from core.catalogue import CT_RATE_LABELS, load_catalogue
from tools.base import Artefact, Finding, RunContext, Tool
from tools.registry import register

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "ctclip.pt"
TRAIN_COMMAND = "python -m training.train_ctclip"
GRID = (40, 80, 80)  # model input [z, y, x]
FOV_MM = (240.0, 358.4, 358.4)  # the cohort's CT field of view (core/synth/cohort.py CohortOptions.for_grid)
WINDOWS = ((-600.0, 1500.0), (40.0, 400.0))  # (level, width): lung, mediastinal
TEXT_DIM = 384
EVIDENCE_MIN_AUC = 0.8  # per-label validation AUC a zero-shot readout needs to count as disease evidence
DEFAULT_CONFIG = {"grid": list(GRID), "fov_mm": list(FOV_MM), "windows": [list(w) for w in WINDOWS],
                  "widths": [16, 32, 64, 96], "embed_dim": 128, "text_hidden": 256, "n_labels": len(CT_RATE_LABELS)}
_HEADER = re.compile(r"^\s*(TECHNIQUE|FINDINGS|IMPRESSION|COMPARISON|INDICATION|HISTORY)\s*:\s*", re.I)


# ------------------------------------------------------------------ input handling

def _spacing(study: Any) -> tuple[float, float, float]:
    sp = getattr(study, "spacing", None)
    if sp is None or len(sp) != 3:
        raise ValueError(f"volume needs a 3-value spacing (z, y, x) in mm, got {sp!r}")
    sp = tuple(float(s) for s in sp)
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"volume spacing must be positive mm, got {sp}")
    return sp  # type: ignore[return-value]


def resample_hu(arr: np.ndarray, spacing: tuple[float, float, float], grid=GRID, fov_mm=FOV_MM) -> np.ndarray:
    """HU [z, y, x] at `spacing` -> HU on `grid` covering `fov_mm` (centred; air outside the scan)."""
    target = [f / g for f, g in zip(fov_mm, grid)]
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(arr.shape, spacing, target)]
    t = torch.from_numpy(np.ascontiguousarray(arr, np.float32))[None, None]
    if tuple(size) != tuple(arr.shape):
        if all(s <= n for s, n in zip(size, arr.shape)):
            t = F.interpolate(t, size=size, mode="area")
        else:
            t = F.interpolate(t, size=size, mode="trilinear", align_corners=False)
    out = torch.full((1, 1, *grid), -1000.0)
    src, dst = [], []
    for n, g in zip(size, grid):
        if n >= g:
            o = (n - g) // 2
            src.append(slice(o, o + g))
            dst.append(slice(0, g))
        else:
            o = (g - n) // 2
            src.append(slice(0, n))
            dst.append(slice(o, o + n))
    out[(0, 0, *dst)] = t[(0, 0, *src)]
    return out[0, 0].numpy()


def window_channels(hu: np.ndarray | torch.Tensor, windows=WINDOWS):
    """HU -> one channel per (level, width) window, each in [-1, 1]; works on numpy or torch, adds axis -4."""
    lib = torch if isinstance(hu, torch.Tensor) else np
    chans = []
    for level, width in windows:
        lo = level - width / 2
        chans.append(lib.clip((hu - lo) / width, 0.0, 1.0) * 2.0 - 1.0)
    return lib.stack(chans, -4)


def preprocess(study: Any, config: dict | None = None) -> np.ndarray:
    """A `Volume` (or anything with .array HU [z, y, x] and .spacing) -> float32 [C, *grid]."""
    cfg = config or DEFAULT_CONFIG
    arr = getattr(study, "array", None)
    if arr is None:
        raise ValueError(f"expected a CT Volume (with .array and .spacing), got {type(study).__name__}")
    a = np.asarray(arr)
    if a.ndim != 3:
        raise ValueError(f"CT volume array must be 3-D [z, y, x], got shape {a.shape}")
    if min(a.shape) < 2:
        raise ValueError(f"CT volume too small: {a.shape}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"CT volume has {int((~np.isfinite(a)).sum())} non-finite voxels")
    hu = resample_hu(a, _spacing(study), tuple(cfg["grid"]), tuple(cfg["fov_mm"]))
    return window_channels(hu, [tuple(w) for w in cfg["windows"]]).astype(np.float32)


def split_sentences(text: str) -> list[str]:
    """A report's sentences (section headers dropped, the technique line too: it says nothing about findings)."""
    out = []
    for line in re.split(r"\n+", text or ""):
        if re.match(r"^\s*TECHNIQUE\s*:", line, re.I):
            continue
        line = _HEADER.sub("", line)
        out += [p.strip() for p in re.split(r"(?<=[.!?])\s+", line) if p.strip()]
    return out or [(text or "").strip() or "No report."]


# ------------------------------------------------------------------ the model

class CTCLIP(nn.Module):
    """3D ResNet-18 (reduced width) image encoder + classifier, projections and temperature.

    The frozen MiniLM is not a submodule: sentence embeddings [S, 384] come in from outside
    (`sentence_features`), so the checkpoint holds only what is trained."""

    def __init__(self, n_labels: int = 18, widths=(16, 32, 64, 128), in_channels: int = 2, embed_dim: int = 128,
                 text_dim: int = TEXT_DIM, text_hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        from monai.networks.nets import ResNet

        self.backbone = ResNet(block="basic", layers=[2, 2, 2, 2], block_inplanes=list(widths), spatial_dims=3,
                               n_input_channels=in_channels, conv1_t_size=3, conv1_t_stride=2,
                               feed_forward=False, num_classes=n_labels)
        c3, c4 = widths[2], widths[3]
        self.drop = nn.Dropout(dropout)
        self.cls_head = nn.Linear(c4, n_labels)
        self.img_proj = nn.Linear(c4, embed_dim)
        self.patch_proj = nn.Linear(c3, embed_dim)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, text_hidden), nn.GELU(), nn.Linear(text_hidden, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # image side
    def feature_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        f3 = b.layer3(b.layer2(b.layer1(x)))
        return f3, b.layer4(f3)

    def encode_image(self, x: torch.Tensor, patches: bool = False) -> dict[str, torch.Tensor]:
        f3, f4 = self.feature_maps(x)
        pooled = f4.mean(dim=(2, 3, 4))
        out = {"pooled": pooled, "logits": self.cls_head(self.drop(pooled)),
               "embedding": F.normalize(self.img_proj(pooled), dim=-1)}
        if patches:
            tok = f3.flatten(2).transpose(1, 2)  # [B, P, C3]
            out["patches"] = F.normalize(self.patch_proj(tok), dim=-1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x)["logits"]

    # text side
    def sentence_features(self, sent: torch.Tensor) -> torch.Tensor:
        """Unit-norm projections [S, d] of MiniLM sentence embeddings [S, 384]."""
        return F.normalize(self.text_proj(sent), dim=-1)

    def report_features(self, sent: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
        """Report embeddings [n, d]: normalised mean of each report's sentence projections (owner[s] = its report)."""
        z = self.sentence_features(sent)
        acc = torch.zeros(n, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, owner, z)
        return F.normalize(acc, dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()


def build_model(config: dict | None = None) -> CTCLIP:
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    return CTCLIP(n_labels=int(cfg["n_labels"]), widths=tuple(cfg["widths"]), in_channels=len(cfg["windows"]),
                  embed_dim=int(cfg["embed_dim"]), text_hidden=int(cfg["text_hidden"]))


def read_metadata(path: Path | str = CHECKPOINT) -> dict:
    try:
        return json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def load_ctclip(path: Path | str = CHECKPOINT, device: str = "cpu") -> tuple[CTCLIP, dict]:
    """The model (eval mode, on `device`) and its metadata: the checkpoint's own fields plus the json next to it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CT-CLIP checkpoint {path} not found: train it with `{TRAIN_COMMAND}` "
                                f"(writes checkpoints/ctclip.pt and ctclip.json)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    cfg = {**DEFAULT_CONFIG, **ck.get("config", {})}
    model = build_model(cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    model.to(device).eval()
    meta = {**read_metadata(path), **{k: v for k, v in ck.items() if k != "state_dict"}, "config": cfg,
            "path": str(path)}
    model.config = cfg  # type: ignore[attr-defined]
    return model, meta


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _config(model: nn.Module) -> dict:
    return getattr(model, "config", DEFAULT_CONFIG)


# ------------------------------------------------------------------ inference entry points

@torch.no_grad()
def encode_inputs(model: CTCLIP, x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """Preprocessed inputs [N, C, *grid] -> pooled features, classifier logits, unit-norm embeddings."""
    model.eval()
    dev = _device(model)
    outs: dict[str, list] = {"pooled": [], "logits": [], "embedding": []}
    for i in range(0, len(x), batch):
        o = model.encode_image(torch.as_tensor(np.asarray(x[i:i + batch], np.float32), device=dev))
        for k in outs:
            outs[k].append(o[k].float().cpu().numpy())
    return {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in outs.items()}


def image_embeddings(model: CTCLIP, volumes) -> np.ndarray:
    """Unit-norm float32 image embeddings [n, d] of CT volumes."""
    if not len(volumes):
        return np.zeros((0, model.img_proj.out_features), np.float32)
    cfg = _config(model)
    x = np.stack([preprocess(v, cfg) for v in volumes])
    return encode_inputs(model, x)["embedding"].astype(np.float32)


def image_embedding(model: CTCLIP, volume) -> np.ndarray:
    """Unit-norm float32 1-D image embedding of one CT volume."""
    return image_embeddings(model, [volume])[0]


_SENT_LOCK = threading.Lock()
_SENT_CACHE: dict[str, np.ndarray] = {}  # frozen MiniLM: a sentence's embedding never changes
_SENT_CACHE_MAX = 20000


def minilm_sentences(sentences: list[str]) -> np.ndarray:
    """Frozen MiniLM embeddings [S, 384] (unit-norm), memoised per sentence; new ones embedded in one batch."""
    from core.text_embedding import embed

    if not sentences:
        return np.zeros((0, TEXT_DIM), np.float32)
    with _SENT_LOCK:
        todo = [s for s in dict.fromkeys(sentences) if s not in _SENT_CACHE]
        if todo:
            if len(_SENT_CACHE) + len(todo) > _SENT_CACHE_MAX:
                _SENT_CACHE.clear()
            _SENT_CACHE.update(zip(todo, embed(todo)))
        return np.stack([_SENT_CACHE[s] for s in sentences]).astype(np.float32)


def sentence_batch(texts: list[str], sent_emb: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reports -> (MiniLM sentence embeddings [S, 384], owner index [S]); `sent_emb` = a precomputed cache."""
    sents, owner = [], []
    for i, t in enumerate(texts):
        ss = split_sentences(t)
        sents += ss
        owner += [i] * len(ss)
    if sent_emb is not None and all(s in sent_emb for s in sents):
        emb = np.stack([sent_emb[s] for s in sents])
    else:
        emb = minilm_sentences(sents)
    return emb.astype(np.float32), np.asarray(owner, np.int64)


@torch.no_grad()
def text_embedding(model: CTCLIP, texts: list[str]) -> np.ndarray:
    """Unit-norm float32 text embeddings [n, d]: each text split into sentences, projected, averaged."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        return np.zeros((0, model.img_proj.out_features), np.float32)
    model.eval()
    emb, owner = sentence_batch(texts)
    dev = _device(model)
    z = model.report_features(torch.from_numpy(emb).to(dev), torch.from_numpy(owner).to(dev), len(texts))
    return z.float().cpu().numpy()


def prompts(label: str) -> tuple[str, str]:
    """CT-CLIP's zero-shot prompt pair (scripts/zero_shot.py): "{Pathology}." vs "not {Pathology}."."""
    return f"{label[:1].upper()}{label[1:]}.", f"not {label}."


@torch.no_grad()
def prompt_embeddings(model: CTCLIP, labels=CT_RATE_LABELS) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) prompt embeddings, each [L, d]."""
    cache = getattr(model, "_prompt_cache", None)
    if cache is not None and cache[0] == tuple(labels):
        return cache[1], cache[2]
    model.eval()
    pos, neg = zip(*(prompts(lab) for lab in labels))
    dev = _device(model)
    p = model.sentence_features(torch.from_numpy(minilm_sentences(list(pos))).to(dev)).float().cpu().numpy()
    n = model.sentence_features(torch.from_numpy(minilm_sentences(list(neg))).to(dev)).float().cpu().numpy()
    if not model.training:
        model._prompt_cache = (tuple(labels), p, n)  # type: ignore[attr-defined]
    return p, n


def clear_prompt_cache(model: CTCLIP) -> None:
    if hasattr(model, "_prompt_cache"):
        del model._prompt_cache


@torch.no_grad()
def zero_shot_logits(model: CTCLIP, embeddings: np.ndarray, labels=CT_RATE_LABELS) -> np.ndarray:
    """[n, L] scale * (sim(image, "X.") - sim(image, "not X.")): the two-way softmax's logit."""
    p, n = prompt_embeddings(model, labels)
    s = float(model.scale())
    e = np.asarray(embeddings, np.float32).reshape(-1, p.shape[1])
    return (s * (e @ p.T - e @ n.T)).astype(np.float32)


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, np.float64), -60.0, 60.0)))


@torch.no_grad()
def zero_shot_probs(model: CTCLIP, embeddings: np.ndarray, labels=CT_RATE_LABELS) -> np.ndarray:
    """P(present) [n, L] from unit-norm image embeddings: softmax over scale * (sim("X."), sim("not X."))."""
    return sigmoid(zero_shot_logits(model, embeddings, labels)).astype(np.float32)  # softmax of two = sigmoid


def zero_shot(model: CTCLIP, volume) -> dict[str, float]:
    """{CT-RATE label: P(present)} for one CT volume, CT-CLIP's prompt pair per label."""
    pr = zero_shot_probs(model, image_embedding(model, volume)[None])[0]
    return {lab: float(v) for lab, v in zip(CT_RATE_LABELS, pr)}


@torch.no_grad()
def head_probs(model: CTCLIP, volumes) -> np.ndarray:
    """The stage-1 classifier head's P(present) [n, 18] (not zero-shot)."""
    cfg = _config(model)
    x = np.stack([preprocess(v, cfg) for v in volumes])
    return 1.0 / (1.0 + np.exp(-encode_inputs(model, x)["logits"]))


# ------------------------------------------------------------------ the tool

@functools.lru_cache(maxsize=1)
def label_keys() -> dict[str, str]:
    """CT-RATE label -> the tool's finding label: the catalogue key when exactly one finding maps to it."""
    cat = load_catalogue()
    out = {}
    for lab in CT_RATE_LABELS:
        keys = sorted(k for k, f in cat.findings.items() if f.ct_rate == lab)
        out[lab] = keys[0] if len(keys) == 1 else (lab.replace(" ", "_") + "_or_mass" if lab == "lung nodule"
                                                     else "ct_rate:" + lab)
    return out


def calibrate(logit: np.ndarray, ab: tuple[float, float] | list | None) -> np.ndarray:
    """Platt scaling of a logit (the zero-shot softmax's, or the head's): sigmoid(a * logit + b);
    plain sigmoid when ab is None."""
    a, b = (float(ab[0]), float(ab[1])) if ab else (1.0, 0.0)
    return sigmoid(a * np.asarray(logit, np.float64) + b)


class CTCLIPParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibrated: bool = True  # Platt-calibrated probabilities (fitted on validation); False: raw zero-shot softmax


@register
class CTCLIPZeroShot(Tool):
    name = "ctclip_zeroshot"
    description = ("Chest CT: CT-CLIP-style zero-shot P(present) for the 18 CT-RATE abnormalities "
                   "(3D ResNet-18 aligned with report text).")
    modalities = frozenset({Modality.CT})
    Params = CTCLIPParams
    model_name = "CT-CLIP (3D ResNet-18 + MiniLM)"
    version = str(read_metadata(CHECKPOINT).get("version", "untrained"))
    checkpoint: Path = CHECKPOINT

    def __init__(self, device: str = "auto"):
        super().__init__(device)
        self.meta = read_metadata(self.checkpoint)
        self.version = str(self.meta.get("version", "untrained"))
        self.model: CTCLIP | None = None

    @classmethod
    def available(cls) -> bool:
        """Planned only where the checkpoint exists; run directly without it, it fails naming the training command."""
        return Path(cls.checkpoint).is_file()

    def load(self) -> None:
        self.model, self.meta = load_ctclip(self.checkpoint, self.device)
        self.version = str(self.meta.get("version", self.version))

    def analyse(self, study: Any, params: CTCLIPParams, ctx: RunContext) -> tuple[list[Finding], list[Artefact]]:
        assert self.model is not None
        logit = zero_shot_logits(self.model, image_embedding(self.model, study)[None])[0]
        raw = dict(zip(CT_RATE_LABELS, sigmoid(logit)))
        cal = self.meta.get("calibration") or {}
        th = self.meta.get("thresholds") or {}
        keys = label_keys()
        val_auc = (self.meta.get("val") or {}).get("per_label_auc_silver") or {}
        findings = []
        for lab in CT_RATE_LABELS:
            p = float(calibrate(logit[CT_RATE_LABELS.index(lab)], cal.get(lab) if params.calibrated else None))
            p = min(max(p, 0.0), 1.0)
            thr = float(th.get(lab, 0.5)) if params.calibrated else 0.5
            auc = val_auc.get(lab)
            # a readout near chance on validation is shown, but kept out of the disease evidence (its catalogue
            # key would let it outvote measured findings of the same name)
            trusted = auc is not None and auc >= EVIDENCE_MIN_AUC
            findings.append(Finding(label=keys[lab] if trusted else "ct_rate:" + lab, present=p >= thr, probability=p,
                                    detail=f"CT-RATE '{lab}': zero-shot softmax {raw[lab]:.3f}, threshold {thr:.2f}, "
                                           f"validation AUC {auc if auc is not None else float('nan'):.2f}"
                                           + ("" if trusted else " (below %.2f: not used as evidence)" % EVIDENCE_MIN_AUC)))
        return findings, []

    def summarise(self, findings: list[Finding]) -> str:
        pos = [f"{f.label.replace('_', ' ')} (p={f.probability:.2f})"
               for f in sorted(findings, key=lambda f: -(f.probability or 0)) if f.present]
        return ("CT-CLIP zero-shot positive: " + "; ".join(pos) + "." if pos
                else "CT-CLIP zero-shot: no CT-RATE abnormality above its threshold.")
