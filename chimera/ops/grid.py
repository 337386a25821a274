"""Grid corner DAGs by row sweeps: the mask form without any gather.

Every corner DAG of an ``H x W`` grid becomes the top-left DAG after flipping rows and/or
columns, so one algorithm serves all four. In the top-left frame node ``(r, c)`` has the parents
``(r, c-1)`` (weight ``a_left``) and ``(r-1, c)`` (weight ``a_up``), and row ``r`` of the grid
satisfies ``L[(r, ·), :] = R_r ([a_up ⊙ L[(r-1, ·), :] | I])`` where ``R_r`` is the ``W x W``
1-D resolvent of the row (``R[c, c'] = prod_{k=c'+1}^{c} a_left[k]``, Mamba's segment sums).
So ``L`` is built in ``H`` dense steps, each one batched matmul over contiguous memory; row ``r``
only has columns in rows ``<= r``, which halves the work. This is the "row-by-row steps with a
parallel scan inside each row" scheme of DESIGN.md, in the mask (SMA) form that wins at ViT sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chimera.ops.masks import segsum
from chimera.topology import GRID_CORNERS, Topology


def grid_frame(topo: Topology) -> dict | None:
    """How a complete grid corner DAG maps onto the top-left frame, or None if ``topo`` is not
    one (then the generic algorithms apply). Cached on the topology."""

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
        return dict(H=H, W=W, orig_of_frame=orig_of_frame, frame_of_orig=frame_of_orig,
                    horizontal=horizontal, target=fd)

    return topo._cached("grid_frame", build)


def _row_resolvents(a_left: Tensor) -> Tensor:
    """``(M, H, W, W)`` 1-D resolvents of every grid row (Mamba's segment sums)."""
    log_left = torch.log(a_left.clamp(min=torch.finfo(a_left.dtype).tiny))
    return torch.exp(segsum(log_left))


def _row_sweep(a_left: Tensor, a_up: Tensor):
    """Yield ``(r, L_r)`` with ``L_r (M, W, (r+1) W)`` the rows of ``L`` for grid row ``r``
    restricted to the columns of rows ``<= r`` (the others are structurally zero)."""
    M, H, W = a_left.shape
    R = _row_resolvents(a_left)
    eye = torch.eye(W, dtype=a_left.dtype, device=a_left.device).expand(M, W, W)
    prev = None
    for r in range(H):
        U = eye if prev is None else torch.cat([a_up[:, r, :, None] * prev, eye], dim=-1)
        prev = R[:, r] @ U
        yield r, prev


def mix_grid_dag(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology,
                 frame: dict) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on a complete grid corner DAG (see the module docstring).

    The SMA product is fused into the row sweep, block row by block row, so ``L`` and
    ``C Bᵀ`` are never materialised beyond the lower block triangle.
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
