"""Shared fixtures: random topologies and inputs for the core tests."""

from __future__ import annotations

import pytest
import torch

from chimera.topology import Topology, from_edge_index


def random_dag(n: int, p: float, generator: torch.Generator) -> Topology:
    """A random DAG whose node ids are shuffled (so index order is not a topological order)."""
    upper = torch.rand(n, n, generator=generator) < p
    upper = torch.triu(upper, diagonal=1)
    src, dst = torch.nonzero(upper, as_tuple=True)
    perm = torch.randperm(n, generator=generator)
    return from_edge_index(torch.stack([perm[src], perm[dst]]), n)


def random_graph(n: int, p: float, generator: torch.Generator, undirected: bool = True) -> Topology:
    """A random graph with cycles (undirected graphs store both directions)."""
    adj = torch.rand(n, n, generator=generator) < p
    adj.fill_diagonal_(False)
    if undirected:
        adj = adj | adj.T
    src, dst = torch.nonzero(adj, as_tuple=True)
    return from_edge_index(torch.stack([src, dst]), n)


def random_inputs(topo: Topology, b=2, h=2, p=3, n=4, dtype=torch.float64, w_scale=1.0,
                  seed=0):
    g = torch.Generator().manual_seed(seed)
    T = topo.num_nodes
    V = torch.randn(b, T, h, p, generator=g, dtype=dtype)
    B = torch.randn(b, T, h, n, generator=g, dtype=dtype)
    C = torch.randn(b, T, h, n, generator=g, dtype=dtype)
    w = (torch.rand(b, h, topo.num_edges, generator=g, dtype=dtype) * 0.9 + 0.05) * w_scale
    return V, B, C, w


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
