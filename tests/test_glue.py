"""GLUE data and metrics: the real task files (row counts of the data README), readers of the
official GLUE TSV formats on generated files (MNLI, QNLI, QQP and format variants), the Hub path
on a local copy of the repository layout, batches, error messages, metrics and the GLUE score."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.text.glue_data import GLUE_TASKS, GLUEDataModule, glue_task, read_local_split
from tasks.text.glue_metrics import (
    GLUE_METRICS,
    M2_RELEASE_SCORE_METRICS,
    glue_metric_collection,
    glue_metric_collections,
    glue_predictions,
    glue_score,
)
from tasks.text.hub import DataNotFoundError, HubUnavailableError
from tasks.text.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHIMERA_SHARED_DATA", REPO.parent / "shared" / "data"))
GLUE_DIR = SHARED / "glue"
needs_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(),
    reason=f"real GLUE files not found at {GLUE_DIR} (set CHIMERA_SHARED_DATA to the folder "
           f"that holds glue/)")


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    # the same cache folder as test_text_data.py: the vocabulary is trained once per session
    return load_tokenizer("wordpiece", 8192, tmp_path_factory.getbasetemp() / "chimera-tokenizers")


def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join("\t".join(r) for r in rows) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


# ---------------------------------------------------------------------------------------
# the real files
# ---------------------------------------------------------------------------------------
@needs_glue
@pytest.mark.parametrize("task, split, rows, skipped", [
    ("cola", "train", 8551, 0), ("cola", "validation", 516, 0),
    ("sst2", "train", 67349, 0), ("sst2", "validation", 872, 0),
    ("rte", "train", 2490, 0), ("rte", "validation", 277, 0),
    ("stsb", "train", 5749, 0), ("stsb", "validation", 1500, 0),
    # MSRP train: 3,674 pairs plus one line that fuses two pairs (no newline between them),
    # skipped; the README's "~3,668" is GLUE's own train split of MSRP, a different cut
    ("mrpc", "train", 3674, 1), ("mrpc", "validation", 400, 0), ("mrpc", "test", 1725, 0),
])
def test_real_glue_row_counts(task, split, rows, skipped):
    cols = read_local_split(task, GLUE_DIR, split)
    assert len(cols) == rows and cols.skipped == skipped
    assert len(cols.text_a) == rows and all(isinstance(t, str) and t for t in cols.text_a)
    t = glue_task(task)
    assert (cols.text_b is None) == (t.hf_columns[1] is None)
    if t.is_regression:
        assert all(isinstance(x, float) and 0 <= x <= 5 for x in cols.labels)
        assert len(set(cols.labels)) > 50
    else:
        assert set(cols.labels) == {0, 1}


@needs_glue
def test_real_glue_labels_follow_the_hub_ids():
    # RTE here stores ids (0 = entailment); the first dev pair is not entailed
    rte = read_local_split("rte", GLUE_DIR, "validation")
    assert rte.text_b[0] == "Christopher Reeve had an accident." and rte.labels[0] == 1
    mrpc = read_local_split("mrpc", GLUE_DIR, "train")
    assert mrpc.text_a[0].startswith("The giant rock") and mrpc.labels[0] == 0
    assert not mrpc.text_a[0].startswith("\ufeff")
    sst = read_local_split("sst2", GLUE_DIR, "validation")
    assert sst.text_a[0].startswith("it 's a charming") and sst.labels[0] == 1
    stsb = read_local_split("stsb", GLUE_DIR, "train")
    assert stsb.text_a[0] == "A plane is taking off." and stsb.labels[0] == 5.0


@needs_glue
def test_real_rte_batches(tokenizer):
    dm = GLUEDataModule("RTE", source="local", glue_dir=str(GLUE_DIR), tokenizer=tokenizer,
                        batch_size=8, max_train_samples=64, max_eval_samples=24)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.stats["train"] == {"rows": 2490, "skipped": 0, "used": 64}
    assert dm.num_labels == 2 and not dm.is_regression and dm.val_split_names == ("validation",)
    b = next(iter(dm.train_dataloader()))
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    L = b["input_ids"].shape[1]
    assert b["input_ids"].shape == (8, L) and L <= 128 and L % 8 == 0
    assert b["labels"].dtype == torch.long and b["labels"].shape == (8,)
    assert (b["input_ids"][:, 0] == tokenizer.cls_token_id).all()
    assert (b["token_type_ids"] == 1).any()  # the hypothesis is segment 1
    val = list(dm.val_dataloader())
    assert sum(len(v["labels"]) for v in val) == 24
    with pytest.raises(RuntimeError, match="no 'test' split"):
        dm.test_dataloader()


@needs_glue
def test_real_stsb_and_mrpc_test(tokenizer):
    dm = GLUEDataModule("STS-B", source="local", glue_dir=str(GLUE_DIR), tokenizer=tokenizer,
                        batch_size=4, max_train_samples=16, max_eval_samples=8)
    v = next(iter(dm.val_dataloader()))
    assert dm.num_labels == 1 and dm.is_regression
    assert v["labels"].dtype == torch.float32 and v["labels"].shape == (4,)
    dm = GLUEDataModule("mrpc", source="local", glue_dir=str(GLUE_DIR), tokenizer=tokenizer,
                        max_train_samples=8, max_eval_samples=8, token_type_ids=False)
    t = next(iter(dm.test_dataloader()))  # MSRP's test file is labelled
    assert "token_type_ids" not in t and dm.stats["test"]["rows"] == 1725


# ---------------------------------------------------------------------------------------
# official GLUE formats, generated
# ---------------------------------------------------------------------------------------
MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                     "sentence2_binary_parse", "sentence1_parse", "sentence2_parse", "sentence1",
                     "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def _mnli_row(i: int, s1: str, s2: str, labels: list[str], gold: str) -> list[str]:
    return [str(i), "1", f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
            *labels, gold]


def make_mnli(root: Path) -> None:
    d = root / "MNLI"
    write_tsv(d / "train.tsv", [MNLI_TRAIN_HEADER,
                                _mnli_row(0, 'He said "yes".', "He agreed.", ["entailment"],
                                          "entailment"),
                                _mnli_row(1, "A cat sat.", "A dog sat.", ["contradiction"],
                                          "contradiction"),
                                _mnli_row(2, "It rained.", "It was cold.", ["neutral"], "neutral"),
                                ["3", "truncated", "row"]])  # malformed: skipped
    for name, genre in (("dev_matched.tsv", "fiction"), ("dev_mismatched.tsv", "letters")):
        write_tsv(d / name, [MNLI_DEV_HEADER,
                             _mnli_row(0, f"{genre} one", "two", ["neutral"] * 5, "neutral"),
                             _mnli_row(1, f"{genre} three", "four",
                                       ["neutral", "entailment", "contradiction", "neutral",
                                        "entailment"], "-"),  # no gold label: skipped
                             _mnli_row(2, f"{genre} five", "six", ["entailment"] * 5,
                                       "entailment")])


def make_qnli(root: Path) -> None:
    header = ["index", "question", "sentence", "label"]
    write_tsv(root / "QNLI" / "train.tsv", [header,
                                            ["0", "Who wrote it?", "Ann wrote it.", "entailment"],
                                            ["1", "When?", "Nobody knows where.",
                                             "not_entailment"]])
    write_tsv(root / "QNLI" / "dev.tsv", [header, ["0", "Why?", "Because.", "entailment"]])


def make_qqp(root: Path) -> None:
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    write_tsv(root / "QQP" / "train.tsv", [header,
                                           ["0", "1", "2", "How do I cook?", "How to cook?", "1"],
                                           ["1", "3", "4", "What is AI?", "Is AI real?", "0"]])
    write_tsv(root / "QQP" / "dev.tsv", [header, ["5", "7", "8", "Why 1?", "Why 2?", "0"]])


def test_mnli_reader_official_format(tmp_path):
    make_mnli(tmp_path)
    tr = read_local_split("mnli", tmp_path, "train")
    assert tr.labels == [0, 2, 1] and tr.skipped == 1
    assert tr.text_a[0] == 'He said "yes".'  # bare quotes survive (no CSV quoting)
    m = read_local_split("mnli", tmp_path, "validation_matched")
    mm = read_local_split("mnli", tmp_path, "validation_mismatched")
    assert m.labels == [1, 0] and m.skipped == 1 and m.text_a == ["fiction one", "fiction five"]
    assert mm.text_a == ["letters one", "letters five"]


def test_mnli_datamodule_has_matched_and_mismatched(tmp_path, tokenizer):
    make_mnli(tmp_path)
    dm = GLUEDataModule("MNLI", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                        batch_size=2)
    dm.prepare_data()
    assert dm.num_labels == 3
    assert dm.val_split_names == ("validation_matched", "validation_mismatched")
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2
    m, mm = (next(iter(ld)) for ld in loaders)
    assert m["labels"].tolist() == [1, 0] and mm["labels"].tolist() == [1, 0]
    assert tokenizer.decode(m["input_ids"][0], skip_special_tokens=True) == "fiction one two"
    assert tokenizer.decode(mm["input_ids"][0], skip_special_tokens=True) == "letters one two"
    labels = sorted(x for b in dm.train_dataloader() for x in b["labels"].tolist())
    assert labels == [0, 1, 2]


def test_qnli_and_qqp_readers(tmp_path):
    make_qnli(tmp_path)
    make_qqp(tmp_path)
    q = read_local_split("qnli", tmp_path, "train")
    assert q.text_a == ["Who wrote it?", "When?"] and q.labels == [0, 1]
    assert read_local_split("QNLI", tmp_path, "validation").labels == [0]
    p = read_local_split("qqp", tmp_path, "train")
    assert p.text_b == ["How to cook?", "Is AI real?"] and p.labels == [1, 0]


def test_glue_format_variants(tmp_path):
    # CoLA as GLUE publishes it: source, label, original mark, sentence (no header)
    write_tsv(tmp_path / "CoLA" / "train.tsv", [["gj04", "1", "", "The sailors rode."],
                                                ["gj04", "0", "*", "Rode sailors the."]])
    c = read_local_split("cola", tmp_path, "train")
    assert c.text_a == ["The sailors rode.", "Rode sailors the."] and c.labels == [1, 0]
    # SST-2 with GLUE's header order (sentence, label)
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["great fun ", "1"]])
    assert read_local_split("sst2", tmp_path, "validation").text_a == ["great fun "]
    # RTE as GLUE publishes it: index first, labels as strings
    write_tsv(tmp_path / "RTE" / "train.tsv", [["index", "sentence1", "sentence2", "label"],
                                               ["0", "A.", "B.", "not_entailment"],
                                               ["1", "C.", "D.", "entailment"]])
    assert read_local_split("rte", tmp_path, "train").labels == [1, 0]
    # MRPC processed by GLUE's script (train.tsv, same columns, BOM)
    write_tsv(tmp_path / "MRPC" / "train.tsv",
              [["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["1", "1", "2", "X", "Y"]],
              bom=True)
    assert read_local_split("mrpc", tmp_path, "train").labels == [1]


def test_reader_errors(tmp_path):
    write_tsv(tmp_path / "RTE" / "train.tsv", [["sentence1", "sentence2", "label", "idx"],
                                               ["A.", "B.", "maybe", "0"]])
    with pytest.raises(ValueError, match=r"train.tsv:2: label 'maybe'"):
        read_local_split("rte", tmp_path, "train")
    write_tsv(tmp_path / "STS-B" / "train.tsv", [["sentence1", "sentence2", "score"],
                                                 ["A.", "B.", "7.5"]])
    with pytest.raises(ValueError, match="outside"):
        read_local_split("stsb", tmp_path, "train")
    # a comma-separated file read as TSV: every row malformed -> a format error, not silence
    write_tsv(tmp_path / "QQP" / "train.tsv",
              [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
              + [["0,1,2,a,b,1"] for _ in range(10)])
    with pytest.raises(ValueError, match="right file and format"):
        read_local_split("qqp", tmp_path, "train")
    write_tsv(tmp_path / "QNLI" / "train.tsv", [["index", "question", "text", "label"]])
    with pytest.raises(ValueError, match="none of the columns"):
        read_local_split("qnli", tmp_path, "train")


def test_missing_paths_name_the_config_key(tmp_path, tokenizer):
    with pytest.raises(DataNotFoundError, match="data.glue_dir, which is not set"):
        read_local_split("rte", None, "train")
    with pytest.raises(DataNotFoundError, match=rf"{tmp_path / 'nope'}.*data.glue_dir"):
        read_local_split("rte", tmp_path / "nope", "train")
    with pytest.raises(DataNotFoundError, match="no folder RTE or rte"):
        read_local_split("rte", tmp_path, "train")
    write_tsv(tmp_path / "RTE" / "train.tsv", [["sentence1", "sentence2", "label"],
                                               ["A.", "B.", "0"]])
    with pytest.raises(DataNotFoundError, match=rf"{tmp_path / 'RTE' / 'dev.tsv'} not found"):
        GLUEDataModule("rte", source="local", glue_dir=str(tmp_path),
                       tokenizer=tokenizer).prepare_data()
    with pytest.raises(ValueError, match="WNLI is excluded"):
        GLUEDataModule("wnli", source="local", glue_dir=str(tmp_path))
    with pytest.raises(ValueError, match="data.source"):
        GLUEDataModule("rte", source="tsv")


def test_truncation_to_max_length(tmp_path, tokenizer):
    long = " ".join(["word"] * 300)
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, ["0", long, long, "entailment"]])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, ["0", "short.", long, "entailment"]])
    dm = GLUEDataModule("rte", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer)
    b = next(iter(dm.train_dataloader()))
    v = next(iter(dm.val_dataloader()))
    assert b["input_ids"].shape == (1, 128) and v["input_ids"].shape == (1, 128)
    assert b["input_ids"][0, -1] == tokenizer.sep_token_id
    assert tokenizer.decode(v["input_ids"][0][:4]) == "[CLS] short. [SEP]"


# ---------------------------------------------------------------------------------------
# the Hub source, on a local copy of the repository layout
# ---------------------------------------------------------------------------------------
def make_hub_copy(root: Path) -> None:
    """nyu-mll/glue's layout: parquet files per config and split, configs in README.md."""
    import pandas as pd

    tables = {
        "rte": {"train": {"sentence1": ["A.", "C."], "sentence2": ["B.", "D."], "label": [0, 1],
                          "idx": [0, 1]},
                "validation": {"sentence1": ["E."], "sentence2": ["F."], "label": [1],
                               "idx": [0]}},
        "stsb": {"train": {"sentence1": ["A."], "sentence2": ["B."], "label": [3.2], "idx": [0]},
                 "validation": {"sentence1": ["C."], "sentence2": ["D."], "label": [0.4],
                                "idx": [0]}},
    }
    lines = ["---", "configs:"]
    for config, splits in tables.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        for split, data in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            pd.DataFrame(data).to_parquet(root / config / f"{split}-00000-of-00001.parquet")
            lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join(lines + ["---", ""]))


def test_hf_source_reads_the_hub_layout(tmp_path, tokenizer):
    make_hub_copy(tmp_path / "glue")
    dm = GLUEDataModule("rte", source="hf", hf_path=str(tmp_path / "glue"), tokenizer=tokenizer,
                        cache_dir=str(tmp_path / "cache"), batch_size=2)
    dm.prepare_data()
    b = next(iter(dm.train_dataloader()))
    assert sorted(b["labels"].tolist()) == [0, 1]
    assert dm.stats["validation"]["rows"] == 1
    dm = GLUEDataModule("stsb", source="hf", hf_path=str(tmp_path / "glue"),
                        tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"))
    v = next(iter(dm.val_dataloader()))
    assert v["labels"].dtype == torch.float32 and v["labels"].tolist() == [pytest.approx(0.4)]


def test_hf_source_without_network(monkeypatch, tokenizer):
    dm = GLUEDataModule("rte", source="hf", tokenizer=tokenizer, offline=True)
    with pytest.raises(HubUnavailableError, match="data.source=local and data.glue_dir"):
        dm.prepare_data()
    import huggingface_hub

    def no_network(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "dataset_info", no_network)
    dm = GLUEDataModule("rte", source="hf", tokenizer=tokenizer, offline=False)
    with pytest.raises(HubUnavailableError, match="nyu-mll/glue.*cannot be reached"):
        dm.setup()


def test_hf_source_offline_reads_the_datasets_cache(monkeypatch):
    # with HF_HUB_OFFLINE set, a GLUE copy in the datasets cache is still usable
    import datasets

    from tasks.text.glue_data import read_hf_split

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls = []

    def cached(path, name, split, cache_dir=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence1": ["A."], "sentence2": ["B."],
                                           "label": [1], "idx": [0]})

    monkeypatch.setattr(datasets, "load_dataset", cached)
    with pytest.raises(HubUnavailableError):  # no offline mode set: no silent fallback
        read_hf_split("rte", "train", offline=True)
    assert not calls
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cols = read_hf_split("rte", "train")
    assert calls == [("nyu-mll/glue", "rte", "train")] and cols.labels == [1]

    def empty_cache(*a, **k):
        raise ConnectionError("offline and not cached")

    monkeypatch.setattr(datasets, "load_dataset", empty_cache)
    with pytest.raises(HubUnavailableError, match="data.source=local"):
        read_hf_split("rte", "train")


def test_train_order_moves_on_with_the_epoch(tmp_path, tokenizer):
    make_qqp(tmp_path)
    rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
    rows += [[str(i), "1", "2", f"q{i}", f"p{i}", str(i % 2)] for i in range(40)]
    write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    dm = GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                        batch_size=40)
    twin = GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                          batch_size=40)
    a, b = next(iter(dm.train_dataloader())), next(iter(twin.train_dataloader()))
    assert torch.equal(a["input_ids"], b["input_ids"])  # same seed, same order
    # a rebuilt loader at the same epoch repeats the order (exact resume); the next epoch
    # (Lightning calls set_epoch) draws a new one
    assert torch.equal(a["input_ids"], next(iter(dm.train_dataloader()))["input_ids"])
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    c = next(iter(loader))
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_task_names():
    assert glue_task("SST-2").name == "sst2" and glue_task("STS-B").name == "stsb"
    assert glue_task("CoLA").name == "cola" and glue_task("mnli").num_labels == 3
    assert glue_task("stsb").num_labels == 1 and glue_task("stsb").is_regression
    assert set(GLUE_TASKS) == set(GLUE_METRICS) == {"cola", "sst2", "mrpc", "qqp", "stsb",
                                                     "mnli", "qnli", "rte"}
    for t in GLUE_TASKS.values():
        assert tuple(GLUE_METRICS[t.name]) == t.eval_splits


# ---------------------------------------------------------------------------------------
# metrics and the GLUE score
# ---------------------------------------------------------------------------------------
def test_metric_values_by_hand():
    preds, target = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([1, 0, 0, 1, 1])
    # TP 2, TN 1, FP 1, FN 1
    qqp = glue_metric_collection("qqp", prefix="val/")
    qqp.update(preds, target)
    out = qqp.compute()
    assert set(out) == {"val/accuracy", "val/f1"}
    assert out["val/accuracy"] == pytest.approx(0.6) and out["val/f1"] == pytest.approx(2 / 3)
    cola = glue_metric_collection("cola")
    cola.update(preds, target)
    assert cola.compute()["mcc"] == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))

    score, gold = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 1.0, 2.0, 3.0])
    stsb = glue_metric_collection("STS-B")
    stsb.update(glue_predictions("stsb", score[:, None]), gold)
    out = stsb.compute()
    # ranks (1, 3, 2, 4) vs (1, 2, 3, 4): rho = 1 - 6 * 2 / (4 * 15)
    assert out["spearman"] == pytest.approx(0.8)
    assert out["pearson"] == pytest.approx(np.corrcoef(score.numpy(), gold.numpy())[0, 1],
                                           abs=1e-6)


def test_metric_collections_per_split():
    mnli = glue_metric_collections("mnli", prefix="val/")
    assert list(mnli) == ["validation_matched", "validation_mismatched"]
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    mnli["validation_matched"].update(glue_predictions("mnli", logits), torch.tensor([0, 2, 2]))
    assert mnli["validation_matched"].compute() == {"val/accuracy_m": pytest.approx(2 / 3)}
    assert list(glue_metric_collection("rte").keys()) == ["accuracy"]
    assert glue_predictions("rte", torch.tensor([1, 0])).tolist() == [1, 0]
    with pytest.raises(ValueError, match="3 classes"):
        glue_predictions("mnli", torch.zeros(4, 2))
    with pytest.raises(ValueError, match="STS-B expects"):
        glue_predictions("stsb", torch.zeros(4, 2))
    with pytest.raises(ValueError, match="no metrics for split"):
        glue_metric_collection("rte", "validation_matched")


def _results() -> list[dict]:
    rows = []

    def add(task, seed, **metrics):
        rows.extend(dict(task=task, seed=seed, metric=k, value=v) for k, v in metrics.items())

    add("MNLI", 19, accuracy_m=0.80, accuracy_mm=0.82)
    add("MNLI", 8364, accuracy_m=0.84, accuracy_mm=0.86)  # task: mean(0.81, 0.85) = 83
    add("QNLI", 19, accuracy=0.90)
    add("RTE", 19, accuracy=0.70)
    add("RTE", 8364, accuracy=0.60)  # 65
    add("SST-2", 19, accuracy=0.92)
    add("QQP", 19, accuracy=0.90, f1=0.86)  # 88
    add("MRPC", 19, accuracy=0.80, f1=0.86)  # 83 (M2's released jobs: F1 only, 86)
    add("CoLA", 19, mcc=0.50)
    add("STS-B", 19, spearman=0.88, pearson=0.10)  # Pearson does not enter the score
    add("WNLI", 19, accuracy=0.56)  # excluded
    return rows


def test_glue_score_by_hand():
    out = glue_score(_results())
    assert out["tasks"] == pytest.approx({"mnli": 83.0, "qnli": 90.0, "rte": 65.0, "sst2": 92.0,
                                          "qqp": 88.0, "mrpc": 83.0, "cola": 50.0, "stsb": 88.0})
    assert out["glue"] == pytest.approx(639 / 8)  # 79.875
    assert out["seeds"]["mnli"] == 2 and out["seeds"]["cola"] == 1
    m2 = glue_score(_results(), M2_RELEASE_SCORE_METRICS)
    assert m2["tasks"]["mrpc"] == pytest.approx(86.0) and m2["glue"] == pytest.approx(642 / 8)
    import pandas as pd

    assert glue_score(pd.DataFrame(_results()))["glue"] == pytest.approx(out["glue"])


def test_glue_score_errors():
    rows = [r for r in _results() if r["task"] != "CoLA"]
    with pytest.raises(ValueError, match=r"lack the GLUE tasks \['cola'\]"):
        glue_score(rows)
    partial = glue_score(rows, require_all=False)
    assert partial["glue"] == pytest.approx((639 - 50) / 7)
    rows = [r for r in _results() if not (r["task"] == "QQP" and r["metric"] == "f1")]
    with pytest.raises(ValueError, match=r"qqp seed 19 lacks \['f1'\]"):
        glue_score(rows)
    with pytest.raises(ValueError, match="twice"):
        glue_score(_results() + _results()[:1])
    with pytest.raises(ValueError, match="lacks 'metric'"):
        glue_score([{"task": "rte", "seed": 1, "value": 0.5}])


def test_mcc_is_zero_for_constant_predictions_as_sklearn_defines_it():
    from tasks.text.glue_metrics import MatthewsCorrCoef

    target = torch.tensor([0, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    m = MatthewsCorrCoef()
    m.update(torch.ones(10, dtype=torch.long), target)
    assert float(m.compute()) == 0.0  # torchmetrics alone gives 0.276 here
    m = MatthewsCorrCoef()
    preds = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 1])
    m.update(preds, target)
    tp, tn, fp, fn = 6, 3, 0, 1  # hand-computed
    expected = (tp * tn - fp * fn) / ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    assert float(m.compute()) == pytest.approx(expected, abs=1e-6)


def test_holdout_replaces_dev_with_unseen_training_examples(tmp_path, tokenizer):
    # tuning a recipe ranks runs on held-out *training* examples; the dev split is not read
    make_qqp(tmp_path)
    rows = [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]]
    rows += [[str(i), "1", "2", f"q{i}", f"p{i}", str(i % 2)] for i in range(40)]
    write_tsv(tmp_path / "QQP" / "train.tsv", rows)
    (tmp_path / "QQP" / "dev.tsv").unlink()
    dm = GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                        batch_size=64, holdout=10, max_train_samples=25)
    dm.prepare_data()  # the dev file is gone on purpose: not needed
    assert dm.val_split_names == ("holdout",)

    def texts(loader):
        return {tokenizer.decode(ids, skip_special_tokens=True).split()[0]
                for b in loader for ids in b["input_ids"]}

    held, train = texts([next(iter(dm.val_dataloader()))]), texts(dm.train_dataloader())
    assert len(held) == 10 and len(train) == 25 and not held & train
    twin = GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                          batch_size=64, holdout=10, max_train_samples=25)
    assert texts([next(iter(twin.val_dataloader()))]) == held  # drawn with data_seed
    with pytest.raises(ValueError, match="holdout"):
        GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), holdout=0)
    too_big = GLUEDataModule("qqp", source="local", glue_dir=str(tmp_path), tokenizer=tokenizer,
                             holdout=40)
    with pytest.raises(ValueError, match="leaves no training examples"):
        too_big.setup()
