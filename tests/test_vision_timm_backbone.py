"""Chimera-ViT as a timm backbone: the checks timm's own model tests run on every model.

Default cfgs, forward, backward at a reduced resolution, forward_features / forward_head /
reset_classifier, grad checkpointing, feature_info, forward_intermediates (indices, NCHW and NLC,
norm, stop_early), prune_intermediate_layers, features_only=True, layer-wise lr decay groups,
timm's data config, and the checkpoint layout (state_dict keys). Tiny widths keep it fast.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.data import resolve_input_data_config
from timm.models import FeatureInfo
from timm.optim import create_optimizer_v2
from torch import nn

import chimera.models  # noqa: F401  (registers chimera_vit_* with timm)
from chimera.models import ChimeraViT

NAMES = ["chimera_vit_tiny_patch16_224", "chimera_vit_small_patch16_224",
         "chimera_vit_base_patch16_224"]
TINY = dict(embed_dim=32, num_heads=2, d_state=8)
# a 4 x 6 patch grid: small (the CPU grid scan dominates the run time) and not square, so a
# transposed reshape of the tokens would show
SMALL_IMG = dict(img_size=(16, 24), patch_size=4)
GH, GW = 4, 6


def tiny(depth: int = 3, seed: int = 0, **kwargs) -> ChimeraViT:
    torch.manual_seed(seed)
    args = {**TINY, **SMALL_IMG, "depth": depth, "num_classes": 10, **kwargs}
    return timm.create_model("chimera_vit_small_patch16_224", **args).eval()


def images(batch: int = 2, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, 4 * GH, 4 * GW, generator=torch.Generator().manual_seed(1))


# --- default cfgs ------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_default_cfg_names_real_modules(name):
    with torch.device("meta"):
        m = timm.create_model(name)
    cfg = m.pretrained_cfg
    assert m.default_cfg is cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] is True
    assert cfg["pool_size"] == m.grid_size == (14, 14)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert m.num_classes == cfg["num_classes"] == 1000
    assert m.num_features > 0 and m.head_hidden_size == m.num_features
    state = m.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] + ".weight" in state
    assert isinstance(m.get_classifier(), nn.Linear)
    assert m.get_classifier() is m.get_submodule(cfg["classifier"])


def test_default_cfg_pool_size_is_the_token_grid():
    # timm's cfg test at the default resolution: the unpooled features cover pool_size
    m = timm.create_model("chimera_vit_tiny_patch16_224", depth=1, **TINY).eval()
    pool = m.pretrained_cfg["pool_size"]
    x = torch.randn(1, *m.pretrained_cfg["input_size"])
    with torch.no_grad():
        tokens = m.forward_features(x)
        maps = m.forward_intermediates(x, intermediates_only=True)
    assert tokens.shape == (1, pool[0] * pool[1], m.num_features)
    assert maps[-1].shape == (1, m.num_features, *pool)


def test_timm_data_config_follows_the_model():
    # timm's scripts resolve preprocessing against the model: its fixed size and channels win
    # over the 224 x 224 RGB of the cfg, the cfg gives interpolation / crop
    m = tiny(in_chans=1)
    cfg = resolve_input_data_config(m)
    assert cfg["input_size"] == (1, 16, 24)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert len(cfg["mean"]) == len(cfg["std"]) == 1
    with pytest.raises(ValueError, match="requires"):
        resolve_input_data_config(m, args=dict(img_size=64))


# --- forward / backward ------------------------------------------------------------------
def test_forward():
    m = tiny()
    with torch.no_grad():
        y = m(images(batch=1))
    assert y.shape == (1, 10) and not torch.isnan(y).any()


def test_backward_at_reduced_resolution():
    # timm: num_classes=42, batch 2, train mode; every parameter gets a gradient
    m = tiny(num_classes=42).train()
    y = m(images())
    y.mean().backward()
    assert y.shape == (2, 42) and not torch.isnan(y).any()
    for n, p in m.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
    assert sum(p.numel() for p in m.parameters()) == sum(p.grad.numel() for p in m.parameters())


def test_grad_checkpointing_changes_nothing():
    m = tiny(drop_path_rate=0.0).train()
    x = images()
    y = m(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing()
    assert m.grad_checkpointing
    y2 = m(x)
    y2.square().mean().backward()
    torch.testing.assert_close(y2, y, rtol=1e-4, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)
    out, _ = m.forward_intermediates(x)  # the intermediates path checkpoints too
    torch.testing.assert_close(out, m.forward_features(x), rtol=1e-4, atol=1e-5)
    m.set_grad_checkpointing(False)
    assert not m.grad_checkpointing


# --- forward_features / forward_head / reset_classifier ----------------------------------
def test_forward_features_and_head():
    m = tiny()
    x = images()
    with torch.no_grad():
        feats = m.forward_features(x)
        pre = m.forward_head(feats, pre_logits=True)
        logits = m(x)
    # unpooled tokens: one per patch of the 4 x 6 grid, no CLS token
    assert feats.shape == (2, GH * GW, m.num_features)
    assert pre.shape == (2, m.head_hidden_size)
    torch.testing.assert_close(pre, feats.mean(dim=1))
    torch.testing.assert_close(logits, m.head(pre))
    torch.testing.assert_close(logits, m.forward_head(feats))

    m.reset_classifier(0)  # no head: forward gives the pooled features
    assert m.num_classes == 0 and isinstance(m.get_classifier(), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(m(x), pre)
    m.reset_classifier(0, "")  # no pooling either: forward gives the tokens
    with torch.no_grad():
        torch.testing.assert_close(m(x), feats)


def test_head_and_pooling_removed_at_construction():
    m = tiny(num_classes=0, global_pool="")
    with torch.no_grad():
        y = m(images())
    assert y.shape == (2, GH * GW, m.num_features)
    m = tiny(num_classes=0)
    with torch.no_grad():
        assert m(images()).shape == (2, m.num_features)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_pool_types(pool):
    m = tiny(global_pool=pool)
    feats = torch.randn(2, GH * GW, 32)
    expect = {"avg": feats.mean(1), "max": feats.amax(1),
              "avgmax": 0.5 * (feats.mean(1) + feats.amax(1))}[pool]
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), expect)
    torch.testing.assert_close(m.pool(feats, "avg"), feats.mean(1))  # explicit override


def test_reset_classifier():
    m = tiny().train()
    m.reset_classifier(5)
    head = m.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (32, 5)
    assert head.training and head.bias.abs().max().item() == 0.0
    assert m(images()).shape == (2, 5)
    m = tiny().to(torch.float64)
    m.reset_classifier(3, "max")
    assert m.global_pool == "max" and m.head.weight.dtype == torch.float64
    assert m(images().double()).shape == (2, 3)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, "token")  # there is no CLS token to pool
    with pytest.raises(ValueError, match="global_pool"):
        tiny(global_pool="token")


# --- feature_info / forward_intermediates ------------------------------------------------
def test_feature_info_one_level_per_block():
    m = tiny(depth=4)
    assert m.feature_info == [dict(num_chs=32, reduction=4, module=f"blocks.{i}")
                              for i in range(4)]
    info = FeatureInfo(m.feature_info, len(m.feature_info))
    assert info.channels() == [32] * 4 and info.reduction() == [4] * 4
    modules = dict(m.named_modules())
    assert all(name in modules for name in info.module_name())


def block_outputs(m: ChimeraViT, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output, recorded by forward hooks during a plain forward."""
    outs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda _m, _i, o: outs.append(o)) for blk in m.blocks]
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return outs


def test_forward_intermediates_timm_contract():
    # timm's test: default call returns (final, one NCHW map per feature_info level)
    m = tiny(depth=3)
    x = images()
    info = FeatureInfo(m.feature_info, len(m.feature_info))
    with torch.no_grad():
        final, inter = m.forward_intermediates(x, output_fmt="NCHW")
        torch.testing.assert_close(final, m.forward_features(x))
    assert len(inter) == len(info.channels()) == 3
    for c, r, o in zip(info.channels(), info.reduction(), inter, strict=True):
        assert o.shape[:2] == (2, c)
        assert o.shape[2] <= math.ceil(x.shape[2] / r) + 1
        assert o.shape[3] <= math.ceil(x.shape[3] / r) + 1
        assert o.shape[2:] == m.grid_size == (GH, GW) and not torch.isnan(o).any()
    # the maps are the blocks' outputs, row-major tokens laid back onto the patch grid: the
    # token of patch (row i, column j) is the pixel (i, j) of the map
    for o, ref in zip(inter, block_outputs(m, x), strict=True):
        torch.testing.assert_close(o[:, :, 1, 2], ref[:, 1 * GW + 2])
        torch.testing.assert_close(o, ref.reshape(2, GH, GW, 32).permute(0, 3, 1, 2))


@pytest.mark.parametrize("indices,expected", [
    (None, [0, 1, 2]), (1, [2]), (2, [1, 2]), ([0, 2], [0, 2]), ((-1, 0), [2, 0]), ([1], [1])])
def test_forward_intermediates_indices(indices, expected):
    m = tiny(depth=3)
    x = images()
    refs = block_outputs(m, x)
    with torch.no_grad():
        nlc = m.forward_intermediates(x, indices=indices, output_fmt="NLC",
                                      intermediates_only=True)
        nchw = m.forward_intermediates(x, indices=indices, intermediates_only=True)
    # intermediates come in block order, whatever order the indices are given in
    want = [refs[i] for i in sorted(expected)]
    assert len(nlc) == len(nchw) == len(want)
    for a, b, ref in zip(nlc, nchw, want, strict=True):
        assert a.shape == (2, GH * GW, 32) and b.shape == (2, 32, GH, GW)
        torch.testing.assert_close(a, ref)
        torch.testing.assert_close(b.flatten(2).transpose(1, 2), a)


def test_forward_intermediates_norm_and_stop_early():
    m = tiny(depth=3)
    x = images()
    with torch.no_grad():
        final, (last,) = m.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC")
        # the final norm on the last block's output is forward_features
        torch.testing.assert_close(last, final)
        raw = m.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        early, (first,) = m.forward_intermediates(x, indices=[0], output_fmt="NLC",
                                                  stop_early=True)
        full, _ = m.forward_intermediates(x, indices=[0], output_fmt="NLC")
    torch.testing.assert_close(first, raw[0])
    torch.testing.assert_close(early, m.norm(first))  # stopped after block 0
    torch.testing.assert_close(full, m.forward_features(x))


def test_forward_intermediates_bad_arguments():
    m = tiny(depth=3)
    x = images()
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")
    for bad in (0, 4, [3], [-4]):
        with pytest.raises(ValueError, match="range"):
            m.forward_intermediates(x, indices=bad)


# --- prune_intermediate_layers / features_only -------------------------------------------
def test_prune_intermediate_layers():
    m = tiny(depth=4)
    x = images()
    with torch.no_grad():
        before = m.forward_intermediates(x, indices=[0, -3], intermediates_only=True)
    keys = set(m.state_dict())
    take = m.prune_intermediate_layers([0, -3])
    assert take == [0, 1] and len(m.blocks) == 2 and len(m.feature_info) == 2
    assert m.num_classes == 0 and m.global_pool == "" and isinstance(m.head, nn.Identity)
    assert not isinstance(m.norm, nn.Identity)  # prune_norm=False keeps the final norm
    assert set(m.state_dict()) <= keys  # nothing renamed, only dropped
    with torch.no_grad():
        after = m.forward_intermediates(x, indices=take, intermediates_only=True)
        final, _ = m.forward_intermediates(x, indices=take)
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b)
    assert final.shape == (2, GH * GW, 32)  # the pruned trunk's final features

    m = tiny(depth=4)
    assert m.prune_intermediate_layers(2, prune_norm=True, prune_head=False) == [2, 3]
    assert len(m.blocks) == 4 and isinstance(m.norm, nn.Identity)
    assert isinstance(m.head, nn.Linear) and m.num_classes == 10


def load_trunk(pruned: ChimeraViT, full: ChimeraViT) -> None:
    """Give a pruned model the weights of the full one (it has a subset of its parameters)."""
    missing, _ = pruned.load_state_dict(full.state_dict(), strict=False)
    assert not missing


def test_features_only_default_out_indices():
    # the route timm takes for ViTs: FeatureGetterNet over forward_intermediates, pruned trunk
    feat = timm.create_model("chimera_vit_small_patch16_224", features_only=True, depth=4,
                             **TINY, **SMALL_IMG).eval()
    ref = tiny(depth=4)
    load_trunk(feat.model, ref)
    assert feat.feature_info.channels() == [32] * 3  # the last 3 blocks, as timm's ViT
    assert feat.feature_info.reduction() == [4] * 3
    assert feat.feature_info.module_name() == ["blocks.1", "blocks.2", "blocks.3"]
    assert feat.pretrained_cfg["pool_size"] == (14, 14)
    x = images()
    with torch.no_grad():
        outs = feat(x)
        want = ref.forward_intermediates(x, indices=3, intermediates_only=True)
    assert isinstance(outs, list) and len(outs) == 3
    for o, w in zip(outs, want, strict=True):
        assert o.shape == (2, 32, GH, GW) and not torch.isnan(o).any()
        torch.testing.assert_close(o, w)


def test_features_only_out_indices_prunes_the_trunk():
    feat = timm.create_model("chimera_vit_small_patch16_224", features_only=True,
                             out_indices=(0, -3), depth=4, **TINY, **SMALL_IMG).eval()
    inner = feat.model
    assert len(inner.blocks) == 2  # blocks 2 and 3 are never run
    assert isinstance(inner.norm, nn.Identity) and isinstance(inner.head, nn.Identity)
    assert feat.feature_info.module_name() == ["blocks.0", "blocks.1"]
    ref = tiny(depth=4)
    load_trunk(inner, ref)
    x = images()
    with torch.no_grad():
        outs = feat(x)
        want = ref.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for o, w in zip(outs, want, strict=True):
        torch.testing.assert_close(o, w)
    # backward through the feature maps (a detection neck trains the backbone)
    outs = feat.train()(x)
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None for p in inner.parameters())


# --- optimiser groups / checkpoint layout ------------------------------------------------
def test_layer_decay_groups_follow_depth():
    m = tiny(depth=2)
    groups = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05,
                                 layer_decay=0.5).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    # patch_embed < block 0 < block 1 = final norm (grouped as in timm's ViT) < head
    order = ["patch_embed.proj.weight", "blocks.0.mixer.in_proj.weight",
             "blocks.1.mixer.in_proj.weight", "norm.weight", "head.weight"]
    assert [scale[id(named[n])] for n in order] == [0.125, 0.25, 0.5, 0.5, 1.0]
    assert scale[id(named["blocks.1.mixer.dt_bias"])] == 0.5


def test_state_dict_keys_unchanged():
    # training runs and checkpoints depend on these names
    m = tiny(depth=1, mlp_ratio=2.0)
    block = ["norm1.weight", "norm1.bias", "mixer.dt_bias", "mixer.A_log", "mixer.D",
             "mixer.in_proj.weight", "mixer.local_conv.conv.weight",
             "mixer.local_conv.conv.bias", "mixer.norm.weight", "mixer.out_proj.weight",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert list(m.state_dict()) == (["patch_embed.proj.weight", "patch_embed.proj.bias"]
                                    + [f"blocks.0.{k}" for k in block]
                                    + ["norm.weight", "norm.bias", "head.weight", "head.bias"])
