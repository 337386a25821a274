"""Test-only pieces injected into real runs through Hydra overrides."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class KillAtStep(L.Callback):
    """SIGKILL this process (no clean-up, no final checkpoint) once ``step`` optimizer steps
    are done: the way a pre-empted or crashed job dies."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RaiseAtStep(L.Callback):
    """Raise ``kind`` ("oom" or "nan_input") at ``step``, as a failing run would."""

    def __init__(self, step: int, kind: str) -> None:
        self.step, self.kind = step, kind

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step < self.step:
            return
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.kind == "nan_input":
            batch[0][0, 0, 0, 0] = float("nan")  # the module's check runs after this hook
        if self.kind == "nan_weights":  # the loss becomes NaN: the module must name a module
            with torch.no_grad():
                next(pl_module.net.parameters()).fill_(float("nan"))


def run_train(args: list[str], timeout: int = 600, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    """``python scripts/train.py <args>`` in a subprocess, from the repository root."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
                "HYDRA_FULL_ERROR": "0"}
    for k, v in (env or {}).items():  # None removes a variable
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def run_interpreted(worker: str, cases: Any, timeout: int = 300) -> Any:
    """Run the Python source ``worker`` (which reads ``json(cases)`` from ``sys.argv[1]`` and
    prints one ``RESULT<json>`` line) in a subprocess with ``TRITON_INTERPRET=1``: the flag must
    be set before Triton is imported, so the interpreter tests cannot run in-process."""
    import json

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", worker, json.dumps(cases)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout}\n{proc.stderr}"
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
