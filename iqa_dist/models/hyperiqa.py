"""HyperIQA (Su et al., CVPR 2020) on a Swin or ResNet backbone, with the seed's fusion modes.

The backbone's four stages feed two paths: the local distortion aware (LDA) taps make
each patch's 224-wide target input; the hyper network turns the (fused) feature maps
into the weights of a small per-patch target network that scores that input. Under
mixed precision that target network and the heads generating its weights compute in fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

PATCH = 224
POOL = 7  # the last stage's side for a 224 patch; every hyper-network map is pooled to it
LDA_WIDTH = 16  # each of stages 1-3 contributes 16 values to the target input
HYPER_CHANNELS = 112
TARGET_WIDTHS = (224, 112, 56, 28, 14, 1)
ATTENTION_HIDDEN = 256


def kaiming_init(*modules: nn.Module) -> None:
    """``kaiming_normal_`` on every conv and linear weight of ``modules``, as the original
    HyperIQA and the seed re-initialise the LDA taps and the hyper network's heads (weight
    convs, bias FCs, last FC); the hyper network's trunk and the attention MLP keep
    PyTorch's default, as there. The default draws weights 2.4x smaller (std
    1/sqrt(3 fan_in), not sqrt(2/fan_in)): the generated target weights would start near
    zero. Biases keep PyTorch's default: the original re-initialises weights only."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)


def fp32(x: torch.Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device: the target network and the hyper network's heads that
    generate its weights compute in float32 under mixed precision. In bf16 (8 significant
    bits) a score near 50 moves in steps of 0.25, coarser than the ranking margin 0.1, and
    evaluation would not score as ``predict`` does in fp32. The rest of the model keeps
    bf16: these layers are a small share of the compute."""
    return torch.autocast(x.device.type, enabled=False)


def _fp32_layer(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with float32 parameters: DeepSpeed's bf16 casts the module itself, so
    its bf16 weights are upcast (the gradient still reaches them)."""
    weight, bias = layer.weight.float(), layer.bias.float()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, bias)


def pooled(f: torch.Tensor) -> torch.Tensor:
    """``f`` average-pooled to POOL x POOL. When POOL divides its sides (every stage of a
    224 patch) as a plain average pool, the same numbers: adaptive pooling's CUDA backward
    has no deterministic implementation, so ``deterministic: true`` would refuse it."""
    # plain ints: the ONNX exporter traces shapes as tensors, and a kernel size must be constant
    h, w = (int(side) for side in f.shape[-2:])
    if h % POOL or w % POOL:
        return F.adaptive_avg_pool2d(f, POOL)
    return F.avg_pool2d(f, (h // POOL, w // POOL))


class LDA(nn.Module):
    """Local distortion aware taps: four stage maps -> the target network's input vector."""

    def __init__(self, channels: tuple[int, int, int, int]) -> None:
        super().__init__()
        taps = [_lda_tap(c, stage) for stage, c in enumerate(channels[:3])]
        last = TARGET_WIDTHS[0] - 3 * LDA_WIDTH
        taps.append(nn.Sequential(nn.AvgPool2d(POOL), nn.Flatten(), nn.Linear(channels[3], last)))
        self.taps = nn.ModuleList(taps)
        kaiming_init(self)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([tap(f) for tap, f in zip(self.taps, feats)], dim=1)


def _lda_tap(in_channels: int, stage: int) -> nn.Sequential:
    width = LDA_WIDTH << stage  # 16, 32, 64: the deeper the stage, the more channels kept
    side = (PATCH // 4 >> stage) // POOL  # 8, 4, 2 after the 7x7 pool
    return nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.AvgPool2d(POOL),
                         nn.Flatten(), nn.Linear(width * side * side, LDA_WIDTH))


class ScaleAttention(nn.Module):
    """Per-patch softmax weights of the four stages, from the pooled last stage; PyTorch's
    default init, as the seed's (its re-initialisation loop skips this module)."""

    def __init__(self, in_channels: int, scales: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_channels, ATTENTION_HIDDEN), nn.ReLU(inplace=True),
                                 nn.Dropout(0.5), nn.Linear(ATTENTION_HIDDEN, scales), nn.Softmax(dim=1))

    def forward(self, last: torch.Tensor) -> torch.Tensor:
        return self.net(last.mean(dim=(2, 3)))


def check_fusion_mode(multiscale: bool, attention: bool) -> None:
    if attention and not multiscale:
        raise ValueError("attention_fusion weighs the stages of the multi-scale input: it needs multiscale=True")


class Fusion(nn.Module):
    """The hyper network's input: stage 4 alone, or all stages pooled to 7x7 and concatenated."""

    def __init__(self, channels: tuple[int, int, int, int], multiscale: bool, attention: bool) -> None:
        super().__init__()
        check_fusion_mode(multiscale, attention)
        self.multiscale = multiscale
        self.attention = ScaleAttention(channels[3], len(channels)) if attention else None
        self.out_channels = sum(channels) if multiscale else channels[3]

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if not self.multiscale:
            return feats[-1]
        maps = [pooled(f) for f in feats]
        if self.attention is not None:
            weights = self.attention(feats[-1])
            maps = [m * weights[:, i, None, None, None] for i, m in enumerate(maps)]
        return torch.cat(maps, dim=1)


class HyperNetwork(nn.Module):
    """Fused maps -> per-patch (weight [B, out, in], bias [B, out]) of each target layer."""

    def __init__(self, in_channels: int, trunk: tuple[int, int], dropout_rate: float) -> None:
        super().__init__()
        widths = (in_channels, *trunk, HYPER_CHANNELS)
        self.trunk = nn.Sequential(*(m for c_in, c_out in zip(widths, widths[1:])
                                     for m in (nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True))))
        self.dropout = nn.Dropout(dropout_rate)
        self.shapes = list(zip(TARGET_WIDTHS, TARGET_WIDTHS[1:]))  # (in, out) of each target layer
        # a 3x3 conv keeps the 7x7 map, so in*out/49 channels fold into an (out, in) matrix
        self.weight_convs = nn.ModuleList(nn.Conv2d(HYPER_CHANNELS, n_in * n_out // POOL**2, 3, padding=1)
                                          for n_in, n_out in self.shapes[:-1])
        self.last_weight = nn.Linear(HYPER_CHANNELS, TARGET_WIDTHS[-2] * TARGET_WIDTHS[-1])
        self.bias_fcs = nn.ModuleList(nn.Linear(HYPER_CHANNELS, n_out) for _, n_out in self.shapes)
        kaiming_init(self.weight_convs, self.last_weight, self.bias_fcs)  # the trunk keeps the default

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.dropout(self.trunk(x))
        with fp32(h):  # the heads' outputs are the target network's weights: see fp32
            h = h.float()
            pooled = h.mean(dim=(2, 3))
            weights = [_fp32_layer(conv, h) for conv in self.weight_convs] + [_fp32_layer(self.last_weight, pooled)]
            # -1, not len(x): an exported graph keeps its batch size free
            return [(w.reshape(-1, n_out, n_in), _fp32_layer(fc, pooled))
                    for w, fc, (n_in, n_out) in zip(weights, self.bias_fcs, self.shapes)]


class TargetNetwork(nn.Module):
    """Each patch's own fully connected net, all patches at once: no loop over the batch."""

    def __init__(self, dropout_rate: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor, params: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        with fp32(x):  # scores in bf16 would move in steps of 0.25-0.5 on a 0-100 scale
            x = x.float()
            *hidden, (w_last, b_last) = [(w.float(), b.float()) for w, b in params]
            for i, (w, b) in enumerate(hidden):
                x = torch.sigmoid(torch.einsum("bi,boi->bo", x, w) + b)
                if i < len(hidden) - 1:  # the seed leaves the last hidden layer undropped
                    x = self.dropout(x)
            return (torch.einsum("bi,boi->bo", x, w_last) + b_last)[:, 0]


class HyperIQA(nn.Module):
    """``forward(x[B, 3, 224, 224]) -> scores[B]`` on the scale of the training labels,
    float32 whatever the precision of the backbone (see ``fp32``)."""

    def __init__(self, backbone: Backbone, *, multiscale: bool = True, attention_fusion: bool = False,
                 dropout_rate: float = 0.3) -> None:
        super().__init__()
        self.backbone = backbone
        self.lda = LDA(backbone.channels)
        self.fusion = Fusion(backbone.channels, multiscale, attention_fusion)
        self.hyper = HyperNetwork(self.fusion.out_channels, backbone.spec.hyper_trunk, dropout_rate)
        self.target = TargetNetwork(dropout_rate)

    def forward_backbone(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four NCHW stage maps, e.g. to time the backbone alone."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, PATCH, PATCH):
            raise ValueError(f"HyperIQA takes [B, 3, {PATCH}, {PATCH}] patches, got {list(x.shape)}")
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.forward_backbone(x)
        return self.target(self.lda(feats), self.hyper(self.fusion(feats)))


def create_model(model_size: str = "tiny", *, multiscale: bool = True, attention_fusion: bool = False,
                 dropout_rate: float = 0.3, drop_path_rate: float = 0.2, pretrained: bool = False,
                 pretrained_path: str | Path | None = None) -> HyperIQA:
    """HyperIQA on a backbone of ``MODEL_SIZES``; ``pretrained_path`` loads local backbone weights."""
    check_fusion_mode(multiscale, attention_fusion)  # before a large backbone is built or fetched
    backbone = Backbone(model_size, drop_path_rate=drop_path_rate, pretrained=pretrained,
                        pretrained_path=pretrained_path)
    return HyperIQA(backbone, multiscale=multiscale, attention_fusion=attention_fusion,
                    dropout_rate=dropout_rate)
