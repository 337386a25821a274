"""scripts/bench_graphs.py (issue 9, section 7): the quick run writes the CSV, the report with
ratios and slopes, and the plot; molecule-like graphs are connected with peptide-like degree."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_graphs  # noqa: E402


def test_molecule_like_graph_degree_and_connectivity():
    from chimera.topology import from_edge_index

    ei = bench_graphs.molecule_like_graph(300, seed=0)
    deg = torch.bincount(ei[0], minlength=300)
    assert int(deg.max()) <= 4 and 2.0 <= ei.shape[1] / 300 <= 2.4
    assert int(from_edge_index(ei, 300).diameter().max()) > 10  # long chains, as peptides


def test_quick_benchmark_writes_csv_report_and_plot(tmp_path):
    rc = bench_graphs.main(["--quick", "--sizes", "20", "40", "--layers", "chimera_exact",
                            "chimera_neumann", "gps", "gcn", "--hidden", "16", "--heads", "2",
                            "--d-state", "4", "--threads", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_graphs.csv")))
    assert {r["layer"] for r in rows} == {"chimera_exact", "chimera_neumann", "gps", "gcn"}
    assert all(float(r["time_ms"]) > 0 for r in rows)
    md = (tmp_path / "bench_graphs.md").read_text()
    assert "Time relative to the GPS" in md and "time slope" in md
    assert (tmp_path / "bench_graphs.png").stat().st_size > 0
