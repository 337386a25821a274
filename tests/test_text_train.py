"""Text on the shared framework (Tables 1 and 7): every member composes with the paper's and the
tiny values, BERT is parameter-matched to the Chimera rows, every MLM member trains a step,
an MLM checkpoint (Lightning .ckpt and the final hf/ folder) finetunes on GLUE strictly (and a
finetuned one starts the next task), missing inputs fail clearly, and multi-stage tables
expand into their sweeps. Masking statistics (0.30 / 0.15) are in tests/test_text_data.py."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from tasks.core.driver import METRICS_FILE, apply_model_size, instantiate, train
from tasks.core.errors import ConfigError, DataNotFoundError
from tasks.core.tables import for_preset, load_spec, stages_of
from tasks.text.models import (
    bert_matching_chimera,
    bert_mlm,
    chimera_mlm,
    classifier_from_checkpoint,
    count_parameters,
)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GLUE_DIR = ROOT.parent / "shared" / "data" / "glue"
MLM_MODELS = ("bert_base", "chimera_dag", "chimera_ug", "bert_6l", "chimera_6l_expand4",
              "chimera_12l")
# fast settings for runs in tests: few documents, short rows, few validation rows
FAST_MLM = ["++text.mlm.max_docs=120", "text.mlm.val_sequences=32", "text.mlm.batch_size=8",
            "text.mlm.eval_batch_size=32", "text.max_length=32", "logger=none",
            "trainer.enable_progress_bar=false"]


def compose_cfg(overrides: list[str], output_dir: Path | None = None,
                sweep_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/unused")
        if sweep_dir is not None:
            cfg.hydra.sweep.dir = str(sweep_dir)
    HydraConfig.instance().set_config(cfg)
    return apply_model_size(cfg)


def stage_members(table: str, preset: str) -> list[tuple[str, list[str]]]:
    """``(experiment, overrides)`` of every member of every stage of a table."""
    spec = load_spec(table)
    out = []
    for st in stages_of(spec, table, preset):
        if st["params"]:
            keys = list(st["params"])
            values = [st["params"][k].split(",") for k in keys]
        else:  # the experiment's own sweep
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=[f"experiment={st['experiment']}"],
                              return_hydra_config=True)
            keys = list(cfg.hydra.sweeper.params)
            values = [str(cfg.hydra.sweeper.params[k]).split(",") for k in keys]
        for combo in itertools.product(*values):
            out.append((st["experiment"], [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]))
    return out


# ---------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["paper", "tiny"])
@pytest.mark.parametrize("table", ["text/table7", "text/table1", "text/glue"])
def test_every_member_composes(table, preset):
    extra = ["pretrained=/some/ckpt"] if table == "text/glue" else []
    members = set()
    for experiment, ov in stage_members(table, preset):
        cfg = compose_cfg([f"experiment={experiment}", f"preset=text/{preset}", *ov, *extra])
        c = OmegaConf.to_container(cfg.model, resolve=True)  # every interpolation resolves
        OmegaConf.to_container(cfg.data, resolve=True)
        assert "sizes" not in c
        members.add(cfg.member)
        if cfg.data._target_.endswith("MLMDataModule"):
            assert cfg.model.optimizer.name == "DecoupledAdamW"
            assert list(cfg.model.optimizer.betas) == [0.9, 0.98]
            assert cfg.model.optimizer.eps == 1e-6 and cfg.model.optimizer.weight_decay == 1e-5
            assert cfg.model.scheduler.decay == "linear" and cfg.model.scheduler.warmup == 0.06
            assert cfg.trainer.gradient_clip_val == 1.0 and cfg.test is False
            if preset == "paper":
                assert cfg.data.source == "c4" and cfg.data.tokenizer == "bert-base-uncased"
                assert cfg.data.max_length == 128 and cfg.model.net.vocab_size == 30522
                lr = 5e-4 if cfg.model.name.startswith("bert") else 8e-4
                assert cfg.model.optimizer.lr == lr
                steps = 28000 if table == "text/table7" else 70000
                assert cfg.trainer.max_steps == steps
                assert cfg.callbacks.model_checkpoint.every_n_train_steps == 2000
            else:
                assert cfg.data.source == "embedded" and cfg.data.tokenizer == "wordpiece"
                assert cfg.model.net.d_model == 64
        else:
            task = cfg.glue_task
            recipe = {"mnli": (5e-5, 5e-6, 48, 2), "rte": (1e-5, 1e-5, 16, 3),
                      "qqp": (3e-5, 3e-6, 16, 3), "qnli": (1e-5, 1e-6, 16, 7),
                      "sst2": (3e-5, 3e-6, 16, 2), "stsb": (3e-5, 3e-6, 32, 10),
                      "mrpc": (8e-5, 8e-6, 32, 10), "cola": (5e-5, 5e-6, 32, 10)}[task]
            if preset == "paper":  # M2-BERT's per-task recipe
                assert (cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay,
                        cfg.data.batch_size, cfg.trainer.max_epochs) == recipe
            else:  # one validation-chosen recipe for every task (results/tuning/text_tiny.md)
                assert (cfg.model.optimizer.lr, cfg.model.optimizer.weight_decay,
                        cfg.data.batch_size, cfg.trainer.max_epochs) == (3e-3, 1e-5, 32, 3)
                assert cfg.data.max_train_samples == 2048 and cfg.data.holdout is None
            start = cfg.model.net.start
            assert start == ("finetuned" if task in ("rte", "mrpc", "stsb") else "mlm")
            if start == "finetuned":
                inter = "mnli" if preset == "paper" else "sst2"
                assert cfg.model.net.checkpoint.endswith(f"_{inter}/seed{cfg.seed}/hf")
            assert cfg.meta.task == task and cfg.meta.stage == "glue"
            assert cfg.data.source == ("hf" if preset == "paper" else "local")
    if table == "text/table7":
        assert members == {"bert_6l", "chimera_6l_expand4", "chimera_12l"}
    if table == "text/table1":
        tasks = ("mnli", "qnli", "qqp", "sst2", "cola", "rte", "mrpc", "stsb") if \
            preset == "paper" else ("sst2", "cola", "rte", "mrpc", "stsb")
        models = ("bert_base", "chimera_ug", "chimera_dag")
        assert members == set(models) | {f"{m}_{t}" for m in models for t in tasks}


def test_table_specs_match_the_paper_layout():
    t7 = load_spec("text/table7")
    assert [r["member"] for r in t7["rows"]] == ["bert_6l", "chimera_6l_expand4", "chimera_12l"]
    t1 = for_preset(load_spec("text/table1"), "tiny")
    labels = [c["label"] for c in t1["columns"]]
    assert labels == ["Lce", "Acc (%)", "RTE", "SST2", "MRPC", "COLA", "STS",
                      "Avg (5 local tasks)"]
    dag = next(r for r in t1["rows"] if r["label"] == "Chimera (DAG)")
    assert dag["paper"] == [1.46, 68.9, 77.98, 93.69, 90.36, 57.08, 88.68, 81.56]
    # the tiny average's paper numbers are the paper's five tasks averaged
    assert abs(sum(dag["paper"][2:7]) / 5 - dag["paper"][7]) < 0.01
    paper = for_preset(load_spec("text/table1"), "paper")
    assert len(paper["columns"]) == 11 and paper["rows"][0]["paper"][-1] == 83.2


def test_stages_expand_with_preset_params_and_own_seeds():
    spec = {"seeds": {"tiny": [19, 8364]},
            "stages": [{"experiment": "x/pre", "params": {"model": "a,b"},
                        "seeds": {"tiny": [0]}},
                       {"params": {"task": "p,q"}, "preset_params": {"tiny": {"task": "p"}}}]}
    st = stages_of(spec, "x/table", "tiny")
    assert st == [{"experiment": "x/pre", "params": {"model": "a,b"}, "seeds": [0]},
                  {"experiment": "x/table", "params": {"task": "p"}, "seeds": [19, 8364]}]
    assert stages_of(spec, "x/table", "tiny", seeds=[5])[1]["seeds"] == [5]
    assert stages_of({"seeds": {"paper": [1]}}, "x/t", "paper") == [
        {"experiment": "x/t", "params": {}, "seeds": [1]}]
    with pytest.raises(ValueError, match="unknown keys"):
        stages_of({"stages": [{"parms": {}}]}, "x/t", "tiny")


# ---------------------------------------------------------------------------------------
# parameter matching
# ---------------------------------------------------------------------------------------
def _net(model: str, preset: str) -> torch.nn.Module:
    cfg = compose_cfg(["experiment=text/mlm", f"model=text/{model}", f"preset=text/{preset}"])
    with torch.device("meta"):
        return instantiate(cfg.model.net)


@pytest.mark.parametrize("preset", ["paper", "tiny"])
def test_bert_is_parameter_matched(preset):
    n = {m: count_parameters(_net(m, preset)) for m in MLM_MODELS}
    # Table 1: BERT-B vs both Chimera variants; Table 7: BERT-6L vs both 70M Chimera rows
    for bert, chimeras in (("bert_base", ("chimera_dag", "chimera_ug")),
                           ("bert_6l", ("chimera_6l_expand4", "chimera_12l"))):
        for c in chimeras:
            assert abs(n[bert] / n[c] - 1) < 0.02, (preset, bert, c, n)
    if preset == "paper":
        assert 108e6 < n["chimera_ug"] < n["bert_base"] < n["chimera_dag"] < 112e6
        assert 68e6 < n["chimera_6l_expand4"] < n["bert_6l"] < n["chimera_12l"] < 70e6


def test_bert_matching_solver():
    with torch.device("meta"):
        c = chimera_mlm(8192, d_model=64, n_layer=4, d_state=16, headdim=32)
        size = bert_matching_chimera(c, 8192, 64, 2, 2, 128)
        b = bert_mlm(8192, 64, 2, 2, size, 128)
    assert size % 8 == 0 and abs(count_parameters(b) / count_parameters(c) - 1) < 0.005
    with pytest.raises(ConfigError, match="without an MLP"), torch.device("meta"):
        bert_matching_chimera(c, 8192, 512, 12, 8)


# ---------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["bert_6l", "chimera_dag", "chimera_ug", "chimera_6l_expand4"])
def test_mlm_member_fast_dev_run(model, tmp_path):
    cfg = compose_cfg(["experiment=text/mlm", f"model=text/{model}", "preset=text/tiny",
                       "+trainer.fast_dev_run=true", *FAST_MLM], tmp_path)
    result, objs = train(cfg)
    m = result["metrics"]
    assert {"val/mlm_loss", "val/masked_acc", "train/loss"} <= set(m)
    assert 0 <= m["val/masked_acc"] <= 1 and 0 < m["val/mlm_loss"] < 20
    assert result["params"] == count_parameters(objs["model"].net)


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory) -> Path:
    """A 2-step Chimera-DAG MLM run with a periodic checkpoint and its final hf/ export."""
    out = tmp_path_factory.mktemp("mlm") / "chimera_dag" / "seed0"
    cfg = compose_cfg(["experiment=text/mlm", "model=text/chimera_dag", "preset=text/tiny",
                       "text.mlm.max_steps=2", "text.mlm.every=1", *FAST_MLM], out)
    train(cfg)
    return out


def test_mlm_run_writes_checkpoints_and_hf(mlm_run):
    d = json.loads((mlm_run / METRICS_FILE).read_text())
    assert d["global_step"] == 2 and d["meta"] == {"model": "chimera_dag", "stage": "pretrain"}
    assert (mlm_run / "checkpoints" / "last.ckpt").is_file()
    assert (mlm_run / "hf" / "config.json").is_file()
    assert (mlm_run / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("source", ["hf", "checkpoints/last.ckpt"])
def test_checkpoint_loads_into_classifier_strictly(mlm_run, source):
    from chimera.models.hf import read_state_dict

    clf = classifier_from_checkpoint(mlm_run / source, num_labels=3)
    assert clf.loading_info["new"] and all(k.startswith(("pooler.", "classifier."))
                                           for k in clf.loading_info["new"])
    assert all(k.startswith("lm_head.") for k in clf.loading_info["dropped"])
    mlm = read_state_dict(mlm_run / "hf")
    for k, v in clf.state_dict().items():
        if k.startswith("chimera."):
            assert torch.equal(v, mlm[k]), k
    assert clf.config.num_labels == 3


def test_bert_checkpoint_round_trip(tmp_path):
    mlm = bert_mlm(100, 16, 1, 2, 32, 16)
    mlm.save_pretrained(tmp_path / "hf")
    clf = classifier_from_checkpoint(tmp_path / "hf", num_labels=1)
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in clf.loading_info["new"]}) \
        == ["bert.pooler", "classifier.bias", "classifier.weight"]
    assert torch.equal(clf.bert.embeddings.word_embeddings.weight,
                       mlm.bert.embeddings.word_embeddings.weight)
    assert clf.config.problem_type == "regression"
    clf.save_pretrained(tmp_path / "ft")
    nxt = classifier_from_checkpoint(tmp_path / "ft", num_labels=2, start="finetuned")
    assert torch.equal(nxt.bert.pooler.dense.weight, clf.bert.pooler.dense.weight)
    with pytest.raises(ConfigError, match="missing from the checkpoint"):
        classifier_from_checkpoint(tmp_path / "hf", num_labels=2, start="finetuned")


def test_missing_and_bad_checkpoints_are_clear_errors(tmp_path, mlm_run):
    with pytest.raises(DataNotFoundError, match="does not exist"):
        classifier_from_checkpoint(tmp_path / "nope.ckpt", num_labels=2)
    with pytest.raises(ConfigError, match="not set"):
        classifier_from_checkpoint(None, num_labels=2)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        classifier_from_checkpoint(bad, num_labels=2)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ConfigError, match="carries no network config"):
        classifier_from_checkpoint(other, num_labels=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="without config.json"):
        classifier_from_checkpoint(tmp_path / "empty", num_labels=2)
    # an MLM is not a finetuned classifier: the pooler would be missing, nothing is loaded
    with pytest.raises(ConfigError, match="missing from the checkpoint"):
        classifier_from_checkpoint(mlm_run / "hf", num_labels=2, start="finetuned")
    with pytest.raises(ConfigError, match="model.net.start"):
        classifier_from_checkpoint(mlm_run / "hf", num_labels=2, start="scratch")


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="the local GLUE files are not here")
def test_glue_finetune_round_trip(mlm_run, tmp_path):
    """MLM hf/ -> SST-2 -> RTE from the SST-2 run (the tiny preset's MNLI stand-in)."""
    sweep = tmp_path / "sweep"
    common = ["experiment=text/glue", "preset=text/tiny", f"pretrained={mlm_run / 'hf'}",
              "glue_model=dag", "text.glue.max_train_samples=32",
              "text.glue.max_eval_samples=32", "text.max_length=32", "logger=none",
              "trainer.enable_progress_bar=false"]
    sst2 = compose_cfg([*common, "glue_task=sst2"], sweep / "dag_sst2" / "seed0", sweep)
    assert sst2.member == "dag_sst2"
    res, _ = train(sst2)
    assert {"val/accuracy", "val/task_score", "val/loss"} <= set(res["metrics"])
    assert res["meta"] == {"model": "dag", "task": "sst2", "stage": "glue"}
    rte = compose_cfg([*common, "glue_task=rte"], sweep / "dag_rte" / "seed0", sweep)
    assert rte.model.net.checkpoint == str(sweep / "dag_sst2" / "seed0" / "hf")
    res, objs = train(rte)
    assert objs["model"].net.loading_info["new"] == ["classifier.bias", "classifier.weight"]
    assert 0 <= res["metrics"]["val/task_score"] <= 1


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason="the local GLUE files are not here")
def test_glue_regression_scores_spearman(mlm_run, tmp_path):
    """STS-B (one output, MSE): Spearman is its task score."""
    cfg = compose_cfg(["experiment=text/glue", "preset=text/tiny", f"pretrained={mlm_run / 'hf'}",
                       "glue_task=stsb", "glue_recipes.stsb.start=mlm",
                       "text.glue.max_train_samples=32", "text.glue.max_eval_samples=32",
                       "text.max_length=32", "logger=none", "trainer.enable_progress_bar=false"],
                      tmp_path / "stsb")
    res, objs = train(cfg)
    assert objs["model"].net.config.num_labels == 1
    assert res["metrics"]["val/task_score"] == res["metrics"]["val/spearman"]
    assert "val/pearson" in res["metrics"]


def test_glue_without_checkpoint_or_data_fails_clearly(tmp_path, mlm_run):
    # a readable (tiny, generated) SST-2 folder, so the missing checkpoint is what fails
    sst2 = tmp_path / "glue" / "SST-2"
    sst2.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        (sst2 / name).write_text("sentence\tlabel\nit is good\t1\nit is bad\t0\n")
    cfg = compose_cfg(["experiment=text/glue", "preset=text/tiny",
                       f"pretrained={tmp_path / 'missing'}", f"text.glue.glue_dir={sst2.parent}",
                       "logger=none"], tmp_path / "r")
    with pytest.raises(DataNotFoundError, match="pretrained|model.net.checkpoint"):
        train(cfg)
    cfg = compose_cfg(["experiment=text/glue", "preset=text/tiny",
                       f"pretrained={mlm_run / 'hf'}", f"text.glue.glue_dir={tmp_path}",
                       "logger=none"], tmp_path / "r2")
    with pytest.raises(FileNotFoundError, match="glue_dir|SST-2|sst2"):
        train(cfg)
