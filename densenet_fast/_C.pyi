"""The compiled extension ``densenet_fast._C`` (built from ``csrc/``).

Importing it registers these torch ops (with CPU, CUDA when built, and Meta
kernels; call them through ``torch.ops.densenet_fast``):

``channel_stats(Tensor x, Tensor shift) -> (Tensor sum, Tensor sumsq)`` (csrc/ops/channel_stats.h)
    The sums that ``CppBackend.channel_stats`` forms mean and variance from.
    ``x``: ``(M, C)`` float32/float64/float16/bfloat16 with channel stride 1 and
    row stride >= C, e.g. a channel range ``buffer.view(M, C_total)[:, c0:c1]``
    of a channels-last buffer.  ``shift``: ``(C,)`` float64 on ``x``'s device.
    Returns ``(C,)`` float64 sums over the rows of ``x - shift`` and
    ``(x - shift)**2``, accumulated in float64 (in a fixed order on the CPU and
    on CUDA: the same result on every run).

The fused BatchNorm-ReLU ops: ``bn_relu``, ``bn_relu_backward_sums`` and
``bn_backward_finish`` (csrc/ops/bn_relu.h; CPU and CUDA kernels), and
``bn_relu_conv1x1``, ``transition`` and their ``*_backward_sums``
(csrc/ops/bn_relu_conv.h; CPU kernels only).  ``x`` is a
channel range ``(M, C)`` of a channels-last buffer (channel stride 1), or
``(N, *spatial, C)`` with 1 to 3 spatial dimensions for the transition;
float32, float64 or bfloat16, and on the CPU float16 (other dtypes raise).  ``scale``, ``shift``,
``mean``, ``rstd`` are ``(C,)`` in the statistics dtype (float64 for float64
data, else float32): ``a = x * scale + shift``, ``z = relu(a)``,
``xhat = (x - mean) * rstd``, ``dA = dL/da``.  Arguments marked ``!`` are
written in place.  NaN and Inf propagate as in ``torch.relu`` and
``BatchNorm2d``: ``relu(NaN) = NaN``, ``dA = 0`` where ``a <= 0`` (``dA`` passes
where ``a`` is NaN, as in ``threshold_backward``), and the sums take
``dA * xhat`` from every pixel.

``bn_relu_conv1x1(x, scale, shift, weight (K, C), out (M, K)!, with_stats) -> (mean, var)``
    ``out = z @ weight.T``; biased ``(mean, var)`` of ``out`` ``(K,)`` if
    ``with_stats``, else two empty tensors.
``bn_relu_conv1x1_backward_sums(x, scale, shift, mean, rstd, weight, grad_out (M, K), grad_x!) -> (grad_weight, sums)``
    Pass 1 of the backward: ``grad_x += scale * dA``; ``grad_weight (K, C)``,
    ``sums (2, C) = [sum dA, sum dA * xhat]``.
``bn_relu(x, scale, shift, out (M, C)!) -> ()``
    ``out = z``.
``bn_relu_backward_sums(x, scale, shift, mean, rstd, grad_z, grad_x!) -> sums``
    Pass 1: ``grad_x = scale * dA`` (``grad_x`` may be ``grad_z``).
``transition(x (N, *spatial, C), scale, shift, weight (K, C), out (N, *spatial // 2, K)!) -> ()``
    ``out = avgpool2(z) @ weight.T``: average pooling by 2 along each spatial
    dimension (windows of 2, 2x2 or 2x2x2 pixels; odd sizes drop their last pixel).
``transition_backward_sums(x, scale, shift, mean, rstd, weight, grad_out, grad_x!) -> (grad_weight, sums)``
    Pass 1: ``grad_x = scale * dA`` (zero where pooling drops pixels).
``bn_backward_finish(x (M, C), scale, mean, rstd, batch_means (2, C), grad_x!) -> ()``
    Pass 2, with ``batch_means = [mean dA, mean dA * xhat]`` over the batch:
    ``grad_x -= scale * (batch_means[0] + xhat * batch_means[1])``.
"""

def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this extension."""
    ...
