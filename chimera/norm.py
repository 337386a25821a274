"""Steps 2-3 of the path: selectivities -> edge weights -> normalised adjacency.

Three normalisations keep ``L = (I - A)^-1`` existing and well scaled (DESIGN.md section 1):

* :func:`dag_normalize` (Sec. 4.1, Prop. 4.3, eq. 14/16): on a DAG, divide each node's incoming
  weights by ``|p(i)|`` (``divisor="count"``, the paper) or by ``sqrt(|p(i)|)``
  (``divisor="sqrt"``, the authors' ImageNet code), and scale the node's input ``B_i v_i`` by the
  same average of ``-ln A_ij``; roots take ``delta_i`` as in Mamba.
* :func:`row_normalize` (Sec. 3.3, Prop. 3.4): on a general graph,
  ``A[i, :] <- gamma * A[i, :] / (sum_j A_ij + exp(psi_i))`` so every row sum is ``< gamma < 1``.
* :func:`two_cycle_normalize` (App. B.1): on graphs whose edges come in pairs ``i <-> j``
  (the undirected line), scale each pair so that ``A_ij A_ji <= gamma^2 / 4``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from chimera.topology import Topology


def segment_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum ``values (b, h, E)`` into ``(b, h, num_segments)`` bins given by ``index (E,)``.

    Why ``scatter_add`` with the index broadcast over ``(b, h)``: its backward is a ``gather``,
    where ``index_add``'s is an ``index_select`` along the last axis, a slow path on CPU (64
    peptides, 4 heads: 1.2 -> 0.25 ms forward + backward)."""
    out = values.new_zeros(*values.shape[:-1], num_segments)
    return out.scatter_add(-1, index.expand(values.shape), values)


def gather_nodes(values: Tensor, index: Tensor) -> Tensor:
    """``values[..., index]`` for node values ``(b, h, T)`` and an index ``(E,)``: ``(b, h, E)``.

    Why ``gather`` (index broadcast over ``(b, h)``) and not ``index_select(-1, index)``: the
    latter takes a slow path on CPU (64 peptides, 4 heads: ~1 ms against 0.09 ms), and
    ``gather``'s backward is a ``scatter_add``."""
    return values.gather(-1, index.expand(*values.shape[:-1], index.numel()))


def edge_selectivity(
    delta: Tensor,
    topology: Topology,
    delta_edge: Tensor | None = None,
    mode: Literal["mean", "target"] = "mean",
) -> Tensor:
    """Per-edge selectivity ``delta_ij (b, h, E)`` from node selectivities ``delta (b, T, h)``.

    ``mode="mean"`` (the paper, Sec. 3.3/4.1.1): ``(delta_i + delta_j) / 2`` or, with edge
    selectivities ``delta_edge (b, h, E)``, ``(delta_i + delta_j + delta_e) / 3``.
    ``mode="target"`` (the authors' ImageNet code): the selectivity of the edge's target.
    """
    d = delta.transpose(1, 2)  # (b, h, T)
    if mode == "target":
        out = gather_nodes(d, topology.dst)
        return out if delta_edge is None else (out + delta_edge) / 2
    if mode != "mean":
        raise ValueError(f"unknown edge selectivity mode {mode!r}")
    total = gather_nodes(d, topology.src) + gather_nodes(d, topology.dst)
    if delta_edge is None:
        return total / 2
    return (total + delta_edge) / 3


def edge_log_weight(delta_edge: Tensor, A_log: Tensor) -> Tensor:
    """``ln A_ij = a_h * delta_ij`` with ``a_h = -exp(A_log_h) < 0`` (Mamba-2's ``A``)."""
    return -torch.exp(A_log.float()).to(delta_edge.dtype)[None, :, None] * delta_edge


def dag_normalize(
    log_weight: Tensor,
    delta: Tensor,
    topology: Topology,
    divisor: Literal["count", "sqrt"] = "count",
    edge_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Normalised DAG weights and the per-node input scale (paper eq. 16).

    Args:
        log_weight: ``ln A_ij`` per edge, ``(b, h, E)`` (non-positive).
        delta: node selectivities ``(b, T, h)`` (used for roots).
        divisor: ``"count"`` divides by ``|p(i)|`` (eq. 14/16, the paper); ``"sqrt"`` by
            ``sqrt(|p(i)|)`` (the released ImageNet code).
        edge_mask: optional ``(b, E)`` bool, False for edges that are absent in that batch row
            (cut at a sentence boundary, :mod:`chimera.varlen`): their weight is exactly 0 and
            they do not count in ``|p(i)|``, so a node whose parents are all cut is a root.

    Returns:
        ``edge_weight (b, h, E)`` and ``input_scale (b, T, h)``, the factor multiplying
        ``B_i v_i`` (apply it to ``V``: ``(L ∘ C (sB)ᵀ) V = (L ∘ C Bᵀ)(s V)``).
    """
    dst = topology.dst
    if edge_mask is None:
        indeg = topology.in_degree.to(log_weight.dtype)  # (T,)
        keep = None
    else:
        if edge_mask.shape != (log_weight.shape[0], topology.num_edges):
            raise ValueError(f"edge_mask must be (batch, E) = ({log_weight.shape[0]}, "
                             f"{topology.num_edges}), got {tuple(edge_mask.shape)}")
        keep = edge_mask.unsqueeze(1)  # (b, 1, E)
        indeg = segment_sum(keep.to(log_weight.dtype), dst, topology.num_nodes)  # (b, 1, T)
    if divisor == "count":
        div = indeg.clamp(min=1)
    elif divisor == "sqrt":
        div = indeg.clamp(min=1).sqrt()
    else:
        raise ValueError(f"unknown DAG normaliser {divisor!r}; use 'count' or 'sqrt'")
    weight = torch.exp(log_weight) / gather_nodes(div, dst)
    neg_log = -log_weight
    if keep is not None:
        weight = torch.where(keep, weight, 0.0)
        neg_log = torch.where(keep, neg_log, 0.0)
    # B~_i = (1/|p(i)|) sum_j (-ln A_ij) B_i; roots: delta_i B_i (Mamba's discretisation)
    scale = segment_sum(neg_log, dst, topology.num_nodes) / div
    scale = torch.where(indeg == 0, delta.transpose(1, 2), scale)
    return weight, scale.transpose(1, 2)


def row_normalize(weight: Tensor, psi: Tensor, topology: Topology, gamma: float = 0.95) -> Tensor:
    """``A[i, :] <- gamma A[i, :] / (sum_j A_ij + exp(psi_i))`` (Sec. 3.3, Prop. 3.4).

    ``weight (b, h, E)`` non-negative, ``psi (b, T, h)``. Row sums end up ``< gamma``, so
    ``||A||_inf < gamma < 1`` and ``||L||_inf <= 1 / (1 - gamma)``.
    """
    if not 0 < gamma < 1:
        raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
    dst = topology.dst
    row_sum = segment_sum(weight, dst, topology.num_nodes)
    # the clamp keeps an all-underflowed row (huge delta, very negative psi) at 0 instead of 0/0
    denom = (row_sum + torch.exp(psi.transpose(1, 2))).clamp(min=torch.finfo(weight.dtype).tiny)
    return gamma * weight / gather_nodes(denom, dst)


def two_cycle_normalize(weight: Tensor, topology: Topology, gamma: float = 0.95) -> Tensor:
    """Scale both edges of every 2-cycle ``i <-> j`` so that ``A_ij A_ji <= gamma^2 / 4`` (App.
    B.1). Pairs already under the bound are left unchanged; edges without a reverse partner must
    be absent (the constraint is for undirected lines, where every edge has one)."""
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma}")
    rev = topology.reverse_edge
    if bool((rev < 0).any()):
        raise ValueError(
            f"the 2-cycle constraint needs every edge paired with its reverse; "
            f"'{topology.name}' has unpaired edges"
        )
    bound = gamma * gamma / 4
    prod = weight * weight[..., rev]
    factor = torch.clamp(bound / prod.clamp(min=torch.finfo(weight.dtype).tiny), max=1.0).sqrt()
    return weight * factor

