"""Backend registry: which implementation of the primitives (the contract in
:mod:`.interface`) runs a model.

Every backend is one row of :data:`BACKENDS`: its name, where its class lives,
the devices it runs on and what it needs.  ``None`` chooses per device the
first row, in table order, that runs there: CUDA -> triton, cuda, torch;
CPU -> cpp, torch.  The environment variable ``DENSENET_FAST_BACKEND``
overrides ``None``.  Asking for a backend that is not available raises
:class:`BackendUnavailableError`; there is no silent fallback (each backend
itself runs the torch backend's primitive for the dtypes its kernels lack).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from .interface import Backend

ENV_VAR = "DENSENET_FAST_BACKEND"

__all__ = ["Backend", "BACKENDS", "BACKEND_NAMES", "BackendUnavailableError", "available_backends",
           "get_backend", "resolve_backend_name", "wrong_device"]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no device, not installed)."""


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _extension_missing() -> Optional[str]:
    from .. import _extension
    if _extension.load() is None:
        return f"the C++ extension densenet_fast._C is not built or failed to load ({_extension.load_error()})"
    return None


def _cuda_kernels_missing() -> Optional[str]:
    from .. import _extension
    reason = _extension_missing()
    if reason is not None:
        return reason
    if not _extension.has_cuda():
        return "the C++ extension was built without its CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _triton_missing() -> Optional[str]:
    try:
        from . import triton_backend  # noqa: F401
    except ImportError as exc:
        return f"Triton kernels cannot be imported ({exc})"
    if not torch.cuda.is_available() and not _interpreting_triton():
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run Triton on the CPU)"
    return None


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """One backend: ``load()`` returns its class, which implements :class:`.interface.Backend` for
    tensors on ``runs_on(device)`` (in words: ``tensors``); automatic choice
    takes it only for the device types ``chosen_for`` (``None``: any);
    ``missing()`` says why it cannot be used in this process (``None``: it can)."""
    name: str
    load: Callable[[], type[Backend]]
    runs_on: Callable[[torch.device], bool]
    tensors: str
    chosen_for: Optional[tuple[str, ...]]
    missing: Callable[[], Optional[str]]

    def chosen_automatically(self, device: torch.device) -> bool:
        return ((self.chosen_for is None or device.type in self.chosen_for) and self.runs_on(device)
                and self.missing() is None)


# The classes are imported by import statements, which torch.compile traces (importlib it does not).
def _triton_class() -> type[Backend]:
    from .triton_backend import TritonBackend
    return TritonBackend


def _cuda_class() -> type[Backend]:
    from .extension_backend import CudaBackend
    return CudaBackend


def _cpp_class() -> type[Backend]:
    from .extension_backend import CppBackend
    return CppBackend


def _torch_class() -> type[Backend]:
    from .torch_backend import TorchBackend
    return TorchBackend


BACKENDS = (  # in order of preference for automatic choice
    BackendSpec("triton", _triton_class,
                runs_on=lambda device: device.type == "cuda" or (device.type == "cpu" and _interpreting_triton()),
                tensors="CUDA tensors, and CPU ones with TRITON_INTERPRET=1 set", chosen_for=("cuda",),
                missing=_triton_missing),
    BackendSpec("cuda", _cuda_class, runs_on=lambda device: device.type == "cuda", tensors="CUDA tensors",
                chosen_for=("cuda",), missing=_cuda_kernels_missing),
    BackendSpec("cpp", _cpp_class, runs_on=lambda device: device.type == "cpu", tensors="CPU tensors",
                chosen_for=("cpu",), missing=_extension_missing),
    BackendSpec("torch", _torch_class, runs_on=lambda device: True, tensors="any tensors", chosen_for=None,
                missing=lambda: None),
)
BACKEND_NAMES = ("torch", "cpp", "cuda", "triton")  # reference first, as users list them
_BY_NAME = {spec.name: spec for spec in BACKENDS}


def _spec(name: str) -> BackendSpec:
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or None for automatic")
    return _BY_NAME[name]


def available_backends() -> list[str]:
    """The backends this process can use, in :data:`BACKEND_NAMES` order."""
    return [name for name in BACKEND_NAMES if _BY_NAME[name].missing() is None]


def resolve_backend_name(name: Optional[str]) -> Optional[str]:
    """Validate a user's backend choice (``None`` reads ``DENSENET_FAST_BACKEND``)."""
    source = ""
    if name is None:
        name = os.environ.get(ENV_VAR) or None
        if name is None:
            return None
        source = f" (from the environment variable {ENV_VAR})"
    if not isinstance(name, str) or name.lower() not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}{source}; choose one of {BACKEND_NAMES} or None for automatic")
    name = name.lower()
    reason = _BY_NAME[name].missing()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r}{source} is not available: {reason}")
    return name


_instances: dict[str, Backend] = {}


def _instance(name: str) -> Backend:
    """The one instance of backend ``name`` (a dict, not ``functools.cache``,
    whose wrapper torch.compile warns that it ignores)."""
    if name not in _instances:
        _instances[name] = _spec(name).load()()
    return _instances[name]


def wrong_device(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run on tensors on ``device`` (``None``: it can;
    an unknown name raises)."""
    spec = _spec(name)
    return None if spec.runs_on(device) else f"the {name} backend runs on {spec.tensors}, not on {device.type} ones"


def get_backend(name: Optional[str], device: torch.device) -> Backend:
    """The backend instance for tensors on ``device`` (``name=None``: automatic)."""
    if name is None:
        return _instance(next(spec.name for spec in BACKENDS if spec.chosen_automatically(device)))
    reason = wrong_device(name, device)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return _instance(name)
