"""The shared experiment framework (tasks/core): resumable sweeps, exact resume after a real
kill, atomic checkpoints, clear failures, DDP on 2 CPU processes, the table aggregation.

The runs here are real (scripts/train.py in a subprocess, the tiny vision recipe with drop path,
mixup, RandAugment and EMA) on a few dozen Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks.core.checkpoint import atomic_torch_save
from tasks.core.data import EpochSampler, train_loader
from tasks.core.optim import build_optimizer, lr_factor
from tasks.vision.data import DEBIAN_FASHION_MNIST
from tests.helpers import ROOT, run_train

METRICS = "metrics.json"


@pytest.fixture(scope="module")
def fmnist_root(tmp_path_factory) -> str:
    if Path(DEBIAN_FASHION_MNIST).is_dir():
        return DEBIAN_FASHION_MNIST
    from tests.test_vision_data import fake_fmnist

    root = tmp_path_factory.mktemp("fmnist")
    fake_fmnist(root, n_train=200, n_test=60)
    return str(root)


def tiny_args(fmnist_root: str, log_dir: Path, *extra: str) -> list[str]:
    """A 2-epoch, 8-step run of the tiny Table 3 recipe (checkpoint every 2 steps)."""
    return ["experiment=vision/table3", "preset=vision/tiny", f"paths.log_dir={log_dir}",
            f"data.root={fmnist_root}", "data.download=false", "data.val_size=40",
            "data.subset_train=64", "data.subset_val=32", "data.subset_test=32",
            "data.batch_size=16", "data.eval_batch_size=32", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "callbacks.model_checkpoint.every_n_epochs=null",
            "+callbacks.model_checkpoint.every_n_train_steps=2", "num_threads=1", *extra]


def run_dir(log_dir: Path, member: str = "grid", seed: int = 0) -> Path:
    return log_dir / "vision_table3" / "tiny" / member / f"seed{seed}"


# --- §6 exact resume --------------------------------------------------------------------
def test_resume_after_sigkill_is_exact(fmnist_root, tmp_path):
    ref = run_train(tiny_args(fmnist_root, tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = json.loads((run_dir(tmp_path / "ref") / METRICS).read_text())

    killed_dir = tmp_path / "killed"
    kill = ["+callbacks.killer._target_=tests.helpers.KillAtStep", "+callbacks.killer.step=5",
            "run_independent=[callbacks.killer]"]
    proc = run_train(tiny_args(fmnist_root, killed_dir, *kill))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    out = run_dir(killed_dir)
    assert not (out / METRICS).exists() and (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4  # killed in the middle of the second epoch

    resumed = run_train(tiny_args(fmnist_root, killed_dir))  # the same command, re-run
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    got = json.loads((out / METRICS).read_text())
    assert got["global_step"] == expected["global_step"] == 8
    assert got["resumed_from"].endswith("last.ckpt")
    assert set(got["metrics"]) == set(expected["metrics"])
    for k, v in expected["metrics"].items():
        if k.startswith(("val/", "test/")):
            assert got["metrics"][k] == pytest.approx(v, abs=1e-6), k


def test_rerun_skips_finished_and_refuses_a_different_config(fmnist_root, tmp_path):
    args = tiny_args(fmnist_root, tmp_path, "trainer.max_epochs=1", "data.subset_train=32")
    first = run_train(args)
    assert first.returncode == 0, first.stderr[-3000:]
    metrics = run_dir(tmp_path) / METRICS
    stamp = metrics.stat().st_mtime_ns
    again = run_train(args)
    assert again.returncode == 0 and "skipped" in again.stdout
    assert metrics.stat().st_mtime_ns == stamp  # untouched
    other = run_train(args + ["model.optimizer.lr=0.1"])
    assert other.returncode == 2
    assert "different configuration" in other.stderr and "model.optimizer.lr" in other.stderr
    assert metrics.stat().st_mtime_ns == stamp


def test_atomic_checkpoint_survives_a_kill_during_save(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(3)}, target)
    # a child process starts writing a ~64 MB checkpoint over it and is SIGKILLed mid-write
    code = (
        "import os, signal, torch, sys\n"
        "from tasks.core.checkpoint import atomic_torch_save\n"
        "class Bomb:\n"
        "    def __reduce__(self):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"atomic_torch_save({{'big': torch.zeros(16_000_000), 'bomb': Bomb()}}, {str(target)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(target, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


# --- §5 sweeps that survive interruption --------------------------------------------------
def test_sweep_records_failure_continues_and_table_lists_it(fmnist_root, tmp_path):
    sweep = tmp_path / "runs"
    # Table 6 with one real member and one with a sharing mode that does not exist: the bad
    # member fails at model construction, the sweep carries on, the table lists the gaps
    args = ["-m", *tiny_args(fmnist_root, tmp_path, "trainer.max_epochs=1",
                             "data.subset_train=32"),
            "experiment=vision/table6", "model.net.sharing=diagonal,bogus", "seed=0",
            f"hydra.sweep.dir={sweep}"]
    proc = run_train(args)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (sweep / "diagonal" / "seed0" / METRICS).is_file()
    err = (sweep / "bogus" / "seed0" / "error.txt").read_text()
    assert "bogus" in err and not (sweep / "bogus" / "seed0" / METRICS).exists()
    assert "1 failed" in proc.stdout and "failed: bogus/seed0" in proc.stderr

    from tasks.core.tables import write_table

    md, runs = write_table("vision/table6", sweep, tmp_path / "table", "tiny", seeds=[0],
                           make_plot=False)
    status = {r.member: r.status for r in runs}
    assert status == {"none": "missing", "complete": "missing", "rowwise": "missing",
                      "diagonal": "done", "bogus": "failed"}
    assert "failed: `bogus/seed0`" in md and "missing: `rowwise/seed0`" in md
    assert "| Diagonal |" in md and "| 1/1 |" in md and "| 0/1 |" in md
    # re-running the same sweep skips the finished member
    again = run_train(args)
    assert "finished before, skipped" in again.stdout


# --- §9 failures users will hit -----------------------------------------------------------
@pytest.mark.parametrize("case,extra,code,needle", [
    ("missing data", ["data.root=/nonexistent/fmnist"], 2, "/nonexistent/fmnist"),
    ("unknown option", ["model.net.no_such_option=1"], 1, "no_such_option"),
    ("unknown topology", ["model.net.topology=hexagon"], 2, "hexagon"),
    ("unknown method", ["model.net.method=magic"], 2, "magic"),
    ("no tiny size", ["~model.sizes.tiny"], 2, "has no 'tiny' size"),
    ("no budget", ["trainer.max_epochs=null"], 2, "set trainer.max_epochs or trainer.max_steps"),
    ("nan input", ["+callbacks.bad._target_=tests.helpers.RaiseAtStep", "+callbacks.bad.step=1",
                   "+callbacks.bad.kind=nan_input"], 3, "NaN"),
    ("nan loss", ["+callbacks.bad._target_=tests.helpers.RaiseAtStep", "+callbacks.bad.step=1",
                  "+callbacks.bad.kind=nan_weights"], 3, "first module with a non-finite"),
    ("oom", ["+callbacks.bad._target_=tests.helpers.RaiseAtStep", "+callbacks.bad.step=1",
             "+callbacks.bad.kind=oom"], 4, "data.batch_size"),
])
def test_failures_give_one_clear_message(fmnist_root, tmp_path, case, extra, code, needle):
    proc = run_train(tiny_args(fmnist_root, tmp_path, "trainer.max_epochs=1",
                               "data.subset_train=32", *extra))
    assert proc.returncode == code, (case, proc.returncode, proc.stderr[-3000:])
    assert needle in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob(METRICS))


def test_a_model_without_the_presets_size_stops(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from tasks.core.driver import apply_model_size
    from tasks.core.errors import ConfigError

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vision/table2", "preset=vision/tiny"])
    with open_dict(cfg):
        del cfg.model.sizes["tiny"]
    with pytest.raises(ConfigError, match="has no 'tiny' size"):
        apply_model_size(cfg)


def test_nonfinite_checks_name_the_culprit():
    from torch import nn

    from tasks.core.errors import NonFiniteError, check_finite_batch, first_nonfinite_module

    with pytest.raises(NonFiniteError, match=r"input 'x' .* 1 NaN and 1 inf"):
        check_finite_batch({"x": torch.tensor([1.0, float("nan"), float("inf")]),
                            "y": torch.tensor([1])}, "step 3")
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[2].weight.fill_(float("inf"))
    x = torch.ones(1, 2)
    assert first_nonfinite_module(net, lambda: net(x)).startswith("2 (Linear)")


# --- §8 scale-out ---------------------------------------------------------------------------
def test_ddp_two_cpu_processes_match_one_process(fmnist_root, tmp_path):
    """2 gloo processes at batch 8 == 1 process at batch 16 (no random draws in training: no
    mixup, drop path or augmentation), and only rank 0 writes the run folder's results.
"""
    common = ["experiment=vision/table3", "preset=vision/tiny", f"data.root={fmnist_root}",
              "data.download=false", "data.val_size=40", "data.subset_train=64",
              "data.subset_val=32", "data.subset_test=32", "trainer.max_epochs=1",
              "trainer.enable_progress_bar=false", "model.mixup.prob=0",
              "model.mixup.label_smoothing=0", "model.net.drop_path_rate=0",
              "data.auto_augment=null", "data.re_prob=0", "data.hflip=0",
              "data.scale=[1.0,1.0]", "data.ratio=[1.0,1.0]", "logger=csv"]
    one = run_train(common + [f"paths.log_dir={tmp_path / 'one'}", "data.batch_size=16"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_train(common + [f"paths.log_dir={tmp_path / 'two'}", "data.batch_size=8",
                              "trainer=ddp_cpu", "trainer.devices=2"], timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((run_dir(tmp_path / "one") / METRICS).read_text())
    m2 = json.loads((run_dir(tmp_path / "two") / METRICS).read_text())
    assert m1["global_step"] == m2["global_step"] == 4
    for k in ("val/loss", "test/loss", "test/acc1"):
        assert m2["metrics"][k] == pytest.approx(m1["metrics"][k], rel=1e-5, abs=1e-6), k
    # one run folder, one metrics.json, one Hydra config; no stray folders from rank 1
    assert [p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob(METRICS)] == [
        Path("vision_table3/tiny/grid/seed0") / METRICS]
    assert len(list((tmp_path / "two").rglob(".hydra"))) == 1


def test_scale_out_configs_compose():
    from hydra import compose, initialize_config_dir

    overrides = ["experiment=vision/table2", "hydra/launcher=slurm", "trainer=ddp",
                 "trainer.num_nodes=2", "logger=wandb", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert launcher.max_num_timeout > 0  # requeued on time-out, resumed from last.ckpt
    assert cfg.trainer.strategy._target_.endswith("HydraDDPStrategy")
    assert cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2
    assert cfg.logger.wandb._target_.endswith("WandbLogger") and "csv" in cfg.logger


# --- §7 tracking ----------------------------------------------------------------------------
def test_wandb_falls_back_to_offline_without_key_or_network(monkeypatch, tmp_path, capsys):
    import time

    from tasks.core import tracking

    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(tracking.netrc, "netrc", lambda: (_ for _ in ()).throw(
        FileNotFoundError()))
    mode, notice = tracking.wandb_mode()
    assert mode == "offline" and "no API key" in notice
    # a key, but the server is unreachable (a closed local port): offline at once, no hang
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    t = time.time()
    mode, notice = tracking.wandb_mode()
    assert mode == "offline" and "not reachable" in notice and time.time() - t < 5
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    assert tracking.wandb_mode() == ("disabled", None)
    # the run id lives in the run dir: a resumed run continues the same W&B run
    first = tracking.wandb_run_id(tmp_path / "run")
    assert tracking.wandb_run_id(tmp_path / "run") == first
    node = tracking.prepare_wandb_kwargs({"project": "p"}, tmp_path / "run")
    assert node["id"] == first and node["resume"] == "allow"


def test_wandb_logger_run_offline_keeps_its_id_on_resume(fmnist_root, tmp_path):
    env = {"WANDB_MODE": None, "WANDB_API_KEY": None, "HOME": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "wcfg"), "WANDB_CACHE_DIR": str(tmp_path / "wc")}
    args = tiny_args(fmnist_root, tmp_path, "trainer.max_epochs=1", "data.subset_train=32",
                     "logger=wandb", "tags=[test]")
    proc = run_train(args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: no API key" in proc.stdout
    out = run_dir(tmp_path)
    run_id = (out / "wandb_id.txt").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert (out / "csv").is_dir() and (out / METRICS).is_file()  # tables never need W&B


# --- units ----------------------------------------------------------------------------------
def test_epoch_sampler_order_resume_and_sharding(monkeypatch):
    s = EpochSampler(10, seed=3, shuffle=True)
    s.set_epoch(1)
    full = [i for i, _ in s]
    assert sorted(full) == list(range(10)) and full == [i for i, _ in s]  # deterministic
    s.set_epoch(2)
    assert [i for i, _ in s] != full
    s.set_epoch(1)
    s.skip_next(4)
    assert [i for i, _ in s] == full[4:]
    ranks = []
    for r in range(2):
        monkeypatch.setattr("tasks.core.data._dist_info", lambda r=r: (r, 2))
        ranks.append([i for i, _ in s])
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]


def test_loader_augmentation_is_per_sample_and_keeps_torch_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(()) + i  # an "augmentation" drawing from the global RNG

    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = [b for b in train_loader(Noisy(), batch_size=4, seed=1)]
    assert torch.equal(torch.get_rng_state(), before)
    b = [b for b in train_loader(Noisy(), batch_size=4, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_schedules_and_no_decay_groups():
    assert lr_factor(0, 100, 10, "linear", 0.0, 0.0) == 0.0
    assert lr_factor(10, 100, 10, "linear") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", end=0.1) == pytest.approx(0.1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(net, "AdamW", lr=1e-3, weight_decay=0.05)
    decays = sorted((g["weight_decay"], len(g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 3), (0.05, 1)]  # only the Linear weight is decayed
    opt = build_optimizer(net, "DecoupledAdamW", lr=1e-3, weight_decay=1e-5, betas=[0.9, 0.98])
    assert sorted(g["decoupled_wd"] for g in opt.param_groups) == [0.0, 1e-5]
