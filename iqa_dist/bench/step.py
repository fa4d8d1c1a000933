"""``bench step``: a HyperIQA training step against the backbone's alone."""
from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..optim import build_scheduler
from ..runtime import compiled, make_accelerator, placed
from ..tools import model_from_config, time_calls
from ..train import Trainer
from .common import Result, synthetic_batch, target, use_device


class BackboneOnly(nn.Module):
    """The backbone with the cheapest possible head: what a HyperIQA step is compared with."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone  # the name puts it in the optimiser's backbone group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([f.mean(dim=(1, 2, 3)) for f in self.backbone(x)]).sum(0)


def step_trainer(model: nn.Module, cfg: Config, accelerator: Any) -> SimpleNamespace:
    """What ``Trainer.train_step`` needs, with the model placed, optimised and compiled as
    ``Trainer`` does, and no data set."""

    model, optimizer, channels_last = placed(model, cfg, accelerator)
    scheduler = build_scheduler(optimizer, cfg, 1_000_000)
    model, optimizer = accelerator.prepare(model, optimizer)
    return SimpleNamespace(accelerator=accelerator, cfg=cfg, model=model, optimizer=optimizer,
                           scheduler=scheduler, forward=compiled(model, cfg), channels_last=channels_last)


def train_step_fn(model: nn.Module, cfg: Config, accelerator: Any, images: torch.Tensor,
                  labels: torch.Tensor) -> Callable[[], float]:
    """One optimiser step of the real training loop (``Trainer.train_step``) on a fixed batch."""
    trainer = step_trainer(model, cfg, accelerator)
    return lambda: Trainer.train_step(trainer, images, labels)


def bench_step(args: argparse.Namespace) -> Result:
    use_device(args.device)
    cfg = Config(model_size=args.model_size, batch_size=args.batch_size)
    accelerator = make_accelerator(cfg)
    images, labels = synthetic_batch(args.batch_size)
    steps = {"HyperIQA": train_step_fn(model_from_config(cfg), cfg, accelerator, images, labels),
             "backbone only": train_step_fn(BackboneOnly(model_from_config(cfg).backbone), cfg,
                                            accelerator, images, labels)}
    for step in steps.values():  # warm both before timing either
        time_calls(step, 0, args.warmup, accelerator.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):  # alternate, so that a busy neighbour slows both alike
        for name, step in steps.items():
            times[name] += time_calls(step, 1, 0, accelerator.device).tolist()
    ms = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    rows = [{"step": name, "median ms": ms[name], "mean ms": 1000 * float(np.mean(times[name])),
             "patches/s": args.batch_size / ms[name] * 1000} for name in steps]
    ratio = ms["HyperIQA"] / ms["backbone only"]
    return Result("step", rows, [target("HyperIQA / backbone-only step <= 1.15x", ratio, ratio <= 1.15)],
                  {"model_size": args.model_size, "batch_size": args.batch_size,
                   "device": str(accelerator.device), "ratio": ratio})
