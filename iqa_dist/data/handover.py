"""Batches that loader workers hand to the main process in shared memory they reuse.

A worker's batch reaches the main process in shared memory, which torch allocates
afresh for every batch. Writing fresh pages is slow (page faults and zeroing: about
1 ms per MB on a virtual machine), a third of what cutting the patches costs. So each
worker keeps a few buffers and refills one only once the main process has let go of
it: a buffer's last byte is a flag that the worker sets when it fills the buffer and
the main process clears when the tensor it received is freed (a finalizer). A buffer
still held is never written; when every buffer is held, the worker allocates another.

In the main process the handed-over tensor is an ordinary uint8 tensor: nothing a
consumer does with it (keeping it, viewing it, pinning it) can see a later batch.
"""
from __future__ import annotations

import math
import os
import weakref

import torch

FREE, HELD = 0, 1
KEPT = 4  # buffers kept per size: the DataLoader's prefetch (2), the batch in use, one more

_buffers: dict[int, list[torch.UntypedStorage]] = {}  # per worker process
# A forked process starts with none: two workers must never write into one inherited buffer.
os.register_at_fork(after_in_child=lambda: _buffers.clear())


def _flag(storage: torch.UntypedStorage, nbytes: int) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, nbytes, (1,))


def buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor of ``shape`` in shared memory that nothing else holds, marked held."""
    nbytes = math.prod(shape)
    kept = _buffers.setdefault(nbytes, [])
    storage = next((s for s in kept if int(_flag(s, nbytes)) == FREE), None)
    if storage is None:
        storage = torch.UntypedStorage._new_shared(nbytes + 1)
        if len(kept) < KEPT:
            kept.append(storage)
    _flag(storage, nbytes).fill_(HELD)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


class Handover:
    """A worker's buffer tensor in a batch; unpickled in the main process, it is the tensor
    itself, whose buffer goes back to the worker when the tensor is freed."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def __reduce__(self) -> tuple:
        return _arrived, (self.tensor,)


def _arrived(tensor: torch.Tensor) -> torch.Tensor:
    weakref.finalize(tensor, _flag(tensor.untyped_storage(), tensor.numel()).fill_, FREE)
    return tensor
