"""densenet_fast: a drop-in, faster and leaner DenseNet for PyTorch.

``from densenet_fast import densenet121`` gives torchvision's DenseNet-121
(same module tree and ``state_dict``) whose dense blocks run as
memory-efficient autograd Functions over one shared buffer per block.
"""

from . import _extension
from .backends import BACKEND_NAMES, BackendUnavailableError, available_backends
from .models import (DenseNet, densenet121, densenet161, densenet169, densenet201, densenet264, densenet_bc,
                     from_torchvision, load_torchvision_weights)
from .planner import MemoryBudgetError, plan

__version__ = "0.1.0"

_extension.load()  # warns once if the C++ extension is missing

__all__ = [
    "BACKEND_NAMES", "BackendUnavailableError", "DenseNet", "MemoryBudgetError", "available_backends", "densenet121",
    "densenet161", "densenet169", "densenet201", "densenet264", "densenet_bc", "from_torchvision",
    "load_torchvision_weights", "plan",
]
