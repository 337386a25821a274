"""One grid corner DAG as a Triton kernel: ``mix(..., method="triton")`` on grid corners.

Computes ``Y = (L ∘ C Bᵀ) V`` for one complete corner DAG of an ``H x W`` grid through the state
recurrence (``N x P`` state per node, per batch entry and head), written in the top-left frame:

    h[r, c] = a_left[r, c] h[r, c-1] + a_up[r, c] h[r-1, c] + B[r, c] v[r, c]ᵀ,
    y[r, c] = C[r, c]ᵀ h[r, c].

Design: row by row, with a parallel scan inside each row
----------------------------------------------------------
Both GPU schemes of DESIGN.md were considered: an anti-diagonal wavefront (``H + W - 1``
dependent steps, all nodes of a diagonal in parallel) and row-by-row steps with a scan along each
row (``H`` dependent steps of depth ``log W``). This kernel sweeps rows, because

* **the carried state stays in registers.** With one program holding a whole row of states as an
  ``(S, N, BLOCK_P)`` tile, the vertical parent ``(r-1, c)`` of node ``(r, c)`` sits in the *same*
  tile slot one step earlier, so row ``r``'s input ``a_up ⊙ h[r-1] + B vᵀ`` is an elementwise
  update of the previous tile. On an anti-diagonal the two parents of a node sit at two different
  slots of the previous diagonal (a shift by one), and Triton has no register shuffle along a
  tile axis: every wavefront step would go through global memory plus a barrier;
* **the horizontal dependency is a first-order linear recurrence** ``h_c = a_c h_{c-1} + x_c``
  (a directed line, i.e. Mamba's scan), which ``tl.associative_scan`` evaluates in ``log W``
  depth with the combine ``(a1, x1)·(a2, x2) = (a1 a2, a2 x1 + x2)``: exact products of the
  weights, no logarithms (zero weights are fine), no ``W x W`` mask;
* the number of dependent steps is the *shorter* side when the scan runs along the longer one:
  the host picks the orientation (rows or columns; a transposed grid is the same recurrence with
  the two edge families swapped), subject to the register budget of one row tile.

The four corners differ only in the direction of rows and columns; the host describes the frame
by a table ``node_of[r, s]`` (node id at frame position ``(r, s)``) and gathers the two edge
families into ``(b, h, R, S)`` weights, so one kernel serves every corner and both orientations
with no permutation of ``V``, ``B``, ``C`` in memory.

Backward: recomputation, not storage
------------------------------------
The adjoint runs from the last frame row up, again as a scan per row (in reversed column order):

    G[r, c] = C dyᵀ + a_left[r, c+1] G[r, c+1] + a_up[r+1, c] G[r+1, c],
    dv = Gᵀ B,  dB = G v,  dC = h dy,  d a_left[r, c] = <G[r, c], h[r, c-1]>,
    d a_up[r, c] = <G[r, c], h[r-1, c]>,

and it needs every forward state ``h``. The forward does **not** keep them: they are ``N`` times
the size of ``V`` (``T x N x P`` per batch entry and head, fp32), and a network keeps every
layer's saved tensors alive from its forward to its backward. The backward instead relaunches the
forward sweep (``STORE_H``) into a scratch buffer that lives only during that layer's backward,
then runs the adjoint sweep; this costs one extra forward sweep (the cheapest of the passes) and
caps the state memory at one layer. The gradient's ``G`` is never stored: the adjoint carries it
in registers from row to row like the forward carries ``h``.

Reductions over the value columns (``dB``, ``dC``, edge weights) cross P-blocks, so every program
writes its partial sums into its own slot of a ``(num_p_blocks, ...)`` buffer that the host sums:
deterministic, no atomics.

Precision: the states and all accumulations are in fp32 (fp64 for fp64 inputs) whatever the input
dtype; bf16/fp16 inputs are read as such and converted in registers on a GPU. Triton's CPU
interpreter mishandles bf16, so there they are converted to fp32 on the host first.

Limits: one complete corner DAG of one grid (:func:`chimera.ops.grid.grid_frame`); the row tile
``next_pow2(S) * next_pow2(N)`` must fit ``GRID_MAX_TILE`` elements in one orientation
(:func:`grid_triton_plan` returns None otherwise, and ``mix_triton`` falls back to the level-set
kernel). No performance tuning has been done yet (no GPU was available while writing it).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from chimera.ops.grid import grid_frame
from chimera.ops.linalg import autocast_off
from chimera.topology import Topology

GRID_MAX_TILE = 8192

__all__ = ["GRID_MAX_TILE", "grid_triton_plan", "mix_grid_triton"]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _orientation(H: int, W: int, N: int, max_tile: int, orientation: str | None) -> str | None:
    """``"rows"`` (scan along rows, ``H`` steps) or ``"cols"``; None if no row tile fits."""
    fits = {"rows": _next_pow2(W) * _next_pow2(N) <= max_tile,
            "cols": _next_pow2(H) * _next_pow2(N) <= max_tile}
    if orientation is not None:
        if orientation not in fits:
            raise ValueError(f"orientation must be 'rows', 'cols' or None, got {orientation!r}")
        return orientation if fits[orientation] else None
    preferred = ("rows", "cols") if W >= H else ("cols", "rows")  # fewer sequential steps
    return next((o for o in preferred if fits[o]), None)


def grid_triton_plan(topo: Topology, N: int, orientation: str | None = None,
                     max_tile: int | None = None) -> dict | None:
    """The frame tables of the grid kernel for ``topo``, or None when it does not apply (not a
    complete grid corner DAG, or no row tile fits ``max_tile`` elements).

    Keys: ``R, S`` (sequential steps, scanned length), ``orientation``, ``node_of (R, S)``
    (int32 node ids), ``idx_s`` / ``idx_o (R, S)`` (edge id of the in-edge along the scan / from
    the previous step, ``E`` where there is none).
    """
    frame = grid_frame(topo)
    if frame is None:
        return None
    H, W = frame["H"], frame["W"]
    orient = _orientation(H, W, N, GRID_MAX_TILE if max_tile is None else max_tile, orientation)
    if orient is None:
        return None

    def build() -> dict:
        E, T, dev = topo.num_edges, topo.num_nodes, topo.device
        hor, target = frame["horizontal"], frame["target"]
        ids = torch.arange(E, device=dev)
        idx_left = torch.full((T,), E, dtype=torch.long, device=dev)
        idx_up = idx_left.clone()
        idx_left[target[hor]] = ids[hor]
        idx_up[target[~hor]] = ids[~hor]
        node_of = frame["orig_of_frame"].view(H, W)
        idx_left, idx_up = idx_left.view(H, W), idx_up.view(H, W)
        if orient == "rows":
            plan = dict(R=H, S=W, node_of=node_of, idx_s=idx_left, idx_o=idx_up)
        else:
            plan = dict(R=W, S=H, node_of=node_of.T, idx_s=idx_up.T, idx_o=idx_left.T)
        plan["node_of"] = plan["node_of"].to(torch.int32).contiguous()
        plan["idx_s"], plan["idx_o"] = plan["idx_s"].contiguous(), plan["idx_o"].contiguous()
        plan["orientation"] = orient
        return plan

    return topo._cached(f"grid_triton_plan_{orient}", build)


def _blocks(S: int, N: int, P: int, max_tile: int) -> tuple[int, int, int, int]:
    """``(BLOCK_S, BLOCK_N, BLOCK_P, num_warps)`` of one program's row tile."""
    block_s, block_n = _next_pow2(S), _next_pow2(N)
    block_p = max(1, min(_next_pow2(P), max_tile // (block_s * block_n)))
    num_warps = max(1, min(8, (block_s * block_n * block_p) // 1024))
    return block_s, block_n, block_p, num_warps


class _GridTritonFn(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, V: Tensor, B: Tensor, C: Tensor, a_s: Tensor, a_o: Tensor, plan: dict,
                kernels, max_tile: int):
        b, T, h, P = V.shape
        N = B.shape[-1]
        R, S = plan["R"], plan["S"]
        V, B, C, a_s, a_o = (t.contiguous() for t in (V, B, C, a_s, a_o))
        acc = torch.float64 if V.dtype == torch.float64 else torch.float32
        block_s, block_n, block_p, num_warps = _blocks(S, N, P, max_tile)
        Y = torch.empty_like(V)
        grid = (-(-P // block_p), h, b)
        kernels._grid_fwd_kernel[grid](
            V, B, C, a_s, a_o, plan["node_of"], Y, Y,  # no state buffer: STORE_H is off
            R, S, N, P,
            V.stride(0), V.stride(1), V.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            0, 0, 0,
            ACC=kernels.tl_dtype(acc),
            BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_P=block_p,
            WRITE_Y=True, STORE_H=False, num_warps=num_warps,
        )
        ctx.save_for_backward(V, B, C, a_s, a_o)
        ctx.plan, ctx.kernels = plan, kernels
        ctx.launch = (acc, block_s, block_n, block_p, num_warps)
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY: Tensor):
        V, B, C, a_s, a_o = ctx.saved_tensors
        plan, kernels = ctx.plan, ctx.kernels
        acc, block_s, block_n, block_p, num_warps = ctx.launch
        b, T, h, P = V.shape
        N = B.shape[-1]
        R, S = plan["R"], plan["S"]
        n_pb = -(-P // block_p)
        grid = (n_pb, h, b)
        tl_acc = kernels.tl_dtype(acc)
        dY = dY.to(V.dtype).contiguous()
        # 1. recompute the forward states into a scratch buffer that lives only in this backward
        Hs = torch.empty((b, T, h, N, P), dtype=acc, device=V.device)
        kernels._grid_fwd_kernel[grid](
            V, B, C, a_s, a_o, plan["node_of"], V, Hs,
            R, S, N, P,
            V.stride(0), V.stride(1), V.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            Hs.stride(0), Hs.stride(1), Hs.stride(2),
            ACC=tl_acc, BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_P=block_p,
            WRITE_Y=False, STORE_H=True, num_warps=num_warps,
        )
        # 2. the adjoint sweep
        dV = torch.empty_like(V)
        dBp = torch.empty((n_pb, *B.shape), dtype=acc, device=V.device)
        dCp = torch.empty_like(dBp)
        dAsp = torch.zeros((n_pb, *a_s.shape), dtype=acc, device=V.device)
        dAop = torch.zeros_like(dAsp)
        kernels._grid_bwd_kernel[grid](
            V, B, C, a_s, a_o, plan["node_of"], dY, Hs,
            dV, dBp, dCp, dAsp, dAop,
            R, S, N, P,
            V.stride(0), V.stride(1), V.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            Hs.stride(0), Hs.stride(1), Hs.stride(2),
            dBp.stride(0), dAsp.stride(0),
            ACC=tl_acc, BLOCK_S=block_s, BLOCK_N=block_n, BLOCK_P=block_p,
            num_warps=num_warps,
        )
        dB = dBp.sum(0).to(B.dtype)
        dC = dCp.sum(0).to(C.dtype)
        return (dV, dB, dC, dAsp.sum(0).to(a_s.dtype), dAop.sum(0).to(a_o.dtype),
                None, None, None)


def mix_grid_triton(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topology: Topology,
                    orientation: str | None = None, max_tile: int | None = None) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one complete grid corner DAG by the row-sweep Triton kernel.

    Shapes as in :func:`chimera.ops.mix`: ``V (b, T, h, P)``, ``B, C (b, T, h, N)``,
    ``edge_weight (b, h, E)`` aligned with ``topology.edge_index``; differentiable in all four.
    ``orientation``: ``"rows"`` (scan along grid rows), ``"cols"``, or None (the one with fewer
    sequential steps that fits ``max_tile``, default :data:`GRID_MAX_TILE`). Returns
    ``(b, T, h, P)`` in ``V``'s dtype; states are fp32 (fp64 for fp64 inputs).

    Raises ``ValueError`` if ``topology`` is not a complete grid corner DAG or no row tile fits,
    ``RuntimeError`` (with instructions) when the kernels cannot run here.
    """
    from chimera.ops.triton import _load_kernels

    topology = topology.to(V.device)
    max_tile = GRID_MAX_TILE if max_tile is None else int(max_tile)
    plan = grid_triton_plan(topology, B.shape[-1], orientation, max_tile)
    if plan is None:
        raise ValueError(
            f"mix_grid_triton needs a complete grid corner DAG whose row tile fits {max_tile} "
            f"elements; got '{topology.name}' with N={B.shape[-1]} (orientation={orientation})")
    kernels = _load_kernels(V.device, "_grid_kernels")
    out_dtype = V.dtype
    dtype = V.dtype
    if dtype in (torch.float16, torch.bfloat16) and V.device.type != "cuda":
        dtype = torch.float32  # the interpreter mishandles half types (module docstring)
    V, B, C, edge_weight = (t.to(dtype) for t in (V, B, C, edge_weight))
    b, h, E = edge_weight.shape
    w = torch.cat([edge_weight, edge_weight.new_zeros(b, h, 1)], dim=-1)  # edge E: weight 0
    R, S = plan["R"], plan["S"]
    a_s = w.index_select(-1, plan["idx_s"].flatten()).view(b, h, R, S)
    a_o = w.index_select(-1, plan["idx_o"].flatten()).view(b, h, R, S)
    Y = _GridTritonFn.apply(V, B, C, a_s, a_o, plan, kernels, max_tile)
    return Y.to(out_dtype)
