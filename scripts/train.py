#!/usr/bin/env python
"""Train + test one image-classification configuration (Hydra entry point).

    python scripts/train.py                          # Chimera-ViT-B on ImageNet (data.root)
    python scripts/train.py preset=tiny model=chimera_vit_s   # small CPU run, Fashion-MNIST
    python scripts/train.py -m experiment=table3 preset=tiny 'seed=range(0,3)'  # a sweep

Everything is instantiated from conf/ (see conf/train.yaml); the run directory receives the
Lightning logs, checkpoints and ``metrics.json`` (read by scripts/aggregate_tables.py).
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
    from tasks.imagenet.data import DataNotFoundError
    from tasks.imagenet.run import run

    try:
        result = run(cfg)
    except DataNotFoundError as e:
        print(f"\nerror: {e}\n", file=sys.stderr, flush=True)
        sys.exit(2)
    return result["metrics"].get("val/acc1")


if __name__ == "__main__":
    main()
