"""Helpers the readers share: label files in, :class:`Record` rows out.

Library calls on label files (scipy.io, openpyxl, csv) are wrapped so that a corrupt or
foreign file becomes one :class:`LayoutError` line naming the file, never a traceback.
scipy and openpyxl are imported on first use: listing the readers stays cheap.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import LayoutError, Record, Skipped

IMAGE_SUFFIXES = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".webp"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "test": "test", "testing": "test"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SYNTHETIC = re.compile(r"[iI](\d+)_(\d+)_(\d+)")
_HEADER_SEARCH_ROWS = 20  # spreadsheets put titles above the header row


def require_file(path: Path, *alternatives: Path) -> Path:
    """The first of ``path`` and ``alternatives`` that exists, else a LayoutError naming them."""
    return _first(Path.is_file, (path, *alternatives), "label file not found",
                  "; is --root the data set as downloaded?")


def first_dir(path: Path, *alternatives: Path) -> Path:
    """The first of ``path`` and ``alternatives`` that is a folder, else a LayoutError."""
    return _first(Path.is_dir, (path, *alternatives), "image folder not found")


def _first(test: Callable[[Path], bool], candidates: tuple[Path, ...], missing: str, hint: str = "") -> Path:
    found = next((c for c in candidates if test(c)), None)
    if found is None:
        also = "".join(f" (nor {p})" for p in candidates[1:])
        raise LayoutError(f"{candidates[0]}: {missing}{also}{hint}")
    return found


def make_key(name: str) -> str:
    """A WebDataset key from an image name: the file name without its image suffix, with dots,
    slashes and anything else a file system or WebDataset could trip on replaced by ``_``."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = base.rpartition(".")
    if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
        base = stem
    return _UNSAFE.sub("_", base)


def synthetic_parts(name: str) -> tuple[str, str, int] | None:
    """Reference number, distortion type and level of a TID2013/KADID-10k name
    (``i01_03_2.bmp``, ``I01_03_02.png``); None for any other name."""
    match = _SYNTHETIC.fullmatch(make_key(name))
    return (match[1], match[2], int(match[3])) if match else None


def _float(value: Any) -> float | None:
    """A float from a cell or token, NaN and infinities included; None for blanks and text."""
    if isinstance(value, bool):
        return None
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        return None


def number(value: Any) -> float | None:
    """A finite float from a cell or token; None for blanks, text, NaN and infinities."""
    out = _float(value)
    return out if out is not None and math.isfinite(out) else None


def _label_problem(label: Any) -> str:
    """Why ``label`` is no usable label, in a few words."""
    if (value := _float(label)) is not None and math.isinf(value):
        return f"label {label!r} is infinite"
    # NaN is how MATLAB files leave a label out
    text = isinstance(label, str) and label.strip()
    return f"label {label!r} is not a number" if text else "missing label"


def leaves_root(name: str) -> bool:
    """Whether an image name from a label file points outside the data set's folder
    (``../x.jpg``, ``/data/x.jpg``): a label file must not pull in arbitrary files."""
    return os.path.isabs(name) or os.path.normpath(name).split("/", 1)[0] == ".."


def integer(value: Any) -> int | None:
    out = number(value)
    return int(out) if out is not None and out.is_integer() else None


def cell_text(value: Any) -> str:
    """A spreadsheet cell as text; whole numbers lose the ``.0`` Excel gives them (1600.0)."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass
class Collector:
    """Records and skipped rows of one label file, with the checks every reader needs."""

    label_file: Path
    records: list[Record] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    _owner: dict[str, str] = field(default_factory=dict)

    def skip(self, row: int | str, reason: str) -> None:
        self.skipped.append(Skipped(where=f"{self.label_file}:{row}", reason=reason))

    def add(self, row: int | str, name: str, label: Any, path: Path, key: str | None = None,
            std: Any = None, **fields: Any) -> None:
        """Add one image, or skip the row when its name or label is unusable."""
        if not name:
            return self.skip(row, "empty image name")
        value = number(label)
        if value is None:
            return self.skip(row, _label_problem(label))
        key = key or make_key(name)
        if not key:
            return self.skip(row, f"no usable key in the name {name!r}")
        if key in self._owner:
            raise LayoutError(f"{self.label_file}: {self._owner[key]!r} and {name!r} "
                              f"both give the key {key!r}")
        self._owner[key] = name
        self.records.append(Record(key=key, path=path, label=value, std=number(std), **fields))

    def result(self) -> tuple[list[Record], list[Skipped]]:
        return self.records, self.skipped


class FileIndex:
    """Image files under some folders, found by name whatever its case: downloads differ."""

    def __init__(self, *folders: Path) -> None:
        self._files: dict[str, Path] = {}
        for folder in folders:
            for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
                self._files.setdefault(path.name.lower(), path)

    def find(self, name: str, default: Path) -> Path:
        """The file called ``name`` (any case), or ``default`` for pack to report as missing."""
        return self._files.get(name.lower(), default)


# ---------------------------------------------------------------- text and csv


def read_text(path: Path) -> str:
    try:
        return require_file(path).read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as err:
        raise LayoutError(f"{path}: not a readable text file ({err})") from None


def text_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated tokens) of every non-blank line."""
    lines = read_text(path).splitlines()
    return [(i, line.split()) for i, line in enumerate(lines, 1) if line.strip()]


def csv_rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of a csv file with a header naming at least ``required``."""
    # the csv module splits the rows itself: a quoted name may hold a newline
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise LayoutError(f"{path}: not a readable csv file ({err})") from None
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in required if c not in header]
    if missing:
        raise LayoutError(f"{path}: needs the columns {', '.join(required)}; "
                          f"missing {', '.join(missing)} (found {', '.join(header) or 'nothing'})")
    # DictReader files surplus fields in a list under the key None, short rows' fields as None
    return [(line, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
            for line, row in rows]


# ---------------------------------------------------------------- xlsx


def sheet_rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = (),
               sheet: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(spreadsheet row number, row) below the first row that names every ``required`` column
    (case-insensitive); ``sheet`` is used when the workbook has it, else the first sheet.
    Rows hold the required and the ``optional`` columns (None where the header lacks one)."""
    cells = _sheet_cells(require_file(path), sheet)
    top, columns = _header(cells, required + optional, required, path)
    out = []
    for row_no, row in enumerate(cells[top + 1:], top + 2):
        values = {c: row[i] if i is not None and i < len(row) else None for c, i in columns.items()}
        if any(v not in (None, "") for v in values.values()):  # blank rows pad sheets
            out.append((row_no, values))
    return out


def _header(cells: list[tuple[Any, ...]], wanted: tuple[str, ...], required: tuple[str, ...],
            path: Path) -> tuple[int, dict[str, int | None]]:
    """Index of the header row and the column of each wanted name in it."""
    for top, row in enumerate(cells[:_HEADER_SEARCH_ROWS]):
        names = [cell_text(c).lower() for c in row]
        if all(c.lower() in names for c in required):
            return top, {c: names.index(c.lower()) if c.lower() in names else None for c in wanted}
    raise LayoutError(f"{path}: no header row with the columns {', '.join(required)}")


def _sheet_cells(path: Path, sheet: str | None) -> list[tuple[Any, ...]]:
    import openpyxl

    # openpyxl raises many unrelated types for a corrupt or foreign file
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            ws = book[sheet] if sheet in book.sheetnames else book.worksheets[0]
            ws.reset_dimensions()  # some writers record a wrong sheet size, cutting rows off
            return list(ws.iter_rows(values_only=True))
        finally:
            book.close()
    except Exception as err:  # noqa: BLE001
        raise LayoutError(f"{path}: not a readable .xlsx workbook "
                          f"({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------- MATLAB


def load_mat(path: Path, *keys: str) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB file."""
    import scipy.io

    require_file(path)
    # scipy.io raises many unrelated types for a corrupt, foreign or v7.3 (HDF5) file
    try:
        data = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001
        raise LayoutError(f"{path}: not a readable MATLAB file "
                          f"({type(err).__name__}: {err})") from None
    for key in keys:
        if key not in data:
            found = ", ".join(k for k in data if not k.startswith("__")) or "nothing"
            raise LayoutError(f"{path}: no variable {key!r} (found {found})")
    return {key: data[key] for key in keys}


def mat_strings(value: np.ndarray) -> list[str]:
    """A MATLAB cell array of strings (each cell a nested array) as Python strings."""
    return [_cell_string(cell) for cell in np.asarray(value, dtype=object).ravel()]


def _cell_string(cell: Any) -> str:
    while isinstance(cell, np.ndarray):
        if cell.size == 0:
            return ""
        cell = cell.ravel()[0]
    return str(cell).strip()


def mat_numbers(value: np.ndarray, path: Path, key: str) -> np.ndarray:
    """A MATLAB numeric array as a flat float array (NaN stays, for the row to be skipped)."""
    try:
        return np.asarray(value, dtype=float).ravel()
    except (TypeError, ValueError):
        raise LayoutError(f"{path}: variable {key!r} is not numeric") from None


def check_length(path: Path, key: str, values: np.ndarray | list, expected: int) -> None:
    if len(values) != expected:
        raise LayoutError(f"{path}: {key!r} has {len(values)} entries, expected {expected}")
