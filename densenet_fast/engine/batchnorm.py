"""BatchNorm as the engine runs it: folded into per-channel coefficients, with
the running-statistics rules of ``nn.BatchNorm1d/2d/3d``, and batch statistics
optionally synchronised over a process group.

Folding: ``a = x * scale + shift`` with ``scale = gamma * rstd`` and
``shift = beta - mean * scale``, where ``(mean, rstd)`` are the batch statistics
(training, or no running statistics) or the running ones (eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..backends.interface import Backend, RunningUpdate, stats_dtype

Stats = tuple[Tensor, Tensor]


def uses_batch_stats(bn: _BatchNorm) -> bool:
    """torch's BatchNorm rule: batch statistics in training or without running ones."""
    return bn.training or bn.running_mean is None


def check_values_per_channel(count: int, shape: tuple[int, ...]) -> None:
    """torch's BatchNorm check on batch statistics (``count`` values per channel)."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(shape)}")


@dataclass
class Folded:
    """One BatchNorm folded for one forward: ``coeffs`` ``(4, C)`` holds the rows
    ``scale, shift, mean, rstd`` (a snapshot: later changes of the module do not
    reach it); ``batch_mean`` is ``None`` for running statistics, else the
    between-passes reduction of the backward (see backends.interface)."""

    coeffs: Tensor
    batch_mean: Optional[Callable[[Tensor], Tensor]]
    eps: float

    # the rows of ``coeffs``, each (C,)
    scale = property(lambda self: self.coeffs[0])
    shift = property(lambda self: self.coeffs[1])
    mean = property(lambda self: self.coeffs[2])
    rstd = property(lambda self: self.coeffs[3])


class BatchStatistics:
    """Batch statistics of one forward over ``count`` local values per channel,
    merged over the processes of ``group`` when it is set (synchronised BN)."""

    def __init__(self, group, count: int) -> None:
        self.group = group
        self.count = count
        self._global_count: Optional[int] = None

    def merge(self, local: Stats) -> Stats:
        """Per-channel ``(mean, biased var)`` over all processes (Chan's formula)."""
        if self.group is None:
            return local
        mean, var = local
        packed = torch.stack([torch.full_like(mean, self.count), mean, var])
        gathered = [torch.empty_like(packed) for _ in range(torch.distributed.get_world_size(self.group))]
        torch.distributed.all_gather(gathered, packed, group=self.group)
        counts, means, variances = torch.stack(gathered).unbind(1)
        total = counts.sum(0)
        global_mean = (counts * means).sum(0) / total
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / total
        return global_mean, global_var

    def global_count(self) -> int:
        """Values per channel over all processes."""
        if self.group is None:
            return self.count
        if self._global_count is None:
            total = torch.tensor([self.count], dtype=torch.float64)
            torch.distributed.all_reduce(total, group=self.group)
            self._global_count = int(total.item())
        return self._global_count

    def batch_mean(self) -> Callable[[Tensor], Tensor]:
        """Maps local per-channel sums ``(2, C)`` to their means over the whole batch."""
        total = self.global_count()
        if self.group is None:
            return lambda sums: sums / total
        group = self.group

        def synchronised(sums: Tensor) -> Tensor:
            sums = sums.clone()
            torch.distributed.all_reduce(sums, group=group)
            return sums / total

        return synchronised


def running_update(bn: _BatchNorm, count: int) -> Optional[RunningUpdate]:
    """What a training forward on ``count`` values per channel does to ``bn``'s
    running statistics, as torch's BatchNorm does it where some of them are
    ``None``: without running statistics it only counts the batch; without a
    batch counter the factor is ``momentum`` (0: nothing moves, when that is None)."""
    if bn.running_mean is None or (bn.num_batches_tracked is None and bn.momentum is None):
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return None
    batches = bn.num_batches_tracked
    if batches is None:  # a counter of its own, whose count nobody reads
        batches = torch.zeros((), dtype=torch.long, device=bn.running_mean.device)
    return RunningUpdate(bn.running_mean, bn.running_var, batches, bn.momentum, count)


def fold(bn: _BatchNorm, weight: Optional[Tensor], bias: Optional[Tensor], batch: Optional[Stats],
         statistics: BatchStatistics, data_dtype: torch.dtype, input_shape: tuple[int, ...],
         backend: Backend, out: Optional[Tensor] = None) -> Folded:
    """Fold ``bn`` (affine parameters ``weight``/``bias`` as the caller passed them)
    for one forward of input ``input_shape`` with ``backend``; with batch
    statistics, ``batch`` is their ``(mean, biased var)`` (already merged) and
    the running statistics are updated once, as torch's BatchNorm would.
    ``out``: a ``(4, C)`` tensor (statistics dtype) to hold the coefficients."""
    if uses_batch_stats(bn):
        check_values_per_channel(statistics.global_count(), input_shape)
        mean, var = batch
        update = running_update(bn, statistics.global_count()) if bn.training and bn.track_running_stats else None
        batch_mean = statistics.batch_mean()
    else:
        dtype = stats_dtype(data_dtype)
        mean, var = bn.running_mean.to(dtype), bn.running_var.to(dtype)
        update = batch_mean = None
    return Folded(backend.fold_batchnorm(mean, var, weight, bias, bn.eps, update, out), batch_mean, bn.eps)
