"""normops.nn modules against their torch.nn twins.

Every normops module subclasses its torch.nn twin and overrides ``forward`` only, so the
contract tested here is "indistinguishable from torch.nn", apart from the optional fused
``activation=``: same constructor defaults, parameters, buffers, ``state_dict``, ``repr``;
the same outputs, gradients and running-statistics updates, on every CPU backend.

Tolerances (``TOL``), and why: half of the tests' ``beyond_torch`` of ``normops.check.TOLERANCE``
as both ``atol`` and ``rtol``, so that ``atol + rtol * |ref|`` is at most ``beyond_torch *
max(1, |ref|)`` element by element: never looser than the rule of tests/cases.py.
- float64: 5e-11. Both sides compute in fp64; what differs is summation order, ~1e-15 relative on
  these sizes, so this is loose yet still catches any formula error (those are >= 1e-3).
- float32: 1e-5. torch.nn's own fp32 error on these sizes is ~1e-6; the "numpy" backend computes
  in fp64 and rounds once, the "torch" backend calls the same ATen kernels: ~10x margin.

Inputs are shifted (``-2.3 + 0.5 * randn``) and sizes odd, as STYLE.md asks, so a kernel that
forgets to centre, or to mask a tail, shows.
"""
import copy
import inspect
import warnings
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.testing import assert_close

import normops
from normops import nn as nnn
from normops.check import TOLERANCE

BACKENDS = ("torch", "numpy")
DTYPES = (torch.float64, torch.float32)
TOL = {dtype: dict(rtol=TOLERANCE[dtype].beyond_torch / 2, atol=TOLERANCE[dtype].beyond_torch / 2) for dtype in DTYPES}
NAMES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "RMSNorm", "GroupNorm",
         "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")
PAIRS = {name: (getattr(nnn, name), getattr(nn, name)) for name in NAMES}
ACTIVATIONS = {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu}


class Case(NamedTuple):
    name: str
    args: tuple
    kwargs: dict
    shape: tuple
    memory_format: Optional[torch.memory_format] = None

    def __repr__(self):
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        fmt = ",channels_last" if self.memory_format is not None else ""
        return f"{self.name}{self.args}{kw and '[' + kw + ']'}-x{list(self.shape)}{fmt}".replace(" ", "")

    def make(self, which, dtype=torch.float64, **extra):
        ours_cls, torch_cls = PAIRS[self.name]
        cls = ours_cls if which == "ours" else torch_cls
        return cls(*self.args, **self.kwargs, dtype=dtype, **extra)

    def input(self, dtype, gen):
        x = -2.3 + 0.5 * torch.randn(self.shape, dtype=dtype, generator=gen)
        return x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)


CASES = [
    # BatchNorm
    Case("BatchNorm1d", (5,), {}, (7, 5)),
    Case("BatchNorm1d", (5,), {}, (4, 5, 9)),
    Case("BatchNorm1d", (5,), {"momentum": None}, (4, 5, 9)),
    Case("BatchNorm2d", (5,), {}, (3, 5, 6, 7)),
    Case("BatchNorm2d", (5,), {"momentum": None}, (3, 5, 6, 7)),
    Case("BatchNorm2d", (5,), {"track_running_stats": False}, (3, 5, 6, 7)),
    Case("BatchNorm2d", (5,), {"affine": False}, (3, 5, 6, 7)),
    Case("BatchNorm2d", (5,), {"momentum": 0.3, "eps": 1e-3}, (2, 5, 3, 4)),
    Case("BatchNorm2d", (5,), {"bias": False}, (3, 5, 6, 7)),
    Case("BatchNorm2d", (5,), {}, (3, 5, 6, 7), torch.channels_last),
    Case("BatchNorm3d", (3,), {}, (2, 3, 4, 5, 3)),
    Case("BatchNorm3d", (3,), {"momentum": None, "affine": False}, (2, 3, 4, 5, 3)),
    # InstanceNorm
    Case("InstanceNorm1d", (4,), {}, (3, 4, 11)),
    Case("InstanceNorm1d", (4,), {"affine": True}, (4, 11)),  # unbatched (C, L)
    Case("InstanceNorm1d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 11)),
    Case("InstanceNorm2d", (4,), {}, (3, 4, 5, 6)),
    Case("InstanceNorm2d", (4,), {"affine": True}, (4, 5, 6)),  # unbatched (C, H, W)
    Case("InstanceNorm2d", (4,), {"track_running_stats": True}, (3, 4, 5, 6)),
    Case("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}, (4, 5, 6)),  # unbatched + stats
    Case("InstanceNorm2d", (4,), {"affine": True, "bias": False}, (3, 4, 5, 6)),
    Case("InstanceNorm2d", (4,), {"affine": True}, (3, 4, 5, 6), torch.channels_last),
    Case("InstanceNorm3d", (3,), {"affine": True}, (2, 3, 4, 3, 5)),
    Case("InstanceNorm3d", (3,), {"affine": True, "track_running_stats": True, "momentum": 0.25},
         (2, 3, 4, 3, 5)),
    # LayerNorm
    Case("LayerNorm", (8,), {}, (3, 5, 8)),
    Case("LayerNorm", ((4, 7),), {}, (3, 4, 7)),  # multi-dim normalized_shape
    Case("LayerNorm", (8,), {"elementwise_affine": False}, (6, 8)),
    Case("LayerNorm", (8,), {"bias": False}, (2, 3, 8)),
    Case("LayerNorm", ((3, 5),), {"eps": 1e-3, "bias": False}, (2, 3, 5)),
    # RMSNorm
    Case("RMSNorm", (8,), {}, (3, 5, 8)),  # eps=None: the input dtype's machine epsilon
    Case("RMSNorm", ((4, 7),), {"eps": 1e-6}, (3, 4, 7)),
    Case("RMSNorm", (8,), {"elementwise_affine": False}, (6, 8)),
    # GroupNorm
    Case("GroupNorm", (3, 6), {}, (2, 6, 5, 4)),
    Case("GroupNorm", (1, 6), {"affine": False}, (2, 6, 7)),
    Case("GroupNorm", (6, 6), {"eps": 1e-3}, (2, 6, 3, 2, 4)),
    Case("GroupNorm", (2, 6), {"bias": False}, (3, 6, 5)),
    Case("GroupNorm", (2, 6), {}, (3, 6, 5, 4), torch.channels_last),
    Case("GroupNorm", (3, 6), {}, (2, 6, 3, 4, 5), torch.channels_last_3d),
]


def _where_torch_has(case):
    """The case, skipped where the installed torch's class lacks one of its keyword arguments:
    ``bias=`` on GroupNorm and the batch/instance norms is newer than torch 2.11 (the GPU
    machine's), and there torch raises the same TypeError for both modules."""
    accepted = inspect.signature(PAIRS[case.name][1].__init__).parameters
    missing = [k for k in case.kwargs if k not in accepted]
    reason = f"torch {torch.__version__}'s nn.{case.name} takes no {', '.join(missing)}="
    return pytest.param(case, marks=pytest.mark.skipif(bool(missing), reason=reason))


CASES = [_where_torch_has(case) for case in CASES]

# One case per class, with affine parameters and running statistics where the class has them.
FULL = {
    "BatchNorm1d": Case("BatchNorm1d", (5,), {}, (4, 5, 9)),
    "BatchNorm2d": Case("BatchNorm2d", (5,), {}, (3, 5, 6, 7)),
    "BatchNorm3d": Case("BatchNorm3d", (3,), {}, (2, 3, 4, 5, 3)),
    "LayerNorm": Case("LayerNorm", ((4, 7),), {}, (3, 4, 7)),
    "RMSNorm": Case("RMSNorm", (8,), {}, (3, 5, 8)),
    "GroupNorm": Case("GroupNorm", (3, 6), {}, (2, 6, 5, 4)),
    "InstanceNorm1d": Case("InstanceNorm1d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 11)),
    "InstanceNorm2d": Case("InstanceNorm2d", (4,), {"affine": True, "track_running_stats": True}, (3, 4, 5, 6)),
    "InstanceNorm3d": Case("InstanceNorm3d", (3,), {"affine": True, "track_running_stats": True},
                           (2, 3, 4, 3, 5)),
}

ids = repr


# --- helpers ---------------------------------------------------------------------------------

def make_pair(case, dtype, seed=0, **extra):
    """(ours, torch's) from identical, non-trivial initial state (random weight and bias)."""
    ref = case.make("torch", dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    ours = case.make("ours", dtype, **extra)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def check(what, got, want, want64, tol):
    """``got`` agrees with torch's ``want``. In float32 (``want64`` given: torch in float64 from the
    same state) the rule of STYLE.md: our error against float64 may be at most twice torch's own
    float32 error, plus ``tol``. Plain closeness to torch's float32 would be wrong where torch is
    the less accurate one (its channels_last GroupNorm backward, for one: ~3e-5 on these inputs)."""
    if want.dtype == torch.long:
        assert torch.equal(got, want), what
        return
    if want64 is None:
        assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")
        return
    err = (got.double() - want64).abs()
    torch_err = (want.double() - want64).abs().max()
    bound = 2 * torch_err + tol["atol"] + tol["rtol"] * want64.abs()
    assert (err <= bound).all(), (f"{what}: error vs float64 {err.max().item():.3g} exceeds 2 x torch's float32 "
                                  f"error {torch_err.item():.3g} + tolerance")


def assert_state_equal(ours, ref, tol, ref64=None):
    """Same parameters and buffers (running statistics; num_batches_tracked exactly)."""
    bo, br = dict(ours.named_buffers()), dict(ref.named_buffers())
    b64 = dict(ref64.named_buffers()) if ref64 is not None else {}
    assert bo.keys() == br.keys()
    for name, b in br.items():
        check(f"buffer {name}", bo[name], b, b64.get(name), tol)
    p64 = dict(ref64.named_parameters()) if ref64 is not None else {}
    for (name, po), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        check(f"parameter {name}", po, pr, p64.get(name), tol)


def memory_formats(t):
    extra = {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(t.dim(), [])
    return [torch.contiguous_format] + extra


def step(ours, ref, ref64, x, dy, tol, post=None):
    """One forward + backward through each module; output (values and memory format), input
    grad, parameter grads and buffers agree. ``ref64``: torch's module in float64, or None."""
    mods = [m for m in (ours, ref, ref64) if m is not None]
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()][:len(mods)]
    for m in mods:
        for p in m.parameters():
            p.grad = None
    ys = [m(xi) for m, xi in zip(mods, xs)]
    if post is not None:
        ys[1:] = [post(y) for y in ys[1:]]
    yo, yr = ys[0], ys[1]
    y64 = ys[2] if ref64 is not None else None
    assert yo.shape == yr.shape and yo.dtype == yr.dtype
    check("output", yo, yr, y64, tol)
    for fmt in memory_formats(yr):  # channels_last in, channels_last out, as torch does
        assert yo.is_contiguous(memory_format=fmt) == yr.is_contiguous(memory_format=fmt), fmt
    for y in ys:
        y.backward(dy.to(y.dtype))
    check("input grad", xs[0].grad, xs[1].grad, xs[2].grad if ref64 is not None else None, tol)
    p64 = dict(ref64.named_parameters()) if ref64 is not None else {}
    for (name, po), (_, pr) in zip(ours.named_parameters(), ref.named_parameters()):
        assert (po.grad is None) == (pr.grad is None), name
        if pr.grad is not None:
            check(f"{name}.grad", po.grad, pr.grad, p64[name].grad if p64 else None, tol)
    assert_state_equal(ours, ref, tol, ref64)


def run_parity(ours, ref, case, dtype, steps=3, post=None):
    """Several training steps (fresh input each), then one in eval mode (which normalizes with the
    running statistics the training steps left); everything must agree."""
    tol = TOL[dtype]
    ref64 = None
    if dtype != torch.float64:
        ref64 = case.make("torch", torch.float64)
        ref64.load_state_dict(ref.state_dict())
    gen = torch.Generator().manual_seed(1234)
    for training, n in ((True, steps), (False, 1)):
        for m in (ours, ref, ref64):
            if m is not None:
                m.train(training)
        for _ in range(n):
            x = case.input(dtype, gen)
            dy = torch.randn(case.shape, dtype=dtype, generator=gen)
            step(ours, ref, ref64, x, dy, tol, post)


@pytest.fixture
def spy(monkeypatch):
    """spy(name) -> a dict counting the calls that reach backend ``name``'s functions, so a parity
    test cannot pass by silently running on another backend."""
    import importlib

    def install(name):
        mod = importlib.import_module(f"normops.backends.{name}_backend")
        calls = {}
        for fn in ("row_norm_fwd", "row_norm_bwd", "group_norm_fwd", "group_norm_bwd", "batch_norm_fwd",
                   "batch_norm_bwd"):
            orig = getattr(mod, fn)

            def wrapped(*a, _orig=orig, _fn=fn, **k):
                calls[_fn] = calls.get(_fn, 0) + 1
                return _orig(*a, **k)

            monkeypatch.setattr(mod, fn, wrapped)
        if name == "torch":  # fp32/fp64 calls on the torch backend go straight to ATen (torch's autograd)
            import normops.ops
            orig_route = normops.ops.route

            def route(*a, **k):
                how = orig_route(*a, **k)
                calls["aten_direct"] = calls.get("aten_direct", 0) + (how.implementation in ("aten", "composed"))
                return how

            monkeypatch.setattr(normops.ops, "route", route)
        return calls

    return install


def assert_used(calls, name):
    assert any(k.endswith("_fwd") or (k == "aten_direct" and v) for k, v in calls.items()), \
        f"backend {name!r} never ran a forward: {calls}"
    assert any(k.endswith("_bwd") or (k == "aten_direct" and v) for k, v in calls.items()), \
        f"backend {name!r} never ran a backward: {calls}"


# --- structure: a drop-in must look exactly like torch's module --------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_constructor_defaults_match_torch(name):
    ours_cls, torch_cls = PAIRS[name]
    assert issubclass(ours_cls, torch_cls)
    ours_sig = inspect.signature(ours_cls.__init__).parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in ours_sig.values())
    for pname, p in inspect.signature(torch_cls.__init__).parameters.items():
        if pname in ours_sig:
            assert ours_sig[pname].default == p.default, pname
            if p.kind is p.POSITIONAL_OR_KEYWORD:  # positional order must match torch's
                assert list(ours_sig).index(pname) == list(inspect.signature(torch_cls.__init__).parameters).index(pname)
        else:
            assert has_var_kw, f"{name} does not accept torch's {pname!r}"
    assert ours_sig["activation"].default is None
    assert ours_sig["activation"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_structure_matches_torch(case):
    ours, ref = case.make("ours"), case.make("torch")
    assert isinstance(ours, PAIRS[case.name][1])
    for got, want in ((ours.named_parameters(), ref.named_parameters()), (ours.named_buffers(), ref.named_buffers())):
        got, want = list(got), list(want)
        assert [n for n, _ in got] == [n for n, _ in want]
        for (n, a), (_, b) in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and type(a) is type(b), n
            assert torch.equal(a, b), n  # reset_parameters / reset_running_stats are torch's
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert ours.extra_repr() == ref.extra_repr()
    assert repr(ours) == repr(ref)
    # Every attribute torch sets (eps, momentum, affine, normalized_shape, ...) is the same.
    for k, v in vars(ref).items():
        if not k.startswith("_"):
            assert getattr(ours, k) == v, k
    # A buffer whose dtype follows the module's dtype argument follows it here too.
    o32, r32 = case.make("ours", torch.float32), case.make("torch", torch.float32)
    assert [(n, t.dtype) for n, t in o32.state_dict().items()] == [(n, t.dtype) for n, t in r32.state_dict().items()]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_activation_repr(name, act):
    case = FULL[name]
    m = case.make("ours", activation=act)
    assert m.activation == act
    assert f"activation='{act}'" in m.extra_repr()
    assert f"activation='{act}'" in repr(m)
    # Everything else is torch's repr.
    assert m.extra_repr().startswith(case.make("torch").extra_repr())
    assert case.make("ours", activation=None).extra_repr() == case.make("torch").extra_repr()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", ["tanh", "ReLU", "", 3])
def test_unknown_activation_raises(name, bad):
    with pytest.raises(ValueError):
        FULL[name].make("ours", activation=bad)


# --- checkpoints -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_torch_checkpoint_round_trip(name):
    case = FULL[name]
    gen = torch.Generator().manual_seed(7)
    ref = case.make("torch")
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):  # train a little: weights and running statistics leave their initial values
        opt.zero_grad()
        (ref(case.input(torch.float64, gen)) * torch.randn(case.shape, dtype=torch.float64, generator=gen)).sum().backward()
        opt.step()
    sd = ref.state_dict()
    if "running_mean" in sd:
        assert not torch.equal(sd["running_mean"], torch.zeros_like(sd["running_mean"]))
    if name.startswith("BatchNorm"):  # (torch's InstanceNorm keeps the buffer but never counts)
        assert sd["num_batches_tracked"].item() == 3

    ours = case.make("ours")
    result = ours.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in sd.items():
        assert torch.equal(ours.state_dict()[k], v), k

    back = case.make("torch")
    back.load_state_dict(ours.state_dict(), strict=True)
    for k, v in sd.items():
        assert torch.equal(back.state_dict()[k], v), k

    x = case.input(torch.float64, gen)
    for mode in ("eval", "train"):
        for m in (ref, ours, back):
            getattr(m, mode)()
        want = ref(x)
        assert_close(ours(x), want, **TOL[torch.float64])
        assert_close(back(x), want, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
def test_old_batchnorm_checkpoint_without_num_batches_tracked(name):
    """torch's _load_from_state_dict versioning: a version-1 checkpoint has no num_batches_tracked."""
    case = FULL[name]
    sd = case.make("torch").state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    for which in ("torch", "ours"):
        m = case.make(which)
        m.load_state_dict(sd, strict=True)
        assert m.num_batches_tracked.item() == 0


# --- forward / backward / running-statistics parity --------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_parity_with_torch(case, dtype, backend, spy):
    calls = spy(backend)
    ours, ref = make_pair(case, dtype)
    with normops.backend(backend):
        run_parity(ours, ref, case, dtype)
    assert_used(calls, backend)


LAYOUT_CASES = list(FULL.values()) + [
    Case("GroupNorm", (2, 6), {}, (3, 6, 5, 4), torch.channels_last),
    Case("InstanceNorm2d", (4,), {"affine": True}, (3, 4, 5, 6), torch.channels_last),
    Case("BatchNorm2d", (5,), {}, (3, 5, 6, 7), torch.channels_last),
]


def output_grad(layout, shape, dtype, gen):
    if layout == "expanded":  # what y.sum().backward() sends: every stride 0
        return torch.ones((), dtype=dtype).expand(shape)
    if layout == "permuted":  # what a transpose downstream sends: strides reversed
        return torch.randn(tuple(reversed(shape)), dtype=dtype, generator=gen).permute(*reversed(range(len(shape))))
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype, generator=gen).contiguous(
            memory_format={4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)])
    return torch.randn(shape, dtype=dtype, generator=gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, layout", [
    pytest.param(case, layout, id=f"{case!r}-{layout}") for case in LAYOUT_CASES
    for layout in ("expanded", "permuted", "channels_last") if layout != "channels_last" or len(case.shape) in (4, 5)])
def test_backward_accepts_any_output_grad_layout(case, layout, backend):
    """The gradient reaching a norm need not be laid out like the norm's output; torch.nn takes any."""
    gen = torch.Generator().manual_seed(11)
    ours, ref = make_pair(case, torch.float64)
    with normops.backend(backend):
        for training in (True, False):
            ours.train(training), ref.train(training)
            x = case.input(torch.float64, gen)
            step(ours, ref, None, x, output_grad(layout, case.shape, torch.float64, gen), TOL[torch.float64])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_momentum_none_is_cumulative_average(backend):
    """momentum=None: after k batches the running mean is the plain average of the k batch means."""
    m = nnn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    xs = [-2.3 + 0.5 * torch.randn(6, 3, dtype=torch.float64, generator=gen) for _ in range(4)]
    with normops.backend(backend):
        for x in xs:
            m(x)
    assert m.num_batches_tracked.item() == 4
    assert_close(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), rtol=1e-12, atol=1e-12)
    # The first batch has weight 1/1, so the initial running_var of 1 drops out entirely.
    var = torch.stack([x.var(0, correction=1) for x in xs]).mean(0)
    assert_close(m.running_var, var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_without_running_stats_uses_batch_stats_in_eval(backend):
    x = -2.3 + 0.5 * torch.randn(4, 3, 5, 5, dtype=torch.float64)
    m = nnn.BatchNorm2d(3, track_running_stats=False, affine=False, dtype=torch.float64).eval()
    with normops.backend(backend):
        y = m(x)
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), keepdim=True, correction=0)
    assert_close(y, (x - mean) / torch.sqrt(var + m.eps), rtol=1e-10, atol=1e-10)
    assert m.running_mean is None and m.num_batches_tracked is None


# --- fused activation --------------------------------------------------------------------------

ACT_CASES = list(FULL.values()) + [
    Case("GroupNorm", (2, 6), {}, (3, 6, 5, 4), torch.channels_last),
    Case("InstanceNorm2d", (4,), {"affine": True}, (3, 4, 5, 6), torch.channels_last),
    Case("BatchNorm2d", (5,), {}, (3, 5, 6, 7), torch.channels_last),
    Case("BatchNorm2d", (5,), {"affine": False}, (3, 5, 6, 7)),
    Case("LayerNorm", (8,), {"elementwise_affine": False}, (6, 8)),
    Case("GroupNorm", (2, 6), {"affine": False}, (3, 6, 5)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", ACT_CASES, ids=ids)
def test_activation_equals_norm_then_activation(case, act, backend, spy):
    calls = spy(backend)
    ours, ref = make_pair(case, torch.float64, activation=act)
    with normops.backend(backend):
        run_parity(ours, ref, case, torch.float64, steps=2, post=ACTIVATIONS[act])
    assert_used(calls, backend)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("case", [FULL["LayerNorm"], FULL["BatchNorm2d"],
                                  Case("GroupNorm", (2, 6), {}, (3, 6, 5, 4), torch.channels_last)], ids=ids)
def test_activation_float32(case, act):
    ours, ref = make_pair(case, torch.float32, activation=act)
    run_parity(ours, ref, case, torch.float32, steps=2, post=ACTIVATIONS[act])


# --- a failed call changes nothing -------------------------------------------------------------

def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed by a failed call: {v} -> {after[k]}"
    for n, p in m.named_parameters():
        assert p.grad is None, n


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 1, 1), (1, 4, 1, 1, 1)], ids=str)
def test_batchnorm_single_value_per_channel_raises_and_changes_nothing(shape, momentum):
    cls = {2: nnn.BatchNorm1d, 3: nnn.BatchNorm1d, 4: nnn.BatchNorm2d, 5: nnn.BatchNorm3d}[len(shape)]
    m = cls(4, momentum=momentum).train()
    m(torch.randn((3,) + shape[1:-1] + (2,)) if len(shape) > 2 else torch.randn(3, 4))  # non-trivial stats
    before = snapshot(m)
    assert m.num_batches_tracked.item() == 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(shape))
    assert_unchanged(m, before)
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("make, x", [
    (lambda: nnn.BatchNorm2d(4), torch.randn(2, 3, 5, 5)),
    (lambda: nnn.BatchNorm2d(4, momentum=None), torch.randn(2, 5, 5, 5)),
    (lambda: nnn.BatchNorm2d(4), torch.randn(2, 4, 5)),  # wrong number of dims
    (lambda: nnn.BatchNorm1d(4), torch.randn(2, 3, 5)),
    (lambda: nnn.BatchNorm3d(4), torch.randn(2, 3, 2, 2, 2)),
    (lambda: nnn.InstanceNorm2d(4, affine=True, track_running_stats=True), torch.randn(2, 3, 5, 5)),
    (lambda: nnn.InstanceNorm2d(4, track_running_stats=True), torch.randn(2, 3, 5, 5)),
    (lambda: nnn.InstanceNorm1d(4, affine=True, track_running_stats=True), torch.randn(2, 4, 1)),  # 1 element
    (lambda: nnn.GroupNorm(2, 4), torch.randn(2, 6, 5, 5)),
    (lambda: nnn.LayerNorm(8), torch.randn(2, 7)),
    (lambda: nnn.RMSNorm((2, 8)), torch.randn(2, 3, 8)),
], ids=["bn2d-channels", "bn2d-momentum-none-channels", "bn2d-ndim", "bn1d-channels", "bn3d-channels",
        "in2d-affine-channels", "in2d-channels", "in1d-one-element", "gn-channels", "ln-shape", "rms-shape"])
def test_bad_input_raises_and_changes_nothing(make, x):
    m = make().train()
    before = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's InstanceNorm warns before it fails
        with pytest.raises((ValueError, RuntimeError)):
            m(x)
    assert_unchanged(m, before)


# --- torch.compile -----------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_layer_norm(fresh_dynamo):
    eager = nnn.LayerNorm(24)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5), eager.bias.uniform_(-0.5, 0.5)
    m = copy.deepcopy(eager)
    compiled = torch.compile(m, fullgraph=True)
    x = -2.3 + 0.5 * torch.randn(5, 7, 24)
    dy = torch.randn(5, 7, 24)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    yc, ye = compiled(xc), eager(xe)
    assert_close(yc, ye, **TOL[torch.float32])
    assert_close(yc, nn.functional.layer_norm(x, (24,), eager.weight, eager.bias), **TOL[torch.float32])
    yc.backward(dy), ye.backward(dy)
    assert_close(xc.grad, xe.grad, **TOL[torch.float32])
    assert_close(m.weight.grad, eager.weight.grad, **TOL[torch.float32])
    assert_close(m.bias.grad, eager.bias.grad, **TOL[torch.float32])


def test_compile_batch_norm_train_updates_running_stats(fresh_dynamo):
    eager = nnn.BatchNorm2d(5, momentum=0.2)
    ref = nn.BatchNorm2d(5, momentum=0.2)
    m = copy.deepcopy(eager)
    compiled = torch.compile(m, fullgraph=True)
    gen = torch.Generator().manual_seed(5)
    for i in range(3):
        x = -2.3 + 0.5 * torch.randn(3, 5, 6, 7, generator=gen)
        dy = torch.randn(3, 5, 6, 7, generator=gen)
        xc, xe, xr = (x.clone().requires_grad_() for _ in range(3))
        yc, ye, yr = compiled(xc), eager(xe), ref(xr)
        assert_close(yc, ye, **TOL[torch.float32])
        assert_close(yc, yr, **TOL[torch.float32])
        yc.backward(dy), ye.backward(dy), yr.backward(dy)
        assert_close(xc.grad, xe.grad, **TOL[torch.float32])
        assert_close(m.weight.grad, eager.weight.grad, **TOL[torch.float32])
        # Eager fp32 BatchNorm is ATen's own; compiled, it is the normops op: alike to rounding.
        assert_close(m.running_mean, eager.running_mean, rtol=1e-6, atol=1e-7)
        assert_close(m.running_var, eager.running_var, rtol=1e-6, atol=1e-7)
        assert m.num_batches_tracked.item() == eager.num_batches_tracked.item() == i + 1
        assert_close(m.running_mean, ref.running_mean, **TOL[torch.float32])
        assert_close(m.running_var, ref.running_var, **TOL[torch.float32])
    m.eval(), eager.eval()
    x = -2.3 + 0.5 * torch.randn(3, 5, 6, 7, generator=gen)
    assert_close(compiled(x), eager(x), **TOL[torch.float32])
    assert m.num_batches_tracked.item() == 3
