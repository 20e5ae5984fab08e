"""normops.functional.ada_group_norm: GroupNorm modulated per (sample, channel), diffusers'
AdaGroupNorm, against diffusers' own composition

    F.group_norm(x, G, eps=eps) * (1 + scale) + shift      (then SiLU, ResnetBlock2D's "scale_shift")

on every backend (the Triton kernels under the interpreter without a GPU, on each of their three
paths), dtypes and layouts, with the tolerance rule of cases.py (torch's own same-dtype error of
that composition as the yardstick), and gradcheck in float64.
"""
import pytest
import torch

import normops
from cases import CHANNELS_LAST, DEVICE, LOW, TF, F, assert_close_to_reference, make, on_device
from normops.core import DtypeError, ShapeError


def _ada(groups, activation=None, eps=1e-5):
    def ours(x, scale, shift):
        return F.ada_group_norm(x, groups, scale, shift, eps, activation=activation)

    def ref(x, scale, shift):
        y = TF.group_norm(x, groups, eps=eps) * (1 + scale) + shift
        return TF.silu(y) if activation == "silu" else y
    return ours, ref


def _modulation(shape, dtype, seed=3, device="cpu"):
    """scale and shift of shape (N, C, 1, ...), diffusers' emb[:, :, None, None].chunk(2, 1): two
    non-contiguous views of one (N, 2C, 1, ...) tensor."""
    g = torch.Generator().manual_seed(seed)
    emb = (0.5 * torch.randn((shape[0], 2 * shape[1]), generator=g, dtype=torch.float64)).to(dtype)
    emb = emb.reshape(emb.shape + (1,) * (len(shape) - 2)).to(device)
    return [t.detach().requires_grad_() for t in emb.chunk(2, dim=1)]


CASES = [((2, 6, 5, 3), 3), ((3, 8, 4, 4), 2), ((2, 6, 2, 3, 3), 2), ((2, 9, 5), 3), ((2, 4, 3, 3), 4), ((3, 6), 2)]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("shape,groups", CASES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_matches_diffusers(backend, shape, groups, dtype, activation):
    x = make(shape, dtype)
    scale, shift = _modulation(shape, dtype)
    assert_close_to_reference(*_ada(groups, activation), [x, scale, shift], backend, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((2, 8, 2, 3, 3), 4)], ids=str)
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_channels_last(backend, shape, groups, dtype):
    """The output keeps the layout, and modulation given as (N, C) is the same as (N, C, 1, ...)."""
    fmt = CHANNELS_LAST[len(shape)]
    x = make(shape, dtype).detach().contiguous(memory_format=fmt).requires_grad_()
    scale, shift = _modulation(shape, dtype)
    assert_close_to_reference(*_ada(groups, "silu"), [x, scale, shift], backend, dtype)
    with normops.backend(backend):
        y = F.ada_group_norm(x, groups, scale, shift, activation="silu")
        flat = F.ada_group_norm(x, groups, scale.reshape(shape[:2]), shift.reshape(shape[:2]), activation="silu")
    assert y.is_contiguous(memory_format=fmt)
    assert torch.equal(y, flat)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_gradcheck(backend):
    x = make((2, 6, 3, 2), torch.float64, offset=0.5, scale=1.0)
    scale, shift = _modulation(x.shape, torch.float64)
    with normops.backend(backend):
        assert torch.autograd.gradcheck(lambda *a: F.ada_group_norm(a[0], 3, a[1], a[2], activation="silu"),
                                        (x, scale, shift))


def test_fp32_modulation_of_bf16_input():
    """fp32 scale/shift with a bf16 input (torch's mixed-type rule): the output is bf16, the
    gradients of scale and shift fp32."""
    x = make((2, 4, 3, 3), torch.bfloat16)
    scale, shift = _modulation(x.shape, torch.float32)
    with normops.backend("torch"):
        y = F.ada_group_norm(x, 2, scale, shift)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and scale.grad.dtype == shift.grad.dtype == torch.float32


def test_torch_func_transforms():
    """Under torch.func (the composition in torch): the same values, and grad works."""
    x = make((2, 4, 3, 3), torch.float64).detach()
    scale, shift = (t.detach() for t in _modulation(x.shape, torch.float64))
    ours, ref = _ada(2, "silu")
    g = torch.func.grad(lambda s: ours(x, s, shift).sum())(scale)
    g_ref = torch.func.grad(lambda s: ref(x, s, shift).sum())(scale)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("bad,error,match", [
    (dict(scale=torch.ones(2, 5)), ShapeError, "expected scale of shape \\[2, 4\\]"),
    (dict(shift=torch.ones(1, 4)), ShapeError, "expected shift of shape \\[2, 4\\]"),
    (dict(scale=torch.ones(2, 4, 3, 1)), ShapeError, "followed by 1s"),
    (dict(scale=torch.ones(2, 4, 1, 1, 1, 1)), ShapeError, "at most 4 dims"),
    (dict(scale=torch.ones(4)), ShapeError, "expected scale of shape"),
    (dict(scale=None), TypeError, "scale must be a Tensor, got None"),
    (dict(shift=torch.ones(2, 4, dtype=torch.float64)), DtypeError, "shift torch.float64"),
    (dict(scale=torch.ones(2, 4, dtype=torch.int64)), TypeError, "scale must be a floating-point tensor"),
    (dict(num_groups=3), ShapeError, "divisible by num_groups"),
    (dict(num_groups=2.0), TypeError, "'num_groups' must be int"),
    (dict(activation="tanh"), ValueError, "activation must be"),
])
def test_errors(bad, error, match):
    args = dict(input=torch.randn(2, 4, 3, 3), num_groups=2, scale=torch.ones(2, 4), shift=torch.zeros(2, 4))
    args.update(bad)
    with pytest.raises(error, match=match):
        F.ada_group_norm(**args)


def test_diffusers_ada_group_norm_module():
    """diffusers' AdaGroupNorm module's arithmetic, its scale and shift as it makes them."""
    normalization = pytest.importorskip("diffusers.models.normalization")
    torch.manual_seed(0)
    module = normalization.AdaGroupNorm(embedding_dim=6, out_dim=8, num_groups=4, act_fn="silu").double()
    x, emb = torch.randn(2, 8, 5, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    e = module.linear(TF.silu(emb))[:, :, None, None]
    scale, shift = e.chunk(2, dim=1)
    torch.testing.assert_close(F.ada_group_norm(x, 4, scale, shift, module.eps), module(x, emb))


# --- casting "torch": diffusers' roundings, step by step ---------------------------------------
# diffusers' AdaGroupNorm in fp16/bf16 rounds group_norm's output, 1 + scale, the product and the
# sum to the dtype in turn; casting="fp32" rounds once, 7-11% of the elements > 1 ulp from it.
# casting="torch" takes those roundings: bit for bit where x_hat rounds as ATen's does (the
# reference backends; the kernels' x_hat differs from ATen's in its last fp32 bits, so a bf16/fp16
# rounding of it can land an ulp apart, and the interpreter's fp32->bf16 cast is not round-to-
# nearest: the kernels are compared in fp16 there, within an ulp of the largest step).

def _torch_steps(x, groups, scale, shift, activation):
    y = TF.group_norm(x, groups, eps=1e-5) * (1 + scale) + shift
    return TF.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((2, 8, 2, 3, 3), 4)], ids=str)
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_torch_casting_matches_diffusers_bit_for_bit(backend, shape, groups, dtype, activation):
    x = make(shape, dtype, requires_grad=False)
    scale, shift = (t.detach() for t in _modulation(shape, dtype))
    expected = _torch_steps(x, groups, scale, shift, activation)
    with normops.backend(backend):
        once = F.ada_group_norm(x, groups, scale, shift, activation=activation)
        y = F.ada_group_norm(x, groups, scale, shift, activation=activation, casting="torch")
    assert torch.equal(y, expected)
    assert not torch.equal(once, expected)  # the default rounds once: these shapes show it


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_torch_casting_grads_straight_through(backend):
    """The backward is casting "fp32"'s (the roundings are the identity in it) at the weight the
    forward used, 1 + scale rounded to bf16: casting "fp32" given that weight (an fp32 scale of
    round(1 + scale) - 1, exact; shift in fp32, exact) has the same gradients, bit for bit once in bf16."""
    x = make((2, 6, 5, 3), torch.bfloat16)
    scale, shift = _modulation(x.shape, torch.bfloat16)
    rounded = ((1 + scale.detach()).float() - 1).requires_grad_()
    shift32 = shift.detach().float().requires_grad_()
    with normops.backend(backend):
        y = F.ada_group_norm(x, 3, scale, shift, activation="silu", casting="torch")
        grads = torch.autograd.grad(y, (x, scale, shift), torch.ones_like(y))
        y = F.ada_group_norm(x, 3, rounded, shift32, activation="silu")
        expected = torch.autograd.grad(y, (x, rounded, shift32), torch.ones_like(y))
    for a, e in zip(grads, expected):
        assert torch.equal(a, e.to(a.dtype))


def test_torch_casting_unknown():
    x = make((2, 4, 3), torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="unknown casting 'llama'"):
        F.ada_group_norm(x, 2, x[:, :, 0], x[:, :, 0], casting="llama")


# --- the Triton kernels ([N, C] parameters under the PER_SAMPLE flag) ----------------------------

triton_tests = pytest.importorskip("test_triton_group_norm")  # needs triton; its `path` fixture
path = triton_tests.path


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((2, 8, 2, 3, 3), 4)], ids=str)
def test_triton(shape, groups, layout, dtype, activation, path):
    x = on_device(make(shape, dtype), CHANNELS_LAST[len(shape)] if layout == "channels_last" else None)
    scale, shift = _modulation(shape, dtype, device=DEVICE)
    assert_close_to_reference(*_ada(groups, activation), [x, scale, shift], "triton", dtype)


def test_triton_matches_numpy_reference(path):
    """float64 on the kernels against the NumPy reference: outputs and [N, C] gradients to 1e-12."""
    x = on_device(make((2, 6, 4, 3), torch.float64))
    scale, shift = _modulation(x.shape, torch.float64, device=DEVICE)
    results = {}
    for backend in ("triton", "numpy"):
        inputs = [t.detach().clone().requires_grad_() for t in (x, scale, shift)]
        with normops.backend(backend):
            y = F.ada_group_norm(*inputs[:1], 3, *inputs[1:], activation="silu")
            grads = torch.autograd.grad(y, inputs, torch.ones_like(y))
        results[backend] = (y,) + grads
    for ours, ref in zip(results["triton"], results["numpy"]):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_triton_gradcheck():
    x = on_device(make((2, 4, 3, 2), torch.float64, offset=0.5, scale=1.0))
    scale, shift = _modulation(x.shape, torch.float64, device=DEVICE)
    with normops.backend("triton"):
        assert torch.autograd.gradcheck(lambda *a: F.ada_group_norm(a[0], 2, a[1], a[2], activation="silu"),
                                        (x, scale, shift))


@pytest.mark.parametrize("chunk", [2**24, 200, 40], ids=["whole", "groups", "channels"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["group_norm", "ada"])
def test_torch_backend_chunked_low_precision_path(chunk, per_sample, monkeypatch):
    """The torch backend's path for fp16/bf16 off the CPU (statistics and the affine over pieces of
    GN_CHUNK elements, no fp32 copy of x), run on the CPU: whole groups a piece, several groups, one
    group's channels a piece. Peak memory of the real video shape: tests nothing here (a measurement,
    see the report); this checks the values."""
    from normops.backends import torch_backend
    monkeypatch.setattr(torch_backend, "_in_fp32", lambda x: x.dtype in LOW)
    monkeypatch.setattr(torch_backend, "GN_CHUNK", chunk)
    x = make((2, 8, 3, 2, 5), torch.bfloat16).detach().contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    if per_sample:
        scale, shift = _modulation(x.shape, torch.bfloat16)
        assert_close_to_reference(*_ada(4, "silu"), [x, scale, shift], "torch", torch.bfloat16)
    else:
        w = torch.linspace(0.5, 1.5, 8, dtype=torch.bfloat16).requires_grad_()
        b = torch.linspace(-1, 1, 8, dtype=torch.bfloat16).requires_grad_()
        assert_close_to_reference(lambda x, w, b: F.group_norm(x, 4, w, b, activation="silu"),
                                  lambda x, w, b: TF.silu(TF.group_norm(x, 4, w, b)), [x, w, b], "torch",
                                  torch.bfloat16)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_triton_torch_casting(layout, path):
    """The kernels' casting "torch" (TORCH_CASTING) on the one-pass and the looped/split normalize
    pass: within an ulp of the largest step of diffusers' fp16 composition (see above), which the
    default misses by more; the same gradients as the reference backend's."""
    from cases import CUDA
    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter rounds bf16 otherwise
    shape = (2, 8, 2, 3, 3)
    x = on_device(make(shape, dtype), CHANNELS_LAST[len(shape)] if layout == "channels_last" else None)
    scale, shift = _modulation(shape, dtype, device=DEVICE)
    expected = _torch_steps(x.detach(), 4, scale.detach(), shift.detach(), "silu")
    ulp = torch.finfo(dtype).eps * (expected.detach().abs().float() + 1 + shift.detach().abs().float()).max()
    with normops.backend("triton"):
        y = F.ada_group_norm(x, 4, scale, shift, activation="silu", casting="torch")
        once = F.ada_group_norm(x, 4, scale, shift, activation="silu")
        grads = torch.autograd.grad(y, (x, scale, shift), torch.ones_like(y))
    assert (y.float() - expected.float()).abs().max() <= ulp
    assert (y == expected).float().mean() > (once == expected).float().mean()
    with normops.backend("torch"):
        y_ref = F.ada_group_norm(x, 4, scale, shift, activation="silu", casting="torch")
        ref = torch.autograd.grad(y_ref, (x, scale, shift), torch.ones_like(y_ref))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
