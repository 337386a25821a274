#!/usr/bin/env python
"""Tabulate a sweep beside the paper's numbers (tasks/core/tables.py; no per-table code).

    python scripts/aggregate_tables.py table3 --runs results/runs/table3/tiny --preset tiny \
        --out results/tables/table3/tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from tasks.core.tables import find_experiment, write_table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", help="table name (table2) or experiment (vision/table2)")
    ap.add_argument("--runs", required=True, type=Path, help="the sweep folder")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--seeds", default=None, help="comma-separated (default: the table's)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    md, runs = write_table(find_experiment(args.table), args.runs, args.out, args.preset,
                           seeds, make_plot=not args.no_plot)
    print(md)
    bad = [r for r in runs if r.status != "done"]
    print(f"wrote {args.out}/table.md, table.csv, runs.csv"
          + ("" if args.no_plot else ", table.png"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
