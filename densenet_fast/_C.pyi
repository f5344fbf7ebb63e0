"""The compiled extension ``densenet_fast._C`` (built from ``csrc/``).

Importing it registers these torch ops (with CPU, CUDA when built, and Meta
kernels; call them through ``torch.ops.densenet_fast``):

``channel_sums(Tensor x, Tensor shift) -> (Tensor sum, Tensor sumsq)``
    ``x``: ``(M, C)`` float32/float64/float16/bfloat16 with channel stride 1 and
    row stride >= C, e.g. a channel range ``buffer.view(M, C_total)[:, c0:c1]``
    of a channels-last buffer.  ``shift``: ``(C,)`` float64 on ``x``'s device.
    Returns ``(C,)`` float64 sums over the rows of ``x - shift`` and
    ``(x - shift)**2``, accumulated in float64.
"""

def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this extension."""
    ...
