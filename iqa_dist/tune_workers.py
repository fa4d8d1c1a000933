"""A sweep trial as N DDP ranks: Ray Train's TorchTrainer inside the Tune trial.

``resources_per_trial: {workers: N, cpu: C, gpu: G}`` (C and G per rank, as Ray Train's
ScalingConfig counts them). The Tune trial is a light driver that reserves nothing: it
starts a TorchTrainer of N workers, Ray Train sets up their process group (gloo on CPU,
NCCL on GPU) and the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
which Accelerate takes as is, and every rank runs ``train()``.

Tune keeps what it has for a one-process trial (checkpoints, ASHA/PBT, retries, --resume):
after each epoch rank 0 stages the report and hands it to the driver over a Ray queue; the
driver reports it to Tune with the checkpoint and answers whether Tune keeps the trial,
which rank 0 broadcasts, so that all ranks stop together. Ray Train's own retries and
checkpoints stay off: a failed rank fails the trial, and Tune restarts it from its checkpoint.

A driver killed with its trial (a lost node, the OOM killer) leaves the ranks' placement group
reserved: Ray ties it to the sweep's job, and Ray Train's cleaner needs the dashboard's state
API, which a private local Ray does not start. Rank 0 notes its id in the trial's folder, and
the trial's next attempt removes it before it asks for ranks again.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import ray
import torch.distributed as dist
from ray._raylet import PlacementGroupID
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.queue import Queue

from .config import Config, from_dict, to_dict
from .train import Preempted, train
from .tune import limit_threads, report_staged, stage_report

GO, STOP = "go", "stop"
STOP_WAIT_S = 60  # for the ranks to leave a trial Tune stopped, before its actor is let go
RANKS_PG = "ranks.pg"  # in the trial's folder: the id of the placement group its ranks hold


class TrialStopped(Preempted):
    """Tune stopped the trial after an epoch (ASHA, PBT); its checkpoint is saved."""


class RankReport:
    """Every rank's epoch callback: rank 0 hands the epoch to the Tune driver and all ranks
    learn its answer, in the same collective order on every rank."""

    def __init__(self, log: Path, to_tune: Queue, from_tune: Queue) -> None:
        self.log, self.to_tune, self.from_tune = log, to_tune, from_tune

    def __call__(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        answer = [None]
        if dist.get_rank() == 0:
            self.to_tune.put(stage_report(self.log, metrics, checkpoint))
            answer[0] = self.from_tune.get()
        dist.broadcast_object_list(answer, src=0)
        if answer[0] == STOP:
            raise TrialStopped


def rank_main(config: dict[str, Any]) -> None:
    """One rank of the trial (a Ray Train worker)."""
    limit_threads(config["cpu"])
    if dist.get_rank() == 0:
        (Path(config["log"]).parent / RANKS_PG).write_text(ray.util.get_current_placement_group().id.hex())
    try:
        train(from_dict(config["cfg"]), callbacks=[RankReport(Path(config["log"]), *config["queues"])], lock=False)
    except TrialStopped:
        pass


def free_stale_ranks(note: Path) -> None:
    """Remove the placement group a killed attempt of this trial left behind, if any."""
    if note.exists():
        remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(note.read_text().strip())))
        note.unlink()


def run_ranks(cfg: Config, *, log: Path, workers: int, cpu: float, gpu: float) -> None:
    """Train ``cfg`` on ``workers`` ranks, reporting every epoch to Tune from here."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    free_stale_ranks(log.parent / RANKS_PG)
    queues = (Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0}))
    to_tune, from_tune = queues
    trainer = TorchTrainer(
        rank_main,
        train_loop_config={"cfg": to_dict(cfg), "log": str(log), "queues": queues, "cpu": cpu},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": cpu, "GPU": gpu}),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo", timeout_s=cfg.dist_timeout_s),
        run_config=RunConfig(name="ranks", storage_path=str(log.parent),
                             failure_config=FailureConfig(max_failures=0)))
    failed: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # raised again in the trial: Tune retries it
            failed.append(err)
        finally:  # Ray Train has released the ranks: nothing is left to free
            (log.parent / RANKS_PG).unlink(missing_ok=True)
            to_tune.put(None)

    runner = threading.Thread(target=fit, name="iqa-ranks", daemon=True)
    runner.start()
    try:
        while (item := to_tune.get()) is not None:
            report_staged(*item)  # raises SystemExit when Tune stops the trial
            from_tune.put(GO)
    except SystemExit:
        from_tune.put(STOP)
        runner.join(timeout=STOP_WAIT_S)
        raise
    runner.join()
    if failed:
        raise failed[0]
