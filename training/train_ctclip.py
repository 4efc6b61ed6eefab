"""Train CT-CLIP (tools/ctclip.py): silver-label supervised pre-training, then CLIP, then CLIP + alignment.

    python -m training.train_ctclip --labels rules --n-train 600 --n-val 200 --out-dir runs/ctclip \\
        --ship checkpoints/ctclip.pt

The recipe of arXiv 2509.13175 at toy scale, plus SimCroP's (arXiv 2509.08311) sentence <-> patch
alignment as an ablation. Three variants come out of one run (each in --out-dir, with a json):
  supervised.pt  stage 1 only: multi-label BCE of the classifier head on the 18 CT-RATE labels
                 read from each case's *report* (`--labels rules|llm`, the silver labels of the
                 paper; `truth` = the planted findings, for comparison);
  clip.pt        stage 1, then vanilla CLIP: symmetric InfoNCE between the image embedding and the
                 report embedding (frozen MiniLM sentences -> trainable projection -> mean);
  clip_align.pt  stage 1, then CLIP + `--align-weight` x SimCroP-style alignment: each (non-negated)
                 report sentence attends over the layer-3 patch tokens of every image in the batch
                 (softmax of similarity / 0.1: the similarity-driven choice of the patches that
                 sentence talks about), and the sentence must pick out its own image from the batch by
                 the similarity to that attended feature (InfoNCE over images).
The CLIP variant with the better validation zero-shot macro AUC is copied to --ship (the tool's
checkpoint); its json names the others and their numbers. Validation uses the validation reports'
silver labels (no truth), as a real run without annotations would: model selection per stage
(best epoch), and, for the zero-shot variants, a per-label Platt calibration and the threshold that
maximises F1, which the tool applies.

Data, made on the fly and cached as .npz (a rerun with the same data arguments skips generation):
chest phantoms (core/synth/chest.py `make_chest_phantom`) drawn directly on the model's grid
(32 x 64 x 64 over the cohort's 240 x 358.4 x 358.4 mm field of view) with templated reports
(core/reports.write_report, as core/synth/cohort.py writes them: findings asserted, some hedged,
a few negatives, the impression naming the disease half the time). Each case draws from its own
SeedSequence([seed, index]). Validation and test sets are cohort-like (disease by weight,
`sample_findings`, metal at the cohort rate); the training set mixes in `--enriched-rate` cases
whose CT findings are drawn independently (so rare labels are seen and co-occurrence is no
shortcut). MiniLM sentence embeddings of all reports are computed once and cached with the data.
Augmentation: left-right flip (the labels have no side), shifts of up to 2 voxels, noise, and a
small window jitter.

`--recalibrate` (with the same data arguments) refits only the validation calibration and thresholds
of the checkpoints already in --out-dir, from the cached data, and re-ships.

Epochs per stage are fitted to `--stage-minutes` from the first epoch's CPU time / threads, so a
shared machine does not cut training short. `--device cuda` runs on a GPU (data generation and
MiniLM stay on the CPU).
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core.catalogue import CT_RATE_LABELS
from training.train_cxr import auc  # one ROC AUC for every training entry
from tools.ctclip import (DEFAULT_CONFIG, FOV_MM, GRID, WINDOWS, CTCLIP, build_model, calibrate, clear_prompt_cache,
                          encode_inputs, sigmoid, split_sentences, window_channels, zero_shot_logits)

MODEL_MAJOR = "1"
GENERATOR_VERSION = "ctclipgen-1"  # bump when the sampling/rendering below changes (invalidates caches)
_SIDED = ("pleural_effusion", "pneumothorax", "lung_nodule", "lung_mass", "consolidation", "atelectasis", "cavitation")
_NEGATED = ("no ", "there is no", "not ", "without ")
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinal": (40.0, 400.0), "bone": (400.0, 1800.0)}


# ------------------------------------------------------------------ data

@functools.lru_cache(maxsize=1)
def _catalogue():
    from core.catalogue import load_catalogue

    return load_catalogue()


@functools.lru_cache(maxsize=1)
def ct_keys() -> tuple[str, ...]:
    """Catalogue findings the phantom can plant that count towards a CT-RATE label."""
    from core.synth.chest import FINDING_KEYS

    cat = _catalogue()
    return tuple(k for k in FINDING_KEYS if cat.findings[k].ct_rate)


def render_case(seed: int, index: int, *, enriched_rate: float, metal_rate: float,
                grid: tuple[int, int, int]) -> dict:
    """One case: HU on the model grid, its report, truth labels (18), disease, enriched flag."""
    from core.reports import PlantedMention, write_report
    from core.synth.chest import PlantedFinding, make_chest_phantom
    from core.synth.cohort import METAL_KINDS, _weighted, sample_findings

    cat = _catalogue()
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    enriched = bool(rng.random() < enriched_rate)
    spacing = tuple(f / g for f, g in zip(FOV_MM, grid))
    for _ in range(6):
        if enriched:
            keys = [k for k in ct_keys() if rng.random() < 0.15]
            if "lung_mass" in keys and "lung_nodule" in keys and rng.random() < 0.5:
                keys.remove("lung_nodule")
            disease, dx_name, contrast, sev = "enriched", None, bool(rng.random() < 0.3), (0.3, 1.0)
        else:
            d = _weighted(rng, cat.chest_diseases())
            keys = sample_findings(rng, d)
            disease, dx_name, contrast, sev = d.key, d.name, d.contrast, (0.3, 0.9)
        metal = str(rng.choice(METAL_KINDS)) if rng.random() < metal_rate else None
        planted = [PlantedFinding(key=k, side=str(rng.choice(("right", "left"))) if k in _SIDED else "bilateral",
                                  severity=float(rng.uniform(*sev))) for k in keys if k != "medical_material"]
        try:
            ph = make_chest_phantom(rng, planted, shape=grid, spacing=spacing, contrast=contrast, metal=metal,
                                    sex="F" if rng.random() < 0.5 else "M", age=int(rng.integers(25, 85)))
            break
        except ValueError:  # "no room to plant finding" on an unlucky combination: draw again
            continue
    else:  # pragma: no cover
        raise RuntimeError(f"could not draw case {seed}/{index}")
    found = list(ph.findings)
    if metal:
        found.append({"key": "medical_material", "location": metal.replace("_", " "), "side": ""})
    seen, mentions = set(), []
    for f in found:
        if f["key"] not in seen:
            seen.add(f["key"])
            mentions.append(PlantedMention(f["key"], f.get("location", ""), f.get("size_mm"), f.get("side", "")))
    technique = f"CT chest {'with' if contrast else 'without'} intravenous contrast."
    report = write_report(mentions, rng, modality="CT", technique=technique,
                          impression_dx=dx_name if dx_name and rng.random() < 0.5 else None, metal=metal, cat=cat)
    hu = np.clip(np.rint(ph.hu), -1024, 3071).astype(np.int16)
    return {"hu": hu, "report": report, "truth": np.array(cat.ct_rate_vector(seen), np.uint8),
            "disease": disease, "enriched": enriched}


def _worker_init() -> None:
    torch.set_num_threads(1)


def _render_chunk(job: tuple) -> list:
    seed, indices, kw = job
    return [render_case(seed, i, **kw) for i in indices]


def make_dataset(seed: int, n: int, *, enriched_rate: float = 0.0, metal_rate: float = 0.15,
                 grid: tuple[int, int, int] = GRID, workers: int = 1, cache_dir: Path | None = None,
                 verbose: bool = True) -> dict:
    """n cases as arrays: hu int16 [n, *grid], reports [n], truth uint8 [n, 18], disease [n], enriched [n]."""
    cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "grandrounds_ctclip_cache")
    tag = f"{GENERATOR_VERSION}_s{seed}_n{n}_e{enriched_rate:g}_m{metal_rate:g}_g{'x'.join(map(str, grid))}"
    f = cache_dir / f"{tag}.npz"
    if f.is_file():
        z = np.load(f, allow_pickle=False)
        return {"hu": z["hu"], "reports": [str(r) for r in z["reports"]], "truth": z["truth"],
                "disease": [str(d) for d in z["disease"]], "enriched": z["enriched"]}
    t0 = time.perf_counter()
    kw = dict(enriched_rate=enriched_rate, metal_rate=metal_rate, grid=tuple(grid))
    chunks = [list(range(i, min(i + 8, n))) for i in range(0, n, 8)]
    rows: list[dict] = []
    if workers > 1 and n > 8:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as ex:
            for k, part in enumerate(ex.map(_render_chunk, [(seed, c, kw) for c in chunks])):
                rows += part
                if verbose and (k + 1) % 10 == 0:
                    print(f"  rendered {len(rows)}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        for c in chunks:
            rows += _render_chunk((seed, c, kw))
    out = {"hu": np.stack([r["hu"] for r in rows]), "reports": [r["report"] for r in rows],
           "truth": np.stack([r["truth"] for r in rows]), "disease": [r["disease"] for r in rows],
           "enriched": np.array([r["enriched"] for r in rows], bool)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, hu=out["hu"], reports=np.array(out["reports"]), truth=out["truth"],
                        disease=np.array(out["disease"]), enriched=out["enriched"])
    tmp.replace(f)
    if verbose:
        print(f"  dataset seed={seed} n={n}: rendered in {time.perf_counter() - t0:.0f} s -> {f}", flush=True)
    return out


def silver_labels(reports: list[str], method: str, cache_dir: Path | None = None) -> np.ndarray:
    """[n, 18] labels in [0, 1] read from the reports by `agents.labels.extract_labels` (the LLM or its rules)."""
    from agents.labels import extract_labels

    key = hashlib.sha1(("\n\x00".join(reports) + method).encode()).hexdigest()[:16]
    f = Path(cache_dir) / f"labels_{method}_{key}.npy" if cache_dir else None
    if f is not None and f.is_file():
        return np.load(f)
    y = np.asarray(extract_labels(reports, method=method), np.float32)
    if y.shape != (len(reports), len(CT_RATE_LABELS)):
        raise ValueError(f"extract_labels returned shape {y.shape}, expected {(len(reports), len(CT_RATE_LABELS))}")
    if f is not None:
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f, y)
    return y


def label_extractor(method: str) -> str:
    if method == "truth":
        return "planted findings (truth)"
    try:
        from agents.labels import extract_labels  # noqa: F401
        return f"agents.labels.extract_labels(method={method!r})"
    except ImportError:
        return "core.reports.read_findings (fallback: agents.labels not installed)"


def sentence_table(reports: list[str], cache_dir: Path | None = None) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """MiniLM embeddings of every report sentence (cached .npz) and each report's sentences."""
    from core.text_embedding import embed

    per = [split_sentences(r) for r in reports]
    uniq = sorted({s for ss in per for s in ss})
    key = hashlib.sha1("\n".join(uniq).encode()).hexdigest()[:16]
    f = Path(cache_dir) / f"minilm_{key}.npz" if cache_dir else None
    if f is not None and f.is_file():
        z = np.load(f, allow_pickle=False)
        emb = z["emb"]
    else:
        emb = embed(uniq, batch_size=128)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(f, emb=emb.astype(np.float16))
    emb = emb.astype(np.float32)
    return {s: emb[i] for i, s in enumerate(uniq)}, per


# ------------------------------------------------------------------ metrics

def macro_auc(y: np.ndarray, s: np.ndarray) -> tuple[float, list[float]]:
    per = [auc(y[:, k] >= 0.5, s[:, k]) for k in range(y.shape[1])]
    ok = [a for a in per if not math.isnan(a)]
    return (float(np.mean(ok)) if ok else float("nan")), per


def fit_platt(logit: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100) -> tuple[float, float]:
    """Platt scaling of one label: logistic regression of y on the logit (damped Newton), with an L2
    pull towards the identity (a=1, b=0) so that separable validation data cannot send it to infinity."""
    X = np.stack([np.asarray(logit, float), np.ones(len(logit))], 1)
    y = np.asarray(y, float)
    w = np.array([1.0, 0.0])

    def nll(w):
        z = X @ w
        return float(np.sum(np.logaddexp(0, z) - y * z) + 0.5 * l2 * ((w[0] - 1.0) ** 2 + w[1] ** 2))

    for _ in range(iters):
        z = sigmoid(X @ w)
        g = X.T @ (z - y) + l2 * np.array([w[0] - 1.0, w[1]])
        H = (X * (z * (1 - z))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(H, g)
        t, f0 = 1.0, nll(w)
        while nll(w - t * step) > f0 and t > 1e-4:
            t /= 2
        w = w - t * step
        if np.abs(t * step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


def best_f1_threshold(y: np.ndarray, p: np.ndarray, lo: float = 0.05, hi: float = 0.95) -> tuple[float, float]:
    y = np.asarray(y).astype(bool)
    best = (0.5, -1.0)
    for t in np.unique(np.clip(np.concatenate([p, np.linspace(lo, hi, 91)]), lo, hi)):
        pred = p >= t
        tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        if f1 > best[1] + 1e-9:
            best = (float(t), f1)
    return best


# ------------------------------------------------------------------ training

@dataclass
class TrainArgs:
    labels: str = "rules"  # rules | llm | truth: where stage 1's labels come from
    n_train: int = 600
    n_val: int = 200
    seed: int = 9101
    val_seed: int = 9102
    enriched_rate: float = 0.3
    train_metal_rate: float = 0.25
    cohort_metal_rate: float = 0.15
    batch_size: int = 16
    clip_batch_size: int = 24
    lr: float = 2e-3
    clip_lr: float = 5e-4
    weight_decay: float = 1e-4
    epochs: int = 30  # per stage, an upper bound: --stage-minutes usually decides
    stage_minutes: float = 6.0
    align_weight: float = 0.5
    align_tau: float = 0.1
    windows: str = "lung,mediastinal"  # input channels, from WINDOW_PRESETS
    device: str = "cpu"
    threads: int = 2
    workers: int = 2
    cache_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "grandrounds_ctclip_cache"))
    out_dir: str = "runs/ctclip"
    ship: str = "checkpoints/ctclip.pt"  # "" = do not copy the best variant
    variants: str = "supervised,clip,clip_align"
    verbose: bool = True


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    d = TrainArgs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, val in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(val, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        elif name == "labels":
            ap.add_argument(flag, choices=("rules", "llm", "truth"), default=val)
        else:
            ap.add_argument(flag, type=type(val), default=val)
    return TrainArgs(**vars(ap.parse_args(argv)))


def augment(hu: torch.Tensor, g: torch.Generator, windows=WINDOWS) -> torch.Tensor:
    """HU [B, z, y, x] -> windowed, augmented input [B, C, z, y, x]."""
    B = hu.shape[0]
    hu = hu.float()
    flip = torch.rand(B, generator=g) < 0.5
    if flip.any():
        hu[flip] = hu[flip].flip(-1)
    sh = torch.randint(-2, 3, (B, 3), generator=g)
    for i in range(B):
        if sh[i].any():
            hu[i] = torch.roll(hu[i], shifts=tuple(int(s) for s in sh[i]), dims=(0, 1, 2))
    hu = hu + (torch.rand(B, 1, 1, 1, generator=g) - 0.5) * 40.0  # window level jitter, +-20 HU
    hu = hu + torch.randn(hu.shape, generator=g) * (torch.rand(B, 1, 1, 1, generator=g) * 20.0)
    return window_channels(hu, windows)


def inputs(hu: np.ndarray | torch.Tensor, windows=WINDOWS) -> np.ndarray:
    t = torch.as_tensor(np.asarray(hu)).float()
    return window_channels(t, windows).numpy()


def _state(model: CTCLIP) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T
    t = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2


def align_loss(patches: torch.Tensor, sent: torch.Tensor, owner: torch.Tensor, scale: torch.Tensor,
               tau: float = 0.1) -> torch.Tensor:
    """SimCroP-style sentence -> image loss: each sentence [S, d] attends over every image's patches
    [B, P, d] (softmax of similarity / tau), and must rank its own image (owner) first by the
    similarity to the attended feature."""
    if len(sent) == 0:
        return patches.sum() * 0.0
    att = torch.softmax(torch.einsum("sd,bpd->sbp", sent, patches) / tau, dim=-1)
    v = F.normalize(torch.einsum("sbp,bpd->sbd", att, patches), dim=-1)
    score = scale * (sent[:, None, :] * v).sum(-1)  # [S, B]
    return F.cross_entropy(score, owner)


class Trainer:
    def __init__(self, args: TrainArgs):
        self.a = args
        self.dev = torch.device(args.device)
        self.cache = Path(args.cache_dir)
        self.g = torch.Generator().manual_seed(args.seed)
        names = [w.strip() for w in args.windows.split(",") if w.strip()]
        unknown = [w for w in names if w not in WINDOW_PRESETS]
        if unknown or not names:
            raise ValueError(f"--windows: unknown {unknown}; choose from {sorted(WINDOW_PRESETS)}")
        self.windows = [WINDOW_PRESETS[w] for w in names]
        self.cfg = {**DEFAULT_CONFIG, "windows": [list(w) for w in self.windows]}

    def log(self, *msg) -> None:
        if self.a.verbose:
            print(*msg, flush=True)

    # ---- data
    def load_data(self) -> None:
        a = self.a
        t0 = time.perf_counter()
        self.tr = make_dataset(a.seed, a.n_train, enriched_rate=a.enriched_rate, metal_rate=a.train_metal_rate,
                               workers=a.workers, cache_dir=self.cache, verbose=a.verbose)
        self.va = make_dataset(a.val_seed, a.n_val, enriched_rate=0.0, metal_rate=a.cohort_metal_rate,
                               workers=a.workers, cache_dir=self.cache, verbose=a.verbose)
        self.t_data = time.perf_counter() - t0
        t1 = time.perf_counter()
        if a.labels == "truth":
            self.y_tr, self.y_va = self.tr["truth"].astype(np.float32), self.va["truth"].astype(np.float32)
        else:
            self.y_tr = silver_labels(self.tr["reports"], a.labels, self.cache)
            self.y_va = silver_labels(self.va["reports"], a.labels, self.cache)
        self.t_labels = time.perf_counter() - t1
        agree = ((self.y_tr >= 0.5) == (self.tr["truth"] >= 1)).mean(0)
        self.label_agreement = {lab: round(float(x), 4) for lab, x in zip(CT_RATE_LABELS, agree)}
        self.log(f"labels={a.labels}: train positives {dict(zip(CT_RATE_LABELS, (self.y_tr >= .5).sum(0).astype(int).tolist()))}")
        self.log(f"  agreement with truth (train): mean {float(agree.mean()):.3f}, min {float(agree.min()):.3f}")
        t2 = time.perf_counter()
        self.sent_emb, self.sent_tr = sentence_table(self.tr["reports"] + self.va["reports"], self.cache)
        self.sent_va = self.sent_tr[len(self.tr["reports"]):]
        self.sent_tr = self.sent_tr[:len(self.tr["reports"])]
        self.t_text = time.perf_counter() - t2
        self.hu_tr = torch.from_numpy(self.tr["hu"])
        self.x_va = inputs(self.va["hu"], self.windows)
        self.log(f"data {self.t_data:.0f} s, labels {self.t_labels:.0f} s, MiniLM sentences {self.t_text:.0f} s "
                 f"({len(self.sent_emb)} unique)")

    def text_batch(self, idx, align: bool):
        sents, owner, al_s, al_o = [], [], [], []
        for j, i in enumerate(idx):
            ss = self.sent_tr[int(i)]
            sents += ss
            owner += [j] * len(ss)
            if align:
                keep = [s for s in ss if not s.lower().startswith(_NEGATED)]
                al_s += keep
                al_o += [j] * len(keep)
        emb = torch.from_numpy(np.stack([self.sent_emb[s] for s in sents])).to(self.dev)
        own = torch.tensor(owner, device=self.dev)
        if not align:
            return emb, own, None, None
        ae = torch.from_numpy(np.stack([self.sent_emb[s] for s in al_s])).to(self.dev) if al_s else emb[:0]
        return emb, own, ae, torch.tensor(al_o, device=self.dev, dtype=torch.long)

    # ---- evaluation on validation (silver labels)
    def val_scores(self, model: CTCLIP, zero_shot: bool) -> np.ndarray:
        """Validation logits [n, 18]: the zero-shot softmax's logit, or the classifier head's."""
        clear_prompt_cache(model)
        enc = encode_inputs(model, inputs(self.va["hu"], [tuple(w) for w in model.config["windows"]])
                            if getattr(model, "config", None) else self.x_va)
        if zero_shot:
            return zero_shot_logits(model, enc["embedding"])
        return enc["logits"]

    # ---- one stage
    def run_stage(self, model: CTCLIP, stage: str) -> tuple[CTCLIP, dict]:
        a = self.a
        clip = stage != "supervised"
        align = stage == "clip_align"
        bs = a.clip_batch_size if clip else a.batch_size
        if clip:
            enc_params = list(model.backbone.parameters())
            head_params = [p for n, p in model.named_parameters() if not n.startswith(("backbone.", "cls_head."))]
            for p in model.cls_head.parameters():
                p.requires_grad_(False)
            opt = torch.optim.AdamW([{"params": enc_params, "lr": a.clip_lr},
                                     {"params": head_params, "lr": a.clip_lr * 4}], weight_decay=a.weight_decay)
        else:
            prev = torch.from_numpy(self.y_tr.mean(0)).clamp(1e-3, 1 - 1e-3)
            with torch.no_grad():
                model.cls_head.bias.copy_(torch.log(prev / (1 - prev)))
            params = list(model.backbone.parameters()) + list(model.cls_head.parameters())
            opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.weight_decay)
        for grp in opt.param_groups:
            grp["base_lr"] = grp["lr"]
        n = len(self.hu_tr)
        steps = n // bs  # drop the last partial batch: InfoNCE wants full batches
        y_tr = torch.from_numpy(self.y_tr)
        planned = a.epochs
        best = (-1.0, None, 0)
        history = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for ep in range(a.epochs):
            if ep >= planned:
                break
            model.train()
            perm = torch.randperm(n, generator=self.g)
            tot, parts = 0.0, {"clip": 0.0, "align": 0.0}
            for i in range(steps):
                frac = (ep * steps + i) / max(planned * steps, 1)
                warm = min(1.0, (ep * steps + i + 1) / max(steps // 2, 1))
                for grp in opt.param_groups:
                    grp["lr"] = grp["base_lr"] * warm * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
                idx = perm[i * bs:(i + 1) * bs]
                x = augment(self.hu_tr[idx], self.g, self.windows).to(self.dev)
                if clip:
                    out = model.encode_image(x, patches=align)
                    emb, own, ae, ao = self.text_batch(idx, align)
                    txt = model.report_features(emb, own, len(idx))
                    loss = clip_loss(out["embedding"], txt, model.scale())
                    parts["clip"] += float(loss.detach())
                    if align:
                        la = align_loss(out["patches"], model.sentence_features(ae), ao, model.scale(), a.align_tau)
                        parts["align"] += float(la.detach())
                        loss = loss + a.align_weight * la
                else:
                    loss = F.binary_cross_entropy_with_logits(model(x), y_tr[idx].to(self.dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach())
            scores = self.val_scores(model, zero_shot=clip)
            m, _ = macro_auc(self.y_va, scores)
            rec = {"epoch": ep + 1, "train_loss": round(tot / max(steps, 1), 4), "val_macro_auc": round(m, 4)}
            if clip:
                rec.update(clip_loss=round(parts["clip"] / steps, 4), scale=round(model.scale().item(), 2))
                if align:
                    rec["align_loss"] = round(parts["align"] / steps, 4)
            history.append(rec)
            if ep == 0:
                work = (time.process_time() - cpu0) / max(a.threads, 1) if self.dev.type == "cpu" \
                    else time.perf_counter() - t0
                fit = int(a.stage_minutes * 60 / max(work, 1e-3))
                planned = max(min(a.epochs, fit), min(a.epochs, 2))
                self.log(f"[{stage}] {work:.0f} s/epoch (CPU time / {a.threads} threads): {planned} epochs")
            self.log(f"[{stage}] epoch {ep + 1}/{planned} " + " ".join(f"{k} {v}" for k, v in rec.items() if k != "epoch")
                     + f" ({time.perf_counter() - t0:.0f} s)")
            if m > best[0]:
                best = (m, _state(model), ep + 1)
        if best[1] is not None:
            model.load_state_dict(best[1])
        for p in model.parameters():
            p.requires_grad_(True)
        info = {"stage": stage, "best_epoch": best[2], "epochs_run": len(history), "history": history,
                "val_macro_auc": round(best[0], 4), "seconds": round(time.perf_counter() - t0, 1),
                "cpu_seconds": round(time.process_time() - cpu0, 1)}
        return model, info

    # ---- calibration + saving
    def calibration(self, model: CTCLIP, zero: bool) -> tuple[float, list, dict, dict]:
        """Validation macro AUC (silver), per-label AUCs, Platt (a, b) on the logit and F1-best thresholds."""
        scores = self.val_scores(model, zero_shot=zero)
        m, per = macro_auc(self.y_va, scores)
        cal, th = {}, {}
        yb = self.y_va >= 0.5
        for k, lab in enumerate(CT_RATE_LABELS):
            if yb[:, k].sum() >= 3 and (~yb[:, k]).sum() >= 3:
                ab = fit_platt(scores[:, k], yb[:, k]) if zero else (1.0, 0.0)
                th[lab] = round(best_f1_threshold(yb[:, k], calibrate(scores[:, k], ab))[0], 4)
                cal[lab] = [round(ab[0], 5), round(ab[1], 5)]
            else:
                cal[lab], th[lab] = [1.0, 0.0], 0.5
        return m, per, cal, th

    def finish(self, model: CTCLIP, info: dict, name: str) -> dict:
        zero = name != "supervised"
        m, per, cal, th = self.calibration(model, zero)
        yb = self.y_va >= 0.5
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        digest = hashlib.sha1(b"".join(v.cpu().numpy().tobytes() for v in sd.values())).hexdigest()[:8]
        version = f"{MODEL_MAJOR}-{name}-{digest}"
        a = self.a
        meta = {
            "version": version, "variant": name, "trained_on": date.today().isoformat(),
            "labels": list(CT_RATE_LABELS), "label_source": a.labels, "label_extractor": label_extractor(a.labels),
            "readout": "zero-shot prompts" if zero else "classifier head (not zero-shot)",
            "thresholds": th, "calibration": cal,
            "calibration_of": "sigmoid(a * logit + b); logit = scale * (sim(image, 'X.') - sim(image, 'not X.'))"
                              if zero else "identity on the head's logit",
            "val": {"macro_auc_silver": round(m, 4),
                    "per_label_auc_silver": {lab: (None if math.isnan(x) else round(x, 4)) for lab, x in zip(CT_RATE_LABELS, per)},
                    "positives_silver": dict(zip(CT_RATE_LABELS, yb.sum(0).astype(int).tolist()))},
            "training": info, "config": self.cfg,
            "data": {"n_train": a.n_train, "n_val": a.n_val, "seed": a.seed, "val_seed": a.val_seed,
                     "generator": GENERATOR_VERSION, "grid": list(GRID), "fov_mm": list(FOV_MM),
                     "enriched_rate": a.enriched_rate, "train_metal_rate": a.train_metal_rate,
                     "cohort_metal_rate": a.cohort_metal_rate,
                     "silver_label_agreement_with_truth_train": self.label_agreement},
            "parameters": sum(p.numel() for p in model.parameters()),
            "training_args": asdict(a), "torch": torch.__version__,
        }
        out = Path(a.out_dir) / f"{name}.pt"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": sd, "config": meta["config"], "version": version, "variant": name,
                    "labels": list(CT_RATE_LABELS), "thresholds": th, "calibration": cal}, out)
        out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        self.log(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB), val macro AUC (silver) {m:.3f}")
        return meta


def train(args: TrainArgs) -> dict:
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tr = Trainer(args)
    tr.load_data()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    base = build_model(tr.cfg).to(tr.dev)
    base.config = dict(tr.cfg)
    base, info = tr.run_stage(base, "supervised")
    results = {}
    if "supervised" in variants:
        results["supervised"] = tr.finish(base, info, "supervised")
    for name in ("clip", "clip_align"):
        if name not in variants:
            continue
        m = copy.deepcopy(base)
        m.config = dict(tr.cfg)
        m, info2 = tr.run_stage(m, name)
        info2["stage1"] = info
        results[name] = tr.finish(m, info2, name)
    summary = {k: {"val_macro_auc_silver": v["val"]["macro_auc_silver"], "readout": v["readout"],
                   "version": v["version"]} for k, v in results.items()}
    ship(args, results, {"seconds_total": round(time.perf_counter() - t_start, 1)})
    summary["seconds_total"] = round(time.perf_counter() - t_start, 1)
    summary["seconds_data"] = round(tr.t_data, 1)
    tr.log(json.dumps(summary, indent=1))
    return {"summary": summary, "variants": results}


def ship(args: TrainArgs, results: dict, extra: dict | None = None) -> str | None:
    """Copy the CLIP variant with the best validation zero-shot macro AUC to args.ship (+ json with the ablation)."""
    summary = {k: {"val_macro_auc_silver": v["val"]["macro_auc_silver"], "readout": v["readout"],
                   "version": v["version"]} for k, v in results.items()}
    zs = {k: v for k, v in results.items() if k != "supervised"}
    if not (args.ship and zs):
        return None
    best = max(zs, key=lambda k: zs[k]["val"]["macro_auc_silver"])
    src = Path(args.out_dir) / f"{best}.pt"
    dst = Path(args.ship)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    meta = {**results[best], "shipped_from": str(src), "ablation": summary, **(extra or {})}
    dst.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    print(f"shipped {best} -> {dst} ({dst.stat().st_size / 1e6:.2f} MB)", flush=True)
    return best


def recalibrate(args: TrainArgs) -> dict:
    """Refit the validation calibration and thresholds of the variants in --out-dir (weights untouched;
    the data come from the cache) and re-ship: for checkpoints trained before a calibration fix."""
    from tools.ctclip import load_ctclip

    torch.set_num_threads(args.threads)
    tr = Trainer(args)
    tr.load_data()
    results = {}
    for name in ("supervised", "clip", "clip_align"):
        path = Path(args.out_dir) / f"{name}.pt"
        if not path.is_file():
            continue
        model, _ = load_ctclip(path, args.device)
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        zero = name != "supervised"
        m, per, cal, th = tr.calibration(model, zero)
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck.update(thresholds=th, calibration=cal)
        torch.save(ck, path)
        meta.update(thresholds=th, calibration=cal, recalibrated_on=date.today().isoformat(),
                    calibration_of="sigmoid(a * logit + b); logit = scale * (sim(image, 'X.') - sim(image, 'not X.'))"
                    if zero else "identity on the head's logit")
        meta["val"].update(macro_auc_silver=round(m, 4), per_label_auc_silver={
            lab: (None if math.isnan(x) else round(x, 4)) for lab, x in zip(CT_RATE_LABELS, per)})
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        tr.log(f"recalibrated {path}: val macro AUC (silver) {m:.3f}")
        results[name] = meta
    old = read_json(Path(args.ship).with_suffix(".json")) if args.ship else {}
    ship(args, results, {k: old[k] for k in ("seconds_total",) if k in old})
    return results


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else None
    import sys

    raw = sys.argv[1:] if argv is None else argv
    if "--recalibrate" in raw:
        return recalibrate(parse_args([a for a in raw if a != "--recalibrate"]))
    return train(parse_args(raw))


if __name__ == "__main__":
    main()
