"""LIVE Image Quality Assessment Database, Release 2: 779 distorted images of 29 references.

Layout: ``dmos_realigned.mat`` (``dmos_new``, ``orgs``, ``dmos_std``) or the older
``dmos.mat`` (``dmos``, ``orgs``), ``refnames_all.mat`` (``refnames_all``), each with 982
entries in folder order jp2k (227), jpeg (233), wn (174), gblur (174), fastfading (174);
entry k of a folder is ``<folder>/img<k>.bmp``. ``orgs == 1`` marks an undistorted copy
of the reference, which is excluded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from . import DatasetInfo, Reader, Record, Skipped, register
from ._util import Collector, check_length, load_mat, make_key, mat_numbers, mat_strings, require_file

FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
ENTRIES = sum(count for _, count in FOLDERS)
# label file -> its (DMOS, std) variables; the realigned release is preferred
KEYS = {"dmos_realigned.mat": ("dmos_new", "dmos_std"), "dmos.mat": ("dmos", None)}


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    root = Path(root)
    label_file = require_file(*(root / name for name in KEYS))
    dmos, orgs, stds = _labels(label_file)
    refs_file = root / "refnames_all.mat"
    refs = mat_strings(load_mat(refs_file, "refnames_all")["refnames_all"])
    check_length(refs_file, "refnames_all", refs, ENTRIES)
    out = Collector(label_file)
    for i, (folder, k) in enumerate(entries()):
        if orgs[i] == 1:
            continue
        out.add(i + 1, f"img{k}.bmp", dmos[i], root / folder / f"img{k}.bmp", key=f"{folder}_img{k}",
                std=stds[i], ref=make_key(refs[i]) or None, distortion=folder)
    return out.result()


def entries() -> Iterator[tuple[str, int]]:
    """(folder, image number) of the 982 entries, in the order of the label files."""
    for folder, count in FOLDERS:
        for k in range(1, count + 1):
            yield folder, k


def _labels(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dmos_key, std_key = KEYS[path.name]
    keys = (dmos_key, "orgs") + ((std_key,) if std_key else ())
    raw = load_mat(path, *keys)
    arrays = {key: mat_numbers(raw[key], path, key) for key in keys}
    for key, values in arrays.items():
        check_length(path, key, values, ENTRIES)
    stds = arrays[std_key] if std_key else np.full(ENTRIES, np.nan)
    return arrays[dmos_key], arrays["orgs"], stds


register(Reader(
    info=DatasetInfo(name="live", label_name="DMOS", scale=(0.0, 100.0), higher_is_better=False,
                     split_unit="reference",
                     source="LIVE IQA Database Release 2 (Sheikh et al., 2006), live.ece.utexas.edu"),
    read=read,
    notes=["labels from dmos_realigned.mat (dmos_new, dmos_std) when present, else dmos.mat",
           "entries with orgs == 1 (undistorted copies of the references) are excluded",
           "key = <folder>_img<k>: image numbers restart in every folder"],
))
