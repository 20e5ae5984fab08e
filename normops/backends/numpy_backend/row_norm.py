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
"""
import torch

from .common import host, into, like, masked, moments, normalize_backward, normalize_forward, rstd_of, stats


def _row_axes(x, normalized_shape):
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def row_norm_forward(x, normalized_shape, weight, bias, eps, rms, activation):
    """LayerNorm (RMSNorm when ``rms``) of ndarray x -> (y, mean, rstd), stats of x.shape[:-k]
    (mean None for RMS)."""
    axes = _row_axes(x, normalized_shape)
    mean, var = moments(x, axes, rms)
    rstd = rstd_of(var, eps)
    y = normalize_forward(x, axes, mean, rstd, weight, bias, activation)
    lead = x.shape[:x.ndim - len(axes)]
    return y, None if mean is None else mean.reshape(lead), rstd.reshape(lead)


def row_norm_backward(dy, x, normalized_shape, mean, rstd, weight, bias, activation):
    """-> (dx, dweight, dbias) for ``row_norm_forward``; mean None: RMSNorm."""
    axes = _row_axes(x, normalized_shape)
    keep = x.shape[:x.ndim - len(axes)] + (1,) * len(axes)  # the stats back on the row's axes
    mean = None if mean is None else mean.reshape(keep)
    return normalize_backward(dy, x, axes, mean, rstd.reshape(keep), weight, bias, activation)


# --------------------------------------------------------------------------- backend contract
def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    # The residual add happens in x's dtype, in torch, so its rounding is torch's.
    h = None if residual is None else (x + residual).to(x.dtype)
    y, mean, rstd = row_norm_forward(host(x if h is None else h), tuple(normalized_shape),
                                     host(weight), host(bias), eps, rms, activation)
    y = into(y, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    if not need_stats:
        return y, h, None, None
    return y, h, None if rms else stats(mean, x), stats(rstd, x)


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation,
                 output_mask):
    dx, dw, db = row_norm_backward(host(dy), host(x), tuple(normalized_shape),
                                   None if rms else host(mean), host(rstd), host(weight),
                                   host(bias), activation)
    dx = into(dx, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return masked(output_mask, dx, like(dw, weight), like(db, bias))
