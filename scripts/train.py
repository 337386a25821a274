#!/usr/bin/env python
"""Train + test any task from the Hydra config tree (conf/train.yaml).

    python scripts/train.py                                   # quickstart: tiny vision run, CPU
    python scripts/train.py experiment=vision/table3 preset=vision/tiny
    python scripts/train.py -m experiment=vision/table3 preset=vision/tiny seed=0,1,2
    python scripts/train.py experiment=vision/table2 ckpt_path=last   # resume this run dir

Everything happens in tasks.core.driver (seed -> data -> module -> callbacks -> loggers ->
trainer -> fit -> test -> metrics.json), with its failure handling.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout without an editable install
    sys.path.insert(0, str(ROOT))


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from tasks.core.driver import main as run_main

    return run_main(cfg)


if __name__ == "__main__":
    main()
