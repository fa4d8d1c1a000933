"""The process a run lives in: its Accelerator (devices, process group, precision,
DeepSpeed), seeds and backend settings, and the model placed as training runs it.
Shared by training, evaluation and the benches."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed
from torch import nn

from .config import Config, for_world
from .optim import build_optimizer


def make_accelerator(cfg: Config) -> Accelerator:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    no_gpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # On CPU, an explicit gloo backend: without it Accelerate leaves the process group
    # unset and DeepSpeed believes it is alone. cpu=True would switch DeepSpeed off.
    # The timeout bounds how long a collective waits for a rank that is gone (torch's
    # default is 30 minutes); liveness.py then names the rank.
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    # Gradients as views of DDP's buckets: one copy of the gradients less, in memory and
    # in time, every step.
    handlers = ([InitProcessGroupKwargs(backend="gloo" if no_gpu else None, timeout=timeout),
                 DistributedDataParallelKwargs(gradient_as_bucket_view=True)] if several else [])
    accelerator = Accelerator(cpu=no_gpu and not deepspeed, mixed_precision=precision(cfg, gpu=not no_gpu),
                              gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # we prepare no data loader, so DeepSpeed's "auto" values need us
        ds, scaled = plugin.deepspeed_config, for_world(cfg, accelerator.num_processes)
        ds["train_micro_batch_size_per_gpu"] = scaled.batch_size
        ds["train_batch_size"] = scaled.global_batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.grad_clip
    return accelerator


def precision(cfg: Config, gpu: bool) -> str:
    """``auto``: the half precision ``accelerate launch`` was given, else bf16 autocast on
    GPUs that have it (Ampere and later), else fp32. The launcher exports "no" whenever
    its config names no precision, so its "no" does not count: ask fp32 with
    ``mixed_precision: no``."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher != "no":
        return launcher
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "no"


def shards_path(cfg: Config, dataset: str | None = None) -> Path:
    name = dataset or cfg.dataset
    path = Path(name)
    return path if (path / "manifest.parquet").exists() else Path(cfg.shards_root) / name


def set_determinism(cfg: Config) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)  # same initial weights on every rank
    # TF32 matmuls, and convolution algorithms tuned per shape unless determinism is asked
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not cfg.deterministic
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def placed(model: nn.Module, cfg: Config, accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The model on its device and its optimiser, as training runs them (also the bench's):
    channels-last memory for CNN backbones on a GPU (they run faster NHWC; Swin's features
    already are), and a fused optimiser there (the parameters must be on the GPU first;
    DeepSpeed brings its own step). The flag says whether inputs go channels-last."""
    device = accelerator.device
    channels_last = device.type == "cuda" and not model.backbone.spec.nhwc
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    fused = device.type == "cuda" and accelerator.state.deepspeed_plugin is None
    return model, build_optimizer(model, cfg, fused=fused), channels_last


def compiled(model: nn.Module, cfg: Config) -> nn.Module:
    """What the training step calls: the model, or its ``torch.compile`` with ``cfg.compile``."""
    return model if cfg.compile == "none" else torch.compile(model, backend=cfg.compile)
