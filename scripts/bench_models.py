#!/usr/bin/env python
"""Whole-model forward+backward time: Chimera-ViT against the ViT it stands in for, in one process.

Cases (``--cases``; each a pair of timm models built with the same batch and images):

* ``s224``: ``chimera_vit_small_patch16_224`` (22.6M) vs ``vit_small_patch16_224`` (22.1M) at
  224², 3 channels, 1000 classes, batch 8 (the issue's measurement);
* ``tiny7`` / ``tiny14``: the tiny vision sizes of ``conf/model/vision/*_s.yaml`` (``sizes.tiny``:
  Chimera width 64, 4 layers, 2 heads, d_state 16 vs ViT width 72, 2 layers, MLP 4) on 28x28
  one-channel images (Fashion-MNIST), 10 classes, batch 64, with patch 4 (a 7x7 grid) and
  patch 2 (14x14).

One step is ``model.zero_grad(); model(x).sum().backward()`` in train mode with drop path off (so
every repeat does the same work). After one warm-up step per model, ``--repeats`` rounds run each
model of a case once, interleaved, so a burst of load from other processes hits both models of a
round alike. Reported per case: each model's median step time, and the ratio Chimera / ViT as
the median of the per-round ratios (the robust figure on a shared machine) and as the ratio of
the medians. Only ratios from one process are comparable across runs on a busy machine.

Outputs in ``--out`` (default ``results/bench_models``): ``bench_models.csv`` (one row per
(case, model) with every repeat's time), ``bench_models.md`` (the table printed to stdout) and
``bench_models.png`` (per-round ratios per case).

Examples::

    python scripts/bench_models.py                              # all cases, 2 threads, 5 rounds
    python scripts/bench_models.py --cases tiny7 --repeats 1 --out /tmp/b   # the test
    python scripts/bench_models.py --mixer-method dag_scan      # force one mixer algorithm
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _set_omp_wait_policy(argv: list[str]) -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: apply ``--omp-wait-policy``
    (default passive, unless the environment already sets one) before importing torch. With
    other processes on the cores, active spinning threads turn every small op into a wait for a
    descheduled thread; both models of a case run under the same policy."""
    policy = None
    for i, a in enumerate(argv):
        if a.startswith("--omp-wait-policy="):
            policy = a.split("=", 1)[1]
        elif a == "--omp-wait-policy" and i + 1 < len(argv):
            policy = argv[i + 1]
    if policy is not None:
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


if __name__ == "__main__":
    _set_omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402

# case -> (batch, img_size, in_chans, num_classes, chimera kwargs, vit kwargs)
_TINY_CHIMERA = dict(embed_dim=64, depth=4, num_heads=2, d_state=16)
_TINY_VIT = dict(embed_dim=72, depth=2, num_heads=2, mlp_ratio=4.0)
CASES: dict[str, tuple[int, int, int, int, dict, dict]] = {
    "s224": (8, 224, 3, 1000, {}, {}),
    "tiny7": (64, 28, 1, 10, dict(_TINY_CHIMERA, patch_size=4), dict(_TINY_VIT, patch_size=4)),
    "tiny14": (64, 28, 1, 10, dict(_TINY_CHIMERA, patch_size=2), dict(_TINY_VIT, patch_size=2)),
}
CHIMERA, VIT = "chimera_vit_small_patch16_224", "vit_small_patch16_224"
CSV_FIELDS = ("case", "model", "params_m", "grid", "batch", "median_ms", "min_ms",
              "ratio_median_of_rounds", "ratio_of_medians", "repeats", "times_ms",
              "mixer_method", "threads", "load1_start", "load1_end", "torch", "code")


def build(case: str, mixer_method: str | None) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    import timm

    import chimera.models.vit  # noqa: F401  (registers the Chimera models with timm)

    batch, img, chans, classes, ch_kw, vit_kw = CASES[case]
    common = dict(img_size=img, in_chans=chans, num_classes=classes, drop_path_rate=0.0)
    if mixer_method is not None:
        ch_kw = dict(ch_kw, method=mixer_method)
    models = {CHIMERA: timm.create_model(CHIMERA, **common, **ch_kw),
              VIT: timm.create_model(VIT, **common, **vit_kw)}
    x = torch.randn(batch, chans, img, img, generator=torch.Generator().manual_seed(0))
    return models, x


def step(model: torch.nn.Module, x: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - t0


def run_case(case: str, repeats: int, mixer_method: str | None) -> list[dict]:
    models, x = build(case, mixer_method)
    for m in models.values():
        m.train()
        step(m, x)  # warm-up: allocator, topology caches, oneDNN primitives
    times: dict[str, list[float]] = {name: [] for name in models}
    ratios = []
    for r in range(repeats):
        # alternate which model goes first, so neither always follows the other's frees
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in order:
            times[name].append(step(models[name], x))
        ratios.append(times[CHIMERA][-1] / times[VIT][-1])
    grid = getattr(models[CHIMERA], "grid_size", None)
    rows = []
    for name, m in models.items():
        ts = times[name]
        rows.append(dict(
            case=case, model=name, params_m=sum(p.numel() for p in m.parameters()) / 1e6,
            grid=f"{grid[0]}x{grid[1]}" if grid else "", batch=x.shape[0],
            median_ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts),
            ratio_median_of_rounds=statistics.median(ratios) if name == CHIMERA else "",
            ratio_of_medians=(statistics.median(ts) / statistics.median(times[VIT])
                              if name == CHIMERA else ""),
            repeats=len(ts), times_ms=" ".join(f"{1e3 * t:.1f}" for t in ts),
            mixer_method=mixer_method or "auto"))
    return rows


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "chimera", "scripts/bench_models.py"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "no commit") + (" + uncommitted changes" if dirty.strip() else "")


def markdown(rows: list[dict], args) -> str:
    r0 = rows[0]
    lines = [
        "# bench_models: whole-model forward+backward, Chimera-ViT vs ViT in one process",
        "",
        f"- {args.threads} thread(s), torch {torch.__version__}, mixer method "
        f"{r0['mixer_method']}, {args.repeats} interleaved rounds after one warm-up step per "
        f"model; drop path off; OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        f"- 1-min load average {r0['load1_start']} at the start, {r0['load1_end']} at the end "
        "(above the thread count: other processes shared the cores; trust the ratios, not the "
        "absolute times)",
        f"- code: {r0['code']}",
        "",
        "| case | grid | batch | Chimera-ViT (M params) | ViT (M params) | Chimera ms (median) "
        "| ViT ms (median) | ratio (median of rounds) | ratio of medians |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    for c in cases:
        ch = next(r for r in rows if r["case"] == c and r["model"] == CHIMERA)
        vt = next(r for r in rows if r["case"] == c and r["model"] == VIT)
        lines.append(
            f"| {c} | {ch['grid']} | {ch['batch']} | {ch['params_m']:.2f} | {vt['params_m']:.2f} "
            f"| {ch['median_ms']:.1f} | {vt['median_ms']:.1f} "
            f"| **{ch['ratio_median_of_rounds']:.2f}x** | {ch['ratio_of_medians']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(cases) + 2, 4))
    for i, c in enumerate(cases):
        ch = next(r for r in rows if r["case"] == c and r["model"] == CHIMERA)
        vt = next(r for r in rows if r["case"] == c and r["model"] == VIT)
        per_round = [a / b for a, b in zip(map(float, ch["times_ms"].split()),
                                           map(float, vt["times_ms"].split()), strict=True)]
        ax.scatter([i] * len(per_round), per_round, color="C0", alpha=0.5)
        ax.bar(i, ch["ratio_median_of_rounds"], color="C0", alpha=0.3)
    ax.axhline(1.5, color="red", linestyle="--", label="goal 1.5x")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("Chimera-ViT / ViT time (fwd+bwd)")
    ax.set_title("whole model, per-round ratios and their median")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=tuple(CASES), default=list(CASES))
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--mixer-method", default=None,
                   help="force the Chimera mixer's method (default: its 'auto')")
    p.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                   help="OMP_WAIT_POLICY for this process (default: the environment's, else "
                        "passive); read before torch is imported")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_models")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = round(os.getloadavg()[0], 2)
    rows: list[dict] = []
    for case in args.cases:
        t0 = time.perf_counter()
        case_rows = run_case(case, args.repeats, args.mixer_method)
        ch = case_rows[0]
        print(f"{case:>7}: Chimera {ch['median_ms']:9.1f} ms, ViT {case_rows[1]['median_ms']:9.1f}"
              f" ms, ratio {ch['ratio_median_of_rounds']:.2f}x (median of rounds)  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        rows += case_rows
    meta = dict(threads=args.threads, load1_start=load_start,
                load1_end=round(os.getloadavg()[0], 2), torch=torch.__version__,
                code=git_revision())
    for r in rows:
        r.update(meta)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_models.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (format(r[k], ".6g") if isinstance(r[k], float) else r[k])
                        for k in CSV_FIELDS})
    md = markdown(rows, args)
    (args.out / "bench_models.md").write_text(md)
    plot(rows, args.out / "bench_models.png")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
