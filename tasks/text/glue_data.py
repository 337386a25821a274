"""GLUE finetuning data (paper Table 1): the eight tasks, from the Hub or from local files.

``source="hf"`` reads ``nyu-mll/glue`` (parquet files, a network or the HF cache) with
``datasets.load_dataset(hf_path, config)``. ``source="local"`` reads the task files as they were
published, under ``glue_dir/<Task>/`` (folder names as GLUE's download script writes them:
``CoLA``, ``SST-2``, ``MRPC``, ``QQP``, ``STS-B``, ``MNLI``, ``QNLI``, ``RTE``):

======  ==========================================  =============================================
task    files (train / dev)                         columns
======  ==========================================  =============================================
CoLA    train.tsv / dev.tsv                         no header: ``sentence, label`` (the tokenized
                                                    release) or GLUE's ``source, label, mark,
                                                    sentence``
SST-2   train.tsv / dev.tsv                         header; ``sentence`` (GLUE) or ``text_a``,
                                                    ``label``
MRPC    msr_paraphrase_{train,dev,test}.txt, or     header (UTF-8 BOM); ``Quality``, ``#1 String``,
        GLUE's train.tsv / dev.tsv                  ``#2 String``
QQP     train.tsv / dev.tsv                         ``question1``, ``question2``, ``is_duplicate``
STS-B   train.tsv / dev.tsv                         GLUE's 10 columns; ``sentence1``,
                                                    ``sentence2``, ``score`` (0-5, a float)
MNLI    train.tsv / dev_matched.tsv,                ``sentence1``, ``sentence2``, ``gold_label``
        dev_mismatched.tsv
QNLI    train.tsv / dev.tsv                         ``question``, ``sentence``, ``label``
RTE     train.tsv / dev.tsv                         ``sentence1``, ``sentence2``, ``label`` (ids or
                                                    ``entailment`` / ``not_entailment``)
======  ==========================================  =============================================

Files are read as tab-separated with no quoting (GLUE's text holds bare quotes); rows whose field
count differs from the header's are skipped and counted (the MSRP train file has one line that
fuses two pairs); more than 5% of such rows (and more than 10), or all of them, is an error,
since it means a wrong file or format. Labels
map to the ids of ``nyu-mll/glue`` (names or ids are accepted): CoLA 0 unacceptable / 1
acceptable, SST-2 0 negative / 1 positive, MRPC 0 not_equivalent / 1 equivalent, QQP 0
not_duplicate / 1 duplicate, MNLI 0 entailment / 1 neutral / 2 contradiction, QNLI and RTE 0
entailment / 1 not_entailment; STS-B is a float regression target. MNLI rows without a gold label
(``-``) are skipped.

Evaluation is on the dev sets, as in M2-BERT and the paper (GLUE's test labels are hidden). MNLI
has two validation loaders, matched then mismatched (``val_split_names``).

Batches: dicts with ``input_ids``, ``token_type_ids`` (0 for the first text, 1 for the second),
``attention_mask`` (``LongTensor (B, L)``, padded per batch to a multiple of
``pad_to_multiple_of``, ``L <= max_length``) and ``labels`` (``LongTensor (B,)``; ``FloatTensor
(B,)`` for STS-B). Pairs are truncated longest-first to ``max_length`` (128).
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from tasks.core.data import train_loader
from tasks.text.hub import DataNotFoundError, HubUnavailableError, hub_offline, require_hub
from tasks.text.tokenizer import WORDPIECE, load_tokenizer

HF_GLUE = "nyu-mll/glue"
# a field of the MSRP/MNLI files can exceed csv's default 128 KiB limit only in broken files,
# but the default must not be the reason a file fails to parse
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its ids, labels, the Hub's columns and the local files' layout."""

    name: str  # the nyu-mll/glue config name
    local_dirs: tuple[str, ...]  # folder names under glue_dir, first = GLUE's
    label_names: tuple[str, ...]  # () for regression
    hf_columns: tuple[str, str | None]
    eval_splits: tuple[str, ...]
    # split -> candidate file names under the task folder (first that exists wins)
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # local columns: aliases for text_a, text_b (None: single sentence) and the label
    text_a: tuple[str, ...] = ()
    text_b: tuple[str, ...] | None = None
    label: tuple[str, ...] = ("label",)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Outputs of the classification head (1 for STS-B's regression)."""
        return len(self.label_names) or 1


_DEV = {"train": ("train.tsv",), "validation": ("dev.tsv",)}
GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("CoLA", "cola"), ("unacceptable", "acceptable"),
                     ("sentence", None), ("validation",), _DEV),
    "sst2": GlueTask("sst2", ("SST-2", "sst2", "SST2"), ("negative", "positive"),
                     ("sentence", None), ("validation",), _DEV,
                     text_a=("sentence", "text_a")),
    "mrpc": GlueTask("mrpc", ("MRPC", "mrpc"), ("not_equivalent", "equivalent"),
                     ("sentence1", "sentence2"), ("validation",),
                     {"train": ("msr_paraphrase_train.txt", "train.tsv"),
                      "validation": ("msr_paraphrase_dev.txt", "dev.tsv"),
                      "test": ("msr_paraphrase_test.txt",)},
                     text_a=("#1 String",), text_b=("#2 String",), label=("Quality",)),
    "qqp": GlueTask("qqp", ("QQP", "qqp"), ("not_duplicate", "duplicate"),
                    ("question1", "question2"), ("validation",), _DEV,
                    text_a=("question1",), text_b=("question2",), label=("is_duplicate",)),
    "stsb": GlueTask("stsb", ("STS-B", "stsb", "STSB"), (), ("sentence1", "sentence2"),
                     ("validation",), _DEV, text_a=("sentence1",), text_b=("sentence2",),
                     label=("score",)),
    "mnli": GlueTask("mnli", ("MNLI", "mnli"), ("entailment", "neutral", "contradiction"),
                     ("premise", "hypothesis"), ("validation_matched", "validation_mismatched"),
                     {"train": ("train.tsv",), "validation_matched": ("dev_matched.tsv",),
                      "validation_mismatched": ("dev_mismatched.tsv",)},
                     text_a=("sentence1",), text_b=("sentence2",), label=("gold_label",)),
    "qnli": GlueTask("qnli", ("QNLI", "qnli"), ("entailment", "not_entailment"),
                     ("question", "sentence"), ("validation",), _DEV,
                     text_a=("question",), text_b=("sentence",)),
    "rte": GlueTask("rte", ("RTE", "rte"), ("entailment", "not_entailment"),
                    ("sentence1", "sentence2"), ("validation",), _DEV,
                    text_a=("sentence1",), text_b=("sentence2",)),
}


def glue_task(name: str) -> GlueTask:
    """The task for ``"MNLI"``, ``"mnli"``, ``"SST-2"``, ``"sst2"``, ``"STS-B"``, ...;
    WNLI (excluded from the paper's GLUE score) and unknown names are errors."""
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r} (data.task); the paper's eight are "
                         f"{sorted(GLUE_TASKS)} (WNLI is excluded, as in BERT and M2-BERT)")
    return GLUE_TASKS[key]


# ---------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------
@dataclass
class Columns:
    """One split as columns; ``skipped`` counts malformed / unlabeled rows left out."""

    text_a: list[str]
    text_b: list[str] | None
    labels: list[float] | list[int]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def read_tsv(path: Path) -> list[list[str]]:
    """All rows of a tab-separated file, no quoting, BOM dropped, trailing empty lines dropped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()
    return rows


def parse_label(task: GlueTask, raw: str, where: str) -> int | float | None:
    """The ``nyu-mll/glue`` label id (or STS-B score) of a raw label; ``None`` = no gold label."""
    value = raw.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise ValueError(f"{where}: STS-B score {raw!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{where}: STS-B score {score} outside [0, 5]")
        return score
    if task.name == "mnli" and value == "-":
        return None
    if value.lstrip("-").isdigit():
        idx = int(value)
        if 0 <= idx < len(task.label_names):
            return idx
    lowered = value.lower()
    if lowered in task.label_names:
        return task.label_names.index(lowered)
    raise ValueError(f"{where}: label {raw!r} is neither an id in 0..{len(task.label_names) - 1} "
                     f"nor one of {list(task.label_names)}")


def _column(header: list[str], aliases: Sequence[str], path: Path) -> int:
    for a in aliases:
        if a in header:
            return header.index(a)
    raise ValueError(f"{path}: none of the columns {list(aliases)} in the header {header}")


def _check_skips(skipped: int, total: int, path: Path) -> None:
    # a few broken lines are part of the published files; many mean a wrong file or format
    if total and (skipped == total or (skipped > 10 and skipped > 0.05 * total)):
        raise ValueError(f"{path}: {skipped} of {total} rows do not have the header's field count;"
                         f" is this the right file and format?")


def _read_cola(task: GlueTask, path: Path) -> Columns:
    rows = read_tsv(path)
    text, labels, skipped = [], [], 0
    for i, row in enumerate(rows, start=1):
        if len(row) == 2:  # the tokenized release: sentence, label
            sentence, raw = row
        elif len(row) == 4:  # GLUE: source, label, original mark, sentence
            raw, sentence = row[1], row[3]
        else:
            skipped += 1
            continue
        if i == 1 and raw.strip().lower() == "label":  # a header after all
            continue
        text.append(sentence)
        labels.append(parse_label(task, raw, f"{path}:{i}"))
    _check_skips(skipped, len(rows), path)
    return Columns(text, None, labels, skipped)


def _read_with_header(task: GlueTask, path: Path) -> Columns:
    rows = read_tsv(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    ia = _column(header, task.text_a, path)
    ib = _column(header, task.text_b, path) if task.text_b else None
    il = _column(header, task.label, path)
    text_a: list[str] = []
    text_b: list[str] | None = [] if ib is not None else None
    labels: list[Any] = []
    malformed = unlabeled = 0
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            malformed += 1
            continue
        label = parse_label(task, row[il], f"{path}:{i}")
        if label is None:
            unlabeled += 1
            continue
        text_a.append(row[ia])
        if text_b is not None:
            text_b.append(row[ib])
        labels.append(label)
    _check_skips(malformed, len(rows) - 1, path)
    return Columns(text_a, text_b, labels, malformed + unlabeled)


def task_folder(task: GlueTask, glue_dir: str | os.PathLike | None) -> Path:
    """``glue_dir/<Task>`` (GLUE's folder name or the config name); clear errors otherwise."""
    hint = ("Set data.glue_dir to the folder that holds the GLUE task folders (e.g. "
            "data.glue_dir=../shared/data/glue), or use data.source=hf on a machine with a "
            "network.")
    if glue_dir is None or not str(glue_dir).strip():
        raise DataNotFoundError(f"GLUE task {task.name!r} with data.source=local needs "
                                f"data.glue_dir, which is not set. {hint}")
    root = Path(str(glue_dir)).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"GLUE folder {root} (data.glue_dir={str(glue_dir)!r}) does "
                                f"not exist. {hint}")
    for name in task.local_dirs:
        if (root / name).is_dir():
            return root / name
    raise DataNotFoundError(
        f"GLUE task {task.name!r}: no folder {' or '.join(task.local_dirs)} under {root} "
        f"(data.glue_dir={str(glue_dir)!r}). {hint}")


def local_split_file(task: GlueTask, glue_dir: str | os.PathLike | None, split: str) -> Path:
    """The file of ``split`` for ``task`` under ``glue_dir``; errors name path and config key."""
    names = task.files.get(split)
    if not names:
        raise ValueError(f"GLUE task {task.name!r} has no local {split!r} split; splits: "
                         f"{sorted(task.files)}")
    folder = task_folder(task, glue_dir)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataNotFoundError(f"GLUE task {task.name!r}, split {split!r}: "
                            f"{' or '.join(str(folder / n) for n in names)} not found "
                            f"(data.glue_dir={str(glue_dir)!r})")


def read_local_split(task: str | GlueTask, glue_dir: str | os.PathLike | None,
                     split: str) -> Columns:
    """Read one split of a task from the local GLUE files (see the module docstring)."""
    task = glue_task(task) if isinstance(task, str) else task
    path = local_split_file(task, glue_dir, split)
    cols = _read_cola(task, path) if task.name == "cola" else _read_with_header(task, path)
    if not len(cols):
        raise ValueError(f"{path}: no usable rows")
    return cols


# ---------------------------------------------------------------------------------------
# Hub
# ---------------------------------------------------------------------------------------
def read_hf_split(task: str | GlueTask, split: str, hf_path: str = HF_GLUE,
                  cache_dir: str | None = None, offline: bool | None = None) -> Columns:
    """One split from ``nyu-mll/glue`` (or a local copy of that repository at ``hf_path``)."""
    import datasets

    task = glue_task(task) if isinstance(task, str) else task
    path = os.path.expanduser(hf_path)
    if os.path.isdir(path):
        ds = datasets.load_dataset(path, task.name, split=split, cache_dir=cache_dir)
    else:
        try:
            require_hub(hf_path, "dataset", f"data.source=hf (data.hf_path={hf_path!r})",
                        "set data.source=local and data.glue_dir=/path/to/glue (the task "
                        "folders as GLUE publishes them; see tasks/text/glue_data.py).",
                        offline=offline)
        except HubUnavailableError as e:
            if not hub_offline():
                raise
            # HF_DATASETS_OFFLINE / HF_HUB_OFFLINE: datasets reads its cache only, at once
            try:
                ds = datasets.load_dataset(hf_path, task.name, split=split, cache_dir=cache_dir)
            except Exception as cache_error:
                raise e from cache_error
        else:
            ds = datasets.load_dataset(hf_path, task.name, split=split, cache_dir=cache_dir)
    a, b = task.hf_columns
    missing = [c for c in (a, b, "label") if c is not None and c not in ds.column_names]
    if missing:
        raise ValueError(f"{hf_path} config {task.name!r} split {split!r} lacks the columns "
                         f"{missing} (has {ds.column_names})")
    labels = ds["label"]
    labels = [float(x) for x in labels] if task.is_regression else [int(x) for x in labels]
    if not task.is_regression and any(not 0 <= x < task.num_labels for x in labels):
        raise ValueError(f"{hf_path} {task.name} {split}: labels outside 0..{task.num_labels - 1}"
                         f" (test splits are unlabeled and cannot be used)")
    return Columns(list(ds[a]), list(ds[b]) if b else None, labels)


# ---------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------
class _GlueCollate:
    """Pads per batch and gives ``labels`` the dtype the loss needs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, regression: bool,
                 pad_to_multiple_of: int | None, keys: Sequence[str]) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of)
        self.regression, self.keys = regression, tuple(keys)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        out = {k: batch[k].long() for k in self.keys if k in batch}
        out["labels"] = torch.as_tensor(batch["labels"],
                                        dtype=torch.float32 if self.regression else torch.long)
        return out


class GLUEDataModule(L.LightningDataModule):
    """One GLUE task for finetuning; see the module docstring for formats and batches.

    Args:
        task: ``"mnli"``, ``"qnli"``, ``"qqp"``, ``"sst2"``, ``"cola"``, ``"stsb"``, ``"mrpc"``,
            ``"rte"`` (GLUE spellings such as ``"SST-2"`` work too).
        source: ``"hf"`` (``nyu-mll/glue``; network or HF cache) or ``"local"`` (``glue_dir``).
        glue_dir: folder with the task folders (``source="local"``).
        tokenizer: as :func:`tasks.text.tokenizer.load_tokenizer` (must match pretraining), or a
            tokenizer object.
        vocab_size / tokenizer_cache_dir: for ``tokenizer="wordpiece"``.
        max_length: tokens per example after truncation (128 in the paper).
        batch_size / eval_batch_size / num_workers / pin_memory: DataLoader settings.
        seed: training order (per epoch, through :func:`tasks.core.data.train_loader`).
        max_train_samples / max_eval_samples: use a fixed subset of this many examples
            (chosen with ``data_seed``; tiny runs and tests).
        holdout: for tuning a recipe without touching the dev set: this many training examples
            (drawn with ``data_seed``, disjoint from the training subset) replace every
            validation split, so that a sweep can be ranked on them and the dev scores stay
            the reported ones. ``None`` (default) validates on the dev split(s).
        hf_path / cache_dir: the Hub repository (or a local copy) and the ``datasets`` cache.
        pad_to_multiple_of: padding granularity.
        token_type_ids: include ``token_type_ids`` in batches.
        offline: ``True`` never contacts the Hub; ``None`` follows ``HF_HUB_OFFLINE``.
    """

    def __init__(
        self,
        task: str,
        source: str = "hf",
        glue_dir: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase = WORDPIECE,
        vocab_size: int = 8192,
        tokenizer_cache_dir: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = True,
        seed: int = 0,
        data_seed: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        hf_path: str = HF_GLUE,
        cache_dir: str | None = None,
        pad_to_multiple_of: int | None = 8,
        token_type_ids: bool = True,
        offline: bool | None = None,
        holdout: int | None = None,
    ) -> None:
        super().__init__()
        self.task = glue_task(task)
        if holdout is not None and holdout < 1:
            raise ValueError(f"data.holdout must be a positive number of examples, got {holdout}")
        self.holdout = holdout
        if source not in ("hf", "local"):
            raise ValueError(f"data.source must be 'hf' or 'local', got {source!r}")
        if max_length < 3:
            raise ValueError(f"data.max_length must be at least 3, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.source, self.glue_dir = source, glue_dir
        self.tokenizer_spec, self.vocab_size_wordpiece = tokenizer, vocab_size
        self.tokenizer_cache_dir = tokenizer_cache_dir
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.seed, self.data_seed = seed, data_seed
        self.max_train_samples, self.max_eval_samples = max_train_samples, max_eval_samples
        self.hf_path, self.cache_dir, self.offline = hf_path, cache_dir, offline
        self.pad_to_multiple_of = pad_to_multiple_of
        self.keys = ("input_ids", "attention_mask") + (("token_type_ids",)
                                                       if token_type_ids else ())
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Any] = {}
        self.stats: dict[str, dict[str, int]] = {}

    # -- task facts the LightningModule needs --------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec, self.vocab_size_wordpiece,
                                             self.tokenizer_cache_dir, self.offline)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def num_labels(self) -> int:
        """Classifier outputs: 3 for MNLI, 1 for STS-B (regression), else 2."""
        return self.task.num_labels

    @property
    def is_regression(self) -> bool:
        return self.task.is_regression

    @property
    def val_split_names(self) -> tuple[str, ...]:
        """Names of the validation loaders in ``val_dataloader()`` order."""
        return ("holdout",) if self.holdout is not None else self.task.eval_splits

    # -- reading ---------------------------------------------------------------------------
    def read_split(self, split: str) -> Columns:
        if self.source == "local":
            return read_local_split(self.task, self.glue_dir, split)
        return read_hf_split(self.task, split, self.hf_path, self.cache_dir, self.offline)

    def prepare_data(self) -> None:
        _ = self.tokenizer
        needed = ("train",) if self.holdout is not None else ("train", *self.task.eval_splits)
        if self.source == "local":  # fail early, naming the missing file
            for split in needed:
                local_split_file(self.task, self.glue_dir, split)
        else:
            for split in needed:
                self.read_split(split)  # downloads into the HF cache once, on rank 0

    @staticmethod
    def _take(cols: Columns, idx: np.ndarray) -> Columns:
        return Columns([cols.text_a[i] for i in idx],
                       [cols.text_b[i] for i in idx] if cols.text_b is not None else None,
                       [cols.labels[i] for i in idx], cols.skipped)

    def _subset(self, cols: Columns, limit: int | None) -> Columns:
        if limit is None or limit >= len(cols):
            return cols
        idx = np.sort(np.random.default_rng(self.data_seed).permutation(len(cols))[:limit])
        return self._take(cols, idx)

    def encode(self, cols: Columns):
        """Tokenize a split into an in-memory ``datasets.Dataset`` (Arrow: compact for MNLI's
        393k pairs) with the tokenizer's columns and ``labels``."""
        import datasets

        data = {"text_a": cols.text_a, "labels": cols.labels}
        if cols.text_b is not None:
            data["text_b"] = cols.text_b
        ds = datasets.Dataset.from_dict(data)
        tok, max_length, pair = self.tokenizer, self.max_length, cols.text_b is not None

        def tokenize(batch: dict[str, list]) -> dict[str, list]:
            return tok(batch["text_a"], batch["text_b"] if pair else None, truncation=True,
                       max_length=max_length)

        # keep_in_memory + an explicit fingerprint: no cache files, no hashing of the tokenizer
        return ds.map(tokenize, batched=True, batch_size=1000,
                      remove_columns=[c for c in ("text_a", "text_b") if c in data],
                      keep_in_memory=True, new_fingerprint=f"glue-{self.task.name}-{len(ds)}")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = ["train", *self.task.eval_splits]
        if self.source == "local" and "test" in self.task.files:
            try:
                local_split_file(self.task, self.glue_dir, "test")
                splits.append("test")
            except DataNotFoundError:
                pass
        for split in splits:
            if self.holdout is not None and split in self.task.eval_splits:
                continue  # the dev split is not read while tuning
            cols = self.read_split(split)
            if split == "train" and self.holdout is not None:
                train, held = self._split_holdout(cols)
                for name, part in (("train", train), ("holdout", held)):
                    self.stats[name] = {"rows": len(cols), "skipped": cols.skipped,
                                        "used": len(part)}
                    self.datasets[name] = self.encode(part)
                continue
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            used = self._subset(cols, limit)
            self.stats[split] = {"rows": len(cols), "skipped": cols.skipped, "used": len(used)}
            self.datasets[split] = self.encode(used)

    def _split_holdout(self, cols: Columns) -> tuple[Columns, Columns]:
        """(training subset, held-out examples): disjoint, both drawn with ``data_seed``."""
        n = len(cols)
        if self.holdout >= n:
            raise ValueError(f"data.holdout={self.holdout} leaves no training examples of "
                             f"{self.task.name} ({n} rows)")
        perm = np.random.default_rng(self.data_seed).permutation(n)
        held, rest = np.sort(perm[:self.holdout]), perm[self.holdout:]
        if self.max_train_samples is not None:
            rest = rest[:self.max_train_samples]
        return self._take(cols, np.sort(rest)), self._take(cols, held)

    # -- loaders ---------------------------------------------------------------------------
    def _collate(self) -> _GlueCollate:
        return _GlueCollate(self.tokenizer, self.is_regression, self.pad_to_multiple_of,
                            self.keys)

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        if split not in self.datasets:
            raise RuntimeError(f"GLUE task {self.task.name!r} ({self.source}) has no {split!r} "
                               f"split here; splits: {sorted(self.datasets)}")
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if train:
            # the framework's loader: the order of epoch e is drawn from (seed, e) (Lightning
            # sets the epoch), a mid-epoch checkpoint resumes exactly, DDP shards by rank
            return train_loader(self.datasets[split], batch_size=self.batch_size,
                                seed=self.seed, shuffle=True, collate_fn=self._collate(),
                                num_workers=self.num_workers, pin_memory=self.pin_memory)
        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collate(), num_workers=self.num_workers,
                          pin_memory=self.pin_memory and torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if self.holdout is not None:
            return self._loader("holdout", False)
        loaders = [self._loader(s, False) for s in self.task.eval_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader:
        """Only MRPC's labelled MSRP test file (local); GLUE's test labels are hidden."""
        return self._loader("test", False)
