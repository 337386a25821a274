"""The scale-out recipes the README gives compose: DDP trainer, SLURM launcher, W&B logger."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.mark.parametrize("table", ["table2", "table3", "table6"])
def test_slurm_ddp_sweep_composes(table):
    overrides = [f"experiment={table}", "hydra/launcher=submitit_slurm", "trainer=ddp",
                 "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                 "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8",
                 "logger=wandb"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 8
    assert cfg.trainer.num_nodes == 2
    assert "wandb" in cfg.logger
