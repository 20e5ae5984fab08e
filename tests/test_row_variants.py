"""The row-norm variants of today's language models (normops.functional.rms_norm/layer_norm's
offset, casting and out_dtype; add_*_norm with a residual of another dtype; gated_rms_norm;
add_rms_norm_ in place; QK-norm on strided views) on every backend: the torch backend, the Triton
kernels (in the interpreter without a GPU) and the NumPy reference.

The yardstick is a plain torch composition of each formula in float64 (``reference``), with the
tolerance rule of cases.py; the casting modes are checked against the Hugging Face modules'
arithmetic itself, in bf16/fp16, by the one-ulp rule (``ulps_apart``).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as F
import normops.nn as N
from cases import DEVICE, LOW, make, params
from normops.check import TOLERANCE
from normops.core import ulps_apart

# Triton's interpreter (3.9) truncates fp32 -> bf16 (``.to(tl.bfloat16)``, rtne asked or not); a
# GPU rounds to nearest even. The ulp comparisons of bf16 results are the GPU's then (fp16's, which
# the interpreter rounds right, run everywhere).
INTERPRETED_BF16 = "the Triton interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): the ulp rule is checked in fp16 here"
BACKENDS = ["torch", "numpy"] + (["triton"] if importlib.util.find_spec("triton") else [])

# (name, kwargs of gated_rms_norm / rms_norm): every flag, alone and together
VARIANTS = {
    "offset": dict(offset=1.0),
    "llama": dict(casting="llama"),
    "t5": dict(casting="t5"),
    "gate_after": dict(gate=True),
    "gate_first": dict(gate=True, norm_before_gate=False),
    "groups": dict(group_size=8),
    "gate_first_groups_offset": dict(gate=True, norm_before_gate=False, group_size=8, offset=1.0),
    "gate_after_llama": dict(gate=True, casting="llama"),
}


def reference(x, w, gate=None, *, eps=1e-6, offset=0.0, casting="fp32", norm_before_gate=True, group_size=None,
              bias=None, rms=True, out_dtype=None):
    """The variant as its formula reads (backends/__init__.py), composed in torch in x's dtype
    (float64 for the yardstick); the casting roundings go to ``out_dtype``-independent dtypes
    given by x, w."""
    u = x
    if gate is not None and not norm_before_gate:
        u = u * TF.silu(gate)
    n = x.shape[-1]
    g = u.unflatten(-1, (n // (group_size or n), group_size or n))
    if not rms:
        g = g - g.mean(-1, keepdim=True)
    x_hat = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    z = x_hat * (offset + w) if w is not None else x_hat
    if bias is not None:
        z = z + bias
    if gate is not None and norm_before_gate:
        z = z * TF.silu(gate)
    return z if out_dtype is None else z.to(out_dtype)


def _call(x, w, gate, kw):
    kw = dict(kw)
    kw.pop("gate", None)
    if gate is None and "norm_before_gate" not in kw and "group_size" not in kw:
        return F.rms_norm(x, [x.shape[-1]], w, 1e-6, **kw)
    return F.gated_rms_norm(x, gate, [x.shape[-1]], w, 1e-6, **kw)


def _grads(fn, inputs, seed=5):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, inputs, dy))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [24, 40, 4104])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_variant_forward_backward(backend, variant, width, dtype):
    """Outputs and the gradients of x, w (and gate) against the float64 formula: within the tolerance
    rule, torch's own error being that of the same formula composed in ``dtype``. (The casting
    roundings are where the dtypes round anyway: in fp32/fp64 they are exact; bf16: see below.)"""
    kw = VARIANTS[variant]
    if "group_size" in kw and width % kw["group_size"]:
        pytest.skip("the group size must divide the row")
    if width > 1000 and backend == "triton" and DEVICE == "cpu" and dtype != torch.float32:
        pytest.skip("one wide case a variant in the interpreter")
    x = make((3, width), dtype, requires_grad=False)
    w = params((width,), dtype)[0].detach()
    inputs = [x, w] + ([make((3, width), dtype, requires_grad=False, seed=4)] if kw.get("gate") else [])
    ref_kw = {k: v for k, v in kw.items() if k not in ("gate", "casting")}

    def ours(x, w, g=None):
        return _call(x, w, g, kw)

    def formula(x, w, g=None):
        return reference(x, w, g, **ref_kw)

    with normops.backend(backend):
        got = _grads(ours, inputs)
    same = _grads(formula, inputs)
    ref = _grads(formula, [t.double() for t in inputs])
    for i, (o, s, r) in enumerate(zip(got, same, ref)):
        assert o.dtype == s.dtype, (i, o.dtype, s.dtype)
        bound = 2 * (s.double() - r).abs().max().item() + TOLERANCE[dtype].beyond_torch * max(1, r.abs().max().item())
        if kw.get("casting") in ("llama", "t5") and dtype in LOW:  # x_hat rounded once more: half an ulp of it
            bound += 2 ** -8 * r.abs().max().item()
        assert (o.double() - r).abs().max().item() <= bound, (i, (o.double() - r).abs().max().item(), bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_offset(backend, dtype):
    """LayerNorm with a zero-centred weight: y = x_hat * (1 + w) + b, values and gradients."""
    x = make((4, 40), dtype, requires_grad=False)
    w, b = (t.detach() for t in params((40,), dtype))
    inputs = [x, w, b]
    with normops.backend(backend):
        got = _grads(lambda x, w, b: F.layer_norm(x, [40], w, b, 1e-6, offset=1.0), inputs)
    same = _grads(lambda x, w, b: reference(x, w, offset=1.0, bias=b, rms=False), inputs)
    ref = _grads(lambda x, w, b: reference(x, w, offset=1.0, bias=b, rms=False), [t.double() for t in inputs])
    for o, s_, r in zip(got, same, ref):
        bound = 2 * (s_.double() - r).abs().max().item() + TOLERANCE[dtype].beyond_torch * max(1, r.abs().max().item())
        assert (o.double() - r).abs().max().item() <= bound


# --- the Hugging Face modules' arithmetic, in bf16/fp16: within one ulp on 99.9% ---------------

def _llama(x, w, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _gemma(x, w, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).type_as(x)


def _t5(x, w, eps):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        h = h.to(w.dtype)
    return w * h


def _qwen3_next_gated(x, w, eps, gate):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = w * h.to(x.dtype)
    return (h * TF.silu(gate.to(torch.float32))).to(x.dtype)


def _mamba2_gated(x, w, eps, gate, group_size):
    h = x.to(torch.float32) * TF.silu(gate.to(torch.float32))
    g = h.unflatten(-1, (-1, group_size))
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return w * g.flatten(-2).to(x.dtype)


HF = {  # name -> (HF arithmetic, normops call with the matching settings)
    "llama": (_llama, lambda x, w, eps: F.rms_norm(x, [x.shape[-1]], w, eps, casting="llama",
                                                    out_dtype=torch.promote_types(w.dtype, x.dtype))),
    "gemma": (_gemma, lambda x, w, eps: F.rms_norm(x, [x.shape[-1]], w, eps, offset=1.0)),
    "t5": (_t5, lambda x, w, eps: F.rms_norm(x, [x.shape[-1]], w, eps, casting="t5", out_dtype=(
        w.dtype if w.dtype in LOW else torch.promote_types(w.dtype, torch.promote_types(x.dtype, torch.float32))))),
}


@pytest.mark.parametrize("wdtype", ["same", torch.float32], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family", list(HF))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_matches_hugging_face_arithmetic(backend, family, dtype, wdtype):
    """The converted module's output equals the HF module's within one ulp on >= 99.9% of the
    elements (the statistics' summation order is all that may differ), in HF's output dtype; an
    fp32 output (fp32 weights promote it) within 4 fp32 ulps on >= 99.9%."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip(INTERPRETED_BF16)
    hf, ours = HF[family]
    torch.manual_seed(0)
    x = (torch.randn(64, 264) * 3).to(dtype)
    w = (torch.randn(264) * 0.5 + (0 if family == "gemma" else 1)).to(dtype if wdtype == "same" else wdtype)
    with normops.backend(backend):
        got = ours(x, w, 1e-6)
    want = hf(x, w, 1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    apart = ulps_apart(got, want)
    # fp32 weights promote the result to fp32: no final rounding hides rstd's last bits (and an x_hat
    # rounded to the input dtype the other way is one input-dtype ulp, on a few elements)
    assert (apart <= (4 if want.dtype == torch.float32 else 1)).float().mean().item() >= 0.999, apart.max()


@pytest.mark.parametrize("family", list(HF))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_exact_where_hugging_face_is_exact(backend, family):
    """Rows of +-2^k with eps = 0: the mean square is a power of 4, rsqrt and every product exact,
    so HF's result is exact and ours must equal it bit for bit."""
    x = (torch.randint(0, 2, (8, 64)) * 2 - 1).to(torch.bfloat16) * 2.0 ** torch.randint(-3, 4, (8, 1))
    w = torch.randn(64).to(torch.bfloat16)
    hf, ours = HF[family]
    with normops.backend(backend):
        got = ours(x, w, 0.0)
    assert torch.equal(got, hf(x, w, 0.0))


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_gated_hugging_face_arithmetic(backend, dtype):
    """Qwen3-Next's gate after the norm (llama rounding of x_hat, then of x_hat * w) and Mamba2's
    gate first with groups, in bf16/fp16: within one ulp on >= 99.9%."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip(INTERPRETED_BF16)
    torch.manual_seed(1)
    x, gate = (torch.randn(32, 256) * 2).to(dtype), torch.randn(32, 256).to(dtype)
    w = (torch.randn(256) * 0.3 + 1).to(dtype)
    with normops.backend(backend):
        after = F.gated_rms_norm(x, gate, [256], w, 1e-6, casting="llama")
        first = F.gated_rms_norm(x, gate, [256], w, 1e-6, casting="llama", norm_before_gate=False, group_size=64)
    for got, want in ((after, _qwen3_next_gated(x, w, 1e-6, gate)), (first, _mamba2_gated(x, w, 1e-6, gate, 64))):
        assert got.dtype == want.dtype
        assert (ulps_apart(got, want) <= 1).float().mean().item() >= 0.999


# --- residual in another dtype, out_dtype ----------------------------------------------------

@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_residual_stream(backend, rms):
    """bf16 x with an fp32 residual (flash-attn's residual_in_fp32): h = x + residual in fp32 (as
    torch's x + residual), y in out_dtype; gradients reach x in bf16 and the residual in fp32."""
    x = make((4, 96), torch.bfloat16, requires_grad=False)
    r = make((4, 96), torch.float32, requires_grad=False, seed=3)
    w, b = (t.detach() for t in params((96,), torch.float32))
    fn = (lambda x, r, w: F.add_rms_norm(x, r, [96], w, 1e-6, out_dtype=torch.bfloat16)) if rms else \
        (lambda x, r, w: F.add_layer_norm(x, r, [96], w, b, out_dtype=torch.bfloat16))
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    with normops.backend(backend):
        y, h = fn(*leaves)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.float32)
    assert torch.equal(h, x.float() + r)
    want = (TF.rms_norm(h, [96], w, 1e-6) if rms else TF.layer_norm(h, [96], w, b)).to(torch.bfloat16)
    assert (ulps_apart(y, want) <= 1).all()
    (y.float().sum() + h.sum()).backward()
    assert leaves[0].grad.dtype == torch.bfloat16 and leaves[1].grad.dtype == torch.float32
    ref = [t.double().requires_grad_() for t in (x, r, w)]
    hh = ref[0] + ref[1]
    yy = TF.rms_norm(hh, [96], ref[2], 1e-6) if rms else TF.layer_norm(hh, [96], ref[2], b.double())
    (yy.sum() + hh.sum()).backward()
    torch.testing.assert_close(leaves[1].grad.double(), ref[1].grad, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(leaves[2].grad.double(), ref[2].grad, atol=5e-2, rtol=2e-2)


# --- gradcheck / gradgradcheck in float64 ------------------------------------------------------

@pytest.mark.parametrize("variant", ["offset", "gate_after", "gate_first", "gate_first_groups_offset"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, variant):
    if backend == "triton" and DEVICE == "cpu" and variant in ("offset", "gate_first"):
        pytest.skip("in the interpreter, the two variants that combine the others' flags")
    kw = VARIANTS[variant]
    torch.manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    inputs = (x, w) + ((torch.randn(3, 16, dtype=torch.float64, requires_grad=True),) if kw.get("gate") else ())

    def fn(*a):
        return _call(a[0], a[1], a[2] if len(a) > 2 else None, kw)

    with normops.backend(backend):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


# --- in place, for inference ---------------------------------------------------------------

@pytest.mark.parametrize("width", [64, 20000])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_in_place(backend, width):
    """vLLM's fused_add_rms_norm: residual <- x + residual, x <- rms_norm(residual) * w, the same
    values add_rms_norm returns, written into the caller's tensors."""
    x = make((3, width), torch.bfloat16, requires_grad=False)
    r = make((3, width), torch.bfloat16, requires_grad=False, seed=3)
    w = params((width,), torch.bfloat16)[0].detach()
    with normops.backend(backend):
        y, h = F.add_rms_norm(x, r, [width], w, 1e-6)
        xi, ri = x.clone(), r.clone()
        ptrs = xi.data_ptr(), ri.data_ptr()
        with torch.inference_mode():
            out = F.add_rms_norm_(xi, ri, [width], w, 1e-6)
    assert out[0] is xi and out[1] is ri and (xi.data_ptr(), ri.data_ptr()) == ptrs
    assert torch.equal(xi, y) and torch.equal(ri, h)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_in_place_is_written_by_the_kernel():
    """On the Triton kernels the in-place call is one launch whose y and h pointers are x and the
    residual: no temporary, no copy."""
    from normops.kernels.common import record
    x, r = torch.randn(4, 64), torch.randn(4, 64)
    with normops.backend("triton"), record() as launches, torch.no_grad():
        F.add_rms_norm_(x, r, [64], torch.ones(64), 1e-6)
    (launch,) = launches
    y, h = launch.args[2], launch.args[3]
    assert y.data_ptr() == x.data_ptr() and h.data_ptr() == r.data_ptr()


def test_in_place_errors_leave_the_tensors_alone():
    x, r, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    before = x.clone(), r.clone()
    cases = [
        (RuntimeError, "no gradient", lambda: F.add_rms_norm_(x, r, [8], w.clone().requires_grad_())),
        (ValueError, "contiguous", lambda: F.add_rms_norm_(x.t().contiguous().t(), r, [8], w)),
        (ValueError, "share storage", lambda: F.add_rms_norm_(x, x, [8], w)),
        (normops.core.ShapeError, "dtype", lambda: F.add_rms_norm_(x, r.double(), [8], w)),
    ]
    for exc, words, call in cases:
        with pytest.raises(exc, match=words):
            call()
    assert torch.equal(x, before[0]) and torch.equal(r, before[1])


# --- QK-norm on strided views of a fused QKV projection ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_on_strided_views(backend):
    """q and k as (tokens, heads, head_dim) views of one (tokens, 3 * heads * head_dim) projection,
    one weight shared by the heads: values and gradients (into the projection) are torch's."""
    tokens, heads, d = 5, 4, 16
    qkv = torch.randn(tokens, 3 * heads * d, dtype=torch.float64, requires_grad=True)
    wq, wk = (torch.randn(d, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def qk(norm, qkv, wq, wk):
        q, k, _ = qkv.view(tokens, 3, heads, d).unbind(1)
        return norm(q, [d], wq, 1e-6), norm(k, [d], wk, 1e-6)

    with normops.backend(backend):
        ours = qk(F.rms_norm, qkv, wq, wk)
        g_ours = torch.autograd.grad(ours[0].sum() + (ours[1] * 2).sum(), (qkv, wq, wk))
    theirs = qk(TF.rms_norm, qkv, wq, wk)
    g_theirs = torch.autograd.grad(theirs[0].sum() + (theirs[1] * 2).sum(), (qkv, wq, wk))
    for a, b in zip(ours + g_ours, theirs + g_theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_qk_norm_reads_the_views_in_place():
    """The kernels read q's rows where they are: the launch gets the view itself (its storage
    offset and strides), not a contiguous copy."""
    from normops.kernels.common import record
    tokens, heads, d = 6, 4, 32
    qkv = torch.randn(tokens, 3 * heads * d)
    q = qkv.view(tokens, 3, heads, d)[:, 0]
    k = qkv.view(tokens, 3, heads, d)[:, 1]
    with normops.backend("triton"), record() as launches:
        F.rms_norm(q, [d], torch.ones(d), 1e-6)
        F.rms_norm(k, [d], torch.ones(d), 1e-6)
    assert [la.args[0].data_ptr() for la in launches] == [q.data_ptr(), k.data_ptr()]
    assert all(la.args[0].untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for la in launches)


# --- errors, modules, compile ------------------------------------------------------------------

def test_variant_errors():
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="casting"):
        F.rms_norm(x, [8], w, casting="bf16")
    with pytest.raises(ValueError, match="weight is None"):
        F.rms_norm(x, [8], None, offset=1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        F.rms_norm(x, [8], w, out_dtype=torch.int32)
    with pytest.raises(normops.core.ShapeError, match="group_size=3"):
        F.gated_rms_norm(x, None, [8], w, group_size=3)
    with pytest.raises(normops.core.ShapeError, match="gate of the input's shape"):
        F.gated_rms_norm(x, x[:, :4], [8], w)
    with pytest.raises(ValueError, match="positive"):
        F.gated_rms_norm(x, None, [8], w, group_size=0)


def test_modules():
    m = N.RMSNorm(8, 1e-6, offset=1.0, casting="llama")
    assert list(m.state_dict()) == ["weight"] and "offset=1.0" in repr(m) and "casting='llama'" in repr(m)
    g = N.GatedRMSNorm(8, 1e-6, group_size=4, norm_before_gate=False)
    assert list(g.state_dict()) == ["weight"] and torch.equal(g.weight, torch.ones(8))
    x, z = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(g(x, z), reference(x, g.weight, z, norm_before_gate=False, group_size=4))
    torch.testing.assert_close(m(x), reference(x, m.weight, offset=1.0))
    for module in (m, N.GatedRMSNorm(8, offset=1.0), N.LayerNorm(8, offset=1.0)):  # the scale starts at 1
        assert torch.equal(module.weight, torch.zeros(8))
        module.reset_parameters()
        assert torch.equal(module.weight, torch.zeros(8))


def test_compile_fullgraph():
    """The variants compile without graph breaks (the ops are opaque on the CPU) and give eager's
    values and gradients."""
    def fn(x, w, z, r):
        y, h = F.add_rms_norm(x, r, [16], w, 1e-6, offset=1.0, out_dtype=torch.bfloat16)
        return F.gated_rms_norm(y.float(), z, [16], w, 1e-6, norm_before_gate=False, group_size=8), h

    torch.manual_seed(0)
    args = [torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(16), torch.randn(4, 16), torch.randn(4, 16)]
    eager = [t.clone().requires_grad_() for t in args]
    comp = [t.clone().requires_grad_() for t in args]
    out_e = fn(*eager)
    out_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(*comp)
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(a, b)
    sum(o.float().sum() for o in out_e).backward()
    sum(o.float().sum() for o in out_c).backward()
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a.grad, b.grad)


def test_in_place_compiles():
    """add_rms_norm_ under torch.compile(fullgraph=True): the mutation is functionalized and written
    back, giving eager's x and residual."""
    def step(x, r, w):
        return F.add_rms_norm_(x, r, [16], w, 1e-6)

    torch.manual_seed(0)
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    xe, re_ = x.clone(), r.clone()
    with torch.no_grad():
        step(xe, re_, w)
        torch.compile(step, fullgraph=True, backend="aot_eager")(x, r, w)
    assert torch.equal(x, xe) and torch.equal(r, re_)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
def test_residual_stream_backward_is_one_kernel(monkeypatch):
    """The backward of add_rms_norm with an fp32 residual, h used later too: one kernel adds dh and
    writes x's gradient (bf16) and the residual's (fp32), then the dw glue: no cast, no add."""
    from normops.kernels import row_norm as kernels
    launches, real = [], kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda k, grid, *a, **kw: launches.append((k, kw)) or real(k, grid, *a, **kw))
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with normops.backend("triton"):
        y, h = F.add_rms_norm(x, r, [64], w, 1e-6, out_dtype=torch.bfloat16)
        launches.clear()
        (y.float().square().sum() + h.sum()).backward()
    names = [k.fn.__name__ for k, _ in launches]
    assert names == ["_row_norm_bwd_kernel", "_row_norm_param_grads_kernel"], names
    assert launches[0][1]["HAS_DH"] and launches[0][1]["STORE_DR"]
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad.float(), r.grad, atol=1e-2, rtol=1e-2)  # one gradient, rounded for x


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton")
@pytest.mark.parametrize("variant", ["offset", "gate_after", "gate_first_groups_offset", "gate_after_llama"])
def test_kernels_match_the_numpy_reference(variant):
    """The Triton kernels' forward (y, statistics) and backward (dx, dw, dgate, with dh added for a
    residual) against the float64 NumPy reference, called through the backend contract, in fp32."""
    from normops.backends import numpy_backend, triton_backend
    kw = dict(VARIANTS[variant])
    gated = kw.pop("gate", False)
    kw["group_size"] = kw.get("group_size") or 0
    x, r = (make((3, 48), torch.float32, requires_grad=False, seed=s) for s in (0, 3))
    w = params((48,), torch.float32)[0].detach()
    gate = make((3, 48), torch.float32, requires_grad=False, seed=4) if gated else None
    dy, dh = torch.randn(3, 48), torch.randn(3, 48)
    mask = [True, True, False, gated]
    outs = []
    for module in (triton_backend, numpy_backend):
        y, h, _, rstd = module.row_norm_fwd(x, r, (48,), w, None, 1e-6, True, "none", True, gate=gate, **kw)
        grads = module.row_norm_bwd(dy, h, (48,), w, None, None, rstd, True, "none", mask, gate=gate, **kw)
        dx = grads[0] + dh if module is numpy_backend else \
            triton_backend.row_norm_bwd(dy, h, (48,), w, None, None, rstd, True, "none", mask, gate=gate, dh=dh,
                                        **kw)[0]
        outs.append([y, h, rstd, dx, *[g for g in grads[1:4] if g is not None]])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
