"""Hydra configs of the vision experiments: composition, one fast_dev_run per sweep member,
checkpoint round trip, and the error for a missing ImageNet root."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from tasks.imagenet.data import DEBIAN_FASHION_MNIST, DataNotFoundError
from tasks.imagenet.module import ImageClassifier, warmup_cosine
from tasks.imagenet.run import METRICS_FILE, train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TABLES = ("table2", "table3", "table6")
EXPECTED_MEMBERS = {
    "table2": {("model", "chimera_vit_b"), ("model", "vit_b")},
    "table3": {("topology", t) for t in ("grid", "flat_fwd_rev", "flat_fwd")},
    "table6": {("model.net.sharing", s) for s in ("none", "complete", "rowwise", "diagonal")},
}


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def sweep_members(experiment: str) -> list[dict[str, str]]:
    cfg = compose_cfg([f"experiment={experiment}"])
    params = cfg.hydra.sweeper.params
    keys = [k for k in params if k != "seed"]
    values = [str(params[k]).split(",") for k in keys]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


MEMBERS = [(t, m) for t in TABLES for m in sweep_members(t)]


def member_id(p):
    return p if isinstance(p, str) else "-".join(p.values())


def test_sweeps_are_the_paper_tables():
    for t in TABLES:
        members = sweep_members(t)
        assert {kv for m in members for kv in m.items()} == EXPECTED_MEMBERS[t]


@pytest.mark.parametrize("preset", ["paper", "tiny"])
@pytest.mark.parametrize("table,member", MEMBERS, ids=member_id)
def test_experiment_member_composes(table, member, preset):
    cfg = compose_cfg([f"experiment={table}", f"preset={preset}"]
                      + [f"{k}={v}" for k, v in member.items()])
    net, model, data = cfg.model.net, cfg.model, cfg.data
    assert cfg.task_name == table
    is_chimera = net.model_name.startswith("chimera_vit")
    if preset == "paper":
        assert data._target_.endswith("ImageNetDataModule") and data.img_size == 224
        assert net.patch_size == 16 and cfg.trainer.max_epochs == 310
        assert model.ema.decay == 0.99996 and model.optimizer.lr == 1e-3
        width = {"table2": 768}.get(table, 384)
        assert net.embed_dim == width
        if is_chimera:
            assert net.depth == 22 and net.d_state == 64
            assert net.num_heads == (12 if table == "table2" else 3)
    else:
        assert data._target_.endswith("FashionMNISTDataModule") and data.in_chans == 1
        assert net.patch_size == 4 and data.subset_train is not None
    assert data.auto_augment == "rand-m9-mstd0.5-inc1" and data.re_prob == 0.25
    assert model.ema.enabled and model.optimizer.weight_decay == 0.05
    if is_chimera:
        assert (model.mixup.mixup_alpha, model.mixup.cutmix_alpha) == (0.8, 0.1)
        assert model.mixup.label_smoothing == 0.25
        assert net.topology == member.get("topology", "grid")
        assert net.sharing == member.get("model.net.sharing", "diagonal")
    else:
        assert (model.mixup.mixup_alpha, model.mixup.cutmix_alpha) == (0.8, 1.0)
        assert model.mixup.label_smoothing == 0.1 and "topology" not in net


@pytest.mark.parametrize("overrides", [
    ["model=chimera_vit_tiny", "data=fake"], ["model=vit_tiny", "data=fake"],
    ["model=vit_s"], ["model=chimera_vit_s", "topology=flat_fwd"],
    ["trainer=gpu"], ["trainer=ddp"], ["logger=wandb"], ["logger=many"], ["debug=fdr"],
    ["callbacks=none"], ["preset=tiny", "model=vit_s"], ["data=fashion_mnist"],
])
def test_other_configs_compose(overrides):
    cfg = compose_cfg(overrides)
    assert cfg.model._target_.endswith("ImageClassifier")


def test_tiny_table2_models_are_parameter_matched():
    counts = {}
    for m in ("chimera_vit_b", "vit_b"):
        cfg = compose_cfg(["experiment=table2", "preset=tiny", f"model={m}"])
        counts[m] = sum(p.numel() for p in instantiate(cfg.model.net).parameters())
    assert abs(counts["chimera_vit_b"] / counts["vit_b"] - 1) < 0.1, counts


def _small_data_overrides(tmp_path: Path) -> list[str]:
    """Tiny preset data, cut to a few dozen images; the real Fashion-MNIST files when present,
    else generated IDX files (so the real loader path runs either way)."""
    root = DEBIAN_FASHION_MNIST
    if not Path(root).is_dir():
        from tests.test_vision_data import fake_fmnist

        root = str(tmp_path / "fmnist")
        fake_fmnist(Path(root), n_train=120, n_test=40)
    return [f"data.root={root}", "data.download=false", "data.val_size=40",
            "data.subset_train=32", "data.subset_val=16", "data.subset_test=16",
            "data.batch_size=16", "data.eval_batch_size=16", "logger=csv"]


@pytest.mark.parametrize("table,member", MEMBERS, ids=member_id)
def test_fast_dev_run_per_sweep_member(table, member, tmp_path):
    cfg = compose_cfg([f"experiment={table}", "preset=tiny", "debug=fdr"]
                      + [f"{k}={v}" for k, v in member.items()]
                      + _small_data_overrides(tmp_path), output_dir=tmp_path)
    result, objs = train(cfg)
    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    for split in ("val", "test"):
        for k in ("acc1", "acc5", "ema_acc1", "ema_acc5"):
            assert 0.0 <= saved["metrics"][f"{split}/{k}"] <= 1.0
    assert saved["task"] == table and saved["global_step"] == 1
    assert saved["name"] == cfg.model.name and saved["params"] > 0
    if "topology" in member:
        assert saved["topology"] == member["topology"]
    if "model.net.sharing" in member:
        assert saved["sharing"] == member["model.net.sharing"]


def test_checkpoint_roundtrip_identical_logits(tmp_path):
    cfg = compose_cfg(["experiment=table3", "preset=tiny", "trainer.max_epochs=1",
                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                       "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]
                      + _small_data_overrides(tmp_path), output_dir=tmp_path)
    result, objs = train(cfg)
    model: ImageClassifier = objs["model"]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and result["global_step"] == 2

    reloaded = ImageClassifier.load_from_checkpoint(ckpt, net=instantiate(cfg.model.net))
    model.eval()
    reloaded.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.net(x), reloaded.net(x))
        assert torch.equal(model.ema.module(x), reloaded.ema.module(x))
        assert not torch.equal(model.net(x), model.ema.module(x))  # EMA lags the raw weights
    assert reloaded.hparams.name == "chimera_vit_s" and reloaded.mix_cfg["cutmix_alpha"] == 0.1


def test_bad_imagenet_root_stops_with_clear_error(tmp_path):
    missing = tmp_path / "no-imagenet"
    cfg = compose_cfg(["experiment=table2", f"data.root={missing}"], output_dir=tmp_path)
    with pytest.raises(DataNotFoundError) as e:
        train(cfg)
    msg = str(e.value)
    assert str(missing) in msg and "data.root" in msg and "PRESET=tiny" in msg


def test_bad_imagenet_root_cli_and_make(tmp_path):
    missing = tmp_path / "no-imagenet"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                           f"data.root={missing}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(missing) in proc.stderr and "PRESET=tiny" in proc.stderr
    assert "Traceback" not in proc.stderr
    # make: stops at once (no Python started), naming both ways forward; -o install: skip it
    proc = subprocess.run(["make", "-s", "-o", "install", "reproduce-table3",
                           f"DATA_ROOT={missing}"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert proc.returncode != 0
    assert str(missing) in proc.stderr and "DATA_ROOT" in proc.stderr
    assert "PRESET=tiny" in proc.stderr


def test_warmup_cosine_schedule():
    lr, wlr, mlr = 1e-3, 1e-6, 1e-5
    f = [warmup_cosine(s, 100, 10, lr, wlr, mlr) * lr for s in range(101)]
    assert f[0] == pytest.approx(wlr) and f[10] == pytest.approx(lr)
    assert f[100] == pytest.approx(mlr) and f[55] == pytest.approx((lr + mlr) / 2)
    assert all(a <= b + 1e-12 for a, b in zip(f[:10], f[1:11], strict=True))  # warm-up rises
    assert all(a >= b - 1e-12 for a, b in zip(f[10:100], f[11:101], strict=True))  # cosine falls
    assert np.isfinite(f).all()


def test_wandb_is_offline_without_api_key(monkeypatch):
    from tasks.imagenet.run import configure_wandb_env

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    configure_wandb_env()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE")
    configure_wandb_env()
    assert "WANDB_MODE" not in os.environ
    cfg = compose_cfg(["logger=wandb"])
    assert cfg.logger.wandb._target_.endswith("WandbLogger") and cfg.logger.wandb.offline is False


@pytest.mark.slow
def test_multirun_sweep_and_aggregation_end_to_end(tmp_path):
    """The path `make reproduce-table2 PRESET=tiny` takes: a Hydra multirun (2 models x 2 seeds,
    fast_dev_run on a few images), then the aggregation script."""
    sweep = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "experiment=table2",
           "preset=tiny", "debug=fdr", "seed=range(0,2)", f"hydra.sweep.dir={sweep}"]
    cmd += _small_data_overrides(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted(sweep.rglob(METRICS_FILE))
    assert len(runs) == 4
    assert {json.loads(p.read_text())["name"] for p in runs} == {"chimera_vit_b", "vit_b"}
    out = tmp_path / "table"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "aggregate_tables.py"),
                           "--table", "2", "--runs", str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    md = (out / "table.md").read_text()
    assert "| Chimera-ViT-B | " in md and "| 2 |" in md and "81.4" in md
