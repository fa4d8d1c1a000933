"""Shared fixtures: packed data sets built once per test session."""
from __future__ import annotations

import csv
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iqa_dist.pack import PackOptions, pack
from iqa_dist.pack import main as pack_main

# Keep every test process to one thread: the suite shares two cores with DDP ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_csv_set(root: Path, n_refs: int = 8, per_ref: int = 3, seed: int = 0) -> Path:
    """A generic csv layout of random images (some smaller than a patch) with labels."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(n_refs):
        for d in range(per_ref):
            h, w = (200, 260) if (r + d) % 5 == 0 else (240 + 8 * d, 256 + 16 * r)
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            name = f"img/r{r}_d{d}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"name": name, "mos": round(float(rng.uniform(0, 100)), 3), "ref": f"r{r}"})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "mos", "ref"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """24 images from 8 references in 5 uneven shards."""
    base = tmp_path_factory.mktemp("small")
    root = make_csv_set(base / "src")
    out = base / "shards"
    pack("csv", root, out, PackOptions(shard_size=5, rounds=2, split=(0.5, 0.25, 0.25)), workers=0)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """The README's demo set, packed as the README packs it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert pack_main(["--dataset", "demo", "--out", str(out), "--shard_size", "100", "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_run(small_shards, tmp_path_factory) -> Path:
    """A real run directory from a one-epoch micro training (3 crops per image at test), trained
    once for the tests that score with a model and leave the run as it is."""
    from test_predict import train_tiny

    return train_tiny(small_shards, tmp_path_factory.mktemp("tiny-run") / "run")


@pytest.fixture
def host_reads(monkeypatch):
    """``with host_reads() as reads:`` lists the host reads of tensors (``.item()``,
    ``.tolist()``, ``.cpu()``, ``float()``, ``bool()``) made by iqa_dist's own code; on a
    GPU each one waits for all the work queued before it."""
    @contextmanager
    def counting():
        reads: list[str] = []
        with monkeypatch.context() as patched:
            for name in ("item", "tolist", "cpu", "__float__", "__bool__"):
                patched.setattr(torch.Tensor, name, _counted(getattr(torch.Tensor, name), name, reads))
            yield reads
    return counting


def _counted(real, name: str, reads: list[str]):
    def read(self, *args, **kwargs):
        if sys._getframe(1).f_globals.get("__name__", "").startswith("iqa_dist"):
            reads.append(name)
        return real(self, *args, **kwargs)
    return read


@pytest.fixture
def gpu_flags_off():
    """TF32 and cuDNN autotuning off for the test (whoever set them before), restored after."""
    switches = ((torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
                (torch.backends.cuda.matmul, "allow_tf32"))
    saved = [getattr(flags, name) for flags, name in switches]
    for flags, name in switches:
        setattr(flags, name, False)
    yield
    for (flags, name), value in zip(switches, saved):
        setattr(flags, name, value)


def free_port() -> int:
    """A TCP port no process listens on now: fixed ports collide with other runs on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a cluster test that skips fails: a green run must hold the SLURM and
    multi-node tests, not quietly lack them because a cluster did not start."""
    outcome = yield
    report = outcome.get_result()
    cluster = any(True for m in ("cluster", "multinode") for _ in item.iter_markers(m))
    if report.skipped and cluster and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where the clusters must run: {reason}"
