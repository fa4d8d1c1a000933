"""KADID-10k: 10,125 distorted images of 81 references, 25 distortion types x 5 levels.

Layout: ``dmos.csv`` (``dist_img, ref_img, dmos, var``) and ``images/`` holding both the
distorted (``I01_01_01.png``) and the reference images (``I01.png``). Despite its name
the ``dmos`` column is higher-is-better (1-5), and ``var`` already holds a standard
deviation (pyiqa copies it as ``std``).
"""
from __future__ import annotations

from pathlib import Path

from . import DatasetInfo, Reader, Record, Skipped, register
from ._util import Collector, csv_rows, make_key, number, synthetic_parts


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    root = Path(root)
    out = Collector(root / "dmos.csv")
    for line, row in csv_rows(out.label_file, ("dist_img", "ref_img", "dmos", "var")):
        name, ref = row["dist_img"], make_key(row["ref_img"])
        parts = synthetic_parts(name)
        if parts is None or not ref:
            out.skip(line, f"expected names like I01_01_01.png and I01.png, got {name!r}, "
                           f"{row['ref_img']!r}")
            continue
        _, kind, level = parts
        out.add(line, name, row["dmos"], root / "images" / name, std=_std(row["var"]), ref=ref,
                distortion=kind, level=level)
    return out.result()


def _std(var: str) -> float | None:
    value = number(var)
    return value if value is not None and value >= 0 else None


register(Reader(
    info=DatasetInfo(name="kadid-10k", label_name="DMOS", scale=(1.0, 5.0), higher_is_better=True,
                     split_unit="reference",
                     source="KADID-10k (Lin et al., 2019), "
                            "database.mmsp-kn.de/kadid-10k-database.html"),
    read=read,
    notes=["the dmos column is higher-is-better despite its name",
           "std = the var column as it is: it holds a standard deviation despite its name",
           "reference id = ref_img without its suffix (I01); distortion and level from the name"],
))
