"""1-D decay masks shared by the chunked SSD and the grid row sweeps.

On a directed line with log-decays ``l_k = ln a_k``, the resolvent ``(I - A)^-1`` is the lower
triangular matrix ``L[i, j] = exp(l_{j+1} + ... + l_i)`` for ``i >= j`` (the product of the edge
weights on the path ``j -> i``; the diagonal is ``exp(0) = 1``). Both helpers build that matrix
along the last axis; every other axis is a batch axis.
"""

from __future__ import annotations

import torch
from torch import Tensor


def segsum(x: Tensor) -> Tensor:
    """``out[..., i, j] = sum_{k=j+1}^{i} x[..., k]`` for ``i >= j``, ``-inf`` above the diagonal.

    Computed as a cumulative sum down each column of the strictly-lower-masked ``x`` rather
    than as a difference of prefix sums, so long sequences with large decays lose no precision
    (the difference of two large cumulative sums would cancel catastrophically).
    """
    T = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, T)  # xx[..., i, j] = x[..., i]
    idx = torch.arange(T, device=x.device)
    # index comparisons rather than torch.tril: tril of a bool matrix was measured at several ms
    # per call on these CPUs, dominating small problems
    out = torch.cumsum(xx.masked_fill(idx[:, None] <= idx[None, :], 0), dim=-2)
    return out.masked_fill(idx[:, None] < idx[None, :], float("-inf"))


def decay_mask(log_a: Tensor) -> Tensor:
    """The 1-D resolvent ``L (..., T, T)`` of a directed line from its log-decays ``(..., T)``;
    entry ``0`` of ``log_a`` (the decay into the first node) is never used."""
    return torch.exp(segsum(log_a))


def safe_log(a: Tensor) -> Tensor:
    """``ln a`` for non-negative weights; a weight that underflowed to 0 becomes ``ln(tiny)``,
    i.e. a decay that is 0 to working precision, instead of ``-inf`` (whose gradient is NaN)."""
    return torch.log(a.clamp(min=torch.finfo(a.dtype).tiny))
