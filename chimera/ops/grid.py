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
DAGs of one grid. DAGs whose B/C group is the same share the score matrix ``C Bᵀ``, so their masks
are summed before multiplying by it (with the paper's diagonal sharing TL+BR and TR+BL), and all
groups' masked scores are summed before the one ``T x T`` by ``T x P`` product per head. The
scores are computed once per group and batch entry, not per head (B/C are shared by the heads).
Compared with one SMA per DAG this halves the large matmul work (one dense product instead of
four half-triangular ones) and replaces thousands of small per-row products by a handful of
large ones; the row sweep itself is a custom autograd function (:class:`_CornerSweep`) whose
backward is the hand-written adjoint sweep, so the sweep leaves no autograd graph of ``H`` steps.

For grids above :data:`MASK_MAX_NODES` nodes the ``T x T`` masks get too large and
:func:`mix_grid_dag` (one DAG, the SMA fused row by row) or the state scan apply.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from chimera.ops.masks import decay_mask, safe_log
from chimera.topology import GRID_CORNERS, Topology

# largest grid (in nodes) that mix_grid_corners handles with dense T x T masks
MASK_MAX_NODES = 1024


def grid_frame(topo: Topology) -> dict | None:
    """How a complete grid corner DAG maps onto the top-left frame, or None if ``topo`` is not
    one (then the generic algorithms apply). Cached on the topology.

    Keys: ``H, W``; ``corner`` (a name of ``GRID_CORNERS``); ``down`` (rows are swept from the
    top) and ``rightward`` (horizontal edges point to larger columns); ``horizontal`` (edge mask);
    ``orig_of_frame`` / ``frame_of_orig`` (node permutations) and ``target`` (edge targets in
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
                    frame_of_orig=frame_of_orig, horizontal=horizontal, target=fd)

    return topo._cached("grid_frame", build)


# ---------------------------------------------------------------------------------------------
# the block-row sweep (1) with its adjoint
# ---------------------------------------------------------------------------------------------
def _prev_span(r: int, H: int, W: int, down: bool) -> tuple[int, int]:
    """Columns of the row block swept before ``r`` (empty for the first one)."""
    return (0, r * W) if down else ((r + 1) * W, H * W)


class _CornerSweep(torch.autograd.Function):
    """``L diag(s) (M, T, T)`` of corner DAGs that all sweep in one vertical direction.

    Inputs: ``R (M, H, W, W)`` row resolvents (already oriented for left/right corners),
    ``a_v (M, H, W)`` weight of the vertical edge into each node (unused in the first swept
    row), ``s (M, H, W)`` column scales, and ``down``. The forward writes each row block's
    non-zero part into one zero-initialised buffer (no concatenations); the backward is the
    adjoint of (1) in the opposite order and re-reads the previous row blocks from the output.
    """

    @staticmethod
    def forward(ctx, R: Tensor, a_v: Tensor, s: Tensor, down: bool) -> Tensor:
        M, H, W, _ = R.shape
        T = H * W
        L = R.new_zeros(M, T, T)
        order = range(H) if down else range(H - 1, -1, -1)
        for step, r in enumerate(order):
            rows = slice(r * W, (r + 1) * W)
            # the diagonal block R_r diag(s_r)
            L[:, rows, rows] = R[:, r] * s[:, r, None, :]
            if step:
                lo, hi = _prev_span(r, H, W, down)
                p = r - 1 if down else r + 1  # the row block swept just before
                prev = L[:, p * W:(p + 1) * W, lo:hi]
                L[:, rows, lo:hi] = torch.bmm(R[:, r], a_v[:, r, :, None] * prev)
        ctx.save_for_backward(R, a_v, s, L)
        ctx.down = down
        return L

    @staticmethod
    @once_differentiable
    def backward(ctx, dL: Tensor):
        R, a_v, s, L = ctx.saved_tensors
        down = ctx.down
        M, H, W, _ = R.shape
        dR, da_v, ds = torch.zeros_like(R), torch.zeros_like(a_v), torch.zeros_like(s)
        G = dL.clone()  # accumulates the gradient reaching each row block through later rows
        order = list(range(H)) if down else list(range(H - 1, -1, -1))
        for step in range(H - 1, -1, -1):
            r = order[step]
            rows = slice(r * W, (r + 1) * W)
            Rr = R[:, r]
            G_diag = G[:, rows, rows]
            dR[:, r] = G_diag * s[:, r, None, :]
            ds[:, r] = (G_diag * Rr).sum(1)
            if step:
                lo, hi = _prev_span(r, H, W, down)
                p = order[step - 1]  # the row block read by row r
                prev = L[:, p * W:(p + 1) * W, lo:hi]
                G_prev = G[:, rows, lo:hi]
                U = a_v[:, r, :, None] * prev
                dR[:, r] += torch.bmm(G_prev, U.transpose(1, 2))
                dU = torch.bmm(Rr.transpose(1, 2), G_prev)
                da_v[:, r] = (dU * prev).sum(-1)
                G[:, p * W:(p + 1) * W, lo:hi] += a_v[:, r, :, None] * dU
        return dR, da_v, ds, None


def corner_masks(R: Tensor, a_v: Tensor, s: Tensor, down: bool) -> Tensor:
    """``L diag(s)`` for corner DAGs sweeping ``down`` (top corners) or up (bottom corners).

    ``R (M, H, W, W)``: row resolvents; ``a_v (M, H, W)``: vertical in-edge weight per node;
    ``s (M, H, W)``: column scales. Returns ``(M, H*W, H*W)`` in row-major node order.
    """
    return _CornerSweep.apply(R, a_v, s, down)


# ---------------------------------------------------------------------------------------------
# all corners of one grid: summed masks, one SMA
# ---------------------------------------------------------------------------------------------
def _in_weights(edge_weight: Tensor, topo: Topology, frame: dict) -> tuple[Tensor, Tensor]:
    """Weights of the horizontal and of the vertical edge into every node, ``(b*h, H, W)`` each
    in the grid's node order (0 where a node has no such parent)."""
    b, h, _ = edge_weight.shape
    hor, dst = frame["horizontal"], topo.dst
    zeros = edge_weight.new_zeros(b, h, topo.num_nodes)
    shape = (b * h, frame["H"], frame["W"])
    a_h = zeros.index_copy(-1, dst[hor], edge_weight[..., hor]).view(shape)
    a_v = zeros.index_copy(-1, dst[~hor], edge_weight[..., ~hor]).view(shape)
    return a_h, a_v


def row_resolvents(a_h: Tensor, rightward: bool) -> Tensor:
    """``(M, H, W, W)`` 1-D resolvents of every grid row, in the grid's column order: lower
    triangular when the row's edges point right, upper triangular when they point left."""
    if rightward:
        return decay_mask(safe_log(a_h))
    return decay_mask(safe_log(a_h.flip(-1))).flip(-1).flip(-2)


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
        edge_weights: per DAG ``(b, h, E_k)``; input_scales: per DAG ``(b, T, h)`` or None (1).
        dags: complete corner DAGs of one grid (see :func:`grid_corners_applicable`).
        groups: the B/C group of every DAG.
    """
    b, T, h, P = V.shape
    frames = [grid_frame(d) for d in dags]
    H, W = frames[0]["H"], frames[0]["W"]
    M = b * h
    by_direction: dict[bool, list[int]] = {True: [], False: []}
    for k, f in enumerate(frames):
        by_direction[f["down"]].append(k)
    masks: dict[int, Tensor] = {}
    for down, ks in by_direction.items():
        if not ks:
            continue
        Rs, avs, ss = [], [], []
        for k in ks:
            a_h, a_v = _in_weights(edge_weights[k], dags[k], frames[k])
            Rs.append(row_resolvents(a_h, frames[k]["rightward"]))
            avs.append(a_v)
            s = input_scales[k]
            ss.append(V.new_ones(M, H, W) if s is None
                      else s.permute(0, 2, 1).reshape(M, H, W))
        L = corner_masks(torch.cat(Rs), torch.cat(avs), torch.cat(ss), down)
        for i, k in enumerate(L.view(len(ks), b, h, T, T).unbind(0)):
            masks[ks[i]] = k
    # corners of one group share C Bᵀ: sum their masks first
    per_group: dict[int, Tensor] = {}
    for k, g in enumerate(groups):
        per_group[g] = masks[k] if g not in per_group else per_group[g] + masks[k]
    Bt = B.permute(0, 2, 3, 4, 1)  # (b, G, h_bc, N, T)
    Ct = C.permute(0, 2, 3, 1, 4)  # (b, G, h_bc, T, N)
    mask = None
    for g, Lg in per_group.items():
        term = Lg * (Ct[:, g] @ Bt[:, g])  # (b, h, T, T) * (b, h_bc, T, T)
        mask = term if mask is None else mask + term
    Y = mask @ V.permute(0, 2, 1, 3)
    return Y.permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------------------------
# one large corner DAG: the SMA fused row block by row block in the top-left frame
# ---------------------------------------------------------------------------------------------
def _row_sweep(a_left: Tensor, a_up: Tensor):
    """Yield ``(r, L_r)`` with ``L_r (M, W, (r+1) W)`` the rows of ``L`` for grid row ``r`` in
    the top-left frame, restricted to the columns of rows ``<= r`` (the others are zero)."""
    M, H, W = a_left.shape
    R = row_resolvents(a_left, rightward=True)
    eye = torch.eye(W, dtype=a_left.dtype, device=a_left.device).expand(M, W, W)
    prev = None
    for r in range(H):
        U = eye if prev is None else torch.cat([a_up[:, r, :, None] * prev, eye], dim=-1)
        prev = R[:, r] @ U
        yield r, prev


def mix_grid_dag(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
                 frame: dict) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one complete grid corner DAG of any size.

    The SMA product is fused into the sweep (1), block row by block row, so only one row block
    of ``L`` and of ``C Bᵀ`` exists at a time in the forward: the path for grids too large for
    :func:`mix_grid_corners`' ``T x T`` masks. Works in the top-left frame (node tensors are
    permuted into it and back).
    """
    b, T, h, P = V.shape
    H, W = frame["H"], frame["W"]
    hor, target = frame["horizontal"], frame["target"]
    zeros = edge_weight.new_zeros(b, h, T)
    a_left = zeros.index_copy(-1, target[hor], edge_weight[..., hor]).reshape(b * h, H, W)
    a_up = zeros.index_copy(-1, target[~hor], edge_weight[..., ~hor]).reshape(b * h, H, W)
    order = frame["orig_of_frame"]

    def heads_first(x: Tensor) -> Tensor:  # (b, T, h, k) in frame order -> (b*h, T, k)
        return x[:, order].permute(0, 2, 1, 3).reshape(b * h, T, x.shape[-1])

    # per-row chunks (split/cat have cheap backwards; prefix slices of one tensor would each
    # allocate a full-size zero gradient)
    Vs, Bs, Cs = (heads_first(x).split(W, dim=1) for x in (V, B, C))
    out = []
    for r, L_r in _row_sweep(a_left, a_up):
        B_upto = torch.cat(Bs[: r + 1], dim=1)
        V_upto = torch.cat(Vs[: r + 1], dim=1)
        scores = Cs[r] @ B_upto.transpose(1, 2)  # (M, W, (r+1) W)
        out.append((L_r * scores) @ V_upto)
    Y = torch.cat(out, dim=1).view(b, h, T, P).permute(0, 2, 1, 3)
    return Y[:, frame["frame_of_orig"]]
