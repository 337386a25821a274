"""The merged grid-corner path (ops/grid.py, mix_sum) against the float64 oracle."""

import pytest
import torch

from chimera.ops import mix, mix_sum
from chimera.ops.grid import corner_sma_mask, grid_corners_applicable, row_resolvents
from chimera.topology import grid, line

SHARINGS = {"diagonal": [0, 1, 1, 0], "none": [0, 1, 2, 3], "complete": [0, 0, 0, 0],
            "rowwise": [0, 0, 1, 1]}


def _inputs(topo, b=2, h=3, p=4, n=3, G=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    T = topo.num_nodes
    dags = topo.dags()
    V = torch.randn(b, T, h, p, generator=g, dtype=dtype)
    B = torch.randn(b, T, G, n, generator=g, dtype=dtype)
    C = torch.randn(b, T, G, n, generator=g, dtype=dtype)
    ws = [torch.rand(b, h, d.num_edges, generator=g, dtype=dtype) * 0.9 + 0.05 for d in dags]
    ss = [torch.rand(b, T, h, generator=g, dtype=dtype) + 0.5 for _ in dags]
    return dags, V, B, C, ws, ss


def _oracle(V, B, C, ws, ss, dags, groups):
    b, T, h, _ = V.shape
    Y = 0
    for dag, w, s, gr in zip(dags, ws, ss, groups, strict=True):
        Bg = B[:, :, gr, None].expand(b, T, h, -1)
        Cg = C[:, :, gr, None].expand(b, T, h, -1)
        Y = Y + mix(V * s.unsqueeze(-1), Bg, Cg, w, dag, method="reference")
    return Y


def _value_and_grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    (out * cot).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", [(4, 5), (3, 3), (1, 6), (5, 1), (2, 7)])
@pytest.mark.parametrize("sharing", list(SHARINGS))
def test_merged_corners_match_reference(shape, sharing):
    topo = grid(*shape)
    groups = SHARINGS[sharing]
    dags, V, B, C, ws, ss = _inputs(topo, G=max(groups) + 1)
    assert grid_corners_applicable(dags)
    K = len(dags)

    def fast(V, B, C, *rest):
        return mix_sum(V, B, C, list(rest[:K]), dags, groups, list(rest[K:]))

    def ref(V, B, C, *rest):
        return _oracle(V, B, C, list(rest[:K]), list(rest[K:]), dags, groups)

    leaves = [V, B, C, *ws, *ss]
    y, g = _value_and_grads(fast, leaves)
    y_ref, g_ref = _value_and_grads(ref, leaves)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("picks", [[1, 2], [3], [0]])
def test_subset_of_corners_and_no_scales(picks):
    topo = grid(3, 4)
    dags, V, B, C, ws, _ = _inputs(topo, G=1)
    # [1, 2]: one top (down sweep) and one bottom (up sweep) corner; single corners too
    groups = [0] * len(picks)
    y = mix_sum(V, B, C, [ws[k] for k in picks], [dags[k] for k in picks], groups)
    ones = [torch.ones_like(V[..., 0])] * len(picks)
    y_ref = _oracle(V, B, C, [ws[k] for k in picks], ones, [dags[k] for k in picks], groups)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)


def test_corner_sma_mask_gradcheck():
    g = torch.Generator().manual_seed(1)
    K, b, h, H, W = 4, 2, 2, 3, 2
    T, M = H * W, b * h
    a_h = torch.rand(K, M, H, W, generator=g, dtype=torch.float64) * 0.8 + 0.1
    a_v = torch.rand(K, M, H, W, generator=g, dtype=torch.float64) * 0.8 + 0.1
    s = torch.rand(K, M, H, W, generator=g, dtype=torch.float64) + 0.5
    R = torch.stack([row_resolvents(a_h[k], k % 2 == 0) for k in range(K)])
    downs = (True, False, True, False)  # directions interleaved: the non-slice path
    for h_S, group in ((1, (0, 1, 1, 0)), (1, (0, 0, 0, 0)), (h, (0, 1, 2, 3)), (1, (1, 0, 0, 1))):
        S = torch.randn(b, max(group) + 1, h_S, T, T, generator=g, dtype=torch.float64)
        args = tuple(t.clone().requires_grad_(True) for t in (R, a_v, s, S))
        # fast mode (a random projection of the Jacobian): the full one takes seconds here
        assert torch.autograd.gradcheck(
            lambda *a, gr=group: corner_sma_mask(*a, downs, gr), args, fast_mode=True)


def test_fallback_for_other_dags_sums_mix():
    topo = line(9)
    dags = topo.dags()
    g = torch.Generator().manual_seed(2)
    V = torch.randn(2, 9, 2, 3, generator=g, dtype=torch.float64)
    B, C = (torch.randn(2, 9, 1, 4, generator=g, dtype=torch.float64) for _ in range(2))
    ws = [torch.rand(2, 2, 8, generator=g, dtype=torch.float64) for _ in dags]
    ss = [torch.rand(2, 9, 2, generator=g, dtype=torch.float64) for _ in dags]
    assert not grid_corners_applicable(dags)
    y = mix_sum(V, B, C, ws, dags, [0, 0], ss, method="ssd", chunk_size=4)
    torch.testing.assert_close(y, _oracle(V, B, C, ws, ss, dags, [0, 0]))


def test_half_precision_and_errors():
    topo = grid(3, 3)
    dags, V, B, C, ws, ss = _inputs(topo, dtype=torch.float32)
    groups = SHARINGS["diagonal"]
    y32 = mix_sum(V, B, C, ws, dags, groups, ss)
    y16 = mix_sum(V.bfloat16(), B.bfloat16(), C.bfloat16(), [w.bfloat16() for w in ws], dags,
                  groups, [s.bfloat16() for s in ss])
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.15, rtol=0.05)
    with pytest.raises(ValueError, match="one edge_weight"):
        mix_sum(V, B, C, ws[:3], dags, groups)
    with pytest.raises(ValueError, match="groups"):
        mix_sum(V, B, C, ws, dags, [0, 1, 2, 3])


# (10, 3): segments of 3 rows, the last one partial (the backward's checkpointed recompute)
@pytest.mark.parametrize("shape", [(4, 5), (1, 6), (5, 1), (3, 3), (10, 3)])
def test_grid_dag_scan_takes_the_row_sweep_and_matches_both_oracles(shape, monkeypatch):
    """``dag_scan`` on a grid corner runs the row-by-row state recurrence (ops/grid.py): equal
    in values and all gradients to the dense float64 oracle and to the generic level-set scan
    it replaces on grids."""
    import sys

    from chimera.ops.scan import mix_dag_scan

    mix_module = sys.modules["chimera.ops.mix"]  # the module (chimera.ops.mix is the function)

    topo = grid(*shape)
    g = torch.Generator().manual_seed(1)
    for dag in topo.dags():
        b, T, h, p, n = 2, topo.num_nodes, 2, 3, 4
        leaves = [torch.randn(b, T, h, p, generator=g, dtype=torch.float64),
                  torch.randn(b, T, h, n, generator=g, dtype=torch.float64),
                  torch.randn(b, T, h, n, generator=g, dtype=torch.float64),
                  torch.rand(b, h, dag.num_edges, generator=g, dtype=torch.float64) * 0.9]
        with monkeypatch.context() as m:  # the grid path must not fall through to level sets
            m.setattr(mix_module, "mix_dag_scan", lambda *a, **k: pytest.fail("level-set scan"))
            y, grads = _value_and_grads(lambda *t, d=dag: mix(*t, d, method="dag_scan"), leaves)
        for other in (lambda *t, d=dag: mix(*t, d, method="reference"),
                      lambda *t, d=dag: mix_dag_scan(*t, d)):
            y_ref, g_ref = _value_and_grads(other, leaves)
            torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
            for a, b_ in zip(grads, g_ref, strict=True):
                torch.testing.assert_close(a, b_, atol=1e-10, rtol=1e-10)


def test_scan_row_resolvents_by_products_match_the_masks_and_hold_no_subnormals():
    """The scan builds its row resolvents by column products (no autograd): equal to the
    segment-sum masks of ``row_resolvents``, exact zeros where a weight is zero, and along long
    rows of small weights no subnormal entry is left (products with them are many times slower
    on CPU)."""
    from chimera.ops.grid import _row_resolvents_by_products

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 5, 9, generator=g, dtype=torch.float64)
    a[1, 2, 4] = 0.0  # a cut edge: nothing passes it
    R = _row_resolvents_by_products(a)
    torch.testing.assert_close(R, row_resolvents(a, rightward=True), atol=1e-14, rtol=1e-12)
    assert bool((R[1, 2, 4:, :4] == 0).all())
    long_row = torch.full((2, 1, 64), 0.2)  # 0.2^63 ~ 1e-44: subnormal in float32 unflushed
    R32 = _row_resolvents_by_products(long_row)
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((R32 != 0) & (R32.abs() < tiny)).any())
    assert float(R32[0, 0, 10, 0]) == pytest.approx(0.2 ** 10, rel=1e-5)
