"""An adversarial pass over the row-norm variants (VARIANTS.md) and the Hugging Face conversion, as a
PyTorch user would hit them: each test named for what a user expects pins down a bug that pass found
(mixed parameter dtypes on an fp32 residual stream, a half-done in-place update on inference tensors,
convert and inspect on normops' own GatedRMSNorm and on a forward with more arguments, the offset
modules' init, group_size checked at construction, an unhashable casting, out_dtype and casting
under torch.func transforms), now fixed; the others pin down edge cases found to work, against a
plain torch float64 composition of the formula.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as TF

import normops
import normops.functional as F
import normops.nn as N
from normops.core import DtypeError

BACKENDS = ["torch", "numpy"] + (["triton"] if importlib.util.find_spec("triton") else [])


def ref64(x, w=None, *, residual=None, bias=None, rms=True, gate=None, norm_before_gate=True, group_size=None,
          offset=0.0, eps=1e-6):
    """The variant's formula in float64 (no casting-mode roundings: fp32 inputs here)."""
    u = (x if residual is None else x + residual).double()
    g = None if gate is None else TF.silu(gate.double())
    if g is not None and not norm_before_gate:
        u = u * g
    n = u.shape[-1]
    v = u.unflatten(-1, (n // (group_size or n), group_size or n))
    if not rms:
        v = v - v.mean(-1, keepdim=True)
    z = (v * torch.rsqrt(v.square().mean(-1, keepdim=True) + eps)).flatten(-2)
    if w is not None:
        z = z * (offset + w.double())
    if bias is not None:
        z = z + bias.double()
    if g is not None and norm_before_gate:
        z = z * g
    return z


# --- bugs -------------------------------------------------------------------------------------------

def test_add_layer_norm_fp32_residual_with_bf16_parameters_on_the_torch_backend():
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    residual = torch.randn(4, 16)
    w, b = torch.randn(16, dtype=torch.bfloat16), torch.randn(16, dtype=torch.bfloat16)
    with normops.backend("numpy"):
        y_np, _ = F.add_layer_norm(x, residual, 16, w, b)  # computes: h fp32, y fp32
    assert y_np.dtype == torch.float32
    with normops.backend("torch"):
        y, h = F.add_layer_norm(x, residual, 16, w, b)
    torch.testing.assert_close(y, ref64(x, w, residual=residual, bias=b, rms=False, eps=1e-5).float())
    assert h.dtype == torch.float32


def test_add_rms_norm_inplace_failed_call_on_inference_tensors_leaves_both_untouched():
    with torch.inference_mode():
        x, residual = torch.randn(4, 8), torch.randn(4, 8)
    x0, r0 = x.clone(), residual.clone()
    with pytest.raises(RuntimeError):
        F.add_rms_norm_(x, residual, 8, torch.ones(8))
    assert torch.equal(x, x0)
    assert torch.equal(residual, r0)


class _GatedBlock(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.norm = N.GatedRMSNorm(16, **kwargs)

    def forward(self, x, gate):
        return self.norm(x, gate)


def test_convert_leaves_normops_own_gated_rms_norm():
    torch.manual_seed(0)
    model = _GatedBlock(eps=1e-6)
    with torch.no_grad():
        model.norm.weight.normal_()
    x, gate = torch.randn(3, 16), torch.randn(3, 16)
    want = model(x, gate)
    model = normops.convert(model)
    assert type(model.norm) is N.GatedRMSNorm
    torch.testing.assert_close(model(x, gate), want, rtol=0, atol=0)


def test_inspect_knows_normops_own_gated_rms_norm():
    report = normops.inspect(_GatedBlock(group_size=4))
    (layer,) = [row for row in report.layers if row.name == "norm"]
    assert "third-party" not in layer.backend


class _MyRMSNorm(torch.nn.Module):
    """A user's RMSNorm (Llama arithmetic) whose forward also takes an optional residual."""

    def __init__(self, n):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n) + 0.3 * torch.randn(n))
        self.eps = 1e-6

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = _MyRMSNorm(16)

    def forward(self, x, residual):
        return self.norm(x, residual)


def test_convert_leaves_a_rms_norm_whose_forward_takes_more_arguments():
    torch.manual_seed(0)
    model = _Block()
    x, residual = torch.randn(2, 16), torch.randn(2, 16)
    want = model(x, residual)
    model = normops.convert(model)
    torch.testing.assert_close(model(x, residual), want, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [N.RMSNorm, N.LayerNorm])
def test_offset_modules_start_at_the_identity_scale(cls):
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    m = cls(8, offset=1.0)
    plain = cls(8)
    torch.testing.assert_close(m(x), plain(x))


@pytest.mark.parametrize("shape, group_size", [(8, 3), ((2, 8), 4)])
def test_gated_module_rejects_a_bad_group_size_when_built(shape, group_size):
    with pytest.raises((ValueError, normops.core.ShapeError)):
        N.GatedRMSNorm(shape, group_size=group_size)


def test_unhashable_casting_gets_the_casting_error():
    with pytest.raises((TypeError, ValueError), match="casting"):
        F.rms_norm(torch.randn(2, 8), 8, torch.ones(8), casting=["llama"])


def test_out_dtype_wider_than_the_input_under_vmap():
    torch.manual_seed(0)
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8)

    def f(t):
        return F.rms_norm(t, 8, w, out_dtype=torch.float32)
    torch.testing.assert_close(torch.func.vmap(f)(x.unsqueeze(0))[0], f(x), rtol=0, atol=0)


def test_llama_casting_under_vmap():
    torch.manual_seed(0)
    x, w = torch.randn(16, 64, dtype=torch.bfloat16), (1 + 0.5 * torch.randn(64)).bfloat16()

    def f(t):
        return F.rms_norm(t, 64, w, casting="llama")
    torch.testing.assert_close(torch.func.vmap(f)(x.unsqueeze(0))[0], f(x), rtol=0, atol=0)


# --- checked and fine: edge cases pinned down ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_on_strided_views_of_a_fused_projection(backend):
    """q and k as views of a fused QKV projection (row stride 3*H*D), transposed and sliced."""
    torch.manual_seed(0)
    b, t, h, d = 2, 3, 4, 8
    qkv = torch.randn(b, t, 3 * h * d)
    q = qkv[..., : h * d].view(b, t, h, d)
    k = qkv[..., h * d: 2 * h * d].view(b, t, h, d)
    w = torch.randn(d)
    with normops.backend(backend):
        for view in (q, k, q.transpose(1, 2), k[:, :, ::2]):
            y = F.rms_norm(view, d, w, 1e-6, offset=1.0)
            torch.testing.assert_close(y, ref64(view, w, offset=1.0).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_with_strided_and_expanded_gate_and_input(backend, norm_before_gate):
    torch.manual_seed(0)
    x, w = torch.randn(6, 16), torch.randn(16)
    strided = torch.randn(16, 6).t()
    expanded = torch.randn(1, 16).expand(6, 16)
    with normops.backend(backend):
        for inp, gate in ((x, strided), (expanded, strided), (x, expanded)):
            y = F.gated_rms_norm(inp, gate, 16, w, 1e-6, group_size=4, norm_before_gate=norm_before_gate)
            want = ref64(inp, w, gate=gate, group_size=4, norm_before_gate=norm_before_gate)
            torch.testing.assert_close(y, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_fp32_residual_stream_gradients_when_only_some_inputs_need_them(backend):
    """bf16 x, fp32 residual, h used downstream: each gradient in its input's dtype, the residual's
    not rounded through bf16, whichever subset requires grad."""
    torch.manual_seed(0)
    x0, r0, w0 = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16), torch.randn(16, dtype=torch.bfloat16)
    gy, gh = torch.randn(4, 16, dtype=torch.bfloat16), torch.randn(4, 16)  # gy: y's own dtype, no rounding of dy
    for need in ((True, True, True), (False, True, False), (True, False, False), (False, False, True)):
        x, r, w = (t.clone().requires_grad_(n) for t, n in zip((x0, r0, w0), need))
        with normops.backend(backend):
            y, h = F.add_rms_norm(x, r, 16, w, 1e-6, out_dtype=torch.bfloat16)
        got = torch.autograd.grad((y.float() * gy.float()).sum() + (h * gh).sum(), [t for t in (x, r, w) if t.requires_grad])
        x2, r2, w2 = (t.detach().double().requires_grad_() for t in (x0, r0, w0))
        loss = (ref64(x2, w2, residual=r2) * gy.double()).sum() + ((x2 + r2) * gh.double()).sum()
        want = dict(zip("xrw", torch.autograd.grad(loss, (x2, r2, w2))))
        for name, g in zip([n for n, on in zip("xrw", need) if on], got):
            assert g.dtype == {"x": x0.dtype, "r": r0.dtype, "w": w0.dtype}[name]
            if name == "r":  # fp32: y's bf16 rounding is straight-through, dr is exact to fp32
                torch.testing.assert_close(g.double(), want["r"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_rms_norm_inplace_refusals_leave_x_and_residual_untouched(backend):
    x, residual, w = torch.randn(4, 8), torch.randn(4, 8), torch.randn(8)
    x0, r0 = x.clone(), residual.clone()
    bad_calls = [
        lambda: F.add_rms_norm_(x, residual, 8, w.clone().requires_grad_()),  # a gradient would be needed
        lambda: F.add_rms_norm_(x, residual, 8, torch.randn(7)),
        lambda: F.add_rms_norm_(x, residual.half(), 8, w),
        lambda: F.add_rms_norm_(x, x, 8, w),  # aliased
        lambda: F.add_rms_norm_(x, residual, 8, torch.ones(8, dtype=torch.int32)),
        lambda: F.add_rms_norm_(x, residual, 8, w, "eps"),
    ]
    with normops.backend(backend):
        for call in bad_calls:
            with pytest.raises((RuntimeError, ValueError, TypeError)):
                call()
            assert torch.equal(x, x0) and torch.equal(residual, r0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the nan row, in NumPy
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_rows_and_nan_rows_stay_in_their_row_or_group(backend):
    torch.manual_seed(0)
    x1, w1 = torch.randn(5, 1), torch.randn(1)
    xn = torch.randn(4, 16)
    xn[1, 3], xn[2, 5] = float("nan"), float("inf")
    with normops.backend(backend):
        torch.testing.assert_close(F.rms_norm(x1, 1, w1, 1e-6, offset=1.0), ref64(x1, w1, offset=1.0).float())
        torch.testing.assert_close(F.gated_rms_norm(x1, x1, 1, w1, 1e-6, group_size=1),
                                   ref64(x1, w1, gate=x1, group_size=1).float())
        y = F.gated_rms_norm(xn, torch.randn(4, 16), 16, torch.randn(16), group_size=4)
    finite = torch.isfinite(y.view(4, 4, 4)).all(-1)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[1, 0] = expected[2, 1] = False  # only the group holding the nan / inf
    assert torch.equal(finite, expected)


def test_variant_validation_errors_are_clear():
    x, w = torch.randn(4, 8, dtype=torch.float16), torch.randn(8)
    with pytest.raises(TypeError, match="gate must be a floating-point"):
        F.gated_rms_norm(x, torch.ones(4, 8, dtype=torch.int32), 8, w)
    with pytest.raises(normops.core.ShapeError, match="gate"):
        F.gated_rms_norm(x, torch.randn(8, dtype=torch.float16), 8, w)  # no broadcasting
    with pytest.raises(normops.core.ShapeError, match="group_size"):
        F.gated_rms_norm(torch.randn(2, 4, 8), None, (4, 8), torch.randn(4, 8), group_size=4)
    with pytest.raises(ValueError, match="weight is None"):
        F.rms_norm(x, 8, None, offset=1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        F.rms_norm(x, 8, w, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="residual must be a floating-point"):
        F.add_rms_norm(x, torch.ones(4, 8, dtype=torch.int64), 8, w)
    y, h = F.add_rms_norm(x, torch.randn(4, 8, dtype=torch.float64), 8, w)  # fp64 residual: h, y in fp64
    assert h.dtype == y.dtype == torch.float64
    with pytest.raises(DtypeError):
        F.layer_norm(x, 8, torch.randn(8, dtype=torch.float64))
