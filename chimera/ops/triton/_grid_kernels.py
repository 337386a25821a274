"""Triton kernels of the grid corner DAG sweep (imported lazily by :mod:`chimera.ops.triton.grid`).

Like :mod:`chimera.ops.triton._kernels`, this module is imported on first use only, because
``triton.jit`` decides at decoration time whether it builds interpreted kernels
(``TRITON_INTERPRET=1``); :data:`INTERPRETED` records which kind was built. The design and its
justification are in :mod:`chimera.ops.triton.grid`; this file holds the three kernels:

* :func:`_grid_fwd_kernel`: the row-by-row forward sweep. ``WRITE_Y`` stores ``y = Cᵀ h`` (the
  forward pass), ``STORE_H`` stores the states (the backward's recomputation).
* :func:`_grid_bwd_kernel`: the adjoint sweep from the last row up, reading the recomputed
  states.

Frame: the kernels see an ``R x S`` array of nodes (``S`` = the axis scanned inside a step,
``R`` = the sequential steps). ``node_of[r, s]`` is the node id (row of ``V, B, C, Y``) at frame
position ``(r, s)``; ``a_s[r, s]`` is the weight of the edge ``(r, s-1) -> (r, s)`` (0 for
``s = 0``) and ``a_o[r, s]`` the weight of ``(r-1, s) -> (r, s)`` (0 for ``r = 0``). Any corner,
either orientation, is a choice of ``node_of`` made on the host.

Program ``(p, h, b)`` owns value columns ``p*BLOCK_P ... (p+1)*BLOCK_P`` of batch ``b``, head
``h``, and keeps one frame row of states, a ``(BLOCK_S, BLOCK_N, BLOCK_P)`` tile, in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _first_order_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h = a2 (a1 h_prev + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _grid_fwd_kernel(
    V, Bm, Cm, A_s, A_o, node_of, Y, Hbuf,
    R, S, N, P,
    s_vb, s_vt, s_vh,
    s_bb, s_bt, s_bh,
    s_hb, s_ht, s_hh,
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    WRITE_Y: tl.constexpr, STORE_H: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    num_h = tl.num_programs(1).to(tl.int64)

    offs_s = tl.arange(0, BLOCK_S)
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_s = offs_s < S
    mask_n = offs_n < N
    mask_p = offs_p < P
    mask_sp = mask_s[:, None] & mask_p[None, :]
    mask_sn = mask_s[:, None] & mask_n[None, :]
    mask_snp = mask_sn[:, :, None] & mask_p[None, None, :]
    tile_np = offs_n[:, None] * P + offs_p[None, :]  # (N, P) contiguous inside H[b, t, h]

    v_base = V + pid_b * s_vb + pid_h * s_vh      # V and Y share strides
    y_base = Y + pid_b * s_vb + pid_h * s_vh
    b_base = Bm + pid_b * s_bb + pid_h * s_bh     # B and C share strides
    c_base = Cm + pid_b * s_bb + pid_h * s_bh
    a_off = (pid_b * num_h + pid_h) * R * S       # a_s, a_o: contiguous (b, h, R, S)
    h_base = Hbuf + pid_b * s_hb + pid_h * s_hh

    prev = tl.zeros((BLOCK_S, BLOCK_N, BLOCK_P), dtype=ACC)  # states of frame row r - 1
    for r in range(0, R):
        node = tl.load(node_of + r * S + offs_s, mask=mask_s, other=0).to(tl.int64)
        a_s = tl.load(A_s + a_off + r * S + offs_s, mask=mask_s, other=0.0).to(ACC)
        a_o = tl.load(A_o + a_off + r * S + offs_s, mask=mask_s, other=0.0).to(ACC)
        v = tl.load(v_base + node[:, None] * s_vt + offs_p[None, :], mask=mask_sp,
                    other=0.0).to(ACC)
        bk = tl.load(b_base + node[:, None] * s_bt + offs_n[None, :], mask=mask_sn,
                     other=0.0).to(ACC)
        # inputs of the row's 1-D recurrence: B v^T plus the state arriving from row r - 1
        x = bk[:, :, None] * v[:, None, :] + a_o[:, None, None] * prev
        coef = tl.broadcast_to(a_s[:, None, None], (BLOCK_S, BLOCK_N, BLOCK_P))
        _, h = tl.associative_scan((coef, x), 0, _first_order_combine)
        if STORE_H:
            ptr = h_base + node[:, None, None] * s_ht + tile_np[None, :, :]
            tl.store(ptr, h, mask=mask_snp)
        if WRITE_Y:
            cq = tl.load(c_base + node[:, None] * s_bt + offs_n[None, :], mask=mask_sn,
                         other=0.0).to(ACC)
            y = tl.sum(cq[:, :, None] * h, axis=1)
            tl.store(y_base + node[:, None] * s_vt + offs_p[None, :], y, mask=mask_sp)
        prev = h


@triton.jit
def _grid_bwd_kernel(
    V, Bm, Cm, A_s, A_o, node_of, dY, Hbuf,
    dV, dBp, dCp, dAsp, dAop,
    R, S, N, P,
    s_vb, s_vt, s_vh,
    s_bb, s_bt, s_bh,
    s_hb, s_ht, s_hh,
    s_blk_bc, s_blk_a,  # strides of the P-block axis of dBp/dCp (nPB, b, T, h, N), dA*p
    ACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    num_h = tl.num_programs(1).to(tl.int64)

    # the row is held in *reversed* scan order (slot k = column S-1-k), so that the adjoint's
    # right-to-left recurrence is a plain left-to-right scan; padded slots k >= S come last
    offs_k = tl.arange(0, BLOCK_S)
    col = S - 1 - offs_k
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_s = offs_k < S
    mask_n = offs_n < N
    mask_p = offs_p < P
    mask_sp = mask_s[:, None] & mask_p[None, :]
    mask_sn = mask_s[:, None] & mask_n[None, :]
    mask_snp = mask_sn[:, :, None] & mask_p[None, None, :]
    tile_np = offs_n[:, None] * P + offs_p[None, :]
    has_left = mask_s & (col >= 1)
    left_snp = mask_snp & has_left[:, None, None]
    has_right = mask_s & (col + 1 < S)

    v_base = V + pid_b * s_vb + pid_h * s_vh      # V, dY, dV share strides
    dy_base = dY + pid_b * s_vb + pid_h * s_vh
    dv_base = dV + pid_b * s_vb + pid_h * s_vh
    b_base = Bm + pid_b * s_bb + pid_h * s_bh     # B, C and each P-block slot of dBp/dCp
    c_base = Cm + pid_b * s_bb + pid_h * s_bh
    blk = pid_p.to(tl.int64)
    db_base = dBp + blk * s_blk_bc + pid_b * s_bb + pid_h * s_bh
    dc_base = dCp + blk * s_blk_bc + pid_b * s_bb + pid_h * s_bh
    a_off = (pid_b * num_h + pid_h) * R * S
    da_off = blk * s_blk_a + a_off
    h_base = Hbuf + pid_b * s_hb + pid_h * s_hh

    carry = tl.zeros((BLOCK_S, BLOCK_N, BLOCK_P), dtype=ACC)  # a_o[r+1] * G[r+1]
    for k in range(0, R):
        r = R - 1 - k
        row = r * S + col
        node = tl.load(node_of + row, mask=mask_s, other=0).to(tl.int64)
        dy = tl.load(dy_base + node[:, None] * s_vt + offs_p[None, :], mask=mask_sp,
                     other=0.0).to(ACC)
        cq = tl.load(c_base + node[:, None] * s_bt + offs_n[None, :], mask=mask_sn,
                     other=0.0).to(ACC)
        # G[r, c] = C dy^T + a_s[r, c+1] G[r, c+1] + a_o[r+1, c] G[r+1, c]
        a_right = tl.load(A_s + a_off + row + 1, mask=has_right, other=0.0).to(ACC)
        x = cq[:, :, None] * dy[:, None, :] + carry
        coef = tl.broadcast_to(a_right[:, None, None], (BLOCK_S, BLOCK_N, BLOCK_P))
        _, g = tl.associative_scan((coef, x), 0, _first_order_combine)

        h = tl.load(h_base + node[:, None, None] * s_ht + tile_np[None, :, :], mask=mask_snp,
                    other=0.0)
        # y = C^T h:  dC = h dy (partial over this P-block)
        tl.store(dc_base + node[:, None] * s_bt + offs_n[None, :],
                 tl.sum(h * dy[:, None, :], axis=2), mask=mask_sn)
        # X = B v^T:  dv = G^T B,  dB = G v (partial over this P-block)
        v = tl.load(v_base + node[:, None] * s_vt + offs_p[None, :], mask=mask_sp,
                    other=0.0).to(ACC)
        bk = tl.load(b_base + node[:, None] * s_bt + offs_n[None, :], mask=mask_sn,
                     other=0.0).to(ACC)
        tl.store(dv_base + node[:, None] * s_vt + offs_p[None, :],
                 tl.sum(g * bk[:, :, None], axis=1), mask=mask_sp)
        tl.store(db_base + node[:, None] * s_bt + offs_n[None, :],
                 tl.sum(g * v[:, None, :], axis=2), mask=mask_sn)
        # edge weights: dA_ij = <G_i, H_j>; the left parent (r, c-1), the upper one (r-1, c)
        left = tl.load(node_of + row - 1, mask=has_left, other=0).to(tl.int64)
        h_left = tl.load(h_base + left[:, None, None] * s_ht + tile_np[None, :, :],
                         mask=left_snp, other=0.0)
        da_s = tl.sum(tl.sum(g * h_left, axis=2), axis=1)
        tl.store(dAsp + da_off + row, da_s, mask=mask_s)
        has_up = mask_s & (offs_k * 0 + r > 0)  # (a tensor compare: r is an int when interpreted)
        up = tl.load(node_of + row - S, mask=has_up, other=0).to(tl.int64)
        h_up = tl.load(h_base + up[:, None, None] * s_ht + tile_np[None, :, :],
                       mask=mask_snp & has_up[:, None, None], other=0.0)
        da_o = tl.sum(tl.sum(g * h_up, axis=2), axis=1)
        tl.store(dAop + da_off + row, da_o, mask=mask_s)
        # what row r sends to row r - 1 through its incoming vertical edges
        a_o = tl.load(A_o + a_off + row, mask=mask_s, other=0.0).to(ACC)
        carry = a_o[:, None, None] * g


def tl_dtype(dtype) -> tl.dtype:
    """The Triton accumulation dtype for a torch dtype (fp64 stays fp64, all else fp32)."""
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32
