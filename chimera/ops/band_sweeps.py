"""The sequential block sweeps of the banded resolvent (:mod:`chimera.ops.dense`), as plain
functions that TorchScript can compile.

The block-tridiagonal ``T`` of a general graph (:func:`factor`, :func:`fill_inverse`,
:func:`adjoint_`) and the block-bidiagonal ``T`` of a BFS DAG (:func:`fill_bidiagonal`,
:func:`adjoint_bidiagonal_`).

Why TorchScript: a band sweep is ``~3 nb`` small batched products per bucket (``nb`` blocks of
``s`` = 8-24 nodes), so on a CPU its cost is mostly per-operation overhead, and the size buckets
that run on concurrent threads (:mod:`chimera.buckets`) then spend it fighting over Python's
GIL: every small op releases and re-acquires it, and two threads doing so ran *slower* than
one (a bucket's sweep: 0.7x aggregate throughput on two threads). A scripted function runs its
whole loop in the TorchScript interpreter, which holds no GIL (same sweep: 1.9x on two
threads) and dispatches each op with less overhead. Where TorchScript is unavailable (it is
deprecated in favour of ``torch.compile``, which would keep the Python loop) or disabled with
:func:`set_scripted`, the same functions run as Python.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

_SCRIPTED = True
_compiled: dict[str, Callable] = {}
# the first calls may come from several bucket threads at once (and catch_warnings is global)
_compile_lock = threading.Lock()


def set_scripted(enabled: bool) -> None:
    """Use the TorchScript-compiled sweeps (default) or the plain Python ones."""
    global _SCRIPTED
    _SCRIPTED = bool(enabled)


def _impl(fn: Callable) -> Callable:
    """``fn`` compiled by ``torch.jit.script`` once (its deprecation warning silenced), or
    ``fn`` itself when scripting is off or fails."""
    if not _SCRIPTED:
        return fn
    got = _compiled.get(fn.__name__)
    if got is not None:
        return got
    with _compile_lock:
        got = _compiled.get(fn.__name__)
        if got is None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    got = torch.jit.script(fn)
            except Exception as err:  # noqa: BLE001 - any failure falls back to Python
                warnings.warn(f"TorchScript could not compile {fn.__name__} ({err}); the band "
                              "sweeps run as Python", RuntimeWarning, stacklevel=3)
                got = fn
            _compiled[fn.__name__] = got
    return got


def factor(lo: Tensor, dg: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """Block LU of a block-tridiagonal ``T`` without pivoting across blocks: ``(D^-1, G)`` with
    ``D_0 = T_00``, ``G_i = D_{i-1}^-1 T_{i-1,i}``, ``D_i = T_ii - T_{i,i-1} G_i`` (``G_0 = 0``);
    ``lo, dg, up (nb, m, s, s)`` are the blocks ``T_{i,i-1}``, ``T_ii``, ``T_{i,i+1}``."""
    nb = dg.shape[0]
    d_inv = torch.empty_like(dg)
    g = torch.zeros_like(dg)
    # the D_i are strictly diagonally dominant like I - A (Schur complements keep it): never
    # singular, so the unchecked batched inverse
    d_inv[0].copy_(torch.linalg.inv_ex(dg[0])[0])
    for i in range(1, nb):
        torch.bmm(d_inv[i - 1], up[i - 1], out=g[i])
        d_inv[i].copy_(torch.linalg.inv_ex(torch.baddbmm(dg[i], lo[i], g[i], alpha=-1.0))[0])
    return d_inv, g


def fill_inverse(L: Tensor, d_inv: Tensor, neg_g: Tensor, neg_f: Tensor, buf: Tensor) -> None:
    """``L (m, n, n) <- T^-1`` from the factors of :func:`factor`, every entry written once
    (``L`` may start uninitialised). With ``X = T^-1``: ``X_{k,j} = -G_{k+1} X_{k+1,j}`` right of
    the diagonal and ``X_{k,j} = -X_{k,j+1} F_{j+1}`` on and below it (``F_j = T_{j,j-1}
    D_{j-1}^-1``), plus ``D_j^-1`` on the diagonal, from the last block up: ``2 s n^2`` per
    matrix, where forward and back substitution on the identity take ``5 s n^2``. The
    recurrences are those of the block LDU factors of ``T^-1`` (the diagonal blocks are the
    recursive Green's function recurrence). ``neg_g[j] = -G_{j+1}``, ``neg_f[j] = -F_{j+1}``
    (``nb - 1`` each); ``buf``: scratch of ``m s n`` elements."""
    m, n = L.shape[0], L.shape[1]
    nb = d_inv.shape[0]
    s = n // nb
    L[:, n - s:, n - s:].copy_(d_inv[nb - 1])
    # each product goes to the contiguous scratch, then into L's strided block (a product into
    # a strided view falls back to one GEMM per matrix)
    for j in range(nb - 2, -1, -1):
        a = j * s
        c = a + s
        row = torch.bmm(neg_g[j], L[:, c:c + s, c:], out=buf[: m * s * (n - c)].view(m, s, n - c))
        L[:, a:c, c:].copy_(row)
        col = torch.bmm(L[:, a:, c:c + s], neg_f[j], out=buf[: m * (n - a) * s].view(m, n - a, s))
        L[:, a:, a:c].copy_(col)
        L[:, a:c, a:c].add_(d_inv[j])


def adjoint_(M: Tensor, d_inv: Tensor, g: Tensor, lo: Tensor, buf: Tensor) -> None:
    """``M (m, nb, s, n) <- T^-T M`` in place with the factors of :func:`factor`: ``Tᵀ``'s
    pivots are ``D_iᵀ`` and its multipliers ``G_iᵀ``. ``buf``: scratch ``(2, m, s, n)``."""
    nb = d_inv.shape[0]
    for i in range(1, nb):
        M[:, i].sub_(torch.bmm(g[i].mT, M[:, i - 1], out=buf[0]))
    M[:, nb - 1].copy_(torch.bmm(d_inv[nb - 1].mT, M[:, nb - 1], out=buf[0]))
    for i in range(nb - 2, -1, -1):
        torch.baddbmm(M[:, i], lo[i + 1].mT, M[:, i + 1], alpha=-1.0, out=buf[0])
        M[:, i].copy_(torch.bmm(d_inv[i].mT, buf[0], out=buf[1]))


def fill_bidiagonal(L: Tensor, F: Tensor, upper: bool, buf: Tensor) -> None:
    """``L (m, nb, s, n)`` (its diagonal blocks ``D_i^-1`` set, zero elsewhere) ``<- T^-1`` for a
    block lower (or, ``upper``, upper) bidiagonal ``T`` with ``F_i = D_i^-1 T_{i,i-1}`` (or
    ``D_i^-1 T_{i,i+1}``): ``X_i -= F_i X_{i-1}`` over the columns before block ``i`` (after it),
    one product per block row. ``buf``: scratch of ``m s n`` elements."""
    m, nb, s, n = L.shape
    if upper:
        for i in range(nb - 2, -1, -1):
            c = (i + 1) * s
            out = torch.bmm(F[i], L[:, i + 1, :, c:], out=buf[: m * s * (n - c)].view(m, s, n - c))
            L[:, i, :, c:].sub_(out)
    else:
        for i in range(1, nb):
            c = i * s
            out = torch.bmm(F[i], L[:, i - 1, :, :c], out=buf[: m * s * c].view(m, s, c))
            L[:, i, :, :c].sub_(out)


def adjoint_bidiagonal_(M: Tensor, d_inv: Tensor, off: Tensor, upper: bool,
                        buf: Tensor) -> None:
    """``M (m, nb, s, n) <- T^-T M`` in place for the ``T`` of :func:`fill_bidiagonal` with
    diagonal blocks' inverses ``d_inv`` and off-diagonal blocks ``off`` (``(nb, m, s, s)``):
    ``Tᵀ`` is block upper bidiagonal for a lower ``T`` (block ``(i, i+1) = T_{i+1,i}ᵀ``) and block
    lower bidiagonal for an upper one. ``buf``: scratch ``(2, m, s, n)``."""
    nb = d_inv.shape[0]
    first = 0 if upper else nb - 1
    M[:, first].copy_(torch.bmm(d_inv[first].mT, M[:, first], out=buf[0]))
    if upper:
        for i in range(1, nb):
            torch.baddbmm(M[:, i], off[i - 1].mT, M[:, i - 1], alpha=-1.0, out=buf[0])
            M[:, i].copy_(torch.bmm(d_inv[i].mT, buf[0], out=buf[1]))
    else:
        for i in range(nb - 2, -1, -1):
            torch.baddbmm(M[:, i], off[i + 1].mT, M[:, i + 1], alpha=-1.0, out=buf[0])
            M[:, i].copy_(torch.bmm(d_inv[i].mT, buf[0], out=buf[1]))


def run_factor(lo: Tensor, dg: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _impl(factor)(lo, dg, up)


def run_fill_inverse(L: Tensor, d_inv: Tensor, neg_g: Tensor, neg_f: Tensor,
                     buf: Tensor) -> None:
    _impl(fill_inverse)(L, d_inv, neg_g, neg_f, buf)


def run_adjoint_(M: Tensor, d_inv: Tensor, g: Tensor, lo: Tensor, buf: Tensor) -> None:
    _impl(adjoint_)(M, d_inv, g, lo, buf)


def run_fill_bidiagonal(L: Tensor, F: Tensor, upper: bool, buf: Tensor) -> None:
    _impl(fill_bidiagonal)(L, F, upper, buf)


def run_adjoint_bidiagonal_(M: Tensor, d_inv: Tensor, off: Tensor, upper: bool,
                            buf: Tensor) -> None:
    _impl(adjoint_bidiagonal_)(M, d_inv, off, upper, buf)


__all__: list[str] = ["set_scripted", "run_factor", "run_fill_inverse", "run_adjoint_",
                      "run_fill_bidiagonal", "run_adjoint_bidiagonal_"]
