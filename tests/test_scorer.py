"""The Python API: ``Scorer`` gives predict's scores for every kind of input it takes."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist.images import BadImage, read_rgb
from iqa_dist.predict import main as predict_main
from iqa_dist.scorer import Scorer
from test_train import REPO, env

ORIENTATION = 0x0112  # EXIF tag; 6: the camera was turned, show the image rotated 90 degrees


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two images of one size, a JPEG stored sideways with an EXIF orientation, one smaller than a crop."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    paths = [root / "a.png", root / "b.png", root / "sideways.jpg", root / "small.png"]
    for path, (h, w) in zip(paths, [(240, 260), (240, 260), (230, 250), (90, 120)]):
        exif = Image.Exif()
        exif[ORIENTATION] = 6 if path.suffix == ".jpg" else 1
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, exif=exif)
    return paths


def predicted(checkpoint: Path, paths: list[Path], out: Path) -> list[float]:
    """``python -m iqa_dist.predict``'s scores of ``paths``, read back from its CSV."""
    assert predict_main(["--checkpoint", str(checkpoint), *map(str, paths), "--out", str(out),
                         "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    return [float(r["score"]) for r in rows]


@pytest.fixture(scope="module")
def scorer(tiny_run) -> Scorer:
    return Scorer.from_checkpoint(tiny_run, device="cpu")


def test_every_kind_of_input_scores_as_predict(scorer, tiny_run, photos, tmp_path):
    expected = predicted(tiny_run, photos, tmp_path / "scores.csv")
    pixels = [np.asarray(read_rgb(p)) for p in photos]  # upright: read as predict reads
    chw = [torch.tensor(a).permute(2, 0, 1) for a in pixels]
    many = {"paths": [str(p) for p in photos], "Path objects": photos,
            "PIL images": [Image.open(p) for p in photos],  # the JPEG still sideways, with its tag
            "HWC arrays": pixels, "uint8 CHW tensors": chw, "float 0-1 CHW tensors": [t / 255 for t in chw],
            "float16 0-1 CHW tensors": [(t / 255).half() for t in chw],
            # floats are rounded to the nearest 8-bit value, not truncated
            "float64 tensors a little below": [(t.double() - 0.3).clamp(min=0) / 255 for t in chw]}
    for kind, inputs in many.items():
        scores = scorer(inputs)
        assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float64, kind
        assert scores.tolist() == expected, kind  # the same crops in the same batches: the same bits
    for path, score in zip(photos, expected):  # one at a time: other batches, the same crops
        one = scorer(path)
        assert isinstance(one, float) and one == pytest.approx(score, rel=1e-6, abs=1e-6)
    batch = torch.stack(chw[:2])  # N x 3 x H x W, as pyiqa takes
    assert scorer(batch).numpy() == pytest.approx(expected[:2], rel=1e-6, abs=1e-6)
    assert scorer(batch.permute(0, 2, 3, 1).numpy()).numpy() == pytest.approx(expected[:2], rel=1e-6, abs=1e-6)


def test_the_card_says_the_scale_and_direction_and_its_resize_is_applied(tiny_run, photos, tmp_path):
    """A checkpoint whose training set was packed ``--resize seed`` and labelled as DMOS: the
    Scorer resizes as predict does and says lower is better."""
    best = tmp_path / "best"
    shutil.copytree(tiny_run / "checkpoints" / "best", best)
    metrics = json.loads((best / "metrics.json").read_text())
    metrics["label_card"].update(higher_is_better=False, label_name="DMOS")
    metrics["label_card"]["options"]["resize"] = "seed"
    (best / "metrics.json").write_text(json.dumps(metrics))
    scorer = Scorer.from_checkpoint(best, device="cpu")
    assert scorer.lower_better and scorer.card["label_name"] == "DMOS"
    scores = scorer(photos)
    assert scores.tolist() == predicted(best, photos, tmp_path / "scores.csv")
    # the seed's Resize((512, 384)) done beforehand, which the policy then leaves alone
    resized = [Image.fromarray(np.asarray(read_rgb(p))).resize((384, 512), Image.Resampling.BILINEAR)
               for p in photos]
    assert scorer(resized).tolist() == scores.tolist()
    assert not Scorer.from_checkpoint(tiny_run, device="cpu").lower_better


@pytest.mark.parametrize("bad, error, message", [
    ("nothere.png", BadImage, "nothere.png: cannot read (No such file or directory)"),
    (np.zeros((240, 260, 3), dtype=np.int64), TypeError, "input: int64 pixels; give uint8 (0-255) or float (0-1)"),
    (torch.zeros(240, 260, 3, dtype=torch.uint8), BadImage, "input: shape [240, 260, 3]; expected 3xHxW (RGB)"),
    (np.full((240, 260, 3), 200.0), BadImage, "input: float pixels must lie in 0-1 (these span 200 to 200)"),
    (np.zeros((4, 5, 3), dtype=np.uint8), BadImage, "input: too small to score (5x4)"),
    (12, TypeError, "input: int is not an image; expected a path, a PIL image"),
    (np.array(5.0), BadImage, "input: shape []; expected HxWx3 (RGB)"),
    ([np.zeros((240, 260, 3), dtype=np.uint8), np.zeros((240, 260), dtype=np.uint8)], BadImage,
     "input 1: shape [240, 260]; expected HxWx3 (RGB)"),
])
def test_a_bad_input_is_one_clear_error(scorer, tmp_path, bad, error, message):
    if isinstance(bad, str):
        bad = tmp_path / bad
        message = f"{tmp_path}/{message}"
    with pytest.raises(error) as raised:
        scorer(bad)
    text = str(raised.value)
    assert text.startswith(message) and "\n" not in text


def test_importing_the_package_loads_no_torch_and_scorer_comes_on_first_use():
    code = "import sys, iqa_dist; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, cwd=REPO)
    assert (done.returncode, done.stdout.strip()) == (0, "False"), done.stderr[-2000:]
    import iqa_dist

    assert iqa_dist.Scorer is Scorer  # looked up on first use
