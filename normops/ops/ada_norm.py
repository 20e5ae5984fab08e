"""adaLN modulation (DiT, SD3, Flux: diffusers' AdaLayerNorm* step), fused: ``normops::ada_norm``
and its backward ``normops::ada_norm_backward``.

    x [B, T, D]; scale, shift, gate [B, D] (one row per sample, shared by its T tokens)
    h = residual + gate[b] * x     with a residual (no gate: residual + x), else h = x
    y = norm(h; w, b, eps) * (1 + scale[b]) + shift[b]        LayerNorm, or RMSNorm (``rms``)

returns (y, h or absent, mean or absent, rstd or absent). ``casting``: "fp32" (every step in the
statistics dtype, one rounding at the end), "torch" (each step rounded to h's dtype as diffusers'
torch composition rounds it) or "t5" ("torch" with diffusers' RMSNorm's x_hat rounding); the math and the rounding rule: ``normops/backends/numpy_backend/ada_norm.py``.
``normops.functional.ada_layer_norm`` / ``ada_rms_norm`` flatten the input's middle dims into T.

The backward op returns (dx, dresidual, dgate, dscale, dshift, dweight, dbias): dx in x's dtype,
dresidual in h's, dgate and dscale in their inputs' dtypes, dshift in scale's, dweight/dbias in
theirs (the autograd formula casts dresidual and dshift to their inputs' dtypes). It is
differentiable too: its backward is the VJP, by ``torch.func.vjp``, of the torch backend's backward,
a differentiable composition of torch ops, with the statistics recomputed from h and the roundings
left out (straight-through), as the row norms' double backward does.
"""
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import ops
from ..backends import torch_backend
from ..core import stat_dtype

_GRADS = ("dx", "dresidual", "dgate", "dscale", "dshift", "dweight", "dbias")


@dataclasses.dataclass(frozen=True)
class AdaNormSpec:
    """The non-tensor arguments of an ada norm."""
    eps: float
    rms: bool = False
    casting: str = "fp32"  # "fp32" (one rounding, at the end), "torch" (diffusers' roundings) or "t5"


def _h_dtype(x, residual):
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _route(x, *_):
    """The route of an ada-norm call on x (``ops.route``), forward or backward."""
    return ops.route("ada_norm", x)


def _run(module, x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats):
    if x.numel() == 0:
        return ops.zero_filled(_ada_norm_fake(x, residual, gate, scale, shift, weight, bias, eps, rms, casting,
                                              need_stats))
    gate, scale, shift, weight, bias = ops.dense(gate, scale, shift, weight, bias)
    y, h, mean, rstd = module.ada_norm_fwd(x, residual, gate, scale, shift, weight, bias, eps, rms, casting,
                                           need_stats)
    sd = stat_dtype(torch.empty(0, dtype=_h_dtype(x, residual)))
    return (y.contiguous(), ops.or_absent(h, x), ops.or_absent(mean, x, sd), ops.or_absent(rstd, x, sd))


def _ada_norm_impl(x: Tensor, residual: Optional[Tensor], gate: Optional[Tensor], scale: Tensor, shift: Tensor,
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool, casting: str,
                   need_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = norm(h) * (1 + scale[b]) + shift[b], h = residual + gate[b] * x (or x). Returns (y, h or
    absent, mean or absent, rstd or absent)."""
    return _run(_route(x).module, x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats)


ada_norm_op = ops.register("ada_norm", _ada_norm_impl, route_of=_route)


@ada_norm_op.register_fake
def _ada_norm_fake(x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats):
    hd = _h_dtype(x, residual)
    sd = stat_dtype(torch.empty(0, dtype=hd))
    stats = x.shape[:2]
    h = x.new_empty(x.shape, dtype=hd) if residual is not None else ops.absent(x)
    mean = x.new_empty(stats, dtype=sd) if need_stats and not rms else ops.absent(x, sd)
    rstd = x.new_empty(stats, dtype=sd) if need_stats else ops.absent(x, sd)
    return x.new_empty(x.shape, dtype=hd), h, mean, rstd


def _ada_norm_backward_impl(dy: Tensor, dh: Optional[Tensor], x: Tensor, h: Optional[Tensor], gate: Optional[Tensor],
                            scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                            rstd: Tensor, eps: float, rms: bool, casting: str,
                            output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor]:
    """(dx, dresidual, dgate, dscale, dshift, dweight, dbias) of ada_norm from its saved statistics;
    h: the saved residual stream (absent: x was normalized); dh: its gradient from later layers,
    added to dresidual and, times the gate, to dx. output_mask: one entry per gradient."""
    args = (dy, dh, x, h, gate, scale, weight, bias, mean, rstd, eps, rms, casting, output_mask)
    if x.numel() == 0:
        return ops.zero_filled(_ada_norm_backward_fake(*args))
    gate, scale, weight, bias, mean, rstd = ops.dense(gate, scale, weight, bias, mean, rstd)
    grads = _route(x).module.ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, casting,
                                          list(output_mask))
    like = (x, h, gate, scale, scale, weight, bias)
    out = []
    for g, t in zip(grads, like):
        g = ops.absent(x) if g is None else g.to(t.dtype).contiguous()
        # without a gate dx and dresidual are one tensor: a custom op's outputs may not alias each other
        out.append(g.clone() if any(g is o for o in out) else g)
    return tuple(out)


ada_norm_backward_op = ops.register("ada_norm_backward", _ada_norm_backward_impl,
                                    route_of=lambda dy, dh, x, *_: _route(x))


@ada_norm_backward_op.register_fake
def _ada_norm_backward_fake(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, eps, rms, casting, output_mask):
    like = (x, h, gate, scale, scale, weight, bias)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=x.device) if want and t is not None else ops.absent(x)
                 for t, want in zip(like, output_mask))


def _ada_norm_setup(ctx, inputs, output):
    x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats = inputs
    _, h, mean, rstd = output
    ops.no_grad_outputs(ctx, mean, rstd, *([] if residual is not None else [h]))
    ctx.spec = AdaNormSpec(eps, rms, casting)
    ctx.dtypes = None if residual is None else residual.dtype, shift.dtype
    ctx.saved_stats = need_stats
    if need_stats:
        ctx.save_for_backward(x, h if residual is not None else None, gate, scale, weight, bias,
                              None if rms else mean, rstd)


def _ada_norm_bwd(ctx, dy, dh, _dmean, _drstd):
    need = ops.needs(ctx, _ada_norm_impl)
    if not ctx.saved_stats:
        raise RuntimeError("normops::ada_norm ran with need_stats=False, so its backward has no statistics")
    x, h, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    r_dtype, shift_dtype = ctx.dtypes
    if r_dtype is None:
        dh = None
    if dy is None:  # only h was used (or nothing, under the double backward): y's gradient is zero
        dy = torch.zeros(x.shape, dtype=x.dtype if h is None else h.dtype, device=x.device)
    s = ctx.spec
    mask = [need["x"], need["residual"], need["gate"], need["scale"], need["shift"], need["weight"], need["bias"]]
    grads = ops.call_backward(ctx, ada_norm_backward_op, _ada_norm_backward_impl, dy, dh, x, h, gate, scale,
                              weight, bias, mean, rstd, s.eps, s.rms, s.casting, mask)
    dx, dr, dg, dsc, dsh, dw, db = (g if want else None for g, want in zip(grads, mask))
    return ops.input_grads(_ada_norm_impl, x=dx, residual=_cast(dr, r_dtype), gate=dg, scale=dsc,
                           shift=_cast(dsh, shift_dtype), weight=dw, bias=db)


def _cast(grad, dtype):
    return grad if grad is None or grad.dtype == dtype else grad.to(dtype)


def _ada_norm_backward_setup(ctx, inputs, output):
    dy, dh, x, h, gate, scale, weight, bias, mean, rstd, eps, rms, casting, output_mask = inputs
    ctx.spec = AdaNormSpec(eps, rms, casting)
    ctx.save_for_backward(dy, dh, x, h, gate, scale, weight, bias)


_DIFFERENTIABLE = ("dy", "dh", "x", "h", "gate", "scale", "weight", "bias")


def _ada_norm_double_backward(ctx, *cotangents):
    """The VJP of the backward (a function of dy, dh, x, h, gate, scale, weight, bias) against the
    cotangents of its seven gradients, through the torch backend's differentiable backward."""
    saved = ctx.saved_tensors
    present = [i for i, t in enumerate(saved) if t is not None]
    sd = stat_dtype(saved[2] if saved[3] is None else saved[3])
    s = ctx.spec

    def backward(*ps):
        args = list(saved)
        for i, p in zip(present, ps):
            args[i] = p
        dy, dh, x, h, gate, scale, weight, bias = args
        grads = torch_backend.ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, None, None, s.rms, "fp32",
                                           [True] * 7, eps=s.eps)
        return tuple(torch.zeros((), dtype=sd, device=x.device) if g is None else g for g in grads)

    primals = [saved[i].to(sd) for i in present]
    outs, vjp = torch.func.vjp(backward, *primals)
    cots = tuple(g.to(sd) if g is not None and g.numel() == o.numel() and g.numel() else torch.zeros_like(o)
                 for g, o in zip(cotangents, outs))
    grads = vjp(cots)
    by_name = {_DIFFERENTIABLE[i]: g.to(saved[i].dtype) for i, g in zip(present, grads)}
    return ops.input_grads(_ada_norm_backward_impl, **by_name)


_setup_in_mode, _bwd_in_mode = ops.in_forward_mode(_ada_norm_setup, _ada_norm_bwd)
ada_norm_op.register_autograd(_bwd_in_mode, setup_context=_setup_in_mode)
ada_norm_backward_op.register_autograd(_ada_norm_double_backward, setup_context=_ada_norm_backward_setup)
# AMP: under CUDA autocast torch runs layer_norm in fp32, so diffusers' composition modulates in fp32;
# normops does the same, as for its row norms (ops.register_autograd). Under CPU autocast torch's norms
# keep the input dtype: no CPU registration.
if hasattr(torch.library, "register_autocast"):
    torch.library.register_autocast(ada_norm_op.qualname, "cuda", torch.float32)
_AdaNorm = ops.function("AdaNorm", _run, _ada_norm_setup, _ada_norm_bwd)


def ada_norm(spec, x, residual, gate, scale, shift, weight, bias, need_stats, how=None):
    """normops::ada_norm on route ``how`` (``ops.route``'s, asked here when not given): (y, h, mean,
    rstd), each absent one an empty tensor. ``need_stats``: a gradient is needed."""
    args = (x, residual, gate, scale, shift, weight, bias, spec.eps, spec.rms, spec.casting, need_stats)
    return ops.call(ada_norm_op, _AdaNorm, _run, args, need_stats, how or ops.route("ada_norm", x, spec, args))


def composite(spec, x, residual, gate, scale, shift, weight, bias):
    """(y, h or None) by the torch backend's differentiable composition: the torch.func transforms'."""
    return torch_backend.ada_norm_fwd(x, residual, gate, scale, shift, weight, bias, spec.eps, spec.rms,
                                      spec.casting, False)[:2]
