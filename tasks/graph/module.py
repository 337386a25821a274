"""LRGB on the shared recipe (paper Sec. 5, Tables 4, 5, 11; App. C.3): only what is the graph
family's own.

- :class:`LRGBModule`: the dataset's training loss (:func:`tasks.graph.metrics.lrgb_loss`: BCE
  for Peptides-func, L1 for Peptides-struct, GraphGPS's class-weighted CE for the superpixel
  node tasks) and its metric (OGB AP, MAE, macro F1) logged as ``{stage}/{prefix}{metric}``
  with one torchmetrics object per stage and prefix.
- :class:`BestEpoch`: LRGB reports the *test score at the best validation epoch*. The callback
  follows ``val/<metric>`` in the dataset's direction (max AP / F1, min MAE) and logs
  ``best/val_<metric>``, ``best/test_<metric>`` (the test score of that epoch) and
  ``best/epoch_<metric>``. The test score of every epoch comes from evaluating the test split
  beside validation (``LRGBDataModule(test_each_epoch=True)`` adds it as a second validation
  loader; :class:`LRGBModule` logs it as ``test/<metric>``). The final ``trainer.test`` then
  logs the last epoch's test score under the same key, which is what the shared driver reads
  as ``test/<metric>``; the paper's number is ``best/test_<metric>``.

Optimizer groups, the warm-up + cosine schedule, EMA, finiteness checks and exact resume come
from :class:`tasks.core.module.BaseModule`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from tasks.core.errors import check_finite_batch
from tasks.core.module import BaseModule
from tasks.graph.metrics import LRGB_TASKS, LRGBTask, lrgb_loss, make_metric

PREFIXES: tuple[str, ...] = ("", "ema_")


def _task(dataset: str) -> LRGBTask:
    task = LRGB_TASKS.get(dataset.lower())
    if task is None:
        raise ValueError(f"unknown LRGB dataset {dataset!r}; choose one of {list(LRGB_TASKS)}")
    return task


class LRGBModule(BaseModule):
    """Graph- or node-level prediction on an LRGB dataset around any ``net(batch) -> outputs``
    (:func:`chimera.models.graph.build_lrgb_model` for Chimera and every baseline).

    Args:
        net, optimizer, scheduler, name, check_finite: see :class:`BaseModule`.
        dataset: ``peptides-func`` | ``peptides-struct`` | ``pascalvoc-sp`` | ``coco-sp``; it
            fixes the loss, the metric and its direction (:data:`tasks.graph.metrics.LRGB_TASKS`).
    """

    def __init__(self, net: nn.Module, dataset: str, optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], name: str = "", check_finite: bool = True) -> None:
        super().__init__(net, optimizer, scheduler, name=name, check_finite=check_finite)
        self.dataset = dataset.lower()
        self.task = _task(self.dataset)
        # one metric object per (stage, weights): "test" is also filled during fit, when the
        # data module evaluates the test split each epoch for the best-validation-epoch score
        self.metrics = nn.ModuleDict({f"{stage}_{p or 'raw'}": make_metric(self.dataset)
                                      for stage in ("val", "test") for p in PREFIXES})

    # the per-graph (or per-node) targets; Peptides stores y as (1, T) per graph -> (G, T)
    def _target(self, batch: Any) -> Tensor:
        y = batch.y
        if self.task.task_level == "graph":
            return y.view(batch.num_graphs, -1)
        return y.view(-1)

    def batch_size_of(self, batch: Any) -> int:
        # the unit of the metric: graphs for graph tasks, nodes for the node tasks
        if self.task.task_level == "node":
            return int(batch.num_nodes)
        return int(batch.num_graphs)

    def training_loss(self, batch: Any) -> Tensor:
        return lrgb_loss(self.dataset, self.net(batch), self._target(batch))

    def evaluate(self, net: nn.Module, batch: Any, stage: str, prefix: str) -> None:
        out, y = net(batch), self._target(batch)
        n = self.batch_size_of(batch)
        self.log(f"{stage}/{prefix}loss", lrgb_loss(self.dataset, out, y), on_step=False,
                 on_epoch=True, batch_size=n, sync_dist=True, add_dataloader_idx=False)
        metric = self.metrics[f"{stage}_{prefix or 'raw'}"]
        if self.task.metric == "f1":
            metric.update(out, y.long())
        elif self.task.metric == "ap":
            metric.update(out, y)
        else:
            metric.update(out, y.to(out.dtype))
        self.log(f"{stage}/{prefix}{self.task.metric}", metric, on_step=False, on_epoch=True,
                 prog_bar=(stage == "val" and not prefix), batch_size=n,
                 add_dataloader_idx=False)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        # the second validation loader, when present, is the test split (best-epoch protocol);
        # BaseModule's evaluation of raw and EMA weights, with that split's stage name
        stage = "val" if dataloader_idx == 0 else "test"
        if self.check_finite:
            check_finite_batch(batch, f"{stage} batch")
        for prefix, net in self.eval_nets():
            self.evaluate(net, batch, stage, prefix)


class BestEpoch(L.Callback):
    """The test score at the best validation epoch (LRGB's protocol), for raw and EMA weights.

    After each epoch with a validation pass, reads ``val/{prefix}{metric}`` and
    ``test/{prefix}{metric}`` from the epoch's logged values and keeps the epoch whose validation
    score is best in ``mode`` (``max`` or ``min``; ties keep the earlier epoch, as GraphGPS's
    ``argmax`` does). Logs ``best/val_{prefix}{metric}``, ``best/test_{prefix}{metric}`` and
    ``best/epoch_{prefix}{metric}``. Its state is checkpointed, so a resumed run continues the
    selection. ``metric``/``mode`` default to the module's dataset (``LRGBModule.task``).

    It reads the values in ``on_train_epoch_end``: Lightning computes the epoch's validation
    metrics after the ``on_validation_epoch_end`` hooks but before ``on_train_epoch_end``.
    """

    def __init__(self, metric: str | None = None, mode: Literal["max", "min"] | None = None,
                 prefixes: tuple[str, ...] | list[str] = PREFIXES) -> None:
        if mode not in (None, "max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric, self.mode, self.prefixes = metric, mode, tuple(prefixes)
        self.best: dict[str, dict[str, float]] = {}  # prefix -> {val, test, epoch}
        self._validated = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        task = getattr(pl_module, "task", None)
        if self.metric is None:
            if task is None:
                raise ValueError("BestEpoch needs metric= (the module has no LRGB task)")
            self.metric = task.metric
        if self.mode is None:
            if task is None:
                raise ValueError("BestEpoch needs mode= (the module has no LRGB task)")
            self.mode = task.mode

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def update(self, prefix: str, epoch: int, val: float, test: float | None) -> bool:
        """Record epoch ``epoch``'s scores; returns whether it became the best one."""
        if not math.isfinite(val):
            return False
        best = self.best.get(prefix)
        better = best is None or (val > best["val"] if self.mode == "max" else val < best["val"])
        if better:
            self.best[prefix] = {"val": val, "test": math.nan if test is None else test,
                                 "epoch": float(epoch)}
        return better

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._validated:
            return
        self._validated = False
        logged = trainer.callback_metrics
        for p in self.prefixes:
            val = logged.get(f"val/{p}{self.metric}")
            if val is None:
                continue
            test = logged.get(f"test/{p}{self.metric}")
            self.update(p, trainer.current_epoch, float(val),
                        None if test is None else float(test))
        for p, b in self.best.items():
            for k in ("val", "test", "epoch"):
                pl_module.log(f"best/{k}_{p}{self.metric}", torch.tensor(b[k]),
                              on_step=False, on_epoch=True, sync_dist=False)

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.mode,
                "best": {p: dict(b) for p, b in self.best.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {p: dict(b) for p, b in state_dict.get("best", {}).items()}
