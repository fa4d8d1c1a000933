"""predict: score files with a trained run; bad inputs are skipped with a reason each."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from iqa_dist.data.stream import eval_crops, to_model_input
from iqa_dist.predict import ImageCrops, expand_inputs, main, score_files
from iqa_dist.scorer import CropPlan, fixed_batches
from iqa_dist.tools import load_trained
from test_images import declaring, encode
from test_train import machinery_args, run, train_cmd


def train_tiny(shards: Path, run_dir: Path) -> Path:
    """A real run directory from a one-epoch micro training (3 crops per image at test)."""
    out = run(train_cmd(machinery_args(shards, run_dir, "--epochs", "1", "--max_steps_per_epoch", "2",
                                       "--test_patch_num", "3")))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A good image, one smaller than a crop, a truncated JPEG, a text file, a decompression
    bomb (a PNG declaring 20000x20000 pixels) and a broken symbolic link."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)).save(root / "good.png")
    Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(root / "tiny.png")
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(root / "whole.jpg")
    (root / "corrupt.jpg").write_bytes((root / "whole.jpg").read_bytes()[:400])
    (root / "whole.jpg").unlink()
    (root / "notes.txt").write_text("not an image\n")
    (root / "bomb.jpg").write_bytes(declaring(encode(Image.new("RGB", (16, 16))), 20000, 20000))
    (root / "gone.jpg").symlink_to(root / "deleted.jpg")
    return root


def predict(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "iqa_dist.predict", *args])


@pytest.fixture(scope="module")
def scored_folder(trained_run, folder, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("scores") / "scores.csv"
    return predict("--checkpoint", str(trained_run), str(folder), "--out", str(out), "--batch_size", "4"), out


def test_folder_is_scored_and_bad_files_are_skipped_with_reasons(scored_folder, folder):
    done, out = scored_folder
    assert done.returncode == 1  # something was skipped
    assert "Traceback" not in done.stderr
    assert f"skipped {folder / 'corrupt.jpg'}: unreadable image" in done.stderr
    assert f"skipped {folder / 'notes.txt'}: unreadable image (not an image format" in done.stderr
    assert f"skipped {folder / 'bomb.jpg'}: 20000x20000 is 400 megapixels, over the limit of 64" in done.stderr
    assert f"skipped {folder / 'gone.jpg'}: broken symbolic link (to {folder / 'deleted.jpg'}, " in done.stderr
    assert "4 of 6 inputs skipped" in done.stderr
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["path"]).name for r in rows] == ["good.png", "tiny.png"]
    assert all(np.isfinite(float(r["score"])) for r in rows)
    notes = {Path(r["path"]).name: r["note"] for r in rows}
    assert notes["good.png"] == "" and "upsampled" in notes["tiny.png"] and "100x80" in notes["tiny.png"]
    assert "MOS on" in done.stdout and "higher is better" in done.stdout  # the label card's scale
    assert "good.png" in done.stdout and "upsampled" in done.stdout  # the table


def test_scores_are_deterministic_run_to_run(scored_folder, trained_run, folder, tmp_path):
    _, first = scored_folder
    out = tmp_path / "again.parquet"
    done = predict("--checkpoint", str(trained_run / "checkpoints" / "best"), str(folder / "*.png"),
                   "--out", str(out), "--batch_size", "4", "--workers", "0", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    again = pq.read_table(out).to_pylist()
    assert [(r["path"], float(r["score"])) for r in csv.DictReader(open(first))] == \
           [(r["path"], r["score"]) for r in again]


def test_score_is_the_mean_over_the_evaluation_crops_whatever_the_batching(trained_run, folder):
    trained = load_trained(trained_run)
    paths = [folder / "good.png", folder / "tiny.png"]
    # batch 2 with 3 crops per image: the first image's crops straddle two batches
    scored, skipped = score_files(trained.model, paths, CropPlan(224, 3), batch_size=2, device="cpu",
                                  progress=False)
    assert not skipped
    for path, s in zip(paths, scored):
        arr = np.asarray(Image.open(path).convert("RGB"))
        with torch.no_grad():
            direct = trained.model(to_model_input(np.stack(eval_crops(str(path), arr, 224, 3)), "cpu")).mean()
        assert s.score == pytest.approx(float(direct), abs=1e-5)


def test_a_model_sees_a_raw_photo_as_its_training_set_was_packed(trained_run, tmp_path):
    """A model trained on a set packed ``--resize seed`` (its card, in the checkpoint) scores a
    1024x768 photo as that photo resized by the seed's Resize((512, 384))."""
    import json
    import shutil

    best = tmp_path / "best"
    shutil.copytree(trained_run / "checkpoints" / "best", best)
    metrics = json.loads((best / "metrics.json").read_text())
    metrics["label_card"]["options"]["resize"] = "seed"
    (best / "metrics.json").write_text(json.dumps(metrics))
    ramp = np.linspace(0, 255, 1024)[None, :, None] * np.linspace(0, 1, 768)[:, None, None]
    photo = Image.fromarray(np.broadcast_to(ramp, (768, 1024, 3)).astype(np.uint8))
    photo.save(tmp_path / "raw.png")
    photo.resize((384, 512), Image.Resampling.BILINEAR).save(tmp_path / "resized.png")
    out = tmp_path / "scores.csv"
    assert main(["--checkpoint", str(best), str(tmp_path / "raw.png"), str(tmp_path / "resized.png"),
                 "--out", str(out), "--workers", "0", "--quiet"]) == 0
    raw, resized = csv.DictReader(open(out))
    assert float(raw["score"]) == pytest.approx(float(resized["score"]), rel=1e-6)  # batch position
    assert raw["note"] == "resized 1024x768 -> 384x512 (--resize seed, as the training set)"
    assert resized["note"] == ""


def test_batches_cut_across_images_and_keep_owners():
    items = [(0, np.zeros((3, 1))), (1, np.ones((3, 1))), (2, np.full((1, 1), 2.0))]
    batches = list(fixed_batches(items, 2))
    assert [len(c) for c, _ in batches] == [2, 2, 2, 1]
    assert np.concatenate([o for _, o in batches]).tolist() == [0, 0, 0, 1, 1, 1, 2]


def test_inputs_expand_folders_and_globs_and_report_missing(folder, tmp_path):
    files, missing = expand_inputs([str(folder / "*.png"), str(folder / "good.png"),
                                    str(tmp_path / "nothere.jpg"), str(tmp_path / "*.webp")])
    assert [f.name for f in files] == ["good.png", "tiny.png"]  # no duplicates
    assert [(Path(m.path).name, m.reason) for m in missing] == [("nothere.jpg", "no such file"),
                                                                ("*.webp", "matches no file")]
    files, missing = expand_inputs([str(folder / "gone.jpg"), str(folder / "g*.jpg")])
    assert not files and [Path(m.path).name for m in missing] == ["gone.jpg", "gone.jpg"]
    assert all(m.reason.startswith("broken symbolic link") for m in missing)


def test_missing_checkpoint_is_one_line(folder, tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "norun"), str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "norun" in err


def test_predict_turns_on_the_fast_gpu_kernels(trained_run, folder, gpu_flags_off):
    """TF32 and cuDNN autotuning in every entry point that runs a model, not only training."""
    from iqa_dist.predict import main

    assert main(["--checkpoint", str(trained_run), str(folder / "good.png"), "--device", "cpu",
                 "--workers", "0", "--quiet"]) == 0
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32


def test_a_strip_too_thin_to_upsample_is_skipped_naming_why(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (9, 600)).save(path)  # 0.005 megapixels, 224x14933 once upsampled
    index, crops, reason = ImageCrops([path], CropPlan(224, 3))[0]
    assert (index, crops) == (0, None)
    assert reason == "9x600 is too thin to upsample to a 224-pixel patch (its sides are over 20:1)"


def test_ctrl_c_stops_predict_in_one_line_and_writes_nothing(trained_run, tmp_path):
    """Ctrl-C as a terminal sends it (to predict and its decoding workers), once scoring has
    demonstrably begun: exit 130, one line, no traceback, no --out and no temporary."""
    import os
    import re
    import signal

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    for i in range(600):  # far more than can be scored before the signal lands
        (images / f"{i:04d}.png").symlink_to(tmp_path / "a.png")
    (images / "0002.png").unlink()
    (images / "0002.png").write_text("not an image\n")  # its "skipped" line: images 0 and 1 are scored by then
    out = tmp_path / "scores" / "scores.csv"
    proc = subprocess.Popen([sys.executable, "-m", "iqa_dist.predict", "--checkpoint", str(trained_run), str(images),
                             "--out", str(out), "--batch_size", "1"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    for line in proc.stderr:  # waits for the condition itself, a line, not for a time
        seen += line
        if f"skipped {images / '0002.png'}" in line:
            break
    assert proc.poll() is None, seen[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-3000:]
    assert "Traceback" not in rest and "Error" not in rest and "written" not in stdout
    lines = [line for line in re.split(r"[\r\n]", rest) if line.strip() and "img/s" not in line]  # less tqdm's bar
    assert lines == ["interrupted: no scores written"]
    assert list(out.parent.iterdir()) == []  # checked writable, then left empty: no half a table
