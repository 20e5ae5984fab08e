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

    norm        x shape           R (reduced)               w, b shape
    LayerNorm   [*, D1..Dk]       the last k dims           [D1..Dk]
    RMSNorm     [*, D1..Dk]       the last k dims           [D1..Dk]
    GroupNorm   [N, C, *S]        C/G channels of a group,  [C]
                                  and all of S
    BatchNorm   [N, C, *S]        N and all of S            [C]
    (InstanceNorm is GroupNorm with G == C.)

BatchNorm in eval mode takes mu and var from the running statistics instead; they are then
constants, not functions of x.

Backward (vector-Jacobian products). Given dy = dL/dy, first undo the activation,
``dz = dy * act'(z)``, then with ``g = dz * w`` and n = |R|:

    d x_hat_i / d x_j = rstd * (delta_ij - 1/n - x_hat_i * x_hat_j / n)     (exact, eps included)
    dx = rstd * (g - mean_R(g) - x_hat * mean_R(g * x_hat))                 LayerNorm-style
    dx = rstd * (g - x_hat * mean_R(g * x_hat))                             RMSNorm (no 1/n term)
    dx = rstd * g                                                           stats constant (BN eval)
    dw = sum(dz * x_hat),  db = sum(dz)          summed over every dim w is broadcast along

Activation derivatives, with s = sigmoid(z), Phi/phi the standard normal cdf/pdf:

    relu(z) = max(z, 0)         relu'(z) = [z > 0]
    silu(z) = z * s             silu'(z) = s * (1 + z * (1 - s))
    gelu(z) = z * Phi(z)        gelu'(z) = Phi(z) + z * phi(z)   (exact erf form, torch's default)

Every backward recomputes x_hat (and z) from x and the saved mean/rstd rather than storing them.
"""
import math

import numpy as np
import torch

from ..core import ACTIVATIONS

_erf = np.vectorize(math.erf, otypes=[np.float64])  # no scipy: math.erf, elementwise
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------- activations
def _sigmoid(z):
    with np.errstate(over="ignore"):  # exp(-z) -> inf for z << 0 gives the right limit, 0
        return 1.0 / (1.0 + np.exp(-z))


def _activation(z, name):
    """act(z) for ``name`` in ACTIVATIONS (normops.core)."""
    if name == "none":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "silu":
        return z * _sigmoid(z)
    if name == "gelu":
        return 0.5 * z * (1.0 + _erf(z / _SQRT2))  # z * Phi(z)
    raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}")


def _activation_grad(z, name):
    """act'(z), elementwise."""
    if name == "none":
        return np.ones_like(z)
    if name == "relu":
        return (~(z <= 0)).astype(np.float64)  # torch's threshold_backward: a NaN z passes dy through
    if name == "silu":
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + _erf(z / _SQRT2)) + z * _INV_SQRT_2PI * np.exp(-0.5 * z * z)
    raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATIONS)}")


# --------------------------------------------------------------------------- generic core
def _mean(a, axes):
    """Mean over ``axes`` (keepdims). An empty reduction gives nan quietly, not a warning."""
    n = math.prod(a.shape[i] for i in axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(a, axis=axes, keepdims=True) / n


def _sum_to(a, shape):
    """Sum ``a`` down to ``shape``, the shape it was broadcast from (the dw, db reduction)."""
    a = a.sum(axis=tuple(range(a.ndim - len(shape))))
    return a.sum(axis=tuple(i for i, s in enumerate(shape) if s == 1), keepdims=True)


def moments(x, axes, rms=False):
    """(mean, var) over ``axes``, keepdims; for RMS, mean is None and var is mean(x^2)."""
    if rms:
        return None, _mean(x * x, axes)
    mean = _mean(x, axes)
    xc = x - mean  # two-pass: deviations from the mean, then their mean square
    return mean, _mean(xc * xc, axes)


def _rstd(var, eps):
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 / np.sqrt(var + eps)


def _x_hat(x, mean, rstd):
    return (x if mean is None else x - mean) * rstd


def _affine(x_hat, weight, bias):
    z = x_hat if weight is None else x_hat * weight
    return z if bias is None else z + bias


def normalize_forward(x, axes, mean, rstd, weight=None, bias=None, activation="none"):
    """y = act(x_hat * w + b) with x_hat = (x - mean) * rstd (mean None: RMS).

    ``mean``/``rstd`` are keepdims over ``axes``; ``weight``/``bias`` broadcast against x.
    """
    return _activation(_affine(_x_hat(x, mean, rstd), weight, bias), activation)


def normalize_backward(dy, x, axes, mean, rstd, weight=None, bias=None, activation="none",
                       stats_from_x=True):
    """(dx, dweight, dbias) for ``normalize_forward``; see the module docstring for the VJPs.

    ``stats_from_x=False`` treats mean/rstd as constants (BatchNorm eval): dx = g * rstd.
    dweight/dbias have weight's/bias's (broadcast) shape, or are None when those are None.
    """
    x_hat = _x_hat(x, mean, rstd)
    if activation != "none":
        dy = dy * _activation_grad(_affine(x_hat, weight, bias), activation)
    g = dy if weight is None else dy * weight
    if not stats_from_x:
        dx = g * rstd
    elif mean is None:  # RMS: x_hat_i = x_i * rstd, only the rstd path couples elements
        dx = rstd * (g - x_hat * _mean(g * x_hat, axes))
    else:  # mean path (-mean(g)) and rstd path (-x_hat * mean(g * x_hat))
        dx = rstd * (g - _mean(g, axes) - x_hat * _mean(g * x_hat, axes))
    dw = None if weight is None else _sum_to(dy * x_hat, weight.shape)
    db = None if bias is None else _sum_to(dy, bias.shape)
    return dx, dw, db


# --------------------------------------------------------------------------- per-norm NumPy API
# Each arranges x so that one generic call applies: the reduction axes, and w, b reshaped to
# broadcast along the right dims. Stats come back without the kept singleton dims.

def _row_axes(x, normalized_shape):
    return tuple(range(x.ndim - len(normalized_shape), x.ndim))


def _row_norm_forward(x, normalized_shape, weight, bias, eps, rms, activation):
    axes = _row_axes(x, normalized_shape)
    mean, var = moments(x, axes, rms)
    rstd = _rstd(var, eps)
    y = normalize_forward(x, axes, mean, rstd, weight, bias, activation)
    lead = x.shape[:x.ndim - len(axes)]
    return y, None if mean is None else mean.reshape(lead), rstd.reshape(lead)


def _row_norm_backward(dy, x, normalized_shape, mean, rstd, weight, bias, activation):
    axes = _row_axes(x, normalized_shape)
    keep = x.shape[:x.ndim - len(axes)] + (1,) * len(axes)
    mean = None if mean is None else mean.reshape(keep)
    return normalize_backward(dy, x, axes, mean, rstd.reshape(keep), weight, bias, activation)


def _grouped(x, num_groups):
    """[N, C, *S] -> [N, G, C/G, S]: a group's channels and positions on axes (2, 3)."""
    n, c = x.shape[:2]
    return x.reshape(n, num_groups, c // num_groups, math.prod(x.shape[2:]))


def _per_channel(p, shape):
    return None if p is None else p.reshape(shape)


def group_norm_forward(x, num_groups, weight=None, bias=None, eps=1e-5, activation="none", instance=False):
    """GroupNorm of x [N, C, *S] -> (y, mean, rstd), stats [N, G]; ``instance``: InstanceNorm's
    call (G == C), whose statistics differ from GroupNorm's only where var = eps = 0."""
    xg = _grouped(x, num_groups)
    wshape = xg.shape[1:3] + (1,)  # [G, C/G, 1]: per channel, broadcast over N and S
    mean, var = moments(xg, (2, 3))
    rstd = _rstd(var, eps)
    if instance and eps == 0:  # instance norm: torch's (batch-norm) statistics give a constant
        rstd = np.where(var == 0, 0.0, rstd)  # channel rstd 0 with eps = 0, so a zero output, not NaN
    y = normalize_forward(xg, (2, 3), mean, rstd, _per_channel(weight, wshape),
                          _per_channel(bias, wshape), activation)
    return y.reshape(x.shape), mean.reshape(xg.shape[:2]), rstd.reshape(xg.shape[:2])


def group_norm_backward(dy, x, num_groups, mean, rstd, weight=None, bias=None,
                        activation="none"):
    """-> (dx, dweight, dbias) for ``group_norm_forward``; dweight/dbias are [C]."""
    xg = _grouped(x, num_groups)
    wshape = xg.shape[1:3] + (1,)
    keep = xg.shape[:2] + (1, 1)
    dx, dw, db = normalize_backward(_grouped(dy, num_groups), xg, (2, 3), mean.reshape(keep),
                                    rstd.reshape(keep), _per_channel(weight, wshape),
                                    _per_channel(bias, wshape), activation)
    return (dx.reshape(x.shape), None if dw is None else dw.reshape(-1),
            None if db is None else db.reshape(-1))


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
    rstd = _rstd(var, eps)
    y = normalize_forward(x3, (0, 2), mean, rstd, _per_channel(weight, (c, 1)),
                          _per_channel(bias, (c, 1)), activation)
    return y.reshape(x.shape), mean.reshape(c), var.reshape(c), rstd.reshape(c)


def batch_norm_backward(dy, x, mean, rstd, weight=None, bias=None, activation="none",
                        training=True):
    """-> (dx, dweight, dbias); eval mode (``training=False``) holds mean/rstd constant."""
    x3 = _channels(x)
    c = x3.shape[1]
    dx, dw, db = normalize_backward(_channels(dy), x3, (0, 2), mean.reshape(1, c, 1),
                                    rstd.reshape(1, c, 1), _per_channel(weight, (c, 1)),
                                    _per_channel(bias, (c, 1)), activation,
                                    stats_from_x=training)
    return (dx.reshape(x.shape), None if dw is None else dw.reshape(c),
            None if db is None else db.reshape(c))


# --------------------------------------------------------------------------- backend contract
def _np(t):
    """Tensor (any device, dtype, layout) -> float64 ndarray; .double() first handles bf16."""
    return None if t is None else t.detach().cpu().double().numpy()


def _t(a):
    """ndarray (or 0-d scalar result) -> CPU float64 tensor."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64, order="C"))


def _to(a, like):
    """ndarray -> tensor with ``like``'s dtype and device (None passes through)."""
    if a is None or like is None:
        return None
    return _t(a).to(device=like.device, dtype=like.dtype)


def _into(a, out):
    """Copy ndarray ``a`` into ``out``, which keeps its own memory format."""
    return out.copy_(_t(a))


def _stats(a, x):
    """Statistics are float32, or float64 when x is float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _t(a).to(device=x.device, dtype=dtype)


def _masked(mask, dx, dw, db):
    return tuple(g if want else None for g, want in zip((dx, dw, db), mask))


def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    # The residual add happens in x's dtype, in torch, so its rounding is torch's.
    h = None if residual is None else (x + residual).to(x.dtype)
    y, mean, rstd = _row_norm_forward(_np(x if h is None else h), tuple(normalized_shape),
                                      _np(weight), _np(bias), eps, rms, activation)
    y = _into(y, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    if not need_stats:
        return y, h, None, None
    return y, h, None if rms else _stats(mean, x), _stats(rstd, x)


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation,
                 output_mask):
    dx, dw, db = _row_norm_backward(_np(dy), _np(x), tuple(normalized_shape),
                                    None if rms else _np(mean), _np(rstd), _np(weight),
                                    _np(bias), activation)
    dx = _into(dx, torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return _masked(output_mask, dx, _to(dw, weight), _to(db, bias))


def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False):
    y, mean, rstd = group_norm_forward(_np(x), num_groups, _np(weight), _np(bias), eps,
                                       activation, instance)
    y = _into(y, torch.empty_like(x))
    if not need_stats:
        return y, None, None
    return y, _stats(mean, x), _stats(rstd, x)


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask):
    dx, dw, db = group_norm_backward(_np(dy), _np(x), num_groups, _np(mean), _np(rstd),
                                     _np(weight), _np(bias), activation)
    return _masked(output_mask, _into(dx, torch.empty_like(x)), _to(dw, weight), _to(db, bias))


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation):
    if not training and (running_mean is None or running_var is None):
        raise ValueError("running_mean and running_var must be defined in evaluation mode")
    y, mean, var, rstd = batch_norm_forward(_np(x), _np(weight), _np(bias), eps, activation,
                                            _np(running_mean), _np(running_var), training)
    y = _into(y, torch.empty_like(x))
    if not training:
        return y, None, None, None
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    batch_var = var * (n / (n - 1)) if n > 1 else var  # unbiased, what the running average takes
    return y, _stats(mean, x), _stats(rstd, x), _stats(batch_var, x)


def batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                   training, eps, activation, output_mask):
    if training:
        mean, rstd = _np(save_mean), _np(save_rstd)
    else:
        mean, rstd = _np(running_mean), _rstd(_np(running_var), eps)
    dx, dw, db = batch_norm_backward(_np(dy), _np(x), mean, rstd, _np(weight), _np(bias),
                                     activation, training)
    return _masked(output_mask, _into(dx, torch.empty_like(x)), _to(dw, weight), _to(db, bias))
