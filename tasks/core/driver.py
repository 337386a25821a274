"""The run driver behind ``scripts/train.py``; it knows no task.

``run(cfg)``: resolve the config (the model's size for the preset) -> look at the run
directory (skip a finished run, resume an unfinished one, refuse a folder that holds a
different config) -> seed -> data module (``prepare_data`` first, so a missing dataset stops
the run before anything is built) -> Lightning module -> callbacks -> loggers -> Trainer (with
atomic checkpoint writes) -> fit -> test -> ``metrics.json`` (written atomically, rank 0 only).

What identifies a run comes from the config: ``task_name``, ``member`` (the sweep member /
table row), ``seed``, ``preset_name``, ``tags`` and the free-form ``meta`` mapping. The value
returned to Hydra (for sweepers) is the metric named by ``optimized_metric``.

:func:`main` is the failure wrapper (in the spirit of lightning-hydra-template's
``task_wrapper``): a failing run records ``error.txt`` in its run directory, loggers are closed
either way, and the error is printed as one line and turned into a non-zero exit - except inside
a multirun, where the sweep carries on and :class:`tasks.core.sweep.SweepSummary` reports
the failed members at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.errors import InstantiationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from chimera.models.text import count_parameters
from tasks.core.checkpoint import AtomicCheckpointIO, last_checkpoint
from tasks.core.errors import OOM_HINT, ConfigError, OutOfMemory, RunError, is_oom
from tasks.core.tracking import finish_wandb, prepare_wandb_kwargs

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"
FINGERPRINT_FILE = "config_fingerprint.json"
RUN_CONFIG_FILE = "run_config.yaml"
# keys that do not change what a run computes: a re-run may differ in them and still resume
RUN_INDEPENDENT_KEYS = ("hydra", "paths", "ckpt_path", "logger", "overwrite", "resume", "tags",
                        "num_threads",
                        "trainer.enable_progress_bar", "trainer.devices", "trainer.num_nodes",
                        "trainer.strategy", "trainer.accelerator", "data.num_workers",
                        "data.persistent_workers", "data.pin_memory", "table", "run_independent",
                        "callbacks.model_checkpoint", "model_size",
                        "model_size_applied")  # the merged model says it


# --- configuration ------------------------------------------------------------------------
def _command_line_overrides(cfg: DictConfig) -> list[Any]:
    """The run's command-line overrides of config values (not of config groups)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if "hydra" in cfg and cfg.hydra.get("overrides") is not None:
        task = list(cfg.hydra.overrides.task)
    elif HydraConfig.initialized():
        task = list(HydraConfig.get().overrides.task)
    else:
        return []
    return OverridesParser.create().parse_overrides(task)


def apply_model_size(cfg: DictConfig) -> DictConfig:
    """Merge ``model.sizes[cfg.model_size]`` into ``model`` and drop ``model.sizes``.

    A preset that asks for a size the model does not define stops with an error: a tiny run
    must never silently train the full-size model. Command-line overrides of ``model.*`` are
    applied again afterwards, so they win over the size, as they win over everything else.
    """
    size = cfg.get("model_size")
    sizes = cfg.model.get("sizes") if "model" in cfg else None
    with open_dict(cfg):
        if size not in (None, "", "paper") and cfg.get("model_size_applied") != size:
            if not sizes or size not in sizes:
                have = sorted(sizes) if sizes else []
                raise ConfigError(
                    f"model {cfg.model.get('name', '?')!r} has no {size!r} size (the preset asks "
                    f"for model_size={size}); it defines {have or 'no sizes'}. Add "
                    f"sizes.{size} to its config under conf/model/, or choose a preset/model "
                    f"that has one.")
            cfg.model = OmegaConf.merge(cfg.model, sizes[size])
            for o in _command_line_overrides(cfg):
                key = o.key_or_group
                if not key.startswith("model.") or key.startswith("model.sizes"):
                    continue
                if o.is_delete():
                    parent, _, leaf = key.rpartition(".")
                    node = OmegaConf.select(cfg, parent)
                    if node is not None and leaf in node:
                        del node[leaf]
                else:
                    OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)
            cfg.model_size_applied = size  # idempotent: a second call changes nothing
        if "model" in cfg and "sizes" in cfg.model:
            del cfg.model["sizes"]
    return cfg


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _job_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the ``hydra`` node (present when composed with the compose API)."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def _drop(flat: dict[str, Any], keys: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if not any(k == x or k.startswith(x + ".")
                                                     for x in keys)}


def run_fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, flattened, minus :data:`RUN_INDEPENDENT_KEYS` and the config's own
    ``run_independent`` list (e.g. a monitoring callback added for one attempt)."""
    flat = _flatten(OmegaConf.to_container(_job_config(cfg), resolve=True))
    extra = list(cfg.get("run_independent") or [])
    return {"config": _drop(flat, RUN_INDEPENDENT_KEYS + tuple(extra)), "ignore": extra}


def _fingerprint_diff(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
            for k in keys if old.get(k) != new.get(k)]
    return diff[:limit] + ([f"... and {len(diff) - limit} more"] if len(diff) > limit else [])


def inspect_run_dir(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> str:
    """``"done"``, ``"resume"`` or ``"fresh"``; raises when ``out`` holds a different run."""
    fp_file = out / FINGERPRINT_FILE
    has_work = (out / METRICS_FILE).is_file() or last_checkpoint(out) is not None
    if overwrite and has_work:
        for name in (METRICS_FILE, ERROR_FILE, FINGERPRINT_FILE, "checkpoints"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return "fresh"
    if has_work and fp_file.is_file():
        old = json.loads(fp_file.read_text())
        ignore = list(old.get("ignore", [])) + list(fingerprint["ignore"])
        a, b = _drop(old.get("config", {}), ignore), _drop(fingerprint["config"], ignore)
        if a != b:
            diff = "; ".join(_fingerprint_diff(a, b))
            raise ConfigError(
                f"the run directory {out} holds a run of a different configuration ({diff}). "
                f"Give this run its own directory (e.g. member=<name> or hydra.run.dir=...), "
                f"or replace the old run with overwrite=true.")
    if (out / METRICS_FILE).is_file():
        return "done"
    return "resume" if last_checkpoint(out) is not None else "fresh"


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


# --- instantiation ------------------------------------------------------------------------
def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises the root cause of a failed instantiation
    when it is a user-facing error (missing data, a bad option value), not Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None:
            if isinstance(cause, RunError | ValueError | KeyError | TypeError):
                raise cause from None
            cause = cause.__cause__
        raise


def _instantiate_group(node: DictConfig | None) -> list[Any]:
    if not node:
        return []
    return [instantiate(c) for c in node.values() if isinstance(c, DictConfig) and "_target_" in c]


def _instantiate_loggers(node: DictConfig | None, out: Path) -> list[Any]:
    loggers = []
    for c in (node or {}).values():
        if not isinstance(c, DictConfig) or "_target_" not in c:
            continue
        if c._target_.endswith("WandbLogger"):
            kwargs = prepare_wandb_kwargs(OmegaConf.to_container(c, resolve=True), out)
            loggers.append(hydra.utils.instantiate(kwargs))
        else:
            loggers.append(instantiate(c))
    return loggers


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, int | float):
            out[k] = float(v)
    return out


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What identifies the run in ``metrics.json`` and in the tables (no task keys)."""
    meta = cfg.get("meta")
    meta = OmegaConf.to_container(meta, resolve=True) if meta else {}
    return {"task": cfg.get("task_name"), "member": cfg.get("member"), "seed": cfg.get("seed"),
            "preset": cfg.get("preset_name"), "tags": list(cfg.get("tags") or []),
            "name": cfg.model.get("name"), "meta": meta}


# --- the run ------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; returns the dict written to ``metrics.json``."""
    return train(cfg)[0]


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`run`, also returning the objects it built (``datamodule``, ``model``,
    ``trainer``; empty when a finished run is skipped) for tests and notebooks."""
    import lightning as L

    t_start = time.time()
    cfg = apply_model_size(cfg)
    out = Path(cfg.paths.output_dir)
    is_zero = rank_zero_only.rank == 0
    fingerprint = run_fingerprint(cfg)
    state = inspect_run_dir(out, fingerprint, bool(cfg.get("overwrite", False)) and is_zero)
    if state == "done" and cfg.get("skip_done", True):
        result = json.loads((out / METRICS_FILE).read_text())
        print(f"[{cfg.get('member')} seed={cfg.get('seed')}] finished before, skipped "
              f"({out / METRICS_FILE})", flush=True)
        return result, {}
    if is_zero:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / FINGERPRINT_FILE, fingerprint)
        (out / ERROR_FILE).unlink(missing_ok=True)
        # the config as run (size merged, overrides applied): DDP children start from it
        run_cfg = _job_config(cfg)
        with open_dict(run_cfg):
            run_cfg.model_size = None
        OmegaConf.save(run_cfg, out / RUN_CONFIG_FILE)

    t = cfg.trainer
    if (cfg.get("train", True) and t.get("max_epochs") is None
            and t.get("max_steps", -1) in (None, -1) and not t.get("fast_dev_run")):
        raise ConfigError("the run has no budget: set trainer.max_epochs or trainer.max_steps in "
                          "the experiment (or preset); the generic trainer config sets neither")

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "last" or (ckpt_path is None and state == "resume"
                               and cfg.get("resume", True)):
        found = last_checkpoint(out)
        if found is None and ckpt_path == "last":
            raise ConfigError(f"ckpt_path=last but {out}/checkpoints/last.ckpt does not exist")
        ckpt_path = str(found) if found else None
        if ckpt_path:
            print(f"resuming from {ckpt_path}", flush=True)
    elif ckpt_path is not None and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file")

    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    # the EMA copy of the network is kept in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of")
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision(cfg.get("matmul_precision", "high"))

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # a missing dataset stops the run here, before the model
    # plain dicts/lists (not DictConfig) reach the module, so its hyperparameters in a checkpoint
    # load with torch.load(weights_only=True)
    model = instantiate(cfg.model, _convert_="all")
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_loggers(cfg.get("logger"), out)
    from lightning.pytorch.plugins.io import CheckpointIO

    plugins = [instantiate(p) for p in (cfg.trainer.get("plugins") or [])]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())  # a kill during a save keeps the last good one
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=plugins)
    resolved = OmegaConf.to_container(_job_config(cfg), resolve=True)
    for lg in loggers:
        lg.log_hyperparams(resolved)

    result: dict[str, Any] = {**identity(cfg),
                              "params": count_parameters(model.net, trainable_only=True),
                              "config": resolved, "resumed_from": ckpt_path}
    metrics: dict[str, float] = {}
    t_fit = time.time()
    try:
        if cfg.get("train", True):
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            metrics.update(_scalars(trainer.callback_metrics))
        result["fit_time_s"] = time.time() - t_fit
        result["epochs"] = trainer.current_epoch
        result["global_step"] = trainer.global_step
        if cfg.get("test", True) and getattr(datamodule, "has_test", True):
            ckpt = None if cfg.get("train", True) else ckpt_path
            trainer.test(model, datamodule=datamodule, ckpt_path=ckpt)
            metrics.update(_scalars(trainer.callback_metrics))
    except BaseException as e:
        if is_oom(e) and not isinstance(e, RunError):
            raise OutOfMemory(f"out of memory ({str(e).splitlines()[0][:200]}). {OOM_HINT}") from e
        raise
    result["metrics"] = dict(sorted(metrics.items()))
    result["total_time_s"] = time.time() - t_start

    if trainer.is_global_zero:
        _write_json_atomic(out / METRICS_FILE, result)
        key = cfg.get("optimized_metric")
        shown = {k: round(v, 4) for k, v in result["metrics"].items()
                 if k == key or (key and k.endswith(key.split("/")[-1]))}
        print(f"[{cfg.get('member')} seed={cfg.get('seed')}] {shown}  "
              f"({result['total_time_s']:.0f} s) -> {out / METRICS_FILE}", flush=True)
    return result, {"datamodule": datamodule, "model": model, "trainer": trainer}


# --- the failure wrapper ------------------------------------------------------------------
def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def user_message(exc: BaseException) -> tuple[str, int]:
    """One line for the user and the exit code."""
    if isinstance(exc, RunError):
        return str(exc), exc.exit_code
    if isinstance(exc, ValueError | KeyError | TypeError):  # bad option values from the library
        return f"{type(exc).__name__}: {exc}", 2
    return f"{type(exc).__name__}: {exc}", 1


def record_failure(out: Path, exc: BaseException) -> None:
    if rank_zero_only.rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    (out / ERROR_FILE).write_text(f"{user_message(exc)[0]}\n\n{text}")


def main(cfg: DictConfig) -> float | None:
    """Run ``cfg`` with failure handling; the return value is ``cfg.optimized_metric``."""
    out = Path(cfg.paths.output_dir)
    try:
        result = run(cfg)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if isinstance(e, SystemExit) and not e.code:
            raise
        record_failure(out, e)
        msg, code = user_message(e)
        if _in_multirun():
            print(f"error in sweep member {cfg.get('member')} seed={cfg.get('seed')}: {msg} "
                  f"(details: {out / ERROR_FILE}); the sweep continues", file=sys.stderr,
                  flush=True)
            return float("nan")
        if code == 1 and not isinstance(e, RunError):  # unexpected: keep the traceback
            traceback.print_exc()
        print(f"\nerror: {msg}\n", file=sys.stderr, flush=True)
        sys.exit(code)
    finally:
        finish_wandb()
    key = cfg.get("optimized_metric")
    value = result.get("metrics", {}).get(key) if key else None
    if key and value is None:
        print(f"note: optimized_metric={key!r} was not logged by this run", flush=True)
    return value

