"""The normops custom ops, one module per norm family, and the machinery they share.

| module                     | ops                                         | spec of the non-tensor arguments |
|----------------------------|---------------------------------------------|----------------------------------|
| ``normops.ops.row_norm``   | ``normops::row_norm``, ``row_norm_backward``, | ``RowNormSpec``                  |
|                            | ``fused_add_rms_norm`` (``mutates_args``)     |                                  |
| ``normops.ops.group_norm`` | ``normops::group_norm``, ``group_norm_backward`` | ``GroupNormSpec``             |
| ``normops.ops.batch_norm`` | ``normops::batch_norm``, ``batch_norm_backward`` | ``BatchNormSpec``             |
| here                       | ``normops::update_running_stats`` (``mutates_args``) | -                         |

Each family module holds its op schemas (the implementation's annotations), fake kernels,
autograd and double backward, a frozen spec of its non-tensor arguments and its entry point for
``normops.functional``. This module holds what they share: ``route`` (which backend and which
implementation compute a call, and why: asked once per call, by ``normops.functional`` and by each
op when it runs, and by ``normops.inspect``), the eager fast path, the absent-output helpers, the
double-backward machinery, and the torch.func routing (``transformed``, ``in_torch``).

The ops are functional (they never write their inputs). Running statistics are updated afterwards
by ``update_running_stats``, except where an eager training ``batch_norm`` runs on the Triton
kernels, which update them inside their finalize launch (one launch, not a dozen; the kernels check
every buffer before the first launch, so a call that fails leaves them as they were). Meta and fake
tensors get the ``register_fake`` kernels, which is what ``torch.export`` traces, and
``torch.compile`` too, except for a CUDA call the Triton kernels compute: that one it traces into
the kernels' launches (``traced_into``).

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
import dataclasses
import functools
import inspect
from typing import Any, Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.autograd import forward_ad

from .. import backends, core
from ..backends import torch_backend
from ..core import activate, stat_dtype

# --- the route: which backend and implementation compute a call, and why ---------------------------


@dataclasses.dataclass(frozen=True)
class Route:
    backend: Optional[str]  # "torch", "triton", "numpy"; None where no backend is asked (traced, empty)
    implementation: str     # "aten", "torch", "numpy", "triton kernel", "torch fallback", "op", "none"
    reason: str             # why this implementation
    chosen_by: str = ""     # why this backend: "with normops.backend(...)", "NORMOPS_BACKEND", "the cpu default"...
    module: Any = dataclasses.field(default=None, repr=False, compare=False)  # the backend module that runs


TRACED = Route(None, "op", "traced, transformed, autocast or a tensor subclass: the registered op runs, and "
                           "routes itself when it runs")
EMPTY = Route(None, "none", "empty input: the outputs are zero-filled, no backend runs")
_REASONS = {
    "aten": "a plain eager fp32/fp64 call with nothing fused: ATen's own autograd-aware norm, no normops op",
    "torch": "ATen's native kernels with the fused extras composed around them",
    "composed": "a plain eager fp32/fp64 call with a fused activation: the backend's ATen norm and activation under "
                "torch's own autograd, no normops op (on ATen a fused pass saves nothing, and the op would add its "
                "Python autograd and recompute the activation's input in the backward)",
    "numpy": "the float64 NumPy reference (copies to the host)",
    "triton kernel": "normops' Triton kernels take this input",
}
_routes = {}  # (backend, chosen_by, implementation, reason) -> Route: a call builds no record


def _record(backend, chosen_by, implementation, reason, module):
    key = (backend, chosen_by, implementation, reason)
    found = _routes.get(key)
    if found is None:
        found = _routes[key] = Route(backend, implementation, reason, chosen_by, module)
    return found


def route(family, x, spec=None, tensors=None, *, aten=False, backend=None):
    """Which backend and implementation compute one call of ``family`` ("row_norm", "group_norm",
    "batch_norm") on input x with the family's ``spec``, and why; the record's ``module`` is the
    backend module that runs it.

    ``tensors``: every argument of a call about to be made (``normops.functional`` passes them):
    unless they may run eagerly (``eager``), the route is ``TRACED`` and the registered op decides
    when it runs. ``aten``: the caller could hand this configuration to ATen's own norm
    (torch.layer_norm, torch.batch_norm...): it is taken for a plain eager call with a non-empty
    fp32/fp64 input with parameters of its dtype, on a backend whose ``family`` kernel is ATen's
    (``NATIVE`` in the backend module). For fp16/bf16, ATen's CPU kernels save statistics in the
    input dtype, so those take the op, which keeps them fp32. Skipping the ops' Python autograd saves
    ~60 us a forward+backward. With a fused activation the route is "composed": the backend's forward
    (ATen's differentiable norm, the activation in place where autograd allows) runs under torch's
    own autograd, whose backward reads the activation's saved input where the op's recomputes it
    from x (that pass and the op's Python autograd made GroupNorm+SiLU 0.74x torch's composition on
    the CPU). ``backend``: what that backend would do (``normops.inspect``'s triton column), whatever
    the device and the input's size.
    On the triton backend, an input the kernels do not take routes to the torch backend
    (``fallback`` in the triton backend module says why)."""
    if tensors is not None and not eager(tensors):
        return TRACED
    if backend is None:
        if x.numel() == 0:
            return EMPTY
        backend, chosen_by = backends.backend_choice(x.device)
        module = backends.resolve(x, backend)
    else:
        chosen_by = "asked for"
        module = backends.load(backend)
    fallback = getattr(module, "fallback", None)
    if fallback is not None:
        reason = fallback(family, x, getattr(spec, "num_groups", None), spec=spec)
        if reason is not None:
            return _record(backend, chosen_by, "torch fallback", reason, backends.load("torch"))
        return _record(backend, chosen_by, "triton kernel", _REASONS["triton kernel"], module)
    # the batch-invariant mode takes the op, whose backward sums dW/dB in a fixed order (ATen's: per thread)
    if (aten and not core.is_batch_invariant() and x.dtype in (torch.float32, torch.float64)
            and all(t is None or t.dtype == x.dtype for t in tensors[1:])
            and family in getattr(module, "NATIVE", ())):
        if spec.activation == "none":
            return _record(backend, chosen_by, "aten", _REASONS["aten"], None)
        return _record(backend, chosen_by, "composed", _REASONS["composed"], module)
    implementation = "numpy" if backend == "numpy" else "torch"
    return _record(backend, chosen_by, implementation, _REASONS[implementation], module)


# --- eager fast path ----------------------------------------------------------------------------
# Through the dispatcher and torch.library's Python autograd wrapper, a forward+backward cost
# about 100 us more than this fast path (measured on a tiny GroupNorm on the CPU: 237 vs 130 us);
# a whole 2M-element GroupNorm takes ~1.2 ms. In plain eager mode nothing needs that machinery, so
# the same implementations run through a plain autograd.Function instead (same setup_context and
# backward functions). Anything that traces or transforms (torch.compile, export, fake/meta
# tensors, dispatch modes, functorch, autocast, torch.jit.trace) goes through the registered ops.

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(args):
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


def _profiled(name, fn, *args):
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(name):
            return fn(*args)
    return fn(*args)


def call(op, function, run, args, grad, how):
    """A forward op on route ``how``: when it may run eagerly, ``run(backend module, *args)``, through
    its autograd.Function when a gradient is needed (``grad``); else the registered op."""
    if how is TRACED:
        return op(*args)
    if how.implementation == "composed":  # differentiable ATen calls: torch's autograd records them
        return _profiled(op.qualname, run, how.module, *args)
    if grad:  # the module last: needs_input_grad keeps the op's input positions
        return _profiled(op.qualname, function.apply, *args, how.module)
    return _profiled(op.qualname, run, how.module, *args)


def call_backward(ctx, op, impl, *args):
    """A backward op from inside a backward: the bare implementation when the forward ran eagerly
    and no graph of the backward itself is being recorded (double backward), else the op."""
    if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
        return _profiled(op.qualname, impl, *args)
    return op(*args)


def in_forward_mode(setup, backward):
    """(setup, backward) of an op whose backward runs in the batch-invariant mode its forward ran in
    (``normops.batch_invariant``): a ``.backward()`` called after leaving the ``with`` block keeps
    the promise, and one inside a block the forward did not see is not changed by it."""
    def setup_(ctx, inputs, output):
        ctx.invariant = core.is_batch_invariant()
        return setup(ctx, inputs, output)

    def backward_(ctx, *grads):
        with core.batch_invariant(ctx.invariant):
            return backward(ctx, *grads)
    return setup_, backward_


def function(name, run, setup_context, backward):
    """An autograd.Function over ``run(backend module, *op args)``, applied to (*op args, backend
    module), with the op's own autograd formulas. (forward takes ctx itself: the setup_context form
    costs an inspect.signature per call.)"""
    setup_context, backward = in_forward_mode(setup_context, backward)

    def forward(ctx, *args_module):
        ctx.eager = True  # its backward may skip the dispatcher too
        args, module = args_module[:-1], args_module[-1]
        out = run(module, *args)
        setup_context(ctx, args, out)
        return out

    def backward_(ctx, *grads):
        return tuple(backward(ctx, *grads)) + (None,)  # none for the module

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward_)})


def register(name, impl, mutates=(), route_of=None):
    """The custom op normops::<name>, implemented by impl (its annotations give the schema).
    ``route_of(*op args)``: the call's ``route``, which ``traced_into`` asks when torch.compile
    traces the op."""
    op = torch.library.custom_op(f"normops::{name}", mutates_args=mutates)(impl)
    op.qualname = f"normops::{name}"  # the profiler event of the eager fast path
    op.impl = impl  # its parameter names place a backward's gradients (input_grads)
    if route_of is not None:
        op.register_torch_dispatch(FunctionalTensorMode, traced_into(impl, route_of))
    return op


KERNEL_DEVICES = ("cuda",)  # where Inductor compiles and launches the Triton kernels (ROCm's is "cuda" too)


def traced_into(impl, route_of):
    """The op's rule under FunctionalTensorMode, the mode in which torch.compile's AOTAutograd
    traces the graph Inductor compiles. A CUDA call the Triton kernels compute is traced into
    ``impl``, so each kernel launch becomes a triton_kernel_wrapper node (``launch`` in
    normops.kernels.common) that Inductor compiles and launches itself: inside CUDA graphs, no
    Python per call. It is what torch.library.triton_op does, for the calls that route to the
    kernels. Any other call (CPU, the interpreter, the torch or numpy backend, a fallback, an
    empty input, torch.export, which keeps custom ops whole) stays the opaque op, which routes
    itself when it runs. The route is chosen when traced: a compiled graph keeps it."""
    def rule(mode, op, types, args, kwargs):
        if (args[0].device.type in KERNEL_DEVICES and torch._functorch.config.decompose_custom_triton_ops
                and all(issubclass(t, (FakeTensor, FunctionalTensor)) or t is Tensor for t in types)
                and route_of(*args, **kwargs).implementation == "triton kernel"):
            with mode:
                return impl(*args, **kwargs)
        return mode.__torch_dispatch__(op, types, args, kwargs)
    return rule


@functools.cache
def _parameters(impl):
    return tuple(inspect.signature(impl).parameters)


def needs(ctx, impl):
    """``ctx.needs_input_grad`` by the op's parameter names."""
    return dict(zip(_parameters(impl), ctx.needs_input_grad))


def input_grads(impl, **grads):
    """An op's backward result: one gradient per input of ``impl``, by name; None for the others."""
    return tuple(grads.get(name) for name in _parameters(impl))


# --- absent outputs ---------------------------------------------------------------------------------

def absent(x, dtype=None):
    return x.new_empty(0, dtype=dtype)


def or_absent(t, x, dtype=None):
    return absent(x, dtype) if t is None else t


def dense(*tensors):
    """The per-channel / per-feature tensors (weight, bias, statistics) as every backend takes them:
    contiguous. ATen's group-norm kernels and the Triton kernels read them as raw pointers with unit
    stride, so a strided, expanded (stride 0) or offset view would be read wrong, or out of bounds.
    (x, residual and dy may have any layout: the backends handle those.)"""
    return [None if t is None else t.contiguous() for t in tensors]


def dx_as(dx, x, memory_format):
    """A backward's dx in torch's layout for x, or absent when not asked for (an absent output is a
    0-element 1-D tensor, which no channels_last layout fits)."""
    return absent(x) if dx is None else dx.contiguous(memory_format=memory_format)


def zero_filled(outputs):
    """Outputs for an empty input: the fake kernel's shapes, zero-filled (no backend is called)."""
    return tuple(t.zero_() for t in outputs)


def grads_fake(x, weight, bias, output_mask, memory_format):
    dx = torch.empty_like(x, memory_format=memory_format) if output_mask[0] else absent(x)
    dw = torch.empty_like(weight) if output_mask[1] and weight is not None else absent(x)
    db = torch.empty_like(bias) if output_mask[2] and bias is not None else absent(x)
    return dx, dw, db


def no_grad_outputs(ctx, *stats):
    """Statistics are outputs without a gradient; the backward gets None, not zeros, for them."""
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)


# --- differentiable compositions, for the double backward ---------------------------------------

def affine_act(x_hat, x, weight, bias, activation, channel_dim):
    shape = [1] * x.dim()
    if channel_dim is not None:
        shape[channel_dim] = -1
    z = x_hat
    if weight is not None:
        z = z * (weight.reshape(shape) if channel_dim is not None else weight)
    if bias is not None:
        z = z + (bias.reshape(shape) if channel_dim is not None else bias)
    return activate(z, activation)


def normalize(x, dims, eps, rms=False):
    if rms:
        return x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
    xc = x - x.mean(dims, keepdim=True)
    return xc * torch.rsqrt(xc.square().mean(dims, keepdim=True) + eps)


def double_backward(composite, dy, x, params, cotangents):
    """Gradients of (dy, x, *params) -> vjp(composite at x, *params)(dy), against the cotangents
    (grad of dx, then of each param's gradient). ``params``: weight, bias and any further
    differentiable input (a gate), None where absent. Computed in the statistics dtype, returned in
    each input's dtype: (gdy, gx, *gparams), None for the absent params."""
    sd = stat_dtype(x)
    present = [t for t in params if t is not None]

    def fill(ps):
        it = iter(ps)
        return [next(it) if t is not None else None for t in params]

    def first(dy_, x_, *ps):
        _, vjp = torch.func.vjp(lambda xx, *pp: composite(xx, *fill(pp)), x_, *ps)
        return vjp(dy_)

    primals = [dy.to(sd), x.to(sd)] + [p.to(sd) for p in present]
    _, vjp2 = torch.func.vjp(first, *primals)
    cots = []  # one per differentiated input; zeros where no gradient came (or it was not asked for)
    grads_in = [cotangents[0]] + [g for g, p in zip(cotangents[1:], params) if p is not None]
    for t, g in zip([x] + present, grads_in):
        usable = g is not None and g.numel() and g.numel() == t.numel()
        cots.append(g.to(sd) if usable else torch.zeros(t.shape, dtype=sd, device=t.device))
    grads = vjp2(tuple(cots))
    gdy, gx = grads[0].to(dy.dtype), grads[1].to(x.dtype)
    return (gdy, gx, *fill([g.to(p.dtype) for g, p in zip(grads[2:], present)]))


def register_autograd(op, setup, backward, backward_op, backward_setup, composite, autocast=None, inputs=(),
                      added=()):
    """A family's autograd: ``op``'s (setup, backward) and ``backward_op``'s, the double backward: the
    VJP of ``composite(spec, x, weight, bias, *inputs, *extra)``, a differentiable torch
    composition of the norm, where ``backward_setup`` saved (dy, x, weight, bias, *inputs, *extra)
    and ``ctx.spec``; ``inputs`` names the further differentiable inputs of ``backward_op`` (whose
    gradients it returns after dbias), ``extra`` are constants. ``added`` names inputs of
    ``backward_op`` that it adds to dx (the row norm's dh): their gradient is dx's cotangent, and
    its outputs after the inputs' gradients are dx again in other dtypes, whose cotangents add to
    dx's. ``autocast``: the dtype the op runs in under CUDA autocast, as torch's own norm does
    (None: the input's)."""
    def double_backward_(ctx, gdx, *cotangents):
        dy, x, weight, bias, *rest = ctx.saved_tensors
        params, extra = [weight, bias, *rest[:len(inputs)]], rest[len(inputs):]
        for g in cotangents[len(params):]:  # the copies of dx
            if g is not None and g.numel() == x.numel():
                gdx = g if gdx is None or gdx.numel() != x.numel() else gdx + g
        gdy, gx, *gp = double_backward(lambda x_, *ps: composite(ctx.spec, x_, *ps, *extra),
                                       dy, x, params, (gdx, *cotangents[:len(params)]))
        return input_grads(backward_op.impl, dy=gdy, x=gx, weight=gp[0], bias=gp[1], **dict(zip(inputs, gp[2:])),
                           **{name: gdx for name in added if needs(ctx, backward_op.impl)[name]})

    setup, backward = in_forward_mode(setup, backward)
    op.register_autograd(backward, setup_context=setup)
    backward_op.register_autograd(double_backward_, setup_context=backward_setup)
    if autocast is not None and hasattr(torch.library, "register_autocast"):
        torch.library.register_autocast(op.qualname, "cuda", autocast)


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


def in_torch(fn, x, *params, buffers=(), out_dtype=None):
    """fn(x, *params, *buffers) for a transformed call, returned in x's dtype (or ``out_dtype``).
    x and the parameters go in the statistics dtype (fp32 for fp16/bf16 input, as normops keeps its
    statistics; parameters of any dtype, which ATen's kernels refuse in some mixes). Running
    statistics go as they are, as fn updates them in place (a cast copy of a captured tensor is a
    new tensor under grad transforms, which may not write back); when they are in x's dtype (a
    model.half()), so are x and the parameters, and ATen accumulates in fp32 itself."""
    same = any(b is not None and b.dtype == x.dtype for b in buffers)
    dtype = x.dtype if same else stat_dtype(x)
    # .to() only where the dtype differs: under grad transforms, .to() of a captured tensor lifts it
    # into a new tensor even in its own dtype
    cast = [t if t is None or t.dtype == dtype else t.to(dtype) for t in (x,) + params]
    return fn(*cast, *buffers).to(out_dtype or x.dtype)


# --- running statistics (batch norm, and instance norm's) ----------------------------------------

def _update_running_stats_impl(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                               momentum: float) -> None:
    """running = (1 - momentum) * running + momentum * batch (the torch backend's, in fp64)."""
    torch_backend.update_running_stats(running_mean, running_var, mean, var, momentum)


update_running_stats_op = register("update_running_stats", _update_running_stats_impl,
                                   mutates=("running_mean", "running_var"))


@update_running_stats_op.register_fake
def _update_running_stats_fake(running_mean, running_var, mean, var, momentum):
    return None


def update_running_stats(*args):
    """normops::update_running_stats, called directly in eager mode."""
    if eager(args):
        return _update_running_stats_impl(*args)
    return update_running_stats_op(*args)
