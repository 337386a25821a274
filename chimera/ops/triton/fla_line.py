"""Directed lines on CUDA through ``fla-core``'s chunked simple-GLA kernels (issue 10 §3).

``fla.ops.simple_gla.chunk_simple_gla`` (flash-linear-attention, Yang, Zhang et al.; PyPI package
``fla-core``, the project's optional ``fla`` extra) is a chunked SSD with a scalar decay per
token and head, with Triton forward *and* backward kernels. Its recurrence, per batch entry and
head (``S`` is ``K x V``, no initial state):

    S_t = exp(g_t) S_{t-1} + k_t v_tᵀ,      o_t = scale · S_tᵀ q_t,

is Chimera on a directed line (Prop. 3.3; :mod:`chimera.ops.ssd`), ``h_t = a_t h_{t-1} + B_t x_tᵀ``,
``y_t = C_tᵀ h_t`` with ``a_t`` the weight of the edge ``t-1 -> t``, under the mapping

    q = C,   k = B,   v = V,   g_t = ln a_t (g_0 = 0: there is no state before the first token),
    scale = 1.0   (fla's default is 1/sqrt(K)).

In the mixer's terms ``k`` is ``B Δ``: the input scaling (``Δ``, eq. 16) is already folded into
``V`` by the callers of :func:`chimera.ops.mix`, which is the same product. A reverse line
(edges ``t+1 -> t``) is run flipped along the token axis. ``ln`` is
:func:`chimera.ops.masks.safe_log` (a weight of 0 becomes a decay of ``tiny``, not ``-inf``), so
the gradient of ``g`` reaches the edge weights through autograd.

Used by :func:`chimera.ops.ssd.mix_ssd` (``mix(..., method="ssd")``) for CUDA tensors of fp32,
fp16 or bf16 when ``fla`` imports; fp64 and CPU tensors take the torch SSD. fla's kernels do not
run in Triton's CPU interpreter (fla-core 0.6.0 calls ``.to()`` on loop indices, which are
Python ints when interpreted, and its autotuner needs a GPU driver), so the kernels themselves are
only tested on a GPU; the argument mapping is also tested on CPU against fla's own pure-torch
reference (``fla.ops.simple_gla.naive``).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from chimera.ops.masks import safe_log
from chimera.topology import Topology

__all__ = ["fla_available", "fla_line_inputs", "mix_ssd_fla"]


def fla_available() -> bool:
    """Whether ``fla-core`` is installed (says nothing about a GPU)."""
    return importlib.util.find_spec("fla") is not None


def fla_line_inputs(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
    """``(q, k, v, g, flipped)`` for ``chunk_simple_gla`` (module docstring), all ``(b, T, h, ·)``
    and ``g (b, T, h)`` in the forward token order of the line; ``flipped``: the line is a
    reverse one, so the output must be flipped back along the token axis."""
    direction = topo.line_direction()
    if direction == 0 or topo.num_graphs != 1:
        raise ValueError(f"fla needs one directed line, got '{topo.name}'")
    b, T, h, _ = V.shape
    # weight of the edge into each node; the first node of the line has none (g = 0, unused)
    log_w = safe_log(edge_weight)
    g = log_w.new_zeros(b, h, T).index_copy(-1, topo.dst, log_w)
    q, k, v, g = C, B, V, g.transpose(1, 2)
    flipped = direction == -1
    if flipped:
        q, k, v, g = (t.flip(1) for t in (q, k, v, g))
    return q, k, v, g, flipped


def mix_ssd_fla(V: Tensor, B: Tensor, C: Tensor, edge_weight: Tensor, topo: Topology) -> Tensor:
    """``Y = (L ∘ C Bᵀ) V`` on one directed line by ``fla``'s ``chunk_simple_gla`` (CUDA only).

    Shapes as in :func:`chimera.ops.mix`; differentiable in all inputs. Inputs of different
    dtypes are cast to ``V``'s (fp32, fp16 or bf16); fla keeps its chunk states in fp32.
    """
    if V.device.type != "cuda":
        raise RuntimeError("mix_ssd_fla runs fla's Triton kernels, which need CUDA tensors; on "
                           "CPU use the torch SSD (mix(..., method='ssd'))")
    if V.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"fla's kernels take fp32/fp16/bf16, got {V.dtype}")
    from fla.ops.simple_gla import chunk_simple_gla

    B, C = B.to(V.dtype), C.to(V.dtype)
    q, k, v, g, flipped = fla_line_inputs(V, B, C, edge_weight, topo)
    # g stays fp32 whatever the input dtype: it is summed along each chunk inside fla
    y, _ = chunk_simple_gla(q.contiguous(), k.contiguous(), v.contiguous(),
                            g=g.float().contiguous(), scale=1.0)
    return y.flip(1) if flipped else y
