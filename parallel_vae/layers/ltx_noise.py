"""Per-pixel noise on row shards that is the unmodified model's noise, row for row.

A layer that adds ``torch.randn((H, W))`` over its whole frame (LTX-Video's decoder noise injection) would, run on
a shard, draw an (H_r, W) field: different numbers, and different ones on every rank, so the shards would not even
form one field. Here every rank draws the whole frame's (H, W) field exactly as the unmodified layer does (same
call, same generator, same shape), so every rank's generator advances as the unmodified model's would and later
draws stay in step; the field of group rank 0 is then broadcast and each rank keeps its own rows. The result is the
unmodified model's noise whenever group rank 0's generator is in the state the unmodified model's would be in
(seed it as you would seed a single process), and one consistent field over the group even when the ranks' generators
differ. The noise is a constant (no gradient), so the broadcast needs no backward.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..core.comm import _all_to_all_start, _broadcast, _wait_tensor, all_gather_sizes, group_rank, group_size

__all__ = ["frame_noise", "canvas_noise"]


def frame_noise(
    rows: int,
    width: int,
    group,
    *,
    generator: Optional[torch.Generator] = None,
    device: torch.device,
    dtype: torch.dtype,
    sizes: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """This rank's ``rows`` rows of ``torch.randn((H, width), generator=generator)`` over the whole frame, where H
    is the sum of every rank's ``rows`` (shards may differ in size). ``sizes``: every rank's rows, from the agreed
    split (``SpatialState.level_sizes``); ``None``: one small all-gather and a host read find them."""
    if group_size(group) == 1:
        return torch.randn((rows, width), generator=generator, device=device, dtype=dtype)
    if sizes is None:
        sizes = all_gather_sizes(rows, group, device)
    full = torch.randn((sum(sizes), width), generator=generator, device=device, dtype=dtype)
    _broadcast(full, group, src=0)
    start = sum(sizes[: group_rank(group)])
    return full.narrow(0, start, rows)


def canvas_noise(
    shape: Sequence[int],
    rows: int,
    group,
    *,
    sizes: Sequence[int],
    generator=None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """This rank's ``rows`` rows (dim -2) of diffusers' ``randn_tensor(shape, generator=generator)`` over the whole
    canvas (``shape[-2]`` = the sum of ``sizes``, every rank's rows): the starting noise of a diffusion decoder
    (LTX-2.5's ``x_t``). Every rank draws the whole canvas exactly as the unmodified model does, so every generator
    advances alike (a list of per-sample generators included); group rank 0 then sends each rank its rows of its
    canvas (one all-to-all: each rank receives its own rows only). Equal to the unmodified model's noise when rank
    0's generator is in the state a single process's would be. A constant: no backward."""
    from diffusers.utils.torch_utils import randn_tensor

    full = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
    if group_size(group) == 1:
        return full
    me = group_rank(group)
    # (.., rows, W) -> (rows, .., W): the all-to-all splits dim 0; only rank 0 sends
    send = full.movedim(-2, 0) if me == 0 else full.movedim(-2, 0).narrow(0, 0, 0)
    send_splits = list(sizes) if me == 0 else [0] * len(sizes)
    recv_splits = [rows] + [0] * (len(sizes) - 1)
    recv = _wait_tensor(_all_to_all_start(send.contiguous(), recv_splits, send_splits, group), "p2p")
    return recv.movedim(0, -2).contiguous()
