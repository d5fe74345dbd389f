"""The one rule for scaling a sharded loss so data-parallel averaging gives the single-process gradient."""

from __future__ import annotations

import torch

from .core.comm import group_size


def sharded_loss(local_sum: torch.Tensor, *, numel: int, group=None, averaged: bool = True) -> torch.Tensor:
    """Per-rank loss from the sum of a per-element loss over this rank's rows.

    Arguments:
        local_sum: sum of the per-element loss over this rank's own rows (and its whole local batch).
        numel: element count of the whole, unsharded batch on this data-parallel replica (what a single process
            would divide by to take the mean).
        group: the spatial group (S ranks) the rows are split over.
        averaged: ``True`` when gradients are *averaged* over all ranks afterwards (DDP, DeepSpeed, accelerate).
            ``False`` when they are *summed* over the spatial group instead (a plain ``all_reduce(SUM)``).

    Returns:
        ``S * local_sum / numel`` (averaged) or ``local_sum / numel`` (summed).

    Why: in a world of D data-parallel replicas x S spatial ranks, DDP averages gradients over all D*S ranks. The
    mean loss of one replica's batch is the sum over its S ranks of ``local_sum / numel``; the average over D*S
    ranks of ``S * local_sum / numel`` is the average over the D replicas of that mean, which is exactly the
    single-process mean loss over the global batch (replicas of equal batch size).
    """
    scale = group_size(group) if averaged else 1
    return local_sum * (scale / numel)
