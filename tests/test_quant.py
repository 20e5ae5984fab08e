"""Norm + quantize for inference (normops.functional.rms_norm_quant / layer_norm_quant) on every
backend: the torch backend, the Triton kernels (in the interpreter without a GPU) and the NumPy
reference.

The yardstick is the issue's: q equals quantizing the norm's own output y with the returned scales
(``reference_codes``: torch's clamp and conversion of y / scale), except an element whose quotient
lies within one fp32 ulp of a rounding boundary (the kernels multiply by 1 / scale rather than
divide). On the torch backend y is torch.nn.functional's output itself; the Triton and NumPy
backends' y is their own norm's, which the row-norm tests hold to torch's. The scales are
max(amax |y| / qmax, 2**-126) exactly, per row or per group.
"""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as F
from normops.core import MIN_QUANT_SCALE, QUANT_MAX

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", "numpy"] + (["triton"] if HAS_TRITON else [])
QDTYPES = [torch.float8_e4m3fn, torch.int8]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


if HAS_TRITON:
    import triton
    import triton.language as tl

    from normops.kernels.row_norm import Q_FP8, Q_INT8, _quantized

    @triton.jit
    def _codes_kernel(V, Q, n, QUANT: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Q + o, _quantized(tl.load(V + o, mask=o < n), QUANT), mask=o < n)


def reference_codes(t, dtype):
    """fp32 quotients y / scale quantized as torch does it: saturated, then converted (fp8:
    torch's round to nearest even) or rounded half to even (int8)."""
    qmax = QUANT_MAX[dtype]
    t = t.clamp(-qmax - (dtype == torch.int8), qmax)
    return torch.round(t).to(dtype) if dtype == torch.int8 else t.to(dtype)


def assert_quantizes(q, scales, y, k, dtype, group_size=None, static=False):
    """q and scales are y's quantization: the scales as defined; q as reference_codes of y / scale,
    or of a quotient one fp32 ulp away (a rounding boundary that close)."""
    rows = y.float().flatten(y.dim() - k)
    groups = rows.unflatten(-1, (-1, group_size or rows.shape[-1]))
    if not static:
        expected = (groups.abs().amax(-1) / QUANT_MAX[dtype]).clamp_min(MIN_QUANT_SCALE)
        assert scales.dtype == torch.float32 and scales.shape == expected.shape
        assert torch.equal(scales, expected)
        s = scales[..., None]
    else:
        s = scales.reshape(())
    t = (groups / s).flatten(-2)
    codes = q.flatten(y.dim() - k).view(torch.int8)
    ok = torch.zeros_like(codes, dtype=torch.bool)
    for near in (t, t.nextafter(torch.tensor(math.inf)), t.nextafter(torch.tensor(-math.inf))):
        ok |= codes == reference_codes(near, dtype).view(torch.int8)
    assert ok.all(), f"{(~ok).sum().item()} codes off: quotients {t[~ok][:5].tolist()}"
    exact = codes == reference_codes(t, dtype).view(torch.int8)
    assert exact.float().mean() > 0.99  # boundaries within an ulp are rare


def norm_output(rms, x, residual, shape, w, b, eps, **kw):
    """The same backend's own norm output, which q quantizes."""
    if residual is not None:
        kw.pop("activation", None)
        return (F.add_rms_norm(x, residual, shape, w, eps, **kw) if rms
                else F.add_layer_norm(x, residual, shape, w, b, eps, **kw))[0]
    return F.rms_norm(x, shape, w, eps, **kw) if rms else F.layer_norm(x, shape, w, b, eps, **kw)


def run_quant(rms, x, shape, w, b, eps, **kw):
    if rms:
        return F.rms_norm_quant(x, shape, w, eps, **kw)
    return F.layer_norm_quant(x, shape, w, b, eps, **kw)


# --- the codes: software float8_e4m3fn and int8 rounding, against torch's conversion ------------------

def _code_probes():
    """Every float8_e4m3fn value, the midpoints between neighbours (ties) and their fp32 neighbours,
    values past the range, zeros, NaN and random values, as fp32."""
    grid = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[~grid.isnan()].unique()
    mid = (grid[1:] + grid[:-1]) / 2
    probes = torch.cat([grid, mid, mid.nextafter(torch.tensor(math.inf)), mid.nextafter(torch.tensor(-math.inf)),
                        torch.tensor([448.0, 464.0, 464.5, 500.0, 1e30, math.inf, -math.inf, 0.0, -0.0, 2 ** -10,
                                      2 ** -126, 1e-45]),
                        torch.randn(2000) * 50, torch.randn(500) * 1e-3])
    return torch.cat([probes, -probes])


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("dtype", QDTYPES)
def test_kernel_codes_match_torch_conversion(dtype):
    """The kernels' codes (fp8 by integer ops, which the interpreter and sm_80 run; int8 by the
    1.5 * 2**23 trick) are torch's, bit for bit, on every fp8 value, every tie and past the range."""
    v = _code_probes()
    q = torch.empty(v.shape, dtype=torch.uint8 if dtype != torch.int8 else torch.int8)
    _codes_kernel[(triton.cdiv(v.numel(), 1024),)](v, q, v.numel(), QUANT=Q_INT8 if dtype == torch.int8 else Q_FP8,
                                                   BLOCK=1024)
    ref = reference_codes(v, dtype).view(torch.int8)
    finite = ~v.isnan()
    assert torch.equal(q.view(torch.int8)[finite], ref[finite])
    if dtype != torch.int8:  # NaN stays NaN
        assert q.view(torch.float8_e4m3fn)[~finite].float().isnan().all()


@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_backend_codes_match_torch_conversion(backend, dtype):
    """The torch and NumPy backends' quantize (static scale 1): torch's codes on the same probes."""
    from normops.backends import load
    v = _code_probes()
    v = v[~v.isnan()]
    q, _ = load(backend).quantize(v[:, None], 1, dtype, torch.tensor(1.0))
    assert torch.equal(q.view(torch.int8)[:, 0], reference_codes(v, dtype).view(torch.int8))


# --- the functions, every backend -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
@pytest.mark.parametrize("scaling", ["row", "group32", "static"])
def test_quantizes_the_norm_output(backend, dtype, qdtype, rms, scaling):
    shape = (3, 5, 192)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    x[1, 2] = 0  # a row of zeros: scale 2**-126, q = 0
    w = torch.randn(192, dtype=dtype)
    b = torch.randn(192, dtype=dtype)
    kw = dict(dtype=qdtype)
    if scaling == "group32":
        kw["group_size"] = 32
    if scaling == "static":
        kw["scale"] = torch.tensor(0.004)  # small: many values saturate
    with normops.backend(backend):
        q, scales = run_quant(rms, x, (192,), w, b, 1e-5, **kw)
        y = norm_output(rms, x, None, (192,), w, b, 1e-5)
    if backend == "torch":  # torch's own norm output
        ref = TF.rms_norm(x, (192,), w, 1e-5) if rms else TF.layer_norm(x, (192,), w, b, 1e-5)
        assert torch.equal(y, ref)
    assert q.dtype == qdtype and q.shape == x.shape and q.is_contiguous()
    assert_quantizes(q, scales, y, 1, qdtype, kw.get("group_size"), static=scaling == "static")
    if scaling == "row":
        assert scales.shape == (3, 5, 1)
    if scaling != "static" and rms:  # the row of zeros normalizes to zeros (LayerNorm's to its bias)
        assert (scales[1, 2] == MIN_QUANT_SCALE).all() and (q[1, 2].float() == 0).all()
    if scaling == "static":
        qmax = QUANT_MAX[qdtype]
        assert q.float().max() == qmax and q.float().min() == (-128 if qdtype == torch.int8 else -qmax)
        assert torch.equal(scales, torch.tensor(0.004))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "layer"])
def test_residual_and_variants(backend, rms):
    """residual (h returned, in the sum's dtype), offset and casting pass through (the activation:
    test_activation); a strided input is read in place; the normalized shape may have several dims."""
    base = torch.randn(4, 6, 2, 128, dtype=torch.float16)
    x = base[:, ::2]  # strided rows
    r = torch.randn(x.shape, dtype=torch.float32)  # an fp32 residual stream
    w = torch.randn(2, 128, dtype=torch.float16)
    b = torch.randn(2, 128, dtype=torch.float16)
    kw = dict(offset=1.0, casting="llama")
    with normops.backend(backend):
        q, scales, h = run_quant(rms, x, (2, 128), w, b, 1e-6, residual=r, group_size=64, **kw)
        y = norm_output(rms, x, r, (2, 128), w, b, 1e-6, **kw)
    assert h.dtype == torch.float32 and torch.equal(h, x + r)
    assert y.dtype == torch.float32 and scales.shape == (4, 3, 4)
    assert_quantizes(q, scales, y, 2, torch.float8_e4m3fn, 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_activation(backend):
    x = torch.randn(6, 128, dtype=torch.float16)
    with normops.backend(backend):
        q, scales = F.layer_norm_quant(x, (128,), activation="gelu", dtype=torch.int8)
        y = F.layer_norm(x, (128,), activation="gelu")
    assert_quantizes(q, scales, y, 1, torch.int8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_wide_rows_and_odd_groups(backend):
    """fp64 input quantizes its y rounded to fp32; a row wider than the kernels' one pass, and
    scale groups of a non-power-of-two size, take the torch backend on the triton route (the
    power-of-two groups of 128-wide rows, the kernels)."""
    x = torch.randn(3, 20000, dtype=torch.float64)
    with normops.backend(backend):
        q, scales = F.rms_norm_quant(x, (20000,), None, 1e-6, dtype=torch.int8)
        y = F.rms_norm(x, (20000,), None, 1e-6)
        q2, s2 = F.rms_norm_quant(x[:, :96], (96,), None, 1e-6, group_size=48)
        y2 = F.rms_norm(x[:, :96], (96,), None, 1e-6)
        q3, s3 = F.layer_norm_quant(x[:, :128], (128,), None, None, 1e-6, group_size=32)  # the kernels' fp64
        y3 = F.layer_norm(x[:, :128], (128,), None, None, 1e-6)
    assert_quantizes(q, scales, y.float(), 1, torch.int8)
    assert_quantizes(q2, s2, y2.float(), 1, torch.float8_e4m3fn, 48)
    assert_quantizes(q3, s3, y3.float(), 1, torch.float8_e4m3fn, 32)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_triton_route_says_why_it_falls_back():
    from normops.ops import route
    from normops.ops.row_norm import QuantSpec
    x = torch.randn(2, 20000)
    with normops.backend("triton"):
        assert route("row_norm_quant", x, QuantSpec((20000,), 0)).implementation == "torch fallback"
        assert route("row_norm_quant", x[:, :96], QuantSpec((96,), 48)).implementation == "torch fallback"
        assert route("row_norm_quant", x[:, :96], QuantSpec((96,), 32)).implementation == "triton kernel"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_no_grad(backend):
    x = torch.randn(0, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    with normops.backend(backend):
        q, s = F.rms_norm_quant(x, (64,), w)
        assert q.shape == (0, 64) and s.shape == (0, 1)
        q, s = F.rms_norm_quant(torch.randn(3, 64, requires_grad=True), (64,), w)
    assert not q.requires_grad and not s.requires_grad and s.shape == (3, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dtype=torch.float16), TypeError, "float8_e4m3fn or torch.int8"),
    (dict(group_size=48), normops.core.ShapeError, "must divide a row's 64"),
    (dict(group_size=0), ValueError, "positive int"),
    (dict(group_size=32, scale=1.0), ValueError, "static"),
    (dict(scale=0.0), ValueError, "at least 2"),
    (dict(scale=1e-39), ValueError, "at least 2"),
    (dict(scale=math.inf), ValueError, "finite"),
    (dict(scale=torch.ones(2)), TypeError, "one-element"),
    (dict(scale="1"), TypeError, "one-element"),
    (dict(residual=torch.randn(3, 32)), normops.core.ShapeError, "residual"),
])
def test_bad_arguments_raise_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        F.rms_norm_quant(torch.randn(3, 64), (64,), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tiny_static_scale_tensor_stays_finite(backend):
    """A scale tensor below 2**-126 (not checked: that would wait for the device) quantizes as
    2**-126: zeros stay 0 (0 * (1 / scale) would be NaN with 1 / scale = inf), the rest saturates."""
    x = torch.randn(4, 64)
    with normops.backend(backend):
        q, scales = F.rms_norm_quant(x, (64,), activation="relu", scale=torch.tensor(1e-39))
    codes = q.float()
    assert not codes.isnan().any() and ((codes == 0) | (codes == 448)).all() and (codes == 0).any()
    assert scales.item() == torch.tensor(1e-39).item()


def test_compiles_with_parameters_that_require_grad():
    """A module's weight requires grad: the op's outputs are non-differentiable (no autograd graph
    to build, eager or traced), whatever torch.compile's backend."""
    x = torch.randn(4, 64)
    w = torch.randn(64, requires_grad=True)
    for backend in ("eager", "aot_eager"):
        torch._dynamo.reset()
        q, s = torch.compile(lambda x: F.rms_norm_quant(x, (64,), w), backend=backend, fullgraph=True)(x)
        assert not q.requires_grad and not s.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the registered op, not the eager path
        q, s = F.rms_norm_quant(x, (64,), w)
    assert not q.requires_grad


def test_the_op_passes_opcheck_and_compiles():
    from normops.ops.row_norm import row_norm_quant_op
    x = torch.randn(4, 64)
    w = torch.randn(64)
    for args in [(x, None, [64], w, None, 1e-6, True, "none", 0.0, "fp32", torch.float8_e4m3fn, None, 16),
                 (x, torch.randn(4, 64), [64], w, torch.randn(64), 1e-5, False, "none", 0.0, "fp32", torch.int8,
                  torch.tensor(0.05), 0)]:
        torch.library.opcheck(row_norm_quant_op, args, test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda x: F.rms_norm_quant(x, (64,), w, group_size=16), fullgraph=True)
    q, s = compiled(x)
    q_eager, s_eager = F.rms_norm_quant(x, (64,), w, group_size=16)
    assert torch.equal(q.view(torch.int8), q_eager.view(torch.int8)) and torch.equal(s, s_eager)


# --- property-based: random shapes, values, layouts and arguments, every backend -------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def quant_calls(draw):
    rows = draw(st.integers(1, 6))
    width = draw(st.sampled_from([1, 3, 16, 48, 64, 100, 256]))
    group = draw(st.sampled_from([None] + [g for g in (1, 4, 16, 32, 50, 128) if width % g == 0]))
    static = group is None and draw(st.booleans())
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3]))
    strided = draw(st.booleans())
    return dict(rows=rows, width=width, group=group, static=static, magnitude=magnitude, strided=strided,
                rms=draw(st.booleans()), dtype=draw(st.sampled_from(DTYPES)), qdtype=draw(st.sampled_from(QDTYPES)),
                residual=draw(st.booleans()), weight=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_property_every_backend_quantizes_its_norm_output(backend):
    @settings(max_examples=15, deadline=None, derandomize=True, database=None)
    @given(call=quant_calls())
    def check(call):
        g = torch.Generator().manual_seed(call["seed"])
        n, dtype = call["width"], call["dtype"]
        base = torch.randn(call["rows"], 2 * n, generator=g).to(dtype) * call["magnitude"]
        x = base[:, ::2] if call["strided"] else base[:, :n].contiguous()
        r = torch.randn(x.shape, generator=g).to(dtype) if call["residual"] else None
        w = torch.randn(n, generator=g).to(dtype) if call["weight"] else None
        b = torch.randn(n, generator=g).to(dtype) if call["weight"] and not call["rms"] else None
        kw = dict(dtype=call["qdtype"], group_size=call["group"], residual=r)
        if call["static"]:
            kw["scale"] = 0.01
        with normops.backend(backend):
            out = run_quant(call["rms"], x, (n,), w, b, 1e-5, **kw)
            y = norm_output(call["rms"], x, r, (n,), w, b, 1e-5)
        assert len(out) == (3 if r is not None else 2)
        assert_quantizes(out[0], out[1], y, 1, call["qdtype"], call["group"], static=call["static"])

    check()
