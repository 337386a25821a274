"""Grid corner DAGs in the mask (SMA) form: block-row sweeps, all corners of a grid in one SMA.

Every corner DAG of an ``H x W`` grid is a stack of ``H`` directed rows linked by vertical edges.
Take the top-left DAG: node ``(r, c)`` has the parents ``(r, c-1)`` (weight ``a_left``) and
``(r-1, c)`` (weight ``a_up``). Ordering nodes row-major, row block ``r`` of ``L = (I - A)^-1``
satisfies

    L_r = R_r [ a_up[r] ⊙ L_{r-1} | I ]                                        (1)

with ``R_r`` the ``W x W`` 1-D resolvent of row ``r`` (a directed line: Mamba's segment sums,
:func:`chimera.ops.masks.decay_mask`) and ``L_r`` restricted to the columns of rows ``<= r``, the
only non-zero ones. The other corners differ only in direction: bottom corners sweep rows from
the bottom (``L_r`` then covers the rows ``>= r`` and reads ``L_{r+1}``), right corners have upper
triangular ``R_r`` (their rows run right to left). So one sweep, written in the grid's own node
order, serves all four without permuting any node tensor. This is the "row-by-row steps with a
parallel scan inside each row" scheme of DESIGN.md, in the mask form that wins at ViT sizes.

Input scaling is folded into the mask: the mixer scales ``V`` per DAG (``s_k``, eq. 16) and
``(L ∘ C Bᵀ)(s ⊙ V) = (L diag(s) ∘ C Bᵀ) V``; right-multiplying (1) by ``diag(s)`` only replaces
``I`` by ``diag(s_r)``, so the sweep builds ``L diag(s)`` at no extra cost.

:func:`mix_grid_corners` computes ``Σ_k (L_k diag(s_k) ∘ C_{g(k)} B_{g(k)}ᵀ) V`` for the corner
DAGs of one grid as one SMA: the masked scores of all corners are summed into one ``T x T`` mask
per head, then multiplied by ``V`` once. The scores ``C Bᵀ`` are computed once per B/C group and
batch entry, not per head (B/C are shared by the heads; with the paper's diagonal sharing TL+BR
and TR+BL use one score matrix each). Compared with one SMA per DAG this halves the large matmul
work (one dense product instead of four half-triangular ones) and replaces thousands of small
per-row products by a handful of large ones. The row sweeps of all corners and the masking by
the scores are one custom autograd function (:class:`_CornerSMAMask`) whose backward is the
hand-written adjoint sweep: no autograd graph of ``H`` steps, and no per-corner mask or masked
score matrix ever exists as a ``T x T`` tensor (the only one is the final mask).

For grids above :data:`MASK_MAX_NODES` nodes the ``T x T`` masks get too large and
:func:`mix_grid_dag` (one DAG, the SMA fused row by row) or the state scan apply.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from chimera.ops.linalg import autocast_off, flush_tiny
from chimera.ops.masks import decay_mask, safe_log
from chimera.topology import GRID_CORNERS, Topology

# largest grid (in nodes) that mix_grid_corners handles with dense T x T masks
MASK_MAX_NODES = 1024


def grid_frame(topo: Topology) -> dict | None:
    """How a complete grid corner DAG maps onto the top-left frame, or None if ``topo`` is not
    one (then the generic algorithms apply). Cached on the topology.

    Keys: ``H, W``; ``corner`` (a name of ``GRID_CORNERS``); ``down`` (rows are swept from the
    top) and ``rightward`` (horizontal edges point to larger columns); ``horizontal`` (edge mask);
    ``orig_of_frame`` (the node of each frame position) and ``target`` (edge targets in
    the frame).
    """

    def build() -> dict | None:
        corner = topo.name.rsplit("/", 1)[-1]
        if topo.kind != "grid" or topo.grid_shape is None or corner not in GRID_CORNERS:
            return None
        if topo.num_graphs != 1:
            return None
        H, W = topo.grid_shape
        if topo.num_edges != 2 * H * W - H - W:
            return None
        dev = topo.device
        rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
        if corner.startswith("bottom"):
            rows = rows.flip(0)
        if corner.endswith("right"):
            cols = cols.flip(0)
        orig_of_frame = (rows[:, None] * W + cols[None, :]).flatten()
        frame_of_orig = torch.argsort(orig_of_frame)
        fs, fd = frame_of_orig[topo.src], frame_of_orig[topo.dst]
        horizontal = (fd - fs == 1) & (fd // W == fs // W) if W > 1 else torch.zeros_like(
            fd, dtype=torch.bool)
        vertical = fd - fs == W
        if not bool((horizontal | vertical).all()):
            return None
        # complete: every non-first column has a left parent, every non-first row an up parent
        if int(horizontal.sum()) != H * (W - 1) or int(vertical.sum()) != (H - 1) * W:
            return None
        return dict(H=H, W=W, corner=corner, down=corner.startswith("top"),
                    rightward=corner.endswith("left"), orig_of_frame=orig_of_frame,
                    horizontal=horizontal, target=fd)

    return topo._cached("grid_frame", build)


# ---------------------------------------------------------------------------------------------
# the block-row sweep (1) for all corners at once, masked by the scores, with its adjoint
# ---------------------------------------------------------------------------------------------
def _prev_span(r: int, H: int, W: int, down: bool) -> tuple[int, int]:
    """Columns of the row block swept before ``r``: those its ``L`` rows can be non-zero in."""
    return (0, r * W) if down else ((r + 1) * W, H * W)


def _picker(ks: list[int], kidx: Tensor):
    """Select corners ``ks`` along dim 0: a view when they are consecutive, else a gather."""
    if ks == list(range(ks[0], ks[0] + len(ks))):
        return lambda x: x[ks[0]:ks[0] + len(ks)]
    return lambda x: x.index_select(0, kidx)


def _scores_for(S: Tensor, groups: list[int]) -> Tensor:
    """``(len(groups), b, hS, T, T)``: the scores of each listed group; a view (no copy) when
    the groups are consecutive, e.g. the top corners' under diagonal sharing."""
    if groups == list(range(groups[0], groups[0] + len(groups))):
        return S[:, groups[0]:groups[0] + len(groups)].transpose(0, 1)
    return S[:, groups].transpose(0, 1)


class _CornerSMAMask(torch.autograd.Function):
    """The SMA mask ``Σ_k L_k diag(s_k) ∘ S_{g_k}``, ``(b, h, T, T)``, by the sweep (1).

    Inputs, stacked over the ``K`` corners: ``R (K, M, H, W, W)`` row resolvents in the grid's
    column order (``M = b h``), ``a_v (K, M, H, W)`` weight of the vertical edge into each node
    (unused in a corner's first swept row), ``s (K, M, H, W)`` column scales; the scores
    ``S (b, G, h_S, T, T)`` (``C Bᵀ`` per B/C group, ``h_S`` = 1 when shared by the heads, else
    ``h``); ``downs`` (per corner: swept from the top) and ``group`` (per corner: its ``S``).

    Corners that sweep in the same direction advance together (one batched product per step),
    and each step adds its row blocks, already multiplied by their scores, straight into the
    one output: neither per-corner masks nor per-group masked scores ever exist as ``T x T``
    tensors. The row blocks of every ``L_k`` (the non-zero part, ``T^2 / 2`` per corner) are
    kept for the backward, the adjoint of (1) swept in the opposite order; it forms
    ``dL_k = dmask ∘ S_{g_k}`` and ``dS_g += Σ_heads dmask ∘ L_k`` row block by row block, and
    carries the gradient reaching the previous row block in a ``W x T`` tensor.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, R: Tensor, a_v: Tensor, s: Tensor, S: Tensor, downs: tuple[bool, ...],
                group: tuple[int, ...]) -> Tensor:
        K, M, H, W, _ = R.shape
        b, _, hS, T, _ = S.shape
        h = M // b
        mask = R.new_zeros(b, h, T, T)
        diag = R * s.unsqueeze(-2)  # the diagonal blocks R_r diag(s_r)
        rows_kept: dict[bool, list[Tensor]] = {}
        for down in (True, False):
            ks = [k for k in range(K) if downs[k] == down]
            if not ks:
                continue
            nk = len(ks)
            pick = _picker(ks, torch.tensor(ks, device=R.device))
            Rd, avd, dd = pick(R), pick(a_v), pick(diag)  # (nk, M, H, ...)
            Sd = _scores_for(S, [group[k] for k in ks])  # (nk, b, hS, T, T)
            order = range(H) if down else range(H - 1, -1, -1)
            kept = []
            prev = None
            for step, r in enumerate(order):
                d = dd[:, :, r].reshape(-1, W, W)
                if step == 0:
                    row, lo, hi = d, r * W, (r + 1) * W
                else:
                    lo, hi = (0, (r + 1) * W) if down else (r * W, T)
                    Rr = Rd[:, :, r].reshape(-1, W, W)
                    off = torch.bmm(Rr, avd[:, :, r].reshape(-1, W, 1) * prev)
                    row = torch.cat([off, d] if down else [d, off], dim=-1)
                rows = slice(r * W, (r + 1) * W)
                masked = row.view(nk, b, h, W, hi - lo) * Sd[:, :, :, rows, lo:hi]
                mask[:, :, rows, lo:hi] += masked.sum(0) if nk > 1 else masked[0]
                kept.append(row)
                prev = row
            rows_kept[down] = kept
        ctx.save_for_backward(R, a_v, s, S)
        ctx.rows_kept = rows_kept
        ctx.meta = (downs, group)
        return mask

    @staticmethod
    @once_differentiable
    def backward(ctx, dmask: Tensor):
        R, a_v, s, S = ctx.saved_tensors
        downs, group = ctx.meta
        K, M, H, W, _ = R.shape
        b, G, hS, T, _ = S.shape
        h = M // b
        dR = torch.zeros_like(R)
        da_v = torch.zeros_like(a_v)
        dDiag = torch.zeros_like(R)  # gradient of each diagonal block R_r diag(s_r)
        dS = torch.zeros_like(S)
        for down in (True, False):
            ks = [k for k in range(K) if downs[k] == down]
            if not ks:
                continue
            nk = len(ks)
            kidx = torch.tensor(ks, device=R.device)
            pick = _picker(ks, kidx)
            Rd, avd = pick(R), pick(a_v)
            gk = [group[k] for k in ks]
            Sd = _scores_for(S, gk)  # (nk, b, hS, T, T)
            dSd = S.new_zeros(nk, b, hS, T, T)
            kept = ctx.rows_kept[down]
            order = list(range(H)) if down else list(range(H - 1, -1, -1))
            dRd = torch.zeros_like(Rd)
            davd = torch.zeros_like(avd)
            dDd = torch.zeros_like(Rd)
            carry = None
            for step in range(H - 1, -1, -1):
                r = order[step]
                if step == 0:
                    lo, hi = r * W, (r + 1) * W
                else:
                    lo, hi = (0, (r + 1) * W) if down else (r * W, T)
                width = hi - lo
                rows = slice(r * W, (r + 1) * W)
                dm = dmask[:, :, rows, lo:hi]  # (b, h, W, width)
                # scores side: dS_g += Σ_heads dmask ∘ L_k over this row block
                prod = dm * kept[step].view(nk, b, h, W, width)
                dSd[:, :, :, rows, lo:hi] += prod.sum(2, keepdim=True) if hS == 1 else prod
                # mask side: the gradient of L_k's row block, plus what later rows sent back
                Gr = (dm * Sd[:, :, :, rows, lo:hi]).reshape(nk * M, W, width)
                if carry is not None:
                    Gr = Gr + carry
                dsl = slice(width - W, width) if down or step == 0 else slice(0, W)
                dDd[:, :, r] = Gr[:, :, dsl].reshape(nk, M, W, W)
                if step == 0:
                    break
                Gp = Gr[:, :, :width - W] if down else Gr[:, :, W:]
                prev = kept[step - 1]
                av = avd[:, :, r].reshape(-1, W, 1)
                Rr = Rd[:, :, r].reshape(-1, W, W)
                dRd[:, :, r] = torch.bmm(Gp, (av * prev).transpose(1, 2)).view(nk, M, W, W)
                dU = torch.bmm(Rr.transpose(1, 2), Gp)
                davd[:, :, r] = (dU * prev).sum(-1).view(nk, M, W)
                carry = av * dU
            if ks == list(range(ks[0], ks[0] + nk)):
                dR[ks[0]:ks[0] + nk], da_v[ks[0]:ks[0] + nk] = dRd, davd
                dDiag[ks[0]:ks[0] + nk] = dDd
            else:
                dR.index_copy_(0, kidx, dRd)
                da_v.index_copy_(0, kidx, davd)
                dDiag.index_copy_(0, kidx, dDd)
            dS.index_add_(1, torch.tensor(gk, device=S.device), dSd.transpose(0, 1))
        # through diag = R diag(s): dR += dDiag diag(s), ds = column sums of dDiag ⊙ R
        dR += dDiag * s.unsqueeze(-2)
        ds = (dDiag * R).sum(-2)
        return dR, da_v, ds, dS, None, None


def corner_sma_mask(R: Tensor, a_v: Tensor, s: Tensor, S: Tensor, downs: tuple[bool, ...],
                    group: tuple[int, ...]) -> Tensor:
    """``(b, h, T, T)``: ``Σ_k L_k diag(s_k) ∘ S[:, group[k]]`` in row-major node order.

    ``R (K, b h, H, W, W)`` row resolvents (see :func:`row_resolvents`), ``a_v`` and
    ``s (K, b h, H, W)``, scores ``S (b, G, 1 or h, T, T)``; ``downs[k]``: corner ``k`` is a top
    corner (swept from the top). See :class:`_CornerSMAMask`."""
    return _CornerSMAMask.apply(R, a_v, s, S, tuple(downs), tuple(group))


# ---------------------------------------------------------------------------------------------
# all corners of one grid: summed masks, one SMA
# ---------------------------------------------------------------------------------------------
def _in_edge_index(topo: Topology, frame: dict) -> Tensor:
    """``(2 T,)`` edge ids (``E``, a zero dummy, where there is none): first, per node
    ``(r, c)``, the horizontal in-edge of ``(r, c)`` for rows running rightward, of
    ``(r, c - 1)`` for rows running leftward (the order :func:`row_resolvents` takes); then per
    node its vertical in-edge. Cached on the topology."""

    def build() -> Tensor:
        E, T, W = topo.num_edges, topo.num_nodes, frame["W"]
        hor = frame["horizontal"]
        ids = torch.arange(E, device=topo.device)
        h_idx = torch.full((T,), E, dtype=torch.long, device=topo.device)
        v_idx = h_idx.clone()
        h_idx[topo.dst[hor]] = ids[hor]
        v_idx[topo.dst[~hor]] = ids[~hor]
        if not frame["rightward"]:  # shift right by one column
            h_idx = torch.cat([h_idx.new_full((T // W, 1), E), h_idx.view(-1, W)[:, :-1]], 1)
            h_idx = h_idx.reshape(-1)
        return torch.cat([h_idx, v_idx])

    return topo._cached("grid_in_edges", build)


def row_resolvents(a_h: Tensor, rightward: bool) -> Tensor:
    """``(..., H, W, W)`` 1-D resolvents of every grid row, in the grid's column order.

    Rows running rightward: ``a_h[c]`` is the weight of the edge ``c-1 -> c`` and ``R`` is the
    lower triangular ``decay_mask``. Rows running leftward: ``a_h[c]`` is the weight of the edge
    ``c -> c-1`` (the in-edge of column ``c-1``), so that ``R[c, c'] = prod_{k=c+1}^{c'} a_h[k]``
    for ``c <= c'``: the transpose of the same mask, with no flips."""
    R = decay_mask(safe_log(a_h))
    return R if rightward else R.transpose(-1, -2)


def grid_corners_applicable(dags: list[Topology], max_nodes: int = MASK_MAX_NODES) -> bool:
    """Whether :func:`mix_grid_corners` serves these DAGs: complete corner DAGs of one grid shape
    with at most ``max_nodes`` nodes."""
    frames = [grid_frame(d) for d in dags]
    if not frames or any(f is None for f in frames):
        return False
    shapes = {(f["H"], f["W"]) for f in frames}
    return len(shapes) == 1 and dags[0].num_nodes <= max_nodes


def mix_grid_corners(V: Tensor, B: Tensor, C: Tensor, edge_weights: list[Tensor],
                     input_scales: list[Tensor | None], dags: list[Topology],
                     groups: list[int]) -> Tensor:
    """``Σ_k (L_k ∘ C_{g_k} B_{g_k}ᵀ)(s_k ⊙ V)`` over corner DAGs of one grid (module docstring).

    Args:
        V: ``(b, T, h, P)``.
        B, C: ``(b, T, G, h_bc, N)``: ``G`` B/C groups, ``h_bc`` = 1 (shared by all heads) or
            ``h`` (per head).
        edge_weights: per DAG ``(b, h, E)``; input_scales: per DAG ``(b, T, h)`` or None (1).
        dags: complete corner DAGs of one grid (see :func:`grid_corners_applicable`).
        groups: the B/C group of every DAG.
    """
    b, T, h, P = V.shape
    K = len(dags)
    # top corners first: the sweep then takes each direction's corners as one slice
    order = sorted(range(K), key=lambda k: not grid_frame(dags[k])["down"])
    dags, groups = [dags[k] for k in order], [groups[k] for k in order]
    edge_weights, input_scales = [edge_weights[k] for k in order], [input_scales[k] for k in order]
    frames = [grid_frame(d) for d in dags]
    H, W = frames[0]["H"], frames[0]["W"]
    M = b * h
    E = dags[0].num_edges
    # all corners' horizontal (rightward order) and vertical in-edge weights in one gather
    idx = torch.cat([_in_edge_index(d, f) + k * (E + 1)
                     for k, (d, f) in enumerate(zip(dags, frames, strict=True))])
    w = torch.stack(list(edge_weights))  # (K, b, h, E)
    w = torch.cat([w, w.new_zeros(K, b, h, 1)], dim=-1).permute(1, 2, 0, 3).reshape(b, h, -1)
    a = w.index_select(-1, idx).view(b, h, K, 2, H, W).permute(2, 3, 0, 1, 4, 5)
    a = a.reshape(K, 2, M, H, W)
    R = decay_mask(safe_log(a[:, 0]))  # (K, M, H, W, W)
    if not all(f["rightward"] for f in frames):  # see row_resolvents
        R = torch.stack([Rk if f["rightward"] else Rk.transpose(-1, -2)
                         for Rk, f in zip(R.unbind(0), frames, strict=True)])
    if all(x is None for x in input_scales):
        s = V.new_ones(K, M, H, W)
    else:
        s = torch.stack([V.new_ones(b, T, h) if x is None else x for x in input_scales])
        s = s.permute(0, 1, 3, 2).reshape(K, M, H, W)
    scores = C.permute(0, 2, 3, 1, 4) @ B.permute(0, 2, 3, 4, 1)  # (b, G, h_bc, T, T)
    mask = corner_sma_mask(R, a[:, 1], s, scores, tuple(f["down"] for f in frames), tuple(groups))
    Y = mask @ V.transpose(1, 2).contiguous()  # (b, h, T, P)
    return Y.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# one large corner DAG: the SMA fused row block by row block in the top-left frame
# ---------------------------------------------------------------------------------------------
def _row_sweep(a_left: Tensor, a_up: Tensor):
    """Yield ``(r, L_r)`` with ``L_r (M, W, (r+1) W)`` the rows of ``L`` for grid row ``r`` in
    the top-left frame, restricted to the columns of rows ``<= r`` (the others are zero)."""
    M, H, W = a_left.shape
    # this path serves grids above MASK_MAX_NODES: along such rows the decays reach the
    # subnormal range, where every product is many times slower (see flush_tiny)
    R = flush_tiny(row_resolvents(a_left, rightward=True))
    eye = torch.eye(W, dtype=a_left.dtype, device=a_left.device).expand(M, W, W)
    prev = None
    for r in range(H):
        U = eye if prev is None else torch.cat([a_up[:, r, :, None] * prev, eye], dim=-1)
        prev = R[:, r] @ U
        yield r, prev


def _frame_weights(edge_weight: Tensor, frame: dict) -> tuple[Tensor, Tensor]:
    """``a_left, a_up (b*h, H, W)``: each node's horizontal and vertical in-edge weight in the
    top-left frame (0 where it has none), from ``edge_weight (b, h, E)``."""
    b, h, _ = edge_weight.shape
    H, W = frame["H"], frame["W"]
    hor, target = frame["horizontal"], frame["target"]
    zeros = edge_weight.new_zeros(b, h, H * W)
    a_left = zeros.index_copy(-1, target[hor], edge_weight[..., hor]).reshape(b * h, H, W)
    a_up = zeros.index_copy(-1, target[~hor], edge_weight[..., ~hor]).reshape(b * h, H, W)
    return a_left, a_up


def _frame_flips(frame: dict) -> tuple[int, ...]:
    """Dims of a ``(b, H, W, ...)`` node tensor that map it to the top-left frame and back
    (``orig_of_frame`` is exactly these flips of rows and/or columns)."""
    return (*((1,) if not frame["down"] else ()), *((2,) if not frame["rightward"] else ()))


def _to_frame(x: Tensor, frame: dict, rows_first: bool = False) -> Tensor:
    """Node tensor ``(b, T, h, k)`` -> ``(b*h, H, W, k)`` in the top-left frame's row order, or
    ``(H, b*h, W, k)`` with ``rows_first`` (every row one contiguous block).

    Flips, not a gather by ``orig_of_frame``: a gather's backward is a scatter-add (``index_put``,
    ~20 ms per tensor at 64x64) where a flip's is a flip."""
    b, T, h, k = x.shape
    H, W = frame["H"], frame["W"]
    x = x.reshape(b, H, W, h, k)
    flips = _frame_flips(frame)
    if flips:
        x = x.flip(flips)
    if rows_first:
        return x.permute(1, 0, 3, 2, 4).reshape(H, b * h, W, k)
    return x.permute(0, 3, 1, 2, 4).reshape(b * h, H, W, k)


def _from_frame(y: Tensor, frame: dict, b: int, rows_first: bool = False) -> Tensor:
    """Inverse of :func:`_to_frame`: ``(b*h, H, W, k)`` (or ``(H, b*h, W, k)`` with
    ``rows_first``) -> ``(b, T, h, k)`` in node order."""
    if rows_first:
        H, M, W, k = y.shape
        y = y.view(H, b, M // b, W, k).permute(1, 0, 3, 2, 4)
    else:
        M, H, W, k = y.shape
        y = y.view(b, M // b, H, W, k).permute(0, 2, 3, 1, 4)
    flips = _frame_flips(frame)
    if flips:
        y = y.flip(flips)
    return y.reshape(b, H * W, M // b, k)


def mix_grid_dag(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
                 frame: dict) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one complete grid corner DAG of any size.

    The SMA product is fused into the sweep (1), block row by block row, so only one row block
    of ``L`` and of ``C Bᵀ`` exists at a time in the forward: the path for grids too large for
    :func:`mix_grid_corners`' ``T x T`` masks. Works in the top-left frame (node tensors are
    permuted into it and back).
    """
    b, T, h, P = V.shape
    W = frame["W"]
    a_left, a_up = _frame_weights(edge_weight, frame)

    def heads_first(x: Tensor) -> Tensor:  # (b, T, h, k) in frame order -> (b*h, T, k)
        return _to_frame(x, frame).flatten(1, 2)

    # per-row chunks (split/cat have cheap backwards; prefix slices of one tensor would each
    # allocate a full-size zero gradient)
    Vs, Bs, Cs = (heads_first(x).split(W, dim=1) for x in (V, B, C))
    out = []
    for r, L_r in _row_sweep(a_left, a_up):
        B_upto = torch.cat(Bs[: r + 1], dim=1)
        V_upto = torch.cat(Vs[: r + 1], dim=1)
        scores = Cs[r] @ B_upto.transpose(1, 2)  # (M, W, (r+1) W)
        out.append((L_r * scores) @ V_upto)
    return _from_frame(torch.cat(out, dim=1).view(b * h, frame["H"], W, P), frame, b)


# ---------------------------------------------------------------------------------------------
# one large corner DAG: the state form, row by row (the grid's dag_scan)
# ---------------------------------------------------------------------------------------------
def _row_resolvents_by_products(a_left: Tensor) -> Tensor:
    """:func:`row_resolvents` of rightward rows, ``(..., H, W, W)``, without autograd, by the
    recursion ``R[c] = a_left[c] R[c-1] + e_c`` over the columns: ``W`` small products instead
    of the masks' cumulative sums and exponentials over all ``W^2`` entries (64x64, batch 32:
    ~40 vs ~120 ms), and exact products rather than ``exp`` of summed logarithms.

    Entries below ``sqrt(finfo.tiny)`` are zeroed (:func:`~chimera.ops.linalg.flush_tiny`): along
    rows of 64 nodes the decays reach the subnormal range, and every product with a subnormal
    operand is many times slower (the 64x64 ``dag_scan`` forward: 985 -> 149 ms)."""
    W = a_left.shape[-1]
    R = a_left.new_zeros(*a_left.shape, W)
    R[..., 0, 0] = 1.0
    for c in range(1, W):
        torch.mul(R[..., c - 1, :c], a_left[..., c, None], out=R[..., c, :c])
        R[..., c, c] = 1.0
    return flush_tiny(R)


def _row_input(U: Tensor, B_r: Tensor, V_r: Tensor, a_r: Tensor, prev: Tensor | None) -> None:
    """``U <- B_r ⊗ v_r + a_up[r] ⊙ H_{r-1}`` in place: ``U (M, W, N, P)``, ``prev (M, W, N P)``."""
    torch.mul(B_r[..., None], V_r[:, :, None, :], out=U)
    if prev is not None:
        U.view(prev.shape).addcmul_(a_r[..., None], prev)


def _segment_length(n_rows: int) -> int:
    """Rows per recomputed segment: the forward keeps ``n_rows / k`` checkpoints, the backward
    adds ``k`` rows of recomputed states (and a few row buffers); ``k ~ sqrt(n_rows / 2)`` keeps
    the sum near its least while a segment's recompute stays short."""
    return max(1, math.ceil(math.sqrt(n_rows / 2)))


class _GridStateScan(torch.autograd.Function):
    """``y = C·H`` with ``H = (I - A)^-1 (B ⊗ v)`` on a grid corner DAG in the top-left frame,
    row by row, with checkpointed recomputation of the states in backward.

    Each row is a directed line fed by the row above, so with the row's 1-D resolvent ``R_r``
    (``W x W``, :func:`_row_resolvents_by_products` of the horizontal weights ``a_left``) the
    states of row ``r`` are ``H_r = R_r U_r`` with ``U_r = B_r ⊗ v_r + a_up[r] ⊙ H_{r-1}``:
    ``H`` sequential steps of one batched ``W x W`` by ``W x N P`` product each, ``O(T W N P)``
    work and no ``T x T`` tensor (the row-by-row scheme of DESIGN.md in state form; the generic
    level-set scan of :mod:`chimera.ops.scan` needs ``H + W - 1`` gather/scatter steps for the
    same DAG).

    The adjoint runs the rows in reverse: ``Ḣ_r = C_r ⊗ ẏ_r + a_up[r+1] ⊙ U̇_{r+1}``,
    ``U̇_r = R_rᵀ Ḣ_r``, ``ȧ_up[r] = <U̇_r, H_{r-1}>``. The horizontal weights get theirs straight
    from the resolvent's derivative, ``∂H_r = R_r ∂A_r H_r``: ``ȧ_left[r, c] = <U̇_r[c],
    H_r[c-1]>``, a dot product per node instead of the ``W x W`` product ``Ṙ_r = Ḣ_r U_rᵀ`` and
    a backward through the masks' exponentials.

    Memory: the forward keeps only the states entering every segment of ``k`` rows
    (:func:`_segment_length`); the backward recomputes one segment at a time into ``k`` reused
    row buffers, so the peak is ``O((H / k + k) W N P)`` beside the inputs, not ``O(T N P)``.
    Every per-row product writes into a preallocated buffer: fresh 8 MB results per row
    (64x64, batch 32) cost their page faults on every step.

    Rows first, so that every row is one contiguous block: ``V (H, M, W, P)``,
    ``B, C (H, M, W, N)``, ``a_left, a_up (H, M, W)`` (``a_left[..., 0]`` and ``a_up[0]``
    unused).
    """

    @staticmethod
    @autocast_off
    def forward(ctx, V: Tensor, B: Tensor, C: Tensor, a_left: Tensor, a_up: Tensor) -> Tensor:
        V, B, C, a_up = (x.contiguous() for x in (V, B, C, a_up))  # per-row views below
        n_rows, M, W, P = V.shape
        N = B.shape[-1]
        MW = M * W
        k = _segment_length(n_rows)
        R = _row_resolvents_by_products(a_left)
        Y = V.new_empty(n_rows, M, W, P)
        U = V.new_empty(M, W, N, P)
        states = (V.new_empty(M, W, N * P), V.new_empty(M, W, N * P))
        checkpoints = V.new_empty(max(0, (n_rows - 1) // k), M, W, N * P)
        prev = None
        for r in range(n_rows):
            _row_input(U, B[r], V[r], a_up[r], prev)
            # a segment's entry state goes straight into its checkpoint slot
            kept = (r + 1) % k == 0 and r + 1 < n_rows
            out = checkpoints[(r + 1) // k - 1] if kept else states[r % 2]
            cur = torch.bmm(R[r], U.view(M, W, N * P), out=out)
            torch.bmm(C[r].view(MW, 1, N), cur.view(MW, N, P), out=Y[r].view(MW, 1, P))
            prev = cur
        ctx.save_for_backward(V, B, C, R, a_up, checkpoints)
        ctx.segment = k
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY: Tensor):
        V, B, C, R, a_up, checkpoints = ctx.saved_tensors
        k = ctx.segment
        n_rows, M, W, P = V.shape
        N = B.shape[-1]
        MW = M * W
        dY = dY.contiguous()
        dV, dB, dC = torch.empty_like(V), torch.empty_like(B), torch.empty_like(C)
        d_left, d_up = torch.zeros_like(a_up), torch.zeros_like(a_up)
        Hs = [V.new_empty(M, W, N * P) for _ in range(min(k, n_rows))]
        U = V.new_empty(M, W, N, P)
        # Ḣ_r and U̇_r: U̇_r becomes the carry into the next (upper) row's Ḣ, so they swap
        hd, ud = V.new_empty(M, W, N * P), V.new_empty(M, W, N * P)
        tmp = V.new_empty(M, W, N * P)
        carry = False
        for seg in range((n_rows - 1) // k, -1, -1):
            s0, s1 = seg * k, min(n_rows, (seg + 1) * k)
            entry = checkpoints[seg - 1] if seg else None  # H_{s0 - 1}
            prev = entry
            for i, r in enumerate(range(s0, s1)):  # recompute this segment's states
                _row_input(U, B[r], V[r], a_up[r], prev)
                prev = torch.bmm(R[r], U.view(M, W, N * P), out=Hs[i])
            for r in range(s1 - 1, s0 - 1, -1):
                i = r - s0
                dy = dY[r]
                hd4 = hd.view(M, W, N, P)
                if carry:  # Ḣ_r = C_r ⊗ ẏ_r + the carry already in hd
                    hd4.addcmul_(C[r, :, :, :, None], dy[:, :, None, :])
                else:
                    torch.mul(C[r, :, :, :, None], dy[:, :, None, :], out=hd4)
                torch.bmm(R[r].transpose(-1, -2), hd, out=ud)
                Hr = Hs[i]
                # per-node contractions as (1 x P) @ (P x N) and (1 x N) @ (N x P) products with
                # the row vector first: 2-4x faster than the same contraction as (N x P) @ (P x 1)
                torch.bmm(dy.view(MW, 1, P), Hr.view(MW, N, P).mT, out=dC[r].view(MW, 1, N))
                torch.bmm(B[r].view(MW, 1, N), ud.view(MW, N, P), out=dV[r].view(MW, 1, P))
                torch.bmm(V[r].view(MW, 1, P), ud.view(MW, N, P).mT, out=dB[r].view(MW, 1, N))
                # dot products through one reused buffer: vecdot's fresh 8 MB temporary per call
                # paid its page faults every row (3x the product itself)
                d_left[r, :, 1:] = torch.mul(ud[:, 1:], Hr[:, :-1], out=tmp[:, 1:]).sum(-1)
                if r:
                    d_up[r] = torch.mul(ud, Hs[i - 1] if i else entry, out=tmp).sum(-1)
                    ud.mul_(a_up[r, :, :, None])
                    hd, ud = ud, hd
                    carry = True
        return dV, dB, dC, d_left, d_up


def mix_grid_scan(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
                  frame: dict) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one complete grid corner DAG by the row-by-row state recurrence
    (:class:`_GridStateScan`): linear in the number of nodes in time and memory, the grid's
    ``dag_scan``. ``V (b, T, h, P)``, ``B, C (b, T, h, N)``, ``edge_weight (b, h, E)``."""
    a_left, a_up = (a.transpose(0, 1).contiguous() for a in _frame_weights(edge_weight, frame))
    Y = _GridStateScan.apply(*(_to_frame(x, frame, rows_first=True) for x in (V, B, C)), a_left,
                             a_up)
    return _from_frame(Y, frame, V.shape[0], rows_first=True)
