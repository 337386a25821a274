"""The DAG state recurrence as Triton kernels: ``mix(..., method="triton")``.

Computes exactly what :func:`chimera.ops.scan.mix_dag_scan` computes, per batch entry and head:

    H_i = B_i v_iᵀ + Σ_{j ∈ p(i)} A_ij H_j      (topological order; H_i is N x P)
    y_i = C_iᵀ H_i

and, in :class:`_DagTritonFn`'s backward, the adjoint sweep in reverse topological order

    G_j = C_j dy_jᵀ + Σ_{i: j ∈ p(i)} A_ij G_i,
    dA_ij = <G_i, H_j>,  dv_j = G_jᵀ B_j,  dB_j = G_j v_j,  dC_j = H_j dy_j.

Parallelisation (see :mod:`chimera.ops.triton._kernels` for details): one launch per direction;
program ``(p_block, head, batch)`` owns an ``N x BLOCK_P`` column slice of every node's state and
walks all nodes in topological order itself, reading parents through a CSR-by-target list
(children through a CSR-by-source list in the backward). Slices never interact, so the sweep is
race-free with no grid synchronisation. The states ``H`` (``batch x T x heads x N x P`` in fp32)
are stored by the forward for the backward (:mod:`chimera.ops.scan`'s PyTorch version recomputes
them in its backward instead; a recomputing kernel is future work).

Complete grid corner DAGs take a separate kernel instead (:mod:`chimera.ops.triton.grid`: rows
swept one after the other with a parallel scan inside each row, states recomputed in the
backward); :func:`mix_triton`, the entry point of ``mix(..., method="triton")``, picks it.

Known limits of the level-set kernel:

* DAGs only (a :class:`~chimera.topology.CycleError` otherwise), any in/out degree, any batch of
  graphs on the node axis.
* Arithmetic is fp32 (fp64 inputs are computed in fp64; fp16/bf16 are cast to fp32 by
  :func:`chimera.ops.mix`). The interpreter (``TRITON_INTERPRET=1``, CPU) is fp32/fp64 only
  and slow (~1 ms per loop step per program): tiny inputs only.
* One program holds an ``next_pow2(N) x BLOCK_P`` tile with
  ``BLOCK_P = min(next_pow2(P), MAX_TILE // next_pow2(N))`` and ``MAX_TILE = 8192`` elements;
  ``N <= 1024``.
* ``O(T + |E|)`` sequential steps per program and ``batch * heads * cdiv(P, BLOCK_P)``
  programs: the nodes of one level are not processed in parallel, so long sequences with few
  heads under-use a GPU. No performance tuning has been done yet.
* On CPU, the kernels only run interpreted: ``TRITON_INTERPRET=1`` must be in the environment
  before the kernels are first used (they are defined on the first call of
  :func:`mix_dag_triton`, so setting it before importing :mod:`chimera` is enough).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from chimera.ops.linalg import autocast_off
from chimera.ops.triton.grid import grid_triton_plan, mix_grid_triton
from chimera.topology import Topology

MAX_TILE = 8192
MAX_N = 1024

_HOW_TO_ENABLE = (
    "run on a CUDA device, or, on CPU, set the environment variable TRITON_INTERPRET=1 before "
    "importing chimera (e.g. `TRITON_INTERPRET=1 python ...`; the kernels run in Triton's slow "
    "interpreter, fp32/fp64 only), or use method='dag_scan', the same recurrence in PyTorch"
)

__all__ = ["mix_dag_triton", "mix_grid_triton", "mix_triton", "triton_available", "MAX_N",
           "MAX_TILE"]


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (says nothing about a GPU)."""
    return importlib.util.find_spec("triton") is not None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _load_kernels(device: torch.device, module: str = "_kernels"):
    """Import a kernel module of this package (``_kernels``: the level-set sweep,
    ``_grid_kernels``: the grid row sweep), defining its kernels on first use, or raise a clear
    error."""
    if not triton_available():
        raise RuntimeError(
            "method='triton' needs the `triton` package, which is not installed "
            "(pip install triton, or the project's `triton` extra); on CPU it also needs "
            "TRITON_INTERPRET=1 set before importing chimera. Or use method='dag_scan', the same "
            "recurrence in PyTorch."
        )
    loaded = sys.modules.get(f"chimera.ops.triton.{module}")
    if device.type != "cuda":
        interpreted = loaded.INTERPRETED if loaded is not None else _interpret_env()
        if not interpreted:
            if loaded is not None:
                why = ("the Triton kernels were defined without TRITON_INTERPRET=1 in this "
                       "process, so they can only run on a GPU")
            else:
                why = "TRITON_INTERPRET is not set to 1"
            raise RuntimeError(
                f"method='triton' got tensors on {device.type!r} but {why}. To enable it, "
                + _HOW_TO_ENABLE + "."
            )
    return importlib.import_module(f"chimera.ops.triton.{module}")


def _csr(topo: Topology) -> dict[str, Tensor]:
    """Host-precomputed structure of the sweep, cached on the topology (one per device).

    ``order``: a topological order (by level). ``par_ptr/par_node/par_edge``: parents of each
    node as CSR by target (``par_node[par_ptr[i]:par_ptr[i+1]]`` are the sources of the edges
    ``par_edge[...]`` into ``i``). ``ch_*``: the same by source (children).
    """

    def build() -> dict[str, Tensor]:
        n, dev = topo.num_nodes, topo.device
        src, dst = topo.src, topo.dst
        arange = torch.arange(n + 1, device=dev)
        by_dst = torch.argsort(dst, stable=True)
        by_src = torch.argsort(src, stable=True)
        i32 = torch.int32 if max(n, topo.num_edges) < 2**31 - 1 else torch.int64
        out = {
            "order": topo.topological_order,
            "par_ptr": torch.searchsorted(dst[by_dst], arange),
            "par_node": src[by_dst],
            "par_edge": by_dst,
            "ch_ptr": torch.searchsorted(src[by_src], arange),
            "ch_node": dst[by_src],
            "ch_edge": by_src,
        }
        return {k: v.to(device=dev, dtype=i32).contiguous() for k, v in out.items()}

    if "triton_csr" not in topo._cache:
        topo._cache["triton_csr"] = build()
    return topo._cache["triton_csr"]


def _blocks(N: int, P: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_P, num_warps)``: the state tile one program holds, and its warps
    (about 512 tile elements per warp, i.e. 16 fp32 registers per thread per tile)."""
    if N > MAX_N:
        raise ValueError(f"method='triton' supports a state size N <= {MAX_N}, got N={N}")
    block_n = triton_next_pow2(N)
    block_p = max(1, min(triton_next_pow2(P), MAX_TILE // block_n))
    num_warps = max(1, min(8, (block_n * block_p) // 512))
    return block_n, block_p, num_warps


def triton_next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


class _DagTritonFn(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, V: Tensor, B: Tensor, C: Tensor, w: Tensor, csr: dict, kernels):
        b, T, h, P = V.shape
        N = B.shape[-1]
        V, B, C, w = (t.contiguous() for t in (V, B, C, w))
        Y = torch.empty_like(V)
        H = torch.empty((b, T, h, N, P), dtype=V.dtype, device=V.device)
        block_n, block_p, num_warps = _blocks(N, P)
        grid = (-(-P // block_p), h, b)
        kernels._dag_fwd_kernel[grid](
            V, B, C, w, Y, H,
            csr["order"], csr["par_ptr"], csr["par_node"], csr["par_edge"],
            T, N, P,
            V.stride(0), V.stride(1), V.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            w.stride(0), w.stride(1),
            H.stride(0), H.stride(1), H.stride(2),
            BLOCK_N=block_n, BLOCK_P=block_p, num_warps=num_warps,
        )
        ctx.save_for_backward(V, B, C, w, H)
        ctx.csr, ctx.kernels, ctx.blocks = csr, kernels, (block_n, block_p, num_warps)
        return Y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY: Tensor):
        V, B, C, w, H = ctx.saved_tensors
        csr, kernels = ctx.csr, ctx.kernels
        block_n, block_p, num_warps = ctx.blocks
        b, T, h, P = V.shape
        N, E = B.shape[-1], w.shape[-1]
        n_pb = -(-P // block_p)
        dY = dY.to(V.dtype).contiguous()
        G = torch.empty_like(H)
        dV = torch.empty_like(V)
        dBp = torch.empty((n_pb, *B.shape), dtype=B.dtype, device=B.device)
        dCp = torch.empty_like(dBp)
        dWp = torch.zeros((n_pb, *w.shape), dtype=w.dtype, device=w.device)
        kernels._dag_bwd_kernel[(n_pb, h, b)](
            V, B, C, w, dY, H, G,
            dV, dBp, dCp, dWp,
            csr["order"], csr["ch_ptr"], csr["ch_node"], csr["ch_edge"],
            T, N, P, E,
            V.stride(0), V.stride(1), V.stride(2),
            B.stride(0), B.stride(1), B.stride(2),
            w.stride(0), w.stride(1),
            H.stride(0), H.stride(1), H.stride(2),
            dBp.stride(0),
            BLOCK_N=block_n, BLOCK_P=block_p, num_warps=num_warps,
        )
        return dV, dBp.sum(0), dCp.sum(0), dWp.sum(0), None, None


def mix_dag_triton(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor,
                   topology: Topology) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on a DAG by the Triton state sweep (differentiable).

    Shapes as in :func:`chimera.ops.mix`: ``V (b, T, h, P)``, ``B, C (b, T, h, N)``,
    ``edge_weight (b, h, E)`` aligned with ``topology.edge_index``. Returns ``(b, T, h, P)``.
    Raises ``RuntimeError`` with instructions when the kernels cannot run here (no triton, or
    CPU tensors without ``TRITON_INTERPRET=1``).
    """
    topology = topology.to(V.device)
    topology.require_dag("method='triton'")
    kernels = _load_kernels(V.device)
    dtype = torch.float64 if V.dtype == torch.float64 else torch.float32
    out_dtype = V.dtype
    V, B, C, edge_weight = (t.to(dtype) for t in (V, B, C, edge_weight))
    _blocks(B.shape[-1], V.shape[-1])  # validate sizes before launching
    Y = _DagTritonFn.apply(V, B, C, edge_weight, _csr(topology), kernels)
    return Y.to(out_dtype)


def mix_triton(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor,
               topology: Topology) -> Tensor:
    """``mix(..., method="triton")``: the grid row-sweep kernel (:mod:`chimera.ops.triton.grid`)
    for a complete grid corner DAG whose row tile fits, the level-set kernel
    (:func:`mix_dag_triton`) for every other DAG."""
    topology = topology.to(V.device)
    if grid_triton_plan(topology, B.shape[-1]) is not None:
        return mix_grid_triton(V, B, C, edge_weight, topology)
    return mix_dag_triton(V, B, C, edge_weight, topology)
