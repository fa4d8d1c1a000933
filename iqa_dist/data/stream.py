"""Shards to batches of patches, for training and for evaluation.

Training epochs are exact. Epoch ``e`` is a seeded permutation of the split's images in
which every image stands for ``patch_num`` patches; that sequence of patches is cut
into contiguous pieces, one per reader slot (rank x loader worker), each piece exactly
the patches of the batches that slot produces. An epoch has
``steps = ceil(images x patch_num / global batch)`` batches per rank (rounded up to
whole accumulation cycles); the few patches that fill the last global batch are taken
from the head of epoch ``e + 1``'s permutation (wrapped, as a ring would), so every
image gives exactly ``patch_num`` patches each epoch plus fewer than one global batch
of extra patches from images that change every epoch. Every rank yields the same number
of batches.

A slot reads its images shard by shard (shards in a seeded order, each front to back,
skipping the members of other slots) and decodes each image once, cutting all of its
crops (with horizontal flips); a shuffle buffer mixes patches across images before
batching in the worker. Everything is a function of (seed, epoch, rank, worker): an
epoch replays exactly, which is how a resumed run skips what it has done.

Bad data. A shard that is missing, truncated or not a tar archive raises ``ShardError``
naming it, in training and evaluation alike (``batches`` unwraps it from the
DataLoader's worker re-raise). An image that cannot be decoded (or a sample without a
readable label) is a bad sample: training skips it, cuts its patches from the reader's
next good image so that every epoch keeps its exact number of batches, and reports it
with the batch (the loop counts them against ``max_bad_samples``); evaluation stops
with a ShardError, since a metric over fewer images would be silently different.

Evaluation: deterministic crops (a grid, or crops seeded by the image key), each
carrying its image key; the split's images are cut into contiguous runs in shard order,
one per slot, so that every image is read exactly once.

The loaders are plain ``torch.utils.data.DataLoader`` objects that are never handed to
``accelerator.prepare`` (it would read on rank 0 only); batches are moved by the caller.
"""
from __future__ import annotations

import json
import math
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from functools import cache, cached_property
from itertools import count
from pathlib import Path
from typing import Collection, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import handover
from .manifest import MANIFEST, ManifestError, read_manifest
from ..images import BadImage, check_upsampling, open_rgb, resize_policy
from ..config import ConfigError

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
IMAGE_EXTS = ("png", "jpg", "bmp", "tif", "webp", "gif", "img")

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 NHWC patches, labels, image key of each
TrainBatch = tuple[torch.Tensor, torch.Tensor, list[str], list[str]]  # + the bad samples skipped since the last


class ShardError(RuntimeError):
    """A shard that cannot be read (missing, truncated, corrupted), or an image in one that
    cannot be used where none may be skipped; the message is one line naming the shard."""


@dataclass(frozen=True)
class Split:
    """The images of one split of a packed set and the shard that holds each."""

    root: Path
    name: str
    shard_of: Mapping[str, Path]  # image key -> shard
    label_of: Mapping[str, float] = field(default_factory=dict)  # image key -> label (from the manifest)

    @classmethod
    def from_rows(cls, root: Path, name: str, rows: Iterable[dict]) -> "Split":
        rows = list(rows)
        return cls(root, name, {r["key"]: root / r["shard"] for r in rows},
                   {r["key"]: r["label"] for r in rows if "label" in r})

    @cached_property
    def keys(self) -> frozenset[str]:
        return frozenset(self.shard_of)

    @cached_property
    def shards(self) -> tuple[Path, ...]:
        """Only the shards that hold images of this split."""
        return tuple(sorted(set(self.shard_of.values())))

    @cached_property
    def ordered(self) -> tuple[str, ...]:
        """The keys in storage order (by shard, then key): the order of evaluation."""
        return tuple(sorted(self.shard_of, key=lambda k: (self.shard_of[k], k)))

    def __len__(self) -> int:
        return len(self.shard_of)

    def check_shards(self) -> None:
        """A ShardError now, not mid-epoch, when a shard of the split is gone."""
        for shard in self.shards:
            if not shard.is_file():
                raise ShardError(f"{shard}: missing (listed in {self.root}/{MANIFEST})")

    def unrankable(self) -> str | None:
        """Why no correlation can be computed on this split (None: it can)."""
        labels = set(self.label_of.values())
        if len(self) < 2:
            return f"the {self.name} split holds {len(self)} image(s): too few to rank"
        if len(labels) == 1:
            return f"the {self.name} split's {len(self)} images all have the label {labels.pop():g}: nothing to rank"
        return None


def load_split(root: str | Path, name: str, round_: int = 0) -> Split:
    """Split ``name`` ("train", "val", "test" or "all") of split round ``round_``."""
    root = Path(root)
    try:
        rows = read_manifest(root)
    except ManifestError as err:  # to a reader, a damaged manifest is a damaged set of shards
        raise ShardError(str(err)) from None
    column = f"split_{round_}"
    if name != "all" and rows and column not in rows[0]:
        raise ConfigError(f"{root}/{MANIFEST}: no split round {round_} (packed with fewer --rounds)")
    return Split.from_rows(root, name, (r for r in rows if name == "all" or r[column] == name))


# ---------------------------------------------------------------- reading shards


class Sample(NamedTuple):
    key: str
    image: np.ndarray | None  # RGB uint8; None: a bad sample, ``problem`` says why
    label: float
    problem: str = ""


def _read(shard: Path, expected: Collection[str]) -> Iterator[Sample]:
    """The ``expected`` samples of one shard (all of them in it), in shard order.

    One pass front to back; the data of other images is skipped by seeking past it, so
    a reader pays for the headers of the shard and its own images only. A shard that is
    missing, cut short or no tar archive raises ShardError; so does one that ends before
    all of ``expected`` (a tar cut at a member's boundary reads as a shorter archive).
    """
    files: dict[str, bytes] = {}
    current, seen = None, set()
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if key != current:
                    yield from _decoded(shard, current, files)
                    current, files = key, {}
                if key in expected and member.isfile():
                    files[ext] = tar.extractfile(member).read()
                    seen.add(key)
            yield from _decoded(shard, current, files)
    except FileNotFoundError:
        raise ShardError(f"{shard}: missing") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"{shard}: unreadable, truncated or corrupted ({err})") from None
    lost = sorted(set(expected) - seen)
    if lost:
        raise ShardError(f"{shard}: truncated or corrupted: {len(lost)} of its images are not in it "
                         f"(first: {lost[0]})")


def _decoded(shard: Path, key: str | None, files: dict[str, bytes]) -> Iterator[Sample]:
    if not files:
        return
    where = f"{shard}:{key}"
    try:
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            raise BadImage(f"{where}: the sample holds no image")
        label = _label(files, where)
        img, _ = open_rgb(files[ext], where)
    except BadImage as err:
        yield Sample(key, None, math.nan, str(err))
        return
    yield Sample(key, np.asarray(img), label)


def _label(files: dict[str, bytes], where: str) -> float:
    try:
        return float(json.loads(files["json"])["label"])
    except (KeyError, ValueError, TypeError) as err:
        raise BadImage(f"{where}: no readable label ({type(err).__name__}: {err})") from None


def _read_in_order(split: Split, wanted: Collection[str],
                   shard_order: Sequence[Path] | None = None) -> Iterator[Sample]:
    """The ``wanted`` samples of a split, shard by shard (``shard_order`` or sorted)."""
    by_shard: dict[Path, set[str]] = {}
    for key in wanted:
        by_shard.setdefault(split.shard_of[key], set()).add(key)
    for shard in (shard_order if shard_order is not None else sorted(by_shard)):
        if shard in by_shard:
            yield from _read(shard, by_shard[shard])


def batches(loader: DataLoader) -> Iterator:
    """The loader's batches. A ShardError raised in a loader worker comes out as itself,
    its one line, instead of DataLoader's re-raise carrying the worker's traceback."""
    try:
        yield from loader
    except ShardError as err:
        raise ShardError(_worker_message(str(err))) from None


def _worker_message(text: str) -> str:
    """DataLoader re-raises a worker's exception with a message of ``Caught ShardError in
    DataLoader worker process N.`` and the worker's traceback, whose last line is
    ``<module>.ShardError: <the original message>``."""
    if not text.startswith("Caught "):
        return text
    return text.rstrip().splitlines()[-1].split(": ", 1)[-1]


def _fit(arr: np.ndarray, size: int, where: str = "image") -> np.ndarray:
    """Images smaller than a patch are upsampled so the short side is one patch; BadImage
    naming ``where`` when that is refused (``images.check_upsampling``)."""
    h, w = arr.shape[:2]
    if min(h, w) >= size:
        return arr
    check_upsampling(w, h, size, where)
    scale = size / min(h, w)
    img = Image.fromarray(arr).resize((max(size, round(w * scale)), max(size, round(h * scale))),
                                      Image.Resampling.BICUBIC)
    return np.asarray(img)


def train_crops(arr: np.ndarray, n: int, p: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` random ``p`` x ``p`` crops, each mirrored with probability 1/2. Mirrored crops
    are cut from one mirrored copy of the image (x -> w - p - x: the same pixels), since
    stacking views with a negative stride costs 40x a plain copy."""
    arr = _fit(arr, p)
    h, w = arr.shape[:2]
    ys, xs, flips = rng.integers(0, h - p + 1, n), rng.integers(0, w - p + 1, n), rng.random(n) < 0.5
    mirror = np.ascontiguousarray(arr[:, ::-1]) if flips.any() else arr
    return [mirror[y:y + p, w - p - x:w - x] if flip else arr[y:y + p, x:x + p]
            for y, x, flip in zip(ys, xs, flips)]


@cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) on ``device``, copied there once: moving them with every batch cost
    two blocking host-to-device copies per step on a GPU."""
    return (torch.from_numpy(1 / STD).view(1, 3, 1, 1).to(device),
            torch.from_numpy(-MEAN / STD).view(1, 3, 1, 1).to(device))


def to_model_input(patches: torch.Tensor | np.ndarray, device: torch.device | str,
                   dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 NHWC patches -> ImageNet-normalised ``dtype`` NCHW on ``device``.

    The one place where patches become model input (training, evaluation, predict,
    bench): loaders hand over uint8, a quarter of float32's bytes through worker pipes
    and to the GPU, and the cast and normalisation run on the device.
    """
    x = torch.as_tensor(patches).to(device, non_blocking=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    # one uint8 -> float copy straight into NCHW, then in place: 4x faster on a CPU than
    # float arithmetic in NHWC followed by a transposing copy
    out = torch.empty(x.permute(0, 3, 1, 2).shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    scale, shift = _normalisation(x.device)
    out.copy_(x.permute(0, 3, 1, 2)).mul_(scale).add_(shift)
    return out if dtype == torch.float32 else out.to(dtype)


def _collate(items: list[tuple[np.ndarray, float, str]]) -> Batch:
    shape = (len(items), *items[0][0].shape)
    in_worker = get_worker_info() is not None
    # uint8 NHWC (see to_model_input); a worker stacks straight into a shared buffer it reuses
    patches = handover.buffer(shape) if in_worker else torch.empty(shape, dtype=torch.uint8)
    np.stack([p for p, _, _ in items], out=patches.numpy())
    labels = torch.tensor([l for _, l, _ in items], dtype=torch.float32)
    return handover.Handover(patches) if in_worker else patches, labels, [k for _, _, k in items]


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


# ---------------------------------------------------------------- training


def steps_per_epoch(images: int, patch_num: int, batch_size: int, world: int, grad_accum: int = 1) -> int:
    """Batches per rank in one epoch: enough for every image's ``patch_num`` patches,
    in whole accumulation cycles (the last global batch is topped up from the next epoch)."""
    cycle = batch_size * world * grad_accum
    return grad_accum * max(1, math.ceil(images * patch_num / cycle))


def batches_of_worker(steps: int, worker: int, workers: int) -> int:
    """A DataLoader takes batch j from worker j % workers."""
    return len(range(worker, steps, workers))


def epoch_plan(keys: Sequence[str], patch_num: int, quotas: Sequence[int], seed: int,
               epoch: int) -> list[Counter]:
    """Patches per image for each of ``quotas`` (patches per slot, in slot order).

    The slots share epoch ``epoch``'s permutation of ``keys`` in contiguous pieces, each
    image counted ``patch_num`` times; past its end the permutations of the following
    epochs continue it, so an image cut between two slots is shared, never lost.
    """
    def images() -> Iterator[str]:
        for e in count(epoch):
            yield from (keys[i] for i in np.random.default_rng([seed, e]).permutation(len(keys)))

    stream, plans, key, left = images(), [], "", 0
    for quota in quotas:
        plan: Counter = Counter()
        while quota:
            if not left:
                key, left = next(stream), patch_num
            take = min(left, quota)
            plan[key] += take
            left, quota = left - take, quota - take
        plans.append(plan)
    return plans


class TrainPatches(IterableDataset):
    """One epoch of batches of random patches of one rank; see the module docstring."""

    def __init__(self, split: Split, patch_num: int, patch_size: int, batch_size: int,
                 seed: int, rank: int, world: int, shuffle_buffer: int = 1000,
                 steps: int | None = None) -> None:
        if not len(split):
            raise ConfigError(f"{split.root}: the {split.name} split holds no images")
        self.split, self.patch_num, self.patch_size = split, patch_num, patch_size
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.steps = steps or steps_per_epoch(len(split), patch_num, batch_size, world)
        self.shuffle_buffer = max(batch_size, shuffle_buffer)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, wid: int, nw: int) -> Counter:
        """Patches per image of this rank's worker ``wid`` of ``nw`` in the current epoch."""
        quotas = [batches_of_worker(self.steps, w, nw) * self.batch_size
                  for _ in range(self.world) for w in range(nw)]
        slot = self.rank * nw + wid
        return epoch_plan(sorted(self.split.keys), self.patch_num, quotas[:slot + 1],
                          self.seed, self.epoch)[slot]

    def _patches(self, plan: Counter, rng: np.random.Generator,
                 bad: list[str]) -> Iterator[tuple[np.ndarray, float, str]]:
        """The plan's patches; a bad sample goes to ``bad`` and its patches are cut from the
        next good image (the last one at the end), so the plan's count holds."""
        order = [self.split.shards[i] for i in rng.permutation(len(self.split.shards))]
        owed, last = 0, None
        for sample in _read_in_order(self.split, plan, order):
            sample = self._fitted(sample)
            if sample.image is None:
                bad.append(sample.problem)
                owed += plan[sample.key]
                continue
            yield from self._crops(sample, plan[sample.key] + owed, rng)
            owed, last = 0, sample
        if owed and last is None:
            raise ShardError(f"{bad[-1]} (and every other image of a reader of {self.split.root} is bad too)")
        if owed:
            yield from self._crops(last, owed, rng)

    def _fitted(self, sample: Sample) -> Sample:
        """The sample upsampled to a patch where it is smaller; a bad sample where that is refused."""
        if sample.image is None:
            return sample
        try:
            return sample._replace(image=_fit(sample.image, self.patch_size,
                                              f"{self.split.shard_of[sample.key]}:{sample.key}"))
        except BadImage as err:
            return Sample(sample.key, None, math.nan, str(err))

    def _crops(self, sample: Sample, n: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, float, str]]:
        for patch in train_crops(sample.image, n, self.patch_size, rng):
            yield patch, sample.label, sample.key

    def __iter__(self) -> Iterator[TrainBatch]:
        wid, nw = _worker()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid, 1])
        buffer: list[tuple[np.ndarray, float, str]] = []
        batch: list[tuple[np.ndarray, float, str]] = []
        bad: list[str] = []  # reported with the next batch, then cleared

        def emit() -> TrainBatch:
            out = (*_collate(batch), bad[:])
            batch.clear()
            bad.clear()
            return out

        for item in self._patches(self.plan(wid, nw), rng, bad):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = int(rng.integers(len(buffer)))
            batch.append(buffer[i])
            buffer[i] = item
            if len(batch) == self.batch_size:
                yield emit()
        for i in rng.permutation(len(buffer)):  # the plan is whole batches: nothing is left over
            batch.append(buffer[i])
            if len(batch) == self.batch_size:
                yield emit()


def train_loader(split: Split, *, patch_num: int, patch_size: int, batch_size: int, seed: int,
                 rank: int, world: int, workers: int, shuffle_buffer: int,
                 steps: int | None = None, pin_memory: bool = False) -> DataLoader:
    """One epoch of ``steps`` batches per iteration (default ``steps_per_epoch``);
    call ``loader.dataset.set_epoch`` before each. ``pin_memory``: the batches go to a
    GPU (page-locked memory lets them be copied without blocking); the caller knows its
    device, which a GPU in the machine does not say (a CPU run may have one)."""
    dataset = TrainPatches(split, patch_num, patch_size, batch_size, seed, rank, world, shuffle_buffer, steps)
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=_own_generator(seed),
                      persistent_workers=False, prefetch_factor=2 if workers else None,
                      pin_memory=pin_memory)


def _own_generator(seed: int) -> torch.Generator:
    """Workers' base seeds from a generator of their own: drawing them from the global
    RNG would shift dropout masks whenever a loader is created (as on resume)."""
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- evaluation


def _axis(length: int, p: int, k: int) -> list[int]:
    """``k`` crop starts from one edge to the other; a single crop is centred."""
    if k == 1:
        return [(length - p) // 2]
    return np.linspace(0, length - p, k).round().astype(int).tolist()


def grid_shape(h: int, w: int, p: int, n: int) -> tuple[int, int]:
    """Rows x columns of ``n`` crops: of the factorisations of ``n``, those that cover
    the whole image first, then those with a crop over its centre, then the one closest
    to the image's aspect (20 crops of a 512x384 image: 4 rows of 5)."""
    def rank(rows: int, cols: int) -> tuple[bool, bool, float]:
        starts = _axis(h, p, rows), _axis(w, p, cols)
        covers = all(k * p >= length or k == 1 and p >= length for k, length in ((rows, h), (cols, w)))
        centre = all(any(s <= length // 2 < s + p for s in axis) for axis, length in zip(starts, (h, w)))
        return not covers, not centre, abs(math.log(cols / rows) - math.log(w / h))

    return min(((r, n // r) for r in range(1, n + 1) if n % r == 0), key=lambda rc: rank(*rc))


def grid_positions(h: int, w: int, p: int, n: int) -> list[tuple[int, int]]:
    """``n`` crop corners on a rows x columns grid (``grid_shape``), row by row."""
    rows, cols = grid_shape(h, w, p, n)
    return [(y, x) for y in _axis(h, p, rows) for x in _axis(w, p, cols)]


def eval_positions(key: str, h: int, w: int, p: int, n: int, random_crop: bool,
                   seed: int) -> list[tuple[int, int]]:
    if not random_crop:
        return grid_positions(h, w, p, n)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])  # same crops on any rank
    return list(zip(rng.integers(0, h - p + 1, n).tolist(), rng.integers(0, w - p + 1, n).tolist()))


def resized(arr: np.ndarray, policy: str) -> np.ndarray:
    """The image at the geometry of pack's ``--resize policy`` (unchanged when it is there)."""
    img = None if policy == "none" else resize_policy(Image.fromarray(arr), policy)
    return arr if img is None else np.asarray(img)


def eval_crops(key: str, arr: np.ndarray, p: int, n: int, random_crop: bool = False,
               seed: int = 0, where: str = "") -> list[np.ndarray]:
    """The ``n`` evaluation crops of one decoded image (upsampled first when smaller than a
    patch; BadImage naming ``where``, else ``key``, where that is refused)."""
    arr = _fit(arr, p, where or key)
    return [arr[y:y + p, x:x + p] for y, x in eval_positions(key, *arr.shape[:2], p, n, random_crop, seed)]


class EvalPatches(IterableDataset):
    """Batches of (patches, labels, keys) covering every image of the split once across
    ranks and workers."""

    def __init__(self, split: Split, patch_num: int, patch_size: int, batch_size: int,
                 rank: int, world: int, random_crop: bool = False, seed: int = 0, resize: str = "none") -> None:
        self.split, self.patch_num, self.patch_size = split, patch_num, patch_size
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.random_crop, self.seed, self.resize = random_crop, seed, resize

    def __iter__(self) -> Iterator[Batch]:
        wid, nw = _worker()
        slots, slot = self.world * nw, self.rank * nw + wid
        keys = self.split.ordered  # contiguous runs in storage order: each slot reads few shards
        mine = frozenset(keys[len(keys) * slot // slots:len(keys) * (slot + 1) // slots])
        p, items = self.patch_size, []
        for sample in _read_in_order(self.split, mine):
            if sample.image is None:  # no skipping: metrics over fewer images would silently differ
                raise ShardError(sample.problem)
            image, where = resized(sample.image, self.resize), f"{self.split.shard_of[sample.key]}:{sample.key}"
            try:
                crops = eval_crops(sample.key, image, p, self.patch_num, self.random_crop, self.seed, where)
            except BadImage as err:
                raise ShardError(str(err)) from None
            for crop in crops:
                items.append((crop, sample.label, sample.key))
                if len(items) == self.batch_size:
                    yield _collate(items)
                    items = []
        if items:
            yield _collate(items)


def eval_loader(split: Split, *, patch_num: int, patch_size: int, batch_size: int, rank: int,
                world: int, workers: int, random_crop: bool = False, seed: int = 0,
                pin_memory: bool = False, resize: str = "none") -> DataLoader:
    """``pin_memory`` as for ``train_loader``; ``resize``: pack's policy applied to each image
    first (the training set's geometry)."""
    dataset = EvalPatches(split, patch_num, patch_size, batch_size, rank, world, random_crop, seed, resize)
    workers = min(workers, len(split))
    return DataLoader(dataset, batch_size=None, num_workers=workers, generator=_own_generator(seed),
                      prefetch_factor=2 if workers else None, pin_memory=pin_memory)
