"""The graph layer's fast paths against the float64 oracle: the edge-only resolvent backward
(``dense.resolvent_exact_edges``), the ``bmm`` SMA layout, the vectorised sweep plans and the
one-SMA sum over a DAG pair (``mix_sum``)."""

import warnings

import pytest
import torch
from torch import Tensor

from chimera.ops import dense, mix, mix_sum, scan
from chimera.topology import Topology, from_edge_index
from tests.conftest import random_dag, random_graph, random_inputs


def _batch(*graphs: Topology, extra_edges: Tensor | None = None) -> Topology:
    """Disjoint union of ``graphs`` (different sizes) as one batched topology; ``extra_edges``
    (global ids) are appended, e.g. parallel copies of existing edges."""
    ei, batch, off = [], [], 0
    for k, g in enumerate(graphs):
        ei.append(g.edge_index + off)
        batch += [k] * g.num_nodes
        off += g.num_nodes
    if extra_edges is not None:
        ei.append(extra_edges)
    return from_edge_index(torch.cat(ei, 1), off, batch=torch.tensor(batch))


def _cycle_batch(seed: int = 3, parallel: bool = True) -> Topology:
    g = torch.Generator().manual_seed(seed)
    graphs = [random_graph(n, p, g) for n, p in ((7, 0.4), (12, 0.25), (4, 0.6))]
    extra = None
    if parallel:  # two parallel copies of edges of the first and second graph
        e0, e1 = graphs[0].edge_index[:, :1], graphs[1].edge_index[:, 2:3] + 7
        extra = torch.cat([e0, e1, e1], 1)
    return _batch(*graphs, extra_edges=extra)


def _small_weights(topo: Topology, w: torch.Tensor) -> torch.Tensor:
    """Scale so that every row of ``A`` sums below 1 (as after row normalisation)."""
    deg = topo.in_degree.clamp(min=1).to(w.dtype)
    return w / (deg[topo.dst] * 1.5)


def _grads(fn, inputs, seed=3):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    cot = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    (out * cot).sum().backward()
    return out.detach(), [t.grad for t in inputs]


def test_edge_resolvent_matches_dense_solve_with_parallel_edges():
    topo = _cycle_batch()
    assert not topo.is_dag and topo.num_graphs == 3
    layout = dense.block_layout(topo)
    w = _small_weights(topo, random_inputs(topo, b=2, h=3)[3])
    L_ref, (g_ref,) = _grads(
        lambda w: dense.resolvent_reference(dense.dense_adjacency(w, topo, layout)), [w])
    L, (g,) = _grads(lambda w: dense.resolvent_exact_edges(w, topo, layout), [w])
    torch.testing.assert_close(L, L_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    # parallel edges share one entry of A, hence one gradient
    ei = topo.edge_index.T.tolist()
    dup = [e for e in range(len(ei)) if ei.index(ei[e]) != e]
    assert dup
    for e in dup:
        torch.testing.assert_close(g[..., e], g[..., ei.index(ei[e])])


def test_exact_mix_on_a_batch_of_graphs_matches_reference():
    topo = _cycle_batch(seed=8)
    V, B, C, w = random_inputs(topo, b=2, h=2)
    ins = [V, B, C, _small_weights(topo, w)]
    y_ref, g_ref = _grads(lambda *a: mix(*a, topo, method="reference"), ins)
    y, g = _grads(lambda *a: mix(*a, topo, method="exact"), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_edge_resolvent_gradcheck():
    topo = _cycle_batch(seed=4)
    layout = dense.block_layout(topo)
    w = _small_weights(topo, random_inputs(topo, b=1, h=2)[3]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: dense.resolvent_exact_edges(w, topo, layout), [w])
    g = torch.Generator().manual_seed(2)
    small = random_graph(5, 0.5, g)
    V, B, C, w = random_inputs(small, b=1, h=2, p=2, n=2)
    args = [t.requires_grad_(True) for t in (V, B, C, _small_weights(small, w).detach())]
    assert torch.autograd.gradcheck(lambda *a: mix(*a, small, method="exact"), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edge_resolvent_single_graph_dtype(dtype):
    g = torch.Generator().manual_seed(6)
    topo = random_graph(10, 0.3, g)
    layout = dense.block_layout(topo)
    w = _small_weights(topo, random_inputs(topo, b=1, h=2, dtype=dtype)[3])
    L = dense.resolvent_exact_edges(w, topo, layout)
    assert L.dtype == dtype and L.shape == (1, 1, 2, 10, 10)
    ref = dense.resolvent_reference(dense.dense_adjacency(w, topo, layout))
    torch.testing.assert_close(L.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_sma_apply_matches_dense_per_graph_oracle(batched):
    """``sma_apply`` against an explicit per-graph ``(L ∘ C Bᵀ) V`` on unpadded blocks."""
    topo = _cycle_batch(seed=9) if batched else random_graph(9, 0.3, torch.Generator())
    layout = dense.block_layout(topo)
    V, B, C, w = random_inputs(topo, b=2, h=3, p=5, n=4)
    L = dense.resolvent_reference(dense.dense_adjacency(_small_weights(topo, w), topo, layout))

    def oracle(L, V, B, C):
        ys = []
        for g in range(topo.num_graphs):
            a, z = int(topo.ptr[g]), int(topo.ptr[g + 1])
            Lg = L[:, g, :, : z - a, : z - a]  # (b, H, n, n)
            S = torch.einsum("bihn,bjhn->bhij", C[:, a:z], B[:, a:z])
            ys.append(torch.einsum("bhij,bjhp->bihp", Lg * S, V[:, a:z]))
        return torch.cat(ys, 1)

    ins = [L, V, B, C]
    y_ref, g_ref = _grads(oracle, ins)
    y, g = _grads(lambda *a: dense.sma_apply(*a, layout), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    small = [L[:1, :, :1], V[:1, :, :1, :2], B[:1, :, :1, :2], C[:1, :, :1, :2]]
    assert torch.autograd.gradcheck(
        lambda *a: dense.sma_apply(*a, layout),
        [t.detach().clone().requires_grad_(True) for t in small])


def test_sma_apply_with_head_shared_b_c_matches_per_head_copies():
    """B/C expanded over heads (one group, the mixer's case) take the shared-scores path: same
    values and gradients as contiguous per-head copies, gradients summed over the heads."""
    topo = _cycle_batch(seed=10)
    layout = dense.block_layout(topo)
    V, B, C, w = random_inputs(topo, b=2, h=3, p=5, n=4)
    L = dense.resolvent_reference(dense.dense_adjacency(_small_weights(topo, w), topo, layout))
    B1, C1 = B[:, :, :1].clone(), C[:, :, :1].clone()

    def shared(L, V, B1, C1):
        Bh, Ch = (t.expand(-1, -1, 3, -1) for t in (B1, C1))
        assert dense._shared_across_heads(Bh)
        return dense.sma_apply(L, V, Bh, Ch, layout)

    def copies(L, V, B1, C1):
        Bh, Ch = (t.expand(-1, -1, 3, -1).contiguous() for t in (B1, C1))
        assert not dense._shared_across_heads(Bh)
        return dense.sma_apply(L, V, Bh, Ch, layout)

    y_ref, g_ref = _grads(copies, [L, V, B1, C1])
    y, g = _grads(shared, [L, V, B1, C1])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_flush_tiny_and_the_solve_under_flush_to_zero():
    """``flush_tiny`` zeroes exactly the entries below sqrt(tiny) and passes gradients where it
    keeps; the LU solve runs with subnormals flushed and leaves the thread's mode as it was."""
    from chimera.ops import linalg

    t = torch.finfo(torch.float32).tiny ** 0.5
    x = torch.tensor([0.5 * t, -0.5 * t, 2 * t, -2 * t, 0.0, 1.0, 1e-40],
                     requires_grad=True)
    y = linalg.flush_tiny(x)
    assert y.tolist() == [0.0, 0.0, 2 * t, -2 * t, 0.0, 1.0, 0.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    topo = _cycle_batch(seed=11)
    layout = dense.block_layout(topo)
    w = _small_weights(topo, random_inputs(topo, b=1, h=2)[3]).float()
    A = dense.dense_adjacency(w, topo, layout)
    before = linalg._flush_denormal_is_on()
    L = linalg.general_inverse_of_i_minus(A)
    assert linalg._flush_denormal_is_on() == before
    torch.testing.assert_close(L.double(), dense.resolvent_reference(A), atol=1e-5, rtol=1e-5)
    if torch.set_flush_denormal(True):  # a user's own setting is kept
        try:
            linalg.general_inverse_of_i_minus(A)
            assert linalg._flush_denormal_is_on()
        finally:
            torch.set_flush_denormal(False)


def _loop_plan(topo: Topology) -> tuple[list, list]:
    """The per-level construction ``scan.sweep_plan`` replaced (one sort per level): the
    reference for the vectorised plans."""
    T, E = topo.num_nodes, topo.num_edges

    def padded(nodes: Tensor, ends: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
        pos = torch.full((T,), -1, dtype=torch.long)
        pos[nodes] = torch.arange(len(nodes))
        eids = torch.nonzero(pos[ends] >= 0).flatten()
        row = pos[ends[eids]]
        order = torch.argsort(row, stable=True)
        eids, row = eids[order], row[order]
        counts = torch.bincount(row, minlength=len(nodes))
        k = int(counts.max()) if len(eids) else 0
        col = torch.arange(len(eids)) - (counts.cumsum(0) - counts)[row]
        nbr = torch.full((len(nodes), k), T, dtype=torch.long)
        edge = torch.full((len(nodes), k), E, dtype=torch.long)
        nbr[row, col], edge[row, col] = other[eids], eids
        return nbr, edge

    levels = topo.level_sets()
    fwd = [(n, *padded(n, topo.dst, topo.src)) for n in levels[1:]]
    bwd = [(n, *padded(n, topo.src, topo.dst)) for n in levels[:-1]]
    return fwd, bwd[::-1]


def _dag_batch(seed: int = 1) -> Topology:
    g = torch.Generator().manual_seed(seed)
    graphs = [random_dag(n, p, g) for n, p in ((9, 0.3), (14, 0.15), (1, 0.0), (6, 0.5))]
    e = graphs[0].edge_index[:, :2]
    return _batch(*graphs, extra_edges=torch.cat([e, e[:, :1]], 1))  # parallel edges


@pytest.mark.parametrize("case", ["batch", "hub", "edgeless", "bfs_pair"])
def test_vectorised_sweep_plan_is_the_per_level_plan(case):
    if case == "batch":
        dags = [_dag_batch()]
    elif case == "hub":  # one node with many children widens only its own level
        n = 30
        ei = torch.stack([torch.zeros(n - 2, dtype=torch.long), torch.arange(1, n - 1)])
        dags = [from_edge_index(torch.cat([ei, torch.tensor([[1], [n - 1]])], 1), n)]
    elif case == "edgeless":
        dags = [from_edge_index(torch.zeros(2, 0, dtype=torch.long), 5)]
    else:
        dags = list(_cycle_batch(seed=5).dags())
    for dag in dags:
        assert dag.is_dag
        new, old = scan.sweep_plan(dag), _loop_plan(dag)
        for side in (0, 1):
            assert len(new[side]) == len(old[side])
            for a, b in zip(new[side], old[side], strict=True):
                for x, y in zip(a, b, strict=True):
                    assert torch.equal(x, y), (case, side, x.shape, y.shape)


@pytest.mark.parametrize("method", ["exact", "dag_scan"])
def test_dag_batch_with_parallel_edges_matches_reference(method):
    topo = _dag_batch(seed=3)
    ins = random_inputs(topo, b=2, h=2)
    y_ref, g_ref = _grads(lambda *a: mix(*a, topo, method="reference"), ins)
    y, g = _grads(lambda *a: mix(*a, topo, method=method), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _pair_inputs(topo: Topology, num_groups: int, seed: int = 0, b=2, h=3, p=4, n=5):
    g = torch.Generator().manual_seed(seed)
    dags = list(topo.dags())
    T = topo.num_nodes
    V = torch.randn(b, T, h, p, generator=g, dtype=torch.float64)
    B = torch.randn(b, T, num_groups, n, generator=g, dtype=torch.float64)
    C = torch.randn(b, T, num_groups, n, generator=g, dtype=torch.float64)
    ws = [torch.rand(b, h, d.num_edges, generator=g, dtype=torch.float64) * 0.8 + 0.1
          for d in dags]
    ss = [torch.rand(b, T, h, generator=g, dtype=torch.float64) + 0.5 for _ in dags]
    return dags, [V, B, C, *ws, *ss]


def _pair_oracle(dags, groups, with_scales, method):
    K = len(dags)

    def fn(V, B, C, *rest):
        ws, ss = rest[:K], rest[K:] if with_scales else [None] * K
        b, T, h, _ = V.shape
        Y = 0
        for dag, w, g, s in zip(dags, ws, groups, ss, strict=True):
            Bg = B[:, :, g, None].expand(b, T, h, -1)
            Cg = C[:, :, g, None].expand(b, T, h, -1)
            Y = Y + mix(V if s is None else V * s.unsqueeze(-1), Bg, Cg, w, dag, method=method)
        return Y

    return fn


@pytest.mark.parametrize("groups", [(0, 0), (0, 1)])
@pytest.mark.parametrize("with_scales", [True, False])
def test_mix_sum_dag_pair_matches_reference(groups, with_scales, monkeypatch):
    topo = _cycle_batch(seed=5)  # 3 graphs of 7, 12 and 4 nodes, parallel edges
    dags, ins = _pair_inputs(topo, num_groups=2)
    assert len(dags) == 2 and all(d.is_dag for d in dags)
    if not with_scales:
        ins = ins[:5]
    calls = []
    sma = dense.sma_apply
    monkeypatch.setattr(dense, "sma_apply", lambda *a: calls.append(1) or sma(*a))

    def fast(V, B, C, *rest):
        return mix_sum(V, B, C, list(rest[:2]), dags, list(groups),
                       list(rest[2:]) if with_scales else None, method="exact")

    y, g = _grads(fast, ins)
    assert len(calls) == len(set(groups))  # one SMA per B/C group, not per DAG
    y_ref, g_ref = _grads(_pair_oracle(dags, groups, with_scales, "reference"), ins)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_mix_sum_dag_pair_gradcheck_and_half_precision():
    g = torch.Generator().manual_seed(12)
    topo = _batch(random_graph(4, 0.6, g), random_graph(3, 0.7, g))
    dags, ins = _pair_inputs(topo, num_groups=1, seed=1, b=1, h=2, p=2, n=2)
    args = [t.detach().clone().requires_grad_(True) for t in ins]

    def fast(V, B, C, w0, w1, s0, s1):
        return mix_sum(V, B, C, [w0, w1], dags, [0, 0], [s0, s1], method="exact")

    assert torch.autograd.gradcheck(fast, args)
    y32 = fast(*[t.detach().float() for t in ins])
    y16 = fast(*[t.detach().bfloat16() for t in ins])
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.1)


def test_exact_resolvent_leaves_no_subnormals_on_long_chains():
    """Entries decaying like ``w^distance`` along a long chain (here 0.4^299) are flushed below
    ``sqrt(tiny)``: no subnormal operands reach the products (they are many times slower on
    CPU), and nothing changes beyond float32 rounding."""
    n = 300
    i = torch.arange(n - 1)
    topo = from_edge_index(torch.cat([torch.stack([i, i + 1]), torch.stack([i + 1, i])], 1), n)
    layout = dense.block_layout(topo)
    w = torch.full((1, 2, topo.num_edges), 0.4, requires_grad=True)
    L = dense.resolvent_exact_edges(w, topo, layout)
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((L != 0) & (L.abs() < tiny)).any())
    gL = torch.randn(L.shape, generator=torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(L, w, gL)
    w64 = w.detach().double().requires_grad_(True)
    L64 = dense.resolvent_reference(dense.dense_adjacency(w64, topo, layout))
    assert bool(((L64 != 0) & (L64.abs() < 1e-38)).any())  # the float64 entries do get there
    (g64,) = torch.autograd.grad(L64, w64, gL.double())
    torch.testing.assert_close(L.double(), L64, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g.double(), g64, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_graph", [False, True])
def test_neumann_powers_leave_no_subnormals(per_graph):
    """The finite sum's powers of ``A`` along a long chain are flushed like the exact ``L``."""
    from chimera.ops.linalg import neumann_sum, neumann_sum_per_block

    n = 200
    i = torch.arange(n - 1)
    A = torch.zeros(1, 1, 2, n, n, dtype=torch.float64)
    A[..., i + 1, i] = 0.4
    A[..., i, i + 1] = 0.4
    A32 = A.float().requires_grad_(True)
    K = 3 * n
    S = neumann_sum_per_block(A32, torch.tensor([K]).view(1, 1, 1)) if per_graph else \
        neumann_sum(A32, K)
    tiny = torch.finfo(torch.float32).tiny
    assert not bool(((S != 0) & (S.abs() < tiny)).any())
    ref = dense.resolvent_reference(A)
    torch.testing.assert_close(S.double(), ref, atol=1e-5, rtol=1e-4)
    S.sum().backward()
    assert bool(torch.isfinite(A32.grad).all())


def test_topological_layout_makes_the_bfs_dag_pair_triangular():
    """The BFS-DAG pair in the down DAG's topological layout: a permutation of each graph's
    block positions, the down DAG strictly lower and the up DAG strictly upper triangular; a
    DAG that is neither (not the pair's reverse) is reported as such."""
    topo = _cycle_batch(seed=5)
    down, up = topo.dags()
    lay = dense.topological_layout(down)
    n, gid = lay.n_max, topo.graph_ids
    pos = lay.slot - gid * n
    for g in range(topo.num_graphs):
        size = int(topo.ptr[g + 1] - topo.ptr[g])
        assert sorted(pos[gid == g].tolist()) == list(range(size))
    assert dense.triangle_of(down, lay) == "lower"
    assert dense.triangle_of(up, lay) == "upper"
    gen = torch.Generator().manual_seed(1)
    shuffled = random_dag(9, 0.4, gen)
    other = dense.topological_layout(random_dag(9, 0.4, gen))
    assert dense.triangle_of(shuffled, dense.topological_layout(shuffled)) == "lower"
    assert dense.triangle_of(shuffled, other) is None


@pytest.mark.parametrize("which", [0, 1])
def test_triangular_resolvent_matches_the_oracle_and_gradcheck(which):
    """``resolvent_dag_triangular`` (lower for the down DAG, upper for the up DAG in the same
    layout) against the float64 LU oracle in values and edge gradients, and gradcheck."""
    topo = _cycle_batch(seed=6)
    dags = topo.dags()
    dag = dags[which]
    lay = dense.topological_layout(dags[0])
    tri = dense.triangle_of(dag, lay)
    assert tri == ("lower", "upper")[which]
    w = torch.rand(2, 3, dag.num_edges, generator=torch.Generator().manual_seed(2),
                   dtype=torch.float64) * 0.8 + 0.1
    L_ref, (g_ref,) = _grads(
        lambda w: dense.resolvent_reference(dense.dense_adjacency(w, dag, lay)), [w])
    L, (g,) = _grads(lambda w: dense.resolvent_dag_triangular(w, dag, lay, tri), [w])
    torch.testing.assert_close(L, L_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    small = w[:1, :2].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: dense.resolvent_dag_triangular(w, dag, lay, tri), [small])


def test_dag_pair_falls_back_to_rows_when_not_triangular(monkeypatch):
    """Two DAGs on the same nodes that are not each other's reverse: the rows of ``L`` (the
    recurrence), same result as the per-DAG oracle."""
    gen = torch.Generator().manual_seed(7)
    d0 = random_dag(8, 0.35, gen)
    d1 = random_dag(8, 0.35, gen)
    lay = dense.topological_layout(d0)
    assert dense.triangle_of(d1, lay) is None
    dags = [d0, d1]
    V = torch.randn(2, 8, 3, 4, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 8, 1, 5, generator=gen, dtype=torch.float64)
    C = torch.randn(2, 8, 1, 5, generator=gen, dtype=torch.float64)
    ws = [torch.rand(2, 3, d.num_edges, generator=gen, dtype=torch.float64) * 0.8 + 0.1
          for d in dags]
    calls = []
    rows = dense.resolvent_dag_rows
    monkeypatch.setattr(dense, "resolvent_dag_rows", lambda *a: calls.append(1) or rows(*a))
    y, g = _grads(lambda V, B, C, w0, w1: mix_sum(V, B, C, [w0, w1], dags, [0, 0],
                                                  method="exact"), [V, B, C, *ws])
    assert len(calls) == 2
    y_ref, g_ref = _grads(_pair_oracle(dags, (0, 0), False, "reference"), [V, B, C, *ws])
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def _chain_with_rings(n: int, seed: int) -> Topology:
    """A molecule-like graph: a chain with a side atom every 5 atoms and a ring closure every
    12 (undirected, node ids shuffled so that the natural order is not the band order)."""
    g = torch.Generator().manual_seed(seed)
    edges = [(i, i + 1) for i in range(n - 1)]
    edges += [(i, i + 4) for i in range(0, n - 4, 12)]
    ei = torch.tensor(edges).T
    perm = torch.randperm(n, generator=g)
    ei = perm[ei]
    return from_edge_index(torch.cat([ei, ei.flip(0)], 1), n)


def test_band_layout_is_block_tridiagonal_and_banded_resolvent_matches_the_oracle():
    """On near-chain graphs the BFS layout puts every edge within one block of the diagonal;
    the block-tridiagonal elimination equals the LU oracle in values and edge gradients, and
    ``mix(..., "exact")`` takes it (end to end against ``reference``)."""
    topo = _batch(_chain_with_rings(60, 0), _chain_with_rings(37, 1), _chain_with_rings(81, 2))
    band = dense.band_layout(topo)
    assert band is not None and band.num_blocks >= 4
    lay, s = band.layout, band.block
    assert lay.n_max == band.num_blocks * s
    pos = lay.slot % lay.n_max
    assert int(((pos[topo.src] // s) - (pos[topo.dst] // s)).abs().max()) <= 1
    for g in range(topo.num_graphs):  # a permutation of each graph's first positions
        size = int(topo.ptr[g + 1] - topo.ptr[g])
        assert sorted(pos[topo.graph_ids == g].tolist()) == list(range(size))
    w = _small_weights(topo, random_inputs(topo, b=2, h=3)[3])
    assert dense.diagonally_dominant(w, topo)
    L_ref, (g_ref,) = _grads(
        lambda w: dense.resolvent_reference(dense.dense_adjacency(w, topo, lay)), [w])
    L, (g,) = _grads(lambda w: dense.resolvent_banded(w, topo, band), [w])
    torch.testing.assert_close(L, L_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)

    V, B, C, _ = random_inputs(topo, b=2, h=3)
    calls = []
    banded = dense.mix_banded
    ins = [V, B, C, w]
    y_ref, gr = _grads(lambda *a: mix(*a, topo, method="reference"), ins)
    try:
        dense.mix_banded = lambda *a: calls.append(1) or banded(*a)
        y, gy = _grads(lambda *a: mix(*a, topo, method="exact"), ins)
    finally:
        dense.mix_banded = banded
    assert calls  # the exact path took the band (resolvent and SMA in one node)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(gy, gr, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("scripted", [True, False])
def test_band_sweeps_scripted_and_python_match_the_oracle(scripted):
    """The band's sweeps (:mod:`chimera.ops.band_sweeps`) compiled by TorchScript (the default,
    and here it must compile: no silent fallback) and as plain Python give the LU oracle's
    resolvent and edge gradients, through the masked product's fused node too."""
    from chimera.ops import band_sweeps

    topo = _batch(_chain_with_rings(45, 4), _chain_with_rings(70, 5))
    band = dense.band_layout(topo)
    assert band is not None and band.num_blocks >= 4
    w = _small_weights(topo, random_inputs(topo, b=1, h=2)[3])
    V, B, C, _ = random_inputs(topo, b=1, h=2)
    L_ref, (g_ref,) = _grads(
        lambda w: dense.resolvent_reference(dense.dense_adjacency(w, topo, band.layout)), [w])
    y_ref, gy_ref = _grads(lambda *a: mix(*a, topo, method="reference"), [V, B, C, w])
    try:
        band_sweeps.set_scripted(scripted)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed compile would warn
            L, (g,) = _grads(lambda w: dense.resolvent_banded(w, topo, band), [w])
            y, gy = _grads(lambda *a: dense.mix_banded(*a, topo, band), [V, B, C, w])
        kinds = {type(band_sweeps._impl(f)).__name__
                 for f in (band_sweeps.factor, band_sweeps.fill_inverse, band_sweeps.adjoint_,
                           band_sweeps.fill_bidiagonal, band_sweeps.adjoint_bidiagonal_)}
        assert kinds == ({"ScriptFunction"} if scripted else {"function"})
    finally:
        band_sweeps.set_scripted(True)
    torch.testing.assert_close(L, L_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(gy, gy_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_band_sweeps_fall_back_to_python_with_a_warning():
    """A function TorchScript cannot compile runs as Python, after a warning that names it."""
    from chimera.ops import band_sweeps

    def not_scriptable(x):
        try:  # TorchScript has no try/except
            return x * 2
        except RuntimeError:
            return x

    with pytest.warns(RuntimeWarning, match="not_scriptable"):
        f = band_sweeps._impl(not_scriptable)
    band_sweeps._compiled.pop("not_scriptable", None)
    assert f is not_scriptable and float(f(torch.tensor(2.0))) == 4.0


def test_banded_resolvent_gradcheck_and_the_fallbacks():
    """gradcheck of the banded elimination; a graph with a wide band (a star) and weights that
    are not diagonally dominant take the LU instead, with the same values."""
    topo = _chain_with_rings(34, 3)
    band = dense.band_layout(topo)
    assert band is not None
    w = _small_weights(topo, random_inputs(topo, b=1, h=1)[3]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: dense.resolvent_banded(w, topo, band), [w])
    hub = torch.zeros(30, dtype=torch.long)
    star = from_edge_index(torch.cat([torch.stack([hub[1:], torch.arange(1, 30)]),
                                      torch.stack([torch.arange(1, 30), hub[1:]])], 1), 30)
    assert dense.band_layout(star) is None
    big = torch.full((1, 1, topo.num_edges), 0.6, dtype=torch.float64)  # rows sum to 1.2
    assert not dense.diagonally_dominant(big, topo)
    V, B, C, _ = random_inputs(topo, b=1, h=1)
    y = mix(V, B, C, big, topo, method="exact")
    torch.testing.assert_close(y, mix(V, B, C, big, topo, method="reference"), atol=1e-9,
                               rtol=1e-9)


def test_finite_sums_equal_the_explicit_sum_for_every_k():
    """``neumann_sum`` (one K) and ``neumann_sum_per_block`` (one K per block) against the sum
    of powers term by term, K = 0..9 (every bit pattern of the squaring schedules)."""
    from chimera.ops.linalg import neumann_sum, neumann_sum_per_block

    A = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(3),
                   dtype=torch.float64) * 0.3
    Ks = torch.arange(10)
    per = neumann_sum_per_block(A.unsqueeze(1).expand(2, 10, 3, 5, 5), Ks.view(1, -1, 1))
    for K in range(10):
        ref, P = torch.zeros_like(A), torch.eye(5, dtype=A.dtype).expand_as(A)
        for _ in range(K + 1):
            ref, P = ref + P, P @ A
        torch.testing.assert_close(neumann_sum(A, K), ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(per[:, K], ref, atol=1e-12, rtol=1e-12)


def test_per_block_finite_sums_gradients_equal_the_term_by_term_sum():
    """``neumann_sum_per_block`` multiplies only the blocks each step needs (gathered and
    scattered back): values and gradients equal autograd through the explicit sum of powers,
    for a K per block covering every bit pattern up to 12, K = 0 included."""
    from chimera.ops.linalg import neumann_sum_per_block

    g = torch.Generator().manual_seed(5)
    A = torch.rand(2, 13, 2, 4, 4, generator=g, dtype=torch.float64) * 0.3
    Ks = torch.arange(13)

    def explicit(A):
        out = []
        for k in range(13):
            Ak = A[:, k]
            acc, P = torch.zeros_like(Ak), torch.eye(4, dtype=A.dtype).expand_as(Ak)
            for _ in range(k + 1):
                acc, P = acc + P, P @ Ak
            out.append(acc)
        return torch.stack(out, 1)

    S, (gS,) = _grads(lambda A: neumann_sum_per_block(A, Ks.view(1, -1, 1)), [A])
    ref, (g_ref,) = _grads(explicit, [A])
    torch.testing.assert_close(S, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gS, g_ref, atol=1e-12, rtol=1e-12)


def test_head_blocks_scatter_and_gather_rows_with_their_adjoints():
    """``to_head_blocks`` / ``from_head_blocks`` on a batch of graphs of different sizes: every
    node lands in its graph's block (padding stays zero), the round trip is the identity, and
    both gradients (row gathers / ``index_copy`` scatters, no accumulating ``index_put``) pass
    gradcheck."""
    topo = _cycle_batch(parallel=False)
    layout = dense.block_layout(topo)
    b, h, f = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, topo.num_nodes, h, f, generator=g, dtype=torch.float64)
    blocks = dense.to_head_blocks(x, layout)  # (b, G, h, n, f)
    n = layout.n_max
    for t in range(topo.num_nodes):
        gr, pos = int(layout.slot[t]) // n, int(layout.slot[t]) % n
        torch.testing.assert_close(blocks[:, gr, :, pos], x[:, t])
    assert float(blocks.abs().sum()) == pytest.approx(float(x.abs().sum()))  # padding is zero
    torch.testing.assert_close(dense.from_head_blocks(blocks, layout), x)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dense.to_head_blocks(t, layout), (x,))
    y = blocks.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: dense.from_head_blocks(t, layout), (y,))


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_conv_sparse_product_matches_the_gathers(batch: int):
    """The local graph convolution by CSR products equals its gather form (values and all
    gradients, gradcheck), with parallel edges, a self-loop and isolated nodes; a dtype without
    sparse products (bfloat16) takes the gathers."""
    from chimera.local_conv import GraphConv

    topo = _cycle_batch(parallel=True)
    loops = torch.tensor([[2], [2]])
    topo = from_edge_index(torch.cat([topo.edge_index, loops], 1), topo.num_nodes + 2,
                           batch=torch.cat([topo.graph_ids, topo.graph_ids.new_tensor([3, 3])]))
    conv = GraphConv(5).double()
    with torch.no_grad():
        for p in conv.parameters():
            p.normal_()
    x = torch.randn(batch, topo.num_nodes, 5, dtype=torch.float64, requires_grad=True)
    params = list(conv.parameters())
    cot = torch.randn(batch, topo.num_nodes, 5, dtype=torch.float64)
    y, y_ref = conv(x, topo), conv.reference(x, topo)
    gy = torch.autograd.grad((y * cot).sum(), [x, *params])
    g_ref = torch.autograd.grad((y_ref * cot).sum(), [x, *params])
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(gy, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y[:, -2:], x[:, -2:] * params[0] + params[2])  # isolated
    assert torch.autograd.gradcheck(lambda x, *ps: conv(x, topo), [x, *params])
    xb = x.detach().bfloat16()
    torch.testing.assert_close(conv.bfloat16()(xb, topo), conv.reference(xb, topo))


@pytest.mark.parametrize("shared", [True, False])
def test_masked_attention_function_matches_autograd(shared: bool):
    """``dense.sma_apply``'s Function (its in-place backward) against autograd through the
    plain ``(L ∘ C Bᵀ) V``, with B/C shared by the heads (the mixer's case) or per head, and
    gradcheck."""
    topo = _cycle_batch(parallel=False)
    layout = dense.block_layout(topo)
    V, B, C, w = random_inputs(topo, b=2, h=3)
    if shared:  # one group, expanded over the heads inside the call (stride 0, as the mixer's)
        B, C = B[:, :, :1], C[:, :, :1]
    L = dense.resolvent_reference(dense.dense_adjacency(_small_weights(topo, w), topo, layout))

    def heads(t: Tensor) -> Tensor:
        return t.expand(*V.shape[:3], t.shape[-1])

    def fast(L, V, B, C):
        if shared:
            assert dense._shared_across_heads(heads(B))
        return dense.sma_apply(L, V, heads(B), heads(C), layout)

    def plain(L, V, B, C):
        return _plain_sma(L, V, heads(B), heads(C), layout)

    _assert_same_and_gradcheck(fast, plain, [L, V, B, C], tol=1e-12)


def _plain_sma(L: Tensor, V: Tensor, B: Tensor, C: Tensor, layout) -> Tensor:
    """``(L ∘ C Bᵀ) V`` by plain autograd ops on the blocks of ``layout``."""
    Vd, Bd, Cd = (dense.to_head_blocks(t, layout) for t in (V, B, C))
    return dense.from_head_blocks((L * (Cd @ Bd.transpose(-1, -2))) @ Vd, layout)


def _assert_same_and_gradcheck(fast, oracle, ins: list[Tensor], tol: float) -> None:
    """``fast`` equals ``oracle`` in values and gradients at ``ins``, and passes gradcheck."""
    y, g = _grads(fast, ins)
    y_ref, g_ref = _grads(oracle, ins)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert torch.autograd.gradcheck(fast, [t.detach().clone().requires_grad_(True) for t in ins])


def test_banded_masked_attention_node_with_shared_scores():
    """``dense.mix_banded`` (band elimination and masked product in one node, the adjoint in
    place on the node's own ``gL``) with B/C shared by the heads, as the mixer calls it: values
    and gradients against the LU oracle's mask and the plain product, and gradcheck."""
    topo = _batch(_chain_with_rings(40, 4), _chain_with_rings(23, 5))
    band = dense.band_layout(topo)
    assert band is not None
    V, B, C, w = random_inputs(topo, b=1, h=3)
    w = _small_weights(topo, w)
    B, C = B[:, :, :1], C[:, :, :1]

    def heads(t: Tensor) -> Tensor:
        return t.expand(*V.shape[:3], t.shape[-1])

    def fused(V, B, C, w):
        return dense.mix_banded(V, heads(B), heads(C), w, topo, band)

    def oracle(V, B, C, w):
        L = dense.resolvent_reference(dense.dense_adjacency(w, topo, band.layout))
        return _plain_sma(L, V, heads(B), heads(C), band.layout)

    _assert_same_and_gradcheck(fused, oracle, [V, B, C, w], tol=1e-10)


@pytest.mark.parametrize("scripted", [True, False])
def test_dag_pair_by_block_bidiagonal_sweeps_in_the_band_layout(scripted):
    """The BFS-DAG pair of a near-chain graph in the down DAG's band layout: each DAG's
    ``I - A`` is block lower / upper bidiagonal there, and ``resolvent_dag_banded`` equals the
    LU oracle in values and edge gradients (gradcheck too); ``mix_sum`` over the pair takes it
    and matches ``reference`` end to end. Its sweeps (:mod:`chimera.ops.band_sweeps`) scripted
    and as Python."""
    from chimera.ops import band_sweeps

    band_sweeps.set_scripted(scripted)
    try:
        _check_dag_pair_banded()
    finally:
        band_sweeps.set_scripted(True)


def _check_dag_pair_banded() -> None:
    topo = _batch(_chain_with_rings(40, 4), _chain_with_rings(23, 5))
    down, up = topo.dags()
    band = dense.band_layout(down)
    assert band is not None and band.num_blocks >= 3
    for dag, tri in ((down, "lower"), (up, "upper")):
        assert dense.triangle_of(dag, band.layout) == tri
        w = _small_weights(dag, random_inputs(dag, b=2, h=3)[3])
        L_ref, (g_ref,) = _grads(
            lambda w, dag=dag: dense.resolvent_reference(dense.dense_adjacency(w, dag,
                                                                               band.layout)),
            [w])
        L, (g,) = _grads(lambda w, dag=dag, tri=tri: dense.resolvent_dag_banded(w, dag, band,
                                                                                 tri), [w])
        torch.testing.assert_close(L, L_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)
        w1 = w[:1, :1].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda w, dag=dag, tri=tri: dense.resolvent_dag_banded(w, dag, band, tri), [w1])
    V, B, C, _ = random_inputs(topo, b=1, h=2)
    ws = [_small_weights(d, random_inputs(d, b=1, h=2)[3]) for d in (down, up)]
    Bg, Cg = B[:, :, :1], C[:, :, :1]
    calls = []
    banded = dense.resolvent_dag_banded
    try:
        dense.resolvent_dag_banded = lambda *a: calls.append(1) or banded(*a)
        y = mix_sum(V, Bg, Cg, ws, [down, up], method="exact")
    finally:
        dense.resolvent_dag_banded = banded
    assert len(calls) == 2
    y_ref = sum(mix(V, Bg.expand_as(B), Cg.expand_as(C), w, d, method="reference")
                for w, d in zip(ws, (down, up), strict=True))
    torch.testing.assert_close(y, y_ref.to(y.dtype), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("threads", [1, 2])
def test_bucket_band_path_equals_one_call(threads):
    """``ChimeraGraphConv`` (exact) on near-chain graphs in size buckets: each bucket takes the
    fused band node straight from ``forward_buckets`` (B and C as one head), and values and
    gradients equal one call on the whole batch (float64), on one thread and on two (the
    buckets on threads)."""
    from chimera.models.graph import ChimeraGraphConv

    graphs = [_chain_with_rings(n, seed) for seed, n in enumerate((45, 38, 70, 52, 66))]
    topo = _batch(*graphs)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(topo.num_nodes, 16, generator=g, dtype=torch.float64)
    ea = torch.randn(topo.num_edges, 4, generator=g, dtype=torch.float64)
    cot = torch.randn(topo.num_nodes, 16, generator=g, dtype=torch.float64)
    outs, calls = [], []
    banded = dense.mix_banded
    before = torch.get_num_threads()
    try:
        dense.mix_banded = lambda *a: calls.append(a[1].shape[2]) or banded(*a)  # B's heads
        torch.set_num_threads(threads)
        for per_bucket in (None, 2):
            torch.manual_seed(0)
            conv = ChimeraGraphConv(16, heads=2, d_state=8, edge_dim=4, method="exact",
                                    graphs_per_bucket=per_bucket).double()
            xi = x.clone().requires_grad_(True)
            y = conv(xi, topo.edge_index, ea, topo.batch)
            (y * cot).sum().backward()
            outs.append((y.detach(), xi.grad, *(p.grad for p in conv.parameters())))
    finally:
        dense.mix_banded = banded
        torch.set_num_threads(before)
    # one call on the whole batch (through mix, B expanded to the heads), then one per bucket
    # of <= 2 graphs straight from forward_buckets (B as one head)
    assert calls == [2, 1, 1, 1]
    for a, c in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(c, a, atol=1e-10, rtol=1e-8)
