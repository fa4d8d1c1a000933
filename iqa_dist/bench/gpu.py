"""``bench gpu``: the one-command check for a GPU node, each part a time-boxed process."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from itertools import count
from pathlib import Path
from typing import Callable

import torch

from ..tools import markdown_table
from .common import REPO, Result, free_port, target, usable_cpus, why_failed
from .sets import koniq_like_set


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
           "--num_processes", "1", "--main_process_port", str(free_port()),
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
