"""GroupNorm over chunks: group_norm_stats of each piece -> combine_group_stats -> group_norm_apply
of each piece equals group_norm of the whole, for splits along time (video) and H/W (tiles),
uneven, with empty pieces and pieces of one value, in every dtype and layout; forward and backward
against torch's group_norm by the tolerance rule (tests/cases.py), and the NumPy reference.

The inputs are shifted (mean 3, std 2, ``cases.make``), and one test puts the mean at 1e4 with
std 1: a variance from E[x^2] - E[x]^2 in fp32 would be off by ~10 there, the two-pass pieces and
Chan's combination by ~1e-6.
"""
import itertools

import pytest
import torch

import normops
import normops.functional as nf
from normops.ops import group_stats as group_stats_ops
from cases import CHANNELS_LAST, assert_close_to_reference, err, make, params, to64, torch_group_norm

# (shape, num_groups, {dim: piece sizes}): pieces along time (dim 2 of a video), along H and W
# (a grid of tiles), uneven, empty, one frame / column wide, and pieces of one value per group
SPLITS = [
    ((2, 8, 5, 4, 6), 4, {2: [2, 0, 1, 2]}),         # video: frames 2 + none + 1 + 2
    ((2, 6, 7, 9), 3, {2: [3, 4], 3: [1, 5, 3]}),      # a 2 x 3 grid of uneven tiles
    ((1, 2, 1, 5), 2, {3: [1, 1, 3]}),                 # tiles of one value per group (C/G = 1)
    ((3, 4, 10), 2, {2: [7, 3]}),                      # 1-D sequence
]
SPLIT_IDS = ["video-time", "tiles-hw", "one-value", "seq"]


def tiles(x, split):
    """x split along each dim of ``split`` in turn: a nested list of pieces (views)."""
    if not split:
        return x
    (dim, sizes), rest = next(iter(split.items())), dict(list(split.items())[1:])
    return [tiles(p, rest) for p in x.split(sizes, dim)]


def leaves(t):
    return [t] if isinstance(t, torch.Tensor) else [leaf for s in t for leaf in leaves(s)]


def assemble(t, dims):
    """The inverse of ``tiles``: nested pieces concatenated back along ``dims`` (outermost first)."""
    if isinstance(t, torch.Tensor):
        return t
    return torch.cat([assemble(s, dims[1:]) for s in t], dims[0])


def chunked(x, split, num_groups, weight=None, bias=None, eps=1e-5, activation=None, order=None):
    """GroupNorm of x computed piece by piece: stats of each, combined, applied to each."""
    pieces = tiles(x, split)
    stats = [nf.group_norm_stats(p, num_groups) for p in leaves(pieces)]
    whole = nf.combine_group_stats(stats if order is None else [stats[i] for i in order])

    def apply(t):
        if isinstance(t, torch.Tensor):
            return nf.group_norm_apply(t, whole, num_groups, weight, bias, eps, activation=activation)
        return [apply(s) for s in t]

    return assemble(apply(pieces), list(split))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", SPLITS, ids=SPLIT_IDS)
def test_chunked_equals_whole(case, dtype):
    """Forward and backward (x, weight, bias) of the pieces' GroupNorm within the tolerance rule of
    torch's group_norm of the whole."""
    shape, g, split = case
    x = make(shape, dtype)
    w, b = params(shape[1], dtype)
    assert_close_to_reference(lambda x, w, b: chunked(x, split, g, w, b), lambda x, w, b: torch_group_norm(x, g, w, b),
                              [x, w, b], "torch", dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_chunked_activation_channels_last(activation):
    """A channels_last tile grid with a fused activation: values, gradients and the layout kept."""
    shape, g, split = SPLITS[1]
    fmt = CHANNELS_LAST[len(shape)]
    x = make(shape, torch.float32).detach().contiguous(memory_format=fmt).requires_grad_()
    w, b = params(shape[1], torch.float32)
    pieces = leaves(tiles(x, split))
    stats = nf.combine_group_stats([nf.group_norm_stats(p, g) for p in pieces])
    assert nf.group_norm_apply(pieces[1], stats, g, w, b, activation=activation).is_contiguous(memory_format=fmt)
    assert_close_to_reference(lambda x, w, b: chunked(x, split, g, w, b, activation=activation),
                              lambda x, w, b: torch_group_norm(x, g, w, b, activation=activation),
                              [x, w, b], "torch", torch.float32)


@pytest.mark.parametrize("case", SPLITS, ids=SPLIT_IDS)
def test_float64_stats_exact(case):
    """In float64 the combined statistics are the whole's up to summation order (~1e-15
    relative), and so are the NumPy reference's."""
    shape, g, split = case
    x = make(shape, torch.float64, requires_grad=False)
    whole = nf.group_norm_stats(x, g)
    combined = nf.combine_group_stats([nf.group_norm_stats(p, g) for p in leaves(tiles(x, split))])
    with normops.backend("numpy"):
        numpy_combined = nf.combine_group_stats([nf.group_norm_stats(p, g) for p in leaves(tiles(x, split))])
    xg = x.reshape(shape[0], g, -1)
    var, mean = torch.var_mean(xg, -1, correction=0)
    for s in (whole, combined, numpy_combined):
        assert s.count.dtype == torch.int64 and (s.count == xg.shape[-1]).all()
        torch.testing.assert_close(s.mean, mean, rtol=1e-14, atol=0)
        torch.testing.assert_close(s.m2 / s.count, var, rtol=1e-13, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", SPLITS, ids=SPLIT_IDS)
def test_numpy_reference(case, dtype):
    """The NumPy backend's pieces give the float64 group_norm of the whole, rounded to dtype; it
    has no autograd, and says so."""
    shape, g, split = case
    x = make(shape, dtype, requires_grad=False)
    w, b = params(shape[1], dtype)
    w, b = w.detach(), b.detach()
    ref = torch_group_norm(*to64([x, w, b])[:1], g, *to64([w, b]), activation="silu")
    with normops.backend("numpy"):
        y = chunked(x, split, g, w, b, activation="silu")
    assert y.dtype == dtype
    assert err(y, ref) <= {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype] * ref.abs().max()
    with normops.backend("numpy"), pytest.raises(RuntimeError, match="numpy backend have no autograd"):
        chunked(x.requires_grad_(), split, g, w, b)


def test_combine_order_and_grouping():
    """Pieces with far-apart means and counts combine to the same statistics in any order (the
    tree's grouping changes with it), to fp32 rounding, and to the whole's: the mean within one
    rounding of the largest piece mean (eps * 1e3: measured 4e-5 at worst), M2 within 1e-6
    relative (measured 2e-7; the whole's own fp32 error: 7e-8)."""
    g = torch.Generator().manual_seed(3)
    pieces = [(float(m) + s * torch.randn(2, 4, n, generator=g)) for m, s, n in
              [(0, 1, 5), (100, 0.1, 1), (-50, 3, 40), (7, 1, 0), (2, 5, 13), (1e3, 1, 2), (-3, 2, 8)]]
    stats = [nf.group_norm_stats(p, 2) for p in pieces]
    whole = nf.group_norm_stats(torch.cat(pieces, 2), 2)
    ref = nf.group_norm_stats(torch.cat(pieces, 2).double(), 2)
    for order in itertools.islice(itertools.permutations(range(len(pieces))), 0, 5040, 997):
        combined = nf.combine_group_stats([stats[i] for i in order])
        assert torch.equal(combined.count, whole.count)
        assert err(combined.mean, ref.mean) <= torch.finfo(torch.float32).eps * 1e3
        torch.testing.assert_close(combined.m2, ref.m2.float(), rtol=1e-6, atol=0)
    # associativity: combine(combine(a, b), c) == combine(a, combine(b, c)) to rounding
    a, b, c = stats[:3]
    left = nf.combine_group_stats([nf.combine_group_stats([a, b]), c])
    right = nf.combine_group_stats([a, nf.combine_group_stats([b, c])])
    assert err(left.mean, right.mean) <= torch.finfo(torch.float32).eps * 100
    torch.testing.assert_close(left.m2, right.m2, rtol=1e-6, atol=0)


def test_large_mean_small_variance():
    """Mean 1e4, std 1, in fp32, 64 pieces: E[x^2] - E[x]^2 would lose the variance (fp32 holds
    1e8 to +-4); the two-pass pieces and Chan's delta form keep it to ~1e-5."""
    x = (1e4 + torch.randn(2, 4, 64, 100, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    stats = nf.combine_group_stats([nf.group_norm_stats(p, 2) for p in x.float().split(1, 2)])
    var = x.reshape(2, 2, -1).var(-1, correction=0)
    assert ((stats.m2.double() / stats.count - var).abs() / var).max() < 1e-4


def test_blocked_passes(monkeypatch):
    """Pieces of BLOCK values in the statistics' passes (a tiny BLOCK here, so every split runs)
    give the statistics of one pass, bf16 included."""
    x = make((2, 6, 9, 7), torch.bfloat16, requires_grad=False)
    one = nf.group_norm_stats(x, 3)
    monkeypatch.setattr(group_stats_ops, "BLOCK", 10)
    assert len(group_stats_ops._pieces(x.unflatten(1, (3, 2)))) == 9  # 2*3*2*7 = 84 values per index > 10: one each
    blocked = nf.group_norm_stats(x, 3)
    for u, v in zip(one, blocked):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_empty_and_single_piece():
    """An empty piece's statistics are count 0, mean 0, m2 0 and change nothing; one piece
    combines to itself; stats of all-empty pieces cannot normalize."""
    x = make((2, 4, 0, 3), torch.float32, requires_grad=False)
    s = nf.group_norm_stats(x, 2)
    assert (s.count == 0).all() and (s.mean == 0).all() and (s.m2 == 0).all()
    y = make((2, 4, 5, 3), torch.float32, requires_grad=False)
    t = nf.group_norm_stats(y, 2)
    assert all(u is v for u, v in zip(nf.combine_group_stats([t]), t))
    for u, v in zip(nf.combine_group_stats([s, t, s]), t):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="count 0"):
        nf.group_norm_apply(y, nf.combine_group_stats([s, s]), 2)
    assert nf.group_norm_apply(x, t, 2).shape == x.shape  # an empty piece normalizes to an empty output


def test_errors():
    x = make((2, 6, 4, 4), torch.float32, requires_grad=False)
    s = nf.group_norm_stats(x, 3)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nf.group_norm_stats(x, 4)
    with pytest.raises(TypeError, match="'num_groups' must be int"):
        nf.group_norm_stats(x, 2.0)
    with pytest.raises(ValueError, match=r"stats of shape \[N, num_groups\] = \[2, 2\]"):
        nf.group_norm_apply(x, s, 2)  # the statistics of 3 groups, applied as 2
    with pytest.raises(ValueError, match=r"= \[1, 3\]"):
        nf.group_norm_apply(x[:1], s, 3)  # another batch's statistics
    with pytest.raises(TypeError, match="expected stats in torch.float64"):
        nf.group_norm_apply(x.double(), s, 3)
    with pytest.raises(TypeError, match="expected a GroupStats"):
        nf.group_norm_apply(x, (s.mean, s.m2), 3)
    with pytest.raises(TypeError, match="int64 count"):
        nf.group_norm_apply(x, (s.count.float(), s.mean, s.m2), 3)
    with pytest.raises(ValueError, match="expected weight of shape"):
        nf.group_norm_apply(x, s, 3, torch.ones(3))
    with pytest.raises(ValueError, match="at least one GroupStats"):
        nf.combine_group_stats([])
    with pytest.raises(TypeError, match="sequence of GroupStats"):
        nf.combine_group_stats(s.mean)
    with pytest.raises(ValueError, match=r"stats\[1\] is \[2, 2\]"):
        nf.combine_group_stats([s, nf.group_norm_stats(x, 2)])
    with pytest.raises(ValueError, match=r"stats\[1\]"):
        nf.combine_group_stats([s, nf.group_norm_stats(x.double(), 3)])


# --- the triton backend: the kernels without a gradient, the torch ops with one -------------------
def _spied(monkeypatch):
    """Counts of the GroupNorm stats/apply launcher calls (normops.kernels.group_norm), spied on."""
    from normops.kernels import group_norm as kernels
    calls = {"group_norm_stats": 0, "group_norm_apply": 0}
    for name in calls:
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(kernels, name, spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", SPLITS, ids=SPLIT_IDS)
def test_triton_kernels_launched(case, layout, dtype, monkeypatch):
    """Without a gradient the triton backend's stats and apply launch the kernels (a stats launch a
    non-empty piece, an apply launch a piece), count int64 from the shape; the pieces' GroupNorm is
    within the tolerance rule of torch's of the whole, and their statistics agree with the torch
    ops' (mean to fp32 rounding at the data's offset 3, M2 to 1e-5 relative: two fp32 summation
    orders)."""
    from cases import CUDA, on_device
    shape, g, split = case
    if layout == "channels_last" and len(shape) not in CHANNELS_LAST:
        pytest.skip("no channels_last layout for a 3-D input")
    fmt = CHANNELS_LAST[len(shape)] if layout == "channels_last" else None
    x = on_device(make(shape, dtype), fmt).detach()
    w, b = (on_device(t, None).detach() for t in params(shape[1], torch.float32))
    pieces = leaves(tiles(x, split))
    calls = _spied(monkeypatch)
    with torch.no_grad(), normops.backend("triton"):
        y = chunked(x, split, g, w, b, activation="silu")
        stats = [nf.group_norm_stats(p, g) for p in pieces]
    non_empty = sum(p.numel() > 0 for p in pieces)
    assert calls == {"group_norm_stats": 2 * non_empty, "group_norm_apply": non_empty}, calls
    with torch.no_grad(), normops.backend("torch"):
        expected = [nf.group_norm_stats(p, g) for p in pieces]
    for s, e in zip(stats, expected):
        assert s.count.dtype == torch.int64 and torch.equal(s.count, e.count)
        torch.testing.assert_close(s.mean, e.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s.m2, e.m2, rtol=1e-5, atol=1e-5)
    same = torch_group_norm(x, g, w.to(dtype), b.to(dtype), activation="silu")
    ref = torch_group_norm(x.double(), g, w.double(), b.double(), activation="silu")
    assert y.dtype == dtype and y.shape == x.shape
    from cases import tolerance
    assert err(y, ref) <= tolerance(same, ref, dtype)


def test_triton_gradient_takes_the_torch_ops(monkeypatch):
    """With a gradient the triton backend runs the differentiable torch ops (no kernel launch), and
    the pieces' gradients are GroupNorm's of the whole."""
    shape, g, split = SPLITS[1]
    x = make(shape, torch.float32)
    w, b = params(shape[1], torch.float32)
    calls = _spied(monkeypatch)
    assert_close_to_reference(lambda x, w, b: chunked(x, split, g, w, b), lambda x, w, b: torch_group_norm(x, g, w, b),
                              [x, w, b], "triton", torch.float32)
    assert calls == {"group_norm_stats": 0, "group_norm_apply": 0}
