"""Training loss: L1 on the label scale plus a pairwise ranking hinge, whose pairs span
the batch of all processes."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def ranking_loss(pred: torch.Tensor, target: torch.Tensor, margin: float = 0.1) -> torch.Tensor:
    """Mean over pairs with different labels of ``relu(margin - (p_i - p_j) * sign(y_i - y_j))``.

    Pairs with equal labels (the diagonal included) carry no order and are left out;
    a batch without any ordered pair gives 0.
    """
    pred, target = pred.reshape(-1), target.reshape(-1).to(pred.dtype)
    order = torch.sign(target[:, None] - target[None, :])
    hinge = torch.relu(margin - (pred[:, None] - pred[None, :]) * order)
    ordered = order != 0
    return torch.where(ordered, hinge, 0.0).sum() / ordered.sum().clamp(min=1)


def iqa_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5,
             margin: float = 0.1) -> torch.Tensor:
    """``L1 + alpha * ranking_loss``; alpha 0 is plain L1 (and skips the B x B pairs)."""
    l1 = F.l1_loss(pred.reshape(-1), target.reshape(-1).to(pred.dtype))
    if alpha == 0:
        return l1
    return l1 + alpha * ranking_loss(pred, target, margin)


def global_iqa_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5,
                    margin: float = 0.1) -> torch.Tensor:
    """``iqa_loss`` of this process's slice, its ranking term over the global batch.

    Each of N processes (equal local batches) gets L1 on its own slice plus ``alpha *`` the
    ranking loss over the pairs of all N slices, so the ranking value is the same everywhere.
    DDP and DeepSpeed average gradients over processes: the L1 means average into the global
    mean, but only this slice carries the ranking term's gradient here (the others arrive
    detached), so that gradient is multiplied by N for the average to be the whole term's.
    Then N processes take the same step as one process on the concatenated batch. With
    ``grad_accum`` k, the pairs span one micro step of all processes, never several micro
    steps: N processes x k micro steps equal one process x k micro steps N times larger.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if alpha == 0 or world == 1:
        return iqa_loss(pred, target, alpha, margin)
    preds, targets = gather_batch(pred, target)
    return iqa_loss(pred, target, alpha=0) + alpha * _ScaleGrad.apply(ranking_loss(preds, targets, margin), world)


def gather_batch(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions and labels of every process in rank order (one all-gather; the batches
    must be of equal size); only this process's predictions keep their gradient."""
    local = torch.stack([pred.reshape(-1).detach(), target.reshape(-1).to(pred.dtype)])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    preds = [part[0] for part in parts]
    preds[dist.get_rank()] = pred.reshape(-1)
    return torch.cat(preds), torch.cat([part[1] for part in parts])


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``factor``: the value logged stays the loss's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None
