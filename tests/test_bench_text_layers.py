"""scripts/bench_text_layers.py on tiny sizes: every layer runs forward + backward, the ratios are
computed against BERT and DAG, and the CSV / markdown are written."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_text_layers",
                                                  ROOT / "scripts" / "bench_text_layers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_text_layers_writes_ratios(tmp_path):
    mod = _script()
    assert mod.main(["--threads", "1", "--lengths", "16", "--batch", "2", "--width", "64",
                     "--d-state", "8", "--headdim", "16", "--rounds", "1",
                     "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_text_layers.csv")))
    assert [r["layer"] for r in rows] == ["bert", "dag", "ug"]
    assert float(rows[0]["ratio_to_bert"]) == 1.0 and float(rows[1]["ratio_to_dag"]) == 1.0
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert "UG <= 2x DAG" in (tmp_path / "bench_text_layers.md").read_text()
