"""Graph layers and models (issue 9): ChimeraGraphConv, the GPS-style layer, the LRGB builders,
K (finite-sum terms) per graph, edge cases of PyG batches, and the fast structure functions."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import GCNConv, global_mean_pool

from chimera.models.graph import (
    ATOM_FEATURE_DIMS,
    BOND_FEATURE_DIMS,
    ChimeraGraphConv,
    GatedGCNConv,
    build_lrgb_model,
    count_parameters,
    graph_topology,
    num_terms_for,
)
from chimera.topology import from_edge_index
from chimera.topology.decompose import bfs_depth, bfs_depth_reference
from chimera.topology.structure import bfs_depth_fast, graph_diameters
from tests.conftest import random_dag, random_graph

SMALL = dict(heads=2, d_state=4, expand=2.0)


def undirected(ei: torch.Tensor) -> torch.Tensor:
    return torch.cat([ei, ei.flip(0)], 1)


def path(n: int) -> torch.Tensor:
    a = torch.arange(n - 1)
    return undirected(torch.stack([a, a + 1]))


def ring_with_tail(n: int) -> torch.Tensor:
    a = torch.arange(n - 1)
    return undirected(torch.cat([torch.stack([a, a + 1]), torch.tensor([[0], [min(4, n - 1)]])], 1))


def batch_of(edge_lists: list[torch.Tensor], sizes: list[int], channels: int = 8,
             edge_dim: int | None = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    data = []
    for ei, n in zip(edge_lists, sizes, strict=True):
        d = Data(x=torch.randn(n, channels, generator=g, dtype=torch.float64), edge_index=ei,
                 num_nodes=n)
        if edge_dim:
            d.edge_attr = torch.randn(ei.shape[1], edge_dim, generator=g, dtype=torch.float64)
        data.append(d)
    return Batch.from_data_list(data)


def molecule(n: int, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    ei = ring_with_tail(n)
    x = torch.stack([torch.randint(0, d, (n,), generator=g) for d in ATOM_FEATURE_DIMS], 1)
    ea = torch.stack([torch.randint(0, d, (ei.shape[1],), generator=g) for d in BOND_FEATURE_DIMS],
                     1)
    return Data(x=x, edge_index=ei, edge_attr=ea, y=torch.rand(1, 10, generator=g))


def superpixels(n: int, seed: int) -> Data:
    g = torch.Generator().manual_seed(seed)
    ei = ring_with_tail(n)
    return Data(x=torch.rand(n, 14, generator=g), edge_index=ei,
                edge_attr=torch.rand(ei.shape[1], 2, generator=g),
                y=torch.randint(0, 21, (n,), generator=g))


def run(conv: nn.Module, b: Batch, **kw) -> torch.Tensor:
    return conv(b.x, b.edge_index, getattr(b, "edge_attr", None), b.batch, **kw)


# --------------------------------------------------------------------------- parameter counts
TABLE_11 = {  # dataset: (heads, d_state), the paper's Table 11
    "peptides-func": (2, 96), "peptides-struct": (4, 80), "pascalvoc-sp": (4, 64),
    "coco-sp": (4, 64),
}
EXPECTED_PARAMS = {"peptides-func": 496_650, "peptides-struct": 482_699,
                   "pascalvoc-sp": 455_381, "coco-sp": 459_281}


@pytest.mark.parametrize("dataset", list(TABLE_11))
def test_parameter_counts_at_table_11_settings(dataset):
    m = build_lrgb_model(dataset)
    heads, d_state = TABLE_11[dataset]
    mixer = m.layers[0].chimera.mixer
    assert (mixer.nheads, mixer.d_state, len(m.layers), m.layers[0].local_kind) == (
        heads, d_state, 8, "gcn")
    n = count_parameters(m)
    assert n < 500_000 and n == EXPECTED_PARAMS[dataset]
    # the authors' release: GatedGCN local MPNN, d_inner = width, d_state 64 (4 heads: +363)
    release = count_parameters(build_lrgb_model(dataset, local="gatedgcn", expand=1.0,
                                                d_state=64))
    assert release < (500_000 if dataset == "peptides-func" else 501_000)
    for layer in ("gcn", "gatedgcn", "gine", "gps"):
        assert count_parameters(build_lrgb_model(dataset, layer)) < 500_000


# --------------------------------------------------------------------------- the layer
@pytest.mark.parametrize("method", ["exact", "neumann", "dag"])
def test_batched_graphs_are_independent(method):
    """A graph's output in a batch equals its output alone (block-diagonal resolvent), with K
    per graph for neumann."""
    torch.manual_seed(0)
    conv = ChimeraGraphConv(8, edge_dim=3, method=method, **SMALL).double()
    graphs, sizes = [ring_with_tail(9), path(5), ring_with_tail(14)], [9, 5, 14]
    b = batch_of(graphs, sizes)
    y = run(conv, b)
    assert y.shape == (28, 8) and torch.isfinite(y).all()
    for i, ((lo, hi), gi) in enumerate(zip([(0, 9), (9, 14), (14, 28)], graphs, strict=True)):
        one = b.get_example(i)
        y1 = conv(one.x, gi, one.edge_attr, torch.zeros(hi - lo, dtype=torch.long))
        torch.testing.assert_close(y[lo:hi], y1, atol=1e-10, rtol=1e-8)


def test_drop_in_pyg_model_trains():
    """ChimeraGraphConv inside an ordinary user PyG model: forward, backward, a step."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gcn = GCNConv(8, 8)
            self.chimera = ChimeraGraphConv(8, edge_dim=3, **SMALL)
            self.out = nn.Linear(8, 1)

        def forward(self, d):
            h = self.gcn(d.x, d.edge_index).relu()
            h = h + self.chimera(h, d.edge_index, d.edge_attr, d.batch)
            return self.out(global_mean_pool(h, d.batch))

    b = batch_of([ring_with_tail(7), path(6)], [7, 6])
    b.x, b.edge_attr = b.x.float(), b.edge_attr.float()
    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    loss = net(b).pow(2).mean()
    loss.backward()
    assert net.chimera.mixer.edge_proj.weight.grad.abs().sum() > 0  # edge features reach A
    opt.step()
    assert net(b).shape == (2, 1)


def test_exact_is_permutation_equivariant():
    torch.manual_seed(1)
    conv = ChimeraGraphConv(8, edge_dim=3, method="exact", **SMALL).double()
    b = batch_of([ring_with_tail(10)], [10])
    perm = torch.randperm(10)
    inv = torch.argsort(perm)
    y = run(conv, b)
    yp = conv(b.x[perm], inv[b.edge_index], b.edge_attr, b.batch)
    torch.testing.assert_close(yp, y[perm], atol=1e-10, rtol=1e-8)


def test_dag_algorithms_agree_through_the_layer():
    torch.manual_seed(2)
    b = batch_of([ring_with_tail(9), path(4)], [9, 4])
    base = ChimeraGraphConv(8, edge_dim=3, method="dag", dag_method="exact", **SMALL).double()
    y = run(base, b)
    for algo in ("dag_scan", "dag_dense", "reference"):
        conv = ChimeraGraphConv(8, edge_dim=3, method="dag", dag_method=algo, **SMALL).double()
        conv.load_state_dict(base.state_dict())
        torch.testing.assert_close(run(conv, b), y, atol=1e-9, rtol=1e-7)


def test_dag_auto_picks_rows_by_the_largest_graph_and_agrees_with_the_oracle():
    """``dag_method="auto"``: the rows of L (``exact``) while the largest graph of the call has at
    most ``dense_max_nodes`` nodes, whatever the batch's total; the state scan beyond; both equal
    the float64 oracle, and the mixer's own method is left as built."""
    from chimera.models.graph import bucket_graphs

    torch.manual_seed(4)
    sizes = [9, 5, 14, 7, 11]
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14), path(7), ring_with_tail(11)],
                 sizes)
    oracle = ChimeraGraphConv(8, edge_dim=3, method="dag", dag_method="reference",
                              **SMALL).double()
    y_ref = run(oracle, b, topology=graph_topology(b.edge_index, b.num_nodes, b.batch))
    for dense_max, per_bucket, expect in ((14, None, "exact"), (13, None, "dag_scan"),
                                          (20, 2, "exact"), (10, 2, None)):
        conv = ChimeraGraphConv(8, edge_dim=3, method="dag", dense_max_nodes=dense_max,
                                graphs_per_bucket=per_bucket, **SMALL).double()
        conv.load_state_dict(oracle.state_dict())
        topo = conv.structure(b.edge_index, b.batch, b.num_nodes)
        if per_bucket is None:
            assert conv._dag_method_for(topo) == expect  # 46 nodes in all, largest graph 14
        else:
            assert len(topo.parts) == 3
            picked = [conv._dag_method_for(part.topology) for part in topo.parts]
            if expect:
                assert picked == [expect] * 3
            else:  # buckets of (5, 7), (9, 11), (14): the last ones beyond 10 nodes
                assert picked == ["exact", "dag_scan", "dag_scan"]
        torch.testing.assert_close(run(conv, b, topology=topo), y_ref, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(run(conv, b), y_ref, atol=1e-9, rtol=1e-7)  # own structure
        assert conv.mixer.method == "auto"
    bk = bucket_graphs(b.edge_index, b.batch, 5, 2)
    assert isinstance(ChimeraGraphConv(8, graphs_per_bucket=2).structure(
        b.edge_index, b.batch, b.num_nodes), type(bk))
    with pytest.raises(ValueError, match="graphs_per_bucket"):
        ChimeraGraphConv(8, graphs_per_bucket=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method,k_mode", [("exact", "diameter"), ("neumann", "diameter"),
                                           ("neumann", "max_nodes"), ("dag", "diameter")])
def test_layer_buckets_equal_one_call_with_gradients(method, k_mode, threads):
    """The layer's own size buckets (no ``topology`` given) give the one-call result, values and
    gradients (float64); ``k_mode="max_nodes"`` keeps the whole batch's K. With two CPU threads
    the buckets run concurrently (``chimera.buckets``), forward and backward."""
    import chimera.buckets

    torch.manual_seed(5)
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14), path(7), ring_with_tail(11)],
                 [9, 5, 14, 7, 11])
    outs = []
    calls = []
    apply = chimera.buckets._ThreadedBuckets.apply
    before = torch.get_num_threads()
    try:
        chimera.buckets._ThreadedBuckets.apply = lambda *a: calls.append(1) or apply(*a)
        torch.set_num_threads(threads)
        for per_bucket in (None, 2, "auto"):
            torch.manual_seed(5)
            conv = ChimeraGraphConv(8, edge_dim=3, method=method, graphs_per_bucket=per_bucket,
                                    k_mode=k_mode, **SMALL).double()
            x = b.x.clone().requires_grad_(True)
            y = conv(x, b.edge_index, b.edge_attr, b.batch)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad, *(p.grad for p in conv.parameters())))
    finally:
        chimera.buckets._ThreadedBuckets.apply = apply
        torch.set_num_threads(before)
    assert bool(calls) == (threads > 1)
    assert all(g is not None for g in outs[1])  # every parameter gets a gradient
    for other in outs[1:]:
        for a, c in zip(outs[0], other, strict=True):
            torch.testing.assert_close(c, a, atol=1e-9, rtol=1e-7)


def test_mixer_forward_buckets_in_any_order_equals_forward():
    """``ChimeraMixer.forward_buckets``: the per-node work once, the mixing per bucket, for any
    partition of the batch into whole graphs (here out of size order); a partition that misses
    nodes is refused."""
    from chimera.models.graph import bucket_graphs

    torch.manual_seed(6)
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14), path(7)], [9, 5, 14, 7])
    conv = ChimeraGraphConv(8, edge_dim=3, method="exact", **SMALL).double()
    whole = graph_topology(b.edge_index, b.num_nodes, b.batch)
    x = b.x.unsqueeze(0)
    y_ref = conv.mixer(x, whole, b.edge_attr)
    bk = bucket_graphs(b.edge_index, b.batch, 4, 3)
    parts = [(p.node_ids, p.edge_ids, p.topology) for p in reversed(bk.parts)]
    y = conv.mixer.forward_buckets(x, bk.topology, parts, b.edge_attr)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    with pytest.raises(ValueError, match="buckets hold"):
        conv.mixer.forward_buckets(x, bk.topology, parts[:1], b.edge_attr)


# --------------------------------------------------------------------------- K and Prop. 4.6
def _sensitivity(conv: ChimeraGraphConv, n: int, target: int = 0) -> torch.Tensor:
    """|d y_target / d x_j| summed over channels, on a path of n nodes."""
    torch.manual_seed(3)
    x = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    y = conv(x, path(n), None, torch.zeros(n, dtype=torch.long))
    (g,) = torch.autograd.grad(y[target].sum(), x)
    return g.abs().sum(-1)


def test_prop_4_6_through_the_layer():
    """K = diameter reaches every node (Prop. 4.6); a short K does not; K >> diameter -> exact."""
    n = 16
    conv = ChimeraGraphConv(8, method="neumann", **SMALL).double()
    assert int(num_terms_for(graph_topology(path(n), n))) == n - 1
    assert bool((_sensitivity(conv, n) > 0).all())
    conv.num_terms = 3
    s = _sensitivity(conv, n)
    # local conv and row normalisation add at most 2 hops to the K-hop resolvent
    assert bool((s[: 3 + 1] > 0).all()) and bool((s[3 + 3:] == 0).all())
    exact = ChimeraGraphConv(8, method="exact", **SMALL).double()
    exact.load_state_dict(conv.state_dict())
    b = batch_of([ring_with_tail(11), path(6)], [11, 6], edge_dim=None)
    conv.num_terms = 800  # gamma = 0.95: 0.95^800 ~ 1e-18
    torch.testing.assert_close(run(conv, b), run(exact, b), atol=1e-9, rtol=1e-7)


def test_k_modes_and_factor():
    b = batch_of([path(10), path(4), ring_with_tail(12)], [10, 4, 12], edge_dim=None)
    topo = graph_topology(b.edge_index, b.num_nodes, b.batch)
    dia = topo.diameter()
    assert dia.tolist() == [9, 3, int(graph_diameters(ring_with_tail(12), 12))]
    assert num_terms_for(topo).tolist() == dia.tolist()
    assert num_terms_for(topo, factor=2).tolist() == [5, 2, (int(dia[2]) + 1) // 2]
    assert num_terms_for(topo, "max_nodes", 3) == 12 // 3  # the release: largest graph // factor
    with pytest.raises(ValueError, match="positive"):
        num_terms_for(topo, factor=0)
    with pytest.raises(ValueError, match="unknown K mode"):
        num_terms_for(topo, "bogus")
    # the per-graph K reaches the mixer: K = dia / 2 per graph differs from one K for all
    torch.manual_seed(4)
    half = ChimeraGraphConv(8, method="neumann", k_factor=2, **SMALL).double()
    fixed = ChimeraGraphConv(8, method="neumann", num_terms=5, **SMALL).double()
    fixed.load_state_dict(half.state_dict())
    y_half, y_fixed = run(half, b), run(fixed, b)
    torch.testing.assert_close(y_half[:10], y_fixed[:10])  # graph 0: K = 5 in both
    assert not torch.allclose(y_half[10:14], y_fixed[10:14])  # graph 1: K = 2 vs 5


# --------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("method", ["exact", "neumann", "dag"])
def test_edgeless_single_atom_components_self_loops_duplicates(method):
    """Batches with no edge at all (used to fail with 'decomposes into 1 DAGs'), single atoms,
    several components, self-loops and duplicate edges all run and stay per-graph."""
    torch.manual_seed(5)
    conv = ChimeraGraphConv(8, edge_dim=3, method=method, **SMALL).double()
    empty = torch.zeros(2, 0, dtype=torch.long)
    b = batch_of([empty, empty], [3, 1])
    y = run(conv, b)
    assert y.shape == (4, 8) and torch.isfinite(y).all()
    two_parts = torch.cat([path(3), path(3) + 3], 1)  # two components in one graph
    loops = torch.cat([path(4), torch.tensor([[1, 2], [1, 2]])], 1)  # self-loops
    dup = torch.cat([path(4), path(4)[:, :2]], 1)  # duplicate edges
    graphs, sizes = [empty, two_parts, loops, dup], [1, 6, 4, 4]
    b = batch_of(graphs, sizes)
    y = run(conv, b)
    assert torch.isfinite(y).all()
    lo = 0
    for i, (gi, n) in enumerate(zip(graphs, sizes, strict=True)):
        one = b.get_example(i)
        y1 = conv(one.x, gi, one.edge_attr, torch.zeros(n, dtype=torch.long))
        torch.testing.assert_close(y[lo:lo + n], y1, atol=1e-10, rtol=1e-8)
        lo += n


def test_precomputed_structure_is_used_and_equal(monkeypatch):
    b = batch_of([ring_with_tail(9), path(5)], [9, 5])
    conv = ChimeraGraphConv(8, edge_dim=3, method="dag", **SMALL).double()
    conv_k = ChimeraGraphConv(8, edge_dim=3, method="neumann", **SMALL).double()
    y, yk = run(conv, b), run(conv_k, b)
    depth = bfs_depth_fast(b.edge_index, b.num_nodes)
    dia = graph_diameters(b.edge_index, b.num_nodes, b.batch)

    def boom(*a, **k):
        raise AssertionError("structure recomputed in the forward pass")

    monkeypatch.setattr("chimera.topology.structure.bfs_depth_fast", boom)
    monkeypatch.setattr("chimera.topology.structure.graph_diameters", boom)
    torch.testing.assert_close(run(conv, b, bfs_depth=depth, diameter=dia), y)
    torch.testing.assert_close(run(conv_k, b, bfs_depth=depth, diameter=dia), yk)
    with pytest.raises(ValueError, match="one entry per graph"):
        run(conv_k, b, diameter=dia[:1])


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="unknown method"):
        ChimeraGraphConv(8, method="cubic")
    with pytest.raises(ValueError, match="divisible"):
        ChimeraGraphConv(8, heads=3)
    conv = ChimeraGraphConv(8, edge_dim=3, **SMALL)
    with pytest.raises(ValueError, match="num_nodes, 8"):
        conv(torch.randn(5, 7), path(5))
    with pytest.raises(ValueError, match="edge features"):
        conv(torch.randn(5, 8), path(5))
    with pytest.raises(ValueError, match="unknown LRGB dataset"):
        build_lrgb_model("zinc")
    m = build_lrgb_model("peptides-func", "gcn")
    d = molecule(6, 0)
    with pytest.raises(ValueError, match="integer codes with 9 columns"):
        m(Data(x=d.x.float(), edge_index=d.edge_index, edge_attr=d.edge_attr))
    bad = d.x.clone()
    bad[0, 0] = 500
    with pytest.raises(ValueError, match="out of range"):
        m(Data(x=bad, edge_index=d.edge_index, edge_attr=d.edge_attr))


# --------------------------------------------------------------------------- GatedGCN
def test_gatedgcn_matches_its_equations():
    torch.manual_seed(6)
    conv = GatedGCNConv(4, batch_norm=False).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ei = ring_with_tail(5)
    e = torch.randn(ei.shape[1], 4, dtype=torch.float64)
    h, e_out = conv(x, ei, e)
    for i in range(5):
        acc_num, acc_den = torch.zeros(4, dtype=x.dtype), torch.zeros(4, dtype=x.dtype)
        for k in range(ei.shape[1]):
            j, t = int(ei[0, k]), int(ei[1, k])
            if t != i:
                continue
            e_hat = conv.D(x[i]) + conv.E(x[j]) + conv.C(e[k])
            s = torch.sigmoid(e_hat)
            acc_num, acc_den = acc_num + s * conv.B(x[j]), acc_den + s
            torch.testing.assert_close(e_out[k], e[k] + torch.relu(e_hat))
        torch.testing.assert_close(h[i], x[i] + torch.relu(conv.A(x[i]) + acc_num
                                                          / (acc_den + 1e-6)))


# --------------------------------------------------------------------------- full models
@pytest.mark.parametrize("layer", ["chimera", "gcn", "gatedgcn", "gine", "gps"])
def test_models_run_graph_and_node_tasks(layer):
    torch.manual_seed(7)
    kw = dict(hidden=16, num_layers=2)
    if layer == "chimera":
        kw.update(d_state=4, local="gatedgcn")
    mg = build_lrgb_model("peptides-func", layer, **kw)
    b = Batch.from_data_list([molecule(n, n) for n in (7, 12, 5)])
    out = mg(b)
    assert out.shape == (3, 10)
    out.sum().backward()
    mn = build_lrgb_model("pascalvoc-sp", layer, **kw)
    b = Batch.from_data_list([superpixels(n, n) for n in (9, 6)])
    assert mn(b).shape == (15, 21)


@pytest.mark.parametrize("kw", [dict(method="neumann", k_factor=2), dict(method="dag"),
                                dict(local="none", composition="parallel", norm="graph_layer")])
def test_chimera_model_variants(kw):
    torch.manual_seed(8)
    m = build_lrgb_model("peptides-struct", hidden=16, num_layers=2, d_state=4, **kw)
    b = Batch.from_data_list([molecule(n, n) for n in (8, 11)])
    out = m(b)
    assert out.shape == (2, 11) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- fast structure
def test_fast_structure_equals_the_sequential_oracles():
    g = torch.Generator().manual_seed(9)
    for trial in range(12):
        parts = [random_graph(int(torch.randint(1, 20, (1,), generator=g)), 0.15, g,
                              undirected=trial % 3 != 0) for _ in range(4)]
        parts.append(random_dag(9, 0.3, g))
        parts.append(from_edge_index(torch.zeros(2, 0, dtype=torch.long), 3))
        ei, batch, off = [], [], 0
        for i, p in enumerate(parts):
            ei.append(p.edge_index + off)
            batch += [i] * p.num_nodes
            off += p.num_nodes
        topo = from_edge_index(torch.cat(ei, 1), off, batch=torch.tensor(batch))
        assert torch.equal(topo.diameter(), topo._bfs_diameter())
        assert torch.equal(bfs_depth(topo), bfs_depth_reference(topo))
        roots = torch.minimum(topo.ptr[:-1] + 2, topo.ptr[1:] - 1)
        assert torch.equal(bfs_depth(topo, roots), bfs_depth_reference(topo, roots))
    # more than 64 nodes per graph: several bit words
    big = ring_with_tail(150)
    assert int(graph_diameters(big, 150)) == int(from_edge_index(big, 150)._bfs_diameter())
    # chunking (graphs sorted by size, cut into chunks) does not change the result
    ei = torch.cat([big, path(7) + 150, ring_with_tail(30) + 157], 1)
    batch = torch.tensor([0] * 150 + [1] * 7 + [2] * 30)
    whole = graph_diameters(ei, 187, batch)
    assert torch.equal(graph_diameters(ei, 187, batch, max_chunk_nodes=10), whole)
    assert whole.tolist() == [int(graph_diameters(big, 150)), 6,
                              int(graph_diameters(ring_with_tail(30), 30))]


def test_core_does_not_import_torch_geometric():
    """torch_geometric is imported at module level only by chimera/models/graph.py, and
    chimera.models exports the graph names lazily (a static check: a fresh interpreter costs
    ~20 s on a loaded machine)."""
    import ast
    from pathlib import Path

    import chimera.models

    root = Path(chimera.models.__file__).resolve().parents[1]
    offenders = []
    for path in root.rglob("*.py"):
        if path.relative_to(root).as_posix() == "models/graph.py":
            continue
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
                if node.module == "chimera.models.graph":
                    names = ["torch_geometric (via chimera.models.graph)"]
            offenders += [f"{path}: {n}" for n in names if n.startswith("torch_geometric")]
    assert not offenders, offenders
    assert "ChimeraGraphConv" in chimera.models.__all__
    assert chimera.models.ChimeraGraphConv is ChimeraGraphConv


def test_per_graph_neumann_in_the_core():
    from chimera.ops import resolvent
    from chimera.ops.linalg import neumann_sum, neumann_sum_per_block

    g = torch.Generator().manual_seed(10)
    A = torch.rand(2, 4, 3, 6, 6, generator=g, dtype=torch.float64) * 0.2
    K = torch.tensor([0, 1, 6, 19])
    S = neumann_sum_per_block(A, K.view(1, -1, 1))
    for i in range(4):
        torch.testing.assert_close(S[:, i], neumann_sum(A[:, i], int(K[i])))
    with pytest.raises(ValueError, match=">= 0"):
        neumann_sum_per_block(A, torch.tensor([-1]))
    b = batch_of([path(5), path(3)], [5, 3], edge_dim=None)
    topo = graph_topology(b.edge_index, b.num_nodes, b.batch)
    w = torch.rand(1, 1, topo.num_edges, generator=g, dtype=torch.float64) * 0.3
    L, _ = resolvent(w, topo, "neumann", num_terms=torch.tensor([4, 2]))
    for i, (lo, n, k) in enumerate([(0, 5, 4), (5, 3, 2)]):  # each graph alone, its own K
        alone = from_edge_index(path(n), n)
        ids = (topo.src >= lo) & (topo.src < lo + n)
        Li, _ = resolvent(w[..., ids], alone, "neumann", num_terms=k)
        torch.testing.assert_close(L[:, i, :, :n, :n], Li[:, 0])
    with pytest.raises(ValueError, match="one K per graph"):
        resolvent(w, topo, "neumann", num_terms=torch.tensor([4, 2, 1]))


def test_bfs_dag_levels_equal_kahns_and_are_used():
    """The BFS DAGs' levels read off pre-computed depths (graph_topology(bfs_depth=...)) equal
    Kahn's longest-path levels, on molecules with rings, several components, isolated nodes;
    a depth that is not a BFS depth falls back to Kahn's algorithm."""
    from chimera.models.graph import bfs_dag_levels
    from chimera.topology.decompose import bfs_dags
    from tasks.graph.transforms import ChimeraStructure

    graphs = [ring_with_tail(9), path(5), ring_with_tail(14), torch.zeros(2, 0, dtype=torch.long),
              torch.cat([ring_with_tail(6), ring_with_tail(5) + 6], 1)]
    sizes = [9, 5, 14, 3, 11]
    data = [ChimeraStructure()(Data(edge_index=ei, num_nodes=n)) for ei, n in zip(graphs, sizes,
                                                                                   strict=True)]
    b = Batch.from_data_list(data)
    topo = graph_topology(b.edge_index, b.num_nodes, b.batch, bfs_depth=b.bfs_depth)
    fresh = bfs_dags(from_edge_index(b.edge_index, b.num_nodes, batch=b.batch),
                     depth=b.bfs_depth)
    for dag, ref in zip(topo.dags(), fresh, strict=True):
        assert "levels" in dag._cache
        assert torch.equal(dag.levels, ref.levels)  # ref: Kahn's algorithm
        assert all(torch.equal(a, c) for a, c in zip(dag.level_sets(), ref.level_sets(),
                                                     strict=True))
    wrong = b.bfs_depth.clone()
    wrong[1] += 1  # not a BFS depth any more
    assert bfs_dag_levels(bfs_dags(from_edge_index(b.edge_index, b.num_nodes, batch=b.batch),
                                   depth=wrong)[0], wrong) is None
    topo = graph_topology(b.edge_index, b.num_nodes, b.batch, bfs_depth=wrong)
    assert all("levels" not in d._cache and d.is_dag for d in topo.dags())


def test_threaded_buckets_keep_the_callers_modes():
    """The concurrent buckets (two CPU threads) run under the caller's Python dispatch modes (a
    counting mode sees the same ops as with one thread) and inference mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten.bmm.default
            return func(*args, **(kwargs or {}))

    torch.manual_seed(5)
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14), path(7)], [9, 5, 14, 7])
    conv = ChimeraGraphConv(8, edge_dim=3, method="exact", graphs_per_bucket=1, **SMALL).double()
    counts, outs = [], []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with Count() as mode:
                conv(b.x, b.edge_index, b.edge_attr, b.batch).sum().backward()
            counts.append(mode.n)
            with torch.inference_mode():
                y = conv(b.x, b.edge_index, b.edge_attr, b.batch)
            assert y.is_inference()
            with torch.no_grad():  # no graphs kept
                assert not conv(b.x, b.edge_index, b.edge_attr, b.batch).requires_grad
            outs.append(y)
    finally:
        torch.set_num_threads(before)
    assert counts[0] == counts[1] > 0
    torch.testing.assert_close(outs[0], outs[1])


def test_threaded_buckets_one_backward_and_the_switch():
    """With two threads the buckets' graphs serve one backward: a second one is refused with a
    message that names the switch; ``set_threaded(False)`` runs them in order (same values) and
    then allows ``retain_graph``."""
    import chimera.buckets

    torch.manual_seed(5)
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14), path(7)], [9, 5, 14, 7])
    conv = ChimeraGraphConv(8, edge_dim=3, method="exact", graphs_per_bucket=1, **SMALL).double()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = conv(b.x, b.edge_index, b.edge_attr, b.batch).sum()
        y.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="set_threaded"):
            y.backward()
        chimera.buckets.set_threaded(False)
        y2 = conv(b.x, b.edge_index, b.edge_attr, b.batch).sum()
        y2.backward(retain_graph=True)
        y2.backward()
        torch.testing.assert_close(y2, y)
    finally:
        chimera.buckets.set_threaded(True)
        torch.set_num_threads(before)



def test_bucket_pool_in_a_forked_child():
    """A process forked after the bucket threads started gets its own pool (a fork copies the
    pool without its threads, where work submitted would never run)."""
    import multiprocessing as mp

    import chimera.buckets

    assert chimera.buckets._run(2, _double, [2, 0, 1]) == {0: 0, 1: 2, 2: 4}  # pool started
    with mp.get_context("fork").Pool(1) as pool:
        out = pool.apply_async(_bucket_run_in_child).get(timeout=60)
    assert out == {0: 0, 1: 2, 2: 4}


def _double(k: int) -> int:
    return 2 * k


def _bucket_run_in_child() -> dict:
    import chimera.buckets

    return chimera.buckets._run(2, _double, [2, 0, 1])


def test_dag_weights_once_per_batch_only_where_bucket_dags_match():
    """BFS-DAG layers compute the DAGs' weights once for the batch when every bucket's DAGs
    are the batch's restricted to its graphs (buckets from ``bucket_graphs``: same roots, so
    same depths); a bucket whose graph is relabelled (another BFS root, other DAGs) is refused
    and the buckets normalise their own DAGs, which ``forward_buckets`` then mixes."""
    from chimera.models.graph import bucket_graphs

    torch.manual_seed(8)
    b = batch_of([ring_with_tail(9), path(5), ring_with_tail(14)], [9, 5, 14])
    conv = ChimeraGraphConv(8, edge_dim=3, method="dag", **SMALL).double()
    mixer = conv.mixer
    bk = bucket_graphs(b.edge_index, b.batch, 3, 2)
    parts = [(p.node_ids, p.edge_ids, p.topology) for p in bk.parts]
    assert mixer._dags_match_per_bucket(bk.topology, parts)
    # the 14-node graph's nodes in reverse order: its first node (the BFS root) changes
    node_ids, edge_ids, sub = parts[-1]
    n = sub.num_nodes
    flipped = from_edge_index(n - 1 - sub.edge_index, n, batch=sub.batch)
    moved = [*parts[:-1], (node_ids.flip(0), edge_ids, flipped)]
    assert not mixer._dags_match_per_bucket(bk.topology, moved)
    y = mixer.forward_buckets(b.x.unsqueeze(0), bk.topology, moved, b.edge_attr)
    assert y.shape == (1, b.num_nodes, 8) and bool(torch.isfinite(y).all())
