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

from .config import Config, ConfigError, for_world
from .data import remote
from .data.manifest import MANIFEST
from .liveness import nccl_error_handling
from .optim import build_optimizer


def make_accelerator(cfg: Config) -> Accelerator:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if deepspeed and cfg.compile != "none":
        # torch.compile of the DeepSpeed engine traces through its hooks (ZeRO's parameter
        # gathering among them) and breaks its graph; DeepSpeed compiles through the engine.
        raise ConfigError(f"compile: {cfg.compile} is not supported with DeepSpeed; use compile: none")
    no_gpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    fast_kernels(cfg.deterministic)  # every entry point makes an accelerator: train, evaluate, bench
    if several and not no_gpu:
        nccl_error_handling()  # before the process group exists: a lost rank must end with our message
    accelerator = Accelerator(cpu=no_gpu and not deepspeed, mixed_precision=precision(cfg, gpu=not no_gpu),
                              gradient_accumulation_steps=cfg.grad_accum,
                              kwargs_handlers=process_kwargs(cfg, gpu=not no_gpu) if several else [])
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # we prepare no data loader, so DeepSpeed's "auto" values need us
        ds, scaled = plugin.deepspeed_config, for_world(cfg, accelerator.num_processes)
        ds["train_micro_batch_size_per_gpu"] = scaled.batch_size
        ds["train_batch_size"] = scaled.global_batch_size
        if ds.get("gradient_clipping", "auto") == "auto":
            ds["gradient_clipping"] = cfg.grad_clip
    return accelerator


def process_kwargs(cfg: Config, gpu: bool) -> list:
    """The process group's and DDP's settings for several ranks."""
    # On CPU, an explicit gloo backend: without it Accelerate leaves the process group
    # unset and DeepSpeed believes it is alone. cpu=True would switch DeepSpeed off.
    # The timeout bounds how long a collective waits for a rank that is gone (torch's
    # default is 30 minutes); liveness.py names the rank, before it (at LOST_SHARE of it).
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    # Gradients as views of DDP's buckets: one copy of the gradients less, in memory and
    # in time, every step. Whether buffers are broadcast is the model's business (placed).
    return [InitProcessGroupKwargs(backend=None if gpu else "gloo", timeout=timeout),
            DistributedDataParallelKwargs(gradient_as_bucket_view=True)]


def fast_kernels(deterministic: bool) -> None:
    """TF32 matmuls and convolutions (Ampere and later; no effect on a CPU), and cuDNN's
    per-shape algorithm search unless determinism is asked (it may pick differently from
    run to run). Set by every entry point that runs a model, not only training."""
    # The CUDA switches, not set_float32_matmul_precision("high"): that one also turns on
    # TF32 for oneDNN's CPU matmuls, and CPU runs stay exact.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = not deterministic


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
    # Natively only: torch also says yes for older GPUs, where bf16 is emulated and slower than fp32
    return "bf16" if gpu and torch.cuda.is_bf16_supported(including_emulation=False) else "no"


def shards_path(cfg: Config, dataset: str | None = None) -> Path:
    """The local folder of a packed set: a path, a name under ``shards_root``, or a URL's
    copy staged into ``cache_dir`` (data/remote.py)."""
    name = dataset or cfg.dataset
    if remote.is_remote(name):
        return remote.stage(name, cfg.cache_dir)
    path = Path(name)
    return path if (path / MANIFEST).exists() else Path(cfg.shards_root) / name


def set_determinism(cfg: Config) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)  # same initial weights on every rank
    if cfg.deterministic:
        deterministic_kernels()


def deterministic_kernels() -> None:
    """What a resumed (or repeated) run needs to be bit-identical on a GPU, where by default
    cuBLAS, cuDNN and atomic-add kernels may sum in a different order on every call.
    Strict: an op with no deterministic implementation raises, naming itself, rather than
    warning while the claim silently fails. The costs: cuDNN's autotuning is off
    (fast_kernels) and its deterministic algorithms can be slower; cuBLAS keeps a fixed
    workspace per stream (``:4096:8``, about 32 MiB); scatter and index backward passes run
    a sorting implementation."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def placed(model: nn.Module, cfg: Config, accelerator: Accelerator) -> tuple[nn.Module, torch.optim.Optimizer, bool]:
    """The model on its device and its optimiser, as training runs them (also the bench's):
    channels-last memory for CNN backbones on a GPU (they run faster NHWC; Swin's features
    already are), and a fused optimiser there (the parameters must be on the GPU first;
    DeepSpeed brings its own step). The flag says whether inputs go channels-last."""
    device = accelerator.device
    channels_last = device.type == "cuda" and not model.backbone.spec.nhwc
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    fused = device.type == "cuda" and accelerator.state.deepspeed_plugin is None
    if accelerator.ddp_handler is not None:
        # DDP broadcasts rank 0's buffers before every forward: a collective per step that
        # Swin's buffers (relative position indices, attention masks: constants, the same
        # on every rank) do not need. BatchNorm's running statistics change, so the CNN
        # backbones keep it.
        accelerator.ddp_handler.broadcast_buffers = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                        for m in model.modules())
    return model, build_optimizer(model, cfg, fused=fused), channels_last


def compiled(model: nn.Module, cfg: Config) -> nn.Module:
    """What the training step calls: the model, or its ``torch.compile`` with ``cfg.compile``."""
    return model if cfg.compile == "none" else torch.compile(model, backend=cfg.compile)
