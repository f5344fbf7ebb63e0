"""Triton kernels behind :class:`densenet_fast.backends.triton_backend.TritonBackend`.

One module per op: :mod:`.bn_fold` (BatchNorm coefficients and running
statistics), :mod:`.channel_stats` (stable per-channel statistics),
:mod:`.bn_relu` (BN-ReLU apply), :mod:`.bn_relu_conv` (the fused
BN-ReLU-[avg-pool]-Conv1x1 forward and its two-pass backward, which serve the
dense layers, the transitions and the BN-ReLU backward).  :mod:`.common` holds
the shared launch and addressing helpers.  See docs/triton.md.
"""
