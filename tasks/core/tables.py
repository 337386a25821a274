"""Paper tables from a sweep's run folders, driven by the experiment's declarative ``table:``.

Every table experiment (``conf/experiment/<family>/<table>.yaml``) holds, beside its sweep, a
``table`` node: the rows (which sweep ``member`` is which row, and the paper's numbers), the
metric columns, the seeds per preset and the split. This module has no per-table code: it reads
that node and the run folders ``<runs>/<member>/seed<k>/`` and writes

- ``table.md``  the paper's layout, ours (mean ± sample std over seeds) beside the paper's,
  and the failed and missing members listed, never averaged away;
- ``table.csv`` one line per row; ``runs.csv`` one line per expected run (with its status);
- ``table.png`` one panel per column: ours with error bars, the paper's hatched.

Columns: ``metric`` is a key of ``metrics.json``'s ``metrics``; without a ``/`` it is prefixed by
the split (``auto`` = ``test`` when every finished run has test metrics, else ``val``). A row may
also select runs by ``where`` (a mapping over the run's ``meta``) instead of ``member``, and a
column may carry its own ``where`` (e.g. GLUE: a row per model, a column per task); ``mean_of``
makes a column the mean of other columns (e.g. the GLUE score). A column with ``presets``
(a list) appears only in the tables of those presets (e.g. tasks whose data only the paper preset
has), and the rows' ``paper`` lists are cut to match.

Multi-stage tables (e.g. pretraining, then finetuning from the pretrained runs) list
``stages``: each an ``experiment`` (default: the table's own), sweep ``params`` (with
``preset_params`` per preset merged over them) and optionally its own ``seeds`` per preset;
``scripts/reproduce.py`` runs them in order into one runs folder, where later stages find the
earlier runs by config interpolation (e.g. ``${hydra:sweep.dir}/<member>/seed0``). See
:func:`stages_of`.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tasks.core.driver import ERROR_FILE, METRICS_FILE

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def find_experiment(name: str, conf_dir: Path = CONF_DIR) -> str:
    """``table2`` -> ``vision/table2`` (the unique experiment file of that name)."""
    if (conf_dir / "experiment" / f"{name}.yaml").is_file():
        return name
    hits = sorted((conf_dir / "experiment").glob(f"*/{name}.yaml"))
    if len(hits) != 1:
        known = sorted(str(p.relative_to(conf_dir / "experiment").with_suffix(""))
                       for p in (conf_dir / "experiment").glob("*/*.yaml")
                       if "table" in OmegaConf.load(p))
        raise SystemExit(f"error: no unique experiment named {name!r} "
                         f"({len(hits)} found); tables: {', '.join(known)}")
    return str(hits[0].relative_to(conf_dir / "experiment").with_suffix(""))


def load_spec(experiment: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    path = conf_dir / "experiment" / f"{experiment}.yaml"
    node = OmegaConf.load(path)
    if "table" not in node:
        raise SystemExit(f"error: {path} has no `table:` node, so it is not a paper table")
    return OmegaConf.to_container(node.table, resolve=False)  # type: ignore[return-value]


def for_preset(spec: dict[str, Any], preset: str) -> dict[str, Any]:
    """``spec`` with only the columns shown for ``preset`` (their ``presets`` list) and the
    rows' ``paper`` numbers cut to those columns."""
    cols = spec["columns"]
    keep = [i for i, c in enumerate(cols) if not c.get("presets") or preset in c["presets"]]
    if len(keep) == len(cols):
        return spec
    rows = []
    for r in spec["rows"]:
        r = dict(r)
        if r.get("paper") is not None:
            if len(r["paper"]) != len(cols):
                raise ValueError(f"row {r.get('label')!r}: {len(r['paper'])} paper numbers for "
                                 f"{len(cols)} columns")
            r["paper"] = [r["paper"][i] for i in keep]
        rows.append(r)
    return {**spec, "columns": [cols[i] for i in keep], "rows": rows}


def stages_of(spec: dict[str, Any], experiment: str, preset: str,
              seeds: list[Any] | None = None) -> list[dict[str, Any]]:
    """The sweeps that make a table, in order: ``[{experiment, params, seeds}]``.

    Without ``stages`` this is one sweep of ``experiment`` (its own ``hydra.sweeper.params``).
    ``seeds`` (e.g. from the command line) replaces the table's seeds in the stages that do not
    name their own; ``params`` values are Hydra sweep strings (``"a,b,c"``).
    """
    if seeds is None:
        seeds = list((spec.get("seeds") or {}).get(preset, [0]))
    out = []
    for i, st in enumerate(spec.get("stages") or [{}]):
        unknown = set(st) - {"experiment", "params", "preset_params", "seeds"}
        if unknown:
            raise ValueError(f"stage {i}: unknown keys {sorted(unknown)} (allowed: experiment, "
                             f"params, preset_params, seeds)")
        params = {**(st.get("params") or {}),
                  **((st.get("preset_params") or {}).get(preset) or {})}
        own = (st.get("seeds") or {}).get(preset)
        out.append({"experiment": st.get("experiment") or experiment,
                    "params": {str(k): str(v) for k, v in params.items()},
                    "seeds": list(own) if own is not None else list(seeds)})
    return out


@dataclass
class Run:
    member: str
    seed: Any
    status: str  # done | failed | missing
    path: Path
    data: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def _run_meta(run_dir: Path) -> dict[str, Any] | None:
    """The ``meta`` of a started run that has no ``metrics.json`` (failed or stopped), from its
    ``run_config.yaml``; None when it cannot be read."""
    f = run_dir / "run_config.yaml"
    if not f.is_file():
        return None
    try:
        meta = OmegaConf.select(OmegaConf.load(f), "meta")
        return dict(OmegaConf.to_container(meta, resolve=True)) if meta is not None else None
    except Exception:  # noqa: BLE001 - an unreadable config only loses the row's count
        return None


def _member_metas(runs_dir: Path, found: dict) -> dict[str, dict[str, Any]]:
    """Each member folder's ``meta``, from any of its seeds (finished runs first)."""
    metas: dict[str, dict[str, Any]] = {}
    for (m, _), (_, data) in sorted(found.items()):
        if m not in metas and data.get("meta") is not None:
            metas[m] = dict(data["meta"])
    if runs_dir.is_dir():
        for d in sorted(runs_dir.glob("*/seed*")):
            m = d.parent.name
            if m not in metas and d.is_dir():
                meta = _run_meta(d)
                if meta is not None:
                    metas[m] = meta
    return metas


def collect_runs(spec: dict[str, Any], runs_dir: Path, seeds: list[Any]) -> list[Run]:
    """Every expected (member, seed) and every other finished run under ``runs_dir``.

    Expected: the members named by rows, and the members that rows select by ``where`` (every
    member folder whose ``meta``, read from any of its seeds, matches a row), times ``seeds``.
    A ``where`` row matching no folder at all is reported by :func:`aggregate` (its members are
    unknown without composing the sweep)."""
    members = [r["member"] for r in spec["rows"] if r.get("member") is not None]
    found = {}
    if runs_dir.is_dir():
        for f in runs_dir.glob(f"*/seed*/{METRICS_FILE}"):
            d = json.loads(f.read_text())
            found[(f.parent.parent.name, f.parent.name[4:])] = (f.parent, d)
    wheres = [r["where"] for r in spec["rows"] if r.get("member") is None and r.get("where")]
    metas = _member_metas(runs_dir, found) if wheres else {}
    own_seeds: dict[str, list[str]] = {}  # where-selected members run at none of the seeds
    for m, meta in sorted(metas.items()):
        probe = Run(m, None, "missing", runs_dir / m, {"meta": meta})
        if m not in members and any(_matches(probe, w) for w in wheres):
            members.append(m)
            have = sorted(d.name[4:] for d in (runs_dir / m).glob("seed*") if d.is_dir())
            if not set(have) & {str(x) for x in seeds}:
                # a stage with seeds of its own (e.g. Table 1's pretraining at seed 0 under
                # GLUE seeds 19, 8364): expect the seeds it was run with, not the table's
                own_seeds[m] = have
    expected = {(m, s) for m in members for s in own_seeds.get(m, seeds)}
    runs = []
    for m, s in sorted(expected, key=lambda x: (members.index(x[0]), str(x[1]))):
        d = runs_dir / m / f"seed{s}"
        meta = {"meta": metas[m]} if m in metas else {}
        if (m, str(s)) in found:
            runs.append(Run(m, s, "done", d, found[(m, str(s))][1]))
        elif (d / ERROR_FILE).is_file():
            runs.append(Run(m, s, "failed", d, dict(meta),
                            error=(d / ERROR_FILE).read_text().split("\n")[0]))
        else:
            runs.append(Run(m, s, "missing", d, dict(meta)))
    wanted = {(m, str(s)) for m, s in expected}
    for (m, s), (d, data) in sorted(found.items()):
        if (m, s) not in wanted:  # e.g. a member added on the command line, or other seeds
            runs.append(Run(m, data.get("seed", s), "done", d, data))
    if runs_dir.is_dir():  # failures of members outside the table are listed too
        for f in sorted(runs_dir.glob(f"*/seed*/{ERROR_FILE}")):
            m, s = f.parent.parent.name, f.parent.name[4:]
            if (m, s) not in wanted and (m, s) not in found:
                runs.append(Run(m, s, "failed", f.parent, {"meta": _run_meta(f.parent) or {}},
                                error=f.read_text().split("\n")[0]))
    return runs


def _split(spec: dict[str, Any], runs: list[Run]) -> str:
    split = spec.get("split", "auto")
    if split != "auto":
        return split
    done = [r for r in runs if r.status == "done"]
    if done and all(any(k.startswith("test/") for k in r.data.get("metrics", {})) for r in done):
        return "test"
    return "val"


def _matches(run: Run, where: dict[str, Any] | None) -> bool:
    if not where:
        return True
    meta = {**run.data.get("meta", {}), "member": run.member}
    return all(str(meta.get(k)) == str(v) for k, v in where.items())


def aggregate(spec: dict[str, Any], runs: list[Run], split: str) -> list[dict[str, Any]]:
    cols = spec["columns"]
    members = {r.get("member") for r in spec["rows"]}
    extra = sorted({r.member for r in runs if r.status == "done" and r.member not in members
                    and not any(row.get("where") for row in spec["rows"])})
    rows_spec = list(spec["rows"]) + [{"member": m, "label": m} for m in extra]
    out = []
    for row in rows_spec:
        group = [r for r in runs if (row.get("member") is not None and r.member == row["member"])
                 or (row.get("where") and _matches(r, row["where"]))]
        done = [r for r in group if r.status == "done"]
        paper = row.get("paper") or [None] * len(cols)
        if len(paper) != len(cols):
            raise ValueError(f"row {row.get('label')!r}: {len(paper)} paper numbers for "
                             f"{len(cols)} columns")
        line: dict[str, Any] = {
            "label": row.get("label", row.get("member")), "member": row.get("member") or "",
            "runs": len(done), "expected": len(group),
            "failed": ",".join(f"{r.member}/seed{r.seed}" for r in group if r.status == "failed"),
            "missing": ",".join(f"{r.member}/seed{r.seed}" for r in group
                                if r.status == "missing"),
            "params": done[0].data.get("params") if done else None,
            "unmatched": bool(row.get("where") and row.get("member") is None and not group),
        }
        values: dict[str, list[float]] = {}
        for c in cols:
            if c.get("mean_of"):
                continue
            key = c["metric"] if "/" in c["metric"] else f"{split}/{c['metric']}"
            vals = [c.get("scale", 1) * r.data["metrics"][key] for r in done
                    if _matches(r, c.get("where")) and key in r.data.get("metrics", {})]
            values[c["label"]] = vals
        for c, p in zip(cols, paper, strict=True):
            if c.get("mean_of"):  # per seed: the mean of the named columns
                parts = [values.get(name, []) for name in c["mean_of"]]
                n = min((len(v) for v in parts), default=0)
                vals = [statistics.mean(v[i] for v in parts) for i in range(n)]
            else:
                vals = values[c["label"]]
            line[f"{c['label']} mean"] = statistics.mean(vals) if vals else None
            line[f"{c['label']} std"] = statistics.stdev(vals) if len(vals) > 1 else None
            line[f"{c['label']} n"] = len(vals)
            line[f"{c['label']} paper"] = p
        out.append(line)
    return out


def _cell(mean: float | None, std: float | None, n: int, digits: int) -> str:
    if mean is None:
        return "–"
    if std is None:
        return f"{mean:.{digits}f}" + (" (1 run)" if n == 1 else "")
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(spec: dict[str, Any], rows: list[dict[str, Any]], runs: list[Run], split: str,
                preset: str, seeds: list[Any], runs_dir: Path) -> str:
    cols = spec["columns"]
    head = ["Method", "Params", "Runs"]
    for c in cols:
        head += [f"{c['label']} (ours)", f"{c['label']} (paper)"]
    done = [r for r in runs if r.status == "done"]
    lines = [f"# {spec['title']}", "",
             f"Preset `{preset}`, split `{split}`, seeds {seeds} (fixed up front); "
             f"{len(done)} finished runs. Ours: mean ± sample std over seeds; paper: as published.",
             "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        runs_cell = (f"{r['runs']}/{r['expected']}" if r["expected"]
                     else "0/?" if r.get("unmatched") else ("–" if not r["runs"]
                                                            else str(r["runs"])))
        cells = [r["label"], f"{r['params'] / 1e6:.3g}M" if r["params"] else "–", runs_cell]
        for c in cols:
            d = c.get("digits", 2)
            cells.append(_cell(r[f"{c['label']} mean"], r[f"{c['label']} std"],
                               r[f"{c['label']} n"], d))
            p = r[f"{c['label']} paper"]
            cells.append(f"{p:.{d}f}" if isinstance(p, int | float) else "–")
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in runs if r.status == "failed"]
    missing = [r for r in runs if r.status == "missing"]
    unmatched = [r for r in rows if r.get("unmatched")]
    if failed or missing or unmatched:
        lines += ["", "**Incomplete:** the means above leave these runs out."]
        lines += [f"- failed: `{r.member}/seed{r.seed}`: {r.error}" for r in failed]
        lines += [f"- missing: `{r.member}/seed{r.seed}`" for r in missing]
        for r in unmatched:
            where = next(row["where"] for row in spec["rows"]
                         if row.get("label", row.get("member")) == r["label"])
            lines.append(f"- missing: every run of row `{r['label']}` (none matches "
                         + ", ".join(f"{k}={v}" for k, v in where.items()) + ")")
    times = [r.data.get("total_time_s") for r in done if r.data.get("total_time_s") is not None]
    if times:
        lines += ["", f"Run time: {sum(times):.0f} s over {len(times)} runs "
                      f"(mean {statistics.mean(times):.0f} s per run)."]
    lines += [f"Runs: `{runs_dir}`", ""]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def run_lines(runs: list[Run]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        line = {"member": r.member, "seed": r.seed, "status": r.status,
                "params": r.data.get("params"), "global_step": r.data.get("global_step"),
                "total_time_s": r.data.get("total_time_s"), "error": r.error}
        line.update({k: v for k, v in sorted(r.data.get("metrics", {}).items())})
        line["path"] = str(r.path)
        out.append(line)
    return out


def plot(path: Path, spec: dict[str, Any], rows: list[dict[str, Any]], preset: str,
         split: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = spec["columns"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols) + 1, 4), squeeze=False)
    labels = [r["label"] for r in rows]
    x = list(range(len(rows)))
    for ax, c in zip(axes[0], cols, strict=True):
        ours = [r[f"{c['label']} mean"] for r in rows]
        errs = [r[f"{c['label']} std"] or 0.0 for r in rows]
        paper = [r[f"{c['label']} paper"] for r in rows]
        ax.bar([i - 0.2 for i in x], [v if v is not None else 0 for v in ours], 0.4,
               yerr=errs, label="ours", color="C0", capsize=2, edgecolor="black", lw=0.5)
        ax.bar([i + 0.2 for i in x], [v if isinstance(v, int | float) else 0 for v in paper],
               0.4, label="paper", color="C1", alpha=0.5, hatch="//", edgecolor="black", lw=0.5)
        vals = [v for v in ours + paper if isinstance(v, int | float) and math.isfinite(v)]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = 0.1 * (hi - lo) + 1e-9
            ax.set_ylim(max(0.0, lo - 3 * pad) if lo >= 0 else lo - 3 * pad, hi + pad)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_title(c["label"], fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{spec['title']}\nours: preset {preset}, {split} split, mean ± std over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(experiment: str, runs_dir: Path, out_dir: Path, preset: str,
                seeds: list[Any] | None = None, make_plot: bool = True,
                conf_dir: Path = CONF_DIR) -> tuple[str, list[Run]]:
    """Aggregate ``runs_dir`` into ``out_dir``; returns the markdown and the runs."""
    spec = for_preset(load_spec(experiment, conf_dir), preset)
    if seeds is None:
        seeds = list((spec.get("seeds") or {}).get(preset, [0]))
    runs = collect_runs(spec, runs_dir, seeds)
    split = _split(spec, runs)
    rows = aggregate(spec, runs, split)
    md = to_markdown(spec, rows, runs, split, preset, seeds, runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "table.md.tmp"
    tmp.write_text(md)
    write_csv(out_dir / "table.csv", rows)
    write_csv(out_dir / "runs.csv", run_lines(runs))
    if make_plot:
        plot(out_dir / "table.png", spec, rows, preset, split)
    tmp.replace(out_dir / "table.md")
    return md, runs
