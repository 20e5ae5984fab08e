"""``torch.nn.functional``-compatible norms: same positional and keyword signatures, defaults,
output shape, dtype and memory format, and the same in-place running-statistics updates.

Extras, keyword-only: ``activation=None | "relu" | "silu" | "gelu"`` fused after the affine
transform, and ``add_layer_norm`` / ``add_rms_norm`` for pre-norm residual streams. For language
models, the row norms take ``offset`` (Gemma's ``1 + weight``), ``casting`` (where x_hat is rounded:
the Hugging Face families' arithmetic, "fp32"/"gemma", "llama", "t5") and ``out_dtype``; the
residual stream may be fp32 under bf16 activations; ``gated_rms_norm`` (Mamba2, Qwen3-Next) and
``add_rms_norm_`` (in place, for inference, vLLM's fused_add_rms_norm) complete the set. QK-norm is
``rms_norm`` on the q/k views of a fused QKV projection: the kernels read strided rows in place.

Each function first hands a call with a ``__torch_function__`` argument to it, as torch's functionals
do: ``torch.fx.symbolic_trace`` then records one call to the normops function (the Proxy's
``__torch_function__``), and tensor subclasses see the call as one.

Input validation lives here, before any op runs, so a bad call raises a clear error and leaves
running statistics untouched. Then ``normops.ops.route`` decides, once for the call, which backend
and implementation compute it: a plain fp32/fp64 call whose backend would run ATen's norm anyway
goes straight to it (route "aten"), without the ops' Python autograd overhead; the others run the
``normops::`` op of the family (``normops/ops/<family>.py``) on the routed backend. Under torch.func
transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) and forward-mode AD, which the ops do not
support, each norm is computed by torch's own (``torch.layer_norm``, ``torch.batch_norm``...) with the
activation and residual composed around it (``ops.transformed``), whatever the backend.
"""
import math
import numbers
import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import ops  # the route, the eager fast path, the torch.func routing
from .ops import ada_norm as ada_ops
from .ops import batch_norm as batch_ops
from .ops import channels_first as cf_ops
from .ops import group_norm as group_ops
from .ops import group_stats as group_stats_ops
from .ops.group_stats import GroupStats
from .ops import row_norm as row_ops
from .core import MIN_QUANT_SCALE, QUANT_MAX, DtypeError, ShapeError, activate, activation_name, casting_dtypes, stat_dtype

__all__ = ["layer_norm", "rms_norm", "group_norm", "instance_norm", "batch_norm", "add_layer_norm",
           "add_rms_norm", "add_rms_norm_", "gated_rms_norm"]
# issue #18: diffusion and vision norms
__all__ += ["ada_layer_norm", "ada_rms_norm", "ada_group_norm", "layer_norm_channels_first", "GroupStats",
            "group_norm_stats", "combine_group_stats", "group_norm_apply"]
# issue #19: norm + quantize, for inference
__all__ += ["rms_norm_quant", "layer_norm_quant"]

# --- validation --------------------------------------------------------------------------------

def _check_tensors(input, **named):
    """input is a floating tensor; every named tensor is floating and on input's device."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor (float16, bfloat16, float32, float64), "
                        f"got {input.dtype}")
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"expected {name} on {input.device} like input, but it is on {t.device}")


def _check_param_dtypes(input, **params):
    """torch's rule for the parameters of layer, group, instance and batch norm: they share one
    dtype, the input's, or float32 with a float16/bfloat16 input (ATen's CPU "mixed type" path).
    (rms_norm takes a weight of any floating dtype, and instance_norm running statistics too.)"""
    if all(t is None or t.dtype == input.dtype for t in params.values()):  # the common call, on the hot path
        return
    given = {name: t.dtype for name, t in params.items() if t is not None}
    dtypes = set(given.values())
    low = input.dtype in (torch.float16, torch.bfloat16)
    if not dtypes or dtypes == {input.dtype} or (low and dtypes == {torch.float32}):
        return
    allowed = f"{input.dtype}" + (" (or all torch.float32)" if low else "")
    got = ", ".join(f"{name} {dtype}" for name, dtype in given.items())
    raise DtypeError(f"expected {', '.join(given)} of the input's dtype {allowed}, as torch requires; "
                     f"got input {input.dtype}, {got}")


def _check_momentum(what, momentum):
    """momentum is a number, as torch's batch_norm / instance_norm require even where it goes unused
    (the nn modules turn their momentum=None into the cumulative factor themselves)."""
    if not isinstance(momentum, (numbers.Real, Tensor)):
        raise TypeError(f"{what}(): argument 'momentum' must be float, not {type(momentum).__name__}")


def _check_updatable(running_mean, running_var):
    """Running statistics about to be updated in place must hold one memory location a channel."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() > 1 and t.stride(0) == 0:
            raise ValueError(f"{name} is an expanded tensor (stride 0: its channels share one memory location), "
                             f"so it cannot be updated in place; pass one with storage of its own, e.g. "
                             f"{name}.clone()")


def _check_shape(name, t, shape):
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ShapeError(f"expected {name} of shape {list(shape)}, got {list(t.shape)}")


def _normalized_shape(input, normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape:
        raise ShapeError("normalized_shape must have at least one dimension, got []")
    k = len(shape)
    if input.dim() < k or tuple(input.shape[-k:]) != shape:
        raise ShapeError(f"Given normalized_shape={list(shape)}, expected input with shape [*, "
                         f"{', '.join(map(str, shape))}], but got input of size {list(input.shape)}")
    return shape


def _channels(input, what):
    if input.dim() < 2:
        raise ShapeError(f"{what} expects input of shape (N, C, *), got a {input.dim()}-D input of size "
                         f"{list(input.shape)}")
    return input.shape[1]


def check_per_channel(input, what, running_mean, running_var, weight, bias):
    """Batch and instance norm's tensors: input floating and (N, C, *); running statistics, weight
    and bias floating, on input's device, of shape [C]. Returns C."""
    _check_tensors(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    c = _channels(input, what)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_shape(name, t, (c,))
    return c


def _grad_needed(*tensors):
    if torch._C._get_tracing_state() is not None:  # a jit trace may be replayed with grad: keep statistics
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --- LayerNorm / RMSNorm -----------------------------------------------------------------------

def _check_variant(weight, offset, casting, out_dtype):
    """The variant arguments: a real offset (with a weight to offset), a known casting mode, a
    floating out_dtype. Returns the casting mode's canonical name."""
    if not isinstance(offset, numbers.Real) or isinstance(offset, bool):
        raise TypeError(f"offset must be a float, got {type(offset).__name__}")
    if offset and weight is None:
        raise ValueError(f"offset={offset} offsets the weight (y = x_hat * (offset + weight)), but weight is None")
    casting_dtypes(casting, None, None)  # raises for an unknown casting
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    return "fp32" if casting == "gemma" else casting


def _check_gate(input, gate, shape, activation, group_size):
    """A gate (checked floating, on input's device) of the input's shape, with no activation, and a
    group size dividing the one normalized dim. Returns the group size as the ops take it (0: the whole row)."""
    if gate is not None and gate.shape != input.shape:
        raise ShapeError(f"expected gate of the input's shape {list(input.shape)}, got {list(gate.shape)}")
    if gate is not None and activation != "none":
        raise ValueError("a gated norm takes no activation: its gate is silu(gate)")
    return _check_group_size(shape, group_size)


def _check_group_size(shape, group_size):
    """group_size None, or a positive int dividing the one normalized dim; returns it as the ops
    take it (0: the whole row)."""
    if group_size is None:
        return 0
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if len(shape) != 1 or shape[0] % group_size:
        raise ShapeError(f"group_size={group_size} must divide the one normalized dim; normalized_shape is "
                         f"{list(shape)}")
    return int(group_size)


def _check_row_args(input, residual, normalized_shape, weight, bias, rms, activation, offset, casting, out_dtype,
                    gate=None):
    """The tensors and variant arguments of a row norm, checked: (normalized shape, casting mode,
    activation name)."""
    _check_tensors(input, residual=residual, weight=weight, bias=bias, gate=gate)
    shape = _normalized_shape(input, normalized_shape)
    _check_shape("weight", weight, shape)
    _check_shape("bias", bias, shape)
    if not rms:
        _check_param_dtypes(input, weight=weight, bias=bias)
    if residual is not None and residual.shape != input.shape:
        raise ShapeError(f"expected residual of the input's shape {list(input.shape)}, got {list(residual.shape)}")
    return shape, _check_variant(weight, offset, casting, out_dtype), activation_name(activation)


def _row_norm(input, residual, normalized_shape, weight, bias, eps, rms, activation, gate=None, offset=0.0,
              casting="fp32", out_dtype=None, norm_before_gate=True, group_size=None):
    shape, casting, act = _check_row_args(input, residual, normalized_shape, weight, bias, rms, activation, offset,
                                          casting, out_dtype, gate=gate)
    group_size = _check_gate(input, gate, shape, act, group_size)
    inp_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    if out_dtype == inp_dtype:
        out_dtype = None
    if eps is None:  # torch's default: the epsilon of the dtype it computes in (fp32 for fp16/bf16)
        eps = torch.finfo(stat_dtype(inp_dtype)).eps
    spec = row_ops.RowNormSpec(shape, float(eps), rms, act, float(offset), casting, out_dtype,
                               bool(norm_before_gate), group_size)
    # no variant: the plain norm, which ATen's own norms compute too
    plain = (not offset and casting == "fp32" and out_dtype is None and gate is None and not group_size
             and norm_before_gate and inp_dtype == input.dtype)
    if ops.transformed(input, residual, weight, bias, gate):
        h = input + residual if residual is not None else None
        inp = input if h is None else h
        rounding = casting_dtypes(casting, inp.dtype, None if weight is None else weight.dtype)

        def norm(x, w, b, g):
            if plain:
                y = torch.rms_norm(x, shape, w, eps) if rms else torch.layer_norm(x, shape, w, b, eps)
                return activate(y, act)
            return row_ops._composite(spec, x, w, b, g, (rounding[0], rounding[1] if g is not None else None))

        return ops.in_torch(norm, inp, weight, bias, gate, out_dtype=out_dtype), h, None, None
    tensors = (input, residual, weight, bias, gate)
    how = ops.route("row_norm", input, spec, tensors, aten=plain and not rms)
    if how.implementation == "aten":  # with the residual add composed by torch too: the op only adds overhead
        h = None if residual is None else input + residual
        return torch.layer_norm(input if h is None else h, shape, weight, bias, eps), h, None, None
    return row_ops.row_norm(spec, input, residual, weight, bias, _grad_needed(*tensors), how, gate)


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, activation: Optional[str] = None,
               offset: float = 0.0, casting: str = "fp32", out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Layer normalization over the last ``len(normalized_shape)`` dims, like
    ``torch.nn.functional.layer_norm``: y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias.

    ``offset``: y = x_hat * (offset + weight) + bias (a zero-centred weight). ``casting``: where
    x_hat is rounded before the weight multiply, "fp32" (never: one rounding, of y; "gemma" is an
    alias), "llama" (to the input's dtype) or "t5" (to the weight's dtype, when it is fp16/bf16).
    ``out_dtype``: y's dtype (default: the input's)."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(layer_norm, (input, weight, bias), input, normalized_shape, weight, bias, eps,
                                     activation=activation, offset=offset, casting=casting, out_dtype=out_dtype)
    return _row_norm(input, None, normalized_shape, weight, bias, eps, False, activation, None, offset, casting,
                     out_dtype)[0]


def layer_norm_channels_first(input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                              eps: float = 1e-6, *, activation: Optional[str] = None) -> Tensor:
    """LayerNorm over dim 1 (the C channels) of an (N, C, *) tensor, ConvNeXt's channels_first
    LayerNorm (timm's LayerNorm2d): ``layer_norm(x.movedim(1, -1), (C,), weight, bias,
    eps).movedim(-1, 1)``, the output in the input's memory format, as a convolution's. The Triton
    kernels read NCHW and channels_last input in place, without the permuted copies; on the CPU (the
    torch backend) channels_last input is read in place and NCHW input is copied channels-last."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(layer_norm_channels_first, (input, weight, bias), input, weight, bias, eps,
                                     activation=activation)
    _check_tensors(input, weight=weight, bias=bias)
    c = _channels(input, "layer_norm_channels_first")
    _check_shape("weight", weight, (c,))
    _check_shape("bias", bias, (c,))
    _check_param_dtypes(input, weight=weight, bias=bias)
    spec = cf_ops.ChannelsFirstSpec(float(eps), activation_name(activation))
    if ops.transformed(input, weight, bias):
        return ops.in_torch(lambda x, w, b: cf_ops.composite(spec, x, w, b), input, weight, bias)
    how = ops.route("channels_first", input, spec, (input, weight, bias))
    return cf_ops.layer_norm_channels_first(spec, input, weight, bias, _grad_needed(input, weight, bias), how)[0]


def rms_norm(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, activation: Optional[str] = None, offset: float = 0.0,
             casting: str = "fp32", out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Root-mean-square normalization, like ``torch.nn.functional.rms_norm``:
    y = x / sqrt(mean(x^2) + eps) * weight; ``eps=None`` is the machine epsilon of the dtype the
    statistics are computed in (float32's for float16/bfloat16/float32 input, as torch does).
    ``offset``, ``casting``, ``out_dtype``: as in ``layer_norm`` (Gemma: offset=1.0; Llama:
    casting="llama"; T5: casting="t5")."""
    if has_torch_function_variadic(input, weight):
        return handle_torch_function(rms_norm, (input, weight), input, normalized_shape, weight, eps,
                                     activation=activation, offset=offset, casting=casting, out_dtype=out_dtype)
    return _row_norm(input, None, normalized_shape, weight, None, eps, True, activation, None, offset, casting,
                     out_dtype)[0]


def add_layer_norm(x: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, *, offset: float = 0.0, casting: str = "fp32",
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Pre-norm residual step: ``h = x + residual; return layer_norm(h), h``, fused in one pass. The
    residual may have another dtype (an fp32 residual stream with bf16 x): h is in the sum's dtype,
    as torch's ``x + residual``, and y in ``out_dtype`` (default: h's)."""
    if has_torch_function_variadic(x, residual, weight, bias):
        return handle_torch_function(add_layer_norm, (x, residual, weight, bias), x, residual, normalized_shape,
                                     weight, bias, eps, offset=offset, casting=casting, out_dtype=out_dtype)
    y, h, _, _ = _row_norm(x, residual, normalized_shape, weight, bias, eps, False, None, None, offset, casting,
                           out_dtype)
    return y, h


def add_rms_norm(x: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                 eps: Optional[float] = None, *, offset: float = 0.0, casting: str = "fp32",
                 out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Pre-norm residual step: ``h = x + residual; return rms_norm(h), h``, fused in one pass; the
    residual's dtype and ``out_dtype`` as in ``add_layer_norm``."""
    if has_torch_function_variadic(x, residual, weight):
        return handle_torch_function(add_rms_norm, (x, residual, weight), x, residual, normalized_shape, weight, eps,
                                     offset=offset, casting=casting, out_dtype=out_dtype)
    y, h, _, _ = _row_norm(x, residual, normalized_shape, weight, None, eps, True, None, None, offset, casting,
                           out_dtype)
    return y, h


def add_rms_norm_(x: Tensor, residual: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                  eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """In place, for inference (vLLM's ``fused_add_rms_norm``): ``residual += x``, then
    ``x = rms_norm(residual) * weight``, in one pass that writes both. Returns (x, residual).
    x and residual: contiguous, of one shape and dtype, not overlapping; no gradient can flow
    through an in-place update, so a call that needs one is an error (use ``add_rms_norm``)."""
    if has_torch_function_variadic(x, residual, weight):
        return handle_torch_function(add_rms_norm_, (x, residual, weight), x, residual, normalized_shape, weight, eps)
    _check_tensors(x, residual=residual, weight=weight)
    shape = _normalized_shape(x, normalized_shape)
    _check_shape("weight", weight, shape)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ShapeError(f"add_rms_norm_ writes x and residual in place: expected residual of x's shape and dtype "
                         f"{list(x.shape)} {x.dtype}, got {list(residual.shape)} {residual.dtype}")
    for name, t in (("x", x), ("residual", residual)):
        if not t.is_contiguous():
            raise ValueError(f"add_rms_norm_ writes {name} in place and needs it contiguous; pass "
                             f"{name}.contiguous() (and use the tensor you passed)")
    if not torch.compiler.is_compiling():  # traced, storage and inference tensors are the compiler's
        if x.numel() and x.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
            raise ValueError("add_rms_norm_: x and residual share storage; the in-place update needs two separate "
                             "tensors")
        if not torch.is_inference_mode_enabled() and (x.is_inference() or residual.is_inference()):
            raise RuntimeError("add_rms_norm_: x or residual is an inference tensor (made under "
                               "torch.inference_mode()), which can be updated in place only inside "
                               "torch.inference_mode(); call it there")
    if _grad_needed(x, residual, weight):
        raise RuntimeError("add_rms_norm_ updates x and residual in place, for inference: no gradient can flow "
                           "through it. Call it under torch.no_grad() / torch.inference_mode(), or use add_rms_norm, "
                           "which returns new tensors")
    if eps is None:
        eps = torch.finfo(stat_dtype(x.dtype)).eps
    row_ops.fused_add_rms_norm(x, residual, shape, weight, float(eps))
    return x, residual


def gated_rms_norm(input: Tensor, gate: Optional[Tensor], normalized_shape: Sequence[int],
                   weight: Optional[Tensor] = None, eps: Optional[float] = None, *, norm_before_gate: bool = True,
                   group_size: Optional[int] = None, offset: float = 0.0, casting: str = "fp32",
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Gated RMSNorm (Mamba2, Qwen3-Next): ``rms_norm(x) * weight * silu(gate)``, or with
    ``norm_before_gate=False`` ``rms_norm(x * silu(gate)) * weight``; ``group_size``: each row
    normalized in groups of that many consecutive values (Mamba2's ``n_groups``). ``gate=None``:
    no gate (a grouped RMSNorm). offset, casting, out_dtype as in ``rms_norm``."""
    if has_torch_function_variadic(input, gate, weight):
        return handle_torch_function(gated_rms_norm, (input, gate, weight), input, gate, normalized_shape, weight,
                                     eps, norm_before_gate=norm_before_gate, group_size=group_size, offset=offset,
                                     casting=casting, out_dtype=out_dtype)
    return _row_norm(input, None, normalized_shape, weight, None, eps, True, None, gate, offset, casting, out_dtype,
                     norm_before_gate, group_size)[0]


# --- norm + quantize, for inference ---------------------------------------------------------------

QUANT_DTYPES = tuple(QUANT_MAX)  # float8_e4m3fn, int8


def _row_norm_quant(input, residual, normalized_shape, weight, bias, eps, rms, activation, offset, casting, dtype,
                    scale, group_size):
    """The checks of rms_norm_quant / layer_norm_quant, then normops::row_norm_quant."""
    what = "rms_norm_quant" if rms else "layer_norm_quant"
    shape, casting, act = _check_row_args(input, residual, normalized_shape, weight, bias, rms, activation, offset,
                                          casting, None)
    if dtype not in QUANT_DTYPES:
        raise TypeError(f"{what}: dtype must be torch.float8_e4m3fn or torch.int8, got {dtype!r}")
    n = math.prod(shape)
    if group_size is not None:
        if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size <= 0:
            raise ValueError(f"{what}: group_size must be a positive int or None, got {group_size!r}")
        if n % group_size:
            raise ShapeError(f"{what}: group_size={group_size} must divide a row's {n} values "
                             f"(normalized_shape {list(shape)})")
        if scale is not None:
            raise ValueError(f"{what}: a given scale is one for the whole tensor (static); group_size asks for "
                             "dynamic scales per group: pass one of them")
    if scale is not None:
        scale = _static_scale(what, scale, input)
    inp_dtype = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    if eps is None:
        eps = torch.finfo(stat_dtype(inp_dtype)).eps
    q, scales, h = row_ops.row_norm_quant(input, residual, shape, weight, bias, float(eps), rms, act, float(offset),
                                          casting, dtype, scale, int(group_size or 0))
    return (q, scales) if residual is None else (q, scales, h)


def _static_scale(what, scale, input):
    """A given scale as the ops take it: a one-element fp32 tensor on input's device. A Python number
    is checked (finite, at least MIN_QUANT_SCALE, so that 1 / scale is finite); a tensor's value is
    not (that would wait for the device): below MIN_QUANT_SCALE it quantizes as MIN_QUANT_SCALE."""
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        if not (math.isfinite(scale) and scale >= MIN_QUANT_SCALE):
            raise ValueError(f"{what}: scale must be finite and at least 2**-126 (fp32's smallest normal, whose "
                             f"reciprocal is finite), got {scale!r}")
        return torch.tensor(float(scale), dtype=torch.float32, device=input.device)
    if not isinstance(scale, Tensor) or not scale.is_floating_point() or scale.numel() != 1:
        got = f"a {scale.dtype} tensor of shape {list(scale.shape)}" if isinstance(scale, Tensor) \
            else type(scale).__name__
        raise TypeError(f"{what}: scale must be a float or a one-element floating-point tensor (one scale for the "
                        f"tensor), got {got}")
    if scale.device != input.device:
        raise RuntimeError(f"{what}: expected scale on {input.device} like input, but it is on {scale.device}")
    return scale.detach().to(torch.float32)


def rms_norm_quant(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                   eps: Optional[float] = None, *, residual: Optional[Tensor] = None,
                   dtype: torch.dtype = torch.float8_e4m3fn, scale=None, group_size: Optional[int] = None,
                   activation: Optional[str] = None, offset: float = 0.0, casting: str = "fp32"):
    """``rms_norm`` with its output quantized for an fp8/int8 matrix multiply, in one pass (for
    inference: no gradient). Returns ``(q, scales)``, or ``(q, scales, h)`` with ``residual``
    (``h = input + residual`` is added first, normalized and returned, as ``add_rms_norm``).

    y = rms_norm(h) in h's dtype (exactly what ``rms_norm`` returns), then, in fp32,
    ``q = round(y * (1 / scale))`` saturated at ``dtype``'s finite max (448 for float8_e4m3fn,
    [-128, 127] for int8), rounded to nearest even; so ``q * scale ~ y``.

    ``dtype``: torch.float8_e4m3fn (default) or torch.int8. ``scale``: None for dynamic scales,
    ``max(amax |y| / qmax, 2**-126)`` (a row of zeros gets 2**-126, never 0), one per row, or with
    ``group_size=k`` one per k consecutive values of a row (e.g. 128). ``scales`` is fp32 of shape
    ``input.shape[:-len(normalized_shape)] + (values a row // k,)`` (k = the whole row without
    ``group_size``: one scale a row, its last dim 1), row-major, so
    ``q.float().unflatten(-1, (-1, k)) * scales[..., None]`` dequantizes. A given ``scale`` (a float
    or a one-element tensor: static, per tensor, positive; a float at least 2**-126, a tensor below
    it quantizing as 2**-126) is returned as ``scales`` (fp32).
    ``activation``, ``offset``, ``casting``: as in ``rms_norm``."""
    if has_torch_function_variadic(input, weight, residual):
        return handle_torch_function(rms_norm_quant, (input, weight, residual), input, normalized_shape, weight, eps,
                                     residual=residual, dtype=dtype, scale=scale, group_size=group_size,
                                     activation=activation, offset=offset, casting=casting)
    return _row_norm_quant(input, residual, normalized_shape, weight, None, eps, True, activation, offset, casting,
                           dtype, scale, group_size)


def layer_norm_quant(input: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5, *, residual: Optional[Tensor] = None,
                     dtype: torch.dtype = torch.float8_e4m3fn, scale=None, group_size: Optional[int] = None,
                     activation: Optional[str] = None, offset: float = 0.0, casting: str = "fp32"):
    """``layer_norm`` with its output quantized: the arguments and results of ``rms_norm_quant``."""
    if has_torch_function_variadic(input, weight, bias, residual):
        return handle_torch_function(layer_norm_quant, (input, weight, bias, residual), input, normalized_shape,
                                     weight, bias, eps, residual=residual, dtype=dtype, scale=scale,
                                     group_size=group_size, activation=activation, offset=offset, casting=casting)
    return _row_norm_quant(input, residual, normalized_shape, weight, bias, eps, False, activation, offset, casting,
                           dtype, scale, group_size)


# --- adaLN modulation (DiT, SD3, Flux) -----------------------------------------------------------

_ADA_CASTINGS = ("fp32", "torch", "t5")  # "t5": ada_rms_norm's only (diffusers' RMSNorm)


def _per_sample(name, t, b, d):
    """scale, shift or gate: (B, D), or diffusers' (B, 1, D) (``scale[:, None]``), as (B, D)."""
    if t is None:
        return None
    if tuple(t.shape) not in ((b, d), (b, 1, d)):
        raise ShapeError(f"expected {name} of shape [{b}, {d}] (or [{b}, 1, {d}]), one row per sample of the "
                         f"input [B, *, D] = {[b, '*', d]}; got {list(t.shape)}")
    return t.reshape(b, d)


def _ada_norm(input, scale, shift, eps, weight, bias, residual, gate, casting, rms):
    _check_tensors(input, scale=scale, shift=shift, residual=residual, gate=gate, weight=weight, bias=bias)
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            raise TypeError(f"{name} must be a Tensor of shape (B, D), got None")
    if input.dim() < 2:
        raise ShapeError(f"expected input of shape (B, *, D), at least 2-D, got a {input.dim()}-D input of size "
                         f"{list(input.shape)}")
    b, d = input.shape[0], input.shape[-1]
    scale, shift, gate = (_per_sample(n, t, b, d) for n, t in (("scale", scale), ("shift", shift), ("gate", gate)))
    _check_shape("weight", weight, (d,))
    _check_shape("bias", bias, (d,))
    if not rms:
        _check_param_dtypes(input, weight=weight, bias=bias)
    if residual is not None and residual.shape != input.shape:
        raise ShapeError(f"expected residual of the input's shape {list(input.shape)}, got {list(residual.shape)}")
    if gate is not None and residual is None:
        raise ValueError("gate multiplies the input before the residual add (h = residual + gate * input): "
                         "it needs a residual")
    castings = _ADA_CASTINGS if rms else _ADA_CASTINGS[:2]
    if casting not in castings:
        raise ValueError(f"unknown casting {casting!r}; expected one of {', '.join(map(repr, castings))}"
                         + ("" if casting != "t5" else " (\"t5\" is RMSNorm's: ada_rms_norm)"))
    hd = input.dtype if residual is None else torch.promote_types(input.dtype, residual.dtype)
    if eps is None:  # torch's rms_norm default: the epsilon of the dtype it computes in
        eps = torch.finfo(stat_dtype(hd)).eps
    spec = ada_ops.AdaNormSpec(float(eps), rms, casting)
    x3 = input.reshape(b, math.prod(input.shape[1:-1]), d)
    r3 = None if residual is None else residual.reshape(x3.shape)
    if ops.transformed(input, residual, gate, scale, shift, weight, bias):
        y, h = ada_ops.composite(spec, x3, r3, gate, scale, shift, weight, bias)
    else:
        tensors = (x3, r3, gate, scale, shift, weight, bias)
        how = ops.route("ada_norm", x3, spec, tensors)
        y, h, _, _ = ada_ops.ada_norm(spec, x3, r3, gate, scale, shift, weight, bias, _grad_needed(*tensors), how)
    y = y.reshape(input.shape)
    return y if residual is None else (y, h.reshape(input.shape))


def ada_layer_norm(input: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, *, residual: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                   casting: str = "fp32"):
    """adaLN modulation, fused (DiT's adaLN-Zero block step, diffusers' AdaLayerNorm*): input (B, *, D)
    normalized over D, then modulated per sample, scale and shift (B, D) (or (B, 1, D)) broadcast
    over the middle dims:

        h = input, or with a residual  h = residual + gate[:, None] * input   (gate None: residual + input)
        y = layer_norm(h, (D,), weight, bias, eps) * (1 + scale[:, None]) + shift[:, None]

    Returns y, or (y, h) with a residual (h: the next block's residual stream). ``casting``: "fp32"
    (every step in fp32, fp64 for fp64, one rounding to h's dtype at the end) or "torch" (each step
    rounded to h's dtype as diffusers' torch composition rounds it: bit for bit on the torch backend,
    within an ulp on the kernels). Differentiable in every tensor."""
    if has_torch_function_variadic(input, scale, shift, weight, bias, residual, gate):
        return handle_torch_function(ada_layer_norm, (input, scale, shift, weight, bias, residual, gate), input,
                                     scale, shift, eps, weight, bias, residual=residual, gate=gate, casting=casting)
    return _ada_norm(input, scale, shift, eps, weight, bias, residual, gate, casting, False)


def ada_rms_norm(input: Tensor, scale: Tensor, shift: Tensor, eps: Optional[float] = None,
                 weight: Optional[Tensor] = None, *, residual: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                 casting: str = "fp32"):
    """``ada_layer_norm`` with RMSNorm (no centering, no bias): y = rms_norm(h, (D,), weight, eps) *
    (1 + scale[:, None]) + shift[:, None]; eps None: torch's rms_norm default. One more casting,
    "t5": "torch"'s roundings with diffusers' RMSNorm for the norm (T5LayerNorm's rounding: x_hat
    rounded to a float16/bfloat16 weight's dtype before the weight multiply; no weight: to h's
    dtype), i.e. diffusers' ``RMSNorm(x) * (1 + scale)[:, None] + shift[:, None]`` (its
    AdaLayerNormContinuous with norm_type="rms_norm") when the weight, if any, is in h's dtype."""
    if has_torch_function_variadic(input, scale, shift, weight, residual, gate):
        return handle_torch_function(ada_rms_norm, (input, scale, shift, weight, residual, gate), input, scale,
                                     shift, eps, weight, residual=residual, gate=gate, casting=casting)
    return _ada_norm(input, scale, shift, eps, weight, None, residual, gate, casting, True)

# --- GroupNorm / InstanceNorm ------------------------------------------------------------------

def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, activation: Optional[str] = None) -> Tensor:
    """Group normalization, like ``torch.nn.functional.group_norm``: the C channels are split into
    ``num_groups`` groups, each normalized over its channels and all spatial positions, per sample."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm, (input, weight, bias), input, num_groups, weight, bias, eps,
                                     activation=activation)
    _check_tensors(input, weight=weight, bias=bias)
    num_groups, c = _check_groups(input, num_groups, "group_norm")
    _check_shape("weight", weight, (c,))
    _check_shape("bias", bias, (c,))
    _check_param_dtypes(input, weight=weight, bias=bias)
    act = activation_name(activation)
    if ops.transformed(input, weight, bias):
        def norm(x, w, b):
            return activate(torch.group_norm(x, num_groups, w, b, eps, torch.backends.cudnn.enabled), act)

        return ops.in_torch(norm, input, weight, bias)
    spec = group_ops.GroupNormSpec(num_groups, float(eps), act)
    # Not to ATen with a bias but no weight: torch.group_norm's backward then fails ("tensor does not
    # have a device", torch 2.13), the op's computes the bias gradient. Nor for a channels_last input
    # that needs no gradient: torch 2.13's CPU backward then crashes (SIGSEGV) computing dweight/dbias alone.
    how = ops.route("group_norm", input, spec, (input, weight, bias),
                    aten=(weight is not None or bias is None) and (input.requires_grad or input.is_contiguous()))
    if how.implementation == "aten":
        return torch.group_norm(input, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    return group_ops.group_norm(spec, input, weight, bias, _grad_needed(input, weight, bias), how)[0]


def _num_groups(input, num_groups, what):
    """num_groups an int (as torch's group_norm takes it) dividing input's C. Returns it as an int."""
    if isinstance(num_groups, bool) or not hasattr(type(num_groups), "__index__"):
        raise TypeError(f"{what}(): argument 'num_groups' must be int, not {type(num_groups).__name__}")
    num_groups = operator.index(num_groups)
    c = _channels(input, what)
    if num_groups <= 0 or c % num_groups:
        raise ShapeError(f"Expected number of channels in input to be divisible by num_groups, but got input "
                         f"of shape {list(input.shape)} and num_groups={num_groups}")
    return num_groups


def _check_groups(input, num_groups, what):
    """(num_groups as an int, C) of a group norm's call, checked as torch checks them."""
    num_groups = _num_groups(input, num_groups, what)
    c = input.shape[1]
    if input.shape[0] * (c // num_groups) * math.prod(input.shape[2:]) == 1:  # as torch refuses it
        raise ShapeError(f"Expected more than 1 value per group, got input of size {list(input.shape)} "
                         f"with num_groups={num_groups}")
    return num_groups, c


def _modulation(name, t, input):
    """An (N, C) per-(sample, channel) modulation of input (N, C, *), also taken as (N, C, 1, ...),
    the way diffusers' AdaGroupNorm makes it (``emb[:, :, None, None].chunk(2, 1)``): as (N, C)."""
    if t is None:
        raise TypeError(f"ada_group_norm(): {name} must be a Tensor, got None")
    nc = tuple(input.shape[:2])
    if t.dim() < 2 or t.dim() > input.dim() or tuple(t.shape[:2]) != nc or any(d != 1 for d in t.shape[2:]):
        raise ShapeError(f"expected {name} of shape {list(nc)} (or {list(nc)} followed by 1s, at most "
                         f"{input.dim()} dims in all) for input of shape {list(input.shape)}, got {list(t.shape)}")
    return t.reshape(nc)


def ada_group_norm(input: Tensor, num_groups: int, scale: Tensor, shift: Tensor, eps: float = 1e-5, *,
                   activation: Optional[str] = None, casting: str = "fp32") -> Tensor:
    """GroupNorm modulated per sample, diffusers' AdaGroupNorm (and ResnetBlock2D's "scale_shift" time
    embedding): ``act(group_norm(input, num_groups, eps=eps) * (1 + scale) + shift)``, with scale and
    shift per (sample, channel), of shape (N, C) or (N, C, 1, ...). One pass: the GroupNorm op with
    [N, C] parameters weight = 1 + scale, bias = shift (computed in the statistics dtype).
    ``casting``: "fp32" (every step in fp32, fp64 for fp64, one rounding at the end) or "torch"
    (group_norm's output, 1 + scale, the product and the sum each rounded to the input's dtype, as
    diffusers' AdaGroupNorm rounds them; the backward is the same, the roundings straight-through)."""
    if has_torch_function_variadic(input, scale, shift):
        return handle_torch_function(ada_group_norm, (input, scale, shift), input, num_groups, scale, shift, eps,
                                     activation=activation, casting=casting)
    if casting not in _ADA_CASTINGS:
        raise ValueError(f"unknown casting {casting!r}; expected one of {', '.join(map(repr, _ADA_CASTINGS))}")
    _check_tensors(input, scale=scale, shift=shift)
    num_groups, _ = _check_groups(input, num_groups, "ada_group_norm")
    scale, shift = _modulation("scale", scale, input), _modulation("shift", shift, input)
    _check_param_dtypes(input, scale=scale, shift=shift)
    act = activation_name(activation)
    if ops.transformed(input, scale, shift):
        view = input.shape[:2] + (1,) * (input.dim() - 2)

        def norm(x, s, t):
            y = torch.group_norm(x, num_groups, None, None, eps, torch.backends.cudnn.enabled)
            return activate(y * (1 + s.reshape(view)) + t.reshape(view), act)

        return ops.in_torch(norm, input, scale, shift)
    sd = stat_dtype(input)
    # "torch": 1 + scale rounded to the input's dtype (exact in sd), as the other steps
    weight = (scale.to(input.dtype) + 1).to(sd) if casting == "torch" else scale.to(sd) + 1
    bias = shift.to(sd)
    spec = group_ops.GroupNormSpec(num_groups, float(eps), act, casting=casting)
    how = ops.route("group_norm", input, spec, (input, weight, bias))
    return group_ops.group_norm(spec, input, weight, bias, _grad_needed(input, weight, bias), how)[0]


def _running_pair(running_mean, running_var):
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both tensors or both None)")


def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5, *, activation: Optional[str] = None) -> Tensor:
    """Instance normalization, like ``torch.nn.functional.instance_norm``: each (sample, channel)
    normalized over its spatial positions. With ``use_input_stats`` and running statistics given,
    those are updated with the mean over the batch of the per-instance statistics."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(instance_norm, (input, running_mean, running_var, weight, bias), input,
                                     running_mean, running_var, weight, bias, use_input_stats, momentum, eps,
                                     activation=activation)
    c = check_per_channel(input, "instance_norm", running_mean, running_var, weight, bias)
    _check_momentum("instance_norm", momentum)
    _running_pair(running_mean, running_var)
    _check_param_dtypes(input, weight=weight, bias=bias)
    # torch's instance_norm refuses an fp32 bias without a weight, with fp16/bf16 input, beside
    # running statistics (of any dtype); with a weight, or without running statistics, it takes it
    if running_mean is not None and weight is None and bias is not None and bias.dtype != input.dtype:
        raise DtypeError(f"expected bias of the input's dtype {input.dtype} (with no weight, beside running "
                         f"statistics), as torch requires; got {bias.dtype}")
    # torch's instance_norm takes running statistics of any dtypes, except a running_mean of the
    # input's dtype beside a running_var of another (ATen's batch norm then reads both as the input's)
    if running_mean is not None and running_mean.dtype == input.dtype != running_var.dtype:
        raise DtypeError(f"expected running_var of the input's dtype {input.dtype} like running_mean, as torch "
                         f"requires; got {running_var.dtype}")
    act = activation_name(activation)
    if use_input_stats and math.prod(input.shape[2:]) == 1:
        raise ShapeError(f"Expected more than 1 spatial element when training, got input size {input.shape}")
    if not use_input_stats and running_mean is None:
        raise ValueError("Expected running_mean and running_var to be defined when use_input_stats is False")
    if use_input_stats:
        _check_updatable(running_mean, running_var)
    if ops.transformed(input, weight, bias, running_mean, running_var):
        def norm(x, w, b, rm, rv):
            y = torch.instance_norm(x, w, b, rm, rv, use_input_stats, momentum, eps, torch.backends.cudnn.enabled)
            return activate(y, act)

        y = ops.in_torch(norm, input, weight, bias, buffers=(running_mean, running_var))
        return y.contiguous()
    spec = group_ops.GroupNormSpec(c, float(eps), act, instance=True)
    how = ops.route("group_norm", input, spec, (input, weight, bias, running_mean, running_var), aten=True)
    if how.implementation == "aten":
        return torch.instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                                   torch.backends.cudnn.enabled)
    if use_input_stats:
        y = group_ops.group_norm(spec, input, weight, bias, _grad_needed(input, weight, bias), how)[0]
        if running_mean is not None and input.numel():
            # An exact pass of its own: recovering var from the op's rstd (rstd^-2 - eps) cancels
            # when var <~ eps, down to a negative running_var for a constant channel.
            # Each statistic in its own buffer's dtype, as torch's update computes it.
            spatial = tuple(range(2, input.dim()))
            with torch.no_grad():
                var, mean = torch.var_mean(input.detach().to(running_mean.dtype), dim=spatial, correction=1)
                if running_var.dtype != running_mean.dtype:
                    var = torch.var(input.detach().to(running_var.dtype), dim=spatial, correction=1)
            ops.update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), float(momentum))
    else:  # running statistics of any dtype, as torch takes them: read in the one the op computes in
        sd = stat_dtype(input)
        y = batch_ops.batch_norm(batch_ops.BatchNormSpec(False, float(eps), act), input, weight, bias,
                                 running_mean.to(sd), running_var.to(sd), _grad_needed(input, weight, bias))[0]
    return y.contiguous()  # torch's instance_norm returns a contiguous tensor, whatever the input's layout


# --- BatchNorm ---------------------------------------------------------------------------------

def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, activation: Optional[str] = None) -> Tensor:
    """Batch normalization, like ``torch.nn.functional.batch_norm``: per channel (dim 1), over the batch
    and spatial dims. In training the batch statistics normalize and, when given, the running
    statistics are updated in place (mean, and the unbiased variance); otherwise the running ones
    normalize."""
    if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
        return handle_torch_function(batch_norm, (input, running_mean, running_var, weight, bias), input,
                                     running_mean, running_var, weight, bias, training, momentum, eps,
                                     activation=activation)
    if isinstance(input, Tensor) and input.dim() == 1 and input.numel() == 0:
        return input.clone()  # torch returns a copy of it (an OpInfo sample): nothing to normalize
    check_per_channel(input, "batch_norm", running_mean, running_var, weight, bias)
    _check_momentum("batch_norm", momentum)
    # torch's own checks, in its order (eps: a zero variance would divide by zero)
    if training and input.shape[0] * math.prod(input.shape[2:]) == 1:
        raise ShapeError(f"Expected more than 1 value per channel when training, got input size {input.shape}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    _running_pair(running_mean, running_var)
    _check_param_dtypes(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    act = activation_name(activation)
    if training:
        _check_updatable(running_mean, running_var)
    elif running_mean is None:
        raise ShapeError("running_mean must be defined in evaluation mode")
    if ops.transformed(input, weight, bias, running_mean, running_var):
        def norm(x, w, b, rm, rv):
            y = torch.batch_norm(x, w, b, rm, rv, training, momentum, eps, torch.backends.cudnn.enabled)
            return activate(y, act)

        return ops.in_torch(norm, input, weight, bias, buffers=(running_mean, running_var))
    spec = batch_ops.BatchNormSpec(training, float(eps), act)
    how = ops.route("batch_norm", input, spec, (input, weight, bias, running_mean, running_var), aten=True)
    if how.implementation == "aten":
        return torch.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                torch.backends.cudnn.enabled)
    fused = training and running_mean is not None and batch_ops.fuses_running_update(how)
    y, mean, _, var = batch_ops.batch_norm(spec, input, weight, bias, None if training and not fused else running_mean,
                                           None if training and not fused else running_var,
                                           _grad_needed(input, weight, bias), how, float(momentum) if fused else None)
    if training and running_mean is not None and input.numel() and not fused:
        ops.update_running_stats(running_mean, running_var, mean, var, float(momentum))
    return y


# --- GroupNorm over chunks: statistics, their combination, apply --------------------------------

def _group_stats(stats, what, index=None):
    """stats as a GroupStats: three tensors on one device, int64 counts and floating mean and M2 of
    one dtype, each [N, G]."""
    where = "" if index is None else f" (stats[{index}])"
    if not isinstance(stats, tuple) or len(stats) != 3 or not all(isinstance(t, Tensor) for t in stats):
        raise TypeError(f"{what}(): expected a GroupStats (count, mean, m2), as group_norm_stats returns it{where}, "
                        f"got {type(stats).__name__}")
    count, mean, m2 = stats
    if count.dtype != torch.int64 or not mean.is_floating_point() or m2.dtype != mean.dtype:
        raise DtypeError(f"{what}(): expected GroupStats with int64 count and floating mean and m2 of one dtype"
                         f"{where}, got {count.dtype}, {mean.dtype}, {m2.dtype}")
    if mean.dim() != 2 or count.shape != mean.shape or m2.shape != mean.shape:
        raise ShapeError(f"{what}(): expected GroupStats of shape [N, num_groups] each{where}, got count "
                         f"{list(count.shape)}, mean {list(mean.shape)}, m2 {list(m2.shape)}")
    if count.device != mean.device or m2.device != mean.device:
        raise RuntimeError(f"{what}(): expected count, mean and m2 on one device{where}, got {count.device}, "
                           f"{mean.device}, {m2.device}")
    return GroupStats(count, mean, m2)


def group_norm_stats(input: Tensor, num_groups: int) -> GroupStats:
    """The GroupNorm statistics of ``input`` (N, C, *), a piece of a larger tensor (a tile, some
    frames), per (sample, group): ``GroupStats(count, mean, m2)``, each (N, num_groups): the number
    of values (int64), their mean and their sum of squared deviations from it (fp32; fp64 for fp64
    input). A piece with no values gives count 0, mean 0, m2 0. Combine the pieces' statistics with
    ``combine_group_stats``, normalize each piece with ``group_norm_apply``: the result is
    ``group_norm`` of the whole, however it was split along its spatial dims."""
    if has_torch_function_variadic(input):
        return handle_torch_function(group_norm_stats, (input,), input, num_groups)
    _check_tensors(input)
    num_groups = _num_groups(input, num_groups, "group_norm_stats")
    return group_stats_ops.group_norm_stats(input, num_groups, _grad_needed(input))


def combine_group_stats(stats: Sequence[GroupStats]) -> GroupStats:
    """The statistics of the union of pieces, from each piece's ``GroupStats`` (Chan's parallel
    formula, exact up to rounding, as a balanced tree): the whole's GroupStats."""
    if isinstance(stats, Tensor) or not isinstance(stats, Sequence) or (stats and not isinstance(stats[0], tuple)):
        raise TypeError(f"combine_group_stats(): expected a sequence of GroupStats, got {type(stats).__name__}"
                        f"{'' if not isinstance(stats, Sequence) or not stats else ' of ' + type(stats[0]).__name__}")
    if not stats:
        raise ValueError("combine_group_stats(): expected at least one GroupStats, got an empty sequence")
    checked = [_group_stats(s, "combine_group_stats", i) for i, s in enumerate(stats)]
    first = checked[0]
    for i, s in enumerate(checked[1:], 1):
        if s.mean.shape != first.mean.shape or s.mean.dtype != first.mean.dtype or s.mean.device != first.mean.device:
            raise ShapeError(f"combine_group_stats(): stats[{i}] is {list(s.mean.shape)} {s.mean.dtype} on "
                             f"{s.mean.device}, stats[0] {list(first.mean.shape)} {first.mean.dtype} on "
                             f"{first.mean.device}: pieces of one tensor have one shape [N, num_groups], dtype "
                             f"and device")
    if len(checked) == 1:
        return first
    grad = _grad_needed(*(t for s in checked for t in (s.mean, s.m2)))
    return group_stats_ops.combine_group_stats(checked, grad)


def group_norm_apply(input: Tensor, stats: GroupStats, num_groups: int, weight: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, eps: float = 1e-5, *, activation: Optional[str] = None) -> Tensor:
    """``group_norm`` of ``input`` (N, C, *) with the given statistics (from ``group_norm_stats``
    of the whole, or ``combine_group_stats`` of its pieces'): y = act((x - mean) * rstd * weight +
    bias), rstd = 1 / sqrt(m2 / count + eps), in input's dtype and memory format."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(group_norm_apply, (input, weight, bias), input, stats, num_groups, weight, bias,
                                     eps, activation=activation)
    _check_tensors(input, weight=weight, bias=bias)
    num_groups = _num_groups(input, num_groups, "group_norm_apply")
    stats = _group_stats(stats, "group_norm_apply")
    c = input.shape[1]
    _check_shape("weight", weight, (c,))
    _check_shape("bias", bias, (c,))
    _check_param_dtypes(input, weight=weight, bias=bias)
    if tuple(stats.mean.shape) != (input.shape[0], num_groups):
        raise ShapeError(f"group_norm_apply(): expected stats of shape [N, num_groups] = "
                         f"{[input.shape[0], num_groups]} for input {list(input.shape)} with num_groups={num_groups}, "
                         f"got {list(stats.mean.shape)}")
    if stats.mean.dtype != stat_dtype(input):
        raise DtypeError(f"group_norm_apply(): expected stats in {stat_dtype(input)} for {input.dtype} input (as "
                         f"group_norm_stats computes them), got {stats.mean.dtype}")
    if stats.mean.device != input.device:
        raise RuntimeError(f"group_norm_apply(): expected stats on {input.device} like input, got {stats.mean.device}")
    if not torch.compiler.is_compiling() and input.numel() and not bool((stats.count > 0).all()):
        raise ValueError("group_norm_apply(): stats with count 0 (the statistics of no values) cannot normalize: "
                         "combine the statistics of every piece first (combine_group_stats)")
    act = activation_name(activation)
    grad = _grad_needed(input, weight, bias, stats.mean, stats.m2)
    return group_stats_ops.group_norm_apply(input, num_groups, stats, weight, bias, float(eps), act, grad)
