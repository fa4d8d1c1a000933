"""SPAQ: 11,125 smartphone photographs with MOS on 0-100.

Layout: ``Annotations/MOS and Image attribute scores.xlsx`` (columns ``Image name``,
``MOS``, then five attribute scores) and ``TestImage/<name>``.
"""
from __future__ import annotations

from pathlib import Path

from . import DatasetInfo, Reader, Record, Skipped, register
from ._util import Collector, cell_text, sheet_rows

LABELS = Path("Annotations") / "MOS and Image attribute scores.xlsx"


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    out = Collector(Path(root) / LABELS)
    for row, cells in sheet_rows(out.label_file, ("Image name", "MOS")):
        name = cell_text(cells["Image name"])
        out.add(row, name, cells["MOS"], Path(root) / "TestImage" / name)
    return out.result()


register(Reader(
    info=DatasetInfo(name="spaq", label_name="MOS", scale=(0.0, 100.0), higher_is_better=True,
                     split_unit="image",
                     source="SPAQ (Fang et al., 2020), github.com/h4nwei/SPAQ"),
    read=read,
    notes=["images are large smartphone photos: pack with --resize short:512 as usual"],
))
