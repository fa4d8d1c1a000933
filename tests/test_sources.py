"""Readers of the native data set layouts, on miniature copies of each (tests/layouts.py)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import scipy.io

from iqa_dist.sources import LayoutError, Record, get_reader

from layouts import (CSIQ_REFS, LAYOUTS, LIVE_REFS, csiq_entries, koniq_name, live_entries, live_org,
                      make_csiq, make_csv, make_kadid, make_koniq, make_live, make_livec, make_spaq,
                      make_tid2013, tid_mos, tid_name, write_csv)

NAMES = ("koniq-10k", "livec", "spaq", "csiq", "tid2013", "kadid-10k", "live", "csv")


def read(name: str, root: Path) -> tuple[dict[str, Record], list]:
    records, skipped = get_reader(name).read(root)
    by_key = {r.key: r for r in records}
    assert len(by_key) == len(records)
    return by_key, skipped


def reasons(skipped) -> dict[str, str]:
    """``where`` -> reason, with the label file's name in place of its path."""
    return {Path(s.where).name: s.reason for s in skipped}


# ---------------------------------------------------------------- every layout


@pytest.mark.parametrize("name", NAMES)
def test_keys_are_unique_safe_and_every_labelled_image_is_found(name, tmp_path):
    root = LAYOUTS[name](tmp_path / name)
    records, skipped = get_reader(name).read(root)
    assert records and not skipped
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", r.key) for r in records)
    on_disk = [r for r in records if r.path.is_file()]
    # LIVE's miniature holds 2 images per folder of its 982 labelled entries
    assert len(on_disk) == (10 if name == "live" else len(records))


@pytest.mark.parametrize("name", NAMES)
def test_missing_label_file_is_one_line_naming_it(name, tmp_path):
    expected = {"koniq-10k": "koniq10k_scores_and_distributions.csv",
                "livec": "Data/AllImages_release.mat",
                "spaq": "Annotations/MOS and Image attribute scores.xlsx", "csiq": "csiq.DMOS.xlsx",
                "tid2013": "mos_with_names.txt", "kadid-10k": "dmos.csv", "live": "dmos_realigned.mat",
                "csv": "labels.csv"}[name]
    with pytest.raises(LayoutError) as err:
        get_reader(name).read(tmp_path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(tmp_path / expected) in message


def test_directions_and_split_units():
    lower = {n for n in NAMES if not get_reader(n).info.higher_is_better}
    by_reference = {n for n in NAMES if get_reader(n).info.split_unit == "reference"}
    assert lower == {"csiq", "live"}  # KADID's "dmos" is higher-is-better
    assert by_reference == {"csiq", "tid2013", "kadid-10k", "live", "csv"}


def test_readers_do_not_import_torch_or_label_libraries():
    code = ("import sys; from iqa_dist.sources import get_reader\n"
            "for n in %r: get_reader(n)\n"
            "print(sorted(m for m in ('torch', 'scipy', 'openpyxl') if m in sys.modules))" % (NAMES,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- KonIQ-10k


def test_koniq_labels_std_and_official_split(tmp_path):
    records, _ = read("koniq-10k", make_koniq(tmp_path, n=6))
    assert len(records) == 6
    r = records["1000004"]
    assert r.label == 60.0 and r.std == pytest.approx(0.54)  # MOS_zscore and SD, not MOS
    assert r.path == tmp_path / "1024x768" / koniq_name(4)
    assert [records[f"{1000000 + i}"].split for i in range(6)] == ["train", "val", "test"] * 2


def test_koniq_without_split_file_and_only_512x384(tmp_path):
    records, _ = read("koniq-10k", make_koniq(tmp_path, n=3, official_split=False, folder="512x384"))
    assert all(r.split is None for r in records.values())
    assert records["1000001"].path == tmp_path / "512x384" / koniq_name(1)


def test_koniq_prefers_1024x768(tmp_path):
    make_koniq(tmp_path, n=2, folder="512x384")
    make_koniq(tmp_path, n=2)
    records, _ = read("koniq-10k", tmp_path)
    assert records["1000000"].path.parent.name == "1024x768"


def test_koniq_bad_rows_are_skipped(tmp_path):
    make_koniq(tmp_path, n=2)
    with open(tmp_path / "koniq10k_scores_and_distributions.csv", "a") as f:
        f.write('"1000009.jpg",0,0,0,0,0,100,3.0,0.5,n/a\n')
        f.write('"",0,0,0,0,0,100,3.0,0.5,50\n')
        f.write('"1000010.jpg",0,0,0,0,0,100,3.0,0.5,\n')
    records, skipped = read("koniq-10k", tmp_path)
    assert len(records) == 2
    assert reasons(skipped) == {"koniq10k_scores_and_distributions.csv:4": "label 'n/a' is not a number",
                                "koniq10k_scores_and_distributions.csv:5": "empty image name",
                                "koniq10k_scores_and_distributions.csv:6": "missing label"}


# ---------------------------------------------------------------- LIVE Challenge


def test_livec_excludes_the_training_images(tmp_path):
    records, _ = read("livec", make_livec(tmp_path, n=10))
    assert sorted(records) == ["107", "108", "109"]
    assert records["108"].path == tmp_path / "Images" / "108.JPG"
    assert (records["107"].label, records["107"].std) == (66.0, 17.0)


def test_livec_without_std_file_and_bad_mos(tmp_path):
    make_livec(tmp_path, n=10, with_std=False)
    mos = 3.0 + 9.0 * np.arange(10)[None]
    mos[0, 8] = np.nan
    scipy.io.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": mos})
    records, skipped = read("livec", tmp_path)
    assert sorted(records) == ["107", "109"] and records["107"].std is None
    assert reasons(skipped) == {"AllMOS_release.mat:9": "missing label"}


def test_livec_names_and_mos_of_different_lengths_is_a_layout_error(tmp_path):
    make_livec(tmp_path, n=10)
    scipy.io.savemat(tmp_path / "Data" / "AllMOS_release.mat", {"AllMOS_release": np.ones((1, 9))})
    with pytest.raises(LayoutError, match="AllMOS_release.mat.*9 entries, expected 10"):
        get_reader("livec").read(tmp_path)


# ---------------------------------------------------------------- SPAQ


def test_spaq_reads_the_workbook(tmp_path):
    make_spaq(tmp_path, n=5)
    path = tmp_path / "Annotations" / "MOS and Image attribute scores.xlsx"
    book = openpyxl.load_workbook(path)
    book.active.append(["00009.jpg", "bad"])
    book.active.append([None, 40.0])
    book.save(path)
    records, skipped = read("spaq", tmp_path)
    assert sorted(records) == [f"{i:05d}" for i in range(1, 6)]
    assert records["00003"].label == 40.0
    assert records["00003"].path == tmp_path / "TestImage" / "00003.jpg"
    assert reasons(skipped) == {"MOS and Image attribute scores.xlsx:7": "label 'bad' is not a number",
                                "MOS and Image attribute scores.xlsx:8": "empty image name"}


# ---------------------------------------------------------------- CSIQ


@pytest.mark.parametrize("labels", ["xlsx", "txt"])
def test_csiq_labels_refs_distortions(labels, tmp_path):
    records, _ = read("csiq", make_csiq(tmp_path, n_refs=2, levels=2, labels=labels))
    assert len(records) == len(csiq_entries(2, 2)) == 24
    assert {r.ref for r in records.values()} == set(CSIQ_REFS[:2])
    r = records["bridge_jpeg2000_2"]
    assert (r.ref, r.distortion, r.level, r.label) == ("bridge", "jpeg2000", 2, 0.221)
    # the folder is lower case, the name's token upper case
    assert records["1600_AWGN_1"].path == tmp_path / "dst_imgs" / "awgn" / "1600.AWGN.1.png"
    assert records["1600_AWGN_1"].std == (0.02 if labels == "xlsx" else None)


def test_csiq_label_formats_agree_and_the_workbook_wins(tmp_path):
    from_xlsx, _ = read("csiq", make_csiq(tmp_path / "a", labels="xlsx"))
    from_txt, _ = read("csiq", make_csiq(tmp_path / "b", labels="txt", images="dst_imgs_all"))
    assert {k: (r.label, r.ref, r.distortion, r.level) for k, r in from_xlsx.items()} == \
           {k: (r.label, r.ref, r.distortion, r.level) for k, r in from_txt.items()}
    assert from_txt["1600_BLUR_2"].path == tmp_path / "b" / "dst_imgs_all" / "1600.BLUR.2.png"
    root = make_csiq(tmp_path / "c", labels="both")
    (root / "csiq_label.txt").write_text("garbage\n")
    assert len(read("csiq", root)[0]) == 24


def test_csiq_finds_images_in_either_folder_whatever_their_case(tmp_path):
    make_csiq(tmp_path, labels="xlsx", images="dst_imgs_all")
    (tmp_path / "dst_imgs" / "awgn").mkdir(parents=True)  # an empty official folder beside
    all_ = tmp_path / "dst_imgs_all"
    (all_ / "1600.JPEG.1.png").rename(all_ / "1600.jpeg.1.png")
    records, _ = read("csiq", tmp_path)
    assert records["1600_JPEG_1"].path == all_ / "1600.jpeg.1.png"
    assert records["bridge_AWGN_2"].path == all_ / "bridge.AWGN.2.png"


def test_csiq_text_names_without_suffix_and_bad_lines(tmp_path):
    make_csiq(tmp_path, labels="txt", images="dst_imgs_all")
    with open(tmp_path / "csiq_label.txt", "a") as f:
        f.write("bridge.BLUR.9 0.5\nbridge.BLUR.3.png x\njust_a_name\nbridge.png 0.1\n")
    records, skipped = read("csiq", tmp_path)
    assert records["bridge_BLUR_9"].path == tmp_path / "dst_imgs_all" / "bridge.BLUR.9.png"
    assert reasons(skipped) == {
        "csiq_label.txt:26": "label 'x' is not a number",
        "csiq_label.txt:27": "expected 'name score', got 'just_a_name'",
        "csiq_label.txt:28": "image name 'bridge.png' is not like 1600.AWGN.1.png"}


def test_csiq_workbook_bad_rows(tmp_path):
    make_csiq(tmp_path, labels="xlsx")
    path = tmp_path / "csiq.DMOS.xlsx"
    book = openpyxl.load_workbook(path)
    sheet = book["all_by_image"]
    for values in (("bridge", 1, "noise", 3, 0.1, "x"), ("bridge", 1, "warp", 1, 0.1, 0.3),
                   (None, 1, "noise", 1, 0.1, 0.3), ("bridge", 1, "noise", 1.5, 0.1, 0.3)):
        row = sheet.max_row + 1
        for c, value in enumerate(values, start=4):
            sheet.cell(row=row, column=c, value=value)
    book.save(path)
    records, skipped = read("csiq", tmp_path)
    assert len(records) == 24  # header on row 4, 24 entries on rows 5-28
    assert reasons(skipped) == {"csiq.DMOS.xlsx:29": "label 'x' is not a number",
                                "csiq.DMOS.xlsx:30": "unknown dst_type 'warp'",
                                "csiq.DMOS.xlsx:31": "empty image name",
                                "csiq.DMOS.xlsx:32": "dst_lev 1.5 is not a whole number"}


def test_csiq_needs_an_image_folder(tmp_path):
    (tmp_path / "csiq_label.txt").write_text("1600.AWGN.1.png 0.1\n")
    with pytest.raises(LayoutError, match="dst_imgs"):
        get_reader("csiq").read(tmp_path)


# ---------------------------------------------------------------- TID2013


def test_tid2013_refs_types_levels_std(tmp_path):
    records, _ = read("tid2013", make_tid2013(tmp_path, refs=(1, 2, 25), kinds=2, levels=2))
    assert len(records) == 12
    assert {r.ref for r in records.values()} == {"01", "02", "25"}
    r = records["i25_02_1"]
    assert (r.ref, r.distortion, r.level) == ("25", "02", 1)
    assert r.label == tid_mos(25, 2, 1) and r.std == pytest.approx(0.1)


def test_tid2013_name_case_and_bad_lines(tmp_path):
    make_tid2013(tmp_path, refs=(1, 25), kinds=1, levels=1)
    # a name given in upper case, and a file whose case differs from the label file's
    (tmp_path / "mos_with_names.txt").write_text(
        f"5.0 I25_01_1.BMP\n4.0 {tid_name(1, 1, 1)}\nabc i01_02_1.bmp\n3.0\n2.0 weird.bmp\n")
    (tmp_path / "mos_std.txt").write_text("0.1\n0.2\n0.3\n0.4\n0.5\n")
    disk = tmp_path / "distorted_images"
    (disk / tid_name(1, 1, 1)).rename(disk / "I01_01_1.BMP")
    records, skipped = read("tid2013", tmp_path)
    assert (records["i25_01_1"].ref, records["i01_01_1"].ref) == ("25", "01")
    assert records["i25_01_1"].path == disk / "i25_01_1.bmp"
    assert records["i01_01_1"].path == disk / "I01_01_1.BMP"
    assert (records["i25_01_1"].std, records["i01_01_1"].std) == (0.1, 0.2)
    assert reasons(skipped) == {"mos_with_names.txt:3": "label 'abc' is not a number",
                                "mos_with_names.txt:4": "expected 'MOS i01_01_1.bmp', got '3.0'",
                                "mos_with_names.txt:5": "expected 'MOS i01_01_1.bmp', got '2.0 weird.bmp'"}


def test_tid2013_keys_are_lower_case_whatever_the_label_file_writes(tmp_path):
    make_tid2013(tmp_path, refs=(1, 25), kinds=2, levels=1)
    labels = tmp_path / "mos_with_names.txt"
    rows = [line.split() for line in labels.read_text().splitlines()]
    # the real file mixes i01_.. and I01_.. names; the files on disk stay lower case
    labels.write_text("".join(f"{mos} {name.upper() if i % 2 else name}\n"
                              for i, (mos, name) in enumerate(rows)))
    records, skipped = read("tid2013", tmp_path)
    assert not skipped and sorted(records) == ["i01_01_1", "i01_02_1", "i25_01_1", "i25_02_1"]
    assert {r.ref for r in records.values()} == {"01", "25"}
    disk = tmp_path / "distorted_images"
    assert all(r.path == disk / f"{key}.bmp" and r.path.exists() for key, r in records.items())
    # one image written in two cases is one key, not two records that could land in two splits
    labels.write_text("5.0 i01_01_1.bmp\n4.0 I01_01_1.BMP\n")
    (tmp_path / "mos_std.txt").unlink()
    with pytest.raises(LayoutError, match="both give the key 'i01_01_1'"):
        get_reader("tid2013").read(tmp_path)


# ---------------------------------------------------------------- KADID-10k


def test_kadid_var_column_is_the_std_as_it_is(tmp_path):
    records, _ = read("kadid-10k", make_kadid(tmp_path, refs=2, kinds=2, levels=2))
    assert len(records) == 8 and {r.ref for r in records.values()} == {"I01", "I02"}
    r = records["I02_01_02"]
    assert (r.distortion, r.level, r.label) == ("01", 2, 3.6)
    assert r.std == pytest.approx(0.08)  # a standard deviation despite the name: no sqrt
    assert r.path == tmp_path / "images" / "I02_01_02.png"


def test_kadid_bad_rows(tmp_path):
    make_kadid(tmp_path, refs=1, kinds=1, levels=1)
    with open(tmp_path / "dmos.csv", "a") as f:
        f.write("I01_01_02.png,I01.png,,0.1\nI01_01_03.png,I01.png,4.0,-1\nodd.png,I01.png,4.0,0.1\n")
    records, skipped = read("kadid-10k", tmp_path)
    assert sorted(records) == ["I01_01_01", "I01_01_03"] and records["I01_01_03"].std is None
    assert reasons(skipped) == {
        "dmos.csv:3": "missing label",
        "dmos.csv:5": "expected names like I01_01_01.png and I01.png, got 'odd.png', 'I01.png'"}


# ---------------------------------------------------------------- LIVE


@pytest.mark.parametrize("realigned", [True, False])
def test_live_folder_order_orgs_and_refs(realigned, tmp_path):
    records, _ = read("live", make_live(tmp_path, realigned=realigned))
    entries = live_entries()
    assert len(entries) == 982
    assert len(records) == sum(not live_org(k) for _, k in entries) == 789
    assert "jp2k_img5" not in records and "wn_img170" not in records  # orgs == 1
    for i in (0, 226, 227, 460, 981):  # first and last of the folders around the boundaries
        folder, k = entries[i]
        r = records[f"{folder}_img{k}"]
        assert r.path == tmp_path / folder / f"img{k}.bmp" and r.distortion == folder
        assert r.label == pytest.approx(10 + 0.05 * i)
        assert r.ref == LIVE_REFS[i % 29].removesuffix(".bmp")
        assert r.std == (pytest.approx(1 + 0.001 * i) if realigned else None)


def test_live_nan_dmos_is_skipped_and_short_arrays_are_a_layout_error(tmp_path):
    make_live(tmp_path, images_per_folder=0)
    path = tmp_path / "dmos_realigned.mat"
    labels = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    labels["dmos_new"][0, 1] = np.nan
    scipy.io.savemat(path, labels)
    _, skipped = read("live", tmp_path)
    assert reasons(skipped) == {"dmos_realigned.mat:2": "missing label"}
    scipy.io.savemat(tmp_path / "refnames_all.mat", {"refnames_all": np.array([["a.bmp"]], dtype=object)})
    with pytest.raises(LayoutError, match="refnames_all.mat.*1 entries, expected 982"):
        get_reader("live").read(tmp_path)


# ---------------------------------------------------------------- generic csv


def test_csv_columns_split_and_scale(tmp_path):
    rows = [["a/x.png", 2.5, "", "r1", "train", "blur", "2"], ["a/y.png", 7.5, "0.5", "", "VAL", "", ""],
            ["a/z.png", 5, "", "r1", "holdout", "", ""], ["a/w.png", "?", "", "", "", "", ""]]
    write_csv(tmp_path / "labels.csv", ["name", "mos", "std", "ref", "split", "distortion", "level"], rows)
    reader = get_reader("csv")
    records, skipped = read("csv", tmp_path)
    x, y = records["x"], records["y"]
    assert (x.path, x.ref, x.split, x.distortion, x.level, x.std) == (
        tmp_path / "a" / "x.png", "r1", "train", "blur", 2, None)
    assert (y.ref, y.split, y.std, y.level) == (None, "val", 0.5, None)
    assert reasons(skipped) == {"labels.csv:4": "unknown split 'holdout' (use train, val or test)",
                                "labels.csv:5": "label '?' is not a number"}
    assert reader.info.scale == (2.5, 7.5) and reader.info.higher_is_better


def test_csv_key_collision_is_a_layout_error(tmp_path):
    write_csv(tmp_path / "labels.csv", ["name", "mos"], [["a/x.png", 1], ["b/x.png", 2]])
    with pytest.raises(LayoutError, match="'a/x.png' and 'b/x.png' both give the key 'x'"):
        get_reader("csv").read(tmp_path)


def test_csv_needs_its_columns(tmp_path):
    write_csv(tmp_path / "labels.csv", ["file", "score"], [["x.png", 1]])
    with pytest.raises(LayoutError, match="labels.csv: needs the columns name, mos; missing name, mos"):
        get_reader("csv").read(tmp_path)


def test_csv_builder_keeps_refs(tmp_path):
    records, _ = read("csv", make_csv(tmp_path, n=4))
    assert [records[f"s{i}"].ref for i in range(4)] == ["r0", "r0", "r1", "r1"]


# ---------------------------------------------------------------- corrupt label files


@pytest.mark.parametrize("name, path", [
    ("livec", "Data/AllImages_release.mat"), ("live", "dmos_realigned.mat"),
    ("spaq", "Annotations/MOS and Image attribute scores.xlsx"), ("csiq", "csiq.DMOS.xlsx"),
    ("kadid-10k", "dmos.csv"), ("tid2013", "mos_with_names.txt")])
def test_corrupt_label_file_is_a_layout_error_naming_it(name, path, tmp_path):
    root = LAYOUTS[name](tmp_path)
    (root / path).write_bytes(b"\x00\xff\xfe garbage " * 50)
    with pytest.raises(LayoutError) as err:
        get_reader(name).read(root)
    assert str(root / path) in str(err.value) and len(str(err.value).splitlines()) == 1
