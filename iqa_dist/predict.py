"""Score image files with a trained HyperIQA.

    python -m iqa_dist.predict --checkpoint runs/koniq-tiny photos/ extra.jpg 'shots/*.png' --out scores.csv

Each image is scored as evaluation scores it: resized first as the training set was
packed (its card's ``--resize``: a KonIQ model sees a 1024x768 photo at the 384x512 it
was trained on), then the mean prediction over the trained configuration's
deterministic crops (images smaller than a crop are upsampled first). The ``note``
column says what was done to the image. Crops of consecutive images share batches. Files that
cannot be scored are reported, one line each, and skipped; the exit code is then 1.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import ConfigError
from .data.stream import eval_crops, resized, to_model_input
from .images import BadImage, max_pixels, read_rgb
from .runtime import fast_kernels
from .scoring import training_resize
from .tools import check_out, default_device, label_scale, load_trained, markdown_table

EXIT_SKIPPED = 1  # some inputs were skipped; the others were scored
EXIT_ERROR = 2  # nothing scored: bad checkpoint, bad arguments
MIN_SIDE = 8  # fewer pixels say nothing about quality, and upsampling them would explode
OUT_FORMATS = (".csv", ".parquet", ".pq")


@dataclass(frozen=True)
class Scored:
    path: str
    score: float
    note: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


# ---------------------------------------------------------------- inputs


def expand_inputs(args: Iterable[str]) -> tuple[list[Path], list[Skipped]]:
    """Files named by paths, folders (their files, not recursed) and glob patterns, in order;
    and what was skipped: missing names, empty folders, broken symbolic links."""
    files: dict[Path, None] = {}
    missing = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            listed = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        elif path.exists() or path.is_symlink():
            listed = [path]
        else:
            listed = sorted(Path(p) for p in glob.glob(arg, recursive=True))
        found = [p for p in listed if p.is_file()]
        broken = [p for p in listed if p.is_symlink() and not p.exists()]
        missing += [Skipped(str(p), f"broken symbolic link (to {os.readlink(p)}, which does not exist)")
                    for p in broken]
        if not found and not broken:
            reason = ("folder holds no files" if path.is_dir() else
                      "matches no file" if glob.has_magic(arg) else "no such file")
            missing.append(Skipped(arg, reason))
        files.update(dict.fromkeys(found))
    return list(files), missing


class ImageCrops(Dataset):
    """(index, uint8 crops [n, p, p, 3] or None, note or reason) of each file."""

    def __init__(self, paths: list[Path], patch_size: int, patch_num: int, random_crop: bool,
                 seed: int, resize: str = "none") -> None:
        self.paths, self.patch_size, self.patch_num = paths, patch_size, patch_num
        self.random_crop, self.seed, self.resize = random_crop, seed, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        path = self.paths[i]
        try:
            arr = np.asarray(read_rgb(path))
        except BadImage as err:
            return i, None, str(err).removeprefix(f"{path}: ")
        h, w = arr.shape[:2]
        if min(h, w) < MIN_SIDE:
            return i, None, f"too small to score ({w}x{h})"
        arr = resized(arr, self.resize)
        notes = [f"resized {w}x{h} -> {arr.shape[1]}x{arr.shape[0]} (--resize {self.resize}, as the "
                 "training set)"] if arr.shape[:2] != (h, w) else []
        h, w, p = *arr.shape[:2], self.patch_size
        notes += [f"upsampled: {w}x{h} is smaller than a {p} crop"] if min(h, w) < p else []
        try:
            crops = eval_crops(str(path), arr, p, self.patch_num, self.random_crop, self.seed)
        except BadImage as err:
            return i, None, str(err).removeprefix(f"{path}: ")
        return i, np.stack(crops), "; ".join(notes)


def _as_is(item: tuple) -> tuple:
    return item  # keep uint8 numpy crops: they are normalised a batch at a time, on the device


# ---------------------------------------------------------------- scoring


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
def score_files(model: torch.nn.Module, paths: list[Path], *, patch_size: int, patch_num: int,
                batch_size: int, device: str | torch.device, workers: int = 0,
                random_crop: bool = False, seed: int = 0, resize: str = "none",
                progress: bool = True) -> tuple[list[Scored], list[Skipped]]:
    """Scores of the readable files (in input order) and the files skipped, with reasons;
    ``resize``: pack's policy applied to each image first (see ``training_resize``)."""
    model.eval()
    loader = DataLoader(ImageCrops(paths, patch_size, patch_num, random_crop, seed, resize), batch_size=None,
                        num_workers=workers, collate_fn=_as_is)
    sums, counts = np.zeros(len(paths)), np.zeros(len(paths))
    notes: dict[int, str] = {}
    skipped: list[Skipped] = []

    def readable() -> Iterator[tuple[int, np.ndarray]]:
        for i, crops, text in tqdm(loader, total=len(paths), unit="img", disable=not progress):
            if crops is None:
                skipped.append(Skipped(str(paths[i]), text))
                tqdm.write(f"skipped {paths[i]}: {text}", file=sys.stderr)
                continue
            notes[i] = text
            yield i, crops

    dtype = next(model.parameters()).dtype
    for crops, owners in fixed_batches(readable(), batch_size):
        preds = model(to_model_input(crops, device, dtype)).float().cpu().numpy()
        np.add.at(sums, owners, preds)
        np.add.at(counts, owners, 1)
    scored = [Scored(str(paths[i]), float(sums[i] / counts[i]), notes[i]) for i in sorted(notes)]
    return scored, skipped


# ---------------------------------------------------------------- output


def write_scores(scored: list[Scored], out: Path) -> None:
    rows = [vars(s) for s in scored]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "score", "note"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("note", pa.string())])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, its checkpoints/best, or a model.safetensors next to config.yaml")
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR|GLOB")
    p.add_argument("--out", type=Path, help="scores.csv or scores.parquet")
    p.add_argument("--batch_size", type=int, default=32, help="crops per forward pass (default 32)")
    p.add_argument("--test_patch_num", type=int, help="crops per image (default: the trained config's)")
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda when present)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    args = p.parse_args(argv)
    if args.out is not None and args.out.suffix.lower() not in OUT_FORMATS:
        p.error(f"--out {args.out}: give a .csv or .parquet file")
    if args.batch_size < 1 or (args.test_patch_num is not None and args.test_patch_num < 1) or args.workers < 0:
        p.error("--batch_size and --test_patch_num must be positive, --workers at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        max_pixels()  # checked once here, not once per image
        if args.out is not None:
            check_out(args.out, folder=False)
        trained = load_trained(args.checkpoint)
        resize = training_resize(trained.card)
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no GPU is visible")
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    fast_kernels(trained.cfg.deterministic)
    paths, skipped = expand_inputs(args.inputs)
    total = len(paths) + len(skipped)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    cfg = trained.cfg
    scored, unreadable = score_files(
        trained.model.to(device), paths, patch_size=cfg.patch_size,
        patch_num=args.test_patch_num or cfg.test_patch_num, batch_size=args.batch_size, device=device,
        workers=args.workers, random_crop=cfg.test_random_crop, seed=cfg.seed,
        resize=resize, progress=not args.quiet)
    skipped += unreadable
    if not args.quiet and scored:
        print(f"scores: {label_scale(trained.card)}; model {cfg.model_size} from {trained.weights}")
        print(markdown_table([vars(s) for s in scored], ["path", "score", "note"]))
    if args.out is not None:
        write_scores(scored, args.out)
        print(f"{len(scored)} scores written to {args.out}")
    if skipped:
        print(f"{len(skipped)} of {total} inputs skipped (reasons above)", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: no scores written", file=sys.stderr)
        sys.exit(130)
