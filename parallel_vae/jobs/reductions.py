"""The recipes' metric reductions, on the activations' device.

NCCL has no CPU backend: a collective on a CPU tensor fails there with "No backend type associated with device type
cpu" (gloo, which CI uses, accepts it, so only a GPU run would show it). Every number the recipes sum over ranks
(validation PSNR/SSIM totals, the logged loss terms) therefore goes through :func:`sum_over_ranks`, which builds
its tensor on the device the model runs on and reads the result back with one host read for all the numbers.
Object collectives (``Runtime.gather_object``: ``all_gather_object``) are not this helper's business: torch moves
their byte tensors to the current CUDA device itself, which accelerate sets per rank.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

__all__ = ["sum_over_ranks", "reduce_on_device"]

Number = Union[float, int, torch.Tensor]


def reduce_on_device(values: Sequence[Number], device: torch.device, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """forward: the element-wise sum over ``group``'s ranks of ``values`` (float64, one vector on ``device``), no
    host read. Tensors among ``values`` (0-d or one element, on ``device``) join without leaving the device."""
    parts = [
        v.detach().reshape(()).to(device=device, dtype=torch.float64)
        if isinstance(v, torch.Tensor)
        else torch.full((), float(v), dtype=torch.float64, device=device)
        for v in values
    ]
    total = torch.stack(parts)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total


def sum_over_ranks(values: Sequence[Number], device: torch.device, group: Optional[dist.ProcessGroup] = None) -> list[float]:
    """The element-wise sums over ``group`` of ``values``, as Python floats (one host read for all of them)."""
    return reduce_on_device(values, device, group).tolist()
