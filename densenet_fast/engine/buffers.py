"""Block buffers (channels-last feature maps) and the scratch arena."""

from __future__ import annotations

import contextlib
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
    """Named temporaries of a stage pass (one stage's forward or backward),
    shared by its layers.

    ``with arena.scope():`` opens a pass's set on the calling thread; inside it
    ``get(name, shape, like)`` returns a view of a flat tensor that grows to the
    pass's largest request under that name, so a pass allocates one tensor per
    role (for example the bottleneck output) however many layers it has.  A name
    stands for one role: two requests under one name alias each other.  The set
    is freed when the pass ends, so between passes nothing is held: a later,
    smaller block does not keep an earlier block's scratch, nor a backward the
    forward's.  Sets are never shared: every pass has its own, whichever thread
    runs it (threads that call a model at once, autograd's CUDA device thread)
    and in whichever mode (inference tensors made under
    ``torch.inference_mode()`` never reach code running outside it).  Outside a
    pass ``get`` returns a tensor of its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # per thread: the set of the pass it is running, if any

    def scope(self) -> contextlib.AbstractContextManager:
        """A pass's set, from entry to exit (a context manager)."""
        if torch.compiler.is_compiling():  # a compiled graph plans its own memory
            return contextlib.nullcontext()
        return self._pass()

    @contextlib.contextmanager
    def _pass(self):
        outer = getattr(self._local, "slots", None)
        try:
            self._local.slots = {}
            yield
        finally:
            self._local.slots = outer

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        slots = getattr(self._local, "slots", None)
        if slots is None or torch.compiler.is_compiling():
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        slot = slots.get(name)
        if slot is None or slot.numel() < numel or slot.dtype != like.dtype or slot.device != like.device:
            slots.pop(name, None)  # free the old storage before allocating the new one
            slot = slots[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return slot[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes the calling thread's pass in progress holds (0 outside a pass)."""
        slots = getattr(self._local, "slots", None) or {}
        return sum(t.numel() * t.element_size() for t in slots.values())

    def __deepcopy__(self, memo) -> "ScratchArena":
        return ScratchArena()

    def __reduce__(self):
        return ScratchArena, ()
