"""Model factory for the vision experiments: timm's ``create_model`` with Chimera-ViT registered.

Chimera-ViT (``chimera_vit_*``) comes from :mod:`chimera.models`, whose import registers it with
timm; the ViT baselines are timm's own ``vit_*`` built from scratch (``pretrained=False``).
"""

from __future__ import annotations

from typing import Any

import timm
from torch import nn

import chimera.models  # noqa: F401  (registers chimera_vit_* with timm)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)``.

    ``kwargs`` are the model's constructor arguments (``num_classes``, ``img_size``,
    ``patch_size``, ``in_chans``, ``drop_path_rate``, ``embed_dim``, ``depth``, ``num_heads``,
    and for Chimera-ViT ``topology``, ``sharing``, ``d_state``, ...).
    """
    if pretrained:
        raise ValueError("the paper trains every model from scratch; pretrained must be False")
    return timm.create_model(model_name, pretrained=False, **kwargs)

