"""``bench eval``: images/s of our batched evaluation against the original batch-1 loop."""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Config
from ..data.stream import Split, eval_loader, to_model_input
from ..runtime import make_accelerator
from ..scoring import predict_split
from ..tools import load_trained, model_from_config, synchronize
from .common import Result, target, use_device
from .sets import ReferencePatches, bench_images, reference_dataset, sample_split


@torch.no_grad()
def reference_eval(model: nn.Module, dataset: ReferencePatches, device: torch.device, workers: int) -> int:
    """The original test loop: batch 1, one forward and one host sync per patch; patches scored."""
    n = 0
    for image, _ in DataLoader(dataset, batch_size=1, num_workers=workers):
        float(model(image.to(device)).item())
        n += 1
    return n


def eval_model(args: argparse.Namespace) -> tuple[nn.Module, Config]:
    if args.checkpoint:
        trained = load_trained(args.checkpoint)
        return trained.model, trained.cfg
    cfg = Config(model_size=args.model_size)
    return model_from_config(cfg).eval(), cfg


EVAL_IMAGES = {"cuda": 256, "cpu": 32}  # on a GPU fewer are over in a blink, and launch costs weigh


def bench_eval(args: argparse.Namespace) -> Result:
    use_device(args.device)
    args.images = args.images or EVAL_IMAGES.get(torch.device(args.device).type, 32)
    model, cfg = eval_model(args)
    cfg = replace(cfg, test_patch_num=args.patch_num, workers=args.workers, test_random_crop=False,
                  mixed_precision="no")
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device).eval()
    with bench_images(args) as shards:
        return _bench_eval(args, model, cfg, accelerator, *sample_split(shards, args.images))


def _bench_eval(args: argparse.Namespace, model: nn.Module, cfg: Config, accelerator: Any, split: Split,
                rows: list[dict]) -> Result:
    warm_up(model, accelerator.device, (1, args.batch_size), cfg.patch_size)
    start = time.perf_counter()
    scored = predict_split(model, split, cfg, accelerator, args.batch_size)
    ours_s = time.perf_counter() - start
    forward_s = forward_only(model, split, cfg, accelerator.device, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = reference_dataset(split, rows, Path(tmp), args.patch_num, flip=False)
        start = time.perf_counter()
        reference_eval(model, dataset, accelerator.device, args.workers)
        ref_s = time.perf_counter() - start
    n = len(rows)
    table = [{"evaluation": "reference (batch 1, .item() per patch)", "images": n, "seconds": ref_s,
              "images/s": n / ref_s},
             {"evaluation": f"ours (predict_split, batch {args.batch_size})", "images": len(scored),
              "seconds": ours_s, "images/s": len(scored) / ours_s},
             {"evaluation": f"the model alone (patches in memory, batch {args.batch_size})", "images": n,
              "seconds": forward_s, "images/s": n / forward_s}]
    speedup, ceiling, of_forward = ref_s / ours_s, ref_s / forward_s, forward_s / ours_s
    return Result("eval", table,
                  [target(f"ours / reference images/s >= 10x (the model alone gets {ceiling:.2f}x here)",
                          speedup, speedup >= 10),
                   target("ours / the model alone >= 0.9 (all but the forward removed)", of_forward,
                          of_forward >= 0.9)],
                  {"model_size": cfg.model_size, "patch_num": args.patch_num, "workers": args.workers,
                   "device": str(accelerator.device), "speedup": speedup, "ceiling": ceiling,
                   "ours_over_forward": of_forward})


@torch.no_grad()
def warm_up(model: nn.Module, device: torch.device, batch_sizes: tuple[int, ...], patch: int) -> None:
    """A forward at each batch size, then a synchronize: CUDA's start-up, cuDNN's autotuning
    and the first kernels' loading are nobody's evaluation time."""
    dtype = next(model.parameters()).dtype
    for n in batch_sizes:
        model(torch.zeros(n, 3, patch, patch, device=device, dtype=dtype))
    synchronize(device)


@torch.no_grad()
def forward_only(model: nn.Module, split: Split, cfg: Config, device: torch.device, batch_size: int) -> float:
    """Seconds of the model alone on the evaluation's own crops, read into memory first:
    the ceiling of any evaluation loop, since reading, cropping and collating are gone."""
    loader = eval_loader(split, patch_num=cfg.test_patch_num, patch_size=cfg.patch_size, batch_size=batch_size,
                         rank=0, world=1, workers=0)
    held = [patches for patches, *_ in loader]
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    for patches in held:
        model(to_model_input(patches, device, dtype)).float().cpu()  # .cpu(): the host waits, as ours does
    return time.perf_counter() - start
