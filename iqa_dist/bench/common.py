"""What every bench shares: the result, its targets, the device, synthetic batches, timing."""
from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..models.hyperiqa import PATCH


REPO = Path(__file__).resolve().parents[2]
TWO_CPU_RANKS = REPO / "launch" / "cpu_2proc.yaml"


@dataclass
class Result:
    bench: str
    rows: list[dict]
    targets: list[str] = field(default_factory=list)  # "target ...: value: met | not met"
    figures: dict[str, Any] = field(default_factory=dict)


def target(text: str, value: float, met: bool) -> str:
    return f"target {text}: {value:.2f} ({'met' if met else 'NOT met'})"


def timed_patches(batches: Iterable, skip: int = 1) -> tuple[int, float]:
    """(patches, seconds) of the steady state: the clock starts after the first ``skip``
    batches, so neither worker start-up nor filling a shuffle buffer counts (the first
    item of a batch is its patches)."""
    batches = iter(batches)
    for _ in range(skip):
        next(batches)
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch[0])
    return n, time.perf_counter() - start


def use_device(device: str) -> None:
    """``make_accelerator`` takes the GPU when there is one unless told otherwise."""
    if device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    else:
        os.environ.pop("ACCELERATE_USE_CPU", None)


def synthetic_batch(batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC patches, as the loaders yield them, and labels."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randint(0, 256, (batch_size, PATCH, PATCH, 3), generator=g, dtype=torch.uint8)
    return patches, torch.rand(batch_size, generator=g) * 100


def why_failed(output: str) -> str:
    """The line of a failed process's output that says why: its last exception or error
    line (warnings and progress bars often come after it), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"([\w.]*(Error|Exception)\b|error:)", line)]
    return (errors or lines or ["no output"])[-1][:300]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
