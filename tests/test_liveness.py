"""Lost ranks: a silent peer is named before the process group's own timeout, so that
the one-line message and exit code 3 come before NCCL's watchdog ends the process."""
from __future__ import annotations

from types import SimpleNamespace

from accelerate.utils import InitProcessGroupKwargs

from iqa_dist import liveness
from iqa_dist.config import Config
from iqa_dist.liveness import Liveness, nccl_error_handling
from iqa_dist.runtime import process_kwargs


def test_a_silent_rank_is_named_well_before_the_process_group_gives_up(tmp_path, monkeypatch):
    """Real heartbeat files, a simulated clock: rank 1 beats every second, then stops at
    50 s; rank 0 names it between half and three quarters of the group's timeout later."""
    cfg = Config(dist_timeout_s=100)
    group_timeout = next(k.timeout.total_seconds() for k in process_kwargs(cfg, gpu=True)
                         if isinstance(k, InitProcessGroupKwargs))
    clock = [0.0]
    monkeypatch.setattr(liveness, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    watcher, peer = (Liveness(tmp_path, rank, 2, dist_timeout_s=cfg.dist_timeout_s) for rank in (0, 1))
    for second in range(300):
        clock[0] = float(second)
        if second <= 50:
            peer.beat()
        lost = watcher.beat()
        if lost:
            break
    assert [p.rank for p in lost] == [1]
    assert (tmp_path / "liveness" / "rank-1.json").exists()
    assert 50 + 0.5 * group_timeout <= second < 50 + 0.75 * group_timeout
    assert watcher.message(lost).startswith("lost rank 1 on ")


def test_nccl_raises_its_errors_instead_of_ending_the_process(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what torchrun gives every rank
    nccl_error_handling()
    assert liveness.os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
