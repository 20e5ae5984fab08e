"""The row norms: LayerNorm and RMSNorm over the trailing dims, with a fused residual add
(``h = x + residual``, returned) and a fused activation: ``normops::row_norm`` and its backward.

A new row-norm variant is a field of ``RowNormSpec`` (its flag), a parameter of the two ops (the
schema is the implementations' annotations), the backends' and kernel's flag, and its
functional/nn entry.
"""
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..core import stat_dtype, suggested_format


@dataclasses.dataclass(frozen=True)
class RowNormSpec:
    """The non-tensor arguments of a row norm."""
    normalized_shape: tuple  # the trailing dims normalized over
    eps: float
    rms: bool = False        # RMSNorm: no mean subtracted, no bias
    activation: str = "none"  # a name of normops.core.ACTIVATIONS


def _run(module, x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    if x.numel() == 0:
        return ops.zero_filled(_row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation,
                                              need_stats))
    weight, bias = ops.dense(weight, bias)
    y, h, mean, rstd = module.row_norm_fwd(
        x, residual, tuple(normalized_shape), weight, bias, eps, rms, activation, need_stats)
    if h is not None:
        h = _laid_out_as_sum(h, x, residual)
    sd = stat_dtype(x)
    y = y.contiguous(memory_format=_row_norm_format(x if h is None else h, rms))
    return y, ops.or_absent(h, x), ops.or_absent(mean, x, sd), ops.or_absent(rstd, x, sd)


def _row_norm_impl(x: Tensor, residual: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
                   activation: str, need_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x [+ residual]) * w + b) over the trailing ``normalized_shape`` dims.
    Returns (y, x + residual or absent, mean or absent, rstd or absent)."""
    return _run(_route(x).module, x, residual, normalized_shape, weight, bias, eps, rms, activation,
                need_stats)


def _route(x, *_):
    """The route of a row-norm call on x (``ops.route``), forward or backward."""
    return ops.route("row_norm", x)


def _row_norm_format(inp, rms):
    """The memory format of torch's result: layer_norm's is contiguous, rms_norm's the input's
    suggested format (ATen allocates it so)."""
    return suggested_format(inp) if rms else torch.contiguous_format


def _laid_out_as_sum(h, x, residual):
    """h (= x + residual) in the strides torch gives x + residual: TensorIterator orders the dims
    as the operands' strides do (x's first), so a channels_last or transposed x gives such an h."""
    if x.is_contiguous() and residual.is_contiguous():
        return h.contiguous()
    meta = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta") for t in (x, residual)]
    strides = (meta[0] + meta[1]).stride()
    if h.stride() == strides:
        return h
    return torch.empty_strided(h.shape, strides, dtype=h.dtype, device=h.device).copy_(h)


row_norm_op = ops.register("row_norm", _row_norm_impl, route_of=_route)


@row_norm_op.register_fake
def _row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    batch = x.shape[: x.dim() - len(normalized_shape)]
    sd = stat_dtype(x)
    h = torch.empty_like(x + residual) if residual is not None else ops.absent(x)  # torch's layout of the sum
    mean = x.new_empty(batch, dtype=sd) if need_stats and not rms else ops.absent(x, sd)
    rstd = x.new_empty(batch, dtype=sd) if need_stats else ops.absent(x, sd)
    inp = x if residual is None else h
    y = torch.empty_like(inp, memory_format=_row_norm_format(inp, rms))
    return y, h, mean, rstd


def _row_norm_backward_impl(dy: Tensor, x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                            bias: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor, eps: float, rms: bool,
                            activation: str, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of row_norm, from the saved statistics (x is x + residual when fused)."""
    if x.numel() == 0:
        return ops.zero_filled(_row_norm_backward_fake(dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms,
                                                       activation, output_mask))
    weight, bias, mean, rstd = ops.dense(weight, bias, mean, rstd)
    dx, dw, db = _route(x).module.row_norm_bwd(
        dy, x, tuple(normalized_shape), weight, bias, mean, rstd, rms, activation, list(output_mask))
    return ops.or_absent(dx, x).contiguous(), ops.or_absent(dw, x), ops.or_absent(db, x)


row_norm_backward_op = ops.register("row_norm_backward", _row_norm_backward_impl,
                                    route_of=lambda dy, x, *_: _route(x))


@row_norm_backward_op.register_fake
def _row_norm_backward_fake(dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask):
    return ops.grads_fake(x, weight, bias, output_mask, torch.contiguous_format)


def _row_norm_setup(ctx, inputs, output):
    x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats = inputs
    _, h, mean, rstd = output
    ops.no_grad_outputs(ctx, mean, rstd, *([] if residual is not None else [h]))
    ctx.spec = RowNormSpec(tuple(normalized_shape), eps, rms, activation)
    ctx.has_residual = residual is not None
    if need_stats:
        ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd)
    ctx.saved_stats = need_stats


def _row_norm_bwd(ctx, dy, dh, _dmean, _drstd):
    need = ctx.needs_input_grad
    if not ctx.saved_stats:
        raise RuntimeError("normops::row_norm ran with need_stats=False, so its backward has no statistics")
    x, weight, bias, mean, rstd = ctx.saved_tensors
    s = ctx.spec
    mask = [need[0] or need[1], need[3], need[4]]
    if dy is None:  # only x + residual was used
        return ops.input_grads(_row_norm_impl, x=dh if need[0] else None, residual=dh if need[1] else None)
    dx, dw, db = ops.call_backward(ctx, row_norm_backward_op, _row_norm_backward_impl, dy, x, s.normalized_shape,
                                   weight, bias, None if s.rms else mean, rstd, s.eps, s.rms, s.activation, mask)
    dx = dx if mask[0] else None
    if ctx.has_residual and dx is not None and dh is not None:
        dx = dx + dh
    return ops.input_grads(_row_norm_impl, x=dx if need[0] else None, residual=dx if need[1] else None,
                           weight=dw if mask[1] else None, bias=db if mask[2] else None)


def _row_norm_backward_setup(ctx, inputs, output):
    dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask = inputs
    ctx.spec = RowNormSpec(tuple(normalized_shape), eps, rms, activation)
    ctx.save_for_backward(dy, x, weight, bias)


def _composite(spec, x, weight, bias):
    dims = tuple(range(-len(spec.normalized_shape), 0))
    return ops.affine_act(ops.normalize(x, dims, spec.eps, spec.rms), x, weight, bias, spec.activation, None)


# AMP: under CUDA autocast, torch runs layer_norm in fp32 (everything under CPU autocast keeps the
# input dtype); normops does the same.
ops.register_autograd(row_norm_op, _row_norm_setup, _row_norm_bwd, row_norm_backward_op, _row_norm_backward_setup,
                      _composite, autocast=torch.float32)
_RowNorm = ops.function("RowNorm", _run, _row_norm_setup, _row_norm_bwd)


def row_norm(spec, x, residual, weight, bias, need_stats, how=None):
    """normops::row_norm on route ``how`` (``ops.route``'s, asked here when not given): (y, h, mean,
    rstd), each absent one an empty tensor. ``need_stats``: a gradient is needed."""
    args = (x, residual, list(spec.normalized_shape), weight, bias, spec.eps, spec.rms, spec.activation, need_stats)
    return ops.call(row_norm_op, _RowNorm, _run, args, need_stats, how or ops.route("row_norm", x, spec, args))
