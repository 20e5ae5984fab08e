"""The group norms: GroupNorm over (C/G, *spatial) per sample, and InstanceNorm (G == C,
``instance``), with a fused activation: ``normops::group_norm`` and its backward.
weight and bias are [C], or [N, C]: per (sample, channel), AdaGroupNorm's modulation
(``normops.functional.ada_group_norm``), whose gradients are then [N, C] too.

A new group-norm variant is a field of ``GroupNormSpec`` (its flag), a parameter of the two ops
(the schema is the implementations' annotations), the backends' and kernel's flag, and its
functional/nn entry.
"""
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..core import activate, stat_dtype, suggested_format


@dataclasses.dataclass(frozen=True)
class GroupNormSpec:
    """The non-tensor arguments of a group norm."""
    num_groups: int
    eps: float
    activation: str = "none"  # a name of normops.core.ACTIVATIONS
    instance: bool = False    # instance_norm's call: a constant channel with eps = 0 gives rstd 0, not NaN
    casting: str = "fp32"     # "torch": x_hat, x_hat * w, + b each rounded to x's dtype (ada_group_norm's)


def _run(module, x, weight, bias, num_groups, eps, activation, instance, casting, need_stats):
    if x.numel() == 0:
        return ops.zero_filled(_group_norm_fake(x, weight, bias, num_groups, eps, activation, instance, casting,
                                                need_stats))
    weight, bias = ops.dense(weight, bias)
    y, mean, rstd = module.group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance, casting)
    sd = stat_dtype(x)
    return y.contiguous(memory_format=suggested_format(x)), ops.or_absent(mean, x, sd), ops.or_absent(rstd, x, sd)


def _group_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                     activation: str, instance: bool, casting: str, need_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b), statistics per (sample, group of C/G channels). (y, mean, rstd).
    ``instance``: instance_norm's call (num_groups == C), whose constant channel with eps = 0 gives
    rstd 0 (torch's batch-norm statistics), where group_norm's gives NaN, even with G == C.
    ``casting``: GroupNormSpec's."""
    how = _route(x, num_groups, eps, activation, instance)
    return _run(how.module, x, weight, bias, num_groups, eps, activation, instance, casting, need_stats)


def _route(x, num_groups, eps, activation, instance=False):
    """The route of a group-norm call on x (``ops.route``), forward or backward."""
    return ops.route("group_norm", x, GroupNormSpec(num_groups, eps, activation, instance))


group_norm_op = ops.register("group_norm", _group_norm_impl,
                             route_of=lambda x, _w, _b, *spec_need_stats: _route(x, *spec_need_stats[:4]))


@group_norm_op.register_fake
def _group_norm_fake(x, weight, bias, num_groups, eps, activation, instance, casting, need_stats):
    sd = stat_dtype(x)
    stats = (x.shape[0], num_groups) if need_stats else (0,)
    return (torch.empty_like(x, memory_format=suggested_format(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


def _group_norm_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                              rstd: Tensor, num_groups: int, eps: float, activation: str,
                              output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of group_norm, from the saved statistics."""
    if x.numel() == 0:
        return ops.zero_filled(_group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation,
                                                         output_mask))
    weight, bias, mean, rstd = ops.dense(weight, bias, mean, rstd)
    how = _route(x, num_groups, eps, activation)
    dx, dw, db = how.module.group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, list(output_mask))
    return ops.dx_as(dx, x, suggested_format(x)), ops.or_absent(dw, x), ops.or_absent(db, x)


group_norm_backward_op = ops.register("group_norm_backward", _group_norm_backward_impl,
                                      route_of=lambda _dy, x, _w, _b, _m, _r, *spec_mask: _route(x, *spec_mask[:3]))


@group_norm_backward_op.register_fake
def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask):
    return ops.grads_fake(x, weight, bias, output_mask, suggested_format(x))


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, instance, casting, need_stats = inputs
    _, mean, rstd = output
    ops.no_grad_outputs(ctx, mean, rstd)
    ctx.spec = GroupNormSpec(num_groups, eps, activation, instance, casting)
    ctx.saved_stats = need_stats
    if need_stats:
        ctx.save_for_backward(x, weight, bias, mean, rstd)


def _group_norm_bwd(ctx, dy, _dmean, _drstd):
    if dy is None:
        return ops.input_grads(_group_norm_impl)
    if not ctx.saved_stats:
        raise RuntimeError("normops::group_norm ran with need_stats=False, so its backward has no statistics")
    need = ctx.needs_input_grad
    x, weight, bias, mean, rstd = ctx.saved_tensors
    s = ctx.spec
    mask = [need[0], need[1], need[2]]
    dx, dw, db = ops.call_backward(ctx, group_norm_backward_op, _group_norm_backward_impl,
                                   dy, x, weight, bias, mean, rstd, s.num_groups, s.eps, s.activation, mask)
    return ops.input_grads(_group_norm_impl, x=dx if mask[0] else None, weight=dw if mask[1] else None,
                           bias=db if mask[2] else None)


def _group_norm_backward_setup(ctx, inputs, output):
    dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask = inputs
    ctx.spec = GroupNormSpec(num_groups, eps, activation)
    ctx.save_for_backward(dy, x, weight, bias)


def _composite(spec, x, weight, bias):
    x_hat = ops.normalize(x.reshape(x.shape[0], spec.num_groups, -1), (2,), spec.eps).reshape(x.shape)
    if spec.casting == "torch":  # each step in x's dtype, as diffusers' AdaGroupNorm (weight, bias [C] or [N, C])
        y = x_hat.to(x.dtype)
        for p in (weight, bias):
            if p is not None:
                p = p.to(x.dtype).reshape(p.shape + (1,) * (x.dim() - 2))
                y = y * p if p is weight else y + p
        return activate(y, spec.activation)
    if any(p is not None and p.dim() == 2 for p in (weight, bias)):  # per (sample, channel): [N, C]
        view = x.shape[:2] + (1,) * (x.dim() - 2)
        weight, bias = (None if p is None else p.reshape(view) for p in (weight, bias))
        return ops.affine_act(x_hat, x, weight, bias, spec.activation, None)
    return ops.affine_act(x_hat, x, weight, bias, spec.activation, 1)


# AMP: under CUDA autocast, torch runs group_norm in fp32 (everything under CPU autocast keeps the
# input dtype); normops does the same.
ops.register_autograd(group_norm_op, _group_norm_setup, _group_norm_bwd, group_norm_backward_op,
                      _group_norm_backward_setup, _composite, autocast=torch.float32)
_GroupNorm = ops.function("GroupNorm", _run, _group_norm_setup, _group_norm_bwd)


def group_norm(spec, x, weight, bias, need_stats, how=None):
    """normops::group_norm on route ``how`` (``ops.route``'s, asked here when not given): (y, mean,
    rstd), each absent one an empty tensor. ``need_stats``: a gradient is needed."""
    args = (x, weight, bias, spec.num_groups, spec.eps, spec.activation, spec.instance, spec.casting, need_stats)
    return ops.call(group_norm_op, _GroupNorm, _run, args, need_stats, how or ops.route("group_norm", x, spec, args))
