"""The seed's ColorJitter, batched over patches on the device.

The seed applies ``ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.05)``
to each KonIQ training crop on the CPU (3x slower training, by its own note). Here the
same transform runs on a whole batch of model input at once: each patch gets its own
four factors and its own random order of the four adjustments, as torchvision draws
them per image, and the math is torchvision's (``adjust_brightness``, ``_contrast``,
``_saturation``, ``_hue`` on float images in [0, 1]).

The parameters are drawn from (seed, epoch, rank, step in epoch) only, not from the
loader's random stream: a resumed epoch replays them exactly, and a run with jitter
sees the same patches as the run without it (a clean ablation).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from .stream import MEAN, STD

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.1, 0.1, 0.1, 0.05  # the seed's ranges
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


class JitterParams(NamedTuple):
    factors: torch.Tensor  # (n, 4) float32: brightness, contrast, saturation factors and hue shift
    order: torch.Tensor  # (n, 4) int64: row i applies adjustment order[i, 0] first (0 brightness ... 3 hue)


def draw(n: int, seed: int, epoch: int, rank: int, step: int) -> JitterParams:
    """Patch-wise parameters in torchvision's ranges: factors uniform in [1 - r, 1 + r],
    the hue shift in [-0.05, 0.05], the order a uniform permutation."""
    rng = np.random.default_rng([seed, epoch, rank, step, 2])  # the loader's streams end in 1
    low = np.array([1 - BRIGHTNESS, 1 - CONTRAST, 1 - SATURATION, -HUE])
    high = np.array([1 + BRIGHTNESS, 1 + CONTRAST, 1 + SATURATION, HUE])
    factors = rng.uniform(low, high, size=(n, 4)).astype(np.float32)
    order = np.argsort(rng.random((n, 4)), axis=1)
    return JitterParams(torch.from_numpy(factors), torch.from_numpy(order))


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f + other * (1 - f)).clamp_(0, 1)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` turns: torchvision's rgb -> hsv -> rgb, with the
    hsv -> rgb step in its closed form (v - v s clamp(min(k, 4 - k), 0, 1))."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)
    delta = maxc - minc
    rc, gc, bc = ((maxc - x) / torch.where(delta > 0, delta, 1)).unbind(1)
    r, g, _ = x.unbind(1)
    m = maxc.squeeze(1)
    h = torch.where(m == r, bc - gc, torch.where(m == g, 2 + rc - bc, 4 + gc - rc))
    h = (h.unsqueeze(1) / 6 + 1).fmod_(1).add_(shift).remainder_(1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h * 6).remainder_(6)
    return maxc - delta * torch.minimum(k, 4 - k).clamp_(0, 1)  # v s = delta


_ADJUST: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (_brightness, _contrast, _saturation, _hue)


def color_jitter(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """NCHW float images in [0, 1], each jittered with its row of ``params``.

    At each of the four positions every adjustment runs once, on the patches that apply
    it there (indices found on the host, where the parameters are: no device sync)."""
    x = x.clone()
    factors = params.factors.to(x.device, non_blocking=True)
    for position in range(4):
        for op, adjust in enumerate(_ADJUST):
            rows = (params.order[:, position] == op).nonzero().squeeze(1)
            if len(rows):
                rows = rows.to(x.device, non_blocking=True)
                x[rows] = adjust(x[rows], factors[rows, op].view(-1, 1, 1, 1))
    return x


_MEAN01 = torch.from_numpy(MEAN / 255).view(1, 3, 1, 1)
_STD01 = torch.from_numpy(STD / 255).view(1, 3, 1, 1)


def jittered(x: torch.Tensor, params: JitterParams) -> torch.Tensor:
    """Model input (ImageNet-normalised float32, see ``to_model_input``) jittered as the
    images in [0, 1] it stands for, and normalised again."""
    mean, std = _MEAN01.to(x.device), _STD01.to(x.device)
    return color_jitter(x * std + mean, params).sub_(mean).div_(std)
