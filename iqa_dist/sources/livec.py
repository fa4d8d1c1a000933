"""LIVE In the Wild Image Quality Challenge (LIVE-C): 1,162 authentically distorted photos.

Layout: ``Data/AllImages_release.mat`` (cell of file names), ``Data/AllMOS_release.mat``,
optionally ``Data/AllStdDev_release.mat``, and ``Images/<name>``. The first 7 entries
are the challenge's training images (in ``Images/trainingImages/``) and are excluded,
as in the original protocol.
"""
from __future__ import annotations

from pathlib import Path

from . import DatasetInfo, Reader, Record, Skipped, register
from ._util import Collector, check_length, load_mat, mat_numbers, mat_strings

N_TRAINING = 7


def read(root: Path) -> tuple[list[Record], list[Skipped]]:
    data = Path(root) / "Data"
    names_file, mos_file = data / "AllImages_release.mat", data / "AllMOS_release.mat"
    names = mat_strings(load_mat(names_file, "AllImages_release")["AllImages_release"])
    mos = mat_numbers(load_mat(mos_file, "AllMOS_release")["AllMOS_release"], mos_file,
                      "AllMOS_release")
    check_length(mos_file, "AllMOS_release", mos, len(names))
    stds = _stds(data / "AllStdDev_release.mat", len(names))
    out = Collector(mos_file)
    for i in range(N_TRAINING, len(names)):
        out.add(i + 1, names[i], mos[i], Path(root) / "Images" / names[i], std=stds[i])
    return out.result()


def _stds(path: Path, n: int) -> list[float | None]:
    if not path.is_file():
        return [None] * n
    stds = mat_numbers(load_mat(path, "AllStdDev_release")["AllStdDev_release"], path,
                       "AllStdDev_release")
    check_length(path, "AllStdDev_release", stds, n)
    return list(stds)


register(Reader(
    info=DatasetInfo(name="livec", label_name="MOS", scale=(0.0, 100.0), higher_is_better=True,
                     split_unit="image",
                     source="LIVE In the Wild Image Quality Challenge (Ghadiyaram & Bovik, 2016)"),
    read=read,
    notes=[f"the first {N_TRAINING} entries (Images/trainingImages/) are excluded",
           "std from Data/AllStdDev_release.mat when present"],
))
