"""Miniature copies of every native IQA data set layout, for the reader and pack tests.

Each builder writes, under ``root``, the label files with their real names, columns and
keys, and a handful of tiny images (32x24) where the real data set keeps them; it
returns ``root``. Labels follow simple formulas (see each builder) so that tests can
name the value of any entry. Every labelled image is written, except in LIVE, whose
label files always hold 982 entries: ``images_per_folder`` says how many are on disk.

``LAYOUTS`` maps each reader's name to its builder.
"""
from __future__ import annotations

import csv
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import openpyxl
import scipy.io
from PIL import Image

FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".png": "PNG"}
KONIQ_SETS = ("training", "validation", "test")
# CSIQ: dst_type in the workbook, token in file names, folder in dst_imgs/
CSIQ_TYPES = (("noise", "AWGN", "awgn"), ("jpeg", "JPEG", "jpeg"),
              ("jpeg 2000", "jpeg2000", "jpeg2000"), ("fnoise", "fnoise", "fnoise"),
              ("blur", "BLUR", "blur"), ("contrast", "contrast", "contrast"))
CSIQ_REFS = ("1600", "bridge", "snow_leaves")
LIVE_FOLDERS = (("jp2k", 227), ("jpeg", 233), ("wn", 174), ("gblur", 174), ("fastfading", 174))
LIVE_REFS = tuple(f"ref{j:02d}.bmp" for j in range(29))


def image(path: Path) -> Path:
    """A tiny image whose pixels depend on its name; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=FORMATS[path.suffix.lower()])
    return path


def cell_array(strings: list[str], shape: tuple[int, int]) -> np.ndarray:
    """A MATLAB cell array of strings, as scipy.io.savemat writes one."""
    cells = np.empty(len(strings), dtype=object)
    cells[:] = strings
    return cells.reshape(shape)


def write_csv(path: Path, header: list[str], rows: list[list], quoted: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_NONNUMERIC if quoted else csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- authentic distortions


def koniq_name(i: int) -> str:
    return f"{1000000 + i}.jpg"


def make_koniq(root: Path, n: int = 6, official_split: bool = True,
               folder: str = "1024x768") -> Path:
    """Image i: MOS_zscore 10 + 12.5 i, MOS 1 + 0.5 i, SD 0.5 + 0.01 i, set KONIQ_SETS[i % 3]."""
    scores, sets = [], []
    for i in range(n):
        name = image(root / folder / koniq_name(i)).name
        dist, mos, sd, zscore = [0.0, 0.1, 0.2, 0.3, 0.4], 1 + 0.5 * i, 0.5 + 0.01 * i, 10 + 12.5 * i
        scores.append([name, *dist, 100, mos, sd, zscore])
        # the official sets file's MOS column holds the 0-100 values (as github.com/subpic/koniq)
        sets.append([name, *dist, 100, zscore, sd, KONIQ_SETS[i % 3]])
    head = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD"]
    write_csv(root / "koniq10k_scores_and_distributions.csv", head + ["MOS_zscore"], scores,
              quoted=True)
    if official_split:
        write_csv(root / "koniq10k_distributions_sets.csv", head + ["set"], sets)
    return root


def livec_names(n: int) -> list[str]:
    """The first 7 are the challenge's training images; one name has an upper-case suffix."""
    return [f"t{i + 1}.bmp" for i in range(7)] + [
        f"{100 + i}.JPG" if i == 8 else f"{100 + i}.bmp" for i in range(7, n)]


def make_livec(root: Path, n: int = 10, with_std: bool = True) -> Path:
    """Entry i (0-based): MOS 3 + 9 i, std 10 + i; entries 0-6 in Images/trainingImages/."""
    names = livec_names(n)
    for i, name in enumerate(names):
        image(root / "Images" / ("trainingImages" if i < 7 else "") / name)
    data = root / "Data"
    data.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(data / "AllImages_release.mat", {"AllImages_release": cell_array(names, (n, 1))})
    scipy.io.savemat(data / "AllMOS_release.mat", {"AllMOS_release": 3.0 + 9.0 * np.arange(n)[None]})
    if with_std:
        scipy.io.savemat(data / "AllStdDev_release.mat",
                         {"AllStdDev_release": 10.0 + np.arange(n)[None]})
    return root


def make_spaq(root: Path, n: int = 5) -> Path:
    """Image i: ``0000<i+1>.jpg``, MOS 20 + 10 i."""
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness",
                  "Sharpness"])
    for i in range(n):
        name = f"{i + 1:05d}.jpg"
        image(root / "TestImage" / name)
        sheet.append([name, 20.0 + 10 * i, 50.0, 51.0, 52.0, 53.0, 54.0])
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    book.save(root / "Annotations" / "MOS and Image attribute scores.xlsx")
    return root


# ---------------------------------------------------------------- synthetic distortions


def csiq_entries(n_refs: int, levels: int) -> list[tuple[str, int, str, str, str, int, float]]:
    """(ref, dst_idx, dst_type, token, folder, level, dmos) in workbook order."""
    return [(ref, t + 1, kind, token, folder, lev, round(0.1 * lev + 0.01 * t + 0.001 * r, 4))
            for r, ref in enumerate(CSIQ_REFS[:n_refs])
            for t, (kind, token, folder) in enumerate(CSIQ_TYPES)
            for lev in range(1, levels + 1)]


def make_csiq(root: Path, n_refs: int = 2, levels: int = 2, labels: str = "xlsx",
              images: str = "dst_imgs") -> Path:
    """DMOS of (ref r, type t, level l) = 0.1 l + 0.01 t + 0.001 r (t, r 0-based).

    ``labels``: "xlsx" (official csiq.DMOS.xlsx), "txt" (HyperIQA's csiq_label.txt) or
    "both"; ``images``: "dst_imgs" (official, one folder per type) or "dst_imgs_all".
    """
    entries = csiq_entries(n_refs, levels)
    for ref in CSIQ_REFS[:n_refs]:
        image(root / "src_imgs" / f"{ref}.png")
    for ref, _, _, token, folder, lev, _ in entries:
        name = f"{ref}.{token}.{lev}.png"
        image(root / images / (folder if images == "dst_imgs" else "") / name)
    if labels in ("xlsx", "both"):
        _csiq_workbook(root / "csiq.DMOS.xlsx", entries)
    if labels in ("txt", "both"):
        (root / "csiq_label.txt").write_text("".join(
            f"{ref}.{token}.{lev}.png {dmos}\n" for ref, _, _, token, _, lev, dmos in entries))
    return root


def _csiq_workbook(path: Path, entries: list) -> None:
    """ASSUMED layout of the official workbook (not verified against the file itself):
    a sheet ``all_by_image`` with title rows 1-3, the header in D4:I4 and one image per
    row from row 5; numeric reference names are numbers (1600), levels whole numbers.
    Another sheet comes first, so a reader must pick the sheet by name."""
    book = openpyxl.Workbook()
    book.active.title = "all_by_distortion"
    book.active.append(["dst_type", "dmos"])
    book.active.append(["noise", "not this sheet"])
    sheet = book.create_sheet("all_by_image")
    sheet["A1"], sheet["A2"] = "CSIQ DMOS", "sorted by image"
    rows = [("image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos")]
    rows += [(int(ref) if ref.isdigit() else ref, idx, kind, lev, 0.02, dmos)
             for ref, idx, kind, _, _, lev, dmos in entries]
    for r, values in enumerate(rows, start=4):
        for c, value in enumerate(values, start=4):
            sheet.cell(row=r, column=c, value=value)
    book.save(path)


def tid_name(ref: int, kind: int, level: int) -> str:
    return f"i{ref:02d}_{kind:02d}_{level}.bmp"


def tid_mos(ref: int, kind: int, level: int) -> float:
    return round(6.0 - 0.5 * level - 0.1 * kind + 0.01 * ref, 5)


def make_tid2013(root: Path, refs: tuple[int, ...] = (1, 2, 25), kinds: int = 2,
                 levels: int = 2) -> Path:
    """MOS of (ref, type, level) = tid_mos(...), std 0.1 * level; references I01.BMP ...,
    but the 25th is lower-case i25.bmp as in the real release."""
    lines, stds = [], []
    for ref in refs:
        image(root / "reference_images" / (f"i{ref}.bmp" if ref == 25 else f"I{ref:02d}.BMP"))
        for kind in range(1, kinds + 1):
            for level in range(1, levels + 1):
                name = tid_name(ref, kind, level)
                image(root / "distorted_images" / name)
                lines.append(f"{tid_mos(ref, kind, level)} {name}\n")
                stds.append(f"{0.1 * level:.5f}\n")
    (root / "mos_with_names.txt").write_text("".join(lines))
    (root / "mos_std.txt").write_text("".join(stds))
    return root


def make_kadid(root: Path, refs: int = 2, kinds: int = 2, levels: int = 2) -> Path:
    """dmos of (ref r, type t, level l) = 4.5 - 0.5 l + 0.1 t, var = 0.04 l (1-based)."""
    rows = []
    for r in range(1, refs + 1):
        image(root / "images" / f"I{r:02d}.png")
        for t in range(1, kinds + 1):
            for lev in range(1, levels + 1):
                name = f"I{r:02d}_{t:02d}_{lev:02d}.png"
                image(root / "images" / name)
                rows.append([name, f"I{r:02d}.png", round(4.5 - 0.5 * lev + 0.1 * t, 3), 0.04 * lev])
    write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return root


def live_entries() -> list[tuple[str, int]]:
    return [(folder, k) for folder, count in LIVE_FOLDERS for k in range(1, count + 1)]


def live_org(k: int) -> bool:
    """Every fifth image of a folder is marked as an undistorted copy (orgs == 1)."""
    return k % 5 == 0


def make_live(root: Path, realigned: bool = True, images_per_folder: int | None = 2) -> Path:
    """982 entries; entry i (0-based): DMOS 10 + 0.05 i, std 1 + 0.001 i, reference
    LIVE_REFS[i % 29]. ``images_per_folder`` images (all when None) exist in each folder."""
    root.mkdir(parents=True, exist_ok=True)
    entries = live_entries()
    dmos = np.round(10 + 0.05 * np.arange(len(entries)), 4)[None]
    orgs = np.array([[float(live_org(k)) for _, k in entries]])
    if realigned:
        labels = {"dmos_new": dmos, "orgs": orgs, "dmos_std": 1 + 0.001 * np.arange(len(entries))[None]}
        scipy.io.savemat(root / "dmos_realigned.mat", labels)
    else:
        scipy.io.savemat(root / "dmos.mat", {"dmos": dmos, "orgs": orgs})
    refs = [LIVE_REFS[i % len(LIVE_REFS)] for i in range(len(entries))]
    scipy.io.savemat(root / "refnames_all.mat", {"refnames_all": cell_array(refs, (1, len(refs)))})
    for ref in LIVE_REFS:
        image(root / "refimgs" / ref)
    for folder, k in entries:
        if images_per_folder is None or k <= images_per_folder:
            image(root / folder / f"img{k}.bmp")
    return root


# ---------------------------------------------------------------- generic


def make_csv(root: Path, n: int = 6) -> Path:
    """Image i: ``img/s<i>.png``, mos 50 + i, std 1, ref r<i // 2>, level i % 3 + 1; no split."""
    rows = []
    for i in range(n):
        name = f"img/s{i}.png"
        image(root / name)
        rows.append([name, 50 + i, 1.0, f"r{i // 2}", "blur", i % 3 + 1])
    write_csv(root / "labels.csv", ["name", "mos", "std", "ref", "distortion", "level"], rows)
    return root


LAYOUTS: dict[str, Callable[..., Path]] = {
    "koniq-10k": make_koniq, "livec": make_livec, "spaq": make_spaq, "csiq": make_csiq,
    "tid2013": make_tid2013, "kadid-10k": make_kadid, "live": make_live, "csv": make_csv,
}
