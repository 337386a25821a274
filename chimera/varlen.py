"""Variable-length text on a line topology: padded batches and packed sequences.

A batch of text is ``batch`` rows of ``T`` tokens over one line topology. A row holds either one
sentence followed (or preceded) by padding, described by an ``attention_mask`` (1 = real token,
as in Hugging Face), or several sentences packed end to end, described by ``cu_seqlens`` (the
cumulative lengths of one packed row, as FlashAttention and Mamba's varlen kernels take them) or by
a per-token ``seq_idx`` (Mamba-2's name). All three reduce to :class:`Segments`: every token gets
the id of the *run* it belongs to, a maximal stretch of consecutive tokens of one sequence; pad
tokens form runs of their own.

How isolation is enforced, and why this way. The mixer touches other tokens in exactly two
places, the local convolution and the resolvent ``L = (I - A)^-1``:

* **resolvent**: an edge of the line whose two ends lie in different runs gets weight exactly 0
  (and counts as absent in the DAG normalisation, so a sentence's first token is a root and takes
  ``delta_i``, as it does alone). ``A`` then is block diagonal over runs, so is ``L`` (a path
  between two runs would have to cross a zero edge), and every resolvent algorithm, dense or
  recurrent, exact or finite-sum, computes the same per-run blocks it computes on a sentence
  alone. One mechanism covers all methods of :func:`chimera.ops.mix` unchanged, keeps shapes
  static (no gather into per-sentence blocks, nothing recompiles per batch) and keeps the one
  line topology per length, whose cached decompositions and sweep plans every layer reuses.
  Both directions are cut, so pads leak neither into the forward nor into the reverse scan
  (the authors' release pads after unpadding and lets the reverse scan start in the pads).
* **convolution**: a tap that reaches a token of another run reads zero, exactly the zero padding
  a sentence alone sees at its ends (:class:`chimera.local_conv.LineConv`).

Edges between two pad tokens are kept: pads then only mix with pads, which is harmless, and a
directed line keeps one cut per sentence boundary instead of one per pad (the chunked SSD works
in log space, where each cut costs some float32 precision, see :func:`chimera.ops.ssd.mix_ssd`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from chimera.topology import Topology


@dataclass(eq=False)
class Segments:
    """Run ids of a ``(batch, T)`` token grid (build it with :meth:`build`).

    Attributes:
        ids: ``(batch, T)`` long, the run of every token; runs are contiguous and numbered
            from 0 within each row.
        real: ``(batch, T)`` bool, True for real tokens, False for padding.
    """

    ids: Tensor
    real: Tensor
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)  # type: ignore[return-value]

    @classmethod
    def build(
        cls,
        batch: int,
        T: int,
        *,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Segments | None:
        """Segments of a ``(batch, T)`` batch, or ``None`` when no argument is given.

        Args:
            attention_mask: ``(batch, T)``, 1/True for real tokens and 0/False for padding.
                Real tokens separated by padding belong to different runs.
            seq_idx: ``(batch, T)`` integer sequence id of every token (-1 marks padding);
                a change of id starts a new sequence (ids are not required to be increasing,
                but an id that reappears after another one starts a new sequence).
            cu_seqlens: ``(num_seqs + 1,)`` cumulative lengths ``[0, n_1, n_1 + n_2, ..., T]`` of
                one packed row (``batch`` must be 1); it must cover all ``T`` tokens.
            device: where to put the result (default: the inputs' device).

        ``attention_mask`` may be combined with ``seq_idx`` or ``cu_seqlens`` (masked tokens
        become padding); ``seq_idx`` and ``cu_seqlens`` exclude each other.
        """
        if attention_mask is None and seq_idx is None and cu_seqlens is None:
            return None
        if seq_idx is not None and cu_seqlens is not None:
            raise ValueError("give either seq_idx or cu_seqlens, not both")
        key = None
        if cu_seqlens is not None:
            key = _seq_idx_from_cu_seqlens(cu_seqlens, batch, T)
        elif seq_idx is not None:
            seq_idx = torch.as_tensor(seq_idx)
            if seq_idx.shape != (batch, T):
                raise ValueError(
                    f"seq_idx must have shape (batch, T) = ({batch}, {T}), "
                    f"got {tuple(seq_idx.shape)}")
            if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
                raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
            if seq_idx.numel() and int(seq_idx.min()) < -1:
                raise ValueError("seq_idx holds sequence ids >= 0 and -1 for padding")
            key = seq_idx.long()
        if attention_mask is not None:
            mask = _check_mask(attention_mask, batch, T)
            key = torch.zeros(batch, T, dtype=torch.long, device=mask.device) if key is None \
                else key.to(mask.device)
            key = torch.where(mask, key, -1)
        if device is not None:
            key = key.to(device)
        # a new run starts wherever the key changes: pads (-1) become runs of their own
        start = torch.ones_like(key, dtype=torch.bool)
        start[:, 1:] = key[:, 1:] != key[:, :-1]
        ids = torch.cumsum(start.long(), dim=1) - 1
        return cls(ids=ids, real=key >= 0)

    def to(self, device: torch.device | str) -> Segments:
        device = torch.device(device)
        if self.ids.device == device:
            return self
        return Segments(ids=self.ids.to(device), real=self.real.to(device))

    def check(self, batch: int, T: int) -> None:
        if self.shape != (batch, T):
            raise ValueError(f"segments are for a ({self.shape[0]}, {self.shape[1]}) batch, "
                             f"the input is ({batch}, {T})")

    def edge_keep(self, topology: Topology) -> Tensor:
        """``(batch, E)`` bool: True for the edges of ``topology`` inside one run."""
        ids = self.ids.to(topology.device)
        return ids[:, topology.src] == ids[:, topology.dst]

    def same_run(self, offset: int) -> Tensor:
        """``(batch, T)`` bool: token ``t + offset`` exists and lies in the run of token ``t``."""
        ids = self.ids
        T = ids.shape[1]
        out = torch.zeros_like(ids, dtype=torch.bool)
        if abs(offset) >= T:
            return out
        if offset >= 0:
            out[:, :T - offset] = ids[:, offset:] == ids[:, :T - offset]
        else:
            out[:, -offset:] = ids[:, :T + offset] == ids[:, -offset:]
        return out

    @property
    def max_len(self) -> int:
        """Length of the longest run of real tokens (0 if there is none)."""

        def build() -> int:
            b, T = self.ids.shape
            flat = (self.ids + T * torch.arange(b, device=self.ids.device)[:, None])[self.real]
            return int(torch.bincount(flat).max()) if flat.numel() else 0

        return self._cached("max_len", build)

    @property
    def single_run(self) -> bool:
        """True if every row holds at most one run of real tokens (a padded batch)."""

        def build() -> bool:
            starts = self.real.clone()
            starts[:, 1:] &= self.ids[:, 1:] != self.ids[:, :-1]
            return bool((starts.sum(1) <= 1).all())

        return self._cached("single_run", build)

    def _cached(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]


def _check_mask(mask: Tensor, batch: int, T: int) -> Tensor:
    mask = torch.as_tensor(mask)
    if mask.shape != (batch, T):
        raise ValueError(
            f"attention_mask must have shape (batch, T) = ({batch}, {T}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 (real token) or 0 (padding) only")
        mask = mask != 0
    return mask


def _seq_idx_from_cu_seqlens(cu_seqlens: Tensor, batch: int, T: int) -> Tensor:
    cu = torch.as_tensor(cu_seqlens)
    if batch != 1:
        raise ValueError(
            f"cu_seqlens describes one packed row, the input has {batch} rows; pass seq_idx "
            "(batch, T) for several packed rows")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [0, ..., T] with at least 2 entries, "
                         f"got shape {tuple(cu.shape)}")
    if cu.dtype.is_floating_point or cu.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor, got {cu.dtype}")
    cu = cu.long()
    if int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at the length T={T} (cover every token), "
            f"got {int(cu[0])} ... {int(cu[-1])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    # token t belongs to sequence s with cu[s] <= t < cu[s+1]
    pos = torch.arange(T, device=cu.device)
    return (torch.searchsorted(cu, pos, right=True) - 1).unsqueeze(0)


def resolve_segments(
    x: Tensor,
    *,
    segments: Segments | None = None,
    attention_mask: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Segments | None:
    """The :class:`Segments` of ``x (batch, T, ...)`` from whichever description was given."""
    b, T = x.shape[0], x.shape[1]
    if segments is not None:
        if attention_mask is not None or seq_idx is not None or cu_seqlens is not None:
            raise ValueError("give segments or attention_mask/seq_idx/cu_seqlens, not both")
        segments.check(b, T)
        return segments.to(x.device)
    return Segments.build(b, T, attention_mask=attention_mask, seq_idx=seq_idx,
                          cu_seqlens=cu_seqlens, device=x.device)
