"""Checks of the installed environment (scripts/install.sh, shared/DESIGN.md section 4)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def _run(code: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the same venv); fail with its output on error."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc


def test_torch_pin():
    if not os.environ.get("CI"):
        pytest.skip("torch pin is enforced under CI only (CI env var unset)")
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    assert major_minor == "2.13", (
        f"torch {torch.__version__}; requirements/constraints.txt pins 2.13.0"
    )


def test_startup_does_not_import_torch():
    # The torchvision CPU fix is a lazy import hook: interpreter start-up must stay torch-free.
    proc = _run("import sys; print('torch' in sys.modules)", timeout=60)
    assert proc.stdout.strip() == "False"


def test_stack_imports_in_fresh_interpreter():
    # torchmetrics (and through it lightning, timm) imports torchvision; on a CPU-only torch with
    # the CUDA torchvision wheel this needs the import hook installed by scripts/install.sh.
    _run("import torchvision, timm, lightning, torchmetrics", timeout=300)


def test_torchvision_transforms_v2_on_tensor():
    from torchvision.transforms import v2

    torch.manual_seed(0)
    img = torch.rand(3, 32, 32)
    tf = v2.Compose(
        [
            v2.RandomResizedCrop(16, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        ]
    )
    out = tf(img)
    assert out.shape == (3, 16, 16)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_wandb_offline(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path / "config"),
        WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_DATA_DIR=str(tmp_path / "data"),
    )
    code = f"""
        import wandb
        run = wandb.init(dir={str(tmp_path)!r}, project="chimera-env-check")
        run.log({{"value": 1.0}})
        run.finish()
    """
    _run(code, timeout=120, env=env)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, f"no offline run written under {tmp_path / 'wandb'}"
