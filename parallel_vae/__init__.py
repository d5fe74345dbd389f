"""parallel_vae: exact, differentiable, spatially parallel diffusers VAEs (Wan, Qwen-Image, HunyuanVideo,
HunyuanVideo-1.5, AutoencoderKL, Flux.2; ``parallel_vae.families.FAMILIES``).

Public API (see README.md and docs/api.md):

* :func:`enable_spatial_parallelism` / :func:`disable_spatial_parallelism`: in place on an unmodified model.
* replicated mode: ``vae.encode(x)`` / ``vae.decode(z)`` with full inputs on every rank of the group.
* sharded mode: :func:`sharded_encode` / :func:`sharded_decode` on this rank's rows, with :func:`shard_video`,
  :func:`shard_latents`, :func:`gather_shards` and :func:`local_rows`.
* :func:`sharded_loss`: the per-rank loss scaling for DDP / DeepSpeed averaging.
* :func:`decode_for_reward`: a frozen VAE's decode with the gradient flowing to the latents.
* communication primitives (autograd Functions): :func:`halo_exchange`, :func:`scatter_rows`, :func:`gather_rows`.
"""

import importlib

# Imported on first use (PEP 562), so that `import parallel_vae.jobs.cli` -- the recipes' --help -- does not load
# torch and diffusers.
_LAZY = {
    "metrics": ".jobs.metrics",
    **dict.fromkeys(
        ["disable_spatial_parallelism", "enable_spatial_parallelism", "gather_shards", "is_spatially_parallel",
         "local_rows", "shard_latents", "shard_video", "sharded_decode", "sharded_encode", "spatial_group",
         "spatial_size", "SpatialTimeoutError", "PeerFailure"],
        ".api",
    ),
    "decode_video": ".pipeline",
    "encode_video": ".pipeline",
    "disable_gradient_checkpointing": ".checkpointing",
    "enable_gradient_checkpointing": ".checkpointing",
    "gather_rows": ".core.comm",
    "halo_exchange": ".core.comm",
    "scatter_rows": ".core.comm",
    "sharded_loss": ".loss",
    "decode_for_reward": ".reward",
    "ShardingError": ".core.sharding",
    "row_offsets": ".core.sharding",
    "row_split": ".core.sharding",
    "spatial_factor": ".families",
}  # fmt: skip


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "metrics" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
    "decode_for_reward",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
    "halo_exchange",
    "scatter_rows",
    "gather_rows",
    "ShardingError",
    "SpatialTimeoutError",
    "PeerFailure",
    "row_split",
    "row_offsets",
    "spatial_factor",
]
