#!/usr/bin/env python
"""Issue 8 §9: forward+backward time of one Chimera text layer against one BERT layer.

    python scripts/bench_text_layers.py [--threads 2] [--lengths 128,512] [--batch 8]

One ``ChimeraBlock`` of the text encoder (DAG: the two directed lines, SSD each; UG: the general
method on the undirected line with the two-cycle constraint; d_state 64, headdim 64, expand 2,
conv width 7, no MLP, as the paper's blocks) and one ``transformers`` ``BertLayer`` (attention +
MLP 4x) of the same width, timed in one process, rounds interleaved so that a change in machine
load hits every model alike; the median of the rounds is reported, with the ratios to BERT and
UG / DAG. Writes ``results/bench_text/bench_text_layers.{csv,md}``. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build(kind: str, width: int, d_state: int, headdim: int) -> nn.Module:
    """One layer of ``kind`` (``dag``, ``ug`` or ``bert``) of width ``width``."""
    if kind == "bert":
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        cfg = BertConfig(hidden_size=width, num_attention_heads=max(1, width // 64),
                         intermediate_size=4 * width, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
        # A standalone BertLayer has no attention dispatch (eager); BertForMaskedLM picks sdpa,
        # so time the layer as the trained model runs it.
        cfg._attn_implementation = "sdpa"
        return BertLayer(cfg)
    from chimera.block import ChimeraBlock
    from chimera.models.text import variant_mixer_kwargs

    return ChimeraBlock(width, mlp_ratio=0.0, d_state=d_state, headdim=headdim, expand=2.0,
                        d_conv=7, **variant_mixer_kwargs(kind))


def step_fn(kind: str, layer: nn.Module, x: torch.Tensor) -> Any:
    """A closure running forward + backward once."""
    if kind == "bert":
        def run() -> None:
            out = layer(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return run
    from chimera.models.text import line_topology

    topo = line_topology(x.shape[1])

    def run() -> None:
        layer(x, topo).sum().backward()
    return run


def bench(kinds: list[str], lengths: list[int], batch: int, width: int, d_state: int,
          headdim: int, rounds: int, warmup: int = 1) -> list[dict[str, Any]]:
    rows = []
    for T in lengths:
        torch.manual_seed(0)
        fns = {}
        for k in kinds:
            layer = build(k, width, d_state, headdim)
            x = torch.randn(batch, T, width, requires_grad=True)
            fns[k] = step_fn(k, layer, x)
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(rounds):  # interleaved: a load change hits all models alike
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        for k in kinds:
            rows.append({"T": T, "layer": k, "batch": batch, "width": width,
                         "median_ms": 1e3 * med[k], "min_ms": 1e3 * min(times[k]),
                         "ratio_to_bert": med[k] / med["bert"] if "bert" in med else None,
                         "ratio_to_dag": med[k] / med["dag"] if "dag" in med else None})
    return rows


def write(rows: list[dict[str, Any]], out: Path, threads: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_text_layers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# One text layer, forward + backward (issue 8 §9)", "",
             f"{threads} thread(s), float32, CPU; median over interleaved rounds. Goals: "
             f"DAG <= 1.5x BERT at T = 128, UG <= 2x DAG.", "",
             "| T | layer | median ms | min ms | / BERT | / DAG |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        rb = f"{r['ratio_to_bert']:.2f}" if r["ratio_to_bert"] is not None else "–"
        rd = f"{r['ratio_to_dag']:.2f}" if r["ratio_to_dag"] is not None else "–"
        lines.append(f"| {r['T']} | {r['layer']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{rb} | {rd} |")
    md = "\n".join(lines) + "\n"
    (out / "bench_text_layers.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="128,512")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--d-state", type=int, default=64)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_text")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = bench(["bert", "dag", "ug"], [int(t) for t in args.lengths.split(",")], args.batch,
                 args.width, args.d_state, args.headdim, args.rounds)
    print(write(rows, args.out, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
