"""Packing: shards + manifest + splits, bad input, resume after a crash, the demo set."""
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from iqa_dist.data.manifest import COLUMNS
from iqa_dist.pack import PackOptions, main, pack, verify
from iqa_dist.sources import demo

from conftest import make_csv_set


def _manifest(out):
    return pq.read_table(out / "manifest.parquet").to_pylist()


def test_manifest_info_and_card(small_shards):
    rows = _manifest(small_shards)
    assert len(rows) == 24 and len({r["key"] for r in rows}) == 24
    assert set(rows[0]) == {*COLUMNS, "split_0", "split_1"}  # the documented schema, no more
    info = json.loads((small_shards / "_info.json").read_text())
    for name in ("train", "val", "test"):
        split = info["splits"][name]
        assert split["num_samples"] == sum(r["split_0"] == name for r in rows) == sum(split["shard_lengths"])
    card = json.loads((small_shards / "card.json").read_text())
    assert card["num_images"] == 24 and card["higher_is_better"] is True
    assert verify(small_shards) == []


def test_splits_never_share_a_reference(small_shards):
    rows = _manifest(small_shards)
    for column in ("split_0", "split_1"):
        owner = {}
        for r in rows:
            assert owner.setdefault(r["ref"], r[column]) == r[column]
        assert set(owner.values()) == {"train", "val", "test"}


def test_original_bytes_are_kept(small_shards):
    rows = _manifest(small_shards)
    row = rows[0]
    import tarfile
    with tarfile.open(small_shards / row["shard"]) as tar:
        data = tar.extractfile(f"{row['key']}.{row['format']}").read()
    assert data == Path(row["path"]).read_bytes()


def test_resize_stores_lossless(tmp_path):
    root = make_csv_set(tmp_path / "src", n_refs=3, per_ref=1)
    out = tmp_path / "out"
    pack("csv", root, out, PackOptions(resize="short:100", rounds=1), workers=0)
    row = _manifest(out)[0]
    assert row["format"] == "png" and min(row["width"], row["height"]) == 100


def _write_bad_set(root: Path) -> None:
    make_csv_set(root, n_refs=4, per_ref=1)
    img = root / "img"
    rgb = np.random.default_rng(0).integers(0, 255, (240, 240, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(img / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(img / "grey.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(img / "deep16.png")
    Image.fromarray(rgb).convert("RGBA").save(img / "alpha.png")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (img / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "garbage.png").write_bytes(b"not an image at all")
    with open(root / "labels.csv", "a", newline="") as f:
        w = csv.writer(f)
        for i, name in enumerate(["cmyk.jpg", "grey.png", "deep16.png", "alpha.png", "truncated.jpg",
                                  "garbage.png", "missing.png"]):
            w.writerow([f"img/{name}", 10 + i, f"odd{i}"])
        w.writerow(["img/r0_d0.png", "n/a", "x"])


def test_bad_input_is_reported_and_odd_modes_converted(tmp_path, capsys):
    root, out = tmp_path / "src", tmp_path / "out"
    _write_bad_set(root)
    code = main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--workers", "0",
                 "--rounds", "1"])
    assert code == 1  # more skipped than --max_bad 0
    report = json.loads((out / "pack_report.json").read_text())
    reasons = {Path(s["where"].split(":")[0]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"truncated.jpg", "garbage.png", "missing.png", "labels.csv"}
    assert "missing" in reasons["missing.png"] and "unreadable" in reasons["garbage.png"]
    rows = {r["key"]: r for r in _manifest(out)}
    for key in ("cmyk", "grey", "deep16", "alpha"):
        assert rows[key]["format"] == "png" and rows[key]["note"].startswith("converted from")
    assert verify(out) == []
    err = capsys.readouterr().err
    assert "truncated.jpg" in err and "Traceback" not in err
    assert main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--workers", "0",
                 "--rounds", "1", "--max_bad", "4"]) == 0


def test_missing_label_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--dataset", "koniq-10k", "--root", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "koniq10k_scores_and_distributions.csv" in err


def _tar_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_rerun_after_a_crash_gives_the_same_shards(tmp_path):
    root = make_csv_set(tmp_path / "src", n_refs=6, per_ref=3)
    opts = PackOptions(shard_size=3, rounds=2)
    whole = tmp_path / "whole"
    pack("csv", root, whole, opts, workers=0)
    crashed = tmp_path / "crashed"
    pack("csv", root, crashed, opts, workers=0)
    # what a crash leaves: no manifest, a shard without its rows, a half-written temporary
    (crashed / "manifest.parquet").unlink()
    (crashed / "csv-00003.rows.json").unlink()
    tar = crashed / "csv-00004.tar"
    tar.rename(crashed / ".csv-00004.tar.tmp")
    (crashed / ".csv-00004.tar.tmp").write_bytes(b"partial")
    (crashed / "csv-00004.rows.json").unlink()
    pack("csv", root, crashed, opts, workers=0)
    assert _tar_bytes(crashed) == _tar_bytes(whole)
    assert _manifest(crashed) == _manifest(whole) or \
        [dict(r, path=None) for r in _manifest(crashed)] == [dict(r, path=None) for r in _manifest(whole)]


def test_killed_pack_continues(tmp_path):
    root = make_csv_set(tmp_path / "src", n_refs=20, per_ref=3)
    out, whole = tmp_path / "out", tmp_path / "whole"
    args = ["--dataset", "csv", "--root", str(root), "--shard_size", "2", "--workers", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "iqa_dist.pack", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(out.glob("*.rows.json"))) < 5:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.parquet").exists()  # killed mid-work
    finished = {p.with_name(p.name.replace(".rows.json", ".tar")) for p in out.glob("*.rows.json")}
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    assert main([*args, "--out", str(out)]) == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == before  # skipped, not rewritten
    assert main([*args, "--out", str(whole)]) == 0
    assert _tar_bytes(out) == _tar_bytes(whole) and len(finished) >= 5
    assert not list(out.glob(".*.tmp"))


def test_slices_then_merge_equal_one_pack(tmp_path):
    root = make_csv_set(tmp_path / "src", n_refs=5, per_ref=2)
    args = ["--dataset", "csv", "--root", str(root), "--shard_size", "3", "--workers", "0"]
    sliced = tmp_path / "sliced"
    for i in range(3):
        assert main([*args, "--out", str(sliced), "--slice", f"{i}/3"]) == 0
    assert main([*args, "--out", str(sliced), "--merge", "--verify"]) == 0
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert _tar_bytes(sliced) == _tar_bytes(tmp_path / "one")
    assert len(_manifest(sliced)) == 10


def test_demo_set(demo_shards):
    rows = _manifest(demo_shards)
    card = json.loads((demo_shards / "card.json").read_text())
    assert len(rows) >= 300 and card["num_references"] >= 12
    assert {r["distortion"] for r in rows} == set(demo.DISTORTIONS)
    labels = np.array([r["label"] for r in rows])
    assert 0 <= labels.min() < 0.6 and labels.max() <= 1  # graded: strong distortions score low
    for r in range(3):
        owner = {}
        for row in rows:
            assert owner.setdefault(row["ref"], row[f"split_{r}"]) == row[f"split_{r}"]


def test_demo_is_deterministic(tmp_path):
    small = dict(photos=demo.PHOTOS[:2], tiles_per_photo=1, levels=2)
    a = demo.build(tmp_path / "a", seed=3, **small)
    b = demo.build(tmp_path / "b", seed=3, **small)
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()
    for f in sorted((a / "images").iterdir()):
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()


LAYOUT_EXPECT = {  # name: (split unit, higher_is_better)
    "koniq-10k": ("image", True), "livec": ("image", True), "spaq": ("image", True),
    "csiq": ("reference", False), "tid2013": ("reference", True), "kadid-10k": ("reference", True),
    "live": ("reference", False), "csv": ("reference", True),  # csv: by its ref column
}


@pytest.mark.parametrize("name", sorted(LAYOUT_EXPECT))
def test_every_native_layout_packs(name, tmp_path):
    from layouts import LAYOUTS

    from iqa_dist.sources import get_reader

    root = LAYOUTS[name](tmp_path / "src")
    records, _ = get_reader(name).read(root)
    out = tmp_path / "out"
    report = pack(name, root, out, PackOptions(rounds=3), workers=0)
    rows = _manifest(out)
    on_disk = [r for r in records if r.path.exists()]
    assert len(rows) == report["packed"] == len(on_disk) > 0
    assert {r["key"]: r["label"] for r in rows} == {r.key: r.label for r in on_disk}
    missing = [s for s in report["skipped"] if "missing" in s["reason"]]
    assert len(missing) == len(records) - len(on_disk)  # never a silent drop
    unit, higher = LAYOUT_EXPECT[name]
    card = json.loads((out / "card.json").read_text())
    assert (card["split_unit"], card["higher_is_better"]) == (unit, higher)
    if unit == "reference":
        for r in range(3):
            owner = {}
            for row in rows:
                assert owner.setdefault(row["ref"], row[f"split_{r}"]) == row[f"split_{r}"]
    assert verify(out) == []


def test_koniq_official_split_is_every_round(tmp_path):
    from layouts import make_koniq

    root = make_koniq(tmp_path / "src", n=9)
    out = tmp_path / "out"
    pack("koniq-10k", root, out, PackOptions(rounds=3), workers=0)
    rows = _manifest(out)
    assert all(r[f"split_{i}"] == r["official_split"] for r in rows for i in range(3))
    assert {r["split_0"] for r in rows} == {"train", "val", "test"}


@pytest.mark.parametrize("dataset, flag, resize, size", [
    ("koniq-10k", None, "seed", (384, 512)),  # the seed's Resize((512, 384)) by default
    ("koniq-10k", "none", "none", (32, 24)),
    ("csv", None, "none", (32, 24)),
    ("csv", "seed", "seed", (384, 512)),  # a cross-data-set set packed the seed's way
])
def test_resize_default_depends_on_the_data_set(dataset, flag, resize, size, tmp_path):
    from layouts import LAYOUTS

    root, out = LAYOUTS[dataset](tmp_path / "src"), tmp_path / "out"
    args = ["--dataset", dataset, "--root", str(root), "--out", str(out), "--workers", "0", "--rounds", "1"]
    assert main(args + (["--resize", flag] if flag else [])) == 0
    assert {(r["width"], r["height"]) for r in _manifest(out)} == {size}
    assert json.loads((out / "card.json").read_text())["options"]["resize"] == resize
    assert f"- resize: {resize}" in (out / "card.md").read_text()


@pytest.mark.parametrize("size", [(1024, 768), (500, 700), (384, 512)])
def test_seed_resize_is_torchvisions_resize_512_384_pixel_for_pixel(size):
    """The seed's ``transforms.Resize((512, 384))`` on a PIL image: 512 tall, 384 wide,
    bilinear with antialias, whatever the orientation."""
    from torchvision import transforms

    from iqa_dist.images import resize_policy

    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, size[0])[None, :, None] * np.linspace(0, 1, size[1])[:, None, None]
    img = Image.fromarray(np.clip(smooth + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8))
    ours = resize_policy(img, "seed") or img
    assert ours.size == (384, 512)
    assert np.array_equal(np.asarray(ours), np.asarray(transforms.Resize((512, 384))(img)))


def test_an_unknown_resize_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", "csv", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--resize", "koniq-faithful"])
    assert exit_.value.code == 2
    assert "--resize 'koniq-faithful': not one of none, seed, koniq, short:N" in capsys.readouterr().err


def test_images_already_at_the_target_size_keep_their_bytes():
    from PIL import Image

    from iqa_dist.images import resize_policy

    assert resize_policy(Image.new("RGB", (512, 384)), "koniq") is None
    assert resize_policy(Image.new("RGB", (384, 512)), "koniq") is None
    assert resize_policy(Image.new("RGB", (1024, 768)), "koniq").size == (512, 384)


# ---------------------------------------------------------------- bad input and faults (#11)


def _csv_args(root, out, *extra):
    return ["--dataset", "csv", "--root", str(root), "--out", str(out), "--workers", "0",
            "--rounds", "1", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _edit_labels(root, edit):
    lines = (root / "labels.csv").read_text().splitlines()
    edit(lines)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_repack_with_other_inputs_is_refused_until_overwrite(tmp_path, capsys):
    root = make_csv_set(tmp_path / "src", n_refs=4, per_ref=2)
    out = tmp_path / "out"
    args = _csv_args(root, out, "--shard_size", "1")
    assert main(args) == 0
    refused = f"error: {out}: packed from different inputs"
    assert main([*args, "--resize", "short:128"]) == 2
    assert _error_line(capsys) == f"{refused} (options: resize none -> short:128); use --overwrite to rebuild"
    name, _, ref = (root / "labels.csv").read_text().splitlines()[1].split(",")
    _edit_labels(root, lambda lines: lines.__setitem__(1, f"{name},55.5,{ref}"))
    assert main(args) == 2
    assert _error_line(capsys) == f"{refused} (labels changed); use --overwrite to rebuild"
    _edit_labels(root, lambda lines: lines.pop(2))
    assert main([*args, "--no_shuffle"]) == 2
    assert _error_line(capsys) == (f"{refused} (labels changed; images changed; options: shuffle True -> "
                                   "False); use --overwrite to rebuild")
    assert main([*args, "--resize", "short:128", "--overwrite", "--verify"]) == 0
    rows = {r["key"]: r for r in _manifest(out)}
    assert len(rows) == len(list(out.glob("*.tar"))) == 7 and rows[Path(name).stem]["label"] == 55.5
    assert all(min(r["width"], r["height"]) == 128 for r in rows.values())
    assert main([*args, "--resize", "short:128"]) == 0  # the same inputs again: continues
    (out / "pack_inputs.json").unlink()  # as an older version left its shards
    assert main([*args, "--resize", "short:128"]) == 2
    assert _error_line(capsys) == (f"error: {out}: holds shards of an earlier pack that did not "
                                   "record its inputs; use --overwrite to rebuild")


def test_merge_refuses_missing_shards_and_other_options(tmp_path, capsys):
    root = make_csv_set(tmp_path / "src", n_refs=5, per_ref=2)
    out = tmp_path / "out"
    args = _csv_args(root, out, "--shard_size", "3")  # 10 images: 4 shards, slice 0 writes 0 and 3
    for i in (0, 2):
        assert main([*args, "--slice", f"{i}/3"]) == 0
    capsys.readouterr()
    assert main([*args, "--merge", "--verify"]) == 2
    assert _error_line(capsys) == (f"error: {out}: cannot merge, 1 of 4 shards missing (csv-00001.tar); "
                                   "run their --slice jobs again")
    assert not (out / "manifest.parquet").exists()
    assert main([*args, "--slice", "1/3", "--seed", "1"]) == 2
    assert "packed from different inputs (options: seed 0 -> 1)" in _error_line(capsys)
    assert main([*args, "--slice", "1/3", "--overwrite"]) == 2
    assert "--overwrite with --slice" in _error_line(capsys)
    assert main([*args, "--slice", "1/3"]) == 0
    (out / "csv-00003.tar").unlink()
    capsys.readouterr()
    assert main([*args, "--merge"]) == 2
    assert "1 of 4 shards missing (csv-00003.tar)" in _error_line(capsys)
    assert main([*args, "--slice", "0/3"]) == 0
    assert main([*args, "--merge", "--seed", "1"]) == 2
    assert _error_line(capsys) == (f"error: {out}: the slices were packed with other settings "
                                   "(options: seed 0 -> 1); merge with the slices' options")
    assert main([*args, "--merge", "--verify"]) == 0 and len(_manifest(out)) == 10


def test_verify_checks_each_shard_against_its_recorded_sha1(small_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_shards, copy)
    shard = _manifest(copy)[0]["shard"]
    with open(copy / shard, "ab") as f:  # past the archive's end: every image still matches its sha1
        f.write(b"\0" * 512)
    assert verify(copy) == [f"{shard}: does not match its shard_sha1"]


def test_verify_without_a_manifest_is_one_line(tmp_path, capsys):
    out = tmp_path / "never_packed"
    assert main(["--dataset", "csv", "--out", str(out), "--verify"]) == 2
    assert _error_line(capsys) == (f"error: {out / 'manifest.parquet'}: no manifest; pack the data set "
                                   "first (python -m iqa_dist.pack)")


def test_a_damaged_manifest_a_bad_slice_and_an_unusable_out_are_one_line(tmp_path, capsys):
    root = make_csv_set(tmp_path / "src", n_refs=2, per_ref=2)
    out = tmp_path / "out"
    assert main(_csv_args(root, out)) == 0
    manifest = out / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:100])  # torn
    capsys.readouterr()
    assert main(["--dataset", "csv", "--out", str(out), "--verify"]) == 2
    assert _error_line(capsys).startswith(f"error: {manifest}: unreadable manifest (")
    for bad in ("3/3", "1/0", "a/b", "2"):
        with pytest.raises(SystemExit) as exit_:
            main([*_csv_args(root, tmp_path / "sliced"), "--slice", bad])
        assert exit_.value.code == 2
        assert f"--slice: '{bad}': must be I/N with 0 <= I < N" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(_csv_args(root, tmp_path / "a_file" / "out")) == 2  # a full disk takes the same way
    assert str(tmp_path / "a_file") in _error_line(capsys)


def test_workers_die_with_a_killed_pack(tmp_path):
    psutil = pytest.importorskip("psutil")
    root = make_csv_set(tmp_path / "src", n_refs=3, per_ref=2)
    os.mkfifo(root / "img" / "fifo.png")  # reading it blocks a worker until it is killed
    with open(root / "labels.csv", "a") as f:
        f.write("img/fifo.png,50,r9\n")
    proc = subprocess.Popen([sys.executable, "-m", "iqa_dist.pack", *_csv_args(root, tmp_path / "out"),
                             "--shard_size", "1", "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children = []
    try:
        # 7 one-image shards: one worker blocks on the fifo, the other finishes 6 and waits for work
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and \
                len(list((tmp_path / "out").glob("*.rows.json"))) < 6:
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert proc.poll() is None and len(children) == 2
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive
    finally:
        for p in [*children, proc]:
            try:
                p.kill()
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(timeout=10)


def test_odd_names_and_labels_in_labels_csv(tmp_path, capsys):
    root = make_csv_set(tmp_path / "src", n_refs=2, per_ref=2)
    png = root / "img" / "png.jpg"  # a PNG named .jpg
    png.write_bytes((root / "img" / "r0_d0.png").read_bytes())
    outside = tmp_path / "outside.png"
    outside.write_bytes((root / "img" / "r0_d1.png").read_bytes())
    (root / "img" / "inf.png").write_bytes(outside.read_bytes())
    with open(root / "labels.csv", "a", newline="") as f:
        csv.writer(f).writerows([["img/png.jpg", 40, "p"], ["../outside.png", 41, "o"],
                                 [str(outside), 42, "a"], ["img/inf.png", "inf", "i"]])
    out = tmp_path / "out"
    assert main(_csv_args(root, out, "--max_bad", "3", "--verify")) == 0
    err = capsys.readouterr().err.splitlines()
    labels = root / "labels.csv"
    assert err == [f"skipped {labels}:7: image name '../outside.png' leaves the data set folder",
                   f"skipped {labels}:8: image name '{outside}' leaves the data set folder",
                   f"skipped {labels}:9: label 'inf' is infinite"]
    row = {r["key"]: r for r in _manifest(out)}["png"]
    assert row["format"] == "png"
    import tarfile
    with tarfile.open(out / row["shard"]) as tar:
        assert tar.extractfile("png.png").read() == png.read_bytes()


def test_interrupted_writes_leave_no_temporaries(tmp_path, monkeypatch):
    root = make_csv_set(tmp_path / "src", n_refs=3, per_ref=2)
    out = tmp_path / "out"
    args = _csv_args(root, out, "--shard_size", "2")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pq, "write_table", interrupted)
    assert main(args) == 130  # Ctrl-C while the manifest is written: one line, not a traceback
    assert not list(out.glob(".*"))
    monkeypatch.undo()
    # what kill -9 leaves while a shard and the manifest are written
    for name in (".csv-00000.tar.k2j4x9ab.tmp", ".manifest.parquet.q8w7e6rt.tmp"):
        (out / name).touch()
    assert main(args) == 0 and not list(out.glob(".*"))
    for i in range(2):
        assert main([*args, "--slice", f"{i}/2"]) == 0
    (out / ".manifest.parquet.z1x2c3vb.tmp").touch()
    assert main([*args, "--merge"]) == 0 and not list(out.glob(".*"))


def test_csv_names_relative_to_an_image_root(tmp_path, capsys):
    root = make_csv_set(tmp_path / "src", n_refs=2, per_ref=2)
    labels = root / "labels.csv"
    labels.write_text(labels.read_text().replace("img/", ""))  # 00001.jpg-style names
    out = tmp_path / "out"
    assert main(_csv_args(root, out, "--image_root", "img", "--verify")) == 0
    assert sorted(r["key"] for r in _manifest(out)) == ["r0_d0", "r0_d1", "r1_d0", "r1_d1"]
    # without it the names miss, and a reader without the option refuses it in one line
    assert main(_csv_args(root, tmp_path / "none")) == 1
    assert f"skipped {root / 'r0_d0.png'}: missing" in capsys.readouterr().err
    assert main(["--dataset", "koniq-10k", "--root", str(root), "--out", str(tmp_path / "k"),
                 "--image_root", "img"]) == 2
    assert main(_csv_args(root, tmp_path / "gone", "--image_root", "nowhere")) == 2
    err = capsys.readouterr().err
    assert "--image_root does not apply to --dataset koniq-10k" in err
    assert f"{root / 'nowhere'}: no such image folder" in err


def test_demo_validates_on_more_photographs_by_default():
    from iqa_dist.pack import parse_args

    assert parse_args(["--dataset", "demo", "--out", "x"]).split == (0.6, 0.2, 0.2)
    assert parse_args(["--dataset", "csv", "--out", "x"]).split == (0.7, 0.1, 0.2)
    assert parse_args(["--dataset", "demo", "--out", "x", "--split", "0.5", "0.3", "0.2"]).split == [0.5, 0.3, 0.2]
