"""The linear-time DAG recurrence (paper Prop. 4.2 / 4.4): a topological sweep over level sets.

With the state ``H_i = B_i v_iᵀ`` (``N x P`` per node and head), ``H = L X`` is the solution of
``(I - A) H = X``, i.e. ``H_i = X_i + sum_{j in p(i)} A_ij H_j``, computed level by level in
``O(|E| N P)`` work without any ``T x T`` matrix. The backward pass is the adjoint sweep
``G_j = dH_j + sum_{i: j in p(i)} A_ij G_i`` in reverse order, with ``dA_ij = <G_i, H_j>``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chimera.topology import Topology


class _DagStateSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X: Tensor, w: Tensor, src: Tensor, dst: Tensor, schedule: list[Tensor]):
        H = X.clone()
        wt = w.transpose(1, 2)  # (b, E, h)
        for eids in schedule:
            s, d = src[eids], dst[eids]
            H.index_add_(1, d, H[:, s] * wt[:, eids, :, None])
        ctx.save_for_backward(H, wt, src, dst)
        ctx.schedule = schedule
        return H

    @staticmethod
    def backward(ctx, dH: Tensor):
        H, wt, src, dst = ctx.saved_tensors
        G = dH.clone()
        dwt = torch.zeros_like(wt)
        for eids in reversed(ctx.schedule):
            s, d = src[eids], dst[eids]
            Gd = G[:, d]
            G.index_add_(1, s, Gd * wt[:, eids, :, None])
            dwt[:, eids] = (Gd * H[:, s]).sum(-1)
        return G, dwt.transpose(1, 2), None, None, None


def dag_state_solve(X: Tensor, edge_weight: Tensor, topo: Topology) -> Tensor:
    """``H = (I - A)^-1 X`` on a DAG by the level-set recurrence. ``X (b, T, H, F)``,
    ``edge_weight (b, H, E)``."""
    topo.require_dag("the DAG scan")
    return _DagStateSolve.apply(X, edge_weight, topo.src, topo.dst, topo.edge_schedule())


def mix_dag_scan(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology) -> Tensor:
    b, T, h, p = V.shape
    n = B.shape[-1]
    X = (B.unsqueeze(-1) * V.unsqueeze(-2)).reshape(b, T, h, n * p)
    H = dag_state_solve(X, edge_weight, topo).view(b, T, h, n, p)
    return torch.einsum("bthn,bthnp->bthp", C, H)
