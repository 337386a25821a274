"""Failures a user will hit, each with one clear message and its own exit code.

The driver (:mod:`tasks.core.driver`) turns these, and the library's ``ValueError``s that
surface through Hydra's instantiation, into ``error: <message>`` on stderr and a non-zero exit;
nothing half-written (``metrics.json``, tables) is left behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


class RunError(Exception):
    """Base class: a failure with a message meant for the user, and an exit code."""

    exit_code = 1


class ConfigError(RunError, ValueError):
    """The configuration is inconsistent (e.g. a model without a size for the preset)."""

    exit_code = 2


class DataNotFoundError(RunError, FileNotFoundError):
    """A dataset is missing at the configured path; the message says how to get it."""

    exit_code = 2


class NonFiniteError(RunError, FloatingPointError):
    """A NaN or inf in an input batch or in the loss."""

    exit_code = 3


class OutOfMemory(RunError, MemoryError):
    """Out of (GPU or host) memory, with hints on what to change."""

    exit_code = 4


OOM_HINT = (
    "Ways forward: a smaller data.batch_size (with trainer.accumulate_grad_batches to keep the "
    "global batch), a linear-memory resolvent (model.net.method=dag_scan, or ssd on lines), "
    "trainer.precision=bf16-mixed on GPU, or fewer/narrower layers.")


def is_oom(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator failing ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "out of memory" in str(exc).lower() or "can't allocate memory" in str(exc))


def _walk_tensors(obj: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """Floating-point tensors in a batch (tensors, mappings, sequences, PyG ``Data``)."""
    if isinstance(obj, Tensor):
        return [(prefix or "batch", obj)] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        items = enumerate(obj)
    elif hasattr(obj, "to_dict") and callable(obj.to_dict):  # torch_geometric Data / Batch
        items = obj.to_dict().items()
    else:
        return []
    out = []
    for k, v in items:
        out += _walk_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def check_finite_batch(batch: Any, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first floating tensor with NaN/inf."""
    for name, t in _walk_tensors(batch):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise NonFiniteError(
                f"{where}: input '{name}' (shape {tuple(t.shape)}) holds {n_nan} NaN and {n_inf} "
                f"inf values. Check the data source and its preprocessing; the model was not run "
                f"on this batch.")


def first_nonfinite_module(model: nn.Module, run: Any) -> str | None:
    """Run ``run()`` (a forward pass) with hooks and name the first module, in execution order,
    whose output holds a NaN or inf; ``None`` when every output is finite."""
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        if found:
            return
        for _, t in _walk_tensors(out):
            if not bool(torch.isfinite(t).all()):
                found.append(f"{names.get(mod, '?') or '<root>'} ({type(mod).__name__})")
                return

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            run()
    except Exception:  # the diagnosis must never hide the original error
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None
