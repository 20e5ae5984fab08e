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


def _exact(shape, dtype, step, seed):
    """Values k * step for small integers k: products and sums of a few of them are exact in bf16 and
    fp32, so any order of rounding (an FMA or not) gives one result."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=g).double() * step).to(dtype).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("casting", ["fp32", "torch"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual+gate"])
@pytest.mark.parametrize("d", [33, 300])
def test_constant_rows_exact(d, residual, casting, backend, dtype):
    """A constant row (h = residual + gate * x constant: gate one value a sample) normalizes to x_hat
    == 0 exactly, so y == bias * (1 + scale) + shift exactly, and under a gradient constant along
    the row (dy, 1 + scale and w each constant a row) dx == 0 exactly: the statistics are taken about
    the row's first h and mean(g) about its first g (kernels/row_norm.py's pivots). With a plain
    mean, sum(h) / D is an ulp off at 123.456 and rstd = 1/sqrt(1e-6) = 1000 magnifies it."""
    if casting == "torch" and backend == "torch":  # torch's own layer_norm, diffusers' bit for bit: not exact
        pytest.skip("the torch backend's casting 'torch' is ATen's layer_norm")
    b, t = 2, 3
    level = torch.tensor([123.456, 1e4 + 0.37]).to(dtype).double()  # one constant a sample (bf16: rounded)
    x = level.reshape(b, 1, 1).expand(b, t, d).to(dtype).to(DEVICE)
    kw = {}
    if residual:  # h = r + gate * x = level: x = 0.5 (exact), gate = 2 (one value a sample), r = level - 1
        gate = torch.full((b, d), 2.0, dtype=dtype, device=DEVICE)
        kw = dict(residual=(x.double() - 1.0).to(dtype), gate=gate)
        x = torch.full_like(x, 0.5)
    scale, shift = _exact((b, d), dtype, 0.125, 1), _exact((b, d), dtype, 0.0625, 2)
    weight, bias = _exact((d,), dtype, 0.25, 3), _exact((d,), dtype, 0.25, 4)
    with normops.backend(backend):
        y = ada_layer_norm(x, scale, shift, 1e-6, weight, bias, casting=casting, **kw)
    y = y[0] if residual else y
    want = (bias.double() * (1 + scale.double()[:, None]) + shift.double()[:, None]).to(dtype)
    assert torch.equal(y, want.expand_as(y))
    # the gradient: dy and 1 + scale constant along each row, no weight
    x = x.clone().requires_grad_()
    row_scale = scale[:, :1].expand(b, d).contiguous()
    dy = _exact((b, t, 1), dtype, 0.5, 5).expand(b, t, d).contiguous()
    with normops.backend(backend):
        out = ada_layer_norm(x, row_scale, shift, 1e-6, None, bias, casting=casting, **kw)
        (out[0] if residual else out).backward(dy)
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual+gate"])
def test_precise_at_an_offset(residual, backend):
    """Rows at 1e4 + randn in fp32 keep their digits (statistics about the row's first h): outputs
    and gradients within the tolerance rule against the float64 composition."""
    ins = inputs((2, 4, 64), torch.float32, residual, residual, True, True)
    ins[0] = (ins[0].detach() + 1e4).requires_grad_()
    assert_close_to_reference(ours(False, residual, residual, True, True), composition(False, residual, residual, True, True),
                              ins, backend, torch.float32)


def _backend_grads(module, casting, rms, ins, dy):
    """The backend's ada_norm_bwd (all seven gradients) on h fp16 and fp32 scale, gate (and weight,
    bias): the factors the casting rounds to h's dtype show in the fp32 gradients."""
    x, r, gate, scale, shift, w, b = ins
    from normops.backends import torch_backend
    _, h, mean, rstd = torch_backend.ada_norm_fwd(x, r, gate, scale, shift, w, b, 1e-6, rms, casting, True)
    return module.ada_norm_bwd(dy, torch.zeros_like(h), x, h, gate, scale, w, b, mean, rstd, rms, casting, [True] * 7)


@pytest.mark.parametrize("casting, rms", [("torch", False), ("torch", True), ("t5", True)])
def test_rounded_casting_gradients_match_the_torch_backend(casting, rms):
    """The kernels' backward against the torch backend's (straight-through roundings; dw and db from
    per-sample sums times 1 + scale[b] as rounded, in the glue kernel): fp32 gradients agree to fp32
    summation order, closer than the casting's rounding moves them (checked against "fp32"). fp16,
    not bf16: the interpreter rounds fp32 to bf16 by truncation, a bias in the sums."""
    if not (CUDA or normops.backends.triton_interpret()):
        pytest.skip("no Triton")
    from normops.backends import torch_backend
    from normops.kernels import ada_norm as kernels
    lo, f32 = torch.float16, torch.float32
    x, r = (make((3, 5, 40), lo, offset=o, scale=0.5, seed=s, requires_grad=False) for o, s in ((-2.3, 0), (0.3, 5)))
    gate, scale, shift = (make((3, 40), f32, offset=0.1, scale=0.5, seed=s, requires_grad=False) for s in (6, 3, 4))
    w = make((40,), lo if casting == "t5" else f32, offset=1.0, scale=0.3, seed=7, requires_grad=False)
    b = None if rms else make((40,), f32, offset=0.0, scale=0.3, seed=8, requires_grad=False)
    ins = [t if t is None else t.to(DEVICE) for t in (x, r, gate, scale, shift, w, b)]
    dy = make((3, 5, 40), lo, offset=0.0, scale=1.0, seed=9, requires_grad=False).to(DEVICE)
    got = _backend_grads(kernels, casting, rms, ins, dy)
    want = _backend_grads(torch_backend, casting, rms, ins, dy)
    unrounded = _backend_grads(torch_backend, "fp32", rms, ins, dy)
    names = ("dx", "dresidual", "dgate", "dscale", "dshift", "dweight", "dbias")
    for name, g, e, u in zip(names, got, want, unrounded):
        if e is None:
            continue
        low = g.dtype == lo  # dx, dresidual (and t5's dweight) come in fp16: up to an ulp from rounding
        g, e, u = g.double(), e.double(), u.double()
        tol = 1e-5 * e.abs().max() + (2.0 ** -10 * e.abs() if low else 0)
        assert ((g - e).abs() <= tol).all(), name
        if name in ("dscale", "dweight", "dbias") and not low:
            assert ((u - e).abs() > tol).any(), name  # the rounding shows: the test could fail


def t5_composition(weight):
    """diffusers' RMSNorm (its forward, normalization.py) then AdaLayerNormContinuous' modulation."""
    def fn(x, scale, shift, *rest):
        w = rest[0] if weight else None
        var = x.to(torch.float32 if x.dtype != torch.float64 else x.dtype).pow(2).mean(-1, keepdim=True)
        n = x * torch.rsqrt(var + 1e-6)
        if w is not None:
            n = (n.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else n) * w
        else:
            n = n.to(x.dtype)
        return n * (1 + scale)[:, None, :] + shift[:, None, :]
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32] + LOW, ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
def test_t5_casting_against_diffusers_rms_norm(weight, dtype, backend):
    ins = inputs((2, 5, 24), dtype, False, False, weight, False)
    assert_close_to_reference(ours(True, False, False, weight, False, "t5"), t5_composition(weight), ins, backend,
                              dtype)


@pytest.mark.parametrize("weight", [True, False], ids=["weight", "no-weight"])
def test_t5_casting_is_diffusers_bit_for_bit(weight):
    """casting="t5" on the torch backend: diffusers' bf16 RMSNorm + modulation exactly. With a weight
    it differs from "torch" (x_hat rounded before the weight: two roundings, not one)."""
    ins = [t.detach() for t in inputs((2, 9, 40), torch.bfloat16, False, False, weight, False)]
    want = t5_composition(weight)(*ins)
    with normops.backend("torch"):
        got = ours(True, False, False, weight, False, "t5")(*ins)
        torch_casting = ours(True, False, False, weight, False, "torch")(*ins)
    assert torch.equal(got, want)
    assert torch.equal(torch_casting, want) != weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_autocast(backend):
    """Under CPU autocast torch's norms (and diffusers' composition) keep the input dtype; so does
    ada_norm, forward and backward. Under CUDA autocast it runs in fp32, as torch's layer_norm."""
    ins = inputs((2, 5, 16), torch.bfloat16, True, True, True, True)
    with normops.backend(backend):
        plain = [t.detach() for t in ours(False, True, True, True, True)(*ins)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours(False, True, True, True, True)(*ins)
            want = composition(False, True, True, True, True)(*[t.detach() for t in ins])
            got[0].sum().backward()
    assert [t.dtype for t in got] == [t.dtype for t in want] == [torch.bfloat16] * 2
    assert all(torch.equal(a, b) for a, b in zip(got, plain))  # the same call as without autocast
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in ins)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("normops::ada_norm", "AutocastCUDA")


def test_t5_is_rms_only():
    x, s = torch.randn(2, 3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="ada_rms_norm"):
        ada_layer_norm(x, s, s, casting="t5")
