"""Experiment trackers (TensorBoard, MLflow, W&B offline: the real packages, nothing sent
anywhere) and the progress a cluster's log file shows."""
from __future__ import annotations

import json
import re
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from iqa_dist.config import from_dict, parse_config
from iqa_dist.train import main as train_main
from iqa_dist.train import train
from test_train import REPO, env, machinery_args, machinery_config, train_cmd

# 2 epochs of 4 steps, a log window every 2: per-step points at global steps 2, 4, 6, 8
SHORT = dict(epochs=2, max_steps_per_epoch=4, log_every=2, workers=0)
STEPS = [2, 4, 6, 8]


def test_log_with_takes_a_list_a_name_or_none():
    assert from_dict({}).log_with == ["tensorboard"]
    assert from_dict({"log_with": "mlflow"}).log_with == ["mlflow"]
    assert from_dict({"log_with": "none"}).log_with == []
    assert parse_config(["--log_with", "none"]).log_with == []
    assert parse_config(["--log_with", "[mlflow, wandb]"]).log_with == ["mlflow", "wandb"]


def test_an_unknown_or_uninstalled_tracker_is_one_line(small_shards, tmp_path, capsys):
    assert train_main(machinery_args(small_shards, tmp_path / "run", "--log_with", "[tensorboard, mlflw]")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: log_with: 'mlflw' is not one of" in err and "mlflow" in err
    # one Accelerate knows whose package is missing (Accelerate alone would train without it)
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    missing = sorted(set(LoggerType.list()) - {"all"} - {str(t) for t in get_available_trackers()})[0]
    assert train_main(machinery_args(small_shards, tmp_path / "run", "--log_with", missing)) == 1
    assert capsys.readouterr().err == f"error: log_with: {missing} is not installed (pip install {missing}; " \
                                      "pip install -e '.[trackers]' installs mlflow and wandb)\n"


def test_mlflow_store_in_the_run_dir_and_a_resumed_run_continues_its_steps(small_shards, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    cfg = machinery_config(small_shards, run_dir, **dict(SHORT, epochs=1), log_with=["tensorboard", "mlflow"])
    train(cfg)
    tb = run_dir / "tb" / "iqa_dist"
    with SummaryWriter(str(tmp_path / "lost")) as lost:  # what a run killed after its checkpoint (step 4) logged
        lost.add_scalar("train/loss", -1.0, 6)
    # named to be read after the first run's events and before the resumed run's, as it would be
    [first], [made] = tb.glob("events.*"), (tmp_path / "lost").glob("events.*")
    started = int(first.name.split('.')[3])
    made.rename(tb / f"events.out.tfevents.{started}.~lost")
    # TensorBoard reads a folder's files in name order, and names start with the second they
    # were opened: a resume opened within the first run's second would be read before the lost file
    while int(time.time()) <= started:
        time.sleep(0.05)
    train(replace(cfg, epochs=2, resume="latest"))  # the same MLflow run, from global step 4 on
    events = EventAccumulator(str(tb)).Reload().Scalars("train/loss")
    assert [e.step for e in events] == STEPS and events[2].value != -1.0  # the resumed run's step 6
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    [experiment] = client.search_experiments(filter_string="name = 'iqa_dist'")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    assert run.info.run_name == "run" and run.info.status == "FINISHED"

    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run.info.run_id, key)]

    assert steps("train/loss") == steps("train/lr_backbone") == steps("train/samples_per_s") == STEPS
    assert steps("val_srcc") == steps("epoch") == [4, 8]  # each epoch's end
    lrs = client.get_metric_history(run.info.run_id, "train/lr_hyper")
    assert lrs[0].value == pytest.approx(10 * client.get_metric_history(run.info.run_id, "train/lr_backbone")[0].value)
    params = run.data.params
    assert params["lr"] == "0.0001" and params["model_size"] == "micro" and params["world_size"] == "1"


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-ID.wandb``): LevelDB's log framing (32 KiB
    blocks of records with a 7-byte header) around wandb's own protobuf ``Record``; wandb
    itself no longer ships a Python reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts = path.read_bytes(), 1 << 15, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too short for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_in_the_run_dir(small_shards, tmp_path, monkeypatch):
    import wandb

    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "XDG_CACHE_HOME"):  # not in ~
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(machinery_config(small_shards, run_dir, **SHORT, log_with=["wandb"]))
    wandb.teardown()  # its service writes the log behind the run: wait for it, as a process's exit does
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    [log] = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    history, config = {}, {}
    for record in wandb_records(log):
        if record.WhichOneof("record_type") == "history":
            history[record.history.step.num] = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                for i in record.history.item}
        elif record.WhichOneof("record_type") == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
    assert sorted(history) == STEPS
    assert all("train/loss" in history[s] for s in STEPS)
    assert [s for s in STEPS if "val_srcc" in history[s]] == [4, 8]
    assert config["lr"] == 1e-4 and config["log_with"] == "wandb"


@pytest.fixture(scope="module")
def logged_to_files(small_shards, tmp_path_factory) -> tuple[Path, str, str]:
    """A run as a batch job runs it: stdout and stderr are files, not a terminal."""
    base = tmp_path_factory.mktemp("files")
    args = machinery_args(small_shards, base / "run", *(f"--{k}={v}" for k, v in SHORT.items()))
    with open(base / "out", "w") as out, open(base / "err", "w") as err:
        code = subprocess.run(train_cmd(args), env=env(), stdout=out, stderr=err, cwd=REPO, timeout=300).returncode
    # bytes: reading text would turn each carriage return into a newline
    stdout, stderr = ((base / name).read_bytes().decode() for name in ("out", "err"))
    assert code == 0, stderr[-3000:]
    return base / "run", stdout, stderr


def test_log_files_get_plain_lines_not_a_progress_bar(logged_to_files):
    _, stdout, stderr = logged_to_files
    assert "\r" not in stdout and "\r" not in stderr
    lines = re.findall(r"^epoch (\d)/2  step (\d)/4  loss \S+  lr \S+  \S+ samples/s  ETA \S+$", stdout, re.M)
    assert lines == [(e, s) for e in "12" for s in "24"]


def test_tensorboard_by_default_holds_the_per_step_scalars(logged_to_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = logged_to_files[0]
    events = EventAccumulator(str(run_dir / "tb" / "iqa_dist")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == STEPS
    assert [e.step for e in events.Scalars("val_srcc")] == [4, 8]
    assert not (run_dir / "mlruns").exists() and not (run_dir / "wandb").exists()
