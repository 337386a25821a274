"""The Triton DAG kernel (``mix(..., method="triton")``) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter, which must see ``TRITON_INTERPRET=1``
before the kernels are defined, so the comparisons run in one subprocess with that variable in
its environment (one start-up for all cases: the fixture below); each case is a tiny input,
because the interpreter costs about 1 ms per loop step per program. With a CUDA device, one
extra test runs the compiled kernels in-process at a moderate size.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch

from chimera.ops import mix
from chimera.topology import CycleError, grid, line
from tests.helpers import run_interpreted

pytestmark = pytest.mark.triton

_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")

_QUANTITIES = ("Y", "dV", "dB", "dC", "dw")

# name -> (topology expression, b, h, N, P, dtype, MAX_TILE override or None, non-contiguous)
# RANDOM7: 7 nodes whose ids are not in topological order, in-degrees up to 3, edges listed in
# a shuffled order (edge_weight follows edge_index, not any sorted order).
_CASES = {
    "line6": ("line(6, directed=True)", 2, 2, 4, 8, "float32", None, False),
    "grid3x3_top_left": ("grid(3, 3).dags()[0]", 2, 2, 4, 4, "float32", None, False),
    "grid3x3_bottom_right_odd_sizes": ("grid(3, 3).dags()[3]", 1, 2, 3, 5, "float32", None, False),
    "random7": ("RANDOM7", 2, 2, 4, 8, "float32", None, False),
    "random7_three_p_blocks": ("RANDOM7", 1, 2, 3, 5, "float32", 8, False),
    "random7_noncontiguous": ("RANDOM7", 2, 2, 4, 8, "float32", None, True),
    "random7_float64": ("RANDOM7", 1, 2, 4, 4, "float64", None, False),
    "two_graphs_batch": ("TWO_GRAPHS", 2, 2, 4, 4, "float32", None, False),
    "no_edges": ("from_edge_index(torch.zeros(2, 0, dtype=torch.long), 3)",
                 1, 2, 4, 4, "float32", None, False),
}

_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import chimera.ops.triton as ct
    from chimera.ops import mix
    from chimera.topology import from_edge_index, grid, line

    RANDOM7 = from_edge_index(torch.tensor(
        [[3, 5, 5, 0, 3, 6, 0, 2, 6, 5, 1, 3],
         [6, 0, 2, 2, 0, 1, 4, 1, 2, 6, 4, 1]]), 7)
    TWO_GRAPHS = from_edge_index(torch.tensor([[0, 1, 0, 4, 4], [1, 2, 2, 5, 6]]), 7,
                                 batch=torch.tensor([0, 0, 0, 1, 1, 1, 1]))
    cases = json.loads(sys.argv[1])
    out = {}
    for name, (expr, b, h, N, P, dtype, max_tile, noncontig) in cases.items():
        torch.manual_seed(0)
        topo = eval(expr)
        dtype = getattr(torch, dtype)
        T, E = topo.num_nodes, topo.num_edges
        V = torch.randn(b, T, h, P, dtype=dtype, requires_grad=True)
        B = torch.randn(b, T, h, N, dtype=dtype, requires_grad=True)
        C = torch.randn(b, T, h, N, dtype=dtype, requires_grad=True)
        w = (0.1 + 0.8 * torch.rand(b, h, E, dtype=dtype)).requires_grad_()
        dY = torch.randn(b, T, h, P, dtype=dtype)
        ct.MAX_TILE = max_tile or 8192
        res = {}
        t0 = time.perf_counter()
        for method in ("reference", "triton"):
            args = (V, B, C, w)
            if noncontig and method == "triton":  # same values, permuted memory layouts
                args = tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in args[:3])
                args += (w.transpose(1, 2).contiguous().transpose(1, 2),)
                assert not any(t.is_contiguous() for t in args)
            Y = mix(*args, topo, method=method)
            assert Y.dtype == dtype and Y.shape == V.shape
            res[method] = (Y,) + torch.autograd.grad(Y, (V, B, C, w), dY)
        errs = [float((a - r).abs().max()) if a.numel() else 0.0
                for a, r in zip(res["triton"], res["reference"])]
        out[name] = {"err": errs, "seconds": time.perf_counter() - t0}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    return run_interpreted(_WORKER, _CASES)


@needs_triton
@pytest.mark.parametrize("name", list(_CASES))
def test_interpreted_matches_reference(interpreted_results, name):
    errs = dict(zip(_QUANTITIES, interpreted_results[name]["err"], strict=True))
    atol = 1e-10 if _CASES[name][5] == "float64" else 1e-4
    bad = {k: v for k, v in errs.items() if not v <= atol}
    assert not bad, f"{name}: max |triton - reference| above {atol}: {bad} (all: {errs})"


def test_cpu_without_interpret_raises_clear_error(monkeypatch):
    if "chimera.ops.triton._kernels" in sys.modules:
        pytest.skip("the kernels were already defined in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    topo = line(4, directed=True)
    V, B = torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2)
    w = torch.rand(1, 1, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as info:
        mix(V, B, B, w, topo, method="triton")
    assert "CUDA" in str(info.value)
    assert "chimera.ops.triton._kernels" not in sys.modules  # nothing was defined


def test_missing_triton_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    topo = line(4, directed=True)
    V, B = torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        mix(V, B, B, torch.rand(1, 1, 3), topo, method="triton")


def test_cycle_is_rejected_before_any_kernel():
    topo = line(4)  # undirected: a 2-cycle per edge
    V, B = torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2)
    with pytest.raises(CycleError):
        mix(V, B, B, torch.rand(1, 1, topo.num_edges), topo, method="triton")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
def test_compiled_matches_reference_on_cuda():
    torch.manual_seed(0)
    topo = grid(8, 8).dags()[2]
    for b, h, N, P in ((2, 4, 16, 64), (1, 2, 128, 96)):  # the second has two P-blocks
        T, E = topo.num_nodes, topo.num_edges
        kw = dict(device="cuda", requires_grad=True)
        V, B, C = (torch.randn(b, T, h, n, **kw) for n in (P, N, N))
        w = (0.1 + 0.8 * torch.rand(b, h, E, device="cuda")).requires_grad_()
        dY = torch.randn(b, T, h, P, device="cuda")
        outs = {}
        for method in ("reference", "triton"):
            Y = mix(V, B, C, w, topo, method=method)
            outs[method] = (Y,) + torch.autograd.grad(Y, (V, B, C, w), dY)
        for q, a, r in zip(_QUANTITIES, outs["triton"], outs["reference"], strict=True):
            scale = float(r.abs().max()) + 1.0
            assert float((a - r).abs().max()) <= 1e-4 * scale, (q, b, h, N, P)
