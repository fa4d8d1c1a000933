"""timm backbones that return the four stage feature maps of a 224 patch, NCHW."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    timm_name: str
    out_indices: tuple[int, ...]
    nhwc: bool  # timm's Swin features come channels-last, its CNNs channels-first
    hyper_trunk: tuple[int, int]  # hyper-network 1x1 conv widths before the 112 hyper features
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


_SWIN_STAGES = (0, 1, 2, 3)
_SWIN_TRUNK = (512, 256)  # the seed's narrowed trunk

BACKBONES: dict[str, BackboneSpec] = {
    # 1.2M parameters, same factory as the real sizes: CPU tests and the demo
    "micro": BackboneSpec("swin_tiny_patch4_window7_224", _SWIN_STAGES, True, _SWIN_TRUNK,
                          dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))),
    "tiny": BackboneSpec("swin_tiny_patch4_window7_224", _SWIN_STAGES, True, _SWIN_TRUNK),
    "small": BackboneSpec("swin_small_patch4_window7_224", _SWIN_STAGES, True, _SWIN_TRUNK),
    "base": BackboneSpec("swin_base_patch4_window7_224", _SWIN_STAGES, True, _SWIN_TRUNK),
    # a 1M-parameter CNN (MobileNetV3-Small): learns from scratch on a CPU far faster than
    # a Swin of the same cost (batch norm), so the CPU demo uses it
    "mobilenet": BackboneSpec("mobilenetv3_small_100", (1, 2, 3, 4), False, _SWIN_TRUNK),
    # the original HyperIQA (its hyper network reads stage 4 only: use multiscale=False), on
    # torchvision's ImageNet weights as the original; timm's default resnet50 weights differ
    "resnet50": BackboneSpec("resnet50.tv_in1k", (1, 2, 3, 4), False, (1024, 512)),
}


class Backbone(nn.Module):
    """A timm feature extractor; ``forward`` gives four NCHW maps at strides 4, 8, 16, 32."""

    def __init__(self, size: str, *, drop_path_rate: float = 0.0, pretrained: bool = False,
                 pretrained_path: str | Path | None = None) -> None:
        super().__init__()
        if size not in BACKBONES:
            raise ValueError(f"unknown model size {size!r}; valid: {', '.join(BACKBONES)}")
        self.spec = BACKBONES[size]
        self.body = _create(size, self.spec, drop_path_rate, pretrained, pretrained_path)
        self.channels: tuple[int, int, int, int] = tuple(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.body(x)
        if self.spec.nhwc:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats


def _create(size: str, spec: BackboneSpec, drop_path_rate: float, pretrained: bool,
            pretrained_path: str | Path | None) -> nn.Module:
    kwargs = dict(features_only=True, out_indices=spec.out_indices, drop_path_rate=drop_path_rate,
                  **spec.timm_kwargs)
    if pretrained_path is None:
        return timm.create_model(spec.timm_name, pretrained=pretrained, **kwargs)
    path = Path(pretrained_path)
    if path.is_dir():  # a folder of python -m iqa_dist.weights files: one for each size (a sweep's)
        path = weights_file(size, path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    try:
        return timm.create_model(spec.timm_name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except (RuntimeError, SafetensorError) as err:
        # torch lists every mismatching tensor over many lines; the first one says enough
        raise ValueError(f"{path}: not weights of the {size!r} backbone ({_first_problem(err)})") from None


def weights_file(size: str, folder: str | Path) -> Path:
    """Where ``python -m iqa_dist.weights`` puts the ImageNet weights of ``size`` in ``folder``."""
    return Path(folder) / f"{BACKBONES[size].timm_name}.safetensors"


def _first_problem(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(err).__name__)
