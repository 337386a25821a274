"""Every resolvent algorithm against the float64 oracle, Prop. 3.3 and Prop. 4.6."""

import pytest
import torch

from chimera.norm import row_normalize
from chimera.ops import mix, resolvent
from chimera.topology import from_edge_index, grid, line
from tests.conftest import random_dag, random_graph, random_inputs

DAG_METHODS = ["exact", "neumann", "dag_dense", "dag_scan"]


def _dag_cases():
    g = torch.Generator().manual_seed(7)
    return {
        "line_fwd": line(13, directed=True),
        "line_rev": line(13, directed=True, reverse=True),
        "grid_tl": grid(4, 5).dags()[0],
        "grid_tr": grid(4, 5).dags()[1],
        "grid_bl": grid(3, 4).dags()[2],
        "grid_br": grid(5, 3).dags()[3],
        "grid_row": grid(1, 6).dags()[1],
        "grid_col": grid(6, 1).dags()[2],
        "random_dag": random_dag(15, 0.25, g),
        "random_dag_sparse": random_dag(20, 0.08, g),  # several roots / components
    }


DAGS = _dag_cases()


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    # not randn_like: it copies the output's strides, so the same draws would land on different
    # logical positions for outputs with different memory layouts
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    (out * cot).sum().backward()
    return out.detach(), [t.grad for t in inputs]


# ssd is only defined on directed lines
CASES = [(name, method) for name in DAGS for method in DAG_METHODS + ["ssd"]
         if method != "ssd" or DAGS[name].line_direction() != 0]


@pytest.mark.parametrize("name, method", CASES)
def test_dag_methods_match_reference(name, method):
    topo = DAGS[name]
    ins = random_inputs(topo)
    kw = dict(num_terms=topo.num_nodes, chunk_size=4)
    y_ref, g_ref = _grads(lambda *a: mix(*a, topo, method="reference"), ins)
    y, g = _grads(lambda *a: mix(*a, topo, method=method, **kw), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", ["exact", "neumann"])
def test_general_graph_methods_match_reference(method):
    g = torch.Generator().manual_seed(11)
    topo = random_graph(12, 0.3, g)
    assert not topo.is_dag
    # row sums < 1 (as after row normalisation), so the Neumann series converges; 200 terms
    ins = list(random_inputs(topo, w_scale=1.0))
    deg = topo.in_degree.clamp(min=1).double()
    ins[3] = ins[3] / (deg[topo.dst] * 1.5)
    kw = dict(num_terms=200)
    y_ref, g_ref = _grads(lambda *a: mix(*a, topo, method="reference"), ins)
    y, gr = _grads(lambda *a: mix(*a, topo, method=method, **kw), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-9, rtol=1e-9)
    for a, b in zip(gr, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_dag_only_methods_reject_cycles():
    topo = line(5)
    ins = random_inputs(topo)
    for method in ("dag_dense", "dag_scan"):
        with pytest.raises(ValueError, match="directed cycle"):
            mix(*ins, topo, method=method)
    with pytest.raises(ValueError, match="directed line"):
        mix(*ins, topo, method="ssd")


@pytest.mark.parametrize(
    "method", ["reference", "exact", "neumann", "dag_dense", "dag_scan", "ssd"])
def test_gradcheck(method):
    topo = line(5, directed=True) if method == "ssd" else grid(2, 3).dags()[1]
    V, B, C, w = random_inputs(topo, b=1, h=2, p=2, n=2)
    args = [t.requires_grad_(True) for t in (V, B, C, w)]
    assert torch.autograd.gradcheck(
        lambda *a: mix(*a, topo, method=method, num_terms=6, chunk_size=2), args)


def test_batched_graphs_match_per_graph_results():
    g = torch.Generator().manual_seed(5)
    g1, g2 = random_graph(6, 0.5, g), random_graph(9, 0.3, g)
    ei = torch.cat([g1.edge_index, g2.edge_index + 6], 1)
    t = from_edge_index(ei, 15, batch=torch.tensor([0] * 6 + [1] * 9))
    V, B, C, w = random_inputs(t, w_scale=0.2)
    y = mix(V, B, C, w, t, method="exact")
    e1 = g1.num_edges
    y1 = mix(V[:, :6], B[:, :6], C[:, :6], w[..., :e1], g1, method="exact")
    y2 = mix(V[:, 6:], B[:, 6:], C[:, 6:], w[..., e1:], g2, method="exact")
    torch.testing.assert_close(y, torch.cat([y1, y2], 1))


def naive_mamba2(V, B, C, a):
    """h_t = a_t h_{t-1} + B_t x_tᵀ, y_t = C_tᵀ h_t, one step at a time (Mamba-2's recurrence)."""
    b, T, h, p = V.shape
    n = B.shape[-1]
    state = V.new_zeros(b, h, n, p)
    ys = []
    for t in range(T):
        state = a[:, :, t, None, None] * state + B[:, t, :, :, None] * V[:, t, :, None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", C[:, t], state))
    return torch.stack(ys, 1)


@pytest.mark.parametrize("method", ["reference", "exact", "dag_scan", "ssd", "dag_dense"])
def test_prop_3_3_directed_line_is_mamba2(method):
    """Prop. 3.3: on a directed line, Chimera equals the Mamba-2 recurrence."""
    T = 21
    topo = line(T, directed=True)
    V, B, C, w = random_inputs(topo, b=2, h=3, p=4, n=5)
    a = torch.cat([torch.zeros_like(w[..., :1]), w], dim=-1)  # a_0 is never used (h_{-1} = 0)
    y = mix(V, B, C, w, topo, method=method, chunk_size=8)
    torch.testing.assert_close(y, naive_mamba2(V, B, C, a), atol=1e-10, rtol=1e-10)


def test_prop_4_6_finite_sum_keeps_support():
    """Prop. 4.6: with K >= diameter, L_ij > 0 implies L̂_ij > 0; with K < diameter it fails."""
    g = torch.Generator().manual_seed(2)
    for topo in (random_graph(14, 0.18, g), grid(3, 4), line(7), random_graph(10, 0.2, g, False)):
        w = torch.rand(1, 1, topo.num_edges, generator=g, dtype=torch.float64) * 0.4 + 0.05
        # row-normalised as in Sec. 3.3, so that L = sum_k A^k converges and is a path sum
        w = row_normalize(w, torch.zeros(1, topo.num_nodes, 1, dtype=w.dtype), topo)
        L, _ = resolvent(w, topo, "reference")
        K = topo.max_diameter()
        L_hat, _ = resolvent(w, topo, "neumann", num_terms=K)
        support = L > 1e-300
        assert bool((L_hat[support] > 0).all())
        if K > 1:  # one term fewer misses the farthest pairs: the bound is tight
            L_short, _ = resolvent(w, topo, "neumann", num_terms=K - 1)
            assert bool((L_short[support] == 0).any())


def test_exact_on_cpu_is_safe_with_two_threads_and_big_batches():
    """Batched LU is unreliable multi-threaded in this torch build (DESIGN.md §4)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        topo = random_graph(200, 0.02, g)
        V, B, C, w = random_inputs(topo, b=32, h=1, p=2, n=2, dtype=torch.float32)
        deg = topo.in_degree.clamp(min=1).float()
        w = w / (deg[topo.dst] * 1.2)
        y = mix(V, B, C, w, topo, method="exact")
        assert torch.get_num_threads() == 2  # restored
        y_ref = mix(V, B, C, w, topo, method="reference")
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(prev)


def test_bad_shapes_and_values_are_named():
    topo = line(4, directed=True)
    V, B, C, w = random_inputs(topo)
    with pytest.raises(ValueError, match="edge_weight must be"):
        mix(V, B, C, w[..., :2], topo)
    with pytest.raises(ValueError, match="nodes"):
        mix(V[:, :3], B[:, :3], C[:, :3], w, topo)
    with pytest.raises(ValueError, match="NaN"):
        mix(V, B, C, w * float("nan"), topo)
    with pytest.raises(ValueError, match="unknown method"):
        mix(V, B, C, w, topo, method="magic")
    with pytest.raises(ValueError, match="non-negative"):
        mix(V, B, C, -w, topo, method="ssd")


def test_half_precision_inputs_are_computed_in_float32():
    topo = grid(3, 3).dags()[0]
    V, B, C, w = random_inputs(topo, dtype=torch.float32)
    y32 = mix(V, B, C, w, topo, method="dag_scan")
    y16 = mix(V.bfloat16(), B.bfloat16(), C.bfloat16(), w.bfloat16(), topo, method="dag_scan")
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


def test_grid_corner_dags_take_the_row_sweep_and_others_fall_back():
    from chimera.ops.grid import grid_frame

    g = grid(4, 5)
    assert all(grid_frame(d) is not None for d in g.dags())
    # a corner DAG with one edge removed is no longer complete: the generic path must serve it
    d = g.dags()[0]
    partial = d.subgraph_edges(torch.arange(1, d.num_edges), "grid/top_left")
    assert grid_frame(partial) is None
    ins = random_inputs(partial)
    torch.testing.assert_close(mix(*ins, partial, method="exact"),
                               mix(*ins, partial, method="reference"))


@pytest.mark.parametrize("which", ["grid_corner", "bfs_dag"])
def test_dag_scan_saves_no_states_for_backward(which):
    """dag_scan recomputes its N x P states in backward (the grid's row sweep and the generic
    level-set scan alike): no tensor autograd keeps between forward and backward is of the
    size of the states, T x (b h) x N x P. The grid's sweep keeps the states entering every
    segment of ~sqrt(rows / 2) rows (here 5 of 16 rows), the generic scan none."""
    if which == "grid_corner":
        topo = grid(16, 6).dags()[3]
    else:
        topo = random_dag(30, 0.15, torch.Generator().manual_seed(0))
    V, B, C, w = random_inputs(topo, b=2, h=2, p=8, n=8, dtype=torch.float32)
    leaves = [t.requires_grad_(True) for t in (V, B, C, w)]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mix(*leaves, topo, method="dag_scan")
    states = topo.num_nodes * 2 * 2 * 8 * 8  # T x (b h) x N x P
    assert max(saved) <= states * (5 / 16 if which == "grid_corner" else 1 / 8)
    y.sum().backward()
    assert all(t.grad is not None for t in leaves)
