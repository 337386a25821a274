"""ChimeraMixer / ChimeraBlock: shapes, algorithm interchangeability, equivariance, padding."""

import pytest
import torch

from chimera import ChimeraBlock, ChimeraMixer, flat_grid, from_edge_index, grid, line
from chimera.mixer import GatedRMSNorm, sharing_groups
from tests.conftest import random_graph

D = 32
SMALL = dict(d_state=8, headdim=16)


def _graph_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    g1, g2 = random_graph(7, 0.4, g), random_graph(11, 0.25, g)
    ei = torch.cat([g1.edge_index, g2.edge_index + 7], 1)
    return g1, g2, from_edge_index(ei, 18, batch=torch.tensor([0] * 7 + [1] * 11))


def _molecule(n=40):
    """A chain with a ring closure every 10 atoms: narrow band in BFS order, so the exact
    resolvent takes the block-tridiagonal elimination (chimera.ops.dense.band_layout)."""
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 5) for i in range(0, n - 5, 10)]
    ei = torch.tensor(edges).T
    return from_edge_index(torch.cat([ei, ei.flip(0)], 1), n)


TOPOLOGIES = {
    "grid": ("grid", grid(4, 5)),
    "flat_fwd_rev": ("line", flat_grid(4, 5)),
    "flat_fwd": ("causal_line", flat_grid(4, 5, reverse=False)),
    "line": ("line", line(9)),
    "graph": ("graph", random_graph(10, 0.3, torch.Generator().manual_seed(0))),
    "graph_batch": ("graph", _graph_batch()[2]),
    "molecule": ("graph", _molecule()),
}


def test_the_molecule_topology_takes_the_band():
    from chimera.ops import dense

    assert dense.band_layout(TOPOLOGIES["molecule"][1]) is not None


@pytest.mark.parametrize("name", list(TOPOLOGIES))
@pytest.mark.parametrize("mlp_ratio", [0.0, 2.0])
def test_block_shapes_every_topology(name, mlp_ratio):
    conv, topo = TOPOLOGIES[name]
    blk = ChimeraBlock(D, conv=conv, mlp_ratio=mlp_ratio, drop_path=0.1, **SMALL)
    x = torch.randn(3, topo.num_nodes, D, requires_grad=True)
    y = blk(x, topo)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("sharing, groups", [("none", 4), ("complete", 1), ("rowwise", 2),
                                             ("diagonal", 2)])
def test_sharing_modes_on_grid(sharing, groups):
    m = ChimeraMixer(D, conv="grid", sharing=sharing, **SMALL)
    assert m.num_groups == groups
    assert m(torch.randn(2, 12, D), grid(3, 4)).shape == (2, 12, D)


def test_sharing_group_tables():
    assert sharing_groups(4, "diagonal") == [0, 1, 1, 0]  # TL+BR, TR+BL
    assert sharing_groups(4, "rowwise") == [0, 0, 1, 1]  # TL+TR, BL+BR
    assert sharing_groups(2, "diagonal") == [0, 0]
    with pytest.raises(ValueError, match="4 grid DAGs"):
        sharing_groups(2, "rowwise")
    with pytest.raises(ValueError, match="unknown B/C sharing"):
        sharing_groups(4, "some")


@pytest.mark.parametrize("name", ["grid", "flat_fwd_rev", "flat_fwd", "graph_batch"])
def test_all_algorithms_give_the_same_mixer_output(name):
    conv, topo = TOPOLOGIES[name]
    torch.manual_seed(0)
    m = ChimeraMixer(D, conv=conv, num_terms=topo.num_nodes, **SMALL).double()
    x = torch.randn(2, topo.num_nodes, D, dtype=torch.float64)
    methods = ["reference", "exact", "neumann", "dag_dense", "dag_scan"]
    if conv == "causal_line":
        methods.append("ssd")
    outs = {}
    for method in methods:
        m.method = method
        outs[method] = m(x, topo)
    for method in methods[1:]:
        torch.testing.assert_close(outs[method], outs["reference"], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("resolvent", ["general", "dag"])
def test_permutation_equivariance_on_general_graphs(resolvent):
    g = torch.Generator().manual_seed(1)
    topo = random_graph(12, 0.3, g)
    ea = torch.randn(topo.num_edges, 3, generator=g)
    torch.manual_seed(0)
    m = ChimeraMixer(D, conv="graph", resolvent=resolvent, edge_dim=3, **SMALL).double()
    x = torch.randn(2, 12, D, dtype=torch.float64)
    perm = torch.randperm(12, generator=g)
    inv = torch.argsort(perm)  # new id of old node k is inv[k]
    topo_p = from_edge_index(inv[topo.edge_index], 12, edge_attr=ea)
    roots = None
    if resolvent == "dag":  # BFS DAGs depend on the root: root the permuted graph at the same node
        from chimera.topology.decompose import bfs_dags
        topo._cache["dags"] = bfs_dags(topo, roots=torch.tensor([0]))
        topo_p._cache["dags"] = bfs_dags(topo_p, roots=inv[:1])
        roots = True
    topo.edge_attr = ea
    y = m(x, topo)
    y_p = m(x[:, perm], topo_p)
    torch.testing.assert_close(y_p, y[:, perm], atol=1e-10, rtol=1e-10)
    assert roots is None or resolvent == "dag"


@pytest.mark.parametrize("resolvent", ["general", "dag"])
def test_padding_in_batched_graphs_never_leaks(resolvent):
    g1, g2, both = _graph_batch(seed=3)
    torch.manual_seed(0)
    m = ChimeraMixer(D, conv="graph", resolvent=resolvent, **SMALL).double()
    x = torch.randn(1, 18, D, dtype=torch.float64)
    y = m(x, both)
    torch.testing.assert_close(y[:, :7], m(x[:, :7], g1))
    torch.testing.assert_close(y[:, 7:], m(x[:, 7:], from_edge_index(g2.edge_index, 11)))
    # changing the second graph's nodes changes nothing in the first
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 11, D, dtype=torch.float64) * 100
    torch.testing.assert_close(m(x2, both)[:, :7], y[:, :7])


def test_dag_sum_sqrt_scales_the_dag_sum():
    torch.manual_seed(0)
    a = ChimeraMixer(D, conv="grid", **SMALL).double()
    b = ChimeraMixer(D, conv="grid", dag_sum="sqrt", **SMALL).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 9, D, dtype=torch.float64)
    assert not torch.allclose(a(x, grid(3, 3)), b(x, grid(3, 3)))


def test_bad_inputs_get_clear_errors():
    m = ChimeraMixer(D, conv="grid", **SMALL)
    with pytest.raises(ValueError, match="built for 'grid'"):
        m(torch.randn(1, 9, D), line(9))
    with pytest.raises(ValueError, match="has 9 nodes"):
        m(torch.randn(1, 10, D), grid(3, 3))
    with pytest.raises(ValueError, match=f"x must be \\(batch, T, {D}\\)"):
        m(torch.randn(1, 9, D + 1), grid(3, 3))
    with pytest.raises(ValueError, match="edge features"):
        ChimeraMixer(D, conv="graph", edge_dim=4, **SMALL)(torch.randn(1, 10, D),
                                                            TOPOLOGIES["graph"][1])
    with pytest.raises(ValueError, match="unknown method"):
        ChimeraMixer(D, method="fast", **SMALL)
    with pytest.raises(ValueError, match="needs exact/neumann"):
        ChimeraMixer(D, conv="graph", resolvent="general", method="dag_scan", **SMALL)
    with pytest.raises(ValueError, match="multiple of headdim"):
        ChimeraMixer(D, headdim=48)


def test_gated_rmsnorm_equals_the_decomposed_norm_in_values_and_gradients():
    torch.manual_seed(0)
    norm = GatedRMSNorm(12, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(12, dtype=torch.float64))
    y, z = (torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True) for _ in range(2))
    probe = torch.randn(3, 5, 12, dtype=torch.float64)
    leaves = (y, z, norm.weight)
    got = norm(y, z)
    ref = torch.nn.functional.rms_norm(y * torch.nn.functional.silu(z), (12,), norm.weight, 1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * probe).sum(), leaves)
    g_ref = torch.autograd.grad((ref * probe).sum(), leaves)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: norm(a, b), (y[:1, :2], z[:1, :2]))
    # without a gate it is the plain nn.RMSNorm (the same state-dict keys)
    torch.testing.assert_close(norm(y), torch.nn.functional.rms_norm(y, (12,), norm.weight, 1e-5))
    assert list(norm.state_dict()) == ["weight"]


@pytest.mark.parametrize("name", list(TOPOLOGIES))
@pytest.mark.parametrize("resolvent", ["dag", "general"])
def test_block_trains_under_bf16_autocast(name, resolvent):
    """Mixed precision (Lightning's bf16-mixed runs under autocast): the hand-written backward
    passes of the ops meet tensors of their forward's dtype, and the result stays close to
    float32."""
    conv, topo = TOPOLOGIES[name]
    if resolvent == "general" and conv == "causal_line":
        pytest.skip("a single directed line is its own DAG")
    torch.manual_seed(0)
    block = ChimeraBlock(D, conv=conv, mlp_ratio=2.0, resolvent=resolvent, **SMALL)
    x = torch.randn(2, topo.num_nodes, D, requires_grad=True)
    y32 = block(x, topo)
    g32 = torch.autograd.grad(y32.square().sum(), x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = block(x, topo)
    g16 = torch.autograd.grad(y16.float().square().sum(), x)[0]
    assert torch.isfinite(g16).all()
    assert (y16.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    assert (g16 - g32).abs().max() <= 0.05 * g32.abs().max()
