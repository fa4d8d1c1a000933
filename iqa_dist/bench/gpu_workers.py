"""The rows of ``bench gpu`` that run in a process of their own: training steps on a batch in
memory, the loader alone, and the loader feeding the training step (end to end)."""
from __future__ import annotations

import argparse
import gc
import resource
import time
from functools import partial
from itertools import islice
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from ..config import Config
from ..data.stream import batches, load_split, train_loader
from ..models.hyperiqa import PATCH
from ..runtime import make_accelerator, set_determinism
from ..tools import model_from_config, synchronize
from ..train import Trainer
from .common import Result, synthetic_batch
from .step import step_trainer


def timed_window(step: Callable[[], Any], iters: int, window_s: float, device: torch.device) -> tuple[int, float]:
    """(steps, seconds) of at least ``iters`` steps and ``window_s`` seconds, synchronized
    once at each end: a step's queued GPU work counts, and no sync per step slows it."""
    synchronize(device)
    start, n = time.perf_counter(), 0
    while n < iters or time.perf_counter() - start < window_s:
        step()
        n += 1
        if n >= iters and time.perf_counter() - start >= window_s:
            synchronize(device)  # the window ends when the GPU is done, not when the host is
    return n, time.perf_counter() - start


def peak_memory(device: torch.device) -> tuple[float, float, str]:
    """(allocated, reserved) GiB at their peaks since the last reset, and where."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30,
                "GPU")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, rss, "CPU RSS"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def check_trainer(args: argparse.Namespace, batch_size: int, compile_: str = "none") -> SimpleNamespace:
    cfg = Config(model_size=args.model_size, batch_size=batch_size, compile=compile_,
                 mixed_precision=args.mixed_precision)
    set_determinism(cfg)  # seeds, as training sets them (make_accelerator turns on TF32 and autotuning)
    return step_trainer(model_from_config(cfg), cfg, make_accelerator(cfg))


def gpu_train_worker(args: argparse.Namespace) -> Result:
    """The training rows of one model and compiler: the real training step on a batch in
    memory, at each of ``--batch_sizes``; the fastest and the shipped batch are named."""
    rows = []
    for batch in args.batch_sizes:
        trainer = check_trainer(args, batch, args.compile)
        device = trainer.accelerator.device
        reset_peak(device)
        images, labels = synthetic_batch(batch)
        if device.type == "cuda":
            images = images.pin_memory()  # as the loader hands batches over
        step = partial(Trainer.train_step, trainer, images, labels)
        start = time.perf_counter()
        step()  # compiles, when asked
        synchronize(device)
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            step()
        n, seconds = timed_window(step, args.iters, args.window_s, device)
        alloc, reserved, where = peak_memory(device)
        shipped = " (the shipped per-GPU batch)" if batch == args.shipped else ""
        rows.append({"setting": f"batch {batch}{shipped}, compile {args.compile}", "patches/s": batch * n / seconds,
                     "peak alloc GiB": alloc, "peak reserved GiB": reserved, "first step s": first,
                     "detail": f"{precision_name(trainer.accelerator)}, channels-last "
                               f"{'yes' if trainer.channels_last else 'no'}, {where} memory, "
                               f"{n} steps in {seconds:.1f} s"})
        del trainer, step
        gc.collect()  # the model and optimiser state go before the next batch's peak is taken
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next batch's reserved peak is its own
    fastest = max(rows, key=lambda r: r["patches/s"])
    fastest["detail"] += "; the fastest batch" if len(rows) > 1 else ""
    return Result("gpu-train", rows)


def precision_name(accelerator: Any) -> str:
    return "fp32" if accelerator.mixed_precision == "no" else f"{accelerator.mixed_precision} autocast"


def check_loader(args: argparse.Namespace) -> tuple[Any, int]:
    """The training loader over the packed set, endless enough for the window, and how
    many of its first batches go untimed: the first (start-up) and those the workers
    prefetched meanwhile (2 each). A small shuffle buffer: a full one would take most of a
    short run to fill, and does not change the steady state's speed. Epochs past the
    set's end continue the ring."""
    split = load_split(args.shards, "all")
    skip = 2 * args.workers + 1
    loader = train_loader(split, patch_num=args.patch_num, patch_size=PATCH, batch_size=args.batch_size, seed=0,
                          rank=0, world=1, workers=args.workers, shuffle_buffer=args.batch_size, steps=100_000)
    return loader, skip


def gpu_loader_worker(args: argparse.Namespace) -> Result:
    """The loader row of the GPU check: training patches/s of ``workers`` loader processes."""
    loader, skip = check_loader(args)
    it = batches(loader)
    for _ in islice(it, skip):
        pass
    patches = 0

    def one() -> None:
        nonlocal patches
        patches += len(next(it)[0])

    n, seconds = timed_window(one, max(2, 2 * args.workers), args.window_s, torch.device("cpu"))
    return Result("gpu-loader", [{"patches/s": patches / seconds,
                                  "detail": f"{len(loader.dataset.split)} images 512x384, {args.patch_num} patches "
                                            f"each, {patches} patches timed in {seconds:.1f} s"}])


def gpu_e2e_worker(args: argparse.Namespace) -> Result:
    """The end-to-end row: the real training loader feeding the real training step, timed
    as the training rows are; the share of the window spent waiting for the next batch
    says how much of the time the GPU had nothing to do."""
    trainer = check_trainer(args, args.batch_size)
    device = trainer.accelerator.device
    loader, skip = check_loader(args)
    it: Iterator = batches(loader)
    for images, labels, *_ in islice(it, max(skip, args.warmup + 1)):  # start-up and warm-up: untimed
        Trainer.train_step(trainer, images, labels)
    reset_peak(device)
    waited, patches = 0.0, 0

    def one() -> None:
        nonlocal waited, patches
        start = time.perf_counter()
        images, labels, *_ = next(it)
        waited += time.perf_counter() - start
        patches += len(images)
        Trainer.train_step(trainer, images, labels)

    n, seconds = timed_window(one, args.iters, args.window_s, device)
    alloc, reserved, _ = peak_memory(device)
    return Result("gpu-e2e", [{"setting": f"batch {args.batch_size}, {args.workers} loader workers, compile none",
                               "patches/s": patches / seconds, "peak alloc GiB": alloc, "peak reserved GiB": reserved,
                               "detail": f"{precision_name(trainer.accelerator)}, {n} steps in {seconds:.1f} s, "
                                         f"{100 * waited / seconds:.0f} % of it waiting for the loader"}])
