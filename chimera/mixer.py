"""Step 5 of the path: the Chimera mixer, Mamba-2's mixer with SSD replaced by Chimera.

``in_proj`` -> (z, x, B, C, dt[, psi]) -> local graph convolution + SiLU on (x, B, C) ->
per-node selectivity ``delta = softplus(dt + dt_bias)`` (and per-edge ``delta_e`` from edge
features) -> edge weights ``A_ij = exp(-exp(A_log) delta_ij)`` -> normalisation -> ``mix`` on every
DAG of the canonical decomposition (or once on the whole graph) -> sum (+ ``D`` skip) ->
gated RMSNorm ``norm(y * silu(z))`` -> ``out_proj``.

On lines the mixer also takes variable-length text (an ``attention_mask``, ``cu_seqlens`` or
``seq_idx``; see :mod:`chimera.varlen`): edges crossing a sentence boundary get weight 0 and the
convolution's taps stop at the boundary, so padding and neighbouring sentences never reach a
real token in either direction.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chimera.buckets import bucket_threads, mix_buckets_threaded
from chimera.local_conv import ConvKind, conv_kind_for, make_local_conv
from chimera.norm import (
    dag_normalize,
    edge_log_weight,
    edge_selectivity,
    row_normalize,
    two_cycle_normalize,
)
from chimera.ops import dense, mix, mix_sum
from chimera.ops.linalg import autocast_off
from chimera.ops.line import DENSE_LINE_MAX
from chimera.ops.mix import METHODS, fused_band_for
from chimera.topology import Topology
from chimera.varlen import Segments, resolve_segments

Sharing = Literal["none", "complete", "rowwise", "diagonal"]
SHARING_MODES: tuple[str, ...] = ("none", "complete", "rowwise", "diagonal")

# DAGs per canonical decomposition, keyed by the local convolution the topology uses
_NUM_DAGS = {"line": 2, "causal_line": 1, "grid": 4, "graph": 2}


class _GatedRMSNormFn(torch.autograd.Function):
    """``rmsnorm(y * silu(z)) * w`` as one autograd node with a hand-derived backward (in-place
    where the buffers are its own): the decomposed CPU graph (silu, mul, pow, mean, rsqrt, two
    muls and their backwards) allocates about twice as many activation-sized tensors, and on CPU
    a fresh allocation costs about as much as the arithmetic on it."""

    @staticmethod
    @autocast_off
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, eps: float) -> Tensor:
        gate = F.silu(z)
        u = y * gate
        ms = torch.linalg.vector_norm(u, dim=-1, keepdim=True).square_().div_(u.shape[-1])
        r = ms.add_(eps).rsqrt_()
        n = u.mul_(r)  # the normalised input, kept for the backward
        ctx.save_for_backward(y, z, gate, n, r, weight)
        return n * weight

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:
        y, z, gate, n, r, weight = ctx.saved_tensors
        dw = (g * n).flatten(0, -2).sum(0) if ctx.needs_input_grad[2] else None
        dn = g * weight
        # d/du of u * r(u): r (dn - n <dn, n> / D)
        c = torch.linalg.vecdot(dn, n, dim=-1).unsqueeze(-1).div_(n.shape[-1])
        du = dn.sub_(n * c).mul_(r)
        dy = du * gate
        dz = torch.ops.aten.silu_backward(du.mul_(y), z)
        return dy, dz, dw, None


class GatedRMSNorm(nn.RMSNorm):
    """Mamba-2's gated output norm ``RMSNorm(y * silu(z))`` (the parameters and state-dict keys
    of ``nn.RMSNorm``; ``forward(x)`` alone is the plain norm)."""

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if gate is None:
            return super().forward(x)
        if self.weight is None or self.eps is None:
            return super().forward(x * F.silu(gate))
        # one dtype for the hand-written backward; float32 under mixed precision (a norm's
        # statistics need it, as autocast runs nn.RMSNorm in float32)
        dtype = (torch.float32 if torch.is_autocast_enabled(x.device.type)
                 else torch.promote_types(x.dtype, gate.dtype))
        return _GatedRMSNormFn.apply(x.to(dtype), gate.to(dtype), self.weight.to(dtype),
                                     self.eps)


def _pick(values: Sequence | None, k: int):
    """``values[k]``, or ``None`` without values (per-bucket overrides)."""
    return None if values is None else values[k]


def sharing_groups(num_dags: int, sharing: Sharing) -> list[int]:
    """Which B/C (and dt) parameter group each DAG uses (paper App. B.2, Table 6).

    For the four grid DAGs in the order (top_left, top_right, bottom_left, bottom_right):
    ``none`` = 4 groups; ``complete`` = 1; ``rowwise`` = the two DAGs starting on the same row
    share (TL+TR, BL+BR); ``diagonal`` = opposite corners share (TL+BR, TR+BL), the paper's
    choice. For two DAGs (a line or a BFS pair, each the reverse of the other) ``diagonal`` means
    the pair shares, like ``complete``.
    """
    if sharing not in SHARING_MODES:
        raise ValueError(f"unknown B/C sharing {sharing!r}; choose one of {SHARING_MODES}")
    if num_dags == 1 or sharing == "complete":
        return [0] * num_dags
    if sharing == "none":
        return list(range(num_dags))
    if num_dags == 4:
        return [0, 0, 1, 1] if sharing == "rowwise" else [0, 1, 1, 0]
    if num_dags == 2 and sharing == "diagonal":
        return [0, 0]
    raise ValueError(f"B/C sharing {sharing!r} is defined for 4 grid DAGs, not {num_dags} DAGs")


class ChimeraMixer(nn.Module):
    """Chimera's token mixer for one topology family.

    Args:
        d_model: model width.
        conv: local convolution family: ``"line"`` (undirected line), ``"causal_line"``
            (one directed line), ``"grid"`` or ``"graph"``. Inputs must use a matching topology.
        d_state: state size ``N``; headdim: ``P``; expand: ``d_inner = expand * d_model``.
        resolvent: ``"dag"`` mixes over the canonical DAG decomposition (Sec. 4.1),
            ``"general"`` over the whole graph (Sec. 3.3; needs ``method`` exact or neumann).
        method: an algorithm of :func:`chimera.ops.mix`, or ``"auto"`` (directed lines: one
            fused SMA of closed-form masks up to ``chimera.ops.line.DENSE_LINE_MAX`` tokens, SSD
            beyond; other DAGs: the triangular solve up to ``dense_max_nodes`` nodes, the
            level-set scan beyond).
        dag_norm: ``"count"`` (paper eq. 16) or ``"sqrt"`` (released ImageNet code).
        general_norm: ``"row"`` (Sec. 3.3) or ``"two_cycle"`` (App. B.1, undirected lines).
        sharing: B/C sharing across DAGs (see :func:`sharing_groups`).
        dag_sum: ``"sum"`` adds the DAG outputs; ``"sqrt"`` divides the sum by sqrt(#DAGs)
            (the released graph code).
        edge_dim: width of edge features; enables per-edge selectivity ``delta_e``.
        edge_selectivity: ``"mean"`` of the endpoints (paper) or ``"target"`` (released code).
        num_terms: ``K`` for ``method="neumann"`` (default: the diameter).
    """

    def __init__(
        self,
        d_model: int,
        *,
        conv: ConvKind = "grid",
        d_state: int = 64,
        headdim: int = 64,
        expand: float = 2.0,
        d_conv: int | None = None,
        resolvent: Literal["dag", "general"] = "dag",
        method: str = "auto",
        dag_norm: Literal["count", "sqrt"] = "count",
        general_norm: Literal["row", "two_cycle"] = "row",
        gamma: float = 0.95,
        sharing: Sharing = "diagonal",
        dag_sum: Literal["sum", "sqrt"] = "sum",
        edge_dim: int | None = None,
        edge_selectivity: Literal["mean", "target"] = "mean",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_init: float = 1.0,
        bias: bool = False,
        num_terms: int | None = None,
        chunk_size: int = 64,
        dense_max_nodes: int = 1024,
    ) -> None:
        super().__init__()
        if method != "auto" and method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose 'auto' or one of {METHODS}")
        if resolvent not in ("dag", "general"):
            raise ValueError(f"resolvent must be 'dag' or 'general', got {resolvent!r}")
        if resolvent == "general" and method not in ("auto", "reference", "exact", "neumann"):
            raise ValueError(f"resolvent='general' needs exact/neumann/reference, not {method!r}")
        if general_norm not in ("row", "two_cycle"):
            raise ValueError(f"unknown general_norm {general_norm!r}")
        if dag_sum not in ("sum", "sqrt"):
            raise ValueError(f"unknown dag_sum {dag_sum!r}")
        self.d_model = d_model
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim:
            raise ValueError(f"d_inner={self.d_inner} is not a multiple of headdim={headdim}")
        self.headdim, self.d_state = headdim, d_state
        self.nheads = self.d_inner // headdim
        self.conv_kind = conv
        self.resolvent = resolvent
        self.method = method
        self.dag_norm, self.general_norm, self.gamma = dag_norm, general_norm, gamma
        self.dag_sum, self.edge_mode = dag_sum, edge_selectivity
        self.num_terms, self.chunk_size = num_terms, chunk_size
        self.dense_max_nodes = dense_max_nodes

        self.num_dags = 1 if resolvent == "general" else _NUM_DAGS[conv]
        self.groups = sharing_groups(self.num_dags, sharing)
        self.sharing = sharing
        ng = max(self.groups) + 1
        self.num_groups = ng
        d_bc = ng * d_state
        self.n_psi = self.nheads if resolvent == "general" and general_norm == "row" else 0
        d_in_proj = 2 * self.d_inner + 2 * d_bc + ng * self.nheads + self.n_psi
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias)
        self.conv_dim = self.d_inner + 2 * d_bc
        self.local_conv = make_local_conv(conv, self.conv_dim, d_conv)
        self.edge_proj = nn.Linear(edge_dim, ng * self.nheads, bias=True) if edge_dim else None

        self._ssm_init = dict(dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
                              A_init=A_init)
        init = self.ssm_parameter_init()
        self.dt_bias = nn.Parameter(init["dt_bias"])
        self.A_log = nn.Parameter(init["A_log"])
        self.D = nn.Parameter(init["D"])
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def ssm_parameter_init(self) -> dict[str, Tensor]:
        """Fresh initial values of ``dt_bias``, ``A_log`` and ``D`` (for model wrappers whose
        weight init runs after construction, e.g. Hugging Face's ``_init_weights``)."""
        c = self._ssm_init
        lo, hi = math.log(c["dt_min"]), math.log(c["dt_max"])
        # dt initialised log-uniformly in [dt_min, dt_max] through softplus^-1 (as Mamba-2)
        dt = torch.exp(torch.rand(self.nheads) * (hi - lo) + lo).clamp(min=c["dt_init_floor"])
        return {
            "dt_bias": dt + torch.log(-torch.expm1(-dt)),
            # Chimera initialises A_log = 0, i.e. a_h = -1 (A_init = 1)
            "A_log": torch.full((self.nheads,), math.log(c["A_init"])),
            "D": torch.ones(self.nheads),
        }

    # ------------------------------------------------------------------
    def _method_for(self, dag: Topology) -> str:
        if self.method == "ssd" and dag.num_edges == 0:
            # a one-token line has no edge, hence no direction for SSD; the scan is the identity
            return "dag_scan"
        if self.method != "auto":
            return self.method
        if self.resolvent == "general":
            return "exact"
        if dag.num_graphs == 1 and dag.line_direction() != 0:
            # short lines: the closed-form masks of all lines summed into one SMA (mix_sum ->
            # chimera.ops.line.mix_lines) beat two chunked SSD passes (results/bench_text)
            return "exact" if dag.num_nodes <= DENSE_LINE_MAX else "ssd"
        return "exact" if dag.num_nodes <= self.dense_max_nodes else "dag_scan"

    def _dags(self, topology: Topology) -> list[Topology]:
        if self.resolvent != "dag":
            return [topology]
        dags = topology.dags()
        if self.conv_kind == "line" and topology.num_edges == 0 and len(dags) == 1:
            # a one-token undirected line has no edge, so it is its own DAG; mix it as the pair
            # of (edgeless) directed lines the two parameter groups expect
            dags = [topology, topology]
        return dags

    def _num_terms(self, method: str, seg: Segments | None) -> int | None:
        # varlen: K defaults to the diameter of the longest sentence, not of the padded line
        # (mix's rule for batches of graphs: the largest diameter in the batch); exact on DAGs
        if self.num_terms is not None or seg is None or method != "neumann":
            return self.num_terms
        return max(seg.max_len - 1, 0)

    def _check(self, x: Tensor, topology: Topology, edge_attr: Tensor | None) -> None:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (batch, T, {self.d_model}), got {tuple(x.shape)}")
        if x.shape[1] != topology.num_nodes:
            raise ValueError(
                f"x has {x.shape[1]} tokens but topology '{topology.name}' has "
                f"{topology.num_nodes} nodes"
            )
        kind = conv_kind_for(topology)
        # a one-token line has no edge to tell a directed line from an undirected one
        one_token_line = topology.kind == "line" and topology.num_edges == 0
        if kind != self.conv_kind and not (one_token_line and "line" in self.conv_kind):
            raise ValueError(
                f"this mixer was built for '{self.conv_kind}' topologies, got '{topology.name}' "
                f"(a '{kind}' topology)"
            )
        if self.edge_proj is not None and edge_attr is None:
            raise ValueError("this mixer uses edge features (edge_dim set) but none were given")
        if edge_attr is not None and edge_attr.shape[0] != topology.num_edges:
            raise ValueError(
                f"edge_attr has {edge_attr.shape[0]} rows, topology has {topology.num_edges} edges"
            )

    def forward(
        self,
        x: Tensor,
        topology: Topology,
        edge_attr: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        segments: Segments | None = None,
        method: str | None = None,
        num_terms: int | Tensor | None = None,
    ) -> Tensor:
        """``x (batch, T, d_model)`` over ``topology`` -> ``(batch, T, d_model)``.

        Variable-length text on a line (:mod:`chimera.varlen`): ``attention_mask (batch, T)``
        (1 = real token), ``cu_seqlens`` (one packed row), ``seq_idx (batch, T)``, or prebuilt
        ``segments``. Outputs at padding positions are unspecified (but finite). ``method`` /
        ``num_terms`` override the mixer's own algorithm and ``K`` for this call.
        """
        topology = topology.to(x.device)
        if edge_attr is None:
            edge_attr = topology.edge_attr if self.edge_proj is not None else None
        self._check(x, topology, edge_attr)
        seg = resolve_segments(x, segments=segments, attention_mask=attention_mask,
                               seq_idx=seq_idx, cu_seqlens=cu_seqlens)
        if seg is not None and self.conv_kind not in ("line", "causal_line"):
            raise ValueError(
                "attention_mask / seq_idx / cu_seqlens are for line topologies (text); for "
                f"batches of '{self.conv_kind}' topologies use a batched Topology instead")
        z, V, Bs, Cs, delta, psi, delta_edge = self._project(x, topology, edge_attr, seg)
        y = self._mix(V, Bs, Cs, delta, psi, delta_edge, topology, seg, method=method,
                      num_terms=num_terms)
        return self._output(y, V, z)

    def forward_buckets(
        self,
        x: Tensor,
        topology: Topology,
        buckets: Sequence[tuple[Tensor, Tensor, Topology]],
        edge_attr: Tensor | None = None,
        *,
        methods: Sequence[str | None] | None = None,
        num_terms: Sequence[int | Tensor | None] | None = None,
    ) -> Tensor:
        """``forward`` on a batch of graphs whose global mixing runs per size bucket.

        ``buckets``: ``(node_ids, edge_ids, sub_topology)`` per bucket, a partition of the nodes
        and edges of ``topology`` into groups of whole graphs (``sub_topology`` = those graphs
        relabelled, edges in the order of ``edge_ids``). Everything per node or per edge (the
        projections, the local convolution, selectivity, output gate and projection) runs once on
        the whole batch; the normalisation and ``mix`` run per bucket, so a dense resolvent is
        padded to the largest graph of its bucket, not of the batch. ``methods`` / ``num_terms``
        override the mixing algorithm and ``K`` per bucket. Same values as :meth:`forward`.
        """
        topology = topology.to(x.device)
        if edge_attr is None:
            edge_attr = topology.edge_attr if self.edge_proj is not None else None
        self._check(x, topology, edge_attr)
        z, V, Bs, Cs, delta, psi, delta_edge = self._project(x, topology, edge_attr, None)
        nodes = [nb[0] for nb in buckets]
        node_perm = torch.cat(nodes)
        if node_perm.numel() != x.shape[1]:
            raise ValueError(f"the buckets hold {node_perm.numel()} nodes, x has {x.shape[1]}")
        edges = [nb[1] for nb in buckets]
        if self.resolvent == "general":
            # the whole graph is its own (only) DAG, and its edge weights and normalisation are
            # per edge and per node: computed once for the batch, not once per bucket (the
            # buckets then hold only the resolvent and masked product; ~20 small ops fewer per
            # bucket, which on CPU threads also contend less for the GIL)
            ((_, _, w, scale),) = self._edge_weights(delta, psi, delta_edge, topology, None)
            node_in = (V * scale.unsqueeze(-1), Bs, Cs)
            edge_in, params = w.permute(2, 0, 1).contiguous(), []  # (E, b, H): buckets take rows
            # the band's precondition for all buckets at once (if it fails, each bucket checks
            # its own rows on the general path)
            dominant = self.num_groups == 1 and dense.diagonally_dominant(w, topology)

            def run(k, Vk, Bk, Ck, wk):
                sub = buckets[k][2].to(x.device)
                wk = wk.permute(1, 2, 0)
                m = _pick(methods, k) or self._method_for(sub)
                band = fused_band_for(Vk, wk, sub, m, dominant=True) if dominant else None
                if band is not None:
                    # what mix would reach through mix_sum, with B and C as one head (their
                    # scores are shared): no expand/slice pair and its backward per bucket
                    return dense.mix_banded(Vk, Bk, Ck, wk, sub, band)
                return self._mix_weighted(Vk, Bk, Ck, [(sub, self.groups[0], wk, None)], None,
                                          method=m, num_terms=_pick(num_terms, k))
        elif self._dags_match_per_bucket(topology, buckets):
            # BFS-DAG pairs: every graph's DAGs are the same in the batch and in its bucket (BFS
            # depths from the graph's first node), so the DAGs' weights and node scales are
            # computed once for the batch too; buckets take their edges' rows of a (E, b, K, H)
            # tensor (slot k = DAG k, zero where an edge is not in that DAG) and nodes' scales
            parts = self._edge_weights(delta, psi, delta_edge, topology, None)
            W = torch.stack([w.new_zeros(topology.num_edges, *w.shape[:2]).index_copy(
                0, dag.parent_edge, w.permute(2, 0, 1)) for dag, _, w, _ in parts], dim=2)
            scales = torch.stack([scale for *_, scale in parts], dim=2)  # (b, T, K, H)
            node_in, edge_in, params = (V, Bs, Cs, scales), W, []

            def run(k, Vk, Bk, Ck, sk, Wk):
                sub = buckets[k][2].to(x.device)
                parts_k = [(dag, g, Wk[:, :, i].index_select(0, dag.parent_edge).permute(1, 2, 0),
                            sk[:, :, i])
                           for i, (dag, g) in enumerate(zip(self._dags(sub), self.groups,
                                                            strict=True))]
                return self._mix_weighted(Vk, Bk, Ck, parts_k, None, method=_pick(methods, k),
                                          num_terms=_pick(num_terms, k))
        else:
            node_in, edge_in, params = (V, Bs, Cs, delta, psi), delta_edge, [self.A_log]

            def run(k, Vk, Bk, Ck, dk, pk, dek):
                sub = buckets[k][2].to(x.device)
                return self._mix(Vk, Bk, Ck, dk, pk, dek, sub, None, method=_pick(methods, k),
                                 num_terms=_pick(num_terms, k))

        # B, C (and V) are column slices of the convolution's output: gathering rows of a
        # strided tensor is ~15x slower than of a contiguous one (64 peptides: 15 ms of
        # gathers for 0.8 ms of copies)
        node_in = tuple(t.contiguous() for t in node_in)
        workers = min(bucket_threads(x.device), len(buckets))
        if workers > 1:
            # the cost of a bucket's dense mixing grows like graphs x n^2
            cost = [bk[2].num_graphs * float(bk[2].ptr.diff().max()) ** 2 for bk in buckets]
            y = mix_buckets_threaded(run, node_in, edge_in, params, nodes, edges, cost, workers)
            return self._output(y, V, z)
        # one gather per tensor into bucket order, then views per bucket (not one gather each)
        sizes = [int(n.numel()) for n in nodes]
        per_bucket = [t.index_select(1, node_perm).split(sizes, dim=1) for t in node_in]
        if edge_in is not None:
            per_edge = edge_in.index_select(0, torch.cat(edges)).split(
                [int(e.numel()) for e in edges], dim=0)
        ys = [run(k, *(t[k] for t in per_bucket), None if edge_in is None else per_edge[k])
              for k in range(len(buckets))]
        inverse = torch.empty_like(node_perm)
        inverse[node_perm] = torch.arange(node_perm.numel(), device=node_perm.device)
        y = torch.cat(ys, dim=1).index_select(1, inverse)
        return self._output(y, V, z)

    def _dags_match_per_bucket(self, topology: Topology,
                               buckets: Sequence[tuple[Tensor, Tensor, Topology]]) -> bool:
        """Whether every bucket's DAG decomposition is the batch's restricted to its graphs,
        edge for edge (BFS pairs of graphs: the same depths from each graph's first node), so
        that the DAGs' weights can be computed once for the batch. Checked once per batch
        structure (cached on the bucket topologies)."""
        if self.resolvent != "dag" or self.conv_kind != "graph":
            return False
        whole = self._dags(topology)
        if len(whole) != self.num_dags or any(d.parent_edge is None for d in whole):
            return False

        masks: list[Tensor] = []  # per batch DAG: which batch edges it holds (built once)

        def matches(edge_ids: Tensor, sub: Topology) -> bool:
            dags = self._dags(sub)
            if len(dags) != len(whole) or any(d.parent_edge is None for d in dags):
                return False
            if not masks:
                for theirs in whole:
                    inside = torch.zeros(topology.num_edges, dtype=torch.bool,
                                         device=edge_ids.device)
                    inside[theirs.parent_edge] = True
                    masks.append(inside)
            for mine, inside in zip(dags, masks, strict=True):
                # the bucket's DAG edges, as batch edges, are exactly the batch DAG's edges
                # among the bucket's own
                batch_edges = edge_ids[mine.parent_edge]
                if not (bool(inside[batch_edges].all())
                        and int(inside[edge_ids].sum()) == mine.num_edges):
                    return False
            return True

        ok = True
        for _, edge_ids, sub in buckets:
            # cached on the bucket with a weak reference to the batch it was checked against
            hit = sub._cache.get("dags_match_batch")
            if hit is None or hit[0]() is not topology:
                hit = (weakref.ref(topology), matches(edge_ids, sub))
                sub._cache["dags_match_batch"] = hit
            ok = ok and hit[1]
        return ok

    # ------------------------------------------------------------------ the forward's stages
    def _project(self, x: Tensor, topology: Topology, edge_attr: Tensor | None,
                 seg: Segments | None) -> tuple[Tensor, ...]:
        """in_proj -> local conv + SiLU -> ``(z, V, B, C, delta, psi, delta_edge)``."""
        b, T, _ = x.shape
        h, P, N, ng = self.nheads, self.headdim, self.d_state, self.num_groups
        z, xbc, dt, psi = self._in_proj(x, [self.d_inner, self.conv_dim, ng * h, self.n_psi])
        if seg is None:
            xbc = F.silu(self.local_conv(xbc, topology))
        else:
            xbc = F.silu(self.local_conv(xbc, topology, segments=seg))
        v, Bs, Cs = torch.split(xbc, [self.d_inner, ng * N, ng * N], dim=-1)
        V = v.reshape(b, T, h, P)
        Bs, Cs = Bs.reshape(b, T, ng, N), Cs.reshape(b, T, ng, N)
        delta = F.softplus(dt.reshape(b, T, ng, h) + self.dt_bias)  # (b, T, groups, h)
        delta_edge = None
        if self.edge_proj is not None:
            delta_edge = F.softplus(self.edge_proj(edge_attr.to(x.dtype)))  # (E, groups*h)
            delta_edge = delta_edge.reshape(-1, ng, h)
        return z, V, Bs, Cs, delta, psi, delta_edge

    def _in_proj(self, x: Tensor, sizes: list[int]) -> list[Tensor]:
        """``in_proj(x)`` split into ``sizes``, one product per part with a slice of the weight:
        each part comes out contiguous (the local convolution reads ``xbc`` as is) and the
        backward has no concatenation of the parts' gradients (64 peptides: ~13 ms of the graph
        layer's forward + backward on one thread)."""
        weight, bias = self.in_proj.weight, self.in_proj.bias
        parts, start = [], 0
        for size in sizes:
            b = None if bias is None else bias[start:start + size]
            parts.append(F.linear(x, weight[start:start + size], b))
            start += size
        return parts

    def _mix(self, V: Tensor, Bs: Tensor, Cs: Tensor, delta: Tensor, psi: Tensor,
             delta_edge: Tensor | None, topology: Topology, seg: Segments | None, *,
             method: str | None = None, num_terms: int | Tensor | None = None) -> Tensor:
        """Edge weights -> normalisation -> ``mix`` over every DAG (or the whole graph), summed:
        ``(b, T, H, P)``. ``method`` / ``num_terms`` override the mixer's own for this call."""
        parts = self._edge_weights(delta, psi, delta_edge, topology, seg)
        return self._mix_weighted(V, Bs, Cs, parts, seg, method=method, num_terms=num_terms)

    def _edge_weights(self, delta: Tensor, psi: Tensor, delta_edge: Tensor | None,
                      topology: Topology, seg: Segments | None) -> list[tuple]:
        """Selectivity -> edge weights -> normalisation, per DAG (or the whole graph):
        ``[(dag, group, w (b, H, E_dag), input scale (b, T, H))]``."""
        b = delta.shape[0]
        dags = self._dags(topology)
        if len(dags) != self.num_dags:
            raise ValueError(
                f"topology '{topology.name}' decomposes into {len(dags)} DAGs, this mixer expects "
                f"{self.num_dags}"
            )
        parts = []
        for dag, g in zip(dags, self.groups, strict=True):
            d_g = delta[:, :, g]
            de = None
            if delta_edge is not None:
                ids = dag.parent_edge if dag.parent_edge is not None else slice(None)
                de = delta_edge[ids, g].T.unsqueeze(0).expand(b, -1, -1)
            log_w = edge_log_weight(edge_selectivity(d_g, dag, de, self.edge_mode), self.A_log)
            # varlen: edges across a sentence boundary are absent (weight exactly 0)
            keep = None if seg is None else seg.edge_keep(dag)
            if self.resolvent == "dag":
                w, scale = dag_normalize(log_w, d_g, dag, self.dag_norm, edge_mask=keep)
            else:
                w = torch.exp(log_w)
                if keep is not None:
                    w = torch.where(keep.unsqueeze(1), w, 0.0)
                if self.general_norm == "row":
                    w = row_normalize(w, psi, dag, self.gamma)
                else:
                    w = two_cycle_normalize(w, dag, self.gamma)
                scale = d_g
            parts.append((dag, g, w, scale))
        return parts

    def _mix_weighted(self, V: Tensor, Bs: Tensor, Cs: Tensor, parts: list[tuple],
                      seg: Segments | None, *, method: str | None = None,
                      num_terms: int | Tensor | None = None) -> Tensor:
        """``mix`` over the DAGs of :meth:`_edge_weights` (a scale of ``None``: ``V`` is
        already scaled), summed: ``(b, T, H, P)``."""
        b, T, h, _ = V.shape
        N = self.d_state
        methods = [method or self._method_for(p[0]) for p in parts]
        y = None
        if all(m == "exact" for m in methods):
            # one call for all DAGs: on a grid, the corners' masks are merged per B/C group and
            # mixed in one SMA (chimera.ops.grid.mix_grid_corners); elsewhere the same as below
            y = mix_sum(V, Bs, Cs, [p[2] for p in parts], [p[0] for p in parts], self.groups,
                        [p[3] for p in parts], method="exact")
        for (dag, g, w, scale), m in zip(parts, methods, strict=True) if y is None else ():
            Bg = Bs[:, :, g, None, :].expand(b, T, h, N)
            Cg = Cs[:, :, g, None, :].expand(b, T, h, N)
            k = num_terms if num_terms is not None else self._num_terms(m, seg)
            Vs = V if scale is None else V * scale.unsqueeze(-1)
            y_k = mix(Vs, Bg, Cg, w, dag, method=m, num_terms=k, chunk_size=self.chunk_size)
            y = y_k if y is None else y + y_k
        if self.dag_sum == "sqrt":
            y = y / math.sqrt(len(parts))
        return y

    def _output(self, y: Tensor, V: Tensor, z: Tensor) -> Tensor:
        """``D`` skip -> gated RMSNorm -> out_proj."""
        b, T = V.shape[:2]
        y = torch.addcmul(y, self.D[:, None], V)
        y = self.norm(y.reshape(b, T, self.d_inner), z)
        return self.out_proj(y)
