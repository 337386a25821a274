#!/usr/bin/env python
"""Reproduce one paper table: its sweep (resumable), then the table beside the paper's numbers.

    python scripts/reproduce.py table3 --preset tiny [--seeds 0,1,2] [--jobs 2] [-- overrides]

Runs go to results/runs/<table>/<preset>/<member>/seed<k>/ and the table to
results/tables/<table>/<preset>/ (both ignored by git). A table whose spec lists `stages`
(e.g. pretraining, then finetuning from the pretrained runs) runs one sweep per stage, in order,
into the same runs folder (tasks.core.tables.stages_of); `--seeds` replaces the seeds of the
stages that do not name their own. Re-running skips finished members and
resumes unfinished ones from their last checkpoint. The reference tables that the README quotes
live in results/reference/ and change only through `make promote-<table>` (see the README).

``--jobs N`` (N > 1) runs the members of each stage N at a time, one ``train.py`` process per
(member, seed) with one torch thread each unless the overrides set ``num_threads``: small models
on a CPU of N cores finish a table sooner this way than one run at a time on N threads (their
ops are too small to split well). The run folders and the table are the same as with one job;
each run's console output goes to ``<runs>/logs/<member>-seed<k>.log``.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def preflight(experiment: str, preset: str, overrides: list[str]) -> dict[str, str]:
    """Compose the first member and check its data, so a missing dataset stops everything
    at once with the data module's message (not once per member). Returns the experiment's own
    ``hydra.sweeper.params`` (``key -> "a,b,c"``) as composed, which ``--jobs`` splits."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from tasks.core.driver import apply_model_size, instantiate
    from tasks.core.errors import RunError

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"preset={preset}",
                                          *overrides], return_hydra_config=True)
    params = {str(k): str(v) for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    with open_dict(cfg):
        cfg.paths.output_dir = str(ROOT / "results" / ".preflight")
    HydraConfig.instance().set_config(cfg)
    try:
        cfg = apply_model_size(cfg)
        instantiate(cfg.data).prepare_data()
    except RunError as e:
        print(f"\nerror: {e}\n", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    return params


def member_commands(experiment: str, preset: str, params: dict[str, str], seeds: list,
                    runs: Path, extra: list[str]) -> list[tuple[str, list[str]]]:
    """One ``train.py -m`` command per (sweep combination, seed), each a sweep of one run into
    the same sweep folder (the run folders depend on the member and seed only, so concurrent
    sweeps never share one). Returns ``(label, command)`` pairs."""
    keys = list(params)
    for k in keys:  # Hydra's extended sweep syntax (range(...), glob(...), [..]) is not split here
        if any(c in params[k] for c in "()[]{}"):
            raise ValueError(f"--jobs > 1 splits plain comma-separated sweeps only; "
                             f"{k}={params[k]!r} needs --jobs 1 (JOBS=1)")
    values = [[v.strip() for v in params[k].split(",") if v.strip()] for k in keys]
    threads = [] if any(o.split("=", 1)[0] == "num_threads" for o in extra) else ["num_threads=1"]
    out = []
    for combo in itertools.product(*values):
        for seed in seeds:
            label = "-".join(v.rsplit("/", 1)[-1] for v in combo) + f"-seed{seed}"
            chosen = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
            cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m",
                   f"experiment={experiment}", f"preset={preset}", f"seed={seed}",
                   f"hydra.sweep.dir={runs}", *chosen, *threads, *extra]
            out.append((label or f"seed{seed}", cmd))
    return out


def run_parallel(commands: list[tuple[str, list[str]]], jobs: int, log_dir: Path) -> int:
    """Run the commands ``jobs`` at a time; each one's output to ``log_dir/<label>.log``.
    Returns the number of commands that exited non-zero."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def one(item: tuple[str, list[str]]) -> int:
        label, cmd = item
        t0 = time.time()
        with open(log_dir / f"{label}.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        print(f"    {label}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        return rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return sum(rc != 0 for rc in pool.map(one, commands))


def main(argv: list[str] | None = None) -> int:
    from tasks.core.tables import find_experiment, load_spec, stages_of, write_table

    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], [a for a in argv[i + 1:] if a]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--seeds", default=None, help="comma-separated, or a count n (0..n-1)")
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, one torch thread each (default 1: one sweep)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2

    experiment = find_experiment(args.table)
    family, name = experiment.split("/") if "/" in experiment else ("", experiment)
    preset = f"{family}/{args.preset}" if family else args.preset
    if not (ROOT / "conf" / "preset" / f"{preset}.yaml").is_file():
        print(f"error: no preset {args.preset!r} for {experiment} (conf/preset/{preset}.yaml)",
              file=sys.stderr)
        return 2
    spec = load_spec(experiment)
    if args.seeds is None:
        seeds = list(spec.get("seeds", {}).get(args.preset, [0]))
    elif args.seeds.isdigit():
        if int(args.seeds) == 0:
            print("error: SEEDS=0 is a count of zero seeds; for seed 0 alone write SEEDS=0, "
                  "(a list), for seeds 0..n-1 SEEDS=n", file=sys.stderr)
            return 2
        seeds = list(range(int(args.seeds)))
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    runs = Path(args.runs or ROOT / "results" / "runs" / name / args.preset).resolve()
    out = args.out or ROOT / "results" / "tables" / name / args.preset
    stages = stages_of(spec, experiment, args.preset, seeds)
    # every stage's data, before anything runs (and each stage's own sweep, for --jobs)
    own_params = [preflight(st["experiment"], preset, extra) for st in stages]

    start = time.time()
    for i, st in enumerate(stages):
        label = f" stage {i + 1}/{len(stages)} ({st['experiment']})" if len(stages) > 1 else ""
        print(f"==> {name}{label}, preset {args.preset}, seeds {st['seeds']} -> {runs}",
              flush=True)
        t0 = time.time()
        # a failed member does not stop later stages: their other members may still run, and
        # the members that needed it fail with a clear error (listed in the table)
        if args.jobs > 1:
            params = {**own_params[i], **st["params"]}
            commands = member_commands(st["experiment"], preset, params, st["seeds"], runs,
                                       extra)
            print(f"    {len(commands)} runs, {args.jobs} at a time, logs in {runs}/logs",
                  flush=True)
            sweep_rc = run_parallel(commands, args.jobs, runs / "logs")
        else:
            cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m",
                   f"experiment={st['experiment']}", f"preset={preset}",
                   "seed=" + ",".join(str(s) for s in st["seeds"]), f"hydra.sweep.dir={runs}",
                   *[f"{k}={v}" for k, v in st["params"].items()], *extra]
            sweep_rc = subprocess.call(cmd, cwd=ROOT)
        print(f"==> sweep{label} finished in {time.time() - t0:.0f} s (exit {sweep_rc})",
              flush=True)
    print(f"==> all sweeps finished in {time.time() - start:.0f} s", flush=True)
    md, result = write_table(experiment, runs, out, args.preset, seeds)
    print(md)
    print(f"==> table: {out}/table.md (+ table.csv, runs.csv, table.png)")
    incomplete = [r for r in result if r.status != "done"]
    if incomplete:
        print(f"error: {len(incomplete)} of {len(result)} runs did not finish; re-run the same "
              f"command to retry them (finished runs are skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
