"""Benchmarks of the claims the design rests on, each against its reference.

    python -m iqa_dist.bench data  [--shards DIR --patch_num 20 --workers 2 --images 64 --passes 5]
    python -m iqa_dist.bench step  [--model_size tiny --batch_size 32 --iters 5]
    python -m iqa_dist.bench ddp   [--model_size micro --batch_size 8 --iters 10 --repeats 3]
    python -m iqa_dist.bench eval  [--checkpoint RUN --shards DIR --images 32 (256 on a GPU)]
    python -m iqa_dist.bench sweep
    python -m iqa_dist.bench gpu   [--out gpu_check --budget_s 420]   (or: bash tests/gpu/check.sh OUT)

Each prints a table and whether its target was met (``--json PATH`` also writes it).
Without ``--shards``, ``data`` and ``eval`` build a KonIQ-10k-like set first: photographs
as JPEGs of KonIQ's 1024x768, packed at 512x384 as KonIQ is (``--resize koniq``).
``gpu`` is the one-command check for a GPU node (7 minutes on one H100 by our estimate):
training patches/s of Swin tiny and base, the loader alone and feeding the training step,
evaluation, and launch checks of DDP, ZeRO-2 and ZeRO-3; on a CPU it runs a smoke version
of itself. Each bench is a module of this package; ``cli`` is the command line.
Speeds depend on the machine and its load: these are measurements, not tests.
"""
from __future__ import annotations

from .cli import main
from .common import usable_cpus
from .sets import KONIQ_SIZE, koniq_like_set

__all__ = ["KONIQ_SIZE", "koniq_like_set", "main", "usable_cpus"]
