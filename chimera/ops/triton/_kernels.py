"""The Triton kernels of the DAG state sweep (imported lazily by :mod:`chimera.ops.triton`).

``triton.jit`` decides at *decoration* time whether it builds a compiled kernel or an
interpreted one (``TRITON_INTERPRET=1``), so this module is only imported on the first call of
:func:`chimera.ops.triton.mix_dag_triton`; :data:`INTERPRETED` records which kind was built.

Parallelisation (both kernels): the grid is ``(cdiv(P, BLOCK_P), heads, batch)`` and program
``(p, h, b)`` owns the slice ``H[b, :, h, :, p*BLOCK_P:(p+1)*BLOCK_P]`` of the state of *every*
node, i.e. an ``N x BLOCK_P`` tile per node. The recurrence ``H_i = B_i v_iᵀ + Σ_j A_ij H_j`` never
mixes different batch entries, heads or value columns ``p`` (B, C and the edge weight are shared
across ``p``, and every product is elementwise in ``p``), so the slices are independent and no two
programs ever read or write the same state element: the sweep is race-free without any
cross-program synchronisation, in one launch. Inside a program the nodes are visited one at a time
in a topological order (the backward in the reverse order), so every parent tile (children for the
backward) was written by the *same* program before it is read. A ``tl.debug_barrier()`` after each
node's store makes that store visible to all threads of the program (a tile need not be laid out
over the threads identically at its store and at a later load); the interpreter treats it as a
no-op.

Reductions over ``p`` (``dB_i = G_i v_i``, ``dC_i = H_i dy_i``, ``dA_ij = <G_i, H_j>``) cross
P-blocks, so each program writes its partial sums to its own slot of a ``(num_p_blocks, ...)``
buffer and the host sums over that axis: deterministic, no atomics.

Work and limits: ``O(|E| N P)`` work overall, ``O(T + |E|)`` *sequential* steps per program (one
per node and one per edge); node-level parallelism inside a level is not exploited, so
parallelism is ``batch * heads * cdiv(P, BLOCK_P)`` programs only.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)


@triton.jit
def _dag_fwd_kernel(
    V, Bm, Cm, W, Y, Hbuf,
    order, par_ptr, par_node, par_edge,
    T, N, P,
    s_vb, s_vt, s_vh,
    s_bb, s_bt, s_bh,
    s_wb, s_wh,
    s_hb, s_ht, s_hh,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P
    mask_np = mask_n[:, None] & mask_p[None, :]
    tile = offs_n[:, None] * P + offs_p[None, :]  # (N, P) contiguous inside H[b, t, h]

    v_base = V + pid_b * s_vb + pid_h * s_vh      # V and Y share strides
    y_base = Y + pid_b * s_vb + pid_h * s_vh
    b_base = Bm + pid_b * s_bb + pid_h * s_bh     # B and C share strides
    c_base = Cm + pid_b * s_bb + pid_h * s_bh
    w_base = W + pid_b * s_wb + pid_h * s_wh      # edge stride 1
    h_base = Hbuf + pid_b * s_hb + pid_h * s_hh

    for k in range(0, T):
        i = tl.load(order + k).to(tl.int64)
        v = tl.load(v_base + i * s_vt + offs_p, mask=mask_p, other=0.0)
        bv = tl.load(b_base + i * s_bt + offs_n, mask=mask_n, other=0.0)
        h = bv[:, None] * v[None, :]
        start = tl.load(par_ptr + i)
        end = tl.load(par_ptr + i + 1)
        for e in range(start, end):
            j = tl.load(par_node + e).to(tl.int64)
            eid = tl.load(par_edge + e).to(tl.int64)
            w = tl.load(w_base + eid)
            hj = tl.load(h_base + j * s_ht + tile, mask=mask_np, other=0.0)
            h += w * hj
        tl.store(h_base + i * s_ht + tile, h, mask=mask_np)
        cv = tl.load(c_base + i * s_bt + offs_n, mask=mask_n, other=0.0)
        y = tl.sum(cv[:, None] * h, axis=0)
        tl.store(y_base + i * s_vt + offs_p, y, mask=mask_p)
        tl.debug_barrier()


@triton.jit
def _dag_bwd_kernel(
    V, Bm, Cm, W, dY, Hbuf, Gbuf,
    dV, dBp, dCp, dWp,
    order, ch_ptr, ch_node, ch_edge,
    T, N, P, E,
    s_vb, s_vt, s_vh,
    s_bb, s_bt, s_bh,
    s_wb, s_wh,
    s_hb, s_ht, s_hh,
    s_pb_blk,  # stride of the P-block axis of dBp / dCp (which are (nPB, b, T, h, N))
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    num_h = tl.num_programs(1).to(tl.int64)
    num_b = tl.num_programs(2).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_n = offs_n < N
    mask_p = offs_p < P
    mask_np = mask_n[:, None] & mask_p[None, :]
    tile = offs_n[:, None] * P + offs_p[None, :]

    v_base = V + pid_b * s_vb + pid_h * s_vh      # V, dY and dV share strides
    dy_base = dY + pid_b * s_vb + pid_h * s_vh
    dv_base = dV + pid_b * s_vb + pid_h * s_vh
    b_base = Bm + pid_b * s_bb + pid_h * s_bh     # B, C and each slot of dBp/dCp share strides
    c_base = Cm + pid_b * s_bb + pid_h * s_bh
    blk = pid_p.to(tl.int64) * s_pb_blk
    db_base = dBp + blk + pid_b * s_bb + pid_h * s_bh
    dc_base = dCp + blk + pid_b * s_bb + pid_h * s_bh
    w_base = W + pid_b * s_wb + pid_h * s_wh
    dw_base = dWp + ((pid_p.to(tl.int64) * num_b + pid_b) * num_h + pid_h) * E
    h_base = Hbuf + pid_b * s_hb + pid_h * s_hh   # H and G share strides
    g_base = Gbuf + pid_b * s_hb + pid_h * s_hh

    for k in range(0, T):
        i = tl.load(order + (T - 1 - k)).to(tl.int64)
        dy = tl.load(dy_base + i * s_vt + offs_p, mask=mask_p, other=0.0)
        cv = tl.load(c_base + i * s_bt + offs_n, mask=mask_n, other=0.0)
        hi = tl.load(h_base + i * s_ht + tile, mask=mask_np, other=0.0)
        # y_i = C_iᵀ H_i:  dC_i = H_i dy_i (partial over this P-block), dH_i = C_i dy_iᵀ
        tl.store(dc_base + i * s_bt + offs_n, tl.sum(hi * dy[None, :], axis=1), mask=mask_n)
        g = cv[:, None] * dy[None, :]
        start = tl.load(ch_ptr + i)
        end = tl.load(ch_ptr + i + 1)
        for e in range(start, end):
            c = tl.load(ch_node + e).to(tl.int64)
            eid = tl.load(ch_edge + e).to(tl.int64)
            w = tl.load(w_base + eid)
            gc = tl.load(g_base + c * s_ht + tile, mask=mask_np, other=0.0)
            g += w * gc
            # edge i -> c carries A[c, i]:  dA_ci = <G_c, H_i>
            tl.store(dw_base + eid, tl.sum(tl.sum(gc * hi, axis=1), axis=0))
        tl.store(g_base + i * s_ht + tile, g, mask=mask_np)
        # X_i = B_i v_iᵀ:  dv_i = G_iᵀ B_i,  dB_i = G_i v_i (partial over this P-block)
        v = tl.load(v_base + i * s_vt + offs_p, mask=mask_p, other=0.0)
        bv = tl.load(b_base + i * s_bt + offs_n, mask=mask_n, other=0.0)
        tl.store(dv_base + i * s_vt + offs_p, tl.sum(g * bv[:, None], axis=0), mask=mask_p)
        tl.store(db_base + i * s_bt + offs_n, tl.sum(g * v[None, :], axis=1), mask=mask_n)
        tl.debug_barrier()
