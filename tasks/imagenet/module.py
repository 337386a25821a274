"""LightningModule for image classification with the DeiT/ViT-B recipe of the paper (Table 9).

- batch-level augmentation: ``timm.data.Mixup`` (mixup / cutmix with label smoothing folded into
  the soft targets) and ``SoftTargetCrossEntropy``; without mixing, cross-entropy with label
  smoothing,
- ``timm.utils.ModelEmaV3`` of the network, updated after every optimizer step and evaluated
  alongside the raw weights,
- AdamW from ``timm.optim.create_optimizer_v2`` (no weight decay on norms, biases, 1-D
  parameters and the model's ``no_weight_decay()`` set, which for Chimera-ViT holds the mixer's
  ``dt_bias``/``A_log``/``D``) and a per-step schedule: linear warm-up from ``warmup_lr`` to
  ``lr`` over ``warmup_epochs``, then cosine decay to ``min_lr``,
- torchmetrics top-1 / top-5 for raw and EMA weights: ``{val,test}/{acc1,acc5,ema_acc1,ema_acc5}``
  (fractions in [0, 1]; the paper's four columns once multiplied by 100).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

DEFAULT_OPTIMIZER = dict(opt="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
DEFAULT_SCHEDULER = dict(warmup_epochs=10.0, warmup_lr=1e-6, min_lr=1e-5)
DEFAULT_MIXUP = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                     label_smoothing=0.1)
DEFAULT_EMA = dict(enabled=True, decay=0.99996, warmup=False)


def _plain(x: Any) -> Any:
    """Config containers (e.g. OmegaConf's) -> plain dicts/lists, so that hyperparameters in a
    checkpoint load with ``torch.load(weights_only=True)``."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        return [_plain(v) for v in x]
    return x


def _merged(defaults: dict, given: Mapping | None) -> dict:
    out = dict(defaults)
    if given:
        unknown = set(given) - set(defaults)
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}; expected a subset of "
                             f"{sorted(defaults)}")
        out.update(dict(given))
    return out


def warmup_cosine(step: int, total: int, warmup: int, lr: float, warmup_lr: float,
                  min_lr: float) -> float:
    """Learning-rate multiplier (relative to ``lr``) at optimizer step ``step``."""
    if warmup > 0 and step < warmup:
        return (warmup_lr + (lr - warmup_lr) * step / warmup) / lr
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))) / lr


class ImageClassifier(L.LightningModule):
    """Image classifier around any ``net`` (Chimera-ViT or a timm ViT).

    Args:
        net: the network (instantiated by Hydra from ``model.net``).
        num_classes: classes (targets of mixup, metrics).
        name: row label of the run in the paper tables (e.g. ``chimera_vit_b``).
        optimizer: ``opt``, ``lr``, ``weight_decay``, ``betas``, ``eps`` (timm's
            ``create_optimizer_v2`` arguments).
        scheduler: ``warmup_epochs``, ``warmup_lr``, ``min_lr``; the schedule is stepped every
            optimizer step over ``trainer.estimated_stepping_batches``.
        mixup: ``mixup_alpha``, ``cutmix_alpha``, ``prob``, ``switch_prob``, ``mode``,
            ``label_smoothing`` (timm's ``Mixup`` arguments; both alphas 0 = no mixing).
        ema: ``enabled``, ``decay``, ``warmup`` (``ModelEmaV3``'s decay warm-up).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        name: str = "",
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        mixup: Mapping[str, Any] | None = None,
        ema: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        optimizer, scheduler, mixup, ema = (_plain(c) if c is not None else None
                                            for c in (optimizer, scheduler, mixup, ema))
        self.save_hyperparameters(logger=False, ignore=["net"])
        self.net = net
        self.num_classes = num_classes
        self.opt_cfg = _merged(DEFAULT_OPTIMIZER, optimizer)
        self.sched_cfg = _merged(DEFAULT_SCHEDULER, scheduler)
        self.mix_cfg = _merged(DEFAULT_MIXUP, mixup)
        self.ema_cfg = _merged(DEFAULT_EMA, ema)

        m = self.mix_cfg
        self.mixup_fn = None
        if m["prob"] > 0 and (m["mixup_alpha"] > 0 or m["cutmix_alpha"] > 0):
            self.mixup_fn = Mixup(mixup_alpha=m["mixup_alpha"], cutmix_alpha=m["cutmix_alpha"],
                                  prob=m["prob"], switch_prob=m["switch_prob"], mode=m["mode"],
                                  label_smoothing=m["label_smoothing"], num_classes=num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=m["label_smoothing"])

        self.ema = None
        if self.ema_cfg["enabled"]:
            self.ema = ModelEmaV3(self.net, decay=self.ema_cfg["decay"],
                                  use_warmup=bool(self.ema_cfg["warmup"]))

        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_{w}acc{k}": MulticlassAccuracy(num_classes=num_classes,
                                                     top_k=top5 if k == 5 else 1,
                                                     average="micro")
            for stage in ("val", "test") for w in ("", "ema_") for k in (1, 5)
        })

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # --- training -----------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            if x.shape[0] % 2:  # timm's batch mixing pairs x with x.flip(0)
                x, y = x[:-1], y[:-1]
            x, target = self.mixup_fn(x, y)
        else:
            target = y
        loss = self.train_loss(self.net(x), target)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=x.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # DeiT-style EMA from the initial weights at a fixed decay; with ema.warmup the decay
            # ramps up with the step (ModelEmaV3's warm-up, which copies on the first step)
            step = self.global_step if self.ema_cfg["warmup"] else None
            self.ema.update(self.net, step=step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True,
                 on_epoch=False, prog_bar=False)

    # --- evaluation ---------------------------------------------------------------------
    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        nets = [("", self.net)]
        if self.ema is not None:
            nets.append(("ema_", self.ema.module))
        for w, net in nets:
            logits = net(x)
            self.log(f"{stage}/{w}loss", F.cross_entropy(logits, y), on_step=False,
                     on_epoch=True, sync_dist=True, batch_size=x.shape[0])
            for k in (1, 5):
                metric = self.metrics[f"{stage}_{w}acc{k}"]
                metric.update(logits, y)
                self.log(f"{stage}/{w}acc{k}", metric, on_step=False, on_epoch=True,
                         prog_bar=(k == 1), batch_size=x.shape[0])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # --- optimisation -------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        o = dict(self.opt_cfg)
        opt_name, lr, wd = o.pop("opt"), float(o.pop("lr")), float(o.pop("weight_decay"))
        if "betas" in o:
            o["betas"] = tuple(o["betas"])
        optimizer = create_optimizer_v2(self.net, opt=opt_name, lr=lr, weight_decay=wd, **o)

        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("set trainer.max_epochs or trainer.max_steps for the lr schedule")
        total = max(1, int(total))
        max_epochs = self.trainer.max_epochs
        if max_epochs and max_epochs > 0:
            per_epoch = total / max_epochs
        else:  # max_steps-driven run: count epochs in full passes over the train loader
            per_epoch = max(1, self.trainer.num_training_batches
                            // max(1, self.trainer.accumulate_grad_batches))
        warmup = int(round(float(self.sched_cfg["warmup_epochs"]) * per_epoch))
        warmup_lr, min_lr = float(self.sched_cfg["warmup_lr"]), float(self.sched_cfg["min_lr"])

        def factor(step: int) -> float:
            return warmup_cosine(step, total, warmup, lr, warmup_lr, min_lr)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
