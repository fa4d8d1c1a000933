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
import signal
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

from . import atomic
from .images import BadImage, max_pixels, read_rgb
from .runtime import fast_kernels
from .scorer import CropPlan, mean_scores
from .tools import check_out, checked_device, default_device, label_scale, load_trained, markdown_table

EXIT_SKIPPED = 1  # some inputs were skipped; the others were scored
EXIT_ERROR = 2  # nothing scored: bad checkpoint, bad arguments
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

    def __init__(self, paths: list[Path], plan: CropPlan) -> None:
        self.paths, self.plan = paths, plan

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        path = self.paths[i]
        try:
            return i, *self.plan.crops(np.asarray(read_rgb(path)), str(path))
        except BadImage as err:
            return i, None, str(err).removeprefix(f"{path}: ")


def _parent_stops(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group; interrupted too, a decoding worker
    blocks on its full pipe and predict waits out the loader's 5 s join for each worker. Left
    running, they are stopped at once by the parent's interrupted loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(item: tuple) -> tuple:
    return item  # keep uint8 numpy crops: they are normalised a batch at a time, on the device


# ---------------------------------------------------------------- scoring


def score_files(model: torch.nn.Module, paths: list[Path], plan: CropPlan, *, batch_size: int,
                device: str | torch.device, workers: int = 0,
                progress: bool = True) -> tuple[list[Scored], list[Skipped]]:
    """Scores of the readable files (in input order) and the files skipped, with reasons."""
    model.eval()
    loader = DataLoader(ImageCrops(paths, plan), batch_size=None, num_workers=workers, collate_fn=_as_is,
                        worker_init_fn=_parent_stops)
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

    means = mean_scores(model, readable(), len(paths), batch_size, device)
    scored = [Scored(str(paths[i]), float(means[i]), notes[i]) for i in sorted(notes)]
    return scored, skipped


# ---------------------------------------------------------------- output


def write_scores(scored: list[Scored], out: Path) -> None:
    """``out`` whole or not at all: a run stopped while writing leaves no half a table."""
    rows = [vars(s) for s in scored]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temporary(out) as tmp:
        if out.suffix.lower() == ".csv":
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["path", "score", "note"])
                writer.writeheader()
                writer.writerows(rows)
        else:
            schema = pa.schema([("path", pa.string()), ("score", pa.float64()), ("note", pa.string())])
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
        atomic.replace(tmp, out)


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
        plan = CropPlan.of(trained, args.test_patch_num)
        device = checked_device(args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    fast_kernels(trained.cfg.deterministic)
    paths, skipped = expand_inputs(args.inputs)
    total = len(paths) + len(skipped)
    for s in skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    cfg = trained.cfg
    scored, unreadable = score_files(trained.model.to(device), paths, plan, batch_size=args.batch_size,
                                     device=device, workers=args.workers, progress=not args.quiet)
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
