"""Topologies (step 1): lines, grids, graphs, and their canonical DAG decompositions."""

from chimera.topology.build import flat_grid, from_edge_index, grid, line
from chimera.topology.decompose import GRID_CORNERS, bfs_dags, bfs_depth
from chimera.topology.graph import CycleError, Topology
from chimera.topology.structure import bfs_depth_fast, component_roots, graph_diameters

__all__ = [
    "GRID_CORNERS",
    "CycleError",
    "Topology",
    "bfs_dags",
    "bfs_depth",
    "bfs_depth_fast",
    "component_roots",
    "flat_grid",
    "from_edge_index",
    "graph_diameters",
    "grid",
    "line",
]
