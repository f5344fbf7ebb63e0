"""Loads the compiled extension ``densenet_fast._C`` (its ops are registered
under ``torch.ops.densenet_fast``).  Without it the package runs on the
pure-PyTorch backend and says so once."""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Optional

_module: Optional[ModuleType] = None
_error: Optional[str] = None


def load() -> Optional[ModuleType]:
    """The extension module, or ``None`` (with one warning) if it cannot be loaded.
    Tried once (remembered in globals, not with ``functools.cache``, whose
    wrapper torch.compile warns that it ignores when it traces a backend's choice)."""
    global _module, _error
    if _module is None and _error is None:
        try:
            from . import _C
        except ImportError as exc:
            _error = str(exc) or type(exc).__name__
            warnings.warn(f"densenet_fast: the C++ extension is not available ({_error}); "
                          f"using the pure-PyTorch backend", RuntimeWarning, stacklevel=2)
        else:
            _module = _C
    return _module


def load_error() -> Optional[str]:
    load()
    return _error


def has_cuda() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    ext = load()
    return ext is not None and bool(ext.has_cuda())
