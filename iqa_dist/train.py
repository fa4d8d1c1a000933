"""Train Swin HyperIQA on packed shards, on one process or many.

    python -m iqa_dist.train --config configs/demo.yaml
    accelerate launch --config_file launch/cpu_2proc.yaml -m iqa_dist.train --config configs/demo.yaml
    accelerate launch --config_file launch/multi_gpu.yaml -m iqa_dist.train --config configs/tiny.yaml

Selection (best checkpoint, early stopping) uses the validation split only; the test
split is evaluated once, with the best weights, at the end. ``--rounds N`` repeats the
whole run on N seeded splits and reports the median. SIGUSR1/SIGTERM on any rank saves
a checkpoint and exits with code 99 (see checkpoint.EXIT_PREEMPTED); ``--resume latest``
continues as if never stopped. With several processes, a rank that dies (a lost node)
makes the others exit within 0.6 x ``dist_timeout_s`` with code 3 and a message naming
it (see liveness.py).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm import tqdm

from . import atomic
from . import checkpoint as ckpt
from . import tracking
from .config import RUN_KEYS, Config, ConfigError, check_pretrained, for_world, parse_config, save_yaml, to_dict
from .data.jitter import draw as draw_jitter, jittered
from .data.remote import set_name
from .data.stream import ShardError, Split, batches, load_split, steps_per_epoch, to_model_input, train_loader
from .images import max_pixels
from .liveness import EXIT_LOST_RANK, Liveness
from .losses import global_iqa_loss
from .optim import base_lr, build_scheduler, is_hyper, reset_moments, restarts_each_epoch
from .progress import Progress
from .runlock import NAME as LOCK_NAME
from .runlock import LockedError, RunLock
from .runtime import compiled, make_accelerator, placed, set_determinism, shards_path
from .scoring import card_of, predict_split, same_direction, split_metrics, training_resize
from .tools import model_from_config


class Callback(Protocol):
    def __call__(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None: ...


class Preempted(Exception):
    """Raised after the checkpoint of a run asked to stop has been written."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(signum)
        self.signum = signum  # what this process received (None: it stopped with the others)

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C, as a shell reports SIGINT; 99 otherwise, which requeues a SLURM job."""
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else ckpt.EXIT_PREEMPTED


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class Diverged(RuntimeError):
    pass


class LostRank(RuntimeError):
    """A collective failed because another rank stopped (its node was lost)."""


# ---------------------------------------------------------------- set-up


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run directory, named on rank 0 and shared, so every rank writes the same one."""
    name = [cfg.run_dir or f"runs/{set_name(cfg.dataset)}-{cfg.model_size}-"
            f"{datetime.now().strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0]).absolute()


class StopFlag:
    """Set by SIGUSR1/SIGTERM (a scheduler) or SIGINT (Ctrl-C); all ranks agree on it within
    ``log_every`` steps, save a checkpoint and stop. A second Ctrl-C aborts at once, without one."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.raised = False
        self.signum: int | None = None  # the signal this process received, if any
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        """Catch the signals while the run trains (train() gives them back in the end)."""
        if threading.current_thread() is not threading.main_thread():
            return  # Ray Tune runs a trial in a thread, where signals cannot be caught
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            tqdm.write("stopping: a checkpoint at the next step, then exit (Ctrl-C again: at once, "
                       "without one)", file=sys.stderr)
        self.raised, self.signum = True, signum

    def restore(self) -> None:
        """Give the process its handlers back (train() may run inside a longer program)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ---------------------------------------------------------------- the loop


@dataclass
class State:
    """What a checkpoint must hold beyond Accelerate's state to continue exactly."""

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimiser micro-steps done in the current epoch
    global_step: int = 0
    best_srcc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs without improvement, for early stopping
    loss_sum: float = 0.0  # of the current epoch, so a resumed epoch reports the same mean
    finished: bool = False  # early-stopped: a resumed run goes straight to the final test
    bad_samples: int = 0  # unreadable images this process skipped (limit: max_bad_samples)
    ranking: list[dict] = field(default_factory=list)  # the top keep_best epochs by val SRCC, best first
    history: list[dict] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, callbacks: Sequence[Callback] = (), lock: bool = True) -> None:
        self.given, self.callbacks = cfg, list(callbacks)  # ``given`` is what config.yaml records
        check_pretrained(cfg)  # before anything is built or written
        tracking.check(cfg.log_with)
        self.accelerator = make_accelerator(cfg)
        world = self.accelerator.num_processes
        cfg = self.cfg = for_world(cfg, world)
        self.run_dir = resolve_run_dir(cfg, self.accelerator)
        ckpt.prepare_run_dir(self.run_dir)
        set_determinism(cfg)
        self.shards = shards_path(cfg)
        self.manifest_sha1 = manifest_sha1(self.shards)  # the set this run reads (a re-pack changes it)
        self.train_split = load_split(self.shards, "train", cfg.split_round)
        self.val_split = load_split(self.shards, "val", cfg.split_round)
        self.test_split = load_split(self.shards, "test", cfg.split_round)
        check_splits(self.shards, self.train_split, self.val_split, self.test_split)
        max_pixels()  # a bad IQA_MAX_PIXELS is one line here, not an error in every loader worker
        self.card = card_of(self.shards)
        self.resize = training_resize(self.card, str(self.shards / "card.json"))  # for cross-data-set tests
        self.steps = steps_per_epoch(len(self.train_split), cfg.train_patch_num, cfg.batch_size, world,
                                     cfg.grad_accum)
        self.epoch_steps = self.steps  # what an epoch is; ``steps`` what one runs (max_steps_per_epoch)
        if cfg.max_steps_per_epoch:
            if cfg.max_steps_per_epoch % cfg.grad_accum:
                raise ConfigError(f"max_steps_per_epoch {cfg.max_steps_per_epoch} is not a whole number "
                                  f"of grad_accum {cfg.grad_accum} cycles")
            self.steps = min(self.steps, cfg.max_steps_per_epoch)
        model, optimizer, self.channels_last = placed(model_from_config(cfg, pretrained=True), cfg, self.accelerator)
        self.scheduler = build_scheduler(optimizer, cfg, max(1, self.steps // cfg.grad_accum))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.forward = compiled(self.model, cfg)
        self.loader = train_loader(self.train_split, patch_num=cfg.train_patch_num,
                                   patch_size=cfg.patch_size, batch_size=cfg.batch_size,
                                   seed=cfg.seed, rank=self.accelerator.process_index,
                                   world=world, workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer,
                                   steps=self.epoch_steps, pin_memory=self.accelerator.device.type == "cuda")
        self.state = State()
        self.stop = StopFlag()
        self.stopping = False  # all ranks agreed to stop (at the next accumulation boundary)
        self.lock = self.claim_run_dir() if lock else None
        self.liveness = None
        if world > 1:
            self.liveness = Liveness(self.run_dir, self.accelerator.process_index, world,
                                     dist_timeout_s=cfg.dist_timeout_s,
                                     before_exit=self.lock.release if self.lock else None).start()

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, text: str) -> None:
        if self.main:
            tqdm.write(text)

    def warn(self, text: str) -> None:
        """A warning about this rank's own state (its data, its random state): from any rank."""
        rank = f"rank {self.accelerator.process_index}: " if self.accelerator.num_processes > 1 else ""
        tqdm.write(f"warning: {rank}{text}", file=sys.stderr)

    # -------------------------------------------------- the run directory

    def claim_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run directory and checks that it may train there; every rank
        learns the answer, so all leave together when it may not."""
        lock, problem = None, [None]
        if self.main:
            try:
                with ckpt.space_for(self.run_dir, "its lock", 1 << 12):
                    lock = RunLock(self.run_dir).acquire()
                self.check_fresh_start()
            except (LockedError, ckpt.CheckpointError) as err:
                if lock is not None:
                    lock.release()
                problem = [str(err)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(problem)
        if problem[0]:
            raise ckpt.CheckpointError(problem[0])
        return lock

    def check_fresh_start(self) -> None:
        """A run directory an earlier run left is continued (--resume) or cleared
        (--overwrite), never silently replaced."""
        if not ckpt.holds_run(self.run_dir) or self.cfg.resume:
            return
        if not self.cfg.overwrite:
            raise ckpt.CheckpointError(f"{self.run_dir}: holds an earlier run; --resume latest continues it, "
                                       "--overwrite deletes it and starts again, or give another --run_dir")
        self.log(f"--overwrite: deleting the earlier run in {self.run_dir}")
        ckpt.clear_run(self.run_dir, keep=LOCK_NAME)
        ckpt.prepare_run_dir(self.run_dir)

    def experiment(self) -> dict[str, Any]:
        """What a checkpoint records of the experiment: every key but the run's mechanics,
        and the packed data (a re-packed set's splits differ)."""
        record = {k: v for k, v in to_dict(self.given).items() if k not in RUN_KEYS}
        record["manifest_sha1"] = self.manifest_sha1
        return record

    def check_same_experiment(self, path: Path) -> None:
        saved = ckpt.read_trainer_state(path).get("experiment", {})
        changes = ckpt.experiment_changes(saved, self.experiment(), self.cfg.allow_changed)
        if changes:
            keys = " ".join(c.split(":")[0] for c in changes)
            raise ckpt.CheckpointError(f"{path}: another experiment ({'; '.join(changes)}); resume with the "
                                       f"same settings, start a new --run_dir, or --allow_changed {keys} "
                                       "if you mean it")

    def carry_best_over(self, path: Path) -> None:
        """Resuming another run's checkpoint into this directory: its best weights come
        along, since its best epoch is the one this run must beat and finally test."""
        for kept in ("best", ckpt.BEST_K):
            theirs, ours = path.parent / kept, ckpt.checkpoints_dir(self.run_dir) / kept
            if self.main and theirs.is_dir() and not ours.exists() and theirs.resolve() != ours.resolve():
                shutil.copytree(theirs, ours)
        self.accelerator.wait_for_everyone()

    # -------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Full state of every rank into checkpoints/step-N, then ``last`` points at it."""
        stage = ckpt.staging_dir(self.run_dir, self.state.global_step)
        with ckpt.space_for(self.run_dir, f"checkpoint step-{self.state.global_step:08d}", 3 * self.weight_bytes()):
            self.accelerator.save_state(str(stage), safe_serialization=True)  # weights and Adam's 2 moments
            self.accelerator.wait_for_everyone()
            path = None
            if self.main:
                state = dict(vars(self.state), scheduler=self.scheduler.state_dict(), experiment=self.experiment())
                path = ckpt.publish(self.run_dir, self.state.global_step, state, keep=self.cfg.keep_last)
        self.accelerator.wait_for_everyone()
        return path or ckpt.checkpoints_dir(self.run_dir) / f"step-{self.state.global_step:08d}"

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def load(self, path: Path) -> None:
        problem = ckpt.random_state_problem(path, self.accelerator.process_index)
        if problem:
            self.warn(f"{problem}: resuming without it, so this run will not be bit-identical to an "
                      "uninterrupted one")
        try:
            self.accelerator.load_state(str(path))
        except Exception as err:  # a damaged file or another model: whatever the loaders raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ckpt.CheckpointError(f"{path}: cannot be loaded ({first})") from None
        saved = ckpt.read_trainer_state(path)
        saved.pop("experiment", None)
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        self.state = State(**saved)
        self.rebase_lr()
        self.log(f"resumed from {path} at epoch {self.state.epoch + 1}, "
                 f"step {self.state.step_in_epoch}/{self.steps}")

    def rebase_lr(self) -> None:
        """Put the restored schedule on this config's learning rates: a resumed run may
        change them (PBT's explore, a user's --lr); unchanged, every value stays the same."""
        sched = self.scheduler
        for i, group in enumerate(self.optimizer.param_groups):
            base = base_lr(self.cfg, is_hyper(group))
            sched.base_lrs[i] = group["initial_lr"] = base
            group["lr"] = base * sched.lr_lambdas[i](sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def save_best(self, metrics: dict[str, float], improved: bool, ranked: bool) -> None:
        """The epoch's weights as ``best`` when it improved, and into best_k/epoch-E when it
        ranks among the top ``keep_best`` (> 1). Every rank decides alike (val SRCC is
        gathered), so all take part in the gathering of the weights or none does."""
        if not improved and not ranked:
            return
        weights = self.accelerator.get_state_dict(self.model)  # gathers ZeRO-3 shards, to rank 0 only
        if self.main:
            weights = ckpt.as_fp32(weights)
            metrics = dict(metrics, label_card=self.card)
            need = 2 * (improved + ranked) * self.weight_bytes()  # fp32 of bf16, in one folder or two
            with ckpt.space_for(self.run_dir, "the best weights", need):
                if improved:
                    self.write_model(ckpt.checkpoints_dir(self.run_dir) / "best", weights, metrics)
                if ranked:
                    with ckpt.staged(ckpt.best_k_dir(self.run_dir, self.state.epoch + 1)) as folder:
                        self.write_model(folder, weights, metrics)
        self.accelerator.wait_for_everyone()

    def write_model(self, folder: Path, weights: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        """What scoring needs (predict, evaluate): the weights, the config and the epoch's metrics."""
        ckpt.save_weights(weights, folder / "model.safetensors", metadata={"model_size": self.cfg.model_size})
        save_yaml(self.given, folder / "config.yaml")
        ckpt.write_json(folder / "metrics.json", metrics)

    def load_into_model(self, weights: dict[str, torch.Tensor]) -> None:
        """Full weights into the training model; under ZeRO-3 its parameters are shards,
        so every rank gathers them, loads the same file, and rank 0's copy is scattered back."""
        model = self.accelerator.unwrap_model(self.model)
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None or plugin.zero_stage != 3:
            model.load_state_dict(weights)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            model.load_state_dict(weights)

    # -------------------------------------------------- steps and epochs

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        acc, cfg = self.accelerator, self.cfg
        dtype = next(self.model.parameters()).dtype  # DeepSpeed bf16 casts the model, not inputs
        images = to_model_input(images, acc.device, channels_last=self.channels_last)
        if cfg.color_jitter:  # drawn from the step, so a resumed epoch replays it
            st = self.state
            images = jittered(images, draw_jitter(len(images), cfg.seed, st.epoch, acc.process_index,
                                                  st.step_in_epoch))
        images = images.to(dtype)
        labels = labels.to(acc.device, non_blocking=True)
        with acc.accumulate(self.model):
            with acc.autocast():
                preds = self.forward(images).float()
            loss = global_iqa_loss(preds, labels, alpha=cfg.ranking_loss_alpha, margin=cfg.ranking_loss_margin)
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip > 0 and acc.state.deepspeed_plugin is None:
                acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self.scheduler.step()
        return loss.detach()  # read by the loop every log_every steps: .item() here would wait for the GPU

    def train_epoch(self) -> float:
        st = self.state
        self.loader.dataset.set_epoch(st.epoch)
        if st.step_in_epoch == 0 and restarts_each_epoch(self.cfg):  # not mid-epoch: a resumed one keeps them
            reset_moments(self.optimizer)
        bar = Progress(self.steps, st.step_in_epoch, f"epoch {st.epoch + 1}/{self.cfg.epochs}", self.main)
        try:
            self.run_steps(bar)
        finally:  # a failing step must not leave a half-drawn bar in front of its error line
            bar.close()
        return st.loss_sum / max(1, st.step_in_epoch)

    def run_steps(self, bar: Progress) -> None:
        st = self.state
        epoch = islice(batches(self.loader), st.step_in_epoch, self.steps)  # replays a resumed epoch
        # The losses stay on the device and are read once per window (check_window): a read
        # per step would make the host wait for the GPU every step, leaving it idle while
        # the next batch is prepared.
        window, start, seen = torch.zeros((), device=self.accelerator.device), time.time(), 0
        first = begun = st.step_in_epoch
        for images, labels, _, bad in epoch:
            self.count_bad(bad)
            window += self.train_step(images, labels)
            st.step_in_epoch += 1
            st.global_step += 1
            seen += len(labels) * self.accelerator.num_processes
            bar.update()
            if self.window_ends():
                loss = self.check_window(window, first) / (st.step_in_epoch - first)
                elapsed = time.time() - start
                self.accelerator.log({"train/loss": loss, **self.lrs(), "train/samples_per_s": seen / elapsed},
                                     step=st.global_step)
                bar.window(st.step_in_epoch, loss, self.scheduler.get_last_lr()[0], seen / elapsed,
                           elapsed / (st.step_in_epoch - begun) * (self.steps - st.step_in_epoch))
                window.zero_()
                first = st.step_in_epoch

    def lrs(self) -> dict[str, float]:
        """The lr of the backbone and of the hyper network (each has groups with and without
        weight decay, at the same lr)."""
        return {f"train/lr_{'hyper' if is_hyper(group) else 'backbone'}": group["lr"]
                for group in self.optimizer.param_groups}

    def window_ends(self) -> bool:
        """Every ``log_every`` steps; at the epoch's end, so that a diverged loss is caught
        before its checkpoint; and at the accumulation boundary where an agreed stop lands."""
        st, cfg = self.state, self.cfg
        return (st.step_in_epoch % cfg.log_every == 0 or st.step_in_epoch == self.steps
                or (self.stopping and st.step_in_epoch % cfg.grad_accum == 0) or self.save_due())

    def save_due(self) -> bool:
        """A periodic checkpoint: every ``save_every_n_steps`` optimizer steps of the run (not of
        the epoch), mid-epoch (an epoch's end saves after its validation). Epochs are whole
        accumulation cycles, so a multiple of the cycle in micro-steps is an optimizer step.
        The global step is the same on every rank: the ranks save together without a collective."""
        st, every = self.state, self.cfg.save_every_n_steps * self.cfg.grad_accum
        return every > 0 and st.global_step % every == 0 and st.step_in_epoch < self.steps

    def check_window(self, window: torch.Tensor, first: int) -> float:
        """All ranks agree on stopping (a diverged loss, too many bad samples, a stop
        request) in one small all-reduce, and this rank's window loss is read with it: one
        host sync per window. Returns the loss summed over the window."""
        st, cfg, acc = self.state, self.cfg, self.accelerator
        flags = torch.tensor([float(self.stop.raised), float(st.bad_samples > cfg.max_bad_samples)],
                             device=acc.device)
        flags = torch.cat([flags, (~torch.isfinite(window)).float().view(1)])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, "max")
        stop, too_bad, diverged, loss = torch.cat([flags, window.view(1)]).tolist()
        st.loss_sum += loss
        if diverged:
            where = f"{loss}" if not math.isfinite(loss) else "not finite on another rank"
            raise Diverged(f"loss is {where} at epoch {st.epoch + 1}, steps {first + 1}-{st.step_in_epoch}: "
                           f"stopped; {self.last_good()}")
        if too_bad:
            raise ShardError(f"more than max_bad_samples ({cfg.max_bad_samples}) unreadable samples on a "
                             f"process (here {st.bad_samples}, named in the warnings above): stopped; "
                             "repack the set, or raise max_bad_samples")
        # A stop is heard within log_every steps, and saved on an accumulation boundary
        # (mid-cycle gradients would be lost): every rank reaches it at the same step.
        self.stopping = self.stopping or bool(stop)
        if self.stopping and st.step_in_epoch % cfg.grad_accum == 0:
            self.log(f"stop requested: saving at step {st.global_step}")
            path = self.save()
            ckpt.mark_preempted(self.run_dir, acc.process_index, path)
            raise Preempted(self.stop.signum)
        if self.save_due():  # here, like a stop's: the window's loss is in loss_sum, so it resumes exactly
            self.save()
        return loss

    def count_bad(self, problems: list[str]) -> None:
        """Bad samples the loader skipped (their patches were cut from other images)."""
        for problem in problems:
            self.state.bad_samples += 1
            self.warn(f"skipped a bad sample ({self.state.bad_samples} of at most {self.cfg.max_bad_samples}): "
                      f"{problem}")

    def last_good(self) -> str:
        last = ckpt.checkpoints_dir(self.run_dir) / "last"
        return f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"

    def validate(self) -> dict[str, float]:
        return split_metrics(predict_split(self.model, self.val_split, self.cfg, self.accelerator))

    def end_epoch(self, train_loss: float, epoch_time: float) -> bool:
        """Selection on validation, logging, checkpoint; True when early stopping says stop."""
        st, cfg = self.state, self.cfg
        val = self.validate()
        score = val["srcc"] if math.isfinite(val["srcc"]) else -math.inf
        if score == -math.inf:
            self.log(f"warning: val SRCC is {val['srcc']} (constant predictions, or fewer than two "
                     f"distinct labels among {len(self.val_split)} val images)")
        improved = st.best_epoch < 0 or score > st.best_srcc  # the first epoch always gives best weights
        st.ranking = ckpt.ranked(st.ranking, st.epoch + 1, score, cfg.keep_best)
        ranked = cfg.keep_best > 1 and any(e["epoch"] == st.epoch + 1 for e in st.ranking)
        self.save_best({f"val_{k}": v for k, v in val.items()} | {"epoch": st.epoch + 1}, improved, ranked)
        if improved:
            st.best_srcc, st.best_epoch, st.bad_epochs = score, st.epoch, 0
        else:
            st.bad_epochs += 1
        row = {"epoch": st.epoch + 1, "train_loss": train_loss, "val_srcc": val["srcc"],
               "val_plcc": val["plcc"], "val_krcc": val["krcc"], "val_rmse": val["rmse"],
               "lr": self.scheduler.get_last_lr()[0], "time_s": epoch_time}
        lowest = min((h["train_loss"] for h in st.history), default=math.inf)
        if train_loss > 3 * lowest:
            self.log(f"warning: train loss {train_loss:.4g} is over 3x its lowest epoch ({lowest:.4g}): "
                     "diverging? try a lower --lr or --grad_clip")
        st.history.append(row)
        self.write_epoch(row)
        self.log(f"epoch {st.epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val SRCC {val['srcc']:.4f} "
                 f"PLCC {val['plcc']:.4f}  {'(best)' if improved else ''} {epoch_time:.0f}s")
        st.epoch += 1
        st.step_in_epoch, st.loss_sum = 0, 0.0
        st.finished = cfg.early_stopping and st.bad_epochs >= cfg.patience
        path = self.save()
        if cfg.keep_best > 1 and self.main:
            ckpt.settle_ranking(self.run_dir, st.ranking)
        for callback in self.callbacks:
            callback(st.epoch, row, path)
        return st.finished

    def write_epoch(self, row: dict) -> None:
        """summary.csv rewritten from the history (a resumed run never repeats a row), and the
        trackers, at the global step (the per-step points' axis; ``epoch`` is one of the values)."""
        self.accelerator.log(row, step=self.state.global_step)
        if not self.main:
            return
        with ckpt.space_for(self.run_dir, "summary.csv", 1 << 20), io.StringIO() as text:
            writer = csv.DictWriter(text, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(self.state.history)
            atomic.write_text(self.run_dir / "summary.csv", text.getvalue())

    # -------------------------------------------------- whole run

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        # not in __init__: a run refused there would leave its handlers in the process, and a
        # forked child (a multiprocessing pool's worker) would then ignore SIGTERM
        self.stop.install()
        resume = ckpt.resolve_resume(cfg.resume, self.run_dir, warn=self.log)
        if resume is not None:  # before anything is written: a refused resume changes nothing
            self.check_same_experiment(resume)
            self.carry_best_over(resume)
        if self.main:
            with ckpt.space_for(self.run_dir, "config.yaml", 1 << 20):  # a resume on a full disk, too
                save_yaml(self.given, self.run_dir / "config.yaml")
            ckpt.clear_preempted(self.run_dir)
        self.accelerator.wait_for_everyone()
        if resume is not None:
            self.load(resume)
        tracking.start(self.accelerator, self.cfg, self.run_dir, self.state.global_step)
        if self.accelerator.num_processes > 1:  # where each rank runs: a multi-node run's log shows both
            print(f"rank {self.accelerator.process_index}/{self.accelerator.num_processes} on "
                  f"{socket.gethostname()} (pid {os.getpid()}, local rank {self.accelerator.local_process_index})",
                  file=sys.stderr, flush=True)
        self.log(f"run {self.run_dir}: {len(self.train_split)} train / {len(self.val_split)} val / "
                 f"{len(self.test_split)} test images; {self.accelerator.num_processes} process(es) x "
                 f"batch {cfg.batch_size} x {cfg.grad_accum} accumulation = global batch "
                 f"{cfg.global_batch_size}, lr {cfg.lr:.3g}; {self.steps} of {self.epoch_steps} steps "
                 f"per epoch")
        if self.state.finished:
            self.log("the run had already stopped early: testing its best weights")
        while not self.state.finished and self.state.epoch < cfg.epochs:
            start = time.time()
            loss = self.train_epoch()
            if self.end_epoch(loss, time.time() - start):
                self.log(f"early stopping: no better val SRCC for {cfg.patience} epochs")
                break
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """Test the best weights once, cross-data-set tests, results.json and plots."""
        from .plots import plot_run

        self.load_into_model(ckpt.load_weights(ckpt.checkpoints_dir(self.run_dir) / "best" / "model.safetensors"))
        results: dict[str, Any] = {"run_dir": str(self.run_dir), "best_epoch": self.state.best_epoch + 1,
                                   "best_val_srcc": self.state.best_srcc,
                                   "epochs_run": self.state.epoch, "world_size": self.accelerator.num_processes,
                                   "backend": torch.distributed.get_backend() if torch.distributed.is_initialized()
                                   else "none",  # nccl, gloo: what the ranks really talked over
                                   "batch_size_per_process": self.cfg.batch_size,
                                   "global_batch_size": self.cfg.global_batch_size, "lr": self.cfg.lr,
                                   "bad_samples": self.state.bad_samples}
        test_preds = predict_split(self.model, self.test_split, self.cfg, self.accelerator)
        results["test"] = split_metrics(test_preds)  # the model predicts this set's own labels
        for name in self.cross_sets():
            if self.main:  # written as it grows: a cross-data-set that fails loses no other result
                ckpt.write_json(self.run_dir / "results.json", results)
            path = shards_path(self.cfg, name)
            preds = predict_split(self.model, load_split(path, "all"), self.cfg, self.accelerator,
                                  resize=self.resize)  # as evaluate scores it
            results[f"cross_{name}"] = split_metrics(preds, same_direction(self.card, card_of(path)))
        if self.main:
            ckpt.write_json(self.run_dir / "results.json", results)
            if self.cfg.plots:
                plot_run(self.run_dir, self.state.history, test_preds)
            t = results["test"]
            self.log(f"test (best epoch {results['best_epoch']}): SRCC {t['srcc']:.4f}  PLCC {t['plcc']:.4f}  "
                     f"KRCC {t['krcc']:.4f}  RMSE {t['rmse']:.3f}\nresults in {self.run_dir}")
        return results

    def cross_sets(self) -> list[str]:
        names = list(self.cfg.cross_datasets) + (["spaq"] if self.cfg.spaq else [])
        found = [n for n in dict.fromkeys(names) if (shards_path(self.cfg, n) / "manifest.parquet").exists()
                 and shards_path(self.cfg, n) != self.shards]
        for n in set(self.cfg.cross_datasets) - set(found):
            self.log(f"warning: cross-data-set {n!r} not packed under {self.cfg.shards_root}: skipped")
        return found


def check_splits(root: Path, train: Split, val: Split, test: Split) -> None:
    """Refuse at start what would fail at the end: a missing shard, or a val or test split
    on which no correlation can be computed (selection and the final test need one)."""
    for split in (train, val, test):
        split.check_shards()
    for split in (val, test):
        problem = split.unrankable()
        if problem:
            raise ConfigError(f"{root}: {problem} (SRCC needs two images with different labels); "
                              "pack with a larger share for it (--split) or more images")


# ---------------------------------------------------------------- API and command line


def manifest_sha1(shards: Path) -> str | None:
    """The fingerprint of a packed set (None: it has no manifest now)."""
    try:
        return hashlib.sha1((shards / "manifest.parquet").read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def repacked(err: ShardError, shards: Path, sha1_at_start: str | None) -> ShardError:
    """``err``, or, when the set's manifest changed since the run started, the reason: the
    shards are not corrupted. A pack over a set (``--overwrite``) deletes the manifest
    first and writes the new one last, so it differs during the whole re-pack and after."""
    if manifest_sha1(shards) == sha1_at_start:
        return err
    return ShardError(f"{shards} was packed again while this run read it ({err}); train again on the new set")


def train(cfg: Config, callbacks: Sequence[Callback] = (), lock: bool = True) -> dict[str, Any]:
    """Train one run (or ``cfg.rounds`` runs on seeded splits); returns the results.
    ``lock=False`` where the caller owns the run directory (a Tune trial's, which Tune may
    restart on another node while the lock of the lost one still looks alive)."""
    if cfg.rounds > 1:
        return train_rounds(cfg, callbacks)
    trainer = Trainer(cfg, callbacks, lock)
    live, lost = trainer.liveness, []
    try:
        results = trainer.fit()
    except Preempted:
        if live:
            live.stop()
        raise
    except RuntimeError as err:  # a failed collective among them
        lost = live.diagnose() if live and not isinstance(err, Diverged) else []
        if live:
            live.stop(done=False)
        if lost:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise LostRank(f"{live.message(lost)} ({type(err).__name__}: {first})") from err
        if isinstance(err, ShardError):
            raise repacked(err, trainer.shards, trainer.manifest_sha1) from None
        raise
    finally:
        trainer.stop.restore()
        if trainer.lock:
            trainer.lock.release()
        if not lost:  # the process group of a run that lost a rank is not worth a clean shutdown
            trainer.accelerator.end_training()  # without it DeepSpeed on CPU may abort at exit; ends the trackers
        else:
            for tracker in trainer.accelerator.trackers:
                tracker.finish()
    if live:
        live.stop()
    return results


def train_rounds(cfg: Config, callbacks: Sequence[Callback]) -> dict[str, Any]:
    base = Path(cfg.run_dir or f"runs/{set_name(cfg.dataset)}-{cfg.model_size}-rounds")
    runs = [train(replace(cfg, rounds=1, split_round=r, seed=cfg.seed + r,
                          run_dir=str(base / f"round-{r}")), callbacks) for r in range(cfg.rounds)]
    summary: dict[str, Any] = {"rounds": runs}
    for metric in ("srcc", "plcc"):
        values = np.array([r["test"][metric] for r in runs])
        summary[f"test_{metric}_median"] = float(np.median(values))
        summary[f"test_{metric}_iqr"] = float(np.subtract(*np.percentile(values, [75, 25])))
        summary[f"test_{metric}_std"] = float(values.std())
    if int(os.environ.get("RANK", "0")) == 0:
        ckpt.write_json(base / "results.json", summary)
        print(f"{cfg.rounds} rounds: test SRCC median {summary['test_srcc_median']:.4f} "
              f"(IQR {summary['test_srcc_iqr']:.4f}), PLCC median {summary['test_plcc_median']:.4f}")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv, description=__doc__.split("\n")[0])
    try:
        train(cfg)
    except Preempted as stopped:
        why = "interrupted" if stopped.exit_code == EXIT_INTERRUPTED else "preempted"
        print(f"rank {os.environ.get('RANK', '0')} on {socket.gethostname()}: checkpoint saved, "
              f"exit {stopped.exit_code} ({why}); --resume latest continues", file=sys.stderr, flush=True)
        return stopped.exit_code
    except KeyboardInterrupt:
        print("interrupted without a checkpoint; --resume latest continues from the last one",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except LostRank as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_LOST_RANK
    except (Diverged, FileNotFoundError, ConfigError, ShardError, ckpt.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
