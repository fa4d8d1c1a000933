"""iqa_dist: distributed training of Swin HyperIQA for blind image quality assessment.

``from iqa_dist import Scorer`` (see :mod:`iqa_dist.scorer`) is imported on first use:
importing the package alone loads no torch, so the command-line tools start fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scorer import Scorer

__all__ = ["Scorer"]


def __getattr__(name: str) -> Any:
    if name == "Scorer":
        from .scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'iqa_dist' has no attribute {name!r}")
