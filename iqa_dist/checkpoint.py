"""Run directories and checkpoints that a crash cannot corrupt.

Layout of a run directory::

    config.yaml            the resolved configuration
    summary.csv            one row per epoch
    results.json           final metrics
    tb/                    TensorBoard events
    checkpoints/step-N/    full training state (Accelerate's save_state + trainer.json)
    checkpoints/last       symlink to the newest complete step-N
    checkpoints/best/      model.safetensors + config.yaml + metrics.json of the best epoch
    checkpoints/best_k/    with keep_best > 1: epoch-E/ (as best/) for each of the top epochs
                           by val SRCC, and ranking.json naming them, best first

A checkpoint is written into a hidden temporary folder and renamed when complete;
``last`` is replaced by an atomic symlink swap; the ``keep_last`` newest step-N are kept.
A checkpoint damaged later (a full disk, a truncated copy) is recognised before it is
loaded: ``--resume latest`` then falls back to the newest readable ``step-N`` with a warning.
Loading uses safetensors and ``torch.load(weights_only=True)`` only (Accelerate's loader),
never arbitrary pickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import atomic

TRAINER_STATE = "trainer.json"
BEST_K = "best_k"
RANKING = "ranking.json"
# The exit code of a rank that saved a checkpoint because it was asked to stop (SIGUSR1,
# SIGTERM). Launchers (torchrun, accelerate launch) turn a child's code into their own
# failure, so each rank also leaves <run_dir>/preempted/rank-N.json: the SLURM scripts
# requeue the job when either is there.
EXIT_PREEMPTED = 99


class CheckpointError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message is one line."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def prepare_run_dir(run_dir: Path) -> None:
    """Create the run directory and prove it writable. Every rank calls it before any
    collective, so a read-only place is one line at start, not a traceback at the first
    checkpoint (or a rank left waiting at a barrier)."""
    try:
        atomic.check_writable(checkpoints_dir(run_dir))
    except OSError as err:
        raise CheckpointError(f"{run_dir}: cannot write the run directory ({err.strerror or err})") from None


RUN_FILES = ("config.yaml", "summary.csv", "results.json")


def holds_run(run_dir: Path) -> bool:
    """Whether an earlier run left its results or checkpoints in ``run_dir``."""
    found = checkpoints_dir(run_dir)
    return (any((Path(run_dir) / f).exists() for f in RUN_FILES) or (found / "last").is_symlink()
            or (found / "best").exists() or any(found.glob("step-*")))


def clear_run(run_dir: Path, keep: str) -> None:
    """``--overwrite``: remove everything in ``run_dir`` but ``keep`` (the lock)."""
    for entry in Path(run_dir).iterdir():
        if entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def experiment_changes(saved: dict[str, Any], now: dict[str, Any], allowed: Sequence[str]) -> list[str]:
    """``key: old -> new`` for each key that defines the experiment and differs (keys a
    checkpoint of an older version did not record are not compared)."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(saved.keys() & now.keys())
            if k not in allowed and saved[k] != now[k]]


@contextlib.contextmanager
def space_for(run_dir: Path, what: str, need_bytes: int) -> Iterator[None]:
    """A full disk while writing ``what`` into ``run_dir`` becomes one line naming the folder
    and the space needed; a half-written checkpoint is removed, and ``last`` keeps pointing
    at the previous, complete one."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if not atomic.disk_full(err):
            raise
        for stage in checkpoints_dir(run_dir).glob(".tmp-step-*"):
            shutil.rmtree(stage, ignore_errors=True)
        free = shutil.disk_usage(run_dir).free
        last = checkpoints_dir(run_dir) / "last"
        kept = f"; {last} is unchanged" if last.exists() else ""
        raise CheckpointError(f"{run_dir}: no space left on its device for {what} (about {_size(need_bytes)} "
                              f"needed, {_size(free)} free){kept}") from None


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def resolve_resume(resume: str | None, run_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """``latest`` is the run's newest readable checkpoint, or None on a first start; a run
    directory given as ``resume`` means its newest readable one."""
    if not resume:
        return None
    if resume == "latest":
        return newest_readable(run_dir, warn)
    path = Path(resume)
    if path.is_dir() and checkpoints_dir(path).is_dir():
        found = newest_readable(path, warn)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint in it")
        return found
    problem = unreadable(path)
    if problem:
        raise CheckpointError(f"{path}: not a checkpoint to resume from ({problem})")
    return path


def newest_readable(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """``last``, or when it is damaged the newest readable ``step-N`` (with a warning);
    None when there is no checkpoint at all."""
    last = checkpoints_dir(run_dir) / "last"
    target = last.resolve() if last.exists() else None
    steps = sorted(checkpoints_dir(run_dir).glob("step-*"), reverse=True)
    candidates = ([target] if target else []) + [s for s in steps if s != target]
    problems = {c: unreadable(c) for c in candidates}
    found = next((c for c in candidates if problems[c] is None), None)
    if found is None and candidates:
        raise CheckpointError(f"{last}: unreadable ({problems[candidates[0]]}) and no readable step-N "
                              f"checkpoint beside it: remove {checkpoints_dir(run_dir)} to start over")
    if last.is_symlink() and found != target:
        damage = f"is unreadable ({problems[target]})" if target else f"points at {os.readlink(last)}, which is gone"
        where = f"resuming from the newest readable one, {found}" if found else "no checkpoint left: starting afresh"
        warn(f"warning: {last} {damage}; {where}")
    return found


def unreadable(path: Path) -> str | None:
    """Why a checkpoint cannot be resumed from, as far as its files tell (None: it can).

    Cheap checks that catch a truncated copy: trainer.json parses, every safetensors file
    holds all the bytes its header names, every torch file (a zip) has its directory.
    Random states are not required: Accelerate goes on without them (see
    ``random_state_problem``)."""
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError) as err:
        return f"{TRAINER_STATE}: {err}"
    for file in sorted(path.rglob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            return f"{file.relative_to(path)}: {err}"
    for file in sorted([*path.rglob("*.bin"), *path.rglob("*.pt")]):
        if not zipfile.is_zipfile(file):
            return f"{file.relative_to(path)}: truncated or not a torch file"
    return None


def random_state_problem(path: Path, rank: int) -> str | None:
    """Why Accelerate's ``load_state`` will not restore this rank's random state; it then
    goes on silently, and a resumed run is no longer bit-identical to an uninterrupted one."""
    from accelerate.utils import load  # Accelerate's own loader: it fails where Accelerate would

    file = path / f"random_states_{rank}.pkl"
    if not file.exists():
        return f"{file} is missing"
    try:
        states = load(file)
    except Exception as err:  # whatever torch.load raises on a damaged pickle
        return f"{file} cannot be read ({type(err).__name__})"
    if torch.cuda.is_available() and "torch_cuda_manual_seed" not in states:
        return f"{file} holds no CUDA random state (saved without a GPU)"
    return None


def atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def staging_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f".tmp-step-{step:08d}"


def publish(run_dir: Path, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """Complete a staged checkpoint: write trainer.json, rename, point ``last`` at it; then
    keep the ``keep`` newest step-N (``last``'s is the newest) and any a preemption marker names."""
    stage = staging_dir(run_dir, step)
    for f in stage.rglob("*"):  # Accelerate's safetensors files are 0600: a shared run is read by others
        if f.is_file():
            atomic.share(f)
    write_json(stage / TRAINER_STATE, trainer_state)
    final = checkpoints_dir(run_dir) / f"step-{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    atomic_symlink(final.name, checkpoints_dir(run_dir) / "last")
    steps = sorted(checkpoints_dir(run_dir).glob("step-*"))
    # newer steps than this one belong to a timeline abandoned by a resume from an older checkpoint
    kept = [p for p in steps if p.name <= final.name][-keep:]
    spared = marked(run_dir)
    for old in set(steps) - set(kept):
        if old.name not in spared:
            shutil.rmtree(old, ignore_errors=True)
    return final


def marked(run_dir: Path) -> set[str]:
    """Names of the checkpoints preemption markers name: the SLURM scripts requeue a job to
    resume from them, so no pruning may take them first."""
    names = set()
    for marker in (Path(run_dir) / "preempted").glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            names.add(Path(json.loads(marker.read_text())["checkpoint"]).name)
    return names


@contextlib.contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A folder written whole or not at all: filled under a hidden name, renamed when complete."""
    stage = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)  # an epoch replayed after a crash writes its folder again
    os.replace(stage, folder)


def ranked(ranking: list[dict[str, Any]], epoch: int, score: float, keep: int) -> list[dict[str, Any]]:
    """The top ``keep`` epochs, best first, once ``epoch`` (1-based) scored ``score``; an equal
    score ranks the earlier epoch first, as selection keeps the first best (see Trainer.end_epoch)."""
    entries = [*ranking, {"epoch": epoch, "val_srcc": score}]
    return sorted(entries, key=lambda e: (-e["val_srcc"], e["epoch"]))[:keep]


def best_k_dir(run_dir: Path, epoch: int) -> Path:
    return checkpoints_dir(run_dir) / BEST_K / f"epoch-{epoch:04d}"


def settle_ranking(run_dir: Path, ranking: list[dict[str, Any]]) -> None:
    """best_k/ranking.json as the newest checkpoint ranks the epochs, then the folders of epochs
    it no longer ranks removed. Called after that checkpoint: a resume from an older one finds
    the folder of every epoch its ranking names."""
    # an epoch ranked before a resume raised keep_best has no folder: left out, its rank kept
    kept = [dict(e, rank=i + 1, path=best_k_dir(run_dir, e["epoch"]).name) for i, e in enumerate(ranking)
            if best_k_dir(run_dir, e["epoch"]).is_dir()]
    write_json(checkpoints_dir(run_dir) / BEST_K / RANKING, kept)
    for folder in (checkpoints_dir(run_dir) / BEST_K).glob("epoch-*"):
        if folder.name not in {e["path"] for e in kept}:
            shutil.rmtree(folder, ignore_errors=True)


def mark_preempted(run_dir: Path, rank: int, checkpoint: Path) -> None:
    write_json(Path(run_dir) / "preempted" / f"rank-{rank}.json", {"checkpoint": str(checkpoint)})


def clear_preempted(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / "preempted", ignore_errors=True)


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_STATE).read_text())


def write_json(path: Path, data: Any) -> None:
    atomic.write_text(path, json.dumps(data, indent=1, default=float))


def save_weights(state_dict: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Weights as safetensors, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.temporary(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        atomic.replace(tmp, path)


def as_fp32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float32, others (indices, counters) as they are: DeepSpeed's bf16
    casts the model itself, and weights for scoring and fine-tuning should not carry that."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


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
