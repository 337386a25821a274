"""Masked-LM pretraining and GLUE finetuning on the shared recipe (paper Table 1, Table 7).

Only what is text's own lives here; optimizer groups, the warm-up + linear schedule, finiteness
checks, exact resume and checkpoints come from :class:`tasks.core.module.BaseModule`.

- :class:`MaskedLM`: cross-entropy over the masked positions and masked accuracy
  (``{stage}/{prefix}mlm_loss``, ``{stage}/{prefix}masked_acc``; token-weighted over the
  epoch). The vocabulary projection runs only at the masked positions (30% of the tokens):
  it is most of a small model's step.
- :class:`GLUEClassifier`: one GLUE task; the metrics of :mod:`tasks.text.glue_metrics` per
  validation split (MNLI: matched and mismatched) as ``{stage}/{prefix}<metric>``, plus
  ``{stage}/{prefix}task_score``: the mean of the task's score metrics (M2-BERT's per-task
  GLUE entry; the table averages it over seeds and tasks).

Both store the network's Hugging Face config in every Lightning checkpoint
(:data:`tasks.text.models.CONFIG_KEY`), so that any periodic checkpoint can be finetuned, and
write the final weights with ``save_pretrained`` to ``<run dir>/hf`` (with the tokenizer) when
training ends.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from chimera.models.text import mlm_loss
from tasks.core.errors import ConfigError
from tasks.core.module import BaseModule
from tasks.text.glue_data import glue_task
from tasks.text.glue_metrics import (
    GLUE_METRICS,
    PAPER_SCORE_METRICS,
    glue_metric_collection,
    glue_predictions,
)
from tasks.text.models import CONFIG_KEY, HF_DIR, checkpoint_config


def _embedding_rows(net: nn.Module) -> int:
    return int(net.get_input_embeddings().num_embeddings)


class _TextModule(BaseModule):
    """What both text modules share: the config in checkpoints, the final HF export, the
    tokenizer / embedding size check."""

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if tok is not None and len(tok) > _embedding_rows(self.net):
            raise ConfigError(
                f"the tokenizer ({dm.tokenizer_spec!r}) has {len(tok)} entries but the model "
                f"embeds only {_embedding_rows(self.net)}: set model.net.vocab_size (or "
                f"data.vocab_size) to at least {len(tok)}, and finetune with the tokenizer "
                f"the model was pretrained with")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = checkpoint_config(self.net)

    def on_train_end(self) -> None:
        self._export()

    @rank_zero_only
    def _export(self) -> None:
        out = Path(self.trainer.default_root_dir) / HF_DIR
        self.net.save_pretrained(out)
        tok = getattr(getattr(self.trainer, "datamodule", None), "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(out)


class MaskedLM(_TextModule):
    """MLM pretraining of a ``ChimeraTextForMaskedLM`` or a ``BertForMaskedLM``.

    Args: see :class:`tasks.core.module.BaseModule`.
    """

    def __init__(self, net: nn.Module, optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], name: str = "", check_finite: bool = True) -> None:
        super().__init__(net, optimizer, scheduler, name=name, check_finite=check_finite)
        # separate running means per stage and weights (raw / EMA): never mixed
        self.metrics = nn.ModuleDict({
            f"{stage}_{w}{m}": MeanMetric()
            for stage in ("val", "test") for w in ("", "ema_") for m in ("mlm_loss", "masked_acc")
        })

    @staticmethod
    def masked_logits(net: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logits (M, vocab), labels (M,))`` at the ``M`` masked positions of the batch."""
        labels = batch["labels"]
        sel = labels != -100
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if hasattr(net, "bert"):  # BertForMaskedLM: encoder .bert, head .cls
            h = net.bert(input_ids=ids, attention_mask=mask,
                         token_type_ids=batch.get("token_type_ids")).last_hidden_state
            head = net.cls
        elif hasattr(net, "chimera"):  # ChimeraTextForMaskedLM: encoder .chimera, head .lm_head
            h = net.chimera(ids, mask, batch.get("token_type_ids")).last_hidden_state
            head = net.lm_head
        else:
            raise TypeError(f"MaskedLM needs a BertForMaskedLM or ChimeraTextForMaskedLM, got "
                            f"{type(net).__name__}")
        return head(h[sel]), labels[sel]

    def training_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        logits, labels = self.masked_logits(self.net, batch)
        return mlm_loss(logits, labels)

    def evaluate(self, net: nn.Module, batch: Mapping[str, Tensor], stage: str,
                 prefix: str) -> None:
        logits, labels = self.masked_logits(net, batch)
        n = labels.numel()
        if n == 0:
            return
        loss = mlm_loss(logits.float(), labels)
        acc = (logits.argmax(-1) == labels).float().mean()
        for m, v in (("mlm_loss", loss), ("masked_acc", acc)):
            metric = self.metrics[f"{stage}_{prefix}{m}"]
            metric.update(v.detach(), weight=n)  # a mean over masked tokens, not over batches
            self.log(f"{stage}/{prefix}{m}", metric, on_step=False, on_epoch=True,
                     prog_bar=(m == "masked_acc"), batch_size=n)


class GLUEClassifier(_TextModule):
    """Finetuning on one GLUE task (network from
    :func:`tasks.text.models.classifier_from_checkpoint`).

    Args:
        task: the GLUE task (``sst2``, ``mnli``, ...); its validation splits come in the data
            module's ``val_dataloader()`` order.
        net, optimizer, scheduler, name, check_finite: see :class:`BaseModule`.
    """

    def __init__(self, net: nn.Module, task: str, optimizer: Mapping[str, Any],
                 scheduler: Mapping[str, Any], name: str = "", check_finite: bool = True) -> None:
        super().__init__(net, optimizer, scheduler, name=name, check_finite=check_finite)
        self.task = glue_task(task).name
        if int(net.config.num_labels) != glue_task(self.task).num_labels:
            raise ConfigError(f"the classifier has {net.config.num_labels} outputs, GLUE task "
                              f"{self.task!r} needs {glue_task(self.task).num_labels}")
        self.splits = tuple(GLUE_METRICS[self.task])
        self.metrics = nn.ModuleDict({
            f"{stage}_{w}{i}": glue_metric_collection(self.task, split)
            for stage in ("val", "test") for w in ("", "ema_")
            for i, split in enumerate(self.splits)
        })
        self._updated: set[str] = set()
        self._loader_idx = 0

    def _forward(self, net: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")
              if k in batch}
        return net(**kw, labels=batch.get("labels"))

    def training_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self._forward(self.net, batch).loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loader_idx = dataloader_idx  # MNLI: matched, mismatched
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._loader_idx = dataloader_idx
        super().test_step(batch, batch_idx)

    def evaluate(self, net: nn.Module, batch: Mapping[str, Tensor], stage: str,
                 prefix: str) -> None:
        out = self._forward(net, batch)
        key = f"{stage}_{prefix}{self._loader_idx}"
        self.metrics[key].update(glue_predictions(self.task, out.logits.float()),
                                 batch["labels"])
        self._updated.add(key)
        self.log(f"{stage}/{prefix}loss", out.loss.detach(), on_step=False, on_epoch=True,
                 batch_size=batch["labels"].shape[0], add_dataloader_idx=False)

    def _log_epoch(self, stage: str) -> None:
        # computed here (not through self.log(metric_object)) because the task score combines
        # metrics of several splits (MNLI m + mm) and several metrics (MRPC acc + F1)
        for w in ("", "ema_"):
            keys = [f"{stage}_{w}{i}" for i in range(len(self.splits))]
            if not any(k in self._updated for k in keys):
                continue
            values: dict[str, float] = {}
            for k in keys:
                if k in self._updated:
                    coll: MetricCollection = self.metrics[k]
                    values.update({n: float(v) for n, v in coll.compute().items()})
                    coll.reset()
            for n, v in values.items():
                self.log(f"{stage}/{w}{n}", v, add_dataloader_idx=False)
            parts = [values[m] for m in PAPER_SCORE_METRICS[self.task] if m in values]
            if len(parts) == len(PAPER_SCORE_METRICS[self.task]):
                self.log(f"{stage}/{w}task_score", sum(parts) / len(parts),
                         prog_bar=not w, add_dataloader_idx=False)
        self._updated = {k for k in self._updated if not k.startswith(stage)}

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")
