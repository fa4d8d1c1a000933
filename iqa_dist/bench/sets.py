"""The images the data, eval and GPU benches read, and the original loader they are compared with."""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import transforms

from ..config import ConfigError
from ..data.manifest import read_manifest
from ..data.stream import IMAGE_EXTS, MEAN, STD, Split
from ..models.hyperiqa import PATCH


@contextlib.contextmanager
def bench_images(args: argparse.Namespace) -> Iterator[Path]:
    """The packed set to read: ``--shards``, or a KonIQ-like set built for this run."""
    if args.shards:
        yield args.shards
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building {args.images} KonIQ-sized JPEGs (--shards to use a packed set) ...",
              file=sys.stderr, flush=True)
        yield koniq_like_set(Path(tmp), args.images, workers=0)


def sample_split(shards: Path, n: int) -> tuple[Split, list[dict]]:
    """The first ``n`` images of a packed set (manifest order: few shards), as a split."""
    rows = sorted(read_manifest(shards), key=lambda r: (r["shard"], r["key"]))[:n]
    if not rows:
        raise ConfigError(f"{shards}: no images")
    return Split.from_rows(Path(shards), "bench", rows), rows


def stored_images(split: Split) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of the split's images as the shards hold them."""
    import webdataset as wds  # here, not at the top: a GPU image without it still runs the check

    for shard in split.shards:
        for sample in wds.tarfile_samples([{"url": str(shard)}]):
            if sample["__key__"] in split.keys:
                ext = next(e for e in IMAGE_EXTS if e in sample)
                yield sample["__key__"], ext, sample[ext]


def reference_files(split: Split, rows: list[dict], tmp: Path) -> list[Path]:
    """The files the original loader would open: the source image when it is still there
    (it is then resized to the stored size), else the stored bytes written out."""
    stored = {}
    for key, ext, data in stored_images(split):
        stored[key] = tmp / f"{len(stored):06d}.{ext}"
        stored[key].write_bytes(data)
    return [Path(r["path"]) if Path(r["path"]).is_file() else stored[r["key"]] for r in rows]


class ReferencePatches(Dataset):
    """The original HyperIQA loader: each item is one patch, and each patch opens, decodes
    and resizes its whole image file again (PIL open, convert RGB, Resize, RandomCrop,
    [RandomHorizontalFlip], ToTensor, Normalize)."""

    def __init__(self, files: list[Path], sizes: list[tuple[int, int]], labels: list[float],
                 patch_num: int, flip: bool) -> None:
        self.items = [item for item in zip(files, sizes, labels) for _ in range(patch_num)]
        steps = [transforms.RandomCrop(PATCH, pad_if_needed=True)]
        steps += [transforms.RandomHorizontalFlip()] if flip else []
        self.transform = transforms.Compose(steps + [transforms.ToTensor(),
                                                     transforms.Normalize(MEAN / 255, STD / 255)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        path, size, label = self.items[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        if img.size != size:  # the original resized on every read (KonIQ to 512x384)
            img = img.resize(size, Image.Resampling.BILINEAR)
        return self.transform(img), label


def reference_dataset(split: Split, rows: list[dict], tmp: Path, patch_num: int, flip: bool) -> ReferencePatches:
    files = reference_files(split, rows, tmp)
    return ReferencePatches(files, [(r["width"], r["height"]) for r in rows], [r["label"] for r in rows],
                            patch_num, flip)


KONIQ_SIZE = (1024, 768)  # KonIQ-10k's released images


def koniq_like_set(root: Path, images: int, workers: int) -> Path:
    """A packed set of KonIQ-sized photographs: 1024x768 JPEGs cut from the photographs that
    scikit-image ships, packed at KonIQ's 512x384 as KonIQ-10k is (``--resize koniq``).
    The demo's 256-pixel tiles decode far faster and would flatter the loader. Labels are
    random: the launched runs' SRCC means nothing."""
    from ..pack import PackOptions, pack
    from ..sources.demo import PHOTOS, load_photo

    src, rng, rows = root / "koniq-like", np.random.default_rng(0), []
    (src / "img").mkdir(parents=True)
    for i in range(images):
        centre = tuple(rng.uniform(0, 1, 2))  # a different 4:3 crop each time a photograph comes round
        ImageOps.fit(load_photo(PHOTOS[i % len(PHOTOS)]), KONIQ_SIZE, centering=centre).save(
            src / "img" / f"{i:04d}.jpg", quality=90)
        rows.append(f"img/{i:04d}.jpg,{rng.uniform(1, 100):.2f},r{i}")
    (src / "labels.csv").write_text("\n".join(["name,mos,ref", *rows]) + "\n")
    options = PackOptions(resize="koniq", shard_size=16, rounds=1, split=(0.5, 0.25, 0.25))
    pack("csv", src, root / "shards", options, workers=workers)
    return root / "shards"
