"""The grid corner DAG Triton kernel (:mod:`chimera.ops.triton.grid`) against the reference.

As in ``test_triton.py``, the interpreted kernels need ``TRITON_INTERPRET=1`` before they are
defined, so all interpreted comparisons run in one subprocess (one start-up, tiny inputs: the
interpreter costs about 1 ms per loop step per program). Outputs and the gradients of ``V, B, C``
and the edge weights are compared with ``mix(..., method="reference")`` (float64 LU) for all four
corners of 3x4, 4x3, 1x5 and 5x1 grids, in both scan orientations, with several P-blocks, fp64,
non-contiguous inputs and bf16 inputs. With a CUDA device one extra test runs the compiled kernel.
"""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch

from chimera.ops.triton.grid import grid_triton_plan, mix_grid_triton
from chimera.topology import from_edge_index, grid, line
from tests.helpers import run_interpreted

pytestmark = pytest.mark.triton

_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton is not installed")

_QUANTITIES = ("Y", "dV", "dB", "dC", "dw")
_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# name -> (H, W, corner index, b, h, N, P, dtype, orientation, max_tile, via, non-contiguous)
# via: "mix" (mix(..., method="triton"), i.e. the dispatch) or "direct" (mix_grid_triton)
_CASES: dict[str, tuple] = {}
for _H, _W in ((3, 4), (4, 3), (1, 5), (5, 1)):
    for _k, _corner in enumerate(_CORNERS):
        _CASES[f"{_H}x{_W}_{_corner}"] = (_H, _W, _k, 2, 1, 3, 5, "float32", None, None, "mix",
                                         False)
_CASES.update({
    # the orientation auto-selection does not pick (scan along the shorter side), 2 P-blocks
    "3x4_top_right_cols_two_p_blocks": (3, 4, 1, 1, 2, 3, 5, "float32", "cols", 16, "direct",
                                        False),
    "4x3_bottom_left_rows_two_p_blocks": (4, 3, 2, 1, 2, 3, 5, "float32", "rows", 16, "direct",
                                          False),
    "3x4_bottom_right_float64": (3, 4, 3, 1, 2, 4, 4, "float64", None, None, "direct", False),
    "3x4_top_left_noncontiguous": (3, 4, 0, 2, 2, 4, 4, "float32", None, None, "direct", True),
    "4x3_top_right_bfloat16": (4, 3, 1, 1, 2, 4, 4, "bfloat16", None, None, "direct", False),
})

_WORKER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from chimera.ops import mix
    from chimera.ops.triton import mix_grid_triton
    from chimera.topology import grid

    cases = json.loads(sys.argv[1])
    out = {}
    for name, (H, W, k, b, h, N, P, dtype, orient, max_tile, via, noncontig) in cases.items():
        torch.manual_seed(0)
        topo = grid(H, W).dags()[k]
        T, E = topo.num_nodes, topo.num_edges
        dtype = getattr(torch, dtype)
        V = torch.randn(b, T, h, P, dtype=torch.float64).to(dtype).requires_grad_()
        B = torch.randn(b, T, h, N, dtype=torch.float64).to(dtype).requires_grad_()
        C = torch.randn(b, T, h, N, dtype=torch.float64).to(dtype).requires_grad_()
        w = (0.1 + 0.8 * torch.rand(b, h, E, dtype=torch.float64)).to(dtype).requires_grad_()
        dY = torch.randn(b, T, h, P, dtype=torch.float64).to(dtype)
        args = (V, B, C, w)
        if noncontig:  # same values, permuted memory layouts
            args = tuple(t.transpose(0, 1).contiguous().transpose(0, 1) for t in args[:3])
            args += (w.transpose(1, 2).contiguous().transpose(1, 2),)
            assert not any(t.is_contiguous() for t in args)
        t0 = time.perf_counter()
        if via == "mix":
            Y = mix(*args, topo, method="triton")
        else:
            Y = mix_grid_triton(*args, topo, orientation=orient, max_tile=max_tile)
        got = (Y,) + torch.autograd.grad(Y, (V, B, C, w), dY)
        seconds = time.perf_counter() - t0
        # the reference sees the same (for bf16: the same rounded) values, in float32
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ref_in = [t.detach().to(ref_dtype).requires_grad_() for t in (V, B, C, w)]
        Yr = mix(*ref_in, topo, method="reference")
        ref = (Yr,) + torch.autograd.grad(Yr, ref_in, dY.to(ref_dtype))
        errs, scales, finite = [], [], True
        for a, r in zip(got, ref):
            assert a.dtype == dtype and a.shape == r.shape
            finite &= bool(torch.isfinite(a).all())
            errs.append(float((a.detach().to(ref_dtype) - r.detach()).abs().max()))
            scales.append(float(r.detach().abs().max()))
        out[name] = {"err": errs, "scale": scales, "finite": finite, "seconds": seconds}
    loaded = sorted(m for m in sys.modules if m.startswith("chimera.ops.triton."))
    print("RESULT" + json.dumps({"cases": out, "modules": loaded}))
    """
)


@pytest.fixture(scope="module")
def interpreted_results() -> dict:
    return run_interpreted(_WORKER, _CASES)


@needs_triton
@pytest.mark.parametrize("name", list(_CASES))
def test_interpreted_matches_reference(interpreted_results, name):
    res = interpreted_results["cases"][name]
    dtype = _CASES[name][7]
    assert res["finite"], f"{name}: non-finite output or gradient"
    errs = dict(zip(_QUANTITIES, res["err"], strict=True))
    if dtype == "bfloat16":  # bf16 output rounding (8 bits) of fp32 states: relative ~4e-3
        tol = {q: 1e-2 * (1.0 + s) for q, s in zip(_QUANTITIES, res["scale"], strict=True)}
    else:
        tol = dict.fromkeys(_QUANTITIES, 1e-10 if dtype == "float64" else 1e-4)
    bad = {q: e for q, e in errs.items() if not e <= tol[q]}
    assert not bad, f"{name}: max |triton - reference| above tolerance: {bad} (all: {errs})"


@needs_triton
def test_mix_dispatches_grid_corners_to_the_grid_kernel(interpreted_results):
    # the "mix" cases are all grid corners: the grid kernels were defined, the level-set ones not
    assert "chimera.ops.triton._grid_kernels" in interpreted_results["modules"]
    assert "chimera.ops.triton._kernels" not in interpreted_results["modules"]


def test_plan_applies_to_complete_grid_corners_only():
    N = 4
    for k in range(4):
        plan = grid_triton_plan(grid(3, 4).dags()[k], N)
        assert plan is not None and (plan["R"], plan["S"]) == (3, 4)  # scan the longer side
        assert plan["orientation"] == "rows"
    plan = grid_triton_plan(grid(4, 3).dags()[0], N)
    assert plan["orientation"] == "cols" and (plan["R"], plan["S"]) == (3, 4)
    assert grid_triton_plan(line(5, directed=True), N) is None
    assert grid_triton_plan(grid(3, 4), N) is None  # the undirected grid
    not_complete = from_edge_index(torch.tensor([[0, 1], [1, 2]]), 3)
    assert grid_triton_plan(not_complete, N) is None
    # no row tile fits: None (mix_triton then falls back to the level-set kernel)
    assert grid_triton_plan(grid(3, 4).dags()[0], N, max_tile=8) is None
    # the preferred orientation does not fit, the other does
    plan = grid_triton_plan(grid(3, 8).dags()[0], 2, max_tile=8)
    assert plan is not None and plan["orientation"] == "cols"


def test_plan_tables_follow_the_edges():
    """``node_of``, ``idx_s``, ``idx_o`` describe each corner's edges exactly: the edge along the
    scan into frame position (r, s) comes from (r, s-1), the other from (r-1, s)."""
    for H, W in ((3, 4), (4, 3)):
        for k, topo in enumerate(grid(H, W).dags()):
            for orient in ("rows", "cols"):
                plan = grid_triton_plan(topo, 2, orientation=orient)
                node, E = plan["node_of"].long(), topo.num_edges
                seen = []
                for key, (dr, ds) in (("idx_s", (0, 1)), ("idx_o", (1, 0))):
                    idx = plan[key]
                    R, S = idx.shape
                    for r in range(R):
                        for s in range(S):
                            e = int(idx[r, s])
                            if r < dr or s < ds:
                                assert e == E, (k, orient, key, r, s)
                                continue
                            assert int(topo.src[e]) == int(node[r - dr, s - ds])
                            assert int(topo.dst[e]) == int(node[r, s])
                            seen.append(e)
                assert sorted(seen) == list(range(E)), (H, W, k, orient)


def test_not_a_grid_corner_raises():
    topo = line(4, directed=True)
    V, B = torch.randn(1, 4, 1, 2), torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="complete grid corner DAG"):
        mix_grid_triton(V, B, B, torch.rand(1, 1, 3), topo)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA device")
def test_compiled_matches_reference_on_cuda():
    from chimera.ops import mix

    torch.manual_seed(0)
    for H, W, b, h, N, P in ((14, 14, 2, 4, 16, 64), (7, 20, 1, 2, 64, 96)):
        for k, topo in enumerate(grid(H, W).dags()):
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
                assert float((a - r).abs().max()) <= 1e-4 * scale, (q, H, W, k)
            # bf16 inputs straight into the kernel (fp32 states): finite, close to fp32
            Yb = mix_grid_triton(*(t.detach().bfloat16() for t in (V, B, C, w)), topo)
            assert Yb.dtype == torch.bfloat16 and bool(torch.isfinite(Yb).all())
            scale = float(outs["reference"][0].abs().max()) + 1.0
            assert float((Yb.float() - outs["reference"][0]).abs().max()) <= 5e-2 * scale
