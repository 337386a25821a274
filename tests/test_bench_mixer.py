"""scripts/bench_mixer.py: the quick run writes a complete CSV, the table and the plot."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_mixer.py"
CPU_METHODS = ("reference", "exact", "neumann", "dag_dense", "dag_scan", "ssd", "sdpa")


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_mixer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_csv_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out),
           "--batch", "2", "--heads", "2", "--headdim", "16", "--d-state", "8", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "bench_mixer.csv") as f:
        rows = list(csv.DictReader(f))
    by = {(r["method"], r["size"]): r for r in rows}
    sizes = ("line 128", "grid 14x14")  # --quick: the smallest size of each family
    assert set(by) == {(m, s) for m in CPU_METHODS for s in sizes}
    for (m, s), r in by.items():
        if m == "ssd" and s.startswith("grid"):
            assert r["status"] == "n/a"  # SSD is defined on directed lines only
            continue
        assert r["status"] == "ok", r
        assert float(r["time_ms"]) > 0 and float(r["time_min_ms"]) > 0, r
        assert int(r["repeats"]) == 1
        assert float(r["peak_mem_mb"]) > 0, r
        if m != "sdpa":
            assert float(r["vs_sdpa"]) > 0
    assert int(by[("exact", "grid 14x14")]["nodes"]) == 196
    assert int(by[("exact", "line 128")]["edges"]) == 127

    md = (out / "bench_mixer.md").read_text()
    assert "| method |" in md and "grid 14x14" in md and "Peak memory" in md
    png = out / "bench_mixer.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interleaved_run_times_every_method_round_by_round(tmp_path):
    """``--interleave``: the methods of a size are timed in turn in one process; every row
    still gets its time, memory and a per-round ratio to SDPA, and the table says so."""
    out = tmp_path / "bench"
    cmd = [sys.executable, str(SCRIPT), "--interleave", "--device", "cpu", "--out", str(out),
           "--sizes", "grid:6", "--methods", "exact", "dag_scan", "sdpa", "--repeats", "3",
           "--batch", "2", "--heads", "2", "--headdim", "8", "--d-state", "4", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench_mixer.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"exact", "dag_scan", "sdpa"}
    for m, r in rows.items():
        assert r["status"] == "ok" and int(r["repeats"]) == 3, r
        assert float(r["time_ms"]) > 0 and float(r["peak_mem_mb"]) > 0, r
        if m != "sdpa":
            assert float(r["vs_sdpa"]) > 0
    assert "interleaved rounds" in (out / "bench_mixer.md").read_text()


def test_peak_tensor_memory_tracker_counts_live_storages():
    mod = _load_module()
    x = torch.ones(1000)  # created before the mode: never counted
    with mod.PeakTensorMemory() as tracker:
        a = x * 2  # +4000
        b = a + 1  # +4000 -> 8000 live
        v = b.view(10, 100)  # a view shares b's storage: not counted again
        del a  # -4000
        c = b * 3  # +4000 -> 8000 again
        del b, v, c
    assert tracker.peak == 8000
    assert tracker.live == 0


def test_budget_prediction_and_size_parsing():
    mod = _load_module()
    assert mod.predict([], 10, 3.0) is None
    assert mod.predict([(100, 1.0)], 200, 3.0) == pytest.approx(8.0)
    # the observed exponent (2) is used when it is steeper than the asymptotic one (1)
    assert mod.predict([(100, 1.0), (200, 4.0)], 400, 1.0) == pytest.approx(16.0)
    assert mod.parse_size("line:512") == ("line", 512)
    assert mod.parse_size("grid:28x28") == ("grid", 28)
    assert mod.num_nodes("grid", 56) == 3136


def test_fitted_slopes_recover_exponents():
    mod = _load_module()
    rows = [{"family": "grid", "method": m, "nodes": n, "status": "ok",
             "time_ms": 3.0 * n ** k, "peak_mem_mb": 0.5 * n}
            for m, k in (("dag_scan", 1.0), ("sdpa", 2.0)) for n in (196, 784, 3136)]
    rows.append({"family": "grid", "method": "reference", "nodes": 196, "status": "ok",
                 "time_ms": 1.0, "peak_mem_mb": 1.0})  # one size: no fit
    slopes = {q["method"]: q for q in mod.fit_slopes(rows)}
    assert set(slopes) == {"dag_scan", "sdpa"}
    assert slopes["dag_scan"]["time_slope"] == pytest.approx(1.0)
    assert slopes["sdpa"]["time_slope"] == pytest.approx(2.0)
    assert slopes["sdpa"]["mem_slope"] == pytest.approx(1.0)


def test_four_corner_op_level_runs_the_merged_path(tmp_path):
    out = tmp_path / "bench4"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--no-isolate",
           "--sizes", "grid:4", "grid:6", "--methods", "exact", "dag_scan", "sdpa",
           "--grid-dags", "4", "--batch", "1", "--heads", "2", "--headdim", "4", "--d-state",
           "2", "--threads", "1", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "bench_mixer.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["num_dags"] for r in rows if r["method"] != "sdpa"} == {"4"}
    md = (out / "bench_mixer.md").read_text()
    assert "Log-log slopes" in md and "| grid | dag_scan |" in md
