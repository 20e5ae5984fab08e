"""The NumPy reference's row-norm variants (issue #17), called directly through the backend contract:
offset, casting, out_dtype, a residual of another dtype, and the gated RMSNorm with groups.

Two yardsticks, neither of them normops:
- float64 torch compositions (``composed``) and their autograd, for the math. In float64 the
  reference and torch differ only by float64 rounding, so the tolerance is tight (1e-10).
- the Hugging Face modules themselves in bfloat16, for the casting modes: the reference must give
  their outputs within one ulp of the output dtype, and bit-exact almost everywhere (a wrong
  casting mode rounds differently in a large fraction of the elements, so it cannot pass).
"""
import numpy as np
import pytest
import torch
from torch.nn import functional as TF

from normops.backends import numpy_backend as nb
from normops.backends.numpy_backend.common import round_to

EPS = 1e-6
ACT = {"none": lambda t: t, "silu": TF.silu}


def composed(x, w, b, gate, *, rms, offset=0.0, activation="none", norm_before_gate=True, group_size=0):
    """The variant as plain torch: y = act(norm(u) * (offset + w) + b) [* silu(gate)], u = x [* silu(gate)],
    norm over groups of group_size of the last dim."""
    s = None if gate is None else TF.silu(gate)
    u = x * s if s is not None and not norm_before_gate else x
    n = x.shape[-1]
    size = group_size or n
    uv = u.unflatten(-1, (n // size, size))
    x_hat = torch.rms_norm(uv, (size,), eps=EPS) if rms else TF.layer_norm(uv, (size,), eps=EPS)
    z = x_hat.flatten(-2) * (offset + w) + (0 if b is None else b)
    y = ACT[activation](z)
    return y * s if s is not None and norm_before_gate else y


def _data(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return -2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)  # shifted, as STYLE says


def _ulp(ref, dtype):
    """The spacing of ``dtype`` at each value of ref (subnormals: the smallest spacing)."""
    info = torch.finfo(dtype)
    _, e = torch.frexp(ref.double().abs())
    ulp = torch.ldexp(torch.full_like(ref, info.eps, dtype=torch.float64), e - 1)  # |ref| in [2^(e-1), 2^e)
    return ulp.clamp_min(info.smallest_normal * info.eps)


def assert_within_ulp(ours, ref, ulps=1, exact=0.99):
    """|ours - ref| <= ulps ulps of ref's dtype everywhere, and equal in at least ``exact`` of the elements."""
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    diff = (ours.double() - ref.double()).abs()
    assert (diff <= ulps * _ulp(ref, ref.dtype)).all(), f"max diff {diff.max().item():.3g}"
    frac = (diff == 0).double().mean().item()
    assert frac >= exact, f"only {frac:.4f} of the elements equal"


# --------------------------------------------------------------------------- float64 math vs torch
VARIANTS = {
    "rms_offset": dict(rms=True, offset=1.0),
    "ln_offset_bias_silu": dict(rms=False, offset=0.5, bias=True, activation="silu"),
    "rms_grouped": dict(rms=True, group_size=8),
    "ln_grouped": dict(rms=False, bias=True, group_size=8),
    "gate_after_norm": dict(rms=True, offset=1.0, gate=True, norm_before_gate=True),
    "gate_before_norm": dict(rms=True, gate=True, norm_before_gate=False),
    "gate_after_norm_grouped": dict(rms=True, gate=True, norm_before_gate=True, group_size=8),
    "gate_before_norm_grouped": dict(rms=True, offset=1.0, gate=True, norm_before_gate=False, group_size=8),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_float64_forward_and_backward_match_torch_autograd(name):
    v = dict(VARIANTS[name])
    rms, has_bias, has_gate = v.pop("rms"), v.pop("bias", False), v.pop("gate", False)
    shape, n = (3, 5, 40), 40
    x = _data(shape).requires_grad_()
    w = (1 + 0.3 * torch.randn(n, dtype=torch.float64)).requires_grad_()
    b = (0.2 * torch.randn(n, dtype=torch.float64)).requires_grad_() if has_bias else None
    gate = (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_() if has_gate else None
    dy = torch.randn(shape, dtype=torch.float64)
    kw = {k: v[k] for k in ("offset", "norm_before_gate", "group_size") if k in v}

    ref = composed(x, w, b, gate, rms=rms, **v)
    leaves = {k: t for k, t in zip("xwbg", (x, w, b, gate)) if t is not None}
    grads = dict(zip(leaves, torch.autograd.grad(ref, list(leaves.values()), dy)))

    act = v.get("activation", "none")
    y, h, mean, rstd = nb.row_norm_fwd(x.detach(), None, (n,), w.detach(), None if b is None else b.detach(), EPS,
                                       rms, act, True, gate=None if gate is None else gate.detach(), **kw)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-10, atol=1e-12)
    assert h is None

    # the statistics: one per row, or per group of the row, float64 for float64 input
    size = v.get("group_size") or n
    uv = x.detach() if gate is None or kw.get("norm_before_gate", True) else x.detach() * TF.silu(gate.detach())
    uv = uv.unflatten(-1, (n // size, size)) if size < n else uv
    assert rstd.shape == uv.shape[:-1] and rstd.dtype == torch.float64
    var = uv.square().mean(-1) if rms else uv.var(-1, unbiased=False)
    torch.testing.assert_close(rstd, torch.rsqrt(var + EPS), rtol=1e-12, atol=0)
    if rms:
        assert mean is None
    else:
        torch.testing.assert_close(mean, uv.mean(-1), rtol=1e-12, atol=1e-12)

    dx, dw, db, dgate = nb.row_norm_bwd(dy, x.detach(), (n,), w.detach(), None if b is None else b.detach(), mean,
                                        rstd, rms, act, [True] * 4, gate=None if gate is None else gate.detach(), **kw)
    for key, ours in (("x", dx), ("w", dw), ("b", db), ("g", dgate)):
        if key in grads:
            torch.testing.assert_close(ours, grads[key], rtol=1e-10, atol=1e-10, msg=lambda m: f"d{key}: {m}")
        else:
            assert ours is None


def test_output_mask_with_three_entries_is_the_old_contract():
    """Callers that pass [dx, dw, db] get three gradients back; [.., dgate] without a gate gives None."""
    x, w, dy = _data((4, 6)), torch.ones(6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    _, _, _, rstd = nb.row_norm_fwd(x, None, (6,), w, None, EPS, True, "none", True)
    three = nb.row_norm_bwd(dy, x, (6,), w, None, None, rstd, True, "none", [True, False, True])
    assert len(three) == 3 and three[1] is None and three[2] is None and three[0].shape == x.shape
    four = nb.row_norm_bwd(dy, x, (6,), w, None, None, rstd, True, "none", [False, True, False, True])
    assert four[0] is None and four[1].shape == w.shape and four[3] is None


def test_bad_casting_and_group_size_are_clear_errors():
    x, w = _data((2, 6)), torch.ones(6, dtype=torch.float64)
    with pytest.raises(ValueError, match="casting"):
        nb.row_norm_fwd(x, None, (6,), w, None, EPS, True, "none", True, casting="bf16")
    with pytest.raises(ValueError, match="group_size"):
        nb.row_norm_fwd(x, None, (6,), w, None, EPS, True, "none", True, group_size=4)


# --------------------------------------------------------------------------- dtypes
def test_round_to_is_torchs_conversion():
    """bfloat16 by hand (NumPy has none), float16 and float32: bit for bit torch's conversion of a
    float64 tensor, across the range: ties, subnormals, overflow to inf, inf, nan, signed zero."""
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-45, 40, (100_000,), generator=g).double()
    special = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3.39e38, -3.39e38, 1e-45, 65519.0, 65520.0,
               1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -30]  # ties to even, and above a tie by < fp32's ulp
    x = torch.cat([torch.randn(100_000, generator=g, dtype=torch.float64) * scale, torch.tensor(special)])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        want = x.to(dtype).double().numpy()
        got = round_to(x.numpy(), dtype)
        assert ((got == want) | (np.isnan(got) & np.isnan(want))).all(), dtype
        assert (np.signbit(got) == np.signbit(want))[~np.isnan(want)].all()  # -0.0 stays -0.0


def test_residual_of_another_dtype_and_out_dtype():
    """h = x + residual in promote_types (a bf16 x on an fp32 stream), normalized in fp32; y in out_dtype."""
    x, res = _data((4, 33), torch.bfloat16), _data((4, 33), torch.float32, seed=1)
    w = 1 + 0.3 * torch.randn(33)
    y, h, _, rstd = nb.row_norm_fwd(x, res, (33,), w, None, EPS, True, "none", True)
    assert h.dtype == torch.float32 and torch.equal(h, x.float() + res)
    assert y.dtype == torch.float32 and rstd.dtype == torch.float32
    ref = composed(h.double(), w.double(), None, None, rms=True)
    torch.testing.assert_close(y, ref.float(), rtol=2e-7, atol=0)  # one fp32 rounding of the float64 result
    y16, _, _, _ = nb.row_norm_fwd(x, res, (33,), w, None, EPS, True, "none", False, out_dtype=torch.bfloat16)
    assert torch.equal(y16, ref.to(torch.bfloat16))
    dx, _, _ = nb.row_norm_bwd(torch.randn(4, 33), h, (33,), w, None, None, rstd, True, "none", [True] * 3)
    assert dx.dtype == torch.float32  # the gradient of h, the normalized input


# --------------------------------------------------------------------------- casting vs Hugging Face
def _hf(path, name):
    pytest.importorskip("transformers")
    import importlib
    return getattr(importlib.import_module(f"transformers.models.{path}"), name)


def _with_weight(module, w):
    with torch.no_grad():
        module.weight.copy_(w)
    return module


N, ROWS = 96, 64
# name -> (module class path, x dtype, weight dtype, our keywords, out_dtype rule)
HF_CASES = {
    "llama_bf16_weight": ("llama.modeling_llama", "LlamaRMSNorm", torch.bfloat16, torch.bfloat16, "llama"),
    "llama_fp32_weight": ("llama.modeling_llama", "LlamaRMSNorm", torch.bfloat16, torch.float32, "llama"),
    "t5_bf16_weight": ("t5.modeling_t5", "T5LayerNorm", torch.bfloat16, torch.bfloat16, "t5"),
    "t5_bf16_weight_fp32_x": ("t5.modeling_t5", "T5LayerNorm", torch.float32, torch.bfloat16, "t5"),
    "t5_fp32_weight": ("t5.modeling_t5", "T5LayerNorm", torch.bfloat16, torch.float32, "t5"),
    "gemma": ("gemma.modeling_gemma", "GemmaRMSNorm", torch.bfloat16, torch.bfloat16, "gemma"),
}


def _out_dtype(casting, x_dtype, w_dtype):
    """VARIANTS.md's out_dtype per module family."""
    if casting == "gemma":
        return x_dtype
    if casting == "t5":
        half = w_dtype in (torch.float16, torch.bfloat16)
        return w_dtype if half else torch.promote_types(w_dtype, torch.promote_types(x_dtype, torch.float32))
    return torch.promote_types(w_dtype, x_dtype)


@pytest.mark.parametrize("name", HF_CASES)
def test_casting_matches_the_hugging_face_module(name):
    path, cls, x_dtype, w_dtype, casting = HF_CASES[name]
    x = (3 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(1))).to(x_dtype)
    w = (0.1 if casting == "gemma" else 1.0) + 0.3 * torch.randn(N, generator=torch.Generator().manual_seed(2))
    module = _with_weight(_hf(path, cls)(N, eps=EPS).to(w_dtype), w.to(w_dtype))
    want = module(x)
    out_dtype = _out_dtype(casting, x_dtype, w_dtype)
    y, _, _, _ = nb.row_norm_fwd(x, None, (N,), module.weight.detach(), None, EPS, True, "none", False,
                                 offset=1.0 if casting == "gemma" else 0.0, casting=casting, out_dtype=out_dtype)
    if out_dtype == torch.float32:
        # the module's fp32 statistics and its two fp32 roundings of x_hat * w: up to 3 fp32 ulps seen;
        # a wrong casting mode adds or drops a bf16 rounding of x_hat, ~6e4 fp32 ulps here
        assert_within_ulp(y, want, ulps=16, exact=0.0)
    else:
        assert_within_ulp(y, want)


def test_llama_dw_uses_x_hat_as_rounded():
    """Autograd through LlamaRMSNorm (fp32 weight, bf16 x): dw = sum(dy * x_hat.to(bf16)). The reference's
    "llama" dw agrees to fp32 summation error; the unrounded x_hat ("fp32" casting) is ~a bf16 ulp off per term."""
    x = (3 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(3))).bfloat16()
    module = _with_weight(_hf("llama.modeling_llama", "LlamaRMSNorm")(N, eps=EPS), 1 + 0.3 * torch.randn(N))
    dy = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(4))
    (want,) = torch.autograd.grad(module(x), module.weight, dy)
    w = module.weight.detach()
    _, _, _, rstd = nb.row_norm_fwd(x, None, (N,), w, None, EPS, True, "none", True, casting="llama",
                                    out_dtype=torch.float32)
    dws = {c: nb.row_norm_bwd(dy, x, (N,), w, None, None, rstd, True, "none", [False, True, False], casting=c)[1]
           for c in ("llama", "fp32")}
    scale = want.abs().max().item()
    assert (dws["llama"] - want).abs().max().item() <= 1e-5 * scale  # fp32 sums over 64 rows: ~1e-6
    assert (dws["fp32"] - want).abs().max().item() > 1e-4 * scale  # what the test tells apart


def test_qwen3_next_gated_norm_before_gate():
    """Qwen3NextRMSNormGated: y = (w * x_hat.to(bf16)) * silu(gate), norm_before_gate, "llama", out x's dtype."""
    x = (3 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(5))).bfloat16()
    gate = (2 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(6))).bfloat16().requires_grad_()
    module = _with_weight(_hf("qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNormGated")(N, eps=EPS).bfloat16(),
                          (1 + 0.3 * torch.randn(N)).bfloat16())
    want = module(x, gate)
    dy = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(7)).bfloat16()
    (dgate_want,) = torch.autograd.grad(want, gate, dy)
    kw = dict(casting="llama", gate=gate.detach(), norm_before_gate=True)
    w = module.weight.detach()
    y, _, _, rstd = nb.row_norm_fwd(x, None, (N,), w, None, EPS, True, "none", True, **kw)
    assert_within_ulp(y, want.detach())
    _, _, _, dgate = nb.row_norm_bwd(dy, x, (N,), w, None, None, rstd, True, "none", [False, False, False, True], **kw)
    assert_within_ulp(dgate, dgate_want)


def test_mamba2_gated_grouped_gate_before_norm():
    """Mamba2RMSNormGated: u = x * silu(gate) normalized per group of group_size, then w * x_hat.to(bf16)."""
    gs = 32
    x = (3 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(8))).bfloat16().requires_grad_()
    gate = (2 * torch.randn(ROWS, N, generator=torch.Generator().manual_seed(9))).bfloat16().requires_grad_()
    module = _with_weight(_hf("mamba2.modeling_mamba2", "Mamba2RMSNormGated")(N, gs, eps=EPS).bfloat16(),
                          (1 + 0.3 * torch.randn(N)).bfloat16())
    want = module(x, gate)
    dy = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(10)).bfloat16()
    dx_want, dgate_want = torch.autograd.grad(want, (x, gate), dy)
    kw = dict(casting="llama", gate=gate.detach(), norm_before_gate=False, group_size=gs)
    w = module.weight.detach()
    y, _, _, rstd = nb.row_norm_fwd(x.detach(), None, (N,), w, None, EPS, True, "none", True, **kw)
    assert rstd.shape == (ROWS, N // gs)
    assert_within_ulp(y, want.detach())
    dx, _, _, dgate = nb.row_norm_bwd(dy, x.detach(), (N,), w, None, None, rstd, True, "none", [True] * 4, **kw)
    # the module rounds dy * w to bf16 on its way back (the grad of a bf16 product), the reference does not:
    # a few bf16 ulps of the largest gradient, where a wrong formula is off by O(1)
    for ours, ref in ((dx, dx_want), (dgate, dgate_want)):
        assert ours.dtype == torch.bfloat16
        assert (ours.double() - ref.double()).abs().max().item() <= 4 * 2 ** -8 * ref.abs().max().item()
