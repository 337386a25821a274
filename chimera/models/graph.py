"""Chimera on graphs (paper Sec. 3.3, 4.2, App. C.3; Long Range Graph Benchmark).

Three levels, each usable on its own in any PyTorch Geometric model:

* :class:`ChimeraGraphConv` — ``conv(x, edge_index, edge_attr, batch) -> x``: Chimera's global
  operator on every graph's own topology (``exact`` resolvent, ``neumann`` finite sum with ``K``
  terms, or the BFS-DAG decomposition), edge features entering ``A`` through ``delta_e``.
* :class:`ChimeraGPSLayer` — the GraphGPS recipe (Rampášek et al. 2022) with Chimera as the
  global model: local MPNN (GCN as the paper's Table 11 says, or GatedGCN as the authors'
  configs run), pre-norm LayerNorm, FFN, dropout, no positional encodings.
* :class:`GraphModel` / :func:`build_lrgb_model` — encoders (OGB atom/bond embeddings or linear),
  8 layers of width 64, and a mean-pool MLP head (graph tasks) or a node MLP head (node tasks);
  the same builder gives the baselines (GCN, GatedGCN, GINE, GPS+Transformer), so one training
  module serves them all.

Batches are PyG batches: all nodes of all graphs on one axis, ``batch`` assigning nodes to graphs.
The resolvent is per graph (block-diagonal): no information crosses graphs.

Per-graph structure (BFS depths for the DAG decomposition, diameters for ``K``) is computed by
:mod:`chimera.topology.structure` when needed; datasets pre-compute it once
(``tasks.graph.transforms.ChimeraStructure`` stores ``bfs_depth`` and ``diameter`` on every
graph) and :func:`graph_topology` then only wraps tensors.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import GCNConv, GINEConv, GPSConv, global_mean_pool
from torch_geometric.nn.norm import LayerNorm as GraphLayerNorm

from chimera.mixer import ChimeraMixer
from chimera.topology import Topology, from_edge_index
from chimera.topology.decompose import bfs_dags

GraphMethod = Literal["exact", "neumann", "dag"]
KMode = Literal["diameter", "max_nodes"]
NormKind = Literal["layer", "graph_layer", "batch", "none"]

# OGB's categorical features (ogb.utils.features.get_atom_feature_dims / get_bond_feature_dims):
# atomic number, chirality, degree, formal charge, #H, #radical e-, hybridisation, aromatic, ring
ATOM_FEATURE_DIMS: tuple[int, ...] = (119, 5, 12, 12, 10, 6, 6, 2, 2)
# bond type, bond stereo, conjugated
BOND_FEATURE_DIMS: tuple[int, ...] = (5, 6, 2)


# --------------------------------------------------------------------------- topology and K
def graph_topology(
    edge_index: Tensor,
    num_nodes: int,
    batch: Tensor | None = None,
    edge_attr: Tensor | None = None,
    bfs_depth: Tensor | None = None,
    diameter: Tensor | None = None,
) -> Topology:
    """A :class:`~chimera.topology.Topology` for a PyG batch, with pre-computed structure.

    ``bfs_depth (num_nodes,)`` (per-graph BFS depths) fixes the DAG decomposition and
    ``diameter (num_graphs,)`` the diameters, so that neither is recomputed in the forward pass;
    both are optional (computed lazily, vectorised, when absent). Build it once per batch and
    pass it to every layer so that all layers share its cached structure.
    """
    topo = from_edge_index(edge_index, int(num_nodes), edge_attr=edge_attr, batch=batch)
    if diameter is not None:
        diameter = torch.as_tensor(diameter, device=topo.device).long().flatten()
        if diameter.shape != (topo.num_graphs,):
            raise ValueError(
                f"diameter must have one entry per graph ({topo.num_graphs}), "
                f"got shape {tuple(diameter.shape)}")
        topo._cache["diameter"] = diameter
    if bfs_depth is not None:
        dags = bfs_dags(topo, depth=bfs_depth)
        levels = bfs_dag_levels(dags[0], torch.as_tensor(bfs_depth, device=topo.device).long())
        if levels is not None:  # what Topology.levels would find by Kahn's algorithm, per DAG
            for dag, lv in zip(dags, levels, strict=True):
                dag._cache["levels"] = lv
        topo._cache["dags"] = dags
    return topo


def bfs_dag_levels(down: Topology, depth: Tensor) -> tuple[Tensor, Tensor] | None:
    """The longest-path levels of the downward and upward BFS DAGs, read off the BFS depths.

    Downward, a node's level is its depth (every edge goes one level deeper and every non-root
    has a parent one level up); upward, it is its height, the longest downward path below it,
    found in one vectorised step per depth (deepest first). ``Topology.levels`` finds the same
    by Kahn's algorithm with a step per level *and* a scan of every node and edge per step; on
    64 peptides in buckets of 4 that was about a quarter of the structure a DAG layer builds per
    batch (0.29 s; the sweep plans of ``chimera.ops.scan`` are the rest).
    None when ``depth`` is not a BFS depth of ``down``'s graph (then Kahn's algorithm runs).
    """
    src, dst = down.src, down.dst
    n = down.num_nodes
    if depth.shape != (n,) or not bool((depth[dst] - depth[src] == 1).all()):
        return None
    has_parent = torch.zeros(n, dtype=torch.bool, device=depth.device)
    has_parent[dst] = True
    if not bool(((depth == 0) | has_parent).all()) or bool((depth < 0).any()):
        return None
    height = torch.zeros_like(depth)
    if down.num_edges:
        d_src = depth[src]
        order = torch.argsort(d_src, stable=True)
        per_depth = torch.split(order, torch.bincount(d_src).tolist())
        for e in reversed(per_depth):  # deepest sources first: their children are final
            if e.numel():
                height.scatter_reduce_(0, src[e], height[dst[e]] + 1, reduce="amax")
    return depth.clone(), height


def num_terms_for(topology: Topology, mode: KMode = "diameter",
                  factor: float = 1.0) -> Tensor | int:
    """``K``, the number of Neumann terms of the finite-sum approximation (paper eq. 17).

    ``mode="diameter"`` (the paper, Sec. 4.2, and the K-ablation of its review, ``K = dia(G) /
    factor``): one ``K_g = ceil(dia(G_g) / factor)`` per graph of the batch; ``factor=1`` is
    Prop. 4.6's ``K = dia(G)``. ``mode="max_nodes"`` (the authors' release): one ``K`` for the
    whole batch, ``(largest node count in the batch) // factor``.
    """
    if factor <= 0:
        raise ValueError(f"the K factor must be positive, got {factor}")
    if mode == "diameter":
        dia = topology.diameter().to(torch.float64)
        return torch.ceil(dia / factor).long()
    if mode == "max_nodes":
        counts = topology.ptr[1:] - topology.ptr[:-1]
        return int(int(counts.max()) // factor)
    raise ValueError(f"unknown K mode {mode!r}; use 'diameter' (paper) or 'max_nodes' (release)")


@dataclass
class BucketPart:
    """One bucket of a batch: its nodes and edges in the batch, its graphs, and its own
    topology (node ids relabelled ``0..len(node_ids)-1``, graphs ``0..len(graph_ids)-1``)."""

    node_ids: Tensor
    edge_ids: Tensor
    graph_ids: Tensor
    edge_index: Tensor
    batch: Tensor
    topology: Topology


@dataclass
class GraphBuckets:
    """A batch's graphs grouped by size (:func:`bucket_graphs`), so that the dense per-graph
    blocks of the ``exact`` / ``neumann`` resolvent are padded to the largest graph of a bucket,
    not of the batch. Pass it as ``topology=`` to :class:`ChimeraGraphConv`."""

    parts: list[BucketPart]
    num_nodes: int
    num_graphs: int
    #: the whole batch's topology: the per-node and per-edge work of a layer runs on it once
    topology: Topology


#: the fixed cost of one size bucket in padded node pairs (one graph block of ``n x n`` costs
#: ``n^2``): on a CPU, 4 heads, forward + backward, a bucket's own work (its factorisation
#: steps, per-head loops and autograd nodes) took ~2 ms and a padded node pair ~70 ns
BUCKET_OVERHEAD_PAIRS = 30_000
#: buckets hold at most this many graphs under ``graphs_per_bucket="auto"``
MAX_GRAPHS_PER_BUCKET = 32


def bucket_sizes_auto(sorted_counts: list[int], overhead: float = BUCKET_OVERHEAD_PAIRS,
                      multiple: int = 8) -> list[int]:
    """Graphs per bucket, in order, for graphs sorted by node count: the partition into runs of
    consecutive graphs that minimises ``sum over buckets (overhead + graphs x n_pad^2)``, with
    ``n_pad`` the bucket's largest graph rounded up to ``multiple`` (dynamic programming over
    the split points, ``O(G x MAX_GRAPHS_PER_BUCKET)``).

    Why: a bucket costs a fixed amount besides its padded ``n^2`` work, so small graphs pay off in
    large buckets (their padding is cheap) and large ones in small buckets; on 64 peptides this
    gives 10 buckets instead of 16 fixed ones of 4 graphs (see ``results/bench_graphs``)."""
    n = len(sorted_counts)
    best = [0.0] + [math.inf] * n
    split = [0] * (n + 1)
    for hi in range(1, n + 1):
        pad = -(-max(sorted_counts[hi - 1], 1) // multiple) * multiple
        for lo in range(max(0, hi - MAX_GRAPHS_PER_BUCKET), hi):
            c = best[lo] + overhead + (hi - lo) * pad * pad
            if c < best[hi]:
                best[hi], split[hi] = c, lo
    sizes, hi = [], n
    while hi:
        sizes.append(hi - split[hi])
        hi = split[hi]
    return sizes[::-1]


def _check_graphs_per_bucket(value: object, allow_none: bool = True) -> None:
    if (value is None and allow_none) or value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        none = ", 'auto' or None" if allow_none else " or 'auto'"
        raise ValueError(f"graphs_per_bucket must be >= 1{none}, got {value!r}")


def bucket_graphs(
    edge_index: Tensor,
    batch: Tensor,
    num_graphs: int,
    graphs_per_bucket: int | Literal["auto"],
    bfs_depth: Tensor | None = None,
    diameter: Tensor | None = None,
) -> GraphBuckets:
    """Group the graphs of a PyG batch into buckets of ``graphs_per_bucket`` graphs of similar
    size (sorted by node count); ``"auto"``: bucket sizes from :func:`bucket_sizes_auto`.

    Why: the dense resolvents work on one ``n_max x n_max`` block per graph, ``n_max`` the largest
    graph of the call, at ``O(n_max^3)`` each; on Peptides (mean 152 atoms, max 444) a batch of 16
    pays about 5x the cost of unpadded blocks, 64 about 7x; buckets of 4 bring that to 1.6x / 1.2x.
    The result is the same as one call on the whole batch: every operator of the layer is per node
    or per graph. Within a bucket, graphs (and their nodes) keep their batch order, so a graph's
    first node - the root of its BFS DAGs - is unchanged.
    """
    _check_graphs_per_bucket(graphs_per_bucket, allow_none=False)
    device = batch.device
    if diameter is not None and torch.as_tensor(diameter).numel() != num_graphs:
        raise ValueError(f"diameter must have one entry per graph ({num_graphs}), got "
                         f"{torch.as_tensor(diameter).numel()}")
    counts = torch.bincount(batch, minlength=num_graphs)
    order = torch.sort(counts, stable=True).indices
    if graphs_per_bucket == "auto":
        sizes = bucket_sizes_auto(counts[order].tolist())
    else:
        sizes = [min(graphs_per_bucket, num_graphs - start)
                 for start in range(0, num_graphs, graphs_per_bucket)]
    edge_graph = batch[edge_index[0]]
    new_id = torch.empty(batch.numel(), dtype=torch.long, device=device)
    parts = []
    starts = [0, *itertools.accumulate(sizes)]
    for start, stop in itertools.pairwise(starts):
        gids = torch.sort(order[start:stop]).values
        node_ids = torch.nonzero(torch.isin(batch, gids)).flatten()
        edge_ids = torch.nonzero(torch.isin(edge_graph, gids)).flatten()
        new_id[node_ids] = torch.arange(node_ids.numel(), device=device)
        ei = new_id[edge_index[:, edge_ids]]
        b = torch.searchsorted(gids, batch[node_ids])
        topo = graph_topology(ei, node_ids.numel(), b,
                              bfs_depth=None if bfs_depth is None else bfs_depth[node_ids],
                              diameter=None if diameter is None else
                              torch.as_tensor(diameter, device=device).flatten()[gids])
        parts.append(BucketPart(node_ids, edge_ids, gids, ei, b, topo))
    whole = graph_topology(edge_index, int(batch.numel()), batch, bfs_depth=bfs_depth,
                           diameter=diameter)
    return GraphBuckets(parts, int(batch.numel()), int(num_graphs), whole)


# --------------------------------------------------------------------------- Chimera layer
class ChimeraGraphConv(nn.Module):
    """Chimera's global operator on each graph's own topology, as a PyG-style layer.

    ``forward(x, edge_index, edge_attr=None, batch=None) -> x`` with ``x (num_nodes, channels)``.
    Inside it is a :class:`~chimera.ChimeraMixer` with the general-graph local convolution;
    ``method`` picks how ``L = (I - A)^-1`` is obtained:

    * ``"exact"`` (paper Table 4): the row-normalised adjacency (Sec. 3.3) and a dense solve per
      graph;
    * ``"neumann"`` (Table 5): ``sum_{k<=K} A^k`` by squaring with ``K`` per graph from
      :func:`num_terms_for` (``k_mode``, ``k_factor``), or a fixed ``num_terms``;
    * ``"dag"`` (Sec. 4.1): the two BFS-depth DAGs of every graph (downward and upward), each with
      the DAG normalisation (eq. 16), summed; ``dag_method`` is the algorithm of
      :func:`chimera.ops.mix` per DAG (``"auto"``: the rows of ``L`` by the level-set recurrence
      and a dense SMA per graph (``"exact"``) while the call's largest *graph* has at most
      ``dense_max_nodes`` nodes (default 1024), the linear-time state recurrence
      (``"dag_scan"``) beyond. The rows cost ``O(|E| n_max)`` per head, so a batch of many small
      graphs stays on them whatever its total size: on 64 peptides (10,507 atoms, state 80,
      4 heads) they take about a fifth of the state scan's time, which holds ``N x P`` states
      for every atom).

    Size buckets: on a batch of several graphs, the operator runs on buckets of graphs of
    similar size (:func:`bucket_graphs`; same values and gradients, far less padding of the
    per-graph dense blocks, and on DAGs fewer levels swept at once than the deepest graph of the
    whole batch needs): ``graphs_per_bucket="auto"`` (default) sizes them by a cost model
    (:func:`bucket_sizes_auto`: many small graphs per bucket, few large ones), an int fixes the
    count, ``None`` = one call on the whole batch. :meth:`structure` builds the buckets (or the
    plain topology) once for several layers; ``forward`` builds them itself when given no
    ``topology``.

    Edge features (``edge_dim``) give a per-edge selectivity ``delta_e`` that enters ``A_ij``
    as ``(delta_i + delta_j + delta_e) / 3`` (the review's answer on edge features).

    In your own PyG model::

        self.conv = ChimeraGraphConv(64, heads=4, d_state=64, edge_dim=64, method="neumann",
                                     k_factor=2)            # K_g = ceil(dia(G_g) / 2)
        h = h + self.conv(self.norm(h), data.edge_index, e, data.batch)

    Several layers over one batch share its structure through ``topology=graph_topology(...)``.

    Args:
        channels: node feature width ``D`` (= the mixer's ``d_model``).
        heads: number of heads; ``headdim = expand * channels / heads``.
        d_state: state size ``N`` (Table 11: 96 / 80 / 64 / 64).
        expand: ``d_inner = expand * channels``.
        edge_dim: width of ``edge_attr`` (``None``: no edge features).
        num_terms: a fixed ``K`` for ``neumann`` (overrides ``k_mode``).
        graphs_per_bucket: graphs per size bucket when ``forward`` gets no ``topology``:
            ``"auto"`` (by :func:`bucket_sizes_auto`), an int, or ``None`` (the whole batch in
            one call).
        **mixer_kwargs: further :class:`~chimera.ChimeraMixer` options (``gamma``,
            ``edge_selectivity``, ``dag_norm``, ``dag_sum``, ``sharing``, ``dt_min``, ...).
    """

    def __init__(
        self,
        channels: int,
        *,
        heads: int = 2,
        d_state: int = 64,
        expand: float = 2.0,
        edge_dim: int | None = None,
        method: GraphMethod = "exact",
        num_terms: int | None = None,
        k_mode: KMode = "diameter",
        k_factor: float = 1.0,
        dag_method: str = "auto",
        graphs_per_bucket: int | Literal["auto"] | None = "auto",
        **mixer_kwargs,
    ) -> None:
        super().__init__()
        _check_graphs_per_bucket(graphs_per_bucket)
        if method not in ("exact", "neumann", "dag"):
            raise ValueError(f"unknown method {method!r}; use 'exact', 'neumann' or 'dag'")
        if k_mode not in ("diameter", "max_nodes"):
            raise ValueError(f"unknown k_mode {k_mode!r}; use 'diameter' or 'max_nodes'")
        if k_factor <= 0:
            raise ValueError(f"k_factor must be positive, got {k_factor}")
        if num_terms is not None and num_terms < 0:
            raise ValueError(f"num_terms must be >= 0, got {num_terms}")
        d_inner = int(expand * channels)
        if heads <= 0 or d_inner % heads:
            raise ValueError(f"d_inner = expand * channels = {d_inner} is not divisible by "
                             f"heads = {heads}")
        self.channels, self.heads, self.method = channels, heads, method
        self.num_terms, self.k_mode, self.k_factor = num_terms, k_mode, k_factor
        self.graphs_per_bucket, self.dag_method = graphs_per_bucket, dag_method
        if method == "dag":
            kw = dict(resolvent="dag", method=dag_method)
        else:
            kw = dict(resolvent="general", method=method)
        self.mixer = ChimeraMixer(
            channels, conv="graph", d_state=d_state, headdim=d_inner // heads, expand=expand,
            edge_dim=edge_dim, **kw, **mixer_kwargs)

    def extra_repr(self) -> str:
        k = f", num_terms={self.num_terms}" if self.num_terms is not None else (
            f", k_mode={self.k_mode}, k_factor={self.k_factor}" if self.method == "neumann" else "")
        return f"{self.channels}, heads={self.heads}, method={self.method}{k}"

    def structure(
        self,
        edge_index: Tensor,
        batch: Tensor | None,
        num_nodes: int,
        num_graphs: int | None = None,
        *,
        bfs_depth: Tensor | None = None,
        diameter: Tensor | None = None,
        graphs_per_bucket: int | Literal["auto", "layer"] | None = "layer",
    ) -> Topology | GraphBuckets:
        """The batch's structure for ``forward(..., topology=)``: size buckets
        (:func:`bucket_graphs`) when the batch has more than ``graphs_per_bucket`` graphs (default:
        this layer's), else one :func:`graph_topology`. Build it once per batch and pass it to
        every layer, which then share its cached DAGs, sweep plans, layouts and diameters."""
        per = self.graphs_per_bucket if graphs_per_bucket == "layer" else graphs_per_bucket
        if batch is None:
            batch = torch.zeros(int(num_nodes), dtype=torch.long, device=edge_index.device)
        if num_graphs is None:
            num_graphs = int(batch.max()) + 1 if batch.numel() else 1
        if per is not None and num_graphs > (1 if per == "auto" else per):
            return bucket_graphs(edge_index, batch, num_graphs, per, bfs_depth=bfs_depth,
                                 diameter=diameter)
        return graph_topology(edge_index, int(num_nodes), batch, bfs_depth=bfs_depth,
                              diameter=diameter)

    def _dag_method_for(self, topology: Topology) -> str:
        """``dag_method="auto"`` per call: the rows of ``L`` while the largest graph of the call
        is at most the mixer's ``dense_max_nodes``, the state scan beyond (see the class)."""
        if self.dag_method != "auto":
            return self.dag_method
        n_max = topology._cached("max_graph_nodes",
                                 lambda: int((topology.ptr[1:] - topology.ptr[:-1]).max()))
        return "exact" if n_max <= self.mixer.dense_max_nodes else "dag_scan"

    def num_terms_for(self, topology: Topology) -> Tensor | int | None:
        """The ``K`` this layer uses on ``topology`` (``None`` unless ``method="neumann"``)."""
        if self.method != "neumann":
            return None
        if self.num_terms is not None:
            return self.num_terms
        return num_terms_for(topology, self.k_mode, self.k_factor)

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor | None = None,
        batch: Tensor | None = None,
        *,
        topology: Topology | None = None,
        bfs_depth: Tensor | None = None,
        diameter: Tensor | None = None,
        num_terms: Tensor | int | None = None,
    ) -> Tensor:
        """``x (num_nodes, channels)`` -> ``(num_nodes, channels)``.

        ``topology`` (from :func:`graph_topology`) shares structure across layers;
        otherwise one is built from ``edge_index`` / ``batch`` (and the optional pre-computed
        ``bfs_depth`` / ``diameter``). ``num_terms`` overrides ``K`` for this call.
        """
        if x.dim() != 2 or x.shape[-1] != self.channels:
            raise ValueError(f"x must be (num_nodes, {self.channels}), got {tuple(x.shape)}")
        if topology is None:
            topology = self.structure(edge_index, batch, x.shape[0], bfs_depth=bfs_depth,
                                      diameter=diameter)
        if isinstance(topology, GraphBuckets):
            return self._forward_buckets(x, edge_attr, topology, num_terms)
        if topology.num_nodes != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} nodes, the topology {topology.num_nodes}")
        K = self.num_terms_for(topology) if num_terms is None else num_terms
        method = self._dag_method_for(topology) if self.method == "dag" else None
        y = self.mixer(x.unsqueeze(0), topology, self._edge_features(edge_attr), method=method,
                       num_terms=K)
        return y.squeeze(0)

    def _edge_features(self, edge_attr: Tensor | None) -> Tensor | None:
        """``edge_attr`` as ``(E, F)`` for the mixer, or None when this layer was built without
        edge features."""
        if self.mixer.edge_proj is None:
            return None
        if edge_attr is not None and edge_attr.dim() == 1:
            return edge_attr.unsqueeze(-1)
        return edge_attr

    def _forward_buckets(self, x: Tensor, edge_attr: Tensor | None, buckets: GraphBuckets,
                         num_terms: Tensor | int | None) -> Tensor:
        if buckets.num_nodes != x.shape[0]:
            raise ValueError(f"x has {x.shape[0]} nodes, the buckets {buckets.num_nodes}")
        if (num_terms is None and self.method == "neumann" and self.num_terms is None
                and self.k_mode == "max_nodes"):
            # the release's K is the whole batch's (its largest graph), not each bucket's
            n_max = max(int((q.topology.ptr[1:] - q.topology.ptr[:-1]).max())
                        for q in buckets.parts)
            num_terms = int(n_max // self.k_factor)
        Ks: list[Tensor | int | None] = []
        for part in buckets.parts:
            K = num_terms
            if isinstance(K, Tensor) and K.dim() == 1:  # one K per graph of the whole batch
                K = K[part.graph_ids]
            Ks.append(self.num_terms_for(part.topology) if K is None else K)
        methods = [self._dag_method_for(part.topology) if self.method == "dag" else None
                   for part in buckets.parts]
        y = self.mixer.forward_buckets(
            x.unsqueeze(0), buckets.topology,
            [(part.node_ids, part.edge_ids, part.topology) for part in buckets.parts],
            self._edge_features(edge_attr), methods=methods, num_terms=Ks)
        return y.squeeze(0)


# --------------------------------------------------------------------------- local MPNNs
class GatedGCNConv(nn.Module):
    """Residual gated graph convolution with edge features (GatedGCN).

    Bresson & Laurent, "Residual Gated Graph ConvNets" (2017), in the form of Dwivedi et al.'s
    benchmark and GraphGPS (Rampášek et al. 2022), which PyG's ``ResGatedGraphConv`` lacks: for an
    edge ``j -> i`` with feature ``e_ij``,

    ``ê_ij = D h_i + E h_j + C e_ij``, ``σ_ij = sigmoid(ê_ij)``,
    ``ĥ_i = A h_i + Σ_j σ_ij ⊙ B h_j / (Σ_j σ_ij + 1e-6)``,

    then batch norm, ReLU and dropout on both ``ĥ`` and ``ê``, and residuals ``h + ĥ``,
    ``e + ê``. Returns the new node *and* edge features.
    """

    def __init__(self, channels: int, *, dropout: float = 0.0, batch_norm: bool = True,
                 residual: bool = True) -> None:
        super().__init__()
        self.A, self.B, self.C, self.D, self.E = (nn.Linear(channels, channels) for _ in range(5))
        self.bn_x = nn.BatchNorm1d(channels) if batch_norm else nn.Identity()
        self.bn_e = nn.BatchNorm1d(channels) if batch_norm else nn.Identity()
        self.dropout, self.residual = dropout, residual

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        if edge_attr is None or edge_attr.shape[0] != edge_index.shape[1]:
            raise ValueError("GatedGCNConv needs one edge feature row per edge")
        src, dst = edge_index[0], edge_index[1]
        e_hat = self.D(x)[dst] + self.E(x)[src] + self.C(edge_attr)
        sigma = torch.sigmoid(e_hat)
        num = torch.zeros_like(x).index_add(0, dst, sigma * self.B(x)[src])
        den = torch.zeros_like(x).index_add(0, dst, sigma)
        h = self.A(x) + num / (den + 1e-6)
        h = F.dropout(F.relu(self.bn_x(h)), self.dropout, self.training)
        e = F.dropout(F.relu(self.bn_e(e_hat)), self.dropout, self.training)
        if self.residual:
            h, e = x + h, edge_attr + e
        return h, e


def _norm(kind: NormKind, dim: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim)
    if kind == "graph_layer":  # PyG's per-graph LayerNorm (the authors' configs)
        return GraphLayerNorm(dim, mode="graph")
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use 'layer', 'graph_layer', 'batch' or 'none'")


def _apply_norm(norm: nn.Module, x: Tensor, batch: Tensor | None) -> Tensor:
    return norm(x, batch) if isinstance(norm, GraphLayerNorm) else norm(x)


def _gine(channels: int) -> GINEConv:
    mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))
    return GINEConv(mlp, edge_dim=channels)


class ChimeraGPSLayer(nn.Module):
    """A GraphGPS layer (Rampášek et al. 2022) with Chimera as the global model (paper C.3).

    Pre-norm residual branches on node features ``h`` (and edge features ``e``):

    * local MPNN: ``"gcn"`` (Table 11), ``"gatedgcn"`` (the authors' configs; also updates
      ``e``), ``"gine"`` or ``"none"``;
    * global: :class:`ChimeraGraphConv` (or ``"none"``), its edge selectivity read from the
      current ``e``;
    * FFN ``Linear(D, ffn_ratio D) -> act -> dropout -> Linear -> dropout``.

    ``composition="sequential"`` runs local then global (the authors' ``is_block_composed``);
    ``"parallel"`` sums both branches computed from the same input (GraphGPS). No positional
    encodings.
    """

    def __init__(
        self,
        channels: int,
        *,
        local: Literal["gcn", "gatedgcn", "gine", "none"] = "gcn",
        global_model: Literal["chimera", "none"] = "chimera",
        dropout: float = 0.0,
        norm: NormKind = "layer",
        ffn_ratio: float = 2.0,
        act: Literal["relu", "gelu"] = "relu",
        composition: Literal["sequential", "parallel"] = "sequential",
        **chimera_kwargs,
    ) -> None:
        super().__init__()
        if local not in ("gcn", "gatedgcn", "gine", "none"):
            raise ValueError(f"unknown local MPNN {local!r}; use gcn, gatedgcn, gine or none")
        if global_model not in ("chimera", "none"):
            raise ValueError(f"unknown global model {global_model!r}; use 'chimera' or 'none'")
        if composition not in ("sequential", "parallel"):
            raise ValueError(f"unknown composition {composition!r}")
        if act not in ("relu", "gelu"):
            raise ValueError(f"unknown activation {act!r}")
        self.local_kind, self.global_kind, self.composition = local, global_model, composition
        self.dropout = dropout
        self.local = None
        if local == "gcn":
            self.local = GCNConv(channels, channels)
        elif local == "gatedgcn":
            # its own BN/ReLU/dropout as in GraphGPS; the residual is this layer's
            self.local = GatedGCNConv(channels, dropout=dropout, residual=False)
        elif local == "gine":
            self.local = _gine(channels)
        self.norm_local = _norm(norm, channels) if self.local is not None else None
        self.chimera = None
        if global_model == "chimera":
            self.chimera = ChimeraGraphConv(channels, **chimera_kwargs)
            self.norm_global = _norm(norm, channels)
        hidden = int(ffn_ratio * channels)
        self.ffn = None
        if hidden > 0:
            self.norm_ffn = _norm(norm, channels)
            self.ffn = nn.Sequential(
                nn.Linear(channels, hidden), nn.ReLU() if act == "relu" else nn.GELU(),
                nn.Dropout(dropout), nn.Linear(hidden, channels), nn.Dropout(dropout))

    def _local(self, h: Tensor, edge_index: Tensor, e: Tensor | None, batch: Tensor | None):
        hn = _apply_norm(self.norm_local, h, batch)
        if self.local_kind == "gatedgcn":
            out, e_new = self.local(hn, edge_index, e)
            return out, e + e_new
        if self.local_kind == "gine":
            if e is None:
                raise ValueError("a GINE local MPNN needs edge features")
            out = self.local(hn, edge_index, e)
        else:
            out = self.local(hn, edge_index)
        return F.dropout(out, self.dropout, self.training), e

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor | None = None,
        batch: Tensor | None = None,
        *,
        topology: Topology | None = None,
        num_terms: Tensor | int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Returns the new node features and the (possibly updated) edge features."""
        h, e = x, edge_attr
        if self.composition == "sequential":
            if self.local is not None:
                out, e = self._local(h, edge_index, e, batch)
                h = h + out
            if self.chimera is not None:
                hn = _apply_norm(self.norm_global, h, batch)
                out = self.chimera(hn, edge_index, e, batch, topology=topology,
                                   num_terms=num_terms)
                h = h + F.dropout(out, self.dropout, self.training)
        else:
            total = h
            if self.local is not None:
                out, e = self._local(h, edge_index, e, batch)
                total = total + out
            if self.chimera is not None:
                hn = _apply_norm(self.norm_global, h, batch)
                out = self.chimera(hn, edge_index, edge_attr, batch, topology=topology,
                                   num_terms=num_terms)
                total = total + F.dropout(out, self.dropout, self.training)
            h = total
        if self.ffn is not None:
            h = h + self.ffn(_apply_norm(self.norm_ffn, h, batch))
        return h, e


class MPNNLayer(nn.Module):
    """A baseline message-passing layer as in GraphGPS's MPNN stacks: ``conv -> BN -> ReLU ->
    dropout -> residual`` (GatedGCN carries this inside and also updates edge features)."""

    def __init__(self, channels: int, kind: Literal["gcn", "gatedgcn", "gine"],
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.kind, self.dropout = kind, dropout
        if kind == "gatedgcn":
            self.conv = GatedGCNConv(channels, dropout=dropout)
        elif kind == "gcn":
            self.conv = GCNConv(channels, channels)
        elif kind == "gine":
            self.conv = _gine(channels)
        else:
            raise ValueError(f"unknown MPNN {kind!r}; use gcn, gatedgcn or gine")
        self.bn = nn.BatchNorm1d(channels) if kind != "gatedgcn" else None

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None,
                batch: Tensor | None = None, **_) -> tuple[Tensor, Tensor | None]:
        if self.kind == "gatedgcn":
            return self.conv(x, edge_index, edge_attr)
        h = self.conv(x, edge_index, edge_attr) if self.kind == "gine" else self.conv(
            x, edge_index)
        h = F.dropout(F.relu(self.bn(h)), self.dropout, self.training)
        return x + h, edge_attr


class GPSTransformerLayer(nn.Module):
    """The GraphGPS baseline: PyG's :class:`~torch_geometric.nn.GPSConv` with a GINE local MPNN
    and multi-head attention over each graph's nodes (no positional encodings)."""

    def __init__(self, channels: int, heads: int = 4, dropout: float = 0.0,
                 attn_dropout: float = 0.0) -> None:
        super().__init__()
        self.conv = GPSConv(channels, _gine(channels), heads=heads, dropout=dropout,
                            attn_kwargs={"dropout": attn_dropout})

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None,
                batch: Tensor | None = None, **_) -> tuple[Tensor, Tensor | None]:
        return self.conv(x, edge_index, batch, edge_attr=edge_attr), edge_attr


# --------------------------------------------------------------------------- encoders, heads
class CategoricalEncoder(nn.Module):
    """Sum of one embedding per categorical column (OGB's AtomEncoder / BondEncoder)."""

    def __init__(self, dims: tuple[int, ...], channels: int, what: str = "feature") -> None:
        super().__init__()
        self.dims, self.what = tuple(dims), what
        self.embeddings = nn.ModuleList(nn.Embedding(d, channels) for d in dims)
        for emb in self.embeddings:
            nn.init.xavier_uniform_(emb.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if x.shape[-1] != len(self.dims) or x.dtype.is_floating_point:
            raise ValueError(
                f"{self.what} features must be integer codes with {len(self.dims)} columns "
                f"(OGB's featurisation), got {tuple(x.shape)} {x.dtype}")
        if x.numel():
            hi = torch.tensor(self.dims, device=x.device)
            if bool((x < 0).any()) or bool((x >= hi).any()):
                raise ValueError(f"{self.what} feature codes out of range; sizes are {self.dims}")
        out = 0
        for i, emb in enumerate(self.embeddings):
            out = out + emb(x[:, i])
        return out


class LinearEncoder(nn.Module):
    """``Linear(in_dim, channels)`` on float features (PascalVOC-SP / COCO-SP)."""

    def __init__(self, in_dim: int, channels: int, what: str = "feature") -> None:
        super().__init__()
        self.in_dim, self.what = in_dim, what
        self.lin = nn.Linear(in_dim, channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            x = x.unsqueeze(-1)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"{self.what} features must have {self.in_dim} columns, "
                             f"got {tuple(x.shape)}")
        return self.lin(x.float())


def _mlp(channels: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for _ in range(layers - 1):
        mods += [nn.Linear(channels, channels), nn.ReLU()]
    mods.append(nn.Linear(channels, out_dim))
    return nn.Sequential(*mods)


LayerType = Literal["chimera", "gcn", "gatedgcn", "gine", "gps"]
LAYER_TYPES: tuple[str, ...] = ("chimera", "gcn", "gatedgcn", "gine", "gps")


class GraphModel(nn.Module):
    """Encoder -> ``num_layers`` layers -> head, for graph- or node-level tasks.

    Args:
        out_dim: outputs per graph (``task_level="graph"``, mean pooling) or per node.
        layer: ``"chimera"`` (:class:`ChimeraGPSLayer`), or a baseline: ``"gcn"``,
            ``"gatedgcn"``, ``"gine"`` (:class:`MPNNLayer` stacks) or ``"gps"``
            (:class:`GPSTransformerLayer`).
        node_encoder: ``"atom"`` (OGB's 9 categorical atom features) or ``"linear"``
            (``node_in_dim`` floats); edge_encoder: ``"bond"``, ``"linear"`` (``edge_in_dim``)
            or ``None`` (no edge features).
        head_layers: number of linear layers of the MLP head.
        graphs_per_bucket: Chimera (every method): run the global operator on buckets of
            graphs of similar size (:func:`bucket_graphs`; same result, far less padding, and on
            DAGs shallower level sweeps): ``"auto"`` sizes them by a cost model, an int fixes
            the count, ``None`` = the whole batch in one call.
        heads: attention / Chimera heads; **layer_kwargs: forwarded to the layers
            (:class:`ChimeraGPSLayer`: ``local``, ``norm``, ``d_state``, ``method``, ``k_mode``,
            ``k_factor``, ``expand``, ...).

    ``forward(data)`` takes a PyG ``Batch`` with ``x``, ``edge_index``, optional ``edge_attr``,
    ``batch`` and, when present, the pre-computed ``bfs_depth`` / ``diameter``.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        task_level: Literal["graph", "node"] = "graph",
        layer: LayerType = "chimera",
        hidden: int = 64,
        num_layers: int = 8,
        node_encoder: Literal["atom", "linear"] = "atom",
        node_in_dim: int | None = None,
        edge_encoder: Literal["bond", "linear"] | None = "bond",
        edge_in_dim: int | None = None,
        dropout: float = 0.0,
        heads: int = 2,
        head_layers: int = 3,
        graphs_per_bucket: int | Literal["auto"] | None = "auto",
        **layer_kwargs,
    ) -> None:
        super().__init__()
        _check_graphs_per_bucket(graphs_per_bucket)
        self.graphs_per_bucket = graphs_per_bucket
        if task_level not in ("graph", "node"):
            raise ValueError(f"task_level must be 'graph' or 'node', got {task_level!r}")
        if layer not in LAYER_TYPES:
            raise ValueError(f"unknown layer {layer!r}; choose one of {LAYER_TYPES}")
        if head_layers < 1 or num_layers < 1:
            raise ValueError("num_layers and head_layers must be >= 1")
        self.task_level, self.layer_type = task_level, layer
        if node_encoder == "atom":
            self.node_encoder = CategoricalEncoder(ATOM_FEATURE_DIMS, hidden, "atom")
        elif node_encoder == "linear":
            if node_in_dim is None:
                raise ValueError("node_encoder='linear' needs node_in_dim")
            self.node_encoder = LinearEncoder(node_in_dim, hidden, "node")
        else:
            raise ValueError(f"unknown node encoder {node_encoder!r}; use 'atom' or 'linear'")
        if edge_encoder == "bond":
            self.edge_encoder = CategoricalEncoder(BOND_FEATURE_DIMS, hidden, "bond")
        elif edge_encoder == "linear":
            if edge_in_dim is None:
                raise ValueError("edge_encoder='linear' needs edge_in_dim")
            self.edge_encoder = LinearEncoder(edge_in_dim, hidden, "edge")
        elif edge_encoder is None:
            self.edge_encoder = None
        else:
            raise ValueError(f"unknown edge encoder {edge_encoder!r}; use 'bond', 'linear' or None")
        if layer in ("gatedgcn", "gine", "gps") and self.edge_encoder is None:
            raise ValueError(f"layer {layer!r} needs edge features (set edge_encoder)")
        edge_dim = hidden if self.edge_encoder is not None else None
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            if layer == "chimera":
                layers.append(ChimeraGPSLayer(hidden, dropout=dropout, heads=heads,
                                              edge_dim=edge_dim, **layer_kwargs))
            elif layer == "gps":
                layers.append(GPSTransformerLayer(hidden, heads=heads, dropout=dropout,
                                                  **layer_kwargs))
            else:
                layers.append(MPNNLayer(hidden, layer, dropout=dropout, **layer_kwargs))
        self.layers = nn.ModuleList(layers)
        self.head = _mlp(hidden, out_dim, head_layers)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters the mixer marks ``_no_weight_decay`` (``dt_bias``, ``A_log``,
        ``D``): decaying them would pull the selectivity towards a fixed value, so optimizer
        builders (``tasks.core.optim``, timm) leave them out of weight decay."""
        return {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}

    def forward(self, data) -> Tensor:
        x, edge_index = data.x, data.edge_index
        batch = getattr(data, "batch", None)
        if batch is None:
            batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        edge_attr = getattr(data, "edge_attr", None)
        h = self.node_encoder(x)
        e = None
        if self.edge_encoder is not None:
            if edge_attr is None:
                raise ValueError("this model encodes edge features but the batch has no edge_attr")
            e = self.edge_encoder(edge_attr)
        topology, K = None, None
        if self.layer_type == "chimera":
            num_graphs = getattr(data, "num_graphs", None) or int(batch.max()) + 1
            conv = self.layers[0].chimera
            # built once per batch: every layer shares its cached DAGs / diameters / layouts
            kw = dict(bfs_depth=getattr(data, "bfs_depth", None),
                      diameter=getattr(data, "diameter", None))
            if conv is None:
                topology = graph_topology(edge_index, h.shape[0], batch, **kw)
            else:
                topology = conv.structure(edge_index, batch, h.shape[0], num_graphs,
                                          graphs_per_bucket=self.graphs_per_bucket, **kw)
            if conv is not None and not isinstance(topology, GraphBuckets):
                K = conv.num_terms_for(topology)
            # buckets: each computes its graphs' own K (k_mode="diameter": the same values);
            # k_mode="max_nodes" takes the whole batch's largest graph (_forward_buckets)
        for layer in self.layers:
            h, e = layer(h, edge_index, e, batch, topology=topology, num_terms=K)
        if self.task_level == "graph":
            num_graphs = getattr(data, "num_graphs", None) or int(batch.max()) + 1
            h = global_mean_pool(h, batch, size=num_graphs)
        return self.head(h)


# --------------------------------------------------------------------------- LRGB settings
#: Per-dataset settings of the paper's Table 11 (heads / state size / dropout) and the data's
#: shape. ``out_dim``: 10 multi-label classes (func), 11 regression targets (struct), 21 / 81
#: node classes (PascalVOC-SP / COCO-SP).
LRGB_SETTINGS: dict[str, dict] = {
    "peptides-func": dict(out_dim=10, task_level="graph", node_encoder="atom",
                          edge_encoder="bond", heads=2, d_state=96, dropout=0.1),
    "peptides-struct": dict(out_dim=11, task_level="graph", node_encoder="atom",
                            edge_encoder="bond", heads=4, d_state=80, dropout=0.1),
    "pascalvoc-sp": dict(out_dim=21, task_level="node", node_encoder="linear", node_in_dim=14,
                         edge_encoder="linear", edge_in_dim=2, heads=4, d_state=64,
                         dropout=0.05),
    "coco-sp": dict(out_dim=81, task_level="node", node_encoder="linear", node_in_dim=14,
                    edge_encoder="linear", edge_in_dim=2, heads=4, d_state=64, dropout=0.05),
}


def build_lrgb_model(dataset: str, layer: LayerType = "chimera", **overrides) -> GraphModel:
    """A model for an LRGB dataset at the paper's Table 11 settings (8 layers, width 64).

    ``layer="chimera"``: :class:`ChimeraGPSLayer` with a GCN local MPNN, LayerNorm, FFN 2x,
    ``method="exact"``; pass ``local="gatedgcn"``, ``method="neumann"``/``"dag"``,
    ``k_factor`` etc. as ``overrides``. Baselines (``"gcn"``, ``"gatedgcn"``, ``"gine"``,
    ``"gps"``) share the encoders, width, depth and head; they ignore ``d_state``.
    """
    key = dataset.lower()
    if key not in LRGB_SETTINGS:
        raise ValueError(f"unknown LRGB dataset {dataset!r}; choose one of {list(LRGB_SETTINGS)}")
    cfg = dict(LRGB_SETTINGS[key], hidden=64, num_layers=8, layer=layer)
    if layer == "chimera":
        cfg.update(local="gcn", norm="layer", method="exact")
    else:
        cfg.pop("d_state")
        if layer in ("gcn", "gatedgcn", "gine"):
            cfg.pop("heads")
    cfg.update(overrides)
    return GraphModel(**cfg)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "ATOM_FEATURE_DIMS",
    "BOND_FEATURE_DIMS",
    "BucketPart",
    "GraphBuckets",
    "LAYER_TYPES",
    "LRGB_SETTINGS",
    "CategoricalEncoder",
    "ChimeraGPSLayer",
    "ChimeraGraphConv",
    "GPSTransformerLayer",
    "GatedGCNConv",
    "GraphModel",
    "LinearEncoder",
    "MPNNLayer",
    "bucket_graphs",
    "build_lrgb_model",
    "count_parameters",
    "graph_topology",
    "num_terms_for",
]
