"""The linear-time DAG recurrence (paper Prop. 4.2 / 4.4): a topological sweep over level sets.

``H = (I - A)^-1 X`` is the solution of ``(I - A) H = X``, i.e.
``H_i = X_i + sum_{j in p(i)} A_ij H_j``, computed level by level (every level only reads
earlier ones) in ``O(|E| F)`` work for ``F`` right-hand sides per node, without any ``T x T``
matrix. The backward pass is the adjoint sweep ``G_j = dH_j + sum_{i: j in p(i)} A_ij G_i`` in
reverse order, with ``dA_ij = <G_i, H_j>``.

Two uses:

* the *state* form (``dag_scan``): ``X_i = B_i v_iᵀ`` (``F = N P``), ``y_i = C_iᵀ H_i``. It is
  one autograd function (:class:`_StateScanMix`) that keeps only its inputs ``V, B, C, w`` for
  the backward and recomputes the ``N x P`` states there, instead of storing ``T`` of them
  between forward and backward (3.5 GB for one 56x56 corner DAG at batch 8 x 4 heads, P 64,
  N 16); the edge gradients are accumulated level by level, so no ``|E| x N P`` product exists;
* the *mask* form (``exact`` on DAGs): ``X = I`` gives the rows of ``L`` in ``O(|E| T)`` per
  head, far cheaper than a dense ``O(T^3)`` triangular inverse; then ``Y = (L ∘ C Bᵀ) V``.

Tensors are node-major inside the sweep (``(T, M, F)`` with ``M`` = batch x heads) so that each
level's gather and scatter move contiguous rows.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from chimera.ops.linalg import autocast_off
from chimera.topology import Topology


def _level_tables(ends: Tensor, other: Tensor, rank: Tensor, level_of_rank: Tensor,
                  counts: list[int], T: int, E: int) -> list[tuple[Tensor, Tensor]]:
    """Per level: the padded neighbour table ``other[e]`` and edge table ``e`` over the edges
    with ``ends[e]`` in that level, rows in level order, columns in edge-id order, padded to the
    level's largest count with the dummy node ``T`` and the dummy edge ``E``.

    Why this shape: built for all levels at once (one sort, one scatter per table) into one flat
    buffer whose level blocks are exactly ``(level size, level width)``, then viewed per level,
    instead of a Python loop over levels with a sort each (the loop cost 0.85 s for the DAG pair
    of a 64-peptide batch, as much as a layer call). Same memory as padding level by level: one
    high-degree node widens only its own level.
    """
    dev = ends.device
    row_e = rank[ends]  # (E,) row of every edge's end node in level order
    deg = torch.bincount(row_e, minlength=T)
    order = torch.argsort(row_e, stable=True)  # by row, then by edge id
    row = row_e[order]
    col = torch.arange(len(order), device=dev) - (deg.cumsum(0) - deg)[row]
    num_levels = len(counts)
    width = torch.zeros(num_levels, dtype=torch.long, device=dev).scatter_reduce(
        0, level_of_rank, deg, "amax")
    size = torch.tensor(counts, device=dev)
    level_start = size.cumsum(0) - size  # first rank of every level
    block_start = (size * width).cumsum(0) - size * width
    lv = level_of_rank
    row_offset = block_start[lv] + (torch.arange(T, device=dev) - level_start[lv]) * width[lv]
    total = int((size * width).sum())
    nbr = torch.full((total,), T, dtype=torch.long, device=dev)
    edge = torch.full((total,), E, dtype=torch.long, device=dev)
    flat = row_offset[row] + col
    nbr[flat], edge[flat] = other[order], order
    tables = []
    for a, c, k in zip(block_start.tolist(), counts, width.tolist(), strict=True):
        tables.append((nbr[a:a + c * k].view(c, k), edge[a:a + c * k].view(c, k)))
    return tables


def sweep_plan(topo: Topology) -> tuple[list, list]:
    """Per level: (nodes, padded parents, padded in-edges) for the forward sweep and
    (nodes, padded children, padded out-edges) for the adjoint sweep (cached)."""

    def build():
        T, E = topo.num_nodes, topo.num_edges
        levels = topo.level_sets()
        order = topo.topological_order  # the level sets, concatenated
        counts = [len(n) for n in levels]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(T, device=order.device)
        level_of_rank = topo.levels[order]
        parents = _level_tables(topo.dst, topo.src, rank, level_of_rank, counts, T, E)
        children = _level_tables(topo.src, topo.dst, rank, level_of_rank, counts, T, E)
        fwd = [(n, *t) for n, t in zip(levels[1:], parents[1:], strict=True)]
        bwd = [(n, *t) for n, t in zip(levels[:-1], children[:-1], strict=True)]
        return fwd, bwd[::-1]

    return topo._cached("sweep_plan", build)


class _NodeMajorDagSolve(torch.autograd.Function):
    """``H = (I - A)^-1 X`` for node-major ``X (T, M, F)`` and edge weights ``w (E, M)``.

    Each level is one gather of its nodes' (padded) parents and one write of its own rows:
    a node's rows are written exactly once, so no scatter-add is needed. Row ``T`` of the
    buffers and edge ``E`` of the weights are zero dummies that absorb the padding.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, X: Tensor, w: Tensor, src: Tensor, dst: Tensor, plan) -> Tensor:
        T = X.shape[0]
        H = torch.cat([X, X.new_zeros(1, *X.shape[1:])])
        wpad = torch.cat([w, w.new_zeros(1, w.shape[1])]).unsqueeze(-1)  # (E+1, M, 1)
        for nodes, parents, edges in plan[0]:
            H[nodes] = X[nodes] + (H[parents] * wpad[edges]).sum(1)
        ctx.save_for_backward(H, wpad, src, dst)
        ctx.plan = plan
        return H[:T]

    @staticmethod
    def backward(ctx, dH: Tensor):
        H, wpad, src, dst = ctx.saved_tensors
        G = torch.cat([dH, dH.new_zeros(1, *dH.shape[1:])])
        for nodes, children, edges in ctx.plan[1]:
            G[nodes] = dH[nodes] + (G[children] * wpad[edges]).sum(1)
        dw = (G[dst] * H[src]).sum(-1)
        return G[:-1], dw, None, None, None


def dag_solve_node_major(X: Tensor, w: Tensor, topo: Topology) -> Tensor:
    """``(I - A)^-1 X`` with ``X (T, M, F)`` and ``w (E, M)`` (``M`` independent systems)."""
    topo.require_dag("the DAG recurrence")
    return _NodeMajorDagSolve.apply(X, w, topo.src, topo.dst, sweep_plan(topo))


def dag_state_solve(X: Tensor, edge_weight: Tensor, topo: Topology) -> Tensor:
    """``H = (I - A)^-1 X`` on a DAG. ``X (b, T, H, F)``, ``edge_weight (b, H, E)``."""
    b, T, h, F = X.shape
    Xn = X.permute(1, 0, 2, 3).reshape(T, b * h, F)
    wn = edge_weight.permute(2, 0, 1).reshape(-1, b * h)
    H = dag_solve_node_major(Xn, wn, topo)
    return H.view(T, b, h, F).permute(1, 0, 2, 3)


def _state_sweep(V: Tensor, B: Tensor, w: Tensor, plan) -> Tensor:
    """States ``H (T+1, M, N, P)`` (row ``T`` a zero dummy) of the forward sweep, node-major
    inputs ``V (T, M, P)``, ``B (T, M, N)``, ``w (E+1, M)`` (edge ``E`` a zero dummy)."""
    T, M, P = V.shape
    H = V.new_zeros(T + 1, M, B.shape[-1], P)
    H[:T] = B.unsqueeze(-1) * V.unsqueeze(-2)  # every node's own input; parents are added below
    w4 = w[:, :, None, None]
    for nodes, parents, edges in plan[0]:
        H[nodes] += (H[parents] * w4[edges]).sum(1)
    return H


class _StateScanMix(torch.autograd.Function):
    """``y_i = C_iᵀ H_i`` with ``H = (I - A)^-1 (B ⊗ V)`` on a DAG, recomputing ``H`` in backward.

    Node-major: ``V (T, M, P)``, ``B, C (T, M, N)``, ``w (E, M)``. Saves only the inputs; the
    backward rebuilds ``H`` with the forward sweep, runs the adjoint sweep
    ``G_j = C_j dy_jᵀ + Σ_{i: j ∈ p(i)} A_ij G_i`` in reverse order, and reads the gradients
    off both: ``dV_i = G_iᵀ B_i``, ``dB_i = G_i v_i``, ``dC_i = H_i dy_i``, ``dA_ij = <G_i, H_j>``
    (the last level by level, never as one ``|E| x N x P`` tensor).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, V: Tensor, B: Tensor, C: Tensor, w: Tensor, plan) -> Tensor:
        wpad = torch.cat([w, w.new_zeros(1, w.shape[1])])
        H = _state_sweep(V, B, wpad, plan)
        Y = (C.unsqueeze(-2) @ H[:-1]).squeeze(-2)  # (T, M, 1, N) @ (T, M, N, P)
        ctx.save_for_backward(V, B, C, wpad)
        ctx.plan = plan
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY: Tensor):
        V, B, C, wpad = ctx.saved_tensors
        plan = ctx.plan
        T = V.shape[0]
        H = _state_sweep(V, B, wpad, plan)
        G = torch.zeros_like(H)
        G[:T] = C.unsqueeze(-1) * dY.unsqueeze(-2)
        w4 = wpad[:, :, None, None]
        for nodes, children, edges in plan[1]:
            G[nodes] += (G[children] * w4[edges]).sum(1)
        dwpad = torch.zeros_like(wpad)
        for nodes, parents, edges in plan[0]:
            # every real edge is the in-edge of exactly one node: plain writes, no accumulation
            # (the dummy edge E collects the padding and is dropped)
            dwpad[edges] = (G[nodes].unsqueeze(1) * H[parents]).sum((-1, -2))
        G, H = G[:T], H[:T]
        dV = (B.unsqueeze(-2) @ G).squeeze(-2)  # (T, M, 1, N) @ (T, M, N, P)
        dB = (G @ V.unsqueeze(-1)).squeeze(-1)  # (T, M, N, P) @ (T, M, P, 1)
        dC = (H @ dY.unsqueeze(-1)).squeeze(-1)
        return dV, dB, dC, dwpad[:-1], None


def mix_dag_scan(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on a DAG by the state recurrence (:class:`_StateScanMix`)."""
    topo.require_dag("the DAG recurrence")
    b, T, h, p = V.shape

    def node_major(x: Tensor) -> Tensor:  # (b, T, h, k) -> (T, b*h, k)
        return x.permute(1, 0, 2, 3).reshape(T, b * h, x.shape[-1])

    wn = edge_weight.permute(2, 0, 1).reshape(-1, b * h)
    Y = _StateScanMix.apply(node_major(V), node_major(B), node_major(C), wn, sweep_plan(topo))
    return Y.view(T, b, h, p).permute(1, 0, 2, 3)


def dag_resolvent_rows(edge_weight: Tensor, topo: Topology, slot: Tensor, n_max: int) -> Tensor:
    """Rows of ``L = (I - A)^-1`` by the recurrence with ``X = I``.

    Returns ``(T, b, H, n_max)``: row ``i`` of its graph's block, columns in block positions
    (``slot % n_max``). Cost ``O(|E| n_max)`` per (batch, head).
    """
    b, h, _ = edge_weight.shape
    T = topo.num_nodes
    X = edge_weight.new_zeros(T, b * h, n_max)
    X[torch.arange(T, device=X.device), :, slot % n_max] = 1.0
    wn = edge_weight.permute(2, 0, 1).reshape(-1, b * h)
    return dag_solve_node_major(X, wn, topo).view(T, b, h, n_max)
