"""complexity: parameter and FLOP counts that can be checked by hand, and the report."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from iqa_dist.complexity import count_flops, count_parameters, main, model_flops
from iqa_dist.models import create_model


def test_linear_layer_flops_are_two_per_multiply_add():
    flops, per_module = count_flops(nn.Linear(10, 20), torch.randn(3, 10))
    assert flops == 2 * 3 * 10 * 20  # bias additions are not counted
    assert per_module["Linear"] == flops


def test_convolution_flops_are_exact():
    conv = nn.Conv2d(4, 8, kernel_size=3, padding=1)
    flops, _ = count_flops(conv, torch.randn(2, 4, 5, 5))
    assert flops == 2 * 2 * 8 * 5 * 5 * 4 * 3 * 3


def test_parameter_counts_split_backbone_and_head():
    model = create_model("micro")
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["backbone"] == sum(p.numel() for p in model.backbone.parameters())
    assert counts["head"] == counts["total"] - counts["backbone"] > 0


def test_model_flops_split_backbone_and_head():
    model = create_model("micro").eval()
    flops = model_flops(model, torch.device("cpu"))
    backbone, _ = count_flops(model.backbone, torch.randn(1, 3, 224, 224))
    assert flops["backbone"] == backbone
    assert flops["head"] == flops["total"] - backbone > 0


def test_report_is_written(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert main(["--model_size", "micro", "--batch_sizes", "1", "2", "--iters", "1", "--warmup", "0",
                 "--test_patch_num", "3", "--device", "cpu", "--out", str(out)]) == 0
    text = out.read_text()
    assert "2 x MACs" in text and "GMACs/patch" in text and "patches/s bs 2" in text
    assert "median" in text and "ms/image" in text
    gmacs = model_flops(create_model("micro", drop_path_rate=0.0).eval(), torch.device("cpu"))["total"] / 2e9
    assert f"{gmacs:.4f}" in text and f"{3 * gmacs:.4f}" in text  # per patch, per image of 3 patches
    assert text.strip() in capsys.readouterr().out


def test_default_report_is_quick_and_full_adds_throughput(capsys):
    assert main(["--model_size", "micro", "--device", "cpu"]) == 0
    quick = capsys.readouterr()
    assert "latency ms (bs 1)" in quick.out and "patches/s bs" not in quick.out
    assert "3 timed runs" in quick.out and "profiling" in quick.err  # the progress bar
    assert main(["--model_size", "micro", "--device", "cpu", "--full", "--iters", "1", "--warmup", "0"]) == 0
    full = capsys.readouterr().out
    assert all(f"patches/s bs {bs}" in full for bs in (1, 8, 32))


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--model_size", "huge"]])
def test_bad_options_are_refused(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
