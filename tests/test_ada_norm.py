"""adaLN modulation (normops.functional.ada_layer_norm / ada_rms_norm, normops/ops/ada_norm.py) on
every backend against diffusers' torch composition: ``h = gate[:, None] * x + r``, then
``norm(h) * (1 + scale[:, None]) + shift[:, None]``. Tolerances: cases.py's rule (twice torch's own
same-dtype error against float64, plus a small relative slack). The Triton kernels run under the
interpreter without a GPU (conftest.py), at small shapes."""
import pytest
import torch
import torch.nn.functional as TF

import normops
from cases import CUDA, DEVICE, LOW, assert_close_to_reference, make
from normops.functional import ada_layer_norm, ada_rms_norm

BACKENDS = ["torch", "numpy"] + (["triton"] if CUDA or normops.backends.triton_interpret() else [])


def composition(rms, residual, gate, weight, bias):
    """diffusers' torch composition, taking (x, scale, shift, [r], [g], [w], [b])."""
    def fn(x, scale, shift, *rest):
        rest = list(rest)
        r = rest.pop(0) if residual else None
        g = rest.pop(0) if gate else None
        w = rest.pop(0) if weight else None
        b = rest.pop(0) if bias else None
        d = x.shape[-1]
        per_sample = (x.shape[0],) + (1,) * (x.dim() - 2) + (d,)  # diffusers' [:, None] for any middle dims
        h = x if r is None else (x if g is None else g.reshape(per_sample) * x) + r
        n = TF.rms_norm(h, (d,), w, 1e-6) if rms else TF.layer_norm(h, (d,), w, b, 1e-6)
        y = n * (1 + scale.reshape(per_sample)) + shift.reshape(per_sample)
        return y if r is None else (y, h)
    return fn


def ours(rms, residual, gate, weight, bias, casting="fp32"):
    def fn(x, scale, shift, *rest):
        rest = list(rest)
        kw = dict(residual=rest.pop(0) if residual else None, gate=rest.pop(0) if gate else None, casting=casting)
        w = rest.pop(0) if weight else None
        if rms:
            return ada_rms_norm(x, scale, shift, 1e-6, w, **kw)
        return ada_layer_norm(x, scale, shift, 1e-6, w, rest.pop(0) if bias else None, **kw)
    return fn


def inputs(shape, dtype, residual, gate, weight, bias, scale_3d=False):
    b, d = shape[0], shape[-1]
    x = make(shape, dtype, offset=-2.3, scale=0.5)
    per = [make((b, d), dtype, offset=0.1, scale=0.5, seed=s) for s in (3, 4)]
    if scale_3d:
        per[0] = per[0].detach().reshape(b, 1, d).requires_grad_()
    rest = ([make(shape, dtype, seed=5)] if residual else []) + ([make((b, d), dtype, offset=0.5, seed=6)] if gate else [])
    rest += [make((d,), dtype, offset=1.0, scale=0.3, seed=7)] if weight else []
    rest += [make((d,), dtype, offset=0.0, scale=0.3, seed=8)] if bias else []
    return [t.detach().to(DEVICE).requires_grad_() for t in [x] + per + rest]


FLAGS = [(False, False, False, False), (True, True, True, True), (True, False, False, True), (False, False, True, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64] + LOW, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 7), (1, 3, 33), (3, 1, 16), (2, 0, 8), (2, 2, 3, 9)], ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "".join(n for n, on in zip(("r", "g", "w", "b"), f) if on) or "plain")
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_against_composition(rms, flags, shape, dtype, backend):
    residual, gate, weight, bias = flags
    bias = bias and not rms
    ins = inputs(shape, dtype, residual, gate, weight, bias)
    assert_close_to_reference(ours(rms, residual, gate, weight, bias), composition(rms, residual, gate, weight, bias),
                              ins, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", ["fp32", "torch"])
def test_noncontiguous_and_scale_3d(backend, casting):
    ins = inputs((3, 4, 10), torch.float32, True, True, True, True, scale_3d=True)
    x = ins[0].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided over B, T
    assert not x.is_contiguous()
    ins[0] = x
    assert_close_to_reference(ours(False, True, True, True, True, casting), composition(False, True, True, True, True),
                              ins, backend, torch.float32)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_torch_casting_is_diffusers_bit_for_bit(rms):
    """casting="torch" on the torch backend: diffusers' bf16 composition exactly, y and h."""
    ins = [t.detach() for t in inputs((2, 9, 40), torch.bfloat16, True, True, True, not rms)]
    with normops.backend("torch"):
        got = ours(rms, True, True, True, not rms, "torch")(*ins)
    want = composition(rms, True, True, True, not rms)(*ins)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_casting_within_an_ulp(backend):
    """Every backend's "torch" casting is diffusers' bf16 composition to an ulp of its largest step:
    an ulp of layer_norm's output (its statistics may differ in the last fp32 bit) becomes up to
    |1 + scale| ulps of the product, which + shift may leave larger than an ulp of y."""
    if backend == "triton" and not CUDA:  # seen: its fp32 -> bf16 casts are not round-to-nearest-even
        pytest.skip("Triton's interpreter does not round fp32 to bf16 as the GPU (and torch) do")
    ins = [t.detach() for t in inputs((2, 9, 40), torch.bfloat16, True, True, True, True)]
    with normops.backend(backend):
        y, h = ours(False, True, True, True, True, "torch")(*ins)
    want_y, want_h = composition(False, True, True, True, True)(*ins)
    one_plus = (1 + ins[1].double().abs()).unsqueeze(1)
    step = torch.maximum(want_y.double().abs(), (want_y.double() - ins[2].double().unsqueeze(1)).abs())
    ulp = 2.0 ** -7 * (step + one_plus * 8)  # layer_norm's output: |n| < 8 here
    assert ((y.double() - want_y.double()).abs() <= ulp).all()
    assert torch.equal(h, want_h)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("casting", ["fp32", "torch"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck(rms, casting, backend):
    ins = inputs((2, 3, 5), torch.float64, True, True, True, not rms)
    fn = ours(rms, True, True, True, not rms, casting)
    with normops.backend(backend):
        assert torch.autograd.gradcheck(fn, ins)
        if backend != "numpy":  # the double backward is the torch composition's whatever the backend
            assert torch.autograd.gradgradcheck(fn, ins)


def test_compile_fullgraph():
    ins = [t.detach() for t in inputs((2, 5, 8), torch.float32, True, True, True, True)]
    fn = torch.compile(ours(False, True, True, True, True), fullgraph=True)
    got, want = fn(*ins), ours(False, True, True, True, True)(*ins)
    assert torch.allclose(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("call, error, match", [
    (lambda x, s: ada_layer_norm(x, s[:1], s), ValueError, "scale of shape"),
    (lambda x, s: ada_layer_norm(x, s, s[:, :3]), ValueError, "shift of shape"),
    (lambda x, s: ada_layer_norm(x, s, s, residual=x, gate=s[:, None, None]), ValueError, "gate of shape"),
    (lambda x, s: ada_layer_norm(x, s, s, gate=s), ValueError, "needs a residual"),
    (lambda x, s: ada_layer_norm(x, s, s, residual=x[:, :1]), ValueError, "residual of the input's shape"),
    (lambda x, s: ada_layer_norm(x, s.long(), s), TypeError, "floating"),
    (lambda x, s: ada_layer_norm(x, s, s, casting="llama"), ValueError, "casting"),
    (lambda x, s: ada_layer_norm(x[0, 0], s, s), ValueError, "at least 2-D"),
    (lambda x, s: ada_layer_norm(x, s, s, weight=s[0, :3]), ValueError, "weight of shape"),
    (lambda x, s: ada_layer_norm(x, s.to("meta"), s), RuntimeError, "expected scale on"),
    (lambda x, s: ada_layer_norm(x, s, None), TypeError, "shift must be"),
])
def test_errors(call, error, match):
    x, s = torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(error, match=match):
        call(x, s)
