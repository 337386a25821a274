"""Dense resolvent algorithms: materialise ``L = (I - A)^-1`` per graph, then apply the
structured masked attention (SMA) form ``Y = (L ∘ C Bᵀ) V`` (paper eq. 5).

A batch of graphs of different sizes is laid out as padded ``n_max x n_max`` blocks, one per
graph; padding nodes have no edges, so their rows/columns of ``L`` are those of the identity and
their (zero) inputs never reach a real node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from chimera.ops.linalg import (
    general_inverse_of_i_minus,
    neumann_sum,
    neumann_sum_per_block,
    squaring_steps_for_nilpotent,
)
from chimera.ops.scan import dag_resolvent_rows
from chimera.topology import Topology


@dataclass
class BlockLayout:
    """Where every node sits in the padded per-graph blocks."""

    slot: Tensor  # (T,) flat index graph * n_max + position
    num_graphs: int
    n_max: int
    identity: bool  # one graph in node order: blocks are plain reshapes


def block_layout(topo: Topology) -> BlockLayout:
    """Per-graph positions in node order (a batch keeps each graph's nodes contiguous)."""

    def build() -> BlockLayout:
        gid, ptr = topo.graph_ids, topo.ptr
        pos = torch.arange(topo.num_nodes, device=topo.device) - ptr[gid]
        n_max = int((ptr[1:] - ptr[:-1]).max())
        return BlockLayout(slot=gid * n_max + pos, num_graphs=topo.num_graphs, n_max=n_max,
                           identity=topo.num_graphs == 1)

    return topo._cached("block_layout", build)


def dense_adjacency(edge_weight: Tensor, topo: Topology, layout: BlockLayout) -> Tensor:
    """``A (batch, G, H, n, n)`` with ``A[.., i, j]`` = weight of edge ``j -> i`` (summed over
    parallel edges)."""
    b, h, _ = edge_weight.shape
    G, n = layout.num_graphs, layout.n_max
    g = layout.slot[topo.dst] // n
    flat = g * n * n + (layout.slot[topo.dst] % n) * n + (layout.slot[topo.src] % n)
    A = edge_weight.new_zeros(b, h, G * n * n).index_add(-1, flat, edge_weight)
    return A.view(b, h, G, n, n).transpose(1, 2)


def to_blocks(x: Tensor, layout: BlockLayout) -> Tensor:
    """``(batch, T, ...)`` node tensor -> ``(batch, G, n, ...)`` zero-padded blocks."""
    b = x.shape[0]
    if layout.identity:
        return x.unsqueeze(1)
    out = x.new_zeros(b, layout.num_graphs * layout.n_max, *x.shape[2:])
    out = out.index_copy(1, layout.slot, x)
    return out.view(b, layout.num_graphs, layout.n_max, *x.shape[2:])


def from_blocks(x: Tensor, layout: BlockLayout) -> Tensor:
    b = x.shape[0]
    if layout.identity:
        return x.squeeze(1)
    return x.reshape(b, layout.num_graphs * layout.n_max, *x.shape[3:])[:, layout.slot]


def sma_apply(L: Tensor, V: Tensor, B: Tensor, C: Tensor, layout: BlockLayout) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` per graph block and head. ``L (b, G, H, n, n)``; node tensors
    ``(b, T, H, ·)``."""
    Vd, Bd, Cd = (to_blocks(t, layout) for t in (V, B, C))
    scores = torch.einsum("bgihn,bgjhn->bghij", Cd, Bd)
    Y = torch.einsum("bghij,bgjhp->bgihp", L * scores, Vd)
    return from_blocks(Y, layout)


def resolvent_reference(A: Tensor) -> Tensor:
    """The oracle: ``(I - A)^-1`` by an LU solve in float64."""
    return general_inverse_of_i_minus(A.double())


def resolvent_exact(A: Tensor) -> Tensor:
    """Dense ``(I - A)^-1`` of a graph with cycles by an LU solve (DAGs never get here: their
    ``L`` comes from the recurrence, :func:`resolvent_dag_rows`)."""
    return general_inverse_of_i_minus(A)


def resolvent_dag_rows(edge_weight: Tensor, topo: Topology, layout: BlockLayout) -> Tensor:
    """``L (b, G, H, n, n)`` of a DAG from the level-set recurrence with ``X = I``
    (``O(|E| n)`` per head instead of the ``O(n^3)`` triangular inverse)."""
    rows = dag_resolvent_rows(edge_weight, topo, layout.slot, layout.n_max)  # (T, b, H, n)
    b, h = rows.shape[1], rows.shape[2]
    if layout.identity:
        return rows.permute(1, 2, 0, 3).unsqueeze(1)
    L = rows.new_zeros(layout.num_graphs * layout.n_max, b, h, layout.n_max)
    L = L.index_copy(0, layout.slot, rows)
    return L.view(layout.num_graphs, layout.n_max, b, h, layout.n_max).permute(2, 0, 3, 1, 4)


def resolvent_neumann(A: Tensor, num_terms: int | Tensor) -> Tensor:
    """``L̂ = sum_{k=0}^{K} A^k`` (paper eq. 17), K = ``num_terms``: one int, or a
    ``(num_graphs,)`` tensor with one K per graph block of ``A (b, G, H, n, n)``."""
    if isinstance(num_terms, Tensor):
        if num_terms.shape != (A.shape[1],):
            raise ValueError(
                f"per-graph num_terms must have shape ({A.shape[1]},) (one K per graph), "
                f"got {tuple(num_terms.shape)}")
        return neumann_sum_per_block(A, num_terms.view(1, -1, 1))
    return neumann_sum(A, num_terms)


def resolvent_dag_squaring(A: Tensor, longest_path: int) -> Tensor:
    """``(I + A)(I + A^2)(I + A^4)...`` until the next power exceeds the longest path: exact
    for a DAG because ``A`` is nilpotent (Prop. 4.1, Theorem 4.5)."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L = eye + A
    P = A
    for _ in range(squaring_steps_for_nilpotent(longest_path) - 1):
        P = P @ P
        L = L @ (eye + P)
    return L
