"""The normalisations keep the resolvent existing and bounded for any selectivity."""

import math

import pytest
import torch

from chimera import ChimeraMixer, grid, line
from chimera.norm import (
    dag_normalize,
    edge_log_weight,
    edge_selectivity,
    row_normalize,
    two_cycle_normalize,
)
from chimera.ops import resolvent
from tests.conftest import random_dag, random_graph

GAMMA = 0.95


def selectivities(T: int, h: int = 2):
    """Constant and log-uniform node selectivities spanning 1e-4 .. 1e3 (adversarial range)."""
    g = torch.Generator().manual_seed(0)
    out = [torch.full((1, T, h), d) for d in (1e-4, 1e-2, 1.0, 1e3)]
    out.append(torch.exp(torch.empty(1, T, h).uniform_(math.log(1e-4), math.log(1e3),
                                                       generator=g)))
    return out


@pytest.mark.parametrize("divisor", ["count", "sqrt"])
@pytest.mark.parametrize("topo", [grid(6, 7).dags()[0], random_dag(30, 0.2,
                                                                   torch.Generator().manual_seed(1))])
def test_dag_normalisation_bounds_the_resolvent(topo, divisor):
    dia = int(topo.longest_path())
    max_row = topo.in_degree.max().double()
    # count: every row of A is a mean of values <= 1, so ||A^k||_inf <= 1 and |L| <= dia + 1;
    # sqrt: rows sum to <= sqrt(|p(i)|)
    r = 1.0 if divisor == "count" else float(max_row.sqrt())
    bound = sum(r**k for k in range(dia + 1))
    for delta in selectivities(topo.num_nodes):
        log_w = edge_log_weight(edge_selectivity(delta, topo), torch.zeros(2))
        w, scale = dag_normalize(log_w, delta, topo, divisor)
        assert torch.isfinite(w).all() and torch.isfinite(scale).all() and (scale >= 0).all()
        L, _ = resolvent(w, topo, "exact")
        assert torch.isfinite(L).all()
        assert float(L.abs().sum(-1).max()) <= bound * (1 + 1e-5)


def test_dag_normalisation_is_the_papers_recurrence():
    """eq. 14: h_i = (1/|p(i)|) sum_j (A_ij h_j - ln(A_ij) B_i v_i)."""
    topo = grid(2, 2).dags()[0]  # node 3 has two parents (1, 2)
    delta = torch.tensor([[[0.3], [0.7], [1.1], [0.2]]])
    log_w = edge_log_weight(edge_selectivity(delta, topo), torch.zeros(1))
    w, scale = dag_normalize(log_w, delta, topo, "count")
    e = {(int(s), int(d)): k for k, (s, d) in enumerate(topo.edge_index.T)}
    a13 = math.exp(-(0.7 + 0.2) / 2)
    assert w[0, 0, e[(1, 3)]].item() == pytest.approx(a13 / 2)
    expected = ((0.7 + 0.2) / 2 + (1.1 + 0.2) / 2) / 2  # mean of -ln A_3j
    assert scale[0, 3, 0].item() == pytest.approx(expected)
    assert scale[0, 0, 0].item() == pytest.approx(0.3)  # the root keeps delta_i


@pytest.mark.parametrize("topo", [random_graph(25, 0.2, torch.Generator().manual_seed(3)),
                                  grid(5, 5)])
def test_row_normalisation_bounds_the_resolvent(topo):
    for delta in selectivities(topo.num_nodes):
        for psi_value in (-1e3, -10.0, 0.0, 10.0):
            psi = torch.full_like(delta, psi_value)
            w = row_normalize(torch.exp(edge_log_weight(edge_selectivity(delta, topo),
                                                        torch.zeros(2))), psi, topo, GAMMA)
            row_sum = torch.zeros(1, 2, topo.num_nodes).index_add(-1, topo.dst, w)
            assert torch.isfinite(w).all() and float(row_sum.max()) < GAMMA + 1e-6
            L, _ = resolvent(w, topo, "exact")
            assert torch.isfinite(L).all()
            assert float(L.abs().sum(-1).max()) <= 1 / (1 - GAMMA) * (1 + 1e-4)


def test_two_cycle_constraint_bounds_the_undirected_line():
    """App. B.1: A_ij A_ji <= gamma^2/4 on every 2-cycle keeps every entry of L below
    1/sqrt(1 - gamma^2) (the walk generating function of the line)."""
    topo = line(60)
    g = torch.Generator().manual_seed(4)
    weights = [torch.exp(edge_log_weight(edge_selectivity(d, topo), torch.zeros(2)))
               for d in selectivities(60)]
    weights.append(torch.rand(1, 2, topo.num_edges, generator=g))  # asymmetric pairs
    for w in weights:
        w = two_cycle_normalize(w, topo, GAMMA)
        assert float((w * w[..., topo.reverse_edge]).max()) <= GAMMA**2 / 4 * (1 + 1e-5)
        L, _ = resolvent(w.double(), topo, "reference")
        assert float(L.max()) <= 1 / math.sqrt(1 - GAMMA**2) * (1 + 1e-4)


def test_two_cycle_constraint_needs_pairs():
    with pytest.raises(ValueError, match="unpaired"):
        two_cycle_normalize(torch.rand(1, 1, 3), line(4, directed=True))


@pytest.mark.parametrize(
    "kw, topo",
    [
        (dict(conv="grid"), grid(5, 5)),
        (dict(conv="grid", dag_norm="sqrt", method="dag_scan"), grid(5, 5)),
        (dict(conv="line", resolvent="general", general_norm="two_cycle"), line(20)),
        (dict(conv="graph", resolvent="general"), random_graph(15, 0.3,
                                                              torch.Generator().manual_seed(9))),
        (dict(conv="causal_line"), line(20, directed=True)),
    ],
)
@pytest.mark.parametrize("dt_bias", [math.log(1e-4), 0.0, 1e3])
def test_mixer_outputs_stay_finite_float32_and_bf16(kw, topo, dt_bias):
    torch.manual_seed(0)
    m = ChimeraMixer(32, d_state=8, headdim=16, **kw)
    with torch.no_grad():
        m.dt_bias.fill_(dt_bias)  # softplus(dt_bias) spans ~1e-4 .. 1e3
    x = torch.randn(2, topo.num_nodes, 32) * 3
    y = m(x, topo)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = m(x, topo)
    assert torch.isfinite(y16).all()
