"""Step 4 of the path: the one functional core, ``Y = (L ∘ C Bᵀ) V`` with ``L = (I - A)^-1``.

Every algorithm sits behind the same signature and gives the same answer where it applies:

============  ===================  =======================================================
method        topologies           how ``L`` (or ``L X``) is obtained
============  ===================  =======================================================
reference     any                  dense LU solve in float64: the test oracle
exact         any                  grid corner DAGs: row sweeps; other DAGs: rows of L by
                                   the level-set recurrence; otherwise an LU solve
neumann       any                  ``sum_{k<=K} A^k`` by squaring (K = diameter by default)
dag_dense     DAGs                 ``(I + A)(I + A^2)(I + A^4)...``: exact by nilpotency
dag_scan      DAGs                 linear-time recurrence over level sets, no ``T x T``
ssd           directed lines       Mamba-2's chunked SSD
triton        DAGs                 the level-set recurrence as a Triton kernel
============  ===================  =======================================================

``mix`` applies no normalisation: callers build ``edge_weight`` with :mod:`chimera.norm`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from chimera.ops import dense
from chimera.ops.grid import grid_frame, mix_grid_dag
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

    if method == "dag_scan":
        Y = mix_dag_scan(V, B, C, edge_weight, topology)
    elif method == "ssd":
        Y = mix_ssd(V, B, C, edge_weight, topology, chunk_size=chunk_size)
    elif method == "triton":
        from chimera.ops.triton import mix_dag_triton

        Y = mix_dag_triton(V, B, C, edge_weight, topology)
    elif method == "exact" and (frame := grid_frame(topology)) is not None:
        Y = mix_grid_dag(V, B, C, edge_weight, topology, frame)
    elif method in ("reference", "exact", "neumann", "dag_dense"):
        Y = _mix_dense(V, B, C, edge_weight, topology, method, num_terms)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return Y.to(out_dtype)


def resolvent(edge_weight: Tensor, topology: Topology, method: Method = "exact",
              num_terms: int | Tensor | None = None) -> tuple[Tensor, dense.BlockLayout]:
    """The dense mask ``L (batch, G, H, n, n)`` per graph block and the block layout."""
    if method not in ("reference", "exact", "neumann", "dag_dense"):
        raise ValueError(f"method {method!r} does not materialise L")
    is_dag = topology.is_dag
    if method == "dag_dense":
        topology.require_dag("method='dag_dense'")
    layout = dense.block_layout(topology)
    if method == "exact" and is_dag:
        return dense.resolvent_dag_rows(edge_weight, topology, layout), layout
    A = dense.dense_adjacency(edge_weight, topology, layout)
    if method == "reference":
        L = dense.resolvent_reference(A)
    elif method == "exact":
        L = dense.resolvent_exact(A)
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


def _mix_dense(V, B, C, w, topo, method, num_terms) -> Tensor:
    L, layout = resolvent(w, topo, method, num_terms)
    if method == "reference":
        V, B, C = V.double(), B.double(), C.double()
    return dense.sma_apply(L, V, B, C, layout)
