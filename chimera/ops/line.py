"""Step 4 on lines: closed-form resolvents of directed and undirected lines, and one fused SMA
over several lines on the same tokens (the text encoders' DAG and UG mixers).

Directed line (``A_{t, t-1} = a_t``): ``L`` is the 1-D decay mask
(:func:`chimera.ops.masks.decay_mask`), its transpose for the reverse line.

Undirected line: ``M = I - A`` is tridiagonal with ``A_{m, m+1} = p_m`` (edge ``m+1 -> m``) and
``A_{m+1, m} = q_m`` (edge ``m -> m+1``). The inverse of a tridiagonal matrix is semiseparable
(e.g. Meurant, *A review on the inverse of symmetric tridiagonal and block tridiagonal matrices*,
SIAM J. Matrix Anal. Appl. 13, 1992): with the pivots of Gaussian elimination from the top,
``d_0 = 1``, ``d_{m+1} = 1 - p_m q_m / d_m``, and from the bottom, ``e_{T-1} = 1``,
``e_m = 1 - p_m q_m / e_{m+1}``, column ``j`` of ``M^-1`` is

* ``L_jj = 1 / (d_j + e_j - 1)``;
* ``L_ij = L_jj prod_{m=i}^{j-1} p_m / d_m`` above the diagonal (``i < j``);
* ``L_ij = L_jj prod_{m=j}^{i-1} q_m / e_{m+1}`` below it (``i > j``).

(Column ``j`` solves ``M x = e_j``: above row ``j`` elimination from the top leaves
``d_i x_i = p_i x_{i+1}``, below it elimination from the bottom leaves
``e_i x_i = q_{i-1} x_{i-1}``, and row ``j`` itself gives ``x_j``.) Both products are
differences of prefix sums in log space, so ``L`` costs ``O(T^2)`` instead of the
``O(T^3)`` of a dense LU solve. The pivot recurrences are Möbius maps
``d -> (d - r) / d``, i.e. 2x2 matrices ``[[1, -r], [1, 0]]`` acting on ``(num, den)``; their
prefix products come from a log-depth scan (Hillis & Steele, 1986) with every partial product
rescaled, which leaves the map unchanged and keeps the entries in range.

The formulas need the pivots to be positive: true whenever the weights are non-negative and the
spectral radius of ``A`` is below 1 (``M`` is then a non-singular M-matrix), which every Chimera
normalisation guarantees (App. B.1: ``p_m q_m <= gamma^2 / 4``). Anything else falls back to the
LU solve (:func:`line_resolvent` returns ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from chimera.ops.linalg import autocast_off
from chimera.ops.masks import decay_mask, safe_log
from chimera.topology import Topology

#: Undirected lines up to this length keep the LU solve in ``mix``/``mix_sum``: at 64 tokens a
#: batched 64 x 64 solve is cheap and the closed form's ~100 small ops (pivot scans, prefix
#: sums) cost more (tiny text models, batch 32: 163 vs 299 ms per block forward + backward on
#: the loaded 2-core machine); from 128 tokens on the closed form wins (3x at T = 128, 25x at
#: T = 512 in results/bench_text).
UG_SOLVE_MAX = 64

#: Longest directed line mixed by the fused dense path (``T x T`` masks per head; the mixer's
#: ``method="auto"``): longer ones use chunked SSD. Undirected lines are dense at any length.
DENSE_LINE_MAX = 256


def line_kind(topo: Topology) -> int | None:
    """+1 / -1 for a forward / reverse directed line, 0 for an undirected line (both directions
    of every ``t - t+1`` edge, once each), ``None`` otherwise. One line per topology only."""

    def build() -> int | None:
        if topo.num_graphs != 1 or topo.num_nodes < 2:
            return None
        direction = topo.line_direction()
        if direction != 0:
            return direction
        T = topo.num_nodes
        if topo.num_edges != 2 * (T - 1):
            return None
        step = topo.dst - topo.src
        fwd, bwd = step == 1, step == -1
        if int(fwd.sum()) != T - 1 or int(bwd.sum()) != T - 1:
            return None
        expect = torch.arange(T - 1, device=topo.src.device)
        if not (torch.equal(topo.src[fwd].sort().values, expect)
                and torch.equal(topo.dst[bwd].sort().values, expect)):
            return None
        return 0

    return topo._cached("line_kind", build)


def _node_log_weights(edge_weight: Tensor, topo: Topology) -> Tensor:
    """Log weight of the edge entering each node of a directed line: ``(b, h, T)``, with entry 0
    (forward line) or ``T-1`` (reverse line) unused."""
    b, h, _ = edge_weight.shape
    out = edge_weight.new_zeros(b, h, topo.num_nodes)
    return out.index_copy(-1, topo.dst, safe_log(edge_weight))


def directed_line_resolvent(edge_weight: Tensor, topo: Topology) -> Tensor:
    """``L (b, h, T, T)`` of a directed line (lower triangular forward, upper reverse)."""
    direction = line_kind(topo)
    if direction not in (1, -1):
        raise ValueError(f"'{topo.name}' is not a directed line")
    if bool((edge_weight < 0).any()):
        raise ValueError("directed-line masks work in log space and need non-negative weights")
    log_a = _node_log_weights(edge_weight, topo)
    if direction == 1:
        return decay_mask(log_a)
    # reverse: L[i, j] (i <= j) = product of the weights of edges j -> j-1 -> ... -> i; the edge
    # entering node k from k+1 is the k-th entry of log_a, so shift it onto k+1 and transpose
    shifted = torch.nn.functional.pad(log_a[..., :-1], (1, 0))
    return decay_mask(shifted).transpose(-1, -2)


def _mobius_prefix(r: Tensor) -> Tensor:
    """Pivots ``d_0 = 1``, ``d_{m+1} = 1 - r_m / d_m`` for ``r (..., T-1)`` -> ``d (..., T)``,
    by a rescaled log-depth scan over the 2x2 maps ``[[1, -r], [1, 0]]`` (one batched 2x2
    product per level: few ops, as the scan runs once per layer on small tensors)."""
    n = r.shape[-1]
    one, zero = torch.ones_like(r), torch.zeros_like(r)
    P = torch.stack([torch.stack([one, -r], -1), torch.stack([one, zero], -1)], -2)
    s = 1
    while s < n:
        # newer maps multiply on the left: P[k] <- P[k] @ P[k - s] for k >= s
        prod = P[..., s:, :, :] @ P[..., :-s, :, :]
        # a Möbius map is unchanged by scaling its matrix: keep entries O(1)
        prod = prod / prod.abs().sum((-1, -2), keepdim=True)
        P = torch.cat([P[..., :s, :, :], prod], -3)
        s *= 2
    # applied to (num, den) = (1, 1): d_0 = 1
    v = P.sum(-1)  # (..., n, 2): P @ (1, 1)
    piv = v[..., 0] / v[..., 1]
    return torch.cat([torch.ones_like(r[..., :1]), piv], -1)


def _undirected_factors(edge_weight: Tensor, topo: Topology
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """Float64 ``(lo_row, lo_col, up_row, up_col)``, each ``(b, h, T)``, with
    ``L_ij = exp(lo_row_i - lo_col_j)`` for ``i >= j`` and ``exp(up_col_j - up_row_i)`` for
    ``i < j`` (module docstring), or ``None`` when the weights are outside the formula's range
    (negative weights or non-positive pivots: the caller then solves densely)."""
    if line_kind(topo) != 0:
        raise ValueError(f"'{topo.name}' is not an undirected line")
    b, h, _ = edge_weight.shape
    T = topo.num_nodes
    if bool((edge_weight < 0).any()):
        return None
    w = edge_weight.double()
    # logs of the weights in their own dtype: a cut (weight 0) costs ln(tiny) of that dtype,
    # -87 in float32 rather than float64's -708, which keeps the prefix sums short
    log_w = safe_log(edge_weight).double()
    step = topo.dst - topo.src
    # p[m] = A[m, m+1] (edge m+1 -> m, indexed by its target), q[m] = A[m+1, m] (by its source)
    p = w.new_zeros(b, h, T - 1).index_add(-1, topo.dst[step == -1], w[..., step == -1])
    q = w.new_zeros(b, h, T - 1).index_add(-1, topo.src[step == 1], w[..., step == 1])
    log_p = log_w.new_zeros(b, h, T - 1).index_copy(-1, topo.dst[step == -1],
                                                    log_w[..., step == -1])
    log_q = log_w.new_zeros(b, h, T - 1).index_copy(-1, topo.src[step == 1],
                                                    log_w[..., step == 1])
    r = p * q
    both = _mobius_prefix(torch.stack([r, r.flip(-1)]))  # from the top and from the bottom
    d, e = both[0], both[1].flip(-1)
    diag = d + e - 1
    if not (bool((d > 0).all()) and bool((e > 0).all()) and bool((diag > 0).all())):
        return None
    pad = w.new_zeros(b, h, 1)
    # below the diagonal: u_k = ln q_{k-1} - ln e_k (k >= 1), L_ij = e^{cu_i - cu_j} / diag_j;
    # above: v_k = ln p_{k-1} - ln d_{k-1}, L_ij = e^{cv_j - cv_i} / diag_j
    cu = torch.cumsum(torch.cat([pad, log_q - torch.log(e[..., 1:])], -1), -1)
    cv = torch.cumsum(torch.cat([pad, log_p - torch.log(d[..., :-1])], -1), -1)
    log_diag = torch.log(diag)
    return cu, cu + log_diag, cv, cv - log_diag


def _two_sided_exponent(lo_row: Tensor, lo_col: Tensor, up_row: Tensor, up_col: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """``L = exp(lo_row_i - lo_col_j)`` on and below the diagonal, ``exp(up_col_j - up_row_i)``
    above it, and a spare ``T x T`` buffer of the same shape for the caller to reuse.

    Each triangle's differences are zeroed outside it before the ``exp`` (so the other
    triangle's out-of-range values never reach it) and the two are added in place: fewer fresh
    ``T x T`` allocations than a ``where``, which on CPU cost as much as the arithmetic."""
    L = (lo_row[..., :, None] - lo_col[..., None, :]).tril_()
    spare = (up_col[..., None, :] - up_row[..., :, None]).triu_(1)
    return L.add_(spare).exp_(), spare


def _exponent_grads(dE: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of the four exponent vectors from ``dE = dL ∘ L`` (overwritten): row and
    column sums of ``dE`` over the lower and the strict upper triangle (the upper sums as totals
    minus lower sums)."""
    row_all, col_all = dE.sum(-1), dE.sum(-2)
    lo = dE.tril_()
    row_lo, col_lo = lo.sum(-1), lo.sum(-2)
    return row_lo, -col_lo, -(row_all - row_lo), col_all - col_lo


class _TwoSidedExp(torch.autograd.Function):
    """The two-sided mask ``L`` of :func:`_two_sided_exponent` with a hand-written backward:
    the gradient of every vector is a row or column sum of ``dL ∘ L`` over one triangle
    (autograd through ``where`` and the broadcast differences would spend about twice as many
    ``T x T`` passes)."""

    @staticmethod
    @autocast_off
    def forward(ctx, lo_row: Tensor, lo_col: Tensor, up_row: Tensor, up_col: Tensor) -> Tensor:
        L, _ = _two_sided_exponent(lo_row, lo_col, up_row, up_col)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        (L,) = ctx.saved_tensors
        return _exponent_grads(grad * L)


class _TwoSidedSMA(torch.autograd.Function):
    """``Y = (L ∘ S) V`` for the two-sided mask ``L (b, H, T, T)`` (:class:`_TwoSidedExp`),
    scores ``S (b, T, T)`` shared by the heads and ``V (b, H, T, P)``, as one autograd node.

    With ``M = L ∘ S`` the backward needs ``dM = dY Vᵀ``, ``dV = Mᵀ dY``, ``dS = Σ_h dM ∘ L``
    and the exponent gradient ``dM ∘ M`` (= ``dL ∘ L``), so no ``dL`` tensor is formed: two
    ``T x T`` products per head fewer than autograd through ``L * S`` and the mask's own node
    (measured ~4 ms of a 70 ms text layer at T = 128, batch 8, 8 heads, one thread)."""

    @staticmethod
    @autocast_off
    def forward(ctx, lo_row: Tensor, lo_col: Tensor, up_row: Tensor, up_col: Tensor,
                S: Tensor, V: Tensor) -> Tensor:
        L, spare = _two_sided_exponent(lo_row, lo_col, up_row, up_col)
        M = torch.mul(L, S.unsqueeze(1), out=spare)
        # one head-major copy of V serves the forward and both backward products (a strided V
        # would be copied by each bmm)
        V = V.contiguous()
        ctx.save_for_backward(L, M, S, V)
        return M @ V

    @staticmethod
    def backward(ctx, dY: Tensor) -> tuple[Tensor, ...]:
        L, M, S, V = ctx.saved_tensors
        dY = dY.contiguous()
        dV = M.transpose(-1, -2) @ dY
        P = (dY @ V.transpose(-1, -2)).mul_(L)  # dM ∘ L, in dM's buffer
        dS = P.sum(1)
        dE = P.mul_(S.unsqueeze(1))  # dM ∘ L ∘ S = dM ∘ M
        return (*_exponent_grads(dE), dS, dV)


def two_sided_sma(lo_row: Tensor, lo_col: Tensor, up_row: Tensor, up_col: Tensor, S: Tensor,
                  V: Tensor) -> Tensor:
    """``(L ∘ S) V`` with ``L`` the two-sided exponential mask of the float64 exponent vectors
    ``(b, H, T)`` (rounded to ``V``'s dtype as in :func:`_two_sided_mask`), ``S (b, T, T)``,
    ``V (b, T, H, P)`` -> ``(b, T, H, P)``."""
    vecs = (t.to(V.dtype) for t in (lo_row, lo_col, up_row, up_col))
    return _TwoSidedSMA.apply(*vecs, S, V.transpose(1, 2)).transpose(1, 2)


def _two_sided_mask(lo_row: Tensor, lo_col: Tensor, up_row: Tensor, up_col: Tensor,
                    dtype: torch.dtype) -> Tensor:
    """``exp(lo_row_i - lo_col_j)`` on and below the diagonal, ``exp(up_col_j - up_row_i)`` above
    it: ``(..., T, T)`` in ``dtype``.

    The prefix sums arrive in float64 and are rounded to ``dtype`` once, before the ``T x T``
    differences: a float32 difference then carries an absolute error of about
    ``6e-8 |prefix sum|`` (the same trade as Mamba-2's chunk-level decays, which difference
    cumulative sums inside a chunk; :func:`chimera.ops.masks.segsum` avoids it at the price of a
    cumulative sum over ``T x T``, measured several times slower here). ``DENSE_LINE_MAX`` keeps
    the sums short: with decays ``e^{-delta}``, delta <= 1 per token, ``T = 256`` and a few
    sentence cuts (each ``ln tiny = -87`` in float32) the float32 masks are within ~1e-4 relative
    of the float64 oracle (tests/test_line_ops.py); in float64 ~1e-13."""
    return _TwoSidedExp.apply(*(t.to(dtype) for t in (lo_row, lo_col, up_row, up_col)))


def undirected_line_resolvent(edge_weight: Tensor, topo: Topology) -> Tensor | None:
    """``L = (I - A)^-1 (b, h, T, T)`` of an undirected line in ``O(T^2)`` (module docstring),
    or ``None`` when the weights are outside the formula's range."""
    factors = _undirected_factors(edge_weight, topo)
    if factors is None:
        return None
    return _two_sided_mask(*factors, edge_weight.dtype)


def line_resolvent(edge_weight: Tensor, topo: Topology) -> Tensor | None:
    """``L (b, h, T, T)`` of any line (directed or undirected), ``None`` if not applicable
    (or an undirected line of at most ``UG_SOLVE_MAX`` tokens, which the LU solve serves)."""
    kind = line_kind(topo)
    if kind is None:
        return None
    if kind == 0:
        if topo.num_nodes <= UG_SOLVE_MAX:
            return None
        return undirected_line_resolvent(edge_weight, topo)
    if bool((edge_weight < 0).any()):
        return None
    return directed_line_resolvent(edge_weight, topo)


def lines_applicable(dags: Sequence[Topology]) -> bool:
    """Whether :func:`mix_lines` takes these topologies: lines on the same tokens, short enough
    for ``T x T`` masks (undirected lines at any length: their resolvent is dense anyway),
    except undirected lines of at most ``UG_SOLVE_MAX`` tokens, which the LU solve serves."""
    kinds = [line_kind(d) for d in dags]
    T = dags[0].num_nodes
    if any(k is None for k in kinds) or any(d.num_nodes != T for d in dags):
        return False
    if 0 in kinds and T <= UG_SOLVE_MAX:
        return False
    return T <= DENSE_LINE_MAX or all(k == 0 for k in kinds)


def mix_lines(V: Tensor, B: Tensor, C: Tensor, edge_weights: Sequence[Tensor],
              dags: Sequence[Topology], groups: Sequence[int],
              input_scales: Sequence[Tensor | None]) -> Tensor | None:
    """``Σ_k (L_k ∘ C_{g_k} B_{g_k}ᵀ)(s_k ⊙ V)`` over lines on the same tokens as one SMA.

    ``V (b, T, H, P)``, ``B, C (b, T, G, N)`` (one key/query per group, shared by the heads, so
    ``C Bᵀ`` is formed once per group rather than once per head), ``edge_weights[k] (b, H, E_k)``,
    ``input_scales[k] (b, T, H)`` or ``None``. The masks of all lines, with each line's input
    scale folded into its columns, are summed before a single product with ``V``. Two cases
    avoid most ``T x T`` work: a forward + reverse pair (the text DAG encoder: their supports are
    the two triangles) and one undirected line (the UG encoder) have masks
    ``exp(row_i - col_j)`` below the diagonal and ``exp(col_j - row_i)`` above, so one ``exp``
    builds the whole mask and the positive input scales enter as ``+ ln s_j`` in the exponent.
    Returns ``None`` if a resolvent is outside the closed form's range (the caller falls back).
    """
    scores = torch.einsum("bign,bjgn->bgij", C, B)  # (b, G, T, T)
    kinds = [line_kind(d) for d in dags]
    positive = all(s is None or bool((s > 0).all()) for s in input_scales)
    if positive and sorted(kinds) == [-1, 1]:
        Y = _mix_pair(V, scores, edge_weights, dags, groups, input_scales, kinds)
        if Y is not None:
            return Y
    if positive and kinds == [0]:
        factors = _undirected_factors(edge_weights[0], dags[0])
        if factors is not None and V.shape[1] > DENSE_LINE_MAX:
            return _mix_undirected_by_ssd(V, B[:, :, groups[0]], C[:, :, groups[0]], factors,
                                          input_scales[0])
        if factors is not None:
            lo_row, lo_col, up_row, up_col = factors
            s = input_scales[0]
            if s is not None:
                ls = _log_scale(s)
                lo_col, up_col = lo_col - ls, up_col + ls
            return two_sided_sma(lo_row, lo_col, up_row, up_col, scores[:, groups[0]], V)
    M = None
    for w, dag, g, s in zip(edge_weights, dags, groups, input_scales, strict=True):
        L = line_resolvent(w, dag)
        if L is None:
            return None
        term = L * scores[:, g, None]
        if s is not None:
            term = term * s.transpose(1, 2).unsqueeze(-2)  # scale column j by s_j
        M = term if M is None else M + term
    Y = M @ V.transpose(1, 2)  # (b, H, T, P)
    return Y.transpose(1, 2)


def _log_scale(s: Tensor) -> Tensor:
    """``ln s (b, H, T)`` in float64 of a positive input scale ``s (b, T, H)``."""
    return safe_log(s.transpose(1, 2).double())


def _mix_pair(V: Tensor, scores: Tensor, edge_weights: Sequence[Tensor],
              dags: Sequence[Topology], groups: Sequence[int],
              input_scales: Sequence[Tensor | None], kinds: Sequence[int]) -> Tensor | None:
    """A forward and a reverse line on the same tokens in one SMA (see :func:`mix_lines`)."""
    f, r = kinds.index(1), kinds.index(-1)
    w_f, w_r = edge_weights[f], edge_weights[r]
    if bool((w_f < 0).any()) or bool((w_r < 0).any()):
        return None
    # forward: log weight into node t from t-1 (entry 0 unused = 0); L_f[i, j] = e^{cf_i - cf_j}
    cf = torch.cumsum(_node_log_weights(w_f, dags[f]).double(), -1)
    # reverse: log weight into node t from t+1 (entry T-1 unused); L_r[i, j] = e^{cr_j - cr_i}
    # for i <= j, with the exclusive prefix sum cr_j = sum_{k<j}
    lr = _node_log_weights(w_r, dags[r]).double()
    cr = torch.cumsum(lr, -1) - lr
    lo_col, up_col = cf, cr
    s_f, s_r = input_scales[f], input_scales[r]
    if s_f is not None:
        lo_col = lo_col - _log_scale(s_f)
    if s_r is not None:
        up_col = up_col + _log_scale(s_r)
    T = V.shape[1]
    idx = torch.arange(T, device=V.device)
    S = torch.where(idx[:, None] >= idx[None, :], scores[:, groups[f]], scores[:, groups[r]])
    Y = two_sided_sma(cf, lo_col, cr, up_col, S, V)  # (b, T, H, P)
    # the diagonal belongs to both lines; the mask above carries the forward line's, so add the
    # reverse line's own term s_r,i (C_i . B_i) v_i (an O(T) correction)
    own = torch.diagonal(scores[:, groups[r]], dim1=-2, dim2=-1)  # (b, T)
    own = own.unsqueeze(-1) if s_r is None else own.unsqueeze(-1) * s_r  # (b, T, H)
    return torch.addcmul(Y, own.unsqueeze(-1), V)


def _mix_undirected_by_ssd(V: Tensor, B: Tensor, C: Tensor,
                           factors: tuple[Tensor, Tensor, Tensor, Tensor],
                           scale: Tensor | None, chunk_size: int = 64) -> Tensor:
    """An undirected line as two chunked SSD passes, ``O(T)`` memory and ``O(T Q)`` work.

    The semiseparable inverse splits into a lower triangle ``e^{cu_i - cu_j} / diag_j`` (a
    forward directed line with log-decays ``u_k = cu_k - cu_{k-1}``) and an upper one
    ``e^{cv_j - cv_i} / diag_j`` (a reverse line with log-decays ``v_k``), both with the column
    scale ``1 / diag_j`` and sharing the diagonal: so the UG output is a DAG-style pair of
    Mamba-2 scans on specially computed decays, minus one copy of the diagonal term.
    ``B, C (b, T, N)`` are shared by the heads."""
    from chimera.ops.ssd import ssd_chunked

    cu, lo_col, cv, _ = factors
    b, T, h, _ = V.shape
    log_inv_diag = (cu - lo_col).to(V.dtype)  # -ln diag_j, (b, H, T)
    col = torch.exp(log_inv_diag).transpose(1, 2)  # (b, T, H)
    if scale is not None:
        col = col * scale
    X = V * col.unsqueeze(-1)
    Bh = B.unsqueeze(2).expand(b, T, h, B.shape[-1])
    Ch = C.unsqueeze(2).expand(b, T, h, C.shape[-1])
    zero = cu.new_zeros(b, h, 1)
    # forward: the decay into node k from k-1 is u_k (entry 0 unused)
    log_f = torch.cat([zero, cu[..., 1:] - cu[..., :-1]], -1).to(V.dtype)
    # reverse: the decay into node k from k+1 is v_{k+1} (entry T-1 unused); run it flipped
    log_r = torch.cat([cv[..., 1:] - cv[..., :-1], zero], -1).to(V.dtype)
    y = ssd_chunked(X, log_f, Bh, Ch, chunk_size)
    y = y + ssd_chunked(X.flip(1), log_r.flip(-1), Bh.flip(1), Ch.flip(1), chunk_size).flip(1)
    own = (B * C).sum(-1)  # (b, T): C_j . B_j, counted by both passes
    return y - own[..., None, None] * X
