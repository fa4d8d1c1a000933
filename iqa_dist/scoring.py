"""Scoring a packed split with a model on every rank: grid crops, batched forwards,
per-image means, gathered so that every rank holds every image's score once; and the
metrics of those scores. Used by training (validation, test), evaluate and bench."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .config import Config, ConfigError
from .data.stream import ShardError, Split, batches, eval_loader, to_model_input
from .metrics import aggregate_by_key, compute_metrics
from .images import check_resize


def card_of(shards: str | Path) -> dict:
    """A packed set's card: label name, scale and direction. A set without a readable one is
    refused: taken as higher-is-better, a DMOS set's correlations would silently flip sign."""
    path = Path(shards) / "card.json"
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: missing, so the label direction (MOS or DMOS) is unknown; "
                         "pack the set again") from None
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: unreadable card ({err}); pack the set again") from None
    if not isinstance(card, dict) or not isinstance(card.get("higher_is_better"), bool):
        raise ShardError(f"{path}: does not say the label direction (higher_is_better); pack the set again")
    return card


def training_resize(card: dict, where: str = "the checkpoint's label card (metrics.json)") -> str:
    """The ``--resize`` the training set was packed with (its card's), which predict and
    evaluate apply to every image so that a model sees the geometry it was trained on."""
    try:
        return check_resize(card.get("options", {}).get("resize", "none"))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}; pack the training set again") from None


def same_direction(trained_on: dict, tested_on: dict) -> bool:
    """Whether a model's scores and a set's labels grow in the same direction (MOS vs DMOS)."""
    return trained_on.get("higher_is_better", True) == tested_on.get("higher_is_better", True)


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, "max").item()) if accelerator.num_processes > 1 else flag


def predict_split(model: torch.nn.Module, split: Split, cfg: Config, accelerator: Accelerator,
                  batch_size: int | None = None, resize: str = "none") -> dict[str, tuple[float, float]]:
    """{image key: (mean prediction over its crops, label)}, identical on every rank."""
    local = local_predictions(model, split, cfg, accelerator, batch_size, resize)
    return {k: (p, label) for k, p, label in gather_all(accelerator, local)}


def gather_all(accelerator: Accelerator, items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    return gather_object(items) if accelerator.num_processes > 1 else items


@torch.no_grad()
def local_predictions(model: torch.nn.Module, split: Split, cfg: Config, accelerator: Accelerator,
                      batch_size: int | None = None, resize: str = "none") -> list[tuple[str, float, float]]:
    """(key, mean prediction over its crops, label) of the images this rank read, each
    resized first by pack's policy ``resize`` (see ``training_resize``).

    Every rank must call it: ranks step in lockstep (a dummy batch when a rank has run
    out) because a wrapped model's forward may hold collectives (DDP buffer sync, ZeRO-3
    gathers).
    """
    was_training = model.training
    model.eval()
    loader = eval_loader(split, patch_num=cfg.test_patch_num, patch_size=cfg.patch_size,
                         batch_size=batch_size or cfg.batch_size, rank=accelerator.process_index,
                         world=accelerator.num_processes, workers=cfg.workers,
                         random_crop=cfg.test_random_crop, seed=cfg.seed, resize=resize,
                         pin_memory=accelerator.device.type == "cuda")
    keys, outs, labels = [], [], []
    loaded, dummy = iter(batches(loader)), None
    dtype = next(model.parameters()).dtype
    while True:
        batch = next(loaded, None)
        if not _any_rank(accelerator, batch is not None):
            break
        images = batch[0] if batch is not None else dummy
        dummy = images[:1] if batch is not None else dummy
        if images is None:  # this rank has no image at all: borrow a blank one
            images = torch.zeros(1, cfg.patch_size, cfg.patch_size, 3, dtype=torch.uint8)
        with accelerator.autocast():
            out = model(to_model_input(images, accelerator.device, dtype)).float()
        if batch is not None:  # predictions stay on the device: one copy to the host below, not a wait per batch
            keys += batch[2]
            outs.append(out)
            labels.append(batch[1])
    model.train(was_training)
    if not keys:
        return []
    preds = torch.cat(outs).cpu().tolist()
    per_image = aggregate_by_key(keys, preds, torch.cat(labels).tolist())
    return list(zip(per_image.keys.tolist(), per_image.preds.tolist(), per_image.labels.tolist()))


def split_metrics(preds: dict[str, tuple[float, float]], same_direction: bool = True) -> dict[str, float]:
    """Metrics of per-image predictions; ``same_direction=False`` flips the labels (DMOS)."""
    keys = sorted(preds)
    p = np.array([preds[k][0] for k in keys])
    y = np.array([preds[k][1] for k in keys])
    return compute_metrics(p, y, higher_is_better=same_direction)
