"""The GPU check's first line: what the machine has that the check relies on, read before any
part runs, so that a part failing for want of one of them is explained up front."""
from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch

from ..models.hyperiqa import PATCH

# What the check imports, by distribution name; the GPU machine's image lacks the first four
PACKAGES = ("webdataset", "deepspeed", "transformers", "ray", "torch", "torchvision", "triton", "accelerate",
            "timm", "numpy", "pyarrow", "pydantic")
# Shared memory a loader worker takes: the few batch buffers it reuses (data/handover.py)
# and the batches in flight, of the largest batch the check loads
BUFFERS_PER_WORKER = 6
SHM = Path("/dev/shm")


def version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def gcc() -> str:
    """gcc's version, or why there is none: inductor compiles its C++ and Triton's launchers with it."""
    path = shutil.which("gcc")
    if path is None:
        return "missing"
    done = subprocess.run([path, "-dumpfullversion"], capture_output=True, text=True)
    return done.stdout.strip() or "present"


def python_h() -> bool:
    """Whether Python.h is there: Triton builds its launcher against it."""
    return (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file()


def shm_free() -> int | None:
    return shutil.disk_usage(SHM).free if SHM.is_dir() else None


def loader_workers(wanted: int, batch: int, free: int | None) -> int:
    """Fewer loader workers when /dev/shm is small: each holds a few batches there, and a
    worker that cannot allocate one dies with a bus error."""
    if free is None:
        return wanted
    per_worker = BUFFERS_PER_WORKER * batch * PATCH * PATCH * 3
    return max(0, min(wanted, free // per_worker))


def preflight(gpu: bool, workers: int, batch: int) -> dict:
    """The figures of the pre-flight line, and the loader workers the check will use."""
    free = shm_free()
    usable = loader_workers(workers, batch, free)
    return {"packages": {name: version(name) for name in PACKAGES}, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if gpu else "none (smoke run on the CPU)",
            "gcc": gcc(), "python_h": python_h(), "shm_free_gib": None if free is None else free / 2**30,
            "workers_wanted": workers, "workers": usable}


def preflight_line(p: dict) -> str:
    found = ", ".join(f"{name} {v}" for name, v in p["packages"].items())
    shm = "no /dev/shm" if p["shm_free_gib"] is None else f"/dev/shm {p['shm_free_gib']:.1f} GiB free"
    fewer = (f" (fewer than the {p['workers_wanted']} asked: /dev/shm is small)"
             if p["workers"] < p["workers_wanted"] else "")
    return (f"pre-flight: Python {p['python']}; torch {p['torch']} (CUDA {p['cuda']}); GPU {p['gpu']}; "
            f"gcc {p['gcc']}; Python.h {'present' if p['python_h'] else 'MISSING (inductor cannot compile)'}; "
            f"{shm}: {p['workers']} loader workers{fewer}; packages: {found}")
