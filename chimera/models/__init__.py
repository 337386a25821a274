"""Backbones built from :class:`chimera.ChimeraBlock`, usable on their own.

Importing this package registers the Chimera-ViT variants with timm, so that
``timm.create_model("chimera_vit_base_patch16_224")`` works afterwards.
"""

from chimera.models.vit import (
    TOPOLOGIES,
    ChimeraViT,
    build_topology,
    chimera_vit_base_patch16_224,
    chimera_vit_small_patch16_224,
    chimera_vit_tiny_patch16_224,
)

__all__ = [
    "TOPOLOGIES",
    "ChimeraViT",
    "build_topology",
    "chimera_vit_base_patch16_224",
    "chimera_vit_small_patch16_224",
    "chimera_vit_tiny_patch16_224",
]
