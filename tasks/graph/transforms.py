"""PyG transforms for the graph tasks: per-graph structure for Chimera, and input checks.

:class:`ChimeraStructure` computes, once per dataset, what a Chimera layer would otherwise
recompute in every forward pass: the BFS depth of every node (which fixes the two BFS-level DAGs
of the decomposition, :func:`chimera.topology.bfs_dags`) and every graph's diameter (which fixes
``K = dia / factor`` of the finite-sum approximation). Used as ``pre_transform`` its results are
stored with the processed data (PyG caches ``pre_transform`` outputs); PyG's batching then
concatenates ``bfs_depth`` per node and ``diameter`` per graph, and
:class:`chimera.models.graph.GraphModel` reads both from the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from chimera.topology.structure import bfs_depth_fast, graph_diameters


def graph_structure(edge_index: Tensor, num_nodes: int,
                    batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(bfs_depth (num_nodes,), diameter (num_graphs,))`` for one graph or a whole batch.

    Vectorised over all graphs at once (:mod:`chimera.topology.structure`), so a dataset is
    best processed as one big disjoint union (see :func:`structure_for_graphs`).
    """
    return (bfs_depth_fast(edge_index, num_nodes, batch=batch),
            graph_diameters(edge_index, num_nodes, batch))


def structure_for_graphs(edge_indices: list[Tensor], num_nodes: list[int]) -> tuple[
        list[Tensor], Tensor]:
    """BFS depths and diameters of many graphs in one vectorised pass.

    Returns one ``bfs_depth`` tensor per graph and a ``(num_graphs,)`` diameter tensor.
    """
    if len(edge_indices) != len(num_nodes):
        raise ValueError("one edge_index per graph is needed")
    if not num_nodes:
        return [], torch.zeros(0, dtype=torch.long)
    counts = torch.tensor(num_nodes, dtype=torch.long)
    if bool((counts <= 0).any()):
        bad = int(torch.nonzero(counts <= 0)[0])
        raise ValueError(f"graph {bad} has no nodes")
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    ei = torch.cat([e.long() + int(o) for e, o in zip(edge_indices, offsets, strict=True)], 1) \
        if edge_indices else torch.zeros(2, 0, dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(len(num_nodes)), counts)
    depth, dia = graph_structure(ei, int(counts.sum()), batch)
    return list(torch.split(depth, num_nodes)), dia


def validate_graph(data: Data, where: str = "graph") -> Data:
    """Reject malformed graphs with a message naming ``where`` (e.g. the dataset row).

    Graphs need at least one node and a well-formed ``edge_index`` (and ``edge_attr`` rows
    matching it). Graphs without edges, single nodes, several components, self-loops and
    duplicate edges are valid: the Chimera layers handle all of them.
    """
    n = data.num_nodes
    if n is None or n <= 0:
        raise ValueError(f"{where}: a graph needs at least one node")
    ei = data.edge_index
    if ei is None or ei.dim() != 2 or ei.shape[0] != 2:
        raise ValueError(f"{where}: edge_index must have shape (2, E)")
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        raise ValueError(f"{where}: edge_index refers to nodes outside [0, {n})")
    if data.edge_attr is not None and data.edge_attr.shape[0] != ei.shape[1]:
        raise ValueError(f"{where}: edge_attr has {data.edge_attr.shape[0]} rows for "
                         f"{ei.shape[1]} edges")
    if data.x is not None and data.x.shape[0] != n:
        raise ValueError(f"{where}: x has {data.x.shape[0]} rows for {n} nodes")
    return data


class ChimeraStructure(BaseTransform):
    """Adds ``bfs_depth`` (per node) and ``diameter`` (per graph) to a graph or a batch.

    Use it as ``pre_transform`` so that it runs once per dataset and is cached with the data.
    """

    def forward(self, data: Data) -> Data:
        validate_graph(data)
        batch = getattr(data, "batch", None)
        depth, dia = graph_structure(data.edge_index, data.num_nodes, batch)
        data.bfs_depth = depth
        data.diameter = dia
        return data
