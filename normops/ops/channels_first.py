"""The channels-first LayerNorm (ConvNeXt's ``LayerNorm(data_format="channels_first")``, timm's
LayerNorm2d): dim 1 (C) of an (N, C, *) tensor normalized, with a per-channel weight and bias and a
fused activation, the output in x's layout (NCHW or channels_last): ``normops::layer_norm_channels_first``
and its backward. Statistics are [N, *S]. The Triton kernels read either layout in place (no permuted
copy); the torch backend runs ATen's LayerNorm on the channels-last view, in place for channels_last
input, through permuted copies for NCHW (faster on the CPU than reducing over dim 1: torch_backend.py).

Registered as the row and group norms are (``normops.ops``): the eager fast path through a plain
autograd.Function, the op for anything traced, a double backward through the composition.
"""
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..core import stat_dtype, suggested_format


@dataclasses.dataclass(frozen=True)
class ChannelsFirstSpec:
    """The non-tensor arguments of a channels-first LayerNorm."""
    eps: float
    activation: str = "none"  # a name of normops.core.ACTIVATIONS


def _run(module, x, weight, bias, eps, activation, need_stats):
    if x.numel() == 0:
        return ops.zero_filled(_layer_norm_cf_fake(x, weight, bias, eps, activation, need_stats))
    weight, bias = ops.dense(weight, bias)
    y, mean, rstd = module.layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats)
    sd = stat_dtype(x)
    return y.contiguous(memory_format=suggested_format(x)), ops.or_absent(mean, x, sd), ops.or_absent(rstd, x, sd)


def _layer_norm_cf_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, activation: str,
                        need_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y = act((x - mean_C) * rstd_C * w + b) over dim 1 of (N, C, *). (y, mean, rstd)."""
    return _run(_route(x).module, x, weight, bias, eps, activation, need_stats)


def _route(x, *_):
    """The route of a channels-first call on x (``ops.route``), forward or backward."""
    return ops.route("channels_first", x)


layer_norm_cf_op = ops.register("layer_norm_channels_first", _layer_norm_cf_impl, route_of=_route)


@layer_norm_cf_op.register_fake
def _layer_norm_cf_fake(x, weight, bias, eps, activation, need_stats):
    sd = stat_dtype(x)
    stats = (x.shape[0],) + tuple(x.shape[2:]) if need_stats else (0,)
    return (torch.empty_like(x, memory_format=suggested_format(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


def _layer_norm_cf_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                 mean: Tensor, rstd: Tensor, eps: float, activation: str,
                                 output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of layer_norm_channels_first, from the saved statistics."""
    if x.numel() == 0:
        return ops.zero_filled(_layer_norm_cf_backward_fake(dy, x, weight, bias, mean, rstd, eps, activation,
                                                            output_mask))
    weight, bias, mean, rstd = ops.dense(weight, bias, mean, rstd)
    dx, dw, db = _route(x).module.layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, list(output_mask))
    return ops.dx_as(dx, x, suggested_format(x)), ops.or_absent(dw, x), ops.or_absent(db, x)


layer_norm_cf_backward_op = ops.register("layer_norm_channels_first_backward", _layer_norm_cf_backward_impl,
                                         route_of=lambda _dy, x, *_: _route(x))


@layer_norm_cf_backward_op.register_fake
def _layer_norm_cf_backward_fake(dy, x, weight, bias, mean, rstd, eps, activation, output_mask):
    return ops.grads_fake(x, weight, bias, output_mask, suggested_format(x))


def _setup(ctx, inputs, output):
    x, weight, bias, eps, activation, need_stats = inputs
    _, mean, rstd = output
    ops.no_grad_outputs(ctx, mean, rstd)
    ctx.spec = ChannelsFirstSpec(eps, activation)
    ctx.saved_stats = need_stats
    if need_stats:
        ctx.save_for_backward(x, weight, bias, mean, rstd)


def _bwd(ctx, dy, _dmean, _drstd):
    if dy is None:
        return ops.input_grads(_layer_norm_cf_impl)
    if not ctx.saved_stats:
        raise RuntimeError("normops::layer_norm_channels_first ran with need_stats=False, so its backward has no "
                           "statistics")
    need = ctx.needs_input_grad
    x, weight, bias, mean, rstd = ctx.saved_tensors
    mask = [need[0], need[1], need[2]]
    dx, dw, db = ops.call_backward(ctx, layer_norm_cf_backward_op, _layer_norm_cf_backward_impl,
                                   dy, x, weight, bias, mean, rstd, ctx.spec.eps, ctx.spec.activation, mask)
    return ops.input_grads(_layer_norm_cf_impl, x=dx if mask[0] else None, weight=dw if mask[1] else None,
                           bias=db if mask[2] else None)


def _backward_setup(ctx, inputs, output):
    dy, x, weight, bias, mean, rstd, eps, activation, output_mask = inputs
    ctx.spec = ChannelsFirstSpec(eps, activation)
    ctx.save_for_backward(dy, x, weight, bias)


def composite(spec, x, weight, bias):
    """The differentiable torch composition (dim 1 normalized, no permute): the double backward's
    and the torch.func transforms' (normops.functional)."""
    return ops.affine_act(ops.normalize(x, (1,), spec.eps), x, weight, bias, spec.activation, 1)


# AMP: under CUDA autocast, torch runs layer_norm in fp32; normops does the same.
ops.register_autograd(layer_norm_cf_op, _setup, _bwd, layer_norm_cf_backward_op, _backward_setup, composite,
                      autocast=torch.float32)
_LayerNormCF = ops.function("LayerNormChannelsFirst", _run, _setup, _bwd)


def layer_norm_channels_first(spec, x, weight, bias, need_stats, how=None):
    """normops::layer_norm_channels_first on route ``how`` (``ops.route``'s, asked here when not
    given): (y, mean, rstd), each absent one an empty tensor. ``need_stats``: a gradient is needed."""
    args = (x, weight, bias, spec.eps, spec.activation, need_stats)
    return ops.call(layer_norm_cf_op, _LayerNormCF, _run, args, need_stats,
                    how or ops.route("channels_first", x, spec, args))
