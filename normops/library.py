"""The normops custom ops: one forward and one backward op per norm family, in ``torch.library``.

| op                               | what                                                       |
|----------------------------------|------------------------------------------------------------|
| ``normops::row_norm``            | LayerNorm / RMSNorm over the trailing dims, + residual, + act |
| ``normops::group_norm``          | GroupNorm over (C/G, *spatial); InstanceNorm (``instance``) |
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

torch.func transforms and forward-mode AD are the one thing the ops cannot serve (torch.library
gives a custom op no forward-mode derivative and no functorch autograd): under them,
``normops.functional`` computes each norm with torch's own differentiable norms (``transformed``).

A custom op cannot return ``None``: an absent output (no residual, no statistics, a gradient not
asked for) is an empty tensor here and ``None`` again in ``normops.functional``.
"""
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import backends
from .core import activate, memory_format_of, stat_dtype, suggested_format


def _absent(x, dtype=None):
    return x.new_empty(0, dtype=dtype)


def _or_absent(t, x, dtype=None):
    return _absent(x, dtype) if t is None else t


def _dense(*tensors):
    """The per-channel / per-feature tensors (weight, bias, statistics) as every backend takes them:
    contiguous. ATen's group-norm kernels and the Triton kernels read them as raw pointers with unit
    stride, so a strided, expanded (stride 0) or offset view would be read wrong, or out of bounds.
    (x, residual and dy may have any layout: the backends handle those.)"""
    return [None if t is None else t.contiguous() for t in tensors]


def _dx_as(dx, x, memory_format):
    """A backward's dx in torch's layout for x, or absent when not asked for (an absent output is a
    0-element 1-D tensor, which no channels_last layout fits)."""
    return _absent(x) if dx is None else dx.contiguous(memory_format=memory_format)


def _zero_filled(outputs):
    """Outputs for an empty input: the fake kernel's shapes, zero-filled (no backend is called)."""
    return tuple(t.zero_() for t in outputs)


# --- eager fast path ----------------------------------------------------------------------------
# Through the dispatcher and torch.library's Python autograd wrapper, a forward+backward cost
# about 100 us more than this fast path (measured on a tiny GroupNorm on the CPU: 237 vs 130 us);
# a whole 2M-element GroupNorm takes ~1.2 ms. In plain eager mode nothing needs that machinery, so
# the same implementations run through a plain autograd.Function instead (same setup_context and
# backward functions). Anything that traces or transforms (torch.compile, export, fake/meta
# tensors, dispatch modes, functorch, autocast, torch.jit.trace) goes through the registered ops.

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args):
    """True when the ops' implementations may run directly: real CPU/CUDA tensors, no tracing."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._get_tracing_state() is not None:  # torch.jit.trace records the op, not what it runs
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    device = args[0].device.type
    if device not in ("cpu", "cuda") or torch.is_autocast_enabled(device):
        return False
    return all(type(t) in _PLAIN for t in args if isinstance(t, torch.Tensor))


def aten_direct(family, x, activation, *params):
    """True when normops has nothing to add to ATen's own autograd-aware norm (torch.layer_norm,
    torch.batch_norm...), which ``normops.functional`` then calls: a plain eager call, no fused
    activation, a non-empty fp32/fp64 input with parameters of its dtype, on a backend whose
    ``family`` kernel is ATen's (``NATIVE`` in the backend module: every family on the torch
    backend; a backend without it has none). For fp16/bf16, ATen's CPU kernels save statistics in
    the input dtype, so those take the op path, which keeps them fp32. Skipping the ops' Python
    autograd saves ~60 us a forward+backward."""
    return (activation == "none" and x.dtype in (torch.float32, torch.float64) and x.numel() > 0
            and all(p is None or p.dtype == x.dtype for p in params) and _eager((x,) + params)
            and family in getattr(backends.resolve(x), "NATIVE", ()))


# --- torch.func transforms and forward-mode AD ---------------------------------------------------
# torch.library gives a custom op neither a forward-mode derivative (its tangent comes out zero or
# None) nor functorch autograd (torch.func.grad refuses its generated autograd.Function). Under
# those, normops.functional computes the norm with torch's own differentiable norms
# (torch.layer_norm, torch.batch_norm...) and the fused extras composed around them, so every
# transform gives torch's results, and torch's behaviour for the running statistics (updated
# under grad/jvp; torch's error under vmap when the input is batched and they are not).

def transformed(*tensors):
    """True under a torch.func transform (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap,
    functionalize) or when a tensor carries a forward-AD tangent (``torch.autograd.forward_ad``)."""
    # isinstance, not "is not None": torch.compile models the call's result as an object, which
    # "is not None" even when the stack is empty.
    if isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter):
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tensor can carry a tangent
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def in_torch(fn, x, *params, buffers=()):
    """fn(x, *params, *buffers) for a transformed call, returned in x's dtype. x and the
    parameters go in the statistics dtype (fp32 for fp16/bf16 input, as normops keeps its
    statistics; parameters of any dtype, which ATen's kernels refuse in some mixes). Running
    statistics go as they are, as fn updates them in place (a cast copy of a captured tensor is a
    new tensor under grad transforms, which may not write back); when they are in x's dtype (a
    model.half()), so are x and the parameters, and ATen accumulates in fp32 itself."""
    same = any(b is not None and b.dtype == x.dtype for b in buffers)
    dtype = x.dtype if same else stat_dtype(x)
    # .to() only where the dtype differs: under grad transforms, .to() of a captured tensor lifts it
    # into a new tensor even in its own dtype
    cast = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x,) + params]
    return fn(*cast, *buffers).to(x.dtype)


def _profiled(name, fn, *args):
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


def _forward(op, function, impl, args, grad):
    """A forward op in eager mode: its autograd.Function when a gradient is needed (``grad``),
    else the bare implementation; the registered op when tracing."""
    if not _eager(args):
        return op(*args)
    return _profiled(impl.qualname, function.apply if grad else impl, *args)


def _backward(ctx, op, impl, *args):
    """A backward op from inside a backward: the bare implementation when the forward ran eagerly
    and no graph of the backward itself is being recorded (double backward), else the op."""
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return _profiled(impl.qualname, impl, *args)
    return op(*args)


def _function(name, impl, setup_context, backward):
    """An autograd.Function over an op's implementation, with the op's own autograd formulas.
    (forward takes ctx itself: the setup_context form costs an inspect.signature per call.)"""
    def forward(ctx, *args):
        ctx.eager = True  # its backward may skip the dispatcher too
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


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
    cots = []  # one per differentiated input; zeros where no gradient came (or it was not asked for)
    grads_in = [cotangents[0]] + [g for g, p in zip(cotangents[1:], (weight, bias)) if p is not None]
    for t, g in zip([x] + present, grads_in):
        usable = g is not None and g.numel() and g.numel() == t.numel()
        cots.append(g.to(sd) if usable else torch.zeros(t.shape, dtype=sd, device=t.device))
    grads = vjp2(tuple(cots))
    gdy, gx = grads[0].to(dy.dtype), grads[1].to(x.dtype)
    gp = params([g.to(p.dtype) for g, p in zip(grads[2:], present)])
    return gdy, gx, gp[0], gp[1]


def _register(name, impl, mutates=()):
    """The custom op normops::<name>, implemented by impl (its annotations give the schema). The
    impl keeps the op's name, for the profiler events of the eager fast path."""
    impl.qualname = f"normops::{name}"
    return torch.library.custom_op(impl.qualname, mutates_args=mutates)(impl)


def _no_grad_outputs(ctx, *stats):
    """Statistics are outputs without a gradient; the backward gets None, not zeros, for them."""
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)


# --- LayerNorm / RMSNorm -----------------------------------------------------------------------

def _row_norm_impl(x: Tensor, residual: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor], bias: Optional[Tensor], eps: float, rms: bool,
                   activation: str, need_stats: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x [+ residual]) * w + b) over the trailing ``normalized_shape`` dims.
    Returns (y, x + residual or absent, mean or absent, rstd or absent)."""
    if x.numel() == 0:
        return _zero_filled(_row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation,
                                           need_stats))
    weight, bias = _dense(weight, bias)
    y, h, mean, rstd = backends.resolve(x).row_norm_fwd(
        x, residual, tuple(normalized_shape), weight, bias, eps, rms, activation, need_stats)
    if h is not None:
        h = _laid_out_as_sum(h, x, residual)
    sd = stat_dtype(x)
    y = y.contiguous(memory_format=_row_norm_format(x if h is None else h, rms))
    return y, _or_absent(h, x), _or_absent(mean, x, sd), _or_absent(rstd, x, sd)


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


row_norm_op = _register("row_norm", _row_norm_impl)


@row_norm_op.register_fake
def _row_norm_fake(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats):
    batch = x.shape[: x.dim() - len(normalized_shape)]
    sd = stat_dtype(x)
    h = torch.empty_like(x + residual) if residual is not None else _absent(x)  # torch's layout of the sum
    mean = x.new_empty(batch, dtype=sd) if need_stats and not rms else _absent(x, sd)
    rstd = x.new_empty(batch, dtype=sd) if need_stats else _absent(x, sd)
    inp = x if residual is None else h
    y = torch.empty_like(inp, memory_format=_row_norm_format(inp, rms))
    return y, h, mean, rstd


def _row_norm_backward_impl(dy: Tensor, x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor],
                            bias: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor, eps: float, rms: bool,
                            activation: str, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of row_norm, from the saved statistics (x is x + residual when fused)."""
    if x.numel() == 0:
        return _zero_filled(_row_norm_backward_fake(dy, x, normalized_shape, weight, bias, mean, rstd, eps, rms,
                                                    activation, output_mask))
    weight, bias, mean, rstd = _dense(weight, bias, mean, rstd)
    dx, dw, db = backends.resolve(x).row_norm_bwd(
        dy, x, tuple(normalized_shape), weight, bias, mean, rstd, rms, activation, list(output_mask))
    return _or_absent(dx, x).contiguous(), _or_absent(dw, x), _or_absent(db, x)


row_norm_backward_op = _register("row_norm_backward", _row_norm_backward_impl)


@row_norm_backward_op.register_fake
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
    _no_grad_outputs(ctx, mean, rstd, *([] if residual is not None else [h]))
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
    if dy is None:  # only x + residual was used
        return dh if need[0] else None, dh if need[1] else None, None, None, None, None, None, None, None
    dx, dw, db = _backward(ctx, row_norm_backward_op, _row_norm_backward_impl, dy, x, normalized_shape, weight, bias,
                           None if rms else mean, rstd, eps, rms, activation, mask)
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


row_norm_op.register_autograd(_row_norm_bwd, setup_context=_row_norm_setup)
row_norm_backward_op.register_autograd(_row_norm_double_bwd, setup_context=_row_norm_backward_setup)


# --- GroupNorm / InstanceNorm ------------------------------------------------------------------

def _group_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                     activation: str, instance: bool, need_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b), statistics per (sample, group of C/G channels). (y, mean, rstd).
    ``instance``: instance_norm's call (num_groups == C), whose constant channel with eps = 0 gives
    rstd 0 (torch's batch-norm statistics), where group_norm's gives NaN, even with G == C."""
    if x.numel() == 0:
        return _zero_filled(_group_norm_fake(x, weight, bias, num_groups, eps, activation, instance, need_stats))
    weight, bias = _dense(weight, bias)
    y, mean, rstd = backends.resolve(x).group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats,
                                                       instance)
    sd = stat_dtype(x)
    return y.contiguous(memory_format=suggested_format(x)), _or_absent(mean, x, sd), _or_absent(rstd, x, sd)


group_norm_op = _register("group_norm", _group_norm_impl)


@group_norm_op.register_fake
def _group_norm_fake(x, weight, bias, num_groups, eps, activation, instance, need_stats):
    sd = stat_dtype(x)
    stats = (x.shape[0], num_groups) if need_stats else (0,)
    return (torch.empty_like(x, memory_format=suggested_format(x)),
            x.new_empty(stats, dtype=sd), x.new_empty(stats, dtype=sd))


def _group_norm_backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                              rstd: Tensor, num_groups: int, eps: float, activation: str,
                              output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias) of group_norm, from the saved statistics."""
    if x.numel() == 0:
        return _zero_filled(_group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation,
                                                      output_mask))
    weight, bias, mean, rstd = _dense(weight, bias, mean, rstd)
    dx, dw, db = backends.resolve(x).group_norm_bwd(
        dy, x, num_groups, weight, bias, mean, rstd, activation, list(output_mask))
    return _dx_as(dx, x, suggested_format(x)), _or_absent(dw, x), _or_absent(db, x)


group_norm_backward_op = _register("group_norm_backward", _group_norm_backward_impl)


@group_norm_backward_op.register_fake
def _group_norm_backward_fake(dy, x, weight, bias, mean, rstd, num_groups, eps, activation, output_mask):
    return _grads_fake(x, weight, bias, output_mask, suggested_format(x))


def _group_norm_setup(ctx, inputs, output):
    x, weight, bias, num_groups, eps, activation, instance, need_stats = inputs
    _, mean, rstd = output
    _no_grad_outputs(ctx, mean, rstd)
    ctx.cfg = (num_groups, eps, activation)
    ctx.saved_stats = need_stats
    if need_stats:
        ctx.save_for_backward(x, weight, bias, mean, rstd)


def _group_norm_bwd(ctx, dy, _dmean, _drstd):
    if dy is None:
        return (None,) * 8
    if not ctx.saved_stats:
        raise RuntimeError("normops::group_norm ran with need_stats=False, so its backward has no statistics")
    need = ctx.needs_input_grad
    x, weight, bias, mean, rstd = ctx.saved_tensors
    num_groups, eps, activation = ctx.cfg
    mask = [need[0], need[1], need[2]]
    dx, dw, db = _backward(ctx, group_norm_backward_op, _group_norm_backward_impl,
                           dy, x, weight, bias, mean, rstd, num_groups, eps, activation, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None, None, None)


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


group_norm_op.register_autograd(_group_norm_bwd, setup_context=_group_norm_setup)
group_norm_backward_op.register_autograd(_group_norm_double_bwd, setup_context=_group_norm_backward_setup)


# --- BatchNorm ---------------------------------------------------------------------------------

def _batch_norm_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                     running_var: Optional[Tensor], training: bool, eps: float,
                     activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """y = act(norm(x) * w + b) per channel (dim 1). (y, save_mean, save_rstd, unbiased batch var);
    the last three are absent when not training (the running statistics normalize)."""
    if x.numel() == 0:
        return _zero_filled(_batch_norm_fake(x, weight, bias, running_mean, running_var, training, eps, activation))
    weight, bias, running_mean, running_var = _dense(weight, bias, running_mean, running_var)
    y, save_mean, save_rstd, batch_var = backends.resolve(x).batch_norm_fwd(
        x, weight, bias, running_mean, running_var, training, eps, activation)
    sd = stat_dtype(x)
    return (y.contiguous(memory_format=memory_format_of(x)), _or_absent(save_mean, x, sd),
            _or_absent(save_rstd, x, sd), _or_absent(batch_var, x, sd))


batch_norm_op = _register("batch_norm", _batch_norm_impl)


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
        return _zero_filled(_batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean,
                                                      save_rstd, training, eps, activation, output_mask))
    weight, bias, running_mean, running_var, save_mean, save_rstd = _dense(
        weight, bias, running_mean, running_var, save_mean, save_rstd)
    dx, dw, db = backends.resolve(x).batch_norm_bwd(
        dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps, activation,
        list(output_mask))
    return _dx_as(dx, x, memory_format_of(x)), _or_absent(dw, x), _or_absent(db, x)


batch_norm_backward_op = _register("batch_norm_backward", _batch_norm_backward_impl)


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training,
                              eps, activation, output_mask):
    return _grads_fake(x, weight, bias, output_mask, memory_format_of(x))


def _batch_norm_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, training, eps, activation = inputs
    _, save_mean, save_rstd, batch_var = output
    _no_grad_outputs(ctx, save_mean, save_rstd, batch_var)
    ctx.cfg = (training, eps, activation)
    if any(ctx.needs_input_grad[:3]):
        if training:
            ctx.save_for_backward(x, weight, bias, None, None, save_mean, save_rstd)
        else:  # a clone: the caller may update these buffers in place before backward runs
            ctx.save_for_backward(x, weight, bias, running_mean.clone(), running_var.clone(), None, None)


def _batch_norm_bwd(ctx, dy, _dmean, _drstd, _dvar):
    if dy is None:
        return (None,) * 8
    need = ctx.needs_input_grad
    x, weight, bias, running_mean, running_var, save_mean, save_rstd = ctx.saved_tensors
    training, eps, activation = ctx.cfg
    mask = [need[0], need[1], need[2]]
    dx, dw, db = _backward(ctx, batch_norm_backward_op, _batch_norm_backward_impl, dy, x, weight, bias,
                           running_mean, running_var, save_mean, save_rstd, training, eps, activation, mask)
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


batch_norm_op.register_autograd(_batch_norm_bwd, setup_context=_batch_norm_setup)
batch_norm_backward_op.register_autograd(_batch_norm_double_bwd, setup_context=_batch_norm_backward_setup)


def _update_running_stats_impl(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                               momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch, for the mean and the (unbiased) var,
    computed in fp64 and stored in the buffers' dtype, as torch's CPU kernel does."""
    for running, batch in ((running_mean, mean), (running_var, var)):
        new = running.double() * (1.0 - momentum) + batch.double() * momentum
        running.copy_(new)


update_running_stats_op = _register("update_running_stats", _update_running_stats_impl,
                                    mutates=("running_mean", "running_var"))


@update_running_stats_op.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum):
    return None


# --- AMP: under CUDA autocast, torch runs layer_norm and group_norm in fp32 (batch_norm and
# everything under CPU autocast keep the input dtype); normops does the same.
if hasattr(torch.library, "register_autocast"):
    for _op in ("normops::row_norm", "normops::group_norm"):
        torch.library.register_autocast(_op, "cuda", torch.float32)


# --- entry points for normops.functional -----------------------------------------------------------

_RowNorm = _function("RowNorm", _row_norm_impl, _row_norm_setup, _row_norm_bwd)
_GroupNorm = _function("GroupNorm", _group_norm_impl, _group_norm_setup, _group_norm_bwd)
_BatchNorm = _function("BatchNorm", _batch_norm_impl, _batch_norm_setup, _batch_norm_bwd)


def row_norm(*args):
    """normops::row_norm (see _row_norm_impl); its last argument, need_stats, says a gradient is needed."""
    return _forward(row_norm_op, _RowNorm, _row_norm_impl, args, args[-1])


def group_norm(*args):
    """normops::group_norm (see _group_norm_impl); its last argument, need_stats, says a gradient is needed."""
    return _forward(group_norm_op, _GroupNorm, _group_norm_impl, args, args[-1])


def batch_norm(*args, grad):
    """normops::batch_norm (see _batch_norm_impl); ``grad``: a gradient is needed."""
    return _forward(batch_norm_op, _BatchNorm, _batch_norm_impl, args, grad)


def update_running_stats(*args):
    """normops::update_running_stats, called directly in eager mode."""
    if _eager(args):
        return _update_running_stats_impl(*args)
    return update_running_stats_op(*args)
