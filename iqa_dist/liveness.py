"""Which rank is gone: heartbeats of the ranks of one run, on its (shared) run directory.

A multi-node run loses a node as a rank that stops answering. Without help the others
wait in their next collective for torch's timeout (30 minutes by default) and then fail
with a transport error that names an address, not a rank. Here:

- the process group gets ``dist_timeout_s`` as its timeout (runtime.make_accelerator), so a
  collective waiting for a dead peer fails within that bound;
- every rank writes ``<run_dir>/liveness/rank-N.json`` (rank, host, pid, a counter) every
  ``interval`` seconds from a thread, so the others can tell who stopped;
- when a collective fails, ``diagnose`` names the ranks whose counter stopped advancing
  (waiting at most a few intervals for it to show), and the trainer exits with
  EXIT_LOST_RANK (3) and that message; ``--resume latest`` continues from the last
  checkpoint;
- a watchdog in the same thread ends this process (code 3, the same message) when a peer
  has been silent for ``LOST_SHARE`` x ``dist_timeout_s`` seconds, whatever this rank is
  blocked in: before the process group's own timeout, so that NCCL's watchdog, which acts
  at ``dist_timeout_s``, cannot end the process first without naming anyone;
- NCCL's error handling is told to abort the communicator and raise, not to end the process
  (``nccl_error_handling``): a peer's closed connection, often seen before any timeout,
  then reaches the trainer as an exception, which ``diagnose`` turns into the same message.

Staleness is judged by whether a peer's counter changes, timed on the reader's own
monotonic clock: the nodes' clocks need not agree. A rank that finishes (or stops for a
preemption) writes ``done`` and is no longer watched. The run directory must be on a file
system every node sees, as it must for checkpoints anyway.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

EXIT_LOST_RANK = 3
# A silent peer is declared lost after this share of dist_timeout_s: clearly before the
# process group gives up (at 1.0), with room for a heartbeat interval and a slow file system.
LOST_SHARE = 0.6


def nccl_error_handling() -> None:
    """Set before the process group exists (ProcessGroupNCCL reads these when it is made).

    - ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (abort the communicator only): on an error or a
      timeout NCCL's watchdog aborts the communicator and the failure is raised in the
      training thread. torch's default (3) and torchrun's (1, which ``accelerate launch``
      passes to every rank) tear the process down at once, with a SIGABRT and no word of
      which rank is gone: that would pre-empt our message and exit code 3, so this overrides
      whatever the launcher set.
    - ``TORCH_NCCL_BLOCKING_WAIT`` is left unset: a blocking ``wait()`` would make every
      collective, DDP's gradient all-reduce included, a host sync.
    """
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"


@dataclass
class Peer:
    rank: int
    host: str = "?"
    count: int = -1
    changed: float = 0.0  # monotonic time (ours) when its counter last changed
    done: bool = False


class Liveness:
    def __init__(self, run_dir: str | Path, rank: int, world: int, dist_timeout_s: float,
                 interval: float = 1.0, before_exit: Callable[[], None] | None = None) -> None:
        self.dir = Path(run_dir) / "liveness"
        self.rank, self.world, self.interval = rank, world, interval
        self.deadline_s = LOST_SHARE * float(dist_timeout_s)
        self.host = socket.gethostname()
        self.count = 0
        now = time.monotonic()
        self.peers = {r: Peer(r, changed=now) for r in range(world) if r != rank}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.before_exit = before_exit  # os._exit skips every finally: e.g. the run directory's lock

    # ------------------------------------------------------------ own heartbeat

    def _write(self, done: bool = False) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rank-{self.rank}.json"
        tmp = self.dir / f".rank-{self.rank}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"rank": self.rank, "host": self.host, "pid": os.getpid(),
                                   "count": self.count, "done": done}))
        os.replace(tmp, path)
        self.count += 1

    def start(self) -> "Liveness":
        self._write()
        self._thread = threading.Thread(target=self._loop, name="iqa-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self, done: bool = True) -> None:
        """Stop the heartbeat; ``done``: this rank finishes normally (or was preempted), the
        others must not wait for it. After a failure (``done=False``) it simply falls silent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if done:
            try:
                self._write(done=True)
            except OSError:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            lost = self.beat()
            if lost:
                print(f"error: {self.message(lost)}; giving up after {self.deadline_s:.0f} s "
                      f"({LOST_SHARE} x dist_timeout_s)", file=sys.stderr, flush=True)
                if self.before_exit:
                    self.before_exit()
                os._exit(EXIT_LOST_RANK)

    def beat(self) -> list[Peer]:
        """One heartbeat of this rank; the peers silent for longer than the deadline."""
        try:
            self._write()
        except OSError:
            pass  # a full or flaky file system must not kill training; the others may time out
        return self.refresh(stale_s=self.deadline_s)

    # ------------------------------------------------------------ the others

    def refresh(self, stale_s: float) -> list[Peer]:
        """Read the peers' heartbeats; those silent for more than ``stale_s`` seconds."""
        now = time.monotonic()
        with self._lock:
            for peer in self.peers.values():
                try:
                    beat = json.loads((self.dir / f"rank-{peer.rank}.json").read_text())
                except (OSError, ValueError):
                    continue  # not started yet, or being replaced
                peer.host, peer.done = beat.get("host", "?"), bool(beat.get("done"))
                if beat.get("count") != peer.count:
                    peer.count, peer.changed = beat.get("count"), now
            return [p for p in self.peers.values() if not p.done and now - p.changed > stale_s]

    def diagnose(self, wait_s: float | None = None) -> list[Peer]:
        """After a failed collective: the ranks that stopped, waiting up to ``wait_s``
        (default: four heartbeat intervals) for a silence to become visible."""
        wait_s = 4 * self.interval if wait_s is None else wait_s
        stale_s = 2.5 * self.interval
        end = time.monotonic() + wait_s
        while True:
            lost = self.refresh(stale_s)
            if lost or time.monotonic() >= end:
                return lost
            time.sleep(self.interval / 4)

    def message(self, lost: list[Peer]) -> str:
        now = time.monotonic()
        names = ", ".join(f"rank {p.rank} on {p.host} (silent for {now - p.changed:.1f} s)" for p in lost)
        return (f"lost {names}: rank {self.rank} on {self.host} stops; "
                f"resubmit with --resume latest to continue from the last checkpoint")
