"""Exponential moving average of the network's weights, as a Lightning callback.

The average itself is timm's ``ModelEmaV3`` of ``pl_module.net``, updated after every
optimizer step. The callback's ``state_dict`` (the averaged weights and the update count) is
saved in every checkpoint and restored on resume, so an interrupted run continues the same
average. :class:`tasks.core.module.BaseModule` evaluates the EMA weights beside the raw ones
(metrics prefixed ``ema_``) whenever this callback is attached.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from timm.utils import ModelEmaV3
from torch import nn


class EMA(L.Callback):
    """EMA of ``pl_module.net``.

    Args:
        decay: EMA decay per optimizer step (DeiT: 0.99996 at batch 1024).
        warmup: ramp the decay up with the step count (timm's EMA warm-up) instead of averaging
            from the initial weights at a fixed decay.
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.ema: ModelEmaV3 | None = None
        self.updates = 0
        self._pending: dict[str, Any] | None = None

    @property
    def module(self) -> nn.Module | None:
        return None if self.ema is None else self.ema.module

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.ema is None:
            net = getattr(pl_module, "net", None)
            if not isinstance(net, nn.Module):
                raise TypeError("the EMA callback averages pl_module.net, which is missing")
            self.ema = ModelEmaV3(net, decay=self.decay, use_warmup=self.warmup)
            self.ema.module.eval()
        self.ema.module.to(pl_module.device)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None
        pl_module.ema_callback = self  # type: ignore[attr-defined]  (read by BaseModule)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.ema.module.to(pl_module.device)  # type: ignore[union-attr]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # one update per optimizer step (not per micro-batch under gradient accumulation)
        if trainer.global_step > self.updates:
            step = trainer.global_step if self.warmup else None
            self.ema.update(pl_module.net, step=step)  # type: ignore[union-attr]
            self.updates = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        return {"weights": self.ema.module.state_dict(), "updates": self.updates,
                "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.ema is None:  # restored before setup(): apply once the copy exists
            self._pending = state_dict
        else:
            self._apply(state_dict)

    def _apply(self, state: dict[str, Any]) -> None:
        self.ema.module.load_state_dict(state["weights"])  # type: ignore[union-attr]
        self.updates = int(state["updates"])
