"""Typed run configuration: defaults < YAML file < command line.

The field names are the command-line flags of the original Swin HyperIQA scripts
(``--model_size``, ``--ranking_loss_alpha`` ...), so their commands keep working.
Every boolean ``x`` also has ``--no_x``; ``--no_lr_scheduler`` and ``--no_spaq`` are
kept as the aliases they were.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import atomic


class ConfigError(ValueError):
    """A bad configuration value or key; the message is one line meant for people."""


@dataclass
class Config:
    # -- model
    model_size: str = "tiny"  # tiny | small | base (Swin) | resnet50 | micro (Swin), mobilenet (CPU demo)
    multiscale: bool = True  # concat of all four stages as hyper-network input
    attention_fusion: bool = False  # experimental, rejected in the original ablation
    dropout_rate: float = 0.3
    drop_path_rate: float = 0.2
    # ImageNet backbone weights, from timm's hub (needs network) or pretrained_path. Unset (None)
    # is refused for the fine-tuning backbones: see check_pretrained
    pretrained: bool | None = None
    pretrained_path: str | None = None  # local .pth/.safetensors file, or a folder of python -m iqa_dist.weights files
    # -- loss
    ranking_loss_alpha: float = 0.5
    ranking_loss_margin: float = 0.1
    # -- optimisation
    epochs: int = 10
    batch_size: int = 96  # patches per step on each process (as in timm and open_clip)
    global_batch_size: int = 0  # patches per optimiser step over all processes; overrides batch_size
    lr: float = 1e-5  # backbone and LDA taps, for the global batch it was tuned at (see for_world)
    lr_scale: str = "none"  # none | linear | sqrt: how lr follows a global batch grown by processes
    lr_ratio: float = 10.0  # hyper network lr = lr * lr_ratio
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam (L2 weight decay, as the original HyperIQA)
    # cosine | step (the seed's: hyper network / 10 every 6 epochs from epoch 8, backbone constant)
    # | hyperiqa (the original's: step, and the hyper network's ratio 1 from epoch 11) | none
    lr_scheduler: str = "cosine"
    eta_min_ratio: float = 0.01  # cosine floor, relative to each group's lr
    step_size: int = 6  # step and hyperiqa: epochs between decays of the hyper network's lr
    step_gamma: float = 0.1  # step and hyperiqa: factor of each decay
    warmup_epochs: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 on GPUs that have it, else no) | no | bf16 | fp16
    compile: str = "none"  # torch.compile backend for training: none | inductor | aot_eager (no codegen)
    # -- early stopping and selection (validation split only)
    early_stopping: bool = True
    patience: int = 5
    # -- data
    dataset: str = "koniq-10k"  # packed set under shards_root, a path to one, or a URL (data/remote.py)
    shards_root: str = "shards"
    cache_dir: str | None = None  # where sets from URLs are staged (default: $IQA_CACHE or ~/.cache/iqa_dist)
    train_patch_num: int = 20  # random crops per image per epoch
    test_patch_num: int = 20  # deterministic grid crops per image at evaluation
    test_random_crop: bool = False  # seeded random crops at evaluation instead of a grid
    color_jitter: bool = False  # the seed's ColorJitter(0.1, 0.1, 0.1, 0.05) on training patches (data/jitter.py)
    patch_size: int = 224
    workers: int = 2  # data loader processes per rank
    threads: int = 0  # torch threads per rank (0: torch's default); 1 avoids oversubscribed CPUs
    shuffle_buffer: int = 2000  # patches mixed across images before batching
    split_round: int = 0  # which seeded split of the manifest to use
    rounds: int = 1  # train this many seeded splits and report median and spread
    spaq: bool = True  # cross-data-set test on shards_root/spaq after training, if packed
    cross_datasets: list[str] = field(default_factory=list)  # more sets to test on after training
    # -- run
    run_dir: str | None = None  # default: runs/<dataset>-<model_size>-<time>
    seed: int = 42
    deterministic: bool = False
    resume: str | None = None  # latest | path to a checkpoint directory
    max_steps_per_epoch: int = 0  # cap steps per epoch (0: a full pass); for quick runs
    log_every: int = 10  # steps between reads of the loss, when the ranks also agree on stopping, and
    #                      between the loss, lr and samples/s points the trackers log
    # Experiment trackers, Accelerate's: tensorboard (run_dir/tb), mlflow (run_dir/mlruns unless
    # MLFLOW_TRACKING_URI), wandb (run_dir/wandb unless WANDB_DIR; WANDB_MODE=offline), aim, ...; none
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])
    tracker_project: str = "iqa_dist"  # the W&B project, the MLflow experiment
    dist_timeout_s: int = 600  # collectives give up after this long (torch's default: 30 min); a rank
    #                            silent 0.6 x this long is declared lost; the others exit with code 3
    plots: bool = True
    max_bad_samples: int = 10  # unreadable images skipped per process before a run stops
    overwrite: bool = False  # start afresh in a run_dir an earlier run left, deleting all it holds
    allow_changed: list[str] = field(default_factory=list)  # keys a resume may change (e.g. [lr])
    # -- checkpoints (run mechanics: a resume may change them)
    keep_last: int = 2  # step-N checkpoints kept, the newest (never the one `last` or a preemption marker names)
    save_every_n_steps: int = 0  # also a checkpoint every this many optimizer steps of the run, mid-epoch (0: off)
    keep_best: int = 1  # epochs kept by val SRCC: checkpoints/best is the best; above 1, checkpoints/best_k too


# Keys that say how a run is carried out, not what it computes: a resume may change them.
# Every other key (and the packed data) defines the experiment, which a resume continues.
RUN_KEYS = frozenset({
    "epochs", "patience", "early_stopping", "workers", "threads", "log_every", "max_steps_per_epoch",
    "log_with", "tracker_project",  # what is logged, and where
    "dist_timeout_s", "plots", "max_bad_samples", "resume", "run_dir", "overwrite", "allow_changed",
    "cross_datasets", "spaq", "rounds", "dataset", "shards_root", "cache_dir", "compile", "mixed_precision",
    "pretrained", "pretrained_path",  # a resumed model's weights come from its checkpoint
    "keep_last", "save_every_n_steps", "keep_best",  # which checkpoints are written and kept
})

_ALIASES = {  # flags of the original scripts that are not "--no_<bool field>"
    "no_lr_scheduler": ("lr_scheduler", "none"),
}
_CHOICES = {
    "model_size": ("tiny", "small", "base", "resnet50", "micro", "mobilenet"),
    "optimizer": ("adamw", "adam"),
    "lr_scheduler": ("cosine", "step", "hyperiqa", "none"),
    "lr_scale": ("none", "linear", "sqrt"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "compile": ("none", "inductor", "aot_eager"),
}
# Inclusive bounds of every numeric key (None: unbounded). Checked when a config is
# parsed, so a bad value is one line at start, not a hang or a traceback later.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "dropout_rate": (0, 1), "drop_path_rate": (0, 1),
    "ranking_loss_alpha": (0, None), "ranking_loss_margin": (0, None),
    "epochs": (1, None), "batch_size": (1, None), "global_batch_size": (0, None),  # 0: unset
    "lr": (0, None),  # lr 0 is a legitimate frozen check
    "lr_ratio": (0, None), "weight_decay": (0, None), "eta_min_ratio": (0, None),
    "step_size": (1, None), "step_gamma": (0, None), "warmup_epochs": (0, None), "grad_clip": (0, None),
    "grad_accum": (1, None), "patience": (1, None),
    "train_patch_num": (1, None), "test_patch_num": (1, None),
    "workers": (0, None), "threads": (0, None), "shuffle_buffer": (0, None),
    "split_round": (0, None), "rounds": (1, None), "seed": (0, 2**32 - 1),  # numpy seeds are unsigned
    "max_steps_per_epoch": (0, None), "log_every": (1, None), "max_bad_samples": (0, None),  # 0: none
    "dist_timeout_s": (1, None),
    "keep_last": (1, None), "keep_best": (1, None), "save_every_n_steps": (0, None),  # 0: off
}
# The model's only input size (models/hyperiqa.py PATCH): its hyper network pools every
# stage to a fixed 7x7, so another size would fail deep in the first forward pass
PATCH_SIZE = 224
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)
# Backbones small enough to learn from scratch on a CPU (the demo, the tests); every other
# one is fine-tuned from ImageNet weights, as the seed and the original HyperIQA did
FROM_SCRATCH_SIZES = ("micro", "mobilenet")


def _is_switch(name: str) -> bool:
    """A boolean key (``pretrained`` may also be left unset): ``--x`` and ``--no_x`` flags."""
    return _HINTS[name] in (bool, bool | None)


def check_pretrained(cfg: Config) -> None:
    """Refuse a run of a fine-tuning backbone that would silently start from random weights:
    at a fine-tuning lr it learns little, and nothing says why."""
    if cfg.pretrained is False and cfg.pretrained_path:
        raise ConfigError(f"pretrained: false contradicts pretrained_path {cfg.pretrained_path!r}; "
                          "drop one of them")
    if cfg.pretrained is None and not cfg.pretrained_path and cfg.model_size not in FROM_SCRATCH_SIZES:
        raise ConfigError(f"pretrained: not set for model_size {cfg.model_size}; set pretrained: true "
                          "(ImageNet weights; pretrained_path: FILE for a local copy, see python -m "
                          "iqa_dist.weights) or pretrained: false to train it from random weights")


def _nearest(name: str) -> str:
    match = difflib.get_close_matches(name, list(FIELDS) + list(_ALIASES), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted where floats are."""
    hint = _HINTS[name]
    optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must not be null")
    base = next(a for a in hint.__args__ if a is not type(None)) if optional else hint
    if typing.get_origin(base) is list:
        if name == "log_with":  # also one tracker's name, or none, without a list's brackets
            value = [] if value in ("none", ["none"]) else [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings, got {value!r}")
        return list(value)
    if isinstance(value, str) and base in (int, float):
        value = _number(base, value)
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name}: expected {base.__name__}, got {value!r}")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(_CHOICES[name])}")
    if name in _RANGES:
        _check_range(name, value)
    if name == "patch_size" and value != PATCH_SIZE:
        raise ConfigError(f"{name} {value}: the model takes {PATCH_SIZE}x{PATCH_SIZE} patches only")
    return value


def _number(kind: type, text: str) -> Any:
    """``text`` as an int or float, else ``text`` unchanged. PyYAML follows YAML 1.1, which
    reads ``1e-3`` (no dot) as a string: users write that, and the command line takes it."""
    try:
        return kind(text.strip())
    except ValueError:
        return text


def _check_range(name: str, value: float) -> None:
    low, high = _RANGES[name]
    if not math.isfinite(value):
        raise ConfigError(f"{name} {value}: must be a finite number")
    if low is not None and value < low:
        raise ConfigError(f"{name} {value}: must be >= {low}")
    if high is not None and value > high:
        raise ConfigError(f"{name} {value}: must be <= {high}")


def from_dict(values: dict[str, Any], base: Config | None = None, where: str = "config") -> Config:
    """A new config from ``base`` with ``values`` applied, every key and value checked.

    Errors name ``where`` and the key; with ``where=""`` (the command line) the flag."""
    updates = {}
    for key, value in values.items():
        if key in _ALIASES:
            key, value = _ALIASES[key] if value else (key, None)
            if value is None:
                continue
        elif key.startswith("no_") and key[3:] in FIELDS and _is_switch(key[3:]):
            key, value = key[3:], not value
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown key {key!r}{_nearest(key)}")
        try:
            updates[key] = _coerce(key, value)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}" if where else f"--{err}") from None
    return dataclasses.replace(base or Config(), **updates)


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe YAML loading that rejects a key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"duplicated key {key!r} (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | os.PathLike, base: Config | None = None) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    return from_dict(values, base, where=str(path))


def for_world(cfg: Config, world: int) -> Config:
    """The config as each of ``world`` processes runs it: per-process batch and lr.

    With ``global_batch_size`` the recipe is fixed whatever the number of processes:
    each takes ``global / (world x grad_accum)`` patches a step at the configured lr.
    Without it, ``batch_size`` is per process, so the global batch grows with the
    processes (and accumulation), and ``lr_scale`` says how lr follows:
    ``linear`` (x the growth), ``sqrt`` or ``none``.
    """
    shares = world * cfg.grad_accum
    if cfg.global_batch_size:
        if cfg.global_batch_size % shares:
            raise ConfigError(f"global_batch_size {cfg.global_batch_size} does not divide among {world} "
                              f"process(es) x {cfg.grad_accum} accumulation step(s)")
        return dataclasses.replace(cfg, batch_size=cfg.global_batch_size // shares)
    factor = {"none": 1.0, "linear": float(shares), "sqrt": math.sqrt(shares)}[cfg.lr_scale]
    return dataclasses.replace(cfg, global_batch_size=cfg.batch_size * shares, lr=cfg.lr * factor)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_yaml(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically: a crash never leaves half a file."""
    atomic.write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _parse_value(name: str, text: str) -> Any:
    """Command-line text to a value of the field's type (YAML syntax for lists and null)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) is list:  # "[a, b]" or a single item
        value = yaml.safe_load(text)
        return value if isinstance(value, list) else [text]
    types_ = getattr(hint, "__args__", (hint,))
    if text.lower() in ("null", "none") and type(None) in types_:
        return None
    if str in types_:
        return text
    for number in (int, float):
        if number in types_:
            try:
                return number(text)  # YAML would read "3e-4" as a string
            except ValueError:
                pass
    return yaml.safe_load(text)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per field (plus ``--no_<bool>`` and aliases)."""
    parser.add_argument("--config", help="YAML file with any of the flags below as keys")
    group = parser.add_argument_group("run configuration (override the YAML)")
    for name, f in FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if _is_switch(name):
            group.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS,
                               help=f"(default {default})")
            group.add_argument(f"--no_{name}", action="store_true", default=argparse.SUPPRESS)
        else:
            group.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar="VALUE",
                               help=f"(default {default})")
    for alias, (target, value) in _ALIASES.items():
        group.add_argument(f"--{alias}", action="store_true", default=argparse.SUPPRESS,
                           help=f"same as --{target} {value}")


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    given = {k: v for k, v in vars(args).items() if k in FIELDS or k in _ALIASES
             or (k.startswith("no_") and k[3:] in FIELDS)}
    values = {k: v if isinstance(v, bool) else _parse_value(k, v) for k, v in given.items()}
    return from_dict(values, cfg, where="")


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """Parse a command line into a Config; an unknown flag names the nearest valid one."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    add_config_args(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        _exit(parser, f"unknown flag {unknown[0]!r}{_nearest(flag)}")
    try:
        return config_from_args(args)
    except ConfigError as err:
        _exit(parser, str(err))


def _exit(parser: argparse.ArgumentParser, message: str) -> typing.NoReturn:
    """argparse's error exit without its usage: with one flag per key that is forty lines
    burying the one that matters."""
    parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")
