"""Chimera: state space models beyond sequences.

The path through the library: :mod:`chimera.topology` (graphs and their DAG decompositions) ->
:mod:`chimera.norm` (edge weights and normalisation) -> :mod:`chimera.ops` (the resolvent
algorithms behind :func:`chimera.ops.mix`) -> :class:`ChimeraMixer` -> :class:`ChimeraBlock` ->
:mod:`chimera.models` (backbones).
"""

from chimera.block import ChimeraBlock, GatedMLP
from chimera.mixer import ChimeraMixer, sharing_groups
from chimera.ops import mix
from chimera.topology import Topology, flat_grid, from_edge_index, grid, line

__all__ = [
    "ChimeraBlock",
    "ChimeraMixer",
    "GatedMLP",
    "Topology",
    "flat_grid",
    "from_edge_index",
    "grid",
    "line",
    "mix",
    "sharing_groups",
]
__version__ = "0.1.0"
