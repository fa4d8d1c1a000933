"""Pretrained backbones: the weights tool's file is what training starts from, offline; a
fine-tuning backbone never starts from random weights unless the config says so."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from iqa_dist import weights
from iqa_dist.config import FROM_SCRATCH_SIZES, ConfigError, check_pretrained, from_dict, load_yaml
from iqa_dist.models.backbones import BACKBONES
from iqa_dist.tools import model_from_config
from iqa_dist.train import Trainer
from iqa_dist.tune import load_sweep
from test_train import REPO, machinery_config

CONFIGS = REPO / "configs"


def timm_name(body_key: str) -> str:
    """A key of timm's feature extractor as the full model (and the hub's file) names it."""
    return re.sub(r"^layers_(\d+)\.", r"layers.\1.", body_key)


def assert_backbone_is(body: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    state = body.state_dict()
    assert state  # something compared
    for key, value in state.items():
        assert torch.equal(value.cpu(), saved[timm_name(key)]), key


@pytest.mark.parametrize("as_folder", [False, True])
def test_training_starts_from_the_weights_tools_file(small_shards, tmp_path, as_folder):
    spec = BACKBONES["micro"]
    torch.manual_seed(7)  # weights unlike the ones a fresh micro backbone draws
    path = weights.save(timm.create_model(spec.timm_name, **spec.timm_kwargs), "micro", tmp_path / "weights")
    saved = load_file(str(path))
    cfg = machinery_config(small_shards, tmp_path / "run", workers=0,
                           pretrained_path=str(path.parent if as_folder else path))
    torch.manual_seed(0)
    assert_backbone_is(model_from_config(cfg, pretrained=True).backbone.body, saved)
    trainer = Trainer(cfg)  # after accelerator.prepare
    assert_backbone_is(trainer.accelerator.unwrap_model(trainer.model).backbone.body, saved)
    assert path.name == "swin_tiny_patch4_window7_224.safetensors"


def test_weights_tool_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "iqa_dist.weights", "--model_size", "tiny", "--out",
                           str(tmp_path / "w")], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: cannot fetch swin_tiny_patch4_window7_224 from timm's hub")
    assert done.stderr.count("\n") == 1 and not (tmp_path / "w").exists()


def test_a_fine_tuning_backbone_without_pretrained_is_refused(small_shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text((CONFIGS / "tiny.yaml").read_text().replace("pretrained: true", "# (none)"))
    cfg = from_dict({"dataset": str(small_shards), "run_dir": str(tmp_path / "run")}, load_yaml(config))
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert str(err.value).startswith("pretrained: not set for model_size tiny") and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    for explicit in ({"pretrained": False}, {"pretrained": True}, {"pretrained_path": "w.safetensors"}):
        check_pretrained(from_dict(explicit, load_yaml(config)))  # said so: accepted
    with pytest.raises(ConfigError, match="contradicts pretrained_path"):
        check_pretrained(from_dict({"pretrained": False, "pretrained_path": "w.safetensors"}))
    check_pretrained(from_dict({"model_size": "micro"}))  # the CPU backbones learn from scratch


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_fine_tunes_pretrained_weights(path):
    cfg = load_sweep(path).base if path.name.startswith("sweep") else load_yaml(path)
    check_pretrained(cfg)
    from_scratch = cfg.model_size in FROM_SCRATCH_SIZES and path.stem in ("demo", "sweep_demo")  # CPU demos
    assert cfg.pretrained is True or from_scratch
