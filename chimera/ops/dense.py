"""Dense resolvent algorithms: materialise ``L = (I - A)^-1`` per graph, then apply the
structured masked attention (SMA) form ``Y = (L ∘ C Bᵀ) V`` (paper eq. 5).

A batch of graphs of different sizes is laid out as padded ``n_max x n_max`` blocks, one per
graph; padding nodes have no edges, so their rows/columns of ``L`` are those of the identity and
their (zero) inputs never reach a real node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from chimera.norm import segment_sum
from chimera.ops import band_sweeps
from chimera.ops.linalg import (
    autocast_off,
    flush_denormal_cpu,
    flush_tiny,
    flush_tiny_into,
    general_inverse,
    general_inverse_of_i_minus,
    neumann_sum,
    neumann_sum_per_block,
    single_threaded_cpu,
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
    _head_rows: dict = field(default_factory=dict, repr=False, compare=False)

    def head_rows(self, heads: int) -> Tensor:
        """``(T * heads,)``: the row of each (node, head) pair, node-major, among the
        ``G * heads * n_max`` rows of ``(G, heads, n_max)`` blocks. Cached per head count."""
        if heads not in self._head_rows:
            n = self.n_max
            h = torch.arange(heads, device=self.slot.device)
            rows = ((self.slot[:, None] // n) * heads + h) * n + self.slot[:, None] % n
            self._head_rows[heads] = rows.flatten()
        return self._head_rows[heads]


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
    graph, row, col = _edge_positions(topo, layout)
    return _edge_blocks(edge_weight, graph, row, col, layout.num_graphs, layout.n_max)


class _ScatterRows(torch.autograd.Function):
    """``out[:, index] = x`` into zeros, ``x (b, R, F)`` -> ``(b, num_rows, F)``, for an index
    without repeats: the backward is the gather ``index_select``, not the accumulating
    scatter (``index_put`` with ``accumulate``) that advanced indexing would run (16 buckets
    of 4 peptides: ~47 ms per layer on 2 threads)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, num_rows: int) -> Tensor:
        ctx.save_for_backward(index)
        out = x.new_zeros(x.shape[0], num_rows, x.shape[2])
        return out.index_copy_(1, index, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(1, index), None, None


class _GatherRows(torch.autograd.Function):
    """``x[:, index]`` for an index without repeats; the backward scatters by ``index_copy``
    (the adjoint of :class:`_ScatterRows`)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[1]
        return x.index_select(1, index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros(grad.shape[0], ctx.num_rows, grad.shape[2])
        return out.index_copy_(1, index, grad.contiguous()), None


def to_head_blocks(x: Tensor, layout: BlockLayout) -> Tensor:
    """``(batch, T, H, F)`` node tensor -> contiguous ``(batch, G, H, n, F)`` zero-padded blocks
    (heads before nodes, as in ``L``), by one scatter of rows."""
    b, T, h, f = x.shape
    if layout.identity:
        return x.transpose(1, 2).unsqueeze(1).contiguous()
    n, G = layout.n_max, layout.num_graphs
    out = _ScatterRows.apply(x.reshape(b, T * h, f), layout.head_rows(h), G * h * n)
    return out.view(b, G, h, n, f)


def from_head_blocks(x: Tensor, layout: BlockLayout) -> Tensor:
    """Inverse of :func:`to_head_blocks`: ``(batch, G, H, n, F)`` -> ``(batch, T, H, F)``."""
    if layout.identity:
        return x.squeeze(1).transpose(1, 2)
    b, G, h, n, f = x.shape
    rows = layout.head_rows(h)
    return _GatherRows.apply(x.reshape(b, G * h * n, f), rows).view(b, -1, h, f)


def sma_apply(L: Tensor, V: Tensor, B: Tensor, C: Tensor, layout: BlockLayout) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` per graph block and head. ``L (b, G, H, n, n)``; node tensors
    ``(b, T, H, ·)``.

    Why this layout: the node tensors are scattered once into contiguous ``(b·G·H, n, ·)`` blocks
    and both products are plain batched ``matmul``s. The einsums this replaces kept heads next to
    the node axis, so every call and its backward permuted them into copies (a bucket of 4 graphs
    of 200 atoms: 65 -> 37 ms forward + backward).
    """
    if _shared_across_heads(B) and _shared_across_heads(C):
        # one B/C group expanded to all heads (the mixer's case): the scores are the same for
        # every head, so form them once and let the product with L broadcast (with N = 80 and
        # P = 32 the score products were 2/3 of the SMA's arithmetic, 4x over for 4 heads)
        B, C = B[:, :, :1], C[:, :, :1]
    Vd, Bd, Cd = (to_head_blocks(t, layout) for t in (V, B, C))
    if torch.is_autocast_enabled(L.device.type):
        # mixed precision: the plain ops, whose products autocast casts (and autograd follows)
        return from_head_blocks((L * (Cd @ Bd.transpose(-1, -2))) @ Vd, layout)
    return from_head_blocks(_MaskedAttention.apply(L, Vd, Bd, Cd), layout)


class _MaskedAttention(torch.autograd.Function):
    """``Y = (L ∘ C Bᵀ) V`` on blocks: ``L (.., H, n, n)``, ``V (.., H, n, P)``, ``B, C`` with
    ``H`` or 1 (shared by the heads) on the head axis.

    Why a Function: autograd keeps ``M = L ∘ S`` for all heads and its backward makes four
    ``n^2``-per-head tensors (``gM = gY Vᵀ``, ``gM ∘ S``, ``gM ∘ L`` and its head sum). Here,
    with scores shared by the heads (the mixer's case), ``M`` goes head by head through one
    buffer, forward and again in the backward, and is never kept; ``sum_h gM ∘ L`` is
    accumulated head by head into one ``n^2`` tensor and ``gM`` becomes ``gL`` in place (64
    peptides: peak memory 224 -> 181 MB, and 4% / 16% faster on one / two threads).
    """

    @staticmethod
    def forward(ctx, L: Tensor, V: Tensor, B: Tensor, C: Tensor) -> Tensor:
        Y, S, M = _masked_attention_forward(L, V, B, C)
        ctx.save_for_backward(L, V, B, C, S, M)
        return Y

    @staticmethod
    def backward(ctx, gY: Tensor):
        return _masked_attention_backward(*ctx.saved_tensors, gY)


def _masked_attention_forward(L: Tensor, V: Tensor, B: Tensor,
                              C: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(Y, S, M)`` of :class:`_MaskedAttention` (``M`` is ``None`` when it goes head by
    head)."""
    S = C @ B.transpose(-1, -2)  # (.., H or 1, n, n)
    if S.shape[-3] == 1 and L.shape[-3] > 1:
        # head by head through one buffer: M = L ∘ S is neither kept nor made for all heads
        Y = V.new_empty(V.shape)
        for k, M in _head_masks(L, S):
            Y[..., k:k + 1, :, :] = M @ V[..., k:k + 1, :, :]
        return Y, S, None
    M = L * S
    return M @ V, S, M


def _head_masks(L: Tensor, S: Tensor):
    """Yield ``(k, L_k ∘ S)`` for every head ``k`` of ``L (.., H, n, n)``, the product written
    into one reused ``(.., 1, n, n)`` buffer (valid until the next step)."""
    M = torch.empty_like(L[..., :1, :, :])
    for k in range(L.shape[-3]):
        yield k, torch.mul(L[..., k:k + 1, :, :], S, out=M)


def _masked_attention_backward(L: Tensor, V: Tensor, B: Tensor, C: Tensor, S: Tensor,
                               M: Tensor | None, gY: Tensor) -> tuple[Tensor, ...]:
    """``(gL, gV, gB, gC)`` of :class:`_MaskedAttention`; ``gL`` is a fresh tensor."""
    gY = gY.contiguous()
    gM = gY @ V.transpose(-1, -2)
    if M is None:  # per head: M_k = L_k ∘ S again, through one buffer
        gV = torch.empty_like(V)
        for k, M_k in _head_masks(L, S):
            gV[..., k:k + 1, :, :] = M_k.transpose(-1, -2) @ gY[..., k:k + 1, :, :]
    else:
        gV = M.transpose(-1, -2) @ gY
    if S.shape[-3] == 1:  # scores shared by the heads: accumulate gM ∘ L head by head
        gS = gM[..., :1, :, :] * L[..., :1, :, :]
        for k in range(1, L.shape[-3]):
            gS.addcmul_(gM[..., k:k + 1, :, :], L[..., k:k + 1, :, :])
    else:
        gS = gM * L
    gC, gB = gS @ B, gS.transpose(-1, -2) @ C
    return gM.mul_(S), gV, gB, gC


def _shared_across_heads(t: Tensor) -> bool:
    """True when ``t (b, T, H, F)`` is one tensor expanded over its head axis (stride 0)."""
    return t.shape[2] > 1 and t.stride(2) == 0


def resolvent_reference(A: Tensor) -> Tensor:
    """The oracle: ``(I - A)^-1`` by an LU solve in float64."""
    return general_inverse_of_i_minus(A.double())


def resolvent_exact(A: Tensor) -> Tensor:
    """Dense ``(I - A)^-1`` of a graph with cycles by an LU solve (DAGs never get here: their
    ``L`` comes from the recurrence, :func:`resolvent_dag_rows`). Differentiable in the whole
    dense ``A``; the mixer's path, whose ``A`` holds only edges, is
    :func:`resolvent_exact_edges`."""
    return general_inverse_of_i_minus(A)


def _cached_per_layout(topo: Topology, layout: BlockLayout, key: str, fn):
    """``fn()`` cached on ``topo`` under ``key`` per layout object (a topology may be laid out
    in several layouts: node order, topological, band)."""
    cache = topo._cached(key, list)
    for lay, value in cache:
        if lay is layout:
            return value
    value = fn()
    cache.append((layout, value))
    return value


def _edge_positions(topo: Topology, layout: BlockLayout) -> tuple[Tensor, Tensor, Tensor]:
    """Per edge: its graph block and the block positions of its head (``dst``) and tail
    (``src``) in ``layout`` (cached on ``topo`` per layout)."""

    def build() -> tuple[Tensor, Tensor, Tensor]:
        n = layout.n_max
        dst, src = layout.slot[topo.dst], layout.slot[topo.src]
        return dst // n, dst % n, src % n

    return _cached_per_layout(topo, layout, "dense_edge_positions", build)


def _edge_weight_gradient(M: Tensor, L: Tensor, graph: Tensor, row: Tensor,
                          col: Tensor) -> Tensor:
    """``dw (b, H, E)`` with ``dw_e = <M[row_e, :], L[col_e, :]>`` in block ``graph_e`` of
    ``M, L (b, G, H, n, n)``: the edge entries of ``dA = M Lᵀ`` without forming it."""
    b, G, h, n, _ = L.shape
    # row (batch, graph, head, node) of the flat (b*G*H*n, n) views, per (batch, edge, head):
    # contiguous row copies by index_select are 2x faster than advanced indexing here
    first = ((torch.arange(b, device=L.device).view(b, 1, 1) * G + graph.view(1, -1, 1)) * h
             + torch.arange(h, device=L.device).view(1, 1, h)) * n
    rows_m = M.reshape(-1, n).index_select(0, (first + row.view(1, -1, 1)).flatten())
    rows_l = L.reshape(-1, n).index_select(0, (first + col.view(1, -1, 1)).flatten())
    # in place into the gathered rows: a fresh (E H, n) product buffer costs its page faults
    return rows_m.mul_(rows_l).sum(-1).view(b, -1, h).transpose(1, 2)


def _edge_blocks(w: Tensor, graph: Tensor, row: Tensor, col: Tensor, num_graphs: int, n: int,
                 i_minus: bool = False) -> Tensor:
    """``A`` (or ``I - A`` with ``i_minus``) as contiguous ``(b, G, H, n, n)`` blocks from the
    edge weights ``w (b, H, E)`` at block positions ``(graph, row, col)``; parallel edges add up
    (a self-loop lowers the diagonal of ``I - A``).

    The solvers below work on the transpose of ``T = I - A``: ``T.mT`` is column-major, the
    layout LAPACK works in (no transposing copy), and the solution of the transposed system
    comes back column-major, i.e. its transpose - what we want - row-major (e.g.
    ``L = (T.mT)^-1.mT``; at n = 394, 16 blocks: LU 43 -> 36 ms, triangular 17.5 -> 12.3 ms
    with the layouts as needed).
    """
    b, h, E = w.shape
    heads = torch.arange(h, device=w.device).view(h, 1)
    flat = ((graph.view(1, E) * h + heads) * n + row.view(1, E)) * n + col.view(1, E)
    T = w.new_zeros(b, num_graphs, h, n, n)
    if i_minus:
        T.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    # scatter_add_: index_add_ with alpha takes a slow path on CPU (see _band_blocks)
    vals = w.reshape(b, h * E)
    T.view(b, -1).scatter_add_(-1, flat.view(1, -1).expand(b, -1), -vals if i_minus else vals)
    return T


class _EdgeResolvent(torch.autograd.Function):
    """``L = (I - A(w))^-1`` straight from the edge weights ``w (b, H, E)``.

    Why a Function: autograd through ``linalg.solve`` forms the dense ``dA = Lᵀ gL Lᵀ`` with a
    transposed solve (``n`` right-hand sides) and an ``n x n x n`` product, then reads ``E`` of its
    ``n²`` entries. With ``dL = L dA L`` the gradient of edge ``e = (j -> i)`` is
    ``(Lᵀ gL Lᵀ)[i, j] = <M[i, :], L[j, :]>`` with ``M = Lᵀ gL``: one ``n³`` product and ``E x n``
    dot products, no transposed solve and no dense ``dA`` (about 1.8x faster forward + backward
    on peptide buckets). Parallel edges share the entry of ``A`` and so get the same gradient.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, w: Tensor, graph: Tensor, row: Tensor, col: Tensor, num_graphs: int,
                n: int) -> Tensor:
        T = _edge_blocks(w, graph, row, col, num_graphs, n, i_minus=True)
        # ((T^T)^-1)^T: row-major L (see _edge_blocks); subnormal entries would slow
        # every product with L (see flush_tiny)
        L = flush_tiny(general_inverse(T.mT).mT)
        ctx.save_for_backward(L, graph, row, col)
        return L

    @staticmethod
    def backward(ctx, gL: Tensor):
        L, graph, row, col = ctx.saved_tensors
        M = flush_tiny(L.transpose(-1, -2) @ gL)  # (b, G, H, n, n)
        return _edge_weight_gradient(M, L, graph, row, col), None, None, None, None, None


def resolvent_exact_edges(edge_weight: Tensor, topo: Topology, layout: BlockLayout) -> Tensor:
    """``L (b, G, H, n, n) = (I - A)^-1`` with ``A`` built from ``edge_weight (b, H, E)`` as in
    :func:`dense_adjacency`: the same values as ``resolvent_exact(dense_adjacency(...))``, with
    the edge-only backward of :class:`_EdgeResolvent`."""
    graph, row, col = _edge_positions(topo, layout)
    return _EdgeResolvent.apply(edge_weight, graph, row, col, layout.num_graphs, layout.n_max)


def topological_layout(topo: Topology) -> BlockLayout:
    """Per-graph block positions in a topological order of the DAG ``topo`` (by level, ties by
    node id). In it ``I - A`` is unit lower triangular, and that of the reversed DAG (the other
    half of a BFS-DAG pair) unit upper triangular."""

    def build() -> BlockLayout:
        gid, ptr, lv = topo.graph_ids, topo.ptr, topo.levels
        order = torch.argsort(gid * (int(lv.max()) + 1) + lv, stable=True)  # graphs stay put
        rank = torch.empty_like(order)
        rank[order] = torch.arange(topo.num_nodes, device=order.device)
        n_max = int((ptr[1:] - ptr[:-1]).max())
        return BlockLayout(slot=gid * n_max + rank - ptr[gid], num_graphs=topo.num_graphs,
                           n_max=n_max, identity=False)

    return topo._cached("topological_layout", build)


def triangle_of(topo: Topology, layout: BlockLayout) -> str | None:
    """``"lower"`` / ``"upper"`` when every edge of ``topo`` goes forward / backward in
    ``layout``'s positions (``A`` strictly lower / upper triangular per block), else ``None``.
    Structural, so cached on ``topo`` per layout (it is asked on every forward)."""

    def build() -> str | None:
        slot = layout.slot
        if topo.num_edges == 0 or bool((slot[topo.src] < slot[topo.dst]).all()):
            return "lower"
        if bool((slot[topo.src] > slot[topo.dst]).all()):
            return "upper"
        return None

    return _cached_per_layout(topo, layout, "dense_triangle", build)


class _TriangularResolvent(torch.autograd.Function):
    """``L = (I - A(w))^-1`` of a DAG laid out in a topological order (``A`` strictly triangular
    per block): one unit-triangular solve, about a third of the arithmetic of the LU solve of
    :class:`_EdgeResolvent`; the adjoint ``M = Lᵀ gL = (I - A)^-ᵀ gL`` is one more triangular
    solve, then the same edge-only gradient."""

    @staticmethod
    @autocast_off
    def forward(ctx, w: Tensor, graph: Tensor, row: Tensor, col: Tensor, num_graphs: int,
                n: int, upper: bool) -> Tensor:
        T = _edge_blocks(w, graph, row, col, num_graphs, n, i_minus=True)
        eye = torch.eye(n, dtype=w.dtype, device=w.device)
        with flush_denormal_cpu(w.device.type == "cpu"):
            # L = ((T^T)^-1)^T: column-major input and row-major L (see _edge_blocks)
            L = torch.linalg.solve_triangular(T.mT, eye.expand_as(T), upper=not upper,
                                              unitriangular=True).mT
        L = flush_tiny(L)  # subnormals slow every product with L (see flush_tiny)
        ctx.save_for_backward(T, L, graph, row, col)
        ctx.upper = upper
        return L

    @staticmethod
    def backward(ctx, gL: Tensor):
        T, L, graph, row, col = ctx.saved_tensors
        with flush_denormal_cpu(gL.device.type == "cpu"):
            # M = T^-T gL as (gL^T T^-1)^T: a right-side solve, M comes back row-major
            M = torch.linalg.solve_triangular(T, gL.mT, upper=ctx.upper, unitriangular=True,
                                              left=False).mT
        M = flush_tiny(M)
        return (_edge_weight_gradient(M, L, graph, row, col),
                None, None, None, None, None, None)


def resolvent_dag_triangular(edge_weight: Tensor, topo: Topology, layout: BlockLayout,
                             triangle: str) -> Tensor:
    """``L (b, G, H, n, n)`` of the DAG ``topo`` in ``layout`` (a topological layout, see
    :func:`topological_layout` and :func:`triangle_of`) by a unit-triangular solve."""
    graph, row, col = _edge_positions(topo, layout)
    return _TriangularResolvent.apply(edge_weight, graph, row, col, layout.num_graphs,
                                      layout.n_max, triangle == "upper")


# ----------------------------------------------------------------- banded (block-tridiagonal)
#: band layouts are used while the block size stays below this fraction of the padded graph
BAND_MAX_FRACTION = 0.25


@dataclass
class BandLayout:
    """A :class:`BlockLayout` whose ``n_max`` is ``num_blocks * block`` and in which every edge
    joins positions at most ``block`` apart, so ``I - A`` is block tridiagonal."""

    layout: BlockLayout
    block: int
    num_blocks: int


def band_layout(topo: Topology, multiple: int = 8) -> BandLayout | None:
    """Each graph's nodes in the topological order of the first DAG of its canonical
    decomposition (for a general graph the BFS-depth DAG from its first node, i.e. BFS order),
    which keeps the ends of every edge close: on Peptides-func the bandwidth is 7.4 on average
    (95th percentile 14, at most 39 over 2,000 molecules) against ~150 atoms. ``None`` when the
    band is too wide to pay off (block > ``BAND_MAX_FRACTION`` of the padded size)."""

    def build() -> BandLayout | None:
        if topo.num_edges == 0:
            return None
        first = topo if topo.is_dag else topo.dags()[0]
        base = topological_layout(first)
        pos = base.slot - topo.graph_ids * base.n_max
        width = int((pos[topo.src] - pos[topo.dst]).abs().max())
        block = max(multiple, -(-width // multiple) * multiple)
        nb = -(-base.n_max // block)
        if nb < 2 or block > BAND_MAX_FRACTION * nb * block:
            return None
        n = nb * block
        lay = BlockLayout(slot=topo.graph_ids * n + pos, num_graphs=topo.num_graphs, n_max=n,
                          identity=False)
        return BandLayout(lay, block, nb)

    return topo._cached("band_layout", build)


def diagonally_dominant(edge_weight: Tensor, topo: Topology) -> bool:
    """Whether every row of ``A`` has absolute sum below 1 (``I - A`` strictly row diagonally
    dominant; the row normalisation of Sec. 3.3 guarantees ``< gamma``), in every batch and head:
    then block elimination needs no pivoting across blocks."""
    return bool((segment_sum(edge_weight.abs(), topo.dst, topo.num_nodes) < 1).all())


def _band_entry_index(graph: Tensor, row: Tensor, col: Tensor, h: int, nb: int,
                      s: int) -> Tensor:
    """``(h, E)``: each (head, edge)'s flat index among the ``(G, H, nb, 3, s, s)`` block
    diagonals of :func:`_band_blocks` (per batch element)."""
    E = graph.numel()
    bi, bj = row // s, col // s
    side = bj - bi + 1  # 0 below the diagonal block, 1 on it, 2 above
    heads = torch.arange(h, device=graph.device).view(h, 1)
    return ((((graph.view(1, E) * h + heads) * nb + bi.view(1, E)) * 3 + side.view(1, E)) * s
            + (row % s).view(1, E)) * s + (col % s).view(1, E)


def _band_blocks(w: Tensor, flat: Tensor, num_graphs: int, nb: int, s: int) -> Tensor:
    """The three block diagonals of ``I - A``, block-row-major: ``(nb, 3, m, s, s)`` with
    ``m = b G H`` and ``[i, 0]`` = blocks ``(i, i-1)``, ``[i, 1]`` = ``(i, i)``, ``[i, 2]`` =
    ``(i, i+1)``; ``flat`` from :func:`_band_entry_index` (which indexes them in
    ``(b, G, H, nb, 3, s, s)`` order). Block-row-major so that every step of the sweeps reads
    whole contiguous ``(m, s, s)`` batches."""
    b, h, E = w.shape
    blocks = w.new_zeros(b, num_graphs, h, nb, 3, s, s)
    blocks[..., 1, :, :].diagonal(dim1=-2, dim2=-1).fill_(1.0)
    # scatter_add_ (duplicate edges add up): index_add_ with alpha took a slow path on CPU,
    # 0.8 ms against 0.02 ms for a bucket of 4 peptides
    blocks.view(b, -1).scatter_add_(-1, flat.view(1, -1).expand(b, -1), -w.reshape(b, h * E))
    return blocks.view(-1, nb, 3, s, s).permute(1, 2, 0, 3, 4).contiguous()


def _band_edge_gradient(M: Tensor, L_padded: Tensor, flat: Tensor, b: int) -> Tensor:
    """``dw (b, H, E)``, ``dw_e = <M[row_e, :], L[col_e, :]>`` as in
    :func:`_edge_weight_gradient`, for ``M (m, nb, s, n)`` in a band layout and ``L`` the same
    shape stored as rows ``s .. s + m n`` of ``L_padded (m n + 2 s, n)`` (zero rows around it).
    Every edge joins the same or neighbouring blocks of ``s`` rows, so ``dA``'s three block
    diagonals ``M_i L_jᵀ`` (``|i - j| <= 1``) hold all the edges' entries.

    Why: one batched ``(s x n) @ (n x 3s)`` product of each block row of ``M`` with the window
    of ``3 s`` rows of ``L`` around it (overlapping strided views, no copy) runs near the CPU's
    peak, where gathering two rows of ``n`` per edge and head was memory-bound (about 3x the
    time on 64 peptides), and three ``s``-wide products took ~40% longer.
    """
    m, nb, s, n = M.shape
    # window k = rows (k - 1) s .. (k + 2) s of L; across a graph boundary it holds rows of
    # unrelated blocks, which no edge index reads
    windows = L_padded.as_strided((m * nb, 3 * s, n), (s * n, n, 1))
    P = torch.bmm(M.reshape(m * nb, s, n), windows.mT)  # (m nb, s, 3 s)
    P = P.view(m * nb, s, 3, s).transpose(1, 2).reshape(b, -1)  # _band_entry_index's order
    h, E = flat.shape
    return P.gather(-1, flat.view(1, -1).expand(b, -1)).view(b, h, E)


class _BandedResolvent(torch.autograd.Function):
    """``L = (I - A(w))^-1`` for a block-tridiagonal ``I - A`` (blocks of ``s`` nodes,
    :func:`band_layout`) by block LU without pivoting across blocks (the block Thomas
    algorithm; valid for a diagonally dominant ``I - A``, see :func:`diagonally_dominant`), then
    ``X = T^-1`` from the LDU recurrences of :func:`chimera.ops.band_sweeps.fill_inverse`.

    With ``D_0 = T_00``, ``G_i = D_{i-1}^-1 T_{i-1,i}``, ``D_i = T_ii - T_{i,i-1} G_i``,
    ``F_i = T_{i,i-1} D_{i-1}^-1``: ``X_{k,j} = -G_{k+1} X_{k+1,j}`` right of the diagonal,
    ``X_{k,j} = -X_{k,j+1} F_{j+1}`` (plus ``D_j^-1``) on and below it. ``O(n^2 s)`` per graph
    and head instead of the LU's ``O(n^3)``, in ``2 n / s`` sequential steps. The adjoint
    ``M = (I - A)^-T gL`` reuses the factors (``Tᵀ``'s pivots are ``D_iᵀ``, its multipliers
    ``G_iᵀ``), then the edge-only gradient.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, w: Tensor, flat: Tensor, num_graphs: int, nb: int, s: int) -> Tensor:
        L_padded, L, d_inv, g, lo = _band_solve(w, flat, num_graphs, nb, s)
        ctx.save_for_backward(L_padded, d_inv, g, lo, flat)
        b, h, _ = w.shape
        return L.view(b, num_graphs, h, nb * s, nb * s)

    @staticmethod
    def backward(ctx, gL: Tensor):
        L_padded, d_inv, g, lo, flat = ctx.saved_tensors
        nb, m, s, _ = d_inv.shape
        M = gL.reshape(m, nb, s, nb * s).clone(memory_format=torch.contiguous_format)
        _band_adjoint_(M, d_inv, g, lo)
        return _band_edge_gradient(M, L_padded, flat, gL.shape[0]), None, None, None, None


def _band_solve(w: Tensor, flat: Tensor, num_graphs: int, nb: int,
                s: int) -> tuple[Tensor, ...]:
    """The forward of :class:`_BandedResolvent`: ``(L_padded, L (m, nb, s, n), D^-1, G, lo)``
    with ``L`` stored as rows ``s .. s + m n`` of ``L_padded`` (zero rows around it)."""
    b, h, _ = w.shape
    n = nb * s
    m = b * num_graphs * h
    blocks = _band_blocks(w, flat, num_graphs, nb, s)
    lo, dg, up = blocks[:, 0], blocks[:, 1], blocks[:, 2]
    cpu = w.device.type == "cpu"
    # one thread with flush-to-zero: the decaying entries of L turn subnormal, and the flag
    # only holds on the calling thread (two threads: the sweeps 12 -> 30 ms on 64 peptides);
    # the sequential loops are chimera.ops.band_sweeps (TorchScript)
    with single_threaded_cpu(cpu), flush_denormal_cpu(cpu):
        d_inv, g = band_sweeps.run_factor(lo, dg, up)
        # -F_i = -T_{i,i-1} D_{i-1}^-1 and -G_i, for i = 1 .. nb - 1
        neg_f = torch.bmm(lo[1:].flatten(0, 1), d_inv[:-1].flatten(0, 1)).neg_()
        neg_g = g[1:].neg()
        # L is stored with s zero rows before and after it for the edge gradient's windows;
        # every entry of L itself is written by the sweep
        L_padded = w.new_empty(m * n + 2 * s, n)
        L_padded[:s].zero_()
        L_padded[-s:].zero_()
        L = L_padded[s:-s].view(m, nb, s, n)
        buf = torch.empty(m * s * n, dtype=w.dtype, device=w.device)
        band_sweeps.run_fill_inverse(L.view(m, n, n), d_inv, neg_g, neg_f.view(nb - 1, m, s, s),
                                     buf)
    flush_tiny_into(L, L)  # subnormals slow every product with L (flush_tiny)
    return L_padded, L, d_inv, g, lo


def _band_adjoint_(M: Tensor, d_inv: Tensor, g: Tensor, lo: Tensor) -> Tensor:
    """``M <- (I - A)^-T M`` in place for ``M (m, nb, s, n)`` (contiguous), with the factors of
    :func:`_band_solve`, then flushed."""
    nb, m, s, _ = d_inv.shape
    cpu = M.device.type == "cpu"
    with single_threaded_cpu(cpu), flush_denormal_cpu(cpu):  # as in the forward
        buf = torch.empty(2, m, s, M.shape[-1], dtype=M.dtype, device=M.device)
        band_sweeps.run_adjoint_(M, d_inv, g, lo, buf)
    return flush_tiny_into(M, M)


class _BandedMaskedAttention(torch.autograd.Function):
    """``Y = (L ∘ C Bᵀ) V`` with ``L`` from the band elimination of :class:`_BandedResolvent`, in
    one node: the masked product's ``gL`` is a fresh tensor of this node's own, so the band's
    adjoint runs in place on it (no copy of ``gL`` per bucket)."""

    @staticmethod
    @autocast_off
    def forward(ctx, w: Tensor, V: Tensor, B: Tensor, C: Tensor, flat: Tensor, num_graphs: int,
                nb: int, s: int) -> Tensor:
        L_padded, L, d_inv, g, lo = _band_solve(w, flat, num_graphs, nb, s)
        b, h, _ = w.shape
        Y, S, M = _masked_attention_forward(L.view(b, num_graphs, h, nb * s, nb * s), V, B, C)
        ctx.save_for_backward(L_padded, d_inv, g, lo, flat, V, B, C, S, M)
        ctx.shape = (b, num_graphs, h)
        return Y

    @staticmethod
    def backward(ctx, gY: Tensor):
        L_padded, d_inv, g, lo, flat, V, B, C, S, M = ctx.saved_tensors
        nb, m, s, _ = d_inv.shape
        n = nb * s
        L = L_padded[s:-s].view(*ctx.shape, n, n)
        gL, gV, gB, gC = _masked_attention_backward(L, V, B, C, S, M, gY)
        gL = _band_adjoint_(gL.view(m, nb, s, n), d_inv, g, lo)
        dw = _band_edge_gradient(gL, L_padded, flat, ctx.shape[0])
        return dw, gV, gB, gC, None, None, None, None


def resolvent_banded(edge_weight: Tensor, topo: Topology, band: BandLayout) -> Tensor:
    """``L (b, G, H, n, n)`` in ``band.layout`` by the block-tridiagonal elimination of
    :class:`_BandedResolvent` (needs a diagonally dominant ``I - A``)."""
    flat = _band_entry_index_cached(edge_weight.shape[1], topo, band)
    return _BandedResolvent.apply(edge_weight, flat, band.layout.num_graphs, band.num_blocks,
                                  band.block)


def _band_entry_index_cached(h: int, topo: Topology, band: BandLayout) -> Tensor:
    """:func:`_band_entry_index` for ``h`` heads, cached on ``topo`` per layout."""

    def build() -> Tensor:
        graph, row, col = _edge_positions(topo, band.layout)
        return _band_entry_index(graph, row, col, h, band.num_blocks, band.block)

    return _cached_per_layout(topo, band.layout, f"band_entry_index_{h}", build)


class _BandedTriangularResolvent(torch.autograd.Function):
    """``L = (I - A(w))^-1`` of a DAG in a band layout whose positions are topological (the
    down DAG of a BFS pair, or the up DAG in the same positions): ``I - A`` is block lower (or
    upper) bidiagonal, so no factorisation is needed. With ``D_i = T_ii`` (unit triangular,
    inverted in one batched call) and ``F_i = D_i^-1 T_{i,i-1}``: ``X_i = D_i^-1 E_i - F_i
    X_{i-1}`` in one sweep of ``nb`` products over the lower part; the adjoint is one sweep over
    ``Tᵀ``, then the same windowed edge gradient as :class:`_BandedResolvent`."""

    @staticmethod
    @autocast_off
    def forward(ctx, w: Tensor, flat: Tensor, num_graphs: int, nb: int, s: int,
                upper: bool) -> Tensor:
        b, h, _ = w.shape
        n, m = nb * s, b * num_graphs * h
        blocks = _band_blocks(w, flat, num_graphs, nb, s)
        dg, off = blocks[:, 1], blocks[:, 2 if upper else 0]
        cpu = w.device.type == "cpu"
        with single_threaded_cpu(cpu), flush_denormal_cpu(cpu):  # see _band_solve
            eye = torch.eye(s, dtype=w.dtype, device=w.device)
            d_inv = torch.linalg.solve_triangular(dg, eye.expand_as(dg), upper=upper,
                                                  unitriangular=True)
            F = torch.bmm(d_inv.flatten(0, 1), off.flatten(0, 1)).view_as(d_inv)
            L_padded = w.new_zeros(m * n + 2 * s, n)
            L = L_padded[s:-s].view(m, nb, s, n)
            L.view(m, nb, s, nb, s).diagonal(dim1=1, dim2=3).copy_(d_inv.permute(1, 2, 3, 0))
            buf = torch.empty(m * s * n, dtype=w.dtype, device=w.device)
            band_sweeps.run_fill_bidiagonal(L, F, upper, buf)
        flush_tiny_into(L, L)
        ctx.save_for_backward(L_padded, d_inv, off, flat)
        ctx.upper = upper
        return L.view(b, num_graphs, h, n, n)

    @staticmethod
    def backward(ctx, gL: Tensor):
        L_padded, d_inv, off, flat = ctx.saved_tensors
        nb, m, s, _ = d_inv.shape
        n = nb * s
        M = gL.reshape(m, nb, s, n).clone(memory_format=torch.contiguous_format)
        cpu = gL.device.type == "cpu"
        with single_threaded_cpu(cpu), flush_denormal_cpu(cpu):
            buf = torch.empty(2, m, s, n, dtype=gL.dtype, device=gL.device)
            band_sweeps.run_adjoint_bidiagonal_(M, d_inv, off, ctx.upper, buf)
        flush_tiny_into(M, M)
        return (_band_edge_gradient(M, L_padded, flat, gL.shape[0]),
                None, None, None, None, None)


def resolvent_dag_banded(edge_weight: Tensor, topo: Topology, band: BandLayout,
                         triangle: str) -> Tensor:
    """``L (b, G, H, n, n)`` of the DAG ``topo`` in ``band.layout``, where it is ``triangle``
    (see :func:`triangle_of`), by the block-bidiagonal sweep of
    :class:`_BandedTriangularResolvent`."""
    flat = _band_entry_index_cached(edge_weight.shape[1], topo, band)
    return _BandedTriangularResolvent.apply(edge_weight, flat, band.layout.num_graphs,
                                            band.num_blocks, band.block, triangle == "upper")


def mix_banded(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
               band: BandLayout) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` with ``L`` from :func:`resolvent_banded`, node tensors ``(b, T, H,
    ·)`` as in :func:`sma_apply` (``B``, ``C`` with ``H`` heads or one, shared), in one autograd
    node (:class:`_BandedMaskedAttention`)."""
    if _shared_across_heads(B) and _shared_across_heads(C):
        B, C = B[:, :, :1], C[:, :, :1]  # scores once for all heads (see sma_apply)
    lay = band.layout
    Vd, Bd, Cd = (to_head_blocks(t, lay) for t in (V, B, C))
    flat = _band_entry_index_cached(edge_weight.shape[1], topo, band)
    Y = _BandedMaskedAttention.apply(edge_weight, Vd, Bd, Cd, flat, lay.num_graphs,
                                     band.num_blocks, band.block)
    return from_head_blocks(Y, lay)


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
