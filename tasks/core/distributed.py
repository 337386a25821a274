"""DDP under Hydra without duplicate run folders.

Lightning's script launcher starts ranks 1..n-1 by re-running the command line. Under Hydra it
re-runs ``sys.argv`` - inside a multirun that is the *whole sweep* (``-m ...``) again in every
child, with run folders of their own. :class:`HydraDDPStrategy` starts the children from the
config rank 0 actually runs (``<run dir>/run_config.yaml``, written by the driver after the
model size is merged and the overrides applied), in the same run directory, with
``hydra.output_subdir=null`` so that only rank 0 writes the Hydra files. Outside
Hydra, or when the cluster starts the processes (SLURM, torchrun), it is Lightning's DDP as is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def _hydra_job_dirs() -> tuple[Path, Path] | None:
    """``(run dir, folder of run_config.yaml)`` of the current Hydra job, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    if not HydraConfig.initialized():
        return None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not (run_dir / "run_config.yaml").is_file():
        return None
    return run_dir, run_dir


class _HydraJobLauncher(_SubprocessScriptLauncher):
    def _call_children_scripts(self) -> None:
        dirs = _hydra_job_dirs()
        if dirs is None:
            return super()._call_children_scripts()
        self._check_can_spawn_children()
        run_dir, cfg_dir = dirs
        env = self.cluster_environment
        os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port),
                          NODE_RANK=str(env.node_rank()), LOCAL_RANK=str(env.local_rank()),
                          WORLD_SIZE=str(self.num_processes * self.num_nodes))
        script = os.path.abspath(sys.argv[0])
        self.procs = []
        for local_rank in range(1, self.num_processes):
            child_env = {**os.environ, "LOCAL_RANK": str(local_rank)}
            cmd = [sys.executable, script, "--config-path", str(cfg_dir),
                   "--config-name", "run_config", f"hydra.run.dir={run_dir}",
                   "hydra.output_subdir=null", f"hydra.job.name=ddp_rank{local_rank}"]
            self.procs.append(subprocess.Popen(cmd, env=child_env, cwd=os.getcwd()))


class HydraDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose child processes re-run the Hydra job, not the command line."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _HydraJobLauncher(self.cluster_environment, self.num_processes,
                                               self.num_nodes)
