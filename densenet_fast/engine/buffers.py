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
    """Named temporaries reused by every layer and block of a model.

    ``get(name, shape, like)`` returns a view of a persistent flat tensor that
    grows to the largest request ever made under that name, so a training step
    allocates no temporaries once warmed up.  A name stands for one role (for
    example the bottleneck output): two requests under one name alias each other.

    A set of slots serves one queue of work, and a pass (a stage's forward or
    backward) holds it for its whole length: ``with arena.turn(like):``, inside
    which every ``get`` uses that set (outside any turn, ``get`` returns a
    tensor of its own).  On the CPU the queue is the calling
    thread: threads that run a model concurrently never share scratch (each
    holds a set of its own).  On CUDA it is the current stream, on which work
    runs in order, so the next pass may reuse the memory as soon as it is
    queued (as the caching allocator reuses blocks); passes from several
    threads on one stream take turns, and autograd's device thread, which runs
    CUDA backward passes on their forward's stream, uses the forward's set
    instead of holding a second one.  Sets are kept apart by inference mode too:
    inference tensors made under ``torch.inference_mode()`` are never handed to
    code running outside it.  Copies of a model (``copy.deepcopy``, pickling)
    start empty.
    """

    def __init__(self) -> None:
        self._local = threading.local()  # per thread: its CPU sets and the set of the turn it is in
        self._streams: dict[tuple, tuple[threading.RLock, dict[str, Tensor]]] = {}  # per CUDA stream and mode
        self._streams_lock = threading.Lock()

    def _thread_sets(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        per_mode = getattr(self._local, "per_mode", None)
        if per_mode is None:
            per_mode = self._local.per_mode = ({}, {})
        return per_mode

    @staticmethod
    def _queue(like: Tensor):
        """The stream ``like``'s work is queued on (a hashable key), or ``None``:
        the calling thread."""
        if like.device.type != "cuda":
            return None
        stream = torch.cuda.current_stream(like.device)
        return stream.device_index, stream.stream_id

    def turn(self, like: Tensor) -> contextlib.AbstractContextManager:
        """Hold the set of ``like``'s queue while a pass runs (a context manager)."""
        if torch.compiler.is_compiling():  # a compiled graph plans its own memory
            return contextlib.nullcontext()
        mode = torch.is_inference_mode_enabled()
        queue = self._queue(like)
        if queue is None:
            return self._holding(contextlib.nullcontext(), self._thread_sets()[mode])
        with self._streams_lock:
            lock, slots = self._streams.setdefault((queue, mode), (threading.RLock(), {}))
        return self._holding(lock, slots)

    @contextlib.contextmanager
    def _holding(self, lock, slots: dict[str, Tensor]):
        with lock:
            outer = getattr(self._local, "turn", None)
            if outer is slots:  # a pass inside a pass would overwrite the outer one's temporaries
                raise RuntimeError("ScratchArena.turn inside a turn on the same set of slots")
            self._local.turn = slots
            try:
                yield
            finally:
                self._local.turn = outer

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        slots = getattr(self._local, "turn", None)
        # a compiled graph plans its own memory; outside a turn (code that torch.compile traced with no
        # turn, run eagerly after all) nothing may be shared: a tensor of its own
        if slots is None or torch.compiler.is_compiling():
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = math.prod(shape)
        slot = slots.get(name)
        if slot is None or slot.numel() < numel or slot.dtype != like.dtype or slot.device != like.device:
            slots.pop(name, None)  # free the old storage before allocating the new one
            slot = slots[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return slot[:numel].view(shape)

    def _reachable_sets(self) -> list[dict[str, Tensor]]:
        with self._streams_lock:
            return [*self._thread_sets(), *(slots for _, slots in self._streams.values())]

    def nbytes(self) -> int:
        """Bytes held for the calling thread: its own sets and every CUDA stream's (both modes)."""
        # list(): one step, so that a pass on another thread adding a slot meanwhile does not break the iteration
        return sum(t.numel() * t.element_size() for slots in self._reachable_sets() for t in list(slots.values()))

    def release(self) -> None:
        """Free the calling thread's sets and every CUDA stream's (they are re-created
        on next use; a pass in progress keeps what it holds until it ends)."""
        self._local.per_mode = ({}, {})
        with self._streams_lock:
            self._streams = {}

    def __deepcopy__(self, memo) -> "ScratchArena":
        return ScratchArena()

    def __reduce__(self):
        return ScratchArena, ()
