"""Block buffers and the scratch arena (DESIGN.md §2.1, §2.5)."""

from __future__ import annotations

import torch
from torch import Tensor


def block_buffer(n: int, h: int, w: int, channels: int, like: Tensor) -> Tensor:
    """A dense block's feature (or gradient) buffer: ``(N, H, W, C)`` contiguous,
    i.e. channels-last; ``.permute(0, 3, 1, 2)`` is the logical NCHW view."""
    return torch.empty((n, h, w, channels), dtype=like.dtype, device=like.device)


def nchw(buffer: Tensor) -> Tensor:
    """The ``(N, C, H, W)`` view of an ``(N, H, W, C)`` buffer (no copy)."""
    return buffer.permute(0, 3, 1, 2)


class ScratchArena:
    """Named temporaries shared by every layer and block of a model.

    ``get(name, shape, like)`` returns a view of a persistent flat tensor that
    grows to the largest request ever made under that name and is reused
    afterwards, so a training step allocates no temporaries once warmed up.
    Two requests under the same name alias each other: a name stands for one
    role (for example the bottleneck output), never for two live tensors.
    """

    def __init__(self) -> None:
        self._slots: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # a traced graph plans its own memory; the dict would break it
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = 1
        for size in shape:
            numel *= size
        slot = self._slots.get(name)
        if slot is None or slot.numel() < numel or slot.dtype != like.dtype or slot.device != like.device:
            self._slots.pop(name, None)  # free the old storage before allocating the new one
            slot = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._slots[name] = slot
        return slot[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held by the arena."""
        return sum(t.numel() * t.element_size() for t in self._slots.values())

    def release(self) -> None:
        """Free every temporary (they are re-created on the next use)."""
        self._slots.clear()
