"""Row counts without reading tensor values, for runs on tensors that hold none: ``FakeTensor`` and ``meta``.

Memory and FLOPs of real-scale shapes (a 1280x720x81 decode on 8 ranks) can be measured exactly on one CPU by
running the model on fake tensors, one rank at a time over a fake process group: every op still allocates (a fake
storage of the right size) and every collective is still called and counted, but no tensor holds values. Two
places of the real path read values a collective returned: the shape agreement (``api._agree``) and the row counts
of variable-size gathers (``comm.all_gather_sizes``). On fake tensors those values do not exist, so the row counts
come from the row arithmetic instead:

* the group's split in latent rows is the one the fake-rank driver declares with :func:`assume_split`; without
  one, the replicated split that the agreement worked out (:func:`record_split`), else every rank is assumed to
  hold as many rows as this one;
* a gathered tensor's rows on rank r are proportional to that rank's latent rows: every level of every family
  holds ``latent rows x 2**k`` rows (tokens: ``x width``), because shards start on latent rows.

The collectives themselves still run (on fake tensors, through the fake group), so traffic counts are the real
run's. Nothing here changes a run on real tensors: :func:`no_values` is False there and these helpers are not used.

``meta`` tensors are treated exactly like ``FakeTensor``: the device-conformance test
(``tests/test_meta_conformance.py``) runs every path with the model on ``meta`` over a ``meta:fake`` process group,
where a host read raises; so the no-values path must never read one either.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .sharding import ShardingError

__all__ = ["no_values", "is_fake", "assume_split", "record_split", "group_split", "proportional_sizes"]

# The group's split in latent rows, declared by a fake-rank driver, and the one the last replicated agreement
# computed. Fake runs only: both are read only when tensors are fake.
_declared: Optional[tuple[int, ...]] = None
_agreed: Optional[tuple[int, ...]] = None


def no_values(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no values (a ``FakeTensor``, or a tensor on the ``meta`` device): sizes must then come
    from the row arithmetic, never from reading what a collective returned."""
    return isinstance(t, FakeTensor) or t.device.type == "meta"


is_fake = no_values  # the older name


@contextlib.contextmanager
def assume_split(latent_rows: Sequence[int]) -> Iterator[None]:
    """Declare, for fake runs inside the block, that the group's ranks hold ``latent_rows`` latent rows each
    (group-rank order): what the real agreement would have gathered from the other ranks."""
    global _declared
    previous, _declared = _declared, tuple(int(r) for r in latent_rows)
    try:
        yield
    finally:
        _declared = previous


def record_split(latent_rows: Sequence[int]) -> None:
    """Remember the split a replicated agreement computed (fake runs), for the gathers of the same op."""
    global _agreed
    _agreed = tuple(int(r) for r in latent_rows)


def group_split(mine: int, size: int, rank: int) -> list[int]:
    """Latent rows of every rank, given this rank's ``mine``: the declared split, else the last agreed one, else
    ``mine`` everywhere. A declared split that does not give this rank ``mine`` rows is an error."""
    split = _declared if _declared is not None else _agreed
    if split is None or len(split) != size:
        return [mine] * size
    if split[rank] != mine:
        raise ShardingError(f"fake run: rank {rank} holds {mine} latent rows but the assumed split is {list(split)}")
    return list(split)


def proportional_sizes(rows: int, size: int, rank: int) -> list[int]:
    """Rows of every rank of a gathered tensor of which this rank holds ``rows``, from the group's latent split."""
    split = _declared if _declared is not None else _agreed
    if split is None or len(split) != size:
        return [rows] * size
    per_latent, rest = divmod(rows, split[rank])
    if rest:
        raise ShardingError(f"fake run: {rows} rows are not a multiple of this rank's {split[rank]} latent rows")
    return [s * per_latent for s in split]
