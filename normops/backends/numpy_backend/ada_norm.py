"""adaLN modulation in float64: the NumPy reference of ``normops::ada_norm`` (DiT, SD3, Flux).

x (here: the op's ``input``) has shape [B, T, D]; each of its B*T rows of D values is normalized on
its own (``row_norm.py``'s math), then modulated per sample: scale and shift are [B, D], one row
per sample, shared by the sample's T tokens. The adaLN-Zero block step of DiT is

    h = residual + gate[b] * x                 (with a residual; no gate: h = residual + x)
    n = norm(h) * w + b                        LayerNorm (RMSNorm: no centering, no bias)
    y = n * (1 + scale[b]) + shift[b]

and the op returns y, and h, the next block's residual stream.

Rounding. h is rounded to its dtype (promote_types(x, residual)) before it is normalized: it is a
tensor of its own, returned, and what the backward reads back. Then the casting mode:
  "fp32"   one rounding of y, at the end (everything before it in float64 here).
  "torch"  each step rounded to h's dtype as diffusers' torch composition rounds it:
           gate * x, then + residual; layer_norm's output n; 1 + scale; n * (1 + scale); + shift.

  "t5"     "torch", and x_hat rounded to a half weight's dtype before the weight (diffusers' RMSNorm,
           T5LayerNorm: ``normops.core.casting_dtypes("t5", ...)``); without a weight it is "torch".

LayerNorm's statistics are taken about each row's first h (kernels/row_norm.py's pivot): a constant
row's mean is then exact and its x_hat exactly 0, whatever rstd = 1/sqrt(eps) magnifies.

Backward. Given dy (and dh, the gradient reaching h from later layers), with x_hat_r the x_hat the
forward multiplied w by:

    dshift[b] = sum_t dy                       dscale[b] = sum_t dy * n    (n as rounded)
    dn        = dy * (1 + scale[b])            (1 + scale as rounded)       g = dn * w
    dh_norm   = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (RMSNorm: no mean(g) term; mean(g)
                taken about g's first element, so a constant g gives exactly 0)
    dw = sum_{b,t} dn * x_hat_r = sum_b (1 + scale[b]) * sum_t dy * x_hat_r     db = sum_{b,t} dn
    dh_total  = dh_norm + dh
    dresidual = dh_total,   dx = gate[b] * dh_total,   dgate[b] = sum_t dh_total * x

Every rounding is straight-through (derivative 1), but a product's gradient takes the other factor
as the forward computed it (dscale's n, dn's 1 + scale, dw's x_hat_r), as autograd through the
composition does.
"""
import torch

import numpy as np

from ...core import casting_dtypes
from .common import host, into, like, moments, normalize_forward, round_to, rstd_of, stats

_AXES = (2,)  # the normalized dim of [B, T, D]


def _h_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _rounding(casting, dtype):
    """The dtype each intermediate step is rounded to: h's under "torch" and "t5", none under "fp32"."""
    return dtype if casting in ("torch", "t5") else None


def _xhat_dtype(casting, dtype, weight):
    """The dtype x_hat is rounded to before the weight: "t5"'s, else None."""
    return casting_dtypes("t5", dtype, None if weight is None else weight.dtype)[0] if casting == "t5" else None


def _moments(h, rms):
    """(mean, var) over the last dim, keepdims; LayerNorm's about each row's first value (the pivot)."""
    if rms:
        return moments(h, _AXES, True)
    pivot = h[..., :1]
    mean, var = moments(h - pivot, _AXES)
    return mean + pivot, var


def ada_norm_forward(h, scale, shift, weight, bias, eps, rms, step_dtype=None, xhat_dtype=None):
    """(y, n, mean, rstd) for ndarray h [B, T, D] (already rounded), y in float64, not yet rounded."""
    mean, var = _moments(h, rms)
    rstd = rstd_of(var, eps)
    n = round_to(normalize_forward(h, _AXES, mean, rstd, weight, bias, x_hat_dtype=xhat_dtype), step_dtype)
    one_plus = round_to(1.0 + scale[:, None, :], step_dtype)
    y = round_to(n * one_plus, step_dtype) + shift[:, None, :]
    return y, n, mean, rstd


# --------------------------------------------------------------------------- backend contract
def ada_norm_fwd(x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats):
    hd = _h_dtype(x, residual)
    step = _rounding(casting, hd)
    h = None
    if residual is not None:
        gx = host(x) if gate is None else round_to(host(gate)[:, None, :] * host(x), step)
        h = into(round_to(gx + host(residual), hd), torch.empty(x.shape, dtype=hd, device=x.device))
    inp = x if h is None else h
    y, _, mean, rstd = ada_norm_forward(host(inp), host(scale), host(shift), host(weight), host(bias), eps, rms,
                                        step, _xhat_dtype(casting, hd, weight))
    y = into(y, torch.empty(x.shape, dtype=hd, device=x.device))
    if not need_stats:
        return y, h, None, None
    return y, h, None if rms else stats(mean[..., 0], inp), stats(rstd[..., 0], inp)


def ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, casting, output_mask):
    """-> (dx, dresidual, dgate, dscale, dshift, dweight, dbias), None where ``output_mask`` says no.
    h: the saved residual stream (None without a residual: x was normalized); dh: its gradient or None."""
    inp = x if h is None else h
    step = _rounding(casting, inp.dtype)
    hv, s = host(inp), host(scale)
    m = None if rms else host(mean)[..., None]
    r = host(rstd)[..., None]
    w, b = host(weight), host(bias)
    dyv = host(dy)
    xhat_dtype = _xhat_dtype(casting, inp.dtype, weight)
    n = round_to(normalize_forward(hv, _AXES, m, r, w, b, x_hat_dtype=xhat_dtype), step)
    dscale = (dyv * n).sum(1)
    dshift = dyv.sum(1)
    dn = dyv * round_to(1.0 + s[:, None, :], step)
    x_hat = hv * r if m is None else (hv - m) * r
    g = dn if w is None else dn * w
    c1 = np.mean(g * x_hat, -1, keepdims=True)
    if m is None:
        dht = r * (g - x_hat * c1)
    else:
        gc = g - g[..., :1]
        dht = r * (gc - np.mean(gc, -1, keepdims=True) - x_hat * c1)
    dw = None if w is None else (dn * round_to(x_hat, xhat_dtype)).sum((0, 1))
    db = None if b is None else dn.sum((0, 1))
    if dh is not None:
        dht = dht + host(dh)
    g = None if gate is None else host(gate)
    dx = dht if g is None or h is None else dht * g[:, None, :]
    dgate = None if g is None or h is None else (dht * host(x)).sum(1)
    grads = (into(dx, torch.empty(x.shape, dtype=x.dtype, device=x.device)),
             None if h is None else into(dht, torch.empty(x.shape, dtype=h.dtype, device=x.device)),
             like(dgate, gate), like(dscale, scale), like(dshift, scale), like(dw, weight), like(db, bias))
    return tuple(g_ if want else None for g_, want in zip(grads, output_mask))
