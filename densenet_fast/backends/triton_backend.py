"""The Triton backend: the primitives of :mod:`.interface` as fused Triton
kernels (:mod:`densenet_fast.backends.triton_kernels`; designs in docs/triton.md).

Runs on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
The kernels take fp32, fp16 and bf16 data; other dtypes (fp64) run the torch
backend's primitives, as the cpp backend does for the dtypes its kernels lack.
The transition kernels pool 2-D images; 1-D and 3-D transitions run the torch
backend's primitive too (the row primitives serve every number of spatial
dimensions).
BN coefficients and statistics are fp32.  No kernel adds values atomically
(the only atomics are arrival counters that pick which program reduces the
partials, in a fixed order), and unless
autotuning is switched on (``DENSENET_FAST_AUTOTUNE=1``, ignored under
``torch.use_deterministic_algorithms(True)``) each kernel's configuration
depends only on the shapes, dtype and device, so results are bit-identical
run to run.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from .triton_kernels import bn_relu_conv
from .triton_kernels.bn_fold import fold_batchnorm
from .triton_kernels.bn_relu import bn_relu
from .triton_kernels.channel_stats import channel_stats
from .triton_kernels.common import DATA_DTYPES, image, rows
from .extension_backend import native_dtypes_only, native_only
from .interface import Stats
from .torch_backend import TorchBackend

# x (N, H, W, C) of a 2-D transition in a dtype of the kernels
native_images_only = native_only(lambda backend, x: x.dtype in backend.native_dtypes and x.dim() == 4)


class TritonBackend(TorchBackend):
    name = "triton"
    native_dtypes = DATA_DTYPES

    @native_dtypes_only
    def fold_batchnorm(self, mean, var, weight, bias, eps, update):
        return fold_batchnorm(mean, var, weight, bias, eps, update)

    @native_dtypes_only
    def channel_stats(self, x: Tensor) -> Stats:
        return channel_stats(x)

    @native_dtypes_only
    def bn_relu_conv1x1(self, x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, out: Tensor,
                        with_stats: bool) -> Optional[Stats]:
        return bn_relu_conv.forward(rows(x), scale, shift, weight, rows(out), pool=1, with_stats=with_stats)

    @native_dtypes_only
    def bn_relu_conv1x1_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        return bn_relu_conv.backward(rows(x), scale, shift, mean, rstd, weight, rows(grad_out), rows(grad_x),
                                     pool=1, batch_mean=batch_mean, accumulate=True)

    @native_dtypes_only
    def bn_relu(self, x, scale, shift, out):
        bn_relu(x, scale, shift, out)

    @native_dtypes_only
    def bn_relu_backward(self, x, scale, shift, mean, rstd, grad_z, grad_x, batch_mean):
        _, grad_gamma, grad_beta = bn_relu_conv.backward(rows(x), scale, shift, mean, rstd, None, rows(grad_z),
                                                         rows(grad_x), pool=1, batch_mean=batch_mean,
                                                         accumulate=False)
        return grad_gamma, grad_beta

    @native_images_only
    def transition(self, x, scale, shift, weight, out):
        bn_relu_conv.forward(image(x), scale, shift, weight, image(out), pool=2, with_stats=False)

    @native_images_only
    def transition_backward(self, x, scale, shift, mean, rstd, weight, grad_out, grad_x, batch_mean):
        return bn_relu_conv.backward(image(x), scale, shift, mean, rstd, weight, image(grad_out), image(grad_x),
                                     pool=2, batch_mean=batch_mean, accumulate=False)
