import pytest
import torch

from chimera.topology import CycleError, flat_grid, from_edge_index, grid, line
from tests.conftest import random_dag, random_graph


def test_line_structure():
    t = line(5)
    assert t.num_nodes == 5 and t.num_edges == 8
    assert not t.is_dag
    assert t.in_degree.tolist() == [1, 2, 2, 2, 1]
    assert int(t.diameter()) == 4
    fwd, rev = t.dags()
    assert fwd.line_direction() == 1 and rev.line_direction() == -1
    assert fwd.levels.tolist() == [0, 1, 2, 3, 4]
    assert rev.levels.tolist() == [4, 3, 2, 1, 0]
    # every edge of the line is in exactly one DAG
    both = torch.cat([fwd.parent_edge, rev.parent_edge]).sort().values
    assert both.tolist() == list(range(8))


def test_directed_line_is_its_own_decomposition():
    t = line(4, directed=True)
    assert t.is_dag and t.dags() == [t]
    assert int(t.longest_path()) == 3
    assert line(4, directed=True, reverse=True).line_direction() == -1


def test_grid_corner_dags():
    t = grid(3, 4)
    assert t.num_edges == 2 * (3 * 3 + 2 * 4)
    assert int(t.diameter()) == 5
    dags = t.dags()
    assert [d.name for d in dags] == [
        "grid/top_left", "grid/top_right", "grid/bottom_left", "grid/bottom_right"]
    roots = [int(torch.nonzero(d.in_degree == 0)) for d in dags]
    assert roots == [0, 3, 8, 11]  # the four corners
    for d in dags:
        assert d.is_dag and int(d.longest_path()) == 5
        # level = Manhattan distance from the corner: the anti-diagonal wavefront
        assert int(d.levels.max()) == 5 and len(d.level_sets()) == 6
    tl = dags[0]
    assert tl.levels.view(3, 4)[2, 3] == 5 and tl.levels.view(3, 4)[1, 2] == 3
    # the union of the 4 DAGs covers every grid edge twice (each direction in two DAGs)
    counts = torch.bincount(torch.cat([d.parent_edge for d in dags]), minlength=t.num_edges)
    assert bool((counts == 2).all())


def test_flat_grid():
    assert flat_grid(3, 3).name == "flat_fwd_rev" and len(flat_grid(3, 3).dags()) == 2
    assert flat_grid(3, 3, reverse=False).dags()[0].line_direction() == 1


def test_general_graph_bfs_dags_and_diameter(gen):
    # a 6-cycle: diameter 3, not a DAG
    a = torch.arange(6)
    ring = torch.stack([a, (a + 1) % 6])
    t = from_edge_index(torch.cat([ring, ring.flip(0)], 1), 6)
    assert not t.is_dag
    assert int(t.diameter()) == 3
    down, up = t.dags()
    assert down.is_dag and up.is_dag
    # downward DAG of a BFS from node 0 reaches every node
    assert int((down.in_degree == 0).sum()) == 1
    # same-level edges (the edge between nodes 3's neighbours at equal depth) are dropped
    assert down.num_edges == up.num_edges


def test_batched_graph_diameter_and_ptr(gen):
    g1 = random_graph(7, 0.4, gen)
    g2 = line(4)
    ei = torch.cat([g1.edge_index, g2.edge_index + 7], 1)
    batch = torch.tensor([0] * 7 + [1] * 4)
    t = from_edge_index(ei, 11, batch=batch)
    assert t.num_graphs == 2 and t.ptr.tolist() == [0, 7, 11]
    assert int(t.diameter()[1]) == 3
    assert int(t.diameter()[0]) == int(g1.diameter())


def test_random_dag_levels_respect_edges(gen):
    d = random_dag(30, 0.15, gen)
    assert d.is_dag
    lv = d.levels
    assert bool((lv[d.src] < lv[d.dst]).all())
    # every non-root has a parent exactly one level below (longest-path levels)
    for i in torch.nonzero(lv > 0).flatten().tolist():
        assert int(lv[d.src[d.dst == i]].max()) == int(lv[i]) - 1
    order = d.topological_order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    assert bool((rank[d.src] < rank[d.dst]).all())


def test_reverse_edge_pairs():
    t = line(4)
    rev = t.reverse_edge
    assert bool((t.src[rev] == t.dst).all()) and bool((t.dst[rev] == t.src).all())
    assert line(4, directed=True).reverse_edge.tolist() == [-1, -1, -1]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: from_edge_index(torch.tensor([[0, 1], [1, 5]]), 3), "out of range"),
        (lambda: from_edge_index(torch.tensor([[0, -1], [1, 0]]), 3), "out of range"),
        (lambda: from_edge_index(torch.zeros(3, 2, dtype=torch.long), 3), r"shape \(2, E\)"),
        (lambda: from_edge_index(torch.tensor([[0], [1]]), 0), "at least one node"),
        (lambda: line(0), "at least one token"),
        (lambda: grid(0, 3), "positive height"),
        (lambda: from_edge_index(torch.tensor([[0, 2], [1, 3]]), 4,
                                 batch=torch.tensor([0, 0, 1, 0])), "sorted"),
        (lambda: from_edge_index(torch.tensor([[0], [2]]), 4,
                                 batch=torch.tensor([0, 0, 1, 1])), "different graphs"),
        (lambda: from_edge_index(torch.tensor([[0.0], [1.0]]), 2), "integer"),
    ],
)
def test_bad_topologies_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cycle_given_to_dag_algorithm_is_named():
    with pytest.raises(CycleError, match="directed cycle"):
        line(5).levels  # noqa: B018
    with pytest.raises(CycleError, match="directed cycle"):
        line(5).level_sets()
