"""CSIQ: 866 distorted images of 30 references, six distortion types, DMOS 0-1.

Layout: labels in the official ``csiq.DMOS.xlsx`` (sheet ``all_by_image``, header row
``image, dst_idx, dst_type, dst_lev, dmos_std, dmos`` under a few title rows) or in
HyperIQA's ``csiq_label.txt`` (``1600.AWGN.1.png 0.062`` per line); distorted images
``dst_imgs/<type>/1600.AWGN.1.png`` (official) or ``dst_imgs_all/1600.AWGN.1.png``.
File names are matched whatever their case: type folders are lower case (``awgn``)
while names use the upper-case tokens (``AWGN``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from . import DatasetInfo, Reader, Record, Skipped, register
from ._util import (IMAGE_SUFFIXES, Collector, FileIndex, cell_text, first_dir, integer,
                    require_file, sheet_rows, text_rows)

WORKBOOK, TEXT = "csiq.DMOS.xlsx", "csiq_label.txt"
# dst_type in the workbook -> the token file names use for it
TOKENS = {"noise": "AWGN", "awgn": "AWGN", "jpeg": "JPEG", "jpeg 2000": "jpeg2000",
          "jpeg2000": "jpeg2000", "fnoise": "fnoise", "blur": "BLUR", "contrast": "contrast"}

Entry = tuple[int, str, Any, Any]  # row, image file name, dmos, dmos_std


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    root = Path(root)
    label_file = require_file(root / WORKBOOK, root / TEXT)
    images = first_dir(root / "dst_imgs", root / "dst_imgs_all")
    index = FileIndex(root / "dst_imgs", root / "dst_imgs_all")
    out = Collector(label_file)
    entries = _workbook(out) if label_file.name == WORKBOOK else _text(out)
    for row, name, dmos, std in entries:
        ref, token, level = _parts(name)
        if level is None:
            out.skip(row, f"image name {name!r} is not like 1600.AWGN.1.png")
            continue
        # the official release files each type in its own folder, named by the lower-case token
        default = images / token.lower() / name if images.name == "dst_imgs" else images / name
        out.add(row, name, dmos, index.find(name, default), std=std, ref=ref,
                distortion=token.lower(), level=level)
    return out.result()


def _parts(name: str) -> tuple[str, str, int | None]:
    """Reference, distortion token and level of a name like ``1600.AWGN.1.png``."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[0]:
        return "", "", None
    return parts[0], parts[1], integer(parts[2])


def _with_suffix(name: str) -> str:
    # HyperIQA's label file names images with or without their .png
    return name if Path(name).suffix.lower() in IMAGE_SUFFIXES else f"{name}.png"


def _text(out: Collector) -> Iterator[Entry]:
    for line, tokens in text_rows(out.label_file):
        if len(tokens) != 2:
            out.skip(line, f"expected 'name score', got {' '.join(tokens)!r}")
            continue
        yield line, _with_suffix(tokens[0]), tokens[1], None


def _workbook(out: Collector) -> Iterator[Entry]:
    rows = sheet_rows(out.label_file, ("image", "dst_type", "dst_lev", "dmos"),
                      optional=("dmos_std",), sheet="all_by_image")
    for row, cells in rows:
        image, kind = cell_text(cells["image"]), cell_text(cells["dst_type"]).lower()
        level = integer(cells["dst_lev"])
        if not image:
            out.skip(row, "empty image name")
        elif kind not in TOKENS:
            out.skip(row, f"unknown dst_type {cells['dst_type']!r}")
        elif level is None:
            out.skip(row, f"dst_lev {cells['dst_lev']!r} is not a whole number")
        else:
            yield row, f"{image}.{TOKENS[kind]}.{level}.png", cells["dmos"], cells["dmos_std"]


register(Reader(
    info=DatasetInfo(name="csiq", label_name="DMOS", scale=(0.0, 1.0), higher_is_better=False,
                     split_unit="reference",
                     source="CSIQ (Larson & Chandler, 2010), s2.smu.edu/~eclarson/csiq.html"),
    read=read,
    notes=[f"labels from {WORKBOOK} (sheet all_by_image) when present, else {TEXT}",
           "reference = the name up to its first dot; distortion = lower-case type token"],
))
