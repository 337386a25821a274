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

As a timm backbone the model follows timm's ViT: ``forward_features`` gives the unpooled tokens,
``forward_head`` pools and classifies, every block is a ``feature_info`` level at the patch
stride, ``forward_intermediates`` / ``prune_intermediate_layers`` serve necks, and
``features_only=True`` (``out_indices``, default the last 3 blocks) returns NCHW maps. The input
size is fixed at construction (``img_size``), since the topology is built for one patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from torch import Tensor, nn

from chimera.block import ChimeraBlock, make_norm
from chimera.topology import Topology, flat_grid, grid

TOPOLOGIES: tuple[str, ...] = ("grid", "flat_fwd_rev", "flat_fwd")
# token pooling of the head, as timm's ViT names them ("token" needs a CLS token: there is none)
POOLS: tuple[str, ...] = ("avg", "max", "avgmax", "")

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


def _take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's block selection: ``None`` = every block, an int ``n`` = the last ``n`` blocks, a
    sequence = those block indices (negative ones count from the end). Returns the absolute
    indices and the largest one (the last block that has to run)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices={indices} is out of range 1..{num_blocks}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            j = num_blocks + i if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
            take.append(j)
        if not take:
            raise ValueError("indices selects no block")
    return take, max(take)


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
        global_pool: ``avg`` (the paper), ``max``, ``avgmax`` or ``""`` (no pooling:
            ``forward_head`` returns the tokens).
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
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        d_inner = int(expand * embed_dim)
        if d_inner % num_heads:
            raise ValueError(
                f"expand * embed_dim = {d_inner} is not divisible by num_heads = {num_heads}")
        img_size, patch_size = _to_2tuple(img_size), _to_2tuple(patch_size)
        if img_size[0] % patch_size[0] or img_size[1] % patch_size[1]:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans  # timm reads it for the model's input config
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 0  # no CLS token
        self.grad_checkpointing = False
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
        # every block keeps the patch grid, so each is a feature level at the patch stride, as in
        # timm's ViT (detection/segmentation necks pick some of them via out_indices)
        reduction = self.patch_embed.feat_ratio(as_scalar=True)
        self.feature_info = [dict(num_chs=embed_dim, reduction=reduction, module=f"blocks.{i}")
                             for i in range(depth)]
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
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups in depth order, for timm's layer-wise lr decay: the patch embedding,
        one group per block, the final norm (timm puts it with the last block; the head, matched
        by nothing, comes above). ``coarse`` is timm's flag; the grouping is per block either
        way."""
        return dict(stem=r"^patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for ``num_classes`` (0: none, ``forward`` returns the pooled features);
        ``global_pool`` changes the pooling (``""``: none, ``forward`` returns the tokens)."""
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        # the new head lives where the old model does (device, dtype) and in its train/eval mode
        ref = self.patch_embed.proj.weight
        self.head = (nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self._init_weights(self.head)
        self.head.train(self.training)

    def _run_block(self, blk: nn.Module, x: Tensor) -> Tensor:
        # recomputation only saves memory when a graph is being recorded
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, self.topology)
        return blk(x, self.topology)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(batch, C, H, W)`` images -> ``(batch, T, embed_dim)`` normalised patch tokens,
        unpooled (``T = grid_size[0] * grid_size[1]`` in row-major order; no CLS token)."""
        x = self.patch_embed(x)  # (b, T, D), row-major patches (timm's flatten)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs for necks and feature extraction (timm's contract).

        Args:
            x: ``(batch, C, H, W)`` images.
            indices: blocks to return: ``None`` all, an int ``n`` the last ``n``, a sequence
                those indices (negative from the end).
            norm: pass each intermediate through the final norm.
            stop_early: skip the blocks after the last one requested (the final features are then
                those of that block, normed).
            output_fmt: ``NCHW`` (``(batch, embed_dim, gh, gw)`` maps) or ``NLC`` (tokens).
            intermediates_only: return only the list of intermediates.

        Returns:
            The intermediates, or ``(final features as forward_features gives them,
            intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = _take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        x = self.patch_embed(x)
        blocks = self.blocks[: last + 1] if stop_early or intermediates_only else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = self._run_block(blk, x)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            # tokens are the row-major patch grid (PatchEmbed's flatten order), so a reshape
            # recovers the map
            gh, gw = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(batch, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop what ``forward_intermediates(indices=...)`` does not need: the blocks after the
        last requested one, the final norm if ``prune_norm``, the head (and pooling) if
        ``prune_head``. Returns the absolute indices to pass from now on (negative ones would
        point elsewhere once blocks are gone)."""
        take, last = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: last + 1]
        self.feature_info = self.feature_info[: last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def pool(self, x: Tensor, pool_type: str | None = None) -> Tensor:
        """``(batch, T, D)`` tokens -> ``(batch, D)`` with ``pool_type`` (default: the model's)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        if pool_type == "avgmax":
            return 0.5 * (x.mean(dim=1) + x.amax(dim=1))
        if pool_type == "":
            return x
        raise ValueError(f"pool_type must be one of {POOLS}, got {pool_type!r}")

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``forward_features`` tokens -> logits (``pre_logits``: the pooled features)."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# --- timm registry -----------------------------------------------------------------------
def _cfg(**kwargs: Any) -> dict[str, Any]:
    # pool_size: the patch grid that forward_features' tokens (and the NCHW intermediates) cover,
    # 224 / 16 = 14; ViT-like models in timm leave it None, it is given here so that a neck can
    # read the feature-map size from the config
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (14, 14),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": True,  # the topology is built for one patch grid
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
    # features_only=True wraps the model in timm's FeatureGetterNet, which prunes the unused blocks
    # and calls forward_intermediates; by default the last 3 blocks, as timm's ViT
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(ChimeraViT, variant, pretrained,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                **kwargs)


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
