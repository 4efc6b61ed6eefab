"""Registry of 3-D segmentation networks (MONAI), one name -> factory, for the U-Bench-style benchmark
(evals/ubench.py) and anything else that wants to build a segmenter by name.

    from tools.seg_models import build, names
    net = build("unet", in_channels=1, out_channels=4, size="small", img_size=(32, 64, 64))

Every factory has the signature ``factory(in_channels, out_channels, spatial_dims=3, size="small",
img_size=None) -> nn.Module``. ``size="small"`` is a reduced configuration (few channels / shallow
transformer) that trains on a CPU in about a minute on 32x64x64 volumes; ``size="full"`` is the
configuration from the MONAI tutorials / papers (MONAI defaults), meant for a GPU.

Input-size constraints (checked against MONAI 1.6): UNETR needs ``img_size`` at construction, each
dim divisible by its patch size 16; SwinUNETR (which no longer takes ``img_size``) needs every dim
divisible by 2**5 = 32 (and, with instance norm, at least one dim >= 64 so the 1/32 bottleneck has > 1 voxel); VNet needs dims divisible by 16 and MONAI's VNet has no width option, so the
small VNet is the same topology rebuilt from MONAI's VNet blocks at a quarter of the width. ``ModelSpec.divisor`` records the multiple each model needs; ``PadToMultiple`` wraps a model
so that any input size works (reflect-free zero pad, then crop) - ``build(..., pad=True)`` applies it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

Size = str  # "small" | "full"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    family: str  # cnn | attention-cnn | transformer | hybrid
    divisor: int  # every spatial dim of the input must be a multiple of this
    needs_img_size: bool = False
    note: str = ""


def _img(img_size, spatial_dims):
    if img_size is None:
        return (32,) * spatial_dims if spatial_dims == 3 else (64,) * spatial_dims
    return tuple(int(s) for s in img_size)


def _check(size: Size):
    if size not in ("small", "full"):
        raise ValueError(f"size must be 'small' or 'full', got {size!r}")


def unet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import UNet

    _check(size)
    ch = (8, 16, 32, 64) if size == "small" else (16, 32, 64, 128, 256)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=ch,
                strides=(2,) * (len(ch) - 1), num_res_units=1 if size == "small" else 2)


def basic_unet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import BasicUNet

    _check(size)
    feats = (8, 8, 16, 32, 64, 8) if size == "small" else (32, 32, 64, 128, 256, 32)
    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, features=feats)


def attention_unet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import AttentionUnet

    _check(size)
    ch = (8, 16, 32, 64) if size == "small" else (16, 32, 64, 128, 256)
    return AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         channels=ch, strides=(2,) * (len(ch) - 1))


def segresnet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import SegResNet

    _check(size)
    if size == "small":
        return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         init_filters=8, blocks_down=(1, 1, 1, 1), blocks_up=(1, 1, 1))
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))


def unetr(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import UNETR

    _check(size)
    img = _img(img_size, spatial_dims)
    if any(s % 16 for s in img):
        raise ValueError(f"UNETR needs img_size divisible by its patch size 16, got {img}")
    if size == "small":
        return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img, feature_size=8,
                     hidden_size=96, mlp_dim=192, num_heads=4, spatial_dims=spatial_dims)
    return UNETR(in_channels=in_channels, out_channels=out_channels, img_size=img, feature_size=16,
                 hidden_size=768, mlp_dim=3072, num_heads=12, spatial_dims=spatial_dims)


def swin_unetr(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import SwinUNETR

    _check(size)
    if size == "small":  # feature_size must be a multiple of 12 (normalisation groups, heads)
        return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=12, depths=(1, 1, 1, 1),
                         num_heads=(3, 3, 6, 12), window_size=4, spatial_dims=spatial_dims)
    return SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=48, spatial_dims=spatial_dims,
                     use_v2=True)


class WidthVNet(nn.Module):
    """MONAI's VNet topology built from MONAI's own VNet blocks with a base width `w` (MONAI's VNet is w=16
    and has no width option). Same transitions, nconvs and 5^3 convolutions; no dropout."""

    def __init__(self, spatial_dims, in_channels, out_channels, w=4, act=("elu", {"inplace": True})):
        super().__init__()
        from monai.networks.nets.vnet import DownTransition, InputTransition, OutputTransition, UpTransition

        if w % in_channels:
            raise ValueError(f"VNet base width {w} must be divisible by in_channels={in_channels}")
        nodrop = (None, 0.0)
        self.in_tr = InputTransition(spatial_dims, in_channels, w, act)
        self.down1 = DownTransition(spatial_dims, w, 1, act)
        self.down2 = DownTransition(spatial_dims, 2 * w, 2, act)
        self.down3 = DownTransition(spatial_dims, 4 * w, 3, act)
        self.down4 = DownTransition(spatial_dims, 8 * w, 2, act)
        self.up4 = UpTransition(spatial_dims, 16 * w, 16 * w, 2, act, dropout_prob=nodrop)
        self.up3 = UpTransition(spatial_dims, 16 * w, 8 * w, 2, act, dropout_prob=nodrop)
        self.up2 = UpTransition(spatial_dims, 8 * w, 4 * w, 1, act, dropout_prob=nodrop)
        self.up1 = UpTransition(spatial_dims, 4 * w, 2 * w, 1, act, dropout_prob=nodrop)
        self.out_tr = OutputTransition(spatial_dims, 2 * w, out_channels, act)

    def forward(self, x):
        o1 = self.in_tr(x)
        o2 = self.down1(o1)
        o3 = self.down2(o2)
        o4 = self.down3(o3)
        o5 = self.down4(o4)
        return self.out_tr(self.up1(self.up2(self.up3(self.up4(o5, o4), o3), o2), o1))


def vnet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import VNet

    _check(size)
    if size == "small":  # MONAI's blocks at base width 4 (MONAI VNet: 16, 45 M parameters)
        return WidthVNet(spatial_dims, in_channels, out_channels, w=4)
    if 16 % in_channels:
        raise ValueError("MONAI VNet needs 16 divisible by in_channels")
    return VNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                dropout_prob_down=0.5, dropout_prob_up=(0.5, 0.5))


def dynunet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    from monai.networks.nets import DynUNet

    _check(size)
    n = 4 if size == "small" else 5
    filters = (8, 16, 32, 64) if size == "small" else (32, 64, 128, 256, 320)
    k = [3] * n
    s = [1] + [2] * (n - 1)
    return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, kernel_size=k,
                   strides=s, upsample_kernel_size=s[1:], filters=filters, res_block=True)


class TinyUNet(nn.Module):
    """Ours: a two-level residual-free U-Net (plain conv-IN-LeakyReLU), the cheap baseline of the registry."""

    def __init__(self, in_channels, out_channels, spatial_dims=3, width=8):
        super().__init__()
        Conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        Norm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d

        def block(i, o):
            return nn.Sequential(Conv(i, o, 3, padding=1), Norm(o, affine=True), nn.LeakyReLU(0.1, inplace=True),
                                 Conv(o, o, 3, padding=1), Norm(o, affine=True), nn.LeakyReLU(0.1, inplace=True))

        w = width
        self.e1, self.e2, self.b = block(in_channels, w), block(w, 2 * w), block(2 * w, 4 * w)
        self.d2, self.d1 = block(6 * w, 2 * w), block(3 * w, w)
        self.out = Conv(w, out_channels, 1)
        self.pool = nn.MaxPool3d(2) if spatial_dims == 3 else nn.MaxPool2d(2)
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x):
        e1 = self.e1(x)
        e2 = self.e2(self.pool(e1))
        b = self.b(self.pool(e2))
        d2 = self.d2(torch.cat([F.interpolate(b, size=e2.shape[2:], mode=self.mode, align_corners=False), e2], 1))
        d1 = self.d1(torch.cat([F.interpolate(d2, size=e1.shape[2:], mode=self.mode, align_corners=False), e1], 1))
        return self.out(d1)


def tiny_unet(in_channels, out_channels, spatial_dims=3, size="small", img_size=None):
    _check(size)
    return TinyUNet(in_channels, out_channels, spatial_dims, width=8 if size == "small" else 32)


REGISTRY: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("unet", unet, "cnn", 16, note="MONAI UNet, residual units"),
    ModelSpec("basic_unet", basic_unet, "cnn", 16, note="MONAI BasicUNet"),
    ModelSpec("attention_unet", attention_unet, "attention-cnn", 8, note="MONAI AttentionUnet"),
    ModelSpec("segresnet", segresnet, "cnn", 8, note="MONAI SegResNet"),
    ModelSpec("unetr", unetr, "transformer", 16, needs_img_size=True, note="MONAI UNETR, ViT patch 16"),
    ModelSpec("swin_unetr", swin_unetr, "hybrid", 32, note="MONAI SwinUNETR (full: v2)"),
    ModelSpec("vnet", vnet, "cnn", 16, note="VNet (small: MONAI VNet blocks at width 4; full: MONAI VNet)"),
    ModelSpec("dynunet", dynunet, "cnn", 8, note="MONAI DynUNet (nnU-Net style), residual blocks"),
    ModelSpec("tiny_unet", tiny_unet, "cnn", 4, note="ours: 2-level plain U-Net"),
)}


def names() -> list[str]:
    return list(REGISTRY)


class PadToMultiple(nn.Module):
    """Zero-pads the input's spatial dims up to a multiple of `divisor`, runs the model, crops the output back."""

    def __init__(self, model: nn.Module, divisor: int):
        super().__init__()
        self.model, self.divisor = model, int(divisor)

    def forward(self, x):
        shape = x.shape[2:]
        pad = []
        for s in reversed(shape):
            pad += [0, (-s) % self.divisor]
        y = self.model(F.pad(x, pad) if any(pad) else x)
        return y[(slice(None), slice(None), *(slice(0, s) for s in shape))]


def build(name: str, in_channels: int = 1, out_channels: int = 2, spatial_dims: int = 3, size: Size = "small",
          img_size: Sequence[int] | None = None, pad: bool = False) -> nn.Module:
    """The registered model `name`. With pad=True the model accepts any spatial size (UNETR still needs
    img_size = the padded size it will see)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown segmentation model {name!r}; registered: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    model = spec.factory(in_channels, out_channels, spatial_dims=spatial_dims, size=size, img_size=img_size)
    return PadToMultiple(model, spec.divisor) if pad else model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
