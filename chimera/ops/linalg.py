"""Small linear-algebra helpers with the workarounds this project needs."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


@contextlib.contextmanager
def single_threaded_cpu(active: bool = True) -> Iterator[None]:
    """Run the enclosed ops with one intra-op thread, restoring the count afterwards.

    Batched LU on CPU (MKL, torch 2.13) can return invalid pivots for part of a batch when more
    than one thread is used (DESIGN.md section 4), so every general solve/inverse on CPU goes
    through here. GPU solvers are unaffected, so ``active`` is False for CUDA tensors.
    """
    if not active:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def autocast_off(forward: Callable[..., Any]) -> Callable[..., Any]:
    """Run a custom autograd Function's ``forward`` with autocast disabled, in the dtypes of its
    inputs.

    Why: under mixed precision (``bf16-mixed`` on a GPU, CPU autocast) the products inside a
    ``forward`` would be autocast to bf16 while its hand-written ``backward`` runs outside
    autocast, so the two would meet tensors of different dtypes (a matmul of float32 and bf16
    fails). The callers already hand these Functions float32 inputs for half-precision data
    (resolvents need the range), so disabling autocast inside keeps forward and backward in
    one dtype.
    """

    @functools.wraps(forward)
    def wrapped(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        if device not in ("cpu", "cuda", "xpu", "mps") or not torch.is_autocast_enabled(device):
            return forward(ctx, *args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return forward(ctx, *args, **kwargs)

    return wrapped


def eye_like(A: Tensor) -> Tensor:
    """Identity broadcastable against a batch of square matrices ``A (..., n, n)``."""
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _flush_denormal_is_on() -> bool:
    # with FTZ/DAZ set, a subnormal operand reads as zero
    return bool((torch.tensor([1e-40]) * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormal_cpu(active: bool = True) -> Iterator[None]:
    """Flush subnormal floats to zero (x86 FTZ/DAZ) on the calling thread for the enclosed ops,
    restoring the previous mode afterwards.

    Why: the LU solves of :func:`general_inverse_of_i_minus` run on the calling thread alone
    (:func:`single_threaded_cpu`), and a resolvent's entries decay like ``gamma^distance`` into
    the subnormal range along the long chains of peptides, where every CPU operation on them is
    many times slower (64 peptides: the solve 171 -> 92 ms). The flag is per thread, so it does
    nothing for multi-threaded kernels: products with resolvents rely on :func:`flush_tiny`.
    """
    if not active or _flush_denormal_is_on():
        yield
        return
    if not torch.set_flush_denormal(True):  # not supported on this CPU
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def general_inverse(M: Tensor) -> Tensor:
    """``M^-1`` for a batch of arbitrary square matrices (LU; thread-safe on CPU)."""
    eye = eye_like(M)
    cpu = M.device.type == "cpu"
    with single_threaded_cpu(cpu), flush_denormal_cpu(cpu):
        return torch.linalg.solve(M, eye.expand_as(M))


def general_inverse_of_i_minus(A: Tensor) -> Tensor:
    """``(I - A)^-1`` for a batch of arbitrary square matrices (LU; thread-safe on CPU)."""
    return general_inverse(eye_like(A) - A)


def flush_tiny(x: Tensor) -> Tensor:
    """``x`` with the entries below ``sqrt(finfo.tiny)`` in magnitude (1e-19 in float32, 1e-154
    in float64) set to zero (a new tensor; differentiable, the gradient passes where kept).

    Why: a resolvent's entries decay like ``gamma^distance``; along the long chains of peptides
    they reach the subnormal range, and CPU matrix products with subnormal operands are many
    times slower (the LU-based exact layer on 64 peptides: 3.0 s -> 1.3 s forward + backward with
    them flushed; the finite sum's powers of ``A`` likewise). Entries that small are far below
    the precision of the ``O(1)`` diagonal, so zeroing them changes no result beyond rounding,
    and products of what is left with ``O(1)`` factors stay normal.
    """
    if not x.is_floating_point():
        return x
    # hardshrink is this test in one fused pass (abs + compare + masked_fill took 8x longer)
    return torch.nn.functional.hardshrink(x, torch.finfo(x.dtype).tiny ** 0.5)


def flush_tiny_into(x: Tensor, out: Tensor) -> Tensor:
    """:func:`flush_tiny` written into ``out`` (same shape; ``out`` may be ``x`` itself): the
    flush without a fresh buffer. Not differentiable."""
    return torch.hardshrink(x, torch.finfo(x.dtype).tiny ** 0.5, out=out)


def neumann_sum(A: Tensor, K: int) -> Tensor:
    """``sum_{k=0}^{K} A^k`` with O(log K) matrix products.

    Binary expansion of the number of terms ``m = K + 1``: with ``S_m = sum_{k<m} A^k`` and
    ``P_m = A^m``, doubling is ``S_2m = S_m (I + P_m)``, ``P_2m = P_m^2`` and an increment is
    ``S_{m+1} = I + A S_m``, ``P_{m+1} = A P_m``. When ``m`` is a power of two this is exactly the
    paper's squaring trick ``(I + A)(I + A^2)(I + A^4)...`` (eq. 18 / 26).
    """
    if K < 0:
        raise ValueError(f"the number of Neumann terms must be >= 0, got K={K}")
    eye = eye_like(A)
    m = K + 1
    S = eye.expand_as(A)
    P = A
    bits = bin(m)[3:]  # skip '0b1': S_1 = I, P_1 = A
    for k, bit in enumerate(bits):
        last = k == len(bits) - 1  # then the power P goes unused
        S = flush_tiny(S + S @ P)  # powers of A decay into subnormals (see flush_tiny)
        if not last:
            P = flush_tiny(P @ P)
        if bit == "1":
            S = flush_tiny(eye + A @ S)
            if not last:
                P = flush_tiny(A @ P)
    return S


def neumann_sum_per_block(A: Tensor, K: Tensor) -> Tensor:
    """``sum_{k=0}^{K_g} A_g^k`` with a different number of terms per block of ``A``.

    ``A (..., n, n)``; ``K`` holds non-negative integers and broadcasts against ``A.shape[:-2]``
    (e.g. ``(1, G, 1)`` for blocks ``(b, G, H, n, n)``: one ``K`` per graph of a batch, as the
    paper's ``K = dia(G)`` is per graph). With ``m_g = K_g + 1`` terms written in binary, the
    powers ``Q_j = A^(2^j)`` and the sums ``T_j = sum_{k < 2^j} A^k`` (``T_{j+1} = T_j (I + Q_j)``)
    are built per block, and each block adds ``P T_j`` (``P`` = the power reached so far) for
    the bits of its own ``m_g``: ``O(log max K)`` products.

    Each step multiplies only the blocks that need it (gathered into a smaller batch and
    scattered back): ``S`` and ``P`` change only where the block's bit ``j`` is set, ``T`` and
    ``Q`` only while the block has higher bits. With the bits of a batch's ``K`` spread evenly
    that is about 30% fewer ``n^3`` products than updating every block at every step.
    """
    K = torch.as_tensor(K, device=A.device)
    if K.numel() and int(K.min()) < 0:
        raise ValueError(f"the number of Neumann terms must be >= 0, got min K={int(K.min())}")
    shape = A.shape
    n = shape[-1]
    m = (K.long() + 1).expand(shape[:-2]).reshape(-1)
    A = A.reshape(-1, n, n)
    eye = eye_like(A).expand_as(A)
    S = torch.zeros_like(A)
    P = eye.clone()  # materialised: rows are gathered and scattered
    T, Q = eye.clone(), A
    bits = int(m.max()).bit_length() if m.numel() else 0

    def update(X: Tensor, rows: Tensor, new: Tensor) -> Tensor:
        # powers of A decay into subnormals, which slow the products (see flush_tiny)
        new = flush_tiny(new)
        return new if rows.numel() == X.shape[0] else X.index_copy(0, rows, new)

    for j in range(bits):
        on = torch.nonzero((m >> j) & 1).flatten()  # blocks whose bit j is set
        if on.numel():
            P_on = P.index_select(0, on)
            S = update(S, on, S.index_select(0, on) + P_on @ T.index_select(0, on))
        if j == bits - 1:  # P, T and Q of the next bit would go unused
            break
        more = torch.nonzero(m >> (j + 1)).flatten()  # blocks with a higher bit
        on = on[(m[on] >> (j + 1)) > 0]  # P is read again only by those
        if on.numel():
            P = update(P, on, P.index_select(0, on) @ Q.index_select(0, on))
        T_m, Q_m = T.index_select(0, more), Q.index_select(0, more)
        T = update(T, more, T_m + T_m @ Q_m)
        Q = update(Q, more, Q_m @ Q_m)
    return S.reshape(shape)


def squaring_steps_for_nilpotent(longest_path: int) -> int:
    """Number of factors in ``(I + A)(I + A^2)...(I + A^(2^(s-1)))`` that makes it exact for a
    DAG whose longest path has ``longest_path`` edges (``A^(longest_path + 1) = 0``)."""
    s = 0
    while (1 << s) <= longest_path:
        s += 1
    return s
