"""The table aggregation (tasks/core/tables.py) on synthetic run folders: the paper's layout
from each experiment's declarative `table:` node, no per-table code."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tasks.core.tables import collect_runs, find_experiment, load_spec, write_table
from tests.helpers import ROOT

TABLE_EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
    for p in (ROOT / "conf" / "experiment").glob("*/*.yaml") if "table" in OmegaConf.load(p))


def write_run(runs: Path, member: str, seed: int, acc: float, test: bool = True,
              meta: dict | None = None) -> None:
    d = runs / member / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {}
    for split in ("val", "test") if test else ("val",):
        metrics.update({f"{split}/acc1": acc, f"{split}/ema_acc1": acc - 0.01,
                        f"{split}/acc5": acc + 0.2, f"{split}/ema_acc5": acc + 0.19})
    (d / "metrics.json").write_text(json.dumps({
        "member": member, "seed": seed, "preset": "tiny", "params": 126_306,
        "total_time_s": 50.0, "metrics": metrics, "meta": meta or {}}))


def test_every_table_spec_is_well_formed():
    assert {"vision/table2", "vision/table3", "vision/table6"} <= set(TABLE_EXPERIMENTS)
    for exp in TABLE_EXPERIMENTS:
        spec = load_spec(exp)
        assert spec["title"] and spec["columns"] and spec["rows"]
        assert set(spec["seeds"]) >= {"paper", "tiny"}
        for row in spec["rows"]:
            assert len(row.get("paper") or spec["columns"]) == len(spec["columns"]), row


def test_table2_layout_and_paper_columns(tmp_path):
    runs = tmp_path / "runs"
    for member, vals in {"chimera_vit_b": [0.70, 0.72, 0.74], "vit_b": [0.60, 0.61, 0.62]}.items():
        for seed, a in enumerate(vals):
            write_run(runs, member, seed, a)
    out = tmp_path / "out"
    md, result = write_table(find_experiment("table2"), runs, out, "tiny")
    assert all(r.status == "done" for r in result) and len(result) == 6
    for header in ("Top-1 Acc (ours)", "Top-1 Acc (paper)", "Top-1 Acc EMA (paper)",
                   "Top-5 Acc (paper)", "Top-5 Acc EMA (ours)"):
        assert header in md
    assert "| ViT-B |" in md and "| 78.8 |" in md and "| 80.6 |" in md and "| 95.2 |" in md
    assert "| Chimera-ViT-B |" in md and "| 81.4 |" in md and "S4-ViT-B" in md
    sd = statistics.stdev([70.0, 72.0, 74.0])
    assert f"72.0 ± {sd:.1f}" in md and "split `test`" in md and "Incomplete" not in md
    rows = {r["label"]: r for r in csv.DictReader(open(out / "table.csv"))}
    assert float(rows["Chimera-ViT-B"]["Top-1 Acc mean"]) == pytest.approx(72.0)
    assert float(rows["Chimera-ViT-B"]["Top-1 Acc std"]) == pytest.approx(sd)
    assert float(rows["ViT-B"]["Top-5 Acc EMA mean"]) == pytest.approx(80.0)
    assert float(rows["ViT-B"]["Top-1 Acc paper"]) == 78.8
    assert rows["Chimera-ViT-B"]["runs"] == "3" and rows["S4-ViT-B"]["runs"] == "0"
    assert len(list(csv.DictReader(open(out / "runs.csv")))) == 6
    assert (out / "table.png").stat().st_size > 1000


def test_missing_seed_is_listed_not_averaged_away(tmp_path):
    runs = tmp_path / "runs"
    for t, member in enumerate(["grid", "flat_fwd_rev", "flat_fwd"]):
        for seed in (0, 1, 2):
            if (member, seed) != ("grid", 2):
                write_run(runs, member, seed, 0.5 + 0.01 * t, test=False)
    (runs / "grid" / "seed2").mkdir(parents=True)
    (runs / "grid" / "seed2" / "error.txt").write_text("NonFiniteError: step 3: loss is nan\n")
    md, result = write_table("vision/table3", runs, tmp_path / "out", "tiny", seeds=[0, 1, 2],
                             make_plot=False)  # the seeds this test wrote, not the spec's
    assert "split `val`" in md and "| 2/3 |" in md
    assert "failed: `grid/seed2`: NonFiniteError: step 3: loss is nan" in md
    assert sum(r.status == "failed" for r in result) == 1


def test_rows_and_columns_by_meta_and_mean_of(tmp_path):
    """The GLUE shape: a row per model, a column per task (selected by the run's meta), and a
    score column that is the per-seed mean of other columns."""
    spec = {"title": "t", "split": "val", "seeds": {"tiny": [0, 1]},
            "columns": [{"metric": "acc1", "label": "A", "where": {"task": "a"}, "scale": 100},
                        {"metric": "acc1", "label": "B", "where": {"task": "b"}, "scale": 100},
                        {"label": "Score", "mean_of": ["A", "B"]}],
            "rows": [{"label": "M", "where": {"model": "m"}, "paper": [1.0, 2.0, 1.5]}]}
    runs = tmp_path / "runs"
    for task, acc in (("a", 0.5), ("b", 0.7)):
        for seed in (0, 1):
            write_run(runs, f"m-{task}", seed, acc + 0.1 * seed, test=False,
                      meta={"model": "m", "task": task})
    from tasks.core.tables import _split, aggregate

    result = collect_runs({**spec, "rows": []}, runs, [0, 1])
    rows = aggregate(spec, result, _split(spec, result))
    assert rows[0]["A mean"] == pytest.approx(55.0) and rows[0]["B mean"] == pytest.approx(75.0)
    assert rows[0]["Score mean"] == pytest.approx(65.0) and rows[0]["Score n"] == 2


def test_reproduce_cli_preflight_names_the_missing_data(tmp_path):
    import subprocess
    import sys

    missing = tmp_path / "no-imagenet"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "reproduce.py"), "table2",
                           "--preset", "paper", "--runs", str(tmp_path / "r"), "--out",
                           str(tmp_path / "o"), "--", f"data.root={missing}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(missing) in proc.stderr and "PRESET=tiny" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
    # make: the generic rule serves every table (`-o install`: skip the install step)
    proc = subprocess.run(["make", "-s", "-o", "install", "reproduce-table3",
                           f"DATA_ROOT={missing}"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode != 0 and str(missing) in proc.stderr
    proc = subprocess.run(["make", "-s", "promote-table9", "PRESET=tiny"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "make reproduce-table9" in proc.stderr


def test_rows_by_where_report_missing_and_unstarted_runs(tmp_path):
    """Rows selected by `where` (Tables 4, 5) count their expected runs like member rows: a member
    of the row (known from any of its seeds' metrics.json or run_config.yaml) times the table's
    seeds; a row that matches no run at all is named as missing too."""
    spec = {"title": "t", "split": "test", "seeds": {"tiny": [0, 1]},
            "columns": [{"metric": "acc1", "label": "A", "where": {"dataset": "a"}}],
            "rows": [{"label": "G", "where": {"model": "g"}},
                     {"label": "E", "where": {"model": "e"}},
                     {"label": "N", "where": {"model": "n"}},
                     {"label": "Z", "where": {"model": "z"}}]}
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "g-a", seed, 0.5, meta={"model": "g", "dataset": "a"})
    write_run(runs, "e-a", 0, 0.6, meta={"model": "e", "dataset": "a"})  # e-a/seed1 never began
    write_run(runs, "n-a", 0, 0.7, meta={"model": "n", "dataset": "a"})
    started = runs / "n-b" / "seed1"  # another member of row N, started and stopped (no metrics)
    started.mkdir(parents=True)
    (started / "run_config.yaml").write_text(
        "model:\n  name: n\ndata:\n  name: b\nmeta:\n  model: ${model.name}\n"
        "  dataset: ${data.name}\nseed: 1\n")
    from tasks.core.tables import _split, aggregate, to_markdown

    result = collect_runs(spec, runs, [0, 1])
    status = {(r.member, str(r.seed)): r.status for r in result}
    assert status == {("g-a", "0"): "done", ("g-a", "1"): "done", ("e-a", "0"): "done",
                      ("e-a", "1"): "missing", ("n-a", "0"): "done", ("n-a", "1"): "missing",
                      ("n-b", "0"): "missing", ("n-b", "1"): "missing"}
    rows = {r["label"]: r for r in aggregate(spec, result, _split(spec, result))}
    assert (rows["G"]["runs"], rows["G"]["expected"], rows["G"]["missing"]) == (2, 2, "")
    assert (rows["E"]["runs"], rows["E"]["expected"], rows["E"]["missing"]) == (1, 2, "e-a/seed1")
    assert (rows["N"]["runs"], rows["N"]["expected"]) == (1, 4)
    assert rows["N"]["missing"] == "n-a/seed1,n-b/seed0,n-b/seed1"
    assert rows["E"]["A mean"] == pytest.approx(0.6) and rows["E"]["A n"] == 1
    md = to_markdown(spec, list(rows.values()), result, "test", "tiny", [0, 1], runs)
    assert "| G | 0.126M | 2/2 |" in md and "| E | 0.126M | 1/2 |" in md
    assert "| N | 0.126M | 1/4 |" in md and "| Z | – | 0/? |" in md
    assert "- missing: `e-a/seed1`" in md and "- missing: `n-b/seed0`" in md
    assert "- missing: every run of row `Z` (none matches model=z)" in md


def test_where_member_of_a_stage_with_its_own_seeds_is_not_missing(tmp_path):
    """Table 1's shape: a row selects its pretraining run (a stage run at seed 0) and its GLUE
    runs (seeds 19, 8364): the pretraining run is expected at its own seed, not at the table's."""
    spec = {"title": "t", "split": "val", "seeds": {"tiny": [19, 8364]},
            "columns": [{"metric": "acc1", "label": "P", "where": {"stage": "pretrain"}},
                        {"metric": "acc1", "label": "G", "where": {"stage": "glue"}}],
            "rows": [{"label": "M", "where": {"model": "m"}}]}
    runs = tmp_path / "runs"
    write_run(runs, "m", 0, 0.2, test=False, meta={"model": "m", "stage": "pretrain"})
    write_run(runs, "m_sst2", 19, 0.6, test=False, meta={"model": "m", "stage": "glue"})
    from tasks.core.tables import _split, aggregate

    result = collect_runs(spec, runs, [19, 8364])
    status = {(r.member, str(r.seed)): r.status for r in result}
    assert status == {("m", "0"): "done", ("m_sst2", "19"): "done",
                      ("m_sst2", "8364"): "missing"}
    row = aggregate(spec, result, _split(spec, result))[0]
    assert (row["runs"], row["expected"], row["missing"]) == (2, 3, "m_sst2/seed8364")


def test_parallel_member_commands_cover_every_combination_and_seed(tmp_path):
    """`--jobs N`: one command per (sweep combination, seed), each a one-run sweep into the same
    folder with one torch thread unless the overrides choose; extended sweep syntax is refused."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cmds = mod.member_commands("graph/table4", "graph/tiny",
                               {"model": "graph/chimera,graph/gcn", "data": "graph/peptides_func"},
                               [0, 1], tmp_path, ["trainer.max_epochs=1"])
    assert [c[0] for c in cmds] == ["chimera-peptides_func-seed0", "chimera-peptides_func-seed1",
                                    "gcn-peptides_func-seed0", "gcn-peptides_func-seed1"]
    for _label, cmd in cmds:
        assert "-m" in cmd and f"hydra.sweep.dir={tmp_path}" in cmd and "num_threads=1" in cmd
        assert "data=graph/peptides_func" in cmd and cmd[-1] == "trainer.max_epochs=1"
    own = mod.member_commands("vision/table3", "vision/tiny", {"topology": "grid"}, [0], tmp_path,
                              ["num_threads=2"])
    assert "num_threads=1" not in own[0][1] and own[0][1][-1] == "num_threads=2"
    with pytest.raises(ValueError, match="JOBS=1"):
        mod.member_commands("x", "y", {"seed": "range(0,3)"}, [0], tmp_path, [])
