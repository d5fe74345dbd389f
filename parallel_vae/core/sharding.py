"""Sharding arithmetic: how rows are split over the ranks of a spatial group.

Everything here is plain integer arithmetic with no communication, so it can be
tested exhaustively and called identically on every rank.

Rows are split in units of *latent* rows. A latent row is ``factor`` pixel rows
(8 for Wan2.1, 16 for Wan2.2), and every intermediate level of the encoder and
decoder holds ``latent_rows * 2**k`` rows for some k >= 0. A shard that starts
on a latent row therefore starts on an even row at every level that has a
stride-2 downsample, which is what makes uneven splits exact
(see docs/how-it-works.md, "Sharding and alignment").
"""

from __future__ import annotations

from typing import Sequence


class ShardingError(ValueError):
    """An input that cannot be split over the spatial group (raised identically on every rank)."""


def row_split(rows: int, parts: int) -> list[int]:
    """Balanced split of ``rows`` into ``parts`` positive counts; the first ranks take the extra rows.

    ``row_split(7, 3) == [3, 2, 2]``. Raises :class:`ShardingError` if ``rows < parts``.
    """
    if parts < 1:
        raise ShardingError(f"cannot split over {parts} ranks")
    if rows < parts:
        raise ShardingError(f"{rows} rows cannot be split over {parts} ranks: every rank needs at least one row")
    base, extra = divmod(rows, parts)
    return [base + 1 if r < extra else base for r in range(parts)]


def row_offsets(sizes: Sequence[int]) -> list[int]:
    """Start row of each shard: the exclusive prefix sum of ``sizes``."""
    offsets, total = [], 0
    for s in sizes:
        offsets.append(total)
        total += s
    return offsets


def scale_sizes(sizes: Sequence[int], factor: int) -> list[int]:
    """Row counts of the same split at a level ``factor`` times finer (pixel rows from latent rows)."""
    return [s * factor for s in sizes]


def check_latent_height(latent_rows: int, world: int, factor: int, min_rows: int = 1) -> None:
    """Raise :class:`ShardingError` unless ``latent_rows`` can be split over ``world`` ranks with at least
    ``min_rows`` latent rows each (more than 1 where a layer's halo is deeper than one latent row of its level)."""
    if latent_rows < world * min_rows:
        need = "one latent row" if min_rows == 1 else f"{min_rows} latent rows (this model's halos need them)"
        raise ShardingError(
            f"latent height {latent_rows} is too small for a spatial group of {world} ranks: "
            f"every rank needs at least {need}, so the minimum is {world * min_rows} latent rows "
            f"({world * min_rows * factor} pixel rows at spatial factor {factor})"
        )


def nearest_valid(pixel_rows: int, factor: int, world: int = 1, min_rows: int = 1) -> list[int]:
    """The multiples of ``factor`` nearest to ``pixel_rows`` that also leave every one of ``world`` ranks
    ``min_rows`` latent rows."""
    lower = (pixel_rows // factor) * factor
    minimum = factor * world * min_rows
    cands = sorted({max(c, minimum) for c in (lower, lower + factor) if c > 0} or {minimum})
    return cands


def check_pixel_height(pixel_rows: int, world: int, factor: int, min_rows: int = 1) -> None:
    """Raise :class:`ShardingError` unless ``pixel_rows`` is a multiple of ``factor`` with >= ``world * min_rows``
    latent rows."""
    if pixel_rows % factor != 0:
        near = " or ".join(str(c) for c in nearest_valid(pixel_rows, factor, world, min_rows))
        raise ShardingError(
            f"pixel height {pixel_rows} is not a multiple of the spatial factor {factor}; "
            f"nearest heights that work: {near} (the minimum for {world} ranks is {factor * world * min_rows})"
        )
    check_latent_height(pixel_rows // factor, world, factor, min_rows)


def level_sizes(split: Sequence[int], rows: int, rank: int) -> list[int]:
    """Rows of every rank at a level where rank ``rank`` holds ``rows``, given the group's split in latent rows.

    Every level of every family holds ``latent rows x k`` rows (tokens: ``x width``) with the same ``k`` on every
    rank, because shards start on latent rows; so the sizes follow from the agreed split with no communication.
    ``level_sizes([3, 2, 2], 12, 1) == [18, 12, 12]``. Raises :class:`ShardingError` when ``rows`` is not a
    multiple of this rank's latent rows (a tensor that does not belong to the agreed split).
    """
    mine = split[rank]
    per_latent, rest = divmod(rows, mine)
    if rest or mine <= 0:
        raise ShardingError(
            f"{rows} rows on rank {rank} do not follow the agreed split {list(split)} (latent rows per rank): "
            "this tensor is not part of the encode/decode the group agreed on"
        )
    return [s * per_latent for s in split]
