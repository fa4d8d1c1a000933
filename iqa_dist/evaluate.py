"""Evaluate a model on packed sets: every image once across ranks, one score per image."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .config import Config
from .data.stream import Split, eval_loader
from .metrics import compute_metrics


def card_of(shards: str | Path) -> dict:
    path = Path(shards) / "card.json"
    return json.loads(path.read_text()) if path.exists() else {"higher_is_better": True}


def same_direction(trained_on: dict, tested_on: dict) -> bool:
    """Whether a model's scores and a set's labels grow in the same direction (MOS vs DMOS)."""
    return trained_on.get("higher_is_better", True) == tested_on.get("higher_is_better", True)


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item()) if accelerator.num_processes > 1 else flag


@torch.no_grad()
def predict_split(model: torch.nn.Module, split: Split, cfg: Config, accelerator: Accelerator,
                  batch_size: int | None = None) -> dict[str, tuple[float, float]]:
    """{image key: (mean prediction over its crops, label)}, identical on every rank.

    Ranks step in lockstep (a dummy batch when a rank has run out) because a wrapped
    model's forward may hold collectives (DDP buffer sync, ZeRO-3 gathers).
    """
    was_training = model.training
    model.eval()
    loader = eval_loader(split, patch_num=cfg.test_patch_num, patch_size=cfg.patch_size,
                         batch_size=batch_size or cfg.batch_size, rank=accelerator.process_index,
                         world=accelerator.num_processes, workers=cfg.workers,
                         random_crop=cfg.test_random_crop, seed=cfg.seed)
    sums: dict[str, list[float]] = {}
    batches, dummy = iter(loader), None
    dtype = next(model.parameters()).dtype
    while True:
        batch = next(batches, None)
        if not _any_rank(accelerator, batch is not None):
            break
        images = batch[0] if batch is not None else dummy
        dummy = images[:1] if batch is not None else dummy
        if images is None:  # this rank has no image at all: borrow a blank one
            images = torch.zeros(1, 3, cfg.patch_size, cfg.patch_size)
        with accelerator.autocast():
            preds = model(images.to(accelerator.device, dtype)).float().cpu()
        if batch is not None:
            for key, pred, label in zip(batch[2], preds.tolist(), batch[1].tolist()):
                entry = sums.setdefault(key, [0.0, 0, label])
                entry[0] += pred
                entry[1] += 1
    model.train(was_training)
    local = [(k, s / n, label) for k, (s, n, label) in sums.items()]
    gathered = gather_object(local) if accelerator.num_processes > 1 else local
    return {k: (p, label) for k, p, label in gathered}


def split_metrics(preds: dict[str, tuple[float, float]], same_direction: bool = True) -> dict[str, float]:
    """Metrics of per-image predictions; ``same_direction=False`` flips the labels (DMOS)."""
    keys = sorted(preds)
    p = np.array([preds[k][0] for k in keys])
    y = np.array([preds[k][1] for k in keys])
    return compute_metrics(p, y, higher_is_better=same_direction)
