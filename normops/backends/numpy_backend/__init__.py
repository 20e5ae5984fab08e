"""The "numpy" backend: a from-scratch float64 reference for every norm, and the test oracle.

Every input is copied to the host as float64, computed with plain NumPy, and copied back.
Correctness and clarity come first; the code is vectorized but makes no attempt to be fast.

Forward. Every norm here is one computation over a different set of reduction axes R:

    mu    = mean_R(x)                            (LayerNorm, GroupNorm, BatchNorm)
    var   = mean_R((x - mu)^2)                   two-pass: mean first, then squared deviations,
                                                 never E[x^2] - E[x]^2, which cancels badly
    rstd  = 1 / sqrt(var + eps)
    x_hat = (x - mu) * rstd
    z     = x_hat * w + b                        w, b per feature (row norm) or per channel
    y     = act(z)                               act in {none, relu, silu, gelu}

RMSNorm drops the centering: ``x_hat = x * rstd`` with ``rstd = 1 / sqrt(mean_R(x^2) + eps)``.

    norm        x shape           R (reduced)               w, b shape   module
    LayerNorm   [*, D1..Dk]       the last k dims           [D1..Dk]     row_norm.py
    RMSNorm     [*, D1..Dk]       the last k dims           [D1..Dk]     row_norm.py
    GroupNorm   [N, C, *S]        C/G channels of a group,  [C]          group_norm.py
                                  and all of S
    BatchNorm   [N, C, *S]        N and all of S            [C]          batch_norm.py
    (InstanceNorm is GroupNorm with G == C.)

Where to read: ``row_norm.py`` first, for the forward and the backward's derivation in full
(LayerNorm and RMSNorm); ``group_norm.py`` and ``batch_norm.py`` for how their axes reduce to the
same computation, and what differs (InstanceNorm's eps = 0 case, BatchNorm's running statistics);
``common.py`` for the one generic forward and backward every family calls, the activations and
their derivatives, and the copies between torch and NumPy.

This package is what ``normops.backends.load("numpy")`` returns: it holds the backend contract
(``normops.backends``' docstring), one module per family.
"""
from .ada_norm import ada_norm_bwd, ada_norm_fwd
from .batch_norm import batch_norm_bwd, batch_norm_fwd
from .channels_first import layer_norm_cf_bwd, layer_norm_cf_fwd
from .group_norm import group_norm_bwd, group_norm_fwd
from .group_stats import combine_group_stats, group_norm_apply, group_norm_stats
from .row_norm import quantize, row_norm_bwd, row_norm_fwd

__all__ = ["ada_norm_bwd", "ada_norm_fwd", "batch_norm_bwd", "batch_norm_fwd", "combine_group_stats",
           "group_norm_apply", "group_norm_bwd", "group_norm_fwd", "group_norm_stats", "layer_norm_cf_bwd",
           "layer_norm_cf_fwd", "row_norm_bwd", "row_norm_fwd"]
