"""Backend registry: which implementation of the primitives (see
:mod:`.interface`) runs a model.

Names: ``torch`` (reference, any device), ``cpp`` (the csrc extension on the
CPU), ``cuda`` (the csrc extension's CUDA kernels), ``triton`` (Triton kernels
on CUDA, or on the CPU under ``TRITON_INTERPRET=1``).  ``None`` chooses per
device: CUDA -> triton, cuda, torch; CPU -> cpp, torch (first available).
The environment variable ``DENSENET_FAST_BACKEND`` overrides ``None``.
Asking for a backend that is not available raises
:class:`BackendUnavailableError`; there is no silent fallback.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from .interface import Backend

BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")
ENV_VAR = "DENSENET_FAST_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}

__all__ = ["Backend", "BACKEND_NAMES", "BackendUnavailableError", "available_backends", "get_backend",
           "resolve_backend_name"]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no device, not installed)."""


def _unavailable_reason(name: str) -> Optional[str]:
    """``None`` if backend ``name`` can be used in this process, else why not."""
    if name == "torch":
        return None
    if name in ("cpp", "cuda"):
        from .. import _extension
        if _extension.load() is None:
            return f"the C++ extension densenet_fast._C is not built or failed to load ({_extension.load_error()})"
        if name == "cuda" and not _extension.has_cuda():
            return "the C++ extension was built without its CUDA kernels"
        if name == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        try:
            from . import triton_backend  # noqa: F401
        except ImportError as exc:
            return f"Triton kernels cannot be imported ({exc})"
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton on the CPU)"
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None for automatic")


def available_backends() -> list[str]:
    return [name for name in BACKEND_NAMES if _unavailable_reason(name) is None]


def resolve_backend_name(name: Optional[str]) -> Optional[str]:
    """Validate a user's backend choice (``None`` reads ``DENSENET_FAST_BACKEND``)."""
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is None:
            return None
    if not isinstance(name, str) or name.lower() not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None for automatic")
    name = name.lower()
    reason = _unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name


@functools.cache
def _instance(name: str) -> Backend:
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend()
    if name == "cpp":
        from .cpp_backend import CppBackend
        return CppBackend()
    if name == "cuda":
        from .cpp_backend import CudaBackend
        return CudaBackend()
    from .triton_backend import TritonBackend
    return TritonBackend()


def _device_ok(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The backend instance for tensors on ``device`` (``name=None``: automatic).
    Every backend runs the torch backend's primitive for dtypes its kernels lack."""
    if name is None:
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if _device_ok(candidate, device) and _unavailable_reason(candidate) is None:
                return _instance(candidate)
        return _instance("torch")
    if not _device_ok(name, device):
        raise BackendUnavailableError(f"backend {name!r} cannot run on {device.type} tensors")
    return _instance(name)
