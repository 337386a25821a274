"""Image classification on the shared recipe (paper App. C.2, Table 9): only what is vision's.

- batch-level augmentation: ``timm.data.Mixup`` (mixup / cutmix with label smoothing folded into
  the soft targets) and ``SoftTargetCrossEntropy``; without mixing, cross-entropy with label
  smoothing;
- torchmetrics top-1 / top-5: ``{val,test}/{acc1,acc5}`` and, with the EMA callback,
  ``{val,test}/{ema_acc1,ema_acc5}`` (fractions in [0, 1]; the paper's four columns x 100).

Optimizer groups, the warm-up + cosine schedule, EMA, finiteness checks and exact resume come
from :class:`tasks.core.module.BaseModule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from tasks.core.module import BaseModule, plain


class ImageClassifier(BaseModule):
    """Image classifier around any ``net`` (Chimera-ViT or a timm ViT).

    Args:
        net, optimizer, scheduler, name, check_finite: see :class:`BaseModule`.
        num_classes: classes (targets of mixup, metrics).
        mixup: timm ``Mixup`` arguments ``mixup_alpha``, ``cutmix_alpha``, ``prob``,
            ``switch_prob``, ``mode``, ``label_smoothing`` (both alphas 0 = no mixing).
    """

    def __init__(self, net: nn.Module, num_classes: int, optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], mixup: Mapping[str, Any], name: str = "",
                 check_finite: bool = True) -> None:
        super().__init__(net, optimizer, scheduler, name=name, check_finite=check_finite)
        self.num_classes = num_classes
        m = self.mix_cfg = plain(mixup)
        self.mixup_fn = None
        if m["prob"] > 0 and (m["mixup_alpha"] > 0 or m["cutmix_alpha"] > 0):
            self.mixup_fn = Mixup(mixup_alpha=m["mixup_alpha"], cutmix_alpha=m["cutmix_alpha"],
                                  prob=m["prob"], switch_prob=m["switch_prob"], mode=m["mode"],
                                  label_smoothing=m["label_smoothing"], num_classes=num_classes)
            self.train_loss = SoftTargetCrossEntropy()
        else:
            self.train_loss = nn.CrossEntropyLoss(label_smoothing=m["label_smoothing"])
        top5 = min(5, num_classes)
        self.metrics = nn.ModuleDict({
            f"{stage}_{w}acc{k}": MulticlassAccuracy(num_classes=num_classes,
                                                     top_k=top5 if k == 5 else 1,
                                                     average="micro")
            for stage in ("val", "test") for w in ("", "ema_") for k in (1, 5)
        })

    def training_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            if x.shape[0] % 2:  # timm's batch mixing pairs x with x.flip(0)
                x, y = x[:-1], y[:-1]
            x, target = self.mixup_fn(x, y)
        else:
            target = y
        return self.train_loss(self.net(x), target)

    def evaluate(self, net: nn.Module, batch: tuple[Tensor, Tensor], stage: str,
                 prefix: str) -> None:
        x, y = batch
        logits = net(x)
        self.log(f"{stage}/{prefix}loss", F.cross_entropy(logits, y), on_step=False,
                 on_epoch=True, sync_dist=True, batch_size=x.shape[0])
        for k in (1, 5):
            metric = self.metrics[f"{stage}_{prefix}acc{k}"]
            metric.update(logits, y)
            self.log(f"{stage}/{prefix}acc{k}", metric, on_step=False, on_epoch=True,
                     prog_bar=(k == 1), batch_size=x.shape[0])
