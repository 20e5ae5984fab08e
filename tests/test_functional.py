"""Parity of normops.functional with torch.nn.functional: outputs, every gradient and running
statistics, on every backend, over odd shapes and all float dtypes (tolerance rule in cases.py)."""
import math

import pytest
import torch

import normops
from cases import (BACKENDS, BATCH_SHAPES, DTYPES, GROUP_SHAPES, INSTANCE_SHAPES, ROW_SHAPES, F, TF,
                   assert_close_to_reference, err, make, params, torch_add_layer_norm, torch_add_rms_norm,
                   torch_batch_norm, torch_group_norm, torch_instance_norm, torch_layer_norm, torch_rms_norm)

ACTIVATIONS = [None, "relu", "silu", "gelu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", ROW_SHAPES, ids=str)
def test_layer_norm(backend, dtype, shape, nshape):
    x = make(shape, dtype)
    w, b = params(nshape, dtype)
    assert_close_to_reference(lambda x, w, b: F.layer_norm(x, nshape, w, b),
                              lambda x, w, b: TF.layer_norm(x, nshape, w, b), [x, w, b], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,nshape", ROW_SHAPES, ids=str)
def test_rms_norm(backend, dtype, shape, nshape):
    x = make(shape, dtype)
    w, _ = params(nshape, dtype)
    assert_close_to_reference(lambda x, w: F.rms_norm(x, nshape, w, 1e-6),
                              lambda x, w: TF.rms_norm(x, nshape, w, 1e-6), [x, w], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_norm(backend, rms, dtype):
    x, r = make((3, 5, 33), dtype), make((3, 5, 33), dtype, seed=5)
    w, b = params((33,), dtype)
    if rms:
        ours, ref, inputs = (lambda x, r, w: F.add_rms_norm(x, r, [33], w),
                             lambda x, r, w: torch_add_rms_norm(x, r, [33], w), [x, r, w])
    else:
        ours, ref, inputs = (lambda x, r, w, b: F.add_layer_norm(x, r, [33], w, b),
                             lambda x, r, w, b: torch_add_layer_norm(x, r, [33], w, b), [x, r, w, b])
    assert_close_to_reference(ours, ref, inputs, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups", GROUP_SHAPES, ids=str)
def test_group_norm(backend, dtype, shape, groups):
    x = make(shape, dtype)
    w, b = params(shape[1], dtype)
    assert_close_to_reference(lambda x, w, b: F.group_norm(x, groups, w, b),
                              lambda x, w, b: TF.group_norm(x, groups, w, b), [x, w, b], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INSTANCE_SHAPES, ids=str)
def test_instance_norm(backend, dtype, shape):
    x = make(shape, dtype)
    w, b = params(shape[1], dtype)
    assert_close_to_reference(lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
                              lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), [x, w, b], backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
def test_batch_norm(backend, training, dtype, shape):
    x = make(shape, dtype)
    w, b = params(shape[1], dtype)
    rm = make(shape[1], dtype, offset=2.0, requires_grad=False)
    rv = (make(shape[1], dtype, offset=0.0, requires_grad=False).abs() + 0.5).to(dtype)
    assert_close_to_reference(lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, training),
                              lambda x, rm, rv, w, b: TF.batch_norm(x, rm, rv, w, b, training),
                              [x, rm, rv, w, b], backend, dtype)


# --- running statistics ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 7), (3, 4, 5, 6), (0, 3, 4)], ids=str)
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_batch_norm_running_stats(backend, shape, momentum):
    x = make(shape, torch.float32, requires_grad=False)
    ours = [torch.zeros(shape[1]), torch.ones(shape[1])]
    ref = [t.clone() for t in ours]
    with normops.backend(backend):
        for _ in range(3):
            F.batch_norm(x, *ours, training=True, momentum=momentum)
            TF.batch_norm(x, *ref, training=True, momentum=momentum)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5), (3, 4, 5, 6), (1, 2, 3, 2, 4)], ids=str)
def test_instance_norm_running_stats(backend, shape):
    x = make(shape, torch.float32, requires_grad=False)
    ours = [torch.zeros(shape[1]), torch.ones(shape[1])]
    ref = [t.clone() for t in ours]
    with normops.backend(backend):
        for _ in range(3):
            F.instance_norm(x, *ours, momentum=0.3)
            TF.instance_norm(x, *ref, momentum=0.3)
        # use_input_stats=False normalizes with the running statistics
        torch.testing.assert_close(F.instance_norm(x, *ours, use_input_stats=False),
                                   TF.instance_norm(x, *ref, use_input_stats=False), rtol=1e-5, atol=1e-5)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


# --- fused activations -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_train", "batch_eval"])
def test_activation(backend, activation, dtype, op):
    a = activation
    x = make((3, 6, 5, 4), dtype, offset=0.5)
    if op in ("layer_norm", "rms_norm"):
        w, b = params((4,), dtype)
    else:
        w, b = params(6, dtype)
    rm, rv = torch.full((6,), 0.3), torch.full((6,), 1.7)  # eval statistics, cast to x's dtype
    ours, ref = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, [4], w, b, activation=a),
                       lambda x, w, b: torch_layer_norm(x, [4], w, b, activation=a)),
        # an explicit eps: eps=None means the dtype's epsilon, which would differ in the fp64 reference
        "rms_norm": (lambda x, w, b: F.rms_norm(x, [4], w, 1e-6, activation=a) + 0 * b,
                     lambda x, w, b: torch_rms_norm(x, [4], w, 1e-6, activation=a) + 0 * b),
        "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b, activation=a),
                       lambda x, w, b: torch_group_norm(x, 3, w, b, activation=a)),
        "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b, activation=a),
                          lambda x, w, b: torch_instance_norm(x, None, None, w, b, activation=a)),
        "batch_train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True, activation=a),
                        lambda x, w, b: torch_batch_norm(x, None, None, w, b, True, activation=a)),
        "batch_eval": (lambda x, w, b: F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False, activation=a),
                       lambda x, w, b: torch_batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), w, b, False,
                                                        activation=a)),
    }[op]
    assert_close_to_reference(ours, ref, [x, w, b], backend, dtype)


# --- layouts, no affine, offsets, NaN ----------------------------------------------------------

def _formats(t):
    return (t.is_contiguous(), t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last),
            t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "transposed", "sliced"])
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"])
def test_layouts(backend, layout, op):
    if layout == "channels_last_3d":
        x = make((2, 6, 3, 4, 5), torch.float32).detach().to(memory_format=torch.channels_last_3d)
    elif layout == "channels_last":
        x = make((2, 6, 4, 5), torch.float32).detach().to(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = make((2, 5, 6, 4), torch.float32).detach().transpose(1, 3)  # (2, 4, 6, 5), strided
    else:
        x = make((2, 12, 4, 10), torch.float32).detach()[:, ::2, :, 1:6]  # (2, 6, 4, 5), strided
    x.requires_grad_()
    c = x.shape[1]
    w, b = params(c, torch.float32)
    wl, bl = params(x.shape[-1], torch.float32)
    ours, ref, inputs = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b),
                       lambda x, w, b: TF.layer_norm(x, x.shape[-1:], w, b), [x, wl, bl]),
        "rms_norm": (lambda x, w: F.rms_norm(x, x.shape[-1:], w), lambda x, w: TF.rms_norm(x, x.shape[-1:], w),
                     [x, wl]),
        "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), lambda x, w, b: TF.group_norm(x, 2, w, b),
                       [x, w, b]),
        "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
                          lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), [x, w, b]),
        "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                       lambda x, w, b: TF.batch_norm(x, None, None, w, b, True), [x, w, b]),
    }[op]
    assert_close_to_reference(ours, ref, inputs, backend, torch.float32)
    with normops.backend(backend):
        y = ours(*inputs)
    # torch's own RMSNorm layout varies (CPU composite keeps x's strides; the fused CUDA kernel
    # does not): normops returns it contiguous, like layer_norm.
    if op != "rms_norm":
        assert _formats(y) == _formats(ref(*inputs)), "output memory format differs from torch's"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm", "instance_norm"])
def test_no_affine(backend, op):
    x = make((3, 4, 5), torch.float64)
    ours, ref = {
        "layer_norm": (lambda x: F.layer_norm(x, [5]), lambda x: TF.layer_norm(x, [5])),
        "group_norm": (lambda x: F.group_norm(x, 2), lambda x: TF.group_norm(x, 2)),
        "batch_norm": (lambda x: F.batch_norm(x, None, None, training=True),
                       lambda x: TF.batch_norm(x, None, None, training=True)),
        "instance_norm": (lambda x: F.instance_norm(x), lambda x: TF.instance_norm(x)),
    }[op]
    assert_close_to_reference(ours, ref, [x], backend, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm"])
def test_large_offset(backend, dtype, op):
    """x = 1e4 + randn: E[x^2] - E[x]^2 in fp32 loses every digit of the variance here."""
    x = make((4, 6, 64), dtype, offset=1e4, scale=1.0)
    w, b = params(6 if op in ("group_norm", "instance_norm", "batch_norm") else 64, dtype)
    ours, ref = {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, [64], w, b), lambda x, w, b: TF.layer_norm(x, [64], w, b)),
        "rms_norm": (lambda x, w, b: F.rms_norm(x, [64], w) + b, lambda x, w, b: TF.rms_norm(x, [64], w) + b),
        "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b), lambda x, w, b: TF.group_norm(x, 3, w, b)),
        "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
                          lambda x, w, b: TF.instance_norm(x, weight=w, bias=b)),
        "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True),
                       lambda x, w, b: TF.batch_norm(x, None, None, w, b, True)),
    }[op]
    assert_close_to_reference(ours, ref, [x, w, b], backend, dtype)
    with normops.backend(backend):
        y = ours(x, w, b).detach()
    with normops.backend(backend):  # without the affine transform: unit variance, not garbage
        y = ours(x, None, None if op != "rms_norm" else torch.zeros(())).detach().double()
    spread = y.square().mean() if op == "rms_norm" else y.std()  # RMSNorm does not center
    assert err(spread, torch.tensor(1.0)) < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "group_norm", "instance_norm"])
def test_nan_stays_in_its_row(backend, op):
    x = make((3, 4, 6), torch.float32, requires_grad=False)
    fn = {"layer_norm": lambda t: F.layer_norm(t, [6]), "rms_norm": lambda t: F.rms_norm(t, [6]),
          "group_norm": lambda t: F.group_norm(t, 2), "instance_norm": lambda t: F.instance_norm(t)}[op]
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with normops.backend(backend):
        clean, dirty = fn(x), fn(bad)
    nan_rows = torch.isnan(dirty)
    assert nan_rows[1, 2].any() or nan_rows[1].any()
    assert not nan_rows[0].any() and not nan_rows[2].any(), "a NaN leaked into another sample"
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[2], clean[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_default_eps(backend, dtype):
    """eps=None is the epsilon of the computation dtype (fp32 for fp16/bf16 input), as in torch:
    tiny inputs (rms 1e-3) still normalize to O(1) outputs."""
    x = make((3, 8), dtype, offset=0.0, scale=1e-3, requires_grad=False)
    with normops.backend(backend):
        ours = F.rms_norm(x, [8])
    ref = TF.rms_norm(x, [8])
    assert ref.abs().max() > 0.5
    assert err(ours, ref) <= 2 * torch.finfo(dtype).eps * (1 + ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_precision_params(backend):
    """bf16 activations with fp32 weights (a common AMP layout): output in the input dtype."""
    x = make((4, 16), torch.bfloat16)
    w, b = params((16,), torch.float32)
    with normops.backend(backend):
        y = F.layer_norm(x, [16], w, b)
    assert y.dtype == torch.bfloat16
    ref = TF.layer_norm(x.double(), [16], w.double(), b.double())
    assert err(y, ref) <= 2 * err(TF.layer_norm(x, [16], w, b), ref) + 2e-2


def test_empty_outputs():
    for fn, shape in [(lambda t: F.layer_norm(t, [5]), (0, 5)), (lambda t: F.group_norm(t, 2), (0, 4, 3)),
                      (lambda t: F.batch_norm(t, None, None, training=True), (0, 4, 3)),
                      (lambda t: F.instance_norm(t), (0, 4, 3))]:
        x = torch.randn(shape, requires_grad=True)
        y = fn(x)
        assert y.shape == x.shape and y.numel() == 0
        y.sum().backward()
        assert x.grad.shape == x.shape


def test_batch_norm_empty_batch_leaves_running_stats():
    rm, rv = torch.zeros(4), torch.ones(4)
    F.batch_norm(torch.randn(0, 4, 3), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_instance_norm_is_group_norm_with_groups_equal_channels():
    x = make((2, 6, 5), torch.float64, requires_grad=False)
    torch.testing.assert_close(F.instance_norm(x), F.group_norm(x, 6))
    assert math.isclose(F.instance_norm(x)[0, 0].std(unbiased=False).item(), 1.0, rel_tol=1e-4)
