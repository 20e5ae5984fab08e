"""What every family of the NumPy reference shares: the one generic forward and backward, the
activations, and the copies between torch tensors and float64 arrays.

Each family module (row_norm.py, group_norm.py, batch_norm.py) reshapes its input so that the
norm reduces over a set of axes R, with w, b broadcast along the right dims, then calls
``normalize_forward`` / ``normalize_backward`` here (the math: this package's docstring; the
backward's derivation: row_norm.py).

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

Rounding (``round_to``). The reference computes in float64; where a variant rounds an intermediate
(row_norm.py's casting modes), ``round_to`` rounds the float64 value to float32 first, then to the
target: what torch does converting a float64 tensor (c10 goes double -> float -> half/bfloat16), and
what the models do, whose intermediates are fp32 values. NumPy has float16 (round to nearest even)
but no bfloat16: bfloat16 is the top 16 bits of a float32, so rounding adds half of the dropped
16 bits' range, plus the kept lowest bit for ties to even, to the uint32 bit pattern, then clears
the low 16 bits (torch's c10::round_to_nearest_even; a carry into the exponent is the right
rounding up, to inf past the largest bfloat16). NaN is kept apart: the addition could carry a
NaN's payload away and leave inf.
"""
import math

import numpy as np
import torch

from ...core import ACTIVATIONS

_erf = np.vectorize(math.erf, otypes=[np.float64])  # no scipy: math.erf, elementwise
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------- activations
def _sigmoid(z):
    with np.errstate(over="ignore"):  # exp(-z) -> inf for z << 0 gives the right limit, 0
        return 1.0 / (1.0 + np.exp(-z))


def silu(z):
    return z * _sigmoid(z)


def silu_grad(z):
    """silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z)."""
    s = _sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _activation(z, name):
    """act(z) for ``name`` in ACTIVATIONS (normops.core)."""
    if name == "none":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "silu":
        return silu(z)
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
        return silu_grad(z)
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


def rstd_of(var, eps):
    """1 / sqrt(var + eps); a zero sum gives inf and a negative one nan, quietly."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 / np.sqrt(var + eps)


def _x_hat(x, mean, rstd):
    return (x if mean is None else x - mean) * rstd


def _affine(x_hat, weight, bias):
    z = x_hat if weight is None else x_hat * weight
    return z if bias is None else z + bias


def normalize_forward(x, axes, mean, rstd, weight=None, bias=None, activation="none", x_hat_dtype=None):
    """y = act(round(x_hat) * w + b) with x_hat = (x - mean) * rstd (mean None: RMS).

    ``mean``/``rstd`` are keepdims over ``axes``; ``weight``/``bias`` broadcast against x.
    ``x_hat_dtype``: the torch dtype x_hat is rounded to (``round_to``) before the affine; None: not rounded.
    """
    x_hat = round_to(_x_hat(x, mean, rstd), x_hat_dtype)
    return _activation(_affine(x_hat, weight, bias), activation)


def normalize_backward(dy, x, axes, mean, rstd, weight=None, bias=None, activation="none",
                       stats_from_x=True, x_hat_dtype=None):
    """(dx, dweight, dbias) for ``normalize_forward``; see the module docstring for the VJPs.

    ``stats_from_x=False`` treats mean/rstd as constants (BatchNorm eval): dx = g * rstd.
    ``x_hat_dtype``: the forward's rounding, straight-through for dx (its derivative taken as 1),
    but z and dw use x_hat as rounded, the value the forward multiplied w by (row_norm.py).
    dweight/dbias have weight's/bias's (broadcast) shape, or are None when those are None.
    """
    x_hat = _x_hat(x, mean, rstd)
    x_hat_r = round_to(x_hat, x_hat_dtype)
    if activation != "none":
        dy = dy * _activation_grad(_affine(x_hat_r, weight, bias), activation)
    g = dy if weight is None else dy * weight
    if not stats_from_x:
        dx = g * rstd
    elif mean is None:  # RMS: x_hat_i = x_i * rstd, only the rstd path couples elements
        dx = rstd * (g - x_hat * _mean(g * x_hat, axes))
    else:  # mean path (-mean(g)) and rstd path (-x_hat * mean(g * x_hat))
        dx = rstd * (g - _mean(g, axes) - x_hat * _mean(g * x_hat, axes))
    dw = None if weight is None else _sum_to(dy * x_hat_r, weight.shape)
    db = None if bias is None else _sum_to(dy, bias.shape)
    return dx, dw, db


def per_channel(p, shape):
    """A per-channel parameter [C] reshaped to ``shape`` to broadcast along its channel axis."""
    return None if p is None else p.reshape(shape)


# --------------------------------------------------------------------------- rounding
def _round_bfloat16(f32):
    """float32 ndarray -> the nearest bfloat16 (ties to even), as a float32 ndarray."""
    bits = f32.view(np.uint32)
    ties_to_even = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = (bits + np.uint32(0x7FFF) + ties_to_even) & np.uint32(0xFFFF0000)
    return np.where(np.isnan(f32), f32, rounded.view(np.float32))


def round_to(a, dtype):
    """float64 ndarray ``a`` rounded to torch ``dtype`` (via float32, as torch converts), as float64.

    ``dtype`` None or float64: ``a`` unchanged.
    """
    if dtype is None or dtype == torch.float64:
        return a
    # past the target's range: inf, as torch gives; a NaN's bit pattern may wrap the uint32 add
    with np.errstate(over="ignore"):
        f32 = np.asarray(a, dtype=np.float64).astype(np.float32)
        if dtype == torch.float32:
            return f32.astype(np.float64)
        if dtype == torch.float16:
            return f32.astype(np.float16).astype(np.float64)
        if dtype == torch.bfloat16:
            return _round_bfloat16(f32).astype(np.float64)
    raise TypeError(f"cannot round to {dtype}: expected a floating dtype")


# --------------------------------------------------------------------------- torch <-> NumPy
def host(t):
    """Tensor (any device, dtype, layout) -> float64 ndarray; .double() first handles bf16."""
    return None if t is None else t.detach().cpu().double().numpy()


def _t(a):
    """ndarray (or 0-d scalar result) -> CPU float64 tensor."""
    return torch.from_numpy(np.asarray(a, dtype=np.float64, order="C"))


def like(a, t):
    """ndarray -> tensor with ``t``'s dtype and device (None passes through): dweight, dbias."""
    if a is None or t is None:
        return None
    return _t(a).to(device=t.device, dtype=t.dtype)


def into(a, out):
    """Copy ndarray ``a`` into ``out``, which keeps its own memory format."""
    return out.copy_(_t(a))


def stats(a, x):
    """Statistics are float32, or float64 when x is float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return _t(a).to(device=x.device, dtype=dtype)


def masked(mask, *grads):
    """The gradients (dx, dw, db[, dgate]), one per entry of ``output_mask``, None where it says no."""
    return tuple(g if want else None for g, want in zip(grads, mask))
