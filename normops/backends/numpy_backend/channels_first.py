"""Channels-first LayerNorm in float64 (ConvNeXt's, timm's LayerNorm2d): the NumPy reference.

x has shape [N, C, *S]; each (sample, position) is normalized over its C channels: the row norm of
row_norm.py with the reduced axis R = (1,) instead of the last, and w, b of shape [C] broadcast
along axis 1 ([1, C, 1, ...]). Statistics come back [N, *S].

    mu = mean_C(x),  var = mean_C((x - mu)^2),  rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
    z = x_hat * w_c + b_c,  y = act(z)
    dx = rstd * (g - mean_C(g) - x_hat * mean_C(g * x_hat)),  g = dz * w_c,  dz = dy * act'(z)
    dw_c = sum over N and S of dz * x_hat,  db_c = sum over N and S of dz
"""
import numpy as np
import torch

from .common import host, into, like, masked, moments, normalize_backward, normalize_forward, per_channel, rstd_of, \
    stats


def layer_norm_cf_forward(x, weight=None, bias=None, eps=1e-6, activation="none"):
    """-> (y, mean, rstd), statistics [N, *S]."""
    wshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    mean, var = moments(x, (1,))
    rstd = rstd_of(var, eps)
    y = normalize_forward(x, (1,), mean, rstd, per_channel(weight, wshape), per_channel(bias, wshape), activation)
    return y, np.squeeze(mean, 1), np.squeeze(rstd, 1)


def layer_norm_cf_backward(dy, x, mean, rstd, weight=None, bias=None, activation="none"):
    """-> (dx, dweight, dbias) for ``layer_norm_cf_forward``; dweight/dbias are [C]."""
    wshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    dx, dw, db = normalize_backward(dy, x, (1,), np.expand_dims(mean, 1), np.expand_dims(rstd, 1),
                                    per_channel(weight, wshape), per_channel(bias, wshape), activation)
    return dx, None if dw is None else dw.reshape(-1), None if db is None else db.reshape(-1)


# --------------------------------------------------------------------------- backend contract
def layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats):
    y, mean, rstd = layer_norm_cf_forward(host(x), host(weight), host(bias), eps, activation)
    y = into(y, torch.empty_like(x))
    if not need_stats:
        return y, None, None
    return y, stats(mean, x), stats(rstd, x)


def layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask):
    dx, dw, db = layer_norm_cf_backward(host(dy), host(x), host(mean), host(rstd), host(weight), host(bias),
                                        activation)
    return masked(output_mask, into(dx, torch.empty_like(x)), like(dw, weight), like(db, bias))
