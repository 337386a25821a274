#!/usr/bin/env python
"""Gather the metrics.json of a sweep into the layout of the paper's Table 2, 3 or 6.

    python scripts/aggregate_tables.py --table 3 --runs results/table3/runs/tiny/<stamp> \
        --out results/table3/tiny

Writes ``table.md`` (markdown), ``table.csv`` (one row per method), ``runs.csv`` (one row per
run) and ``table.png`` (bar chart) into ``--out``. Each of the paper's four columns (top-1 and
top-5 of the raw and the EMA weights) is given as mean ± sample std over seeds next to the
paper's number. The split is ``test`` when every run has test metrics (Fashion-MNIST), else
``val`` (ImageNet-1k val, as in the paper).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# (column key, header); metric keys are "<split>/<key>"
COLUMNS = [("acc1", "Top-1 Acc"), ("ema_acc1", "Top-1 Acc EMA"),
           ("acc5", "Top-5 Acc"), ("ema_acc5", "Top-5 Acc EMA")]

# The paper's numbers (ImageNet-1k, %, in COLUMNS order), transcribed from
# /work/shared/seeds/chimera_paper_tmlr2025.txt (Tables 2, 3 and 6).
TABLES: dict[str, dict] = {
    "2": {
        "title": "Table 2: Top-1, Top-5 accuracies on ImageNet-1K (88M)",
        "digits": 1,
        "row_field": "name",
        "rows": [  # (key in the runs, label, paper numbers or None)
            ("vit_b", "ViT-B", (78.8, 80.6, 94.2, 95.2)),
            (None, "S4-ViT-B", (79.4, 80.4, 94.2, 95.1)),
            (None, "Hyena-ViT-B", (78.4, 76.4, 94.0, 93.0)),
            ("chimera_vit_b", "Chimera-ViT-B", (81.4, 82.1, 95.4, 95.9)),
        ],
    },
    "3": {
        "title": "Table 3: 2D grid structure vs 1D flattening of patches (22M)",
        "digits": 1,
        "row_field": "topology",
        "rows": [
            ("flat_fwd", "Fwd (1D)", (73.8, 73.8, 91.6, 91.6)),
            ("flat_fwd_rev", "Fwd & Rev (1D)", (76.5, 75.6, 93.4, 92.8)),
            ("grid", "2D DAG", (77.8, 76.7, 93.9, 93.5)),
        ],
    },
    "6": {
        "title": "Table 6: B/C parameter sharing across the 4 grid DAGs (22M)",
        "digits": 2,
        "row_field": "sharing",
        "rows": [
            ("none", "None", (77.10, 76.13, 93.55, 93.15)),
            ("complete", "Complete", (77.25, 76.09, 93.75, 93.21)),
            ("rowwise", "Row-wise", (77.46, 76.57, 93.76, 93.37)),
            ("diagonal", "Diagonal", (77.80, 76.69, 93.87, 93.53)),
        ],
    },
}


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
        for f in files:
            with open(f) as fh:
                d = json.load(fh)
            d["_path"] = str(f)
            runs.append(d)
    return runs


def pick_split(runs: list[dict]) -> str:
    if runs and all(any(k.startswith("test/") for k in r.get("metrics", {})) for r in runs):
        return "test"
    return "val"


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def aggregate(table: str, runs: list[dict]) -> tuple[list[dict], str]:
    spec = TABLES[table]
    split = pick_split(runs)
    by_key: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_key[str(r.get(spec["row_field"]))].append(r)
    known = {k for k, _, _ in spec["rows"] if k is not None}
    rows = []
    extra = [(k, k, None) for k in sorted(by_key) if k not in known]
    for key, label, paper in spec["rows"] + extra:
        group = by_key.get(key, []) if key is not None else []
        row = {"key": key or "", "method": label, "n": len(group),
               "seeds": ",".join(str(r.get("seed")) for r in
                                 sorted(group, key=lambda r: (r.get("seed") is None,
                                                              r.get("seed")))),
               "params": group[0].get("params") if group else None,
               "time_s": (statistics.mean(r.get("total_time_s", math.nan) for r in group)
                          if group else None)}
        for (col, _), p in zip(COLUMNS, paper or (None,) * 4, strict=True):
            vals = [100.0 * r["metrics"][f"{split}/{col}"] for r in group
                    if f"{split}/{col}" in r.get("metrics", {})]
            row[f"{col}_mean"] = statistics.mean(vals) if vals else None
            row[f"{col}_std"] = statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals
                                                                                else None)
            row[f"{col}_n"] = len(vals)
            row[f"{col}_paper"] = p
        rows.append(row)
    return rows, split


def to_markdown(table: str, rows: list[dict], split: str, runs: list[dict], preset: str,
                sources: list[str]) -> str:
    spec = TABLES[table]
    data = sorted({str(r.get("data")) for r in runs}) or ["?"]
    seeds = sorted({r.get("seed") for r in runs}, key=lambda s: (s is None, s))
    head = ["Method", "Params", "Seeds"]
    for _, h in COLUMNS:
        head += [f"{h} (ours)", f"{h} (paper)"]
    lines = [
        f"# {spec['title']}",
        "",
        f"Preset `{preset}`: data `{', '.join(data)}`, split `{split}`, "
        f"{len(runs)} runs, seeds {seeds}. Ours: mean ± sample std over seeds (%); paper: "
        "ImageNet-1k val, single run (%).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for r in rows:
        cells = [r["method"], f"{r['params'] / 1e6:.3g}M" if r["params"] else "–",
                 str(r["n"]) if r["n"] else "–"]
        for col, _ in COLUMNS:
            cells.append(_fmt(r[f"{col}_mean"], r[f"{col}_std"], r[f"{col}_n"]))
            p = r[f"{col}_paper"]
            cells.append(f"{p:.{spec['digits']}f}" if p is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    times = [r.get("total_time_s") for r in runs if r.get("total_time_s") is not None]
    lines += ["", f"Run time: {sum(times):.0f} s over {len(times)} runs "
              f"(mean {statistics.mean(times) if times else 0:.0f} s per run).",
              "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_rows(runs: list[dict], split: str) -> list[dict]:
    out = []
    for r in sorted(runs, key=lambda r: (str(r.get("name")), str(r.get("topology")),
                                         str(r.get("sharing")), str(r.get("seed")))):
        row = {k: r.get(k) for k in ("name", "topology", "sharing", "seed", "preset", "data",
                                     "params", "epochs", "global_step", "fit_time_s",
                                     "total_time_s")}
        for s in ("val", "test"):
            for col, _ in COLUMNS:
                v = r.get("metrics", {}).get(f"{s}/{col}")
                row[f"{s}/{col}"] = None if v is None else round(100.0 * v, 3)
        row["path"] = r["_path"]
        out.append(row)
    return out


def plot(path: Path, table: str, rows: list[dict], split: str, preset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [r["method"] for r in rows]
    x = list(range(len(rows)))
    w = 0.2
    bars = [("acc{k}", "ours", "C0", None), ("ema_acc{k}", "ours EMA", "C1", None),
            ("acc{k}", "paper", "C0", "//"), ("ema_acc{k}", "paper EMA", "C1", "//")]
    for ax, k in zip(axes, (1, 5), strict=True):
        lo = []
        for i, (tmpl, who, color, hatch) in enumerate(bars):
            col = tmpl.format(k=k)
            if who.startswith("ours"):
                vals = [r[f"{col}_mean"] for r in rows]
                errs = [r[f"{col}_std"] or 0.0 if r[f"{col}_mean"] is not None else 0.0
                        for r in rows]
            else:
                vals = [r[f"{col}_paper"] for r in rows]
                errs = None
            ys = [v if v is not None else 0.0 for v in vals]
            lo += [v for v in vals if v is not None]
            ax.bar([xi + (i - 1.5) * w for xi in x], ys, w, yerr=errs, label=who,
                   color=color, alpha=1.0 if hatch is None else 0.45, hatch=hatch,
                   edgecolor="black", linewidth=0.5, capsize=2)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=15)
        ax.set_title(f"Top-{k} accuracy (%)")
        if lo:
            ax.set_ylim(max(0.0, min(lo) - 10), min(100.0, max(lo) + 5))
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{TABLES[table]['title']}\nours: preset {preset}, {split} split "
                 "(mean ± std over seeds); paper: ImageNet-1k val", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", required=True, choices=sorted(TABLES))
    ap.add_argument("--runs", required=True, nargs="+", type=Path,
                    help="sweep folder(s) (searched recursively for metrics.json) or files")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", default=None, help="label (default: read from the runs)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    runs = load_runs(args.runs)
    if not runs:
        print(f"error: no metrics.json under {[str(p) for p in args.runs]}", file=sys.stderr)
        return 1
    preset = args.preset or ",".join(sorted({str(r.get("preset")) for r in runs}))
    rows, split = aggregate(args.table, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(args.table, rows, split, runs, preset, [str(p) for p in args.runs])
    (args.out / "table.md").write_text(md)
    write_csv(args.out / "table.csv", rows)
    write_csv(args.out / "runs.csv", run_rows(runs, split))
    if not args.no_plot:
        plot(args.out / "table.png", args.table, rows, split, preset)
    print(md)
    print(f"wrote {args.out}/table.md, table.csv, runs.csv" +
          ("" if args.no_plot else ", table.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
