"""LRGB metrics and losses (issue 9) against independent NumPy implementations of the
definitions the benchmark uses (OGB's eval_ap over sklearn's average_precision_score, sklearn's
mean_absolute_error and macro f1_score with zero_division=0, GraphGPS's weighted CE)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics import MeanAbsoluteError
from torchmetrics.classification import MulticlassF1Score

from chimera.models.graph import LRGB_SETTINGS
from tasks.graph.metrics import (
    LRGB_TASKS,
    OGBAveragePrecision,
    lrgb_loss,
    make_metric,
    ogb_average_precision,
    weighted_cross_entropy,
)


def np_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """sklearn's AP: sum over distinct thresholds (descending) of (R_n - R_{n-1}) P_n."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    distinct = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each tie group
    tp = np.cumsum(y)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def np_ogb_ap(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    aps = []
    for t in range(y_true.shape[1]):
        if np.sum(y_true[:, t] == 1) > 0 and np.sum(y_true[:, t] == 0) > 0:
            lab = y_true[:, t] == y_true[:, t]
            aps.append(np_average_precision(y_true[lab, t], y_pred[lab, t]))
    return sum(aps) / len(aps)


def np_macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    f1s = []
    for c in np.union1d(y, p):  # sklearn's label set: classes in y_true or y_pred
        tp = np.sum((p == c) & (y == c))
        fp = np.sum((p == c) & (y != c))
        fn = np.sum((p != c) & (y == c))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s))


def test_ogb_average_precision_matches_the_definition():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 10)) < 0.3).astype(float)
    s = np.round(rng.normal(size=(300, 10)), 1)  # rounding makes ties
    y[:, 3] = 0.0  # a task without positives is skipped
    y[rng.random((300, 10)) < 0.1] = np.nan  # missing labels are ignored
    got = ogb_average_precision(torch.tensor(s), torch.tensor(y))
    assert abs(float(got) - np_ogb_ap(y, s)) < 1e-6
    # the torchmetrics object accumulates batches to the same value
    m = OGBAveragePrecision()
    for lo in range(0, 300, 64):
        m.update(torch.tensor(s[lo:lo + 64]), torch.tensor(y[lo:lo + 64]))
    assert abs(float(m.compute()) - float(got)) < 1e-6
    # a known value: one task, ranks 0.8 (pos), 0.4 (neg), 0.35 (pos), 0.1 (neg) -> (1 + 2/3) / 2
    v = ogb_average_precision(torch.tensor([[0.1], [0.4], [0.35], [0.8]]),
                              torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
    assert abs(float(v) - 5 / 6) < 1e-6
    with pytest.raises(ValueError, match="undefined"):
        ogb_average_precision(torch.rand(4, 2), torch.zeros(4, 2))


def test_mae_and_macro_f1_match_the_definitions():
    rng = np.random.default_rng(1)
    y, p = rng.normal(size=(50, 11)), rng.normal(size=(50, 11))
    mae = make_metric("peptides-struct")
    assert isinstance(mae, MeanAbsoluteError)
    mae.update(torch.tensor(p[:20]), torch.tensor(y[:20]))
    mae.update(torch.tensor(p[20:]), torch.tensor(y[20:]))
    assert abs(float(mae.compute()) - np.abs(p - y).mean()) < 1e-6
    # classes 0..20; class 20 never occurs in labels or predictions and must not count
    labels = rng.integers(0, 20, 400)
    logits = rng.normal(size=(400, 21))
    logits[:, 20] = -10
    logits[np.arange(400)[:150], labels[:150]] += 5  # some correct predictions
    f1 = make_metric("pascalvoc-sp")
    assert isinstance(f1, MulticlassF1Score) and f1.num_classes == 21
    f1.update(torch.tensor(logits), torch.tensor(labels))
    assert abs(float(f1.compute()) - np_macro_f1(labels, logits.argmax(1))) < 1e-6
    assert make_metric("coco-sp").num_classes == 81
    with pytest.raises(ValueError, match="unknown LRGB dataset"):
        make_metric("zinc")


def test_weighted_cross_entropy_is_graphgps_definition():
    torch.manual_seed(0)
    logits = torch.randn(12, 5, dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1, 1, 2, 0, 0, 1, 2, 2, 0])  # class 3, 4 absent
    V = 12
    counts = torch.bincount(target, minlength=5).double()
    w = torch.where(counts > 0, (V - counts) / V, torch.zeros_like(counts))
    nll = -torch.log_softmax(logits, -1)[torch.arange(V), target]
    expected = (w[target] * nll).sum() / w[target].sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, target), expected)
    one = torch.zeros(4, dtype=torch.long)  # a single class: weight 1, plain CE
    torch.testing.assert_close(weighted_cross_entropy(logits[:4], one),
                               torch.nn.functional.cross_entropy(logits[:4], one))
    with pytest.raises(ValueError, match="logits must be"):
        weighted_cross_entropy(logits, target[:3])


def test_losses_and_task_table():
    logits = torch.randn(4, 10)
    y = torch.tensor([[1.0, 0.0] * 5] * 4)
    y[0, 0] = float("nan")  # a missing label is masked out of the BCE
    mask = ~torch.isnan(y)
    torch.testing.assert_close(lrgb_loss("peptides-func", logits, y),
                               torch.nn.functional.binary_cross_entropy_with_logits(
                                   logits[mask], y[mask]))
    r = torch.randn(4, 11)
    torch.testing.assert_close(lrgb_loss("peptides-struct", r, r + 1), torch.tensor(1.0))
    assert torch.isfinite(lrgb_loss("coco-sp", torch.randn(6, 81), torch.randint(0, 81, (6,))))
    for name, task in LRGB_TASKS.items():  # the data/metric table agrees with the model table
        assert LRGB_SETTINGS[name]["out_dim"] == task.out_dim
        assert LRGB_SETTINGS[name]["task_level"] == task.task_level
    assert [LRGB_TASKS[n].mode for n in LRGB_TASKS] == ["max", "min", "max", "max"]
