"""parallel_vae: exact, differentiable, spatially parallel Wan video VAE (diffusers ``AutoencoderKLWan``).

Public API (see README.md):

* :func:`enable_spatial_parallelism` / :func:`disable_spatial_parallelism`: in place on an unmodified model.
* replicated mode: ``vae.encode(x)`` / ``vae.decode(z)`` with full inputs on every rank of the group.
* sharded mode: :func:`sharded_encode` / :func:`sharded_decode` on this rank's rows, with :func:`shard_video`,
  :func:`shard_latents`, :func:`gather_shards` and :func:`local_rows`.
* :func:`sharded_loss`: the per-rank loss scaling for DDP / DeepSpeed averaging.
* communication primitives (autograd Functions): :func:`halo_exchange`, :func:`scatter_rows`, :func:`gather_rows`.
"""

from .jobs import metrics
from .api import (
    disable_spatial_parallelism,
    enable_spatial_parallelism,
    gather_shards,
    is_spatially_parallel,
    local_rows,
    shard_latents,
    shard_video,
    sharded_decode,
    sharded_encode,
    spatial_group,
    spatial_size,
)
from .pipeline import decode_video, encode_video
from .checkpointing import disable_gradient_checkpointing, enable_gradient_checkpointing
from .core.comm import gather_rows, halo_exchange, scatter_rows
from .loss import sharded_loss
from .core.sharding import ShardingError, row_offsets, row_split
from .families import spatial_factor

__version__ = "0.1.0"

__all__ = [
    "enable_spatial_parallelism",
    "disable_spatial_parallelism",
    "is_spatially_parallel",
    "spatial_group",
    "spatial_size",
    "decode_video",
    "encode_video",
    "sharded_encode",
    "sharded_decode",
    "shard_video",
    "shard_latents",
    "gather_shards",
    "local_rows",
    "sharded_loss",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "halo_exchange",
    "scatter_rows",
    "gather_rows",
    "ShardingError",
    "row_split",
    "row_offsets",
    "spatial_factor",
]
