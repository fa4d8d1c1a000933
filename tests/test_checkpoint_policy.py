"""Which checkpoints a run writes and keeps: the newest step-N (keep_last), periodic ones
(save_every_n_steps; their resume is tested with the others, in test_train.py) and the best
epochs by val SRCC (keep_best)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from iqa_dist import checkpoint
from iqa_dist.train import Trainer, train

from test_train import assert_identical, final_weights, machinery_config


def step_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).glob("step-*"))


def test_keep_last_keeps_that_many_and_a_resume_may_change_it(small_shards, tmp_path):
    run_dir = tmp_path / "run"
    train(machinery_config(small_shards, run_dir, epochs=3, max_steps_per_epoch=1, keep_last=3))
    assert step_names(run_dir) == ["step-00000001", "step-00000002", "step-00000003"]
    train(machinery_config(small_shards, run_dir, epochs=4, max_steps_per_epoch=1, keep_last=1, resume="latest"))
    assert step_names(run_dir) == ["step-00000004"]
    assert (run_dir / "checkpoints" / "last").resolve().name == "step-00000004"


def test_pruning_spares_the_checkpoint_a_preemption_marker_names(tmp_path):
    for step in (1, 2):
        checkpoint.staging_dir(tmp_path, step).mkdir(parents=True)
        path = checkpoint.publish(tmp_path, step, {}, keep=1)
        if step == 1:
            checkpoint.mark_preempted(tmp_path, 0, path)
    assert step_names(tmp_path) == ["step-00000001", "step-00000002"]


def test_periodic_checkpoints_count_optimizer_steps_and_land_on_cycle_ends(small_shards, tmp_path):
    """save_every_n_steps 1 with grad_accum 2: a checkpoint after each optimizer step, so every
    second micro-batch (step-N counts micro-batches), never between the two of a cycle."""
    run_dir = tmp_path / "run"
    train(machinery_config(small_shards, run_dir, epochs=1, max_steps_per_epoch=6, grad_accum=2,
                           save_every_n_steps=1, keep_last=10))
    assert step_names(run_dir) == ["step-00000002", "step-00000004", "step-00000006"]


SCORES = (0.5, 0.9, 0.7, 0.8)  # val SRCC of epochs 1-4: the best is epoch 2, not the last


def test_keep_best_ranks_the_top_epochs_and_a_resume_keeps_the_ranking(small_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "validate",
                        lambda self: dict(srcc=SCORES[self.state.epoch], plcc=0.5, krcc=0.5, rmse=1.0))
    run_dir, top = tmp_path / "run", tmp_path / "run" / "checkpoints" / "best_k"
    train(machinery_config(small_shards, run_dir, epochs=3, max_steps_per_epoch=1, keep_best=2))
    assert [e["epoch"] for e in json.loads((top / "ranking.json").read_text())] == [2, 3]
    results = train(machinery_config(small_shards, run_dir, epochs=4, max_steps_per_epoch=1, keep_best=2,
                                     resume="latest"))
    assert results["best_epoch"] == 2
    ranking = json.loads((top / "ranking.json").read_text())
    assert [(e["rank"], e["epoch"], e["val_srcc"], e["path"]) for e in ranking] == [
        (1, 2, 0.9, "epoch-0002"), (2, 4, 0.8, "epoch-0004")]
    assert sorted(p.name for p in top.iterdir()) == ["epoch-0002", "epoch-0004", "ranking.json"]  # 3 dropped
    best = load_file(str(run_dir / "checkpoints" / "best" / "model.safetensors"))
    assert_identical(load_file(str(top / "epoch-0002" / "model.safetensors")), best)
    assert_identical(load_file(str(top / "epoch-0004" / "model.safetensors")), final_weights(run_dir))
    assert json.loads((top / "epoch-0004" / "metrics.json").read_text())["epoch"] == 4
