"""The rows of ``bench gpu`` that run in a process of their own: training steps and the loader."""
from __future__ import annotations

import argparse
import resource
from functools import partial
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..data.stream import load_split, train_loader
from ..models.hyperiqa import PATCH
from ..runtime import make_accelerator, set_determinism
from ..tools import model_from_config, time_calls
from ..train import Trainer
from .common import Result, synthetic_batch, timed_patches
from .step import step_trainer


def gpu_train_worker(args: argparse.Namespace) -> Result:
    """One training row of the GPU check: the real training step on a fixed batch."""
    cfg = Config(model_size=args.model_size, batch_size=args.batch_size, compile=args.compile,
                 mixed_precision=args.mixed_precision)
    set_determinism(cfg)  # TF32 and cuDNN autotuning, as training sets them
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    images, labels = synthetic_batch(args.batch_size)
    if device.type == "cuda":
        images = images.pin_memory()  # as the loader hands batches over
    trainer = step_trainer(model_from_config(cfg), cfg, accelerator)
    step = partial(Trainer.train_step, trainer, images, labels)
    first = float(time_calls(step, 1, 0, device)[0])  # compiles, when asked
    seconds = float(np.median(time_calls(step, args.iters, args.warmup, device)))
    if device.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(device) / 2**30, "GPU"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU RSS"  # KiB on Linux
    return Result("gpu-train", [{"patches/s": args.batch_size / seconds, "peak GiB": peak, "first step s": first,
                                 "detail": f"{precision_name(accelerator)}, channels-last "
                                           f"{'yes' if trainer.channels_last else 'no'}, {where} memory, "
                                           f"median of {args.iters} steps"}])


def precision_name(accelerator: Any) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} autocast"


def gpu_loader_worker(args: argparse.Namespace) -> Result:
    """The loader row of the GPU check: training patches/s of ``workers`` loader processes."""
    split = load_split(args.shards, "all")
    # Untimed: the first batch (start-up) and those the workers prefetched meanwhile (2 each).
    # A small shuffle buffer: a full one would take most of a short run to fill, and does
    # not change the steady state's speed. Epochs past the set's end continue the ring.
    skip, timed = 2 * args.workers + 1, args.batches * max(1, args.workers)
    loader = train_loader(split, patch_num=args.patch_num, patch_size=PATCH, batch_size=args.batch_size, seed=0,
                          rank=0, world=1, workers=args.workers, shuffle_buffer=args.batch_size, steps=skip + timed)
    patches, seconds = timed_patches(loader, skip)
    return Result("gpu-loader", [{"patches/s": patches / seconds,
                                  "detail": f"{len(split)} images 512x384, {args.patch_num} patches each, "
                                            f"{patches} patches timed in {seconds:.1f} s"}])
