"""Scoring images from Python, exactly as ``python -m iqa_dist.predict`` scores files.

    from iqa_dist import Scorer
    scorer = Scorer.from_checkpoint("runs/koniq-tiny", device="cuda")
    scorer("photo.jpg")                        # a float
    scorer(["a.jpg", pil_image, hwc_array])    # a float64 tensor of 3 scores
    scorer(batch)                              # [N, 3, H, W] tensor: a tensor of N scores

Every image goes the way predict takes a file (one code path, :class:`CropPlan` and
:func:`mean_scores`): upright by its EXIF orientation (files and PIL images), 8-bit RGB,
resized as the training set was packed (the checkpoint's card), then the mean prediction
over the trained configuration's deterministic crops, crops of consecutive images sharing
batches. Scores are on the training labels' scale; ``lower_better`` says their direction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

from .data.stream import eval_crops, resized, to_model_input
from .images import BadImage, read_rgb, to_rgb8
from .runtime import fast_kernels
from .scoring import training_resize
from .tools import Trained, checked_device, default_device, load_trained

MIN_SIDE = 8  # fewer pixels say nothing about quality, and upsampling them would explode


@dataclass(frozen=True)
class CropPlan:
    """How a decoded image becomes its evaluation crops: pack's ``resize`` policy of the
    training set, then ``patch_num`` crops of ``patch_size`` (a grid, or random ones seeded
    by the image's name when the run scored with ``test_random_crop``)."""

    patch_size: int
    patch_num: int
    random_crop: bool = False
    seed: int = 0
    resize: str = "none"

    @classmethod
    def of(cls, trained: Trained, patch_num: int | None = None) -> "CropPlan":
        """The plan of a trained run (``patch_num``: its ``test_patch_num`` unless given)."""
        cfg = trained.cfg
        return cls(cfg.patch_size, patch_num or cfg.test_patch_num, cfg.test_random_crop, cfg.seed,
                   training_resize(trained.card))

    def crops(self, arr: np.ndarray, key: str) -> tuple[np.ndarray, str]:
        """uint8 crops [n, p, p, 3] of a uint8 HWC RGB image and a note on what was done to it;
        BadImage saying why (without ``key``) when it cannot be scored."""
        h, w = arr.shape[:2]
        if min(h, w) < MIN_SIDE:
            raise BadImage(f"too small to score ({w}x{h})")
        arr = resized(arr, self.resize)
        notes = [f"resized {w}x{h} -> {arr.shape[1]}x{arr.shape[0]} (--resize {self.resize}, as the "
                 "training set)"] if arr.shape[:2] != (h, w) else []
        h, w, p = *arr.shape[:2], self.patch_size
        notes += [f"upsampled: {w}x{h} is smaller than a {p} crop"] if min(h, w) < p else []
        try:
            crops = eval_crops(key, arr, p, self.patch_num, self.random_crop, self.seed)
        except BadImage as err:
            raise BadImage(str(err).removeprefix(f"{key}: ")) from None
        return np.stack(crops), "; ".join(notes)


def fixed_batches(items: Iterable[tuple[int, np.ndarray]], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(crops, owner index of each crop) in batches of ``size``; an image may straddle two."""
    crops, owners, held = [], [], 0
    for owner, image_crops in items:
        crops.append(image_crops)
        owners.append(np.full(len(image_crops), owner))
        held += len(image_crops)
        while held >= size:
            all_crops, all_owners = np.concatenate(crops), np.concatenate(owners)
            yield all_crops[:size], all_owners[:size]
            crops, owners, held = [all_crops[size:]], [all_owners[size:]], held - size
    if held:
        yield np.concatenate(crops), np.concatenate(owners)


@torch.no_grad()
def mean_scores(model: torch.nn.Module, items: Iterable[tuple[int, np.ndarray]], count: int,
                batch_size: int, device: str | torch.device) -> np.ndarray:
    """Each image's mean prediction over its crops (``items``: index, uint8 crops), float64
    [count], NaN for an index never given. The model must be in eval mode."""
    sums, counts = np.zeros(count), np.zeros(count)
    dtype = next(model.parameters()).dtype
    for crops, owners in fixed_batches(items, batch_size):
        preds = model(to_model_input(crops, device, dtype)).float().cpu().numpy()
        np.add.at(sums, owners, preds)
        np.add.at(counts, owners, 1)
    with np.errstate(invalid="ignore"):  # 0/0: an image that was skipped
        return sums / counts


# ---------------------------------------------------------------- inputs

ACCEPTED = ("a path, a PIL image, an HxWx3 NumPy array, a 3xHxW tensor (uint8 0-255 or float 0-1), "
            "a list of them, or an Nx3xHxW tensor / NxHxWx3 array")


def _uint8(values: np.ndarray, where: str) -> np.ndarray:
    """uint8 pixels as they are; float pixels in 0-1 (as ``ToTensor`` gives) to the uint8 a
    decoded file has (x * 255, rounded: exact for any image that came from 8 bits)."""
    if values.dtype == np.uint8:
        return values
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"{where}: {values.dtype} pixels; give uint8 (0-255) or float (0-1)")
    if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
        raise BadImage(f"{where}: float pixels must lie in 0-1 (these span {values.min():g} to "
                       f"{values.max():g}); give 0-255 values as uint8")
    return np.rint(values.astype(np.float64) * 255).astype(np.uint8)


def _hwc(values: np.ndarray, where: str, channels_first: bool) -> np.ndarray:
    shape = "3xHxW" if channels_first else "HxWx3"
    if values.ndim != 3 or values.shape[0 if channels_first else -1] != 3:
        raise BadImage(f"{where}: shape {list(values.shape)}; expected {shape} (RGB)")
    values = _uint8(values, where)
    return np.ascontiguousarray(values.transpose(1, 2, 0) if channels_first else values)


def decoded(x: Any, where: str) -> tuple[np.ndarray, str]:
    """One image as uint8 HWC RGB, and its name for random crops (a file's path, as predict's)."""
    if isinstance(x, (str, os.PathLike)):
        return np.asarray(read_rgb(x)), str(Path(x))
    if isinstance(x, Image.Image):
        try:  # upright and 8-bit RGB, as a file is read (images.open_rgb)
            return np.asarray(to_rgb8(ImageOps.exif_transpose(x))), ""
        except (OSError, ValueError) as err:
            raise BadImage(f"{where}: unreadable PIL image ({err})") from None
    if isinstance(x, np.ndarray):
        return _hwc(x, where, channels_first=False), ""
    if isinstance(x, torch.Tensor):
        pixels = x.detach().cpu()
        # float32 for NumPy, which has no bfloat16 (whose 8 bits cannot hold 256 levels anyway)
        pixels = pixels.float() if pixels.is_floating_point() else pixels
        return _hwc(pixels.numpy(), where, channels_first=True), ""
    raise TypeError(f"{where}: {type(x).__name__} is not an image; expected {ACCEPTED}")


def as_list(x: Any) -> tuple[list, bool]:
    """The images ``x`` holds, and whether it is one image (scored to a float)."""
    if isinstance(x, (list, tuple)):
        return list(x), False
    if isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim == 4:
        return list(x), False
    return [x], True


# ---------------------------------------------------------------- the API


class Scorer:
    """A trained HyperIQA scoring images as ``python -m iqa_dist.predict`` does.

    ``scorer(x)`` takes a path (str or Path), a PIL image, a uint8 or float (0-1) HxWx3
    NumPy array or 3xHxW tensor, or many: a list of those, an Nx3xHxW tensor or an NxHxWx3
    array. One image gives a float; many give a float64 CPU tensor [N] (as pyiqa's metrics
    give a tensor per batch). A bad input raises one error naming it: TypeError for a type
    or dtype it does not take, ``images.BadImage`` (a ValueError) for an unreadable file, a
    wrong shape, float pixels outside 0-1 or an image too small to score.
    """

    def __init__(self, trained: Trained, device: str | torch.device | None = None, batch_size: int = 32,
                 test_patch_num: int | None = None) -> None:
        self.device = checked_device(device or default_device(), "device")
        if batch_size < 1 or (test_patch_num is not None and test_patch_num < 1):
            raise ValueError("batch_size and test_patch_num must be positive")
        self.model = trained.model.to(self.device).eval()
        self.cfg, self.card, self.weights = trained.cfg, trained.card, trained.weights
        self.plan = CropPlan.of(trained, test_patch_num)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device | None = None,
                        batch_size: int = 32, test_patch_num: int | None = None) -> "Scorer":
        """A run directory, its ``checkpoints/best``, or a model.safetensors beside its config.yaml;
        ``device`` defaults to cuda when present; ``batch_size``: crops per forward pass."""
        trained = load_trained(checkpoint)
        fast_kernels(trained.cfg.deterministic)  # as predict: TF32 and cuDNN autotuning on a GPU
        return cls(trained, device, batch_size, test_patch_num)

    @property
    def lower_better(self) -> bool:
        """Whether a lower score means a better image (a DMOS training set), from its card."""
        return not self.card.get("higher_is_better", True)

    def __call__(self, x: Any) -> float | torch.Tensor:
        images, single = as_list(x)
        crops = ((i, self._crops(image, "input" if single else f"input {i}")) for i, image in enumerate(images))
        scores = mean_scores(self.model, crops, len(images), self.batch_size, self.device)
        return float(scores[0]) if single else torch.from_numpy(scores)

    def _crops(self, image: Any, where: str) -> np.ndarray:
        arr, key = decoded(image, where)
        try:
            return self.plan.crops(arr, key)[0]
        except BadImage as err:
            raise BadImage(f"{key or where}: {err}") from None
