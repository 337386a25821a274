"""Optimizers and learning-rate schedules shared by every task.

- :func:`build_optimizer`: any ``torch.optim`` class (or ``DecoupledAdamW``) from the config,
  with timm's no-weight-decay grouping (1-D parameters such as norms and biases, and the names
  in the network's ``no_weight_decay()``) - ``timm.optim.param_groups_weight_decay``.
- :func:`lr_factor`: linear warm-up then cosine, linear or constant decay, counted in
  optimizer steps; :func:`schedule_steps` converts a warm-up given in epochs, steps or as a
  fraction of the run into steps, so the vision recipe (epoch-based cosine) and the MLM recipe
  (step-based linear decay with 6% warm-up) are two configs of one schedule.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from tasks.core.errors import ConfigError

Decay = Literal["cosine", "linear", "constant"]
Unit = Literal["epochs", "steps", "fraction"]


class DecoupledAdamW(torch.optim.AdamW):
    """AdamW whose weight decay is *not* multiplied by the learning rate's schedule factor.

    Loshchilov & Hutter's decoupled decay as MosaicML's M2-BERT recipe uses it (composer's
    ``DecoupledAdamW``): the step decays ``w <- w - (lr_t / lr_0) * wd * w``, so ``wd`` is an
    absolute per-step rate at the peak learning rate (1e-5 in the MLM recipe) rather than a
    coefficient multiplied by ``lr`` as in ``torch.optim.AdamW``.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-6, weight_decay: float = 1e-5) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=0.0)
        for g in self.param_groups:
            g.setdefault("decoupled_wd", weight_decay)
            g["initial_lr_wd"] = g["lr"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for g in self.param_groups:
            wd = g.get("decoupled_wd", 0.0)
            if wd:
                factor = g["lr"] / g["initial_lr_wd"]
                for p in g["params"]:
                    if p.grad is not None:
                        p.mul_(1.0 - factor * wd)
        return super().step(closure)


def _resolve_class(name: str) -> type:
    if name == "DecoupledAdamW":
        return DecoupledAdamW
    if "." not in name:
        if not hasattr(torch.optim, name):
            raise ConfigError(f"unknown optimizer {name!r}: give a torch.optim class name "
                              f"(AdamW, Adam, SGD, ...), DecoupledAdamW, or a dotted path")
        return getattr(torch.optim, name)
    mod, _, cls = name.rpartition(".")
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import optimizer {name!r}: {e}") from e


def build_optimizer(net: nn.Module, name: str = "AdamW", lr: float = 1e-3,
                    weight_decay: float = 0.0, **kwargs: Any) -> torch.optim.Optimizer:
    """``name`` over ``net``'s parameters, with no decay on 1-D parameters and the names in
    ``net.no_weight_decay()`` (DeiT/timm convention)."""
    skip = set(net.no_weight_decay()) if hasattr(net, "no_weight_decay") else set()
    groups = param_groups_weight_decay(net, weight_decay=weight_decay, no_weight_decay_list=skip)
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    cls = _resolve_class(name)
    if cls is DecoupledAdamW:
        for g in groups:  # per-group decay: 0 for the no-decay group
            g["decoupled_wd"] = g.pop("weight_decay")
        return cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    return cls(groups, lr=lr, **kwargs)


def lr_factor(step: int, total: int, warmup: int, decay: Decay = "cosine",
              warmup_start: float = 0.0, end: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` of ``total``.

    Linear warm-up from ``warmup_start`` to 1 over ``warmup`` steps, then ``decay`` from 1 to
    ``end`` at step ``total`` (factors relative to the peak).
    """
    if warmup > 0 and step < warmup:
        return warmup_start + (1.0 - warmup_start) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return end + 0.5 * (1.0 - end) * (1.0 + math.cos(math.pi * t))
    if decay == "linear":
        return 1.0 - (1.0 - end) * t
    if decay == "constant":
        return 1.0
    raise ConfigError(f"unknown lr decay {decay!r}; choose cosine, linear or constant")


def schedule_steps(warmup: float, unit: Unit, total_steps: int, steps_per_epoch: float) -> int:
    """The warm-up length in optimizer steps."""
    if unit == "epochs":
        return int(round(warmup * steps_per_epoch))
    if unit == "steps":
        return int(warmup)
    if unit == "fraction":
        if not 0.0 <= warmup <= 1.0:
            raise ConfigError(f"a warm-up fraction must lie in [0, 1], got {warmup}")
        return int(round(warmup * total_steps))
    raise ConfigError(f"unknown warm-up unit {unit!r}; choose epochs, steps or fraction")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_steps: int,
                    steps_per_epoch: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` from ``cfg``: ``decay``, ``warmup``, ``warmup_unit``,
    ``warmup_lr`` and ``min_lr`` (absolute learning rates; the peak is the optimizer's lr)."""
    known = {"decay", "warmup", "warmup_unit", "warmup_lr", "min_lr"}
    unknown = set(cfg) - known
    if unknown:
        raise ConfigError(f"unknown scheduler keys {sorted(unknown)}; expected {sorted(known)}")
    peak = optimizer.param_groups[0]["lr"]
    warm = schedule_steps(float(cfg.get("warmup", 0.0)), cfg.get("warmup_unit", "epochs"),
                          total_steps, steps_per_epoch)
    decay = cfg.get("decay", "cosine")
    start = float(cfg.get("warmup_lr", 0.0)) / peak
    end = float(cfg.get("min_lr", 0.0)) / peak
    lr_factor(0, total_steps, warm, decay, start, end)  # validates ``decay`` now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warm, decay, start, end))
