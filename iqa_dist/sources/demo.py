"""A small synthetic-distortion IQA set built offline from real photographs.

The photographs are the sample images that scikit-image ships. Each is cut into
square tiles (all tiles of a photograph share one reference id, so a photograph never
straddles two splits), and each tile is distorted at graded levels of several types,
in the style of KADID-10k. The label is a full-reference score of the distorted tile
against its pristine tile: SSIM over the RGB channels, on one 0-1 scale for every
distortion type. Higher is better. (Loss of saturation is not among the distortions:
SSIM hardly sees it, so its labels would be noise around 1.)

The result is an ordinary ``csv`` layout (``labels.csv`` + ``images/``), read by the
generic csv reader.
"""
from __future__ import annotations

import csv
import io
import os
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from . import DatasetInfo, Reader, register

# Photographs (not drawings or test charts) bundled with scikit-image.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "motorcycle_right.png", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png",
          "gravel.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "page.png", "text.png",
          "cell.png", "clock_motion.png")
TILE = 256  # one 224 crop covers most of a tile, and decoding stays cheap
TILES_PER_PHOTO = 2
LEVELS = 5


def _blur(img: Image.Image, t: float, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=0.8 + 3.2 * t))


def _noise(img: Image.Image, t: float, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    noisy = arr + rng.normal(0.0, 3.0 + 37.0 * t, arr.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, t: float, rng: np.random.Generator) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(round(30 * (2 / 30) ** t)))  # 30 down to 2
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _contrast(img: Image.Image, t: float, rng: np.random.Generator) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(0.85 - 0.7 * t)


def _posterize(img: Image.Image, t: float, rng: np.random.Generator) -> Image.Image:
    return ImageOps.posterize(img, int(round(5 - 4 * t)))  # 5 bits per channel down to 1


DISTORTIONS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "blur": _blur, "noise": _noise, "jpeg": _jpeg, "contrast": _contrast,
    "posterize": _posterize,
}


def score(ref: np.ndarray, dist: np.ndarray) -> float:
    """SSIM over the RGB channels."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref, dist, channel_axis=2, data_range=255,
                                       gaussian_weights=True, sigma=1.5))


def load_photo(name: str) -> Image.Image:
    """A photograph from scikit-image's package data (no download)."""
    path = resources.files("skimage") / "data" / name
    with path.open("rb") as f:
        return Image.open(f).convert("RGB")


def tiles(img: Image.Image, n: int, rng: np.random.Generator) -> list[Image.Image]:
    """``n`` tiles of TILE pixels from a photo scaled so its short side is 2 tiles."""
    scale = 2 * TILE / min(img.size)
    img = img.resize((max(TILE, round(img.width * scale)), max(TILE, round(img.height * scale))),
                     Image.Resampling.LANCZOS)
    corners = [(x, y) for x in range(0, img.width - TILE + 1, TILE)
               for y in range(0, img.height - TILE + 1, TILE)]
    picks = rng.choice(len(corners), size=min(n, len(corners)), replace=False)
    return [img.crop((*corners[i], corners[i][0] + TILE, corners[i][1] + TILE)) for i in sorted(picks)]


def build(root: Path, seed: int = 0, photos: tuple[str, ...] = PHOTOS,
          tiles_per_photo: int = TILES_PER_PHOTO, levels: int = LEVELS) -> Path:
    """Write the demo layout under ``root`` (skipped when already complete)."""
    labels = root / "labels.csv"
    if labels.exists():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for photo in photos:
        for t, tile in enumerate(tiles(load_photo(photo), tiles_per_photo, rng)):
            ref = photo.split(".")[0].replace("_", "-")
            rows += _distort_tile(root, f"{ref}-t{t}", ref, tile, levels, rng)
    tmp = labels.with_name(".labels.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "mos", "ref", "distortion", "level"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, labels)  # written last: its presence marks a complete build
    return root


def _distort_tile(root: Path, name: str, ref: str, tile: Image.Image, levels: int,
                  rng: np.random.Generator) -> list[dict]:
    pristine = np.asarray(tile)
    rows = []
    for kind, distort in DISTORTIONS.items():
        for level in range(1, levels + 1):
            out = distort(tile, (level - 1) / max(1, levels - 1), rng)
            file = f"images/{name}_{kind}_{level}.png"
            out.save(root / file, compress_level=1)
            rows.append({"name": file, "mos": round(score(pristine, np.asarray(out)), 6),
                         "ref": ref, "distortion": kind, "level": level})
    return rows


def _read(root: Path):
    from .csvfile import read

    return read(root)


register(Reader(
    info=DatasetInfo(name="demo", label_name="SSIM", scale=(0.0, 1.0),
                     higher_is_better=True, split_unit="reference",
                     source="scikit-image sample photographs, distorted by iqa_dist.sources.demo"),
    read=_read,
))
