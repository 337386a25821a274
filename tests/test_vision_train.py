"""Vision on the shared framework: every table member composes with the paper's (or the tiny)
values, runs one fast_dev_run step, a checkpoint round-trips raw and EMA weights, and the
quickstart (`python scripts/train.py` with no arguments) composes to a small CPU run."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tasks.core.driver import METRICS_FILE, apply_model_size, train
from tasks.core.tables import load_spec
from tasks.vision.data import DEBIAN_FASHION_MNIST
from tasks.vision.module import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TABLES = ("vision/table2", "vision/table3", "vision/table6")
EXPECTED_MEMBERS = {
    "vision/table2": {"chimera_vit_b", "vit_b"},
    "vision/table3": {"grid", "flat_fwd_rev", "flat_fwd"},
    "vision/table6": {"none", "complete", "rowwise", "diagonal"},
}


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir or "/tmp/unused")
    HydraConfig.instance().set_config(cfg)
    return apply_model_size(cfg)


def sweep_members(experiment: str) -> list[list[str]]:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    keys = [k for k in params if k != "seed"]
    values = [str(params[k]).split(",") for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            for combo in itertools.product(*values)]


MEMBERS = [(t, m) for t in TABLES for m in sweep_members(t)]


def member_id(p):
    return p if isinstance(p, str) else "-".join(x.split("=")[1].split("/")[-1] for x in p)


@pytest.mark.parametrize("table", TABLES)
def test_sweep_members_are_the_table_rows(table):
    members = set()
    for m in sweep_members(table):
        members.add(compose_cfg([f"experiment={table}", "preset=vision/tiny", *m]).member)
    assert members == EXPECTED_MEMBERS[table]
    rows = {r["member"] for r in load_spec(table)["rows"] if r.get("member")}
    assert rows == EXPECTED_MEMBERS[table]  # every row has a sweep member and vice versa


@pytest.mark.parametrize("preset", ["paper", "tiny"])
@pytest.mark.parametrize("table,member", MEMBERS, ids=member_id)
def test_experiment_member_composes(table, member, preset):
    cfg = compose_cfg([f"experiment={table}", f"preset=vision/{preset}", *member])
    net, model, data = cfg.model.net, cfg.model, cfg.data
    assert cfg.task_name == table.replace("/", "_") and "sizes" not in model
    is_chimera = net.model_name.startswith("chimera_vit")
    if preset == "paper":
        assert data._target_.endswith("ImageNetDataModule") and data.img_size == 224
        assert net.patch_size == 16 and cfg.trainer.max_epochs == 310
        assert cfg.callbacks.ema.decay == 0.99996 and model.optimizer.lr == 1e-3
        assert net.embed_dim == (768 if table.endswith("table2") else 384)
        if is_chimera:
            assert net.depth == 22 and net.d_state == 64
            assert net.num_heads == (12 if table.endswith("table2") else 3)
    else:
        assert data._target_.endswith("FashionMNISTDataModule") and data.in_chans == 1
        assert net.patch_size == 4 and data.subset_train is not None
        assert cfg.trainer.max_epochs == 1 and cfg.callbacks.ema.decay == 0.95
    assert model.optimizer.weight_decay == 0.05 and model.scheduler.decay == "cosine"
    assert is_chimera or "topology" not in net
    if preset == "tiny":  # one recipe for every row (tuned on val; conf/preset/vision/tiny.yaml)
        assert data.auto_augment is None and data.re_prob == 0.0 and list(data.scale) == [1, 1]
        assert model.mixup.prob == 0.0 and model.mixup.label_smoothing == 0.1
        assert model.optimizer.lr == 3e-3
        # one budget for every row of a table: 800 steps of 64 in Table 2, 320 in the others
        assert data.subset_train == (51200 if table.endswith("table2") else 20480)
        return
    assert data.auto_augment == "rand-m9-mstd0.5-inc1" and data.re_prob == 0.25
    if is_chimera:
        assert (model.mixup.mixup_alpha, model.mixup.cutmix_alpha) == (0.8, 0.1)
        assert model.mixup.label_smoothing == 0.25
    else:
        assert (model.mixup.mixup_alpha, model.mixup.cutmix_alpha) == (0.8, 1.0)
        assert model.mixup.label_smoothing == 0.1 and "topology" not in net


def test_command_line_wins_over_the_preset_size():
    cfg = compose_cfg(["experiment=vision/table3", "preset=vision/tiny",
                       "model.net.drop_path_rate=0", "model.net.embed_dim=32"])
    assert cfg.model.net.drop_path_rate == 0 and cfg.model.net.embed_dim == 32
    assert cfg.model.net.patch_size == 4  # the rest of the tiny size still applies


@pytest.mark.parametrize("overrides", [
    [], ["data=vision/fake"], ["trainer=gpu"], ["trainer=ddp"], ["trainer=ddp_cpu"],
    ["logger=wandb"], ["logger=none"], ["callbacks=none"], ["debug=fdr"], ["debug=limit"],
    ["debug=overfit"], ["debug=profiler"], ["experiment=vision/table2", "preset=vision/paper"],
])
def test_other_configs_compose(overrides):
    cfg = compose_cfg(overrides)
    assert cfg.model._target_.endswith("ImageClassifier")
    OmegaConf.to_container(cfg.trainer, resolve=True)


def test_quickstart_is_a_small_cpu_run():
    cfg = compose_cfg([])
    assert cfg.task_name == "vision_quickstart" and cfg.trainer.accelerator == "cpu"
    assert cfg.model.net.embed_dim == 64 and cfg.data.subset_train <= 4096
    assert cfg.trainer.max_epochs == 1


def test_tiny_table2_models_are_parameter_matched():
    counts = {}
    for m in ("chimera_vit_b", "vit_b"):
        cfg = compose_cfg(["experiment=vision/table2", "preset=vision/tiny", f"model=vision/{m}"])
        counts[m] = sum(p.numel() for p in instantiate(cfg.model.net).parameters())
    assert abs(counts["chimera_vit_b"] / counts["vit_b"] - 1) < 0.1, counts


def _small_data_overrides(tmp_path: Path) -> list[str]:
    root = DEBIAN_FASHION_MNIST
    if not Path(root).is_dir():
        from tests.test_vision_data import fake_fmnist

        root = str(tmp_path / "fmnist")
        fake_fmnist(Path(root), n_train=120, n_test=40)
    return [f"data.root={root}", "data.download=false", "data.val_size=40",
            "data.subset_train=32", "data.subset_val=16", "data.subset_test=16",
            "data.batch_size=16", "data.eval_batch_size=16", "logger=csv",
            "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("table,member", MEMBERS, ids=member_id)
def test_fast_dev_run_per_sweep_member(table, member, tmp_path):
    cfg = compose_cfg([f"experiment={table}", "preset=vision/tiny", "debug=fdr", *member]
                      + _small_data_overrides(tmp_path), output_dir=tmp_path)
    result, objs = train(cfg)
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    for split in ("val", "test"):
        for k in ("acc1", "acc5", "ema_acc1", "ema_acc5"):
            assert 0.0 <= saved["metrics"][f"{split}/{k}"] <= 1.0
    assert saved["task"] == table.replace("/", "_") and saved["global_step"] == 1
    assert saved["member"] == cfg.member and saved["params"] > 0 and saved["preset"] == "tiny"


def test_checkpoint_roundtrip_raw_and_ema(tmp_path):
    cfg = compose_cfg(["experiment=vision/table3", "preset=vision/tiny", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                       "trainer.limit_test_batches=1"] + _small_data_overrides(tmp_path),
                      output_dir=tmp_path)
    result, objs = train(cfg)
    model: ImageClassifier = objs["model"]
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt_path.is_file() and result["global_step"] == 2
    # hyperparameters are plain containers: the checkpoint loads with weights_only=True
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ema_state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert ema_state["updates"] == 2
    reloaded = ImageClassifier.load_from_checkpoint(ckpt_path, net=instantiate(cfg.model.net))
    ema_net = model.ema_callback.module
    model.eval()
    reloaded.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.net(x), reloaded.net(x))
        ema_copy = instantiate(cfg.model.net).eval()
        ema_copy.load_state_dict(ema_state["weights"])
        assert torch.equal(ema_net(x), ema_copy(x))
        assert not torch.equal(model.net(x), ema_net(x))  # EMA lags the raw weights
    assert reloaded.hparams.name == "chimera_vit_s"
    assert reloaded.mix_cfg == OmegaConf.to_container(cfg.model.mixup, resolve=True)


def test_reproduce_with_parallel_jobs_fills_the_same_run_folders(tmp_path):
    """`make reproduce-<table> JOBS=2`: one process per (member, seed), two at a time, one torch
    thread each, into the folders a single sweep uses, then the table over both members."""
    import subprocess
    import sys

    runs, out = tmp_path / "runs", tmp_path / "table"
    overrides = ["debug=fdr", *_small_data_overrides(tmp_path)]
    proc = subprocess.run([sys.executable, "scripts/reproduce.py", "table2", "--preset", "tiny",
                           "--seeds", "0,", "--jobs", "2", "--runs", str(runs), "--out", str(out),
                           "--", *overrides], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for member in ("chimera_vit_b", "vit_b"):
        run = runs / member / "seed0"
        assert (run / METRICS_FILE).is_file(), sorted(p.name for p in runs.rglob("*"))[:40]
        assert "num_threads: 1" in (run / "run_config.yaml").read_text()
        assert (runs / "logs" / f"{member}-seed0.log").is_file()
    table = (out / "table.md").read_text()
    assert "Chimera-ViT-B" in table and "| ViT-B" in table
    assert "2 runs, 2 at a time" in proc.stdout
