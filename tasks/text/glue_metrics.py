"""GLUE metrics (torchmetrics) and the GLUE score (paper Table 1, M2-BERT's aggregation).

Per task and validation split (:data:`GLUE_METRICS`; keys are the names to log):

======  ========================  =================================================
task    split(s)                  metrics
======  ========================  =================================================
MNLI    validation_matched        ``accuracy_m``
        validation_mismatched     ``accuracy_mm``
QNLI    validation                ``accuracy``
RTE     validation                ``accuracy``
SST-2   validation                ``accuracy``
QQP     validation                ``accuracy``, ``f1``
MRPC    validation                ``accuracy``, ``f1``
CoLA    validation                ``mcc`` (Matthews correlation)
STS-B   validation                ``spearman``, ``pearson``
======  ========================  =================================================

Accuracy is micro-averaged (the fraction of correct predictions); F1 is binary F1 of class 1
(duplicate / equivalent), as GLUE reports it. Metrics take *predictions*:
:func:`glue_predictions` turns the model's logits into class ids (argmax) or, for STS-B, scores.

GLUE score (:func:`glue_score`), as M2-BERT's ``glue.py`` computes it: for each task and seed the
mean of that task's score metrics, then the mean over seeds, then the unweighted mean over tasks,
times 100; WNLI is excluded. Which metrics enter is :data:`PAPER_SCORE_METRICS` by default (the
paper's Table 1 columns: MNLI m and mm, QQP and MRPC accuracy and F1, CoLA Matthews, STS-B
Spearman, accuracy elsewhere). :data:`M2_RELEASE_SCORE_METRICS` is what M2-BERT's released
finetuning jobs log instead (MRPC F1 only), for comparisons with their numbers.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

from tasks.text.glue_data import GLUE_TASKS, glue_task

# task -> validation split -> metric names
GLUE_METRICS: dict[str, dict[str, tuple[str, ...]]] = {
    "mnli": {"validation_matched": ("accuracy_m",),
             "validation_mismatched": ("accuracy_mm",)},
    "qnli": {"validation": ("accuracy",)},
    "rte": {"validation": ("accuracy",)},
    "sst2": {"validation": ("accuracy",)},
    "qqp": {"validation": ("accuracy", "f1")},
    "mrpc": {"validation": ("accuracy", "f1")},
    "cola": {"validation": ("mcc",)},
    "stsb": {"validation": ("spearman", "pearson")},
}

# the metrics that make a task's GLUE-score entry
PAPER_SCORE_METRICS: dict[str, tuple[str, ...]] = {
    "mnli": ("accuracy_m", "accuracy_mm"),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "sst2": ("accuracy",),
    "qqp": ("accuracy", "f1"),
    "mrpc": ("accuracy", "f1"),
    "cola": ("mcc",),
    "stsb": ("spearman",),
}
M2_RELEASE_SCORE_METRICS: dict[str, tuple[str, ...]] = {**PAPER_SCORE_METRICS, "mrpc": ("f1",)}


class MatthewsCorrCoef(BinaryMatthewsCorrCoef):
    """Binary MCC that is 0 when a row or column of the confusion matrix is empty (e.g. every
    prediction is one class), as scikit-learn and GLUE define it; torchmetrics returns a
    positive value there (0.276 for constant predictions on a 7:3 split), which would credit a
    collapsed CoLA classifier."""

    def compute(self) -> Tensor:
        (tn, fp), (fn, tp) = self.confmat.tolist()
        if 0 in (tp + fp, tp + fn, tn + fp, tn + fn):
            return torch.zeros((), device=self.confmat.device)
        return super().compute()


def _metric(name: str, num_labels: int) -> Metric:
    if name.startswith("accuracy"):
        return MulticlassAccuracy(num_classes=num_labels, average="micro")
    if name == "f1":
        return BinaryF1Score()
    if name == "mcc":
        return MatthewsCorrCoef()
    if name == "spearman":
        # it keeps all predictions (STS-B dev: 1,500 floats) and warns about it; expected here
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all targets and predictions")
            return SpearmanCorrCoef()
    if name == "pearson":
        return PearsonCorrCoef()
    raise ValueError(f"unknown GLUE metric {name!r}")


def glue_metric_collection(task: str, split: str | None = None,
                           prefix: str | None = None) -> MetricCollection:
    """The metrics of one validation ``split`` of ``task`` (default: its only / first split).

    ``prefix`` is prepended to the names in ``compute()`` (e.g. ``"val/"``).
    """
    t = glue_task(task)
    splits = GLUE_METRICS[t.name]
    split = split or next(iter(splits))
    if split not in splits:
        raise ValueError(f"GLUE task {t.name!r} has no metrics for split {split!r}; "
                         f"splits: {list(splits)}")
    return MetricCollection({n: _metric(n, t.num_labels) for n in splits[split]}, prefix=prefix)


def glue_metric_collections(task: str, prefix: str | None = None) -> dict[str, MetricCollection]:
    """One collection per validation split, in ``GLUEDataModule.val_split_names`` order (wrap
    in ``torch.nn.ModuleDict`` so they move with the model)."""
    t = glue_task(task)
    return {s: glue_metric_collection(t.name, s, prefix) for s in GLUE_METRICS[t.name]}


def glue_predictions(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Class ids (argmax over the last dim) or, for STS-B, the float score ``(B,)``."""
    t = glue_task(task)
    if t.is_regression:
        if logits.ndim == 2 and logits.shape[-1] == 1:
            logits = logits[:, 0]
        if logits.ndim != 1:
            raise ValueError(f"STS-B expects (B,) or (B, 1) outputs, got {tuple(logits.shape)}")
        return logits.float()
    if logits.ndim == 2:
        if logits.shape[-1] != t.num_labels:
            raise ValueError(f"{t.name} has {t.num_labels} classes, logits have "
                             f"{logits.shape[-1]}")
        return logits.argmax(-1)
    if logits.ndim == 1 and not logits.is_floating_point():
        return logits  # already class ids
    raise ValueError(f"{t.name}: expected logits (B, {t.num_labels}) or ids (B,), "
                     f"got {tuple(logits.shape)} {logits.dtype}")


# ---------------------------------------------------------------------------------------
# the GLUE score
# ---------------------------------------------------------------------------------------
def _records(results: Any) -> list[Mapping[str, Any]]:
    if hasattr(results, "to_dict"):  # a pandas DataFrame
        return list(results.to_dict("records"))
    return list(results)


def glue_score(results: Any, score_metrics: Mapping[str, Iterable[str]] = PAPER_SCORE_METRICS,
               require_all: bool = True) -> dict[str, Any]:
    """The GLUE score from a long results table.

    Args:
        results: rows (mappings, or a pandas DataFrame) with ``task``, ``seed``, ``metric``,
            ``value``; values as the metrics return them (fractions, e.g. 0.843). Task names
            may be GLUE spellings (``"SST-2"``); ``wnli`` rows are ignored; metrics that do not
            enter the score (e.g. ``pearson``) are ignored.
        score_metrics: task -> metrics that make its entry.
        require_all: raise unless all eight tasks are present.

    Returns:
        ``{"glue": float, "tasks": {task: float}, "seeds": {task: int}}``, scores x 100. Each
        (task, seed) must report every score metric of its task.
    """
    score_metrics = {glue_task(k).name: tuple(v) for k, v in score_metrics.items()}
    # task -> seed -> metric -> value
    table: dict[str, dict[Any, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for i, row in enumerate(_records(results)):
        try:
            task, seed, metric, value = row["task"], row["seed"], row["metric"], row["value"]
        except KeyError as e:
            raise ValueError(f"results row {i} lacks {e}; rows need task, seed, metric, "
                             f"value") from None
        if str(task).lower() == "wnli":
            continue
        name = glue_task(task).name
        if metric not in score_metrics.get(name, ()):
            continue
        if metric in table[name][seed]:
            raise ValueError(f"results: {name} seed {seed} reports {metric!r} twice")
        table[name][seed][metric] = float(value)
    missing = sorted(set(GLUE_TASKS) - set(table))
    if require_all and missing:
        raise ValueError(f"results lack the GLUE tasks {missing} (pass require_all=False for a "
                         f"partial average)")
    if not table:
        raise ValueError("results hold no GLUE score metric")
    per_task: dict[str, float] = {}
    for name, seeds in sorted(table.items()):
        per_seed = []
        for seed, values in seeds.items():
            need = score_metrics[name]
            absent = [m for m in need if m not in values]
            if absent:
                raise ValueError(f"results: {name} seed {seed} lacks {absent}")
            per_seed.append(sum(values[m] for m in need) / len(need))
        per_task[name] = 100.0 * sum(per_seed) / len(per_seed)
    return {"glue": sum(per_task.values()) / len(per_task), "tasks": per_task,
            "seeds": {k: len(v) for k, v in sorted(table.items())}}
