"""The "triton" backend: normops' Triton kernels (``normops.kernels``), the CUDA default.

Each function of the backend contract (see ``normops/backends/__init__.py``) launches the Triton
kernels of its family, except for the inputs they do not take (see each ``supported``), which run
the torch backend's code. On CPU tensors it runs only under ``TRITON_INTERPRET=1``,
Triton's interpreter, which is how the kernels are tested without a GPU (the variable must be set
before this module is first imported: ``triton.jit`` reads it then).
"""
import functools
import math
import sys

import torch

try:
    from normops.kernels import ada_norm as _ada_norm
    from normops.kernels import batch_norm as _batch_norm
    from normops.kernels import channels_first as _channels_first
    from normops.kernels import group_norm as _group_norm
    from normops.kernels import row_norm as _row_norm
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"the normops triton backend needs the triton package ({e}); "
                      "install it (pip install triton) or use normops.backend('torch')") from e

from normops.kernels.config import ADA_ONE_PASS_MAX, FWD_ONE_PASS_MAX, GN_MAX_GROUP_CHANNELS  # noqa: E402

from . import torch_backend  # noqa: E402


def _interpreted():
    """Whether every kernel is a Triton interpreter function. triton.jit fixes that when a kernel
    module is first imported (by this module or another), whatever TRITON_INTERPRET says later."""
    kinds = {type(v).__name__ for name, m in sys.modules.items() if name.startswith("normops.kernels.")
             for v in vars(m).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")}
    return kinds == {"InterpretedFunction"}


INTERPRETED = _interpreted()


def _on_its_device(fn):
    """fn run with its tensors' CUDA device current: Triton launches on the current device (and its
    current stream), so a tensor on cuda:1 while cuda:0 is current would be read from the wrong GPU."""
    @functools.wraps(fn)
    def run(t, *args, **kwargs):  # t: x (forward) or dy (backward); a call's tensors share its device
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)
    return run


def fallback(family, x, num_groups=None, spec=None):
    """Why the kernels of ``family`` do not take x (the torch backend's code then runs), or None.
    The one place that decides it: this backend's functions and ``normops.ops.route`` ask it.
    ``spec``: the call's (row_norm_quant: its normalized shape and scale groups)."""
    if family == "row_norm_quant" and not _row_norm.quant_supported(spec.normalized_shape, spec.group_size):
        return (f"rows of {math.prod(spec.normalized_shape)} > {FWD_ONE_PASS_MAX} or scale groups of "
                f"{spec.group_size} (not a power of two): the kernels quantize whole rows in registers")
    if family == "group_norm" and not _group_norm.supported(x, num_groups):
        return f"{x.shape[1] // num_groups} channels a group > {GN_MAX_GROUP_CHANNELS}"
    if family == "ada_norm" and not _ada_norm.supported(x):
        return f"rows of {x.shape[-1]} > {ADA_ONE_PASS_MAX}: the adaLN kernels hold a whole row in registers"
    if family == "batch_norm" and not _batch_norm.supported(x):
        return "empty input" if x.numel() == 0 else "tile offsets past int32"
    if family == "channels_first" and not _channels_first.supported(x):
        return "over 2**31 elements a sample"
    return None


# row_norm_fwd takes out=(y, h): its kernels write the in-place fused add (normops::fused_add_rms_norm)
WRITES_INTO = True
# row_norm_bwd takes dh, dx_dtype, dresidual_dtype: its kernels add the residual stream's gradient to
# dx and write it for x and for a residual of another dtype in one pass (a fifth result)
FUSES_RESIDUAL_GRADS = True
row_norm_fwd = _on_its_device(_row_norm.row_norm_fwd)
row_norm_bwd = _on_its_device(_row_norm.row_norm_bwd)


quantize = torch_backend.quantize


@_on_its_device
def row_norm_quant_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, *, offset=0.0,
                       casting="fp32", dtype=torch.float8_e4m3fn, scale=None, group_size=0):
    """The norm and its quantize in one kernel; rows it does not take (fallback): the kernels' norm,
    then torch's quantize."""
    if not _row_norm.quant_supported(normalized_shape, group_size):
        y, h, _, _ = _row_norm.row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, False,
                                            offset=offset, casting=casting)
        return (*quantize(y, len(normalized_shape), dtype, scale, group_size), h)
    return _row_norm.row_norm_quant_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation,
                                        offset=offset, casting=casting, dtype=dtype, scale=scale,
                                        group_size=group_size)


@_on_its_device
def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, casting="fp32"):
    if fallback("group_norm", x, num_groups):
        return torch_backend.group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance,
                                            casting)
    return _group_norm.group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance,
                                      casting=casting)


@_on_its_device
def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask):
    if fallback("group_norm", x, num_groups):
        return torch_backend.group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask)
    return _group_norm.group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask)


# GroupNorm over chunks (normops/ops/group_stats.py): the statistics and the normalize pass of the
# kernels, without autograd (the ops take the differentiable torch ops when a gradient is needed,
# or when fallback() says the kernels do not take x; combining pieces is torch's, on [N, G] tensors).
@_on_its_device
def group_norm_stats(x, num_groups):
    """(count, mean, m2) [N, G]: count int64, from the shape on the host; mean and m2 the kernels'."""
    mean, m2 = _group_norm.group_norm_stats(x, num_groups)
    count = x.shape[1] // num_groups * x.shape[2:].numel()
    return torch.full(mean.shape, count, dtype=torch.int64, device=x.device), mean, m2


@_on_its_device
def group_norm_apply(x, num_groups, mean, m2, count, weight, bias, eps, activation):
    rstd = torch.rsqrt(m2 / count.to(m2.dtype) + eps)  # [N, G], as the torch ops compute it
    return _group_norm.group_norm_apply(x, num_groups, mean, rstd, weight, bias, activation)


@_on_its_device
def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation, momentum=None):
    """momentum (training): the running statistics are also updated in place, in the kernels'
    finalize launch (the one backend that writes them; see normops.ops.batch_norm)."""
    if fallback("batch_norm", x):
        out = torch_backend.batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation)
        if momentum is not None:
            torch_backend.update_running_stats(running_mean, running_var, out[1], out[3], momentum)
        return out
    return _batch_norm.batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation,
                                      momentum=momentum)


@_on_its_device
def batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps,
                   activation, output_mask):
    if fallback("batch_norm", x):
        return torch_backend.batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                                            training, eps, activation, output_mask)
    return _batch_norm.batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                                      training, eps, activation, output_mask)


# adaLN modulation (normops::ada_norm): rows wider than the kernels hold run the torch backend
@_on_its_device
def ada_norm_fwd(x, *args):
    if fallback("ada_norm", x):
        return torch_backend.ada_norm_fwd(x, *args)
    return _ada_norm.ada_norm_fwd(x, *args)


@_on_its_device
def ada_norm_bwd(dy, dh, x, *args):
    # its accumulators spill past ADA_BWD_ONE_PASS_MAX (ADA_BWD_HALF_ONE_PASS_MAX for 16-bit h without
    # dgate's, kernels/config.py): the torch backward there, from the kernels' statistics (the same
    # [B, T] fp32 mean and rstd). args: h, gate, ..., output_mask
    h, gated = args[0], args[0] is not None and args[1] is not None and args[-1][2]
    if fallback("ada_norm", x) or not _ada_norm.supported(x, backward=True, gated=gated, h=h):
        return torch_backend.ada_norm_bwd(dy, dh, x, *args)
    return _ada_norm.ada_norm_bwd(dy, dh, x, *args)


@_on_its_device
def layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats):
    if fallback("channels_first", x):
        return torch_backend.layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats)
    return _channels_first.layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats)


@_on_its_device
def layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask):
    if fallback("channels_first", x):
        return torch_backend.layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask)
    return _channels_first.layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask)
