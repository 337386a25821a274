"""scripts/bench_models.py: a one-round tiny run writes the CSV, the table and the plot."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_models.py"


def test_tiny_run_writes_csv_table_and_plot(tmp_path):
    out = tmp_path / "bm"
    cmd = [sys.executable, str(SCRIPT), "--cases", "tiny7", "--repeats", "2", "--threads", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench_models.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["chimera_vit_small_patch16_224",
                                          "vit_small_patch16_224"]
    ch, vit = rows
    assert ch["grid"] == "7x7" and ch["batch"] == "64" and ch["repeats"] == "2"
    assert 0.05 < float(ch["params_m"]) < 0.3 and 0.05 < float(vit["params_m"]) < 0.3
    assert len(ch["times_ms"].split()) == 2 and float(ch["median_ms"]) > 0
    assert float(ch["ratio_median_of_rounds"]) > 0 and vit["ratio_median_of_rounds"] == ""
    md = (out / "bench_models.md").read_text()
    assert "| tiny7 | 7x7 | 64 |" in md and "OMP_WAIT_POLICY" in md
    assert (out / "bench_models.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
