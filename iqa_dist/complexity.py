"""Model complexity: parameters, FLOPs, latency, throughput, and the cost of scoring an image.

    python -m iqa_dist.complexity --model_size tiny                 # seconds: params, FLOPs, latency
    python -m iqa_dist.complexity --full --out complexity.md         # + throughput at batch 1, 8, 32
    python -m iqa_dist.complexity --model_size micro --batch_sizes 1 4 --iters 3 --warmup 1

By default the report is quick: parameters, FLOPs and the batch-1 latency over a few runs.
``--full`` (or ``--batch_sizes``) adds throughput at each batch size, with more runs.

FLOPs are counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which
counts a multiply-add as 2 FLOPs (FLOPs = 2 x MACs; papers that say "FLOPs" often mean
MACs): the report gives both. It counts matrix products and convolutions (attention's
included), not element-wise work. Timings are fp32 inference on one 224 patch per image
of the batch; an image costs ``test_patch_num`` patches.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tqdm import tqdm

from .models import MODEL_SIZES, create_model
from .models.hyperiqa import PATCH
from .tools import default_device, markdown_table, time_calls, time_stats_ms

FUSIONS = ("concat", "attention", "single")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total, backbone and head (everything else: LDA taps, fusion, hyper network)."""
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters()) if hasattr(model, "backbone") else 0
    return {"total": total, "backbone": backbone, "head": total - backbone}


@torch.no_grad()
def count_flops(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per submodule name) of one forward pass, as PyTorch counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(*inputs)
    per_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def model_flops(model: nn.Module, device: torch.device) -> dict[str, int]:
    """FLOPs of one 224 patch: total, backbone, head."""
    total, per_module = count_flops(model, torch.randn(1, 3, PATCH, PATCH, device=device))
    backbone = per_module.get(f"{type(model).__name__}.backbone", 0)
    return {"total": total, "backbone": backbone, "head": total - backbone}


@torch.inference_mode()
def measure_speed(model: nn.Module, device: torch.device, batch_sizes: list[int], iters: int,
                  warmup: int, progress: tqdm | None = None) -> dict:
    """Batch-1 latency statistics and patches/s at each batch size."""
    one = torch.randn(1, 3, PATCH, PATCH, device=device)
    latency = time_stats_ms(time_calls(lambda: model(one), iters, warmup, device))
    throughput = {}
    for bs in batch_sizes:
        if progress is not None:
            progress.set_postfix_str(f"batch {bs}")
        x = torch.randn(bs, 3, PATCH, PATCH, device=device)
        seconds = time_calls(lambda: model(x), iters, warmup, device)
        throughput[bs] = bs / float(seconds.mean())
    return {"latency": latency, "throughput": throughput}


def build(size: str, fusion: str) -> tuple[nn.Module, str]:
    """The model and the fusion it really has (ResNet-50 is the original: stage 4 only)."""
    if size == "resnet50":
        fusion = "single"
    model = create_model(size, multiscale=fusion != "single", attention_fusion=fusion == "attention",
                         drop_path_rate=0.0)
    return model.eval(), fusion


def profile(size: str, fusion: str, device: torch.device, batch_sizes: list[int], iters: int,
            warmup: int, patch_num: int, progress: tqdm | None = None) -> dict:
    model, fusion = build(size, fusion)
    model.to(device)
    params, flops = count_parameters(model), model_flops(model, device)
    speed = measure_speed(model, device, batch_sizes, iters, warmup, progress)
    # with no throughput sweep, an image costs its patches at the batch-1 latency
    best = max(speed["throughput"].values(), default=1000 / speed["latency"]["mean_ms"])
    del model
    return {"model": size, "fusion": fusion, "params": params, "flops": flops, **speed,
            "image": {"patches": patch_num, "gflops": flops["total"] * patch_num / 1e9,
                      "ms_batched": patch_num / best * 1000,
                      "ms_batch1": speed["latency"]["mean_ms"] * patch_num}}


# ---------------------------------------------------------------- report


def _summary_row(r: dict) -> dict:
    p, f, lat = r["params"], r["flops"], r["latency"]
    return {"model": r["model"], "fusion": r["fusion"], "params M": p["total"] / 1e6,
            "backbone M": p["backbone"] / 1e6, "head M": p["head"] / 1e6,
            "GFLOPs/patch": f["total"] / 1e9, "GMACs/patch": f["total"] / 2e9,
            "head GMACs": f["head"] / 2e9, "latency ms (bs 1)": lat["mean_ms"],
            **{f"patches/s bs {bs}": v for bs, v in r["throughput"].items()}}


def _latency_row(r: dict) -> dict:
    return {"model": r["model"], **{k.replace("_ms", ""): v for k, v in r["latency"].items()}}


def _image_row(r: dict) -> dict:
    i = r["image"]
    return {"model": r["model"], "patches/image": i["patches"], "GFLOPs/image": i["gflops"],
            "GMACs/image": i["gflops"] / 2, "ms/image (batched)": i["ms_batched"],
            "ms/image (batch 1 per patch)": i["ms_batch1"], "images/s": 1000 / i["ms_batched"]}


def environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{device.type}: {name}{threads}; torch {torch.__version__}, fp32, inference mode"


def report(results: list[dict], device: torch.device, iters: int, warmup: int) -> str:
    return "\n".join([
        "# HyperIQA complexity", "",
        f"Measured on {environment(device)}; {warmup} warm-up and {iters} timed runs each.", "",
        "FLOPs are PyTorch's count (`torch.utils.flop_counter.FlopCounterMode`): one multiply-add "
        "is **2 FLOPs**, so FLOPs = 2 x MACs; GMACs are given too. Only matrix products and "
        "convolutions (attention's included) are counted. Head = LDA taps + fusion + hyper network "
        "+ target network. Throughput counts 224x224 network inputs (patches) per second.", "",
        "## Per 224x224 patch", "", markdown_table([_summary_row(r) for r in results]), "",
        "## Latency at batch 1 (ms)", "", markdown_table([_latency_row(r) for r in results]), "",
        "## Cost per image", "",
        "An image's score is the mean over its test patches; batched = patches at the best "
        "measured throughput (batch 1 without `--full` or `--batch_sizes`).", "", markdown_table([_image_row(r) for r in results]), ""])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model_size", nargs="+", default=["tiny", "small", "base", "resnet50"],
                   choices=MODEL_SIZES)
    p.add_argument("--fusion", default="concat", choices=FUSIONS,
                   help="hyper-network input of the Swin models (ResNet-50 is always single)")
    p.add_argument("--full", action="store_true",
                   help="throughput at batch 1, 8 and 32 over 20 runs (default: batch-1 latency, 3 runs)")
    p.add_argument("--batch_sizes", nargs="+", type=int, help="throughput at these batch sizes")
    p.add_argument("--test_patch_num", type=int, default=20, help="patches per image (default 20)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--iters", type=int, help="timed runs per measurement (default 3, --full 20)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 1, --full 5)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, help="write the Markdown report here")
    args = p.parse_args(argv)
    full = dict(batch_sizes=[1, 8, 32], iters=20, warmup=5) if args.full else dict(batch_sizes=[], iters=3, warmup=1)
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters < 1 or args.warmup < 0 or min(args.batch_sizes, default=1) < 1 or args.test_patch_num < 1:
        p.error("--iters, --batch_sizes and --test_patch_num must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no GPU is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tqdm(args.model_size, desc="profiling", unit="model", file=sys.stderr) as progress:
        for size in progress:
            progress.set_postfix_str(size)
            results.append(profile(size, args.fusion, device, args.batch_sizes, args.iters, args.warmup,
                                   args.test_patch_num, progress))
    text = report(results, device, args.iters, args.warmup)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"report written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
