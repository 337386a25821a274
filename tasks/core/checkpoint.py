"""Checkpoints that a kill cannot corrupt, and the resume decision of a re-run.

:class:`AtomicCheckpointIO` writes ``<name>.tmp-<pid>`` next to the target, flushes it to disk
and renames it over the target (``os.replace`` is atomic on POSIX file systems), so a process
killed in the middle of a save leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with atomic local writes (remote paths: Lightning's own)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        fs = get_filesystem(path)
        if getattr(fs, "protocol", "file") not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """``<output_dir>/checkpoints/last.ckpt`` when it exists."""
    p = Path(output_dir) / "checkpoints" / "last.ckpt"
    return p if p.is_file() else None
