"""The base LightningModule: the recipe every task shares, written once.

A task subclasses :class:`BaseModule` and implements only what is its own:

- ``training_loss(batch) -> Tensor`` (batch-level augmentation such as mixup lives here),
- ``evaluate(net, batch, stage, prefix)`` (its metrics, logged as ``{stage}/{prefix}{name}``).

The base class provides: the optimizer from the config with no-weight-decay groups, the
warm-up + cosine/linear schedule stepped per optimizer step (:mod:`tasks.core.optim`),
evaluation of the raw and the EMA weights side by side (when the :class:`~tasks.core.ema.EMA`
callback is attached), checks that stop at once on a non-finite input batch or loss (naming the
step and the first module whose output is non-finite), per-step seeding of the training RNG, and
the bookkeeping that lets :class:`~tasks.core.data.ResumableDataLoader` resume mid-epoch.
Gradient clipping and accumulation are the Trainer's (``trainer.gradient_clip_val``).
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from tasks.core.data import ResumableDataLoader, sample_seed
from tasks.core.errors import NonFiniteError, check_finite_batch, first_nonfinite_module
from tasks.core.optim import build_optimizer, build_scheduler


def plain(x: Any) -> Any:
    """Config containers (OmegaConf's) -> plain dicts/lists, so that hyperparameters in a
    checkpoint load with ``torch.load(weights_only=True)``."""
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, str | bytes):
        return [plain(v) for v in x]
    return x


class BaseModule(L.LightningModule):
    """Shared recipe around ``net``.

    Args:
        net: the network (instantiated by Hydra from ``model.net``).
        optimizer: ``name`` (a ``torch.optim`` class, ``DecoupledAdamW`` or a dotted path),
            ``lr``, ``weight_decay`` and the class's other arguments (``betas``, ``eps``, ...).
        scheduler: ``decay`` (cosine | linear | constant), ``warmup`` with ``warmup_unit``
            (epochs | steps | fraction), ``warmup_lr``, ``min_lr``.
        name: the run's row label (e.g. ``chimera_vit_b``).
        check_finite: stop on a non-finite input batch or loss (one host sync per step).
    """

    def __init__(self, net: nn.Module, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
                 name: str = "", check_finite: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.name = name
        self.opt_cfg = plain(optimizer)
        self.sched_cfg = plain(scheduler)
        self.check_finite = check_finite
        self.ema_callback: Any = None  # set by tasks.core.ema.EMA.setup
        self.eval_dataloader_idx = 0  # which eval loader the batch in evaluate() comes from

    # --- what a task implements -----------------------------------------------------------
    def training_loss(self, batch: Any) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss(batch)")

    def evaluate(self, net: nn.Module, batch: Any, stage: str, prefix: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate(...)")

    def batch_size_of(self, batch: Any) -> int:
        """For logging; the first tensor's leading dimension by default."""
        if isinstance(batch, Tensor):
            return batch.shape[0]
        if isinstance(batch, Mapping):
            batch = list(batch.values())
        if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
            return batch[0].shape[0]
        return int(getattr(batch, "num_graphs", 1))

    # --- training -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._reseed_step(batch_idx)
        # the batch about to be trained on counts as consumed once this step ends; this is the
        # position a checkpoint taken after this step resumes from (ResumableDataLoader)
        for loader in self._resumable_loaders():
            loader.mark_consumed(batch_idx + 1, self.trainer.num_training_batches)
        if self.check_finite:
            check_finite_batch(batch, f"step {self.global_step} (epoch {self.current_epoch}, "
                                      f"batch {batch_idx})")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        try:
            loss = self.training_loss(batch)
        except (ValueError, RuntimeError, FloatingPointError) as e:
            # the library refuses non-finite edge weights etc. deep inside the forward; name the
            # step and the first module whose output went non-finite instead
            if self.check_finite and any(w in str(e) for w in ("NaN", "nan", "inf")):
                raise self._nonfinite_error(batch, batch_idx,
                                            f"the forward pass failed ({e})") from e
            raise
        if self.check_finite and not bool(torch.isfinite(loss.detach()).all()):
            value = loss.detach().float().mean().item()
            raise self._nonfinite_error(batch, batch_idx, f"the training loss is {value}")
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=self.batch_size_of(batch))
        return loss

    def _nonfinite_error(self, batch: Any, batch_idx: int, what: str) -> NonFiniteError:
        bad_params = [n for n, p in self.net.named_parameters()
                      if not bool(torch.isfinite(p.detach()).all())]
        culprit = first_nonfinite_module(self.net, lambda: self.training_loss(batch))
        where = (f"; the first module with a non-finite output is net.{culprit}" if culprit
                 else "; every module's output was finite when re-run, so the loss function "
                      "itself (or a random draw such as dropout) produced it")
        if bad_params:
            where += (f"; {len(bad_params)} parameters are non-finite (first: "
                      f"net.{bad_params[0]}), so an earlier update diverged")
        return NonFiniteError(
            f"step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}): {what}"
            f"{where}. Stopped at once; try a lower model.optimizer.lr, "
            f"trainer.gradient_clip_val, or float32 precision.")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True,
                 on_epoch=False)

    def on_train_start(self) -> None:
        if self.trainer.overfit_batches:  # the same few batches every epoch
            for loader in self._resumable_loaders():
                loader.sampler.shuffle = False

    def _resumable_loaders(self) -> list[ResumableDataLoader]:
        combined = getattr(self.trainer.fit_loop, "_combined_loader", None)
        if combined is None:
            return []
        return [dl for dl in combined.flattened if isinstance(dl, ResumableDataLoader)]

    # --- evaluation -----------------------------------------------------------------------
    def eval_nets(self) -> list[tuple[str, nn.Module]]:
        """``[("", net), ("ema_", ema_net)]``: raw and EMA weights are evaluated side by side."""
        nets = [("", self.net)]
        if self.ema_callback is not None and self.ema_callback.module is not None:
            nets.append(("ema_", self.ema_callback.module))
        return nets

    def _eval(self, batch: Any, stage: str, dataloader_idx: int) -> None:
        # several eval loaders (e.g. MNLI matched / mismatched): evaluate() reads this index
        self.eval_dataloader_idx = dataloader_idx
        if self.check_finite:
            check_finite_batch(batch, f"{stage} batch")
        for prefix, net in self.eval_nets():
            self.evaluate(net, batch, stage, prefix)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval(batch, "test", dataloader_idx)

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = dict(self.opt_cfg)
        optimizer = build_optimizer(self.net, **o)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the lr schedule needs a finite run: set trainer.max_epochs or "
                             "trainer.max_steps in the experiment")
        total = max(1, int(total))
        epochs = self.trainer.max_epochs
        if self.trainer.max_steps and self.trainer.max_steps > 0 or not epochs or epochs < 0:
            per_epoch = max(1.0, self.trainer.num_training_batches
                            / max(1, self.trainer.accumulate_grad_batches))
        else:
            per_epoch = total / epochs
        scheduler = build_scheduler(optimizer, self.sched_cfg, total, per_epoch)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # --- exact resume ---------------------------------------------------------------------
    def _reseed_step(self, batch_idx: int) -> None:
        """Seed python, numpy and torch from ``(run seed, rank, epoch, batch)`` before each
        training batch (a micro-batch under gradient accumulation).

        The random draws of a training step (dropout, drop path, mixup) are then a function of
        the step alone: a run resumed from any checkpoint repeats them exactly, whatever else
        drew from the global generators in between (sanity checks, validation loaders, a
        different number of evaluations before the kill). Data augmentation has its own
        per-sample seeds (:mod:`tasks.core.data`).
        """
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        s = sample_seed(sample_seed(base, -(self.global_rank + 2), self.current_epoch),
                        0, batch_idx)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        torch.manual_seed(s)  # also seeds every CUDA device
