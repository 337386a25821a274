"""Step 6 of the path: the residual block around the mixer (paper Fig. 6).

Pre-norm residual ``x + drop_path(mixer(norm(x)))``, optionally followed by a gated MLP
``x + drop_path(mlp(norm(x)))``; the paper's MLM and ImageNet models drop the MLP.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from chimera.mixer import ChimeraMixer
from chimera.topology import Topology
from chimera.varlen import Segments, resolve_segments


class GatedMLP(nn.Module):
    """``fc2(y * silu(gate))`` with ``[y, gate] = fc1(x)``, Mamba-2's gated MLP."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))


def make_norm(kind: Literal["rms", "layer"], d: int, eps: float = 1e-5) -> nn.Module:
    if kind == "rms":
        return nn.RMSNorm(d, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(d, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; use 'rms' or 'layer'")


class ChimeraBlock(nn.Module):
    """Pre-norm residual Chimera block.

    Args:
        d_model: width.
        mlp_ratio: hidden width of the gated MLP as a multiple of ``d_model`` (0 = no MLP).
        drop_path: stochastic-depth rate for both residual branches.
        norm: ``"rms"`` (Mamba-2) or ``"layer"``.
        **mixer_kwargs: forwarded to :class:`ChimeraMixer` (``conv``, ``d_state``, ``method``,
            ``sharing``, ...).
    """

    def __init__(
        self,
        d_model: int,
        *,
        mlp_ratio: float = 0.0,
        drop_path: float = 0.0,
        norm: Literal["rms", "layer"] = "rms",
        norm_eps: float = 1e-5,
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, d_model, norm_eps)
        self.mixer = ChimeraMixer(d_model, **mixer_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = None
        if mlp_ratio > 0:
            self.norm2 = make_norm(norm, d_model, norm_eps)
            self.mlp = GatedMLP(d_model, int(mlp_ratio * d_model))

    def forward(
        self,
        x: Tensor,
        topology: Topology,
        edge_attr: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        segments: Segments | None = None,
    ) -> Tensor:
        """Variable-length text: see :meth:`ChimeraMixer.forward` (norms and MLP act per token,
        so only the mixer needs the sentence boundaries)."""
        seg = resolve_segments(x, segments=segments, attention_mask=attention_mask,
                               seq_idx=seq_idx, cu_seqlens=cu_seqlens)
        y = self.mixer(self.norm1(x), topology, edge_attr, segments=seg)
        x = x + self.drop_path(y)
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x
