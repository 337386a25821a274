"""LRGB metrics and losses as the benchmark defines them (Dwivedi et al. 2022; GraphGPS code).

=================  ===========  ==========================================  ================
dataset            metric       definition                                  loss
=================  ===========  ==========================================  ================
Peptides-func      ``ap``       OGB's average precision: mean over the      BCE with logits
                                tasks that have a positive *and* a
                                negative label in the split (NaN labels
                                ignored), AP = sklearn's step-wise
                                ``average_precision_score``
Peptides-struct    ``mae``      mean absolute error over all targets        L1
PascalVOC-SP       ``f1``       macro F1 over node classes (sklearn's       weighted CE
COCO-SP                         ``average="macro"``, zero_division 0)
=================  ===========  ==========================================  ================

"Weighted" for the superpixel tasks is in the *loss*, not the metric: GraphGPS/LRGB train with a
cross-entropy whose class weights are recomputed per batch, ``w_c = (V - n_c) / V`` for the
classes present in the batch (``V`` nodes, ``n_c`` of class ``c``) and 0 for absent ones
(:func:`weighted_cross_entropy`); the reported F1 is the unweighted macro average.

The metrics are torchmetrics objects (``MeanAbsoluteError``, ``MulticlassF1Score`` match the
definitions above; ``OGBAveragePrecision`` wraps torchmetrics' binary AP with OGB's task filter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanAbsoluteError, Metric
from torchmetrics.classification import MulticlassF1Score
from torchmetrics.functional.classification import binary_average_precision
from torchmetrics.utilities import dim_zero_cat


@dataclass(frozen=True)
class LRGBTask:
    """What a training module needs to know about an LRGB dataset."""

    out_dim: int
    task_level: Literal["graph", "node"]
    loss: Literal["bce", "l1", "weighted_ce"]
    metric: Literal["ap", "mae", "f1"]
    mode: Literal["max", "min"]  # direction of the metric for "best validation epoch"


LRGB_TASKS: dict[str, LRGBTask] = {
    "peptides-func": LRGBTask(10, "graph", "bce", "ap", "max"),
    "peptides-struct": LRGBTask(11, "graph", "l1", "mae", "min"),
    "pascalvoc-sp": LRGBTask(21, "node", "weighted_ce", "f1", "max"),
    "coco-sp": LRGBTask(81, "node", "weighted_ce", "f1", "max"),
}


def ogb_average_precision(preds: Tensor, target: Tensor) -> Tensor:
    """OGB's multi-task average precision (``ogb.graphproppred.Evaluator``, ``eval_ap``).

    ``preds (N, T)`` scores (logits or probabilities: AP only uses their order), ``target (N, T)``
    in {0, 1} with NaN for missing labels. Tasks without both a positive and a negative label are
    skipped; if none is left the metric is undefined and an error is raised.
    """
    if preds.shape != target.shape or preds.dim() != 2:
        raise ValueError(f"preds and target must both be (N, tasks), got {tuple(preds.shape)} "
                         f"and {tuple(target.shape)}")
    scores = []
    for t in range(target.shape[1]):
        y = target[:, t]
        labeled = ~torch.isnan(y)
        y, p = y[labeled], preds[labeled, t]
        if bool((y == 1).any()) and bool((y == 0).any()):
            scores.append(binary_average_precision(p.float(), y.long()))
    if not scores:
        raise ValueError("no task has both a positive and a negative label: average precision "
                         "is undefined")
    return torch.stack(scores).mean()


class OGBAveragePrecision(Metric):
    """Accumulates predictions over an epoch and computes :func:`ogb_average_precision`."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        self.preds.append(preds.detach().float())
        self.target.append(target.detach().float())

    def compute(self) -> Tensor:
        return ogb_average_precision(dim_zero_cat(self.preds), dim_zero_cat(self.target))


def make_metric(name: str) -> Metric:
    """The torchmetrics object of an LRGB dataset's metric (its ``LRGB_TASKS[name].metric``)."""
    task = LRGB_TASKS.get(name.lower())
    if task is None:
        raise ValueError(f"unknown LRGB dataset {name!r}; choose one of {list(LRGB_TASKS)}")
    if task.metric == "ap":
        return OGBAveragePrecision()
    if task.metric == "mae":
        return MeanAbsoluteError()
    # macro over the classes seen in target or prediction (torchmetrics drops classes with
    # tp + fp + fn = 0 from the macro average, as sklearn's label set does), zero_division 0
    return MulticlassF1Score(num_classes=task.out_dim, average="macro")


def weighted_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """GraphGPS/LRGB's class-weighted cross-entropy for the superpixel node tasks.

    Weights are recomputed per batch: ``w_c = (V - n_c) / V`` for classes present in ``target``,
    0 for absent ones; a batch with a single class uses weight 1 for it. ``F.cross_entropy``
    with these weights averages by the summed weights of the targets (PyTorch's weighted mean).
    """
    if logits.dim() != 2 or target.dim() != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"logits must be (V, C) and target (V,), got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    V, C = logits.shape
    counts = torch.bincount(target, minlength=C).to(logits.dtype)
    present = counts > 0
    if int(present.sum()) == 1:
        weight = present.to(logits.dtype)
    else:
        weight = (V - counts) / V * present
    return F.cross_entropy(logits, target, weight=weight)


def lrgb_loss(name: str, logits: Tensor, target: Tensor) -> Tensor:
    """The training loss of an LRGB dataset (``LRGB_TASKS[name].loss``) on model outputs.

    ``bce``: multi-label targets ``(G, T)`` with NaN = missing (masked out); ``l1``: regression
    targets ``(G, T)``; ``weighted_ce``: node classes ``(V,)``.
    """
    task = LRGB_TASKS.get(name.lower())
    if task is None:
        raise ValueError(f"unknown LRGB dataset {name!r}; choose one of {list(LRGB_TASKS)}")
    if task.loss == "bce":
        mask = ~torch.isnan(target)
        return F.binary_cross_entropy_with_logits(logits[mask], target[mask].to(logits.dtype))
    if task.loss == "l1":
        return F.l1_loss(logits, target.to(logits.dtype))
    return weighted_cross_entropy(logits, target.long())
