"""The batch norms: BatchNorm per channel (dim 1), with batch statistics (training) or the
running ones, and a fused activation: ``normops::batch_norm`` and its backward. The running
statistics are updated afterwards by ``normops::update_running_stats`` (``normops.ops``);
SyncBatchNorm's cross-rank statistics are ``normops.sync_batch_norm``.

A new batch-norm variant is a field of ``BatchNormSpec`` (its flag), a parameter of the two ops
(the schema is the implementations' annotations), the backends' and kernel's flag, and its
functional/nn entry.
"""
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..core import memory_format_of, stat_dtype


@dataclasses.dataclass(frozen=True)
class BatchNormSpec:
    """The non-tensor arguments of a batch norm."""
    training: bool            # batch statistics normalize (else the running ones)
    eps: float
    activation: str = "none"  # a name of normops.core.ACTIVATIONS


def _run(module, x, weight, bias, running_mean, running_var, training, eps, activation):
    if x.numel() == 0:
        return ops.zero_filled(_batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps, activation))
    weight, bias, running_mean, running_var = ops.dense(weight, bias, running_mean, running_var)
    y, save_mean, save_rstd, batch_var = module.batch_norm_fwd(
        x, weight, bias, running_mean, running_var, training, eps, activation)
    sd = stat_dtype(x)
    return (y.contiguous(memory_format=memory_format_of(x)), ops.or_absent(save_mean, x, sd),
            ops.or_absent(save_rstd, x, sd), ops.or_absent(batch_var, x, sd))


def _batch_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], training: bool, eps: float,
                     activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b) per channel (dim 1). (y, save_mean, save_rstd, unbiased batch var);
    the last three are absent when not training (the running statistics normalize)."""
    return _run(_route(x).module, x, weight, bias, running_mean, running_var, training, eps,
                activation)


def _route(x, *_):
    """The route of a batch-norm call on x (``ops.route``), forward or backward."""
    return ops.route("batch_norm", x)


batch_norm_op = ops.register("batch_norm", _batch_norm_impl, route_of=_route)


@batch_norm_op.register_fake
def _batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps, activation):
    sd = stat_dtype(x)
    stats = (x.shape[1],) if training else (0,)
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


def _batch_norm_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                              running_mean: Optional[Tensor], running_var: Optional[Tensor],
                              save_mean: Optional[Tensor], save_rstd: Optional[Tensor], training: bool, eps: float,
                              activation: str, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of batch_norm: batch statistics (training) or constant running ones."""
    if x.numel() == 0:
        return ops.zero_filled(_batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean,
                                                         save_rstd, training, eps, activation, output_mask))
    weight, bias, running_mean, running_var, save_mean, save_rstd = ops.dense(
        weight, bias, running_mean, running_var, save_mean, save_rstd)
    dx, dw, db = _route(x).module.batch_norm_bwd(
        dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps, activation,
        list(output_mask))
    return ops.dx_as(dx, x, memory_format_of(x)), ops.or_absent(dw, x), ops.or_absent(db, x)


batch_norm_backward_op = ops.register("batch_norm_backward", _batch_norm_backward_impl,
                                      route_of=lambda dy, x, *_: _route(x))


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training,
                              eps, activation, output_mask):
    return ops.grads_fake(x, weight, bias, output_mask, memory_format_of(x))


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps, activation = inputs
    _, save_mean, save_rstd, batch_var = output
    ops.no_grad_outputs(ctx, save_mean, save_rstd, batch_var)
    ctx.spec = BatchNormSpec(training, eps, activation)
    if any(ctx.needs_input_grad[:3]):
        if training:
            ctx.save_for_backward(x, weight, bias, None, None, save_mean, save_rstd)
        else:  # a clone: the caller may update these buffers in place before backward runs
            ctx.save_for_backward(x, weight, bias, running_mean.clone(), running_var.clone(), None, None)


def _batch_norm_bwd(ctx, dy, _dmean, _drstd, _dvar):
    if dy is None:
        return ops.input_grads(_batch_norm_impl)
    need = ctx.needs_input_grad
    x, weight, bias, running_mean, running_var, save_mean, save_rstd = ctx.saved_tensors
    s = ctx.spec
    mask = [need[0], need[1], need[2]]
    dx, dw, db = ops.call_backward(ctx, batch_norm_backward_op, _batch_norm_backward_impl, dy, x, weight, bias,
                                   running_mean, running_var, save_mean, save_rstd, s.training, s.eps, s.activation,
                                   mask)
    return ops.input_grads(_batch_norm_impl, x=dx if mask[0] else None, weight=dw if mask[1] else None,
                           bias=db if mask[2] else None)


def _batch_norm_backward_setup(ctx, inputs, output):
    dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps, activation, _ = inputs
    ctx.spec = BatchNormSpec(training, eps, activation)
    ctx.save_for_backward(dy, x, weight, bias, running_mean, running_var)


def _composite(spec, x, weight, bias, running_mean, running_var):
    if spec.training:
        x_hat = ops.normalize(x, tuple(d for d in range(x.dim()) if d != 1), spec.eps)
    else:  # x in the statistics dtype: the running statistics too
        shape = [1, -1] + [1] * (x.dim() - 2)
        rm, rv = running_mean.to(x.dtype).reshape(shape), running_var.to(x.dtype).reshape(shape)
        x_hat = (x - rm) * torch.rsqrt(rv + spec.eps)
    return ops.affine_act(x_hat, x, weight, bias, spec.activation, 1)


# batch_norm keeps the input dtype under autocast, as torch's does
ops.register_autograd(batch_norm_op, _batch_norm_setup, _batch_norm_bwd, batch_norm_backward_op,
                      _batch_norm_backward_setup, _composite)
_BatchNorm = ops.function("BatchNorm", _run, _batch_norm_setup, _batch_norm_bwd)


def batch_norm(spec, x, weight, bias, running_mean, running_var, grad, how=None):
    """normops::batch_norm on route ``how`` (``ops.route``'s, asked here when not given): (y,
    save_mean, save_rstd, batch_var), each absent one an empty tensor. ``running_*`` normalize when
    not training (pass None in training). ``grad``: a gradient is needed."""
    args = (x, weight, bias, running_mean, running_var, spec.training, spec.eps, spec.activation)
    return ops.call(batch_norm_op, _BatchNorm, _run, args, grad, how or ops.route("batch_norm", x, spec, args))
