"""kernels/group_norm.py's group_norm_stats and group_norm_apply launchers (for GroupNorm over a
tensor's tiles: the tiles' statistics combined, then each tile normalized with the whole's), on
each of the kernels' paths (test_triton_group_norm.py's `path` fixture), under the interpreter
without a GPU: against torch's float64 var_mean and group_norm.
"""
import types

import pytest
import torch

from cases import ACTIVATIONS, CHANNELS_LAST, DEVICE, TF, err, make, params, tolerance

triton_tests = pytest.importorskip("test_triton_group_norm")  # needs triton
path = triton_tests.path
from normops.kernels import group_norm as kernels  # noqa: E402

SHAPES = [((2, 6, 5, 3), 3), ((1, 8, 3, 2, 5), 4), ((3, 6), 6), ((2, 4, 7, 7), 1)]


def _x(shape, dtype, layout):
    x = make(shape, dtype, offset=-20.0, requires_grad=False).to(DEVICE)  # a large offset: the pivot's
    return x.contiguous(memory_format=CHANNELS_LAST[len(shape)]) if layout == "channels_last" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=str)
def test_stats(shape, groups, layout, dtype, path):
    if layout == "channels_last" and len(shape) < 4:
        pytest.skip("no channels_last layout")
    x = _x(shape, dtype, layout)
    mean, m2 = kernels.group_norm_stats(x, groups)
    xg = x.double().reshape(shape[0], groups, -1)
    var, ref_mean = torch.var_mean(xg, -1, correction=0)
    assert mean.dtype == m2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert mean.shape == m2.shape == (shape[0], groups)
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # fp32 accumulation of exact (rounded) inputs
    assert err(mean, ref_mean) <= tol * 20
    assert err(m2 / xg.shape[-1], var) <= tol * var.max().item()


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", SHAPES[:2], ids=str)
def test_apply(shape, groups, layout, dtype, activation, path):
    """Normalizing with the statistics of group_norm_stats is group_norm: within torch's own error."""
    x = _x(shape, dtype, layout)
    w, b = (t.detach().to(DEVICE) for t in params((shape[1],), dtype))
    mean, m2 = kernels.group_norm_stats(x, groups)
    rstd = torch.rsqrt(m2 / (x[0].numel() // groups) + 1e-5)
    y = kernels.group_norm_apply(x, groups, mean, rstd, w, b, activation or "none")
    act = ACTIVATIONS.get(activation, lambda t: t)
    ref = act(TF.group_norm(x.double(), groups, w.double(), b.double()))
    same = act(TF.group_norm(x, groups, w, b))
    assert y.dtype == dtype and y.is_contiguous(memory_format=CHANNELS_LAST[len(shape)] if layout == "channels_last"
                                                else torch.contiguous_format)
    assert err(y, ref) <= tolerance(same, ref, dtype)


def test_apply_takes_given_statistics(path):
    """The statistics are the caller's, not x's: with mean 0 and rstd 1, y is x * w + b."""
    x = _x((2, 6, 5, 3), torch.float32, "nchw")
    w, b = (t.detach().to(DEVICE) for t in params((6,), torch.float32))
    ones = torch.ones(2, 3, device=DEVICE)
    y = kernels.group_norm_apply(x, 3, ones * 0, ones, w, b, "none")
    torch.testing.assert_close(y, x * w[:, None, None] + b[:, None, None])


# --- offsets past int32 -----------------------------------------------------------------------
# A sample of 2**31 elements or more takes the LARGE flag: int64 row starts (a channel's, NCHW; a
# position's, channels_last) and int32 offsets within them, and an int64 group size. A real one is 4 GiB in bf16 (its input, again its
# output), past what the interpreter can run here: these run the LARGE code at small shapes (the
# threshold lowered to 0), and the same results as the int32 code's, bit for bit, say the int64
# arithmetic computes the same offsets. (The real size: the GPU run, and the torch backend's test
# in test_ada_group_norm.py measures its memory.)

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_offsets_path(layout, path, monkeypatch):
    import normops
    from cases import F
    x = _x((2, 8, 3, 2, 5), torch.float32, layout).requires_grad_()
    w, b = (t.detach().to(DEVICE).requires_grad_() for t in params((8,), torch.float32))
    # both runs on the configurations a LARGE sample gets (no looped kernels), where path gives none
    real = kernels.GroupNormConfig
    as_large = types.SimpleNamespace(forward=lambda *a: real.forward(*a[:-1], large=True),
                                     backward=lambda *a: real.backward(*a[:-1], large=True))
    monkeypatch.setattr(kernels, "GroupNormConfig", as_large)
    results = []
    for threshold in (2**31, 0):
        monkeypatch.setattr(kernels, "LARGE_OFFSETS", threshold)
        with normops.backend("triton"):
            y = F.group_norm(x, 4, w, b, activation="silu")
            grads = torch.autograd.grad(y, (x, w, b), torch.ones_like(y))
            stats = kernels.group_norm_stats(x.detach(), 4)
        results.append((y,) + grads + stats)
    for int32, int64 in zip(*results):
        assert torch.equal(int32, int64)


def test_large_samples_take_the_kernels():
    """A sample past 2**31 elements is no longer sent to the torch fallback (meta tensor: no memory)."""
    from normops.backends import triton_backend
    x = torch.empty((1, 128, 16, 1024, 1024), dtype=torch.bfloat16, device="meta")
    assert kernels.supported(x, 32) and triton_backend.fallback("group_norm", x, 32) is None


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_large_samples_take_no_looped_kernels(channels_last):
    """A sample of 2**31 elements or more gets no looped configuration (kernels/config.py: the LARGE
    looped kernels spilled), even where the looped ones are the pick below 2**31 (batch 64)."""
    from normops.kernels.config import GroupNormConfig
    for n, c, s, g in [(64, 1280, 2**21, 32), (1, 128, 2**24, 32), (2, 1024, 2**21, 1), (64, 256, 2**23, 32)]:
        for make in (GroupNormConfig.forward, GroupNormConfig.backward):
            cfg = make(n, c, s, g, channels_last, 132, 2, large=True)
            assert cfg.one_pass or cfg.split > 1, (n, c, s, g, make.__name__, cfg)
    small = GroupNormConfig.forward(2, 320, 4096, 32, channels_last, 132, 2)
    assert not small.one_pass and small.split == 1  # the looped pick this guards against
