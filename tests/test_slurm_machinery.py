"""The SLURM scripts' machinery on the local one-node cluster (tests/cluster/start.sh).

Stand-ins replace the trainer and the sweep driver: these tests prove job submission,
the --gres override, the USR1 -> checkpoint -> exit 99 -> requeue -> resume chain (directly
under srun, and through slurm/train.sh's `accelerate launch` with two ranks), a Ray head
inside a job (slurm/sweep.sh) that leaves nothing behind, and slurm/pack.sh's array job
plus dependent merge. Skipped when there is no cluster.
"""
from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from cluster import slurm
from conftest import make_csv_set

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = slurm.unavailable()
    if reason:
        pytest.skip(reason)


def _finish(job: int, log: Path, timeout: float = 240) -> tuple[str, int | None]:
    try:
        return slurm.wait(job, timeout=timeout)
    except TimeoutError:
        slurm.cancel(job)
        pytest.fail(f"job {job} did not finish in {timeout}s; log:\n{slurm.output(log)}")


def _restarts(job: int) -> int:
    return int((slurm.job_info(job) or {}).get("Restarts", "0"))


def _pids_matching(text: str) -> list[str]:
    """Processes whose command line contains ``text`` (not this test's own)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [ln.strip() for ln in out.splitlines() if text in ln and "pytest" not in ln]


# --------------------------------------------------------------------- submission


def test_trivial_job_with_srun(tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nset -e\nsrun hostname\necho done-$SLURM_JOB_ID\n")
    log = tmp_path / "hello.out"
    job = slurm.submit(["-o", str(log), str(script)], cwd=REPO)
    assert _finish(job, log, 60) == ("COMPLETED", 0), slurm.output(log)
    text = slurm.output(log)
    assert os.uname().nodename.split(".")[0] in text and f"done-{job}" in text


def test_failed_job_reports_its_exit_code(tmp_path):
    script = tmp_path / "fail.sh"
    script.write_text("#!/bin/bash\nexit 3\n")
    job = slurm.submit(["-o", str(tmp_path / "fail.out"), str(script)])
    assert _finish(job, tmp_path / "fail.out", 60) == ("FAILED", 3)


def test_gpu_cluster_options_are_overridden(tmp_path):
    """`#SBATCH --gres=gpu:4 -p gpu --mem=0` is refused here; CPU_OVERRIDES replace them."""
    script = tmp_path / "gpu.sh"
    script.write_text("#!/bin/bash\n#SBATCH --gres=gpu:4\n#SBATCH -p gpu\n#SBATCH --mem=0\n"
                      "#SBATCH --cpus-per-task=32\necho cpus=$SLURM_CPUS_ON_NODE\n")
    log = tmp_path / "gpu.out"
    with pytest.raises(slurm.SlurmError):
        slurm.submit(["-o", str(log), str(script)], cpu=False)
    # The caller's options come after the overrides and win over them.
    job = slurm.submit(["-c", "2", "-o", str(log), str(script)])
    assert _finish(job, log, 60) == ("COMPLETED", 0)
    assert "cpus=2" in slurm.output(log)


# --------------------------------------------------------------------- preemption

STANDIN_TRAIN = textwrap.dedent('''
    """Stand-in for iqa_dist.train: on SIGUSR1/SIGTERM 'checkpoints' and exits 99."""
    import argparse, os, signal, sys, time
    from pathlib import Path

    p = argparse.ArgumentParser()
    for a in ("--config", "--run_dir", "--resume"):
        p.add_argument(a)
    args, _ = p.parse_known_args()
    got = []
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, lambda n, f: got.append(n))
    world = rank = 0
    if "RANK" in os.environ:  # under accelerate launch: join the process group (gloo)
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    run = Path(args.run_dir)
    last = run / "checkpoints" / "last"
    print(f"standin rank {rank} world {world} resume={args.resume} "
          f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
    if last.exists():
        print(f"standin rank {rank}: resumed from {last}", flush=True)
        sys.exit(0)
    (run / "ready").mkdir(parents=True, exist_ok=True)
    (run / "ready" / str(rank)).touch()
    end = time.time() + 180
    while time.time() < end and not got:
        time.sleep(0.1)
    if not got:
        sys.exit(0)
    print(f"standin rank {rank}: signal {got[0]}, saving", flush=True)
    time.sleep(1)
    last.mkdir(parents=True, exist_ok=True)
    if os.environ.get("STANDIN_MARKERS", "1") == "1":
        (run / "preempted").mkdir(exist_ok=True)
        (run / "preempted" / f"rank-{rank}.json").write_text("{}")
    print(f"standin rank {rank}: exit 99", flush=True)
    sys.exit(99)
''')


def _wait_ready(run_dir: Path, ranks: int, job: int, log: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(list((run_dir / "ready").glob("*"))) >= ranks:
            return
        state, _ = slurm.state(job)
        if state in slurm.FINAL:
            pytest.fail(f"job {job} ended ({state}) before its ranks were ready:\n{slurm.output(log)}")
        time.sleep(0.5)
    slurm.cancel(job)
    pytest.fail(f"ranks of job {job} not ready after {timeout}s:\n{slurm.output(log)}")


def _preemptible_standin(tmp_path: Path, sbatch: str, resume: str, env: dict | None = None) -> tuple[int, Path]:
    """Submit a batch script that runs the stand-in training step through common.sh's
    iqa_run_preemptible with a plain `srun python` step; (job, log) once it is ready."""
    (tmp_path / "standin_train.py").write_text(STANDIN_TRAIN)
    run_dir, script, log = tmp_path / "run", tmp_path / "job.sh", tmp_path / "job.out"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        {sbatch}
        set -euo pipefail
        cd "$SLURM_SUBMIT_DIR"
        source slurm/common.sh
        iqa_setup
        iqa_run_preemptible {run_dir} srun --ntasks=1 python {tmp_path}/standin_train.py \\
            --run_dir {run_dir} {resume}
        """))
    job = slurm.submit(["-o", str(log), str(script)], env=env, cwd=REPO)
    _wait_ready(run_dir, 1, job, log)
    return job, log


def test_usr1_is_forwarded_and_exit_99_requeues(tmp_path):
    """Exit code 99 without marker files: the batch shell's USR1 trap forwards to srun,
    the job requeues itself, and the second run resumes."""
    job, log = _preemptible_standin(tmp_path, "#SBATCH --requeue --open-mode=append", "--resume latest",
                                    env={"STANDIN_MARKERS": "0"})
    slurm.signal_batch(job, "USR1")
    assert _finish(job, log) == ("COMPLETED", 0), slurm.output(log)
    text = slurm.output(log)
    assert "forwarding SIGUSR1" in text and "step exited with code 99" in text, text
    assert "requeueing" in text and "resumed from" in text, text
    assert _restarts(job) == 1
    assert not _pids_matching(str(tmp_path / "standin_train.py"))


def test_scancel_lets_the_step_save_but_does_not_requeue(tmp_path):
    """SIGTERM from scancel reaches the step (which saves and exits 99); the batch shell
    waits for it and must not requeue: `scontrol requeue` would succeed on a cancelled job."""
    job, log = _preemptible_standin(tmp_path, "#SBATCH --requeue", "")
    slurm.cancel(job)
    state, _ = _finish(job, log, 60)
    time.sleep(3)  # the batch shell logs its decision during KillWait
    text = slurm.output(log)
    assert state == "CANCELLED" and _restarts(job) == 0, text
    assert "standin rank 0: exit 99" in text and "not requeueing" in text, text


@pytest.mark.slow
def test_train_sh_preempted_through_accelerate_requeues_and_resumes(tmp_path):
    """slurm/train.sh itself, 2 CPU ranks under accelerate launch: USR1 reaches both ranks
    through srun and the torch-elastic agent (PET_SIGNALS_TO_HANDLE), the agent exits 1,
    the ranks' preempted/ markers make the script requeue, and the rerun resumes."""
    (tmp_path / "standin_train.py").write_text(STANDIN_TRAIN)
    run_dir = tmp_path / "run"
    log = tmp_path / "train.out"
    env = {"IQA_TRAIN_MODULE": "standin_train", "PYTHONPATH": str(tmp_path), "IQA_CPU": "1",
           "GPUS_PER_NODE": "2", "IQA_LAUNCH_CONFIG": "launch/cpu_2proc.yaml",
           "IQA_RUN_DIR": str(run_dir), "IQA_CONFIG": "configs/demo.yaml", "OMP_NUM_THREADS": "1"}
    job = slurm.submit(["-c", "2", "--mem=3G", "-o", str(log), "slurm/train.sh"], env=env, cwd=REPO)
    _wait_ready(run_dir, 2, job, log)
    slurm.signal_batch(job, "USR1")
    assert _finish(job, log, 300) == ("COMPLETED", 0), slurm.output(log)
    text = slurm.output(log)
    assert text.count("standin rank") >= 4 and "world 2" in text, text
    for rank in (0, 1):
        assert f"standin rank {rank}: exit 99" in text and f"standin rank {rank}: resumed" in text, text
    assert "requeueing" in text and "restart=1" in text, text
    assert _restarts(job) == 1
    assert not (run_dir / "preempted").exists() or not any((run_dir / "preempted").iterdir())
    assert not _pids_matching("standin_train")


# --------------------------------------------------------------------- Ray

STANDIN_TUNE = textwrap.dedent('''
    """Stand-in for iqa_dist.tune: connects to the job's Ray cluster and runs one task."""
    import argparse, os
    import ray

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("--address")
    args, rest = p.parse_known_args()
    ray.init(address=args.address)
    cpus = ray.cluster_resources().get("CPU")

    @ray.remote(num_cpus=1)
    def pid():
        return os.getpid()

    print(f"standin-tune: address={args.address} cpus={cpus} nodes={len(ray.nodes())} "
          f"task_pid={ray.get(pid.remote())} rest={rest}", flush=True)
    ray.shutdown()
''')


@pytest.mark.slow
def test_sweep_sh_starts_ray_in_the_job_and_leaves_nothing(tmp_path):
    (tmp_path / "standin_tune.py").write_text(STANDIN_TUNE)
    log = tmp_path / "sweep.out"
    env = {"IQA_TUNE_MODULE": "standin_tune", "PYTHONPATH": str(tmp_path),
           "IQA_SWEEP_CONFIG": "configs/none.yaml", "IQA_ARGS": "--num_samples 1"}
    job = slurm.submit(["-c", "2", "--mem=3G", "-o", str(log), "slurm/sweep.sh"], env=env, cwd=REPO)
    assert _finish(job, log, 300) == ("COMPLETED", 0), slurm.output(log)
    text = slurm.output(log)
    assert "Ray cluster up: 1 node(s)" in text, text
    assert "standin-tune: address=" in text and "cpus=2.0 nodes=1" in text, text
    assert "rest=['--num_samples', '1']" in text, text
    ray_tmp = f"/tmp/ray-{job}"
    assert not Path(ray_tmp).exists()
    assert not _pids_matching(ray_tmp), _pids_matching(ray_tmp)


# --------------------------------------------------------------------- packing


def test_pack_sh_array_then_merge(tmp_path):
    src = make_csv_set(tmp_path / "src", n_refs=4, per_ref=2)
    out = tmp_path / "out"
    env = {**os.environ, "DATASET": "csv", "ROOT": str(src), "OUT": str(out),
           "PACK_ARGS": "--shard_size 2 --rounds 1", "PACK_SLICES": "3",
           "PACK_SBATCH": " ".join([*slurm.CPU_OVERRIDES, "-o", f"{tmp_path}/%x-%A_%a.out"])}
    proc = subprocess.run(["bash", "slurm/pack.sh"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    array_job, merge_job = (int(x) for x in proc.stdout.split())
    state = _finish(merge_job, tmp_path / "iqa-pack-merge.out", 240)
    logs = "\n".join(f"== {p.name}\n{slurm.output(p)}" for p in sorted(tmp_path.glob("*.out")))
    assert state == ("COMPLETED", 0), logs
    assert slurm.state(array_job)[0] == "COMPLETED", logs
    assert "verify: OK" in logs, logs
    assert len(list(out.glob("*.tar"))) == 4 and (out / "manifest.parquet").exists()
