"""Differential fuzzing: every public functional op, on every backend, against torch.nn.functional.

Hypothesis draws the op's shapes, the input, parameter, residual, running-statistics and cotangent
tensors (values, dtype, and a strided layout for each: permuted or channels_last, sliced with
steps, at a storage offset, expanded with stride 0), which parameters are present, eps, the
activation, momentum and mode, and which tensors require grad. One draw runs three times from the
same values: normops on the backend under test, torch in the same dtype on the same strided
tensors, and torch in float64 on dense copies (the reference). They must agree on:

- raising: where torch raises, normops must raise too (any exception type), and leave the running
  statistics as they were; where torch does not, normops must not;
- the output: shape, torch's dtype, the values by the tolerance rule of cases.py (non-finite
  values where the reference has them, the same ones), and the strides where torch's output is
  not contiguous (channels_last in, channels_last out);
- the gradients of every tensor that requires grad, for a random cotangent (a strided view too);
- the running statistics after the call, by the same rule.

The gaps of a strided tensor's storage are NaN, so a kernel that reads outside the view shows.

Bounded for CI: a fixed number of derandomized examples per op and backend, tensors of at most
MAX_NUMEL elements (64 on the Triton interpreter). For a longer adversarial run, set
NORMOPS_FUZZ_EXAMPLES=<examples per test>: the draws are then random, new ones each run.
"""
import contextlib
import dataclasses
import math
import os
from typing import Optional, Tuple

import pytest
import torch
from torch._prims_common import suggest_memory_format

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

import normops  # noqa: E402
from cases import (  # noqa: E402
    CUDA, DEVICE, DTYPES, F, err, tolerance, torch_add_layer_norm, torch_add_rms_norm, torch_batch_norm,
    torch_gated_rms_norm, torch_group_norm, torch_instance_norm, torch_layer_norm, torch_rms_norm)

_EXAMPLES = os.environ.get("NORMOPS_FUZZ_EXAMPLES")
settings.register_profile("normops-fuzz", deadline=None, derandomize=_EXAMPLES is None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                                  HealthCheck.data_too_large])
PROFILE = settings.get_profile("normops-fuzz")
# eps=0 on a constant row is 0/0 on purpose (torch gives NaN there too); NumPy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _triton_ready():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return CUDA or normops.backends.triton_interpret()


BACKENDS = ["torch", "numpy", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="needs triton, and CUDA or TRITON_INTERPRET=1"))]
# Per test: CI examples, and the largest tensor. The interpreter runs a kernel in Python, element
# by element: ~0.1-1 s an example at 64 elements.
EXAMPLES = {"torch": 20, "numpy": 20, "triton": 4}
MAX_NUMEL = {"torch": 192, "numpy": 192, "triton": 64}
MAX_NUMEL_CUDA_TRITON = 4096


def fuzz_settings(backend):
    n = int(_EXAMPLES) if _EXAMPLES else EXAMPLES[backend]
    return settings(PROFILE, max_examples=n)


def max_numel(backend):
    return MAX_NUMEL_CUDA_TRITON if backend == "triton" and CUDA else MAX_NUMEL[backend]


# --- strided tensors with given values ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a tensor's elements live: dims in storage order, outermost first (`perm`; (0, 2, 3, 1)
    is channels_last), a step per dim (`steps`, a slice [::step] of a larger buffer), a storage
    offset, and the dims that are expanded (stride 0: the values are constant along them)."""
    perm: Tuple[int, ...]
    steps: Tuple[int, ...]
    offset: int = 0
    expand: Tuple[int, ...] = ()

    def __repr__(self):
        return f"Layout({self.perm}, steps={self.steps}, offset={self.offset}, expand={self.expand})"


@dataclasses.dataclass(frozen=True)
class Values:
    """A tensor's values: `kind` "randn" (offset + scale * randn), "ints" (small integers: exact
    sums, ties, zeros) or "constant" (offset everywhere: zero variance), drawn from `seed`;
    `positive` maps them to |v| + 0.25 (a running variance)."""
    kind: str = "randn"
    seed: int = 0
    offset: float = 0.0
    scale: float = 1.0
    positive: bool = False

    def __repr__(self):
        return (f"Values({self.kind!r}, seed={self.seed}, offset={self.offset}, scale={self.scale}"
                f"{', positive=True' if self.positive else ''})")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A tensor argument of a draw: shape, values, dtype (None: the input's), layout, requires_grad."""
    shape: Tuple[int, ...]
    values: Values
    layout: Layout
    dtype: Optional[torch.dtype] = None
    grad: bool = False
    written: bool = False  # updated in place by the op (running statistics)

    def __repr__(self):
        return (f"Spec({self.shape}, {self.values}, {self.layout}, {self.dtype}"
                f"{', grad=True' if self.grad else ''}{', written=True' if self.written else ''})")


def _values(spec, dtype):
    """The values of `spec` rounded to `dtype`, as a float64 tensor of its shape with size 1 on
    the expanded dims."""
    v, shape = spec.values, spec.shape
    base = [1 if d in spec.layout.expand else s for d, s in enumerate(shape)]
    g = torch.Generator().manual_seed(v.seed)
    if v.kind == "randn":
        t = v.offset + v.scale * torch.randn(base, generator=g, dtype=torch.float64)
    elif v.kind == "ints":
        t = torch.randint(-3, 4, base, generator=g).double() + v.offset
    else:
        t = torch.full(base, v.offset, dtype=torch.float64)
    if v.positive:
        t = t.abs() + 0.25
    return t.to(dtype).double()


def materialize(spec, dtype, dense=False):
    """A fresh tensor of spec's values in `dtype`: in spec's strided layout (NaN in the storage
    the view skips), or `dense` in float64 for the reference."""
    dtype = spec.dtype or dtype
    values = _values(spec, dtype)
    if dense:
        t = values.expand(spec.shape).clone()
    else:
        lay, base = spec.layout, values.shape
        alloc = [base[d] * lay.steps[d] for d in lay.perm]
        buf = torch.full((lay.offset + math.prod(alloc),), float("nan"), dtype=dtype, device=DEVICE)
        t = buf[lay.offset:].view(alloc)[tuple(slice(None, None, lay.steps[d]) for d in lay.perm)]
        t = t.permute([lay.perm.index(d) for d in range(len(base))])
        t.copy_(values)
        t = t.expand(spec.shape)
    return t.to(DEVICE).requires_grad_(spec.grad)


# --- strategies ------------------------------------------------------------------------------------

@st.composite
def layouts(draw, shape, expand=True):
    nd = len(shape)
    perms = ["contiguous", "permuted"] + (["channels_last"] if nd in (4, 5) else [])
    kind = draw(st.sampled_from(perms))
    if kind == "contiguous":
        perm = tuple(range(nd))
    elif kind == "channels_last":
        perm = (0,) + tuple(range(2, nd)) + (1,)
    else:
        perm = tuple(draw(st.permutations(range(nd))))
    steps = tuple(draw(st.lists(st.sampled_from([1, 2, 3]), min_size=nd, max_size=nd)))
    offset = draw(st.sampled_from([0, 1, 7]))
    dims = draw(st.sets(st.integers(0, nd - 1), max_size=nd)) if expand and nd else set()
    return Layout(perm, steps, offset, tuple(sorted(dims)))


@st.composite
def values(draw, offset=(0.0, 3.0, -50.0), scale=(1.0, 2.0, 0.01), positive=False, degenerate=True):
    kind = draw(st.sampled_from(["randn", "ints", "constant"] if degenerate else ["randn"]))
    seed = draw(st.integers(0, 2 ** 16))
    off = draw(st.sampled_from(offset))
    if kind == "constant":
        off = float(round(off))  # an integer: its sums and means are exact, so the variance is exactly 0
    return Values(kind, seed, off, draw(st.sampled_from(scale)), positive)


@st.composite
def specs(draw, shape, dtype=None, grad=True, written=False, param=False, positive=False):
    """A tensor argument; a parameter (`param`) may have a dtype of its own; `written` (updated in
    place) is never expanded."""
    if param:
        v = draw(values(offset=(1.0, 0.0, 0.5) if not positive else (1.0,), scale=(0.5, 2.0), positive=positive))
    else:
        v = draw(values())
    lay = draw(layouts(shape, expand=not written))
    dt = draw(st.sampled_from([None] + DTYPES)) if param else dtype
    return Spec(tuple(shape), v, lay, dt, grad and draw(st.booleans()), written)


def optional(strategy):
    return st.one_of(strategy, st.none())


def cotangent(draw, shape):
    return Spec(tuple(shape), draw(values(degenerate=False)), draw(layouts(shape)))


def fits(backend, *shapes):
    return all(math.prod(s) <= max_numel(backend) for s in shapes)


ACTIVATION = st.sampled_from([None, "relu", "silu", "gelu"])
EPS = [1e-5, 1e-3, 0.1, 0.0]
MOMENTUM = st.sampled_from([0.1, 0.0, 1.0, 0.5, None])


@st.composite
def row_cases(draw, backend, op):
    batch = draw(st.lists(st.integers(0, 4), max_size=2))
    norm = draw(st.lists(st.integers(1, 9), min_size=1, max_size=2))
    shape = tuple(batch) + tuple(norm)
    assume(fits(backend, shape))
    rms, add = "rms" in op, op.startswith("add_")
    x = draw(specs(shape))
    w = draw(optional(specs(norm, param=True)))
    b = None if rms else draw(optional(specs(norm, param=True)))
    eps = draw(st.sampled_from([None] + EPS) if rms else st.sampled_from(EPS))
    if add:
        r = draw(specs(shape))
        args = (x, r, norm, w) + (() if rms else (b,)) + (eps,)
        cots = tuple(cotangent(draw, shape) if draw(st.booleans()) else None for _ in "yh")
        return Case(op, args, None, cots)
    args = (x, norm, w) + (() if rms else (b,)) + (eps,)
    return Case(op, args, draw(ACTIVATION), (cotangent(draw, shape),))


@st.composite
def gated_cases(draw, backend):
    """gated_rms_norm: an optional gate, before or after the norm, groups dividing the row, a
    weight offset (with a weight)."""
    batch = draw(st.lists(st.integers(0, 4), max_size=2))
    n = draw(st.integers(1, 12))
    shape = tuple(batch) + (n,)
    assume(fits(backend, shape))
    x, gate = draw(specs(shape)), draw(optional(specs(shape)))
    w = draw(optional(specs((n,), param=True)))
    kwargs = dict(norm_before_gate=draw(st.booleans()),
                  group_size=draw(st.sampled_from([None] + [g for g in range(1, n + 1) if n % g == 0])),
                  offset=draw(st.sampled_from([0.0, 1.0])) if w is not None else 0.0)
    eps = draw(st.sampled_from([None] + EPS))
    return Case("gated_rms_norm", (x, gate, [n], w, eps), None, (cotangent(draw, shape),), tuple(kwargs.items()))


@st.composite
def group_cases(draw, backend):
    n, groups, per = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    c = groups * per
    shape = (n, c) + tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    assume(fits(backend, shape))
    x = draw(specs(shape))
    w, b = draw(optional(specs((c,), param=True))), draw(optional(specs((c,), param=True)))
    return Case("group_norm", (x, groups, w, b, draw(st.sampled_from(EPS))), draw(ACTIVATION), (cotangent(draw, shape),))


def _running(draw, c, written):
    if not draw(st.booleans()):
        return None, None
    return (draw(specs((c,), param=True, grad=False, written=written)),
            draw(specs((c,), param=True, grad=False, written=written, positive=True)))


@st.composite
def batch_cases(draw, backend, op):
    n, c = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    shape = (n, c) + tuple(draw(st.lists(st.integers(1, 5), min_size=int(op == "instance_norm"), max_size=3)))
    assume(fits(backend, shape))
    x = draw(specs(shape))
    training = draw(st.booleans())  # use_input_stats for instance_norm
    rm, rv = _running(draw, c, written=training)
    w, b = draw(optional(specs((c,), param=True))), draw(optional(specs((c,), param=True)))
    args = (x, rm, rv, w, b, training, draw(MOMENTUM), draw(st.sampled_from(EPS)))
    return Case(op, args, draw(ACTIVATION), (cotangent(draw, shape),))


@dataclasses.dataclass(frozen=True)
class Case:
    """One draw: the op, its positional arguments (a Spec for each tensor), the activation (None for
    the add_ ops, which take none), and a cotangent Spec (or None) for each output."""
    op: str
    args: tuple
    activation: Optional[str]
    cots: tuple
    kwargs: tuple = ()  # keyword arguments (name, value) of the ops that take no activation


# --- running one draw three ways and comparing -------------------------------------------------------

def torch_group_norm_not_crashing(x, *args, **kwargs):
    """torch's group norm, on a contiguous copy of an x that needs no gradient: torch 2.13's CPU
    backward crashes (SIGSEGV) for a channels_last input that needs none while a parameter does
    (normops avoids that path: test_regressions.py's channels_last weight-only tests)."""
    if not x.requires_grad and not x.is_contiguous():
        return torch_group_norm(x.contiguous(), *args, **kwargs).contiguous(memory_format=suggest_memory_format(x))
    return torch_group_norm(x, *args, **kwargs)


OPS = {"layer_norm": (F.layer_norm, torch_layer_norm), "rms_norm": (F.rms_norm, torch_rms_norm),
       "group_norm": (F.group_norm, torch_group_norm_not_crashing), "instance_norm": (F.instance_norm, torch_instance_norm),
       "batch_norm": (F.batch_norm, torch_batch_norm), "add_layer_norm": (F.add_layer_norm, torch_add_layer_norm),
       "add_rms_norm": (F.add_rms_norm, torch_add_rms_norm), "gated_rms_norm": (F.gated_rms_norm, torch_gated_rms_norm)}


@dataclasses.dataclass
class Result:
    outputs: list
    grads: list
    written: list  # the in-place tensors after the call
    error: Optional[BaseException] = None
    in_backward: bool = False  # the error came from the backward (the forward went through)


def run(case, dtype, fn, dense=False, backend=None):
    """fn on the draw's tensors in `dtype` (float64 and dense for the reference), then its
    gradients for the draw's cotangents; an exception anywhere is the result's `error`."""
    args = [materialize(a, dtype, dense) if isinstance(a, Spec) else a for a in case.args]
    if dense:  # the reference: every tensor in float64 (parameters of another dtype too)
        args = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                for a in args]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    written = [a for s, a in zip(case.args, args) if isinstance(s, Spec) and s.written]
    kwargs = dict(case.kwargs) if case.kwargs or case.op.startswith("add_") else {"activation": case.activation}
    result = Result([], [], written)
    try:
        with normops.backend(backend) if backend else contextlib.nullcontext():
            out = fn(*args, **kwargs)
            result.outputs = list(out) if isinstance(out, tuple) else [out]
            # the cotangent's values rounded to the output dtype (the input's), also for the reference
            pairs = [(o, materialize(c, dtype if dense else o.dtype, dense))
                     for o, c in zip(result.outputs, case.cots) if c is not None]
            if leaves and pairs:
                result.in_backward = True
                grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
                result.grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    except Exception as e:  # noqa: BLE001 (any exception: compared with torch's raising below)
        result.error = e
    else:
        result.in_backward = False
    return result


def assert_close(what, ours, same, ref, dtype):
    """ours obeys the tolerance rule against ref, with torch's `same` as the yardstick; where the
    reference is not finite, ours holds the same value (NaN for NaN, the same infinity)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == same.dtype, f"{what}: dtype {ours.dtype} != torch's {same.dtype}"
    o, s, r = ours.detach().double().cpu(), same.detach().double().cpu(), ref.detach().double().cpu()
    bad = ~torch.isfinite(r)
    assert torch.equal(o[bad].isnan(), r[bad].isnan()) and torch.equal(o[bad & ~r.isnan()], r[bad & ~r.isnan()]), \
        f"{what}: the reference's non-finite values {r[bad].tolist()} are {o[bad].tolist()} here"
    keep = ~bad & torch.isfinite(s)  # where torch itself overflowed, nothing to hold ours to
    o, s, r = o[keep], s[keep], r[keep]
    assert torch.isfinite(o).all(), f"{what}: non-finite values {o[~torch.isfinite(o)].tolist()} where the " \
                                    f"reference is finite"
    bound = tolerance(s, r, dtype)
    assert err(o, r) <= bound, f"{what}: error {err(o, r):.3g} > {bound:.3g} (torch's own: {err(s, r):.3g})"


def _strides(t):
    return [st for size, st in zip(t.shape, t.stride()) if size > 1]


def _non_empty(case):
    """The case with every 0 size made 2."""
    def grow(a):
        return dataclasses.replace(a, shape=tuple(s or 2 for s in a.shape)) if isinstance(a, Spec) else a
    return dataclasses.replace(case, args=tuple(map(grow, case.args)), cots=tuple(map(grow, case.cots)))


def _at_relu_kink(case, dtype, torch_fn):
    """Some pre-activation is 0 up to `dtype`'s rounding (constant or integer inputs make exact 0s)."""
    pre = run(dataclasses.replace(case, activation=None), dtype, torch_fn, dense=True).outputs[0].detach()
    return bool((pre.abs() <= 4 * torch.finfo(dtype).eps * max(1.0, pre.abs().max().item())).any()) \
        if pre.numel() else False


def check(case, backend):
    dtype = case.args[0].dtype
    ours_fn, torch_fn = OPS[case.op]
    before = [materialize(s, dtype) for s in case.args if isinstance(s, Spec) and s.written]
    same = run(case, dtype, torch_fn)
    ours = run(case, dtype, ours_fn, backend=backend)
    # An empty batch is normops' own contract (tests/test_functional.py: test_empty_outputs and
    # test_batch_norm_empty_batch_leaves_running_stats): it returns empty results, leaves the running
    # statistics alone, and raises what torch raises for a non-empty batch, where torch has empty-input
    # failures of its own ("tensor does not have a device") and NaN running statistics.
    empty = math.prod(case.args[0].shape) == 0
    if empty:
        for b, a in zip(before, ours.written):
            assert torch.equal(a, b), "an empty batch changed the running statistics"
    if same.error is not None and same.in_backward and ours.error is None:
        # torch took the call and failed its own backward (fp16 group_norm with a bias and no weight:
        # "tensor does not have a device"): a gap of torch's, not a bad call; the forward is compared
        case = dataclasses.replace(case, cots=(None,) * len(case.cots))
        same, ours = run(case, dtype, torch_fn), run(case, dtype, ours_fn, backend=backend)
    if same.error is not None:
        if empty and ours.error is None:
            assert [tuple(o.shape) for o in ours.outputs] == [case.args[0].shape] * len(ours.outputs)
            return
        assert ours.error is not None, f"torch raises {same.error!r}; normops does not"
        for b, a in zip(before, ours.written):
            assert torch.equal(a, b), "a failed call changed the running statistics"
        return
    if ours.error is not None:
        if empty and run(_non_empty(case), dtype, torch_fn).error is not None:
            return
        raise AssertionError(f"normops raises where torch does not: {ours.error!r}") from ours.error
    ref = run(case, dtype, torch_fn, dense=True)
    assert ref.error is None, f"the float64 reference raises {ref.error!r}"
    assert len(ours.outputs) == len(ref.outputs)
    for i, (o, s, r) in enumerate(zip(ours.outputs, same.outputs, ref.outputs)):
        assert_close(f"output {i}", o, s, r, dtype)
        # the layout torch gives a norm's output (the add_ ops' torch composition has no layout to match)
        if not case.op.startswith("add_") and not s.is_contiguous():
            assert _strides(o) == _strides(s), f"output {i}: strides {o.stride()} != torch's {s.stride()}"
    if case.activation == "relu" and _at_relu_kink(case, dtype, torch_fn):
        return  # relu' at 0 is a convention, and which side of 0 a rounded 0 falls on is noise
    assert len(ours.grads) == len(ref.grads)
    names = [f"grad of argument {i}" for i, a in enumerate(case.args) if isinstance(a, Spec) and a.grad]
    for name, o, s, r in zip(names, ours.grads, same.grads, ref.grads):
        assert_close(name, o, s, r, dtype)
    for i, (o, s, r) in enumerate(zip(ours.written, same.written, ref.written) if not empty else ()):
        assert_close(f"running statistic {i}", o, s, r, dtype)


# One input dtype for a whole draw (parameters may have their own).
DTYPE = st.sampled_from(DTYPES)


def _with_dtype(case, dtype):
    x = case.args[0]
    return dataclasses.replace(case, args=(dataclasses.replace(x, dtype=dtype),) + case.args[1:])


def fuzz(strategy_for):
    """A test, parametrized by backend, that checks every draw of strategy_for(backend)."""
    @pytest.mark.parametrize("backend", BACKENDS)
    def test(backend):
        @fuzz_settings(backend)
        @given(case=strategy_for(backend), dtype=DTYPE)
        def inner(case, dtype):
            check(_with_dtype(case, dtype), backend)
        inner()
    return test


test_layer_norm = fuzz(lambda b: row_cases(b, "layer_norm"))
test_rms_norm = fuzz(lambda b: row_cases(b, "rms_norm"))
test_add_layer_norm = fuzz(lambda b: row_cases(b, "add_layer_norm"))
test_add_rms_norm = fuzz(lambda b: row_cases(b, "add_rms_norm"))
test_gated_rms_norm = fuzz(gated_cases)
test_group_norm = fuzz(group_cases)
test_instance_norm = fuzz(lambda b: batch_cases(b, "instance_norm"))
test_batch_norm = fuzz(lambda b: batch_cases(b, "batch_norm"))


# --- the BatchNorm modules: num_batches_tracked, momentum=None, a train/eval sequence -----------------

@st.composite
def module_cases(draw, backend):
    """(module dims, num_features, constructor kwargs, one (input Spec, training) per call)."""
    dims, c = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kwargs = dict(momentum=draw(MOMENTUM), affine=draw(st.booleans()), track_running_stats=draw(st.booleans()),
                  eps=draw(st.sampled_from(EPS)))
    calls = []
    for training in draw(st.lists(st.booleans(), min_size=1, max_size=3)):
        n = draw(st.integers(1, 4))
        spatial = draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims)) if dims > 1 or draw(
            st.booleans()) else []
        shape = (n, c) + tuple(spatial)
        assume(fits(backend, shape))
        calls.append((draw(specs(shape, grad=False)), training))
    return dims, c, kwargs, calls


def _module_run(cls, c, kwargs, calls, dtype, dense=False, backend=None):
    """The outputs of a train/eval sequence of calls (None for a call that raised) and the module's
    buffers after it."""
    module = cls(c, **kwargs).to(torch.float64 if dense else dtype).to(DEVICE)
    outputs = []
    for spec, training in calls:
        module.train(training)
        x = materialize(spec, dtype, dense)
        try:
            with normops.backend(backend) if backend else contextlib.nullcontext(), torch.no_grad():
                outputs.append(module(x))
        except Exception:  # noqa: BLE001 (compared with torch's raising)
            outputs.append(None)
    return outputs, {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_module(backend):
    @fuzz_settings(backend)
    @given(case=module_cases(backend), dtype=DTYPE)
    def inner(case, dtype):
        dims, c, kwargs, calls = case
        name = f"BatchNorm{dims}d"
        ours = _module_run(getattr(normops.nn, name), c, kwargs, calls, dtype, backend=backend)
        same = _module_run(getattr(torch.nn, name), c, kwargs, calls, dtype)
        ref = _module_run(getattr(torch.nn, name), c, kwargs, calls, dtype, dense=True)
        for i, (o, s, r) in enumerate(zip(*(run[0] for run in (ours, same, ref)))):
            assert (o is None) == (s is None), f"call {i}: torch {'raises' if s is None else 'does not raise'}, " \
                                               f"normops {'does' if o is None else 'does not'}"
            if o is not None:
                assert_close(f"call {i}", o, s, r, dtype)
        assert ours[1].keys() == same[1].keys()
        for key in ours[1]:
            if key == "num_batches_tracked":
                # the training calls that succeeded: a failed call leaves the buffers alone (the team's
                # rule), where torch's module counts a batch before F.batch_norm refuses it
                ok = sum(1 for (_, training), o in zip(calls, ours[0]) if training and o is not None)
                assert int(ours[1][key]) == ok <= int(same[1][key]), \
                    f"{key}: {int(ours[1][key])}, for {ok} training calls that succeeded (torch's {int(same[1][key])})"
            else:
                assert_close(key, ours[1][key], same[1][key], ref[1][key], dtype)
    inner()
