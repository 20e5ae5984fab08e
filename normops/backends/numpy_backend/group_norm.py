"""GroupNorm and InstanceNorm in float64: the NumPy reference's group norms.

x has shape [N, C, *S] (S: any spatial dims, possibly none) and its C channels split into G groups
of C/G consecutive channels. Each (sample, group) pair is normalized on its own, over its C/G
channels and all of S: n = C/G * |S| values. w and b have shape [C]: one per channel, applied
after normalization, so channels of one group share statistics but not their affine; or shape
[N, C], one per (sample, channel) (AdaGroupNorm's modulation, ``ada_group_norm``), and then
dw, db are [N, C] too (the sums below without the sum over N).
InstanceNorm is GroupNorm with G == C (every channel its own group).

Forward, per (sample, group), i running over its n values:

    mu = mean(x),  var = mean((x - mu)^2),  rstd = 1 / sqrt(var + eps),  x_hat = (x - mu) * rstd
    z = x_hat * w_c + b_c  (c: the channel of value i),  y = act(z)

The code reshapes x to [N, G, C/G, |S|], so a group's values sit on axes (2, 3), and w, b to
[G, C/G, 1], which broadcasts each channel's parameter over N and S; then the generic forward
applies with R = (2, 3). Statistics come back [N, G].

Backward: the statistics are LayerNorm's over the group, so the vector-Jacobian product is
LayerNorm's (the derivation: row_norm.py), with g = dz * w_c and means over the group:

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    dw_c = sum over N and S of dz * x_hat,  db_c = sum over N and S of dz

InstanceNorm with eps = 0: torch computes it through batch norm, whose statistics give a constant
channel (var = 0) rstd 0, so a zero output; plain GroupNorm's 1 / sqrt(0) would give inf and NaN.
"""
import math

import numpy as np
import torch

from .common import (host, into, like, masked, moments, normalize_backward, normalize_forward, per_channel, rstd_of,
                     round_to, stats)


def _grouped(x, num_groups):
    """[N, C, *S] -> [N, G, C/G, S]: a group's channels and positions on axes (2, 3)."""
    n, c = x.shape[:2]
    return x.reshape(n, num_groups, c // num_groups, math.prod(x.shape[2:]))


def _param_shape(xg, weight, bias):
    """[G, C/G, 1] for per-channel parameters (broadcast over N and S), [N, G, C/G, 1] for
    per-sample ones ([N, C])."""
    per_sample = any(p is not None and p.ndim == 2 for p in (weight, bias))
    return xg.shape[int(not per_sample):3] + (1,)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation="none", instance=False,
                       step_dtype=None):
    """GroupNorm of x [N, C, *S] -> (y, mean, rstd), stats [N, G]; ``instance``: InstanceNorm's
    call (G == C), whose statistics differ from GroupNorm's only where var = eps = 0. weight and
    bias: [C], or [N, C] per sample. ``step_dtype`` (the "torch" casting): x_hat, x_hat * w and
    x_hat * w + b each rounded to it (``round_to``), as diffusers' AdaGroupNorm rounds them."""
    xg = _grouped(x, num_groups)
    wshape = _param_shape(xg, weight, bias)
    mean, var = moments(xg, (2, 3))
    rstd = rstd_of(var, eps)
    if instance and eps == 0:  # instance norm: torch's (batch-norm) statistics give a constant
        rstd = np.where(var == 0, 0.0, rstd)  # channel rstd 0 with eps = 0, so a zero output, not NaN
    if step_dtype is None:
        y = normalize_forward(xg, (2, 3), mean, rstd, per_channel(weight, wshape),
                              per_channel(bias, wshape), activation)
    else:  # round(x_hat), then round(. * w), round(. + b), then the activation (rstd 1: the identity)
        z = normalize_forward(xg, (2, 3), mean, rstd, x_hat_dtype=step_dtype)
        z = round_to(normalize_forward(z, (2, 3), None, 1.0, per_channel(weight, wshape)), step_dtype)
        z = round_to(normalize_forward(z, (2, 3), None, 1.0, None, per_channel(bias, wshape)), step_dtype)
        y = normalize_forward(z, (2, 3), None, 1.0, activation=activation)
    return y.reshape(x.shape), mean.reshape(xg.shape[:2]), rstd.reshape(xg.shape[:2])


def group_norm_backward(dy, x, num_groups, mean, rstd, weight=None, bias=None,
                        activation="none"):
    """-> (dx, dweight, dbias) for ``group_norm_forward``; dweight/dbias have weight's/bias's
    shape, [C] or [N, C]."""
    xg = _grouped(x, num_groups)
    wshape = _param_shape(xg, weight, bias)
    keep = xg.shape[:2] + (1, 1)
    dx, dw, db = normalize_backward(_grouped(dy, num_groups), xg, (2, 3), mean.reshape(keep),
                                    rstd.reshape(keep), per_channel(weight, wshape),
                                    per_channel(bias, wshape), activation)
    return (dx.reshape(x.shape), None if dw is None else dw.reshape(weight.shape),
            None if db is None else db.reshape(bias.shape))


# --------------------------------------------------------------------------- backend contract
def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, casting="fp32"):
    y, mean, rstd = group_norm_forward(host(x), num_groups, host(weight), host(bias), eps,
                                       activation, instance, x.dtype if casting == "torch" else None)
    y = into(y, torch.empty_like(x))
    if not need_stats:
        return y, None, None
    return y, stats(mean, x), stats(rstd, x)


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask):
    dx, dw, db = group_norm_backward(host(dy), host(x), num_groups, host(mean), host(rstd),
                                     host(weight), host(bias), activation)
    return masked(output_mask, into(dx, torch.empty_like(x)), like(dw, weight), like(db, bias))
