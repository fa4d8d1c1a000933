"""L1 + pairwise ranking loss against brute-force definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iqa_dist.losses import iqa_loss, ranking_loss


def brute_ranking(pred: torch.Tensor, target: torch.Tensor, margin: float) -> float:
    terms = [max(0.0, margin - (pred[i] - pred[j]).item() * (1 if target[i] > target[j] else -1))
             for i in range(len(pred)) for j in range(len(pred)) if i != j and target[i] != target[j]]
    return sum(terms) / len(terms) if terms else 0.0


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(12, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (12,), generator=g).double()  # four levels: many ties
    return pred, target


@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5])
def test_ranking_loss_equals_double_loop(batch, margin: float) -> None:
    pred, target = batch
    assert ranking_loss(pred, target, margin).item() == pytest.approx(brute_ranking(pred, target, margin), abs=1e-12)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_iqa_loss_is_l1_plus_weighted_ranking(batch, alpha: float) -> None:
    pred, target = batch
    expected = (pred - target).abs().mean().item() + alpha * brute_ranking(pred, target, 0.1)
    assert iqa_loss(pred, target, alpha=alpha, margin=0.1).item() == pytest.approx(expected, abs=1e-12)


def test_alpha_zero_is_exactly_l1(batch) -> None:
    pred, target = batch
    assert torch.equal(iqa_loss(pred, target, alpha=0.0), F.l1_loss(pred, target))


@pytest.mark.parametrize("target", [torch.full((5,), 3.0), torch.tensor([3.0])], ids=["all-tied", "batch-of-1"])
def test_no_ordered_pair_gives_zero_ranking_and_finite_grads(target: torch.Tensor) -> None:
    pred = torch.rand(len(target), requires_grad=True)
    assert ranking_loss(pred, target).item() == 0.0
    loss = iqa_loss(pred, target, alpha=0.5)
    loss.backward()
    assert loss.item() == pytest.approx(F.l1_loss(pred, target).item())
    assert torch.isfinite(pred.grad).all()


def test_ranking_gradient_pushes_pairs_apart() -> None:
    pred = torch.tensor([0.5, 0.5], requires_grad=True)
    ranking_loss(pred, torch.tensor([1.0, 0.0])).backward()
    assert pred.grad[0] < 0 < pred.grad[1]  # descent raises the better one, lowers the worse
