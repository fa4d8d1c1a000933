"""Shards to batches of patches, for training and for evaluation.

Training: each image is decoded once per visit and cut into ``patch_num`` random crops
(with horizontal flips), which a shuffle buffer mixes across images before batching in
the worker. Every rank yields the same number of batches per epoch: each worker's
stream cycles over its shards, and the loop takes exactly ``steps`` batches. The shard
order is a function of (seed, epoch) only, the crops of (seed, epoch, rank, worker):
an epoch can be replayed exactly, which is how a resumed run skips what it has done.

Evaluation: deterministic crops (a grid, or crops seeded by the image key), each
carrying its image key; shards are divided among ranks and workers so that every
image is read exactly once.

The loaders are plain ``torch.utils.data.DataLoader`` objects that are never handed to
``accelerator.prepare`` (it would read on rank 0 only); batches are moved by the caller.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import BadImage, open_rgb
from ..config import ConfigError
from ..pack import read_manifest

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
IMAGE_EXTS = ("png", "jpg", "bmp", "tif", "webp", "gif", "img")


@dataclass(frozen=True)
class Split:
    """The images of one split of a packed set: their shards and keys."""

    root: Path
    name: str
    keys: frozenset[str]
    shards: tuple[Path, ...]  # only shards holding images of this split

    def __len__(self) -> int:
        return len(self.keys)


def load_split(root: str | Path, name: str, round_: int = 0) -> Split:
    """Keys and shards of split ``name`` ("train", "val", "test" or "all") in round ``round_``."""
    root = Path(root)
    rows = read_manifest(root)
    column = f"split_{round_}"
    if name != "all" and rows and column not in rows[0]:
        raise ConfigError(f"{root}/manifest.parquet: no split round {round_} (packed with fewer --rounds)")
    chosen = [r for r in rows if name == "all" or r[column] == name]
    shards = tuple(root / s for s in sorted({r["shard"] for r in chosen}))
    return Split(root, name, frozenset(r["key"] for r in chosen), shards)


# ---------------------------------------------------------------- reading shards


def _virtual_shards(shards: tuple[Path, ...], slots: int) -> list[tuple[Path, int, int]]:
    """(shard, k, m): every m-th sample from the k-th of a shard, so that there are at
    least as many pieces as readers even with fewer shards than ranks x workers."""
    m = max(1, math.ceil(slots / max(1, len(shards))))
    return [(s, k, m) for s in shards for k in range(m)]


def _samples(piece: tuple[Path, int, int], keys: frozenset[str]) -> Iterator[tuple[str, np.ndarray, float]]:
    """(key, RGB uint8 array, label) of the split's images in one piece of a shard."""
    shard, k, m = piece
    index = 0
    for sample in wds.tarfile_samples([{"url": str(shard)}]):
        key = sample["__key__"]
        if key not in keys:
            continue
        index += 1
        if (index - 1) % m != k:
            continue
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BadImage(f"{shard}: sample {key} holds no image")
        img, _ = open_rgb(sample[ext], f"{shard}:{key}")
        yield key, np.asarray(img), float(json.loads(sample["json"])["label"])


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    """Images smaller than a patch are upsampled so the short side is one patch."""
    h, w = arr.shape[:2]
    if min(h, w) >= size:
        return arr
    scale = size / min(h, w)
    img = Image.fromarray(arr).resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                      Image.Resampling.BICUBIC)
    return np.asarray(img)


_SCALE = torch.from_numpy(1 / STD).view(1, 3, 1, 1)
_SHIFT = torch.from_numpy(-MEAN / STD).view(1, 3, 1, 1)


def normalise(patches: np.ndarray) -> torch.Tensor:
    """uint8 NHWC patches to ImageNet-normalised float NCHW."""
    # one uint8 -> float copy straight into NCHW, then in place: 4x faster than float
    # arithmetic in NHWC and a transposing copy, and it is the stream's main cost per patch
    x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2)
    return torch.empty(x.shape, dtype=torch.float32).copy_(x).mul_(_SCALE).add_(_SHIFT)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


# ---------------------------------------------------------------- training


class TrainPatches(IterableDataset):
    """Endless batches of random patches of one rank; see the module docstring."""

    def __init__(self, split: Split, patch_num: int, patch_size: int, batch_size: int,
                 seed: int, rank: int, world: int, shuffle_buffer: int = 1000) -> None:
        self.split, self.patch_num, self.patch_size = split, patch_num, patch_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle_buffer = max(batch_size, shuffle_buffer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pieces(self, wid: int, nw: int) -> Iterator[tuple[Path, int, int]]:
        slots = self.world * nw
        slot = self.rank * nw + wid
        pieces = _virtual_shards(self.split.shards, slots)
        for cycle in range(1_000_000):
            order = np.random.default_rng([self.seed, self.epoch, cycle]).permutation(len(pieces))
            yield from (pieces[i] for i in order[slot::slots])

    def _patches(self, rng: np.random.Generator, wid: int, nw: int) -> Iterator[tuple[np.ndarray, float]]:
        p = self.patch_size
        empty_run = 0
        for piece in self._pieces(wid, nw):
            found = False
            for _, arr, label in _samples(piece, self.split.keys):
                found = True
                arr = _fit(arr, p)
                h, w = arr.shape[:2]
                ys = rng.integers(0, h - p + 1, self.patch_num)
                xs = rng.integers(0, w - p + 1, self.patch_num)
                flips = rng.random(self.patch_num) < 0.5
                for y, x, flip in zip(ys, xs, flips):
                    patch = arr[y:y + p, x:x + p]
                    yield (patch[:, ::-1] if flip else patch), label
            empty_run = 0 if found else empty_run + 1
            if empty_run > 3 * self.world * nw + len(self.split.shards) * 3:
                raise ConfigError(f"{self.split.root}: a data loader worker found no "
                                 f"{self.split.name} images; use fewer ranks x workers")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        wid, nw = _worker()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, 1])
        buffer: list[tuple[np.ndarray, float]] = []
        batch: list[tuple[np.ndarray, float]] = []
        for item in self._patches(rng, wid, nw):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = int(rng.integers(len(buffer)))
            batch.append(buffer[i])
            buffer[i] = item
            if len(batch) == self.batch_size:
                yield _collate(batch)
                batch = []


def _collate(items: list[tuple[np.ndarray, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    patches = np.stack([p for p, _ in items])
    return normalise(patches), torch.tensor([l for _, l in items], dtype=torch.float32)


def steps_per_epoch(split: Split, patch_num: int, batch_size: int, world: int) -> int:
    """Batches per rank that make one pass over the split's patches."""
    return max(1, len(split) * patch_num // (batch_size * world))


def train_loader(split: Split, *, patch_num: int, patch_size: int, batch_size: int, seed: int,
                 rank: int, world: int, workers: int, shuffle_buffer: int) -> DataLoader:
    """Endless loader; take ``steps_per_epoch`` batches after ``loader.dataset.set_epoch``."""
    dataset = TrainPatches(split, patch_num, patch_size, batch_size, seed, rank, world, shuffle_buffer)
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=_own_generator(seed),
                      persistent_workers=False, prefetch_factor=2 if workers else None)


def _own_generator(seed: int) -> torch.Generator:
    """Workers' base seeds from a generator of their own: drawing them from the global
    RNG would shift dropout masks whenever a loader is created (as on resume)."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- evaluation


def grid_positions(h: int, w: int, p: int, n: int) -> list[tuple[int, int]]:
    """``n`` crop corners spread evenly over the image, row by row."""
    g = math.ceil(math.sqrt(n))
    ys = np.linspace(0, h - p, g).round().astype(int)
    xs = np.linspace(0, w - p, g).round().astype(int)
    cells = [(y, x) for y in ys for x in xs]
    picks = np.linspace(0, len(cells) - 1, n).round().astype(int)
    return [cells[i] for i in picks]


def eval_positions(key: str, h: int, w: int, p: int, n: int, random_crop: bool,
                   seed: int) -> list[tuple[int, int]]:
    if not random_crop:
        return grid_positions(h, w, p, n)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])  # same crops on any rank
    return list(zip(rng.integers(0, h - p + 1, n).tolist(), rng.integers(0, w - p + 1, n).tolist()))


def eval_crops(key: str, arr: np.ndarray, p: int, n: int, random_crop: bool = False,
               seed: int = 0) -> list[np.ndarray]:
    """The ``n`` evaluation crops of one decoded image (upsampled first when smaller than a patch)."""
    arr = _fit(arr, p)
    return [arr[y:y + p, x:x + p] for y, x in eval_positions(key, *arr.shape[:2], p, n, random_crop, seed)]


class EvalPatches(IterableDataset):
    """Batches of (patches, labels, keys) covering every image of the split once."""

    def __init__(self, split: Split, patch_num: int, patch_size: int, batch_size: int,
                 rank: int, world: int, random_crop: bool = False, seed: int = 0) -> None:
        self.split, self.patch_num, self.patch_size = split, patch_num, patch_size
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.random_crop, self.seed = random_crop, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        wid, nw = _worker()
        slots, slot = self.world * nw, self.rank * nw + wid
        pieces = _virtual_shards(self.split.shards, slots)[slot::slots]
        p, items = self.patch_size, []
        for piece in pieces:
            for key, arr, label in _samples(piece, self.split.keys):
                for crop in eval_crops(key, arr, p, self.patch_num, self.random_crop, self.seed):
                    items.append((crop, label, key))
                    if len(items) == self.batch_size:
                        yield _collate_eval(items)
                        items = []
        if items:
            yield _collate_eval(items)


def _collate_eval(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels = _collate([(p, l) for p, l, _ in items])
    return images, labels, [k for _, _, k in items]


def eval_loader(split: Split, *, patch_num: int, patch_size: int, batch_size: int, rank: int,
                world: int, workers: int, random_crop: bool = False, seed: int = 0) -> DataLoader:
    dataset = EvalPatches(split, patch_num, patch_size, batch_size, rank, world, random_crop, seed)
    workers = min(workers, max(1, len(_virtual_shards(split.shards, 1))))
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=_own_generator(seed),
                      prefetch_factor=2 if workers else None)
