"""What every kernel family shares: the fused activations, the accumulation dtypes, the launch options,
and `launch`, the one way the launchers start a kernel."""
import collections
import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

from normops import core
from normops.core import stat_dtype  # noqa: F401 (the kernel families take it from here)

# The kernels' ACT ids: the position of each name in normops.core.ACTIVATIONS (none = 0, relu = 1,
# silu = 2, gelu = 3), which act and act_grad branch on.
ACTIVATIONS = {name: i for i, name in enumerate(core.ACTIVATIONS)}


@triton.jit
def act(z, ACT: tl.constexpr):
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)  # a NaN stays NaN, as in torch.relu (tl.maximum drops it)
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    elif ACT == 3:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def act_grad(z, ACT: tl.constexpr):
    """act'(z); ACT == 0 is never asked."""
    if ACT == 1:
        d = tl.where(z <= 0, 0.0, 1.0)  # torch's threshold_backward: a NaN z passes dy through
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    return d


@triton.jit
def inv_std(var, eps, INSTANCE: tl.constexpr):
    """1 / sqrt(var + eps); but 0 for a constant channel of instance_norm's call (INSTANCE) with
    eps = 0: torch's instance_norm runs batch norm's statistics, which take rstd = 0 when
    var = eps = 0 (a zero output, not the NaN of 0 * inf; torch's group norm, G == C included,
    gives the NaN)."""
    rstd = 1.0 / tl.sqrt(var + eps)
    if INSTANCE:
        rstd = tl.where((var == 0.0) & (eps == 0.0), 0.0, rstd)
    return rstd


def acc_type(dtype):
    """The kernels' accumulation type: fp64 for fp64 input (so gradcheck runs through them), else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def param_grads(sums, weight, bias, want_dw, want_db):
    """(dweight, dbias) from the totals ``sums[0]`` (weight) and ``sums[1]`` (bias), in the
    parameters' shapes and dtypes; None where not wanted. When both would be views of ``sums``, the
    bias gradient is a copy: an op's outputs may not alias each other."""
    dw = sums[0].reshape(weight.shape).to(weight.dtype) if want_dw else None
    db = sums[1].reshape(bias.shape).to(bias.dtype) if want_db else None
    if dw is not None and db is not None and dw.dtype == db.dtype == sums.dtype:
        db = db.clone()
    return dw, db


# The occupancy the launch heuristics plan for: at least 16 warps an SM (kernels/config.py,
# programs_per_wave), so 128 registers a thread at most whatever the block size.
MIN_WARPS_PER_SM = 16


def launch_options(num_warps):
    """The launch options of a kernel of `num_warps` warps: those, and maxnreg, the registers a
    thread may take while MIN_WARPS_PER_SM warps fit in an SM's 64K. Without .maxnreg, ptxas set
    itself lower targets and at some block sizes kept a value in an 8-byte stack slot at 32-96
    registers (seen under triton 3.6 and 3.9 by python -m normops.kernels.aot); at 255 it took up
    to 159 registers, a third of the warps an SM could hold.

    NORMOPS_MAXNREG, read at each launch, overrides it for measurements on a GPU: 0 leaves the
    choice to ptxas (no .maxnreg), a number caps the registers there."""
    cap = os.environ.get("NORMOPS_MAXNREG")
    if cap is not None:
        if not cap.isdigit() or not (int(cap) == 0 or 16 <= int(cap) <= 255):
            raise ValueError(f"NORMOPS_MAXNREG={cap!r}: expected registers a thread, 16 to 255, or 0 for no cap")
        return {"num_warps": num_warps, **({"maxnreg": int(cap)} if int(cap) else {})}
    return {"num_warps": num_warps, "maxnreg": min(255, 65536 // (32 * max(num_warps, MIN_WARPS_PER_SM)))}


_recording = contextvars.ContextVar("normops_kernels_recording", default=None)

# One launch noted by record(): the kernel, its grid (a tuple of ints), its positional arguments,
# constexprs and warps.
Launch = collections.namedtuple("Launch", "kernel grid args constexprs num_warps")


def launch(kernel, grid, *args, num_warps, **constexprs):
    """kernel[grid](*args, **constexprs) at `num_warps` warps (launch_options). Under `record()`
    the launch is noted instead of run, which is how python -m normops.kernels.aot learns what to
    compile: it calls the launchers themselves on meta tensors, so it compiles exactly the kernels,
    argument types and constexprs they launch, and restates none of them.

    On fake tensors (torch.compile tracing a CUDA call into the launchers: normops.ops,
    ``traced_into``) the launch is a graph node, torch.library.wrap_triton's
    triton_kernel_wrapper HOP, which Inductor compiles and launches itself (CUDA graphs, no Python
    per call). Its launch options ride on a one-config triton.autotune: Inductor reads a
    user kernel's options from its configs. maxnreg goes in the config's kwargs, not as the
    Config option: Inductor's codegen (triton_heuristics.config_to_dict, torch 2.13) writes out
    a config's kwargs, num_warps and num_stages only, and reads maxnreg back from the kwargs
    (config_from_dict); tests/test_triton_op.py checks that round trip."""
    launches = _recording.get()
    if launches is not None:
        launches.append(Launch(kernel, tuple(grid), args, constexprs, num_warps))
    elif type(args[0]) is not torch.Tensor and torch._subclasses.fake_tensor.is_fake(args[0]):
        options = launch_options(num_warps)
        config = triton.Config({k: v for k, v in options.items() if k != "num_warps"}, num_warps=num_warps)
        torch.library.wrap_triton(triton.autotune([config], key=[])(kernel))[grid](*args, **constexprs)
    else:
        kernel[grid](*args, **constexprs, **launch_options(num_warps))


@contextlib.contextmanager
def record():
    """Within it, `launch` appends a `Launch` to the list it yields instead of launching."""
    launches = []
    token = _recording.set(launches)
    try:
        yield launches
    finally:
        _recording.reset(token)


def dense(t):
    """Weight and bias are read with unit stride (None stays None)."""
    return None if t is None else t.contiguous()
