"""Configuration: YAML + command line, the original flag names, clear errors."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iqa_dist.config import (_HINTS, _RANGES, PATCH_SIZE, Config, ConfigError, check_pretrained, for_world, from_dict,
                             load_yaml, parse_config, save_yaml)
from iqa_dist.models.backbones import BACKBONES

CONFIGS = Path(__file__).parents[1] / "configs"


def test_original_flags_keep_their_meaning():
    cfg = parse_config(["--model_size", "base", "--no_multiscale", "--attention_fusion",
                        "--ranking_loss_alpha", "0", "--ranking_loss_margin", "0.2",
                        "--drop_path_rate", "0.3", "--dropout_rate", "0.4", "--weight_decay", "2e-4",
                        "--epochs", "30", "--batch_size", "32", "--lr", "5e-6", "--no_lr_scheduler",
                        "--patience", "7", "--no_early_stopping", "--dataset", "csiq",
                        "--train_patch_num", "25", "--test_patch_num", "15", "--test_random_crop",
                        "--no_spaq"])
    assert (cfg.model_size, cfg.multiscale, cfg.attention_fusion) == ("base", False, True)
    assert cfg.ranking_loss_alpha == 0.0 and isinstance(cfg.ranking_loss_alpha, float)
    assert (cfg.lr, cfg.weight_decay, cfg.lr_scheduler) == (5e-6, 2e-4, "none")
    assert (cfg.patience, cfg.early_stopping, cfg.spaq, cfg.test_random_crop) == (7, False, False, True)
    assert (cfg.dataset, cfg.train_patch_num, cfg.test_patch_num) == ("csiq", 25, 15)


def test_command_line_overrides_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model_size: small\nlr: 1.0e-4\nepochs: 3\n")
    cfg = parse_config(["--config", str(path), "--lr", "3e-4"])
    assert (cfg.model_size, cfg.lr, cfg.epochs) == ("small", 3e-4, 3)


def test_unknown_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dropout_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'dropout_rat'.*'dropout_rate'"):
        load_yaml(path)


def test_unknown_flag_names_the_nearest(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--ranking_alpha", "0.1"])
    assert "ranking_loss_alpha" in capsys.readouterr().err


def test_duplicated_yaml_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1.0e-5\nepochs: 3\nlr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"duplicated key 'lr' \(line 3\)"):
        load_yaml(path)


@pytest.mark.parametrize("values,problem", [
    ({"epochs": "ten"}, "epochs: expected int"),
    ({"epochs": 2.5}, "epochs: expected int"),
    ({"multiscale": "yes"}, "multiscale: expected bool"),
    ({"model_size": "huge"}, "model_size: 'huge' is not one of"),
    ({"optimizer": "sgd"}, "optimizer: 'sgd' is not one of adamw, adam"),
    ({"lr": None}, "lr: must not be null"),
    ({"cross_datasets": "spaq"}, "cross_datasets: expected a list"),
])
def test_values_are_type_checked(values, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict(values)


def test_round_trip(tmp_path):
    cfg = from_dict({"model_size": "micro", "lr": 3e-4, "cross_datasets": ["spaq", "livec"],
                     "pretrained_path": "w.safetensors"})
    save_yaml(cfg, tmp_path / "config.yaml")
    assert load_yaml(tmp_path / "config.yaml") == cfg


def test_optional_string_from_command_line_stays_a_string():
    assert parse_config(["--pretrained_path", "123"]).pretrained_path == "123"
    assert parse_config(["--resume", "latest"]).resume == "latest"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    if path.name.startswith("sweep"):  # a sweep: its base, overrides and every value of its space
        from iqa_dist import tune

        assert isinstance(tune.load_sweep(path).base, Config)
        return
    assert isinstance(load_yaml(path), Config)


def test_seed_example_configs_match_the_original_commands():
    base, tiny = load_yaml(CONFIGS / "base.yaml"), load_yaml(CONFIGS / "tiny.yaml")
    assert (base.model_size, base.global_batch_size, base.lr, base.dropout_rate, base.drop_path_rate) == \
        ("base", 32, 5e-6, 0.4, 0.3)
    assert (tiny.model_size, tiny.global_batch_size, tiny.lr, tiny.dropout_rate, tiny.drop_path_rate) == \
        ("tiny", 96, 1e-5, 0.3, 0.2)


def test_seed_configs_follow_the_runs_behind_the_numbers():
    """Where the seed document and its runs differ: Swin-T's 0.9236 ran with alpha 0, Swin-S's
    0.9303 with batch 96 (seed-recipe.md)."""
    assert load_yaml(CONFIGS / "tiny.yaml").ranking_loss_alpha == 0.0
    assert load_yaml(CONFIGS / "small.yaml").global_batch_size == 96


def test_resnet50_config_is_the_original_hyperiqa():
    cfg = load_yaml(CONFIGS / "resnet50.yaml")
    assert (cfg.model_size, cfg.multiscale, BACKBONES[cfg.model_size].timm_name) == \
        ("resnet50", False, "resnet50.tv_in1k")  # single scale, torchvision's ImageNet weights
    assert (cfg.optimizer, cfg.lr, cfg.lr_ratio, cfg.weight_decay, cfg.lr_scheduler) == \
        ("adam", 2e-5, 10.0, 5e-4, "hyperiqa")


def test_list_values_from_command_line():
    assert parse_config(["--cross_datasets", "spaq"]).cross_datasets == ["spaq"]
    assert parse_config(["--cross_datasets", "[spaq, livec]"]).cross_datasets == ["spaq", "livec"]


def test_global_batch_is_divided_among_processes_at_the_same_lr():
    cfg = from_dict({"global_batch_size": 32, "lr": 5e-6, "lr_scale": "linear"})
    for world, per_process in ((1, 32), (2, 16), (8, 4)):
        scaled = for_world(cfg, world)
        assert (scaled.batch_size, scaled.global_batch_size, scaled.lr) == (per_process, 32, 5e-6)
    assert for_world(from_dict({"global_batch_size": 32, "grad_accum": 2}), 4).batch_size == 4
    with pytest.raises(ConfigError, match="global_batch_size 32 does not divide among 3 process"):
        for_world(cfg, 3)


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_per_process_batch_grows_the_global_batch_and_lr_follows_the_rule(rule, factor):
    scaled = for_world(from_dict({"batch_size": 8, "lr": 1e-4, "lr_scale": rule}), 4)
    assert (scaled.batch_size, scaled.global_batch_size) == (8, 32)
    assert scaled.lr == pytest.approx(1e-4 * factor)


@pytest.mark.parametrize("name, global_batch", [("base", 32), ("small", 96), ("tiny", 96)])
def test_seed_configs_state_the_seeds_global_batch(name, global_batch):
    cfg = load_yaml(CONFIGS / f"{name}.yaml")
    assert for_world(cfg, 1).batch_size == global_batch
    assert for_world(cfg, 8).global_batch_size == global_batch and for_world(cfg, 8).lr == cfg.lr


def test_every_numeric_key_has_a_range():
    numeric = {name for name, hint in _HINTS.items() if hint in (int, float)}
    assert numeric == set(_RANGES) | {"patch_size"}  # patch_size: one value, PATCH_SIZE


@pytest.mark.parametrize("flag, value, message", [
    ("batch_size", "-4", "--batch_size -4: must be >= 1"),
    ("batch_size", "0", "--batch_size 0: must be >= 1"),
    ("train_patch_num", "0", "--train_patch_num 0: must be >= 1"),
    ("max_steps_per_epoch", "-3", "--max_steps_per_epoch -3: must be >= 0"),
    ("patch_size", "64", "--patch_size 64: the model takes 224x224 patches only"),
    ("workers", "-1", "--workers -1: must be >= 0"),
    ("lr", "-0.1", "--lr -0.1: must be >= 0"),
    ("lr", "nan", "--lr nan: must be a finite number"),
    ("epochs", "0", "--epochs 0: must be >= 1"),
    ("dropout_rate", "1.5", "--dropout_rate 1.5: must be <= 1"),
    ("seed", "-1", "--seed -1: must be >= 0"),
    ("keep_last", "0", "--keep_last 0: must be >= 1"),
    ("keep_best", "0", "--keep_best 0: must be >= 1"),
    ("save_every_n_steps", "-1", "--save_every_n_steps -1: must be >= 0"),
])
def test_out_of_range_flag_is_one_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_config([f"--{flag}", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


def test_out_of_range_yaml_value_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: -4\n")
    with pytest.raises(ConfigError, match=rf"^{path}: batch_size -4: must be >= 1$"):
        load_yaml(path)


def test_lr_zero_is_a_legitimate_frozen_check():
    assert parse_config(["--lr", "0"]).lr == 0.0


@pytest.mark.parametrize("flag, value", [("batch_size", "-4"), ("train_patch_num", "0")])
def test_values_that_used_to_hang_training_end_at_once(flag, value):
    done = subprocess.run([sys.executable, "-m", "iqa_dist.train", "--dataset", "nowhere", f"--{flag}", value],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().endswith(f"error: --{flag} {value}: must be >= 1 (see --help)")
    assert done.stderr.count("\n") == 1


def test_readme_reproduction_commands_parse():
    """The README's "Reproducing the seed" training jobs: each config with its arguments is a
    run the trainer accepts, on pretrained weights, three rounds."""
    readme = (CONFIGS.parent / "README.md").read_text()
    section = readme.split("## Reproducing the seed", 1)[1].split("\n## ", 1)[0]
    jobs = re.findall(r'IQA_CONFIG=(configs/\S+) IQA_RUN_DIR=\S+ \\\n\s+IQA_ARGS="([^"]*)"', section)
    assert [config for config, _ in jobs] == ["configs/tiny.yaml", "configs/base.yaml"]
    for config, args in jobs:
        cfg = parse_config(["--config", str(CONFIGS.parent / config), *args.split()])
        check_pretrained(cfg)
        assert cfg.rounds == 3 and cfg.pretrained_path.endswith(f"{BACKBONES[cfg.model_size].timm_name}.safetensors")
    assert "0.9316" in section and "test-selected" in (CONFIGS / "base.yaml").read_text()


def test_patch_size_is_the_models_only_input_size(tmp_path):
    from iqa_dist.models.hyperiqa import PATCH
    path = tmp_path / "c.yaml"
    path.write_text("patch_size: 384\n")
    with pytest.raises(ConfigError, match=rf"^{path}: patch_size 384: the model takes 224x224 patches only$"):
        load_yaml(path)
    assert from_dict({"patch_size": PATCH}).patch_size == PATCH_SIZE == PATCH
