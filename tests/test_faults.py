"""Bad input a careless user gives, and what must never be lost or silently wrong:
files readable by a cluster's other users, labels.csv rows, 16-bit and rotated photographs,
config files, and a bad pixel limit."""
from __future__ import annotations

import io
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist import atomic, checkpoint, evaluate, images, predict, train
from iqa_dist.config import Config, ConfigError, from_dict, load_yaml, save_yaml
from iqa_dist.images import open_rgb
from iqa_dist.sources import csvfile

from test_train import machinery_args


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_written_files_honour_the_umask(mask, tmp_path):
    old = os.umask(mask)
    try:
        save_yaml(Config(), tmp_path / "config.yaml")
        checkpoint.write_json(tmp_path / "results.json", {"srcc": 1.0})
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "best" / "model.safetensors")
        (tmp_path / "notes.txt").write_text("x")  # as open() makes it: the reference
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4 and {_mode(p) for p in files} == {0o666 & ~mask}


def test_packed_sets_are_readable_by_others(small_shards):
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask
    assert expected & 0o044  # pytest runs under an ordinary umask: group and others may read
    files = [p for p in small_shards.iterdir() if p.is_file()]
    assert any(p.suffix == ".tar" for p in files) and (small_shards / "manifest.parquet") in files
    assert {p.name: _mode(p) for p in files} == {p.name: expected for p in files}


def test_a_quoted_name_with_a_newline_keeps_its_own_label(tmp_path):
    (tmp_path / "odd\nname.png").write_bytes(b"")
    (tmp_path / "plain.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text('name,mos\n"odd\nname.png",10\nplain.png,20\n')
    records, skipped = csvfile.read(tmp_path)
    assert {r.path.name: r.label for r in records} == {"odd\nname.png": 10.0, "plain.png": 20.0}
    assert skipped == []


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_a_dark_16_bit_image_stays_dark():
    values = np.full((8, 8), 200 * 257, dtype=np.uint16)  # 200 on an 8-bit scale
    values[0, 0] = 100  # and one nearly black pixel: the maximum alone is 51400, not 65535
    img, converted = open_rgb(_png(values))
    assert converted == "I;16"
    assert np.asarray(img)[1, 1].tolist() == [200, 200, 200] and np.asarray(img)[0, 0, 0] == 0
    dark, _ = open_rgb(_png(np.full((8, 8), 200, dtype=np.uint16)))  # all under 256 of 65535
    assert np.asarray(dark).max() == 1


def _rotated_jpeg(orientation: int) -> bytes:
    """60 wide x 40 tall, left half white, stored with an EXIF orientation tag."""
    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    img, _ = open_rgb(_rotated_jpeg(6))  # 6: the camera was turned 90 degrees clockwise
    arr = np.asarray(img)
    assert img.size == (40, 60)  # upright: a portrait
    assert arr[:30].mean() > 200 and arr[30:].mean() < 50  # the white half is now on top
    assert open_rgb(_rotated_jpeg(1))[0].size == (60, 40)
    path = tmp_path / "portrait.jpg"
    path.write_bytes(_rotated_jpeg(6))
    assert predict.read_rgb(path).size == (40, 60)  # predict reads through the same decoder


def test_the_card_says_how_images_are_decoded(small_shards):
    import json

    assert json.loads((small_shards / "card.json").read_text())["decoding"] == images.DECODING
    assert "EXIF orientation applied" in (small_shards / "card.md").read_text()


def test_yaml_exponents_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 2E-4\nepochs: 3\n")  # PyYAML reads 1e-3 as a string
    cfg = load_yaml(path)
    assert (cfg.lr, cfg.weight_decay, cfg.epochs) == (1e-3, 2e-4, 3)
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr: expected float, got 'fast'"):
        load_yaml(path)


def test_a_config_that_is_a_folder_or_binary_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"is a directory, not a config file$"):
        load_yaml(tmp_path)
    path = tmp_path / "x.yaml"
    path.write_bytes(b"lr: \xff\xfe\x00\x01\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: not a text file \(not UTF-8\)$"):
        load_yaml(path)


def test_a_bad_pixel_limit_is_one_line_at_start(small_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IQA_MAX_PIXELS", "abc")
    message = "error: IQA_MAX_PIXELS='abc': expected a positive number of pixels"
    assert predict.main(["--checkpoint", str(tmp_path / "no-run"), str(tmp_path)]) != 0
    assert evaluate.main(["--checkpoint", str(tmp_path / "no-run"), "--shards", str(small_shards)]) != 0
    assert train.main(machinery_args(small_shards, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.count(message) == 3 and "Traceback" not in err


@pytest.mark.parametrize("flags, problem", [
    (["--rounds", "0"], "--rounds 0: must be >= 1"),
    (["--shard_size", "0"], "--shard_size 0: must be >= 1"),
    (["--split", "0.5", "0.5", "0.5"], "--split 0.5 0.5 0.5: three fractions in 0-1 that add up to 1"),
    (["--resize", "bogus"], "--resize 'bogus': not one of none, seed, koniq, short:N"),
    (["--resize", "short:0"], "--resize 'short:0': not one of none, seed, koniq, short:N"),
])
def test_pack_checks_its_arguments_before_writing_anything(flags, problem, tmp_path, capsys):
    from iqa_dist.pack import main as pack_main

    root = tmp_path / "src"
    root.mkdir()
    (root / "labels.csv").write_text("name,mos\n")
    with pytest.raises(SystemExit) as exit_:
        pack_main(["--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # so the corrected command is not refused as "other inputs"


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory) -> Path:
    """checkpoints/best of a micro HyperIQA as training writes it, without the training."""
    from dataclasses import replace

    from iqa_dist.tools import model_from_config

    run = tmp_path_factory.mktemp("faults") / "run"
    best = run / "checkpoints" / "best"
    cfg = replace(Config(), model_size="micro", test_patch_num=1, workers=0, batch_size=8, spaq=False)
    checkpoint.save_weights(model_from_config(cfg).state_dict(), best / "model.safetensors")
    save_yaml(cfg, best / "config.yaml")
    checkpoint.write_json(best / "metrics.json", {"label_card": {"higher_is_better": True, "label_name": "MOS"}})
    return run


def _copy_without(shards: Path, dest: Path, name: str, text: str | None = None) -> Path:
    import shutil

    shutil.copytree(shards, dest)
    (dest / name).unlink()
    if text is not None:
        (dest / name).write_text(text)
    return dest


@pytest.mark.parametrize("text, problem", [(None, "card.json: missing, so the label direction"),
                                           ('{"name": "x", "higher_is', "card.json: unreadable card"),
                                           ('{"name": "x"}', "card.json: does not say the label direction")])
def test_a_set_without_a_readable_card_is_refused_by_evaluate(text, problem, untrained_run, small_shards,
                                                              tmp_path, capsys):
    shards = _copy_without(small_shards, tmp_path / "set", "card.json", text)
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(untrained_run), "--shards", str(shards), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err
    assert not (out / "results.md").exists()


def test_an_empty_split_is_refused_by_evaluate(untrained_run, tmp_path, capsys):
    from conftest import make_csv_set
    from iqa_dist.pack import PackOptions, pack

    shards = tmp_path / "all-train"
    pack("csv", make_csv_set(tmp_path / "src", n_refs=3, per_ref=1), shards,
         PackOptions(rounds=1, split=(1.0, 0.0, 0.0)), workers=0)
    assert evaluate.main(["--checkpoint", str(untrained_run), "--shards", str(shards), "--split", "val"]) == 2
    assert "the val split holds no image (round 0): nothing to evaluate" in capsys.readouterr().err


def test_unusable_outputs_are_refused_before_any_scoring(untrained_run, small_shards, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    image = tmp_path / "img.png"
    image.write_bytes(_png(np.zeros((240, 240, 3), dtype=np.uint8)))
    assert evaluate.main(["--checkpoint", str(untrained_run), "--shards", str(small_shards),
                          "--out", str(a_file)]) == 2
    folder = tmp_path / "scores.csv"
    folder.mkdir()
    assert predict.main(["--checkpoint", str(untrained_run), str(image), "--out", str(folder)]) != 0
    assert predict.main(["--checkpoint", str(untrained_run), str(image), "--out",
                         str(a_file / "scores.csv")]) != 0
    err = capsys.readouterr().err
    assert f"--out {a_file}: is a file; give a folder" in err
    assert f"--out {folder}: is a folder; give a file name" in err
    assert f"--out {a_file / 'scores.csv'}: cannot be written" in err
    assert "evaluating" not in capsys.readouterr().out and "Traceback" not in err


def test_ctrl_c_stops_a_pack_in_one_line_and_the_same_command_continues(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import make_csv_set
    from iqa_dist.pack import main as pack_main

    root = make_csv_set(tmp_path / "src", n_refs=20, per_ref=3)
    out = tmp_path / "out"
    args = ["--dataset", "csv", "--root", str(root), "--shard_size", "2", "--workers", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "iqa_dist.pack", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    while proc.poll() is None and len(list(out.glob("*.rows.json"))) < 3:
        time.sleep(0.01)  # polling the condition itself
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends it: to the pack and its workers
    err = proc.communicate(timeout=120)[1]
    assert not (out / "manifest.parquet").exists()  # it was stopped mid-work
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip() == f"interrupted: the finished shards in {out} are kept; the same command continues"
    assert pack_main(args) == 0 and (out / "manifest.parquet").exists()


def _tmpfs(tmp_path: Path, size: str):
    """A real file system of ``size`` (a tmpfs) at ``tmp_path / "disk"``."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """16 MB: room for a micro run's best weights (10 MB), not for a checkpoint with its
    optimiser state beside them."""
    yield from _tmpfs(tmp_path, "16m")


@pytest.fixture
def tiny_disk(tmp_path):
    """2 MB: room for a few shards of random images, not for a whole set."""
    yield from _tmpfs(tmp_path, "2m")


def test_a_full_disk_in_pack_names_the_folder_and_keeps_the_finished_shards(tmp_path, tiny_disk, capsys):
    from conftest import make_csv_set
    from iqa_dist.pack import main as pack_main

    root = make_csv_set(tmp_path / "src")  # 24 random images, about 4.5 MB as PNG
    out = tiny_disk / "shards"
    code = pack_main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--shard_size", "4",
                      "--workers", "0"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert re.fullmatch(rf"error: {out}: no space left on its device \(\d+ MB free\); the finished shards are "
                        "kept; free space and run the same command", errors[0]), errors[0]
    assert list(out.glob("*.tar")) and not list(out.glob(f".*{atomic.SUFFIX}"))


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_no_temporaries(small_shards, small_disk):
    from test_train import run, train_cmd

    run_dir = small_disk / "run"
    out = run(train_cmd(machinery_args(small_shards, run_dir, "--epochs", "1", "--workers", "0")))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    line = next(l for l in out.stderr.splitlines() if l.startswith("error: "))
    assert line.startswith(f"error: {run_dir}: no space left on its device for checkpoint step-00000004 ")
    assert "MB needed" in line and "MB free" in line
    assert not [p for p in run_dir.rglob("*") if p.name.startswith((".tmp-", ".")) and p.name.endswith("tmp")]
    assert not list((run_dir / "checkpoints").glob(".tmp-step-*"))
    with open(small_disk / "filler", "wb") as f:  # now not even config.yaml fits
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError:
            pass
    again = run(train_cmd(machinery_args(small_shards, run_dir, "--epochs", "1", "--workers", "0",
                                         "--resume", "latest")))
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr[-3000:]
    # the resume's first write is the run's lock: one line too, before anything else is touched
    assert f"error: {run_dir}: no space left on its device for its lock (about 4 kB needed, 0 kB free)" \
        in again.stderr


def test_a_set_packed_again_while_training_reads_it_is_named_so(small_shards, tmp_path):
    """Not "unreadable, truncated or corrupted": the shards were replaced under the run."""
    import shutil

    from iqa_dist.data.stream import ShardError
    from test_tune import micro

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)

    def pack_again(epoch, metrics, checkpoint):  # as pack --overwrite does: the manifest goes first
        (shards / "manifest.parquet").unlink()
        for shard in shards.glob("*.tar"):
            shard.write_bytes(b"half a new shard")

    cfg = from_dict(micro(shards, epochs=2, run_dir=str(tmp_path / "run")))
    with pytest.raises(ShardError, match=rf"^{shards} was packed again while this run read it \({shards}/"):
        train.train(cfg, callbacks=[pack_again])


def test_two_packs_into_one_folder_cannot_run_at_once(tmp_path, capsys):
    """A second pack would clear the first one's temporaries; slices of an array job may share."""
    import json as json_
    import socket

    from conftest import make_csv_set
    from iqa_dist.pack import main as pack_main

    root = make_csv_set(tmp_path / "src", n_refs=2, per_ref=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(json_.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": 0}))
    args = ["--dataset", "csv", "--root", str(root), "--out", str(out), "--workers", "0", "--shard_size", "2"]
    assert pack_main(args) == 2
    assert f"error: {out}: in use by another pack (pid {os.getpid()} on" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # nothing written
    assert pack_main([*args, "--slice", "0/2"]) == 0  # an array job's slice shares the folder
