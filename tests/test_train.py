"""The training loop as users run it: real processes, real signals, real DDP over gloo;
its optimisers and learning-rate schedules."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from iqa_dist.checkpoint import EXIT_PREEMPTED
from iqa_dist.config import Config, ConfigError, from_dict
from iqa_dist.data.stream import load_split
from iqa_dist.optim import build_optimizer, build_scheduler
from iqa_dist.data.manifest import read_manifest
from iqa_dist.pack import PackOptions, pack
from iqa_dist.train import Preempted, Trainer, train
from iqa_dist.train import main as train_main
from conftest import free_port

REPO = Path(__file__).parents[1]


# A run small enough for a test, with dropout and drop-path on (RNG state matters).
MACHINERY = dict(model_size="micro", batch_size=4, train_patch_num=2, test_patch_num=1, workers=1,
                 max_steps_per_epoch=4, epochs=3, dropout_rate=0.2, drop_path_rate=0.1, lr=1e-4,
                 plots=False, spaq=False, log_every=1)


def machinery_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    args = ["--dataset", str(shards), "--run_dir", str(run_dir)]
    for key, value in MACHINERY.items():
        args += [f"--no_{key}"] if value is False else [f"--{key}", str(value)]
    return args + list(extra)


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "iqa_dist.train", *args]


def accelerate_cmd(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(port),
            "-m", "iqa_dist.train", *args]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(0.05)


def epochs_done(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last" / "trainer.json"
    return json.loads(last.read_text())["epoch"] if last.exists() else 0


def start_past_first_epoch(cmd: list[str], run_dir: Path) -> subprocess.Popen:
    """A training process, returned once its first epoch's checkpoint is written."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    wait_for(lambda: epochs_done(run_dir) >= 1, proc)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    out = run(train_cmd(machinery_args(small_shards, run_dir)))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def test_run_directory_holds_what_users_need(uninterrupted):
    run_dir = uninterrupted
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model_size"] == "micro" and cfg["max_steps_per_epoch"] == 4
    rows = list(csv.DictReader(open(run_dir / "summary.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"train_loss", "val_srcc", "val_plcc", "lr"} <= set(rows[0])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 1 and results["epochs_run"] == 3
    assert {"srcc", "plcc", "krcc", "rmse", "plcc_logistic"} <= set(results["test"])
    assert (run_dir / "checkpoints" / "last").is_symlink()
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").exists()
    assert list((run_dir / "tb").rglob("events.*"))
    state = json.loads((run_dir / "checkpoints" / "last" / "trainer.json").read_text())
    assert state["global_step"] == 12 and state["epoch"] == 3


def test_killed_run_resumes_bit_identical(small_shards, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    args = machinery_args(small_shards, run_dir)
    proc = start_past_first_epoch(train_cmd(args), run_dir)
    proc.kill()  # SIGKILL: no chance to save anything
    proc.wait()
    out = run(train_cmd(args + ["--resume", "latest"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout
    assert_identical(final_weights(run_dir), final_weights(uninterrupted))
    assert (run_dir / "summary.csv").read_text().count("\n") == 4  # header + 3 epochs, none twice


@pytest.mark.parametrize("sig, code", [(signal.SIGUSR1, 99), (signal.SIGTERM, 99), (signal.SIGINT, 130)])
def test_a_stop_signal_saves_mid_epoch_and_resume_is_bit_identical(sig, code, small_shards, uninterrupted,
                                                                   tmp_path):
    """SLURM's warning signal and its kill (99: the job requeues itself), Ctrl-C (130, as a shell
    reports it): the process saves at the next step and exits with that literal code."""
    run_dir = tmp_path / "run"
    args = machinery_args(small_shards, run_dir)
    proc = start_past_first_epoch(train_cmd(args), run_dir)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert f"checkpoint saved, exit {code}" in err and "Traceback" not in err
    assert (run_dir / "preempted" / "rank-0.json").exists()
    out = run(train_cmd(args + ["--resume", "latest"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (run_dir / "preempted").exists()
    assert_identical(final_weights(run_dir), final_weights(uninterrupted))


# train's command line in a process that SIGKILLs itself as soon as the checkpoint of step
# argv[1] is complete: a node lost at that instant, with no race against a watching test.
DIE_AFTER_CHECKPOINT = """
import os, signal, sys
from iqa_dist import checkpoint, train
publish, step = checkpoint.publish, int(sys.argv[1])
def publish_then_die(run_dir, at, *args, **kwargs):
    path = publish(run_dir, at, *args, **kwargs)
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
checkpoint.publish = publish_then_die
sys.exit(train.main(sys.argv[2:]))
"""


def test_a_run_killed_after_a_periodic_checkpoint_resumes_from_it_bit_identical(small_shards, uninterrupted,
                                                                                tmp_path):
    """save_every_n_steps counts the run's steps: with 3, step 6 is step 2 of epoch 2 (4 an
    epoch). Killed right after it, the run resumes there and ends with the weights and the
    epoch losses of the uninterrupted run, which saved at epoch ends only (log_every 4: the
    checkpoint holds the loss of its window, not just of the windows before)."""
    run_dir = tmp_path / "run"
    args = machinery_args(small_shards, run_dir, "--save_every_n_steps", "3", "--log_every", "4")
    killed = run([sys.executable, "-c", DIE_AFTER_CHECKPOINT, "6", *args])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = (run_dir / "checkpoints" / "last").resolve()
    state = json.loads((last / "trainer.json").read_text())
    assert (last.name, state["epoch"], state["step_in_epoch"]) == ("step-00000006", 1, 2)
    out = run(train_cmd(args + ["--resume", "latest"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {last} at epoch 2, step 2/4" in out.stdout
    assert_identical(final_weights(run_dir), final_weights(uninterrupted))
    resumed, whole = ([float(r["train_loss"]) for r in csv.DictReader(open(d / "summary.csv"))]
                      for d in (run_dir, uninterrupted))
    assert resumed == pytest.approx(whole, rel=1e-6)


def test_early_stopping_on_validation_and_a_finished_run_resumes_to_its_test(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    # lr 0: validation never improves after the first epoch
    args = machinery_args(small_shards, run_dir, "--lr", "0", "--epochs", "6", "--patience", "2",
                          "--dropout_rate", "0")
    out = run(train_cmd(args))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == 3 and results["best_epoch"] == 1
    assert "early stopping" in out.stdout
    # requeued after it stopped (e.g. during the final test): no more training, the same test
    again = run(train_cmd(args + ["--resume", "latest"]))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already stopped early" in again.stdout
    rerun = json.loads((run_dir / "results.json").read_text())
    assert rerun["epochs_run"] == 3 and rerun["test"] == results["test"]
    assert (run_dir / "summary.csv").read_text().count("\n") == 4


def machinery_config(shards: Path, run_dir: Path, **overrides) -> Config:
    return from_dict(dict(MACHINERY, dataset=str(shards), run_dir=str(run_dir), **overrides))


@pytest.mark.parametrize("log_every, saved_at", [(1, 2), (3, 4)])
def test_stop_request_between_accumulation_steps_waits_for_the_cycle(small_shards, tmp_path, monkeypatch,
                                                                     log_every, saved_at):
    """Saving mid-cycle would lose the accumulated gradients: the stop waits for the
    optimiser step, and the resumed run ends where an uninterrupted one does. Ranks hear
    of it at the end of a log window (step 3 of 4 with log_every 3), mid-cycle: the save
    waits for the cycle's end, here the epoch's last step, before its validation."""
    cycles = dict(grad_accum=2, epochs=2, max_steps_per_epoch=4, log_every=log_every)
    train(machinery_config(small_shards, tmp_path / "whole", **cycles))
    real_step = Trainer.train_step

    def stop_after_first_micro_step(self, images, labels):
        loss = real_step(self, images, labels)
        if self.state.global_step == 0 and self.cfg.resume is None:
            self.stop.raised = True
        return loss

    monkeypatch.setattr(Trainer, "train_step", stop_after_first_micro_step)
    cfg = machinery_config(small_shards, tmp_path / "stopped", **cycles)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(Preempted):
        train(cfg)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # pytest's own, given back
    state = json.loads((tmp_path / "stopped" / "checkpoints" / "last" / "trainer.json").read_text())
    assert (state["global_step"], state["step_in_epoch"]) == (saved_at, saved_at)
    train(replace(cfg, resume="latest"))
    assert_identical(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "whole"))


def test_the_loop_reads_the_device_once_per_log_window(small_shards, tmp_path, monkeypatch, host_reads):
    """The loop reads the device once per log_every steps (the loss and the ranks'
    agreement together), not every step: each read makes the host wait for the GPU."""
    real_steps, reads = Trainer.run_steps, []

    def run_steps(self, bar):
        with host_reads() as seen:
            real_steps(self, bar)
        reads.extend(seen)

    monkeypatch.setattr(Trainer, "run_steps", run_steps)
    train(machinery_config(small_shards, tmp_path / "run", epochs=1, max_steps_per_epoch=6, log_every=3))
    assert reads == ["tolist", "tolist"]


def _model_inputs(monkeypatch, cfg: Config, stop_after: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(raw patches, model input) of each training step of ``train(cfg)``; with ``stop_after``
    the run is stopped after that many steps and resumed."""
    steps, real_step = [], Trainer.train_step

    def spy(model, _):
        return lambda x: (steps[-1].append(x.clone()), model(x))[1]

    def step(self, images, labels):
        steps.append([images.clone()])
        loss = real_step(self, images, labels)
        self.stop.raised = len(steps) == stop_after and self.cfg.resume is None
        return loss

    monkeypatch.setattr("iqa_dist.train.compiled", spy)
    monkeypatch.setattr(Trainer, "train_step", step)
    if stop_after:
        with pytest.raises(Preempted):
            train(cfg)
        cfg = replace(cfg, resume="latest")
    train(cfg)
    return [tuple(s) for s in steps]


def test_color_jitter_is_seeded_by_the_step_and_a_resumed_epoch_replays_it(small_shards, tmp_path, monkeypatch):
    """The seed's ColorJitter: the model sees each step's patches jittered with the
    parameters of (seed, epoch, rank, step), so a run stopped mid-epoch and resumed feeds
    it exactly what the uninterrupted run did; off, it sees the plain normalised patches."""
    from iqa_dist.data.jitter import draw, jittered
    from iqa_dist.data.stream import to_model_input

    short = dict(epochs=1, max_steps_per_epoch=2)
    plain = _model_inputs(monkeypatch, machinery_config(small_shards, tmp_path / "off", **short))
    on = _model_inputs(monkeypatch, machinery_config(small_shards, tmp_path / "on", color_jitter=True, **short))
    resumed = _model_inputs(monkeypatch, machinery_config(small_shards, tmp_path / "resumed", color_jitter=True,
                                                          **short), stop_after=1)
    assert len(plain) == len(on) == len(resumed) == 2
    for step, ((raw, off), (raw_on, x), (_, y)) in enumerate(zip(plain, on, resumed)):
        assert torch.equal(raw, raw_on)  # jitter does not change which patches are drawn
        assert torch.equal(off, to_model_input(raw, "cpu"))
        assert torch.equal(x, jittered(off, draw(len(raw), Config.seed, 0, 0, step)))
        assert not torch.allclose(x, off, atol=1e-3)
        assert torch.equal(x, y)


def test_validation_srcc_nan_every_epoch_still_keeps_best_weights(small_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "validate", lambda self: dict.fromkeys(("srcc", "plcc", "krcc", "rmse"), math.nan))
    results = train(machinery_config(small_shards, tmp_path / "run", epochs=2))
    assert results["best_epoch"] == 1
    assert (tmp_path / "run" / "checkpoints" / "best" / "model.safetensors").exists()
    assert "val SRCC is nan" in capsys.readouterr().out


def test_rounds_report_median_and_spread(small_shards, tmp_path):
    run_dir = tmp_path / "rounds"
    out = run(train_cmd(machinery_args(small_shards, run_dir, "--rounds", "2", "--epochs", "1")))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "results.json").read_text())
    assert len(summary["rounds"]) == 2 and "test_srcc_median" in summary and "test_srcc_iqr" in summary
    tests = [json.loads((run_dir / f"round-{r}" / "results.json").read_text()) for r in range(2)]
    assert all(t["epochs_run"] == 1 for t in tests)
    assert summary["test_srcc_median"] == pytest.approx(float(np.median([t["test"]["srcc"] for t in tests])))
    rounds = [yaml.safe_load((run_dir / f"round-{r}" / "config.yaml").read_text())["split_round"] for r in range(2)]
    manifest = read_manifest(small_shards)
    test_keys = [{row["key"] for row in manifest if row[f"split_{r}"] == "test"} for r in rounds]
    assert rounds == [0, 1] and test_keys[0] != test_keys[1]  # each round tested other images


class SplitRecorder:
    """Stands in for the Trainer in train_rounds: records each round's seed and splits."""

    seen: list[tuple[int, list[frozenset]]] = []

    def __init__(self, cfg: Config, callbacks, lock: bool = True) -> None:
        splits = [load_split(cfg.dataset, name, cfg.split_round).keys for name in ("train", "val", "test")]
        SplitRecorder.seen.append((cfg.seed, splits))
        self.liveness, self.lock = None, None
        self.accelerator = SimpleNamespace(end_training=lambda: None)
        self.stop = SimpleNamespace(restore=lambda: None)

    def fit(self) -> dict:
        return {"test": {"srcc": 0.5, "plcc": 0.5}}


def test_rounds_on_an_official_split_vary_the_seed_not_the_split(small_shards, tmp_path, monkeypatch):
    from layouts import make_koniq

    official = tmp_path / "koniq"
    pack("koniq-10k", make_koniq(tmp_path / "src", n=9), official, PackOptions(rounds=3), workers=0)
    monkeypatch.setattr("iqa_dist.train.Trainer", SplitRecorder)
    official_train = frozenset(r["key"] for r in read_manifest(official) if r["official_split"] == "train")
    for shards in (official, small_shards):
        SplitRecorder.seen = []
        train(Config(dataset=str(shards), rounds=2, seed=5, run_dir=str(tmp_path / shards.name)))
        (seed_0, splits_0), (seed_1, splits_1) = SplitRecorder.seen
        assert (seed_0, seed_1) == (5, 6)
        if shards == official:
            assert splits_0 == splits_1 and splits_0[0] == official_train
        else:
            assert splits_0 != splits_1  # a random-split set: another split each round


def test_nan_loss_stops_with_a_clear_message(small_shards, tmp_path):
    # one log window longer than the epoch: the check at the epoch's end still comes first
    out = run(train_cmd(machinery_args(small_shards, tmp_path / "run", "--lr", "1e30", "--epochs", "2",
                                       "--max_steps_per_epoch", "20", "--grad_clip", "0", "--log_every", "50")))
    assert out.returncode == 1
    assert "loss is nan" in out.stderr or "loss is inf" in out.stderr
    assert "Traceback" not in out.stderr
    # it diverges in the first epoch, before any checkpoint: none is named
    assert "no checkpoint had been written yet" in out.stderr and "checkpoints/last" not in out.stderr


# ---------------------------------------------------------------- bad input and faults


def with_manifest(shards: Path, dest: Path, change) -> Path:
    """A copy of a packed set whose manifest rows went through ``change``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shutil

    copy = dest / "copy"
    shutil.copytree(shards, copy)
    rows = pq.read_table(copy / "manifest.parquet").to_pylist()
    pq.write_table(pa.Table.from_pylist([change(r) for r in rows]), copy / "manifest.parquet")
    return copy


def test_a_val_split_too_small_to_rank_is_refused_at_start(small_shards, tmp_path):
    keep = {r["key"] for r in read_manifest(small_shards) if r["split_0"] == "val"}
    keep = sorted(keep)[0]
    one_val = with_manifest(small_shards, tmp_path / "one", lambda r: dict(r, split_0="train") if
                            r["split_0"] == "val" and r["key"] != keep else r)
    with pytest.raises(ConfigError, match=r"the val split holds 1 image\(s\): too few to rank"):
        train(machinery_config(one_val, tmp_path / "run1"))
    flat = with_manifest(small_shards, tmp_path / "flat", lambda r: dict(r, label=7.0) if r["split_0"] == "test" else r)
    with pytest.raises(ConfigError, match=r"the test split's 6 images all have the label 7: nothing to rank"):
        train(machinery_config(flat, tmp_path / "run2"))
    assert not (tmp_path / "run1" / "checkpoints" / "last").exists()


def test_a_truncated_shard_stops_training_with_one_line(small_shards, tmp_path, capsys):
    from test_stream import broken_copy

    broken, shard = broken_copy(small_shards, tmp_path, "truncated")
    assert train_main(machinery_args(broken, tmp_path / "run", "--epochs", "1")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {shard}: unreadable, truncated or corrupted")


def test_a_damaged_manifest_stops_training_with_one_line(small_shards, tmp_path, capsys):
    broken = tmp_path / "shards"
    shutil.copytree(small_shards, broken)
    manifest = broken / "manifest.parquet"
    manifest.write_bytes(b"PAR1" + bytes(64))
    assert train_main(machinery_args(broken, tmp_path / "run", "--epochs", "1")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {manifest}: unreadable manifest (")


def test_bad_samples_are_skipped_counted_and_limited(small_shards, tmp_path, capsys):
    from test_stream import broken_copy

    key = next(r["key"] for r in read_manifest(small_shards) if r["split_0"] == "train")
    broken, shard = broken_copy(small_shards, tmp_path, "bad image", key)
    full_epoch = dict(max_steps_per_epoch=0, epochs=1, workers=0)
    results = train(machinery_config(broken, tmp_path / "run", **full_epoch, max_bad_samples=5))
    assert results["bad_samples"] >= 1
    assert f"warning: skipped a bad sample (1 of at most 5): {shard}:{key}: unreadable image" in capsys.readouterr().err
    assert train_main(machinery_args(broken, tmp_path / "strict", "--max_steps_per_epoch", "0", "--epochs", "1",
                                     "--max_bad_samples", "0")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "error: more than max_bad_samples (0) unreadable samples on a process")


@pytest.fixture(scope="module")
def two_epochs(small_shards, tmp_path_factory) -> Path:
    """A run of two epochs of two steps: checkpoints step-2 and step-4."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    train(machinery_config(small_shards, run_dir, epochs=2, max_steps_per_epoch=2))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    return run_dir


def resumable_copy(run_dir: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def test_a_corrupted_last_checkpoint_falls_back_to_the_previous_one(small_shards, two_epochs, tmp_path, capsys):
    run_dir = resumable_copy(two_epochs, tmp_path / "run")
    truncate(run_dir / "checkpoints" / "step-00000004" / "model.safetensors")
    results = train(machinery_config(small_shards, run_dir, epochs=2, max_steps_per_epoch=2, resume="latest"))
    out = capsys.readouterr().out
    assert f"warning: {run_dir}/checkpoints/last is unreadable (model.safetensors: " in out
    assert "resuming from the newest readable one" in out and "step-00000002" in out
    assert results["epochs_run"] == 2  # the second epoch was trained again
    assert (run_dir / "checkpoints" / "last").resolve().name == "step-00000004"


def test_no_readable_checkpoint_is_one_line_pointing_at_it(small_shards, two_epochs, tmp_path, capsys):
    run_dir = resumable_copy(two_epochs, tmp_path / "run")
    for step in (run_dir / "checkpoints").glob("step-*"):
        truncate(step / "model.safetensors")
    assert train_main(machinery_args(small_shards, run_dir, "--epochs", "2", "--max_steps_per_epoch", "2",
                                     "--resume", "latest")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {run_dir}/checkpoints/last: unreadable (model.safetensors: ")
    assert f"remove {run_dir}/checkpoints to start over" in err


def test_a_resume_without_random_states_warns(small_shards, two_epochs, tmp_path, capsys):
    run_dir = resumable_copy(two_epochs, tmp_path / "run")
    (run_dir / "checkpoints" / "step-00000004" / "random_states_0.pkl").unlink()
    train(machinery_config(small_shards, run_dir, epochs=3, max_steps_per_epoch=2, resume="latest"))
    err = capsys.readouterr().err
    assert "random_states_0.pkl is missing: resuming without it, so this run will not be bit-identical" in err


def test_an_unwritable_run_directory_is_one_line_at_start(small_shards, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert train_main(machinery_args(small_shards, tmp_path / "file" / "run")) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}/file/run: cannot write the run directory (Not a directory)"


@pytest.mark.slow
def test_two_cpu_ranks_train_together_and_stop_together(small_shards, tmp_path):
    whole = tmp_path / "ddp"
    out = run(accelerate_cmd(machinery_args(small_shards, whole, "--epochs", "3"), port=free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((whole / "results.json").read_text())
    assert results["world_size"] == 2  # two real ranks, not two lone runs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = (whole / "tb" / "iqa_dist").glob("events.*")  # the trackers log on rank 0 only
    # 3 epochs of 3 global batches (12 images x 2 patches / 8), log_every 1: the global steps
    assert [e.step for e in EventAccumulator(str(events)).Reload().Scalars("train/loss")] == list(range(1, 10))

    # SIGUSR1 to one rank only: both agree, save, and leave with the preemption code
    run_dir = tmp_path / "ddp-stop"
    args = machinery_args(small_shards, run_dir, "--epochs", "3")
    proc = start_past_first_epoch(accelerate_cmd(args, port=free_port()), run_dir)
    import psutil
    # the launcher's own children: the ranks (their data loader workers are grandchildren)
    ranks = [p for p in psutil.Process(proc.pid).children()
             if "iqa_dist.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert sorted(p.name for p in (run_dir / "preempted").iterdir()) == ["rank-0.json", "rank-1.json"]
    # each rank logs its exit code as it leaves; the launcher's own report is no witness:
    # it SIGTERMs a rank still tearing down once the other has exited
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} on {socket.gethostname()}: checkpoint saved, exit {EXIT_PREEMPTED}" in err, err[-3000:]
    # resumed by the same launch, it ends where the uninterrupted 2-rank run did
    out = run(accelerate_cmd(args + ["--resume", "latest"], port=free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_identical(final_weights(run_dir), final_weights(whole))


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_accumulation_with_the_same_global_batch(tmp_path):
    """DDP averages gradients: global_batch_size 8 as 2 ranks x 4, 1 rank x 8 and 1 rank
    x 4 x 2 accumulation steps must take the same SGD steps (L1 only; test_losses checks
    the ranking loss across ranks)."""
    script = str(REPO / "tests" / "ddp_step.py")
    one = run([sys.executable, script, str(tmp_path / "one.safetensors"), "8", "1"])
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(free_port()), script,
               str(tmp_path / "two.safetensors"), "8", "1"])
    acc = run([sys.executable, script, str(tmp_path / "acc.safetensors"), "8", "2"])
    for out in (one, two, acc):
        assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2 batch 4" in two.stdout and "world 1 batch 8" in one.stdout
    assert "world 1 batch 4" in acc.stdout
    reference = load_file(str(tmp_path / "one.safetensors"))
    initial = load_file(str(tmp_path / "initial-one.safetensors"))
    moved = max((reference[k] - initial[k]).abs().max().item() for k in reference)
    assert moved > 1e-3  # the steps did something
    for other in ("two", "acc"):
        weights = load_file(str(tmp_path / f"{other}.safetensors"))
        worst = max((weights[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 1e-6, f"{other}: max difference {worst}"


# ---------------------------------------------------------------- optimisers and schedules


class TwoParts(nn.Module):
    """The parameter names that decide the groups: ``backbone.`` at lr, the rest at lr * lr_ratio."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.hyper = nn.Linear(2, 2), nn.Linear(2, 2)


def loop_hyper_lrs(lr: float, lrratio: float, epochs: int, original: bool) -> list[float]:
    """The hyper network's lr in each epoch, by the training loops: after epoch t,
    lr_t = lr / 10**(t // 6) and the hyper groups get lr_t * lrratio; the original HyperIQA
    also sets lrratio = 1 once t > 8, the seed's ``step`` does not."""
    lrs, hyper = [], lr * lrratio
    for t in range(epochs):
        lrs.append(hyper)
        lr_t = lr / 10 ** (t // 6)
        if original and t > 8:
            lrratio = 1
        hyper = lr_t * lrratio
    return lrs


@pytest.mark.parametrize("rule, expected", [  # epochs 0-15 of lr 2e-5
    ("hyperiqa", [2e-4] * 7 + [2e-5] * 3 + [2e-6] * 3 + [2e-7] * 3),
    ("step", [2e-4] * 7 + [2e-5] * 6 + [2e-6] * 3),  # the seed's: from epoch 8 (1-based), no ratio drop
])
def test_step_rules_decay_the_hyper_network_as_their_loops(rule, expected):
    lr, steps = 2e-5, 3
    assert loop_hyper_lrs(lr, 10, 16, original=rule == "hyperiqa") == pytest.approx(expected)
    cfg = Config(lr=lr, lr_ratio=10.0, lr_scheduler=rule, epochs=16)
    optimizer = build_optimizer(TwoParts(), cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps)
    per_step = []
    for _ in range(16 * steps):
        per_step.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    for name in ("hyper", "hyper_no_decay"):
        assert [lrs[name] for lrs in per_step] == pytest.approx([x for x in expected for _ in range(steps)])
    for name in ("backbone", "backbone_no_decay"):
        assert [lrs[name] for lrs in per_step] == pytest.approx([lr] * 16 * steps)
    json.dumps(scheduler.state_dict())  # plain values: checkpoints store it as such


def test_step_rules_start_each_epoch_with_fresh_moments(small_shards, tmp_path, monkeypatch):
    """As the loops that re-create their optimiser each epoch: no Adam state at an epoch's first step."""
    real_step, states = Trainer.train_step, []

    def record(self, images, labels):
        states.append(len(self.optimizer.state))
        return real_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", record)
    train(machinery_config(small_shards, tmp_path / "run", epochs=2, max_steps_per_epoch=2, lr_scheduler="step"))
    assert states[0] == states[2] == 0 and states[1] == states[3] > 0


@pytest.mark.parametrize("name, cls, decoupled", [("adamw", torch.optim.AdamW, True),
                                                  ("adam", torch.optim.Adam, False)])
def test_optimizer_choice(name, cls, decoupled):
    optimizer = build_optimizer(TwoParts(), Config(optimizer=name, weight_decay=5e-4))
    assert type(optimizer) is cls and optimizer.defaults["decoupled_weight_decay"] is decoupled
    assert {g["name"]: g["weight_decay"] for g in optimizer.param_groups} == {
        "backbone": 5e-4, "backbone_no_decay": 0.0, "hyper": 5e-4, "hyper_no_decay": 0.0}


def test_compiled_model_trains_as_the_eager_one(small_shards, tmp_path, monkeypatch):
    """torch.compile traces the whole model (dynamo and AOT autograd; aot_eager skips only
    the code generation that takes minutes on a CPU): the same losses step by step."""
    real_step, losses = Trainer.train_step, {}

    def record(self, images, labels):
        loss = real_step(self, images, labels)
        losses.setdefault(self.cfg.compile, []).append(loss.item())
        return loss

    monkeypatch.setattr(Trainer, "train_step", record)
    from torch._dynamo.utils import counters

    counters.clear()
    for backend in ("none", "aot_eager"):
        train(machinery_config(small_shards, tmp_path / backend, epochs=1, compile=backend))
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the model
    assert len(losses["aot_eager"]) == MACHINERY["max_steps_per_epoch"]
    assert losses["aot_eager"] == pytest.approx(losses["none"], rel=1e-4)


@pytest.mark.parametrize("asked, launcher, gpu, bf16, resolved", [
    ("auto", None, False, False, "no"),
    ("auto", None, True, True, "bf16"),
    ("auto", None, True, False, "no"),  # pre-Ampere GPUs (bf16 emulated only): fp32 unless fp16 is asked
    ("auto", "fp16", True, True, "fp16"),  # accelerate launch --mixed_precision wins
    ("auto", "no", True, True, "bf16"),  # what the launcher says when its config names none
    ("no", None, True, True, "no"),
])
def test_mixed_precision_auto(asked, launcher, gpu, bf16, resolved, monkeypatch):
    from iqa_dist.runtime import precision
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    # as torch answers: every CUDA GPU "supports" bf16 when emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    assert precision(Config(mixed_precision=asked), gpu=gpu) == resolved


def test_every_accelerator_turns_on_tf32_and_cudnn_autotuning(gpu_flags_off):
    """Training, evaluation and the benches all make their accelerator here; autotuning
    only where determinism is not asked."""
    from iqa_dist.runtime import make_accelerator
    make_accelerator(Config())
    assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    make_accelerator(Config(deterministic=True))
    assert not torch.backends.cudnn.benchmark


def test_deterministic_sets_everything_a_gpu_needs_to_repeat_itself(gpu_flags_off, monkeypatch):
    """cuBLAS's fixed workspace, cuDNN's deterministic algorithms without autotuning, and
    strict deterministic algorithms: an op without one raises instead of warning."""
    from iqa_dist.runtime import set_determinism
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    try:
        set_determinism(Config(deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_compile_with_deepspeed_is_refused_at_start(monkeypatch):
    from iqa_dist.runtime import make_accelerator
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="^compile: aot_eager is not supported with DeepSpeed; use compile: none$"):
        make_accelerator(Config(compile="aot_eager"))


@pytest.mark.parametrize("size, broadcast", [("micro", False), ("mobilenet", True)])
def test_ddp_broadcasts_buffers_only_for_batch_norm(size, broadcast):
    """Swin's buffers are constants: no broadcast before each forward; batch norm's
    running statistics change, so rank 0's are sent."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from iqa_dist.runtime import placed
    from iqa_dist.tools import model_from_config

    cfg = Config(model_size=size)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    placed(model_from_config(cfg), cfg, accelerator)
    assert accelerator.ddp_handler.to_kwargs().get("broadcast_buffers", True) is broadcast


def test_selection_scores_the_val_split_and_the_test_uses_the_best_epochs_weights(small_shards, tmp_path,
                                                                                   monkeypatch):
    """Validation sees exactly the val images; when the best epoch is not the last, the final
    test is that epoch's weights, as `evaluate --split test` on checkpoints/best scores them."""
    import pyarrow.parquet as pq

    from iqa_dist import evaluate
    from iqa_dist import train as train_module

    real_predict, real_validate, scored = train_module.predict_split, Trainer.validate, []

    def spy(model, split, *args, **kwargs):
        scored.append((split.name, split.keys))
        return real_predict(model, split, *args, **kwargs)

    def first_epoch_best(self):  # the real scores, but epoch 1 ranks first: the last must not be tested
        return dict(real_validate(self), srcc=1.0 - self.state.epoch)

    monkeypatch.setattr(train_module, "predict_split", spy)
    monkeypatch.setattr(Trainer, "validate", first_epoch_best)
    run_dir = tmp_path / "run"
    results = train(machinery_config(small_shards, run_dir, epochs=2))
    manifest = read_manifest(small_shards)
    keys = {name: frozenset(r["key"] for r in manifest if r["split_0"] == name) for name in ("val", "test")}
    assert scored == [("val", keys["val"])] * 2 + [("test", keys["test"])]
    assert results["best_epoch"] == 1 and results["epochs_run"] == 2

    def evaluated(checkpoint: Path) -> dict:
        out = tmp_path / f"eval-{checkpoint.name}"
        assert evaluate.main(["--checkpoint", str(checkpoint), "--shards", str(small_shards), "--split", "test",
                              "--out", str(out), "--workers", "0"]) == 0
        return pq.read_table(out / "results.parquet").to_pylist()[0]

    best = evaluated(run_dir)
    last = run_dir / "last-weights"
    last.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last" / "model.safetensors", last / "model.safetensors")
    shutil.copy(run_dir / "config.yaml", last / "config.yaml")
    for metric in ("srcc", "plcc", "rmse"):
        assert results["test"][metric] == pytest.approx(best[metric], rel=1e-6)
    assert evaluated(last)["plcc"] != pytest.approx(best["plcc"], rel=1e-6)


def _rank_procs(args: list[str], port: int) -> list[subprocess.Popen]:
    """Two training processes joined by gloo on 127.0.0.1, as a launcher would start them
    but without one: a launcher would kill the survivor as soon as the other rank died."""
    procs = []
    for rank in (0, 1):
        env_ = dict(env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(train_cmd(args), env=env_, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO))
    return procs


@pytest.mark.slow
def test_a_lost_rank_is_named_by_the_survivor_which_exits_3_and_the_run_resumes(small_shards, tmp_path):
    whole = tmp_path / "whole"
    reference = _rank_procs(machinery_args(small_shards, whole), free_port())
    for proc in reference:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    run_dir = tmp_path / "lost"
    args = machinery_args(small_shards, run_dir, "--dist_timeout_s", "20")
    rank0, rank1 = _rank_procs(args, free_port())
    wait_for(lambda: epochs_done(run_dir) >= 1, rank0)
    rank1.kill()  # SIGKILL: a lost node says nothing
    _, err = rank0.communicate(timeout=300)
    rank1.wait()
    assert rank0.returncode == 3, err[-3000:]
    # gloo sees the peer's socket close and fails the collective; the heartbeats name who is gone
    assert f"error: lost rank 1 on {socket.gethostname()} (silent for" in err, err[-3000:]
    assert "Traceback" not in err
    resumed = _rank_procs(args + ["--resume", "latest"], free_port())
    for proc in resumed:
        assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert_identical(final_weights(run_dir), final_weights(whole))
