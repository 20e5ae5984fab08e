"""GroupNorm over chunks in float64: the statistics of a piece, their combination, and the
normalization with given statistics (the NumPy reference of ``normops.ops.group_stats``).

A tensor [N, C, *S] given in pieces along any spatial dims (video frames, image tiles) has, per
(sample, group) and per piece, n values, their mean and M2 = sum((x - mean)^2) (two-pass, as
``moments`` computes it). Two pieces a, b combine exactly (Chan, Golub and LeVeque 1979):

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

so var = M2 / n of the whole, whatever the split; an empty piece (n = 0, mean 0, M2 0) changes
nothing. Then each piece is normalized with the whole's statistics: GroupNorm's forward
(group_norm.py) with mean and rstd = 1 / sqrt(M2 / n + eps) given instead of computed.
"""
import math

import numpy as np
import torch

from .common import host, into, normalize_forward, per_channel, rstd_of, stats


def _grouped(x, num_groups):
    """[N, C, *S] -> [N, G, C/G, S], as group_norm.py views it (its helper is private there)."""
    n, c = x.shape[:2]
    return x.reshape(n, num_groups, c // num_groups, math.prod(x.shape[2:]))


def group_stats_forward(x, num_groups):
    """(count, mean, m2) of x [N, C, *S], each [N, G]; an empty piece gives count 0, mean 0, m2 0."""
    xg = _grouped(x, num_groups)
    count = xg.shape[2] * xg.shape[3]
    if count == 0:
        zeros = np.zeros(xg.shape[:2])
        return np.full(xg.shape[:2], 0, dtype=np.int64), zeros, zeros.copy()
    mean = xg.mean(axis=(2, 3))
    xc = xg - mean[:, :, None, None]
    return np.full(xg.shape[:2], count, dtype=np.int64), mean, (xc * xc).sum(axis=(2, 3))


def combine(a, b):
    """Chan's combination of two (count, mean, m2) triples."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, nb / n, 0.0)
    delta = mb - ma
    return n, ma + delta * frac, m2a + m2b + delta * delta * na * frac


def group_norm_apply_forward(x, num_groups, mean, m2, count, weight=None, bias=None, eps=1e-5, activation="none"):
    """GroupNorm of x [N, C, *S] with the statistics given ([N, G] each) -> y."""
    xg = _grouped(x, num_groups)
    wshape = xg.shape[1:3] + (1,)
    keep = xg.shape[:2] + (1, 1)
    rstd = rstd_of(m2 / count, eps)
    y = normalize_forward(xg, (2, 3), mean.reshape(keep), rstd.reshape(keep), per_channel(weight, wshape),
                          per_channel(bias, wshape), activation)
    return y.reshape(x.shape)


# --------------------------------------------------------------------------- backend contract
def group_norm_stats(x, num_groups):
    count, mean, m2 = group_stats_forward(host(x), num_groups)
    return torch.from_numpy(count).to(x.device), stats(mean, x), stats(m2, x)


def combine_group_stats(a, b):
    """Chan's combination of two (count, mean, m2) tensor triples, computed in float64."""
    _, mean, m2 = combine((host(a[0]), host(a[1]), host(a[2])), (host(b[0]), host(b[1]), host(b[2])))
    return a[0] + b[0], stats(mean, a[1]), stats(m2, a[1])


def group_norm_apply(x, num_groups, mean, m2, count, weight, bias, eps, activation):
    y = group_norm_apply_forward(host(x), num_groups, host(mean), host(m2), host(count), host(weight), host(bias),
                                 eps, activation)
    return into(y, torch.empty_like(x))
