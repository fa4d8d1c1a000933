"""One optimiser step of the real training loop on one fixed global batch; rank 0 writes
the gradients the optimiser received.

    python tests/real_step.py SHARDS RUN_DIR OUT.safetensors GLOBAL_BATCH GRAD_ACCUM ALPHA
    accelerate launch --config_file launch/cpu_2proc.yaml tests/real_step.py ... GLOBAL_BATCH 1 ALPHA

Only the loader's batches are replaced: each rank and each accumulation micro step takes
its own slice of the fixed global batch (as ``tests/ddp_step.py`` does for its toy
loop); the rest is ``train()``: ``Trainer.run_steps``, ``train_step``, Accelerate's
accumulation and DDP, the loss as configured. AdamW's first step moves each weight by
about ``lr x sign(gradient)``, which turns the float rounding of a near-zero gradient
into a whole step: the gradients are compared, not the weights.
"""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
from accelerate import PartialState

from iqa_dist import optim, train as train_module
from iqa_dist.checkpoint import save_weights
from iqa_dist.config import from_dict


def fixed_batches(cfg, global_batch: int):
    """``batches`` for the loop: this rank's slice of micro step k, for k in the epoch."""
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (global_batch, cfg.patch_size, cfg.patch_size, 3), dtype=torch.uint8,
                           generator=data)
    labels = torch.randperm(global_batch, generator=data).float()  # all different: every pair ranked

    def batches(loader):
        world, rank = PartialState().num_processes, PartialState().process_index
        micro = global_batch // (world * cfg.grad_accum)
        for k in range(cfg.grad_accum):
            start = (k * world + rank) * micro
            yield images[start:start + micro], labels[start:start + micro], [], []

    return batches


class FirstGradients(torch.optim.AdamW):
    """AdamW that keeps the gradients of its first step (after DDP's all-reduce and accumulation)."""

    seen: list[torch.Tensor] = []

    def step(self, closure=None):
        if not FirstGradients.seen:
            FirstGradients.seen = [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                   for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def first_gradients(shards: str, run_dir: str, global_batch: int, accum: int, alpha: float,
                    margin: float = 0.1) -> dict[str, torch.Tensor]:
    """Train one optimiser step (one epoch of ``accum`` micro steps); the gradients it took."""
    cfg = from_dict({"model_size": "micro", "dataset": shards, "run_dir": run_dir, "dropout_rate": 0.0,
                     "drop_path_rate": 0.0, "global_batch_size": global_batch, "grad_accum": accum,
                     "ranking_loss_alpha": alpha, "ranking_loss_margin": margin, "grad_clip": 0.0,
                     "epochs": 1, "max_steps_per_epoch": accum, "train_patch_num": 8, "test_patch_num": 1,
                     "workers": 0, "threads": 1, "plots": False, "spaq": False, "log_every": 1})
    FirstGradients.seen = []
    with mock.patch.dict(optim.OPTIMIZERS, adamw=FirstGradients), \
            mock.patch.object(train_module, "batches", fixed_batches(cfg, global_batch)):
        train_module.train(cfg)
    return {str(i): g for i, g in enumerate(FirstGradients.seen)}


if __name__ == "__main__":
    shards, run_dir, out = sys.argv[1:4]
    grads = first_gradients(shards, run_dir, int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    if PartialState().is_main_process:
        save_weights(grads, Path(out))
