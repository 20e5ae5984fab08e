"""Backends: who computes a norm, chosen per call from the tensor's device.

| backend  | device                          | what it is                                                   |
|----------|---------------------------------|--------------------------------------------------------------|
| "torch"  | CPU default (and any device)    | ATen's native norm kernels, fused extras composed around them |
| "triton" | CUDA default; CPU with          | normops' Triton kernels (row, group and batch norms)          |
|          | ``TRITON_INTERPRET=1``          |                                                              |
| "numpy"  | any (copies to host)            | from-scratch float64 reference, the test oracle               |

Choose one with ``normops.set_backend(name)``, ``with normops.backend(name):`` or the
environment variable ``NORMOPS_BACKEND`` (read on every call). Precedence: the innermost
``with backend(...)``, then ``set_backend``, then ``NORMOPS_BACKEND``, then the device default.

Scopes: ``set_backend`` is process-wide (every thread and task sees it). ``with backend(...)`` is a
``contextvars`` setting, like ``decimal.localcontext``: it holds for the code in the block and what
that code calls, in its own thread and asyncio task only. Each asyncio task runs in a copy of its
creator's context, so tasks that interleave inside different blocks each keep their own; a new
thread starts without it (the default context). A generator that yields from inside a block
leaves the block's backend in force for its consumer until it resumes (as with any context
variable), but a block the consumer opens meanwhile is innermost, and each block's exit removes its
own setting only, whatever the order the blocks close in.

The contract every backend module implements (tensors in, tensors out, ``None`` for "absent"):

    row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats, *,
                 offset=0.0, casting="fp32", out_dtype=None, gate=None, norm_before_gate=True, group_size=0)
        -> (y, h, mean, rstd)
    row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, *,
                 offset=0.0, casting="fp32", gate=None, norm_before_gate=True, group_size=0)
        -> (dx, dweight, dbias, dgate)
    group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, casting="fp32")
        -> (y, mean, rstd)
    group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask)
        -> (dx, dweight, dbias)
    batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation)
        -> (y, save_mean, save_rstd, batch_var)
    batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                   training, eps, activation, output_mask) -> (dx, dweight, dbias)
    layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats) -> (y, mean, rstd)
    layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask) -> (dx, dweight, dbias)
        (channels-first LayerNorm: dim 1 of (N, C, *) normalized, statistics [N, *S], y and dx in x's
        layout, NCHW or channels_last, read in place)
    quantize(y, k, dtype, scale=None, group_size=0) -> (q, scales)
        (inference, normops::row_norm_quant: a row norm's y, in its own dtype, over its last k dims;
        in fp32 q = round(y * (1 / scale)) saturated at normops.core.QUANT_MAX[dtype] (int8: [-128,
        127]), to nearest even; ``scale`` a one-element fp32 tensor (static, returned as scales) or
        None: per row (group_size 0) or per group_size consecutive values of a row, max(amax |y| /
        QUANT_MAX, MIN_QUANT_SCALE), fp32 of shape batch + (n // group_size or 1,), divided rounded to
        nearest, as torch divides. The op runs row_norm_fwd, then quantize, unless the backend fuses
        both: row_norm_quant_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, *,
        offset, casting, dtype, scale, group_size) -> (q, scales, h), the triton backend's)

Shapes and dtypes:
- Statistics (mean, rstd, save_*, batch_var) are float32, or float64 when x is float64.
  Row norm: shape ``x.shape[:-len(normalized_shape)]``; group norm: ``[N, G]``; batch norm: ``[C]``.
- Row norm: ``h = x + residual`` (in ``torch.promote_types(x, residual)``, as torch's add: an fp32
  residual stream under bf16 x) when a residual is given, else ``None``; the statistics are those
  of ``inp`` = h (or x). ``mean`` is ``None`` for RMSNorm; both are ``None`` unless
  ``need_stats``. ``y`` is contiguous, as torch's layer_norm returns it, in ``out_dtype`` (default
  inp's dtype). The variants, in the statistics dtype ACC:
      u = inp, times silu(gate) when a gate comes first (``norm_before_gate=False``)
      statistics of u per row, or per group of ``group_size`` consecutive values of the (one)
      normalized dim (statistics of shape batch + (groups,)); x_hat = (u - mean) * rstd
      casting "fp32" ("gemma"): x_hat kept in ACC; "llama": rounded to inp's dtype; "t5": rounded
      to the weight's dtype when that is fp16/bf16 (the Hugging Face modules' arithmetic)
      z = x_hat * (offset + w) + b; a gate after the norm: z * silu(gate), with "llama" z first
      rounded to promote_types(w, inp); y = act(z) in out_dtype.
  The backward's roundings are straight-through, but dw = sum(dz * x_hat as rounded). ``dgate`` is
  in gate's dtype; ``output_mask`` has a fourth entry for it (a 3-entry mask: no dgate). The
  triton backend's ``row_norm_fwd`` also takes ``out=(y, h)`` (``WRITES_INTO``): the in-place fused
  add writes x and the residual from its kernels; its ``row_norm_bwd`` takes ``dh``, ``dx_dtype``
  and ``dresidual_dtype`` (``FUSES_RESIDUAL_GRADS``): the gradient of h from later layers added to
  dx, written for x in its dtype and, for a residual of another dtype, once more in that dtype (a
  fifth result), in the one backward kernel; for the other backends the op composes that.
- Group and batch norm keep x's memory format (channels_last in, channels_last out).
- Batch norm in training: batch statistics over every dim but 1; ``batch_var`` is the
  unbiased variance that feeds the running average. Not training: ``running_*`` normalize,
  ``save_*`` and ``batch_var`` are ``None``. Backends never modify ``running_*``, but for the triton backend given ``momentum=`` (training): it updates them in place, in its kernels.
- ``activation`` is one of "none", "relu", "silu", "gelu" (erf form); it applies to the
  affine output, ``y = act(x_hat * w + b)``. Backward recomputes its input from x and the
  statistics.
- ``output_mask`` is ``[dx, dweight, dbias]`` booleans (row norm: and dgate); a gradient not asked
  for is ``None``. ``dy``'s dtype is the output's; dx's is x's; dweight/dbias come back in weight's dtype.
"""
import contextlib
import contextvars
import importlib
import os

BACKENDS = ("torch", "triton", "numpy")
_MODULES = {"torch": "torch_backend", "triton": "triton_backend", "numpy": "numpy_backend"}

_loaded = {}
# The open `with backend(...)` blocks of this thread / asyncio task, innermost last: a context
# variable, not a thread-local, since tasks on one thread interleave and each must keep its own.
# Entries are (name, marker) and a block's exit removes its own by identity: blocks entered in a
# generator and in its consumer can close out of order, which a token reset would get wrong.
_context = contextvars.ContextVar("normops_backend", default=())
_global = None  # set_backend's choice


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown normops backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    return name


def set_backend(name):
    """Use backend ``name`` for every later call in this process, in every thread and task, unless a
    ``with backend(...)`` block says otherwise (``None`` restores the default)."""
    global _global
    _global = None if name is None else _check_name(name)


@contextlib.contextmanager
def backend(name):
    """``with normops.backend("numpy"): ...`` uses that backend inside the block, in this thread and
    asyncio task only; the previous choice is back when the block exits, by error or not."""
    entry = (_check_name(name), object())
    _context.set(_context.get() + (entry,))
    try:
        yield
    finally:
        _context.set(tuple(e for e in _context.get() if e is not entry))


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def current_backend(device):
    """The backend name a call on ``device`` uses now."""
    return backend_choice(device)[0]


def backend_choice(device):
    """(backend name, what chose it) for a call on ``device`` now, by the precedence above."""
    blocks = _context.get()
    if blocks:
        return blocks[-1][0], "with normops.backend(...)"
    if _global is not None:
        return _global, "normops.set_backend(...)"
    env = backend_from_env()
    if env:
        return env, "NORMOPS_BACKEND"
    kind = torch_device_type(device)
    return _DEFAULTS.get(kind) or ("torch", f"the {kind} default")


_DEFAULTS = {"cuda": ("triton", "the cuda default"), "cpu": ("torch", "the cpu default")}


def backend_from_env():
    """The backend NORMOPS_BACKEND names (None when unset or empty); ValueError when it names none."""
    env = os.environ.get("NORMOPS_BACKEND")
    if env and env not in BACKENDS:
        raise ValueError(f"NORMOPS_BACKEND={env!r} is not a normops backend; expected one of {', '.join(BACKENDS)}")
    return env or None


def torch_device_type(device):
    return device if isinstance(device, str) else device.type


def load(name):
    """Backend module ``name``, imported on first use: the numpy and triton backends cost nothing
    until then."""
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module


def resolve(x, name=None):
    """The backend module for a call whose input is ``x``: backend ``name``, by default the one
    ``current_backend`` names; an error when it cannot run on x's device."""
    name = name or current_backend(x.device)
    if name == "triton" and x.device.type != "cuda" and not triton_interpret():
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set; "
            f"got a {x.device.type} tensor. Use normops.backend('torch') or set TRITON_INTERPRET=1.")
    module = load(name)
    if name == "triton" and x.device.type != "cuda" and not module.INTERPRETED:
        raise RuntimeError(
            f"the triton backend got a {x.device.type} tensor with TRITON_INTERPRET=1, but normops' Triton "
            f"kernels were compiled for CUDA: normops.kernels was imported before TRITON_INTERPRET was set, "
            f"and triton.jit reads it only then. Set it before the first use of the triton backend, or use "
            f"normops.backend('torch').")
    return module
