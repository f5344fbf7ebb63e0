"""Block buffers (channels-last feature maps) and the scratch arena."""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor


def channels_last_empty(n: int, channels: int, spatial: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised ``(N, C, *spatial)`` tensor whose channels are innermost in
    memory (channels-last for any number of spatial dimensions).  It is not a view,
    so it may be returned from an autograd Function and modified in place."""
    strides = [1]
    for size in (channels, *reversed(spatial[1:])):
        strides.append(strides[-1] * size)
    spatial_strides = strides[1:][::-1]
    batch_stride = channels * math.prod(spatial)
    return torch.empty_strided((n, channels, *spatial), (batch_stride, 1, *spatial_strides),
                               dtype=like.dtype, device=like.device)


def leading_channels(buffer: Tensor, channels: int) -> Tensor:
    """``buffer[:, :channels]`` as a tensor of its own: the same memory, but not
    an autograd view and with its own version counter.  A stage's input lives
    there and is saved for backward, while the stage writes the buffer's other
    channels; those writes must not count as modifying the input.  (Under
    ``torch.compile``, which plans memory itself, a plain view.)"""
    view = buffer[:, :channels]
    if torch.compiler.is_compiling():
        return view
    alias = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
    return alias.set_(buffer.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def pixels(t: Tensor) -> Tensor:
    """The ``(N, *spatial, C)`` view of a channels-last ``(N, C, *spatial)`` tensor."""
    return t.movedim(1, -1)


def rows(t: Tensor) -> Tensor:
    """The ``(M, C)`` view (``M = N * prod(spatial)`` pixels) of a channels-last
    ``(N, C, *spatial)`` tensor or channel range of one; never a copy."""
    return pixels(t).view(-1, t.shape[1])


class ScratchArena:
    """Named temporaries reused by every layer and block of a model.

    ``get(name, shape, like)`` returns a view of a persistent flat tensor that
    grows to the largest request ever made under that name, so a training step
    allocates no temporaries once warmed up.  A name stands for one role (for
    example the bottleneck output): two requests under one name alias each other.

    Slots belong to the calling thread and to the inference mode they were made
    in: threads that run a model concurrently never share scratch (each holds
    its own, so every such thread costs one more set of slots), and inference
    tensors made under ``torch.inference_mode()`` are never handed to code running
    outside it.  Copies of a model (``copy.deepcopy``, pickling) start empty.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def _slots(self) -> dict[str, Tensor]:
        per_mode = getattr(self._local, "per_mode", None)
        if per_mode is None:
            per_mode = self._local.per_mode = ({}, {})
        return per_mode[torch.is_inference_mode_enabled()]

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # a compiled graph plans its own memory
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        slots = self._slots()
        slot = slots.get(name)
        if slot is None or slot.numel() < numel or slot.dtype != like.dtype or slot.device != like.device:
            slots.pop(name, None)  # free the old storage before allocating the new one
            slot = slots[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return slot[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held for the calling thread (both modes)."""
        per_mode = getattr(self._local, "per_mode", ({}, {}))
        return sum(t.numel() * t.element_size() for slots in per_mode for t in slots.values())

    def release(self) -> None:
        """Free the calling thread's temporaries (they are re-created on next use)."""
        self._local.per_mode = ({}, {})

    def __deepcopy__(self, memo) -> "ScratchArena":
        return ScratchArena()

    def __reduce__(self):
        return ScratchArena, ()
