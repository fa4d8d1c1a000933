"""slurm/common.sh's sizing, run in bash with chosen variables: no cluster needed."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def bash(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``script`` after sourcing common.sh, with only ``env`` (and a PATH without nvidia-smi
    unless the test puts one in tmp_path/bin)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    path = f"{tmp_path / 'bin'}:/usr/bin:/bin"
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {REPO}/slurm/common.sh; {script}"],
                          env={"PATH": path, **env}, capture_output=True, text=True, cwd=tmp_path)


@pytest.mark.parametrize("env, gpus", [
    ({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}, "3"),  # the user's word first
    ({"SLURM_GPUS_ON_NODE": "4"}, "4"),  # --gres=gpu:4
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),  # --gpus-per-node=a100:8
    ({"SLURM_JOB_GPUS": "0,1,2"}, "3"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, "2"),
    ({"CUDA_VISIBLE_DEVICES": ""}, "0"),  # set and empty: no GPU may be used
    ({}, ""),  # nobody says: the caller decides
])
def test_gpus_per_node_come_from_the_allocation(tmp_path, env, gpus):
    done = bash("iqa_gpus_per_node", tmp_path, **env)
    assert (done.returncode, done.stdout.strip()) == (0, gpus), done.stderr


def test_gpus_per_node_asks_nvidia_smi_last(tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: a)'\necho 'GPU 1: NVIDIA H100 (UUID: b)'\n")
    smi.chmod(0o755)
    assert bash("iqa_gpus_per_node", tmp_path).stdout.strip() == "2"


def test_a_gpu_count_that_is_not_a_number_is_one_line(tmp_path):
    done = bash("iqa_gpus_per_node", tmp_path, GPUS_PER_NODE="four")
    assert done.returncode == 2 and done.stderr.strip().endswith(
        "error: GPUs per node: 'four' is not a number (set GPUS_PER_NODE)")


@pytest.mark.parametrize("cpus, warned", [("5", True), ("6", False)])
def test_too_few_cpus_for_ranks_and_loader_workers_warn(tmp_path, cpus, warned):
    done = bash("iqa_check_cpus 2 2", tmp_path, SLURM_CPUS_PER_TASK=cpus)
    assert done.returncode == 0
    line = (f"warning: {cpus} CPU(s) per node for 2 rank(s) x (1 + 2 loader workers) = 6: the loaders will "
            "starve the GPUs; submit with --cpus-per-task=6 or lower workers")
    assert (line in done.stderr) is warned and len(done.stderr.splitlines()) == int(warned)


def test_train_sh_without_a_gpu_count_stops_in_one_line(tmp_path):
    """No silent fallback to one rank per node: the job names what to give it."""
    (tmp_path / "slurm").symlink_to(REPO / "slurm")
    done = subprocess.run(["bash", str(REPO / "slurm/train.sh")], capture_output=True, text=True,
                          env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_ID": "7",
                               "SLURM_SUBMIT_DIR": str(tmp_path), "VENV": str(tmp_path / "none")})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(
        "error: no GPUs found for this job (submit with --gres=gpu:N or --gpus-per-node=N, or set "
        "GPUS_PER_NODE; with IQA_CPU=1 it is the number of CPU ranks per node)")
