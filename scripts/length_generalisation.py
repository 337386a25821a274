#!/usr/bin/env python
"""Issue 8 §8 (beyond the paper): masked-LM loss and accuracy against the evaluation length.

    python scripts/length_generalisation.py --runs results/runs/table1/tiny --preset tiny
    python scripts/length_generalisation.py --checkpoint dag=<run>/hf --checkpoint bert=<run>/hf

Why: Chimera has no position embeddings (its only notion of order is the line DAG the mixer
runs over), so an encoder pretrained on rows of ``L0`` tokens can be run on rows of any length.
The paper argues this in its introduction but never measures it. This script measures it: the
pretrained MLMs of Table 1 (BERT-Base, Chimera-UG, Chimera-DAG) are scored on the *held-out*
documents of the pretraining corpus, packed into rows of ``L0 x {1, 2, 4, 8, 16}`` tokens.

What is held fixed across lengths, so that only the length changes:

- the text: the validation documents of the run (``tasks.text.mlm_data.split_documents`` with
  the run's ``data_seed`` and the data module's default ``val_docs``; never training text),
  tokenized once and packed as the data module packs (``pack_documents``: documents joined with
  ``[SEP]``, rows ``[CLS] piece [SEP]``);
- the number of evaluated tokens: ``--tokens`` (default 65,536) rounded down to what the held-out
  text gives at the longest length, so every length runs the same number of row tokens
  (``tokens / L`` rows); the shorter lengths read a prefix of the same token stream;
- the masks: the data module's validation masking (HF's ``DataCollatorForLanguageModeling``
  at 0.15, 80/10/10, seeded), but drawn once over the whole token stream before it is cut into
  rows, so every model at every length predicts the same masked tokens with the same
  replacements; only the masked tokens of the stream prefix that every length covers are
  scored (the rest is context). A length then changes only the context of a row (and where
  rows break), not the draw of the masks: drawing masks per length moved the tiny models'
  accuracy by up to 1.6 points between neighbouring lengths.

BERT has learned position embeddings: it is evaluated only up to ``max_position_embeddings``;
longer lengths are written as not applicable. Its table may be longer than the pretraining
length (the tiny BERT has 128 rows, trained on 64-token rows); the rows in between were never
trained, and the notes say so.

Outputs (``--out``, default ``results/length_generalisation/<preset>``):
``length_generalisation.csv`` (one row per model and length), ``length_generalisation.md``
(loss and accuracy tables, rows = models, columns = lengths, plus notes),
``length_generalisation.png`` (loss and accuracy against length, log2 x axis) and
``run_info.json`` (text, token counts, wall time).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.text.hub import DataNotFoundError  # noqa: E402

#: the three pretrained models of Table 1, as ``make reproduce-table1`` names their folders
RUN_MODELS = ("bert_base", "chimera_ug", "chimera_dag")
LABELS = {"bert_base": "BERT-Base", "chimera_ug": "Chimera-UG", "chimera_dag": "Chimera-DAG"}
#: pretraining length and corpus of each preset, used when a run does not record them
PRESETS = {"tiny": {"train_length": 64, "source": "embedded"},
           "paper": {"train_length": 128, "source": "c4"}}
MULTIPLES = (1, 2, 4, 8, 16)
FILES = ("length_generalisation.csv", "length_generalisation.md", "length_generalisation.png")


@dataclass
class Checkpoint:
    """One model to evaluate: its name, its ``save_pretrained`` folder and what its run says."""

    name: str
    path: Path
    run_data: dict[str, Any] = field(default_factory=dict)  # the run's ``data`` config, if any

    @property
    def label(self) -> str:
        return LABELS.get(self.name, self.name)


# ---------------------------------------------------------------------------------------
# finding and loading checkpoints
# ---------------------------------------------------------------------------------------
def _run_data_config(path: Path) -> dict[str, Any]:
    """The ``data`` node of the run that wrote ``path`` (``<run>/hf`` -> ``<run>/metrics.json``),
    so that the held-out split and the training length are the run's own, not guessed."""
    for candidate in (path.parent / "metrics.json", path / "metrics.json"):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text()).get("config", {})
            except (OSError, ValueError):
                return {}
            data = cfg.get("data") if isinstance(cfg, dict) else None
            return dict(data) if isinstance(data, dict) else {}
    return {}


def find_checkpoints(runs: str | os.PathLike | None, pairs: Sequence[str] = (),
                     seed: int = 0) -> list[Checkpoint]:
    """The checkpoints named by ``--runs`` (``<runs>/<model>/seed<k>/hf`` for the three Table 1
    models) and by ``--checkpoint name=path`` pairs; any missing path is an error naming it."""
    found: list[Checkpoint] = []
    missing: list[str] = []
    if runs is not None:
        root = Path(runs).expanduser()
        for name in RUN_MODELS:
            p = root / name / f"seed{seed}" / "hf"
            if (p / "config.json").is_file():
                found.append(Checkpoint(name, p))
            else:
                missing.append(f"{name}: {p}")
        if missing:
            raise DataNotFoundError(
                f"--runs {str(runs)!r}: no pretrained model at\n  " + "\n  ".join(missing)
                + "\n(expected <runs>/<model>/seed<k>/hf/config.json as make reproduce-table1 "
                "writes them; or give --checkpoint name=path for each model)")
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--checkpoint {pair!r}: expected name=path")
        p = Path(path.strip()).expanduser()
        if not p.is_dir() or not (p / "config.json").is_file():
            what = "does not exist" if not p.exists() else "has no config.json"
            raise DataNotFoundError(
                f"--checkpoint {name.strip()}={path.strip()}: {p} {what} (give a pretraining "
                f"run's hf/ folder, e.g. results/runs/table1/tiny/chimera_dag/seed0/hf)")
        found = [c for c in found if c.name != name.strip()]
        found.append(Checkpoint(name.strip(), p))
    if not found:
        raise ValueError("nothing to evaluate: give --runs <folder> or --checkpoint name=path")
    for c in found:
        c.run_data = _run_data_config(c.path)
    return found


def load_model(ckpt: Checkpoint) -> torch.nn.Module:
    """The MLM of a ``save_pretrained`` folder, through the Auto classes (importing
    ``chimera.models.hf`` registers Chimera's), in eval mode (no dropout)."""
    from transformers import AutoModelForMaskedLM

    import chimera.models.hf  # noqa: F401  (registers model_type chimera_text)

    try:
        model = AutoModelForMaskedLM.from_pretrained(str(ckpt.path))
    except (OSError, ValueError) as e:
        raise DataNotFoundError(f"checkpoint {ckpt.name}={ckpt.path}: cannot load it as a "
                                f"masked LM ({e})") from e
    return model.eval()


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest row the model can take: BERT's position table, ``None`` (any) for Chimera."""
    config = model.config
    if getattr(config, "model_type", None) == "bert":
        return int(config.max_position_embeddings)
    return getattr(config, "max_position_embeddings", None)


def load_shared_tokenizer(checkpoints: Sequence[Checkpoint], fallback: str, vocab_size: int):
    """The tokenizer saved with the checkpoints (all must agree: the models are compared on
    the same ids); ``fallback`` (``tasks.text.tokenizer.load_tokenizer`` spec) when none is."""
    from tasks.text.tokenizer import load_tokenizer

    tok, source = None, None
    for c in checkpoints:
        if not (c.path / "tokenizer.json").is_file() and not (c.path / "vocab.txt").is_file():
            continue
        t = load_tokenizer(str(c.path), config_key=f"tokenizer of {c.name}")
        if tok is None:
            tok, source = t, c.name
        elif t.get_vocab() != tok.get_vocab():
            raise ValueError(f"the tokenizers of {source} and {c.name} differ; the models must "
                             f"share one vocabulary to be scored on the same text")
    if tok is None:
        tok = load_tokenizer(fallback, vocab_size, config_key="--tokenizer")
    return tok


# ---------------------------------------------------------------------------------------
# held-out text
# ---------------------------------------------------------------------------------------
def held_out_documents(source: str, data_seed: int = 0, val_docs: float | int | None = None,
                       data_files: Sequence[str] = (), val_files: Sequence[str] = (),
                       tokens_hint: int = 0, tokenizer: Any = None) -> list[str]:
    """The validation documents of the pretraining data, as ``MLMDataModule`` holds them out.

    ``embedded`` / ``files`` without ``val_files``: ``split_documents(docs, val_docs,
    data_seed)``, the documents no training row was cut from; ``files`` with ``val_files``:
    those files; ``c4``: the official validation files, streamed until ``tokens_hint`` tokens.
    """
    from tasks.text import mlm_data
    from tasks.text.tokenizer import load_embedded_corpus

    if val_docs is None:  # the data module's own default
        import inspect

        val_docs = inspect.signature(mlm_data.MLMDataModule).parameters["val_docs"].default
    if source == "embedded":
        _, held = mlm_data.split_documents(list(load_embedded_corpus()), val_docs, data_seed)
        return held
    if source == "files":
        if val_files:
            vf = mlm_data.resolve_files(list(val_files), "--val-files")
            return mlm_data.read_documents(vf, mlm_data.file_format(vf), "text", "line",
                                           "--val-files")
        tf = mlm_data.resolve_files(list(data_files), "--data-files")
        docs = mlm_data.read_documents(tf, mlm_data.file_format(tf), "text", "line",
                                       "--data-files")
        return mlm_data.split_documents(docs, val_docs, data_seed)[1]
    if source == "c4":
        dm = mlm_data.MLMDataModule(source="c4", tokenizer=tokenizer)
        _, val, text_field = dm._streams()
        docs, n = [], 0
        for ex in val:
            docs.append(ex[text_field])
            n += len(ex[text_field].split()) * 1.3  # ~WordPiece tokens per word
            if n >= tokens_hint * 1.2:
                break
        return docs
    raise ValueError(f"--source must be embedded, files or c4, got {source!r}")


def token_budget(stream_len: int, lengths: Sequence[int], requested: int,
                 ) -> tuple[int, int, dict[int, int]]:
    """``(row_tokens, scored, available)``: the row tokens evaluated at every length (the largest
    multiple of every length that is at most ``requested`` and that the stream fills at each
    length), the stream prefix whose masked tokens are scored (the part every length covers),
    and the rows the stream gives at each length."""
    available = {L: stream_len // (L - 2) for L in lengths}  # as pack_documents
    step = math.lcm(*lengths)
    tokens = min(requested, *(available[L] * L for L in lengths)) // step * step
    if tokens == 0:
        raise ValueError(f"the held-out text gives {available} rows at lengths {list(lengths)}: "
                         f"not one row at every length (lower --lengths or give more text)")
    scored = min((tokens // L) * (L - 2) for L in lengths)
    return tokens, scored, available


def mask_stream(stream: Sequence[int], tokenizer: Any, mlm_probability: float,
                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of the whole stream masked once by HF's
    ``DataCollatorForLanguageModeling`` (80/10/10, seeded; ``[SEP]`` never masked), as the data
    module masks its validation rows. Masking the stream, not the rows of each length, gives
    every length the same masked tokens with the same replacements: the lengths differ only in
    the context a row gives, not in the draw of the masks (a per-length draw moved the tiny
    models' accuracy by up to 1.6 points between neighbouring lengths)."""
    from transformers import DataCollatorForLanguageModeling

    special = set(tokenizer.all_special_ids)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                               seed=seed)
    batch = collator([{"input_ids": list(stream),
                       "special_tokens_mask": [int(t in special) for t in stream]}])
    return batch["input_ids"][0].long(), batch["labels"][0].long()


def masked_rows(ids: torch.Tensor, labels: torch.Tensor, length: int, rows: int, scored: int,
                tokenizer: Any) -> dict[str, torch.Tensor]:
    """The first ``rows`` rows ``[CLS] piece [SEP]`` of ``length`` tokens cut from the masked
    stream; only masked tokens within the first ``scored`` stream tokens keep their labels (the
    rest is context), so every length scores exactly the same tokens."""
    body = length - 2
    n = rows * body
    lab = labels[:n].clone()
    lab[scored:] = -100
    cls = torch.full((rows, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((rows, 1), tokenizer.sep_token_id, dtype=torch.long)
    ignore = torch.full((rows, 1), -100, dtype=torch.long)
    input_ids = torch.cat([cls, ids[:n].view(rows, body), sep], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": torch.cat([ignore, lab.view(rows, body), ignore], dim=1)}


# ---------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: torch.nn.Module, columns: dict[str, torch.Tensor],
             batch_tokens: int = 8192) -> dict[str, float]:
    """Token-weighted masked-LM cross-entropy and accuracy over the masked positions (the
    training module's ``val/mlm_loss`` and ``val/masked_acc``; the vocabulary projection runs
    only at the masked positions, as ``MaskedLM.masked_logits`` does)."""
    from tasks.text.module import MaskedLM

    n_rows, length = columns["input_ids"].shape
    per = max(1, batch_tokens // length)
    loss_sum, correct, count = 0.0, 0, 0
    for i in range(0, n_rows, per):
        batch = {k: v[i:i + per] for k, v in columns.items()}
        logits, labels = MaskedLM.masked_logits(model, batch)
        if labels.numel() == 0:
            continue
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels,
                                                            reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    return {"mlm_loss": loss_sum / max(count, 1), "masked_acc": correct / max(count, 1),
            "masked_tokens": count}


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int) -> str:
    return "n/a" if v is None or v == "" else f"{float(v):.{digits}f}"


def markdown(results: list[dict[str, Any]], lengths: Sequence[int], notes: Sequence[str]) -> str:
    """Two tables (MLM loss, masked accuracy), rows = models, columns = lengths, and notes."""
    models = list(dict.fromkeys(r["label"] for r in results))
    cell = {(r["label"], r["length"]): r for r in results}
    head = "| model | " + " | ".join(f"L = {L}" for L in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    out = []
    for title, key, digits in (("MLM cross-entropy (nats, lower is better)", "mlm_loss", 3),
                               ("Masked accuracy (%)", "masked_acc", 1)):
        out += [f"**{title}**", "", head, rule]
        for m in models:
            vals = []
            for L in lengths:
                v = cell[(m, L)][key]
                vals.append(_fmt(None if v is None else (100 * v if key == "masked_acc" else v),
                                 digits))
            out.append(f"| {m} | " + " | ".join(vals) + " |")
        out.append("")
    out += [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def plot(results: list[dict[str, Any]], lengths: Sequence[int], train_length: int,
         path: Path) -> None:
    """Loss and accuracy against length (log2 x axis), one line per model; the pretraining
    length is marked, so extrapolation reads as everything to its right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    models = list(dict.fromkeys(r["label"] for r in results))
    for ax, key, ylabel in ((axes[0], "mlm_loss", "MLM cross-entropy (nats)"),
                            (axes[1], "masked_acc", "masked accuracy (%)")):
        for m in models:
            mine = [r for r in results if r["label"] == m]
            pts = [(r["length"], r[key]) for r in mine if r[key] is not None]
            label = m
            if any(r[key] is None for r in mine):  # cut off by a position table
                label += f" (positions <= {mine[0]['max_positions']})"
            if pts:
                xs, ys = zip(*pts, strict=True)
                ys = [100 * y for y in ys] if key == "masked_acc" else list(ys)
                ax.plot(xs, ys, marker="o", label=label)
        ax.axvline(train_length, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(lengths), [str(L) for L in lengths])
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Held-out MLM vs evaluation length (pretrained at {train_length}, dotted)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", help="a Table 1 runs folder: <runs>/{bert_base,chimera_ug,"
                                  "chimera_dag}/seed<k>/hf")
    p.add_argument("--seed", type=int, default=0, help="which seed<k> of --runs (default 0)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a save_pretrained MLM folder (repeatable; replaces a --runs model "
                        "of the same name)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="defaults for the training length and the corpus when the runs do "
                        "not record them, and the output folder")
    p.add_argument("--lengths", help="comma-separated evaluation lengths (default: the "
                                     "training length x 1,2,4,8,16)")
    p.add_argument("--train-length", type=int, help="pretraining row length (default: the "
                                                    "runs' data.max_length, else the preset's)")
    p.add_argument("--tokens", type=int, default=65_536,
                   help="row tokens evaluated at every length (capped by the held-out text)")
    p.add_argument("--source", choices=("embedded", "files", "c4"),
                   help="held-out text (default: the runs' data.source, else the preset's)")
    p.add_argument("--data-files", nargs="*", default=[], help="--source files: the "
                                                               "pretraining files")
    p.add_argument("--val-files", nargs="*", default=[], help="--source files: held-out files")
    p.add_argument("--data-seed", type=int, help="document split seed (default: the runs')")
    p.add_argument("--mask-seed", type=int, default=0, help="seed of the masks (default 0)")
    p.add_argument("--mlm-probability", type=float, default=0.15)
    p.add_argument("--tokenizer", default="wordpiece",
                   help="only when the checkpoints carry no tokenizer")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per forward")
    p.add_argument("--out", help="output folder (default results/length_generalisation/"
                                 "<preset>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p.parse_args(argv)


def _agreed(checkpoints: Sequence[Checkpoint], key: str, default: Any) -> Any:
    """A data setting all runs agree on (they must: one text for all models), else default."""
    vals = {json.dumps(c.run_data[key]) for c in checkpoints if key in c.run_data}
    if len(vals) > 1:
        raise ValueError(f"the runs disagree on data.{key} ({sorted(vals)}); give it explicitly")
    return json.loads(vals.pop()) if vals else default


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate every checkpoint at every length; write CSV, markdown, plot; print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    checkpoints = find_checkpoints(args.runs, args.checkpoint, args.seed)
    preset = PRESETS[args.preset]
    train_length = args.train_length or _agreed(checkpoints, "max_length",
                                                preset["train_length"])
    source = args.source or _agreed(checkpoints, "source", preset["source"])
    if args.data_files or args.val_files:
        source = args.source or "files"
    data_seed = args.data_seed if args.data_seed is not None else _agreed(
        checkpoints, "data_seed", 0)
    lengths = ([int(x) for x in args.lengths.split(",") if x.strip()] if args.lengths
               else [train_length * m for m in MULTIPLES])
    if not lengths or min(lengths) < 3:
        raise ValueError(f"--lengths must be integers >= 3, got {args.lengths!r}")
    lengths = sorted(set(lengths))
    out = Path(args.out or ROOT / "results" / "length_generalisation" / args.preset)

    tokenizer = load_shared_tokenizer(checkpoints, args.tokenizer, args.vocab_size)
    docs = held_out_documents(source, data_seed, None, args.data_files, args.val_files,
                              args.tokens, tokenizer)
    from tasks.text.mlm_data import document_token_ids, token_stream

    # the stream pack_documents cuts into rows: row i at length L holds stream tokens
    # i (L-2) ... (i+1) (L-2) - 1 between its [CLS] and [SEP]
    doc_ids = document_token_ids(docs, tokenizer)
    text_tokens = sum(map(len, doc_ids))
    stream = token_stream(doc_ids, tokenizer.sep_token_id)
    tokens, scored, available = token_budget(len(stream), lengths, args.tokens)
    ids, labels = mask_stream(stream, tokenizer, args.mlm_probability, args.mask_seed)
    n_scored = int((labels[:scored] != -100).sum())
    print(f"held-out text: {len(docs)} documents, {text_tokens:,} tokens ({source}, data_seed "
          f"{data_seed}); {tokens:,} row tokens per length"
          + (f" (asked {args.tokens:,}: the held-out text is shorter)"
             if tokens < args.tokens else ""), flush=True)

    models = {c.name: load_model(c) for c in checkpoints}
    results: list[dict[str, Any]] = []
    for L in lengths:
        rows = tokens // L
        columns = masked_rows(ids, labels, L, rows, scored, tokenizer)
        for c in checkpoints:
            model = models[c.name]
            limit = max_positions(model)
            row: dict[str, Any] = {"model": c.name, "label": c.label, "length": L, "rows": rows,
                                   "tokens": rows * L, "max_positions": limit or ""}
            if limit is not None and L > limit:
                row.update(mlm_loss=None, masked_acc=None, masked_tokens=0, seconds=0.0,
                           status=f"n/a (position table of {limit})")
            else:
                t = time.perf_counter()
                row.update(evaluate(model, columns, args.batch_tokens))
                row.update(seconds=round(time.perf_counter() - t, 2), status="ok")
            results.append(row)
            loss = _fmt(row["mlm_loss"], 3)
            acc = ("n/a" if row["masked_acc"] is None
                   else f"{100 * row['masked_acc']:.1f}%")
            print(f"  L={L:5d} {c.label:12s} rows {rows:5d}  loss {loss}  acc {acc}  "
                  f"({row['status']}, {row['seconds']} s)", flush=True)

    notes = [f"Held-out text: the {len(docs):,} validation documents of the pretraining corpus "
             f"({source}, data_seed {data_seed}; {text_tokens:,} tokens), packed as in "
             f"pretraining; {tokens:,} row tokens at every length (L x rows: "
             + ", ".join(f"{L} x {tokens // L}" for L in lengths) + ")"
             + (f"; {args.tokens:,} were asked for, the held-out text gives fewer at the "
                f"longest length" if tokens < args.tokens else "") + ".",
             f"Masking {args.mlm_probability} (80/10/10, HF's collator, seed {args.mask_seed}) "
             f"drawn once over the token stream: every model and every length scores the same "
             f"{n_scored:,} masked tokens (those among the first {scored:,} stream tokens, "
             f"which every length covers); a longer row only gives them more context.",
             f"Pretraining length {train_length}."]
    for c in checkpoints:
        limit = max_positions(models[c.name])
        if limit is None:
            continue
        note = f"{c.label} has learned position embeddings ({limit} rows): lengths above " \
               f"{limit} are not applicable (n/a)"
        if limit > train_length:
            note += (f"; rows {train_length}-{limit - 1} of its table were never trained "
                     f"(pretraining rows have {train_length} tokens), so its scores at "
                     f"lengths above {train_length} use untrained position vectors")
        notes.append(note + ".")
    wall = time.perf_counter() - t0
    notes.append(f"Wall time {wall:.0f} s on {args.threads} thread(s).")

    out.mkdir(parents=True, exist_ok=True)
    keys = ["model", "label", "length", "rows", "tokens", "masked_tokens", "mlm_loss",
            "masked_acc", "max_positions", "status", "seconds"]
    with open(out / FILES[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    md = markdown(results, lengths, notes)
    (out / FILES[1]).write_text(md)
    plot(results, lengths, train_length, out / FILES[2])
    info = {"checkpoints": {c.name: str(c.path) for c in checkpoints}, "source": source,
            "data_seed": data_seed, "documents": len(docs), "text_tokens": text_tokens,
            "tokens_per_length": tokens, "tokens_requested": args.tokens,
            "scored_stream_tokens": scored, "scored_masked_tokens": n_scored,
            "rows_available": {str(k): v for k, v in available.items()},
            "lengths": lengths, "train_length": train_length, "mask_seed": args.mask_seed,
            "mlm_probability": args.mlm_probability, "threads": args.threads,
            "wall_s": round(wall, 1)}
    (out / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print()
    print(md)
    print(f"wrote {', '.join(str(out / f) for f in FILES)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
