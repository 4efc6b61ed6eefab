"""Patch encoders for whole-slide tiles, heterogeneous on purpose, behind one interface.

`get_encoder(name)` -> a `PatchEncoder`: name, version, dim, tile_px, mpp (the magnification it
expects, um/px), device, and `encode(uint8 [B, H, W, 3]) -> float32 [B, dim]` (tiles of another
size are resized to tile_px first; `core.imaging.wsi_tiles` runs it over a slide).

Local encoders (CPU-sized, shipped):
- `hed_texture`: handcrafted, no training: `rgb2hed` stain statistics, RGB histograms, two uniform
  LBP histograms and GLCM properties (78 values), 128 px at 1 um/px.
- `cnn_simclr`: a small ResNet (MONAI, ~0.3 M parameters) pretrained with SimCLR (NT-Xent over
  flips/rot90, crops, HED and brightness jitter, blur); 64 px at 2 um/px (the same 128 um field).
- `vit_mae`: a small ViT (patch 16, 4 layers, width 128) pretrained as a masked autoencoder (MONAI
  `MaskedAutoEncoderViT`, 75% masking, per-patch normalised pixel loss); 128 px at 1 um/px;
  feature = mean of the final patch tokens.
  Both load from checkpoints/patch_<name>.pt (fp16, JSON sidecar) that
  `python -m training.train_patch_encoders` writes.

Foundation models (optional extra `pip install 'grandrounds[pathology-fm]'`, i.e. timm, plus a
weights file you download yourself; nothing is ever downloaded here): `uni` (UNI, ViT-L/16, 1024),
`conch` (CONCH's ViT-B/16 vision trunk at 448 px; mean of its patch tokens, 768: the CoCa
attentional pooler is not rebuilt), `virchow` (Virchow, ViT-H/14 SwiGLU, class token + mean patch
token, 2560), `gigapath` (Prov-GigaPath tile encoder, ViT-g, 1536). The weights path comes from
`weights=` or the env var GRANDROUNDS_<NAME>_WEIGHTS.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from core.imaging.wsi_tiles import file_fingerprint, resize_tiles

CHECKPOINT_DIR = Path(__file__).resolve().parents[1] / "checkpoints"
TRAIN_COMMAND = "python -m training.train_patch_encoders"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

# architectures of the small learned encoders; the trainer stores the one it used (with the
# training tiles' channel mean/std) in the checkpoint
CNN_ARCH: dict[str, Any] = {"kind": "cnn_simclr", "tile_px": 64, "mpp": 2.0, "block_inplanes": [16, 32, 64, 128],
                            "layers": [1, 1, 1, 1], "conv1_size": 5, "conv1_stride": 2, "proj_dim": 64,
                            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
VIT_ARCH: dict[str, Any] = {"kind": "vit_mae", "tile_px": 128, "mpp": 1.0, "patch": 16, "hidden": 128, "mlp": 256,
                            "layers": 4, "heads": 4, "dec_hidden": 64, "dec_mlp": 128, "dec_layers": 2, "dec_heads": 4,
                            "mask_ratio": 0.75, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class EncoderUnavailable(ImportError):
    """The encoder's optional dependency is not installed (the message says what to install)."""


class EncoderCard(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    version: str
    dim: int
    tile_px: int
    mpp: float
    device: str


class PatchEncoder(ABC):
    name: str
    version: str
    dim: int
    tile_px: int
    mpp: float
    device: str = "cpu"

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] RGB tiles -> float32 [B, dim]."""
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
            raise ValueError(f"{self.name}: tiles must be uint8 [B, H, W, 3], got {tiles.dtype} {tiles.shape}")
        if len(tiles) == 0:
            return np.zeros((0, self.dim), np.float32)
        out = np.asarray(self._encode(resize_tiles(tiles, self.tile_px)), np.float32)
        assert out.shape == (len(tiles), self.dim), (self.name, out.shape)
        return out

    @abstractmethod
    def _encode(self, tiles: np.ndarray) -> np.ndarray: ...

    def card(self) -> EncoderCard:
        return EncoderCard(name=self.name, version=self.version, dim=self.dim, tile_px=self.tile_px,
                           mpp=self.mpp, device=self.device)


# ------------------------------------------------------------------ a. handcrafted

def hed_texture_features(tile: np.ndarray) -> np.ndarray:
    """78 colour-texture values of one uint8 RGB tile."""
    from skimage.color import rgb2gray, rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    hed = rgb2hed(tile).reshape(-1, 3)
    stain = np.concatenate([hed.mean(0), hed.std(0), np.percentile(hed, [10, 50, 90], axis=0).ravel()])
    hist = np.concatenate([np.histogram(tile[..., c], bins=8, range=(0, 256))[0] for c in range(3)]) / tile[..., 0].size
    grey = np.rint(rgb2gray(tile) * 255).astype(np.uint8)
    lbp = [np.bincount(local_binary_pattern(grey, p, r, method="uniform").astype(np.int64).ravel(),
                       minlength=p + 2) / grey.size for p, r in ((8, 1), (16, 2))]
    glcm = graycomatrix(grey // 8, distances=[1, 3], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                        symmetric=True, normed=True)
    props = [graycoprops(glcm, p).mean(axis=1) for p in ("contrast", "dissimilarity", "homogeneity", "energy",
                                                          "correlation")]
    white = [(tile.min(axis=2) >= 215).mean()]
    return np.nan_to_num(np.concatenate([stain, hist, *lbp, *props, white])).astype(np.float32)


class HEDTexture(PatchEncoder):
    name, version, dim, tile_px, mpp = "hed_texture", "1", 78, 128, 1.0

    def __init__(self, device: str = "auto"):
        self.device = "cpu"  # numpy / scikit-image only

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        return np.stack([hed_texture_features(t) for t in tiles])


# ------------------------------------------------------------------ b, c. small learned nets

def build_cnn(arch: dict[str, Any]):
    """The SimCLR backbone: MONAI ResNet (basic blocks), global-pooled features [B, block_inplanes[-1]]."""
    from monai.networks.nets import ResNet

    return ResNet("basic", arch["layers"], arch["block_inplanes"], spatial_dims=2, n_input_channels=3,
                  conv1_t_size=arch["conv1_size"], conv1_t_stride=arch["conv1_stride"], feed_forward=False,
                  num_classes=0)


def build_mae(arch: dict[str, Any]):
    import warnings

    from monai.networks.nets import MaskedAutoEncoderViT

    with warnings.catch_warnings():  # MONAI's sincos embedding calls torch.meshgrid without `indexing`
        warnings.simplefilter("ignore", UserWarning)
        return MaskedAutoEncoderViT(3, arch["tile_px"], arch["patch"], hidden_size=arch["hidden"],
                                    mlp_dim=arch["mlp"], num_layers=arch["layers"], num_heads=arch["heads"],
                                    masking_ratio=arch["mask_ratio"], decoder_hidden_size=arch["dec_hidden"],
                                    decoder_mlp_dim=arch["dec_mlp"], decoder_num_layers=arch["dec_layers"],
                                    decoder_num_heads=arch["dec_heads"], spatial_dims=2)


def mae_features(mae, x):
    """The MAE encoder without masking: mean of the final (layer-normed) patch tokens."""
    import torch

    t = mae.patch_embedding(x)
    t = mae.blocks(torch.cat([mae.cls_token.expand(len(t), -1, -1), t], dim=1))
    return t[:, 1:].mean(dim=1)


def build_net(arch: dict[str, Any]):
    return build_cnn(arch) if arch["kind"] == "cnn_simclr" else build_mae(arch)


class TorchEncoder(PatchEncoder):
    """A torch feature function on normalised [B, 3, tile_px, tile_px] input, in eval mode."""

    def __init__(self, *, name: str, version: str, dim: int, tile_px: int, mpp: float, net, features: Callable,
                 mean, std, device: str = "auto", batch: int = 256, amp: bool = False):
        import torch

        from core.device import pick_device

        self.name, self.version, self.dim, self.tile_px, self.mpp = name, version, int(dim), int(tile_px), float(mpp)
        self.device = pick_device(device)
        self.net = net.to(self.device).eval()
        self._features, self._batch, self._amp = features, batch, amp and self.device == "cuda"
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        import contextlib

        import torch

        out = []
        amp = torch.autocast("cuda", torch.bfloat16) if self._amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            for s in range(0, len(tiles), self._batch):
                x = torch.from_numpy(np.ascontiguousarray(tiles[s:s + self._batch])).to(self.device)
                x = x.permute(0, 3, 1, 2).float() / 255.0
                out.append(self._features(self.net, (x - self._mean) / self._std).float().cpu())
        return torch.cat(out).numpy()


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"patch_{name}.pt"


def load_small(name: Literal["cnn_simclr", "vit_mae"], *, device: str = "auto", weights: str | Path | None = None,
               pretrained: bool = True, seed: int = 0) -> TorchEncoder:
    """A shipped small encoder; `pretrained=False` gives the same architecture at a seeded random init."""
    import torch

    path = Path(weights) if weights else checkpoint_path(name)
    ck = None
    if path.is_file():
        ck = torch.load(path, map_location="cpu", weights_only=True)
    elif pretrained:
        raise FileNotFoundError(f"{name} checkpoint {path} not found: write it with "
                                f"`{TRAIN_COMMAND} --encoders {name} --out-dir {path.parent}`")
    arch = dict(ck["arch"]) if ck else dict(CNN_ARCH if name == "cnn_simclr" else VIT_ARCH)
    if arch["kind"] != name:
        raise ValueError(f"{path}: holds a {arch['kind']} checkpoint, not {name}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(arch)
    if pretrained:
        net.load_state_dict({k: v.float() for k, v in ck["state_dict"].items()})
        version = f"{ck.get('version', '1')}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
    else:
        version = f"random-{seed}"
    if name == "cnn_simclr":
        feats, dim = (lambda m, x: m(x)), arch["block_inplanes"][-1]
    else:
        feats, dim = mae_features, arch["hidden"]
    return TorchEncoder(name=name, version=version, dim=dim, tile_px=arch["tile_px"], mpp=arch["mpp"], net=net,
                        features=feats, mean=arch["mean"], std=arch["std"], device=device)


# ------------------------------------------------------------------ d. foundation models

class FMSpec(BaseModel):
    model_config = ConfigDict(frozen=True)
    timm_name: str
    kwargs: dict[str, Any]
    dim: int
    tile_px: int
    mpp: float = 0.5
    norm: tuple[tuple[float, float, float], tuple[float, float, float]] = IMAGENET
    pool: Literal["model", "mean_patch", "cls_mean_patch"] = "model"
    prefix: str = ""  # keep only state-dict keys under this prefix (stripped)
    swiglu: bool = False
    source: str  # where the user downloads the weights from


FOUNDATION_MODELS: dict[str, FMSpec] = {
    "uni": FMSpec(timm_name="vit_large_patch16_224", dim=1024, tile_px=224, source="huggingface.co/MahmoodLab/UNI "
                  "(pytorch_model.bin, gated)", kwargs=dict(img_size=224, patch_size=16, init_values=1e-5,
                                                             num_classes=0, dynamic_img_size=True)),
    "conch": FMSpec(timm_name="vit_base_patch16_224", dim=768, tile_px=448, norm=OPENAI_CLIP, pool="mean_patch",
                    prefix="visual.trunk.", source="huggingface.co/MahmoodLab/CONCH (pytorch_model.bin, gated)",
                    kwargs=dict(img_size=448, num_classes=0, global_pool="")),
    "virchow": FMSpec(timm_name="vit_huge_patch14_224", dim=2560, tile_px=224, pool="cls_mean_patch", swiglu=True,
                      source="huggingface.co/paige-ai/Virchow (pytorch_model.bin, gated)",
                      kwargs=dict(img_size=224, init_values=1e-5, num_classes=0, mlp_ratio=5.3375, global_pool="",
                                  dynamic_img_size=True)),
    "gigapath": FMSpec(timm_name="vit_giant_patch14_dinov2", dim=1536, tile_px=224,
                       source="huggingface.co/prov-gigapath/prov-gigapath (pytorch_model.bin, gated)",
                       kwargs=dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                                   init_values=1e-5, mlp_ratio=5.33334, num_classes=0, global_pool="token")),
}


def _read_state_dict(path: Path) -> dict[str, Any]:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    return sd


def _fm_features(spec: FMSpec) -> Callable:
    def feats(model, x):
        if spec.pool == "model":
            return model(x)
        tokens = model.forward_features(x)
        patches = tokens[:, getattr(model, "num_prefix_tokens", 1):]
        if spec.pool == "mean_patch":
            return patches.mean(dim=1)
        import torch

        return torch.cat([tokens[:, 0], patches.mean(dim=1)], dim=-1)
    return feats


def load_foundation(name: str, *, device: str = "auto", weights: str | Path | None = None) -> TorchEncoder:
    """Build a pathology foundation model with timm and load its weights from a local file."""
    import torch

    spec = FOUNDATION_MODELS[name]
    env = f"GRANDROUNDS_{name.upper()}_WEIGHTS"
    given = weights or os.environ.get(env)
    if not given:
        raise FileNotFoundError(f"{name}: no weights file given: download it from {spec.source} and pass "
                                f"weights=PATH or set {env}; nothing is downloaded at run time")
    path = Path(given).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}: weights file {path} not found (download it from {spec.source})")
    try:
        import timm
    except ImportError as e:
        raise EncoderUnavailable(f"{name} needs timm, which is not installed: pip install 'grandrounds[pathology-fm]' "
                                 f"(timm>=1.0; timm imports torchvision, which must be the build matching torch "
                                 f"{torch.__version__})") from e
    kwargs = dict(spec.kwargs)
    if spec.swiglu:
        from timm.layers import SwiGLUPacked

        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    sd = {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}
    if spec.prefix:
        sd = {k[len(spec.prefix):]: v for k, v in sd.items() if k.startswith(spec.prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: does not hold {name} weights: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    version = file_fingerprint(path)["sha256_head_tail"][:12]
    return TorchEncoder(name=name, version=version, dim=spec.dim, tile_px=spec.tile_px, mpp=spec.mpp, net=model,
                        features=_fm_features(spec), mean=spec.norm[0], std=spec.norm[1], device=device, batch=64,
                        amp=True)


# ------------------------------------------------------------------ registry

LOCAL_ENCODERS = ("hed_texture", "cnn_simclr", "vit_mae")


def list_encoders() -> tuple[str, ...]:
    return LOCAL_ENCODERS + tuple(FOUNDATION_MODELS)


def get_encoder(name: str, *, device: str = "auto", weights: str | Path | None = None, pretrained: bool = True,
                seed: int = 0) -> PatchEncoder:
    """An encoder by name (`list_encoders()`); `weights` overrides the checkpoint / foundation weights file."""
    if name == "hed_texture":
        return HEDTexture(device)
    if name in ("cnn_simclr", "vit_mae"):
        return load_small(name, device=device, weights=weights, pretrained=pretrained,  # type: ignore[arg-type]
                          seed=seed)
    if name in FOUNDATION_MODELS:
        if not pretrained:
            raise ValueError(f"{name}: a foundation model without its weights is not offered")
        return load_foundation(name, device=device, weights=weights)
    raise KeyError(f"unknown patch encoder {name!r}; known: {', '.join(list_encoders())}")
