"""AdamW or Adam with HyperIQA's two learning rates, and the per-step learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import Config


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Backbone and LDA taps at ``lr``, the hyper network at ``lr * lr_ratio``.

    Biases and norm weights (1-d tensors) get no weight decay, as in timm.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        slow = name.startswith(("backbone.", "lda"))
        decay = p.ndim > 1
        groups.setdefault((slow, decay), []).append(p)
    return [{"params": params, "lr": base_lr(cfg, hyper=not slow),
             "weight_decay": cfg.weight_decay if decay else 0.0,
             "name": f"{'backbone' if slow else 'hyper'}{'' if decay else '_no_decay'}"}
            for (slow, decay), params in sorted(groups.items(), reverse=True)]


# adamw decays weights apart from the gradient; adam adds weight_decay * w to the gradient
# (L2), as the original HyperIQA's torch.optim.Adam
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


def build_optimizer(model: nn.Module, cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """``fused``: one kernel for the whole update (on GPUs; the parameters must be there)."""
    return OPTIMIZERS[cfg.optimizer](param_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=fused or None)


def base_lr(cfg: Config, hyper: bool) -> float:
    return cfg.lr * cfg.lr_ratio if hyper else cfg.lr


def is_hyper(group: dict) -> bool:
    return not group["name"].startswith("backbone")


class LrSchedule:
    """Multiplier of one group's initial lr after ``step`` optimiser steps.

    The cosine floor is relative (``eta_min_ratio`` x each group's lr): a fixed floor
    would raise a small lr instead of lowering it. A plain object, so that
    ``LambdaLR.state_dict`` stores it as numbers.
    """

    def __init__(self, cfg: Config, steps_per_epoch: int, hyper: bool) -> None:
        self.kind = cfg.lr_scheduler
        self.hyper = hyper  # a hyper-network group (step and hyperiqa decay only those)
        self.steps_per_epoch = steps_per_epoch
        self.epochs = cfg.epochs
        self.eta_min_ratio = cfg.eta_min_ratio
        self.step_size, self.step_gamma = cfg.step_size, cfg.step_gamma
        self.lr_ratio = cfg.lr_ratio
        self.warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "cosine":
            t = min(1.0, (step - self.warmup_steps) / max(1, self.epochs * self.steps_per_epoch - self.warmup_steps))
            return self.eta_min_ratio + (1 - self.eta_min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        if self.kind in ("step", "hyperiqa") and self.hyper:
            return self.decay(step // self.steps_per_epoch)
        return 1.0  # none, and the backbone under step and hyperiqa

    def decay(self, epoch: int) -> float:
        """The hyper network's lr in ``epoch`` (0-based), relative to its initial lr * lr_ratio.

        Both rules come from the original HyperIQA's loop: after epoch t it sets the next
        epoch's hyper lr to lr * lr_ratio * step_gamma ** (t // step_size) (with the defaults
        6 and 0.1: lr / 10 from epoch 8 counted from 1, lr / 100 from epoch 14) and keeps the
        backbone at lr. ``step`` is the seed's rule, which stops there; ``hyperiqa`` is the
        original's, which also drops the ratio from lr_ratio to 1 once t > 8."""
        if epoch == 0:
            return 1.0
        t = epoch - 1
        factor = self.step_gamma ** (t // self.step_size)
        if self.kind == "hyperiqa" and t > 8 and self.lr_ratio:
            factor /= self.lr_ratio
        return factor


def restarts_each_epoch(cfg: Config) -> bool:
    """The loops behind step and hyperiqa re-create their optimiser every epoch (to set the new
    lr): its moments start again from zero."""
    return cfg.lr_scheduler in ("step", "hyperiqa")


def reset_moments(optimizer: torch.optim.Optimizer) -> None:
    """What re-creating the optimiser does to its state; Adam(W) starts it again at the next step."""
    optimizer.state.clear()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """One schedule per parameter group: step and hyperiqa treat backbone and hyper apart."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [LrSchedule(cfg, steps_per_epoch, is_hyper(group)) for group in optimizer.param_groups])
