"""LayerNorm and RMSNorm in float64: the NumPy reference's row norms.

x has shape [*, D1..Dk] and ``normalized_shape`` is [D1..Dk]: each "row" is the last k dims,
n = D1 * ... * Dk values, normalized on its own; w and b have shape [D1..Dk], shared by every row.

Forward, per row (i runs over the row's n values):

    LayerNorm   mu = mean(x),  var = mean((x - mu)^2),  rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
    RMSNorm     ms = mean(x^2),                         rstd = 1 / sqrt(ms + eps),   x_hat = x * rstd
    both        z = x_hat * w + b,  y = act(z)

With a residual, ``h = x + residual`` is what is normalized; h comes back as well, the next
block's residual stream, so a transformer block adds and normalizes in one call.

Backward. Given dy, undo the activation, ``dz = dy * act'(z)``; then w scales each x_hat_i, so the
gradient reaching x_hat is ``g = dz * w``, and dx_j = sum_i g_i * d x_hat_i / d x_j. x_hat_i
depends on x_j directly and through the row's statistics:

    LayerNorm   d mu / d x_j   = 1/n
                d var / d x_j  = 2 (x_j - mu) / n      (the mu term drops: sum_i (x_i - mu) = 0)
                d rstd / d x_j = -rstd^3 (x_j - mu) / n = -rstd^2 x_hat_j / n
                d x_hat_i / d x_j = rstd (delta_ij - 1/n) + (x_i - mu) d rstd / d x_j
                                  = rstd (delta_ij - 1/n - x_hat_i x_hat_j / n)
                dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))

    RMSNorm     d ms / d x_j   = 2 x_j / n,   d rstd / d x_j = -rstd^2 x_hat_j / n
                d x_hat_i / d x_j = rstd (delta_ij - x_hat_i x_hat_j / n)      (no 1/n: no centering)
                dx = rstd * (g - x_hat * mean(g * x_hat))

Both are exact, eps included (it sits inside rstd). The parameter gradients sum over the rows:

    dw = sum_rows(dz * x_hat),  db = sum_rows(dz)

The backward recomputes x_hat (and z) from x and the saved mean/rstd. The generic code for
these formulas, which group and batch norm share, is ``common.normalize_backward``.

Variants (issue #17). Each is a few lines around that generic core; "inp" is x, or h = x + residual.

    residual    h = x + residual in torch.promote_types(x, residual), torch's own add and rounding: a
                bf16 x on an fp32 residual stream gives an fp32 h, normalized and returned as fp32.
    offset      z = x_hat * (offset + w) + b. Gemma stores w - 1 (initialised to zeros) and scales by
                1 + w. offset + w is one number per feature, d(offset + w)/dw = 1: dw is unchanged.
                Without a weight there is nothing to shift, and z = x_hat + b.
    casting     where x_hat is rounded before the weight multiply, the one place the Hugging Face
                RMSNorms differ (their statistics and x_hat are fp32 in all of them):
                  "fp32" ("gemma")  not rounded: (x_hat * (1 + w)).type_as(x), one rounding, at y
                  "llama"           x_hat rounded to inp's dtype, then times w: LlamaRMSNorm's
                                    ``self.weight * hidden_states.to(input_dtype)``
                  "t5"              x_hat rounded to w's dtype when that is float16/bfloat16 (T5LayerNorm)
    out_dtype   y rounded to it (default inp's dtype): LlamaRMSNorm's fp32 weight times a bf16
                x_hat is fp32, so its y is promote_types(w, x).
    gate        the gated RMSNorm of Mamba2 and Qwen3-Next, with s = silu(gate), gate shaped like x:
                  norm_before_gate      y = a * s, a = act(z) the norm's output; under "llama" a is
                                        first rounded to promote_types(w, inp) (Qwen3-Next's
                                        ``self.weight * hidden.to(input_dtype)`` is in that dtype)
                  not norm_before_gate  u = inp * s is what is normalized (Mamba2): y = norm(u), the
                                        statistics are u's
    group_size  0 < group_size < N (normalized_shape (N,)): the view [*, N] -> [*, N/group_size,
                group_size] makes each group a row of its own, so everything here applies unchanged,
                with w and b viewed [G, group_size]; the statistics come back [*, G].

Rounding in float64 (``common.round_to``): to float32 first, then to the target, which is what
torch does converting a double and what the models' fp32 intermediates look like once rounded.

Backward of the variants. Rounding is straight-through: d round(a) / da = 1, as autograd through
``.to(dtype)`` passes the gradient unchanged. So dx is the formula above with the unrounded x_hat,
and g = dz * (offset + w). But a product's gradient takes the other factor as the forward
computed it: z = round(x_hat) * (offset + w), so

    dw = sum_rows(dz * round(x_hat)),  db = sum_rows(dz)

which is what autograd through LlamaRMSNorm gives (the grad of ``weight * hidden.to(bf16)`` with
respect to weight is dz times the bf16 hidden). The unrounded x_hat would miss it by about a
bf16 ulp per term, far more than fp32 summation error: a reference that must agree with the
module it mirrors cannot use it.

Gate after the norm (norm_before_gate): y = a * s with a = act(z) (rounded under "llama", and by
the same rule dgate takes a as rounded), s = silu(gate), silu'(t) = sig(t) (1 + t (1 - sig(t))):

    dgate = dy * a * silu'(gate)
    dz    = dy * s * act'(z)          then the norm's backward above, unchanged

Gate before the norm (not norm_before_gate): u = inp * s is normalized, so the norm's backward
gives du (the formula above, u in place of x, its statistics u's), and the product rule splits it:

    dx    = du * s
    dgate = du * inp * silu'(gate)

Groups: in the [*, G, group_size] view a group is a row, so dx's formula holds per group, with
means over its group_size values and the group's rstd; dw and db sum over every row and
batch dim of the view, [G, group_size], which is w's [N] viewed.
"""
import math

import numpy as np
import torch

from .common import (host, into, like, masked, moments, normalize_backward, normalize_forward, round_to, rstd_of,
                     silu, silu_grad, stats)
from ...core import MIN_QUANT_SCALE, QUANT_MAX, casting_dtypes


def _row_axes(x, normalized_shape):
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _row_shape(normalized_shape, group_size):
    """normalized_shape in the grouped view: (N / group_size, group_size) when 0 < group_size < N."""
    if not 0 < group_size < math.prod(normalized_shape):
        return tuple(normalized_shape)
    if len(normalized_shape) != 1 or normalized_shape[0] % group_size:
        raise ValueError(f"group_size {group_size} must divide a one-dim normalized_shape, "
                         f"got {tuple(normalized_shape)}")
    return (normalized_shape[0] // group_size, group_size)


def _grouped(a, normalized_shape, shape):
    """a [..., *normalized_shape] viewed [..., *shape] (None passes through): each group a row."""
    return None if a is None else a.reshape(a.shape[:a.ndim - len(normalized_shape)] + shape)


def _scale(weight, offset):
    """offset + w, in float64 (the models' fp32 ``1.0 + weight.float()``); no weight: no scale."""
    return None if weight is None else offset + weight


def row_norm_forward(x, normalized_shape, weight, bias, eps, rms, activation, *, offset=0.0, gate=None,
                     norm_before_gate=True, group_size=0, x_hat_dtype=None, z_dtype=None):
    """LayerNorm (RMSNorm when ``rms``) of ndarray x -> (y, mean, rstd), y in float64 (not yet in
    out_dtype), stats of x.shape[:-k], or x.shape[:-1] + (G,) with groups (mean None for RMS).

    ``x_hat_dtype``/``z_dtype``: the roundings of ``normops.core.casting_dtypes``.
    """
    s = None if gate is None else silu(gate)
    u = x * s if gate is not None and not norm_before_gate else x
    shape = _row_shape(normalized_shape, group_size)
    uv = _grouped(u, normalized_shape, shape)
    axes = _row_axes(uv, normalized_shape)  # grouped (normalized_shape one dim): the group
    mean, var = moments(uv, axes, rms)
    rstd = rstd_of(var, eps)
    y = normalize_forward(uv, axes, mean, rstd, _grouped(_scale(weight, offset), normalized_shape, shape),
                          _grouped(bias, normalized_shape, shape), activation, x_hat_dtype).reshape(x.shape)
    if gate is not None and norm_before_gate:
        y = round_to(y, z_dtype) * s
    lead = uv.shape[:uv.ndim - len(axes)]
    return y, None if mean is None else mean.reshape(lead), rstd.reshape(lead)


def row_norm_backward(dy, x, normalized_shape, mean, rstd, weight, bias, activation, *, offset=0.0, gate=None,
                      norm_before_gate=True, group_size=0, x_hat_dtype=None, z_dtype=None):
    """-> (dx, dweight, dbias, dgate) for ``row_norm_forward``; mean None: RMSNorm; dgate None
    without a gate."""
    s = None if gate is None else silu(gate)
    gate_first = gate is not None and not norm_before_gate
    u = x * s if gate_first else x
    shape = _row_shape(normalized_shape, group_size)
    uv = _grouped(u, normalized_shape, shape)
    axes = _row_axes(uv, normalized_shape)  # grouped (normalized_shape one dim): the group
    keep = uv.shape[:uv.ndim - len(axes)] + (1,) * len(axes)  # the stats back on the row's axes
    mean = None if mean is None else mean.reshape(keep)
    rstd = rstd.reshape(keep)
    w = _grouped(_scale(weight, offset), normalized_shape, shape)
    b = _grouped(bias, normalized_shape, shape)
    dgate = None
    if gate is not None and norm_before_gate:  # y = a * s: a as the forward rounded it
        a = normalize_forward(uv, axes, mean, rstd, w, b, activation, x_hat_dtype).reshape(x.shape)
        dgate = dy * round_to(a, z_dtype) * silu_grad(gate)
        dy = dy * s
    du, dw, db = normalize_backward(_grouped(dy, normalized_shape, shape), uv, axes, mean, rstd, w, b,
                                    activation, x_hat_dtype=x_hat_dtype)
    du = du.reshape(x.shape)
    dx = du * s if gate_first else du
    if gate_first:  # u = x * s
        dgate = du * x * silu_grad(gate)
    return (dx, None if dw is None else dw.reshape(weight.shape), None if db is None else db.reshape(bias.shape),
            dgate)


# --------------------------------------------------------------------------- backend contract
def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats, *, offset=0.0,
                 casting="fp32", out_dtype=None, gate=None, norm_before_gate=True, group_size=0):
    # The residual add happens in torch, in promote_types(x, residual), so its rounding is torch's.
    h = None if residual is None else x + residual
    inp = x if h is None else h
    x_hat_dtype, z_dtype = casting_dtypes(casting, inp.dtype, None if weight is None else weight.dtype)
    y, mean, rstd = row_norm_forward(host(inp), tuple(normalized_shape), host(weight), host(bias), eps, rms,
                                     activation, offset=offset, gate=host(gate), norm_before_gate=norm_before_gate,
                                     group_size=group_size, x_hat_dtype=x_hat_dtype, z_dtype=z_dtype)
    y = into(y, torch.empty(inp.shape, dtype=out_dtype or inp.dtype, device=inp.device))
    if not need_stats:
        return y, h, None, None
    return y, h, None if rms else stats(mean, inp), stats(rstd, inp)


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, *, offset=0.0,
                 casting="fp32", gate=None, norm_before_gate=True, group_size=0):
    """``output_mask`` [dx, dw, db, dgate]; a 3-entry mask (no dgate) gets the 3 gradients back."""
    x_hat_dtype, z_dtype = casting_dtypes(casting, x.dtype, None if weight is None else weight.dtype)
    dx, dw, db, dgate = row_norm_backward(host(dy), host(x), tuple(normalized_shape), None if rms else host(mean),
                                          host(rstd), host(weight), host(bias), activation, offset=offset,
                                          gate=host(gate), norm_before_gate=norm_before_gate,
                                          group_size=group_size, x_hat_dtype=x_hat_dtype, z_dtype=z_dtype)
    dx = into(dx, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return masked(output_mask, dx, like(dw, weight), like(db, bias), like(dgate, gate))


# --------------------------------------------------------------------------- norm + quantize
# Inference feeds a norm's output to an fp8 or int8 matrix multiply. The output y (as its dtype
# rounds it, which is what torch's norm returns) is quantized in fp32 arithmetic:
#
#     scale = max(amax |y| / qmax, MIN_QUANT_SCALE)   per row or per group of consecutive values
#             (dynamic), or one given scale (static, at least MIN_QUANT_SCALE); qmax = 448
#             (float8_e4m3fn) or 127 (int8)
#     q     = round(clip(y * (1 / scale), -qmax, qmax))   int8 clips at -128
#
# so q * scale ~ y. "round" is to the nearest value of the target grid, ties to even: for int8
# the integers; for float8_e4m3fn (1 sign, 4 exponent bits biased by 7, 3 mantissa bits, no inf)
# the values m * 2**(e - 3), m an integer, e = max(floor(log2 |v|), -6) the binade (below 2**-6
# the subnormals, spaced 2**-9).

def _e4m3_round(v):
    """float32 ndarray v (|v| <= 448) rounded to the float8_e4m3fn grid, ties to even, as float64."""
    a = np.abs(v.astype(np.float64))
    with np.errstate(divide="ignore"):
        binade = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), -6.0)
    quantum = np.exp2(binade - 3)
    return np.copysign(np.rint(a / quantum) * quantum, v)  # exact: a / quantum and its rint fit float64


def quantize(y, k, dtype, scale=None, group_size=0):
    """(q, scales) of y (a tensor, the norm's output) over its last k dims, as described above."""
    qmax = np.float32(QUANT_MAX[dtype])
    rows = y.detach().cpu().float().numpy().reshape(y.shape[: y.dim() - k] + (-1,))
    if scale is None:
        groups = rows.reshape(rows.shape[:-1] + (-1, group_size or rows.shape[-1]))
        scales = np.maximum(np.abs(groups).max(-1) / qmax, np.float32(MIN_QUANT_SCALE))
        v = (groups * (np.float32(1.0) / scales)[..., None]).reshape(rows.shape)
    else:
        scales = None
        v = rows * (np.float32(1.0) / np.maximum(np.float32(scale.item()), np.float32(MIN_QUANT_SCALE)))
    with np.errstate(invalid="ignore"):
        v = np.where(np.isnan(v), v, np.clip(v, -qmax - (dtype == torch.int8), qmax))
    q = np.nan_to_num(np.rint(v)) if dtype == torch.int8 else _e4m3_round(v)
    q = torch.from_numpy(q.reshape(y.shape)).to(device=y.device, dtype=dtype)  # exact: q is on the grid
    return q, scale if scales is None else torch.from_numpy(scales).to(y.device)

