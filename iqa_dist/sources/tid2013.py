"""TID2013: 3,000 distorted images of 25 references, 24 distortion types x 5 levels.

Layout: ``mos_with_names.txt`` (``5.51429 i01_01_1.bmp`` per line), optionally
``mos_std.txt`` (one value per line, same order), images in ``distorted_images/``.
The reference id is characters 2-3 of the name (``i01_01_1`` -> ``01``), whatever the
case of its first letter (the 25th reference is ``i25.bmp`` while the others are ``I01.BMP``).
The label file too writes both ``i01_..`` and ``I01_..``: keys are lower case, so that an
image has one key however it is written; its file is found whatever the case on disk.
"""
from __future__ import annotations

from pathlib import Path

from . import DatasetInfo, LayoutError, Reader, Record, Skipped, register
from ._util import Collector, FileIndex, make_key, synthetic_parts, text_rows


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    root = Path(root)
    out = Collector(root / "mos_with_names.txt")
    rows = text_rows(out.label_file)
    stds = _stds(root / "mos_std.txt", len(rows))
    index = FileIndex(root / "distorted_images")
    for (line, tokens), std in zip(rows, stds):
        parts = synthetic_parts(tokens[1]) if len(tokens) == 2 else None
        if parts is None:
            out.skip(line, f"expected 'MOS i01_01_1.bmp', got {' '.join(tokens)!r}")
            continue
        ref, kind, level = parts
        name = tokens[1]
        out.add(line, name, tokens[0], index.find(name, root / "distorted_images" / name),
                key=make_key(name).lower(), std=std, ref=ref, distortion=kind, level=level)
    return out.result()


def _stds(path: Path, n: int) -> list[str | None]:
    if not path.is_file():
        return [None] * n
    stds = [tokens[0] for _, tokens in text_rows(path)]
    if len(stds) != n:
        raise LayoutError(f"{path}: {len(stds)} values for {n} lines of mos_with_names.txt")
    return stds


register(Reader(
    info=DatasetInfo(name="tid2013", label_name="MOS", scale=(0.0, 9.0), higher_is_better=True,
                     split_unit="reference",
                     source="TID2013 (Ponomarenko et al., 2015), ponomarenko.info/tid2013.htm"),
    read=read,
    notes=["key = the name in lower case (the label file mixes i01_ and I01_)",
           "reference id = characters 2-3 of the name; distortion = type number, level = level",
           "std from mos_std.txt when present"],
))
