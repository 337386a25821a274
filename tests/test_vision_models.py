"""Chimera-ViT (chimera/models/vit.py): timm registration, sizes, topologies, init."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import chimera.models  # noqa: F401  (registers chimera_vit_* with timm)
from chimera.models import TOPOLOGIES, ChimeraViT

TINY = dict(embed_dim=32, depth=2, num_heads=2, d_state=8)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", ["chimera_vit_small_patch16_224", "chimera_vit_base_patch16_224",
                                  "chimera_vit_tiny_patch16_224"])
def test_registered_with_timm(name):
    assert name in timm.list_models("chimera_vit_*")
    with torch.device("meta"):
        m = timm.create_model(name)
    assert isinstance(m, ChimeraViT)
    assert m.topology_name == "grid" and m.sharing == "diagonal"
    assert m.grid_size == (14, 14)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)


def test_create_model_kwargs():
    m = timm.create_model("chimera_vit_small_patch16_224", num_classes=7, drop_path_rate=0.2,
                          topology="flat_fwd_rev", sharing="none", depth=3, img_size=32,
                          patch_size=4, in_chans=1, embed_dim=48, num_heads=2, d_state=8)
    assert len(m.blocks) == 3 and m.head.out_features == 7
    assert m.topology.name == "flat_fwd_rev" and m.topology.num_nodes == 64
    assert m.blocks[0].mixer.groups == [0, 1]  # 'none' on the 2-line topology: 2 groups
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("chimera_vit_small_patch16_224", pretrained=True)


# Parameter counts with d_state 64 and diagonal sharing (paper: ~22M for S, 88M for B).
# headdim = expand * d_model / heads: 256 for S (3 heads), 128 for B (12 heads).
@pytest.mark.parametrize("name,kwargs,expected", [
    ("chimera_vit_small_patch16_224", {}, 22_617_902),
    ("chimera_vit_base_patch16_224", {}, 84_411_392),             # 22 layers (paper)
    ("chimera_vit_base_patch16_224", {"depth": 23}, 88_186_404),  # 23 layers (release)
])
def test_param_counts(name, kwargs, expected):
    with torch.device("meta"):
        m = timm.create_model(name, **kwargs)
    assert n_params(m) == expected
    heads = m.blocks[0].mixer.nheads
    assert (m.headdim, heads) == ((256, 3) if "small" in name else (128, 12))
    assert m.blocks[0].mixer.d_state == 64


def test_no_position_embedding_no_cls_token():
    m = timm.create_model("chimera_vit_small_patch16_224", img_size=28, patch_size=4, in_chans=1,
                          num_classes=10, **TINY)
    names = [n for n, _ in m.named_parameters()]
    assert not any("pos" in n or "cls" in n for n in names)
    tokens = m.forward_features(torch.randn(2, 1, 28, 28))
    assert tokens.shape == (2, 49, 32)  # one token per patch, nothing prepended


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("sharing", ["none", "complete", "rowwise", "diagonal"])
def test_every_topology_and_sharing(topology, sharing):
    kw = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, topology=topology,
              sharing=sharing, **TINY)
    if topology == "flat_fwd_rev" and sharing == "rowwise":
        with pytest.raises(ValueError, match="rowwise"):
            timm.create_model("chimera_vit_small_patch16_224", **kw)
        return
    m = timm.create_model("chimera_vit_small_patch16_224", **kw)
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_sharing_groups_on_grid():
    groups = {s: timm.create_model("chimera_vit_small_patch16_224", img_size=16, patch_size=4,
                                   sharing=s, **TINY).blocks[0].mixer.groups
              for s in ("none", "complete", "rowwise", "diagonal")}
    assert groups == {"none": [0, 1, 2, 3], "complete": [0, 0, 0, 0],
                      "rowwise": [0, 0, 1, 1], "diagonal": [0, 1, 1, 0]}


def test_fashion_mnist_geometry_matches_vit_b16():
    # 28x28 with patch 2 gives the 14x14 grid of ViT-B/16 at 224
    m = timm.create_model("chimera_vit_small_patch16_224", img_size=28, patch_size=2, in_chans=1,
                          num_classes=10, **TINY)
    assert m.grid_size == (14, 14) and m.topology.num_nodes == 196
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_bad_arguments():
    with pytest.raises(ValueError, match="topology"):
        ChimeraViT(img_size=16, patch_size=4, topology="hex", **TINY)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ChimeraViT(img_size=30, patch_size=4, **TINY)
    with pytest.raises(ValueError, match="num_heads"):
        ChimeraViT(img_size=16, patch_size=4, embed_dim=30, num_heads=7, depth=1)


def test_init_and_weight_decay_groups():
    torch.manual_seed(0)
    m = timm.create_model("chimera_vit_small_patch16_224", img_size=32, patch_size=4,
                          embed_dim=128, depth=2, num_heads=2, d_state=16)
    w = m.blocks[0].mixer.in_proj.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.15)  # timm's trunc_normal_(std=0.02)
    assert m.head.bias.abs().max().item() == 0.0
    mixer = m.blocks[0].mixer
    assert torch.all(mixer.A_log == 0) and torch.all(mixer.D == 1)  # mixer init kept
    nwd = m.no_weight_decay()
    assert {"blocks.0.mixer.dt_bias", "blocks.0.mixer.A_log", "blocks.0.mixer.D"} <= nwd
    opt = create_optimizer_v2(m, opt="adamw", lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    named = dict(m.named_parameters())
    assert id(named["blocks.0.mixer.in_proj.weight"]) in decayed
    for n in ("blocks.0.mixer.dt_bias", "blocks.0.norm1.weight", "head.bias", "norm.weight"):
        assert id(named[n]) not in decayed, n


def test_core_library_imports_neither_lightning_nor_hydra():
    code = ("import sys, chimera, chimera.models; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf') "
            "if m in sys.modules]; print(bad); assert not bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
