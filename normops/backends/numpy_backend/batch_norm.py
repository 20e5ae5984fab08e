"""BatchNorm in float64: the NumPy reference's batch norm, in training and in eval mode.

x has shape [N, C, *S] (S: any spatial dims, possibly none). Each channel is normalized on its
own, over every sample and position: R = N and all of S, n = N * |S| values. w and b are [C].

Forward in training, per channel c (i running over its n values):

    mu = mean(x),  var = mean((x - mu)^2)  (biased: divided by n),  rstd = 1 / sqrt(var + eps)
    x_hat = (x - mu) * rstd,  z = x_hat * w_c + b_c,  y = act(z)

The caller's running statistics take the unbiased variance, ``batch_var = var * n / (n - 1)``
(torch's rule); this backend returns it and never touches running_mean/running_var itself.

Forward in eval: mu = running_mean_c and var = running_var_c, constants, not functions of x.

The code reshapes x to [N, C, |S|] and reduces axes (0, 2), with w, b as [C, 1]. Statistics
come back [C].

Backward, g = dz * w_c with dz = dy * act'(z):

    training   the statistics are LayerNorm's over the channel, so the vector-Jacobian product is
               LayerNorm's (the derivation: row_norm.py), means over N and S:
               dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    eval       mu and rstd are constants, so x_hat is x scaled and shifted: dx = rstd * g
    both       dw_c = sum over N and S of dz * x_hat,  db_c = sum over N and S of dz
"""
import math

import torch

from .common import (host, into, like, masked, moments, normalize_backward, normalize_forward, per_channel, rstd_of,
                     stats)


def _channels(x):
    """[N, C, *S] -> [N, C, S]: BatchNorm reduces axes (0, 2)."""
    return x.reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))


def batch_norm_forward(x, weight=None, bias=None, eps=1e-5, activation="none",
                       running_mean=None, running_var=None, training=True):
    """BatchNorm of x [N, C, *S] -> (y, mean, var, rstd), stats [C].

    Training: batch statistics, ``var`` biased (divided by n = N * |S|), as normalization uses.
    Eval: ``running_mean``/``running_var`` normalize and are returned as mean/var.
    """
    x3 = _channels(x)
    c = x3.shape[1]
    if training:
        mean, var = moments(x3, (0, 2))
    else:
        mean, var = running_mean.reshape(1, c, 1), running_var.reshape(1, c, 1)
    rstd = rstd_of(var, eps)
    y = normalize_forward(x3, (0, 2), mean, rstd, per_channel(weight, (c, 1)),
                          per_channel(bias, (c, 1)), activation)
    return y.reshape(x.shape), mean.reshape(c), var.reshape(c), rstd.reshape(c)


def batch_norm_backward(dy, x, mean, rstd, weight=None, bias=None, activation="none",
                        training=True):
    """-> (dx, dweight, dbias); eval mode (``training=False``) holds mean/rstd constant."""
    x3 = _channels(x)
    c = x3.shape[1]
    dx, dw, db = normalize_backward(_channels(dy), x3, (0, 2), mean.reshape(1, c, 1),
                                    rstd.reshape(1, c, 1), per_channel(weight, (c, 1)),
                                    per_channel(bias, (c, 1)), activation,
                                    stats_from_x=training)
    return (dx.reshape(x.shape), None if dw is None else dw.reshape(c),
            None if db is None else db.reshape(c))


# --------------------------------------------------------------------------- backend contract
def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation):
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var must be defined in evaluation mode")
    y, mean, var, rstd = batch_norm_forward(host(x), host(weight), host(bias), eps, activation,
                                            host(running_mean), host(running_var), training)
    y = into(y, torch.empty_like(x))
    if not training:
        return y, None, None, None
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    batch_var = var * (n / (n - 1)) if n > 1 else var  # unbiased, what the running average takes
    return y, stats(mean, x), stats(rstd, x), stats(batch_var, x)


def batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                   training, eps, activation, output_mask):
    if training:
        mean, rstd = host(save_mean), host(save_rstd)
    else:
        mean, rstd = host(running_mean), rstd_of(host(running_var), eps)
    dx, dw, db = batch_norm_backward(host(dy), host(x), mean, rstd, host(weight), host(bias),
                                     activation, training)
    return masked(output_mask, into(dx, torch.empty_like(x)), like(dw, weight), like(db, bias))
