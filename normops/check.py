"""``normops check``: every op on every available backend and dtype, forward and backward,
against ``torch.nn.functional`` computed in float64 on the same (already rounded) inputs.

    op x backend x dtype:  y (and h), dx (dresidual), dweight, dbias, running stats after update
    float64 cases also:    torch.autograd.gradcheck and gradgradcheck of the normops function

An error counts when ``max|ours - ref| > TOLERANCE[dtype].alone * max(1, max|ref|)`` for any compared
tensor, or when a shape or dtype differs from torch's. A case that raises is a failure with its
message, never a crash. The command line around it is ``normops.cli.check``.
"""
import dataclasses
import importlib
import math
import zlib
from typing import Callable, List, Optional, Tuple

import torch
from torch.nn import functional as TF

from . import functional as NF
from .backends import backend, triton_interpret  # not `from . import backend`: normops imports this module
from .cliutil import DTYPES, default_device, error_text, text_table

# --- check: what is compared, and how closely ------------------------------------------------

QUICK_DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a result in one dtype may be from torch.nn.functional in float64 on the same inputs, as a
    fraction of max(1, max|ref|). The data are O(1..10) and the reductions sum at most ~1e3 terms."""
    # `normops check`'s bound: the float64 reference is all it has, so this pays for the dtype's rounding too
    alone: float
    # the tests' bound (STYLE.md's rule, tests/cases.py): on top of twice torch's own error in the dtype, which
    # already pays for the rounding
    beyond_torch: float


# The one tolerance table, for `normops check` and for the tests (which import it).
TOLERANCE = {
    # alone: summation order only (~1e-16 x a few hundred terms); beyond torch: reassociation only
    torch.float64: Tolerance(alone=1e-9, beyond_torch=1e-10),
    # alone: fp32 ulp is 1.2e-7 relative; the rsqrt and dx's three-term difference amplify rounding, and sums of
    # ~500 terms in another order add to it: 1e-4 leaves 10x room. Beyond torch: outputs are O(1..10), fp32 ulp
    # there is 1e-7..1e-6, sums of ~1e3 terms
    torch.float32: Tolerance(alone=1e-4, beyond_torch=2e-5),
    # alone: fp16 ulp is 9.8e-4 relative: rounding y or dx alone costs half of it, and the dtype-rounded
    # intermediates (z before the activation, h = x + residual) add more. Beyond torch: half an fp16 ulp at 4
    torch.float16: Tolerance(alone=1e-2, beyond_torch=2e-3),
    # alone: bf16 ulp is 7.8e-3 relative (8-bit mantissa): same reasoning, 8x fp16's ulp. Beyond torch: half a
    # bf16 ulp at 4 is 1.6e-2
    torch.bfloat16: Tolerance(alone=6e-2, beyond_torch=2e-2),
}
ROW_EPS = 1e-5  # layer_norm's default; rms_norm runs with its default eps=None (see _rms_eps)


def _rms_eps(dtype):
    """torch.rms_norm's eps=None: the machine epsilon of the compute type (fp32 for fp16/bf16)."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


@dataclasses.dataclass(frozen=True)
class CheckOp:
    """One row family of ``normops check``: how to build its inputs, and the two sides to compare.

    ``ours(t)`` and ``ref(t, dtype)`` take a dict of named tensors (x, residual, weight, bias,
    running_mean, running_var) and return the output or a tuple of outputs; ``ref`` gets the float64
    copies and the case's dtype (for dtype-dependent defaults).
    """
    name: str
    shape: Tuple[int, ...]  # x for the comparison: odd sizes, so every mask and remainder is exercised
    tiny: Tuple[int, ...]   # x for gradcheck / gradgradcheck: each element is a finite difference
    params: str             # "row" (last dim) or "channel" (dim 1)
    bias: bool
    residual: bool
    running: str            # "" none, "update" (training: updated in place), "eval" (normalize with)
    outputs: Tuple[str, ...]
    ours: Callable
    ref: Callable


def _ln(t, activation=None):
    return NF.layer_norm(t["x"], t["x"].shape[-1:], t["weight"], t["bias"], ROW_EPS, activation=activation)


def _ref_ln(t):
    return TF.layer_norm(t["x"], t["x"].shape[-1:], t["weight"], t["bias"], ROW_EPS)


def _ref_add_ln(t, dtype):
    h = t["x"] + t["residual"]
    return TF.layer_norm(h, h.shape[-1:], t["weight"], t["bias"], ROW_EPS), h


def _ref_add_rms(t, dtype):
    h = t["x"] + t["residual"]
    return TF.rms_norm(h, h.shape[-1:], t["weight"], _rms_eps(dtype)), h


def _running(t):
    return t.get("running_mean"), t.get("running_var")


OPS = [
    CheckOp("layer_norm", (3, 5, 37), (3, 5), "row", True, False, "", ("y",),
            ours=_ln, ref=lambda t, dtype: _ref_ln(t)),
    CheckOp("layer_norm:silu", (3, 5, 37), (3, 5), "row", True, False, "", ("y",),
            ours=lambda t: _ln(t, "silu"), ref=lambda t, dtype: TF.silu(_ref_ln(t))),
    CheckOp("rms_norm", (3, 5, 37), (3, 5), "row", False, False, "", ("y",),
            ours=lambda t: NF.rms_norm(t["x"], t["x"].shape[-1:], t["weight"]),
            ref=lambda t, dtype: TF.rms_norm(t["x"], t["x"].shape[-1:], t["weight"], _rms_eps(dtype))),
    CheckOp("add_layer_norm", (3, 5, 37), (3, 5), "row", True, True, "", ("y", "h"),
            ours=lambda t: NF.add_layer_norm(t["x"], t["residual"], t["x"].shape[-1:], t["weight"], t["bias"],
                                             ROW_EPS),
            ref=_ref_add_ln),
    CheckOp("add_rms_norm", (3, 5, 37), (3, 5), "row", False, True, "", ("y", "h"),
            ours=lambda t: NF.add_rms_norm(t["x"], t["residual"], t["x"].shape[-1:], t["weight"]),
            ref=_ref_add_rms),
    CheckOp("group_norm", (3, 6, 5, 7), (2, 4, 3), "channel", True, False, "", ("y",),
            ours=lambda t: NF.group_norm(t["x"], 3 if t["x"].shape[1] % 3 == 0 else 2, t["weight"], t["bias"]),
            ref=lambda t, dtype: TF.group_norm(t["x"], 3 if t["x"].shape[1] % 3 == 0 else 2, t["weight"],
                                               t["bias"])),
    CheckOp("instance_norm", (3, 5, 7, 9), (2, 3, 5), "channel", True, False, "update", ("y",),
            ours=lambda t: NF.instance_norm(t["x"], *_running(t), t["weight"], t["bias"], True, 0.1),
            ref=lambda t, dtype: TF.instance_norm(t["x"], *_running(t), t["weight"], t["bias"], True, 0.1)),
    CheckOp("batch_norm:train", (5, 7, 3, 5), (3, 2, 3), "channel", True, False, "update", ("y",),
            ours=lambda t: NF.batch_norm(t["x"], *_running(t), t["weight"], t["bias"], True, 0.1),
            ref=lambda t, dtype: TF.batch_norm(t["x"], *_running(t), t["weight"], t["bias"], True, 0.1)),
    CheckOp("batch_norm:eval", (5, 7, 3, 5), (3, 2, 3), "channel", True, False, "eval", ("y",),
            ours=lambda t: NF.batch_norm(t["x"], *_running(t), t["weight"], t["bias"], False),
            ref=lambda t, dtype: TF.batch_norm(t["x"], *_running(t), t["weight"], t["bias"], False)),
    # ConvNeXt's LayerNorm over dim 1, against torch's permute composition
    CheckOp("layer_norm_channels_first", (3, 7, 5, 6), (2, 3, 2), "channel", True, False, "", ("y",),
            ours=lambda t: NF.layer_norm_channels_first(t["x"], t["weight"], t["bias"], ROW_EPS),
            ref=lambda t, dtype: TF.layer_norm(t["x"].movedim(1, -1), t["x"].shape[1:2], t["weight"], t["bias"],
                                               ROW_EPS).movedim(-1, 1)),
]
OP_NAMES = [op.name for op in OPS]
DIFFERENTIABLE = ("x", "residual", "weight", "bias")


def _make_inputs(op, shape, dtype, device, seed):
    """Shifted data (x = 3 + 2 randn: a variance taken as E[x^2] - E[x]^2 would show), drawn in
    float64 from a private generator, then rounded to dtype: every backend and dtype of an op sees
    the same numbers, and the global RNG is left alone."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(s, generator=g, dtype=torch.float64)

    t = {"x": 3 + 2 * randn(*shape)}
    if op.residual:
        t["residual"] = randn(*shape)
    n = shape[-1] if op.params == "row" else shape[1]
    t["weight"] = 1 + 0.5 * randn(n)
    t["bias"] = 0.5 * randn(n) if op.bias else None
    if op.running:  # near the data's statistics, so eval-mode x_hat stays O(1)
        t["running_mean"] = 3 + 0.5 * randn(n)
        t["running_var"] = 4 * (0.5 + torch.rand(n, generator=g, dtype=torch.float64))
    return {k: None if v is None else v.to(dtype).to(device) for k, v in t.items()}


def _leaves(t, dtype=None):
    """Copies of t (in dtype if given) whose differentiable tensors require grad; buffers cloned."""
    out = {}
    for k, v in t.items():
        if v is not None:
            v = v.detach().to(dtype or v.dtype).clone()
            v.requires_grad_(k in DIFFERENTIABLE)
        out[k] = v
    return out


def _forward_backward(fn, t, cotangent_seed, op):
    """fn(t) and the gradients of every differentiable input, for fixed random cotangents.
    Returns {name: tensor}: the outputs, d<input> for each gradient, the buffers afterwards."""
    outs = fn(t)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(cotangent_seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device) for o in outs]
    names = [k for k in DIFFERENTIABLE if t.get(k) is not None]
    grads = torch.autograd.grad(outs, [t[k] for k in names], cots, allow_unused=True)
    result = dict(zip(op.outputs, (o.detach() for o in outs)))
    result.update({"d" + k: gr for k, gr in zip(names, grads)})
    for k in ("running_mean", "running_var"):
        if t.get(k) is not None:
            result[k] = t[k]
    return result


def _expected_dtype(name, t):
    src = {"y": "x", "h": "x"}.get(name, name[1:] if name.startswith("d") else name)
    return t[src].dtype


def _compare(ours, ref, t, tol):
    """(worst name, its err, its allowed err, failure message or None) over every compared tensor."""
    worst = (None, 0.0, 0.0, -1.0)
    for name in list(ref) + [k for k in ours if k not in ref]:
        o, r = ours.get(name), ref.get(name)
        if o is None and r is None:
            continue
        if o is None or r is None:
            return name, math.inf, 0.0, f"{name}: {'ours' if o is None else 'torch'} gave none, the other did"
        if tuple(o.shape) != tuple(r.shape):
            return name, math.inf, 0.0, f"{name}: shape {list(o.shape)}, torch's is {list(r.shape)}"
        want = _expected_dtype(name, t)
        if o.dtype != want:
            return name, math.inf, 0.0, f"{name}: dtype {o.dtype}, expected {want}"
        r = r.detach().double()
        diff = (o.detach().double() - r).abs()
        diff = torch.where(torch.isnan(o.detach().double()) & torch.isnan(r), torch.zeros_like(diff), diff)
        err = diff.max().item() if diff.numel() else 0.0
        err = math.inf if math.isnan(err) else err
        finite = r[torch.isfinite(r)]
        allowed = tol * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
        ratio = err / allowed
        if ratio > worst[3]:
            worst = (name, err, allowed, ratio)
    name, err, allowed, ratio = worst
    msg = None if ratio <= 1.0 else f"{name}: max abs err {err:.3g} > tol {allowed:.3g}"
    return name, err, allowed, msg


def _gradcheck(op, device, seed):
    """gradcheck and gradgradcheck of the normops function in float64, on op.tiny. Raises on failure."""
    t = _make_inputs(op, op.tiny, torch.float64, device, seed)
    names = [k for k in DIFFERENTIABLE if t.get(k) is not None]
    buffers = {k: v for k, v in t.items() if k not in DIFFERENTIABLE}

    def fn(*args):
        # fresh running stats per call: a training-mode update must not accumulate across calls
        tt = {k: None if v is None else v.clone() for k, v in buffers.items()}
        tt.update(zip(names, args))
        return op.ours(tt)

    inputs = tuple(t[k].detach().requires_grad_() for k in names)
    torch.autograd.gradcheck(fn, inputs, raise_exception=True)
    torch.autograd.gradgradcheck(fn, inputs, raise_exception=True)


@dataclasses.dataclass
class CaseResult:
    op: str
    backend: str
    dtype: str
    device: str
    err: Optional[float] = None
    tol: Optional[float] = None
    gradcheck: str = "-"
    status: str = "ok"  # ok | FAIL | ERROR
    details: List[str] = dataclasses.field(default_factory=list)


def run_case(op, backend_name, dtype_name, device):
    """Compare one op on one backend in one dtype with torch.nn.functional; never raises."""
    dtype = DTYPES[dtype_name]
    res = CaseResult(op.name, backend_name, dtype_name, str(device))
    seed = zlib.crc32(op.name.encode())  # same data for every backend and dtype of an op
    try:
        t = _make_inputs(op, op.shape, dtype, device, seed)
        with backend(backend_name):
            ours = _forward_backward(op.ours, _leaves(t), seed + 1, op)
        ref = _forward_backward(lambda tt: op.ref(tt, dtype), _leaves(t, torch.float64), seed + 1, op)
        _, res.err, res.tol, msg = _compare(ours, ref, t, TOLERANCE[dtype].alone)
        if msg:
            res.status = "FAIL"
            res.details.append(msg)
    except Exception as e:  # one broken case is a failure in the table, not a crash
        res.status = "ERROR"
        res.details.append(error_text(e))
    if dtype == torch.float64:
        try:
            with backend(backend_name):
                _gradcheck(op, device, seed)
            res.gradcheck = "ok"
        except Exception as e:
            res.gradcheck = "FAIL"
            if res.status == "ok":
                res.status = "FAIL"
            res.details.append("gradcheck: " + error_text(e))
    return res


# --- check: which cases ----------------------------------------------------------------------

def triton_unavailable(device):
    """None when the triton backend can run on device, else why not (and how to include it)."""
    if device.type == "cpu" and not triton_interpret():
        return ("the triton backend runs on CPU only with TRITON_INTERPRET=1 (set it to include the "
                "backend: its kernels then run in Triton's interpreter, slowly)")
    if device.type not in ("cpu", "cuda"):
        return f"the triton backend does not run on {device.type}"
    try:
        importlib.import_module("triton")
    except Exception as e:  # ImportError, or a broken install
        return f"import triton failed ({error_text(e)})"
    return None


def _backend_dtypes(name, device):
    """The dtypes a backend is checked in: the NumPy reference is cheap in all of them; Triton's CPU
    interpreter is slow and has no bf16 (NumPy lacks it), so fp32 and fp64 there."""
    if name == "triton" and device.type == "cpu":
        return QUICK_DTYPES
    return tuple(DTYPES)


def plan_cases(args):
    """([(op, backend, dtype name, device)], {(backend, device): why skipped}) for the parsed options,
    or raise ValueError (usage). A backend that cannot run here is skipped when it was not asked
    for by name, and an error when it was."""
    devices = args.device or [torch.device(default_device())]
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {d}: CUDA is not available")
    # an exact name selects that op; a family name ("batch_norm") every op of the family
    ops = [op for op in OPS if not args.op
           or any(op.name == sel or (sel not in OP_NAMES and op.name.split(":")[0] == sel) for sel in args.op)]
    dtypes = list(dict.fromkeys(args.dtype or DTYPES))
    if args.quick:
        dtypes = [d for d in dtypes if d in QUICK_DTYPES]
        if not dtypes:
            raise ValueError(f"--quick checks only {' and '.join(QUICK_DTYPES)}; none of them was selected")
    cases, skipped = [], {}
    for device in devices:
        names = list(dict.fromkeys(args.backend or ("torch", "numpy", "triton")))
        for name in names:
            why = triton_unavailable(device) if name == "triton" else None
            if why:
                if args.backend:  # asked for by name: say it cannot run rather than pass quietly
                    raise ValueError(f"--backend triton on {device}: {why}")
                skipped[name, device] = why
                continue
            for op in ops:
                for dt in dtypes:
                    if dt in _backend_dtypes(name, device):
                        cases.append((op, name, dt, device))
    if not cases:
        raise ValueError("the options select no case")
    order = {n: i for i, n in enumerate(OP_NAMES)}
    return sorted(cases, key=lambda c: (str(c[3]), order[c[0].name])), skipped  # rows grouped by op, stable


# --- check: output -----------------------------------------------------------------------------

def format_table(results, show_device):
    headers = ["op", "backend", "dtype", "max abs err", "tol", "gradcheck", "status"]
    if show_device:
        headers.insert(0, "device")
    rows = []
    for r in results:
        row = [r.op, r.backend, r.dtype, "-" if r.err is None else f"{r.err:.2e}",
               "-" if r.tol is None else f"{r.tol:.1e}", r.gradcheck, r.status]
        rows.append([r.device] + row if show_device else row)
    return text_table(headers, rows, right={"max abs err", "tol"})
