"""Backbones built from :class:`chimera.ChimeraBlock`, usable on their own.

Importing this package registers the Chimera-ViT variants with timm, so that
``timm.create_model("chimera_vit_base_patch16_224")`` works afterwards. The graph models
(:mod:`chimera.models.graph`, which needs torch_geometric) are exported lazily: importing this
package does not import torch_geometric. The Hugging Face text models
(:mod:`chimera.models.hf`) are exported lazily too (importing transformers takes seconds); the
first access imports that module, which registers ``chimera_text`` with the Auto classes.
"""

from chimera.models.text import (
    TEXT_PRESETS,
    ChimeraTextClassifier,
    ChimeraTextEncoder,
    ChimeraTextMLM,
    text_preset,
)
from chimera.models.vit import (
    TOPOLOGIES,
    ChimeraViT,
    build_topology,
    chimera_vit_base_patch16_224,
    chimera_vit_small_patch16_224,
    chimera_vit_tiny_patch16_224,
)

__all__ = [
    "TEXT_PRESETS",
    "TOPOLOGIES",
    "ChimeraTextClassifier",
    "ChimeraTextEncoder",
    "ChimeraTextMLM",
    "ChimeraViT",
    "build_topology",
    "chimera_vit_base_patch16_224",
    "chimera_vit_small_patch16_224",
    "chimera_vit_tiny_patch16_224",
    "text_preset",
]

# graph models: resolved on first access so that torch_geometric stays optional
_GRAPH_EXPORTS = (
    "ChimeraGPSLayer",
    "ChimeraGraphConv",
    "GatedGCNConv",
    "GraphModel",
    "build_lrgb_model",
    "graph_topology",
)
__all__ += list(_GRAPH_EXPORTS)

# Hugging Face text models: resolved on first access so that transformers is imported on demand
_HF_EXPORTS = (
    "ChimeraTextConfig",
    "ChimeraTextForMaskedLM",
    "ChimeraTextForSequenceClassification",
    "ChimeraTextModel",
    "load_finetuned_into_classifier",
    "load_mlm_into_classifier",
)
__all__ += list(_HF_EXPORTS)


def __getattr__(name: str):
    if name in _GRAPH_EXPORTS:
        from chimera.models import graph

        return getattr(graph, name)
    if name in _HF_EXPORTS:
        from chimera.models import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
