"""A run directory belongs to one run: rank 0 holds ``run.lock`` in it for the run's life.

Two trainings on one ``--run_dir`` would share ``step-N`` and ``best/`` and test each
other's weights. The lock is a file created exclusively (a hard link, which is atomic on
NFS and Lustre too, unlike ``flock``) naming its holder's host, pid and SLURM job; a thread
refreshes its time every minute. A lock left by a process that died is taken over:

- on the same host, when its pid is gone;
- from the same SLURM job (requeued after preemption or a lost node), whatever the host;
- otherwise when it has not been refreshed for ``STALE_S`` (its host is unreachable from here).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from . import atomic

NAME = "run.lock"
REFRESH_S = 60
STALE_S = 300  # 5 refreshes missed: its process is gone


class LockedError(RuntimeError):
    """The run directory is in use by a live run; the message is one line."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / NAME
        self.me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "job": os.environ.get("SLURM_JOB_ID"), "since": time.time()})
        self._done = threading.Event()

    def acquire(self) -> RunLock:
        for _ in range(3):  # a takeover can lose a race; its winner then holds the lock
            if atomic.write_text(self.path, self.me, exclusive=True):
                threading.Thread(target=self._refresh, daemon=True, name="run-lock").start()
                return self
            seen = _read(self.path)
            if seen is None:
                continue  # released meanwhile
            if not stale(seen, self.path):
                raise LockedError(f"{self.path.parent}: in use by another run ({describe(seen)}); wait for "
                                  f"it to end or use another --run_dir")
            _take_over(self.path, seen)
        raise LockedError(f"{self.path.parent}: other runs are starting in it at the same time")

    def release(self) -> None:
        self._done.set()
        if _read(self.path) == self.me:
            self.path.unlink(missing_ok=True)

    def _refresh(self) -> None:
        while not self._done.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                return


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def describe(text: str) -> str:
    holder = _holder(text)
    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder.get("since", 0)))
    job = f", SLURM job {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {since}"


def _holder(text: str) -> dict:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def stale(text: str, path: Path) -> bool:
    """Whether the lock's holder is known to be gone."""
    holder = _holder(text)
    if not holder:
        return True  # not a lock we wrote
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("job") == job:
        return True  # this job's earlier run, requeued: that one has ended
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", 0)))
    try:
        return time.time() - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return True


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _take_over(path: Path, seen: str) -> None:
    """Remove a stale lock, but only the one judged stale: between the judgement and the
    removal another run may have taken it over and written its own."""
    aside = path.with_name(f".{NAME}.{os.getpid()}.{threading.get_ident()}{atomic.SUFFIX}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != seen:  # a fresh lock: put it back, unless a third run got in meanwhile
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
