"""Canonical DAG decompositions (paper Sec. 4.1, Figs. 2-3).

An undirected line is the union of its forward and reverse directed lines; a grid is the union of
the four directed grids that flow away from each corner. A general graph has no canonical
decomposition: we orient every edge by BFS depth from a root of each connected component, which
gives a "downward" DAG and its reverse ("upward"). Edges between two nodes of the same BFS depth
belong to neither DAG (orienting them would need an arbitrary tie-break that breaks the symmetry
between the two DAGs); the exact and finite-sum methods on the whole graph keep them.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

from chimera.topology.graph import Topology

GRID_CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


def line_dags(topo: Topology) -> list[Topology]:
    step = topo.dst - topo.src
    fwd = torch.nonzero(step == 1).flatten()
    rev = torch.nonzero(step == -1).flatten()
    if fwd.numel() + rev.numel() != topo.num_edges:
        raise ValueError(f"'{topo.name}' is marked as a line but has edges that skip nodes")
    return [
        topo.subgraph_edges(fwd, f"{topo.name}/forward"),
        topo.subgraph_edges(rev, f"{topo.name}/reverse"),
    ]


def grid_dags(topo: Topology) -> list[Topology]:
    """The four corner DAGs in the order top_left, top_right, bottom_left, bottom_right.

    The DAG flowing from the top-left corner holds the rightward and downward edges, etc.
    """
    if topo.grid_shape is None:
        raise ValueError(f"'{topo.name}' is marked as a grid but has no grid_shape")
    _, w = topo.grid_shape
    step = topo.dst - topo.src
    right, left = step == 1, step == -1
    down, up = step == w, step == -w
    if w == 1:  # a single column: horizontal steps do not exist, vertical ones are +-1
        right = left = torch.zeros_like(step, dtype=torch.bool)
    if not bool((right | left | down | up).all()):
        raise ValueError(f"'{topo.name}' is marked as a grid but has non-neighbour edges")
    masks = {
        "top_left": right | down,
        "top_right": left | down,
        "bottom_left": right | up,
        "bottom_right": left | up,
    }
    return [
        topo.subgraph_edges(torch.nonzero(masks[c]).flatten(), f"{topo.name}/{c}")
        for c in GRID_CORNERS
    ]


def bfs_depth(topo: Topology, roots: Tensor | None = None) -> Tensor:
    """BFS depth of every node on the undirected view of ``topo``.

    One BFS per connected component, started from ``roots`` where given (one node id per graph of
    the batch) and otherwise from the smallest node id of the component. Vectorised over all
    components (:func:`chimera.topology.structure.bfs_depth_fast`); the sequential
    :func:`bfs_depth_reference` is its test oracle.
    """
    from chimera.topology.structure import bfs_depth_fast

    return bfs_depth_fast(topo.edge_index, topo.num_nodes, roots, batch=topo.batch).to(
        topo.device)


def bfs_depth_reference(topo: Topology, roots: Tensor | None = None) -> Tensor:
    """The sequential BFS behind :func:`bfs_depth` (the test oracle)."""
    n = topo.num_nodes
    nbrs: list[list[int]] = [[] for _ in range(n)]
    for s, d in zip(topo.src.cpu().tolist(), topo.dst.cpu().tolist(), strict=True):
        nbrs[s].append(d)
        nbrs[d].append(s)
    depth = [-1] * n
    starts = [] if roots is None else [int(r) for r in torch.as_tensor(roots).flatten()]
    if any(r < 0 or r >= n for r in starts):
        raise ValueError(f"BFS roots must be node ids in [0, {n})")
    for start in starts + list(range(n)):
        if depth[start] >= 0:
            continue
        depth[start] = 0
        queue = deque([start])
        while queue:
            u = queue.popleft()
            for v in nbrs[u]:
                if depth[v] < 0:
                    depth[v] = depth[u] + 1
                    queue.append(v)
    return torch.tensor(depth, dtype=torch.long, device=topo.device)


def bfs_dags(topo: Topology, roots: Tensor | None = None,
             depth: Tensor | None = None) -> list[Topology]:
    """The downward and upward BFS-depth DAGs of a general graph (see module docstring).

    ``depth`` takes BFS depths computed beforehand (e.g. once per dataset by
    ``tasks.graph.transforms.ChimeraStructure``) instead of running the BFS here.
    """
    if depth is None:
        depth = bfs_depth(topo, roots)
    else:
        depth = torch.as_tensor(depth, device=topo.device).long()
        if depth.shape != (topo.num_nodes,):
            raise ValueError(
                f"depth must have one entry per node ({topo.num_nodes}), got {tuple(depth.shape)}")
    ds, dd = depth[topo.src], depth[topo.dst]
    down = torch.nonzero(ds < dd).flatten()
    up = torch.nonzero(ds > dd).flatten()
    return [
        topo.subgraph_edges(down, f"{topo.name}/bfs_down"),
        topo.subgraph_edges(up, f"{topo.name}/bfs_up"),
    ]


def canonical_dags(topo: Topology) -> list[Topology]:
    if topo.kind == "graph" and topo.num_edges == 0:
        # a batch of edgeless graphs is trivially a DAG, but to a general-graph mixer it is the
        # degenerate BFS pair (two empty DAGs), like every other undirected graph
        return bfs_dags(topo)
    if topo.is_dag:
        return [topo]
    if topo.kind == "line":
        return line_dags(topo)
    if topo.kind == "grid":
        return grid_dags(topo)
    return bfs_dags(topo)
