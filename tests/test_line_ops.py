"""Closed-form line resolvents (chimera.ops.line) against the float64 LU oracle.

The undirected line's tridiagonal inverse (UG text encoder) and the fused forward + reverse pair
(DAG text encoder) must equal ``method="reference"`` in values and gradients, fall back to the LU
solve where the closed form does not apply, and stay accurate in float32.
"""

import pytest
import torch

from chimera.norm import row_normalize, two_cycle_normalize
from chimera.ops import mix
from chimera.ops.dense import resolvent_reference
from chimera.ops.line import (
    DENSE_LINE_MAX,
    directed_line_resolvent,
    line_kind,
    line_resolvent,
    lines_applicable,
    two_sided_sma,
    undirected_line_resolvent,
)
from chimera.ops.mix import mix_sum
from chimera.topology import from_edge_index, grid, line


@pytest.fixture(autouse=True)
def _closed_form_at_every_length(monkeypatch):
    # short undirected lines normally keep the LU solve (UG_SOLVE_MAX): test the closed form
    monkeypatch.setattr("chimera.ops.line.UG_SOLVE_MAX", 1)


def test_short_undirected_lines_keep_the_solve(monkeypatch):
    monkeypatch.setattr("chimera.ops.line.UG_SOLVE_MAX", 64)
    topo = line(40)
    w = _two_cycle_weights(topo)
    assert line_resolvent(w, topo) is None
    assert line_resolvent(_two_cycle_weights(line(65)), line(65)) is not None
    assert not lines_applicable([topo]) and lines_applicable([line(65)])


def _dense_L(w, topo):
    """Oracle: ``(I - A)^-1`` by LU in float64, ``(b, h, T, T)``."""
    b, h, _ = w.shape
    T = topo.num_nodes
    A = torch.zeros(b, h, T, T, dtype=torch.float64)
    A[..., topo.dst, topo.src] = w.double()
    return resolvent_reference(A)


def _two_cycle_weights(topo, b=2, h=3, cut=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = two_cycle_normalize(torch.rand(b, h, topo.num_edges, generator=g, dtype=dtype), topo,
                            0.95)
    if cut is not None:  # a sentence boundary between tokens cut and cut + 1
        w = w.masked_fill(((topo.src - cut) * (topo.dst - cut) == 0)
                          & ((topo.src + topo.dst) == 2 * cut + 1), 0.0)
    return w


def test_line_kind_recognises_lines_in_any_edge_order():
    assert line_kind(line(5)) == 0
    assert line_kind(line(5, directed=True)) == 1
    assert line_kind(line(5, directed=True, reverse=True)) == -1
    ei = line(6).edge_index
    perm = torch.randperm(ei.shape[1], generator=torch.Generator().manual_seed(0))
    assert line_kind(from_edge_index(ei[:, perm], 6)) == 0
    assert line_kind(grid(2, 3)) is None
    assert line_kind(line(1)) is None
    # one direction missing one edge: not a line
    ei = line(5).edge_index
    assert line_kind(from_edge_index(ei[:, 1:], 5)) is None


@pytest.mark.parametrize("T", [2, 3, 7, 40])
@pytest.mark.parametrize("cut", [None, 1])
def test_undirected_line_resolvent_is_the_inverse(T, cut):
    topo = line(T)
    w = _two_cycle_weights(topo, cut=cut if cut is not None and cut < T - 1 else None)
    L = undirected_line_resolvent(w, topo)
    torch.testing.assert_close(L, _dense_L(w, topo), atol=1e-12, rtol=1e-12)


def test_undirected_line_resolvent_with_row_normalised_and_asymmetric_weights():
    topo = line(25)
    g = torch.Generator().manual_seed(1)
    w = torch.rand(2, 3, topo.num_edges, generator=g, dtype=torch.float64)
    w = row_normalize(w, torch.randn(2, 25, 3, generator=g, dtype=torch.float64), topo, 0.95)
    torch.testing.assert_close(undirected_line_resolvent(w, topo), _dense_L(w, topo),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_directed_line_resolvent_is_the_inverse(reverse):
    topo = line(30, directed=True, reverse=reverse)
    w = torch.rand(2, 3, topo.num_edges, dtype=torch.float64)
    torch.testing.assert_close(directed_line_resolvent(w, topo), _dense_L(w, topo),
                               atol=1e-12, rtol=1e-12)


def test_outside_the_closed_form_falls_back_to_the_solve():
    topo = line(6)
    # p q = 4 > 1/4 everywhere: the spectral radius exceeds 1 and the pivots change sign
    w = torch.full((1, 1, topo.num_edges), 2.0, dtype=torch.float64)
    assert undirected_line_resolvent(w, topo) is None
    assert line_resolvent(-w, topo) is None
    V, B, C = (torch.randn(1, 6, 1, 3, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(mix(V, B, C, w, topo, "exact"),
                               mix(V, B, C, w, topo, "reference"))


def _grads(fn, tensors):
    y = fn()
    probe = torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y)
    return y, torch.autograd.grad((y * probe).sum(), tensors)


def _assert_exact_matches_oracle(call, leaves, y_atol=1e-12, y_rtol=1e-10):
    """``call(method)``: the outputs and the gradients wrt ``leaves`` of ``exact`` equal those
    of the float64 ``reference``."""
    got = _grads(lambda: call("exact"), leaves)
    want = _grads(lambda: call("reference"), leaves)
    torch.testing.assert_close(got[0], want[0], atol=y_atol, rtol=y_rtol)
    for a, e in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("T", [1, 2, 5, 33])
@pytest.mark.parametrize("groups", [[0, 1], [0, 0], [1, 0]])
def test_fused_forward_reverse_pair_equals_the_oracle(T, groups):
    topo = line(T)
    dags = topo.dags() if T > 1 else [topo, topo]
    g = torch.Generator().manual_seed(T)
    b, h, P, N = 2, 3, 4, 5
    V = torch.randn(b, T, h, P, generator=g, dtype=torch.float64, requires_grad=True)
    B, C = (torch.randn(b, T, 2, N, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    ws = [torch.rand(b, h, d.num_edges, generator=g, dtype=torch.float64).requires_grad_()
          for d in dags]
    ss = [torch.rand(b, T, h, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
          for _ in dags]
    leaves = [V, B, C, *ws, *ss]
    _assert_exact_matches_oracle(lambda m: mix_sum(V, B, C, ws, dags, groups, ss, m), leaves)


def test_undirected_line_in_mix_sum_equals_the_oracle_with_gradients():
    T, b, h, P, N = 19, 2, 3, 4, 5
    topo = line(T)
    g = torch.Generator().manual_seed(3)
    V = torch.randn(b, T, h, P, generator=g, dtype=torch.float64, requires_grad=True)
    B, C = (torch.randn(b, T, 1, N, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    w = _two_cycle_weights(topo, b=b, h=h, cut=8).requires_grad_()
    s = torch.rand(b, T, h, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
    leaves = [V, B, C, s]  # w has an exact zero (a cut), where log space has no derivative
    _assert_exact_matches_oracle(lambda m: mix_sum(V, B, C, [w], [topo], [0], [s], m), leaves)
    w2 = _two_cycle_weights(topo, b=b, h=h, seed=5).requires_grad_()
    got = _grads(lambda: mix_sum(V, B, C, [w2], [topo], [0], [s], "exact"), [w2])
    want = _grads(lambda: mix_sum(V, B, C, [w2], [topo], [0], [s], "reference"), [w2])
    torch.testing.assert_close(got[1][0], want[1][0], atol=1e-10, rtol=1e-8)


def test_float32_masks_stay_accurate_at_the_longest_dense_line():
    # realistic decays (delta up to 1 per token) over DENSE_LINE_MAX tokens with four sentence
    # cuts (weights exactly 0): the float32 masks stay within 1e-4 relative of the oracle
    T = DENSE_LINE_MAX
    topo = line(T)
    g = torch.Generator().manual_seed(0)
    dags = topo.dags()
    ws = []
    for d in dags:
        w = torch.exp(-torch.rand(1, 2, d.num_edges, generator=g, dtype=torch.float64))
        w[..., 50::50] = 0.0
        ws.append(w.float())
    V = torch.randn(1, T, 2, 8, generator=g)
    B, C = (torch.randn(1, T, 2, 4, generator=g) for _ in range(2))
    want = mix_sum(V.double(), B.double(), C.double(), [w.double() for w in ws], dags, [0, 1],
                   None, "reference")
    got = mix_sum(V, B, C, ws, dags, [0, 1], None, "exact")
    assert (got.double() - want).abs().max() / want.abs().max() < 1e-4
    wu = torch.exp(-torch.rand(1, 2, topo.num_edges, generator=g, dtype=torch.float64))
    wu[..., 50::50] = 0.0
    wu = two_cycle_normalize(wu.float(), topo, 0.95)
    L = undirected_line_resolvent(wu, topo).double()
    want_L = _dense_L(wu.double(), topo)
    assert (L - want_L).abs().max() / want_L.abs().max() < 1e-4


def test_long_undirected_lines_run_as_two_scans(monkeypatch):
    # beyond DENSE_LINE_MAX the UG resolvent is applied as a forward and a reverse chunked SSD
    # on the semiseparable factors; lowered here so that a short line takes that path
    import chimera.ops.line as line_ops

    monkeypatch.setattr(line_ops, "DENSE_LINE_MAX", 16)
    T, b, h, P, N = 70, 2, 3, 4, 5
    topo = line(T)
    g = torch.Generator().manual_seed(4)
    V = torch.randn(b, T, h, P, generator=g, dtype=torch.float64, requires_grad=True)
    B, C = (torch.randn(b, T, 1, N, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    w = _two_cycle_weights(topo, b=b, h=h, cut=30)
    s = torch.rand(b, T, h, generator=g, dtype=torch.float64).add(0.1).requires_grad_()
    leaves = [V, B, C, s]
    _assert_exact_matches_oracle(lambda m: mix_sum(V, B, C, [w], [topo], [0], [s], m), leaves,
                                 y_atol=1e-11, y_rtol=1e-9)


def test_two_sided_sma_node_passes_gradcheck():
    # the fused (L ∘ S) V node: every input's gradient against finite differences, including
    # the in-place tril of its exponent gradient
    g = torch.Generator().manual_seed(3)
    b, h, T, P = 2, 2, 6, 3
    vecs = [torch.randn(b, h, T, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_()
            for _ in range(4)]
    S = torch.randn(b, T, T, generator=g, dtype=torch.float64, requires_grad=True)
    V = torch.randn(b, T, h, P, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(two_sided_sma, (*vecs, S, V))
