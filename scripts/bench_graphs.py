#!/usr/bin/env python
"""Per-layer cost of Chimera on graphs against GPS + Transformer and GCN (issue 9, section 7).

What is measured, per (layer, graph): one forward + backward of a single layer on node features
``(num_nodes, hidden)`` (gradients to the input and the parameters), in one process, layers
interleaved round by round so that a load change on a shared machine hits every layer alike:

* ``time_ms``: the median over ``--repeats`` rounds (after one warm-up call, which builds the
  cached structure; a layer whose warm-up exceeds ``--budget`` seconds gets one round);
* ``peak_mem_mb``: the peak total size of the tensor storages created during one forward +
  backward, tracked by ``scripts/bench_mixer.PeakTensorMemory`` on CPU (a lower bound of the
  allocator's peak: LAPACK/MKL scratch is not seen) or ``torch.cuda.max_memory_allocated``.

Layers (``--layers``): ``chimera_exact``, ``chimera_neumann`` (K = diameter per graph),
``chimera_dag`` (BFS-DAG pair) - :class:`chimera.models.graph.ChimeraGraphConv` with edge
features, its batch structure (size buckets of ``--graphs-per-bucket`` graphs: the layer's and
``GraphModel``'s default ``auto``, sizes from a cost model; 0 = the whole batch in one call)
built outside the timed call as ``GraphModel`` shares it across its layers - ``gps`` (PyG
``GPSConv`` with a GINE local MPNN, 4 heads) and ``gcn`` (``GCNConv``).

Graphs: ``random-<n>``: one random molecule-like graph of ``n`` nodes (a random spanning tree of
maximum degree 4 plus ring closures, mean degree ~2.1 as in Peptides-func; ``--sizes``,
default 50 ... 2000 nodes); ``peptides-<g>``: the first ``g`` training molecules of the real
Peptides-func release batched (``--peptides``, needs the release at ``--release``).

A case whose predicted time (from the same layer's previous size and a cubic extrapolation)
exceeds ``--budget`` seconds is recorded as ``skipped``. Outputs in ``--out`` (default
``results/bench_graphs``): ``bench_graphs.csv``, ``bench_graphs.md`` (tables, fitted log-log
slopes of time and memory against nodes, ratios to GPS) and ``bench_graphs.png``.

    python scripts/bench_graphs.py                        # the report (minutes on a CPU)
    python scripts/bench_graphs.py --quick --out /tmp/bg  # two small sizes, one repeat
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from bench_mixer import PeakTensorMemory  # noqa: E402
from torch_geometric.data import Batch  # noqa: E402
from torch_geometric.nn import GCNConv, GINEConv, GPSConv  # noqa: E402

from chimera.models.graph import ChimeraGraphConv, GraphBuckets  # noqa: E402

LAYERS = ("chimera_exact", "chimera_neumann", "chimera_dag", "gps", "gcn")
DEFAULT_SIZES = (50, 100, 200, 400, 800, 1200, 2000)


def molecule_like_graph(n: int, seed: int) -> Tensor:
    """Undirected ``edge_index`` (both directions) of a connected molecule-like graph: a random
    tree with degree <= 4 (each new atom bonds to a random earlier atom with a free valence)
    plus ``n // 12`` ring closures between atoms 4-6 bonds apart (peptides: mean degree ~2.1)."""
    g = torch.Generator().manual_seed(seed)
    deg = torch.zeros(n, dtype=torch.long)
    parent = torch.full((n,), -1, dtype=torch.long)
    edges = []
    for i in range(1, n):
        lo = max(0, i - 8)  # bond to a recent atom: long chains, as in peptides
        cand = [j for j in range(lo, i) if deg[j] < 4]
        j = cand[int(torch.randint(len(cand), (1,), generator=g))]
        edges.append((j, i))
        deg[i] += 1
        deg[j] += 1
        parent[i] = j
    for _ in range(n // 12):
        i = int(torch.randint(6, n, (1,), generator=g)) if n > 6 else 0
        k, j = 0, i
        while k < 5 and parent[j] >= 0:
            j, k = int(parent[j]), k + 1
        if j != i and deg[i] < 4 and deg[j] < 4:
            edges.append((j, i))
            deg[i] += 1
            deg[j] += 1
    e = torch.tensor(edges, dtype=torch.long).T
    return torch.cat([e, e.flip(0)], 1)


class GCNLayer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.conv = GCNConv(hidden, hidden)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor) -> Tensor:
        return self.conv(x, edge_index)


class GPSLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.conv = GPSConv(hidden, GINEConv(mlp, edge_dim=hidden), heads=heads)

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor) -> Tensor:
        return self.conv(x, edge_index, batch, edge_attr=edge_attr)


class ChimeraLayer(nn.Module):
    """:class:`ChimeraGraphConv` with the batch's structure built once outside the timed call
    (as :class:`~chimera.models.graph.GraphModel` shares it across its layers)."""

    def __init__(self, hidden: int, heads: int, d_state: int, method: str,
                 graphs_per_bucket: int | str | None = "auto") -> None:
        super().__init__()
        self.conv = ChimeraGraphConv(hidden, heads=heads, d_state=d_state, edge_dim=hidden,
                                     method=method, graphs_per_bucket=graphs_per_bucket)
        self.topology: Any = None

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor, batch: Tensor) -> Tensor:
        return self.conv(x, edge_index, edge_attr, batch, topology=self.topology)


def build_layer(name: str, hidden: int, heads: int, d_state: int,
                graphs_per_bucket: int | str | None = "auto") -> nn.Module:
    if name == "gcn":
        return GCNLayer(hidden)
    if name == "gps":
        return GPSLayer(hidden, heads)
    if name.startswith("chimera_"):
        return ChimeraLayer(hidden, heads, d_state, name.split("_", 1)[1], graphs_per_bucket)
    raise ValueError(f"unknown layer {name!r}; choose from {LAYERS}")


def one_call(layer: nn.Module, x: Tensor, ei: Tensor, ea: Tensor, batch: Tensor,
             grad: Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    xi = x.detach().requires_grad_(True)
    layer(xi, ei, ea, batch).backward(grad)


def measure(cases: list[tuple[str, Tensor, Tensor]], layers: list[str], args) -> list[dict]:
    """``cases``: (label, edge_index, batch). Returns one row per (layer, case)."""
    rows: list[dict] = []
    last: dict[str, tuple[int, float]] = {}
    for label, ei, batch in cases:
        n = int(batch.numel())
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, args.hidden, generator=g)
        ea = torch.randn(ei.shape[1], args.hidden, generator=g)
        grad = torch.randn(n, args.hidden, generator=g)
        per_bucket = args.graphs_per_bucket or None
        structure = None
        built = {}
        for name in layers:
            torch.manual_seed(0)
            layer = build_layer(name, args.hidden, args.heads, args.d_state, per_bucket)
            if isinstance(layer, ChimeraLayer):
                if structure is None:  # outside the timed region (datasets cache diameters)
                    structure = layer.conv.structure(ei, batch, n)
                    for t in ([q.topology for q in structure.parts]
                              if isinstance(structure, GraphBuckets) else [structure]):
                        t.diameter()
                layer.topology = structure
            # cubic extrapolation along the single random graphs only: a peptide batch costs
            # per graph (~150 atoms each), not like one graph of its total size
            prev = last.get(name) if label.startswith("random") else None
            if prev is not None and prev[1] * (n / prev[0]) ** 3 > args.budget:
                rows.append({"case": label, "nodes": n, "edges": ei.shape[1], "layer": name,
                             "status": "skipped", "time_ms": math.nan, "peak_mem_mb": math.nan})
                continue
            t0 = time.perf_counter()
            one_call(layer, x, ei, ea, batch, grad)  # warm-up: builds the cached structure
            first = time.perf_counter() - t0
            mode = PeakTensorMemory()
            with mode:  # memory, untimed (the tracking mode slows every op down)
                one_call(layer, x, ei, ea, batch, grad)
            built[name] = (layer, mode.peak / 2**20, first)
        times: dict[str, list[float]] = {k: [] for k in built}
        for r in range(args.repeats):  # interleaved rounds; past the budget, one round only
            for name, (layer, _, first) in built.items():
                if r and first > args.budget:
                    continue
                t0 = time.perf_counter()
                one_call(layer, x, ei, ea, batch, grad)
                times[name].append(time.perf_counter() - t0)
        for name, (_layer, mem, _first) in built.items():
            t = statistics.median(times[name])
            if label.startswith("random"):
                last[name] = (n, t)
            rows.append({"case": label, "nodes": n, "edges": ei.shape[1], "layer": name,
                         "status": "ok", "time_ms": 1e3 * t, "peak_mem_mb": mem})
            print(f"{label:>14s} {name:>16s} {1e3 * t:10.2f} ms {mem:9.2f} MB", flush=True)
    return rows


def fit_slope(pts: list[tuple[float, float]]) -> float:
    xs, ys = [math.log(a) for a, _ in pts], [math.log(max(b, 1e-9)) for _, b in pts]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def _num(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.1f}"


def report(rows: list[dict], args, out: Path, total_s: float) -> str:
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    get = {(r["case"], r["layer"]): r for r in rows}
    lines = ["# Graph layers: forward + backward time and peak memory", "",
             f"hidden {args.hidden}, heads {args.heads}, Chimera state {args.d_state}, "
             f"{torch.get_num_threads()} threads, device cpu, Chimera size buckets of "
             f"{args.graphs_per_bucket or 'all'} graphs per bucket, median of {args.repeats} "
             f"interleaved rounds; total {total_s:.0f} s. Peak memory: tensor storages created "
             f"during the call (a lower bound on CPU).", "",
             "| case | nodes | " + " | ".join(f"{x} ms" for x in layers) + " | "
             + " | ".join(f"{x} MB" for x in layers) + " |",
             "|---|---:|" + "---:|" * (2 * len(layers))]
    for c in cases:
        r0 = next(r for r in rows if r["case"] == c)
        t = [get.get((c, x), {}).get("time_ms", math.nan) for x in layers]
        m = [get.get((c, x), {}).get("peak_mem_mb", math.nan) for x in layers]
        lines.append(f"| {c} | {r0['nodes']} | " + " | ".join(_num(v) for v in t) + " | "
                     + " | ".join(_num(v) for v in m) + " |")
    lines += ["", "Time relative to the GPS + Transformer layer (same case):", "",
              "| case | " + " | ".join(layers) + " |", "|---|" + "---:|" * len(layers)]
    for c in cases:
        gps = get.get((c, "gps"), {}).get("time_ms", math.nan)
        ratios = [get.get((c, x), {}).get("time_ms", math.nan) / gps for x in layers]
        lines.append(f"| {c} | " + " | ".join("–" if math.isnan(r) else f"{r:.2f}x"
                                              for r in ratios) + " |")
    lines += ["", "Fitted log-log slopes against nodes (random graphs that ran):", "",
              "| layer | sizes | time slope | memory slope |", "|---|---:|---:|---:|"]
    for x in layers:
        pts = [(r["nodes"], r["time_ms"], r["peak_mem_mb"]) for r in rows
               if r["layer"] == x and r["status"] == "ok" and r["case"].startswith("random")]
        if len(pts) >= 2:
            lines.append(f"| {x} | {len(pts)} | {fit_slope([(a, b) for a, b, _ in pts]):.2f} | "
                         f"{fit_slope([(a, c) for a, _, c in pts]):.2f} |")
    skipped = [f"{r['layer']}@{r['case']}" for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", f"Skipped (predicted over the {args.budget:.0f} s budget): "
                      + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for x in dict.fromkeys(r["layer"] for r in rows):
        pts = [r for r in rows if r["layer"] == x and r["status"] == "ok"
               and r["case"].startswith("random")]
        if not pts:
            continue
        n = [r["nodes"] for r in pts]
        axes[0].loglog(n, [r["time_ms"] for r in pts], "o-", label=x)
        axes[1].loglog(n, [max(r["peak_mem_mb"], 1e-3) for r in pts], "o-", label=x)
    axes[0].set(xlabel="nodes", ylabel="forward+backward (ms)", title="time")
    axes[1].set(xlabel="nodes", ylabel="peak tensor memory (MB)", title="memory")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _per_bucket(value: str) -> int | str:
    return value if value == "auto" else int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    p.add_argument("--peptides", type=int, nargs="*", default=[8, 64],
                   help="batches of the first g real training molecules")
    p.add_argument("--release", type=Path,
                   default=Path(os.environ.get("CHIMERA_SHARED_DATA", ROOT.parent / "shared/data"))
                   / "peptides-func")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)     # Peptides-struct: 4 heads, state 80
    p.add_argument("--d-state", type=int, default=80)
    p.add_argument("--graphs-per-bucket", type=_per_bucket, default="auto",
                   help="Chimera size buckets: graphs per bucket, 'auto' (the layer's default: "
                        "sizes by a cost model) or 0 (the whole batch in one call)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per call before skipping")
    p.add_argument("--quick", action="store_true", help="sizes 50 and 100, one repeat, no peptides")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_graphs")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.repeats, a.peptides = [50, 100], 1, []
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    cases: list[tuple[str, Tensor, Tensor]] = []
    for n in args.sizes:
        ei = molecule_like_graph(n, seed=n)
        cases.append((f"random-{n}", ei, torch.zeros(n, dtype=torch.long)))
    if args.peptides:
        from tasks.graph.data import PeptidesFuncRaw

        ds = PeptidesFuncRaw(args.release, "train")
        for g in args.peptides:
            b = Batch.from_data_list([ds[i] for i in range(g)])
            cases.append((f"peptides-{g}", b.edge_index, b.batch))
    rows = measure(cases, args.layers, args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_graphs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = report(rows, args, args.out, time.time() - start)
    (args.out / "bench_graphs.md").write_text(md)
    plot(rows, args.out / "bench_graphs.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
