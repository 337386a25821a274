"""Chunked SSD (Mamba-2's "state space duality" algorithm) for directed lines, in plain torch.

On a directed line with ``A_{t, t-1} = a_t`` the Chimera output is exactly Mamba-2's
(Prop. 3.3). The sequence is cut into chunks of length ``Q``: inside a chunk the quadratic SMA
form is used, between chunks the ``N x P`` states are passed with a scan over chunk boundaries.
Cost ``O(T Q (N + P) + T N P)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chimera.topology import Topology


def segsum(x: Tensor) -> Tensor:
    """``out[..., i, j] = sum_{k=j+1}^{i} x[..., k]`` for ``i >= j``, ``-inf`` above the diagonal,
    computed by masked cumulative sums (no subtraction of large cumulative sums)."""
    T = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, T)
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0)
    out = torch.cumsum(xx, dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked(X: Tensor, log_a: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64) -> Tensor:
    """``y_t = C_tᵀ h_t``, ``h_t = a_t h_{t-1} + B_t x_tᵀ`` with ``log_a (b, h, T)``;
    ``X (b, T, h, P)``, ``B, C (b, T, h, N)``."""
    b, T, h, _ = X.shape
    Q = max(1, min(chunk_size, T))
    pad = (-T) % Q
    if pad:
        X = F.pad(X, (0, 0, 0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, pad))
    c = (T + pad) // Q
    X, B, C = (t.reshape(b, c, Q, *t.shape[2:]) for t in (X, B, C))
    la = log_a.reshape(b, h, c, Q)
    cum = torch.cumsum(la, dim=-1)

    # 1. within chunks: the quadratic (SMA) form
    Lc = torch.exp(segsum(la))  # (b, h, c, Q, Q)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, Lc, X)
    # 2. state at the end of every chunk from its own inputs
    decay_to_end = torch.exp(cum[..., -1:] - cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchnp", B, decay_to_end, X)
    # 3. pass states across chunk boundaries (a scan over c chunks, in SMA form)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(cum[..., -1], (1, 0))))  # (b, h, c+1, c+1)
    states = torch.einsum("bhzc,bchnp->bzhnp", chunk_decay, states)[:, :-1]
    # 4. read the incoming state out at every position
    y = y + torch.einsum("bclhn,bchnp,bhcl->bclhp", C, states, torch.exp(cum))
    return y.reshape(b, c * Q, h, -1)[:, :T]


def mix_ssd(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
            chunk_size: int = 64) -> Tensor:
    direction = topo.line_direction()
    if direction == 0:
        raise ValueError(
            f"method='ssd' needs a directed line (edges t -> t+1 only, or t+1 -> t only), got "
            f"'{topo.name}'; decompose undirected lines with .dags() first"
        )
    if topo.num_graphs != 1:
        raise ValueError("method='ssd' supports one line per topology (batch the tensor dim)")
    if bool((edge_weight < 0).any()):
        raise ValueError("method='ssd' works in log space and needs non-negative weights")
    b, T, h, _ = V.shape
    # a weight that underflowed to 0 becomes ln(tiny): the decay is then 0 to working precision
    log_w = torch.log(edge_weight.clamp(min=torch.finfo(edge_weight.dtype).tiny))
    # weight of the edge into each node; the first node of the line has none (its log is unused)
    log_a = log_w.new_zeros(b, h, T).index_copy(-1, topo.dst, log_w)
    if direction == -1:
        V, B, C, log_a = V.flip(1), B.flip(1), C.flip(1), log_a.flip(-1)
        return ssd_chunked(V, log_a, B, C, chunk_size).flip(1)
    return ssd_chunked(V, log_a, B, C, chunk_size)
