"""Run directories and checkpoints that a crash cannot corrupt.

Layout of a run directory::

    config.yaml            the resolved configuration
    summary.csv            one row per epoch
    results.json           final metrics
    tb/                    TensorBoard events
    checkpoints/step-N/    full training state (Accelerate's save_state + trainer.json)
    checkpoints/last       symlink to the newest complete step-N
    checkpoints/best/      model.safetensors + config.yaml + metrics.json of the best epoch

A checkpoint is written into a hidden temporary folder and renamed when complete;
``last`` is replaced by an atomic symlink swap. Loading uses safetensors and
``torch.load(weights_only=True)`` only (Accelerate's loader), never arbitrary pickles.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer.json"
# The exit code of a rank that saved a checkpoint because it was asked to stop (SIGUSR1,
# SIGTERM). Launchers (torchrun, accelerate launch) turn a child's code into their own
# failure, so each rank also leaves <run_dir>/preempted/rank-N.json: the SLURM scripts
# requeue the job when either is there.
EXIT_PREEMPTED = 99


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """``latest`` is the run's newest checkpoint, or None on a first start."""
    if not resume:
        return None
    if resume == "latest":
        last = checkpoints_dir(run_dir) / "last"
        return last.resolve() if last.exists() else None
    path = Path(resume)
    if path.is_dir() and (path / "checkpoints" / "last").exists():
        path = (path / "checkpoints" / "last").resolve()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {TRAINER_STATE})")
    return path


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-step-{step:08d}"


def publish(run_dir: Path, step: int, trainer_state: dict[str, Any], keep: int = 2) -> Path:
    """Complete a staged checkpoint: write trainer.json, rename, point ``last`` at it."""
    stage = staging_dir(run_dir, step)
    write_json(stage / TRAINER_STATE, trainer_state)
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    atomic_symlink(final.name, checkpoints_dir(run_dir) / "last")
    for old in sorted(checkpoints_dir(run_dir).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def mark_preempted(run_dir: Path, rank: int, checkpoint: Path) -> None:
    write_json(Path(run_dir) / "preempted" / f"rank-{rank}.json", {"checkpoint": str(checkpoint)})


def clear_preempted(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / "preempted", ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, default=float)
    os.replace(tmp, path)


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such weights file")
    return load_file(str(path))


def find_model_files(checkpoint: str | Path) -> tuple[Path, Path]:
    """(weights, config.yaml) of a run directory, a ``best`` folder, or a weights file."""
    path = Path(checkpoint)
    candidates = [path, path / "checkpoints" / "best"]
    for c in candidates:
        if c.is_dir() and (c / "model.safetensors").exists():
            return c / "model.safetensors", c / "config.yaml"
    if path.is_file():
        return path, path.with_name("config.yaml")
    raise FileNotFoundError(f"{path}: no model.safetensors (give a run directory, its "
                            "checkpoints/best, or a .safetensors file)")
