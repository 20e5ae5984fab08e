"""The normops custom ops: one forward and one backward op per norm family, in ``torch.library``.

| op                               | what                                                       |
|----------------------------------|------------------------------------------------------------|
| ``normops::row_norm``            | LayerNorm / RMSNorm over the trailing dims, + residual, + act |
| ``normops::group_norm``          | GroupNorm over (C/G, *spatial); InstanceNorm is G == C      |
| ``normops::batch_norm``          | BatchNorm, batch statistics (training) or running ones      |
| ``normops::*_backward``          | their vector-Jacobian products, differentiable once more    |
| ``normops::update_running_stats``| the in-place running-average update (``mutates_args``)      |

Each op's implementation asks ``normops.backends.resolve`` which backend computes it (per call,
from the device and the user's choice), so one registration serves CPU, CUDA and the rest; meta
and fake tensors get the ``register_fake`` kernels, which is what ``torch.compile`` and
``torch.export`` trace. The ops are functional (they never write their inputs): running
statistics are updated afterwards by ``update_running_stats``, so a failed or re-run kernel can
never apply an update twice.

Autograd: the forward ops save fp32 statistics (only when a gradient is needed: the caller passes
``need_stats``) and their backward is the ``*_backward`` op. Those are differentiable too (torch.nn
supports double backward, so a drop-in must): their own backward is the vector-Jacobian product of
a differentiable torch composition of the same norm, taken with ``torch.func.vjp``. It recomputes
the statistics from x, so the saved ones need no gradient.

A custom op cannot return ``None``: an absent output (no residual, no statistics, a gradient not
asked for) is an empty tensor here and ``None`` again in ``normops.functional``.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import backends
from .backends.torch_backend import activate, memory_format_of, stat_dtype


def _absent(x, dtype=None):
    return x.new_empty(0, dtype=dtype)


def _or_absent(t, x, dtype=None):
    return _absent(x, dtype) if t is None else t


def _zero_filled(outputs):
    """Outputs for an empty input: the fake kernel's shapes, zero-filled (no backend is called)."""
    return tuple(t.zero_() for t in outputs)


# --- differentiable compositions, for the double backward ---------------------------------------

def _affine_act(x_hat, x, weight, bias, activation, channel_dim):
    shape = [1] * x.dim()
    if channel_dim is not None:
        shape[channel_dim] = -1
    z = x_hat
    if weight is not None:
        z = z * (weight.reshape(shape) if channel_dim is not None else weight)
    if bias is not None:
        z = z + (bias.reshape(shape) if channel_dim is not None else bias)
    return activate(z, activation)


def _normalize(x, dims, eps, rms=False):
    if rms:
        return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    xc = x - x.mean(dims, keepdim=True)
    return xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)


def _row_composite(x, weight, bias, normalized_shape, eps, rms, activation):
    dims = tuple(range(-len(normalized_shape), 0))
    return _affine_act(_normalize(x, dims, eps, rms), x, weight, bias, activation, None)


def _group_composite(x, weight, bias, num_groups, eps, activation):
    xg = x.reshape(x.shape[0], num_groups, -1)
    x_hat = _normalize(xg, (2,), eps).reshape(x.shape)
    return _affine_act(x_hat, x, weight, bias, activation, 1)


def _batch_composite(x, weight, bias, running_mean, running_var, training, eps, activation):
    if training:
        dims = tuple(d for d in range(x.dim()) if d != 1)
        x_hat = _normalize(x, dims, eps)
    else:
        shape = [1, -1] + [1] * (x.dim() - 2)
        x_hat = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine_act(x_hat, x, weight, bias, activation, 1)


def _double_backward(composite, dy, x, weight, bias, cotangents):
    """Gradients of (dy, x, weight, bias) -> vjp(composite at x, weight, bias)(dy), against the
    cotangents (grad of dx, dweight, dbias). Computed in the statistics dtype, returned in each
    input's dtype; ``None`` for weight/bias that are absent."""
    sd = stat_dtype(x)
    present = [t for t in (weight, bias) if t is not None]

    def params(ps):
        it = iter(ps)
        return [next(it) if t is not None else None for t in (weight, bias)]

    def first(dy_, x_, *ps):
        _, vjp = torch.func.vjp(lambda xx, *pp: composite(xx, *params(pp)), x_, *ps)
        return vjp(dy_)

    primals = [dy.to(sd), x.to(sd)] + [p.to(sd) for p in present]
    _, vjp2 = torch.func.vjp(first, *primals)
    cots = []
    for t, g in zip([x] + present, [cotangents[0]] + [c for c, p in zip(cotangents[1:], (weight, bias)) if p is not None]):
        cots.append(g.to(sd) if g is not None and g.numel() == t.numel() and g.numel() else torch.zeros(t.shape, dtype=sd, device=t.device))
    grads = vjp2(tuple(cots))
    gdy, gx = grads[0].to(dy.dtype), grads[1].to(x.dtype)
    gp = params([g.to(p.dtype) for g, p in zip(grads[2:], present)])
    return gdy, gx, gp[0], gp[1]


# --- LayerNorm / RMSNorm -----------------------------------------------------------------------

@torch.library.custom_op("normops::row_norm", mutates_args=())
def row_norm(x: Tensor, residual: Optional[Tensor], normalized_shape: Sequence[int],
             weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
             activation: str, need_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x [+ residual]) * w + b) over the trailing ``normalized_shape`` dims.
    Returns (y, x + residual or absent, mean or absent, rstd or absent)."""
    if x.numel() == 0:
        return _zero_filled(_row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats))
    y, h, mean, rstd = backends.resolve(x).row_norm_fwd(
        x, residual, tuple(normalized_shape), weight, bias, eps, rms, activation, need_stats)
    sd = stat_dtype(x)
    return (y.contiguous(), _or_absent(h, x).contiguous(), _or_absent(mean, x, sd), _or_absent(rstd, x, sd))


@row_norm.register_fake
def _row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    batch = x.shape[: x.dim() - len(normalized_shape)]
    sd = stat_dtype(x)
    h = x.new_empty(x.shape) if residual is not None else _absent(x)
    mean = x.new_empty(batch, dtype=sd) if need_stats and not rms else _absent(x, sd)
    rstd = x.new_empty(batch, dtype=sd) if need_stats else _absent(x, sd)
    return x.new_empty(x.shape), h, mean, rstd


@torch.library.custom_op("normops::row_norm_backward", mutates_args=())
def row_norm_backward(dy: Tensor, x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                      bias: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor, eps: float, rms: bool,
                      activation: str, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of row_norm, from the saved statistics (x is x + residual when fused)."""
    if x.numel() == 0:
        return _zero_filled(_row_norm_backward_fake(dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask))
    dx, dw, db = backends.resolve(x).row_norm_bwd(
        dy, x, tuple(normalized_shape), weight, bias, mean, rstd, rms, activation, list(output_mask))
    return _or_absent(dx, x).contiguous(), _or_absent(dw, x), _or_absent(db, x)


@row_norm_backward.register_fake
def _row_norm_backward_fake(dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask):
    return _grads_fake(x, weight, bias, output_mask, torch.contiguous_format)


def _grads_fake(x, weight, bias, output_mask, memory_format):
    dx = torch.empty_like(x, memory_format=memory_format) if output_mask[0] else _absent(x)
    dw = torch.empty_like(weight) if output_mask[1] and weight is not None else _absent(x)
    db = torch.empty_like(bias) if output_mask[2] and bias is not None else _absent(x)
    return dx, dw, db


def _row_norm_setup(ctx, inputs, output):
    x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats = inputs
    _, h, mean, rstd = output
    ctx.cfg = (tuple(normalized_shape), eps, rms, activation)
    ctx.has_residual = residual is not None
    if need_stats:
        ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
    ctx.saved_stats = need_stats


def _row_norm_bwd(ctx, dy, dh, _dmean, _drstd):
    need = ctx.needs_input_grad
    if not ctx.saved_stats:
        raise RuntimeError("normops::row_norm ran with need_stats=False, so its backward has no statistics")
    x, weight, bias, mean, rstd = ctx.saved_tensors
    normalized_shape, eps, rms, activation = ctx.cfg
    mask = [need[0] or need[1], need[3], need[4]]
    dx, dw, db = row_norm_backward(dy, x, normalized_shape, weight, bias, None if rms else mean, rstd,
                                   eps, rms, activation, mask)
    dx = dx if mask[0] else None
    if ctx.has_residual and dx is not None and dh is not None:
        dx = dx + dh
    return (dx if need[0] else None, dx if need[1] else None, None,
            dw if mask[1] else None, db if mask[2] else None, None, None, None, None)


def _row_norm_backward_setup(ctx, inputs, output):
    dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask = inputs
    ctx.cfg = (tuple(normalized_shape), eps, rms, activation)
    ctx.save_for_backward(dy, x, weight, bias)


def _row_norm_double_bwd(ctx, gdx, gdw, gdb):
    dy, x, weight, bias = ctx.saved_tensors
    normalized_shape, eps, rms, activation = ctx.cfg

    def composite(x_, w_, b_):
        return _row_composite(x_, w_, b_, normalized_shape, eps, rms, activation)

    gdy, gx, gw, gb = _double_backward(composite, dy, x, weight, bias, (gdx, gdw, gdb))
    return gdy, gx, None, gw, gb, None, None, None, None, None, None


row_norm.register_autograd(_row_norm_bwd, setup_context=_row_norm_setup)
row_norm_backward.register_autograd(_row_norm_double_bwd, setup_context=_row_norm_backward_setup)


# --- GroupNorm / InstanceNorm ------------------------------------------------------------------

@torch.library.custom_op("normops::group_norm", mutates_args=())
def group_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
               activation: str, need_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b), statistics per (sample, group of C/G channels). (y, mean, rstd)."""
    if x.numel() == 0:
        return _zero_filled(_group_norm_fake(x, weight, bias, num_groups, eps, activation, need_stats))
    y, mean, rstd = backends.resolve(x).group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats)
    sd = stat_dtype(x)
    return y.contiguous(memory_format=memory_format_of(x)), _or_absent(mean, x, sd), _or_absent(rstd, x, sd)


@group_norm.register_fake
def _group_norm_fake(x, weight, bias, num_groups, eps, activation, need_stats):
    sd = stat_dtype(x)
    stats = (x.shape[0], num_groups) if need_stats else (0,)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


@torch.library.custom_op("normops::group_norm_backward", mutates_args=())
def group_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                        rstd: Tensor, num_groups: int, eps: float, activation: str,
                        output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of group_norm, from the saved statistics."""
    if x.numel() == 0:
        return _zero_filled(_group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask))
    dx, dw, db = backends.resolve(x).group_norm_bwd(
        dy, x, num_groups, weight, bias, mean, rstd, activation, list(output_mask))
    return _or_absent(dx, x).contiguous(memory_format=memory_format_of(x)), _or_absent(dw, x), _or_absent(db, x)


@group_norm_backward.register_fake
def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask):
    return _grads_fake(x, weight, bias, output_mask, memory_format_of(x))


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, need_stats = inputs
    _, mean, rstd = output
    ctx.cfg = (num_groups, eps, activation)
    ctx.saved_stats = need_stats
    if need_stats:
        ctx.save_for_backward(x, weight, bias, mean, rstd)


def _group_norm_bwd(ctx, dy, _dmean, _drstd):
    if not ctx.saved_stats:
        raise RuntimeError("normops::group_norm ran with need_stats=False, so its backward has no statistics")
    need = ctx.needs_input_grad
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps, activation = ctx.cfg
    mask = [need[0], need[1], need[2]]
    dx, dw, db = group_norm_backward(dy, x, weight, bias, mean, rstd, num_groups, eps, activation, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None)


def _group_norm_backward_setup(ctx, inputs, output):
    dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask = inputs
    ctx.cfg = (num_groups, eps, activation)
    ctx.save_for_backward(dy, x, weight, bias)


def _group_norm_double_bwd(ctx, gdx, gdw, gdb):
    dy, x, weight, bias = ctx.saved_tensors
    num_groups, eps, activation = ctx.cfg

    def composite(x_, w_, b_):
        return _group_composite(x_, w_, b_, num_groups, eps, activation)

    gdy, gx, gw, gb = _double_backward(composite, dy, x, weight, bias, (gdx, gdw, gdb))
    return gdy, gx, gw, gb, None, None, None, None, None, None


group_norm.register_autograd(_group_norm_bwd, setup_context=_group_norm_setup)
group_norm_backward.register_autograd(_group_norm_double_bwd, setup_context=_group_norm_backward_setup)


# --- BatchNorm ---------------------------------------------------------------------------------

@torch.library.custom_op("normops::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
               running_var: Optional[Tensor], training: bool, eps: float,
               activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b) per channel (dim 1). (y, save_mean, save_rstd, unbiased batch var);
    the last three are absent when not training (the running statistics normalize)."""
    if x.numel() == 0:
        return _zero_filled(_batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps, activation))
    y, save_mean, save_rstd, batch_var = backends.resolve(x).batch_norm_fwd(
        x, weight, bias, running_mean, running_var, training, eps, activation)
    sd = stat_dtype(x)
    return (y.contiguous(memory_format=memory_format_of(x)), _or_absent(save_mean, x, sd),
            _or_absent(save_rstd, x, sd), _or_absent(batch_var, x, sd))


@batch_norm.register_fake
def _batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps, activation):
    sd = stat_dtype(x)
    stats = (x.shape[1],) if training else (0,)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


@torch.library.custom_op("normops::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        running_mean: Optional[Tensor], running_var: Optional[Tensor],
                        save_mean: Optional[Tensor], save_rstd: Optional[Tensor], training: bool, eps: float,
                        activation: str, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of batch_norm: batch statistics (training) or constant running ones."""
    if x.numel() == 0:
        return _zero_filled(_batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean,
                                                      save_rstd, training, eps, activation, output_mask))
    dx, dw, db = backends.resolve(x).batch_norm_bwd(
        dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps, activation,
        list(output_mask))
    return _or_absent(dx, x).contiguous(memory_format=memory_format_of(x)), _or_absent(dw, x), _or_absent(db, x)


@batch_norm_backward.register_fake
def _batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training,
                              eps, activation, output_mask):
    return _grads_fake(x, weight, bias, output_mask, memory_format_of(x))


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps, activation = inputs
    _, save_mean, save_rstd, _ = output
    ctx.cfg = (training, eps, activation)
    if any(ctx.needs_input_grad[:3]):
        if training:
            ctx.save_for_backward(x, weight, bias, None, None, save_mean, save_rstd)
        else:  # a clone: the caller may update these buffers in place before backward runs
            ctx.save_for_backward(x, weight, bias, running_mean.clone(), running_var.clone(), None, None)


def _batch_norm_bwd(ctx, dy, _dmean, _drstd, _dvar):
    need = ctx.needs_input_grad
    x, weight, bias, running_mean, running_var, save_mean, save_rstd = ctx.saved_tensors
    training, eps, activation = ctx.cfg
    mask = [need[0], need[1], need[2]]
    dx, dw, db = batch_norm_backward(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                                     training, eps, activation, mask)
    return dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None, None


def _batch_norm_backward_setup(ctx, inputs, output):
    dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps, activation, _ = inputs
    ctx.cfg = (training, eps, activation)
    ctx.save_for_backward(dy, x, weight, bias, running_mean, running_var)


def _batch_norm_double_bwd(ctx, gdx, gdw, gdb):
    dy, x, weight, bias, running_mean, running_var = ctx.saved_tensors
    training, eps, activation = ctx.cfg
    sd = stat_dtype(x)

    def composite(x_, w_, b_):
        rm = None if training else running_mean.to(sd)
        rv = None if training else running_var.to(sd)
        return _batch_composite(x_, w_, b_, rm, rv, training, eps, activation)

    gdy, gx, gw, gb = _double_backward(composite, dy, x, weight, bias, (gdx, gdw, gdb))
    return gdy, gx, gw, gb, None, None, None, None, None, None, None, None


batch_norm.register_autograd(_batch_norm_bwd, setup_context=_batch_norm_setup)
batch_norm_backward.register_autograd(_batch_norm_double_bwd, setup_context=_batch_norm_backward_setup)


@torch.library.custom_op("normops::update_running_stats", mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, for the mean and the (unbiased) var,
    computed in fp64 and stored in the buffers' dtype, as torch's CPU kernel does."""
    for running, batch in ((running_mean, mean), (running_var, var)):
        new = running.double() * (1.0 - momentum) + batch.double() * momentum
        running.copy_(new)


@update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum):
    return None


# --- AMP: under CUDA autocast, torch runs layer_norm and group_norm in fp32 (batch_norm and
# everything under CPU autocast keep the input dtype); normops does the same.
if hasattr(torch.library, "register_autocast"):
    for _op in ("normops::row_norm", "normops::group_norm"):
        torch.library.register_autocast(_op, "cuda", torch.float32)
