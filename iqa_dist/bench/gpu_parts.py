"""The parts of ``bench gpu``: what each runs, how long it should take, and how its rows are read."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import yaml

from .common import REPO, free_port


@dataclass(frozen=True)
class CheckSizes:
    """What ``bench gpu`` runs: the real sizes on a GPU; on a CPU a smoke run of the same
    code (micro Swin, fp32, ``aot_eager``, gloo), so that the suite keeps the check
    working until a GPU is lent."""
    models: tuple[str, ...]
    batch_sizes: tuple[int, ...]  # besides each model's shipped per-GPU batch
    compilers: tuple[str, ...]  # Config.compile values; compiled rows at the largest batch only
    precision: str  # Config.mixed_precision
    warmup: int  # untimed steps after the first (which compiles)
    iters: int  # timed steps at least ...
    window_s: float  # ... and timed seconds at least: shorter windows measure the clock's noise
    images: int  # KonIQ-sized photographs packed for the loader, evaluation and the launches
    launch_model: str
    launch_batch: int
    launch_patches: int  # train_patch_num of the launched runs
    launch_steps: int
    eval_images: int  # of the packed set, scored by ours and by the batch-1 reference
    eval_patches: int  # crops per image
    budget_s: float  # the default --budget_s
    part_s: float  # one part at most (compiling Swin-Base takes minutes)
    estimate_s: dict[str, float]  # seconds each kind of part should take: see ESTIMATES_S


# Seconds each part should take on one H100 with 16 CPUs (our estimate before any GPU ran:
# process start, CUDA and model set-up about 15 s; Swin-T/B steps of a few tens of ms;
# DeepSpeed's import and engine about 20 s; inductor compiling Swin-T forward and backward
# about 1.5 minutes, Swin-B more). They add up to the default budget of 7 minutes (420 s)
# with Swin-B's compiled row left out: that one runs when the others were quicker.
#   data 25  train tiny 35  train base 45  loader 20  end-to-end 30  eval 50
#   launch DDP 35  ZeRO-2 45  ZeRO-3 45  compiled tiny 90  (compiled base 150)
ESTIMATES_S = {"data": 25, "train tiny": 35, "train base": 45, "loader": 20, "end-to-end": 30, "eval": 50,
               "launch DDP": 35, "launch DeepSpeed ZeRO-2": 45, "launch DeepSpeed ZeRO-3": 45,
               "compiled tiny": 90, "compiled base": 150}
# On our loaded 2-core CPU, for the smoke run: what --budget_s weighs the parts with there
SMOKE_ESTIMATES_S = {"data": 5, "train": 15, "loader": 10, "end-to-end": 15, "eval": 15, "launch": 20,
                     "compiled": 30}

GPU_SIZES = CheckSizes(("tiny", "base"), (32, 96), ("none", "inductor"), "bf16", warmup=3, iters=10, window_s=2.0,
                       images=256, launch_model="tiny", launch_batch=32, launch_patches=20, launch_steps=4,
                       eval_images=256, eval_patches=20, budget_s=420, part_s=180, estimate_s=ESTIMATES_S)
SMOKE_SIZES = CheckSizes(("micro",), (2,), ("none", "aot_eager"), "no", warmup=0, iters=1, window_s=0.0, images=8,
                         launch_model="micro", launch_batch=2, launch_patches=2, launch_steps=2, eval_images=4,
                         eval_patches=2, budget_s=900, part_s=300, estimate_s=SMOKE_ESTIMATES_S)
# Launched runs: one process each, so they check that the launch works, not how fast it
# trains. A one-process MULTI_GPU launch still starts torchrun, so the process group is
# really set up (NCCL on a GPU, gloo on a CPU).
LAUNCHES = {"DDP": "multi_gpu.yaml", "DeepSpeed ZeRO-2": "zero2.yaml", "DeepSpeed ZeRO-3": "zero3.yaml"}
COLUMNS = ("part", "model", "setting", "status", "patches/s", "peak alloc GiB", "peak reserved GiB",
           "first step s", "seconds", "detail")
SHIPPED_GPUS = 8  # the configs' global batch is split over a node of 8 GPUs
SMOKE_SHIPPED = 1  # micro has no config: batch 1 stands in for the shipped batch


def estimate(sizes: CheckSizes, *keys: str) -> float:
    """The first of ``keys`` (most to least specific) that the sizes' estimates name."""
    return next(sizes.estimate_s[k] for k in keys if k in sizes.estimate_s)


def shipped_batch(model: str) -> int:
    """The per-GPU batch that ``configs/MODEL.yaml`` trains with on 8 GPUs."""
    config = REPO / "configs" / f"{model}.yaml"
    if not config.is_file():
        return SMOKE_SHIPPED
    return max(1, int(yaml.safe_load(config.read_text())["global_batch_size"]) // SHIPPED_GPUS)


@dataclass
class Part:
    """One time-boxed piece of the check, run as a process group of its own: a hang, a
    crash or an out-of-memory ends that part only, and its peak memory is its own."""
    part: str  # train | loader | end-to-end | eval | launch
    model: str
    setting: str
    cmd: list[str]
    folder: Path  # where it writes; ``read`` turns that into the part's rows
    read: Callable[[Path], list[dict]]
    estimate_s: float
    needs_set: bool = True  # reads the packed set


def _bench_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "iqa_dist.bench", *argv]


def _rows(folder: Path) -> list[dict]:
    return json.loads((folder / "result.json").read_text())["rows"]


def train_part(sizes: CheckSizes, model: str, compiler: str, folder: Path) -> Part:
    """Eager: the shipped batch and the others, in one process; compiled: the largest batch
    alone (each batch size would compile again)."""
    shipped = shipped_batch(model)
    batches = sorted({shipped, *sizes.batch_sizes}) if compiler == "none" else [max(sizes.batch_sizes)]
    cmd = _bench_cmd("gpu-train", "--model_size", model, "--batch_sizes", *map(str, batches), "--shipped",
                     str(shipped), "--compile", compiler, "--mixed_precision", sizes.precision, "--warmup",
                     str(sizes.warmup), "--iters", str(sizes.iters), "--window_s", str(sizes.window_s),
                     "--json", str(folder / "result.json"))
    key = f"train {model}" if compiler == "none" else f"compiled {model}"
    return Part("train", model, f"batch {', '.join(map(str, batches))}, compile {compiler}", cmd, folder, _rows,
                estimate(sizes, key, key.split()[0]), needs_set=False)


def loader_part(sizes: CheckSizes, shards: Path, workers: int, folder: Path) -> Part:
    batch = max(sizes.batch_sizes)
    cmd = _bench_cmd("gpu-loader", "--shards", str(shards), "--workers", str(workers), "--batch_size", str(batch),
                     "--window_s", str(sizes.window_s), "--json", str(folder / "result.json"))
    return Part("loader", "", f"{workers} workers, batch {batch}", cmd, folder, _rows, estimate(sizes, "loader"))


def end_to_end_part(sizes: CheckSizes, shards: Path, workers: int, folder: Path) -> Part:
    """The real loader feeding the real training step: whether the GPU waits for data."""
    model, batch = sizes.models[0], max(sizes.batch_sizes)
    cmd = _bench_cmd("gpu-e2e", "--shards", str(shards), "--workers", str(workers), "--model_size", model,
                     "--batch_size", str(batch), "--mixed_precision", sizes.precision, "--warmup",
                     str(sizes.warmup), "--iters", str(sizes.iters), "--window_s", str(sizes.window_s),
                     "--json", str(folder / "result.json"))
    return Part("end-to-end", model, f"batch {batch}, {workers} loader workers, compile none", cmd, folder, _rows,
                estimate(sizes, "end-to-end"))


def eval_part(sizes: CheckSizes, shards: Path, workers: int, folder: Path, gpu: bool) -> Part:
    """``bench eval`` on the GPU: ours against the original batch-1 loop, and the model alone."""
    batch = max(sizes.batch_sizes)
    cmd = _bench_cmd("eval", "--shards", str(shards), "--images", str(sizes.eval_images), "--patch_num",
                     str(sizes.eval_patches), "--workers", str(workers), "--model_size", sizes.launch_model,
                     "--batch_size", str(batch), "--device", "cuda" if gpu else "cpu",
                     "--json", str(folder / "result.json"))
    return Part("eval", sizes.launch_model, f"{sizes.eval_images} images x {sizes.eval_patches} crops, batch {batch}, "
                f"fp32", cmd, folder, partial(_eval_row, patches=sizes.eval_patches), estimate(sizes, "eval"))


def _eval_row(folder: Path, patches: int) -> list[dict]:
    result = json.loads((folder / "result.json").read_text())
    reference, ours, alone = (r["images/s"] for r in result["rows"])
    f = result["figures"]
    return [{"patches/s": ours * patches, "speedup": f["speedup"],
             "detail": f"images/s: reference {reference:.1f}, ours {ours:.1f}, the model alone {alone:.1f}; "
                       f"ours / reference {f['speedup']:.1f}x, ours / the model alone {f['ours_over_forward']:.2f}; "
                       "after a warm-up forward, synchronized"}]


def launch_part(sizes: CheckSizes, name: str, shards: Path, folder: Path, gpu: bool) -> Part:
    """A launch check, not a speed: a real tiny run of ``iqa_dist.train`` through
    ``accelerate launch`` in one process: a few steps, the epoch's validation and
    checkpoint, and ``finish()`` (the test with the best weights)."""
    config = LAUNCHES[name] if gpu or name != "DDP" else "cpu_2proc.yaml"
    train = ["--dataset", str(shards), "--run_dir", str(folder / "run"), "--model_size", sizes.launch_model,
             "--batch_size", str(sizes.launch_batch), "--train_patch_num", str(sizes.launch_patches),
             "--test_patch_num", "1", "--epochs", "1", "--max_steps_per_epoch", str(sizes.launch_steps),
             "--workers", "1", "--log_every", "1", "--no_plots", "--no_spaq",
             "--no_pretrained"]  # a check of the launch, offline: Swin from random weights, said so
    # the check's precision, said explicitly: without --mixed_precision, accelerate launch
    # tells the run "no" (fp32) whenever the launcher config names none, as zero*.yaml do
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / config),
           "--num_processes", "1", "--main_process_port", str(free_port()),
           "--mixed_precision", sizes.precision, "-m", "iqa_dist.train", *train]
    precision = "fp32" if sizes.precision == "no" else sizes.precision
    return Part("launch", sizes.launch_model, f"{name} launch check ({config}, 1 process, {precision})", cmd, folder,
                lambda f: _launch_row(f / "run", sizes.launch_steps), estimate(sizes, f"launch {name}", "launch"))


def _launch_row(run: Path, steps: int) -> list[dict]:
    results = json.loads((run / "results.json").read_text())  # finish() writes it last
    done = json.loads((run / "checkpoints" / "last" / "trainer.json").read_text())["global_step"]
    if done != steps:
        raise RuntimeError(f"{done} steps trained, {steps} asked")
    return [{"detail": f"backend {results['backend']}, {results['world_size']} process, {done} steps, "
                       f"validation, checkpoint, finish(): test SRCC {results['test']['srcc']:.2f} (random labels); "
                       "it launches, no speed claimed"}]


def check_parts(sizes: CheckSizes, shards: Path, out: Path, workers: int, gpu: bool) -> list[Part]:
    """Eager training rows, the loader, end to end, evaluation, the launches, then the
    compiled rows: compiling is the slowest and least certain part, so it goes last and
    cannot crowd out the rest. Each part's folder is under the output folder, numbered in
    the order the parts run."""
    folders = iter(out / f"part-{i:02d}" for i in range(1, 100))
    parts = [train_part(sizes, m, "none", next(folders)) for m in sizes.models]
    parts.append(loader_part(sizes, shards, workers, next(folders)))
    parts.append(end_to_end_part(sizes, shards, workers, next(folders)))
    parts.append(eval_part(sizes, shards, workers, next(folders), gpu))
    parts += [launch_part(sizes, name, shards, next(folders), gpu) for name in LAUNCHES]
    return parts + [train_part(sizes, m, c, next(folders)) for c in sizes.compilers if c != "none"
                    for m in sizes.models]
