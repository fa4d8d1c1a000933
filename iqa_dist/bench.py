"""Benchmarks of the claims the design rests on, each against its reference.

    python -m iqa_dist.bench data  [--shards DIR --patch_num 20 --workers 2 --images 64 --passes 5]
    python -m iqa_dist.bench step  [--model_size tiny --batch_size 32 --iters 5]
    python -m iqa_dist.bench ddp   [--model_size micro --batch_size 8 --iters 10 --repeats 3]
    python -m iqa_dist.bench eval  [--checkpoint RUN --shards DIR --images 32]
    python -m iqa_dist.bench sweep
    python -m iqa_dist.bench gpu   [--out gpu_check]   (or: bash tests/gpu/check.sh OUT)

Each prints a table and whether its target was met (``--json PATH`` also writes it).
Without ``--shards``, ``data`` and ``eval`` build a KonIQ-10k-like set first: photographs
as JPEGs of KonIQ's 1024x768, packed at 512x384 as KonIQ is (``--resize koniq``).
``gpu`` is the one-command check for a GPU node (at most 8 minutes on one GPU): training
patches/s of Swin tiny and base, the loader against them, and launched DDP, ZeRO-2 and
ZeRO-3 runs; on a CPU it runs a smoke version of itself.
Speeds depend on the machine and its load: these are measurements, not tests.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from .config import Config, ConfigError
from .data.stream import (IMAGE_EXTS, MEAN, STD, Split, _collate, eval_loader, load_split, to_model_input,
                          train_crops, train_loader)
from .images import open_rgb
from .models.hyperiqa import PATCH
from .optim import build_scheduler
from .pack import read_manifest
from .runtime import compiled, make_accelerator, placed, set_determinism
from .scoring import predict_split
from .train import Trainer
from .tools import default_device, load_trained, markdown_table, model_from_config, time_calls

REPO = Path(__file__).resolve().parents[1]
TWO_CPU_RANKS = REPO / "launch" / "cpu_2proc.yaml"


@dataclass
class Result:
    bench: str
    rows: list[dict]
    targets: list[str] = field(default_factory=list)  # "target ...: value: met | not met"
    figures: dict[str, Any] = field(default_factory=dict)


def target(text: str, value: float, met: bool) -> str:
    return f"target {text}: {value:.2f} ({'met' if met else 'NOT met'})"


# ---------------------------------------------------------------- images for the data and eval benches


@contextlib.contextmanager
def bench_images(args: argparse.Namespace) -> Iterator[Path]:
    """The packed set to read: ``--shards``, or a KonIQ-like set built for this run."""
    if args.shards:
        yield args.shards
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {args.images} KonIQ-sized JPEGs (--shards to use a packed set) ...",
              file=sys.stderr, flush=True)
        yield koniq_like_set(Path(tmp), args.images, workers=0)


def sample_split(shards: Path, n: int) -> tuple[Split, list[dict]]:
    """The first ``n`` images of a packed set (manifest order: few shards), as a split."""
    rows = sorted(read_manifest(shards), key=lambda r: (r["shard"], r["key"]))[:n]
    if not rows:
        raise ConfigError(f"{shards}: no images")
    return Split.from_rows(Path(shards), "bench", rows), rows


def stored_images(split: Split) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the split's images as the shards hold them."""
    for shard in split.shards:
        for sample in wds.tarfile_samples([{"url": str(shard)}]):
            if sample["__key__"] in split.keys:
                ext = next(e for e in IMAGE_EXTS if e in sample)
                yield sample["__key__"], ext, sample[ext]


def reference_files(split: Split, rows: list[dict], tmp: Path) -> list[Path]:
    """The files the original loader would open: the source image when it is still there
    (it is then resized to the stored size), else the stored bytes written out."""
    stored = {}
    for key, ext, data in stored_images(split):
        stored[key] = tmp / f"{len(stored):06d}.{ext}"
        stored[key].write_bytes(data)
    return [Path(r["path"]) if Path(r["path"]).is_file() else stored[r["key"]] for r in rows]


class ReferencePatches(Dataset):
    """The original HyperIQA loader: each item is one patch, and each patch opens, decodes
    and resizes its whole image file again (PIL open, convert RGB, Resize, RandomCrop,
    [RandomHorizontalFlip], ToTensor, Normalize)."""

    def __init__(self, files: list[Path], sizes: list[tuple[int, int]], labels: list[float],
                 patch_num: int, flip: bool) -> None:
        self.items = [item for item in zip(files, sizes, labels) for _ in range(patch_num)]
        steps = [transforms.RandomCrop(PATCH, pad_if_needed=True)]
        steps += [transforms.RandomHorizontalFlip()] if flip else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(),
                                                     transforms.Normalize(MEAN / 255, STD / 255)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        path, size, label = self.items[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        if img.size != size:  # the original resized on every read (KonIQ to 512x384)
            img = img.resize(size, Image.Resampling.BILINEAR)
        return self.transform(img), label


def reference_dataset(split: Split, rows: list[dict], tmp: Path, patch_num: int, flip: bool) -> ReferencePatches:
    files = reference_files(split, rows, tmp)
    return ReferencePatches(files, [(r["width"], r["height"]) for r in rows], [r["label"] for r in rows],
                            patch_num, flip)


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


# ---------------------------------------------------------------- data


def decode_once_bound(split: Split, patch_num: int, parallel: int) -> dict[str, float]:
    """Patches/s if each image were decoded once and cut into ``patch_num`` crops, with no
    other cost: decode time / patch_num + crop-flip-collate time, over ``parallel`` cores."""
    decode, arrays = [], []
    for key, _, data in stored_images(split):
        start = time.perf_counter()
        arrays.append(np.asarray(open_rgb(data, key)[0]))
        decode.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    crop = []
    for arr in arrays:  # the stream's own cropping and stacking
        start = time.perf_counter()
        _collate([(patch, 0.0, "") for patch in train_crops(arr, patch_num, PATCH, rng)])
        crop.append((time.perf_counter() - start) / patch_num)
    per_patch = float(np.mean(decode)) / patch_num + float(np.mean(crop))
    return {"decode_ms": 1000 * float(np.mean(decode)), "crop_ms": 1000 * float(np.mean(crop)),
            "patches_s": parallel / per_patch}


def bench_data(args: argparse.Namespace) -> Result:
    with bench_images(args) as shards:
        return _bench_data(args, *sample_split(shards, args.images))


def ours_rates(split: Split, args: argparse.Namespace, workers: Iterable[int]) -> list[tuple[int, float]]:
    """(patches, patches/s) of the training loader with each number of ``workers``: the
    median over ``--passes`` epochs, each timed from its first batch (worker start-up and
    buffer filling excluded). The loaders take turns, epoch by epoch, so that a change in
    the machine's load weighs on all of them alike."""
    loaders = [train_loader(split, patch_num=args.patch_num, patch_size=PATCH, batch_size=args.batch_size,
                            seed=0, rank=0, world=1, workers=w, shuffle_buffer=args.shuffle_buffer)
               for w in workers]
    runs: list[list[tuple[int, float]]] = [[] for _ in loaders]
    for epoch in range(args.passes):
        for loader, timed in zip(loaders, runs):
            loader.dataset.set_epoch(epoch)
            timed.append(timed_patches(loader))
    return [(timed[0][0], float(np.median([n / s for n, s in timed]))) for timed in runs]


def _bench_data(args: argparse.Namespace, split: Split, rows: list[dict]) -> Result:
    total = len(rows) * args.patch_num
    if total < 2 * args.batch_size:  # the first batch is not timed
        raise ConfigError(f"{len(rows)} images x {args.patch_num} patches: fewer than two batches")
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_dataset(split, rows, Path(tmp), args.patch_num, flip=True)
        ref_n, ref_s = timed_patches(DataLoader(ref, batch_size=args.batch_size, shuffle=True,
                                                num_workers=args.workers))
    serial, parallel = ours_rates(split, args, (0, args.workers))
    cores = max(1, min(args.workers, len(os.sched_getaffinity(0))))
    bound = decode_once_bound(split, args.patch_num, cores)
    ref_rate = ref_n / ref_s
    rows_out = [{"loader": f"reference (decode + resize per patch), {args.workers} workers", "patches": ref_n,
                 "patches/s": ref_rate},
                {"loader": "ours (decode once), in process", "patches": serial[0], "patches/s": serial[1]},
                {"loader": f"ours (decode once), {args.workers} workers", "patches": parallel[0],
                 "patches/s": parallel[1]},
                {"loader": f"decode-once bound ({cores} core(s))", "patches": "", "patches/s": bound["patches_s"]}]
    speedup, to_bound, scaling = parallel[1] / ref_rate, bound["patches_s"] / parallel[1], parallel[1] / serial[1]
    note = "" if args.patch_num == 20 else f" (measured at {args.patch_num})"
    targets = [target(f"ours / reference >= 20x at 20 patches/image{note}", speedup, speedup >= 20),
               target("bound / ours <= 1.3x", to_bound, to_bound <= 1.3)]
    if cores >= 2:
        targets.append(target(f"ours {args.workers} workers / in process >= 1.7x", scaling, scaling >= 1.7))
    return Result("data", rows_out, targets,
                  {"images": len(rows), "patch_num": args.patch_num, "workers": args.workers, "cores": cores,
                   "speedup": speedup, "bound_over_ours": to_bound, "workers_over_serial": scaling,
                   **{f"bound_{k}": v for k, v in bound.items()}})


# ---------------------------------------------------------------- training steps


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


# ---------------------------------------------------------------- DDP scaling


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


def why_failed(output: str) -> str:
    """The line of a failed process's output that says why: its last exception or error
    line (warnings and progress bars often come after it), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"([\w.]*(Error|Exception)\b|error:)", line)]
    return (errors or lines or ["no output"])[-1][:300]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, args: argparse.Namespace, out: Path) -> dict:
    worker = ["-m", "iqa_dist.bench", "ddp-worker", "--model_size", args.model_size, "--batch_size",
              str(args.batch_size), "--iters", str(args.iters), "--warmup", str(args.warmup), "--json", str(out)]
    if world == 1:
        cmd = [sys.executable, *worker]
    else:
        if not TWO_CPU_RANKS.exists():
            raise ConfigError(f"{TWO_CPU_RANKS}: missing (run from a source checkout)")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(TWO_CPU_RANKS),
               "--num_processes", str(world), "--main_process_port", str(_free_port()), *worker]
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


# ---------------------------------------------------------------- evaluation


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


def bench_eval(args: argparse.Namespace) -> Result:
    use_device(args.device)
    model, cfg = eval_model(args)
    cfg = replace(cfg, test_patch_num=args.patch_num, workers=args.workers, test_random_crop=False,
                  mixed_precision="no")
    accelerator = make_accelerator(cfg)
    model = model.to(accelerator.device).eval()
    with bench_images(args) as shards:
        return _bench_eval(args, model, cfg, accelerator, *sample_split(shards, args.images))


def _bench_eval(args: argparse.Namespace, model: nn.Module, cfg: Config, accelerator: Any, split: Split,
                rows: list[dict]) -> Result:
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


# ---------------------------------------------------------------- sweep


def sweep_spec(args: argparse.Namespace, scheduler: dict[str, Any], name: str, storage: Path) -> dict:
    """The same grid of trials for both runs; only the scheduler differs."""
    overrides = {"dataset": str(args.shards), "epochs": args.epochs, "early_stopping": False,
                 "spaq": False, "plots": False, "max_steps_per_epoch": args.max_steps_per_epoch}
    return {"base": str(args.base), "overrides": overrides, "search": "grid", "num_samples": 1,
            "space": {"lr": {"type": "grid", "values": args.lr},
                      "ranking_loss_alpha": {"type": "grid", "values": args.alpha}},
            "scheduler": scheduler, "max_concurrent": args.max_concurrent,
            "resources_per_trial": {"cpu": 1}, "storage_path": str(storage), "name": name}


def bench_sweep(args: argparse.Namespace) -> Result:
    from .tune import ray_cluster, run_sweep

    schedulers = {"grid (every trial to the end)": {"type": "none"},
                  "ASHA": {"type": "asha", "grace_period": args.grace_period,
                           "reduction_factor": args.reduction_factor}}
    tables = {}
    with tempfile.TemporaryDirectory() as tmp, ray_cluster(None, args.max_concurrent):
        storage = args.storage_path or Path(tmp)
        for i, (name, scheduler) in enumerate(schedulers.items()):
            tables[name] = run_sweep(sweep_spec(args, scheduler, f"bench-{i}-{scheduler['type']}", storage))
    rows = [{"search": name, "trials": len(t), "epochs trained": int(t["compute_epochs"].sum()),
             "training s": float(t["compute_s"].sum()), "best val SRCC": float(t["best_val_srcc"].max())}
            for name, t in tables.items()]
    grid, asha = rows
    compute = asha["epochs trained"] / grid["epochs trained"]
    gap = grid["best val SRCC"] - asha["best val SRCC"]
    return Result("sweep", rows, [target("grid best - ASHA best val SRCC <= 0.01", gap, gap <= 0.01),
                                  target("ASHA / grid epochs trained <= 0.40", compute, compute <= 0.4)],
                  {"compute_ratio": compute, "srcc_gap": gap, "epochs": args.epochs})


# ---------------------------------------------------------------- the GPU check


@dataclass(frozen=True)
class CheckSizes:
    """What ``bench gpu`` runs: the real sizes on a GPU; on a CPU a smoke run of the same
    code (micro Swin, fp32, ``aot_eager``, gloo), so that the suite keeps the check
    working until a GPU is lent."""
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    compilers: tuple[str, ...]  # Config.compile values
    precision: str  # Config.mixed_precision
    warmup: int  # untimed steps after the first (which compiles)
    iters: int
    images: int  # KonIQ-sized photographs packed for the loader and the launches
    loader_batches: int  # timed, per loader worker
    launch_model: str
    launch_batch: int
    launch_patches: int  # train_patch_num of the launched runs
    launch_steps: int
    eval_images: int  # of the packed set, scored by ours and by the batch-1 reference
    eval_patches: int  # crops per image
    budget_s: float  # the whole check: parts that would start later are skipped
    part_s: float  # one part at most (compiling Swin-Base takes minutes)


GPU_SIZES = CheckSizes(("tiny", "base"), (32, 96), ("none", "inductor"), "bf16", warmup=3, iters=10,
                       images=48, loader_batches=4, launch_model="tiny", launch_batch=32, launch_patches=20,
                       launch_steps=4, eval_images=32, eval_patches=20, budget_s=470, part_s=150)
SMOKE_SIZES = CheckSizes(("micro",), (2,), ("none", "aot_eager"), "no", warmup=0, iters=1, images=8,
                         loader_batches=2, launch_model="micro", launch_batch=2, launch_patches=2,
                         launch_steps=2, eval_images=4, eval_patches=2, budget_s=600, part_s=300)
# Launched runs: one process each. A one-process MULTI_GPU launch still starts torchrun, so
# the process group is really set up (NCCL on a GPU, gloo on a CPU).
LAUNCHES = {"DDP": "multi_gpu.yaml", "DeepSpeed ZeRO-2": "zero2.yaml", "DeepSpeed ZeRO-3": "zero3.yaml"}
COLUMNS = ("part", "model", "setting", "status", "patches/s", "peak GiB", "first step s", "seconds", "detail")


@dataclass
class Part:
    """One time-boxed piece of the check, run as a process group of its own: a hang, a
    crash or an out-of-memory ends that part only, and its peak memory is its own."""
    part: str  # train | loader | launch | eval
    model: str
    setting: str
    cmd: list[str]
    folder: Path  # where it writes; ``read`` turns that into the row's figures
    read: Callable[[Path], dict]


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


KONIQ_SIZE = (1024, 768)  # KonIQ-10k's released images


def koniq_like_set(root: Path, images: int, workers: int) -> Path:
    """A packed set of KonIQ-sized photographs: 1024x768 JPEGs cut from the photographs that
    scikit-image ships, packed at KonIQ's 512x384 as KonIQ-10k is (``--resize koniq``).
    The demo's 256-pixel tiles decode far faster and would flatter the loader. Labels are
    random: the launched runs' SRCC means nothing."""
    from .pack import PackOptions, pack
    from .sources.demo import PHOTOS, load_photo

    src, rng, rows = root / "koniq-like", np.random.default_rng(0), []
    (src / "img").mkdir(parents=True)
    for i in range(images):
        centre = tuple(rng.uniform(0, 1, 2))  # a different 4:3 crop each time a photograph comes round
        ImageOps.fit(load_photo(PHOTOS[i % len(PHOTOS)]), KONIQ_SIZE, centering=centre).save(
            src / "img" / f"{i:04d}.jpg", quality=90)
        rows.append(f"img/{i:04d}.jpg,{rng.uniform(1, 100):.2f},r{i}")
    (src / "labels.csv").write_text("\n".join(["name,mos,ref", *rows]) + "\n")
    options = PackOptions(resize="koniq", shard_size=16, rounds=1, split=(0.5, 0.25, 0.25))
    pack("csv", src, root / "shards", options, workers=workers)
    return root / "shards"


def _bench_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "iqa_dist.bench", *argv]


def _first_row(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())["rows"][0]


def train_part(sizes: CheckSizes, model: str, batch: int, compiler: str, folder: Path) -> Part:
    cmd = _bench_cmd("gpu-train", "--model_size", model, "--batch_size", str(batch), "--compile", compiler,
                     "--mixed_precision", sizes.precision, "--warmup", str(sizes.warmup),
                     "--iters", str(sizes.iters), "--json", str(folder / "result.json"))
    return Part("train", model, f"batch {batch}, compile {compiler}", cmd, folder, _first_row)


def loader_part(sizes: CheckSizes, shards: Path, workers: int, folder: Path) -> Part:
    batch = max(sizes.batch_sizes)
    cmd = _bench_cmd("gpu-loader", "--shards", str(shards), "--workers", str(workers), "--batch_size", str(batch),
                     "--batches", str(sizes.loader_batches), "--json", str(folder / "result.json"))
    return Part("loader", "", f"{workers} workers, batch {batch}", cmd, folder, _first_row)


def eval_part(sizes: CheckSizes, shards: Path, workers: int, folder: Path, gpu: bool) -> Part:
    """``bench eval`` on the GPU: ours against the original batch-1 loop, and the model alone."""
    batch = max(sizes.batch_sizes)
    cmd = _bench_cmd("eval", "--shards", str(shards), "--images", str(sizes.eval_images), "--patch_num",
                     str(sizes.eval_patches), "--workers", str(workers), "--model_size", sizes.launch_model,
                     "--batch_size", str(batch), "--device", "cuda" if gpu else "cpu",
                     "--json", str(folder / "result.json"))
    return Part("eval", sizes.launch_model, f"{sizes.eval_images} images x {sizes.eval_patches} crops, batch {batch}, "
                f"fp32", cmd, folder, partial(_eval_row, patches=sizes.eval_patches))


def _eval_row(folder: Path, patches: int) -> dict:
    result = json.loads((folder / "result.json").read_text())
    reference, ours, alone = (r["images/s"] for r in result["rows"])
    f = result["figures"]
    return {"patches/s": ours * patches, "speedup": f["speedup"],
            "detail": f"images/s: reference {reference:.1f}, ours {ours:.1f}, the model alone {alone:.1f}; "
                      f"ours / reference {f['speedup']:.1f}x, ours / the model alone {f['ours_over_forward']:.2f}"}


def launch_part(sizes: CheckSizes, name: str, shards: Path, folder: Path, gpu: bool) -> Part:
    """A real tiny run of ``iqa_dist.train`` through ``accelerate launch``: a few steps, the
    epoch's validation and checkpoint, and ``finish()`` (the test with the best weights)."""
    config = LAUNCHES[name] if gpu or name != "DDP" else "cpu_2proc.yaml"
    train = ["--dataset", str(shards), "--run_dir", str(folder / "run"), "--model_size", sizes.launch_model,
             "--batch_size", str(sizes.launch_batch), "--train_patch_num", str(sizes.launch_patches),
             "--test_patch_num", "1", "--epochs", "1", "--max_steps_per_epoch", str(sizes.launch_steps),
             "--workers", "1", "--log_every", "1", "--no_plots", "--no_spaq"]
    # the check's precision, said explicitly: without --mixed_precision, accelerate launch
    # tells the run "no" (fp32) whenever the launcher config names none, as zero*.yaml do
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
           "--num_processes", "1", "--main_process_port", str(_free_port()),
           "--mixed_precision", sizes.precision, "-m", "iqa_dist.train", *train]
    precision = "fp32" if sizes.precision == "no" else sizes.precision
    return Part("launch", sizes.launch_model, f"{name} ({config}, 1 process, {precision})", cmd, folder,
                lambda f: _launch_row(f / "run", sizes.launch_steps))


def _launch_row(run: Path, steps: int) -> dict:
    results = json.loads((run / "results.json").read_text())  # finish() writes it last
    done = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["global_step"]
    if done != steps:
        raise RuntimeError(f"{done} steps trained, {steps} asked")
    return {"detail": f"backend {results['backend']}, {results['world_size']} process, {done} steps, "
                      f"validation, checkpoint, finish(): test SRCC {results['test']['srcc']:.2f} (random labels)"}


def check_parts(sizes: CheckSizes, shards: Path, work: Path, workers: int, gpu: bool) -> list[Part]:
    """Eager training rows, the loader, evaluation, the launches, then the compiled rows: compiling is
    the slowest and least certain part, so it goes last and cannot crowd out the rest."""
    folders = (work / f"part-{i:02d}" for i in count())  # numbered in the order they run
    rows = [(m, b, c) for m in sizes.models for c in sizes.compilers for b in sizes.batch_sizes]
    parts = [train_part(sizes, *row, next(folders)) for row in rows if row[2] == "none"]
    parts.append(loader_part(sizes, shards, workers, next(folders)))
    parts.append(eval_part(sizes, shards, workers, next(folders), gpu))
    parts += [launch_part(sizes, name, shards, next(folders), gpu) for name in LAUNCHES]
    return parts + [train_part(sizes, *row, next(folders)) for row in rows if row[2] != "none"]


def run_logged(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> None:
    """Runs ``cmd`` with its output in ``log``, in a process group of its own, so that a
    time-out also ends what it started (a launcher's ranks, compile workers)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
            except ProcessLookupError:
                pass
            proc.wait()
    if code:
        raise RuntimeError(f"exit {code}: {why_failed(log.read_text(errors='replace'))}")


def run_part(part: Part, timeout: float, logs: Path, env: dict[str, str]) -> dict:
    """The part's row: its figures, or why it failed, in one line."""
    row = {"part": part.part, "model": part.model, "setting": part.setting}
    if timeout < 5:
        return row | {"status": "skipped: the check's time was spent"}
    part.folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^a-z0-9]+", "-", f"{part.part} {part.model} {part.setting}".lower()).strip("-")
    log = logs / f"{part.folder.name}-{name}.log"
    start = time.monotonic()
    try:
        run_logged(part.cmd, timeout, log, env)
        row |= part.read(part.folder) | {"status": "ok"}
    except subprocess.TimeoutExpired:
        row["status"] = f"failed: timed out after {timeout:.0f} s"
    except (RuntimeError, OSError, ValueError, KeyError) as err:  # a missing or bad result file too
        row["status"] = f"failed: {err}"
    return row | {"seconds": time.monotonic() - start}


def part_env(gpu: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # DeepSpeed compiles its ops just in time: the suite's cache, so that it happens once
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "iqa_dist" / "torch_extensions"))
    if gpu:
        env.pop("ACCELERATE_USE_CPU", None)
    else:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def starved(rows: list[dict]) -> tuple[list[str], dict[str, bool]]:
    """Whether the loader keeps up with the fastest training row of each model."""
    loader = next((r for r in rows if r["part"] == "loader" and r["status"] == "ok"), None)
    trained = [r for r in rows if r["part"] == "train" and r["status"] == "ok"]
    if loader is None or not trained:
        return ["GPU starved: not known (the loader or every training row failed)"], {}
    lines, verdict = [], {}
    for model in dict.fromkeys(r["model"] for r in trained):
        fastest = max((r for r in trained if r["model"] == model), key=lambda r: r["patches/s"])
        ratio = loader["patches/s"] / fastest["patches/s"]
        verdict[model] = ratio < 1
        lines.append(target(f"loader / {model} training patches/s >= 1 (fastest: {fastest['setting']}; "
                            f"below 1 the GPU is starved)", ratio, ratio >= 1))
    return lines, verdict


def evaluation_target(rows: list[dict]) -> list[str]:
    row = next((r for r in rows if r["part"] == "eval" and r["status"] == "ok"), None)
    if row is None:
        return ["evaluation: not measured (its row says why)"]
    return [target("evaluation: ours / the batch-1 reference images/s >= 10x", row["speedup"], row["speedup"] >= 10)]


def build_set(sizes: CheckSizes, work: Path, workers: int) -> tuple[Path, dict]:
    """The packed set and its row; a failure is the row's, and the parts needing it fail too."""
    start, row = time.monotonic(), {"part": "data", "setting": f"{sizes.images} KonIQ-sized photographs, "
                                                               "packed --resize koniq"}
    shards = work / "shards"
    try:
        shards = koniq_like_set(work, sizes.images, workers)
        row["status"] = "ok"
    except (OSError, ValueError) as err:
        row["status"] = f"failed: {why_failed(str(err))}"
    return shards, row | {"seconds": time.monotonic() - start}


def bench_gpu(args: argparse.Namespace) -> Result:
    gpu = torch.cuda.is_available() and not args.smoke
    sizes, start = (GPU_SIZES if gpu else SMOKE_SIZES), time.monotonic()
    workers = args.workers or (usable_cpus() if gpu else min(2, usable_cpus()))  # the smoke's: tiny too
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shards, data_row = build_set(sizes, Path(tmp), workers if gpu else 0)
        rows = [data_row]
        for part in check_parts(sizes, shards, Path(tmp), workers, gpu):
            left = sizes.budget_s - (time.monotonic() - start)
            rows.append(run_part(part, min(sizes.part_s, left), logs, part_env(gpu)))
    evaluation = evaluation_target(rows)
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in rows]
    lines, verdict = starved(rows)
    lines += evaluation
    figures = {"mode": "gpu" if gpu else "smoke (CPU sizes)", "device": device_name(gpu),
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cpus": usable_cpus(), "loader_workers": workers, "seconds": time.monotonic() - start,
               "gpu_starved": verdict}
    result = Result("gpu", rows, lines, figures)
    write_check(result, args.out)
    return result


def device_name(gpu: bool) -> str:
    return torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()})"


def write_check(result: Result, out: Path) -> None:
    f = result.figures
    head = (f"# GPU check: `python -m iqa_dist.bench gpu`\n\n{f['date']}; {f['device']}; torch {f['torch']} "
            f"(CUDA {f['cuda']}); {f['cpus']} CPUs; mode {f['mode']}; {f['seconds']:.0f} s in all.\n\n"
            "patches/s: training (median step) or loader; peak GiB: the GPU's max_memory_allocated "
            "(on a CPU the process's peak RSS); first step s: includes compiling.\n")
    body = markdown_table(result.rows) + "\n\n" + "\n".join(f"- {line}" for line in result.targets)
    (out / "gpu_check.md").write_text(f"{head}\n{body}\n")
    (out / "gpu_check.json").write_text(json.dumps(vars(result), indent=1, default=str))


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


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", help="also write the results here")
    sub = p.add_subparsers(dest="bench", required=True)

    data = sub.add_parser("data", parents=[common], help="patches/s: our stream vs per-patch decoding")
    _images_args(data, images=64)
    data.add_argument("--batch_size", type=int, default=32)
    data.add_argument("--shuffle_buffer", type=int, default=256, help="our stream's (default 256)")
    data.add_argument("--passes", type=int, default=5, help="epochs of each of our loaders, median taken (default 5)")

    step = sub.add_parser("step", parents=[common], help="HyperIQA training step vs backbone only")
    _model_args(step, size="tiny", batch_size=32, iters=5)
    step.add_argument("--device", default="cpu")

    for name, helptext in (("ddp", "samples/s of 2 CPU ranks vs 1, one thread each"),
                           ("ddp-worker", "internal: one rank of the ddp bench")):
        ddp = sub.add_parser(name, parents=[common], help=helptext)
        _model_args(ddp, size="micro", batch_size=8, iters=10)
        if name == "ddp":
            ddp.add_argument("--repeats", type=int, default=3, help="runs of each, in turn; the median (default 3)")

    ev = sub.add_parser("eval", parents=[common], help="images/s: batched evaluation vs batch-1 reference")
    _images_args(ev, images=32)
    ev.add_argument("--checkpoint", help="a trained run (default: an untrained --model_size model)")
    ev.add_argument("--model_size", default="micro")
    ev.add_argument("--batch_size", type=int, default=32)
    ev.add_argument("--device", default=default_device())

    gpu = sub.add_parser("gpu", parents=[common], help="the one-command GPU check (on a CPU: a smoke run)")
    gpu.add_argument("--out", type=Path, default=Path("gpu_check"),
                     help="folder for gpu_check.md, gpu_check.json and each part's log (default gpu_check)")
    gpu.add_argument("--workers", type=int, default=0, help="loader workers (default: the CPUs we may use)")
    gpu.add_argument("--smoke", action="store_true", help="the CPU's tiny sizes, even on a GPU")

    train = sub.add_parser("gpu-train", parents=[common], help="internal: a training row of the GPU check")
    _model_args(train, size="tiny", batch_size=32, iters=10)
    train.add_argument("--compile", default="none", help="none | inductor | aot_eager")
    train.add_argument("--mixed_precision", default="auto", help="auto | no | bf16 | fp16")

    loader = sub.add_parser("gpu-loader", parents=[common], help="internal: the loader row of the GPU check")
    loader.add_argument("--shards", type=Path, required=True)
    loader.add_argument("--workers", type=int, default=usable_cpus())
    loader.add_argument("--batch_size", type=int, default=96)
    loader.add_argument("--patch_num", type=int, default=20, help="patches per image (default 20)")
    loader.add_argument("--batches", type=int, default=4, help="timed batches per worker (default 4)")

    sweep = sub.add_parser("sweep", parents=[common], help="ASHA vs grid on the demo set")
    sweep.add_argument("--base", type=Path, default=REPO / "configs" / "demo.yaml", help="train config")
    sweep.add_argument("--shards", type=Path, default=Path("shards/demo"))
    sweep.add_argument("--epochs", type=int, default=8)
    sweep.add_argument("--max_steps_per_epoch", type=int, default=0, help="0: full epochs")
    sweep.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3])
    sweep.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5], help="ranking_loss_alpha grid")
    sweep.add_argument("--grace_period", type=int, default=1)
    sweep.add_argument("--reduction_factor", type=int, default=2)
    sweep.add_argument("--max_concurrent", type=int, default=2)
    sweep.add_argument("--storage_path", type=Path, help="keep the sweeps here (default: a temporary folder)")
    return p.parse_args(argv)


def _images_args(p: argparse.ArgumentParser, images: int) -> None:
    p.add_argument("--shards", type=Path, help="a packed set (default: build KonIQ-sized JPEGs)")
    p.add_argument("--images", type=int, default=images, help=f"images to use (default {images})")
    p.add_argument("--patch_num", type=int, default=20, help="patches per image (default 20)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (default 2)")


def _model_args(p: argparse.ArgumentParser, size: str, batch_size: int, iters: int) -> None:
    p.add_argument("--model_size", default=size, help=f"(default {size})")
    p.add_argument("--batch_size", type=int, default=batch_size, help=f"(default {batch_size})")
    p.add_argument("--iters", type=int, default=iters, help=f"timed steps (default {iters})")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")


BENCHES: dict[str, Callable[[argparse.Namespace], Result]] = {
    "data": bench_data, "step": bench_step, "ddp": bench_ddp, "ddp-worker": ddp_worker,
    "eval": bench_eval, "sweep": bench_sweep, "gpu": bench_gpu, "gpu-train": gpu_train_worker,
    "gpu-loader": gpu_loader_worker}


def show(result: Result) -> None:
    print(f"## bench {result.bench}")
    print(markdown_table(result.rows))
    for line in result.targets:
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = BENCHES[args.bench](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.bench == "ddp-worker":
        return 0
    show(result)
    if args.json:
        Path(args.json).write_text(json.dumps(vars(result), indent=1, default=str))
    failed = [r for r in result.rows if str(r.get("status", "")).startswith("failed")]
    return 1 if failed else 0  # the GPU check: every part's row is written first


if __name__ == "__main__":
    sys.exit(main())
