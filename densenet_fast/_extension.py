"""Loads the compiled extension ``densenet_fast._C`` (its ops are registered
under ``torch.ops.densenet_fast``).  Without it the package runs on the
pure-PyTorch backend and says so once."""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from typing import Optional

_error: Optional[str] = None


@functools.cache
def load() -> Optional[ModuleType]:
    """The extension module, or ``None`` (with one warning) if it cannot be loaded."""
    global _error
    try:
        from . import _C
    except ImportError as exc:
        _error = str(exc) or type(exc).__name__
        warnings.warn(f"densenet_fast: the C++ extension is not available ({_error}); "
                      f"using the pure-PyTorch backend", RuntimeWarning, stacklevel=2)
        return None
    return _C


def load_error() -> Optional[str]:
    load()
    return _error


def has_cuda() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels."""
    ext = load()
    return ext is not None and bool(ext.has_cuda())
