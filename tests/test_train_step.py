"""The training step as the loop runs it: its loss, and the same gradients from one rank,
two ranks and accumulation (the loop's own step, not a toy one)."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port
from real_step import first_gradients
from test_train import REPO, machinery_config, run
from iqa_dist.train import Trainer


def brute_force_loss(preds: list[float], labels: list[float], alpha: float, margin: float) -> float:
    """L1 plus alpha times the mean hinge over the ordered pairs, pair by pair."""
    n = len(preds)
    l1 = sum(abs(p - y) for p, y in zip(preds, labels)) / n
    hinges = [max(0.0, margin - (preds[i] - preds[j]) * (1 if labels[i] > labels[j] else -1))
              for i in range(n) for j in range(n) if labels[i] != labels[j]]
    return l1 + alpha * sum(hinges) / len(hinges)


def test_the_train_step_returns_l1_plus_alpha_times_the_ranking_loss(small_shards, tmp_path):
    alpha, margin = 0.7, 0.3
    cfg = machinery_config(small_shards, tmp_path / "run", dropout_rate=0.0, drop_path_rate=0.0,
                           ranking_loss_alpha=alpha, ranking_loss_margin=margin)
    trainer = Trainer(cfg)
    try:
        seen = []  # the predictions of the step's own forward
        trainer.model.register_forward_hook(lambda module, args, out: seen.append(out.detach().float()))
        data = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (4, cfg.patch_size, cfg.patch_size, 3), dtype=torch.uint8, generator=data)
        labels = torch.tensor([0.2, 0.9, 0.5, 0.7])
        loss = trainer.train_step(images, labels).item()
    finally:
        trainer.stop.restore()
        trainer.lock.release()
    preds = seen[0].reshape(-1).tolist()
    expected = brute_force_loss(preds, labels.tolist(), alpha, margin)
    assert loss == pytest.approx(expected, rel=1e-6)
    # the test tells the configured alpha and margin from none and from the defaults
    for other in (brute_force_loss(preds, labels.tolist(), 0.0, margin),
                  brute_force_loss(preds, labels.tolist(), alpha, 0.1)):
        assert abs(other - expected) > 1e-2


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Equal up to float rounding of sums taken in another order."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a)


@pytest.mark.slow
def test_one_rank_two_ranks_and_accumulation_take_the_same_step(small_shards, tmp_path):
    """Global batch 8: with the ranking loss on (alpha 0.5), 2 ranks x 4 equal 1 rank x 8, its
    pairs gathered over the ranks; accumulation (1 rank x 4 x 2) ranks within each micro step,
    so it differs there and equals 1 rank x 8 with L1 alone (alpha 0)."""
    def one_rank(name: str, accum: int, alpha: float) -> dict[str, torch.Tensor]:
        return first_gradients(str(small_shards), str(tmp_path / name), 8, accum, alpha)

    whole, accumulated = one_rank("whole", 1, 0.5), one_rank("accumulated", 2, 0.5)
    whole_l1, accumulated_l1 = one_rank("whole-l1", 1, 0.0), one_rank("accumulated-l1", 2, 0.0)
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "launch/cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "tests" / "real_step.py"), str(small_shards), str(tmp_path / "two"),
               str(tmp_path / "two.safetensors"), "8", "1", "0.5"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) x batch 4 x 1 accumulation" in out.stdout
    two = load_file(str(tmp_path / "two.safetensors"))
    assert max(g.abs().max().item() for g in whole.values()) > 1e-3  # a step with something in it
    assert close(two, whole)
    assert close(accumulated_l1, whole_l1)
    assert not close(accumulated, whole) and not close(whole_l1, whole)  # the ranking term is in the step
