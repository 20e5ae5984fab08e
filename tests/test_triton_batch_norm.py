"""The Triton BatchNorm kernels (kernels/batch_norm.py) through the "triton" backend.

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
    ACTIVATIONS, BATCH_SHAPES, CHANNELS_LAST, CUDA, DEVICE, F, LOW, TF, assert_close_to_reference, err,
    layout_copies, make, on_device, params)
from normops.backends import numpy_backend  # noqa: E402
from normops.kernels import batch_norm as kernels  # noqa: E402
from normops.kernels import config  # noqa: E402
from normops.kernels.common import record  # noqa: E402


@pytest.fixture(params=["one_pass", "split"])
def path(request, monkeypatch):
    """Run the test on the one-pass kernels, then again with every channel's reduction split into
    chunks of tiny tiles: one-pass limits at zero, tiles of one warp, one byte a thread (8 fp32
    values), 16 x 16 programs to fill, and finalize kernels that combine 2 chunks x 2 channels at a time."""
    if request.param == "split":
        for name, value in dict(BN_FWD_ONE_PASS_MAX=0, BN_BWD_ONE_PASS_MAX=0, BN_LOOP_WARPS=1, BN_FWD_LOOP_BYTES=1,
                                BN_BWD_LOOP_BYTES=1, BN_UNALIGNED_FWD_LOOP_BYTES=1, BN_UNALIGNED_CHANNELS_BWD_LOOP_BYTES=1,
                                BN_MIN_RUN=4, BN_ROW_CHANNELS=2, BN_FINALIZE_SPLIT=2,
                                BN_FINALIZE_C=2).items():
            monkeypatch.setattr(config, name, value)
        monkeypatch.setattr(kernels, "programs_per_wave", lambda device, warps: 16)
    return request.param


def _running(c, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g).to(dtype).to(DEVICE),
            (0.5 + torch.rand(c, generator=g)).to(dtype).to(DEVICE))


def _batch_norm(training, running=(None, None), activation=None):
    """(ours, torch's) as functions of (x, w, b); running statistics are cloned per call, so every
    call (ours, torch's same-dtype, torch's fp64) starts from the same ones."""
    def fresh(x, w):  # in the weight's dtype: torch (and so normops) wants one dtype for all parameters
        return [None if t is None else t.to((x if w is None else w).dtype, copy=True) for t in running]
    ours = lambda x, w, b: F.batch_norm(x, *fresh(x, w), w, b, training, activation=activation)  # noqa: E731
    ref = lambda x, w, b: ACTIVATIONS.get(activation, lambda t: t)(  # noqa: E731
        TF.batch_norm(x, *fresh(x, w), w, b, training))
    return ours, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("shape", [s for s in BATCH_SHAPES if s[0] > 0], ids=str)
def test_training_parity(shape, dtype, path):
    """(N, C), (N, C, L), 2-D and 3-D spatial, batch 2 with 1x1 spatial and C=1."""
    x = on_device(make(shape, dtype))
    w, b = (on_device(t) for t in params((shape[1],), dtype))
    assert_close_to_reference(*_batch_norm(True), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (3, 4, 5, 6), (1, 3, 2, 3, 4)], ids=str)
def test_eval_parity(shape, dtype, path):
    """Running statistics normalize (fp32 ones with fp32 weights for bf16 input, as a model under
    AMP keeps them), and the backward treats them as constants."""
    x = on_device(make(shape, dtype))
    w, b = (on_device(t) for t in params((shape[1],), torch.float32 if dtype in LOW else dtype))
    assert_close_to_reference(*_batch_norm(False, _running(shape[1])), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 4, 3), (2, 6, 2, 3, 3)], ids=str)
def test_channels_last(shape, dtype, training, path):
    """channels_last(_3d) is read and written in place, and the output and dx keep the layout."""
    fmt = CHANNELS_LAST[len(shape)]
    x = on_device(make(shape, dtype), fmt)
    w, b = (on_device(t) for t in params((shape[1],), dtype))
    running = _running(shape[1], dtype) if not training else (None, None)  # the weight's dtype, as torch wants
    dy = torch.randn(shape, dtype=dtype, device=DEVICE).contiguous(memory_format=fmt)
    with layout_copies() as copies, normops.backend("triton"):
        y = F.batch_norm(x, *running, w, b, training, activation="relu")
        dx, = torch.autograd.grad(y, x, dy)
    assert not copies, f"layout copies: {copies}"
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)
    assert_close_to_reference(*_batch_norm(training, running, "relu"), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_activation(activation, dtype, channels_last, path):
    """Each fused activation against torch's batch_norm followed by the activation, training and eval."""
    x = on_device(make((2, 6, 5, 3), dtype, offset=0.2), torch.channels_last if channels_last else None)
    w, b = (on_device(t) for t in params((6,), dtype))
    assert_close_to_reference(*_batch_norm(True, activation=activation), [x, w, b], "triton", dtype)
    assert_close_to_reference(*_batch_norm(False, _running(6), activation), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_partial_affine_and_masks(affine, training, path):
    """Without weight or bias, and gradients asked for x alone or the parameters alone."""
    x = on_device(make((3, 4, 5), torch.float32))
    w, b = (on_device(t) for t in params((4,), torch.float32))
    w = None if affine == "none" else w
    b = b if affine == "both" else None
    running = (None, None) if training else _running(4)
    inputs = [t for t in (x, w, b) if t is not None]
    fn = lambda x, *p: F.batch_norm(x, *running, *p, training=training, activation="silu")  # noqa: E731
    ref = lambda x, *p: TF.silu(TF.batch_norm(  # noqa: E731
        x, *[None if t is None else t.to(x.dtype) for t in running], *p, training=training))
    assert_close_to_reference(fn, ref, inputs, "triton", torch.float32)
    if w is not None:
        dy = torch.randn(3, 4, 5, device=DEVICE)
        with normops.backend("triton"):
            dw_only = torch.autograd.grad(F.batch_norm(x, *running, w, b, training), w, dy)[0]
            dx_only = torch.autograd.grad(F.batch_norm(x, *running, w, b, training), x, dy)[0]
        dx_ref, dw_ref = torch.autograd.grad(TF.batch_norm(x, *running, w, b, training), (x, w), dy)
        assert err(dw_only, dw_ref) < 1e-4 and err(dx_only, dx_ref) < 1e-4


def test_large_offsets(path):
    """x = 1e4 + randn in fp32: the statistics are exact enough (Chan/two-pass, never
    E[x^2] - E[x]^2), and the outputs obey the rule against fp64."""
    x = on_device(make((4, 3, 6, 5), torch.float32, offset=1e4, scale=1.0))
    w, b = (on_device(t) for t in params((3,), torch.float32))
    assert_close_to_reference(*_batch_norm(True), [x, w, b], "triton", torch.float32)
    _, mean, rstd, var = kernels.batch_norm_fwd(x.detach(), None, None, None, None, True, 1e-5, "none")
    _, rmean, rrstd, rvar = numpy_backend.batch_norm_fwd(x.detach(), None, None, None, None, True, 1e-5, "none")
    assert err(mean, rmean) < 1e-3 and err(rstd, rrstd) < 1e-4 * rrstd.abs().max().item()
    assert err(var, rvar) < 1e-4 * rvar.abs().max().item()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_matches_numpy_reference(channels_last, training, path):
    """Statistics and every gradient against the float64 NumPy oracle, in fp32, with gelu."""
    x = make((3, 5, 4, 3), torch.float32, requires_grad=False).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    w, b = (t.detach().to(DEVICE) for t in params((5,), torch.float32))
    rm, rv = _running(5) if not training else (None, None)
    y, mean, rstd, var = kernels.batch_norm_fwd(x, w, b, rm, rv, training, 1e-5, "gelu")
    ry, rmean, rrstd, rvar = numpy_backend.batch_norm_fwd(x, w, b, rm, rv, training, 1e-5, "gelu")
    assert err(y, ry) < 1e-5
    if training:
        assert err(mean, rmean) < 1e-5 and err(rstd, rrstd) < 1e-6 and err(var, rvar) < 1e-5
    dy = torch.randn_like(y)
    grads = kernels.batch_norm_bwd(dy, x, w, b, rm, rv, mean, rstd, training, 1e-5, "gelu", [True, True, True])
    rgrads = numpy_backend.batch_norm_bwd(dy, x, w, b, rm, rv, rmean, rrstd, training, 1e-5, "gelu",
                                          [True, True, True])
    for g, r in zip(grads, rgrads):
        assert err(g, r) < 1e-4 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_module_running_statistics(momentum, channels_last, path):
    """nn.BatchNorm2d through the kernels: train steps update running_mean, the unbiased
    running_var and num_batches_tracked as torch does (momentum=None: the cumulative average),
    then eval normalizes with them; track_running_stats=False uses batch statistics in eval."""
    ours, ref = normops.nn.BatchNorm2d(4, momentum=momentum), torch.nn.BatchNorm2d(4, momentum=momentum)
    ours.to(DEVICE), ref.to(DEVICE)
    fmt = torch.channels_last if channels_last else None
    with normops.backend("triton"):
        for seed in range(3):
            x = on_device(make((3, 4, 5, 3), torch.float32, seed=seed), fmt)
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-6)
        ours.eval(), ref.eval()
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        stateless = normops.nn.BatchNorm2d(4, track_running_stats=False).to(DEVICE).eval()
        torch.testing.assert_close(stateless(x), TF.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("buffers", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1 / 3], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fused_running_update(momentum, buffers, channels_last, path):
    """batch_norm_fwd(momentum=) updates running_mean and the unbiased running_var in place, inside
    the kernel that computes the batch statistics: (1 - momentum) * running + momentum * batch,
    against the fp64 formula, within an ulp or two of the buffers' dtype, fp32's at most: the
    kernel gets momentum as an fp32 argument, as Triton passes a Python float (1 / 3 is the factor
    the caller passes for momentum=None at the third batch)."""
    x = make((3, 4, 5, 3), torch.float32, offset=2.0, requires_grad=False).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    rm, rv = _running(4, buffers)
    x64 = x.double().transpose(0, 1).reshape(4, -1)
    want_rm = (1 - momentum) * rm.double() + momentum * x64.mean(1)
    want_rv = (1 - momentum) * rv.double() + momentum * x64.var(1, unbiased=True)
    y, mean, _, var = kernels.batch_norm_fwd(x, None, None, rm, rv, True, 1e-5, "none", momentum=momentum)
    ulp = max(torch.finfo(buffers).eps, torch.finfo(torch.float32).eps)
    tol = dict(rtol=2 * ulp, atol=2 * ulp)
    torch.testing.assert_close(rm.double(), want_rm.to(buffers).double(), **tol)
    torch.testing.assert_close(rv.double(), want_rv.to(buffers).double(), **tol)
    assert err(var.double(), x64.var(1, unbiased=True)) < 1e-5
    ref = TF.batch_norm(x, None, None, training=True)
    assert err(y, ref) < 1e-5


def test_fused_running_update_strided_and_bad_buffers():
    """A strided running buffer is updated (through a contiguous copy, written back); a running
    buffer of the wrong size is refused before any kernel runs, and neither buffer changes."""
    x = make((4, 3, 5), torch.float32, requires_grad=False).to(DEVICE)
    rm_storage, rv = torch.zeros(6, device=DEVICE), torch.ones(3, device=DEVICE)
    rm = rm_storage[::2]
    kernels.batch_norm_fwd(x, None, None, rm, rv, True, 1e-5, "none", momentum=0.5)
    x64 = x.double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(rm.double(), 0.5 * x64.mean(1), rtol=1e-6, atol=1e-6)
    assert torch.equal(rm_storage[1::2], torch.zeros(3, device=DEVICE))
    torch.testing.assert_close(rv.double(), 0.5 + 0.5 * x64.var(1), rtol=1e-6, atol=1e-6)
    before = rm.clone(), rv.clone()
    with pytest.raises(ValueError, match="running_var must be a float tensor of 3"):
        kernels.batch_norm_fwd(x, None, None, rm, torch.ones(4, device=DEVICE), True, 1e-5, "none", momentum=0.1)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_functional_training_updates_running_stats_in_the_kernels(grad, monkeypatch):
    """normops.functional.batch_norm on the triton backend hands momentum to the kernels (the
    separate update op never runs) and matches torch's running statistics; a call that fails (a
    running buffer of the wrong dtype) leaves both buffers as they were."""
    monkeypatch.setattr(normops.ops, "update_running_stats",
                        lambda *a: pytest.fail("the triton route updated the running statistics apart"))
    x = make((4, 6, 5, 3), torch.float32, requires_grad=grad).to(DEVICE)
    rm, rv = _running(6)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    with normops.backend("triton"):
        y = F.batch_norm(x, rm, rv, training=True, momentum=0.3, activation="relu")
    ref = TF.relu(TF.batch_norm(x.detach(), rm_ref, rv_ref, training=True, momentum=0.3))
    assert err(y.detach(), ref) < 1e-5
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-6)
    before = rm.clone(), rv.clone()
    with normops.backend("triton"), pytest.raises(Exception, match="running_var"):
        F.batch_norm(x, rm, rv.double(), training=True, momentum=0.3)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


@pytest.mark.parametrize("shape", [(4, 3, 5), (256, 64, 56, 56), (256, 2048, 7, 7)], ids=str)
def test_launch_counts(shape):
    """Kernels a call launches (recorded on meta tensors, not run): the training forward one (one
    pass) or three (statistics, finalize with the running statistics' update, normalize), eval one;
    the backward one (one pass) or three (sums, the fixed-order total cast to the parameters'
    dtype, dx). The finalize kernels are the one small launch besides the passes over x."""
    x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    w, rm = (torch.empty(shape[1], device="meta") for _ in range(2))
    one_pass = shape == (4, 3, 5)
    with record() as launches:
        kernels.batch_norm_fwd(x, w, w, rm, rm, True, 1e-5, "relu", momentum=0.1)
    names = [r.kernel.fn.__name__ for r in launches]
    assert names == (["_batch_norm_fwd_kernel"] if one_pass else
                     ["_batch_norm_stats_kernel", "_batch_norm_finalize_kernel", "_batch_norm_fwd_kernel"])
    with record() as launches:
        kernels.batch_norm_fwd(x, w, w, rm, rm, False, 1e-5, "relu")
    assert [r.kernel.fn.__name__ for r in launches] == ["_batch_norm_fwd_kernel"]
    with record() as launches:
        kernels.batch_norm_bwd(x, x, w, w, None, None, rm, rm, True, 1e-5, "relu", [True, True, True])
    assert [r.kernel.fn.__name__ for r in launches] == (["_batch_norm_bwd_kernel"] if one_pass else [
        "_batch_norm_bwd_sums_kernel", "_batch_norm_bwd_finalize_kernel", "_batch_norm_bwd_kernel"])


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")], ids=str)
def test_infinite_value_gives_torchs_running_mean_and_output(value, path):
    """One +-inf in a channel: torch's mean is that inf (its sum / count), not the NaN of the
    centering (inf - inf) or of Chan's combination; a NaN output stays NaN through the relu."""
    x = torch.randn(6, 3, 20)
    x[1, 0, 2] = value
    rm, rv = torch.zeros(3), torch.ones(3)
    want = TF.relu(TF.batch_norm(x, rm, rv, training=True))
    ours_rm, ours_rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with normops.backend("triton"):
        y = F.batch_norm(x.to(DEVICE), ours_rm, ours_rv, training=True, activation="relu")
    torch.testing.assert_close(ours_rm.cpu(), rm, equal_nan=True)
    torch.testing.assert_close(ours_rv.cpu(), rv, equal_nan=True)
    torch.testing.assert_close(y.cpu(), want, equal_nan=True)

def test_one_value_per_channel_is_rejected_and_leaves_running_stats():
    """Training on one value per channel raises torch's error before any kernel runs; the running
    statistics are untouched."""
    m = normops.nn.BatchNorm2d(3).to(DEVICE)
    before = [t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
    with normops.backend("triton"), pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1, device=DEVICE))
    assert all(torch.equal(a, c) for a, c in zip(before, (m.running_mean, m.running_var, m.num_batches_tracked)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck(channels_last, training, path):
    """gradcheck in fp64 through the Triton forward and backward kernels, and gradgradcheck (its
    double backward is a torch composition that calls the backward kernels); fast mode (random
    directions) for the second order, and for both on the split path: the interpreter would
    otherwise take minutes."""
    shape = (2, 3, 2, 2) if channels_last else (3, 3, 4)
    x = make(shape, torch.float64).detach().to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    w, b = (t.detach().to(DEVICE).requires_grad_() for t in params((3,), torch.float64))
    running = (None, None) if training else _running(3, torch.float64)
    fn = lambda x, w, b: F.batch_norm(x, *running, w, b, training, activation="silu")  # noqa: E731
    with normops.backend("triton"):
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=path == "split")
        assert torch.autograd.gradgradcheck(fn, (x, w, b), fast_mode=True)


def test_deterministic(path):
    """dW/dB are per-chunk partials summed in a fixed order: bitwise equal across runs."""
    x = on_device(make((5, 6, 7, 3), torch.float32))
    w, b = (on_device(t) for t in params((6,), torch.float32))
    dy = torch.randn(5, 6, 7, 3, device=DEVICE)
    with normops.backend("triton"):
        runs = [torch.autograd.grad(F.batch_norm(x, None, None, w, b, True), (x, w, b), dy) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def test_split_heuristic_without_patching():
    """With the real limits: 4 x 5120 fp32 values a channel do not fit one tile (8 warps x 64 bytes
    a thread: 4096 values), and two channels split over the 4 x 2 programs of the CPU interpreter's
    4 "SMs"; the result still equals torch."""
    cfg = config.BatchNormConfig.forward(4, 2, 64 * 80, True, 4, 4)
    assert not cfg.one_pass and (cfg.block_n, cfg.block_s, cfg.split, cfg.chunk, cfg.num_warps) == (4, 1024, 3, 2, 8)
    x = on_device(make((4, 2, 64, 80), torch.float32))
    w, b = (on_device(t) for t in params((2,), torch.float32))
    assert_close_to_reference(*_batch_norm(True, activation="relu"), [x, w, b], "triton", torch.float32)


def test_position_blocks():
    """NCHW position blocks: the largest power of two padding S by at most 1/8, not below 64."""
    assert config._position_block(112 * 112, 4096) == 1024
    assert config._position_block(56 * 56, 4096) == 256
    assert config._position_block(7 * 7, 4096) == 64
    assert config._position_block(4096, 4096) == 4096
    assert config._position_block(5, 4096) == 8


def test_fallbacks_to_torch():
    """An empty batch has no tile, and a sample of 2**31 elements or more overflows a tile's int32
    offsets: the torch backend's code runs those (here: the empty one, with torch's empty result)."""
    assert not kernels._offsets_fit(1, 3, 2**30) and kernels._offsets_fit(2**20, 4096, 1)
    x = torch.randn(0, 3, 4, device=DEVICE)
    assert not kernels.supported(x) and kernels.supported(torch.randn(2, 3, 4))
    rm, rv = _running(3)
    with normops.backend("triton"):
        y = F.batch_norm(x, rm, rv, training=False)
    assert y.shape == x.shape


# --- real sizes, on a GPU only ------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,activation", [
    ((32, 64, 112, 112), "relu"), ((32, 256, 56, 56), None), ((64, 2048, 7, 7), "relu"), ((1024, 512), None),
    ((8, 32, 16, 32, 32), "silu"), ((2, 64, 3, 3), None)], ids=str)
def test_cuda_real_sizes(shape, activation, training, layout, dtype):
    x = make(shape, dtype, device="cuda")
    if layout == "channels_last":
        if len(shape) < 4:
            pytest.skip("no channels_last format below 4-D")
        x = x.detach().contiguous(memory_format=CHANNELS_LAST[len(shape)]).requires_grad_()
    w, b = (t.detach().cuda().requires_grad_() for t in params((shape[1],), dtype))
    running = (None, None) if training else _running(shape[1])
    assert_close_to_reference(*_batch_norm(training, running, activation), [x, w, b], "triton", dtype)
