"""Step 1 of the path: the topology a Chimera layer mixes over.

A :class:`Topology` is a (possibly batched) directed graph stored PyG-style: ``edge_index`` has
shape ``(2, E)`` with row 0 the *source* and row 1 the *target*, so an edge ``j -> i`` puts the
weight at ``A[i, j]`` (``j`` is a parent of ``i``). Undirected graphs carry both directions.

Everything derived from the structure (in-degrees, levels of a DAG, diameters, the canonical DAG
decomposition, reverse-edge pairing) is computed once, lazily, and cached on the object, because
the vision and language models reuse one topology for every layer and every step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Kind = Literal["line", "grid", "graph"]


class CycleError(ValueError):
    """Raised when an algorithm that needs a DAG is given a graph with a directed cycle."""


@dataclass(eq=False)
class Topology:
    """A directed graph (or a batch of disjoint graphs) over ``num_nodes`` nodes.

    Attributes:
        edge_index: ``(2, E)`` long tensor, row 0 = source (parent), row 1 = target (child).
        num_nodes: total number of nodes over all graphs of the batch.
        batch: ``(num_nodes,)`` graph id of every node (sorted), or ``None`` for a single graph.
        edge_attr: optional ``(E, F)`` edge features aligned with ``edge_index``.
        kind: ``"line"``, ``"grid"`` or ``"graph"``: selects the local convolution of the mixer.
        grid_shape: ``(H, W)`` for grids (nodes in row-major order).
        name: human-readable name, e.g. ``"grid/top_left"`` for a DAG of a decomposition.
        parent_edge: for a DAG produced by :meth:`dags`, the id of each of its edges in the
            parent topology (so per-edge features can follow the edge), else ``None``.
    """

    edge_index: Tensor
    num_nodes: int
    batch: Tensor | None = None
    edge_attr: Tensor | None = None
    kind: Kind = "graph"
    grid_shape: tuple[int, int] | None = None
    name: str = "graph"
    parent_edge: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        ei = self.edge_index
        if not isinstance(ei, Tensor):
            ei = torch.as_tensor(ei)
        if ei.dim() != 2 or ei.shape[0] != 2:
            raise ValueError(f"edge_index must have shape (2, E), got {tuple(ei.shape)}")
        if ei.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"edge_index must be an integer tensor, got {ei.dtype}")
        self.edge_index = ei = ei.long()
        if not isinstance(self.num_nodes, int) or self.num_nodes <= 0:
            raise ValueError(f"a topology needs at least one node, got num_nodes={self.num_nodes}")
        if ei.numel() > 0:
            lo, hi = int(ei.min()), int(ei.max())
            if lo < 0 or hi >= self.num_nodes:
                raise ValueError(
                    f"edge_index out of range: node ids must lie in [0, {self.num_nodes}), "
                    f"found {lo if lo < 0 else hi}"
                )
        if self.batch is not None:
            b = torch.as_tensor(self.batch).long()
            if b.shape != (self.num_nodes,):
                raise ValueError(
                    f"batch must have shape ({self.num_nodes},), got {tuple(b.shape)}"
                )
            if b.numel() > 1 and bool((b[1:] < b[:-1]).any()):
                raise ValueError("batch must be sorted (nodes of one graph contiguous), as in PyG")
            if int(b.min()) != 0:
                raise ValueError("batch ids must start at 0")
            if ei.numel() > 0 and bool((b[ei[0]] != b[ei[1]]).any()):
                raise ValueError("an edge connects two different graphs of the batch")
            self.batch = b
        if self.edge_attr is not None and self.edge_attr.shape[0] != ei.shape[1]:
            raise ValueError(
                f"edge_attr has {self.edge_attr.shape[0]} rows but there are {ei.shape[1]} edges"
            )
        if self.parent_edge is not None and self.parent_edge.shape != (ei.shape[1],):
            raise ValueError("parent_edge must have one entry per edge")
        gs = self.grid_shape
        if gs is not None and gs[0] * gs[1] != self.num_nodes:
            raise ValueError(f"grid_shape {self.grid_shape} does not match {self.num_nodes} nodes")

    # ------------------------------------------------------------------ basic structure
    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    @property
    def src(self) -> Tensor:
        return self.edge_index[0]

    @property
    def dst(self) -> Tensor:
        return self.edge_index[1]

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    @property
    def num_graphs(self) -> int:
        if self.batch is None:
            return 1
        return int(self.batch[-1]) + 1

    @property
    def graph_ids(self) -> Tensor:
        """``(num_nodes,)`` graph id of every node (zeros for a single graph)."""
        if self.batch is None:
            return torch.zeros(self.num_nodes, dtype=torch.long, device=self.device)
        return self.batch

    @property
    def ptr(self) -> Tensor:
        """``(num_graphs + 1,)`` offsets of each graph's first node."""
        counts = torch.bincount(self.graph_ids, minlength=self.num_graphs)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def _cached(self, key: str, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def in_degree(self) -> Tensor:
        """``(num_nodes,)`` number of parents of every node."""
        return self._cached(
            "in_degree", lambda: torch.bincount(self.dst, minlength=self.num_nodes)
        )

    @property
    def reverse_edge(self) -> Tensor:
        """``(E,)`` id of the edge ``i -> j`` for each edge ``j -> i``, or -1 if it is absent."""

        def build() -> Tensor:
            n = self.num_nodes
            key = self.src * n + self.dst
            rkey = self.dst * n + self.src
            order = torch.argsort(key)
            sorted_key = key[order]
            pos = torch.searchsorted(sorted_key, rkey).clamp(max=max(len(key) - 1, 0))
            found = sorted_key[pos] == rkey if len(key) else torch.zeros(0, dtype=torch.bool)
            return torch.where(found, order[pos], torch.full_like(rkey, -1))

        return self._cached("reverse_edge", build)

    # ------------------------------------------------------------------ DAG structure
    def _levels_or_none(self) -> Tensor | None:
        """Longest-path level of every node (roots = 0) by Kahn's algorithm; None on a cycle."""

        def build() -> Tensor | None:
            src, dst = self.src.cpu(), self.dst.cpu()
            indeg = torch.bincount(dst, minlength=self.num_nodes).clone()
            level = torch.zeros(self.num_nodes, dtype=torch.long)
            order = torch.argsort(src, stable=True)  # CSR over sources
            src_sorted, dst_sorted = src[order], dst[order]
            starts = torch.searchsorted(src_sorted, torch.arange(self.num_nodes + 1))
            frontier = torch.nonzero(indeg == 0).flatten()
            seen = 0
            depth = 0
            while frontier.numel() > 0:
                seen += frontier.numel()
                level[frontier] = depth
                # children of the whole frontier in one vectorised step
                lo, hi = starts[frontier], starts[frontier + 1]
                counts = hi - lo
                if int(counts.sum()) == 0:
                    break
                idx = torch.repeat_interleave(lo, counts) + (
                    torch.arange(int(counts.sum())) - torch.repeat_interleave(
                        counts.cumsum(0) - counts, counts)
                )
                children = dst_sorted[idx]
                indeg -= torch.bincount(children, minlength=self.num_nodes)
                hit = torch.zeros(self.num_nodes, dtype=torch.bool)
                hit[children] = True
                frontier = torch.nonzero(hit & (indeg == 0)).flatten()
                depth += 1
            if seen != self.num_nodes:
                return None
            return level.to(self.device)

        return self._cached("levels", build)

    @property
    def is_dag(self) -> bool:
        return self._levels_or_none() is not None

    def require_dag(self, what: str = "this algorithm") -> None:
        if not self.is_dag:
            raise CycleError(
                f"{what} needs a directed acyclic graph, but topology '{self.name}' has a "
                "directed cycle (an undirected graph stores both directions, which is a 2-cycle); "
                "decompose it with .dags() or use method='exact'/'neumann'"
            )

    @property
    def levels(self) -> Tensor:
        """``(num_nodes,)`` level of every node: 0 for roots, else 1 + max level of its parents."""
        self.require_dag("levels")
        return self._levels_or_none()

    @property
    def topological_order(self) -> Tensor:
        """Node ids sorted so that every parent comes before its children."""
        return self._cached("topo_order", lambda: torch.argsort(self.levels, stable=True))

    def level_sets(self) -> list[Tensor]:
        """Nodes grouped by level; level ``k`` only depends on levels ``< k``."""

        def build() -> list[Tensor]:
            lv = self.levels
            order = self.topological_order
            counts = torch.bincount(lv).tolist()
            return list(torch.split(order, counts))

        return self._cached("level_sets", build)

    def longest_path(self) -> Tensor:
        """``(num_graphs,)`` number of edges on the longest directed path of each graph (DAGs)."""

        def build() -> Tensor:
            lv = self.levels
            out = torch.zeros(self.num_graphs, dtype=torch.long, device=lv.device)
            return out.scatter_reduce(0, self.graph_ids, lv, reduce="amax")

        return self._cached("longest_path", build)

    # ------------------------------------------------------------------ distances
    def diameter(self) -> Tensor:
        """``(num_graphs,)`` diameter: the largest shortest-path distance (in edges, following
        edge directions) between two nodes of the same graph that are connected by a path.

        For Prop. 4.6 this is the number of Neumann terms that reaches every pair ``(i, j)``
        with ``L_ij > 0``. Constructors with a closed form (lines, grids) pre-fill it; other
        graphs use the vectorised bit-parallel BFS of
        :func:`chimera.topology.structure.graph_diameters` (datasets can compute it once and
        pre-fill it, see :func:`chimera.models.graph.graph_topology`).
        """

        def build() -> Tensor:
            from chimera.topology.structure import graph_diameters

            return graph_diameters(self.edge_index, self.num_nodes, self.batch)

        return self._cached("diameter", build)

    def _bfs_diameter(self) -> Tensor:
        """The sequential per-node BFS: the test oracle of :meth:`diameter`."""
        n = self.num_nodes
        src, dst = self.src.cpu().tolist(), self.dst.cpu().tolist()
        children: list[list[int]] = [[] for _ in range(n)]
        for s, d in zip(src, dst, strict=True):
            children[s].append(d)
        gid = self.graph_ids.cpu().tolist()
        best = [0] * self.num_graphs
        for start in range(n):
            dist = {start: 0}
            queue = deque([start])
            while queue:
                u = queue.popleft()
                for v in children[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        queue.append(v)
            far = max(dist.values())
            if far > best[gid[start]]:
                best[gid[start]] = far
        return torch.tensor(best, dtype=torch.long, device=self.device)

    def max_diameter(self) -> int:
        return int(self.diameter().max())

    # ------------------------------------------------------------------ decomposition
    def dags(self) -> list[Topology]:
        """The canonical DAG decomposition (cached).

        * a DAG decomposes into itself;
        * an undirected line into its forward and reverse directed lines;
        * a grid into the four directed grids flowing from each corner (TL, TR, BL, BR);
        * any other graph into the two BFS-level DAGs of :func:`bfs_dags`.
        """
        from chimera.topology.decompose import canonical_dags

        return self._cached("dags", lambda: canonical_dags(self))

    def subgraph_edges(self, edge_ids: Tensor, name: str, **overrides) -> Topology:
        """A topology on the same nodes with only the edges ``edge_ids`` (in that order)."""
        parent = edge_ids if self.parent_edge is None else self.parent_edge[edge_ids]
        kwargs = dict(
            edge_index=self.edge_index[:, edge_ids],
            num_nodes=self.num_nodes,
            batch=self.batch,
            edge_attr=None if self.edge_attr is None else self.edge_attr[edge_ids],
            kind=self.kind,
            grid_shape=self.grid_shape,
            name=name,
            parent_edge=parent,
        )
        kwargs.update(overrides)
        return Topology(**kwargs)

    def line_direction(self) -> int:
        """+1 if every edge is ``t -> t+1`` within one graph and every node but the first of each
        graph has exactly that parent (a forward directed line, or a batch of them); -1 for the
        reverse; 0 otherwise."""

        def build() -> int:
            if self.num_edges == 0 or self.num_edges != self.num_nodes - self.num_graphs:
                return 0
            step = self.dst - self.src
            if bool((step == 1).all()):
                indeg = self.in_degree
                first = self.ptr[:-1]
                ok = bool((indeg.index_fill(0, first, 1) == 1).all()) and bool(
                    (indeg[first] == 0).all())
                return 1 if ok else 0
            if bool((step == -1).all()):
                indeg = self.in_degree
                last = self.ptr[1:] - 1
                ok = bool((indeg.index_fill(0, last, 1) == 1).all()) and bool(
                    (indeg[last] == 0).all())
                return -1 if ok else 0
            return 0

        return self._cached("line_direction", build)

    def to(self, device: torch.device | str) -> Topology:
        """A copy on ``device``; derived structure is recomputed there lazily."""
        device = torch.device(device)
        if self.device == device:
            return self
        key = f"to:{device}"

        def build() -> Topology:
            return Topology(
                edge_index=self.edge_index.to(device),
                num_nodes=self.num_nodes,
                batch=None if self.batch is None else self.batch.to(device),
                edge_attr=None if self.edge_attr is None else self.edge_attr.to(device),
                kind=self.kind,
                grid_shape=self.grid_shape,
                name=self.name,
                parent_edge=None if self.parent_edge is None else self.parent_edge.to(device),
                # closed-form diameters of lines/grids travel along; the rest is recomputed
                _cache={k: v.to(device) for k, v in self._cache.items() if k == "diameter"},
            )

        return self._cached(key, build)

    def __repr__(self) -> str:
        return (
            f"Topology(name={self.name!r}, kind={self.kind!r}, nodes={self.num_nodes}, "
            f"edges={self.num_edges}, graphs={self.num_graphs})"
        )
