"""scripts/length_generalisation.py on tiny random models and a synthetic corpus: outputs written,
equal row tokens and the same scored tokens at every length, BERT n/a beyond its position table,
rows cut as the data module packs them, and a missing checkpoint named in the error."""

from __future__ import annotations

import csv
import importlib.util
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(40)]


def _script():
    spec = importlib.util.spec_from_file_location("length_generalisation",
                                                  ROOT / "scripts" / "length_generalisation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # the script's dataclass looks its module up
    spec.loader.exec_module(mod)
    return mod


def _tokenizer(tmp_path: Path):
    from tasks.text.tokenizer import tokenizer_from_vocab

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return tokenizer_from_vocab(vocab)


def _corpus(tmp_path: Path, docs: int = 60) -> Path:
    rng = random.Random(0)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
                              for _ in range(docs)) + "\n")
    return path


def _save_models(tmp_path: Path, tok, bert_positions: int = 16) -> Path:
    """``<runs>/{bert_base,chimera_ug,chimera_dag}/seed0/hf`` with random tiny MLMs."""
    from transformers import BertConfig, BertForMaskedLM

    from chimera.models.hf import ChimeraTextConfig, ChimeraTextForMaskedLM

    torch.manual_seed(0)
    runs = tmp_path / "runs"
    vocab = len(tok)
    models = {
        "bert_base": BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=bert_positions)),
        **{f"chimera_{v}": ChimeraTextForMaskedLM(ChimeraTextConfig(
            vocab_size=vocab, hidden_size=16, num_hidden_layers=1, variant=v, d_state=4,
            headdim=8, expand=2, d_conv=3)) for v in ("ug", "dag")},
    }
    for name, model in models.items():
        out = runs / name / "seed0" / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return runs


def test_writes_tables_equal_tokens_and_bert_na(tmp_path):
    mod = _script()
    tok = _tokenizer(tmp_path)
    runs = _save_models(tmp_path, tok, bert_positions=16)
    out = tmp_path / "out"
    assert mod.main(["--runs", str(runs), "--val-files", str(_corpus(tmp_path)),
                     "--lengths", "8,32", "--train-length", "8", "--tokens", "256",
                     "--out", str(out), "--threads", "1"]) == 0
    for f in mod.FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    rows = list(csv.DictReader(open(out / "length_generalisation.csv")))
    assert [(r["model"], int(r["length"])) for r in rows] == [
        (m, L) for L in (8, 32) for m in ("bert_base", "chimera_ug", "chimera_dag")]
    assert {int(r["tokens"]) for r in rows} == {256}  # equal row tokens at every length
    assert {int(r["length"]) * int(r["rows"]) for r in rows} == {256}
    ok = [r for r in rows if r["status"] == "ok"]
    # the masks are drawn over the stream: every model and length scores the same tokens
    assert len({int(r["masked_tokens"]) for r in ok}) == 1 and int(ok[0]["masked_tokens"]) > 0
    assert all(0 < float(r["mlm_loss"]) < 10 and 0 <= float(r["masked_acc"]) <= 1 for r in ok)
    bert32 = next(r for r in rows if r["model"] == "bert_base" and r["length"] == "32")
    assert bert32["status"].startswith("n/a") and bert32["mlm_loss"] == ""
    assert {r["model"] for r in ok if r["length"] == "32"} == {"chimera_ug", "chimera_dag"}
    md = (out / "length_generalisation.md").read_text()
    assert "| BERT-Base | " in md and "n/a" in md
    assert "position embeddings (16 rows)" in md
    assert "rows 8-15 of its table were never trained" in md


def test_rows_are_the_data_modules_packing(tmp_path):
    from tasks.text.mlm_data import document_token_ids, pack_documents, token_stream

    mod = _script()
    tok = _tokenizer(tmp_path)
    docs = _corpus(tmp_path, docs=20).read_text().splitlines()
    doc_ids = document_token_ids(docs, tok)
    stream = token_stream(doc_ids, tok.sep_token_id)
    for L in (8, 16):
        packed = pack_documents(doc_ids, L, tok.cls_token_id, tok.sep_token_id)
        ids = torch.tensor(stream)
        cols = mod.masked_rows(ids, torch.full_like(ids, -100), L, len(packed), len(stream), tok)
        assert cols["input_ids"].tolist() == packed
    tokens, scored, available = mod.token_budget(len(stream), [8, 16], 10**9)
    assert tokens % 16 == 0 and all(tokens // L <= available[L] for L in (8, 16))
    assert scored == min((tokens // L) * (L - 2) for L in (8, 16))


def test_missing_checkpoint_is_named(tmp_path):
    mod = _script()
    missing = tmp_path / "nowhere" / "hf"
    with pytest.raises(FileNotFoundError, match="chimera_dag=.*nowhere"):
        mod.main(["--checkpoint", f"chimera_dag={missing}", "--out", str(tmp_path / "o")])
    (tmp_path / "runs" / "bert_base" / "seed0" / "hf").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="chimera_ug"):
        mod.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "o")])
