"""Chimera-ViT: the paper's ImageNet backbone (Sec. 5.2, App. C.2, Tables 2, 3, 6, 9, 10).

A ViT with the attention+MLP blocks replaced by Chimera blocks over the patch grid:

``PatchEmbed`` -> ``depth`` x :class:`chimera.ChimeraBlock` on a topology over the ``H x W`` patch
grid -> final norm -> mean pooling over patches -> linear head.

There is **no position embedding and no CLS token**: the topology is the only positional signal
(that is the point of the paper). Linear layers get a truncated-normal(0.02) init (Table 9); the
mixer's ``dt_bias``, ``A_log`` and ``D`` keep their Mamba-2/Chimera init.

Topologies (Table 3):

- ``grid``: the undirected 4-neighbour patch grid, mixed over its 4 corner DAGs ("2D DAG"),
- ``flat_fwd_rev``: patches flattened in raster order as an undirected line (forward and reverse
  directed lines, "Fwd & Rev (1D)"),
- ``flat_fwd``: the forward directed line only ("Fwd (1D)").

Sizes: ``num_heads`` follows the paper's ViT convention, ``headdim = expand * embed_dim /
num_heads`` (Chimera-B: 768 x 2 / 12 = 128, the release's ``headdim: 128``; Chimera-S: 384 x 2 / 3 =
256). The paper gives Chimera-ViT-B 22 layers (App. C.2, Table 9), the released config 23; with
``d_state = 64`` and diagonal B/C sharing 22 layers give 84.3M parameters and 23 give 88.1M (the
"88M" of Table 2). ``depth`` is an argument; the registered default follows the paper (22).

Where the paper is silent the release decides, and the choice is an argument:

- block norm ``norm="layer"`` (the release's ``norm: layer``; Mamba-2 would use RMSNorm),
- ``dag_norm="count"`` is the paper's eq. 16; the release divides by ``sqrt(|p(i)|)``
  (``dag_norm="sqrt"``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from chimera.block import ChimeraBlock, make_norm
from chimera.topology import Topology, flat_grid, grid

TOPOLOGIES: tuple[str, ...] = ("grid", "flat_fwd_rev", "flat_fwd")

# the local convolution each topology needs (see chimera.local_conv.conv_kind_for)
_CONV_FOR = {"grid": "grid", "flat_fwd_rev": "line", "flat_fwd": "causal_line"}


def build_topology(name: str, H: int, W: int) -> Topology:
    """The topology ``name`` (one of :data:`TOPOLOGIES`) over an ``H x W`` patch grid."""
    if name == "grid":
        return grid(H, W)
    if name == "flat_fwd_rev":
        return flat_grid(H, W, reverse=True)
    if name == "flat_fwd":
        return flat_grid(H, W, reverse=False)
    raise ValueError(f"unknown topology {name!r}; choose one of {TOPOLOGIES}")


def _to_2tuple(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or a pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


class ChimeraViT(nn.Module):
    """Chimera-ViT classifier (see the module docstring).

    Args:
        img_size, patch_size, in_chans, num_classes: as in timm's ``VisionTransformer``;
            ``img_size`` must be a multiple of ``patch_size`` (the grid is ``img/patch``).
        embed_dim: ``d_model``.
        depth: number of Chimera blocks.
        num_heads: heads of the mixer; ``headdim = expand * embed_dim / num_heads``.
        d_state: state size ``N``.
        expand: mixer expansion (``d_inner = expand * embed_dim``).
        topology: ``grid`` | ``flat_fwd_rev`` | ``flat_fwd``.
        sharing: B/C sharing across the topology's DAGs, ``none`` | ``complete`` | ``rowwise`` |
            ``diagonal`` (``rowwise`` needs the grid; see :func:`chimera.sharing_groups`).
        mlp_ratio: gated MLP width per block (0 = no MLP, as in the paper).
        drop_rate: dropout before the head. drop_path_rate: stochastic depth, linearly increasing
            over the blocks from 0 to this value (as timm's ViT).
        norm: ``layer`` (release) or ``rms``; used in the blocks and the final norm.
        global_pool: ``avg`` (the paper) or ``""`` (no pooling, ``forward_head`` returns tokens).
        **mixer_kwargs: forwarded to :class:`chimera.ChimeraMixer` (``dag_norm``, ``method``,
            ``dt_min``, ...).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 22,
        num_heads: int = 12,
        d_state: int = 64,
        expand: float = 2.0,
        topology: str = "grid",
        sharing: str = "diagonal",
        mlp_ratio: float = 0.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm: str = "layer",
        global_pool: str = "avg",
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; choose one of {TOPOLOGIES}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        d_inner = int(expand * embed_dim)
        if d_inner % num_heads:
            raise ValueError(
                f"expand * embed_dim = {d_inner} is not divisible by num_heads = {num_heads}")
        img_size, patch_size = _to_2tuple(img_size), _to_2tuple(patch_size)
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # no CLS token
        self.topology_name = topology
        self.sharing = sharing
        self.headdim = d_inner // num_heads

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size = tuple(self.patch_embed.grid_size)
        # not a buffer: a Topology is index bookkeeping, built on the CPU (also under a
        # `with torch.device("meta")` context) and moved to the input's device by the mixer
        with torch.device("cpu"):
            self.topology = build_topology(topology, *self.grid_size)

        # stochastic depth rising linearly over the blocks, 0 -> drop_path_rate (as timm's ViT)
        dpr = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            ChimeraBlock(
                embed_dim,
                mlp_ratio=mlp_ratio,
                drop_path=dpr[i],
                norm=norm,
                conv=_CONV_FOR[topology],
                d_state=d_state,
                headdim=self.headdim,
                expand=expand,
                sharing=sharing,
                **mixer_kwargs,
            )
            for i in range(depth)
        )
        self.norm = make_norm(norm, embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Table 9: trunc. normal (std 0.02) for linear layers. The mixer's dt_bias / A_log / D are
        # plain Parameters (not Linear) and keep their own init.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm model interface ----------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters marked ``_no_weight_decay`` (the mixer's dt_bias, A_log, D)."""
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W)`` images -> ``(batch, T, embed_dim)`` normalised patch tokens."""
        x = self.patch_embed(x)  # (b, T, D), row-major patches (timm's flatten)
        for blk in self.blocks:
            x = blk(x, self.topology)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- timm registry -----------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "chimera_vit_tiny_patch16_224": _cfg(),
    "chimera_vit_small_patch16_224": _cfg(),
    "chimera_vit_base_patch16_224": _cfg(),
})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> ChimeraViT:
    if pretrained:
        raise ValueError(f"no pretrained weights are published for {variant}")
    return build_model_with_cfg(ChimeraViT, variant, pretrained, **kwargs)


@register_model
def chimera_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChimeraViT:
    """Chimera-ViT-Ti/16 (d_model 192, 3 heads, 22 layers): not in the paper, for quick runs."""
    args = dict(patch_size=16, embed_dim=192, depth=22, num_heads=3, d_state=64)
    return _create("chimera_vit_tiny_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def chimera_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChimeraViT:
    """Chimera-ViT-S/16 (Table 10: d_model 384, 3 heads, 22 layers, drop path 0.1; ~22M)."""
    args = dict(patch_size=16, embed_dim=384, depth=22, num_heads=3, d_state=64,
                drop_path_rate=0.1)
    return _create("chimera_vit_small_patch16_224", pretrained, **{**args, **kwargs})


@register_model
def chimera_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> ChimeraViT:
    """Chimera-ViT-B/16 (Table 9: d_model 768, 12 heads, 22 layers, drop path 0.3; ~84M,
    88M with the release's 23 layers)."""
    args = dict(patch_size=16, embed_dim=768, depth=22, num_heads=12, d_state=64,
                drop_path_rate=0.3)
    return _create("chimera_vit_base_patch16_224", pretrained, **{**args, **kwargs})
