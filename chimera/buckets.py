"""Size buckets of a graph batch mixed concurrently on CPU threads (forward and backward).

Why: on a CPU the exact resolvent of a bucket (``chimera.ops.dense._BandedResolvent``) is a
chain of small sequential products that must run on one thread (flush-to-zero is a per-thread
flag, and subnormals on a second thread tripled its time), so a second core sat idle for half
of a graph layer. The buckets are independent, so here each one runs whole - normalisation,
resolvent, masked product - on its own thread with one intra-op thread; the backward runs each
bucket's sub-graph on its own thread too (for CPU tensors autograd executes a graph on the
thread that calls it). Parameter gradients are summed in bucket order, so results do not depend
on the scheduling.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_PID = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of at least ``workers`` threads (a new one in a forked child, whose
    copy of the parent's pool has no threads)."""
    global _POOL, _POOL_SIZE, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers or _POOL_PID != os.getpid():
            if _POOL is not None and _POOL_PID == os.getpid():
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chimera-bucket")
            _POOL_SIZE, _POOL_PID = workers, os.getpid()
        return _POOL


_ENABLED = True


def set_threaded(enabled: bool) -> None:
    """Turn the concurrent buckets on (the default) or off for the whole process. Off, the
    buckets run one after another (the same values): needed for a second backward through
    one forward, which the threaded path does not keep the graphs for."""
    global _ENABLED
    _ENABLED = bool(enabled)


def bucket_threads(device: torch.device) -> int:
    """Threads for :func:`mix_buckets_threaded`: the intra-op thread count on CPU, 1 elsewhere,
    under autocast (whose state is per thread) or after ``set_threaded(False)``."""
    if not _ENABLED or device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return 1
    return torch.get_num_threads()


def _run(workers: int, fn: Callable[[int], object], order: Sequence[int]) -> dict[int, object]:
    """``fn(k)`` for every ``k`` of ``order`` on ``workers`` threads with one intra-op thread
    each (restored afterwards); the largest buckets should come first in ``order``. The calling
    thread's inference mode and Python dispatch modes (e.g. a memory or FLOP counter), which
    are per thread, hold in the workers too."""
    modes = list(_get_current_dispatch_mode_stack())
    inference = torch.is_inference_mode_enabled()

    def in_context(k: int) -> object:
        with contextlib.ExitStack() as stack:
            if inference:
                stack.enter_context(torch.inference_mode())
            for mode in modes:
                stack.enter_context(mode)
            return fn(k)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dict(zip(order, _pool(workers).map(in_context, order), strict=True))
    finally:
        torch.set_num_threads(threads)


def _forward_buckets(mix_one, nodes, edges, order, workers, node_tensors, edge_tensor,
                     grad: bool) -> dict[int, tuple]:
    """Per bucket ``(inputs, edge input, output)``; with ``grad`` the inputs are fresh leaves
    (requiring grad where the originals do) and each output holds its bucket's graph."""

    def one(k: int):
        with torch.set_grad_enabled(grad):
            ins = [t.detach().index_select(1, nodes[k]).requires_grad_(grad and t.requires_grad)
                   for t in node_tensors]
            de = None
            if edge_tensor is not None:
                de = edge_tensor.detach().index_select(0, edges[k])
                de.requires_grad_(grad and edge_tensor.requires_grad)
            return ins, de, mix_one(k, *ins, de)

    return _run(workers, one, order)


def _assemble(results: dict[int, tuple], nodes, order, num_rows: int) -> Tensor:
    y0 = results[order[0]][2]
    out = y0.new_empty(y0.shape[0], num_rows, *y0.shape[2:])
    for k in order:
        out.index_copy_(1, nodes[k], results[k][2].detach())
    return out


class _ThreadedBuckets(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mix_one, nodes, edges, order, workers, params, node_tensors, edge_tensor,
                *flat: Tensor) -> Tensor:
        results = _forward_buckets(mix_one, nodes, edges, order, workers, node_tensors,
                                   edge_tensor, grad=True)
        ctx.results, ctx.nodes, ctx.order, ctx.workers = results, nodes, order, workers
        ctx.params, ctx.edges = params, edges
        ctx.shapes = [t.shape for t in node_tensors]
        ctx.edge_shape = None if edge_tensor is None else edge_tensor.shape
        return _assemble(results, nodes, order, node_tensors[0].shape[1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        results, nodes, params = ctx.results, ctx.nodes, ctx.params
        if results is None:
            raise RuntimeError(
                "the size buckets ran on threads (chimera.buckets) and their graphs are freed "
                "after one backward; for a second backward through the same forward (e.g. "
                "retain_graph=True) call chimera.buckets.set_threaded(False) first")
        ctx.results = None  # each bucket's graph is freed by its own backward below

        def one(k: int):
            ins, de, y = results[k]
            targets = [*ins, *([de] if de is not None else []), *params]
            wanted = [t for t in targets if t.requires_grad]
            if not wanted:
                return {}
            got = torch.autograd.grad(y, wanted, grad.index_select(1, nodes[k]),
                                      allow_unused=True)
            return {id(t): g for t, g in zip(wanted, got, strict=True)}

        per_bucket = _run(ctx.workers, one, ctx.order)
        node_grads = [grad.new_zeros(shape) for shape in ctx.shapes]
        edge_grad = None if ctx.edge_shape is None else grad.new_zeros(ctx.edge_shape)
        param_grads: list[Tensor | None] = [None] * len(params)
        for k in sorted(ctx.order):  # fixed order: sums do not depend on the scheduling
            ins, de, _ = results[k]
            g = per_bucket[k]
            for i, t in enumerate(ins):
                if (gt := g.get(id(t))) is not None:
                    node_grads[i].index_copy_(1, nodes[k], gt)
            if de is not None and (gd := g.get(id(de))) is not None:
                edge_grad.index_copy_(0, ctx.edges[k], gd)
            for i, p in enumerate(params):
                gp = g.get(id(p))
                if gp is not None:
                    param_grads[i] = gp if param_grads[i] is None else param_grads[i] + gp
        edge = [] if ctx.edge_shape is None else [edge_grad]
        return (None,) * 8 + (*node_grads, *edge, *param_grads)


def mix_buckets_threaded(
    mix_one: Callable[..., Tensor],
    node_tensors: Sequence[Tensor],
    edge_tensor: Tensor | None,
    params: Sequence[Tensor],
    nodes: Sequence[Tensor],
    edges: Sequence[Tensor],
    cost: Sequence[float],
    workers: int,
) -> Tensor:
    """``y (b, T, ...)`` with ``y[:, nodes[k]] = mix_one(k, *node_tensors[:, nodes[k]],
    edge_tensor[edges[k]])``, the buckets spread over ``workers`` threads, largest ``cost``
    first. ``nodes`` partition the rows (dim 1) of every node tensor, ``edges`` those of
    ``edge_tensor``; ``params`` are the tensors ``mix_one`` reads besides its arguments (their
    gradients are summed over the buckets)."""
    order = sorted(range(len(nodes)), key=lambda k: -cost[k])
    flat = [*node_tensors, *([edge_tensor] if edge_tensor is not None else []), *params]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in flat)):
        results = _forward_buckets(mix_one, nodes, edges, order, workers, node_tensors,
                                   edge_tensor, grad=False)
        return _assemble(results, nodes, order, node_tensors[0].shape[1])
    return _ThreadedBuckets.apply(mix_one, list(nodes), list(edges), order, workers,
                                  list(params), list(node_tensors), edge_tensor, *flat)
