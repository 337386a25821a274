"""The train/test driver behind ``scripts/train.py``: everything is built from the Hydra config.

``run(cfg)`` seeds, instantiates the DataModule, the LightningModule (with its network),
callbacks, loggers and the Trainer, fits, tests (when the data has a test split) and writes
``metrics.json`` into the run directory: the final-epoch validation and test metrics of the raw
and EMA weights plus what identifies the run (table row, topology, sharing, seed, preset).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from tasks.imagenet.data import DataNotFoundError
from tasks.imagenet.models import count_parameters

METRICS_FILE = "metrics.json"


def configure_wandb_env() -> None:
    """W&B is offline unless an API key is set (``WANDB_MODE`` set by the user wins)."""
    if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
        os.environ["WANDB_MODE"] = "offline"


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises a missing-data error as itself (its message
    says how to get the data), not wrapped in Hydra's ``InstantiationException``."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataNotFoundError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def _hydra_choices() -> dict[str, str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items()
                if v is not None and not k.startswith("hydra/")}
    except Exception:  # not running under Hydra (e.g. a test composing the config)
        return {}


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; returns the dict written to ``metrics.json``."""
    return train(cfg)[0]


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`run`, also returning the objects it built (``datamodule``, ``model``,
    ``trainer``) for callers that need them (tests, notebooks)."""
    t_start = time.time()
    configure_wandb_env()
    # the EMA copy of the network is kept in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of")
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # a missing dataset stops the run here, before the model is built
    model = instantiate(cfg.model)
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net_cfg = cfg.model.get("net", {})
    choices = _hydra_choices()
    result: dict[str, Any] = {
        "name": cfg.model.get("name") or choices.get("model", ""),
        "model_name": net_cfg.get("model_name"),
        "topology": net_cfg.get("topology"),
        "sharing": net_cfg.get("sharing"),
        "seed": cfg.get("seed"),
        "task": cfg.get("task_name"),
        "preset": choices.get("preset"),
        "experiment": choices.get("experiment"),
        "data": choices.get("data") or cfg.data.get("_target_"),
        "params": count_parameters(model.net),
        "config": OmegaConf.to_container(
            OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True),
    }

    metrics: dict[str, float] = {}
    t_fit = time.time()
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics.update(_scalars(trainer.callback_metrics))
    result["fit_time_s"] = time.time() - t_fit
    result["epochs"] = trainer.current_epoch
    result["global_step"] = trainer.global_step

    if cfg.get("test", True) and getattr(datamodule, "has_test", False):
        ckpt = None if cfg.get("train", True) else cfg.get("ckpt_path")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update(_scalars(trainer.callback_metrics))
    result["metrics"] = dict(sorted(metrics.items()))
    result["total_time_s"] = time.time() - t_start

    if trainer.is_global_zero:
        with open(out_dir / METRICS_FILE, "w") as f:
            json.dump(result, f, indent=2, default=str)
        summary = {k: round(v, 4) for k, v in result["metrics"].items()
                   if k.split("/")[-1] in ("acc1", "acc5", "ema_acc1", "ema_acc5")}
        print(f"[{result['name']} topology={result['topology']} sharing={result['sharing']} "
              f"seed={result['seed']}] {summary}  ({result['total_time_s']:.0f} s) -> "
              f"{out_dir / METRICS_FILE}", flush=True)
    return result, {"datamodule": datamodule, "model": model, "trainer": trainer}
