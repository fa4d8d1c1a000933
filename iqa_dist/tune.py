"""Hyper-parameter sweeps of HyperIQA training with Ray Tune.

    python -m iqa_dist.tune --config configs/sweep_demo.yaml
    python -m iqa_dist.tune --config configs/sweep.yaml --address auto
    python -m iqa_dist.tune --config configs/sweep.yaml --resume
    python -m iqa_dist.tune --config configs/sweep.yaml --resume auto   # resume if saved, else start

Every trial is one ``iqa_dist.train.train`` run that reports each epoch's validation
metrics and checkpoint to Tune; a retried, resumed or (PBT) exploiting trial continues
from its Tune checkpoint. Selection uses the validation split only. Results land in
``<storage_path>/<name>/``: results.csv/.parquet (one row per trial), best_config.yaml
(the base recipe with the best trial's values, ready for ``python -m iqa_dist.train --config``)
and sweep.png; each trial's training run is in ``trial_<id>/run`` and the epochs it trained
in ``trial_<id>/epochs.csv``.

Trials report ``val_srcc_best``, the best validation SRCC so far (of the weights the trial
holds: a restarted or PBT-cloned trial inherits it with them), and ASHA and PBT compare that
by default: this recipe peaks in its first epochs and then declines, so the current epoch's
score would stop the trial holding the best weights.

Sweep YAML keys (all optional but ``base`` or ``overrides`` naming a data set):

    base: configs/tiny.yaml        # train config every trial starts from (paths: from the cwd)
    overrides: {epochs: 12}        # train Config keys applied to every trial; the trial budget
                                   # (TRIAL_ONLY: epochs, patience ...) stays out of best_config.yaml
    space:                         # default: dropout_rate, drop_path_rate, lr, ranking_loss_alpha
      lr: {type: loguniform, low: 1.0e-6, high: 1.0e-4}   # also uniform; num: N for search grid
      ranking_loss_alpha: {type: choice, values: [0.0, 0.5, 1.0]}  # also grid; randint low..high
      model_size: {type: choice, values: [tiny, small]}   # pretrained_path: a folder of both files
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}  # pbt: perturbation_interval, synch; none
    search: random                 # or grid: every axis enumerated (choice values, range num points);
                                   # optuna, hyperopt: model-based (no grid, no pbt); bohb: with
                                   # scheduler {type: hyperband, reduction_factor: 3}, its default
    seed: 42                       # of the search (default: the base's seed): same file, same trials
    num_samples: 8                 # random draws (grid: repeats of the grid)
    max_concurrent: 2
    resources_per_trial: {cpu: 4, gpu: 1}  # per process; gpu at most 1 (a process drives one GPU);
                                   # workers: N runs each trial as N DDP ranks of that size (Ray
                                   # Train's TorchTrainer, see tune_workers.py): gpu: 1, workers: 4
    max_failures: 2                # retries of a failed trial, from its last checkpoint
    metric: val_srcc_best          # or val_srcc, val_plcc, val_krcc, val_rmse (the epoch's)
    mode: max
    loggers: [csv, json, tensorboard]  # Tune's per-trial loggers (these: the default); also mlflow
                                   # (MLFLOW_TRACKING_URI, else <storage_path>/<name>/mlruns) and
                                   # wandb (WANDB_MODE=offline: no network; WANDB_PROJECT, WANDB_DIR)
    storage_path: sweeps           # local or shared file system (every node must see it)
    name: my-sweep
"""
from __future__ import annotations

import argparse
import csv
import difflib
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from .checkpoint import read_trainer_state
from .config import FIELDS, Config, ConfigError, check_pretrained, from_dict, load_yaml, save_yaml, to_dict
from .runlock import NAME as LOCK_NAME
from .runlock import LockedError, RunLock

DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "dropout_rate": {"type": "uniform", "low": 0.0, "high": 0.5},
    "drop_path_rate": {"type": "uniform", "low": 0.0, "high": 0.4},
    "lr": {"type": "loguniform", "low": 1e-6, "high": 1e-4},
    "ranking_loss_alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
}
SPACE_FIELDS = {  # per type: required fields, optional fields
    "loguniform": ({"low", "high"}, {"num"}),
    "uniform": ({"low", "high"}, {"num"}),
    "randint": ({"low", "high"}, {"num"}),
    "choice": ({"values"}, set()),
    "grid": ({"values"}, set()),
}
SCHEDULER_FIELDS = {
    "asha": {"grace_period", "reduction_factor"},
    "pbt": {"perturbation_interval", "quantile_fraction", "resample_probability", "synch"},
    "hyperband": {"reduction_factor"},  # BOHB's (HyperBandForBOHB): search bohb only
    "none": set(),
    "fifo": set(),
}
SEARCHES = ("random", "grid", "optuna", "hyperopt", "bohb")
MODEL_BASED = ("optuna", "hyperopt", "bohb")  # they learn from finished trials: no grids, no PBT
LOGGERS = ("csv", "json", "tensorboard", "mlflow", "wandb")
DEFAULT_LOGGERS = ["csv", "json", "tensorboard"]  # Tune's own defaults
SWEEP_KEYS = ("base", "overrides", "space", "scheduler", "search", "seed", "num_samples", "max_concurrent",
              "resources_per_trial", "max_failures", "metric", "mode", "loggers", "storage_path", "name")
DRIVER_MEMORY = 1 << 20  # bytes a trial of several ranks reserves for itself (tune_workers.py)
CLUSTER_WAIT_S = 60  # for a node of a running cluster big enough for one trial
SET_BY_SWEEP = ("run_dir", "resume", "rounds", "overwrite", "allow_changed")  # per trial, or meaningless in one
# Overrides that size a trial, not the recipe: best_config.yaml takes these from the base
TRIAL_ONLY = ("epochs", "patience", "early_stopping", "max_steps_per_epoch", "plots", "workers", "threads")
VAL_METRICS = ("val_srcc", "val_plcc", "val_krcc", "val_rmse")  # never a test metric
RUNNING_BEST = "val_srcc_best"  # the best val SRCC so far: the one the run's best weights have
EPOCH_LOG = "epochs.csv"  # in each trial's directory: every epoch the trial trained
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps a local Ray on 127.0.0.1
    "RAY_AUTH_MODE": "disabled",  # else Ray creates ~/.ray/auth_token
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # trials keep the driver's working directory
    # Tune snapshots its state at every checkpoint (num_to_keep=1), so that a killed sweep
    # resumes where it was; with quick epochs it would warn about that every time
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


@dataclass
class Sweep:
    """A checked sweep: the train config of every trial (base + overrides, absolute paths), the
    recipe that best_config.yaml completes (base + overrides but the trial budget), and how to search."""

    base: Config
    space: dict[str, dict[str, Any]]
    recipe: Config = field(default_factory=Config)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "asha"})
    search: str = "random"
    seed: int = 42  # of the search: the same sweep proposes the same trials
    num_samples: int = 8
    max_concurrent: int | None = None
    cpu: float = 1.0  # per rank, as Ray Train's ScalingConfig counts them
    gpu: float = 0.0
    workers: int = 1  # ranks per trial
    max_failures: int = 1
    metric: str = RUNNING_BEST
    mode: str = "max"
    loggers: tuple[str, ...] = tuple(DEFAULT_LOGGERS)
    storage_path: str = "sweeps"
    name: str = "sweep"

    @property
    def experiment_dir(self) -> Path:
        return Path(self.storage_path).absolute() / self.name

    @property
    def epoch_metric(self) -> str:
        """The per-epoch column the results rank trials on (their best epoch's value)."""
        return "val_srcc" if self.metric == RUNNING_BEST else self.metric


# ---------------------------------------------------------------- parsing


def _nearest(key: str, valid: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _typed(raw: dict, key: str, kind: type | tuple[type, ...], default: Any, where: str) -> Any:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{where}: {key}: expected {names}, got {value!r}")
    return value


def _one_of(raw: dict, key: str, choices: Sequence[str], default: str, where: str) -> str:
    value = _typed(raw, key, str, default, where)
    if value not in choices:
        raise ConfigError(f"{where}: {key}: {value!r} is not one of {', '.join(choices)}")
    return value


def absolute_paths(cfg: Config) -> Config:
    """Paths that work from any directory: trials may run elsewhere (another node, a chdir)."""
    dataset = Path(cfg.dataset)
    return replace(cfg, shards_root=str(Path(cfg.shards_root).absolute()),
                   dataset=str(dataset.absolute()) if (dataset / "manifest.parquet").exists() else cfg.dataset,
                   pretrained_path=cfg.pretrained_path and str(Path(cfg.pretrained_path).absolute()),
                   cache_dir=cfg.cache_dir and str(Path(cfg.cache_dir).absolute()))


def parse_base(raw: dict, where: str) -> tuple[Config, Config]:
    """The trials' config (base + overrides) and the recipe (base + overrides but TRIAL_ONLY)."""
    base = _typed(raw, "base", (str, os.PathLike), None, where)
    overrides = _typed(raw, "overrides", dict, {}, where)
    for key in SET_BY_SWEEP:
        if key in overrides:
            raise ConfigError(f"{where}: overrides: {key!r} is set by the sweep")
    try:
        cfg = load_yaml(base) if base else Config()
    except ConfigError as err:
        raise ConfigError(f"{where}: base: {err}") from None
    recipe = from_dict({k: v for k, v in overrides.items() if k not in TRIAL_ONLY}, cfg, where=f"{where}: overrides")
    cfg = from_dict(overrides, cfg, where=f"{where}: overrides")
    if cfg.rounds != 1:
        raise ConfigError(f"{where}: base: rounds must be 1 in a sweep (one split per trial)")
    _check_pretrained(cfg, f"{where}: base")  # here, not in every trial
    return absolute_paths(cfg), absolute_paths(recipe)


def _check_pretrained(cfg: Config, where: str) -> None:
    try:
        check_pretrained(cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_axis(key: str, spec: Any, base: Config, where: str) -> dict[str, Any]:
    """One entry of ``space``, its fields and every value it can take checked against Config."""
    where = f"{where}: space.{key}"
    if key not in FIELDS:
        raise ConfigError(f"{where}: unknown Config key{_nearest(key, list(FIELDS))}")
    if key in SET_BY_SWEEP:
        raise ConfigError(f"{where}: set by the sweep, cannot be searched")
    if not isinstance(spec, dict) or spec.get("type") not in SPACE_FIELDS:
        raise ConfigError(f"{where}: expected {{type: {'|'.join(SPACE_FIELDS)}, ...}}, got {spec!r}")
    required, optional = SPACE_FIELDS[spec["type"]]
    given = set(spec) - {"type"}
    if required - given or given - required - optional:
        raise ConfigError(f"{where}: type {spec['type']} takes {', '.join(sorted(required | optional))}; "
                          f"got {', '.join(sorted(given)) or 'nothing'}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{where}: values must be a non-empty list")
    if "low" in spec and not all(isinstance(spec[k], (int, float)) and not isinstance(spec[k], bool)
                                 for k in ("low", "high")):
        raise ConfigError(f"{where}: low and high must be numbers")
    for value in candidates(spec):
        _check_pretrained(from_dict({key: value}, base, where=where), where)  # model_size: each size
    if "low" in spec and not (spec["low"] < spec["high"] and (spec["type"] != "loguniform" or spec["low"] > 0)):
        raise ConfigError(f"{where}: needs 0 < low < high for loguniform, low < high otherwise")
    if "num" in spec and (not isinstance(spec["num"], int) or spec["num"] < 1):
        raise ConfigError(f"{where}: num must be a positive integer")
    return dict(spec)


def candidates(spec: dict[str, Any]) -> list[Any]:
    """Values to type-check: the listed ones, or a range's ends as the sampler will give them."""
    if "values" in spec:
        return spec["values"]
    cast = int if spec["type"] == "randint" else float
    return [cast(spec["low"]), cast(spec["high"])]


def parse_scheduler(raw: dict, where: str, default: str = "asha") -> dict[str, Any]:
    spec = raw.get("scheduler", default)
    spec = {"type": spec} if isinstance(spec, str) else spec
    if not isinstance(spec, dict) or spec.get("type") not in SCHEDULER_FIELDS:
        raise ConfigError(f"{where}: scheduler: expected one of {', '.join(SCHEDULER_FIELDS)} "
                          f"(or {{type: asha, ...}}), got {spec!r}")
    unknown = set(spec) - {"type"} - SCHEDULER_FIELDS[spec["type"]]
    if unknown:
        key = sorted(unknown)[0]
        options = ", ".join(sorted(SCHEDULER_FIELDS[spec["type"]])) or "none"
        raise ConfigError(f"{where}: scheduler.{key}: not an option of {spec['type']} (options: {options})")
    return dict(spec)


def parse_loggers(raw: dict, where: str) -> tuple[str, ...]:
    names = raw.get("loggers", DEFAULT_LOGGERS)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{where}: loggers: expected a list of {', '.join(LOGGERS)}, got {names!r}")
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"{where}: loggers: unknown {name!r}{_nearest(name, LOGGERS)}; "
                              f"choices: {', '.join(LOGGERS)}")
    return tuple(dict.fromkeys(names))


def check_search(sweep: Sweep, where: str) -> None:
    """Refuse the combinations Ray Tune cannot run: BOHB's searcher and its HyperBand apart,
    a searcher beside PBT (which picks trials' values itself), a grid for a sampler."""
    search, kind = sweep.search, sweep.scheduler["type"]
    if search == "bohb" and kind != "hyperband":
        raise ConfigError(f"{where}: scheduler: search bohb runs with its own HyperBand (scheduler "
                          f"hyperband, the default with bohb), not {kind}")
    if kind == "hyperband" and search != "bohb":
        raise ConfigError(f"{where}: scheduler: hyperband is BOHB's (HyperBandForBOHB): use it with "
                          f"search bohb, or asha with search {search}")
    if search in MODEL_BASED and kind == "pbt":
        raise ConfigError(f"{where}: scheduler: pbt takes no search algorithm (it mutates trials itself); "
                          f"use search random or grid with pbt, or asha or none with search {search}")
    for key, spec in sweep.space.items():
        if search in MODEL_BASED and (spec["type"] == "grid" or "num" in spec):
            grid = "type grid" if spec["type"] == "grid" else "num"
            raise ConfigError(f"{where}: space.{key}: search {search} samples the space; {grid} (a grid) "
                              "does not apply: use a choice or a range")


def parse_sweep(raw: dict[str, Any], where: str = "sweep") -> Sweep:
    """Check a sweep mapping (the YAML's content); errors are one line naming ``where`` and the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sweep keys")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_nearest(key, SWEEP_KEYS)}")
    base, recipe = parse_base(raw, where)
    space = _typed(raw, "space", dict, DEFAULT_SPACE, where)
    search = _one_of(raw, "search", SEARCHES, "random", where)
    axes = {key: parse_axis(key, spec, base, where) for key, spec in space.items()}
    if search == "grid":
        for key, spec in axes.items():
            if "low" in spec and "num" not in spec:
                raise ConfigError(f"{where}: space.{key}: search grid needs num (points of the range)")
    resources = _typed(raw, "resources_per_trial", dict, {}, where)
    extra = sorted(set(resources) - {"cpu", "gpu", "workers"})
    if extra:
        raise ConfigError(f"{where}: resources_per_trial.{extra[0]}: only workers, cpu and gpu can be given")
    sweep = Sweep(
        base=base, recipe=recipe, space=axes, search=search, seed=_typed(raw, "seed", int, base.seed, where),
        scheduler=parse_scheduler(raw, where, "hyperband" if search == "bohb" else "asha"),
        num_samples=_typed(raw, "num_samples", int, 1 if search == "grid" else 8, where),
        max_concurrent=_typed(raw, "max_concurrent", int, None, where),
        cpu=float(_typed(resources, "cpu", (int, float), 1, f"{where}: resources_per_trial")),
        gpu=float(_typed(resources, "gpu", (int, float), 0, f"{where}: resources_per_trial")),
        workers=_typed(resources, "workers", int, 1, f"{where}: resources_per_trial"),
        max_failures=_typed(raw, "max_failures", int, 1, where),
        metric=_one_of(raw, "metric", (RUNNING_BEST, *VAL_METRICS), RUNNING_BEST, where),
        mode=_one_of(raw, "mode", ("max", "min"), "max", where), loggers=parse_loggers(raw, where),
        storage_path=str(_typed(raw, "storage_path", (str, os.PathLike), "sweeps", where)),
        name=_typed(raw, "name", str, "sweep", where))
    if sweep.metric == RUNNING_BEST and sweep.mode != "max":
        raise ConfigError(f"{where}: mode: {RUNNING_BEST} is the highest val SRCC so far: mode max")
    if sweep.scheduler["type"] == "pbt" and "model_size" in axes:
        raise ConfigError(f"{where}: space.model_size: PBT would change a trial's model mid-run, which its "
                          "checkpoint cannot follow; search it with asha or none")
    if sweep.num_samples < 1 or (sweep.max_concurrent or 1) < 1 or sweep.cpu <= 0 or sweep.workers < 1:
        raise ConfigError(f"{where}: num_samples, max_concurrent and resources_per_trial.cpu and .workers "
                          "must be positive")
    if not 0 <= sweep.seed < 2**32:
        raise ConfigError(f"{where}: seed {sweep.seed}: must be in 0..2**32-1")
    check_gpus(sweep, where)
    check_search(sweep, where)
    return sweep


def check_gpus(sweep: Sweep, where: str) -> None:
    """A process trains on one GPU: more would be reserved and left idle, and ranks sharing
    one GPU are refused by NCCL."""
    if sweep.gpu > 1:
        raise ConfigError(f"{where}: resources_per_trial.gpu {sweep.gpu:g}: a trial process trains on one "
                          f"GPU; for {sweep.gpu:g} GPUs per trial ask workers: {math.ceil(sweep.gpu)}, gpu: 1")
    if sweep.workers > 1 and 0 < sweep.gpu < 1:
        raise ConfigError(f"{where}: resources_per_trial.gpu {sweep.gpu:g}: with workers {sweep.workers} each "
                          "rank needs a GPU of its own (gpu: 1) or none (gpu: 0)")


def load_sweep(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Sweep:
    """The sweep in a YAML file, with command-line ``overrides`` of its top-level keys."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if isinstance(raw, dict):
        raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return parse_sweep(raw, where=str(path))


# ---------------------------------------------------------------- search space and Tuner


def grid_points(spec: dict[str, Any]) -> list[Any]:
    low, high, num = spec["low"], spec["high"], spec["num"]
    if spec["type"] == "loguniform":
        return [float(v) for v in np.geomspace(low, high, num)]
    if spec["type"] == "randint":
        return sorted({int(round(v)) for v in np.linspace(low, high, num)})
    return [float(v) for v in np.linspace(low, high, num)]


def domain(spec: dict[str, Any], grid: bool) -> Any:
    """A Ray Tune search domain; ranges are inclusive (randint too)."""
    kind = spec["type"]
    if kind == "grid" or (grid and kind == "choice"):
        return tune.grid_search(spec["values"])
    if grid:
        return tune.grid_search(grid_points(spec))
    if kind == "choice":
        return tune.choice(spec["values"])
    if kind == "randint":
        return tune.randint(spec["low"], spec["high"] + 1)
    return (tune.loguniform if kind == "loguniform" else tune.uniform)(spec["low"], spec["high"])


def param_space(sweep: Sweep) -> dict[str, Any]:
    return {key: domain(spec, grid=sweep.search == "grid") for key, spec in sweep.space.items()}


def make_scheduler(sweep: Sweep) -> tune.schedulers.TrialScheduler:
    spec = {k: v for k, v in sweep.scheduler.items() if k != "type"}
    if sweep.scheduler["type"] == "asha":
        # Time is the trainer's epoch, which a resumed trial keeps counting. A trial that
        # survives every rung ends by itself, so that its run still tests its best weights.
        return tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=sweep.base.epochs,
                                             stop_last_trials=False, **spec)
    if sweep.scheduler["type"] == "pbt":
        mutations = {k: (s["values"] if "values" in s else domain(s, grid=False)) for k, s in sweep.space.items()}
        return tune.schedulers.PopulationBasedTraining(time_attr="epoch", hyperparam_mutations=mutations, **spec)
    if sweep.scheduler["type"] == "hyperband":  # pauses trials at its rungs; they resume from their checkpoint
        return tune.schedulers.HyperBandForBOHB(time_attr="epoch", max_t=sweep.base.epochs,
                                                stop_last_trials=False, **spec)
    return tune.schedulers.FIFOScheduler()


def make_search(sweep: Sweep) -> Any:
    """The sweep's search algorithm, seeded by its seed, proposing at most max_concurrent
    trials at once (a model-based searcher learns from the trials finished meanwhile)."""
    if sweep.search not in MODEL_BASED:
        return BasicVariantGenerator(max_concurrent=sweep.max_concurrent or 0, random_state=sweep.seed)
    common = {"metric": sweep.metric, "mode": sweep.mode}
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=sweep.seed, **common)
    elif sweep.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=sweep.seed, **common)
    else:
        from ray.tune.search.bohb import TuneBOHB

        searcher = TuneBOHB(seed=sweep.seed, **common)
    # TuneBOHB limits itself (its trials paused at a rung do not count); the limiter defers to it
    return ConcurrencyLimiter(searcher, sweep.max_concurrent) if sweep.max_concurrent else searcher


def make_loggers(sweep: Sweep) -> list[tune.Callback]:
    """Tune's logger callbacks named by ``loggers``: every trial's results, each epoch."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    made: dict[str, Any] = {"csv": CSVLoggerCallback, "json": JsonLoggerCallback, "tensorboard": TBXLoggerCallback,
                            "mlflow": partial(mlflow_logger, sweep), "wandb": partial(wandb_logger, sweep)}
    return [made[name]() for name in sweep.loggers]


def mlflow_logger(sweep: Sweep) -> tune.Callback:
    """One MLflow run per trial, in MLFLOW_TRACKING_URI or else a file store in the sweep's folder."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from .tracking import mlflow_file_store

    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_file_store(sweep.experiment_dir)
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=sweep.name)


def wandb_logger(sweep: Sweep) -> tune.Callback:
    """One W&B run per trial, grouped by the sweep's name; offline with WANDB_MODE=offline."""
    from ray.air.integrations.wandb import WandbLoggerCallback, _set_api_key

    try:  # here, not as a traceback from inside the sweep
        _set_api_key()
    except ValueError:
        raise ConfigError("loggers: wandb: no W&B API key (WANDB_API_KEY or `wandb login`); "
                          "WANDB_MODE=offline logs without one") from None
    # Handed to wandb.init, not left to the environment: Ray's workers, where the runs log,
    # keep the environment they were started with
    mode = {"mode": os.environ["WANDB_MODE"]} if "WANDB_MODE" in os.environ else {}
    return WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "iqa_dist"), group=sweep.name,
                               dir=os.environ.get("WANDB_DIR", str(sweep.experiment_dir)), **mode)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # short: Ray's default repeats every parameter


def trainable(sweep: Sweep) -> Any:
    ranks = {"workers": sweep.workers, "cpu": sweep.cpu, "gpu": sweep.gpu} if sweep.workers > 1 else None
    fn = tune.with_parameters(run_trial, base=to_dict(sweep.base), experiment_dir=str(sweep.experiment_dir),
                              ranks=ranks)
    # Several ranks: Ray Train reserves them, and the trial only drives them. Tune needs some
    # resource per trial: a token of memory, as a CPU or a fraction of one would keep a rank
    # off its node. fit_to_cluster bounds how many trials run at once (Tune cannot see the ranks).
    return tune.with_resources(fn, {"memory": DRIVER_MEMORY} if ranks else {"cpu": sweep.cpu, "gpu": sweep.gpu})


def make_tuner(sweep: Sweep, resume: bool, callbacks: Sequence[tune.Callback] = ()) -> tune.Tuner:
    path = sweep.experiment_dir
    if resume:
        return tune.Tuner.restore(str(path), trainable(sweep), resume_errored=True)
    pbt = sweep.scheduler["type"] == "pbt"
    return tune.Tuner(
        trainable(sweep),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=make_scheduler(sweep),
            search_alg=make_search(sweep), num_samples=sweep.num_samples,
            reuse_actors=True,  # saves a process start and the torch/timm imports per trial
            trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(path.parent), callbacks=[*make_loggers(sweep), *callbacks], verbose=1,
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
            # A full training state can be GBs: keep the latest. Not with PBT: a trial that
            # clones another's checkpoint would later delete it from under its owner.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if pbt else 1)))


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """``values`` in os.environ meanwhile; as they were after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to ``address`` or start a private local Ray; a Ray already started is used as is."""
    if ray.is_initialized():
        yield
        return
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    temp = None
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
    else:
        # short: Ray's unix socket paths under it must stay within 107 bytes
        temp = Path(f"/tmp/ray-{os.getuid()}-{os.getpid()}")
        os.environ["RAY_TMPDIR"] = str(temp)
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=str(temp))
    try:
        yield
    finally:
        ray.shutdown()  # never `ray stop`: it stops every Ray on the machine
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def fit_to_cluster(sweep: Sweep, gpus: float, node_cpus: float | None = None,
                   cpus: float | None = None) -> Sweep:
    """The sweep with no more concurrent trials than the cluster's ``gpus`` hold (and its
    ``cpus``, for trials of several ranks, whose reservation Tune cannot see). Trials that
    ask for GPUs a cluster does not have, or for more CPUs than its largest node has
    (``node_cpus``: a rank runs on one node) or than it has in all (``cpus``; None: not
    checked), wait for them forever, without a word: refused here instead; and more
    concurrent trials than fit only queue up."""
    if node_cpus is not None and sweep.cpu > node_cpus:
        raise ConfigError(f"resources_per_trial.cpu {sweep.cpu:g}: the Ray cluster's largest node has "
                          f"{node_cpus:g} CPU(s) (a trial runs on one node); ask cpu: {node_cpus:g} or fewer")
    if cpus is not None and sweep.workers > 1 and sweep.workers * sweep.cpu > cpus:
        raise ConfigError(f"{asked(sweep, 'cpu')}: the Ray cluster has {cpus:g} CPU(s); ask fewer workers or cpu")
    fits = {}
    if sweep.gpu > 0:
        fits["GPU"] = int(gpus // (sweep.workers * sweep.gpu))
        if fits["GPU"] == 0:
            raise ConfigError(f"{asked(sweep, 'gpu')}: the Ray cluster has {gpus:g} GPU(s); give the job GPUs "
                              "(--gres=gpu:N, GPUS_PER_NODE) or ask gpu: 0")
    if cpus is not None and sweep.workers > 1:
        fits["CPU"] = int(cpus // (sweep.workers * sweep.cpu))
    if not fits:
        return sweep
    kind, fit = min(fits.items(), key=lambda item: item[1])
    if sweep.max_concurrent is None or sweep.max_concurrent > fit:
        per_trial = sweep.workers * (sweep.gpu if kind == "GPU" else sweep.cpu)
        total = gpus if kind == "GPU" else cpus
        print(f"max_concurrent {sweep.max_concurrent or 'unset'} -> {fit}: {total:g} {kind}(s) hold {fit} "
              f"trial(s) of {per_trial:g} {kind} at once", file=sys.stderr, flush=True)
        return replace(sweep, max_concurrent=fit)
    return sweep


def asked(sweep: Sweep, kind: str) -> str:
    """What a trial asks of ``kind`` (cpu, gpu), as an error names it."""
    each = getattr(sweep, kind)
    if sweep.workers == 1:
        return f"resources_per_trial.{kind} {each:g}"
    return f"resources_per_trial: workers {sweep.workers} x {kind} {each:g} = {sweep.workers * each:g} per trial"


def node_cpus(need: float, wait_s: float) -> float:
    """The most CPUs one live node of the connected Ray has, waiting up to ``wait_s`` seconds
    for one with ``need``: a running cluster's nodes may still be joining (slurm/sweep.sh
    starts them just before the sweep)."""
    end = time.monotonic() + wait_s
    while True:
        most = max((node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]), default=0.0)
        if most >= need or time.monotonic() >= end:
            return most
        time.sleep(1)


def local_cpus(sweep: Sweep) -> int:
    """A local Ray's size: the concurrent trials' CPUs, else the machine. A trial asking for
    more CPUs than the machine has is refused: the Ray, sized to it, would pretend to have them."""
    machine, need = os.cpu_count() or 1, sweep.cpu * sweep.workers
    if need > machine:
        ask = "workers x cpu" if sweep.workers > 1 else "cpu:"
        raise ConfigError(f"{asked(sweep, 'cpu')}: this machine has {machine} CPU(s), all a private local Ray "
                          f"gives; ask {ask} {machine} or fewer, or join a cluster (--address)")
    if sweep.max_concurrent:
        return math.ceil(need * sweep.max_concurrent)
    return max(machine, math.ceil(need))


# ---------------------------------------------------------------- one trial (on a Ray worker)


def reset_accelerate() -> None:
    """Accelerate keeps its state in class-level singletons; a reused worker runs several trials."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def limit_threads(cpus: float) -> None:
    import torch

    n = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)  # data-loader workers inherit it
    torch.set_num_threads(n)


def append_row(path: Path, row: dict[str, float]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def stage_report(log: Path, row: dict[str, float], checkpoint_dir: Path) -> tuple[dict[str, float], Path]:
    """Log the epoch to the trial's own epochs.csv; the row and checkpoint to report to Tune.

    The log is what the trial computed, restarts included; Tune's progress.csv and
    result.json can lose rows when a trial restarts (it copies them back from storage). The
    run's best weights travel in the checkpoint (as best/), so that a trial restarted
    elsewhere or cloned by PBT still has the weights it selected, and the best val SRCC so far
    (RUNNING_BEST) comes from the checkpoint's trainer state, which travels with them. The
    world size is the process group's: what the trial really trained on."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    row = dict(row, **{RUNNING_BEST: read_trainer_state(checkpoint_dir)["best_srcc"], "world_size": world})
    append_row(log, dict(row, node=socket.gethostname()))  # where it ran: a retried trial may move
    stage = checkpoint_dir.parent / ".tune-report"  # hard links: no copy of the weights
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(checkpoint_dir, stage, copy_function=os.link)
    best = checkpoint_dir.parent / "best"
    if best.is_dir():
        shutil.copytree(best, stage / "best", copy_function=os.link)
    return row, stage


def report_staged(row: dict[str, float], stage: Path) -> None:
    try:
        tune.report(dict(row), checkpoint=tune.Checkpoint.from_directory(str(stage)))
    finally:  # report() has copied it to the trial's storage by now
        shutil.rmtree(stage, ignore_errors=True)


def report_epoch(log: Path, epoch: int, row: dict[str, float], checkpoint_dir: Path) -> None:
    report_staged(*stage_report(log, row, checkpoint_dir))


def restore_best(checkpoint: Path, run_dir: Path) -> None:
    best = run_dir / "checkpoints" / "best"
    if (checkpoint / "best").is_dir():
        shutil.rmtree(best, ignore_errors=True)
        shutil.copytree(checkpoint / "best", best)


def run_trial(params: dict[str, Any], base: dict[str, Any], experiment_dir: str,
              ranks: dict[str, Any] | None = None) -> None:
    """One trial: a training run in <trial dir>/run, continued from Tune's checkpoint if any;
    in this process, or on ``ranks`` (workers, cpu and gpu per rank) of Ray Train."""
    from .train import train

    context = tune.get_context()
    run_dir = Path(experiment_dir) / Path(context.get_trial_dir()).name / "run"
    cfg = replace(from_dict(params, from_dict(base)), run_dir=str(run_dir), resume=None)
    log = run_dir.parent / EPOCH_LOG
    if ranks:
        from .tune_workers import run_ranks

        launch = partial(run_ranks, log=log, **ranks)
    else:
        limit_threads(context.get_trial_resources().required_resources.get("CPU", 1))
        reset_accelerate()
        launch = partial(train, callbacks=[partial(report_epoch, log)], lock=False)
    checkpoint = tune.get_checkpoint()
    # Tune owns the trial's directory (no lock: it may restart the trial on another node): a
    # trial without a checkpoint starts afresh, one with a checkpoint resumes it, with the
    # values PBT may have changed (an exploit loads another trial's checkpoint).
    if checkpoint is None:
        launch(replace(cfg, overwrite=True))
        return
    with checkpoint.as_directory() as path:
        restore_best(Path(path), run_dir)
        launch(replace(cfg, resume=str(path), allow_changed=list(params)))


# ---------------------------------------------------------------- results


def history(result: tune.Result) -> pd.DataFrame:
    """The epochs a trial trained, in order (restarts included: they cost compute too)."""
    path = Path(result.path) / EPOCH_LOG
    if not path.exists():
        return pd.DataFrame(columns=["epoch", *VAL_METRICS, "time_s", "node"])
    return pd.read_csv(path)


def nodes_of(hist: pd.DataFrame) -> str:
    """The nodes a trial trained on, in order of use (``a,b``: retried on b after a failed)."""
    if "node" not in hist:
        return ""
    return ",".join(dict.fromkeys(str(n) for n in hist["node"].dropna()))


def trial_table(grid: tune.ResultGrid, params: Sequence[str], metric: str = "val_srcc",
                mode: str = "max") -> pd.DataFrame:
    """One row per trial: status, searched values, best validation metric and compute used."""
    trials = grid._experiment_analysis.trials  # per-trial status is only kept there
    rows = []
    for trial, result in zip(trials, grid):
        hist = history(result)
        scores = hist[metric] if metric in hist else pd.Series(dtype=float)
        best = (scores.idxmax() if mode == "max" else scores.idxmin()) if scores.notna().any() else None
        rows.append({
            "trial_id": trial.trial_id, "status": trial.status,
            **{key: trial.config.get(key) for key in params},
            f"best_{metric}": float(scores[best]) if best is not None else math.nan,
            "best_epoch": int(hist["epoch"][best]) if best is not None else 0,
            "epochs_run": int(hist["epoch"].max()) if len(hist) else 0,
            "compute_epochs": len(hist),
            "compute_s": float(hist["time_s"].sum()) if len(hist) else 0.0,
            "failures": trial.run_metadata.num_failures,
            "retried": trial.run_metadata.num_failures > 0,  # restarted from its last checkpoint
            "node": nodes_of(hist),
            "world_size": int(hist["world_size"].iloc[-1]) if "world_size" in hist and len(hist) else 0,
            "error": str(result.error).strip().splitlines()[-1] if result.error else "",
            "run_dir": str(Path(result.path) / "run"),
        })
    return pd.DataFrame(rows)


def best_config(table: pd.DataFrame, sweep: Sweep) -> Config | None:
    """The recipe with the best trial's values: what to train for real (the base's epochs,
    patience and early stopping, not the trials' budget)."""
    column = f"best_{sweep.epoch_metric}"
    scored = table[table[column].notna()]
    if scored.empty:
        return None
    row = scored.loc[scored[column].idxmax() if sweep.mode == "max" else scored[column].idxmin()]
    values = {key: row[key].item() if hasattr(row[key], "item") else row[key] for key in sweep.space}
    return replace(from_dict(values, sweep.recipe), run_dir=None, resume=None)


def plot_sweep(table: pd.DataFrame, histories: dict[str, pd.DataFrame], sweep: Sweep, path: Path) -> None:
    """Validation metric against each searched value, and every trial's learning curve."""
    from .plots import plt

    metric = sweep.epoch_metric
    column = f"best_{metric}"
    keys = list(sweep.space)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x = table[key]
        if not pd.api.types.is_numeric_dtype(x):
            x = x.astype(str)  # categorical axis
        ax.scatter(x, table[column], s=18)
        if sweep.space[key]["type"] == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=column)
    ax = axes[0][-1]
    for trial_id, hist in histories.items():
        if len(hist) and metric in hist:
            ax.plot(hist["epoch"], hist[metric], marker=".", alpha=0.7, label=trial_id)
    ax.set(xlabel="epoch", ylabel=metric, title="learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(grid: tune.ResultGrid, sweep: Sweep) -> pd.DataFrame:
    out = sweep.experiment_dir
    table = trial_table(grid, list(sweep.space), sweep.epoch_metric, sweep.mode)
    table.to_parquet(out / "results.parquet", index=False)
    table.to_csv(out / "results.csv", index=False)
    best = best_config(table, sweep)
    if best is not None:
        save_yaml(best, out / "best_config.yaml")
    histories = {trial.trial_id: history(result) for trial, result in zip(grid._experiment_analysis.trials, grid)}
    plot_sweep(table, histories, sweep, out / "sweep.png")
    return table


class SweepInterrupted(Exception):
    """A stop signal (Ctrl-C, SIGTERM) ended the sweep early; Tune saved it for ``--resume``."""


def fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """``tuner.fit()``, raising SweepInterrupted when a stop signal ended it early.

    On a SIGINT Tune saves the experiment and returns from fit as if the sweep were done:
    a table of the trials so far would pass for its result. Tune runs fit under its own
    SIGINT handler and puts back the one it found only when the signal came, so ours, found
    in place after fit, says so. SIGTERM (a scheduler's stop) is made a SIGINT meanwhile;
    the handler ray.init installs for it dumps a crash report and aborts, saving nothing."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()  # signals reach the main thread only

    def second_stop(signum: int, frame: Any) -> None:  # Tune's "press Ctrl-C again to skip"
        raise SweepInterrupted

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "0"
    on_int = signal.signal(signal.SIGINT, second_stop)
    on_term = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        grid = tuner.fit()
        if signal.getsignal(signal.SIGINT) is second_stop:
            raise SweepInterrupted
        return grid
    finally:
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term if on_term is not None else signal.SIG_DFL)  # None: not Python's


def run_sweep(sweep: Sweep | dict[str, Any], *, address: str | None = None, resume: bool = False,
              callbacks: Sequence[tune.Callback] = ()) -> pd.DataFrame:
    """Run (or ``resume``) a sweep on a Ray cluster; returns the per-trial table, also written
    with best_config.yaml and sweep.png under ``<storage_path>/<name>``."""
    if isinstance(sweep, dict):
        sweep = parse_sweep(sweep)
    size = None if address else local_cpus(sweep)  # refused before anything is written
    folder = sweep.experiment_dir
    if resume and not tune.Tuner.can_restore(str(folder)):
        raise ConfigError(f"{folder}: no sweep to resume there (check storage_path and name)")
    if not resume and folder.is_dir() and any(p.name != LOCK_NAME for p in folder.iterdir()):
        # a second sweep under the same name would leave only its own trials in the table
        raise ConfigError(f"{folder}: holds a sweep already; --resume continues it (a finished one "
                          "rewrites its table), or give another --name")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(folder).acquire()
    except LockedError as err:
        raise ConfigError(str(err).replace("another run", "another sweep")) from None
    try:
        with ray_cluster(address, size):
            cpus = node_cpus(sweep.cpu, CLUSTER_WAIT_S if address else 0)
            sweep = fit_to_cluster(sweep, ray.cluster_resources().get("GPU", 0.0), cpus,
                                   ray.cluster_resources().get("CPU", 0.0))
            with environment(TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):  # else Tune adds its default loggers
                grid = fit(make_tuner(sweep, resume, callbacks))
            return write_outputs(grid, sweep)
    finally:
        lock.release()


def summary(table: pd.DataFrame, sweep: Sweep) -> str:
    column = f"best_{sweep.epoch_metric}"
    keep = ["trial_id", "status", *sweep.space, column, "best_epoch", "compute_epochs", "compute_s",
            "node", "retried"]
    shown = table[keep].sort_values(column, ascending=sweep.mode == "min", na_position="last")
    total = (f"{len(table)} trials, {table['compute_epochs'].sum()} epochs, "
             f"{table['compute_s'].sum():.0f} s of training")
    return f"{shown.to_string(index=False, float_format=lambda v: f'{v:.4g}')}\n{total}\n" \
           f"results in {sweep.experiment_dir}"


# ---------------------------------------------------------------- command line


EXIT_INTERRUPTED = 130  # 128 + SIGINT, after Ctrl-C and SIGTERM alike (Tune gets both as SIGINT)


def resume_command(args: argparse.Namespace) -> str:
    """The command line that resumes the sweep ``args`` ran: the same folder, the same Ray."""
    words = ["python -m iqa_dist.tune --config", args.config]
    words += [f"--{k} {getattr(args, k)}" for k in ("storage_path", "name", "address") if getattr(args, k)]
    return " ".join([*words, "--resume"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="sweep YAML (see the module docstring)")
    parser.add_argument("--address", help="'auto' or HOST:PORT of a running Ray cluster "
                        "(default: a private local Ray sized by resources_per_trial x max_concurrent)")
    parser.add_argument("--resume", nargs="?", const="yes", choices=("yes", "auto"),
                        help="continue the interrupted sweep <storage_path>/<name> with its saved settings; "
                        "--resume auto: if Tune saved one there, else start it (a requeued slurm/sweep.sh)")
    parser.add_argument("--num_samples", type=int)
    parser.add_argument("--max_concurrent", type=int)
    parser.add_argument("--storage_path")
    parser.add_argument("--name")
    args = parser.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("num_samples", "max_concurrent", "storage_path", "name")}
    try:
        sweep = load_sweep(args.config, overrides)
        # auto: a job preempted before Tune first saved the sweep has nothing to resume
        saved = tune.Tuner.can_restore(str(sweep.experiment_dir))
        resume = args.resume == "yes" or (args.resume == "auto" and saved)
        table = run_sweep(sweep, address=args.address, resume=resume)
    except (ConfigError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except SweepInterrupted:
        print(f"interrupted: {resume_command(args)} continues it", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary(table, sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
