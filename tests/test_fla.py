"""``mix(..., method="ssd")`` on CUDA through fla-core's ``chunk_simple_gla`` (issue 10 §3).

fla's Triton kernels do not run in Triton's CPU interpreter (fla-core 0.6.0 calls ``.to()`` on
loop indices, which are Python ints when interpreted, and its autotuner needs a GPU driver), so:

* on CPU the *argument mapping* (:func:`chimera.ops.triton.fla_line.fla_line_inputs`:
  ``q = C, k = B, v = V, g = ln a, scale = 1``, reverse lines flipped) is checked against fla's
  own pure-torch recurrence (``fla.ops.simple_gla.naive``), outputs and gradients;
* the kernels themselves are checked against our torch SSD and the float64 reference only on a
  CUDA device (skipped on CPU).
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from chimera.ops import mix
from chimera.ops.ssd import mix_ssd
from chimera.topology import line

_HAS_FLA = importlib.util.find_spec("fla") is not None
needs_fla = pytest.mark.skipif(not _HAS_FLA, reason="fla-core is not installed (extra 'fla')")
_NO_CUDA = ("fla's Triton kernels need a CUDA device: they do not run in Triton's CPU "
            "interpreter (fla-core 0.6.0 calls .to() on loop indices, which are Python ints "
            "when interpreted, and its autotuner needs a GPU driver)")


def _line_inputs(T, b=2, h=3, N=4, P=5, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(b, T, h, P, generator=g, dtype=dtype)
    B = torch.randn(b, T, h, N, generator=g, dtype=dtype)
    C = torch.randn(b, T, h, N, generator=g, dtype=dtype)
    w = 0.05 + 0.9 * torch.rand(b, h, T - 1, generator=g, dtype=dtype)
    return [t.to(device).requires_grad_() for t in (V, B, C, w)]


@needs_fla
@pytest.mark.parametrize("reverse", [False, True])
def test_mapping_matches_fla_naive_recurrence(reverse):
    """Our inputs through the mapping into fla's own reference recurrence give Chimera's output
    and gradients on a directed line (CPU, float64)."""
    with warnings.catch_warnings():  # fla warns at import that CPU has no Triton device
        warnings.filterwarnings("ignore", message="Triton is not supported")
        from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    from chimera.ops.triton.fla_line import fla_line_inputs

    topo = line(9, directed=True)
    if reverse:
        topo = line(9).dags()[1]
    V, B, C, w = _line_inputs(9, dtype=torch.float64)
    dY = torch.randn_like(V)
    q, k, v, g, flipped = fla_line_inputs(V, B, C, w, topo)
    assert flipped == reverse
    y, _ = naive_recurrent_simple_gla(q, k, v, g, scale=1.0)  # fla's reference computes in fp32
    y = y.flip(1) if flipped else y
    got = (y,) + torch.autograd.grad(y, (V, B, C, w), dY)
    Yr = mix(V, B, C, w, topo, method="reference")
    ref = (Yr,) + torch.autograd.grad(Yr, (V, B, C, w), dY)
    for name, a, r in zip(("Y", "dV", "dB", "dC", "dw"), got, ref, strict=True):
        a, r = a.detach(), r.detach()
        assert float((a - r).abs().max()) <= 1e-4 * (1 + float(r.abs().max())), name
    # fla's default scale (1/sqrt(K)) would be wrong: the mapping needs scale=1.0
    y_default, _ = naive_recurrent_simple_gla(q, k, v, g)
    y_default = y_default.flip(1) if flipped else y_default
    assert not torch.allclose(y_default.detach(), Yr.detach(), atol=1e-3)


def test_cpu_tensors_take_the_torch_ssd(monkeypatch):
    import chimera.ops.triton.fla_line as fla_line

    def boom(*args, **kwargs):
        raise AssertionError("the fla path was taken for CPU tensors")

    monkeypatch.setattr(fla_line, "mix_ssd_fla", boom)
    topo = line(7, directed=True)
    V, B, C, w = _line_inputs(7, dtype=torch.float64)
    Y = mix(V, B, C, w, topo, method="ssd", chunk_size=4)
    Yr = mix(V, B, C, w, topo, method="reference")
    assert float((Y - Yr).detach().abs().max()) <= 1e-10


def test_fla_backend_on_cpu_raises_clear_error():
    topo = line(5, directed=True)
    V, B, C, w = _line_inputs(5)
    with pytest.raises(RuntimeError, match="CUDA"):
        mix_ssd(V, B, C, w, topo, backend="fla")
    with pytest.raises(ValueError, match="backend"):
        mix_ssd(V, B, C, w, topo, backend="triton")


@needs_fla
@pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA)
def test_fla_kernels_match_torch_ssd_on_cuda():
    """fla's compiled kernels vs our torch SSD and the float64 reference: forward and reverse
    lines, lengths not multiple of fla's chunk (64), outputs and gradients; bf16 through mix."""
    for T, reverse in ((100, False), (130, True), (64, False)):
        topo = line(T).dags()[1] if reverse else line(T, directed=True)
        topo = topo.to("cuda")
        V, B, C, w = _line_inputs(T, b=2, h=4, N=16, P=32, device="cuda")
        dY = torch.randn_like(V)
        outs = {}
        for backend in ("torch", "fla"):
            Y = mix_ssd(V, B, C, w, topo, backend=backend)
            outs[backend] = (Y,) + torch.autograd.grad(Y, (V, B, C, w), dY)
        Yr = mix(V, B, C, w, topo, method="reference")
        outs["reference"] = (Yr,) + torch.autograd.grad(Yr, (V, B, C, w), dY)
        # fla multiplies fp32 chunks with tf32 tensor-core dots on recent GPUs: ~1e-3 relative
        for name, a, t, r in zip(("Y", "dV", "dB", "dC", "dw"), outs["fla"], outs["torch"],
                                 outs["reference"], strict=True):
            scale = 1.0 + float(r.abs().max())
            assert float((a - r).abs().max()) <= 5e-3 * scale, (name, T, reverse)
            assert float((a - t).abs().max()) <= 5e-3 * scale, (name, T, reverse)
        # the dispatch: mix(method="ssd") on CUDA takes fla (same numbers as backend="fla")
        Y = mix(V, B, C, w, topo, method="ssd")
        assert float((Y - outs["fla"][0]).abs().max()) <= 1e-5 * (1.0 + float(Yr.abs().max()))
        Yb = mix(*(t.detach().bfloat16() for t in (V, B, C, w)), topo, method="ssd")
        assert Yb.dtype == torch.bfloat16 and bool(torch.isfinite(Yb).all())
        assert float((Yb.float() - Yr).abs().max()) <= 5e-2 * (1.0 + float(Yr.abs().max()))
