"""The command line of the benches: ``python -m iqa_dist.bench NAME ...``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from ..tools import default_device, markdown_table
from . import __doc__ as USAGE
from .common import REPO, Result, usable_cpus
from .data import bench_data
from .ddp import bench_ddp, ddp_worker
from .eval import bench_eval
from .gpu import bench_gpu
from .gpu_workers import gpu_e2e_worker, gpu_loader_worker, gpu_train_worker
from .step import bench_step
from .sweep import bench_sweep


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m iqa_dist.bench", description=USAGE, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    _images_args(ev, images=0)  # 0: EVAL_IMAGES
    ev.add_argument("--checkpoint", help="a trained run (default: an untrained --model_size model)")
    ev.add_argument("--model_size", default="micro")
    ev.add_argument("--batch_size", type=int, default=32)
    ev.add_argument("--device", default=default_device())

    gpu = sub.add_parser("gpu", parents=[common], help="the one-command GPU check (on a CPU: a smoke run)")
    gpu.add_argument("--out", type=Path, default=Path("gpu_check"),
                     help="folder for gpu_check.md, gpu_check.json, each part's folder and log (default gpu_check)")
    gpu.add_argument("--workers", type=int, default=0, help="loader workers (default: the CPUs we may use)")
    gpu.add_argument("--smoke", action="store_true", help="the CPU's tiny sizes, even on a GPU")
    gpu.add_argument("--budget_s", type=float, help="seconds for the whole check; a part whose estimate exceeds "
                     "what is left is skipped (default: 420 on a GPU, 7 minutes by our estimate; 900 smoke)")

    train = sub.add_parser("gpu-train", parents=[common], help="internal: the training rows of the GPU check")
    _model_args(train, size="tiny", batch_size=32, iters=10)
    train.add_argument("--batch_sizes", type=int, nargs="+", required=True)
    train.add_argument("--shipped", type=int, default=0, help="the batch the configs train with on a GPU of 8")
    train.add_argument("--compile", default="none", help="none | inductor | aot_eager")
    train.add_argument("--mixed_precision", default="auto", help="auto | no | bf16 | fp16")
    train.add_argument("--window_s", type=float, default=2.0, help="timed seconds at least (default 2)")

    for name, helptext in (("gpu-loader", "internal: the loader row of the GPU check"),
                           ("gpu-e2e", "internal: the end-to-end row of the GPU check")):
        loader = sub.add_parser(name, parents=[common], help=helptext)
        loader.add_argument("--shards", type=Path, required=True)
        loader.add_argument("--workers", type=int, default=usable_cpus())
        loader.add_argument("--batch_size", type=int, default=96)
        loader.add_argument("--patch_num", type=int, default=20, help="patches per image (default 20)")
        loader.add_argument("--window_s", type=float, default=2.0, help="timed seconds at least (default 2)")
        if name == "gpu-e2e":
            loader.add_argument("--model_size", default="tiny")
            loader.add_argument("--mixed_precision", default="auto", help="auto | no | bf16 | fp16")
            loader.add_argument("--iters", type=int, default=10, help="timed steps at least (default 10)")
            loader.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")

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
    p.add_argument("--images", type=int, default=images,
                   help=f"images to use (default {images or '256 on a GPU, 32 on a CPU'})")
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
    "gpu-loader": gpu_loader_worker, "gpu-e2e": gpu_e2e_worker}


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
