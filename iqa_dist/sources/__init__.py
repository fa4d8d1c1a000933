"""Readers for native IQA data set layouts.

Each reader turns a data set *as downloaded* into plain :class:`Record` rows.
Readers only read label files and list paths: they never open images (``pack``
does, once) and never import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Record:
    """One labelled image of a data set."""

    key: str  # unique within the data set, no dots (WebDataset splits keys at the first dot)
    path: Path  # the image file as it lies on disk
    label: float  # as given by the data set, on its own scale and direction
    std: float | None = None
    ref: str | None = None  # reference image id: the split unit of synthetic-distortion sets
    distortion: str | None = None
    level: int | None = None
    split: str | None = None  # official split ("train", "val", "test") when the data set has one


@dataclass
class Skipped:
    """A row or file that could not be used, and why."""

    where: str  # file (and row) the problem was found in
    reason: str


@dataclass
class DatasetInfo:
    name: str
    label_name: str  # "MOS", "DMOS", ...
    scale: tuple[float, float]
    higher_is_better: bool
    split_unit: str  # "image" or "reference"
    source: str = ""  # where the data set comes from, for the data set card


@dataclass
class Reader:
    info: DatasetInfo
    read: Callable[..., tuple[list[Record], list[Skipped]]]  # (root, **reader options)
    options: tuple[str, ...] = ()  # the reader options it takes (pack's --image_root for csv)
    notes: list[str] = field(default_factory=list)


class LayoutError(ValueError):
    """The root does not look like the data set's native layout (message names the file)."""


READERS: dict[str, Reader] = {}


def register(reader: Reader) -> Reader:
    READERS[reader.info.name] = reader
    return reader


def get_reader(name: str) -> Reader:
    # Importing the modules fills the registry; done lazily so `sources` stays cheap.
    from . import csiq, csvfile, demo, kadid, koniq, live, livec, spaq, tid2013  # noqa: F401

    if name not in READERS:
        raise LayoutError(f"unknown data set {name!r}; choose from {sorted(READERS)}")
    return READERS[name]
