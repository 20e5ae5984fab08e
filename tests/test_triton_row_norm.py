"""The Triton LayerNorm/RMSNorm kernels (kernels/row_norm.py) through the "triton" backend.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET),
at small shapes; with one, on CUDA, and the real-size tests at the end run too. Each result obeys
the tolerance rule of cases.py against torch in float64, with torch's own same-dtype error as the
yardstick, and matches the NumPy reference.
"""
import pytest
import torch

pytest.importorskip("triton")

import normops  # noqa: E402
from cases import (  # noqa: E402
    CUDA, DEVICE, LOW, F, TF, assert_close_to_reference, err, layout_copies, make, params)
from normops.backends import numpy_backend  # noqa: E402
from normops.check import TOLERANCE  # noqa: E402

# 1 and 7 are one-pass, packed several rows a program (an iteration backward); 781 one-pass too,
# a row a program forward; 4097 is one pass just past a power of two (the backward of 4-byte
# elements loops there: its one-pass limit is 4K); 20000 is past every one-pass limit (16K
# forward, 8K backward): the column-looped kernels.
WIDTHS = [1, 7, 781, 4097, 20000]


def _on(t):
    return t.detach().to(DEVICE).requires_grad_(t.requires_grad)


def _rows_for(width):
    return 2 if width > 4096 else 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_parity(rms, width, dtype):
    x = _on(make((_rows_for(width), width), dtype))
    w, b = (_on(t) for t in params((width,), dtype))
    if rms:
        ours, ref, inputs = (lambda x, w: F.rms_norm(x, [width], w, 1e-5),
                             lambda x, w: TF.rms_norm(x, [width], w, 1e-5), [x, w])
    else:
        ours, ref, inputs = (lambda x, w, b: F.layer_norm(x, [width], w, b),
                             lambda x, w, b: TF.layer_norm(x, [width], w, b), [x, w, b])
    assert_close_to_reference(ours, ref, inputs, "triton", dtype)


@pytest.mark.parametrize("width", [7, 781, 20000])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_matches_numpy_reference(rms, width):
    """Forward statistics and every gradient against the float64 NumPy oracle, in fp32."""
    x = make((3, width), torch.float32, requires_grad=False).to(DEVICE)
    w, b = (t.detach().to(DEVICE) for t in params((width,), torch.float32))
    b = None if rms else b
    with normops.backend("triton"):
        from normops.backends import triton_backend as tb
        y, _, mean, rstd = tb.row_norm_fwd(x, None, (width,), w, b, 1e-5, rms, "silu", True)
        dy = torch.randn_like(y)
        grads = tb.row_norm_bwd(dy, x, (width,), w, b, mean, rstd, rms, "silu", [True, True, True])
    ry, _, rmean, rrstd = numpy_backend.row_norm_fwd(x, None, (width,), w, b, 1e-5, rms, "silu", True)
    rgrads = numpy_backend.row_norm_bwd(dy, x, (width,), w, b, rmean, rrstd, rms, "silu", [True, True, True])
    assert err(y, ry) < 1e-4 and err(rstd, rrstd) < 1e-5 * rrstd.abs().max().item()
    if not rms:
        assert err(mean, rmean) < 1e-4
    for g, r in zip(grads, rgrads):
        assert (g is None) == (r is None)
        if g is not None:
            assert err(g, r) < 1e-3 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [33, 20000])
def test_activation(activation, dtype, width):
    x = _on(make((2, width), dtype, offset=0.2))
    w, b = (_on(t) for t in params((width,), dtype))
    act = {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu}[activation]
    assert_close_to_reference(lambda x, w, b: F.layer_norm(x, [width], w, b, activation=activation),
                              lambda x, w, b: act(TF.layer_norm(x, [width], w, b)), [x, w, b], "triton", dtype)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("width", [96, 20000])
@pytest.mark.parametrize("rms", [False, True], ids=["add_layer_norm", "add_rms_norm"])
def test_residual(rms, width, dtype):
    x, r = _on(make((3, width), dtype)), _on(make((3, width), dtype, seed=4))
    w, b = (_on(t) for t in params((width,), dtype))
    if rms:
        ours = lambda x, r, w: F.add_rms_norm(x, r, [width], w, 1e-5)  # noqa: E731
        ref = lambda x, r, w: (TF.rms_norm(x + r, [width], w, 1e-5), x + r)  # noqa: E731
        inputs = [x, r, w]
    else:
        ours = lambda x, r, w, b: F.add_layer_norm(x, r, [width], w, b)  # noqa: E731
        ref = lambda x, r, w, b: (TF.layer_norm(x + r, [width], w, b), x + r)  # noqa: E731
        inputs = [x, r, w, b]
    assert_close_to_reference(ours, ref, inputs, "triton", dtype)


@pytest.mark.parametrize("layout", ["row_slice", "batch_transposed", "three_batch_dims", "last_dim_strided"])
def test_strided_inputs(layout):
    """Rows with any row stride are read in place; only a non-contiguous last dim is copied."""
    base = make((4, 6, 50), torch.float32, requires_grad=False).to(DEVICE)
    x = {"row_slice": base[:, :, 3:40],                      # rows of 37 with row stride 50
         "batch_transposed": base.transpose(0, 1)[..., :37],  # batch dims in another order
         "three_batch_dims": base.reshape(2, 2, 6, 50)[:, :, ::2, :37],
         "last_dim_strided": base[:, :, ::2][..., :25]}[layout]
    x.requires_grad_()
    n = x.shape[-1]
    w, b = (t.to(DEVICE) for t in params((n,), torch.float32))
    with layout_copies() as copies, normops.backend("triton"):
        y = F.layer_norm(x, [n], w, b)
    torch.testing.assert_close(y, TF.layer_norm(x, [n], w, b), rtol=1e-5, atol=1e-5)
    assert bool(copies) == (layout == "last_dim_strided"), f"copies: {copies}"
    assert_close_to_reference(lambda x, w, b: F.layer_norm(x, [n], w, b),
                              lambda x, w, b: TF.layer_norm(x, [n], w, b), [x, w, b], "triton", torch.float32)


@pytest.mark.parametrize("width, dtype, one_pass", [(4096, torch.bfloat16, True), (4097, torch.bfloat16, True),
                                                     (4096, torch.float32, True), (4097, torch.float32, False)],
                         ids=str)
def test_backward_one_pass_limit_follows_dtype(monkeypatch, width, dtype, one_pass):
    """The backward holds rows of 2-byte elements in registers up to 8K, of 4-byte ones up to 4K
    (kernels/config.py, BWD_ONE_PASS_MAX_WIDE); past that it loops over column blocks."""
    from normops.kernels import row_norm
    picked = []
    real = row_norm.RowNormConfig.backward
    monkeypatch.setattr(row_norm.RowNormConfig, "backward", lambda *a: picked.append(real(*a)) or picked[-1])
    x = make((2, width), dtype, requires_grad=False).to(DEVICE)
    w = torch.ones(width, dtype=dtype, device=DEVICE)
    with normops.backend("triton"):
        from normops.backends import triton_backend as tb
        y, _, mean, rstd = tb.row_norm_fwd(x, None, (width,), w, None, 1e-5, True, "none", True)
        tb.row_norm_bwd(torch.ones_like(y), x, (width,), w, None, mean, rstd, True, "none", [True, True, False])
    assert [c.one_pass for c in picked] == [one_pass]


def test_launch_options(monkeypatch):
    """Every kernel is launched with a register cap that keeps 16 warps an SM (kernels/common.py);
    NORMOPS_MAXNREG overrides it for measurements: 0 drops the cap."""
    from normops.kernels.common import launch_options
    assert launch_options(4) == {"num_warps": 4, "maxnreg": 128}
    assert launch_options(16)["maxnreg"] == 128 and launch_options(32)["maxnreg"] == 64
    monkeypatch.setenv("NORMOPS_MAXNREG", "0")
    assert launch_options(8) == {"num_warps": 8}
    monkeypatch.setenv("NORMOPS_MAXNREG", "96")
    assert launch_options(8) == {"num_warps": 8, "maxnreg": 96}
    monkeypatch.setenv("NORMOPS_MAXNREG", "lots")
    with pytest.raises(ValueError, match="NORMOPS_MAXNREG='lots': expected registers a thread"):
        launch_options(8)


def test_wide_rows_several_per_program():
    """The looped forward is persistent: with more rows than programs each program takes several
    (on the CPU interpreter 4 programs; 9 rows here), residual included."""
    width = 20000
    x, r = _on(make((9, width), torch.float32)), _on(make((9, width), torch.float32, seed=4))
    w, b = (_on(t) for t in params((width,), torch.float32))
    assert_close_to_reference(lambda x, r, w, b: F.add_layer_norm(x, r, [width], w, b),
                              lambda x, r, w, b: (TF.layer_norm(x + r, [width], w, b), x + r), [x, r, w, b],
                              "triton", torch.float32)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_widest_row(rms):
    """One row of 256K elements: 64 column blocks in every looped kernel."""
    width = 1 << 18
    x = _on(make((1, width), torch.float32))
    w, b = (_on(t) for t in params((width,), torch.float32))
    if rms:
        assert_close_to_reference(lambda x, w: F.rms_norm(x, [width], w, 1e-5),
                                  lambda x, w: TF.rms_norm(x, [width], w, 1e-5), [x, w], "triton", torch.float32)
    else:
        assert_close_to_reference(lambda x, w, b: F.layer_norm(x, [width], w, b),
                                  lambda x, w, b: TF.layer_norm(x, [width], w, b), [x, w, b], "triton", torch.float32)


@pytest.mark.parametrize("case", ["1d_strided", "2d_transposed_all_normalized", "strided_weight"])
def test_strided_without_batch_dims(case):
    """No batch dims left to carry a stride: the normalized block itself must be contiguous, or be
    copied; parameters may be strided views too."""
    if case == "1d_strided":
        # sliced after .to(): moving the view to CUDA would copy it dense
        x = make((50, 3), torch.float32, requires_grad=False).to(DEVICE)[:, 1]
        shape = [50]
    else:
        x = make((64, 8), torch.float32, requires_grad=False).to(DEVICE).t()
        shape = [8, 64]
    x.requires_grad_()
    w, b = (t.detach().to(DEVICE) for t in params(tuple(shape), torch.float32))
    if case == "strided_weight":
        w = torch.stack([w, w], -1)[..., 0].requires_grad_()  # a view with stride 2
        b = b.requires_grad_()
    assert_close_to_reference(lambda x, w, b: F.layer_norm(x, shape, w, b, activation="relu"),
                              lambda x, w, b: TF.relu(TF.layer_norm(x, shape, w, b)), [x, w, b], "triton",
                              torch.float32)
    assert_close_to_reference(lambda x, w: F.rms_norm(x, shape, w, 1e-5),
                              lambda x, w: TF.rms_norm(x, shape, w, 1e-5), [x, w], "triton", torch.float32)


def test_single_row_no_affine_multidim_shape():
    x = _on(make((1, 3, 7), torch.float32))
    assert_close_to_reference(lambda x: F.layer_norm(x, [3, 7]), lambda x: TF.layer_norm(x, [3, 7]), [x], "triton",
                              torch.float32)
    assert_close_to_reference(lambda x: F.rms_norm(x, [7], None, 1e-5), lambda x: TF.rms_norm(x, [7], None, 1e-5),
                              [x], "triton", torch.float32)


@pytest.mark.parametrize("width", [5, 20000])
def test_gradcheck(width):
    """gradcheck and gradgradcheck in fp64 through the Triton forward and backward kernels."""
    rows = 2 if width > 100 else 3
    x = make((rows, width), torch.float64).detach().to(DEVICE).requires_grad_()
    w, b = (t.detach().to(DEVICE).requires_grad_() for t in params((width,), torch.float64))
    fast = width > 100  # a numerical Jacobian of 40K inputs: check a few random directions instead
    with normops.backend("triton"):
        for fn, inputs in [(lambda x, w, b: F.layer_norm(x, [width], w, b, activation="gelu"), (x, w, b)),
                           (lambda x, w: F.rms_norm(x, [width], w), (x, w))]:
            assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
            if not fast:
                assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("width", [7, 20000])
def test_constant_row_gives_zero_dx(width):
    """A constant row (zero variance: rstd = 1/sqrt(eps), ~316) under a constant gradient: dx is
    exactly 0, as the math says, one-pass and looped. mean(g) is taken about the row's first g;
    taken plainly, N * g / N rounds, and rstd magnified that to ~1e-4 (found by
    tests/test_differential.py)."""
    x = torch.full((3, width), 0.7, device=DEVICE, requires_grad=True)
    dy = torch.full((3, width), 3.0123, device=DEVICE)
    with normops.backend("triton"):
        F.layer_norm(x, (width,), None, None, 1e-5).backward(dy)
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_deterministic():
    """dW/dB are per-program partials summed in a fixed order: bitwise equal across runs."""
    x = _on(make((37, 300), torch.float32))
    w, b = (_on(t) for t in params((300,), torch.float32))
    dy = torch.randn(37, 300, device=DEVICE)
    with normops.backend("triton"):
        runs = [torch.autograd.grad(F.layer_norm(x, [300], w, b), (x, w, b), dy) for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


@pytest.mark.parametrize("width", [300, 20000])
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, True), (True, False, True), (False, False, True),
                                  (True, True, False)], ids=str)
def test_backward_output_mask(width, mask):
    """Each subset of (dx, dw, db), one-pass and looped, with more rows than the CPU's 4 programs
    (each program then adds later rows to its partials), fp32 parameters under bf16 x: the
    gradients come back in the parameters' dtype, equal to the full backward's."""
    x = make((9, width), torch.bfloat16, requires_grad=False).to(DEVICE)
    w, b = (t.detach().float().to(DEVICE) for t in params((width,), torch.bfloat16))
    dy = make((9, width), torch.bfloat16, requires_grad=False, seed=5, offset=0.0).to(DEVICE)
    with normops.backend("triton"):
        from normops.backends import triton_backend as tb
        _, _, mean, rstd = tb.row_norm_fwd(x, None, (width,), w, b, 1e-5, False, "gelu", True)
        full = tb.row_norm_bwd(dy, x, (width,), w, b, mean, rstd, False, "gelu", [True, True, True])
        some = tb.row_norm_bwd(dy, x, (width,), w, b, mean, rstd, False, "gelu", list(mask))
    ref = numpy_backend.row_norm_bwd(dy.double(), x.double(), (width,), w.double(), b.double(), mean.double(),
                                     rstd.double(), False, "gelu", [True, True, True])
    for got, whole, r, wanted, dtype in zip(some, full, ref, mask, (torch.bfloat16, torch.float32, torch.float32)):
        assert (got is not None) == wanted
        if wanted:
            assert got.dtype == dtype
            assert torch.equal(got, whole)
            assert err(got.double(), r) < 2e-2 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("width", [300, 2048, 20000])
def test_backward_launches(width):
    """The backward is two launches, whatever the width: the backward kernel over a persistent grid
    (a program owns whole rows: one column block) and the glue kernel that sums its fp32 partials
    into dw and db; with no parameter gradient wanted, the first alone."""
    from normops.kernels import row_norm
    from normops.kernels.common import record
    x = torch.empty((64, width), dtype=torch.bfloat16, device="meta")
    w, rstd = torch.empty(width, dtype=torch.bfloat16, device="meta"), torch.empty(64, device="meta")
    for mask, names in [((True, True, True), ["bwd", "param_grads"]), ((True, False, False), ["bwd"])]:
        with record() as launches:
            row_norm.row_norm_bwd(x, x, (width,), w, w, rstd, rstd, False, "none", mask)
        assert [r.kernel.fn.__name__.removeprefix("_row_norm_").removesuffix("_kernel").removesuffix("_looped")
                for r in launches] == names
        programs, groups = launches[0].grid  # no groups: one
        assert groups == 1 and programs <= 64
        if len(launches) > 1:
            part = launches[1].args[0]
            assert part.dtype == torch.float32 and part.shape == (1, programs, 2, width)


# --- real sizes, on a GPU only ------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("width", [128, 1024, 4096, 8192, 32768, 65536, 262144])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "add_rms_norm", "layer_norm+silu"])
def test_cuda_real_sizes(op, width, dtype):
    rows = max(2, min(4096, (1 << 26) // width))  # 4096 rows up to 16K wide, then 64M elements
    x = make((rows, width), dtype, device="cuda")
    r = make((rows, width), dtype, seed=9, device="cuda") if op == "add_rms_norm" else None
    w, b = (t.detach().cuda().requires_grad_() for t in params((width,), dtype))
    fn, ref, inputs = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, [width], w, b),
                       lambda x, w, b: TF.layer_norm(x, [width], w, b), [x, w, b]),
        "rms_norm": (lambda x, w: F.rms_norm(x, [width], w, 1e-6),
                     lambda x, w: TF.rms_norm(x, [width], w, 1e-6), [x, w]),
        "add_rms_norm": (lambda x, r, w: F.add_rms_norm(x, r, [width], w, 1e-6),
                         lambda x, r, w: (TF.rms_norm(x + r, [width], w, 1e-6), x + r), [x, r, w]),
        "layer_norm+silu": (lambda x, w, b: F.layer_norm(x, [width], w, b, activation="silu"),
                            lambda x, w, b: TF.silu(TF.layer_norm(x, [width], w, b)), [x, w, b]),
    }[op]
    assert_close_to_reference(fn, ref, inputs, "triton", dtype)


def test_tolerance_table_covers_low_precision():
    assert all(d in TOLERANCE for d in LOW)
