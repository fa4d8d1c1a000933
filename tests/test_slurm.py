"""The real trainer and sweep through sbatch on the local one-node cluster (tests/cluster/start.sh)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster import slurm
from test_train import MACHINERY, REPO, accelerate_cmd, assert_identical, final_weights, run
from conftest import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = slurm.unavailable()
    if reason:
        pytest.skip(reason)


def test_train_sh_two_ranks_preempted_requeued_same_weights(small_shards, tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump(MACHINERY | {"dataset": str(small_shards)}))
    whole = tmp_path / "whole"
    out = run(accelerate_cmd(["--config", str(cfg), "--run_dir", str(whole)], port=free_port()))
    assert out.returncode == 0, out.stderr[-3000:]

    run_dir, log = tmp_path / "job", tmp_path / "job.out"
    env = {"IQA_CPU": "1", "GPUS_PER_NODE": "2", "IQA_LAUNCH_CONFIG": "launch/cpu_2proc.yaml",
           "IQA_RUN_DIR": str(run_dir), "IQA_CONFIG": str(cfg), "OMP_NUM_THREADS": "1"}
    job = slurm.submit(["-c", "2", "--mem=6G", "-o", str(log), "slurm/train.sh"], env=env, cwd=REPO)
    last = run_dir / "checkpoints" / "last" / "trainer.json"
    end = time.time() + 400
    while not (last.exists() and json.loads(last.read_text())["epoch"] >= 1):
        assert slurm.state(job)[0] not in slurm.FINAL and time.time() < end, slurm.output(log)
        time.sleep(0.2)
    slurm.signal_batch(job, "USR1")
    assert slurm.wait(job, timeout=600) == ("COMPLETED", 0), slurm.output(log)
    assert int(slurm.job_info(job).get("Restarts", "0")) == 1, slurm.output(log)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 3
    assert_identical(final_weights(run_dir), final_weights(whole))


def test_sweep_sh_runs_four_trials_and_writes_the_best_config(small_shards, tmp_path):
    from test_tune import sweep_dict

    from iqa_dist.config import load_yaml

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(small_shards, tmp_path / "sweeps")))
    log = tmp_path / "sweep.out"
    job = slurm.submit(["-c", "2", "--mem=6G", "-o", str(log), "slurm/sweep.sh"],
                       env={"IQA_SWEEP_CONFIG": str(sweep), "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert slurm.wait(job, timeout=900) == ("COMPLETED", 0), slurm.output(log)
    out = tmp_path / "sweeps" / "s"
    table = (out / "results.csv").read_text().splitlines()
    assert len(table) == 5 and table[1:] and all("TERMINATED" in row for row in table[1:])
    assert load_yaml(out / "best_config.yaml").model_size == "micro"
    assert not Path(f"/tmp/ray-{job}").exists()


def _trials_past_epoch(experiment: Path, epoch: int) -> list[Path]:
    """Trial folders whose epochs.csv has a row for ``epoch`` (header + one row per epoch)."""
    from iqa_dist.tune import EPOCH_LOG

    return [p.parent for p in experiment.glob(f"trial_*/{EPOCH_LOG}") if len(p.read_text().splitlines()) > epoch]


def test_sweep_sh_preempted_mid_trial_requeues_and_resumes_every_trial(small_shards, tmp_path):
    """USR1 (what `--signal=B:USR1@120` sends) while trials train: sweep.sh stops the sweep,
    requeues itself, and the requeued job resumes it. Every trial ends with all its epochs,
    and a trial stopped mid-run continues from its checkpoint instead of starting over."""
    from test_tune import micro, sweep_dict

    from iqa_dist.tune import EPOCH_LOG

    epochs, samples = 5, 3
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(small_shards, tmp_path / "sweeps", num_samples=samples,
                                               scheduler="none", overrides=micro(small_shards, epochs=epochs))))
    log, out = tmp_path / "sweep.out", tmp_path / "sweeps" / "s"
    job = slurm.submit(["-c", "2", "--mem=6G", "-o", str(log), "slurm/sweep.sh"],
                       env={"IQA_SWEEP_CONFIG": str(sweep), "OMP_NUM_THREADS": "1"}, cwd=REPO)
    # Epoch 2's row is written once the report of epoch 1 returned, and Tune lets a trial go
    # on only once it holds the checkpoint reported: the trial is mid-run with a checkpoint.
    end = time.time() + 600
    while not (started := _trials_past_epoch(out, 2)):
        assert slurm.state(job)[0] not in slurm.FINAL and time.time() < end, slurm.output(log)
        time.sleep(0.2)
    slurm.signal_batch(job, "USR1")
    assert slurm.wait(job, timeout=900) == ("COMPLETED", 0), slurm.output(log)
    text = slurm.output(log)
    assert int(slurm.job_info(job).get("Restarts", "0")) == 1 and "requeueing job" in text, text
    table = pd.read_csv(out / "results.csv")
    assert len(table) == samples and set(table["status"]) == {"TERMINATED"}, table
    assert (table["epochs_run"] == epochs).all() and (table["failures"] == 0).all(), table
    for trial in started:
        trained = list(pd.read_csv(trial / EPOCH_LOG)["epoch"])
        assert trained.count(1) == 1 and max(trained) == epochs, (trial, trained)  # not started over
        results = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        # Tune counts a trial's reports since its last restore: a resumed one's restart at 1
        assert any(r["iterations_since_restore"] < r["training_iteration"] for r in results), (trial, results)
