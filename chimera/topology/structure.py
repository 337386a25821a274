"""Vectorised graph structure for batches of many small graphs: BFS depths and diameters.

The per-node Python BFS loops of :meth:`Topology._bfs_diameter` and
:func:`chimera.topology.decompose.bfs_depth_reference` are the test oracles; they cost about
30 ms per 150-node molecule, which is minutes for a dataset and too slow inside a forward pass.
The functions here do the same work as a few tensor operations per BFS round over *all* graphs
of a batch at once, so they also run on a GPU:

* :func:`component_roots` — connected components by min-label propagation;
* :func:`bfs_depth_fast` — a level-synchronous multi-source BFS from one root per component;
* :func:`graph_diameters` — all-pairs reachability as bit sets (64 sources per int64 word), one
  OR-gather over in-neighbours per round; a graph's diameter is the last round in which a reach
  set of one of its nodes grew (Bellman-Ford-style rounds; the bit-parallel trick is the classic
  one for unweighted all-pairs BFS, e.g. Akiba et al. 2013).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

_WORD = 64


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(edge_index, *args, **kwargs):
        # hundreds of rounds of small gathers/scatters: on CPU, intra-op threads only add
        # synchronisation (on a loaded machine a 200-molecule batch ran 25x slower with them).
        # Imported here: chimera.ops imports chimera.topology.
        from chimera.ops.linalg import single_threaded_cpu

        with single_threaded_cpu(torch.as_tensor(edge_index).device.type == "cpu"):
            return fn(edge_index, *args, **kwargs)

    return wrapper


def _graph_ids(batch: Tensor | None, num_nodes: int, device: torch.device) -> Tensor:
    if batch is None:
        return torch.zeros(num_nodes, dtype=torch.long, device=device)
    return batch.long()


def _check(edge_index: Tensor, num_nodes: int) -> Tensor:
    ei = torch.as_tensor(edge_index).long()
    if ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(f"edge_index must have shape (2, E), got {tuple(ei.shape)}")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= num_nodes):
        raise ValueError(f"edge_index out of range for {num_nodes} nodes")
    return ei


@_single_threaded
def component_roots(edge_index: Tensor, num_nodes: int, roots: Tensor | None = None) -> Tensor:
    """``(num_nodes,)`` root of every node's connected component (undirected view).

    The root is the component's smallest node id, or the node of ``roots`` (one per graph, as
    :func:`~chimera.topology.decompose.bfs_depth` takes them) that lies in the component.
    """
    ei = _check(edge_index, num_nodes)
    device = ei.device
    src = torch.cat([ei[0], ei[1]])
    dst = torch.cat([ei[1], ei[0]])
    label = torch.arange(num_nodes, device=device)
    # min-label propagation: converges in (largest component diameter) rounds
    while True:
        new = label.scatter_reduce(0, dst, label[src], reduce="amin")
        if torch.equal(new, label):
            break
        label = new
    if roots is None:
        return label
    roots = torch.as_tensor(roots, device=device).long().flatten()
    if roots.numel() and (int(roots.min()) < 0 or int(roots.max()) >= num_nodes):
        raise ValueError(f"BFS roots must be node ids in [0, {num_nodes})")
    root_of_label = torch.arange(num_nodes, device=device)
    # the first given root of a component wins, as in the sequential BFS
    first = torch.full((num_nodes,), num_nodes, dtype=torch.long, device=device)
    order = torch.arange(roots.numel(), device=device)
    first = first.scatter_reduce(0, label[roots], order, reduce="amin")
    has = first < num_nodes
    root_of_label[has] = roots[first[has]]
    return root_of_label[label]


@_single_threaded
def bfs_depth_fast(edge_index: Tensor, num_nodes: int, roots: Tensor | None = None,
                   batch: Tensor | None = None) -> Tensor:
    """BFS depth of every node on the undirected view, one BFS per connected component.

    Same result as the sequential :func:`chimera.topology.decompose.bfs_depth_reference`:
    components are rooted at ``roots`` where given (one node per graph), else at their smallest
    node id. All components are swept at once, level by level, over the out-edges of the
    frontier only (``O(|E|)`` work in total). ``batch`` (graph id per node) lets the first node
    of every graph seed its component directly; only the remaining components (graphs in
    several pieces) need :func:`component_roots`.
    """
    ei = _check(edge_index, num_nodes)
    device = ei.device
    src = torch.cat([ei[0], ei[1]])
    dst = torch.cat([ei[1], ei[0]])
    order = torch.argsort(src, stable=True)
    nbrs = dst[order]
    starts = torch.searchsorted(src[order], torch.arange(num_nodes + 1, device=device))
    depth = torch.full((num_nodes,), -1, dtype=torch.long, device=device)

    def sweep(seeds: Tensor) -> None:
        frontier = seeds
        depth[frontier] = 0
        d = 0
        while frontier.numel():
            lo = starts[frontier]
            cnt = starts[frontier + 1] - lo
            total = int(cnt.sum())
            if total == 0:
                return
            first = torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)
            nb = nbrs[torch.repeat_interleave(lo, cnt) + torch.arange(total, device=device)
                      - first]
            nb = torch.unique(nb[depth[nb] < 0])
            d += 1
            depth[nb] = d
            frontier = nb

    if roots is not None:
        # given roots: the sequential rule (the first root of a component wins) via the labels
        root = component_roots(ei, num_nodes, roots)
        sweep(torch.nonzero(root == torch.arange(num_nodes, device=device)).flatten())
        return depth
    if batch is not None:
        gid = torch.as_tensor(batch, device=device).long()
        if gid.shape != (num_nodes,):
            raise ValueError(f"batch must have shape ({num_nodes},), got {tuple(gid.shape)}")
        seeds = torch.full((int(gid.max()) + 1,), num_nodes, dtype=torch.long, device=device)
        seeds = seeds.scatter_reduce(0, gid, torch.arange(num_nodes, device=device), "amin")
        sweep(seeds[seeds < num_nodes])  # each graph's smallest id roots its component
    left = torch.nonzero(depth < 0).flatten()
    if left.numel():
        # the other components: min-label propagation on the unvisited nodes only (ids kept in
        # order, so a local minimum is the global one)
        local = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
        local[left] = torch.arange(left.numel(), device=device)
        keep = local[ei[0]] >= 0
        root = component_roots(local[ei[:, keep]], int(left.numel()))
        sweep(left[root == torch.arange(left.numel(), device=device)])
    return depth


def _padded_in_neighbours(src: Tensor, dst: Tensor, num_nodes: int) -> Tensor:
    """``(num_nodes, max_in_degree)`` parents of every node, padded with the dummy id
    ``num_nodes``."""
    order = torch.argsort(dst, stable=True)
    s, d = src[order], dst[order]
    counts = torch.bincount(d, minlength=num_nodes)
    k = int(counts.max()) if d.numel() else 0
    col = torch.arange(d.numel(), device=src.device) - (counts.cumsum(0) - counts)[d]
    nbr = torch.full((num_nodes, k), num_nodes, dtype=torch.long, device=src.device)
    nbr[d, col] = s
    return nbr


def _chunk_diameters(ei: Tensor, gid: Tensor, pos: Tensor, num_nodes: int, num_graphs: int,
                     words: int) -> Tensor:
    """Diameters of the graphs of one chunk (nodes ``0..num_nodes-1``, graph ids ``gid``)."""
    device = ei.device
    nbr = _padded_in_neighbours(ei[0], ei[1], num_nodes)
    # reach[v] = bit set of the (local) sources with a directed path to v; row num_nodes = dummy
    reach = torch.zeros(num_nodes + 1, words, dtype=torch.long, device=device)
    one = torch.ones(num_nodes, dtype=torch.long, device=device)
    reach[torch.arange(num_nodes, device=device), pos // _WORD] = one << (pos % _WORD)
    diam = torch.zeros(num_graphs, dtype=torch.long, device=device)
    n, rnd = num_nodes, 0
    while True:
        rnd += 1
        new = reach[:n].clone()
        for k in range(nbr.shape[1]):
            new |= reach[nbr[:, k]]
        grew = (new != reach[:n]).any(1)
        if not bool(grew.any()):
            return diam
        diam[gid[grew]] = rnd
        reach[:n] = new
        # a graph none of whose reach sets grew is at its fixed point: drop its nodes (they are
        # nobody else's parents) once that frees a quarter of the work
        alive = torch.zeros(num_graphs, dtype=torch.bool, device=device)
        alive[gid[grew]] = True
        keep = alive[gid]
        kept = int(keep.sum())
        if kept < 0.75 * n:
            idx = torch.nonzero(keep).flatten()
            remap = torch.full((n + 1,), kept, dtype=torch.long, device=device)
            remap[idx] = torch.arange(kept, device=device)
            nbr = remap[nbr[idx]]
            reach = torch.cat([reach[idx], reach.new_zeros(1, words)])
            gid, n = gid[idx], kept


@_single_threaded
def graph_diameters(
    edge_index: Tensor,
    num_nodes: int,
    batch: Tensor | None = None,
    max_chunk_nodes: int = 1 << 17,
) -> Tensor:
    """``(num_graphs,)`` diameter of every graph of a batch, following edge directions.

    The diameter is the largest shortest-path distance between two nodes of one graph that are
    joined by a path (as :meth:`chimera.topology.Topology.diameter`): components and isolated
    nodes are allowed, a graph without edges has diameter 0. Graphs are processed in chunks of
    similar size (sorted by node count, so the bit sets of one chunk need few words).
    """
    ei = _check(edge_index, num_nodes)
    device = ei.device
    gid = _graph_ids(batch, num_nodes, device)
    if gid.shape != (num_nodes,):
        raise ValueError(f"batch must have shape ({num_nodes},), got {tuple(gid.shape)}")
    num_graphs = int(gid.max()) + 1 if num_nodes else 0
    counts = torch.bincount(gid, minlength=num_graphs)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    if ei.numel() and bool((gid[ei[0]] != gid[ei[1]]).any()):
        raise ValueError("an edge connects two different graphs of the batch")
    out = torch.zeros(num_graphs, dtype=torch.long, device=device)
    edge_graph = gid[ei[0]]
    # sort graphs by size and cut the sorted list into chunks of at most max_chunk_nodes nodes
    order = torch.argsort(counts, stable=True)
    sizes = counts[order].tolist()
    start = 0
    while start < num_graphs:
        stop, total = start, 0
        while stop < num_graphs and (stop == start or total + sizes[stop] <= max_chunk_nodes):
            total += sizes[stop]
            stop += 1
        graphs = order[start:stop]
        start = stop
        # nodes of the chunk, renumbered 0..total-1 graph by graph
        sel = torch.zeros(num_graphs, dtype=torch.bool, device=device)
        sel[graphs] = True
        node_mask = sel[gid]
        new_id = torch.full((num_nodes,), -1, dtype=torch.long, device=device)
        new_id[node_mask] = torch.arange(int(node_mask.sum()), device=device)
        local_graph = torch.full((num_graphs,), -1, dtype=torch.long, device=device)
        local_graph[graphs] = torch.arange(len(graphs), device=device)
        nodes = torch.nonzero(node_mask).flatten()
        cgid = local_graph[gid[nodes]]
        pos = nodes - ptr[gid[nodes]]
        cei = new_id[ei[:, sel[edge_graph]]]
        words = max(1, -(-int(counts[graphs].max()) // _WORD))
        out[graphs] = _chunk_diameters(cei, cgid, pos, int(nodes.numel()), len(graphs), words)
    return out
