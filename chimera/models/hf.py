"""Hugging Face ``transformers`` (5.x) wrappers of the Chimera text encoder.

Importing this module registers ``model_type="chimera_text"`` with ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM`` and ``AutoModelForSequenceClassification``, so that
``AutoModelForSequenceClassification.from_pretrained(mlm_dir, num_labels=3)`` works on a
directory written by ``ChimeraTextForMaskedLM.save_pretrained``.

The modules are those of :mod:`chimera.models.text` (the encoder under ``chimera.encoder.``, the
MLM head under ``lm_head.``, the GLUE head under ``pooler.`` and ``classifier.``), so one set of
code defines both the plain PyTorch and the Hugging Face models.

Going from pretraining to GLUE must never leave a pretrained weight behind silently:
:func:`load_mlm_into_classifier` loads an MLM checkpoint (Hugging Face directory, safetensors or
PyTorch file, Lightning checkpoint, or state dict; plain or Hugging Face key layout) into a
classifier **strictly**: only the keys listed in :data:`CLASSIFIER_NEW_KEYS` may be missing (they
are freshly initialised) and only those in :data:`MLM_ONLY_KEYS` may be left over; anything else
raises. ``from_pretrained`` itself reports the same split in its ``output_loading_info``.
:func:`load_finetuned_into_classifier` does the same for Table 1's MNLI -> RTE/MRPC/STS-B starts
(encoder and pooler carried over, a new classifier layer).
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
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as hf_init
from transformers.modeling_outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)

from chimera.models.text import (
    POOLING,
    VARIANTS,
    ChimeraTextEncoder,
    MLMHead,
    TextPooler,
    classification_loss,
    init_text_weights,
    mlm_loss,
    text_preset,
)

MODEL_TYPE = "chimera_text"
#: key prefixes a classifier may miss when loaded from an MLM checkpoint (freshly initialised)
CLASSIFIER_NEW_KEYS: tuple[str, ...] = ("pooler.", "classifier.")
#: key prefixes of an MLM checkpoint a classifier drops
MLM_ONLY_KEYS: tuple[str, ...] = ("lm_head.",)
_ENCODER_ANCHOR = "encoder.embeddings.word_embeddings.weight"


class ChimeraTextConfig(PreTrainedConfig):
    """Configuration of the Chimera text models (Hugging Face names where BERT has one).

    ``hidden_size`` = ``d_model``, ``num_hidden_layers`` = ``n_layer``; ``variant`` is ``"dag"``
    or ``"ug"``; ``pooling`` is ``"cls"`` or ``"mean"``; ``mixer_kwargs`` holds any further
    :class:`chimera.ChimeraMixer` argument (``num_terms``, ``chunk_size``, ``gamma`` ...).
    Build the paper's sizes with :meth:`from_preset`.
    """

    model_type = MODEL_TYPE

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 23
    variant: str = "dag"
    d_state: int = 64
    headdim: int = 64
    expand: float | int = 2.0
    d_conv: int = 7
    mlp_ratio: float | int = 0.0
    method: str = "auto"
    sharing: str = "none"
    dag_norm: str = "count"
    norm: str = "layer"
    layer_norm_eps: float | int = 1e-5
    type_vocab_size: int = 2
    hidden_dropout_prob: float | int = 0.1
    drop_path_rate: float | int = 0.0
    hidden_act: str = "gelu"
    mlm_layer_norm_eps: float | int = 1e-12
    initializer_range: float | int = 0.02
    pooling: str = "cls"
    classifier_dropout: float | int | None = None
    mixer_kwargs: dict | None = None
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if self.pooling not in POOLING:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {POOLING}")
        if self.num_hidden_layers < 1 or self.hidden_size < 1 or self.vocab_size < 1:
            raise ValueError("vocab_size, hidden_size and num_hidden_layers must be positive")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ChimeraTextConfig:
        """A config for preset ``name`` of :data:`chimera.models.text.TEXT_PRESETS`."""
        p = text_preset(name)
        kw = dict(hidden_size=p["d_model"], num_hidden_layers=p["n_layer"],
                  d_state=p["d_state"], headdim=p["headdim"], expand=p["expand"],
                  d_conv=p["d_conv"], mlp_ratio=p["mlp_ratio"])
        return cls(**{**kw, **overrides})

    def encoder_kwargs(self) -> dict[str, Any]:
        """Arguments of :class:`chimera.models.text.ChimeraTextEncoder`."""
        return dict(
            vocab_size=self.vocab_size, d_model=self.hidden_size,
            n_layer=self.num_hidden_layers, variant=self.variant, d_state=self.d_state,
            headdim=self.headdim, expand=self.expand, d_conv=self.d_conv,
            mlp_ratio=self.mlp_ratio, method=self.method, sharing=self.sharing,
            dag_norm=self.dag_norm, norm=self.norm, norm_eps=self.layer_norm_eps,
            type_vocab_size=self.type_vocab_size, pad_token_id=self.pad_token_id,
            dropout=self.hidden_dropout_prob, drop_path=self.drop_path_rate,
            **(self.mixer_kwargs or {}),
        )


class ChimeraTextPreTrainedModel(PreTrainedModel):
    """Shared plumbing: config class, weight init (BERT's, see
    :func:`chimera.models.text.init_text_weights`), base-model prefix ``chimera``."""

    config_class = ChimeraTextConfig
    config: ChimeraTextConfig
    base_model_prefix = "chimera"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ChimeraBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization's functions skip weights that were loaded
        init_text_weights(module, std=self.config.initializer_range, init=hf_init)


class ChimeraTextModel(ChimeraTextPreTrainedModel):
    """The bare encoder: ``last_hidden_state (batch, T, hidden_size)`` after the final norm."""

    def __init__(self, config: ChimeraTextConfig) -> None:
        super().__init__(config)
        self.encoder = ChimeraTextEncoder(**config.encoder_kwargs())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.encoder.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutput | tuple:
        """``attention_mask`` (1 = real token) or packed ``cu_seqlens`` / ``seq_idx``
        (:mod:`chimera.varlen`); there are no attentions to output."""
        _reject_attention_arguments(position_ids, output_attentions)
        want_states = (output_hidden_states if output_hidden_states is not None
                       else self.config.output_hidden_states)
        out = self.encoder(input_ids, attention_mask, token_type_ids, inputs_embeds,
                           seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                           output_hidden_states=bool(want_states))
        h, states = out if want_states else (out, None)
        if not _return_dict(self.config, return_dict):
            return (h,) if states is None else (h, states)
        return BaseModelOutput(last_hidden_state=h, hidden_states=states)


class ChimeraTextForMaskedLM(ChimeraTextPreTrainedModel):
    """Encoder + BERT's MLM head with the decoder tied to the token embeddings."""

    _tied_weights_keys = {  # noqa: RUF012 (transformers' class-level mapping)
        "lm_head.decoder.weight": "chimera.encoder.embeddings.word_embeddings.weight",
    }

    def __init__(self, config: ChimeraTextConfig) -> None:
        super().__init__(config)
        self.chimera = ChimeraTextModel(config)
        self.lm_head = MLMHead(config.hidden_size, config.vocab_size, config.hidden_act,
                               config.mlm_layer_norm_eps)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head.decoder = new_embeddings

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> MaskedLMOutput | tuple:
        """``labels (batch, T)``: token ids at masked positions, -100 elsewhere (ignored)."""
        _reject_attention_arguments(position_ids, output_attentions)
        out = self.chimera(input_ids, attention_mask, token_type_ids, inputs_embeds,
                           seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                           output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = mlm_loss(logits, labels)
        if not _return_dict(self.config, return_dict):
            rest = (logits,) if out.hidden_states is None else (logits, out.hidden_states)
            return rest if loss is None else (loss, *rest)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


class ChimeraTextForSequenceClassification(ChimeraTextPreTrainedModel):
    """Encoder + BERT pooler (``config.pooling``) + dropout + linear classifier (GLUE).

    The loss follows Hugging Face: MSE when ``num_labels == 1`` (STS-B), cross-entropy for
    integer labels, BCE for float multi-labels (or as ``config.problem_type`` says).
    """

    def __init__(self, config: ChimeraTextConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.chimera = ChimeraTextModel(config)
        self.pooler = TextPooler(config.hidden_size, config.pooling)
        p = (config.classifier_dropout if config.classifier_dropout is not None
             else config.hidden_dropout_prob)
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        position_ids: Tensor | None = None,
        output_attentions: bool | None = None,
    ) -> SequenceClassifierOutput | tuple:
        _reject_attention_arguments(position_ids, output_attentions)
        out = self.chimera(input_ids, attention_mask, token_type_ids, inputs_embeds,
                           output_hidden_states=output_hidden_states, return_dict=True)
        pooled = self.pooler(out.last_hidden_state, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss, self.config.problem_type = classification_loss(
                logits, labels, self.num_labels, self.config.problem_type)
        if not _return_dict(self.config, return_dict):
            rest = (logits,) if out.hidden_states is None else (logits, out.hidden_states)
            return rest if loss is None else (loss, *rest)
        return SequenceClassifierOutput(loss=loss, logits=logits,
                                        hidden_states=out.hidden_states)


def _return_dict(config: PreTrainedConfig, return_dict: bool | None) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


def _reject_attention_arguments(position_ids: Tensor | None,
                                output_attentions: bool | None) -> None:
    # named (not swallowed by **kwargs) so that callers learn at once that they do not apply;
    # no **kwargs also keeps HF's Trainer from passing loss kwargs it would expect us to use
    if position_ids is not None:
        raise ValueError("Chimera text models take no position_ids: the line topology is the "
                         "only positional signal")
    if output_attentions:
        raise ValueError("Chimera text models have no attention weights to output")


# --- registration with the Auto classes ---------------------------------------------------
AutoConfig.register(MODEL_TYPE, ChimeraTextConfig, exist_ok=True)
AutoModel.register(ChimeraTextConfig, ChimeraTextModel, exist_ok=True)
AutoModelForMaskedLM.register(ChimeraTextConfig, ChimeraTextForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(ChimeraTextConfig,
                                            ChimeraTextForSequenceClassification, exist_ok=True)


# --- MLM checkpoint -> classifier, strictly ------------------------------------------------
def read_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A state dict from a mapping, a ``save_pretrained`` directory, a ``.safetensors`` file or a
    ``torch.save`` file (a state dict, or a Lightning checkpoint with a ``state_dict`` entry)."""
    if isinstance(source, Mapping):
        sd = source.get("state_dict", source)
        return dict(sd)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}")
        out: dict[str, Tensor] = {}
        for f in files:
            out.update(read_state_dict(f))
        return out
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return read_state_dict(obj)


def _root_of(keys: list[str], what: str) -> str:
    """The prefix in front of ``encoder.embeddings.word_embeddings.weight`` (``""``,
    ``"chimera."``, ``"model."``, ``"model.chimera."`` ...)."""
    roots = sorted(k[: -len(_ENCODER_ANCHOR)] for k in keys if k.endswith(_ENCODER_ANCHOR))
    if len(roots) != 1:
        raise ValueError(f"{what} must hold exactly one Chimera text encoder "
                         f"('...{_ENCODER_ANCHOR}'), found {len(roots)}")
    return roots[0]


def load_mlm_into_classifier(
    classifier: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    new_keys: tuple[str, ...] = CLASSIFIER_NEW_KEYS,
    dropped_keys: tuple[str, ...] = MLM_ONLY_KEYS,
) -> dict[str, list[str]]:
    """Load a pretrained MLM's weights into a sequence classifier, strictly.

    Works for :class:`ChimeraTextForSequenceClassification` and the plain
    :class:`chimera.models.text.ChimeraTextClassifier`, from either MLM (any key layout: the
    encoder is found by its embedding key and re-rooted). Every classifier key outside
    ``new_keys`` must come from the checkpoint and every checkpoint key outside ``dropped_keys``
    must be used, with the same shape; otherwise a ``ValueError`` names the offending keys and
    nothing is loaded. The ``new_keys`` modules are (re)initialised with BERT's init.

    Returns ``{"new": [...], "dropped": [...]}`` (the keys initialised and the keys left out).
    """
    return _transfer(classifier, source, carried=(), new_keys=new_keys,
                     dropped_keys=dropped_keys, what="MLM checkpoint")


def load_finetuned_into_classifier(
    classifier: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
) -> dict[str, list[str]]:
    """Start a GLUE task from another task's finetuned classifier (Table 1's recipe: RTE, MRPC
    and STS-B start from MNLI), strictly: the encoder and the pooler must all come from the
    checkpoint, the classifier layer is new (its label count usually differs) and the source's
    classifier layer is the only thing dropped. Same sources and errors as
    :func:`load_mlm_into_classifier`.
    """
    return _transfer(classifier, source, carried=("pooler.",), new_keys=("classifier.",),
                     dropped_keys=("classifier.",), what="finetuned checkpoint")


def _transfer(classifier: nn.Module, source: str | os.PathLike | Mapping[str, Tensor], *,
              carried: tuple[str, ...], new_keys: tuple[str, ...],
              dropped_keys: tuple[str, ...], what: str) -> dict[str, list[str]]:
    sd = read_state_dict(source)
    target = classifier.state_dict()
    src_root = _root_of(list(sd), f"the {what}")
    dst_root = _root_of(list(target), "the classifier")
    # heads sit beside the base model: a Hugging Face base prefix ("chimera.") is not theirs
    src_head, dst_head = _head_root(src_root), _head_root(dst_root)
    src_carried = tuple(src_head + p for p in carried)
    src_dropped = tuple(src_head + p for p in dropped_keys)
    dst_new = tuple(dst_head + p for p in new_keys)

    mapped: dict[str, Tensor] = {}
    dropped, unexpected = [], []
    for k, v in sd.items():
        if k.startswith(src_root + "encoder."):
            mapped[dst_root + k[len(src_root):]] = v
        elif k.startswith(src_carried):
            mapped[dst_head + k[len(src_head):]] = v
        elif k.startswith(src_dropped):
            dropped.append(k)
        else:
            unexpected.append(k)
    new = check_strict_transfer(mapped, target, dst_new, what=what, model="classifier",
                                allowed=(new_keys, dropped_keys), unexpected=unexpected)
    result = classifier.load_state_dict(mapped, strict=False)
    if sorted(result.missing_keys) != new or result.unexpected_keys:  # guarded above
        raise RuntimeError(f"unexpected load result {result}")
    # the new heads get a fresh BERT init (whatever they held before)
    init = functools.partial(init_text_weights, std=_init_std(classifier))
    for name, module in classifier.named_modules():
        if name and name + "." in dst_new:
            module.apply(init)
    return {"new": new, "dropped": sorted(dropped)}


def check_strict_transfer(
    mapped: Mapping[str, Tensor], target: Mapping[str, Tensor], new_prefixes: tuple[str, ...],
    *, what: str, model: str, allowed: tuple[tuple[str, ...], tuple[str, ...]],
    unexpected: list[str] | tuple[str, ...] = (), error: type[Exception] = ValueError,
) -> list[str]:
    """The check behind every strict checkpoint -> classifier transfer (Chimera here, BERT in
    ``tasks.text.models``): ``mapped`` (the checkpoint's tensors under the model's key names)
    must cover every key of ``target`` except those starting with ``new_prefixes``, hold no
    other key and match every shape; otherwise ``error`` lists all the mismatches at once,
    before anything is loaded. ``allowed`` = (prefixes allowed to be new, prefixes dropped
    from the checkpoint), for the message; ``unexpected``: checkpoint keys the caller could
    not map. Returns the keys left new (sorted)."""
    new = sorted(k for k in target if k not in mapped and k.startswith(new_prefixes))
    missing = sorted(k for k in target if k not in mapped and k not in new)
    unexpected = sorted([*unexpected, *(k for k in mapped if k not in target)])
    bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                 for k, v in mapped.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or bad_shape:
        raise error(
            f"the {what} does not match the {model} (nothing was loaded):"
            + (f"\n  missing from the checkpoint: {missing}" if missing else "")
            + (f"\n  unexpected in the checkpoint: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatch: {bad_shape}" if bad_shape else "")
            + f"\n  (keys allowed to be new: {list(allowed[0])}; to be dropped: "
              f"{list(allowed[1])})")
    return new


def _head_root(root: str) -> str:
    return root[: -len("chimera.")] if root.endswith("chimera.") else root


def _init_std(model: nn.Module) -> float:
    config = getattr(model, "config", None)
    return float(getattr(config, "initializer_range", 0.02))


__all__ = [
    "CLASSIFIER_NEW_KEYS",
    "MLM_ONLY_KEYS",
    "MODEL_TYPE",
    "ChimeraTextConfig",
    "ChimeraTextForMaskedLM",
    "ChimeraTextForSequenceClassification",
    "ChimeraTextModel",
    "ChimeraTextPreTrainedModel",
    "check_strict_transfer",
    "load_finetuned_into_classifier",
    "load_mlm_into_classifier",
    "read_state_dict",
]
