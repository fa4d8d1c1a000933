"""A run directory belongs to one run, and a resume continues the same experiment: nothing
an earlier run wrote is replaced or mixed in silently."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iqa_dist.pack import PackOptions, pack
from iqa_dist.runlock import NAME, LockedError, RunLock
from iqa_dist.train import main as train_main

from conftest import make_csv_set
from test_train import REPO, env, machinery_args, run, train_cmd, wait_for

ONE_EPOCH = ("--epochs", "1", "--max_steps_per_epoch", "2", "--workers", "0")


@pytest.fixture(scope="module")
def finished(small_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("rundir") / "run"
    out = run(train_cmd(machinery_args(small_shards, run_dir, *ONE_EPOCH)))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and not p.is_symlink() and "tb" not in p.parts}


def _train(capsys, shards: Path, run_dir: Path, *extra: str) -> tuple[int, str]:
    code = train_main(machinery_args(shards, run_dir, *ONE_EPOCH, *extra))
    return code, capsys.readouterr().err


def test_a_second_run_without_resume_is_refused_and_changes_nothing(finished, small_shards, capsys):
    before = _snapshot(finished)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    code, err = _train(capsys, small_shards, finished)
    # a run refused at start leaves the process's handlers alone (a forked child keeps them)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert code == 1
    assert f"error: {finished}: holds an earlier run; --resume latest continues it, --overwrite" in err
    assert _snapshot(finished) == before and not (finished / NAME).exists()


def test_overwrite_starts_again_and_keeps_nothing(small_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000009").mkdir(parents=True)
    (run_dir / "results.json").write_text('{"old": true}')
    (run_dir / "notes.txt").write_text("left by the earlier run")
    code, _ = _train(capsys, small_shards, run_dir, "--overwrite")
    assert code == 0
    assert not (run_dir / "notes.txt").exists() and not (run_dir / "checkpoints" / "step-00000009").exists()
    assert "old" not in json.loads((run_dir / "results.json").read_text())


def test_two_trainings_in_one_run_directory_cannot_run_at_once(small_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(train_cmd(machinery_args(small_shards, run_dir, "--epochs", "50")), env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        wait_for(lambda: (run_dir / NAME).exists(), first)
        code, err = _train(capsys, small_shards, run_dir, "--resume", "latest")
        assert code == 1 and f"{run_dir}: in use by another run (pid {first.pid} on {socket.gethostname()}" in err
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.kill()
        first.wait()


def _lock_of(run_dir: Path, **holder) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / NAME).write_text(json.dumps(dict({"since": 0}, **holder)))


def test_a_live_lock_holds_and_a_dead_ones_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_of(tmp_path, host=socket.gethostname(), pid=alive.pid)
        with pytest.raises(LockedError, match=f"in use by another run \\(pid {alive.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()
    lock = RunLock(tmp_path).acquire()  # its process is gone
    assert json.loads((tmp_path / NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / NAME).exists()


def test_a_lock_from_another_host_is_stale_only_when_not_refreshed(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lock_of(tmp_path, host="elsewhere", pid=1)
    with pytest.raises(LockedError, match="pid 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - 301
    os.utime(tmp_path / NAME, (old, old))
    RunLock(tmp_path).acquire().release()
    _lock_of(tmp_path, host="elsewhere", pid=1, job="4242")  # the same job, requeued on another node
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    RunLock(tmp_path).acquire().release()


@pytest.fixture(scope="module")
def repacked(small_shards, tmp_path_factory) -> Path:
    """The same images packed with another seed: other splits."""
    base = tmp_path_factory.mktemp("repacked")
    out = base / "shards"
    pack("csv", make_csv_set(base / "src"), out, PackOptions(shard_size=5, rounds=2, seed=1,
                                                              split=(0.5, 0.25, 0.25)), workers=0)
    return out


@pytest.mark.parametrize("extra, changed", [
    (("--model_size", "mobilenet"), "model_size: 'micro' -> 'mobilenet'"),
    (("--lr", "0.001"), "lr: 0.0001 -> 0.001"),
    (("--split_round", "1"), "split_round: 0 -> 1"),
])
def test_a_resume_of_another_experiment_is_refused_before_anything_is_written(
        extra, changed, finished, small_shards, capsys):
    before = _snapshot(finished)
    code, err = _train(capsys, small_shards, finished, "--resume", "latest", *extra)
    assert code == 1 and "another experiment (" in err and changed in err
    assert f"--allow_changed {changed.split(':')[0]} if you mean it" in err
    assert _snapshot(finished) == before


def test_a_resume_on_repacked_shards_is_refused(finished, repacked, capsys):
    code, err = _train(capsys, repacked, finished, "--resume", "latest")
    assert code == 1 and "manifest_sha1: " in err


def test_allowed_changes_and_a_resume_into_another_directory_carry_best_over(finished, small_shards, tmp_path,
                                                                             capsys):
    run_dir = tmp_path / "continued"
    code, err = _train(capsys, small_shards, run_dir, "--resume", str(finished), "--lr", "0.001",
                       "--allow_changed", "[lr]", "--epochs", "2")
    assert code == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 2 and results["lr"] == 0.001
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").exists()
