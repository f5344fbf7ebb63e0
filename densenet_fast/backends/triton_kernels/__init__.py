"""Triton kernels behind :class:`densenet_fast.backends.triton_backend.TritonBackend`.

One module per op: :mod:`.bn_fold` (BatchNorm coefficients and running
statistics), :mod:`.channel_stats` (stable per-channel statistics),
:mod:`.bn_relu` (BN-ReLU apply), :mod:`.bn_relu_conv` (the fused
BN-ReLU-[avg-pool]-Conv1x1 forward and its two-pass backward, which serve the
dense layers, the transitions and the BN-ReLU backward).  :mod:`.common` holds
the shared launch and addressing helpers.  Importing the package registers
each module's ops, ``torch.ops.densenet_fast_triton.*``.  See docs/triton.md.
"""

from . import bn_fold, bn_relu, bn_relu_conv, channel_stats  # noqa: F401  (registers the ops)
