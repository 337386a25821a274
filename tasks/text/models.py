"""Networks of the text tasks, built by Hydra from ``model.net``, and the checkpoint -> GLUE
classifier step (paper Table 1, App. B.3 / Table 7, App. C.1).

- :func:`chimera_mlm`: :class:`chimera.models.hf.ChimeraTextForMaskedLM` (DAG or UG variant);
- :func:`bert_mlm`: ``transformers.BertForMaskedLM`` (the baseline, same tokenizer);
- :func:`classifier_from_checkpoint`: a GLUE classifier whose architecture and weights come
  from a checkpoint of either model: a Lightning ``.ckpt`` of a text run (it carries the
  network's Hugging Face config, :func:`checkpoint_config`) or a ``save_pretrained`` folder
  (every text run writes one to ``<run>/hf`` when training ends). Loading is strict: from an
  MLM only the pooler and the classifier layer may be new and only the MLM head is dropped;
  from a finetuned classifier (RTE/MRPC/STS-B from MNLI) only the classifier layer is new. A
  missing, unreadable or mismatched checkpoint raises; nothing ever starts from scratch
  silently.

Parameter matching (the paper compares at equal size): :func:`bert_matching_chimera` picks
BERT's intermediate (MLP) width so that a BERT of a given depth and width has the parameter
count of a Chimera model, as the sizes in ``conf/model/text/`` do.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    PreTrainedModel,
)

from chimera.models.hf import (
    ChimeraTextConfig,
    ChimeraTextForMaskedLM,
    ChimeraTextForSequenceClassification,
    check_strict_transfer,
    load_finetuned_into_classifier,
    load_mlm_into_classifier,
)
from chimera.models.text import count_parameters
from tasks.core.errors import ConfigError, DataNotFoundError

#: key under which a text run's Lightning checkpoint carries its network's HF config
CONFIG_KEY = "hf_config"
#: the folder of a run where the final weights are written with ``save_pretrained``
HF_DIR = "hf"
STARTS = ("mlm", "finetuned")


def chimera_mlm(vocab_size: int, variant: str = "dag", d_model: int = 768, n_layer: int = 23,
                d_state: int = 64, headdim: int = 64, expand: float = 2.0, d_conv: int = 7,
                mlp_ratio: float = 0.0, method: str = "auto", dropout: float = 0.1,
                pad_token_id: int = 0, mixer_kwargs: Mapping[str, Any] | None = None,
                ) -> ChimeraTextForMaskedLM:
    """Chimera encoder + tied MLM head (argument names as :class:`ChimeraTextEncoder`)."""
    config = ChimeraTextConfig(
        vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layer, variant=variant,
        d_state=d_state, headdim=headdim, expand=expand, d_conv=d_conv, mlp_ratio=mlp_ratio,
        method=method, hidden_dropout_prob=dropout, pad_token_id=pad_token_id,
        mixer_kwargs=dict(mixer_kwargs) if mixer_kwargs else None)
    return ChimeraTextForMaskedLM(config)


def bert_mlm(vocab_size: int, d_model: int = 768, n_layer: int = 12, n_head: int = 12,
             intermediate_size: int = 3072, max_position_embeddings: int = 512,
             dropout: float = 0.1, pad_token_id: int = 0) -> BertForMaskedLM:
    """``BertForMaskedLM`` from scratch (BERT-base defaults; learned position embeddings)."""
    if d_model % n_head:
        raise ConfigError(f"model.net.d_model={d_model} is not divisible by n_head={n_head}")
    config = BertConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layer,
                        num_attention_heads=n_head, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position_embeddings,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        pad_token_id=pad_token_id)
    return BertForMaskedLM(config)


def bert_matching_chimera(chimera: nn.Module, vocab_size: int, d_model: int, n_layer: int,
                          n_head: int, max_position_embeddings: int = 512) -> int:
    """BERT's intermediate size that makes ``bert_mlm(...)`` as large as ``chimera``.

    A BERT layer has ``4 d^2 + 4 d`` attention, ``2 d i + i + d`` MLP and ``4 d`` norm
    parameters, so the count is linear in ``i``: solve for it and round to a multiple of 8.
    """
    target = count_parameters(chimera)
    build = functools.partial(bert_mlm, vocab_size, d_model, n_layer, n_head,
                              max_position_embeddings=max_position_embeddings)
    with torch.device("meta"):
        p0, p1 = count_parameters(build(intermediate_size=8)), count_parameters(build(
            intermediate_size=16))
    per = (p1 - p0) / 8
    size = 8 + (target - p0) / per
    if size < 8:
        raise ConfigError(f"a {n_layer}-layer BERT of width {d_model} without an MLP already "
                          f"has {p0:,} > {target:,} parameters")
    return int(round(size / 8) * 8)


# ---------------------------------------------------------------------------------------
# configs in checkpoints
# ---------------------------------------------------------------------------------------
def checkpoint_config(net: nn.Module) -> dict[str, Any]:
    """The network's Hugging Face config as a plain dict (with ``model_type``), for checkpoints."""
    config = getattr(net, "config", None)
    if config is None:
        raise TypeError(f"{type(net).__name__} has no Hugging Face config")
    d = config.to_dict()
    d["model_type"] = config.model_type
    return d


def _config_from_dict(d: Mapping[str, Any]) -> ChimeraTextConfig | BertConfig:
    d = dict(d)
    kind = d.pop("model_type", None)
    for k in ("architectures", "transformers_version", "id2label", "label2id", "num_labels",
              "problem_type"):
        d.pop(k, None)
    if kind == ChimeraTextConfig.model_type:
        return ChimeraTextConfig(**d)
    if kind == "bert":
        return BertConfig(**d)
    raise ConfigError(f"the checkpoint's model_type is {kind!r}; the text tasks know "
                      f"{ChimeraTextConfig.model_type!r} and 'bert'")


def read_checkpoint(path: str | os.PathLike, config_key: str = "model.net.checkpoint",
                    ) -> tuple[ChimeraTextConfig | BertConfig, dict[str, Tensor]]:
    """``(config, state_dict)`` of a Lightning checkpoint of a text run or of a
    ``save_pretrained`` folder; a clear error for anything else."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise DataNotFoundError(
            f"{config_key}={str(path)!r} does not exist. Point it at an MLM run's "
            f"checkpoints/last.ckpt (or any periodic .ckpt) or its {HF_DIR}/ folder "
            f"(e.g. make finetune-glue CKPT=results/runs/.../seed0/{HF_DIR}).")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise DataNotFoundError(f"{config_key}={str(path)!r} is a folder without "
                                    f"config.json (not a save_pretrained folder)")
        import json

        from chimera.models.hf import read_state_dict

        config = _config_from_dict(json.loads((p / "config.json").read_text()))
        try:
            sd = read_state_dict(p)
        except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
            raise ConfigError(f"{config_key}={str(path)!r}: cannot read the weights ({e})") from e
        return config, sd
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise ConfigError(f"{config_key}={str(path)!r} is not a readable checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise ConfigError(f"{config_key}={str(path)!r} is not a Lightning checkpoint (no "
                          f"state_dict); give a text run's .ckpt or a save_pretrained folder")
    if CONFIG_KEY not in obj:
        raise ConfigError(f"{config_key}={str(path)!r} carries no network config "
                          f"({CONFIG_KEY!r}); it was not written by a text run of this project")
    sd = {k.removeprefix("net."): v for k, v in obj["state_dict"].items()
          if k.startswith("net.")}
    return _config_from_dict(obj[CONFIG_KEY]), sd


# ---------------------------------------------------------------------------------------
# strict transfer for BERT (the Chimera loaders live in chimera.models.hf)
# ---------------------------------------------------------------------------------------
def _bert_transfer(model: BertForSequenceClassification, sd: Mapping[str, Tensor],
                   new: tuple[str, ...], dropped: tuple[str, ...], what: str,
                   ) -> dict[str, list[str]]:
    # position_ids is a buffer some transformers versions save and others do not
    def kept(d: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in d.items() if not k.endswith("embeddings.position_ids")}

    sd, target = kept(sd), kept(model.state_dict())
    dropped_keys = sorted(k for k in sd if k.startswith(dropped))
    used = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    new_keys = check_strict_transfer(used, target, new, what=what, model="BERT classifier",
                                     allowed=(new, dropped), error=ConfigError)
    model.load_state_dict(used, strict=False)
    for name, module in model.named_modules():  # the new heads get BERT's init
        if name and name + "." in new:
            module.apply(model._init_weights)
    return {"new": new_keys, "dropped": dropped_keys}


def classifier_from_checkpoint(checkpoint: str | os.PathLike | None, num_labels: int,
                               start: str = "mlm", classifier_dropout: float | None = None,
                               ) -> PreTrainedModel:
    """A GLUE classifier of the checkpoint's architecture, loaded strictly (module docstring).

    Args:
        checkpoint: a text run's ``.ckpt`` or a ``save_pretrained`` folder.
        num_labels: classifier outputs (1 = regression, STS-B).
        start: ``"mlm"`` (a pretrained MLM) or ``"finetuned"`` (another task's classifier).
        classifier_dropout: dropout before the classifier layer (default: the model's).
    """
    if start not in STARTS:
        raise ConfigError(f"model.net.start must be one of {STARTS}, got {start!r}")
    if checkpoint in (None, "", "???"):
        raise ConfigError("model.net.checkpoint is not set: GLUE finetuning starts from a "
                          "pretrained checkpoint (make finetune-glue CKPT=<run>/hf or "
                          "<run>/checkpoints/last.ckpt); it never starts from scratch")
    config, sd = read_checkpoint(checkpoint)
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if classifier_dropout is not None:
        config.classifier_dropout = classifier_dropout
    what = "MLM checkpoint" if start == "mlm" else "finetuned checkpoint"
    if isinstance(config, ChimeraTextConfig):
        model: PreTrainedModel = ChimeraTextForSequenceClassification(config)
        try:
            if start == "mlm":
                info = load_mlm_into_classifier(model, sd)
            else:
                info = load_finetuned_into_classifier(model, sd)
        except ValueError as e:
            raise ConfigError(f"model.net.checkpoint={str(checkpoint)!r}: {e}") from e
    else:
        model = BertForSequenceClassification(config)
        if start == "mlm":
            info = _bert_transfer(model, sd, ("bert.pooler.", "classifier."), ("cls.",), what)
        else:
            info = _bert_transfer(model, sd, ("classifier.",), ("classifier.",), what)
    model.loading_info = info  # type: ignore[attr-defined]  # for logs and tests
    return model


__all__ = [
    "CONFIG_KEY",
    "HF_DIR",
    "bert_matching_chimera",
    "bert_mlm",
    "checkpoint_config",
    "chimera_mlm",
    "classifier_from_checkpoint",
    "count_parameters",
    "read_checkpoint",
]
