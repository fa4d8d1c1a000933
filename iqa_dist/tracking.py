"""Experiment trackers through Accelerate (TensorBoard, MLflow, W&B, ...): which ones a run
logs to, where their files go (inside the run directory unless the environment says
otherwise), the run's configuration as their hyperparameters, and the same tracker run
continued when a training run is resumed.

Accelerate starts trackers and logs on the main process only, so the other ranks log nothing.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers, get_available_trackers
from accelerate.utils import LoggerType

from . import atomic
from .config import Config, ConfigError, to_dict

IDS = "trackers.json"  # the tracker runs of this run directory, which a resumed run continues


def check(names: list[str]) -> None:
    """Refuse, in one line at start, a tracker Accelerate does not know or one whose package
    is missing (Accelerate itself would skip a missing one without a word)."""
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"log_with: {name!r} is not one of {', '.join(sorted(LOGGER_TYPE_TO_CLASS))} "
                              "(or none)")
        if name in LoggerType.list() and name not in available:
            raise ConfigError(f"log_with: {name} is not installed (pip install {name}; "
                              "pip install -e '.[trackers]' installs mlflow and wandb)")


def start(accelerator: Accelerator, cfg: Config, run_dir: Path, step: int) -> None:
    """Start ``cfg.log_with`` for ``run_dir``; ``step``: the global step a resumed run
    continues from (0 for a new run)."""
    project = accelerator.project_configuration
    # Accelerate takes both at construction, but the run directory is only named (by rank 0,
    # over the process group the Accelerator creates) afterwards
    project.set_directories(str(run_dir))
    project.logging_dir = str(run_dir / "tb")  # where TensorBoard's events have always been
    accelerator.log_with = filter_trackers(cfg.log_with, project.logging_dir)
    if not accelerator.is_main_process or not cfg.log_with:
        return
    ids = saved_ids(run_dir)
    # Continued tracker runs (a resumed run's, or those of one that stopped before its first
    # checkpoint) hold the configuration already: MLflow refuses to change a parameter, and a
    # resume changes some (resume, epochs, ...)
    config = None if step or ids else hyperparameters(cfg, accelerator.num_processes)
    if "mlflow" in cfg.log_with and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        mlflow.set_tracking_uri(mlflow_file_store(run_dir))
    if "wandb" in cfg.log_with:
        ids.setdefault("wandb", uuid.uuid4().hex[:8])  # W&B takes an id chosen up front
    accelerator.init_trackers(cfg.tracker_project, config=config, init_kwargs=init_kwargs(run_dir, ids, step))
    if "mlflow" in cfg.log_with:
        ids["mlflow"] = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    if ids:
        atomic.write_text(run_dir / IDS, json.dumps(ids, indent=1))


def mlflow_file_store(folder: Path) -> str:
    """The URI of an MLflow store in ``folder``/mlruns: beside the checkpoints, readable without
    a server or a database library (mlflow-skinny has none). MLflow 3 keeps file stores behind
    a switch, which readers of the store need too."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (folder / "mlruns").as_uri()


def saved_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS).read_text())
    except FileNotFoundError:
        return {}


def init_kwargs(run_dir: Path, ids: dict[str, str], step: int) -> dict[str, dict[str, Any]]:
    """Each tracker's start-up arguments: the run directory's name as the run's, its earlier
    tracker run when there is one, its files in the run directory unless WANDB_DIR says where."""
    wandb = {"name": run_dir.name, "id": ids.get("wandb"), "resume": "allow"}
    if "WANDB_DIR" not in os.environ:
        wandb["dir"] = str(run_dir)
    # A resumed run's events past its checkpoint (logged before a crash) are hidden, not doubled
    tensorboard = {"purge_step": step + 1} if step else {}
    return {"tensorboard": tensorboard, "wandb": wandb,
            "mlflow": {"run_name": run_dir.name, "run_id": ids.get("mlflow")}}


def hyperparameters(cfg: Config, world: int) -> dict[str, Any]:
    """The configuration the run trains with (per-process batch, scaled lr), flat: lists as
    text, which every tracker takes (TensorBoard's take numbers and text only)."""
    flat = {k: ", ".join(v) if isinstance(v, list) else v for k, v in to_dict(cfg).items()}
    return flat | {"world_size": world}
