"""Chimera text encoders for masked language modelling and GLUE (paper Sec. 5.1, Table 1,
App. B.1, B.3, C.1).

``input_ids`` -> token (+ token-type) embeddings, LayerNorm, dropout -> ``n_layer`` x
:class:`chimera.ChimeraBlock` on the undirected line over the tokens -> final norm. There are
**no position embeddings**: the line topology is the only positional signal. Heads:

- :class:`MLMHead`: BERT's prediction head, ``dense -> GELU -> LayerNorm -> decoder``, with the
  decoder's weight tied to the token embeddings (Devlin et al., 2019);
- :class:`TextPooler` + a linear classifier: BERT's pooler ``tanh(dense(h))`` over the first real
  token (``pooling="cls"``, the default: what BERT, M2 and the authors' GLUE code do and what
  Hugging Face users expect) or over the mean of the real tokens (``pooling="mean"``, the
  release's ``pool_all`` option).

Two variants of the mixer (Table 1):

- ``"dag"``: the undirected line as its two directed lines (forward and reverse), each mixed
  exactly (Prop. 3.3: each is Mamba-2) and summed, with separate B, C and dt per direction
  (``sharing="none"``, as the authors' language code);
- ``"ug"``: the general method on the undirected line itself (Sec. 3.3) with the App. B.1
  constraint ``A_ij A_ji <= gamma^2 / 4`` on every 2-cycle
  (:func:`chimera.norm.two_cycle_normalize`), resolvent by an LU solve (``method="exact"``)
  or the finite sum (``"neumann"``).

Padded batches (``attention_mask``) and packed sequences (``cu_seqlens``, ``seq_idx``) keep every
sentence isolated from padding and from its neighbours (:mod:`chimera.varlen`).

Sizes (:data:`TEXT_PRESETS`): the paper's 110M model (23 layers, d_model 768, no MLP, d_state 64,
headdim 64, expand 2, conv width 7; App. C.1, Table 8), the 70M model (12 layers) and the 6-layer
model with expand 4 of App. B.3 / Table 7. **Heads: 24, not Table 8's 12.** Table 8 lists head
size 64 *and* 12 heads, which only multiply to ``d_inner = 2 * 768 = 1536`` with a head size of
128; the appendix text (head size 64, expand 2) and the authors' release (``headdim: 64``,
``expand: 2``) both give ``1536 / 64 = 24`` heads, so we follow them; ``headdim=128`` gives 12.
The head count changes the parameter count by only ``768 * 12`` per layer (the dt projection).

Where the paper is silent the release decides (each is an argument): LayerNorm in the blocks
(``norm="layer"``), LayerNorm after the embeddings, token-type embeddings (for sentence pairs), a
MLM-head LayerNorm eps of 1e-12, and BERT's init (normal(0.02) for linear and embedding weights;
the mixer's ``dt_bias``, ``A_log``, ``D`` and the depthwise convolution keep their own init). The
release's blocks are post-norm; ours are the library's pre-norm blocks plus a final norm.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.block import ChimeraBlock, make_norm
from chimera.local_conv import LineConv
from chimera.mixer import ChimeraMixer
from chimera.topology import Topology, line
from chimera.varlen import Segments

VARIANTS: tuple[str, ...] = ("dag", "ug")
POOLING: tuple[str, ...] = ("cls", "mean")

_BASE = dict(d_model=768, d_state=64, headdim=64, expand=2.0, d_conv=7, mlp_ratio=0.0)

#: Named sizes (App. C.1 / Table 8, App. B.3 / Table 7); BERT's WordPiece vocabulary.
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "chimera_text_110m": dict(_BASE, n_layer=23),
    "chimera_text_70m": dict(_BASE, n_layer=12),
    "chimera_text_6l_expand4": dict(_BASE, n_layer=6, expand=4.0),
}


def text_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of preset ``name`` (see :data:`TEXT_PRESETS`), with overrides."""
    if name not in TEXT_PRESETS:
        raise ValueError(f"unknown text preset {name!r}; choose one of {tuple(TEXT_PRESETS)}")
    return {**TEXT_PRESETS[name], **overrides}


@functools.lru_cache(maxsize=64)
def line_topology(T: int) -> Topology:
    """The undirected line over ``T`` tokens, built once per length (on the CPU, so also under a
    ``torch.device("meta")`` context): its decomposition and sweep plans are cached on it and the
    mixer moves it to the input's device once."""
    with torch.device("cpu"):
        return line(T)


def variant_mixer_kwargs(variant: str, method: str = "auto",
                         sharing: str = "none") -> dict[str, Any]:
    """:class:`chimera.ChimeraMixer` arguments of a text variant (``"dag"`` or ``"ug"``)."""
    if variant == "dag":
        return dict(conv="line", resolvent="dag", method=method, sharing=sharing)
    if variant == "ug":
        if method not in ("auto", "reference", "exact", "neumann"):
            raise ValueError(f"the UG variant needs method exact/neumann/reference, not {method!r}")
        return dict(conv="line", resolvent="general", general_norm="two_cycle", method=method)
    raise ValueError(f"unknown text variant {variant!r}; choose one of {VARIANTS}")


@torch.no_grad()
def init_text_weights(module: nn.Module, std: float = 0.02, init: Any = nn.init) -> None:
    """BERT's init for one module (apply it with ``model.apply``): normal(std) linear and
    embedding weights, zero biases and padding rows, unit norms. The mixer's ``dt_bias``,
    ``A_log``, ``D`` are redrawn from their own init and the depthwise convolution gets PyTorch's
    default, as at construction.

    ``init`` supplies ``normal_``, ``zeros_``, ``ones_`` (and optionally ``copy_``):
    ``torch.nn.init`` or ``transformers.initialization``, whose functions skip loaded weights.
    """
    if isinstance(module, nn.Linear):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized",
                                                          False):
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if module.weight is not None:
            init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)
    elif isinstance(module, LineConv):
        module.conv.reset_parameters()
    elif isinstance(module, ChimeraMixer):
        copy = getattr(init, "copy_", None)
        for name, value in module.ssm_parameter_init().items():
            p = getattr(module, name)
            if copy is not None:
                copy(p, value.to(p.device, p.dtype))
            else:
                p.copy_(value)


class TextEmbeddings(nn.Module):
    """Token (+ token-type) embeddings, LayerNorm and dropout; no position embeddings."""

    def __init__(self, vocab_size: int, d_model: int, type_vocab_size: int = 2,
                 pad_token_id: int | None = 0, norm_eps: float = 1e-5,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        self.token_type_embeddings = (nn.Embedding(type_vocab_size, d_model)
                                      if type_vocab_size > 0 else None)
        self.LayerNorm = nn.LayerNorm(d_model, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (batch, T), got {tuple(input_ids.shape)}")
            inputs_embeds = self.word_embeddings(input_ids)
        elif inputs_embeds.dim() != 3:
            raise ValueError(
                f"inputs_embeds must be (batch, T, d_model), got {tuple(inputs_embeds.shape)}")
        x = inputs_embeds
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                # type 0 everywhere (a single segment), without materialising an id tensor
                x = x + self.token_type_embeddings.weight[0]
            else:
                if token_type_ids.shape != x.shape[:2]:
                    raise ValueError(f"token_type_ids must be (batch, T) = {tuple(x.shape[:2])}, "
                                     f"got {tuple(token_type_ids.shape)}")
                x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given but the model has no token-type embeddings "
                             "(type_vocab_size=0)")
        return self.dropout(self.LayerNorm(x))


class ChimeraTextEncoder(nn.Module):
    """Bidirectional Chimera encoder over the undirected line (see the module docstring).

    Args:
        vocab_size: vocabulary size (30522: bert-base-uncased's WordPiece).
        d_model, n_layer, d_state, headdim, expand, d_conv, mlp_ratio: sizes (presets in
            :data:`TEXT_PRESETS`; ``mlp_ratio=0`` drops the block's MLP, as the paper does).
        variant: ``"dag"`` (two directed lines, summed) or ``"ug"`` (undirected line, App. B.1).
        method: resolvent algorithm (``"auto"``: SSD per directed line for DAG, LU for UG).
        sharing: B/C/dt sharing between the two directed lines (DAG only): ``"none"`` (release)
            or ``"complete"``.
        norm: block and final norm, ``"layer"`` (release) or ``"rms"``.
        type_vocab_size: token-type (segment A/B) embeddings, 0 for none.
        pad_token_id: embedding row kept at zero (BERT's padding_idx).
        dropout: after the embeddings. drop_path: stochastic depth, rising linearly to this value.
        **mixer_kwargs: forwarded to :class:`chimera.ChimeraMixer` (``dag_norm``, ``gamma``,
            ``num_terms``, ``chunk_size``, ``dt_min`` ...).
    """

    def __init__(
        self,
        vocab_size: int = 30522,
        d_model: int = 768,
        n_layer: int = 23,
        *,
        variant: Literal["dag", "ug"] = "dag",
        d_state: int = 64,
        headdim: int = 64,
        expand: float = 2.0,
        d_conv: int = 7,
        mlp_ratio: float = 0.0,
        method: str = "auto",
        sharing: str = "none",
        norm: Literal["layer", "rms"] = "layer",
        norm_eps: float = 1e-5,
        type_vocab_size: int = 2,
        pad_token_id: int | None = 0,
        dropout: float = 0.1,
        drop_path: float = 0.0,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        if n_layer < 1:
            raise ValueError(f"n_layer must be >= 1, got {n_layer}")
        self.variant = variant
        self.d_model = d_model
        mix_kw = variant_mixer_kwargs(variant, method, sharing)
        self.embeddings = TextEmbeddings(vocab_size, d_model, type_vocab_size, pad_token_id,
                                         norm_eps, dropout)
        dpr = [drop_path * i / (n_layer - 1) if n_layer > 1 else 0.0 for i in range(n_layer)]
        self.layers = nn.ModuleList(
            ChimeraBlock(d_model, mlp_ratio=mlp_ratio, drop_path=dpr[i], norm=norm,
                         norm_eps=norm_eps, d_state=d_state, headdim=headdim, expand=expand,
                         d_conv=d_conv, **mix_kw, **mixer_kwargs)
            for i in range(n_layer)
        )
        self.norm_f = make_norm(norm, d_model, norm_eps)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        *,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Tensor | tuple[Tensor, tuple[Tensor, ...]]:
        """``(batch, T)`` token ids -> ``(batch, T, d_model)`` normalised hidden states.

        With ``output_hidden_states`` also returns the embeddings and every block's output
        (``n_layer + 1`` tensors, before the final norm). Outputs at padding positions are
        unspecified (finite).
        """
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        b, T, _ = x.shape
        # sentence boundaries resolved (and validated) once for all layers
        seg = Segments.build(b, T, attention_mask=attention_mask, seq_idx=seq_idx,
                             cu_seqlens=cu_seqlens, device=x.device)
        topo = line_topology(T)
        states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, topo, segments=seg)
            if states is not None:
                states.append(x)
        x = self.norm_f(x)
        return (x, tuple(states)) if states is not None else x


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(LayerNorm(gelu(dense(h))))``; the models tie
    ``decoder.weight`` to the token embeddings."""

    def __init__(self, d_model: int, vocab_size: int, act: str = "gelu",
                 norm_eps: float = 1e-12) -> None:
        super().__init__()
        if act not in ("gelu", "gelu_tanh", "relu"):
            raise ValueError(f"unknown MLM head activation {act!r}")
        self.act = act
        self.dense = nn.Linear(d_model, d_model)
        self.LayerNorm = nn.LayerNorm(d_model, eps=norm_eps)
        self.decoder = nn.Linear(d_model, vocab_size, bias=True)

    def forward(self, h: Tensor) -> Tensor:
        h = self.dense(h)
        if self.act == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh" if self.act == "gelu_tanh" else "none")
        return self.decoder(self.LayerNorm(h))


class TextPooler(nn.Module):
    """BERT's pooler ``tanh(dense(.))`` over the first real token (``"cls"``; with left padding
    the first token whose mask is 1) or the mean of the real tokens (``"mean"``)."""

    def __init__(self, d_model: int, pooling: Literal["cls", "mean"] = "cls") -> None:
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLING}")
        self.pooling = pooling
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if attention_mask is None:
            pooled = h[:, 0] if self.pooling == "cls" else h.mean(1)
        else:
            if attention_mask.shape != h.shape[:2]:
                raise ValueError(f"attention_mask must be (batch, T) = {tuple(h.shape[:2])}, "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask != 0
            if not bool(real.any(1).all()):
                raise ValueError("every row needs at least one real token to pool")
            if self.pooling == "cls":
                first = real.long().argmax(1)  # index of the first real token
                pooled = h[torch.arange(h.shape[0], device=h.device), first]
            else:
                w = real.to(h.dtype).unsqueeze(-1)
                pooled = (h * w).sum(1) / w.sum(1)
        return torch.tanh(self.dense(pooled))


def classification_loss(logits: Tensor, labels: Tensor, num_labels: int,
                        problem_type: str | None = None) -> tuple[Tensor, str]:
    """Hugging Face's rule: regression (MSE) for one label, cross-entropy for integer labels,
    multi-label BCE for float labels with several outputs. Returns the loss and the type."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1)), problem_type
        return F.mse_loss(logits, labels.to(logits.dtype)), problem_type
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1)), problem_type
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype)), problem_type
    raise ValueError(f"unknown problem_type {problem_type!r}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class ChimeraTextMLM(nn.Module):
    """Encoder + tied MLM head (plain PyTorch; :mod:`chimera.models.hf` has the Hugging Face
    version with the same module names under ``chimera.``).

    Args:
        head_act, head_norm_eps: the head's activation and LayerNorm eps (BERT: gelu, 1e-12).
        init_std: std of BERT's normal init.
        **encoder_kwargs: :class:`ChimeraTextEncoder` arguments (``vocab_size``, ``d_model``,
            ``n_layer``, ``variant``, ... or ``**text_preset(name)``).
    """

    def __init__(self, *, head_act: str = "gelu", head_norm_eps: float = 1e-12,
                 init_std: float = 0.02, **encoder_kwargs: Any) -> None:
        super().__init__()
        self.encoder = ChimeraTextEncoder(**encoder_kwargs)
        emb = self.encoder.embeddings.word_embeddings
        self.lm_head = MLMHead(self.encoder.d_model, emb.num_embeddings, head_act, head_norm_eps)
        self.apply(functools.partial(init_text_weights, std=init_std))
        self.lm_head.decoder.weight = emb.weight  # tied (Press & Wolf, 2017; BERT)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        logits_at_labels_only: bool = False,
    ) -> dict[str, Tensor]:
        """Returns ``{"logits": (batch, T, vocab)[, "loss": mean CE over labels != -100]}``.

        ``logits_at_labels_only=True`` (needs ``labels``) runs the head only where
        ``labels != -100`` and returns ``logits (M, vocab)`` and ``labels (M,)`` for those
        positions: the vocabulary projection is most of an MLM step's memory at 15-30% masking.
        """
        h = self.encoder(input_ids, attention_mask, token_type_ids, inputs_embeds,
                         seq_idx=seq_idx, cu_seqlens=cu_seqlens)
        out: dict[str, Tensor] = {}
        if logits_at_labels_only:
            if labels is None:
                raise ValueError("logits_at_labels_only needs labels")
            sel = labels != -100
            out["labels"] = labels[sel]
            out["logits"] = self.lm_head(h[sel])
            out["loss"] = mlm_loss(out["logits"], out["labels"])
            return out
        out["logits"] = self.lm_head(h)
        if labels is not None:
            out["loss"] = mlm_loss(out["logits"], labels)
        return out


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the positions with ``labels != -100`` (in float32), and an exact
    zero (with a graph) when there is none, where ``F.cross_entropy`` would give NaN."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    flat = labels.reshape(-1)
    if not bool((flat != -100).any()):
        # no masked token in the batch: a zero that still carries a graph (no NaN from 0/0)
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=-100)


class ChimeraTextClassifier(nn.Module):
    """Encoder + pooler + dropout + linear classifier (GLUE). ``num_labels=1`` is regression
    (STS-B). Load a pretrained MLM with :func:`chimera.models.hf.load_mlm_into_classifier`."""

    def __init__(self, num_labels: int = 2, *, pooling: Literal["cls", "mean"] = "cls",
                 classifier_dropout: float = 0.1, init_std: float = 0.02,
                 problem_type: str | None = None, **encoder_kwargs: Any) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = num_labels
        self.problem_type = problem_type
        self.encoder = ChimeraTextEncoder(**encoder_kwargs)
        d = self.encoder.d_model
        self.pooler = TextPooler(d, pooling)
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(d, num_labels)
        self.apply(functools.partial(init_text_weights, std=init_std))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Returns ``{"logits": (batch, num_labels)[, "loss"]}``."""
        h = self.encoder(input_ids, attention_mask, token_type_ids, inputs_embeds)
        logits = self.classifier(self.dropout(self.pooler(h, attention_mask)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"], _ = classification_loss(logits, labels, self.num_labels,
                                                 self.problem_type)
        return out


def approx_parameter_count(vocab_size: int = 30522, type_vocab_size: int = 2,
                           **encoder_kwargs: Any) -> int:
    """Parameters of :class:`ChimeraTextMLM` for these arguments, built on the meta device
    (nothing is allocated)."""
    with torch.device("meta"):
        m = ChimeraTextMLM(vocab_size=vocab_size, type_vocab_size=type_vocab_size,
                           **encoder_kwargs)
    return count_parameters(m)


__all__ = [
    "POOLING",
    "TEXT_PRESETS",
    "VARIANTS",
    "ChimeraTextClassifier",
    "ChimeraTextEncoder",
    "ChimeraTextMLM",
    "MLMHead",
    "TextEmbeddings",
    "TextPooler",
    "approx_parameter_count",
    "classification_loss",
    "count_parameters",
    "init_text_weights",
    "mlm_loss",
    "line_topology",
    "text_preset",
    "variant_mixer_kwargs",
]
