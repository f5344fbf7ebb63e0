"""The memory-efficient dense-stage engine (see docs/engine.md).

- :mod:`.stage`: the autograd Function that runs a dense block and its tail
  over one channels-last buffer, and :func:`run_stage`;
- :mod:`.batchnorm`: BatchNorm folding, running statistics, synchronised statistics;
- :mod:`.buffers`: block buffers and the scratch arena;
- :mod:`.reference`: the plain recomputation behind double backward;
- :mod:`.fastpath`: when the engine may stand in for the modules.
"""

from .buffers import ScratchArena
from .stage import HeadTail, NoTail, Settings, StageFunction, Tail, TransitionTail, run_stage

__all__ = ["HeadTail", "NoTail", "ScratchArena", "Settings", "StageFunction", "Tail", "TransitionTail", "run_stage"]
