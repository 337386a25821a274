"""Chunked SSD on directed lines (Mamba-2's algorithm), written from the maths in plain torch.

Algorithm: the chunked "state space duality" algorithm of Dao & Gu, *Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality* (ICML 2024),
Sec. 6. On a directed line with ``A_{t, t-1} = a_t`` the Chimera output is exactly Mamba-2's
(Prop. 3.3): ``h_t = a_t h_{t-1} + B_t x_tᵀ``, ``y_t = C_tᵀ h_t``.

With the line cut into chunks of ``Q`` positions, the resolvent ``L`` splits into diagonal blocks
(pairs inside one chunk) and off-diagonal blocks (pairs in different chunks). Off-diagonal blocks
have rank ``N``: a path from chunk ``c'`` to chunk ``c`` leaves ``c'`` through its last position,
so it factors into "decay to the end of ``c'``", the chunk-level decays in between, and "decay
from the start of ``c``". Hence, per (batch, head):

1. diagonal blocks: ``Y_in = (L_c ∘ C_c B_cᵀ) X_c`` with the chunk's own 1-D mask ``L_c``;
2. each chunk's contribution to the state at its end: ``S_c = (e_c ⊙ B_c)ᵀ X_c`` with
   ``e_c[t] = `` decay from position ``t`` to the chunk's end;
3. states at every chunk end, ``Z = L_chunks S`` with ``L_chunks`` the 1-D mask over chunks
   built from each chunk's total decay (a line of ``T / Q`` nodes: the same helper as step 1);
   the state entering chunk ``c`` is ``Z_{c-1}`` (zero for the first chunk);
4. off-diagonal blocks: ``Y_out = (f_c ⊙ C_c) Z_{c-1}`` with ``f_c[t]`` the decay from the
   chunk's start to ``t``.

Cost ``O(T Q (N + P) + T N P + (T/Q)^2 N P)``; every step is a batched matmul.

On CUDA, :func:`mix_ssd` hands the same computation to fla-core's Triton kernels when the
optional ``fla`` extra is installed (:mod:`chimera.ops.triton.fla_line`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chimera.ops.masks import decay_mask, safe_log
from chimera.topology import Topology


def _to_chunks(x: Tensor, Q: int) -> Tensor:
    """``(b, T, h, k)`` with ``T`` a multiple of ``Q`` -> ``(b, h, T/Q, Q, k)``."""
    b, T, h, k = x.shape
    return x.reshape(b, T // Q, Q, h, k).permute(0, 3, 1, 2, 4)


def ssd_chunked(X: Tensor, log_a: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64) -> Tensor:
    """``y_t = C_tᵀ h_t``, ``h_t = a_t h_{t-1} + B_t x_tᵀ`` (``h_{-1} = 0``).

    Args:
        X: ``(b, T, h, P)`` inputs; B, C: ``(b, T, h, N)``.
        log_a: ``(b, h, T)`` log-decays ``ln a_t`` (entry 0 is unused).
        chunk_size: ``Q``; the sequence is zero-padded to a multiple of it.
    """
    b, T, h, P = X.shape
    Q = max(1, min(chunk_size, T))
    pad = (-T) % Q
    if pad:  # zero inputs after the end change nothing before it
        X, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, B, C))
        log_a = F.pad(log_a, (0, pad))
    Xc, Bc, Cc = (_to_chunks(t, Q) for t in (X, B, C))  # (b, h, n_chunks, Q, ·)
    n_chunks = Xc.shape[2]
    la = log_a.reshape(b, h, n_chunks, Q)
    # the decay into a chunk's first position belongs to the chunk boundary, not to the chunk
    la_inside = F.pad(la[..., 1:], (1, 0))
    from_start = torch.cumsum(la_inside, dim=-1)  # log decay from the chunk's start to t
    total = from_start[..., -1:]  # log decay across the whole chunk (start -> end)

    # 1. pairs inside one chunk: the quadratic masked form
    scores = Cc @ Bc.transpose(-1, -2)  # (b, h, c, Q, Q)
    Y = (decay_mask(la_inside) * scores) @ Xc
    # 2. every chunk's own contribution to the state at its last position
    to_end = torch.exp(total - from_start).unsqueeze(-1)  # (b, h, c, Q, 1)
    S = (Bc * to_end).transpose(-1, -2) @ Xc  # (b, h, c, N, P)
    # 3. states at all chunk ends through the 1-D mask over chunks; log_chunk[c] is the decay
    #    from the end of chunk c-1 to the end of chunk c (boundary edge + inside)
    log_chunk = la[..., 0] + total.squeeze(-1)  # (b, h, c)
    Z = (decay_mask(log_chunk) @ S.flatten(-2)).view_as(S)
    Z_in = F.pad(Z[:, :, :-1], (0, 0, 0, 0, 1, 0))  # state entering each chunk
    # 4. read the entering state out, decayed from the chunk boundary to t
    from_boundary = torch.exp(from_start + la[..., :1]).unsqueeze(-1)  # (b, h, c, Q, 1)
    Y = Y + (Cc * from_boundary) @ Z_in
    return Y.permute(0, 2, 3, 1, 4).reshape(b, n_chunks * Q, h, P)[:, :T]


def mix_ssd(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
            chunk_size: int = 64, backend: str = "auto") -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one directed line by the chunked SSD.

    ``backend``: ``"torch"`` (:func:`ssd_chunked`), ``"fla"`` (``fla-core``'s Triton kernels,
    :mod:`chimera.ops.triton.fla_line`: CUDA tensors only, fla's own chunk size) or ``"auto"``
    (fla for fp32/fp16/bf16 CUDA tensors when ``fla`` is installed, else torch).
    """
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
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
    if backend == "auto":
        from chimera.ops.triton.fla_line import fla_available

        backend = "fla" if (V.device.type == "cuda" and fla_available() and V.dtype in (
            torch.float32, torch.float16, torch.bfloat16)) else "torch"
    if backend == "fla":
        from chimera.ops.triton.fla_line import mix_ssd_fla

        return mix_ssd_fla(V, B, C, edge_weight, topo)
    b, T, h, _ = V.shape
    log_w = safe_log(edge_weight)
    # weight of the edge into each node; the first node of the line has none (its log is unused)
    log_a = log_w.new_zeros(b, h, T).index_copy(-1, topo.dst, log_w)
    if direction == -1:
        V, B, C, log_a = V.flip(1), B.flip(1), C.flip(1), log_a.flip(-1)
        return ssd_chunked(V, log_a, B, C, chunk_size).flip(1)
    return ssd_chunked(V, log_a, B, C, chunk_size)
