"""``bench ddp``: samples/s of two CPU ranks against one, each a process launched for real."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..runtime import make_accelerator
from ..tools import model_from_config
from .common import REPO, TWO_CPU_RANKS, Result, free_port, synthetic_batch, target, use_device, why_failed
from .step import train_step_fn


def ddp_worker(args: argparse.Namespace) -> Result:
    """One rank of the DDP bench (started by ``bench ddp``): timed steps on synthetic data."""
    torch.set_num_threads(1)
    use_device("cpu")
    cfg = Config(model_size=args.model_size, batch_size=args.batch_size)
    accelerator = make_accelerator(cfg)
    images, labels = synthetic_batch(args.batch_size, seed=accelerator.process_index)
    step = train_step_fn(model_from_config(cfg), cfg, accelerator, images, labels)
    for _ in range(args.warmup):
        step()
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    world = accelerator.num_processes
    if accelerator.is_main_process and args.json:
        Path(args.json).write_text(json.dumps({"world": world, "seconds": seconds,
                                               "samples_s": world * args.batch_size * args.iters / seconds}))
    accelerator.end_training()
    return Result("ddp-worker", [])


def _run_ranks(world: int, args: argparse.Namespace, out: Path) -> dict:
    worker = ["-m", "iqa_dist.bench", "ddp-worker", "--model_size", args.model_size, "--batch_size",
              str(args.batch_size), "--iters", str(args.iters), "--warmup", str(args.warmup), "--json", str(out)]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        if not TWO_CPU_RANKS.exists():
            raise ConfigError(f"{TWO_CPU_RANKS}: missing (run from a source checkout)")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_CPU_RANKS),
               "--num_processes", str(world), "--main_process_port", str(free_port()), *worker]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0 or not out.exists():
        raise RuntimeError(f"{world}-rank run failed (exit {done.returncode}): {why_failed(done.stderr)}")
    return json.loads(out.read_text())


def bench_ddp(args: argparse.Namespace) -> Result:
    """1 rank, then 2, ``--repeats`` times in turn (a change in the machine's load weighs on
    both alike); the median of each."""
    runs: dict[int, list[float]] = {}  # by the world size the ranks saw
    with tempfile.TemporaryDirectory() as tmp:
        for i, world in enumerate([1, 2] * args.repeats):
            run = _run_ranks(world, args, Path(tmp) / f"{i}.json")
            runs.setdefault(run["world"], []).append(run["samples_s"])
    if sorted(runs) != [1, 2]:
        raise RuntimeError(f"the launches ran {sorted(runs)} rank(s), not 1 and 2")
    rows = [{"ranks": world, "samples/s": float(np.median(rates)), "runs": ", ".join(f"{r:.1f}" for r in rates)}
            for world, rates in runs.items()]
    scaling = rows[1]["samples/s"] / rows[0]["samples/s"]
    return Result("ddp", rows, [target("2 ranks / 1 rank samples/s >= 1.6x", scaling, scaling >= 1.6)],
                  {"model_size": args.model_size, "batch_size_per_rank": args.batch_size,
                   "threads_per_rank": 1, "repeats": args.repeats, "scaling": scaling})
