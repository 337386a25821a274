"""Constructors for the topologies used in the paper: lines, grids, flattened grids, graphs."""

from __future__ import annotations

import torch
from torch import Tensor

from chimera.topology.graph import Topology


def _with_diameter(topo: Topology, diameter: int) -> Topology:
    # closed form, so that no BFS runs for the regular topologies
    topo._cache["diameter"] = torch.full((topo.num_graphs,), diameter, dtype=torch.long)
    return topo


def line(T: int, directed: bool = False, reverse: bool = False) -> Topology:
    """A line over ``T`` tokens.

    ``directed=True`` gives the causal line ``t -> t+1`` of Mamba (``reverse=True`` flips it to
    ``t+1 -> t``); otherwise the undirected line, stored as both directions, whose canonical
    decomposition is the forward and the reverse directed line.
    """
    if T <= 0:
        raise ValueError(f"a line needs at least one token, got T={T}")
    a = torch.arange(T - 1, device="cpu")
    fwd = torch.stack([a, a + 1])
    if directed:
        ei = fwd.flip(0) if reverse else fwd
        name = "line/reverse" if reverse else "line/forward"
    else:
        ei = torch.cat([fwd, fwd.flip(0)], dim=1)
        name = "line"
    return _with_diameter(Topology(ei, T, kind="line", name=name), T - 1)


def grid(H: int, W: int) -> Topology:
    """The undirected 4-neighbour ``H x W`` grid, nodes in row-major order (``r * W + c``)."""
    if H <= 0 or W <= 0:
        raise ValueError(f"a grid needs positive height and width, got {H}x{W}")
    idx = torch.arange(H * W, device="cpu").view(H, W)
    right = torch.stack([idx[:, :-1].flatten(), idx[:, 1:].flatten()])
    down = torch.stack([idx[:-1, :].flatten(), idx[1:, :].flatten()])
    ei = torch.cat([right, right.flip(0), down, down.flip(0)], dim=1)
    topo = Topology(ei, H * W, kind="grid", grid_shape=(H, W), name="grid")
    return _with_diameter(topo, H + W - 2)


def flat_grid(H: int, W: int, reverse: bool = True) -> Topology:
    """A ``H x W`` patch grid flattened in raster order into a line (Table 3's baselines).

    ``reverse=True``: forward and reverse directed lines (``flat_fwd_rev``); ``False``: the
    forward line only (``flat_fwd``).
    """
    topo = line(H * W, directed=not reverse)
    topo.name = "flat_fwd_rev" if reverse else "flat_fwd"
    return topo


def from_edge_index(
    edge_index: Tensor,
    num_nodes: int,
    edge_attr: Tensor | None = None,
    batch: Tensor | None = None,
) -> Topology:
    """An arbitrary graph (or a PyG batch of graphs of different sizes).

    ``edge_index`` follows PyG: row 0 = source, row 1 = target. Undirected graphs must list both
    directions, as PyG's ``to_undirected`` does. ``batch`` assigns nodes to graphs.
    """
    if num_nodes <= 0:
        raise ValueError(f"a graph needs at least one node, got num_nodes={num_nodes}")
    return Topology(torch.as_tensor(edge_index), int(num_nodes), batch=batch,
                    edge_attr=edge_attr, kind="graph", name="graph")
