"""Variable-length text: padding and packed neighbours never reach a real token.

Every sentence run alone must give, at its real positions, the same output (float64, 1e-6) as
inside a right- or left-padded batch, inside one packed row (``cu_seqlens``) and inside packed
rows with trailing padding (``seq_idx``), for every line resolvent algorithm and for the
undirected (UG) variant, at mixer and at block level. Pads are filled with large random values so
that any leak shows.
"""

import pytest
import torch

from chimera import ChimeraBlock, ChimeraMixer, grid, line
from chimera.local_conv import LineConv
from chimera.varlen import Segments

D = 32
LENGTHS = (3, 9, 1, 6)  # shorter and longer than the conv width 7, and one token
SMALL = dict(d_state=8, headdim=16, d_conv=7, chunk_size=4)

# (resolvent, method, general_norm): the DAG variant with every line algorithm, and UG
CASES = [("dag", m, "row") for m in ("reference", "exact", "neumann", "dag_dense", "dag_scan",
                                      "ssd", "auto")]
CASES += [("general", m, "two_cycle") for m in ("reference", "exact", "neumann")]
CASES += [("general", "exact", "row")]
IDS = [f"{r}-{m}-{n}" if r == "general" else m for r, m, n in CASES]


def _sentences(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, D, generator=g, dtype=torch.float64) for n in LENGTHS]


def _layer(kind, resolvent, method, general_norm, num_terms=None):
    torch.manual_seed(0)
    kw = dict(conv="line", resolvent=resolvent, method=method, general_norm=general_norm,
              num_terms=num_terms, **SMALL)
    if kind == "mixer":
        return ChimeraMixer(D, **kw).double()
    return ChimeraBlock(D, norm="layer", mlp_ratio=2.0, **kw).double()


def _alone(layer, sents):
    return [layer(s, line(s.shape[1])) for s in sents]


def _padded(sents, left=False, T=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    T = T or max(s.shape[1] for s in sents)
    x = 100 * torch.randn(len(sents), T, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(len(sents), T, dtype=torch.long)
    for i, s in enumerate(sents):
        n = s.shape[1]
        sl = slice(T - n, T) if left else slice(0, n)
        x[i, sl], mask[i, sl] = s[0], 1
    return x, mask


def _slices(sents, start=0):
    out = []
    for s in sents:
        out.append(slice(start, start + s.shape[1]))
        start += s.shape[1]
    return out


def _assert_same(got, want):
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["mixer", "block"])
@pytest.mark.parametrize("resolvent, method, general_norm", CASES, ids=IDS)
def test_sentence_alone_equals_padded_and_packed(kind, resolvent, method, general_norm):
    # the finite sum is compared at a fixed K (its default K follows the batch: tested below)
    K = 5 if method == "neumann" else None
    layer = _layer(kind, resolvent, method, general_norm, num_terms=K)
    sents = _sentences()
    want = _alone(layer, sents)
    T = max(LENGTHS) + 2

    for left in (False, True):  # right and left padding
        x, mask = _padded(sents, left=left, T=T)
        y = layer(x, line(T), attention_mask=mask)
        assert torch.isfinite(y).all()
        for i, s in enumerate(sents):
            n = s.shape[1]
            _assert_same(y[i:i + 1, T - n:] if left else y[i:i + 1, :n], want[i])

    # one packed row described by cu_seqlens
    packed = torch.cat(sents, dim=1)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    y = layer(packed, line(packed.shape[1]), cu_seqlens=cu)
    for sl, w in zip(_slices(sents), want, strict=True):
        _assert_same(y[:, sl], w)

    # two packed rows with trailing padding, described by seq_idx (-1 = pad)
    rows = [sents[:2], sents[2:]]
    T2 = sum(LENGTHS[:2]) + 3
    x = 100 * torch.randn(2, T2, D, dtype=torch.float64)
    seq_idx = torch.full((2, T2), -1)
    for r, row in enumerate(rows):
        for k, (sl, s) in enumerate(zip(_slices(row), row, strict=True)):
            x[r, sl], seq_idx[r, sl] = s[0], k
    y = layer(x, line(T2), seq_idx=seq_idx)
    for r, row in enumerate(rows):
        for sl, w in zip(_slices(row), want[2 * r:2 * r + len(row)], strict=True):
            _assert_same(y[r:r + 1, sl], w)


@pytest.mark.parametrize("resolvent, method, general_norm",
                         [("dag", "ssd", "row"), ("dag", "exact", "row"),
                          ("dag", "dag_scan", "row"), ("general", "exact", "two_cycle"),
                          ("general", "reference", "two_cycle")])
def test_real_outputs_have_zero_gradient_wrt_pads_and_neighbours(resolvent, method,
                                                                  general_norm):
    layer = _layer("block", resolvent, method, general_norm)
    # SSD and the closed-form line masks (exact) work with prefix sums of log-decays: a cut edge
    # is a decay of exp(ln tiny) ~ 1e-308, and the gradients of the log-weights are differences
    # of row and column sums, so a pad receives rounding noise (~1e-19 here, float64) rather
    # than an exact 0; a real leak would be of the order of the weights (~1e-1)
    tol = 1e-15 if method in ("ssd", "exact") else 0.0
    sents = _sentences(3)
    x, mask = _padded(sents, left=True)
    x.requires_grad_(True)
    y = layer(x, line(x.shape[1]), attention_mask=mask)
    (y * mask[..., None]).sum().backward()
    assert x.grad[mask == 0].abs().max() <= tol
    assert x.grad[mask == 1].abs().max() > 0
    # packed: the outputs of sentence 1 do not depend on sentences 0 and 2 at all
    packed = torch.cat(sents, dim=1).requires_grad_(True)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    sl = _slices(sents)
    layer(packed, line(packed.shape[1]), cu_seqlens=cu)[:, sl[1]].sum().backward()
    g = packed.grad[0]
    assert g[sl[0]].abs().max() <= tol and g[sl[2]].abs().max() <= tol
    assert g[sl[1]].abs().max() > 0


def test_neumann_default_terms_follow_the_longest_sentence():
    # UG's finite sum with default K = diameter of the longest sentence: the longest sentence
    # of a padded batch equals that sentence alone, whatever the padding
    layer = _layer("mixer", "general", "neumann", "two_cycle")
    sents = _sentences(5)
    want = _alone(layer, sents)
    x, mask = _padded(sents, T=max(LENGTHS) + 4)
    y = layer(x, line(x.shape[1]), attention_mask=mask)
    i = LENGTHS.index(max(LENGTHS))
    _assert_same(y[i:i + 1, :LENGTHS[i]], want[i])


def test_a_mask_of_ones_changes_nothing():
    layer = _layer("block", "dag", "auto", "row")
    x = torch.randn(2, 10, D, dtype=torch.float64)
    y = layer(x, line(10))
    _assert_same(layer(x, line(10), attention_mask=torch.ones(2, 10)), y)
    _assert_same(layer(x, line(10), seq_idx=torch.zeros(2, 10, dtype=torch.long)), y)


@pytest.mark.parametrize("kernel", [4, 5])
@pytest.mark.parametrize("causal, reverse", [(False, False), (True, False), (True, True)])
def test_segmented_conv_path_equals_conv1d_on_one_run(causal, reverse, kernel):
    # odd centred kernels take the conv's own padding, the others an explicit pad: both must
    # equal the tap-by-tap reference
    torch.manual_seed(0)
    conv = LineConv(6, kernel_size=kernel, causal=causal).double()
    topo = line(11, directed=causal, reverse=reverse)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    seg = Segments.build(2, 11, seq_idx=torch.zeros(2, 11, dtype=torch.long))
    _assert_same(conv._segmented(x, topo, seg), conv(x, topo))
    # and on two runs it equals running the runs separately
    seg2 = Segments.build(2, 11, cu_seqlens=None, seq_idx=torch.tensor([[0] * 4 + [1] * 7] * 2))
    got = conv(x, topo, segments=seg2)
    _assert_same(got[:, :4], conv(x[:, :4], line(4, directed=causal, reverse=reverse)))
    _assert_same(got[:, 4:], conv(x[:, 4:], line(7, directed=causal, reverse=reverse)))


def test_causal_line_mixer_with_a_mask():
    torch.manual_seed(0)
    m = ChimeraMixer(D, conv="causal_line", **SMALL).double()
    sents = _sentences(7)
    x, mask = _padded(sents, left=True)
    y = m(x, line(x.shape[1], directed=True), attention_mask=mask)
    for i, s in enumerate(sents):
        n = s.shape[1]
        _assert_same(y[i:i + 1, -n:], m(s, line(n, directed=True)))


def test_segments_from_each_description():
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    s = Segments.build(2, 4, attention_mask=mask)
    assert s.ids.tolist() == [[0, 0, 1, 2], [0, 1, 1, 1]]  # a hole splits a row into two runs
    assert s.real.tolist() == mask.bool().tolist()
    assert s.max_len == 3 and not s.single_run
    assert Segments.build(2, 4, attention_mask=mask[1:].expand(2, 4)).single_run
    c = Segments.build(1, 5, cu_seqlens=torch.tensor([0, 2, 2, 5]))  # empty sequences are fine
    assert c.ids.tolist() == [[0, 0, 1, 1, 1]] and c.max_len == 3
    q = Segments.build(1, 5, seq_idx=torch.tensor([[0, 0, 1, 1, -1]]),
                       attention_mask=torch.tensor([[1, 0, 1, 1, 1]]))
    assert q.ids.tolist() == [[0, 1, 2, 2, 3]] and q.real.tolist() == [[1, 0, 1, 1, 0]]
    assert Segments.build(1, 5) is None
    e = Segments.build(1, 3, attention_mask=torch.zeros(1, 3))
    assert e.max_len == 0


def test_bad_varlen_inputs_get_clear_errors():
    m = ChimeraMixer(D, conv="line", **SMALL)
    x = torch.randn(2, 6, D)
    topo = line(6)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, T\)"):
        m(x, topo, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="1 \\(real token\\) or 0"):
        m(x, topo, attention_mask=torch.full((2, 6), 2))
    with pytest.raises(ValueError, match="cover every token"):
        m(x[:1], topo, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cover every token"):
        m(x[:1], topo, cu_seqlens=torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="non-decreasing"):
        m(x[:1], topo, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="one packed row"):
        m(x, topo, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="integer"):
        m(x[:1], topo, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="seq_idx must have shape"):
        m(x, topo, seq_idx=torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx must be an integer"):
        m(x, topo, seq_idx=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="-1 for padding"):
        m(x, topo, seq_idx=torch.full((2, 6), -2))
    with pytest.raises(ValueError, match="not both"):
        m(x[:1], topo, seq_idx=torch.zeros(1, 6, dtype=torch.long),
          cu_seqlens=torch.tensor([0, 6]))
    seg = Segments.build(2, 6, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="not both"):
        m(x, topo, segments=seg, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"segments are for a \(2, 6\) batch"):
        m(torch.randn(3, 6, D), topo, segments=seg)
    g = ChimeraMixer(D, conv="grid", **SMALL)
    with pytest.raises(ValueError, match="for line topologies"):
        g(torch.randn(1, 9, D), grid(3, 3), attention_mask=torch.ones(1, 9))
