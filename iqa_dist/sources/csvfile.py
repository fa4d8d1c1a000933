"""Any data set described by a ``labels.csv`` at its root (``--dataset csv``).

Header columns: ``name`` (image path relative to the root, or to ``--image_root`` when the
images lie in a folder of their own, e.g. ``images/``) and ``mos`` are required;
``std``, ``ref`` (reference id: the split unit; without it every image is its own),
``split`` (train/val/test, an official split), ``distortion`` and ``level`` are optional.
Optional values that do not parse are left empty; an unknown split, or a name that leaves
the root (``../x.jpg``, an absolute path), skips the row.

A csv says nothing of its label's direction or scale: higher is taken as better, and
the scale on the card is the range of the labels read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from . import DatasetInfo, LayoutError, Reader, Record, Skipped, register
from ._util import SPLIT_NAMES, Collector, csv_rows, integer, leaves_root

LABELS = "labels.csv"


def read(root: Path, image_root: Path | str | None = None) -> tuple[list[Record], list[Skipped]]:
    """``image_root``: the folder the names are relative to (relative to ``root``; default: it)."""
    root = Path(root)
    images = root / image_root if image_root else root
    if not images.is_dir():
        raise LayoutError(f"{images}: no such image folder (--image_root)")
    out = Collector(root / LABELS)
    for line, row in csv_rows(out.label_file, ("name", "mos")):
        split = row.get("split", "").lower()
        if split and split not in SPLIT_NAMES:
            out.skip(line, f"unknown split {row['split']!r} (use train, val or test)")
            continue
        name = row["name"]
        if leaves_root(name):
            out.skip(line, f"image name {name!r} leaves the data set folder")
            continue
        out.add(line, name, row["mos"], images / name, std=row.get("std"),
                ref=row.get("ref") or None, distortion=row.get("distortion") or None,
                level=integer(row.get("level")), split=SPLIT_NAMES.get(split))
    return out.result()


def _read_with_scale(root: Path, image_root: Path | str | None = None) -> tuple[list[Record], list[Skipped]]:
    # pack takes the card's scale from the reader's info, read after this call
    records, skipped = read(root, image_root)
    if records:
        labels = [r.label for r in records]
        READER.info = dataclasses.replace(READER.info, scale=(min(labels), max(labels)))
    return records, skipped


READER = register(Reader(
    info=DatasetInfo(name="csv", label_name="MOS", scale=(0.0, 100.0), higher_is_better=True,
                     split_unit="reference"),
    read=_read_with_scale,
    options=("image_root",),
    notes=["direction unknown: higher is taken as better",
           "scale: the range of the labels read (0-100 until a data set is read)"],
))
