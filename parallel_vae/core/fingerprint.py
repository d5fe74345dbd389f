"""A cheap fingerprint of a tensor's contents, so that the ranks of a replicated encode/decode can check that they
all hold the same input (the agreement in ``api._agree`` sends it in its existing all-gather).

A rank that drew its input with an unseeded ``torch.randn`` has the right shape and different contents: without
this check the op runs and every rank receives an output stitched from rows of different inputs.

The fingerprint is three float64 sums over a fixed strided sample of at most ``SAMPLE`` elements (every
``numel // SAMPLE``-th element of the flattened tensor, the same positions on every rank): the sum, the sum of
squares and a position-weighted sum (so that a permutation of the same values is caught too). It is computed on the
tensor's device, as int64 words (the float64 bit patterns), so it rides in the agreement's int64 table with no
extra collective and no extra device-to-host copy. A difference confined to elements outside the sample is not
detected: this catches the common mistake (different random inputs), not every possible one.
"""

from __future__ import annotations

import math

import torch

__all__ = ["SAMPLE", "WORDS", "fingerprint_words", "fingerprints_differ"]

SAMPLE = 1 << 16  # elements sampled at most
WORDS = 3  # int64 words a fingerprint takes in the agreement table


def fingerprint_words(x: torch.Tensor) -> torch.Tensor:
    """(WORDS,) int64 on ``x.device``: the bit patterns of the float64 sums described in the module docstring."""
    flat = x.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    sample = flat[::stride].double()
    weights = torch.arange(1, sample.numel() + 1, dtype=torch.float64, device=sample.device) / max(sample.numel(), 1)
    sums = torch.stack([sample.sum(), sample.square().sum(), (sample * weights).sum()])
    return sums.view(torch.int64)


def _floats(words: list[int]) -> list[float]:
    return torch.tensor(words, dtype=torch.int64).view(torch.float64).tolist()


def fingerprints_differ(a: list[int], b: list[int]) -> bool:
    """Whether two ranks' fingerprints (int64 words from the table) say their inputs differ.

    Equal bit patterns always agree; otherwise each sum must match to 1e-9 of its scale, which absorbs a different
    summation order on different hardware and nothing a real difference of inputs leaves (NaN matches NaN)."""
    if list(a) == list(b):
        return False
    for u, v in zip(_floats(a), _floats(b)):
        if math.isnan(u) and math.isnan(v):
            continue
        if not math.isclose(u, v, rel_tol=1e-9, abs_tol=1e-12):
            return True
    return False
