"""Long Range Graph Benchmark (issue 9): data, transforms and metrics for the graph task family.

Models live in :mod:`chimera.models.graph`; this package is plain PyG / Lightning /
torchmetrics code with no Hydra.
"""

from tasks.graph.data import LRGB_NAMES, LRGBDataModule, PeptidesFuncRaw, SafeLRGBDataset
from tasks.graph.metrics import (
    LRGB_TASKS,
    LRGBTask,
    OGBAveragePrecision,
    lrgb_loss,
    make_metric,
    ogb_average_precision,
    weighted_cross_entropy,
)
from tasks.graph.transforms import ChimeraStructure, validate_graph

__all__ = [
    "LRGB_NAMES",
    "LRGB_TASKS",
    "ChimeraStructure",
    "LRGBDataModule",
    "LRGBTask",
    "OGBAveragePrecision",
    "PeptidesFuncRaw",
    "SafeLRGBDataset",
    "lrgb_loss",
    "make_metric",
    "ogb_average_precision",
    "validate_graph",
    "weighted_cross_entropy",
]
