"""Step 4 of the path: the one functional core, ``Y = (L ∘ C Bᵀ) V`` with ``L = (I - A)^-1``.

Every algorithm sits behind the same signature and gives the same answer where it applies:

============  ===================  =======================================================
method        topologies           how ``L`` (or ``L X``) is obtained
============  ===================  =======================================================
reference     any                  dense LU solve in float64: the test oracle
exact         any                  lines: closed forms (chimera.ops.line); grid corner DAGs:
                                   row sweeps; other DAGs: rows of L by the level-set
                                   recurrence (a BFS-DAG pair: triangular solves); graphs
                                   with a narrow band in BFS order and a diagonally dominant
                                   ``I - A``: block-tridiagonal elimination; otherwise LU
neumann       any                  ``sum_{k<=K} A^k`` by squaring (K = diameter by default)
dag_dense     DAGs                 ``(I + A)(I + A^2)(I + A^4)...``: exact by nilpotency
dag_scan      DAGs                 linear-time recurrence, no ``T x T``: grid corner DAGs
                                   row by row (one batched product per row), other DAGs
                                   over level sets
ssd           directed lines       Mamba-2's chunked SSD
triton        DAGs                 the level-set recurrence as a Triton kernel
============  ===================  =======================================================

``mix`` applies no normalisation: callers build ``edge_weight`` with :mod:`chimera.norm`.

:func:`mix_sum` is the multi-DAG entry point of the mixer, ``Σ_k (L_k ∘ C_{g_k} B_{g_k}ᵀ)
(s_k ⊙ V)`` over a DAG decomposition with B/C groups; for the corner DAGs of a grid with
``exact`` it sums the masks and runs one SMA (:func:`chimera.ops.grid.mix_grid_corners`), and
likewise for lines on the same tokens (:func:`chimera.ops.line.mix_lines`: the two directed lines
of the text DAG encoder, or the undirected line of the UG encoder) and for other DAGs on the same
nodes whose masks come from the dense rows (the BFS-DAG pair of a graph: one SMA per B/C group
over ``Σ_k L_k diag(s_k)``); otherwise it adds up :func:`mix` per DAG.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from chimera.ops import dense
from chimera.ops.grid import (
    grid_corners_applicable,
    grid_frame,
    mix_grid_corners,
    mix_grid_dag,
    mix_grid_scan,
)
from chimera.ops.line import line_kind, line_resolvent, lines_applicable, mix_lines
from chimera.ops.scan import mix_dag_scan
from chimera.ops.ssd import mix_ssd
from chimera.topology import Topology

Method = Literal["reference", "exact", "neumann", "dag_dense", "dag_scan", "ssd", "triton"]
METHODS: tuple[str, ...] = (
    "reference", "exact", "neumann", "dag_dense", "dag_scan", "ssd", "triton",
)


def _check_inputs(V: Tensor, B: Tensor, C: Tensor, w: Tensor, topo: Topology) -> None:
    if V.dim() != 4:
        raise ValueError(f"V must be (batch, T, heads, P), got shape {tuple(V.shape)}")
    b, T, h, _ = V.shape
    if T != topo.num_nodes:
        raise ValueError(f"V has {T} nodes but topology '{topo.name}' has {topo.num_nodes}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[:3] != (b, T, h):
            raise ValueError(
                f"{name} must be (batch, T, heads, N) = ({b}, {T}, {h}, N), got {tuple(t.shape)}"
            )
    if B.shape[-1] != C.shape[-1]:
        raise ValueError(f"B and C need the same state size, got {B.shape[-1]} and {C.shape[-1]}")
    if w.shape != (b, h, topo.num_edges):
        raise ValueError(
            f"edge_weight must be (batch, heads, E) = ({b}, {h}, {topo.num_edges}), "
            f"got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("edge_weight contains NaN or inf")


def mix(
    V: Tensor,
    B: Tensor,
    C: Tensor,
    edge_weight: Tensor,
    topology: Topology,
    method: Method = "exact",
    num_terms: int | Tensor | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` per head, ``L = (I - A)^-1``, ``A[i, j] = edge_weight`` of ``j -> i``.

    Args:
        V: ``(batch, T, H, P)`` values.
        B, C: ``(batch, T, H, N)`` keys and queries (already expanded to heads).
        edge_weight: ``(batch, H, E)`` weights aligned with ``topology.edge_index``.
        topology: the graph (or batch of graphs); for several graphs all ``T`` nodes of the
            batch are on the node axis and the batch axis holds independent inputs.
        method: see the module docstring.
        num_terms: ``K`` for ``neumann``: an int, or a ``(num_graphs,)`` tensor with one ``K``
            per graph of the batch (default: the largest diameter in the batch).
        chunk_size: chunk length for ``ssd``.

    Returns:
        ``(batch, T, H, P)`` in the dtype of ``V``. Half-precision inputs are computed in float32
        (solves have no bf16 kernels and the resolvent needs the range).
    """
    topology = topology.to(V.device)
    _check_inputs(V, B, C, edge_weight, topology)
    out_dtype = V.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        V, B, C, edge_weight = (t.float() for t in (V, B, C, edge_weight))
    elif B.dtype != V.dtype or C.dtype != V.dtype or edge_weight.dtype != V.dtype:
        B, C, edge_weight = (t.to(V.dtype) for t in (B, C, edge_weight))

    if method == "dag_scan" and (frame := grid_frame(topology)) is not None:
        # a grid corner: rows are lines fed by the row above, one batched product per row
        Y = mix_grid_scan(V, B, C, edge_weight, topology, frame)
    elif method == "dag_scan":
        Y = mix_dag_scan(V, B, C, edge_weight, topology)
    elif method == "ssd":
        Y = mix_ssd(V, B, C, edge_weight, topology, chunk_size=chunk_size)
    elif method == "triton":
        from chimera.ops.triton import mix_triton  # grid corner DAGs: row sweep; else levels

        Y = mix_triton(V, B, C, edge_weight, topology)
    elif method == "exact" and (frame := grid_frame(topology)) is not None:
        # one corner alone: the SMA fused row block by row block touches only the non-zero half
        # of L (measured faster than the full-mask path from 28x28 on; mix_sum merges corners)
        Y = mix_grid_dag(V, B, C, edge_weight, topology, frame)
    elif method in ("reference", "exact", "neumann", "dag_dense"):
        Y = _mix_dense(V, B, C, edge_weight, topology, method, num_terms)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return Y.to(out_dtype)


def mix_sum(
    V: Tensor,
    B: Tensor,
    C: Tensor,
    edge_weights: Sequence[Tensor],
    dags: Sequence[Topology],
    groups: Sequence[int] | None = None,
    input_scales: Sequence[Tensor | None] | None = None,
    method: Method | Sequence[Method] = "exact",
    num_terms: int | None = None,
    chunk_size: int = 64,
) -> Tensor:
    """``Σ_k (L_k ∘ C_{g_k} B_{g_k}ᵀ)(s_k ⊙ V)`` over several DAGs on the same nodes.

    Args:
        V: ``(batch, T, H, P)``.
        B, C: ``(batch, T, G, N)``, one key/query per B/C group, shared by all heads.
        edge_weights: per DAG ``(batch, H, E_k)``, aligned with ``dags[k].edge_index``.
        dags: topologies on the same ``T`` nodes (e.g. ``topology.dags()``).
        groups: the B/C group of every DAG (default: all 0).
        input_scales: per DAG ``(batch, T, H)`` factors on ``V`` (default: none).
        method: one method for all DAGs or one per DAG (see :func:`mix`).

    The corner DAGs of one grid with method ``exact`` (up to ``MASK_MAX_NODES`` nodes), lines on
    the same tokens, and other DAGs on the same nodes with method ``exact`` (dense rows of ``L``)
    take merged-mask paths; anything else is the sum of :func:`mix` over the DAGs.
    """
    K = len(dags)
    groups = [0] * K if groups is None else list(groups)
    scales = [None] * K if input_scales is None else list(input_scales)
    methods = [method] * K if isinstance(method, str) else list(method)
    if not (len(edge_weights) == len(groups) == len(scales) == len(methods) == K) or K == 0:
        raise ValueError(
            f"mix_sum needs one edge_weight, group, input scale and method per DAG; got "
            f"{len(edge_weights)}, {len(groups)}, {len(scales)}, {len(methods)} for {K} DAGs")
    b, T, h, _ = V.shape
    if B.dim() != 4 or B.shape != C.shape or B.shape[:2] != (b, T):
        raise ValueError(f"B and C must be (batch, T, groups, N) = ({b}, {T}, G, N), got "
                         f"{tuple(B.shape)} and {tuple(C.shape)}")
    if max(groups) >= B.shape[2] or min(groups) < 0:
        raise ValueError(f"groups {groups} do not index the {B.shape[2]} B/C groups")
    if all(m == "exact" for m in methods):
        dags = [d.to(V.device) for d in dags]
        # merged-mask paths, one SMA (per B/C group) over the summed masks of several DAGs:
        # lines on the same tokens (the text encoders), the corners of one grid (vision), DAGs
        # on the same nodes taking the dense-rows path (the BFS-DAG pair of a graph)
        merged = (mix_lines if lines_applicable(dags)
                  else _mix_grid_corners_sum if grid_corners_applicable(dags)
                  else _mix_dag_rows_sum if _dag_rows_applicable(dags) else None)
        if merged is not None:
            for k, dag in enumerate(dags):
                _check_inputs(V, B[:, :, :1].expand(b, T, h, -1),
                              C[:, :, :1].expand(b, T, h, -1), edge_weights[k], dag)
            out_dtype = V.dtype
            work = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
            Y = merged(V.to(work), B.to(work), C.to(work), [w.to(work) for w in edge_weights],
                       dags, groups, [None if s is None else s.to(work) for s in scales])
            if Y is not None:  # None: outside a closed form's range (lines), fall back
                return Y.to(out_dtype)
    Y = None
    for dag, w, g, s, m in zip(dags, edge_weights, groups, scales, methods, strict=True):
        Bg = B[:, :, g, None, :].expand(b, T, h, B.shape[-1])
        Cg = C[:, :, g, None, :].expand(b, T, h, C.shape[-1])
        Vk = V if s is None else V * s.unsqueeze(-1)
        y = mix(Vk, Bg, Cg, w, dag, method=m, num_terms=num_terms, chunk_size=chunk_size)
        Y = y if Y is None else Y + y
    return Y


def _mix_grid_corners_sum(V: Tensor, B: Tensor, C: Tensor, edge_weights: Sequence[Tensor],
                          dags: Sequence[Topology], groups: Sequence[int],
                          input_scales: Sequence[Tensor | None]) -> Tensor:
    """:func:`chimera.ops.grid.mix_grid_corners` with ``B, C (b, T, G, N)`` shared by heads."""
    return mix_grid_corners(V, B.unsqueeze(3), C.unsqueeze(3), list(edge_weights),
                            list(input_scales), dags, groups)


def _dag_rows_applicable(dags: Sequence[Topology]) -> bool:
    """Whether every DAG would take the dense-rows ``exact`` path of :func:`mix` (a DAG that is
    neither a grid corner nor a line) and all share one block layout (same nodes, same graphs),
    so that their masks can be added block by block."""
    if len(dags) < 2 or not all(d.is_dag and grid_frame(d) is None and line_kind(d) is None
                                for d in dags):
        return False
    first = dense.block_layout(dags[0])
    for d in dags[1:]:
        lay = dense.block_layout(d)
        if lay.n_max != first.n_max or not torch.equal(lay.slot, first.slot):
            return False
    return True


def _mix_dag_rows_sum(V: Tensor, B: Tensor, C: Tensor, edge_weights: Sequence[Tensor],
                      dags: Sequence[Topology], groups: Sequence[int],
                      scales: Sequence[Tensor | None]) -> Tensor:
    """``Σ_g ((Σ_{k in g} L_k diag(s_k)) ∘ C_g B_gᵀ) V`` with ``L_k`` the rows of each DAG's mask.

    Why: ``(L_k ∘ C Bᵀ)(s_k ⊙ V) = (L_k diag(s_k) ∘ C Bᵀ) V``, so DAGs of one B/C group need only
    one SMA over their summed masks (the SMA and its backward were about half of a BFS-DAG
    layer's time with one per DAG).
    """
    b, T, h, _ = V.shape
    layout = dense.topological_layout(dags[0])
    triangles = [dense.triangle_of(d, layout) for d in dags]
    triangular = all(triangles)
    # near-chain graphs: the same topological positions in blocks, where every DAG of the pair
    # is block bidiagonal (one sweep each, dense.resolvent_dag_banded)
    band = dense.band_layout(dags[0]) if triangular else None
    if band is not None:  # the same positions within each graph: the triangles hold
        layout = band.layout
    if not triangular:
        layout = dense.block_layout(dags[0])
    masks: dict[int, Tensor] = {}
    for dag, w, g, s, tri in zip(dags, edge_weights, groups, scales, triangles, strict=True):
        if band is not None:
            L = dense.resolvent_dag_banded(w, dag, band, tri)  # (b, G, H, n, n)
        elif triangular:
            L = dense.resolvent_dag_triangular(w, dag, layout, tri)
        else:
            L = dense.resolvent_dag_rows(w, dag, layout)
        if s is not None:  # scale the columns: L diag(s)
            L = L * dense.to_head_blocks(s.unsqueeze(-1), layout).transpose(-1, -2)
        masks[g] = L if g not in masks else masks[g] + L
    Y = None
    for g, L in masks.items():
        Bg = B[:, :, g, None, :].expand(b, T, h, B.shape[-1])
        Cg = C[:, :, g, None, :].expand(b, T, h, C.shape[-1])
        y = dense.sma_apply(L, V, Bg, Cg, layout)
        Y = y if Y is None else Y + y
    return Y


def resolvent(edge_weight: Tensor, topology: Topology, method: Method = "exact",
              num_terms: int | Tensor | None = None) -> tuple[Tensor, dense.BlockLayout]:
    """The dense mask ``L (batch, G, H, n, n)`` per graph block and the block layout."""
    if method not in ("reference", "exact", "neumann", "dag_dense"):
        raise ValueError(f"method {method!r} does not materialise L")
    is_dag = topology.is_dag
    if method == "dag_dense":
        topology.require_dag("method='dag_dense'")
    layout = dense.block_layout(topology)
    if method == "exact" and line_kind(topology) is not None:
        # lines: closed forms in O(T^2) (decay mask; semiseparable inverse of a tridiagonal)
        L = line_resolvent(edge_weight, topology)
        if L is not None:
            return L.unsqueeze(1), layout
    if method == "exact" and is_dag:
        return dense.resolvent_dag_rows(edge_weight, topology, layout), layout
    band = _band_for(edge_weight, topology, method)
    if band is not None:
        # near-chain graphs (molecules): block-tridiagonal elimination, O(n^2 s)
        return dense.resolvent_banded(edge_weight, topology, band), band.layout
    if method == "exact":
        # edge weights -> L by one LU solve in one Function (edge-only backward)
        return dense.resolvent_exact_edges(edge_weight, topology, layout), layout
    A = dense.dense_adjacency(edge_weight, topology, layout)
    if method == "reference":
        L = dense.resolvent_reference(A)
    elif method == "neumann":
        if num_terms is None:
            K = topology.max_diameter()
        elif isinstance(num_terms, Tensor):
            K = num_terms.to(A.device)  # one K per graph block
        else:
            K = int(num_terms)
        L = dense.resolvent_neumann(A, K)
    else:
        L = dense.resolvent_dag_squaring(A, int(topology.longest_path().max()))
    return L, layout


def _band_for(edge_weight: Tensor, topology: Topology, method: str,
              dominant: bool | None = None) -> dense.BandLayout | None:
    """The band layout for the block-tridiagonal elimination: the exact resolvent of a graph
    with cycles whose band pays off and whose ``I - A`` is diagonally dominant (lines try
    their closed forms first, see :func:`resolvent`); ``dominant``: already known (else
    checked)."""
    if method != "exact" or topology.is_dag:
        return None
    band = dense.band_layout(topology)
    if band is None:
        return None
    if dominant is None:
        dominant = dense.diagonally_dominant(edge_weight, topology)
    return band if dominant else None


def fused_band_for(V: Tensor, edge_weight: Tensor, topology: Topology, method: str,
                   dominant: bool | None = None) -> dense.BandLayout | None:
    """The band layout when ``mix(V, B, C, edge_weight, topology, method)`` takes the fused
    band node (:func:`chimera.ops.dense.mix_banded`), else ``None``: exact, a cyclic graph that
    is not a line, a band that pays off, a diagonally dominant ``I - A`` (``dominant``: known
    beforehand, e.g. for a whole batch), float32/64 inputs of one dtype, no autocast. Callers
    that meet these can call ``mix_banded`` directly, with ``B``, ``C`` of one head."""
    if (torch.is_autocast_enabled(V.device.type) or V.dtype not in (torch.float32, torch.float64)
            or edge_weight.dtype != V.dtype):
        return None
    return _mix_band_for(edge_weight, topology, method, dominant)


def _mix_band_for(edge_weight: Tensor, topology: Topology, method: str,
                  dominant: bool | None = None) -> dense.BandLayout | None:
    """:func:`_band_for` as ``mix`` takes it: lines keep their closed forms."""
    if line_kind(topology) is not None:
        return None
    return _band_for(edge_weight, topology, method, dominant)


def _mix_dense(V, B, C, w, topo, method, num_terms) -> Tensor:
    band = _mix_band_for(w, topo, method)
    if band is not None and not torch.is_autocast_enabled(V.device.type):
        # resolvent and masked product in one node (dense.mix_banded)
        return dense.mix_banded(V, B, C, w, topo, band)
    if band is not None:  # under autocast: the band's L, then the plain masked product
        L, layout = dense.resolvent_banded(w, topo, band), band.layout
    else:
        L, layout = resolvent(w, topo, method, num_terms)
    if method == "reference":
        V, B, C = V.double(), B.double(), C.double()
    return dense.sma_apply(L, V, B, C, layout)
