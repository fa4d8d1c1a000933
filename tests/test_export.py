"""export: ONNX and TorchScript whole-image scorers score as the Scorer (and so predict) does."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from iqa_dist.data.stream import grid_positions
from iqa_dist.export import main
from iqa_dist.scorer import Scorer

H, W = 240, 260  # the tiny run's set is packed without resizing: the size is given


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Three uint8 [3, H, W] images, the third a smooth ramp: scores that differ."""
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 255, (2, 3, H, W), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, W, dtype=np.float32), (1, 3, H, W)).astype(np.uint8)
    return torch.from_numpy(np.concatenate([noise, ramp]))


@pytest.fixture(scope="module")
def expected(tiny_run, images) -> np.ndarray:
    return Scorer.from_checkpoint(tiny_run, device="cpu")(images).numpy()


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    files = {"onnx": out / "model.onnx", "torchscript": out / "model.pt"}
    for fmt, path in files.items():
        assert main(["--checkpoint", str(tiny_run), "--format", fmt, "--out", str(path), "--size", f"{H}x{W}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt"]  # no temporaries left
    return files


def test_onnx_scores_as_pytorch_at_any_batch_size(exported, images, expected):
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.name == "images" and given.type == "tensor(uint8)" and given.shape[1:] == [3, H, W]
    assert isinstance(given.shape[0], str)  # a named, free batch axis
    assert np.ptp(expected) > 1e-2  # different images, different scores: a wrong crop would show
    for batch in (images[:1], images):
        (scores,) = session.run(["scores"], {"images": batch.numpy()})
        np.testing.assert_allclose(scores, expected[:len(batch)], rtol=0, atol=1e-4)


def test_torchscript_scores_as_pytorch_at_any_batch_size(exported, images, expected):
    extra = {"iqa_dist.json": ""}
    module = torch.jit.load(str(exported["torchscript"]), _extra_files=extra)
    for batch in (images[:1], images):
        with torch.no_grad():
            scores = module(batch).numpy()
        np.testing.assert_allclose(scores, expected[:len(batch)], rtol=0, atol=1e-4)
    assert json.loads(extra["iqa_dist.json"])["input"]["height"] == H


def test_the_file_carries_the_card_size_and_crops(exported, tiny_run):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    meta = json.loads(props["iqa_dist"])
    card = json.loads((tiny_run / "checkpoints" / "best" / "metrics.json").read_text())["label_card"]
    assert meta["label_card"] == card and meta["lower_better"] is False
    assert meta["input"] == {"dtype": "uint8", "layout": "NCHW RGB 0-255", "height": H, "width": W, "resize": "none"}
    assert [tuple(c) for c in meta["crops"]["corners"]] == grid_positions(H, W, 224, 3)


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/norun", "--out", "{tmp}/m.onnx", "--size", "240x260"], "error: {tmp}/norun"),
    (["--checkpoint", "{run}", "--out", "{tmp}", "--format", "onnx", "--size", "240x260"],
     "error: --out {tmp}: is a folder; give a file name such as model.onnx or model.pt"),
    (["--checkpoint", "{run}", "--out", "{tmp}/m.onnx"], "error: --size: needed, as the training set was packed"),
    (["--checkpoint", "{run}", "--out", "{tmp}/m.onnx", "--size", "200x300"],
     "error: --size 200x300: each side must be at least the 224-pixel crop"),
    (["--checkpoint", "{run}", "--out", "{tmp}/m.onnx", "--size", "big"], "error: --size big: expected HEIGHTxWIDTH"),
])
def test_a_bad_checkpoint_out_or_size_is_one_line(tiny_run, tmp_path, capsys, args, message):
    def filled(text: str) -> str:
        return text.format(tmp=tmp_path, run=tiny_run)

    assert main([filled(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(filled(message)) and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_run_scoring_with_random_crops_is_refused(tiny_run):
    """Its crops are seeded by each file's name, which a graph never sees."""
    from dataclasses import replace

    from iqa_dist.export import whole_image
    from iqa_dist.tools import load_trained

    trained = load_trained(tiny_run)
    assert len(whole_image(trained, (H, W)).corners) == 3
    with pytest.raises(ValueError, match="random crops"):
        whole_image(trained._replace(cfg=replace(trained.cfg, test_random_crop=True)), (H, W))
