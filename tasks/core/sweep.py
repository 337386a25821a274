"""The end of a multirun: which members finished, were skipped or failed.

Inside a multirun a failing member records ``error.txt`` in its run directory and the sweep
carries on (:func:`tasks.core.driver.main`). :class:`SweepSummary`, a Hydra callback, prints a
summary when the sweep ends and exits with status 1 when any member failed, so scripts and
``make`` notice; the table aggregation lists the failed members too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tasks.core.driver import ERROR_FILE, METRICS_FILE


def sweep_status(sweep_dir: str | Path) -> dict[str, list[str]]:
    """Run directories under ``sweep_dir`` grouped as ``done`` / ``failed`` / ``unfinished``."""
    root = Path(sweep_dir)
    out: dict[str, list[str]] = {"done": [], "failed": [], "unfinished": []}
    if not root.is_dir():
        return out
    dirs = {p.parent for p in root.rglob(METRICS_FILE)} | {p.parent for p in root.rglob(ERROR_FILE)}
    dirs |= {p.parent.parent for p in root.rglob("checkpoints/last.ckpt")}
    for d in sorted(dirs):
        rel = str(d.relative_to(root))
        if (d / METRICS_FILE).is_file():
            out["done"].append(rel)
        elif (d / ERROR_FILE).is_file():
            out["failed"].append(rel)
        else:
            out["unfinished"].append(rel)
    return out


class SweepSummary(Callback):
    """Prints the sweep's outcome; exit status 1 when a member failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        status = sweep_status(sweep_dir)
        print(f"sweep {sweep_dir}: {len(status['done'])} done, {len(status['failed'])} failed, "
              f"{len(status['unfinished'])} unfinished", flush=True)
        for rel in status["failed"]:
            first = (sweep_dir / rel / ERROR_FILE).read_text().splitlines()[0]
            print(f"  failed: {rel}: {first}", file=sys.stderr, flush=True)
        if status["failed"]:
            sys.exit(1)
