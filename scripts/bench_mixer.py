#!/usr/bin/env python
"""Time and peak memory of every resolvent algorithm of :func:`chimera.ops.mix` (forward+backward).

Sizes are directed lines ``T in {128, 512, 2048}`` and one corner DAG of the grids
``{14², 28², 56², 64²}`` (``--grid-dags 4`` mixes all four corner DAGs instead, as the vision
model does: through :func:`chimera.ops.mix_sum` with the paper's diagonal B/C sharing, i.e. two
``(b, T, N)`` key/query groups shared by the heads, so ``exact`` takes the merged-mask path).
Every size also gets an SDPA attention baseline row (``method = sdpa``:
``torch.nn.functional.scaled_dot_product_attention`` on ``(batch, heads, T, headdim)``, causal on
lines, full on grids), so the numbers have a reference (DESIGN.md section 4).
``--level mixer`` times a whole :class:`chimera.ChimeraMixer` (``d_model = heads * headdim / 2``,
expand 2; the grid mixer always mixes over all four DAGs) against a minimal attention layer of the
same width (qkv projection, SDPA, output projection).

What is measured, per (method, size):

* ``time_ms``: the median over ``--repeats`` timed calls, after one warm-up call, of one
  forward+backward (``Y = mix(...)``, ``Y.backward(G)`` for a fixed random ``G``; gradients flow to
  ``V, B, C`` and the edge weights). Timed calls stop early once their total passes
  ``--timeout-per-case`` (at least one is always taken); ``repeats`` in the CSV says how many.
* ``peak_mem_mb``: memory allocated during one forward+backward above what was live before it
  (the inputs), measured on the warm-up call. On CUDA: ``torch.cuda.max_memory_allocated`` minus
  the allocated bytes at the start. On CPU: the peak of the total size of the live tensor storages
  created by ATen ops during the call, tracked by a ``TorchDispatchMode`` (every op output whose
  storage is new is counted until that storage is freed; views are not double counted). Kernel-
  internal scratch buffers that never become tensors (e.g. MKL/LAPACK workspaces) are not seen, so
  on CPU this is a lower bound of the allocator's peak, comparable across methods; RSS is not used
  (too noisy).

Budget: cases run in increasing size per topology family in a worker process. Before a case, its
single-call time is predicted from the same method's largest measured smaller size,
``t * (n / n_prev) ** k`` with ``k`` the larger of the method's asymptotic exponent (3 for the
dense methods, 2 for SDPA, 1 for scans) and the exponent observed between its last two sizes; if
that exceeds ``--timeout-per-case`` (or a smaller size already exceeded it) the case is recorded
as ``skipped (budget)``. Peak memory is predicted the same way and ``skipped (memory)`` when above
``--mem-limit-gb`` (default: 70% of the available RAM, or of the GPU's memory). A case that still
runs past ``max(3 * budget, 30 s)`` is killed and recorded as ``timeout``; a worker that dies (OOM)
is recorded as ``failed`` and restarted.

Outputs in ``--out`` (default ``results/bench_mixer``): ``bench_mixer.csv`` (one row per
(method, size), including ``n/a``/skipped rows), ``bench_mixer.md`` (the tables printed to stdout)
and ``bench_mixer.png`` (log-log time against number of nodes, one line per method).

Examples::

    python scripts/bench_mixer.py                          # full run, CPU, all cores
    python scripts/bench_mixer.py --quick --out /tmp/b     # smallest sizes, 1 repeat (the test)
    python scripts/bench_mixer.py --device cuda --methods exact dag_scan ssd triton sdpa
    python scripts/bench_mixer.py --level mixer --methods auto exact dag_scan sdpa
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
import weakref
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

OP_METHODS = ("reference", "exact", "neumann", "dag_dense", "dag_scan", "ssd", "triton")
BASELINE = "sdpa"
DEFAULT_SIZES = ("line:128", "line:512", "line:2048", "grid:14", "grid:28", "grid:56", "grid:64")
# asymptotic exponents in the number of nodes n, for the budget prediction
TIME_EXPONENT = {"reference": 3.0, "exact": 3.0, "neumann": 3.0, "dag_dense": 3.0,
                 "dag_scan": 1.0, "ssd": 1.0, "triton": 1.0, "sdpa": 2.0, "auto": 3.0}
MEM_EXPONENT = {"reference": 2.0, "exact": 2.0, "neumann": 2.0, "dag_dense": 2.0,
                "dag_scan": 1.0, "ssd": 1.0, "triton": 1.0, "sdpa": 2.0, "auto": 2.0}
CSV_FIELDS = ("level", "family", "size", "nodes", "edges", "num_dags", "method", "status",
              "time_ms", "time_min_ms", "repeats", "peak_mem_mb", "vs_sdpa", "note", "load1",
              "mem_kind", "batch", "heads", "headdim", "d_state", "dtype", "device", "threads")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def parse_size(spec: str) -> tuple[str, int]:
    """``line:T`` or ``grid:S`` (an S x S grid; ``grid:14x14`` also accepted)."""
    try:
        family, value = spec.split(":")
        family = family.strip().lower()
        if family == "grid" and "x" in value:
            a, b = value.lower().split("x")
            if int(a) != int(b):
                raise ValueError
            value = a
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {spec!r}: expected 'line:T' or 'grid:S' (square S x S grid)") from None
    if family not in ("line", "grid") or n < 2:
        raise argparse.ArgumentTypeError(f"size {spec!r}: family must be line or grid, n >= 2")
    return family, n


def num_nodes(family: str, n: int) -> int:
    return n if family == "line" else n * n


def size_label(family: str, n: int) -> str:
    return f"line {n}" if family == "line" else f"grid {n}x{n}"


def applicable(method: str, family: str, level: str) -> bool:
    if method == "ssd":
        return family == "line"
    return True


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------
class PeakTensorMemory(TorchDispatchMode):
    """Peak total bytes of live tensor storages created by ATen ops while the mode is active.

    Storages that already existed (inputs, parameters) are never counted; a storage is counted
    once (views share it) from the op that created it until it is freed (a weakref callback:
    storages keep one Python object for their lifetime). Works for forward and backward (CPU
    autograd runs on the calling thread with the mode active).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, tuple[weakref.ref, int]] = {}

    def _release(self, key: int, nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= nbytes

    def _visit(self, t: torch.Tensor, count: bool) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return
        key = id(st)
        if key in self._seen:
            return
        nbytes = st.nbytes() if count else 0
        ref = weakref.ref(st, lambda _r, k=key, nb=nbytes: self._release(k, nb))
        self._seen[key] = (ref, nbytes)
        if nbytes:
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                self._visit(a, count=False)  # pre-existing storages (inputs) are not counted
        out = func(*args, **kwargs)
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                self._visit(o, count=True)
        return out


# ---------------------------------------------------------------------------------------------
# the worker: builds inputs, times, measures memory
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg["device"])
        self.dtype = DTYPES[cfg["dtype"]]
        self._topos: dict = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def topology(self, family: str, n: int):
        from chimera.topology import grid, line

        key = (family, n)
        if key not in self._topos:
            full = line(n, directed=True) if family == "line" else grid(n, n)
            if self.cfg["level"] == "mixer":
                dags = None
            elif family == "line":
                dags = [full]
            else:
                dags = full.dags()[: self.cfg["grid_dags"]]
            full = full.to(self.device)
            dags = None if dags is None else [d.to(self.device) for d in dags]
            self._topos[key] = (full, dags)
        return self._topos[key]

    # -- one forward+backward closure per case ------------------------------------------------
    def build_op(self, family: str, n: int, method: str):
        from chimera.ops import mix, mix_sum

        cfg, dev, dt = self.cfg, self.device, self.dtype
        b, h, P, N = cfg["batch"], cfg["heads"], cfg["headdim"], cfg["d_state"]
        T = num_nodes(family, n)
        if method == BASELINE:
            q, k, v = (torch.randn(b, h, T, P, device=dev, dtype=dt, requires_grad=True)
                       for _ in range(3))
            G = torch.randn(b, h, T, P, device=dev, dtype=dt)
            causal = family == "line"
            leaves = (q, k, v)

            def step():
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                out.backward(G)

            return step, leaves, {"edges": 0, "num_dags": 0}

        _, dags = self.topology(family, n)
        many = len(dags) > 1  # the grid's corners as the model mixes them (see the docstring)
        bc_heads = 2 if many else h  # B/C groups (diagonal sharing) or one per head
        V = torch.randn(b, T, h, P, device=dev, dtype=dt)
        Bm = torch.randn(b, T, bc_heads, N, device=dev, dtype=dt) / math.sqrt(N)
        Cm = torch.randn(b, T, bc_heads, N, device=dev, dtype=dt) / math.sqrt(N)
        weights = []
        for dag in dags:
            # Chimera-like DAG weights: exp(-delta_ij) / |p(i)|, delta ~ softplus(N(0, 1))
            delta = torch.nn.functional.softplus(torch.randn(b, h, dag.num_edges, device=dev))
            indeg = torch.bincount(dag.dst, minlength=T).clamp(min=1).to(delta.dtype)
            weights.append((torch.exp(-delta) / indeg[dag.dst]).to(dt).requires_grad_())
        V.requires_grad_(), Bm.requires_grad_(), Cm.requires_grad_()
        G = torch.randn(b, T, h, P, device=dev, dtype=dt)
        leaves = (V, Bm, Cm, *weights)

        def step():
            if many:
                Y = mix_sum(V, Bm, Cm, weights, dags, [0, 1, 1, 0][:len(dags)], method=method,
                            chunk_size=cfg["chunk_size"])
            else:
                Y = mix(V, Bm, Cm, weights[0], dags[0], method=method,
                        chunk_size=cfg["chunk_size"])
            Y.backward(G)

        return step, leaves, {"edges": sum(d.num_edges for d in dags), "num_dags": len(dags)}

    def build_mixer(self, family: str, n: int, method: str):
        from chimera import ChimeraMixer

        cfg, dev, dt = self.cfg, self.device, self.dtype
        b, h, P, N = cfg["batch"], cfg["heads"], cfg["headdim"], cfg["d_state"]
        d_inner = h * P
        d_model = d_inner // 2
        T = num_nodes(family, n)
        x = torch.randn(b, T, d_model, device=dev, dtype=dt, requires_grad=True)
        G = torch.randn(b, T, d_model, device=dev, dtype=dt)
        if method == BASELINE:
            qkv = torch.nn.Linear(d_model, 3 * d_inner, bias=False, device=dev, dtype=dt)
            out_proj = torch.nn.Linear(d_inner, d_model, bias=False, device=dev, dtype=dt)
            causal = family == "line"
            params = (*qkv.parameters(), *out_proj.parameters())

            def step():
                q, k, v = qkv(x).view(b, T, 3, h, P).permute(2, 0, 3, 1, 4)
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                out_proj(o.transpose(1, 2).reshape(b, T, d_inner)).backward(G)

            return step, (x, *params), {"edges": 0, "num_dags": 0}

        topo, _ = self.topology(family, n)
        conv = "causal_line" if family == "line" else "grid"
        mixer = ChimeraMixer(d_model, conv=conv, d_state=N, headdim=P, expand=2.0,
                             method=method, chunk_size=cfg["chunk_size"]).to(dev, dt)

        def step():
            mixer(x, topo).backward(G)

        return step, (x, *mixer.parameters()), {"edges": topo.num_edges,
                                                "num_dags": mixer.num_dags}

    def _prepare(self, family: str, n: int, method: str):
        """Build a case and run its warm-up call (also the memory measurement): ``(timed_call,
        warm-up seconds, peak bytes, info)``; ``timed_call()`` runs one forward+backward and
        returns its seconds."""
        seed = self.cfg["seed"] + zlib.crc32(f"{family}:{n}:{method}".encode())
        torch.manual_seed(seed)
        build = self.build_mixer if self.cfg["level"] == "mixer" else self.build_op
        step, leaves, info = build(family, n, method)

        def zero():
            for p in leaves:
                p.grad = None

        def timed_call() -> float:
            zero()
            self.sync()
            t0 = time.perf_counter()
            step()
            self.sync()
            return time.perf_counter() - t0

        zero()
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            t0 = time.perf_counter()
            step()
            self.sync()
            t_warm = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(self.device) - base
        else:
            tracker = PeakTensorMemory()
            t0 = time.perf_counter()
            with tracker:
                step()
            t_warm = time.perf_counter() - t0
            peak = tracker.peak
        zero()
        return timed_call, t_warm, peak, info

    @staticmethod
    def _result(times: list[float], t_warm: float, budget: float, peak: float,
                info: dict) -> dict:
        return {"status": "ok" if t_warm <= budget else "over budget",
                "time_ms": 1e3 * statistics.median(times), "time_min_ms": 1e3 * min(times),
                "repeats": len(times), "peak_mem_mb": peak / 2**20, **info}

    def run_case(self, family: str, n: int, method: str, budget: float, repeats: int) -> dict:
        timed_call, t_warm, peak, info = self._prepare(family, n, method)
        times: list[float] = []
        if t_warm <= budget:
            for _ in range(repeats):
                times.append(timed_call())
                if sum(times) + times[-1] > budget:
                    break
        else:
            times = [t_warm]  # over budget already: report the single (warm-up) call
        return self._result(times, t_warm, budget, peak, info)

    def run_interleaved(self, family: str, n: int, methods: list[str], budget: float,
                        repeats: int) -> dict[str, dict]:
        """All ``methods`` of one size in one process, timed round by round (each method once
        per round, in turn), so that drift of the machine's speed hits every method alike. Each
        result also carries ``vs_base_rounds``: the median over rounds of its time over the
        baseline's time in the same round (when the baseline is among ``methods``)."""
        prepared, out = {}, {}
        for m in methods:
            try:
                prepared[m] = self._prepare(family, n, m)
            except Exception as e:  # noqa: BLE001 - one broken method must not stop the size
                out[m] = {"status": "error", "note": f"{type(e).__name__}: {e}"[:150]}
        times = {m: [] for m, p in prepared.items() if p[1] <= budget}
        spent = 0.0
        for _ in range(repeats):
            for m, ts in times.items():
                ts.append(prepared[m][0]())
                spent += ts[-1]
            if spent > budget * len(times):  # about one budget per method, as run_case
                break
        for m, (_, t_warm, peak, info) in prepared.items():
            out[m] = self._result(times.get(m) or [t_warm], t_warm, budget, peak, info)
            if m in times and BASELINE in times and m != BASELINE:
                ratios = [t / t0 for t, t0 in zip(times[m], times[BASELINE], strict=True)]
                out[m]["vs_base_rounds"] = statistics.median(ratios)
        return out


def _worker_main(conn, cfg: dict) -> None:
    if cfg["triton_interpret"]:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    runner = Runner(cfg)
    conn.send(("ready", None))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            res = (runner.run_interleaved(*msg[1:]) if msg[0] == "interleaved"
                   else runner.run_case(*msg))
        except torch.OutOfMemoryError as e:
            res = {"status": "failed", "note": f"OOM: {str(e).splitlines()[0][:120]}"}
        except Exception as e:  # noqa: BLE001 - a broken method must not stop the benchmark
            tb = traceback.format_exc(limit=3)
            print(tb, file=sys.stderr, flush=True)
            res = {"status": "error", "note": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
                   if str(e) else type(e).__name__}
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        conn.send(("result", res))


class Worker:
    """A spawned process that runs cases; killed and restarted on a timeout or a crash."""

    def __init__(self, cfg: dict, isolate: bool) -> None:
        self.cfg, self.isolate = cfg, isolate
        self.proc = None
        self.conn = None
        self.local = None

    def start(self) -> None:
        if not self.isolate:
            if self.cfg["triton_interpret"]:
                os.environ.setdefault("TRITON_INTERPRET", "1")
            torch.set_num_threads(self.cfg["threads"])
            self.local = Runner(self.cfg)
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.cfg), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(300) or self.conn.recv()[0] != "ready":
            raise RuntimeError("benchmark worker failed to start")

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.conn.send(None)
                self.proc.join(5)
            except (BrokenPipeError, OSError):
                pass
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()
            self.proc = None

    def run(self, case: tuple, hard_timeout: float) -> dict:
        if not self.isolate:
            if self.local is None:
                self.start()
            try:
                if case[0] == "interleaved":
                    return self.local.run_interleaved(*case[1:])
                return self.local.run_case(*case)
            except Exception as e:  # noqa: BLE001
                return {"status": "error", "note": f"{type(e).__name__}: {e}"[:150]}
        if self.proc is None:
            self.start()
        self.conn.send(case)
        try:
            if self.conn.poll(hard_timeout):
                return self.conn.recv()[1]
        except (EOFError, OSError):
            pass
        alive = self.proc.is_alive()
        if alive:
            self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.proc = None
        if alive:
            return {"status": "timeout", "note": f"killed after {hard_timeout:.0f} s"}
        why = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"status": "failed", "note": f"worker died ({why}; out of memory?)"}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def available_memory_bytes(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def predict(history: list[tuple[int, float]], n: int, exponent: float) -> float | None:
    """Extrapolate ``value`` to ``n`` nodes from ``history`` [(nodes, value)], increasing."""
    if not history:
        return None
    n1, v1 = history[-1]
    k = exponent
    if len(history) >= 2:
        n0, v0 = history[-2]
        if v0 > 0 and v1 > 0 and n1 > n0:
            k = max(k, math.log(v1 / v0) / math.log(n1 / n0))
    return v1 * (n / n1) ** k


def default_methods(device: str, level: str) -> list[str]:
    methods = [m for m in OP_METHODS if m != "triton" or device.startswith("cuda")]
    return [*methods, BASELINE]


def run_benchmark(args) -> list[dict]:
    sizes = sorted(set(args.sizes), key=lambda s: (s[0] != "line", num_nodes(*s)))
    if args.quick:
        smallest = {}
        for fam, n in sizes:
            smallest.setdefault(fam, (fam, n))
        sizes = list(smallest.values())
    methods = list(dict.fromkeys(args.methods or default_methods(args.device, args.level)))
    for m in methods:
        ok = m in OP_METHODS or m == BASELINE or (m == "auto" and args.level == "mixer")
        if not ok:
            raise SystemExit(f"unknown method {m!r}; choose from {(*OP_METHODS, BASELINE)}"
                             + (" or 'auto'" if args.level == "mixer" else ""))
    repeats = 1 if args.quick else args.repeats
    budget = args.timeout_per_case
    hard_timeout = max(3 * budget, 30.0)
    mem_limit = (args.mem_limit_gb * 2**30 if args.mem_limit_gb
                 else 0.7 * available_memory_bytes(args.device))
    cfg = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
           "seed": args.seed, "batch": args.batch, "heads": args.heads, "headdim": args.headdim,
           "d_state": args.d_state, "level": args.level, "grid_dags": args.grid_dags,
           "chunk_size": args.chunk_size,
           "triton_interpret": "triton" in methods and not args.device.startswith("cuda")}
    common = {"level": args.level, "batch": args.batch, "heads": args.heads,
              "headdim": args.headdim, "d_state": args.d_state, "dtype": args.dtype,
              "device": args.device, "threads": args.threads,
              "mem_kind": ("cuda max_memory_allocated" if args.device.startswith("cuda")
                           else "tracked tensor storages")}
    if args.omp_wait_policy:  # read by OpenMP at start-up: the spawned worker inherits it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    worker = Worker(cfg, isolate=not args.no_isolate)
    rows: list[dict] = []
    hist_t: dict[tuple[str, str], list] = {}
    hist_m: dict[tuple[str, str], list] = {}
    blocked: dict[tuple[str, str], str] = {}
    t_start = time.perf_counter()
    try:
        for fam, n in sizes:
            nodes = num_nodes(fam, n)
            size_rows, runnable = [], []
            for m in methods:
                key = (fam, m)
                row = {**common, "family": fam, "size": size_label(fam, n), "nodes": nodes,
                       "method": m, "status": "", "time_ms": "", "time_min_ms": "",
                       "repeats": "", "peak_mem_mb": "", "vs_sdpa": "", "note": "",
                       "edges": "", "num_dags": "", "load1": ""}
                t_pred = predict(hist_t.get(key, []), nodes, TIME_EXPONENT[m])
                m_pred = predict(hist_m.get(key, []), nodes, MEM_EXPONENT[m])
                if not applicable(m, fam, args.level):
                    row["status"] = "n/a"
                    row["note"] = "directed lines only"
                elif key in blocked:
                    row["status"] = "skipped (budget)"
                    row["note"] = blocked[key]
                elif t_pred is not None and t_pred > budget:
                    row["status"] = "skipped (budget)"
                    row["note"] = f"predicted {t_pred:.0f} s per call > {budget:g} s"
                elif m_pred is not None and m_pred * 2**20 > mem_limit:
                    row["status"] = "skipped (memory)"
                    row["note"] = (f"predicted {m_pred / 1024:.1f} GB > "
                                   f"{mem_limit / 2**30:.1f} GB")
                else:
                    runnable.append(m)
                size_rows.append(row)
            # per method: result, load at its start, wall seconds (interleaved: the size's)
            results: dict[str, tuple[dict, float, float]] = {}
            if args.interleave and runnable:
                load1, t0 = round(os.getloadavg()[0], 2), time.perf_counter()
                got = worker.run(("interleaved", fam, n, runnable, budget, repeats),
                                 hard_timeout * len(runnable))
                wall = time.perf_counter() - t0
                # a dead or killed worker answers once for the whole size
                results = {m: (got if "status" in got else got[m], load1, wall)
                           for m in runnable}
            for m in runnable if not args.interleave else ():
                load1, t0 = round(os.getloadavg()[0], 2), time.perf_counter()
                res = worker.run((fam, n, m, budget, repeats), hard_timeout)
                results[m] = (res, load1, time.perf_counter() - t0)
            for row in size_rows:
                m = row["method"]
                if m not in results:
                    continue
                (res, row["load1"], wall), key = results[m], (fam, m)
                row.update({k: v for k, v in res.items() if k in row})
                if "vs_base_rounds" in res:
                    row["vs_sdpa"] = res["vs_base_rounds"]
                if res["status"] in ("ok", "over budget"):
                    # the fastest call: least disturbed by other processes
                    hist_t.setdefault(key, []).append((nodes, res["time_min_ms"] / 1e3))
                    hist_m.setdefault(key, []).append((nodes, max(res["peak_mem_mb"], 1e-3)))
                if res["status"] != "ok":
                    blocked[key] = f"{res['status']} at {size_label(fam, n)}"
                    if res["status"] == "over budget":
                        row["note"] = f"one call took > {budget:g} s"
                print(f"[{time.perf_counter() - t_start:7.1f}s] {size_label(fam, n):>12} "
                      f"{m:>10}: {row['status']:<10} "
                      + (f"{row['time_ms']:10.1f} ms {row['peak_mem_mb']:9.1f} MB"
                         if row["time_ms"] != "" else "")
                      + f"  ({wall:.1f} s)"
                      + (f"  {row['note']}" if row["note"] else ""), flush=True)
            rows.extend(size_rows)
    finally:
        worker.stop()
    # ratios against the SDPA baseline of the same size (interleaved: already per round)
    base = {r["size"]: r["time_ms"] for r in rows
            if r["method"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        if r["time_ms"] != "" and base.get(r["size"]) and r["vs_sdpa"] == "":
            r["vs_sdpa"] = r["time_ms"] / base[r["size"]]
    return rows


def fit_slopes(rows: list[dict]) -> list[dict]:
    """Least-squares slope of log(time) and of log(peak memory) against log(nodes), per
    (family, method), over the sizes that ran (at least two): the empirical exponent, to set
    against the algorithm's (1 for scans, 2 for SDPA and the mask forms, 3 for dense inverses)."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        for m in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["nodes"], r["time_ms"], r["peak_mem_mb"]) for r in rows
                   if r["family"] == fam and r["method"] == m
                   and r["status"] in ("ok", "over budget")]
            if len(pts) < 2:
                continue
            xs = [math.log(p[0]) for p in pts]

            def slope(ys: list[float], xs: list[float] = xs) -> float:
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                sxx = sum((x - mx) ** 2 for x in xs)
                return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx

            out.append({"family": fam, "method": m, "sizes": len(pts),
                        "nodes": f"{pts[0][0]}-{pts[-1][0]}",
                        "time_slope": slope([math.log(p[1]) for p in pts]),
                        "mem_slope": slope([math.log(max(p[2], 1e-6)) for p in pts])})
    return out


def git_revision() -> str:
    import subprocess

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "no commit") + (" + uncommitted changes" if dirty.strip() else "")


def _fmt(x, spec: str) -> str:
    return "" if x == "" else format(x, spec)


def cell(r: dict, what: str) -> str:
    if r["status"] in ("ok", "over budget"):
        if what == "time":
            s = f"{r['time_ms']:.1f}" if r["time_ms"] < 1e4 else f"{r['time_ms']:.0f}"
            if r["vs_sdpa"] != "" and r["method"] != BASELINE:
                s += f" ({r['vs_sdpa']:.1f}x)"
            return s + (" (over budget)" if r["status"] == "over budget" else "")
        return f"{r['peak_mem_mb']:.1f}"
    return r["status"]


def markdown(rows: list[dict], args, total_s: float) -> str:
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["size"]): r for r in rows}
    nodes = {r["size"]: r["nodes"] for r in rows}
    what = ("whole ChimeraMixer (grid: 4 DAGs), vs a qkv+SDPA+out attention layer"
            if args.level == "mixer" else
            f"chimera.ops.mix on a directed line / {args.grid_dags} corner DAG(s) of the grid, "
            "vs SDPA (causal on lines)")
    mem = ("torch.cuda.max_memory_allocated above the allocation at the start of the call"
           if args.device.startswith("cuda") else
           "peak of live tensor storages created during the call (TorchDispatchMode tracker; "
           "inputs and kernel-internal scratch not counted)")
    lines = [
        "# bench_mixer: forward+backward time and peak memory",
        "",
        f"- level: {args.level}: {what}",
        f"- batch {args.batch}, heads {args.heads}, headdim P {args.headdim}, d_state N "
        f"{args.d_state}, {args.dtype}, device {args.device}, {args.threads} thread(s), "
        f"torch {torch.__version__}, OMP_WAIT_POLICY "
        f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}",
        (f"- time: median of up to {1 if args.quick else args.repeats} interleaved rounds "
         f"after one warm-up per method (each round calls every method of a size once, in "
         f"turn, in one process); (Nx) = the median over rounds of time / SDPA time in the "
         f"same round" if args.interleave else
         f"- time: median of up to {1 if args.quick else args.repeats} timed calls after one "
         f"warm-up; budget {args.timeout_per_case:g} s per call; "
         f"(Nx) = time / SDPA time at the same size"),
        f"- memory: {mem}",
        f"- total wall time {total_s:.0f} s; 1-min load average {args.load_start:.2f} at the "
        f"start, {args.load_end:.2f} at the end (above the thread count means other processes "
        f"shared the cores: CPU timings are then unreliable; per case in the CSV's load1)",
        f"- code: {git_revision()}",
        "",
        "## Time per forward+backward (ms)",
        "",
    ]

    def table(what: str) -> list[str]:
        head = "| method | " + " | ".join(f"{s} (n={nodes[s]})" for s in sizes) + " |"
        out = [head, "|---|" + "---:|" * len(sizes)]
        for m in methods:
            out.append(f"| {m} | " + " | ".join(
                cell(by[(m, s)], what) if (m, s) in by else "" for s in sizes) + " |")
        return out

    lines += table("time")
    lines += ["", "## Peak memory (MiB)", ""]
    lines += table("mem")
    slopes = fit_slopes(rows)
    if slopes:
        lines += ["", "## Log-log slopes against the number of nodes", "",
                  "least-squares fit over the sizes that ran; 1 = linear, 2 = quadratic", "",
                  "| family | method | sizes (nodes) | time slope | memory slope |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {q['family']} | {q['method']} | {q['sizes']} ({q['nodes']}) "
                  f"| {q['time_slope']:.2f} | {q['mem_slope']:.2f} |" for q in slopes]
    notes = [r for r in rows if r["note"] and r["status"] not in ("n/a",)]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {r['method']} @ {r['size']}: {r['status']}: {r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.5), squeeze=False)
    for ax, fam in zip(axes[0], families, strict=True):
        for i, m in enumerate(methods):
            pts = sorted((r["nodes"], r["time_ms"]) for r in rows
                         if r["family"] == fam and r["method"] == m
                         and r["status"] in ("ok", "over budget"))
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            style = dict(color="black", linestyle="--") if m == BASELINE else dict(
                color=f"C{i}")
            ax.plot(xs, ys, marker="o", label=m, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("number of nodes")
        ax.set_ylabel("forward+backward time (ms)")
        kind = "directed line" if fam == "line" else (
            "grid (4 DAGs)" if args.level == "mixer" or args.grid_dags == 4
            else "grid corner DAG")
        ax.set_title(f"{kind}, {args.level} level")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"batch {args.batch}, heads {args.heads}, P {args.headdim}, N {args.d_state}, "
                 f"{args.dtype}, {args.device}, {args.threads} thread(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                   help="line:T and grid:S entries (S x S grid), space or comma separated; "
                        f"default {' '.join(DEFAULT_SIZES)}")
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"subset of {' '.join((*OP_METHODS, BASELINE))} (mixer level: also "
                        "auto); default all, triton only on CUDA, sdpa is the baseline")
    p.add_argument("--level", choices=("op", "mixer"), default="op",
                   help="op: chimera.ops.mix alone; mixer: a whole ChimeraMixer")
    p.add_argument("--grid-dags", type=int, choices=(1, 4), default=1,
                   help="op level: mix over 1 corner DAG of the grid or sum all 4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--headdim", type=int, default=64, help="P")
    p.add_argument("--d-state", type=int, default=16, help="N")
    p.add_argument("--chunk-size", type=int, default=64, help="chunk length for ssd")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed calls (median) after warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: all available cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", choices=("passive", "active"), default=None,
                   help="set OMP_WAIT_POLICY for the worker (default: inherit). 'passive' avoids "
                        "multi-second OpenMP stalls when other processes share the cores")
    p.add_argument("--timeout-per-case", type=float, default=60.0,
                   help="budget in seconds for one forward+backward call (see module docstring)")
    p.add_argument("--mem-limit-gb", type=float, default=None,
                   help="skip cases predicted above this peak (default 70%% of available)")
    p.add_argument("--quick", action="store_true",
                   help="smallest size per family, 1 timed repeat (used by the test)")
    p.add_argument("--interleave", action="store_true",
                   help="time the methods of a size round by round in one process (each once "
                        "per round), so that machine drift hits all alike; (Nx) becomes the "
                        "median of per-round ratios. All of a size's inputs stay live at once")
    p.add_argument("--no-isolate", action="store_true",
                   help="run cases in this process (no worker; timeouts are not enforced)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_mixer")
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [parse_size(s) for s in DEFAULT_SIZES]
    if args.methods is not None:
        args.methods = [m for item in args.methods for m in item.split(",") if m]
    if args.threads is None:
        try:
            args.threads = len(os.sched_getaffinity(0))
        except AttributeError:
            args.threads = os.cpu_count() or 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def main(argv=None) -> int:
    # accept comma-separated --sizes too
    argv = list(sys.argv[1:] if argv is None else argv)
    expanded = []
    for a in argv:
        if ":" in a and "," in a:
            expanded.extend(x for x in a.split(",") if x)
        else:
            expanded.append(a)
    args = parse_args(expanded)
    t0 = time.perf_counter()
    args.load_start = os.getloadavg()[0]
    rows = run_benchmark(args)
    args.load_end = os.getloadavg()[0]
    total = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "bench_mixer.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (_fmt(r[k], ".6g") if isinstance(r[k], float) else r[k])
                        for k in CSV_FIELDS})
    md = markdown(rows, args, total)
    (args.out / "bench_mixer.md").write_text(md)
    plot(rows, args.out / "bench_mixer.png", args)
    print()
    print(md)
    print(f"wrote {args.out / 'bench_mixer.csv'}, bench_mixer.md, bench_mixer.png "
          f"in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
