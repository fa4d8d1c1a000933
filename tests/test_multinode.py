"""Training, sweeping, packing and evaluating across the nodes of a real multi-node SLURM
cluster (tests/cluster/start.sh 2: one slurmctld, each slurmd in its own network and UTS
namespace on a bridge), with a node lost.

A lost node is its processes killed (SIGKILL), found only among the processes of that
node's network namespace: nothing outside the test cluster is ever signalled.
Skipped, with the reason, without root or without the cluster.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster import slurm
from conftest import free_port
from test_train import MACHINERY, REPO, accelerate_cmd, assert_identical, final_weights, run

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.multinode]
MN = slurm.MULTINODE
NODES = ("iqa-node1", "iqa-node2")
# One CPU rank on each node (gloo over the bridge); 1 CPU per node, so that two jobs fit.
TRAIN_ENV = {"IQA_CPU": "1", "GPUS_PER_NODE": "1", "IQA_LAUNCH_CONFIG": "launch/cpu_2proc.yaml",
             "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "-c", "1", "--mem=3G"]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if os.geteuid() != 0:
        pytest.skip("multi-node tests need root (network namespaces, nsenter): "
                    "run tests/cluster/start.sh 2 and pytest as root")
    reason = MN.unavailable(nodes=2)
    if reason:
        pytest.skip(reason)


# ------------------------------------------------------------------ helpers


def node_pids(node: str, *needles: str) -> list[int]:
    """Processes in ``node``'s network namespace whose command line contains every needle."""
    out = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=30).stdout
    found = []
    for pid in (int(p) for p in out.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in cmd for n in needles):
            found.append(pid)
    return found


def kill_in_node(node: str, pids: list[int]) -> None:
    """SIGKILL, checking again that each process is in ``node``'s namespace."""
    netns = os.stat(f"/run/netns/{node}").st_ino
    for pid in pids:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == netns:
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def finish(job: int, log: Path, timeout: float) -> tuple[str, int | None]:
    try:
        return MN.wait(job, timeout=timeout)
    except TimeoutError:
        MN.cancel(job)
        pytest.fail(f"job {job} did not finish in {timeout}s; log:\n{slurm.output(log)}")


def wait_until(predicate, job: int, log: Path, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        st = MN.state(job)[0]
        if st in slurm.FINAL:
            pytest.fail(f"job {job} ended ({st}) before {what}:\n{slurm.output(log)}")
        if time.monotonic() > end:
            MN.cancel(job)
            pytest.fail(f"no {what} after {timeout}s:\n{slurm.output(log)}")
        time.sleep(0.2)


def epochs_done(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last" / "trainer.json"
    try:
        return json.loads(last.read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def ranks_on_nodes(text: str) -> dict[int, str]:
    """``rank R/W on HOST`` lines of the trainer: rank -> host."""
    found = {}
    for line in text.splitlines():
        if line.startswith("rank ") and " on " in line:
            head, _, rest = line.partition(" on ")
            found[int(head.split()[1].split("/")[0])] = rest.split()[0]
    return found


@pytest.fixture(scope="module")
def train_config(small_shards, tmp_path_factory) -> Path:
    cfg = tmp_path_factory.mktemp("mn-config") / "train.yaml"
    cfg.write_text(yaml.safe_dump(MACHINERY | {"dataset": str(small_shards), "dist_timeout_s": 30}))
    return cfg


@pytest.fixture(scope="module")
def one_node_two_ranks(train_config, tmp_path_factory) -> Path:
    """The reference: 2 ranks on one node (this machine), the same config and global batch."""
    run_dir = tmp_path_factory.mktemp("mn-reference") / "run"
    out = run(accelerate_cmd(["--config", str(train_config), "--run_dir", str(run_dir)], port=free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def submit_train(train_config: Path, run_dir: Path, log: Path) -> int:
    env = TRAIN_ENV | {"IQA_RUN_DIR": str(run_dir), "IQA_CONFIG": str(train_config)}
    return MN.submit([*TWO_NODES, "-o", str(log), "slurm/train.sh"], env=env, cwd=REPO)


def ends_as_one_node(job: int, log: Path, run_dir: Path, reference: Path) -> str:
    """The job completed the 3 epochs of 2 ranks with the weights of the one-node run; its output."""
    assert finish(job, log, 400) == ("COMPLETED", 0), slurm.output(log)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 3
    assert_identical(final_weights(run_dir), final_weights(reference))
    return slurm.output(log)


# ------------------------------------------------------------------ 1, 2: DDP over nodes, preemption


def test_ddp_over_two_nodes_equals_two_ranks_on_one(train_config, one_node_two_ranks, tmp_path):
    run_dir, log = tmp_path / "job", tmp_path / "job.out"
    job = submit_train(train_config, run_dir, log)
    text = ends_as_one_node(job, log, run_dir, one_node_two_ranks)
    assert ranks_on_nodes(text) == {0: NODES[0], 1: NODES[1]}, text


def test_preemption_across_nodes_requeues_and_ends_with_the_same_weights(train_config, one_node_two_ranks,
                                                                         tmp_path):
    run_dir, log = tmp_path / "job", tmp_path / "job.out"
    job = submit_train(train_config, run_dir, log)
    wait_until(lambda: epochs_done(run_dir) >= 1, job, log, 300, "checkpoint of epoch 1")
    MN.signal_batch(job, "USR1")
    text = ends_as_one_node(job, log, run_dir, one_node_two_ranks)
    assert int(MN.job_info(job).get("Restarts", "0")) == 1, text
    assert "requeueing" in text and "resumed from" in text, text
    # both nodes saved and left with the preemption code before the requeue
    for rank, node in enumerate(NODES):
        assert f"rank {rank} on {node}: checkpoint saved, exit 99" in text, text
    assert set(ranks_on_nodes(text).values()) == set(NODES), text


# ------------------------------------------------------------------ 5: a node lost mid-training


def test_node_lost_mid_training_survivor_names_it_and_resume_continues(train_config, one_node_two_ranks,
                                                                        tmp_path):
    run_dir, log = tmp_path / "job", tmp_path / "job.out"
    job = submit_train(train_config, run_dir, log)
    wait_until(lambda: epochs_done(run_dir) >= 1, job, log, 300, "checkpoint of epoch 1")
    ranks = node_pids(NODES[1], "-m iqa_dist.train", str(run_dir))
    ranks = [p for p in ranks if "accelerate" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
    assert ranks, f"no rank found on {NODES[1]}:\n{slurm.output(log)}"
    killed = time.monotonic()
    kill_in_node(NODES[1], ranks)
    state, _ = finish(job, log, 120)
    took = time.monotonic() - killed
    text = slurm.output(log)
    assert state == "FAILED", text
    assert took < 30 + 45, f"the job took {took:.0f}s to end after the kill:\n{text}"  # dist_timeout_s 30
    assert f"lost rank 1 on {NODES[1]}" in text and "rank 0 on iqa-node1 stops" in text, text
    done_before = epochs_done(run_dir)
    assert done_before >= 1

    # resubmitted with the same run directory: train.sh passes --resume latest
    log2 = tmp_path / "job2.out"
    job2 = submit_train(train_config, run_dir, log2)
    assert finish(job2, log2, 400) == ("COMPLETED", 0), slurm.output(log2)
    text2 = slurm.output(log2)
    assert f"at epoch {done_before + 1}" in text2 and "resumed from" in text2, text2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == 3
    # resumed exactly from an epoch boundary: the same weights as never interrupted
    assert_identical(final_weights(run_dir), final_weights(one_node_two_ranks))


# ------------------------------------------------------------------ 6: packing and evaluation across nodes

EVALUATE_SH = """#!/bin/bash
#SBATCH --ntasks-per-node=1
set -euo pipefail
cd "$SLURM_SUBMIT_DIR"
source slurm/common.sh
iqa_setup
HEAD=$(iqa_head_node)
# One accelerate launch per node, as slurm/train.sh does; every node its own machine rank.
srun --nodes=2 --ntasks=2 --ntasks-per-node=1 bash -c \\
    'exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' launch \\
    --config_file launch/cpu_2proc.yaml --num_machines 2 --num_processes 2 \\
    --main_process_ip "$HEAD" --main_process_port "$(iqa_port)" \\
    -m iqa_dist.evaluate --checkpoint "$CHECKPOINT" --shards "$SHARDS" --out "$OUT" --workers 1
"""


def test_pack_array_spreads_over_nodes_and_evaluation_scores_each_image_once(one_node_two_ranks, tmp_path):
    from conftest import make_csv_set

    src = make_csv_set(tmp_path / "src", n_refs=4, per_ref=3)
    shards = tmp_path / "packed"
    # -c 2: one array task fills a node, so the two tasks run on the two nodes at once
    env = {**os.environ, "SLURM_CONF": slurm.MULTINODE_CONF, "DATASET": "csv", "ROOT": str(src),
           "OUT": str(shards), "PACK_ARGS": "--shard_size 3 --rounds 1", "PACK_SLICES": "2",
           "PACK_SBATCH": " ".join([*slurm.CPU_OVERRIDES, "-c", "2", "-o", f"{tmp_path}/%x-%A_%a.out"])}
    proc = subprocess.run([*MN.prefix, "bash", "slurm/pack.sh"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    array_job, merge_job = (int(x) for x in proc.stdout.split())
    state = finish(merge_job, tmp_path / "iqa-pack-merge.out", 240)
    logs = {p.name: slurm.output(p) for p in sorted(tmp_path.glob("*.out"))}
    everything = "\n".join(f"== {k}\n{v}" for k, v in logs.items())
    assert state == ("COMPLETED", 0) and MN.state(array_job)[0] == "COMPLETED", everything
    assert "verify: OK" in everything, everything
    slices = [v for k, v in logs.items() if k.startswith("iqa-pack-") and "merge" not in k]
    hosts = {v.split(": on ", 1)[1].split(",")[0] for v in slices}
    assert len(slices) == 2 and hosts == set(NODES), everything
    assert len(list(shards.glob("*.tar"))) == 4 and (shards / "manifest.parquet").exists()

    script, out, log = tmp_path / "evaluate.sh", tmp_path / "evaluation", tmp_path / "evaluate.out"
    script.write_text(EVALUATE_SH)
    env = TRAIN_ENV | {"CHECKPOINT": str(one_node_two_ranks), "SHARDS": str(shards), "OUT": str(out)}
    job = MN.submit([*TWO_NODES, "-o", str(log), str(script)], env=env, cwd=REPO)
    assert finish(job, log, 300) == ("COMPLETED", 0), slurm.output(log)
    import pyarrow.parquet as pq

    row = pq.read_table(out / "results.parquet").to_pylist()[0]
    per_rank = [int(n) for n in row["per_rank"].split("/")]
    assert len(per_rank) == 2 and min(per_rank) > 0, row  # both nodes scored images
    assert sum(per_rank) == int(row["scored"]) == int(row["images"]) == 12, row  # none twice, none left out
    keys = [r["key"] for r in pq.read_table(out / "predictions.parquet").to_pylist()]
    assert len(keys) == len(set(keys)) == 12


# ------------------------------------------------------------------ 3, 4: a sweep over nodes, a node lost


def not_slurm(node: str) -> list[int]:
    """Every process of ``node`` but its slurmd and step daemons: the Ray worker step's
    processes (ray start, raylet, trial workers) when only a sweep runs there."""
    out = []
    for pid in node_pids(node):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm not in ("slurmd", "slurmstepd"):
            out.append(pid)
    return out


def trial_rows(exp: Path) -> dict[str, list[dict]]:
    import csv

    rows = {}
    for log in exp.glob("trial_*/epochs.csv"):
        try:
            with open(log) as f:
                rows[log.parent.name] = list(csv.DictReader(f))
        except OSError:
            continue
    return rows


def reported(trial_dir: Path) -> bool:
    try:
        return bool((trial_dir / "result.json").read_text().strip())
    except OSError:
        return False


@pytest.fixture(scope="module")
def sweep_with_a_lost_node(small_shards, tmp_path_factory):
    """slurm/sweep.sh on 2 nodes (Ray head on node 1, a worker on node 2, 2 CPUs each,
    trials of 2 CPUs: one per node at a time), ASHA over 4 trials of 3 epochs; once a
    trial on node 2 has reported its first epoch, node 2's Ray processes are killed."""
    from test_tune import micro, sweep_dict

    tmp = tmp_path_factory.mktemp("mn-sweep")
    sweep = tmp / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(sweep_dict(
        small_shards, tmp / "sweeps", num_samples=4, max_concurrent=2, resources_per_trial={"cpu": 2},
        max_failures=2, overrides=micro(small_shards, epochs=3),
        # no rung at epoch 1: a trial that reported epoch 1 is still training when node 2 goes
        scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2})))
    exp, log = tmp / "sweeps" / "s", tmp / "sweep.out"
    env = {"IQA_SWEEP_CONFIG": str(sweep), "OMP_NUM_THREADS": "1", "RAY_START_TIMEOUT": "120"}
    job = MN.submit(["--nodes=2", "--ntasks-per-node=1", "-c", "2", "--mem=4G", "-o", str(log),
                     "slurm/sweep.sh"], env=env, cwd=REPO)
    start = time.monotonic()

    def node2_trial_reported() -> bool:
        # epochs.csv is written before the report: wait for Tune's result.json too, which
        # the driver writes once it holds the epoch's checkpoint, or a kill in between
        # would rightly restart the trial from scratch
        return any(rows and rows[-1]["node"] == NODES[1] and reported(exp / trial)
                   for trial, rows in trial_rows(exp).items())

    wait_until(node2_trial_reported, job, log, 300, "a trial reporting from node 2")
    victims = [t for t, rows in trial_rows(exp).items() if rows and rows[-1]["node"] == NODES[1]]
    pids = not_slurm(NODES[1])
    assert pids, slurm.output(log)
    killed = time.monotonic()
    kill_in_node(NODES[1], pids)
    state = finish(job, log, 420)
    ended = time.monotonic()
    return {"job": job, "log": log, "exp": exp, "state": state, "victims": victims,
            "kill_after_s": killed - start, "end_after_kill_s": ended - killed, "sweep": sweep}


def test_sweep_over_two_nodes_runs_trials_on_both(sweep_with_a_lost_node, tmp_path):
    import pandas as pd

    from iqa_dist.config import load_yaml

    s = sweep_with_a_lost_node
    text = slurm.output(s["log"])
    assert s["state"] == ("COMPLETED", 0), text
    assert "Ray cluster up: 2 node(s)" in text, text
    table = pd.read_csv(s["exp"] / "results.csv")
    assert len(table) == 4 and set(table["status"]) == {"TERMINATED"}, table.to_string()
    used = {n for cell in table["node"].dropna() for n in cell.split(",")}
    assert used == set(NODES), table.to_string()
    # ASHA finished: every trial ended, at its rung (epoch 2) or at max_t (3)
    assert table["epochs_run"].isin([2, 3]).all() and (table["epochs_run"] == 3).any(), table.to_string()
    best = s["exp"] / "best_config.yaml"
    assert load_yaml(best).model_size == "micro"
    run_dir = tmp_path / "best"
    out = run([sys.executable, "-m", "iqa_dist.train", "--config", str(best), "--run_dir", str(run_dir),
               "--epochs", "1"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 1


def test_node_lost_mid_sweep_trials_retried_from_checkpoint_on_node_1(sweep_with_a_lost_node):
    import pandas as pd

    s = sweep_with_a_lost_node
    text = slurm.output(s["log"])
    assert s["state"] == ("COMPLETED", 0), text
    assert s["end_after_kill_s"] < 400, s
    table = pd.read_csv(s["exp"] / "results.csv").set_index("trial_id")
    victims = [v.removeprefix("trial_") for v in s["victims"]]
    assert victims and set(table.index[table["retried"]]) == set(victims), table.to_string()
    for trial in victims:
        row = table.loc[trial]
        assert row["failures"] >= 1 and row["status"] == "TERMINATED", table.to_string()
        assert row["node"] == f"{NODES[1]},{NODES[0]}", table.to_string()
        epochs = [int(r["epoch"]) for r in trial_rows(s["exp"])[f"trial_{trial}"]]
        # continued from its checkpoint (epoch 1 on node 2), never from scratch
        assert epochs[0] == 1 and epochs.count(1) == 1 and epochs == sorted(epochs), epochs
    # the others were never retried
    assert not table.drop(index=victims)["retried"].any(), table.to_string()
