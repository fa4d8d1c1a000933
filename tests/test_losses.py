"""L1 + pairwise ranking loss against brute-force definitions; across processes."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from iqa_dist.losses import global_iqa_loss, iqa_loss, ranking_loss


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


# ---------------------------------------------------------------- over the global batch

ALPHA, WORLD = 0.5, 2


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1, dtype=torch.float64)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 4, (12,), generator=g).double()  # ties within and across ranks


def rank_step(rank: int, port: int, out: Path) -> None:
    """One DDP backward of ``global_iqa_loss`` on this rank's half of the global batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(tiny_model())
        x, y = global_batch()
        mine = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        pred = model(x[mine])[:, 0]
        pred.retain_grad()
        loss = global_iqa_loss(pred, y[mine], alpha=ALPHA, margin=0.1)
        loss.backward()  # DDP averages the parameters' gradients over the ranks
        torch.save({"loss": loss.detach(), "l1": F.l1_loss(pred, y[mine]).detach(), "pred_grad": pred.grad,
                    "grads": [p.grad for p in model.parameters()]}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranking_loss_on_two_ranks_equals_one_process_on_the_global_batch(tmp_path) -> None:
    torch.multiprocessing.spawn(rank_step, args=(free_port(), tmp_path), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    model, (x, y) = tiny_model(), global_batch()
    pred = model(x)[:, 0]
    pred.retain_grad()
    loss = iqa_loss(pred, y, alpha=ALPHA, margin=0.1)
    loss.backward()
    ranking = loss.item() - F.l1_loss(pred, y).item()
    assert ranking > 0.01  # the pairs matter here
    for r in ranks:  # each rank: its own L1, the global batch's ranking term
        assert (r["loss"] - r["l1"]).item() == pytest.approx(ranking, abs=1e-12)
        for got, expected in zip(r["grads"], (p.grad for p in model.parameters())):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert sum(r["loss"].item() for r in ranks) / WORLD == pytest.approx(loss.item(), abs=1e-12)
    # what DDP averages: each rank's gradient on its predictions, over the ranks
    torch.testing.assert_close(torch.cat([r["pred_grad"] for r in ranks]) / WORLD, pred.grad, rtol=0, atol=1e-12)
