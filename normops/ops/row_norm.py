"""The row norms: LayerNorm and RMSNorm over the trailing dims, with a fused residual add
(``h = x + residual``, returned) and a fused activation: ``normops::row_norm`` and its backward;
the language models' variants (weight offset, casting modes, out_dtype, a gate, groups: the fields
of ``RowNormSpec``), and ``normops::fused_add_rms_norm``, the in-place fused add for inference.

A new row-norm variant is a field of ``RowNormSpec`` (its flag), a parameter of the two ops (the
schema is the implementations' annotations), the backends' and kernel's flag, and its
functional/nn entry. ``normops::row_norm_quant`` (forward only, for inference) quantizes the
output to float8_e4m3fn or int8 with its scales, fused in the forward kernel.
"""
import dataclasses
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..core import MIN_QUANT_SCALE, activate, stat_dtype, suggested_format


@dataclasses.dataclass(frozen=True)
class RowNormSpec:
    """The non-tensor arguments of a row norm (the variants: ``normops/backends/__init__.py``)."""
    normalized_shape: tuple  # the trailing dims normalized over
    eps: float
    rms: bool = False        # RMSNorm: no mean subtracted, no bias
    activation: str = "none"  # a name of normops.core.ACTIVATIONS
    offset: float = 0.0      # y = x_hat * (offset + w): 1.0 for Gemma's zero-centred weight
    casting: str = "fp32"    # where x_hat is rounded: "fp32" (never), "llama" (input dtype), "t5" (weight dtype)
    out_dtype: Optional[torch.dtype] = None  # y's dtype; None: the normalized input's
    norm_before_gate: bool = True  # with a gate: y = norm(x) * silu(gate), else norm(x * silu(gate))
    group_size: int = 0      # > 0: each row normalized in groups of this many values

    def args(self):
        """The ops' non-tensor arguments after need_stats, in schema order."""
        return (self.offset, self.casting, self.out_dtype, self.norm_before_gate, self.group_size)


def _inp_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _stats_shape(x, normalized_shape, group_size):
    batch = tuple(x.shape[: x.dim() - len(normalized_shape)])
    if group_size and group_size != math.prod(normalized_shape):
        return batch + (math.prod(normalized_shape) // group_size,)
    return batch


def _run(module, x, residual, gate, normalized_shape, weight, bias, eps, rms, activation, need_stats, offset, casting,
         out_dtype, norm_before_gate, group_size):
    if x.numel() == 0:
        return ops.zero_filled(_row_norm_fake(x, residual, gate, normalized_shape, weight, bias, eps, rms, activation,
                                              need_stats, offset, casting, out_dtype, norm_before_gate, group_size))
    weight, bias = ops.dense(weight, bias)
    y, h, mean, rstd = module.row_norm_fwd(
        x, residual, tuple(normalized_shape), weight, bias, eps, rms, activation, need_stats, offset=offset,
        casting=casting, out_dtype=out_dtype, gate=gate, norm_before_gate=norm_before_gate, group_size=group_size)
    if h is not None:
        h = _laid_out_as_sum(h, x, residual)
    sd = stat_dtype(_inp_dtype(x, residual))
    y = y.contiguous(memory_format=_row_norm_format(x if h is None else h, rms))
    return y, ops.or_absent(h, x), ops.or_absent(mean, x, sd), ops.or_absent(rstd, x, sd)


def _row_norm_impl(x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool, activation: str,
                   need_stats: bool, offset: float, casting: str, out_dtype: Optional[torch.dtype],
                   norm_before_gate: bool, group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x [+ residual]) * (offset + w) + b) over the trailing ``normalized_shape`` dims,
    gated, grouped and rounded as ``RowNormSpec`` says. Returns (y, x + residual or absent, mean or
    absent, rstd or absent)."""
    return _run(_route(x).module, x, residual, gate, normalized_shape, weight, bias, eps, rms, activation,
                need_stats, offset, casting, out_dtype, norm_before_gate, group_size)


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
def _row_norm_fake(x, residual, gate, normalized_shape, weight, bias, eps, rms, activation, need_stats, offset,
                   casting, out_dtype, norm_before_gate, group_size):
    sd = stat_dtype(_inp_dtype(x, residual))
    stats = _stats_shape(x, normalized_shape, group_size)
    h = torch.empty_like(x + residual) if residual is not None else ops.absent(x)  # torch's layout of the sum
    mean = x.new_empty(stats, dtype=sd) if need_stats and not rms else ops.absent(x, sd)
    rstd = x.new_empty(stats, dtype=sd) if need_stats else ops.absent(x, sd)
    inp = x if residual is None else h
    y = torch.empty_like(inp, memory_format=_row_norm_format(inp, rms), dtype=out_dtype or inp.dtype)
    return y, h, mean, rstd


def _row_norm_backward_impl(dy: Tensor, x: Tensor, gate: Optional[Tensor], dh: Optional[Tensor],
                            normalized_shape: Sequence[int], weight: Optional[Tensor], bias: Optional[Tensor],
                            mean: Optional[Tensor], rstd: Tensor, eps: float, rms: bool, activation: str,
                            output_mask: Sequence[bool], offset: float, casting: str, norm_before_gate: bool,
                            group_size: int, dx_dtype: Optional[torch.dtype],
                            dresidual_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dgate, dresidual) of row_norm, from the saved statistics (x is
    x + residual when fused); output_mask: [dx, dweight, dbias, dgate]. With a residual, ``dh``
    (the gradient of x + residual from later layers) is added to dx, dx comes in ``dx_dtype`` and,
    when the residual's dtype differs, once more in ``dresidual_dtype`` (else dresidual is absent)."""
    args = (dy, x, gate, dh, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask, offset,
            casting, norm_before_gate, group_size, dx_dtype, dresidual_dtype)
    if x.numel() == 0:
        return ops.zero_filled(_row_norm_backward_fake(*args))
    weight, bias, mean, rstd = ops.dense(weight, bias, mean, rstd)
    module = _route(x).module
    fused = getattr(module, "FUSES_RESIDUAL_GRADS", False)
    extra = dict(dh=dh, dx_dtype=dx_dtype, dresidual_dtype=dresidual_dtype) if fused else {}
    dx, dw, db, dg, *dr = module.row_norm_bwd(
        dy, x, tuple(normalized_shape), weight, bias, mean, rstd, rms, activation, list(output_mask), offset=offset,
        casting=casting, gate=gate, norm_before_gate=norm_before_gate, group_size=group_size, **extra)
    dr = dr[0] if fused else None
    if not fused:
        dx, dr = _residual_grads(dx, dh, dx_dtype, dresidual_dtype)
    return (ops.or_absent(dx, x).contiguous(), ops.or_absent(dw, x), ops.or_absent(db, x), ops.or_absent(dg, x),
            ops.or_absent(dr, x))


def _residual_grads(dx, dh, dx_dtype, dresidual_dtype):
    """(dx + dh in dx_dtype, the same in dresidual_dtype when it differs, else None): what the
    Triton kernels write in one pass (``FUSES_RESIDUAL_GRADS``), composed for the other backends."""
    if dx is None:
        return None, None
    if dh is not None:
        dx = dx + dh
    out = dx if dx_dtype in (None, dx.dtype) else dx.to(dx_dtype)
    return out, (dx.to(dresidual_dtype) if dresidual_dtype not in (None, out.dtype) else None)


row_norm_backward_op = ops.register("row_norm_backward", _row_norm_backward_impl,
                                    route_of=lambda dy, x, *_: _route(x))


@row_norm_backward_op.register_fake
def _row_norm_backward_fake(dy, x, gate, dh, normalized_shape, weight, bias, mean, rstd, eps, rms, activation,
                            output_mask, offset, casting, norm_before_gate, group_size, dx_dtype, dresidual_dtype):
    dx, dw, db = ops.grads_fake(x, weight, bias, output_mask, torch.contiguous_format)
    if output_mask[0] and dx_dtype is not None:
        dx = dx.to(dx_dtype)
    dg = torch.empty_like(gate, memory_format=torch.contiguous_format) if gate is not None and output_mask[3] \
        else ops.absent(x)
    store_dr = output_mask[0] and dresidual_dtype is not None and dresidual_dtype != dx.dtype
    dr = torch.empty(x.shape, dtype=dresidual_dtype, device=x.device) if store_dr else ops.absent(x)
    return dx, dw, db, dg, dr


def _row_norm_setup(ctx, inputs, output):
    x, residual, gate, normalized_shape, weight, bias, eps, rms, activation, need_stats, *variant = inputs
    _, h, mean, rstd = output
    ops.no_grad_outputs(ctx, mean, rstd, *([] if residual is not None else [h]))
    ctx.spec = RowNormSpec(tuple(normalized_shape), eps, rms, activation, *variant)
    ctx.dtypes = x.dtype, None if residual is None else residual.dtype
    if need_stats:
        ctx.save_for_backward(h if residual is not None else x, weight, bias, mean, rstd, gate)
    ctx.saved_stats = need_stats


def _row_norm_bwd(ctx, dy, dh, _dmean, _drstd):
    need = ops.needs(ctx, _row_norm_impl)
    x_dtype, r_dtype = ctx.dtypes
    if not ctx.saved_stats:
        raise RuntimeError("normops::row_norm ran with need_stats=False, so its backward has no statistics")
    x, weight, bias, mean, rstd, gate = ctx.saved_tensors
    s = ctx.spec
    mask = [need["x"] or need["residual"], need["weight"], need["bias"], need["gate"]]
    if dy is None:  # only x + residual was used
        return ops.input_grads(_row_norm_impl, x=_cast(dh, x_dtype, need["x"]),
                               residual=_cast(dh, r_dtype, need["residual"]))
    fused = r_dtype is not None  # dh is added and dx cast for x and the residual in the backward op
    dx, dw, db, dg, dr = ops.call_backward(
        ctx, row_norm_backward_op, _row_norm_backward_impl, dy, x, gate, dh if fused else None, s.normalized_shape,
        weight, bias, None if s.rms else mean, rstd, s.eps, s.rms, s.activation, mask, s.offset, s.casting,
        s.norm_before_gate, s.group_size, x_dtype if fused else None, r_dtype if fused else None)
    dx = dx if mask[0] else None
    dr = dr if dx is not None and dr.shape == dx.shape and dr.dtype == r_dtype else dx  # absent: dx serves both
    return ops.input_grads(_row_norm_impl, x=_cast(dx, x_dtype, need["x"]), residual=_cast(dr, r_dtype, need["residual"]),
                           weight=dw if mask[1] else None, bias=db if mask[2] else None, gate=dg if mask[3] else None)


def _cast(grad, dtype, needed):
    """A gradient for an input of ``dtype`` (x and residual may differ from the sum's dtype)."""
    if grad is None or not needed:
        return None
    return grad if grad.dtype == dtype else grad.to(dtype)


def _row_norm_backward_setup(ctx, inputs, output):
    (dy, x, gate, dh, normalized_shape, weight, bias, mean, rstd, eps, rms, activation, output_mask, offset, casting,
     norm_before_gate, group_size, dx_dtype, dresidual_dtype) = inputs
    ctx.spec = RowNormSpec(tuple(normalized_shape), eps, rms, activation, offset, casting, None, norm_before_gate,
                           group_size)
    ctx.save_for_backward(dy, x, weight, bias, gate)


def _straight_through(t, dtype):
    """t rounded to dtype (None: t), with the identity's gradient: the backward's convention."""
    if dtype is None or dtype == t.dtype:
        return t
    return t + (t.to(dtype).to(t.dtype) - t).detach()


def _composite(spec, x, weight, bias, gate, rounding=(None, None)):
    """The differentiable composition of the row norm (in the statistics dtype): the double
    backward's, where its casting-mode roundings are left out (straight-through, as the backward
    treats them), and the torch.func transforms' (normops.functional), where ``rounding`` is
    ``normops.core.casting_dtypes``'s: their values rounded, their gradient the identity's."""
    u = x
    sg = None if gate is None else torch.nn.functional.silu(gate)
    if sg is not None and not spec.norm_before_gate:
        u = u * sg
    if spec.group_size:
        u = u.unflatten(-1, (-1, spec.group_size))
    dims = tuple(range(-(1 if spec.group_size else len(spec.normalized_shape)), 0))
    x_hat = _straight_through(ops.normalize(u, dims, spec.eps, spec.rms).reshape(x.shape), rounding[0])
    w = weight + spec.offset if weight is not None and spec.offset else weight
    z = ops.affine_act(x_hat, x, w, bias, "none" if sg is not None else spec.activation, None)
    if sg is not None and spec.norm_before_gate:
        z = activate(_straight_through(z, rounding[1]) * sg, spec.activation)
    return z


# AMP: under CUDA autocast, torch runs layer_norm in fp32 (everything under CPU autocast keeps the
# input dtype); normops does the same.
ops.register_autograd(row_norm_op, _row_norm_setup, _row_norm_bwd, row_norm_backward_op, _row_norm_backward_setup,
                      _composite, autocast=torch.float32, inputs=("gate",), added=("dh",))
_RowNorm = ops.function("RowNorm", _run, _row_norm_setup, _row_norm_bwd)


def row_norm(spec, x, residual, weight, bias, need_stats, how=None, gate=None):
    """normops::row_norm on route ``how`` (``ops.route``'s, asked here when not given): (y, h, mean,
    rstd), each absent one an empty tensor. ``need_stats``: a gradient is needed."""
    args = (x, residual, gate, list(spec.normalized_shape), weight, bias, spec.eps, spec.rms, spec.activation,
            need_stats, *spec.args())
    return ops.call(row_norm_op, _RowNorm, _run, args, need_stats, how or ops.route("row_norm", x, spec, args))


# --- the in-place fused add, for inference (vLLM's fused_add_rms_norm) ------------------------------

def _fused_add_rms_norm_impl(x: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                             eps: float) -> None:
    """residual <- x + residual, then x <- rms_norm(residual) * weight, both in place (contiguous,
    same dtype, checked by normops.functional.add_rms_norm_). The Triton kernels write them from
    the kernel (``WRITES_INTO``); the other backends compute, then copy."""
    if x.numel() == 0:
        return
    (weight,) = ops.dense(weight)
    module = _route(x).module
    into = dict(out=(x, residual)) if getattr(module, "WRITES_INTO", False) else {}
    y, h, _, _ = module.row_norm_fwd(x, residual, tuple(normalized_shape), weight, None, eps, True, "none", False,
                                     **into)
    if y is not x:
        residual.copy_(h)
        x.copy_(y)


fused_add_rms_norm_op = ops.register("fused_add_rms_norm", _fused_add_rms_norm_impl, mutates=("x", "residual"))


@fused_add_rms_norm_op.register_fake
def _fused_add_rms_norm_fake(x, residual, normalized_shape, weight, eps):
    return None


def fused_add_rms_norm(x, residual, normalized_shape, weight, eps):
    """normops::fused_add_rms_norm, called directly in eager mode."""
    args = (x, residual, list(normalized_shape), weight, eps)
    if ops.eager((x, residual, weight)):
        return _fused_add_rms_norm_impl(*args)
    return fused_add_rms_norm_op(*args)


# --- norm + quantize, for inference (an fp8/int8 matrix multiply's input) ----------------------------

@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What routes a row_norm_quant call: the triton backend quantizes whole rows in registers
    (``fallback``)."""
    normalized_shape: tuple
    group_size: int  # values a dynamic scale covers; 0: a row


def _row_norm_quant_impl(x: Tensor, residual: Optional[Tensor], normalized_shape: Sequence[int],
                         weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool, activation: str,
                         offset: float, casting: str, dtype: torch.dtype, scale: Optional[Tensor],
                         group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q, scales, x + residual or absent): y = the row norm of x [+ residual] (as ``row_norm``, in
    its input's dtype) quantized to ``dtype``: q = round(y / scale) saturated, with ``scale`` given
    (static, returned as scales) or per row / per ``group_size`` values of a row (dynamic, shaped
    batch + (scales a row,)); normops.backends' contract gives the arithmetic."""
    if x.numel() == 0:
        q, scales, h = _row_norm_quant_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, offset,
                                            casting, dtype, scale, group_size)
        return q, scales.fill_(MIN_QUANT_SCALE) if scale is None else scales, h
    weight, bias = ops.dense(weight, bias)
    module = _route_quant(x, residual, normalized_shape, weight, bias, eps, rms, activation, offset, casting, dtype,
                          scale, group_size).module
    shape = tuple(normalized_shape)
    if hasattr(module, "row_norm_quant_fwd"):  # one kernel (the triton backend)
        q, scales, h = module.row_norm_quant_fwd(x, residual, shape, weight, bias, eps, rms, activation, offset=offset,
                                                 casting=casting, dtype=dtype, scale=scale, group_size=group_size)
    else:  # the backend's norm, then its quantize
        y, h, _, _ = module.row_norm_fwd(x, residual, shape, weight, bias, eps, rms, activation, False, offset=offset,
                                         casting=casting)
        q, scales = module.quantize(y, len(shape), dtype, scale, group_size)
    h = ops.absent(x) if h is None else _laid_out_as_sum(h, x, residual)
    return q.contiguous(), scales if scale is None else scale.clone(), h  # an op's output may not alias its input


def _route_quant(x, residual, normalized_shape, *args):
    return ops.route("row_norm_quant", x, QuantSpec(tuple(normalized_shape), args[-1]))


row_norm_quant_op = ops.register("row_norm_quant", _row_norm_quant_impl, route_of=_route_quant)


def _quant_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)  # inference: no gradient, so no autograd graph, even traced


def _quant_bwd(ctx, *grads):  # not reached: every output is non-differentiable
    raise RuntimeError("normops::row_norm_quant has no gradient (it is for inference)")


row_norm_quant_op.register_autograd(_quant_bwd, setup_context=_quant_setup)


@row_norm_quant_op.register_fake
def _row_norm_quant_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, offset, casting, dtype,
                         scale, group_size):
    batch = x.shape[: x.dim() - len(normalized_shape)]
    n = math.prod(normalized_shape)
    scales = scale.clone() if scale is not None else \
        x.new_empty(batch + (n // group_size if group_size else 1,), dtype=torch.float32)
    h = torch.empty_like(x + residual) if residual is not None else ops.absent(x)
    return torch.empty(x.shape, dtype=dtype, device=x.device), scales, h


def row_norm_quant(x, residual, normalized_shape, weight, bias, eps, rms, activation, offset, casting, dtype, scale,
                   group_size):
    """normops::row_norm_quant, run directly when it may run eagerly (it has no gradient)."""
    args = (x, residual, list(normalized_shape), weight, bias, eps, rms, activation, offset, casting, dtype, scale,
            group_size)
    if ops.eager((x, residual, weight, bias, scale)):
        with torch.no_grad():
            return _row_norm_quant_impl(*args)
    return row_norm_quant_op(*args)
