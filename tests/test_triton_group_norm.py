"""The Triton GroupNorm/InstanceNorm kernels (kernels/group_norm.py) through the "triton" backend.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET),
at small shapes; with one, on CUDA, and the real-size tests at the end run too. Results obey the
tolerance rule of cases.py (torch's own same-dtype error as the yardstick) and match the NumPy
reference. The split-reduction path is reached at small shapes by lowering the one-pass limits.
"""
import pytest
import torch

pytest.importorskip("triton")

import normops  # noqa: E402
from cases import (  # noqa: E402
    ACTIVATIONS, CHANNELS_LAST, CUDA, DEVICE, F, GROUP_SHAPES, LOW, TF, assert_close_to_reference, err,
    layout_copies, make, on_device, params)
from normops.backends import numpy_backend  # noqa: E402
from normops.kernels import config  # noqa: E402
from normops.kernels import group_norm as kernels  # noqa: E402


@pytest.fixture(params=["one_pass", "looped", "split"])
def path(request, monkeypatch):
    """Run the test on the one-pass kernels, then with the one-pass limits lowered to nothing and
    small tiles (several a group), on the looped kernels (one program a group block, a persistent
    grid of fewer programs than tasks) and on the split ones (every group cut into chunks, even
    2x6x5x3's)."""
    if request.param != "one_pass":
        monkeypatch.setattr(config, "GN_FWD_ONE_PASS_MAX", 0)
        monkeypatch.setattr(config, "GN_BWD_ONE_PASS_MAX", 0)
        for tile in ("GN_LOOP_TILE", "GN_LOOP_TILE_CHANNELS_LAST", "GN_BWD_LOOP_TILE_CHANNELS_LAST", "GN_SPLIT_TILE",
                     "GN_SPLIT_TILE_CHANNELS_LAST"):
            monkeypatch.setattr(config, tile, 32)
        monkeypatch.setattr(kernels, "programs_per_wave", lambda device, warps: 2)
        # looped vs split is decided by the split's one launch more: made prohibitive, or free
        monkeypatch.setattr(config, "GN_LAUNCH_NS", 1e30 if request.param == "looped" else -1e30)
    return request.param


def _group_norm(groups, activation=None):
    ours = lambda x, w, b: F.group_norm(x, groups, w, b, activation=activation)  # noqa: E731
    ref = lambda x, w, b: ACTIVATIONS.get(activation, lambda t: t)(TF.group_norm(x, groups, w, b))  # noqa: E731
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("shape,groups", [s for s in GROUP_SHAPES if s[0][0] > 0], ids=str)
def test_parity(shape, groups, dtype, path):
    """G=1, G=C, odd C/G, 1x1 spatial, 1-D/2-D/3-D and no spatial dims."""
    x = on_device(make(shape, dtype))
    w, b = (on_device(t) for t in params((shape[1],), dtype))
    assert_close_to_reference(*_group_norm(groups), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((2, 64, 4, 4), 32), ((3, 5, 4, 3), 5),
                                          ((2, 6, 2, 3, 3), 2), ((2, 8, 3, 2, 5), 8)], ids=str)
def test_channels_last(shape, groups, dtype, path):
    """channels_last(_3d) is read and written in place, and the output and dx keep the layout."""
    fmt = CHANNELS_LAST[len(shape)]
    x = on_device(make(shape, dtype), fmt)
    w, b = (on_device(t) for t in params((shape[1],), dtype))
    dy = torch.randn(shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    with layout_copies() as copies, normops.backend("triton"):
        y = F.group_norm(x, groups, w, b, activation="silu")
        dx, = torch.autograd.grad(y, x, dy)
    assert not copies, f"layout copies: {copies}"
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    assert_close_to_reference(*_group_norm(groups, "silu"), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_activation(activation, dtype, channels_last, path):
    """Each fused activation against torch's group_norm followed by the activation."""
    x = on_device(make((2, 12, 5, 7), dtype, offset=0.2), torch.channels_last if channels_last else None)
    w, b = (on_device(t) for t in params((12,), dtype))
    assert_close_to_reference(*_group_norm(4, activation), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_partial_affine_and_masks(affine, path):
    """Without weight or bias, and gradients asked for x alone or the parameters alone."""
    x = on_device(make((2, 6, 9), torch.float32))
    w, b = (on_device(t) for t in params((6,), torch.float32))
    w = None if affine == "none" else w
    b = b if affine == "both" else None
    inputs = [t for t in (x, w, b) if t is not None]
    fn = lambda x, *p: F.group_norm(x, 3, *p, activation="gelu")  # noqa: E731
    ref = lambda x, *p: TF.gelu(TF.group_norm(x, 3, *p))  # noqa: E731
    assert_close_to_reference(fn, ref, inputs, "triton", torch.float32)
    if w is not None:
        dy = torch.randn(2, 6, 9, device=DEVICE)
        with normops.backend("triton"):
            dw_only = torch.autograd.grad(F.group_norm(x, 3, w, b), w, dy)[0]
            dx_only = torch.autograd.grad(F.group_norm(x, 3, w, b), x, dy)[0]
        dx_ref, dw_ref = torch.autograd.grad(TF.group_norm(x, 3, w, b), (x, w), dy)
        assert err(dw_only, dw_ref) < 1e-4 and err(dx_only, dx_ref) < 1e-4


def test_large_offsets(path):
    """x = 1e4 + randn in fp32: the statistics are exact enough (Chan/two-pass, never
    E[x^2] - E[x]^2), and the outputs obey the rule against fp64."""
    x = on_device(make((2, 8, 6, 5), torch.float32, offset=1e4, scale=1.0))
    w, b = (on_device(t) for t in params((8,), torch.float32))
    assert_close_to_reference(*_group_norm(2), [x, w, b], "triton", torch.float32)
    with normops.backend("triton"):
        _, mean, rstd = kernels.group_norm_fwd(x.detach(), 2, None, None, 1e-5, "none", True)
    _, rmean, rrstd = numpy_backend.group_norm_fwd(x.detach(), 2, None, None, 1e-5, "none", True)
    # the mean to a few fp32 ulps (one is 1e-3 at 1e4; summation orders differ by one or two)
    assert err(mean, rmean) < 4 * torch.finfo(torch.float32).eps * rmean.abs().max().item()
    assert err(rstd, rrstd) < 1e-4 * rrstd.abs().max().item()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_numpy_reference(channels_last, path):
    """Statistics and every gradient against the float64 NumPy oracle, in fp32, with silu."""
    x = make((2, 6, 5, 4), torch.float32, requires_grad=False).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w, b = (t.detach().to(DEVICE) for t in params((6,), torch.float32))
    y, mean, rstd = kernels.group_norm_fwd(x, 3, w, b, 1e-5, "silu", True)
    dy = torch.randn_like(y)
    grads = kernels.group_norm_bwd(dy, x, 3, w, b, mean, rstd, "silu", [True, True, True])
    ry, rmean, rrstd = numpy_backend.group_norm_fwd(x, 3, w, b, 1e-5, "silu", True)
    rgrads = numpy_backend.group_norm_bwd(dy, x, 3, w, b, rmean, rrstd, "silu", [True, True, True])
    assert err(y, ry) < 1e-5 and err(mean, rmean) < 1e-5 and err(rstd, rrstd) < 1e-6
    for g, r in zip(grads, rgrads):
        assert err(g, r) < 1e-4 * max(1.0, r.abs().max().item())


def test_split_heuristic_without_patching():
    """With the real limits: a group of 33K elements and N x G = 1 splits over the CPU
    interpreter's 4 "SMs", and still equals torch."""
    cfg = config.GroupNormConfig.forward(1, 2, 128 * 130, 1, False, 4, 4)  # fp32, as x below
    assert not cfg.one_pass and cfg.split == 9  # 9 tiles of 2048 positions, a chunk each (4 programs an SM)
    x = on_device(make((1, 2, 128, 130), torch.float32))
    w, b = (on_device(t) for t in params((2,), torch.float32))
    assert_close_to_reference(*_group_norm(1, "silu"), [x, w, b], "triton", torch.float32)


def test_looped_heuristic_unroll_by_dtype():
    """The NCHW looped forward takes two fp32 tiles a loop iteration and four 16-bit ones (the same
    bytes in flight): the SD VAE decoder's 1x512x64x64 (32 groups, batch 1) runs looped in every
    dtype on an H100's 132 SMs, where bf16 at two tiles was latency-bound and split."""
    for elem, unroll in ((4, 2), (2, 4)):
        cfg = config.GroupNormConfig.forward(1, 512, 64 * 64, 32, False, 132, elem)
        assert not cfg.one_pass and cfg.split == 1 and (cfg.unroll, cfg.normalize_unroll) == (unroll, unroll)
    cl = config.GroupNormConfig.forward(2, 320, 64 * 64, 32, True, 132, 2)  # channels_last: as it was
    assert not cl.one_pass and cl.split == 1 and (cl.unroll, cl.normalize_unroll) == (2, 4)


@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 5, 6), (1, 2, 3, 2, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_instance_norm(shape, dtype, path):
    """InstanceNorm is GroupNorm with G == C: affine, fused relu, and its running statistics."""
    x = on_device(make(shape, dtype))
    w, b = (on_device(t) for t in params((shape[1],), dtype))
    assert_close_to_reference(lambda x, w, b: F.instance_norm(x, weight=w, bias=b, activation="relu"),
                              lambda x, w, b: TF.relu(TF.instance_norm(x, weight=w, bias=b)), [x, w, b],
                              "triton", dtype)
    ours = [torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)]
    ref = [t.double() for t in ours]  # fp64 like the reference's input: CUDA's batch norm misreads mixed ones
    with normops.backend("triton"):
        F.instance_norm(x.detach(), *ours, momentum=0.3)
    TF.instance_norm(x.detach().double(), *ref, momentum=0.3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert err(ours[0], ref[0]) < tol and err(ours[1], ref[1]) < tol * ref[1].abs().max().item()


def test_instance_norm_constant_channel_running_var():
    """A constant instance has variance 0: the running variance stays exactly torch's (0 here),
    never the negative value that recovering var from rstd (rstd^-2 - eps) would give."""
    x = torch.full((2, 4, 8, 8), 1.0, device=DEVICE)
    ours = [torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)]
    with normops.backend("triton"):
        F.instance_norm(x, *ours, momentum=1.0, activation="relu")
    assert torch.equal(ours[1], torch.zeros(4, device=DEVICE)) and torch.equal(ours[0], torch.ones(4, device=DEVICE))


def test_instance_norm_module_train_then_eval():
    """nn.InstanceNorm2d with track_running_stats: train steps update the statistics, eval uses
    them (use_input_stats=False runs outside the group-norm kernels)."""
    torch.manual_seed(0)
    ours, ref = normops.nn.InstanceNorm2d(3, affine=True, track_running_stats=True), \
        torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ours.to(DEVICE), ref.to(DEVICE)
    with normops.backend("triton"):
        for seed in range(3):
            x = make((2, 3, 6, 5), torch.float32, seed=seed, requires_grad=False).to(DEVICE)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck(channels_last, path):
    """gradcheck in fp64 through the Triton forward and backward kernels, and gradgradcheck (its
    double backward is a torch composition that calls the backward kernels); fast mode (random
    directions) for the second order, and for both on the split path's four kernels: the
    interpreter would otherwise take minutes."""
    shape = (1, 4, 2, 2) if channels_last else (2, 4, 3)
    x = make(shape, torch.float64).detach().to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    w, b = (t.detach().to(DEVICE).requires_grad_() for t in params((4,), torch.float64))
    with normops.backend("triton"):
        for fn in (lambda x, w, b: F.group_norm(x, 2, w, b, activation="silu"),
                   lambda x, w, b: F.instance_norm(x, weight=w, bias=b)):
            assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=path == "split")
            assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_deterministic(path):
    """dW/dB are per-chunk partials summed in a fixed order: bitwise equal across runs."""
    x = on_device(make((3, 16, 9, 7), torch.float32))
    w, b = (on_device(t) for t in params((16,), torch.float32))
    dy = torch.randn(3, 16, 9, 7, device=DEVICE)
    with normops.backend("triton"):
        runs = [torch.autograd.grad(F.group_norm(x, 4, w, b), (x, w, b), dy) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def test_wide_groups_fall_back_to_torch():
    """More than 1024 channels a group has no tile here: the torch backend's kernels run, same result."""
    assert not kernels.supported(torch.empty(1, 2048, 1), 1) and kernels.supported(torch.empty(1, 1024, 1), 1)
    x = on_device(make((2, 2048), torch.float32))
    w, b = (on_device(t) for t in params((2048,), torch.float32))
    assert_close_to_reference(*_group_norm(1), [x, w, b], "triton", torch.float32)


# --- real sizes, on a GPU only ------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,groups,activation", [
    ((2, 320, 64, 64), 32, None), ((2, 1280, 16, 16), 32, "silu"), ((1, 512, 128, 128), 32, "silu"),
    ((1, 128, 8, 256, 256), 32, "silu"), ((4, 256, 64, 64), 256, None), ((1, 64, 256, 256), 64, "relu"),
    ((64, 1024, 7, 7), 1, None)], ids=str)
def test_cuda_real_sizes(shape, groups, activation, layout, dtype):
    x = make(shape, dtype, device="cuda")
    if layout == "channels_last":
        x = x.detach().contiguous(memory_format=CHANNELS_LAST[len(shape)]).requires_grad_()
    w, b = (t.detach().cuda().requires_grad_() for t in params((shape[1],), dtype))
    assert_close_to_reference(*_group_norm(groups, activation), [x, w, b], "triton", dtype)
