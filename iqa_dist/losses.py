"""Training loss: L1 on the label scale plus a pairwise ranking hinge."""
from __future__ import annotations

import torch
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
