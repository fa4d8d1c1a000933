"""KonIQ-10k: 10,073 in-the-wild photographs, crowd-rated.

Layout: ``koniq10k_scores_and_distributions.csv`` (``image_name, c1..c5, c_total, MOS, SD,
MOS_zscore``) beside ``1024x768/`` (or only ``512x384/``); optionally the official split
``koniq10k_distributions_sets.csv`` (column ``set``: training/validation/test).
"""
from __future__ import annotations

from pathlib import Path

from . import DatasetInfo, LayoutError, Reader, Record, Skipped, register
from ._util import SPLIT_NAMES, Collector, csv_rows, first_dir

SCORES = "koniq10k_scores_and_distributions.csv"
SETS = "koniq10k_distributions_sets.csv"


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    root = Path(root)
    out = Collector(root / SCORES)
    rows = csv_rows(out.label_file, ("image_name", "MOS_zscore", "SD"))
    images = first_dir(root / "1024x768", root / "512x384")
    splits = official_split(root / SETS)
    for line, row in rows:
        name = row["image_name"]
        out.add(line, name, row["MOS_zscore"], images / name, std=row["SD"],
                split=splits.get(name))
    return out.result()


def official_split(path: Path) -> dict[str, str]:
    """image name -> train/val/test; empty when the sets file is not there."""
    if not path.is_file():
        return {}
    split = {}
    for line, row in csv_rows(path, ("image_name", "set")):
        if row["set"].lower() not in SPLIT_NAMES:
            raise LayoutError(f"{path}:{line}: unknown set {row['set']!r}")
        split[row["image_name"]] = SPLIT_NAMES[row["set"].lower()]
    return split


register(Reader(
    info=DatasetInfo(name="koniq-10k", label_name="MOS_zscore", scale=(0.0, 100.0),
                     higher_is_better=True, split_unit="image",
                     source="KonIQ-10k (Hosu et al., 2020), "
                            "database.mmsp-kn.de/koniq-10k-database.html"),
    read=read,
    notes=["label: MOS_zscore (0-100), what HyperIQA trains on",
           "std: the file's SD, which is on MOS's 1-5 scale, not on the label's 0-100",
           f"official split from {SETS} when present (training/validation/test -> train/val/test)"],
))
