"""Ray Tune sweeps: ASHA, retries from a checkpoint, resuming a killed sweep, clear YAML errors.

One local Ray (2 CPUs) serves the whole module; trials are micro runs of a few seconds.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import ray
import timm
import torch
import yaml
from ray import tune as ray_tune
from ray.tune.search import ConcurrencyLimiter
from safetensors.torch import load_file

from iqa_dist import tune, weights
from iqa_dist.config import ConfigError, load_yaml
from iqa_dist.models.backbones import BACKBONES

from conftest import free_port

REPO = Path(__file__).parents[1]
SEARCHED = ["dropout_rate", "drop_path_rate", "lr", "ranking_loss_alpha"]


def micro(shards: Path, **extra) -> dict:
    return {"dataset": str(shards), "model_size": "micro", "batch_size": 4, "train_patch_num": 2,
            "test_patch_num": 1, "max_steps_per_epoch": 2, "epochs": 2, "workers": 0, "plots": False,
            "spaq": False, "shuffle_buffer": 16, **extra}  # a small buffer: fills from 12 images, not 1000s


def sweep_dict(shards: Path, storage: Path, **extra) -> dict:
    return {"overrides": micro(shards), "num_samples": 4, "max_concurrent": 2,
            "resources_per_trial": {"cpu": 1}, "storage_path": str(storage), "name": "s", **extra}


@pytest.fixture(scope="module")
def local_ray():
    with tune.ray_cluster(num_cpus=2):
        yield


def weights_folder(path: Path, sizes: tuple[str, ...] = ("micro",)) -> Path:
    """python -m iqa_dist.weights files of random backbones, made here (no download)."""
    for size in sizes:
        spec = BACKBONES[size]
        weights.save(timm.create_model(spec.timm_name, **spec.timm_kwargs), size, path)
    return path


def test_asha_sweep_writes_tables_and_a_trainable_best_config(small_shards, tmp_path, local_ray):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(micro(small_shards, epochs=5, patience=4,
                                         pretrained_path=str(weights_folder(tmp_path / "w")))))
    sweep = sweep_dict(small_shards, tmp_path, base=str(base), overrides={"epochs": 2, "early_stopping": False},
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2},
                       space={**tune.DEFAULT_SPACE, "weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-3}})
    table = tune.run_sweep(sweep)
    out = tmp_path / "s"
    for saved in (pd.read_csv(out / "results.csv"), pd.read_parquet(out / "results.parquet")):
        assert len(saved) == 4 and set(saved["status"]) == {"TERMINATED"}
        assert {"trial_id", *SEARCHED, "best_val_srcc", "epochs_run", "compute_s", "compute_epochs"} <= set(saved)
    assert table["epochs_run"].between(1, 2).all() and (table["compute_s"] > 0).all()
    best = table.loc[table["best_val_srcc"].idxmax()]
    cfg = load_yaml(out / "best_config.yaml")  # as `python -m iqa_dist.train --config` reads it
    assert [getattr(cfg, k) for k in [*SEARCHED, "weight_decay"]] == [best[k] for k in [*SEARCHED, "weight_decay"]]
    # the base recipe's budget, not the trials' (epochs 2, no early stopping)
    assert (cfg.run_dir, cfg.resume, cfg.model_size, cfg.epochs, cfg.patience, cfg.early_stopping) == \
        (None, None, "micro", 5, 4, True)
    assert (out / "sweep.png").stat().st_size > 0
    assert (Path(best["run_dir"]) / "checkpoints" / "best" / "model.safetensors").exists()
    for run_dir in table["run_dir"]:  # every trial fine-tuned the base's weights
        assert load_yaml(Path(run_dir) / "config.yaml").pretrained_path == str(tmp_path / "w")
        epochs = pd.read_csv(Path(run_dir).parent / tune.EPOCH_LOG)  # a running best was reported
        assert list(epochs[tune.RUNNING_BEST]) == list(epochs["val_srcc"].fillna(-math.inf).cummax())


class KillFirstTrialOnce(ray_tune.Callback):
    """Kills a trial's process once Tune holds its first checkpoint, as a lost node or the
    OOM killer would."""

    def __init__(self) -> None:
        self.killed: list[str] = []

    def on_trial_save(self, iteration, trials, trial, **info):
        if not self.killed:
            self.killed.append(trial.trial_id)
            ray.kill(trial.temporary_state.ray_actor)


def test_a_failed_trial_is_retried_from_its_checkpoint(small_shards, tmp_path, local_ray):
    killer = KillFirstTrialOnce()
    sweep = sweep_dict(small_shards, tmp_path, num_samples=1, scheduler="none", max_failures=1,
                       overrides=micro(small_shards, epochs=3))
    table = tune.run_sweep(sweep, callbacks=[killer])
    row = table.iloc[0]
    assert killer.killed == [row["trial_id"]]
    assert (row["status"], row["failures"], row["epochs_run"]) == ("TERMINATED", 1, 3)
    assert row["compute_epochs"] == 3  # epoch 1 came from the checkpoint, not trained again
    results = json.loads((Path(row["run_dir"]) / "results.json").read_text())
    assert results["epochs_run"] == 3


@pytest.mark.slow
def test_a_trial_of_two_ranks_retried_ends_as_a_two_rank_launch_of_its_config(small_shards, tmp_path, local_ray):
    """workers: 2 runs the trial as 2 gloo ranks (Ray Train's TorchTrainer): the world size
    comes from the process group; killed after its first checkpoint (its driver, and with it
    the ranks), the trial is retried from it and ends with the weights of an uninterrupted
    `accelerate launch` on 2 ranks."""
    config, launched = tmp_path / "launched.yaml", tmp_path / "launched"
    config.write_text(yaml.safe_dump(micro(small_shards, lr=1e-3, run_dir=str(launched),
                                           shards_root=str(Path("shards").absolute()))))  # as the sweep makes it
    launch = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
                               "-m", "iqa_dist.train", "--config", str(config)], cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # meanwhile: the machine has 2 cores
    sweep = sweep_dict(small_shards, tmp_path, num_samples=1, scheduler="none",
                       space={"lr": {"type": "choice", "values": [1e-3]}},
                       resources_per_trial={"workers": 2, "cpu": 1})
    killer = KillFirstTrialOnce()
    try:
        row = tune.run_sweep(sweep, callbacks=[killer]).iloc[0]
    finally:
        err = launch.communicate(timeout=300)[1]
    assert launch.returncode == 0, err[-3000:]
    assert killer.killed == [row["trial_id"]]
    assert (row["status"], row["failures"], row["world_size"], row["epochs_run"]) == ("TERMINATED", 1, 2, 2)
    trial = Path(row["run_dir"])
    results = json.loads((trial / "results.json").read_text())
    assert (results["world_size"], results["backend"]) == (2, "gloo")
    assert set(pd.read_csv(trial.parent / tune.EPOCH_LOG)["world_size"]) == {2}
    assert json.loads((launched / "results.json").read_text())["world_size"] == 2

    ours, theirs = (yaml.safe_load((run / "config.yaml").read_text()) for run in (trial, launched))
    assert ours["run_dir"] == str(trial)  # and the rest but how it started: the same config
    assert {k for k in ours if ours[k] != theirs[k]} <= {"run_dir", "overwrite", "resume", "allow_changed"}
    ours, theirs = (load_file(str(run / "checkpoints" / "last" / "model.safetensors")) for run in (trial, launched))
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    first = load_file(str(sorted((trial / "checkpoints").glob("step-*"))[0] / "model.safetensors"))
    assert any(not torch.equal(first[k], ours[k]) for k in ours)  # the second epoch moved them: a real check


def finished_trials(experiment: Path) -> int:
    """TERMINATED trials in Tune's saved experiment state (what a resume starts from)."""
    states = list(experiment.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        data = json.loads(states[0].read_text())
    except json.JSONDecodeError:  # caught while being replaced
        return 0
    return sum(json.loads(t[0])["status"] == "TERMINATED" for t in data["trial_data"])


def start_sweep(path: Path) -> subprocess.Popen:
    """``python -m iqa_dist.tune --config path`` in its own session (it and its Ray: one group)."""
    return subprocess.Popen([sys.executable, "-m", "iqa_dist.tune", "--config", str(path)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, late: str) -> None:
    """Poll ``condition`` while the sweep ``proc`` runs, for up to 300 s."""
    end = time.time() + 300
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, late
        time.sleep(0.2)


def test_a_killed_sweep_resumes_without_rerunning_finished_trials(small_shards, tmp_path, local_ray):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(small_shards, tmp_path, num_samples=3, max_concurrent=1,
                                              scheduler="none", overrides=micro(small_shards, epochs=3))))
    experiment = tmp_path / "s"
    proc = start_sweep(path)
    try:
        wait_for(lambda: finished_trials(experiment) >= 1, proc, "no trial finished in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
        proc.wait()
        shutil.rmtree(f"/tmp/ray-{os.getuid()}-{proc.pid}", ignore_errors=True)  # its Ray temp dir
    done = {p.parent.parent.name: p.stat().st_mtime_ns for p in experiment.glob("trial_*/run/results.json")}
    assert done

    assert tune.main(["--config", str(path), "--resume"]) == 0
    table = pd.read_csv(experiment / "results.csv")
    assert len(table) == 3 and set(table["status"]) == {"TERMINATED"}
    assert (table["epochs_run"] == 3).all()
    for trial, mtime in done.items():  # finished before the kill: not run again
        assert (experiment / trial / "run" / "results.json").stat().st_mtime_ns == mtime
        assert table.set_index("trial_id").loc[trial.removeprefix("trial_"), "compute_epochs"] == 3


def test_sigterm_stops_a_sweep_in_one_line_with_the_resume_command(small_shards, tmp_path):
    """Ray's own SIGTERM handler dumped a crash report and aborted; Tune, given a SIGINT,
    saves the sweep and returns as if it were done, which would write a table of the trials
    so far as the sweep's result."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(small_shards, tmp_path, num_samples=2, max_concurrent=1,
                                              scheduler="none", overrides=micro(small_shards, epochs=50))))
    experiment = tmp_path / "s"
    proc = start_sweep(path)
    try:  # once a trial runs, Tune's loop is on
        wait_for(lambda: list(experiment.glob("trial_*")), proc, "no trial started in time")
        proc.send_signal(signal.SIGTERM)  # the driver alone, as `kill PID` or scancel's first signal
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
    resume = f"python -m iqa_dist.tune --config {path} --resume"
    assert err.rstrip().splitlines()[-1] == f"interrupted: {resume} continues it"
    assert not (experiment / "results.csv").exists() and ray_tune.Tuner.can_restore(str(experiment))


@pytest.mark.parametrize("change, message", [
    ({"space": {"dropout": {"type": "uniform", "low": 0, "high": 1}}},
     "space.dropout: unknown Config key (did you mean 'dropout_rate'?)"),
    ({"space": {"lr": {"type": "normal", "low": 0, "high": 1}}}, "space.lr: expected {type: loguniform|"),
    ({"space": {"epochs": {"type": "uniform", "low": 1, "high": 4}}}, "space.epochs: epochs: expected int"),
    ({"space": {"lr": {"type": "loguniform", "low": 0.0, "high": 1e-4}}}, "space.lr: needs 0 < low < high"),
    ({"schedulr": "asha"}, "unknown key 'schedulr' (did you mean 'scheduler'?)"),
    ({"scheduler": {"type": "asha", "grace": 2}},
     "scheduler.grace: not an option of asha (options: grace_period, reduction_factor)"),
    ({"search": "grid"}, "space.dropout_rate: search grid needs num"),
    ({"metric": "test_srcc"}, "metric: 'test_srcc' is not one of val_srcc"),
    ({"overrides": {"epocs": 3}}, "overrides: unknown key 'epocs' (did you mean 'epochs'?)"),
    ({"overrides": {"batch_size": -4}}, "overrides: batch_size -4: must be >= 1"),
    ({"overrides": {"model_size": "tiny"}}, "base: pretrained: not set for model_size tiny"),
    ({"space": {"lr": {"type": "uniform", "low": -0.1, "high": 0.1}}}, "space.lr: lr -0.1: must be >= 0"),
    ({"space": {"train_patch_num": {"type": "choice", "values": [4, 0]}}},
     "space.train_patch_num: train_patch_num 0: must be >= 1"),
    ({"search": "bohb", "scheduler": "pbt"}, "scheduler: search bohb runs with its own HyperBand"),
    ({"scheduler": "hyperband"}, "scheduler: hyperband is BOHB's (HyperBandForBOHB): use it with search bohb"),
    ({"search": "optuna", "scheduler": "pbt"}, "scheduler: pbt takes no search algorithm"),
    ({"search": "hyperopt", "space": {"lr": {"type": "uniform", "low": 0.0, "high": 0.1, "num": 3}}},
     "space.lr: search hyperopt samples the space; num (a grid) does not apply"),
    ({"search": "optuna", "space": {"lr": {"type": "grid", "values": [0.1, 0.2]}}},
     "space.lr: search optuna samples the space; type grid (a grid) does not apply"),
    ({"search": "skopt"}, "search: 'skopt' is not one of random, grid, optuna, hyperopt, bohb"),
    ({"seed": -1}, "seed -1: must be in 0..2**32-1"),
    ({"loggers": ["mlflow", "comet"]},
     "loggers: unknown 'comet'; choices: csv, json, tensorboard, mlflow, wandb"),
    ({"loggers": "mlflow"}, "loggers: expected a list of csv, json, tensorboard, mlflow, wandb"),
    ({"resources_per_trial": {"gpu": 2}},  # a process would train on one of the two
     "resources_per_trial.gpu 2: a trial process trains on one GPU; for 2 GPUs per trial ask workers: 2, gpu: 1"),
    ({"resources_per_trial": {"workers": 2, "gpu": 0.5}},
     "resources_per_trial.gpu 0.5: with workers 2 each rank needs a GPU of its own (gpu: 1) or none"),
    ({"resources_per_trial": {"workers": 0}}, "resources_per_trial.cpu and .workers must be positive"),
    ({"resources_per_trial": {"nodes": 2}}, "resources_per_trial.nodes: only workers, cpu and gpu can be given"),
])
def test_a_bad_sweep_file_names_the_file_and_the_key(tmp_path, change, message, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"overrides": {"model_size": "micro"}, **change}))
    with pytest.raises(ConfigError) as err:
        tune.load_sweep(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert tune.main(["--config", str(path)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_grid_search_enumerates_every_axis(small_shards, tmp_path):
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, search="grid", space={
        "lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3, "num": 3},
        "ranking_loss_alpha": {"type": "choice", "values": [0.0, 1.0]}}))
    lr = tune.domain(sweep.space["lr"], grid=True)
    assert lr == {"grid_search": pytest.approx([1e-5, 1e-4, 1e-3])}
    assert tune.domain(sweep.space["ranking_loss_alpha"], grid=True) == {"grid_search": [0.0, 1.0]}
    assert Path(sweep.base.dataset).is_absolute()


@pytest.mark.parametrize("gpu, asked, gpus, runs", [
    (1, 4, 2.0, 2),  # more concurrent trials than GPUs: lowered
    (0.5, None, 2.0, 4),  # unset: as many as fit
    (1, 1, 2.0, 1),  # fewer: kept
    (0, 3, 0.0, 3),  # CPU trials: the GPUs do not count
])
def test_concurrency_matches_the_gpus_the_sweep_was_given(small_shards, tmp_path, gpu, asked, gpus, runs):
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, max_concurrent=asked,
                                        resources_per_trial={"cpu": 1, "gpu": gpu}))
    assert tune.fit_to_cluster(sweep, gpus).max_concurrent == runs


@pytest.mark.parametrize("resources, asked, gpus, cpus, runs", [
    ({"workers": 2, "cpu": 1}, None, 0.0, 6.0, 3),  # Tune cannot see the ranks: the CPUs bound it
    ({"workers": 2, "cpu": 1}, 1, 0.0, 6.0, 1),  # fewer: kept
    ({"workers": 2, "cpu": 1, "gpu": 1}, 4, 4.0, 64.0, 2),  # 4 GPUs hold 2 trials of 2 ranks
])
def test_concurrent_trials_of_several_ranks_fit_the_cluster(small_shards, tmp_path, resources, asked, gpus,
                                                            cpus, runs):
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, max_concurrent=asked, resources_per_trial=resources))
    assert tune.fit_to_cluster(sweep, gpus, cpus / 2, cpus).max_concurrent == runs


def test_trials_of_more_ranks_than_the_cluster_holds_are_refused(small_shards, tmp_path):
    def refused(resources: dict, gpus: float, cpus: float) -> str:
        sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, resources_per_trial=resources))
        with pytest.raises(ConfigError) as err:
            tune.fit_to_cluster(sweep, gpus, cpus, cpus)
        return str(err.value)

    assert refused({"workers": 2, "cpu": 2}, 0.0, 2.0).startswith(
        "resources_per_trial: workers 2 x cpu 2 = 4 per trial: the Ray cluster has 2 CPU(s)")
    assert refused({"workers": 2, "cpu": 1, "gpu": 1}, 1.0, 8.0).startswith(
        "resources_per_trial: workers 2 x gpu 1 = 2 per trial: the Ray cluster has 1 GPU(s)")
    machine = os.cpu_count()
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, resources_per_trial={"workers": machine, "cpu": 2}))
    with pytest.raises(ConfigError, match=rf"^resources_per_trial: workers {machine} x cpu 2 = {2 * machine} per "
                                          rf"trial: this machine has {machine} CPU\(s\)"):
        tune.local_cpus(sweep)


def test_trials_needing_gpus_on_a_cluster_without_are_refused(small_shards, tmp_path):
    """Ray would keep them pending for ever, saying nothing."""
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, resources_per_trial={"cpu": 1, "gpu": 1}))
    with pytest.raises(ConfigError, match=r"^resources_per_trial.gpu 1: the Ray cluster has 0 GPU\(s\)"):
        tune.fit_to_cluster(sweep, 0.0)


def test_trials_needing_more_cpus_than_there_are_are_refused(small_shards, tmp_path, local_ray):
    """A private local Ray is sized to the trials, so it would pretend to have the CPUs; a
    running cluster's would keep the trials pending for ever."""
    machine = os.cpu_count()
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, resources_per_trial={"cpu": machine + 1}))
    with pytest.raises(ConfigError, match=rf"^resources_per_trial.cpu {machine + 1}: this machine has {machine} "
                                          r"CPU\(s\), all a private local Ray gives; ask cpu: "):
        tune.local_cpus(sweep)
    assert tune.node_cpus(1, wait_s=0) == 2.0  # the module's Ray: one node of 2 CPUs
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, resources_per_trial={"cpu": 3}))
    with pytest.raises(ConfigError, match=r"^resources_per_trial.cpu 3: the Ray cluster's largest node has "
                                          r"2 CPU\(s\)"):
        tune.fit_to_cluster(sweep, 0.0, tune.node_cpus(sweep.cpu, wait_s=0))


def test_a_sweep_folder_holds_one_sweep(small_shards, tmp_path):
    """A second sweep under a used name would leave only its own trials in the table; two at
    once would mix their trials. Both are refused before Ray starts."""
    from iqa_dist.runlock import NAME

    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path))
    folder = sweep.experiment_dir
    folder.mkdir(parents=True)
    (folder / NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "since": 0}))
    with pytest.raises(ConfigError, match=f"^{folder}: in use by another sweep \\(pid {os.getpid()} "):
        tune.run_sweep(sweep)
    (folder / "results.csv").write_text("trial_id\n")
    with pytest.raises(ConfigError, match=f"^{folder}: holds a sweep already; --resume continues it"):
        tune.run_sweep(sweep)
    assert (folder / "results.csv").read_text() == "trial_id\n"


def test_best_config_is_the_base_recipe_with_the_found_values(small_shards, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(micro(small_shards, epochs=7, patience=3, workers=2, plots=True)))
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, base=str(base), overrides={
        "epochs": 2, "early_stopping": False, "workers": 0, "plots": False, "lr_ratio": 5.0}))
    assert (sweep.base.epochs, sweep.base.early_stopping) == (2, False)  # what the trials run
    table = pd.DataFrame([{**dict.fromkeys(SEARCHED, 0.1), "lr": 1e-4, "best_val_srcc": 0.2},
                          {**dict.fromkeys(SEARCHED, 0.3), "lr": 3e-4, "best_val_srcc": 0.6}])
    cfg = tune.best_config(table, sweep)
    assert (cfg.lr, cfg.dropout_rate, cfg.lr_ratio) == (3e-4, 0.3, 5.0)  # found; a recipe override kept
    assert (cfg.epochs, cfg.patience, cfg.early_stopping, cfg.workers, cfg.plots) == (7, 3, True, 2, True)
    assert cfg.dataset == str(small_shards.absolute())


def test_model_size_may_be_searched_on_pretrained_weights(small_shards, tmp_path):
    sizes = {"model_size": {"type": "choice", "values": ["micro", "tiny"]}}
    with pytest.raises(ConfigError, match="space.model_size: pretrained: not set for model_size tiny"):
        tune.parse_sweep(sweep_dict(small_shards, tmp_path, space=sizes))
    folder = str(tmp_path / "w")  # one file per size (python -m iqa_dist.weights --out w)
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, space=sizes,
                                        overrides=micro(small_shards, pretrained_path=folder)))
    assert tune.domain(sweep.space["model_size"], grid=True) == {"grid_search": ["micro", "tiny"]}
    with pytest.raises(ConfigError, match="PBT would change a trial's model"):
        tune.parse_sweep(sweep_dict(small_shards, tmp_path, space=sizes, scheduler="pbt",
                                    overrides=micro(small_shards, pretrained_path=folder)))


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_demo.yaml"])
def test_shipped_sweeps_compare_the_running_best(name):
    sweep = tune.load_sweep(REPO / "configs" / name)
    assert (sweep.metric, sweep.epoch_metric) == (tune.RUNNING_BEST, "val_srcc")
    assert tune.parse_sweep({"overrides": {"model_size": "micro"}}).metric == tune.RUNNING_BEST  # the default


@pytest.mark.parametrize("flags, saved, resumed", [
    (["--resume", "auto"], True, True),
    (["--resume", "auto"], False, False),  # a requeued job stopped before Tune first saved: start
    (["--resume"], False, True),  # run_sweep then refuses: nothing to resume
    ([], True, False),  # run_sweep then refuses: holds a sweep already
])
def test_resume_auto_resumes_only_a_sweep_tune_saved(small_shards, tmp_path, monkeypatch, flags, saved, resumed):
    """slurm/sweep.sh passes --resume auto to a requeued job."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep_dict(small_shards, tmp_path)))
    asked = []

    def run_sweep(sweep, address, resume):
        asked.append(resume)
        raise ConfigError("stopped here")

    folder = str(tmp_path / "s")
    monkeypatch.setattr(ray_tune.Tuner, "can_restore", staticmethod(lambda path: saved and path == folder))
    monkeypatch.setattr(tune, "run_sweep", run_sweep)
    assert tune.main(["--config", str(path), *flags]) == 1 and asked == [resumed]


# ---------------------------------------------------------------- model-based search, loggers, schedulers


class TunerSpy(ray_tune.Tuner):
    """The Tuner, recording the search algorithm it is handed."""

    search_algs: list = []

    def __init__(self, *args, tune_config=None, **kwargs):
        TunerSpy.search_algs.append(tune_config.search_alg if tune_config else None)
        super().__init__(*args, tune_config=tune_config, **kwargs)


@pytest.fixture
def tuner_spy(monkeypatch):
    monkeypatch.setattr(ray_tune, "Tuner", TunerSpy)
    TunerSpy.search_algs = []
    return TunerSpy.search_algs


class StopAfterFirstTrial(ray_tune.Callback):
    """Ctrl-C to the sweep once its first trial is done (once: Tune pickles its callbacks
    and a resumed sweep runs them again; the marker file remembers)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.marker.exists():
            self.marker.touch()
            signal.raise_signal(signal.SIGINT)


def proposals(sweep: tune.Sweep, n: int) -> list[dict]:
    """The first ``n`` configs the sweep's own searcher proposes, replayed outside Tune."""
    searcher = tune.make_search(replace(sweep, max_concurrent=None))
    searcher.set_search_properties(sweep.metric, sweep.mode, tune.param_space(sweep))
    return [searcher.suggest(f"replay{i}") for i in range(n)]


def tried(table: pd.DataFrame) -> list[dict]:
    return [{key: row[key] for key in SEARCHED} for _, row in table.iterrows()]


def test_optuna_proposes_the_trials_seeded_and_a_resumed_sweep_goes_on_where_it_was(
        small_shards, tmp_path, local_ray, tuner_spy):
    from ray.tune.search.optuna import OptunaSearch

    raw = sweep_dict(small_shards, tmp_path, search="optuna", seed=7, num_samples=3, max_concurrent=1,
                     scheduler="none", overrides=micro(small_shards, epochs=1))
    with pytest.raises(tune.SweepInterrupted):
        tune.run_sweep(raw, callbacks=[StopAfterFirstTrial(tmp_path / "stopped")])
    [limiter] = tuner_spy
    assert isinstance(limiter, ConcurrencyLimiter) and limiter.max_concurrent == 1
    assert isinstance(limiter.searcher, OptunaSearch)
    assert finished_trials(tmp_path / "s") == 1

    table = tune.run_sweep(raw, resume=True)
    assert len(table) == 3 and set(table["status"]) == {"TERMINATED"}
    sweep = tune.parse_sweep(raw)
    # the third trial was proposed after the resume, by the searcher's restored state
    expected = proposals(sweep, 3)
    assert tried(table) == [pytest.approx(config) for config in expected]
    assert expected != proposals(replace(sweep, seed=8), 2)  # the seed decides


@pytest.mark.parametrize("search, searcher", [("hyperopt", "HyperOptSearch"), ("bohb", "TuneBOHB")])
def test_model_based_search_proposes_the_trials(small_shards, tmp_path, local_ray, tuner_spy, search, searcher):
    raw = sweep_dict(small_shards, tmp_path, search=search, num_samples=2, overrides=micro(small_shards, epochs=1))
    table = tune.run_sweep(raw)
    [limiter] = tuner_spy
    assert type(limiter.searcher).__name__ == searcher and limiter.max_concurrent == 2
    assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}
    sweep = tune.parse_sweep(raw)
    assert sweep.seed == 42  # the base config's, by default
    assert tried(table) == [pytest.approx(config) for config in proposals(sweep, 2)]
    if search == "bohb":  # with its own HyperBand over the trials' epochs
        assert isinstance(tune.make_scheduler(sweep), ray_tune.schedulers.HyperBandForBOHB)


def test_loggers_write_an_mlflow_run_and_an_offline_wandb_run_per_trial(small_shards, tmp_path, local_ray,
                                                                         monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the sweep
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # never a network call
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    table = tune.run_sweep(sweep_dict(small_shards, tmp_path, num_samples=2, scheduler="none",
                                      loggers=["csv", "json", "mlflow", "wandb"]))
    trials = table.set_index("trial_id")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks it of a file store's readers
    client = MlflowClient(tracking_uri=(tmp_path / "s" / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("s").experiment_id])
    of_run = {run.info.run_id: [t for t in trials.index if run.data.tags["trial_name"].endswith(t)] for run in runs}
    assert sorted(sum(of_run.values(), [])) == sorted(trials.index)  # one run per trial
    for run in runs:
        [trial] = of_run[run.info.run_id]
        epochs = pd.read_csv(Path(trials.loc[trial, "run_dir"]).parent / tune.EPOCH_LOG)
        history = client.get_metric_history(run.info.run_id, "val_srcc")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(epochs["val_srcc"]))
        assert float(run.data.params["lr"]) == pytest.approx(trials.loc[trial, "lr"])
    offline = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert sorted(path.name.rsplit("-", 1)[1] for path in offline) == sorted(trials.index)
    assert not list((tmp_path / "s").glob("trial_*/events.out.tfevents*"))  # tensorboard was not asked


def frozen_and_diverging(small_shards: Path, tmp_path: Path, scheduler: dict, epochs: int, **extra) -> dict:
    """A grid of two trials on these random labels: lr 0 keeps the model as it starts (the val
    RMSE of the untrained model, about 64, every epoch); lr 0.01 diverges (RMSE in the
    thousands from epoch 1). Exact ranks for a scheduler, where trained SRCCs would be noise."""
    return sweep_dict(small_shards, tmp_path, search="grid", num_samples=1, metric="val_rmse", mode="min",
                      space={"lr": {"type": "uniform", "low": 0.0, "high": 0.01, "num": 2}}, scheduler=scheduler,
                      overrides=micro(small_shards, epochs=epochs, early_stopping=False), **extra)


def epoch_logs(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {row.trial_id: pd.read_csv(Path(row.run_dir).parent / tune.EPOCH_LOG) for row in table.itertuples()}


def test_asha_stops_the_diverging_trial_at_its_first_rung(small_shards, tmp_path, local_ray):
    """One trial at a time, the diverging one second: the rung at epoch 1 holds the frozen
    trial's RMSE and stops it; it would train to max_t (2 epochs) under FIFO."""
    table = tune.run_sweep(frozen_and_diverging(small_shards, tmp_path, epochs=2, max_concurrent=1,
                                                scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2}))
    logs = epoch_logs(table)
    frozen, diverging = (logs[t] for t in table.sort_values("lr")["trial_id"])
    assert list(frozen["epoch"]) == [1, 2]  # max_t: the trials' epochs
    assert list(diverging["epoch"]) == [1]  # stopped at the rung
    assert diverging["val_rmse"][0] > 10 * frozen["val_rmse"][0]


def test_pbt_clones_the_better_trial_into_the_worse_one(small_shards, tmp_path, local_ray):
    """Both trials wait for each other at epoch 2 (synch); the diverging one then takes the
    frozen one's epoch-2 checkpoint and its lr (0, perturbed: 0 x 0.8 or 1.2) and trains
    epoch 3 from there: its epoch 3 scores the frozen weights."""
    table = tune.run_sweep(frozen_and_diverging(small_shards, tmp_path, epochs=3, max_concurrent=2, scheduler={
        "type": "pbt", "perturbation_interval": 2, "synch": True, "resample_probability": 0.0}))
    logs = epoch_logs(table)
    policies = list((tmp_path / "s").glob("pbt_policy_*.txt"))  # PBT's record of each exploit
    assert len(policies) == 1
    exploited = policies[0].stem.removeprefix("pbt_policy_")
    [donor] = set(logs) - {exploited}
    [policy] = [json.loads(line) for line in policies[0].read_text().splitlines()]
    assert policy[4:] == [{"lr": 0.0}, {"lr": 0.0}]  # the donor's config, and the one it took
    assert list(logs[donor]["epoch"]) == list(logs[exploited]["epoch"]) == [1, 2, 3]
    frozen = logs[donor]["val_rmse"][0]
    assert list(logs[donor]["val_rmse"]) == pytest.approx([frozen] * 3)
    assert (logs[exploited]["val_rmse"][:2] > 10 * frozen).all()  # its own epochs 1 and 2
    assert logs[exploited]["val_rmse"][2] == pytest.approx(frozen)  # epoch 3 from the donor's weights
    assert table.set_index("trial_id").loc[exploited, "lr"] == 0.0  # the config it took


def test_wandb_without_a_key_or_offline_mode_is_one_line(small_shards, tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_SETUP_API_KEY_HOOK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from a `wandb login`
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))
    sweep = tune.parse_sweep(sweep_dict(small_shards, tmp_path, loggers=["wandb"]))
    with pytest.raises(ConfigError, match=r"^loggers: wandb: no W&B API key \(WANDB_API_KEY or `wandb login`\); "):
        tune.make_loggers(sweep)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert [type(c).__name__ for c in tune.make_loggers(sweep)] == ["WandbLoggerCallback"]
