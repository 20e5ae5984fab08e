"""The bottom floor of normops: what every layer shares, from the kernels up. It imports torch and
nothing of normops, so anything (``normops.kernels`` included) may import it.

- ``stat_dtype``: the dtype of the statistics (fp32, fp64 for fp64 input).
- ``memory_format_of`` and ``channel_view``: the layout of an (N, C, *) input and its per-channel vectors.
- ``ACTIVATIONS``: the fused activations, by name, each with its torch forward, the vector-Jacobian
  product of that forward and the ``torch.nn`` module that computes the same function. The order
  is the kernels' numbering (``normops.kernels.common``); the NumPy backend keys its own on the names.
- ``ShapeError``, ``DtypeError``: the errors bad input raises, besides the builtin ones.
- ``case_id``: the name of a benchmark case, which the suites, the roofline
  (``normops.kernels.roofline``) and the GPU acceptance run's calibration share.
- ``batch_invariant``, ``set_batch_invariant``, ``is_batch_invariant``: the batch-invariant mode,
  a process-wide flag that every backend and launcher reads at run time.
"""
import contextlib
import dataclasses
from typing import Callable

import torch
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn import functional as F

aten = torch.ops.aten


# --- dtypes -------------------------------------------------------------------------------------

def stat_dtype(x):
    """Statistics are fp32, or fp64 for fp64 input; ``x`` is the input or its dtype."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- the batch-invariant mode -------------------------------------------------------------------
# Under it a row's (a sample's) forward output and input gradient are bitwise the same whatever the
# batch around it, and weight/bias gradients the same run to run and whatever the device's SM count
# or the CPU's thread count: the launchers plan reductions from the shape alone (kernels/config.py,
# BI_CHUNK_ROWS) and the torch backend sums dW/dB in a fixed order. Training BatchNorm is outside
# its promise: its statistics are over the batch by definition. Process-wide, not per thread, like
# torch.use_deterministic_algorithms; the custom ops read it when they run (eagerly, and as opaque
# ops inside a torch.compile graph: CPU, the torch and numpy backends). On CUDA, torch.compile traces
# the Triton launches into the graph with the plan of the moment it compiled: as with the backend,
# torch._dynamo.reset() after switching the mode.

_batch_invariant = False


def set_batch_invariant(flag):
    """Turn the batch-invariant mode on (True) or off (False), for the whole process."""
    global _batch_invariant
    if not isinstance(flag, bool):
        raise TypeError(f"set_batch_invariant expects a bool, got {type(flag).__name__}")
    _batch_invariant = flag


def is_batch_invariant():
    """Whether the batch-invariant mode is on."""
    return _batch_invariant


class batch_invariant(contextlib.ContextDecorator):
    """``with normops.batch_invariant():`` (or ``batch_invariant(False)`` to leave the mode), also a
    decorator: the mode set within, the previous setting restored on exit, exceptions included."""

    def __init__(self, enabled=True):
        if not isinstance(enabled, bool):
            raise TypeError(f"batch_invariant expects a bool, got {type(enabled).__name__}")
        self.enabled = enabled
        self._saved = []  # a stack: one instance may be entered again (nested, or as a decorator)

    def __enter__(self):
        self._saved.append(_batch_invariant)
        set_batch_invariant(self.enabled)
        return self

    def __exit__(self, *exc):
        set_batch_invariant(self._saved.pop())
        return False


# --- layouts ------------------------------------------------------------------------------------

def suggested_format(x):
    """torch's x.suggest_memory_format(): the layout ATen gives a group or RMS norm's output, and
    torch.empty_like a non-dense x (channels_last(_3d) when x's strides are ordered so, dense or not)."""
    if x.dim() not in (4, 5) or x.is_contiguous():  # the common cases without prims' stride walk (~8 us)
        return torch.contiguous_format
    return suggest_memory_format(x)


def memory_format_of(x):
    """The memory format torch's batch norm gives its output for input x: channels_last(_3d) when
    x is dense in it (even where its size-1 dims make torch suggest contiguous), else the suggested
    format (a stepped channels_last view stays channels_last, as torch.empty_like keeps it)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format if x.is_contiguous() else suggested_format(x)


def channel_view(t, x):
    """A per-channel vector shaped to broadcast against x: [1, C, 1, ...]."""
    return t.reshape((1, -1) + (1,) * (x.dim() - 2))


# --- quantized outputs (normops::row_norm_quant) ---------------------------------------------------

# The dtypes a norm's output is quantized to, and their finite maxima: q = y / scale saturates there,
# and a dynamic scale is amax |y| / max.
QUANT_MAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
# The smallest dynamic scale (fp32's smallest normal): a row (group) of zeros gets it rather than 0,
# so q = y * (1 / scale) is 0, and 1 / scale is finite for whoever dequantizes.
MIN_QUANT_SCALE = 2.0 ** -126


# --- the fused activations ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Activation:
    forward: Callable   # act(z)
    backward: Callable  # (dy, z) -> dy * act'(z), with ATen's own backward kernels
    module: type        # the torch.nn module computing act


ACTIVATIONS = {
    "none": Activation(lambda z: z, lambda dy, z: dy, nn.Identity),
    "relu": Activation(F.relu, lambda dy, z: aten.threshold_backward(dy, z, 0), nn.ReLU),
    "silu": Activation(F.silu, aten.silu_backward, nn.SiLU),
    "gelu": Activation(F.gelu, aten.gelu_backward, nn.GELU),  # the erf form, torch's default
}


_ACTIVATION_NAMES = tuple(ACTIVATIONS)  # a tuple: `in` on an unhashable argument is False, not a TypeError
_FUSED = [repr(name) for name in _ACTIVATION_NAMES if name != "none"]
_ACTIVATION_CHOICES = f"None, {', '.join(_FUSED[:-1])} or {_FUSED[-1]}"  # None, 'relu', 'silu' or 'gelu'


def activation_name(activation):
    """The table's name for a user's ``activation=`` (None and "none": "none"); ValueError otherwise."""
    if activation is None or activation == "none":
        return "none"
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"activation must be {_ACTIVATION_CHOICES}; got {activation!r}")
    return activation


def activate(z, activation):
    """act(z) for ``activation``, a name in ACTIVATIONS."""
    return ACTIVATIONS[activation].forward(z)


def activation_backward(dy, z, activation):
    """dy * act'(z), with ATen's own backward kernels."""
    return ACTIVATIONS[activation].backward(dy, z)


def case_id(op, shape, layout, dtype, pas):
    """"<op>-<shape>[-<layout>]-<dtype>-<pass>" of a benchmark case (``dtype``: a torch dtype or
    its name): the pytest-benchmark suites' group, the roofline's case, the calibration's row."""
    shape = "x".join(map(str, shape)) + ("" if layout == "contiguous" else f"-{layout}")
    return f"{op}-{shape}-{str(dtype).replace('torch.', '')}-{pas}"


def gated_group_size(n):
    """The group of the grouped gated RMSNorm benchmark case (gated_rms_norm_grouped) at row width n:
    1024 (Codestral Mamba's and Nemotron-H's 8 groups at d_inner 8192), or half a narrower row, so
    that a row always has at least two groups. Shared by normops.bench and the roofline."""
    return min(1024, n // 2)


# --- errors -------------------------------------------------------------------------------------

# The row norms' casting modes: where x_hat is rounded before the weight multiply (the Hugging Face
# families' arithmetic). "gemma" is "fp32" (everything in fp32, one rounding at the end).
CASTINGS = ("fp32", "gemma", "llama", "t5")
_HALF = (torch.float16, torch.bfloat16)


def casting_dtypes(casting, inp_dtype, weight_dtype):
    """(the dtype x_hat is rounded to before the weight multiply, the dtype x_hat * w is rounded to
    before a gate after the norm), None where nothing is rounded: "fp32"/"gemma": neither; "llama":
    x_hat to the input's dtype and x_hat * w to promote_types(w, input), as LlamaRMSNorm and
    Qwen3NextRMSNormGated compute; "t5": x_hat to the weight's dtype when that is fp16/bf16
    (T5LayerNorm). The one statement of the rule: every backend and the kernels' launcher ask it,
    and normops.functional's validation (an unknown casting is a ValueError)."""
    if not isinstance(casting, str) or casting not in CASTINGS:
        raise ValueError(f"unknown casting {casting!r}; expected one of {', '.join(map(repr, CASTINGS))}")
    if casting == "llama":
        return inp_dtype, inp_dtype if weight_dtype is None else torch.promote_types(weight_dtype, inp_dtype)
    if casting == "t5" and weight_dtype in _HALF:
        return weight_dtype, None
    return None, None


_INT_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
           torch.float64: torch.int64}


def ulps_apart(a, b):
    """Elementwise, how many representable values of a's dtype lie between a and b (0: equal; +0
    and -0 are equal; a NaN is 0 from a NaN and far from anything else). a and b share a dtype.
    The rule for "the same result up to rounding" of the casting modes and ``normops.convert``'s
    probe: within 1 on (nearly) every element."""
    if a.dtype != b.dtype:
        raise TypeError(f"ulps_apart compares tensors of one dtype, got {a.dtype} and {b.dtype}")
    bits = 8 * a.element_size()

    def ordered(t):  # the float's rank among its dtype's values (sign-magnitude to two's complement)
        i = t.contiguous().view(_INT_OF[t.dtype]).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    apart = (ordered(a) - ordered(b)).abs()
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.where(nan_a | nan_b, torch.where(nan_a & nan_b, 0, torch.iinfo(torch.int64).max), apart)


class ShapeError(ValueError, RuntimeError):
    """A shape or size that does not fit: a ValueError, and a RuntimeError like torch's own."""


class DtypeError(TypeError, RuntimeError):
    """Parameters of a dtype torch's norms refuse: a TypeError, and a RuntimeError like torch's own."""
