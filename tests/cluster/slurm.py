"""Submit jobs to the local test cluster (tests/cluster/start.sh) and wait for them.

    from cluster import slurm               # tests/ is on sys.path under pytest
    reason = slurm.unavailable()            # None when the cluster is up
    job = slurm.submit(["-c", "1", "slurm/train.sh"], env={"IQA_CPU": "1"})
    state, code = slurm.wait(job, timeout=120)   # ("COMPLETED", 0)
    mn = slurm.MULTINODE                    # the N-node cluster (tests/cluster/start.sh 2)
    mn.unavailable(nodes=2); job = mn.submit(["--nodes=2", ...]); mn.wait(job)

No slurmdbd here, so no ``sacct``: states and exit codes come from ``scontrol -o show
job`` (kept for MinJobAge seconds after the end) and, once a job is gone from there, from
the jobcomp/filetxt log. ``sbatch --wait`` polls at 2, 10, 42 s...: we poll ourselves.

A one-node CPU cluster rejects what GPU-cluster scripts carry (``#SBATCH --gres=gpu:4``,
``-p gpu``, ``--cpus-per-task=32``, ``--mem=0`` takes the whole node): ``submit`` puts
CPU_OVERRIDES before the caller's options; options given later on the command line win
over earlier ones, and any command-line option wins over ``#SBATCH`` lines. On Slurm 22.05,
``--gres=none``, ``--gres=`` and ``--gres=gpu:0`` all override an ``#SBATCH --gres=gpu:4``
line, and so does ``SBATCH_GRES=none`` in the environment, but not an empty ``SBATCH_GRES=``
(an empty variable is ignored).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

PARTITION = "debug"
CPU_OVERRIDES: tuple[str, ...] = (f"--partition={PARTITION}", "--gres=none", "--cpus-per-task=1", "--mem=1G")
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
# States after which a job will not run again (a requeued job passes through REQUEUED,
# REQUEUE_HOLD, PENDING: not final).
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"}


class SlurmError(RuntimeError):
    pass


class Cluster:
    """One test cluster: its clients' command prefix, config, partition and jobcomp log.

    ``LOCAL`` is the one-node cluster (clients run here); ``MULTINODE`` the N-node cluster
    of tests/cluster/multinode.sh, whose clients run in the controller's network namespace
    (tests/cluster/mn). The module-level functions act on ``LOCAL``.
    """

    def __init__(self, name: str, prefix: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 jobcomp_log: Path = JOBCOMP_LOG, partition: str = PARTITION) -> None:
        self.name, self.prefix, self.env = name, tuple(prefix), dict(env or {})
        self.jobcomp_log, self.partition = jobcomp_log, partition

    def _run(self, cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        full_env = {**(env if env is not None else os.environ), **self.env}
        proc = subprocess.run([*self.prefix, *cmd], env=full_env, cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def unavailable(self, nodes: int = 1) -> str | None:
        """Why the cluster cannot be used (for pytest.skip), or None when it is up with at
        least ``nodes`` usable nodes."""
        if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
            return "SLURM is not installed (sinfo/sbatch not found): run tests/cluster/start.sh as root"
        if self.prefix and os.geteuid() != 0:
            return f"the {self.name} cluster's clients run in a network namespace (nsenter): needs root"
        netns = next((a.split("=", 1)[1] for a in self.prefix if a.startswith("--net=")), None)
        if netns and not Path(netns).exists():
            return f"the {self.name} cluster is not up ({netns} missing): {self.start_hint(nodes)}"
        try:
            ping = self._run(["scontrol", "ping"], check=False)
            if "UP" not in ping.stdout:
                return f"the {self.name} cluster's slurmctld is not running: {self.start_hint(nodes)}"
            states = self._run(["sinfo", "-h", "-N", "-p", self.partition, "-o", "%T"], check=False).stdout.split()
        except (subprocess.TimeoutExpired, OSError) as err:
            return f"SLURM does not answer: {err}"
        usable = [s for s in states if s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing")]
        if len(usable) < nodes:
            return (f"{len(usable)} usable node(s) in partition {self.partition!r} of the {self.name} cluster "
                    f"(states {states}), {nodes} needed: {self.start_hint(nodes)}")
        return None

    @staticmethod
    def start_hint(nodes: int) -> str:
        return f"run tests/cluster/start.sh{f' {nodes}' if nodes > 1 else ''} as root"

    def submit(self, args: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
               cpu: bool = True) -> int:
        """``sbatch --parsable [CPU_OVERRIDES] *args``; returns the job id.

        ``env`` is added to this process's environment (sbatch exports it all to the job,
        --export=ALL). With ``cpu=False`` no overrides are added.
        """
        full_env = {**os.environ, **(env or {})}
        cmd = ["sbatch", "--parsable", *(CPU_OVERRIDES if cpu else ()), *args]
        out = self._run(cmd, env=full_env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job_info(self, job_id: int | str) -> dict[str, str] | None:
        """The job's ``scontrol -o show job`` record (last array element if several), or the
        jobcomp log's record once scontrol has forgotten it, or None."""
        proc = self._run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JobId=")]
        if proc.returncode == 0 and lines:
            return parse_record(lines[-1])
        if self.jobcomp_log.exists():
            found = None
            for ln in self.jobcomp_log.read_text().splitlines():
                if ln.startswith(f"JobId={job_id} "):
                    found = parse_record(ln.strip())
            return found
        return None

    def state(self, job_id: int | str) -> tuple[str, int | None]:
        info = self.job_info(job_id)
        if info is None:
            return "UNKNOWN", None
        return info.get("JobState", "UNKNOWN"), exit_code(info)

    def wait(self, job_id: int | str, timeout: float = 120, poll: float = 0.2) -> tuple[str, int | None]:
        """Wait until the job is in a final state; returns (state, exit code).

        Raises TimeoutError (with the last state) after ``timeout`` seconds; the job is left
        as it is (cancel it yourself).
        """
        end = time.monotonic() + timeout
        st, code = "UNKNOWN", None
        while time.monotonic() < end:
            st, code = self.state(job_id)
            if st in FINAL:
                return st, code
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {st} after {timeout}s")

    def wait_state(self, job_id: int | str, states: set[str] | str = "RUNNING", timeout: float = 60,
                   poll: float = 0.2) -> dict[str, str]:
        """Wait until the job is in one of ``states`` (e.g. RUNNING); returns its record.
        Raises SlurmError if it ends first, TimeoutError after ``timeout`` seconds."""
        wanted = {states} if isinstance(states, str) else set(states)
        end = time.monotonic() + timeout
        info: dict[str, str] | None = None
        while time.monotonic() < end:
            info = self.job_info(job_id)
            st = info.get("JobState") if info else None
            if st in wanted:
                return info
            if st in FINAL:
                raise SlurmError(f"job {job_id} ended ({st}, exit {exit_code(info)}) before reaching {wanted}")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {wanted} after {timeout}s (last: {info and info.get('JobState')})")

    def signal_batch(self, job_id: int | str, sig: str = "USR1") -> None:
        """Deliver ``sig`` now to the batch shell only (what ``--signal=B:USR1@N`` does later)."""
        self._run(["scancel", f"--signal={sig}", "--batch", str(job_id)])

    def cancel(self, job_id: int | str) -> None:
        self._run(["scancel", str(job_id)], check=False)


def parse_record(line: str) -> dict[str, str]:
    """``Key=Value Key=Value ...`` (one line of ``scontrol -o`` or of the jobcomp log).

    Values may contain spaces only in fields we do not read (Command=, WorkDir= with
    spaces): a token without '=' is appended to the previous value.
    """
    info: dict[str, str] = {}
    key = None
    for tok in line.split(" "):
        k, sep, v = tok.partition("=")
        if sep and k and (k[0].isupper() or k.startswith("Tres")):
            key = k
            info[k] = v
        elif key is not None:
            info[key] += " " + tok
    return info


def exit_code(info: Mapping[str, str]) -> int | None:
    """``ExitCode=rc:signal`` as one number: rc, or 128+signal when killed by a signal."""
    raw = info.get("ExitCode")
    if not raw:
        return None
    rc, _, sig = raw.partition(":")
    return 128 + int(sig) if sig and int(sig) else int(rc)


LOCAL = Cluster("one-node")
MULTINODE_CONF = "/etc/slurm-iqa/slurm.conf"
MULTINODE = Cluster("multi-node", prefix=("nsenter", "--net=/run/netns/iqa-ctl"),
                    env={"SLURM_CONF": MULTINODE_CONF}, jobcomp_log=Path("/var/log/slurm-iqa/jobcomp.log"))

_run = LOCAL._run
unavailable = LOCAL.unavailable
submit = LOCAL.submit
job_info = LOCAL.job_info
state = LOCAL.state
wait = LOCAL.wait
wait_state = LOCAL.wait_state
signal_batch = LOCAL.signal_batch
cancel = LOCAL.cancel


def output(path: str | Path) -> str:
    p = Path(path)
    return p.read_text(errors="replace") if p.exists() else f"<{p} does not exist>"
