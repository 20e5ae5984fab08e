"""torch.func transforms and forward-mode AD through every public op, on every backend, against
torch.nn.functional under the same transform.

torch.library's custom ops get no forward-mode derivative and no functorch autograd, so under a
transform normops.functional computes the norm with torch's own differentiable norms (see
``normops.ops.transformed``). These tests hold it to torch's values, derivatives and running-statistics
updates, and to torch's error where torch refuses (vmap over a batch norm whose running statistics
are not batched). fp64, tiny shapes: Jacobians and Hessians are compared element by element.
"""
import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import normops
from cases import (F, TF, make, params, torch_add_layer_norm, torch_add_rms_norm, torch_batch_norm,
                   torch_group_norm, torch_instance_norm, torch_layer_norm, torch_rms_norm)

BACKENDS = ["torch", "numpy", "triton"]
TRANSFORMS = ["grad", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "vmap", "forward_ad"]
D = torch.float64

# name -> (normops function, its torch.nn.functional reference, call, differentiated inputs).
# call(f, x, *differentiated, running_mean, running_var) passes the same arguments to either
# function; the differentiated inputs besides x are "r" (a residual like x), "w" and "b" (weight
# and bias). x is (3, 4, 5): rows of 5 for layer/RMS norms, 4 channels for the others.
CASES = {
    "layer_norm": (F.layer_norm, torch_layer_norm, lambda f, x, w, b, rm, rv: f(x, [5], w, b), "wb"),
    "layer_norm_2d_gelu": (F.layer_norm, torch_layer_norm,
                           lambda f, x, rm, rv: f(x, [4, 5], None, None, activation="gelu"), ""),
    "layer_norm_weight_relu": (F.layer_norm, torch_layer_norm,
                               lambda f, x, w, rm, rv: f(x, [5], w, None, activation="relu"), "w"),
    "rms_norm": (F.rms_norm, torch_rms_norm, lambda f, x, w, rm, rv: f(x, [5], w), "w"),
    "rms_norm_silu": (F.rms_norm, torch_rms_norm, lambda f, x, rm, rv: f(x, [5], None, activation="silu"), ""),
    "add_layer_norm": (F.add_layer_norm, torch_add_layer_norm,
                       lambda f, x, r, w, b, rm, rv: f(x, r, [5], w, b), "rwb"),
    "add_rms_norm": (F.add_rms_norm, torch_add_rms_norm, lambda f, x, r, w, rm, rv: f(x, r, [5], w), "rw"),
    "group_norm_silu": (F.group_norm, torch_group_norm,
                        lambda f, x, w, b, rm, rv: f(x, 2, w, b, activation="silu"), "wb"),
    "group_norm": (F.group_norm, torch_group_norm, lambda f, x, rm, rv: f(x, 4, None, None), ""),
    "instance_norm_stats_relu": (F.instance_norm, torch_instance_norm,
                                 lambda f, x, w, b, rm, rv: f(x, rm, rv, w, b, activation="relu"), "wb"),
    "instance_norm": (F.instance_norm, torch_instance_norm, lambda f, x, rm, rv: f(x, None, None, None, None), ""),
    "instance_norm_eval": (F.instance_norm, torch_instance_norm,
                           lambda f, x, w, rm, rv: f(x, rm, rv, w, None, False), "w"),
    "batch_norm_train_stats": (F.batch_norm, torch_batch_norm,
                               lambda f, x, w, b, rm, rv: f(x, rm, rv, w, b, True, 0.3), "wb"),
    "batch_norm_train_gelu": (F.batch_norm, torch_batch_norm,
                              lambda f, x, b, rm, rv: f(x, None, None, None, b, True, activation="gelu"), "b"),
    "batch_norm_eval_silu": (F.batch_norm, torch_batch_norm,
                             lambda f, x, w, b, rm, rv: f(x, rm, rv, w, b, False, activation="silu"), "wb"),
}


def _setup(name, lib, batch=None):
    """(fn, inputs, running statistics): fn(*inputs) calls normops (lib "normops") or torch
    ("torch") with fresh running statistics away from (0, 1), so that an update or its absence
    shows. With ``batch``, x and the residual get a leading vmap dim of that size."""
    ours, ref, call, kinds = CASES[name]
    lead = () if batch is None else (batch,)
    x = make(lead + (3, 4, 5), D, offset=0.3, scale=1.0, requires_grad=False)
    n = 5 if name.startswith(("layer", "rms", "add")) else 4
    w, b = (t.detach() for t in params(n, D))
    r = make(lead + (3, 4, 5), D, offset=0.0, seed=7, requires_grad=False)
    inputs = (x,) + tuple({"r": r, "w": w, "b": b}[k] for k in kinds)
    stats = (torch.linspace(-0.5, 0.5, 4, dtype=D), torch.linspace(0.5, 2.0, 4, dtype=D))
    f = ours if lib == "normops" else ref
    return (lambda *a: call(f, *a, *stats)), inputs, stats


def _draw(like, seed):
    """Tangents or cotangents shaped like ``like`` (a tensor or a tuple of them), fixed by seed."""
    if isinstance(like, tuple):
        return tuple(_draw(t, seed + i) for i, t in enumerate(like))
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)


def _scalar(fn):
    """A nonlinear scalar of fn's outputs, for grad and hessian (a plain sum of a normalized
    output has near-zero derivatives)."""
    def f(*a):
        out = fn(*a)
        return sum((o.sin() * (1 + i)).sum() for i, o in enumerate(out if isinstance(out, tuple) else (out,)))
    return f


def _apply(transform, fn, inputs, vmapped=None):
    argnums = tuple(range(len(inputs)))
    if transform == "grad":
        return grad(_scalar(fn), argnums=argnums)(*inputs)
    if transform == "hessian":
        return hessian(_scalar(fn), argnums=argnums)(*inputs)
    if transform == "jacrev":
        return jacrev(fn, argnums=argnums)(*inputs)
    if transform == "jacfwd":
        return jacfwd(fn, argnums=argnums)(*inputs)
    if transform == "vjp":
        out, pullback = vjp(fn, *inputs)
        return out, pullback(_draw(out, 11))
    if transform == "jvp":
        return jvp(fn, inputs, _draw(inputs, 21))
    if transform == "vmap":  # x and a residual batched, weight and bias shared
        return vmap(fn, in_dims=vmapped)(*inputs)
    assert transform == "forward_ad"
    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(t, d) for t, d in zip(inputs, _draw(inputs, 31))))
        outs = out if isinstance(out, tuple) else (out,)
        unpacked = [fwAD.unpack_dual(o) for o in outs]
        return [u.primal for u in unpacked], [u.tangent for u in unpacked]


def _run(transform, name, lib):
    """The transform's result and the running statistics after it, or the error it raised."""
    batch = 2 if transform == "vmap" else None
    fn, inputs, stats = _setup(name, lib, batch)
    vmapped = tuple(0 if t.dim() == 4 else None for t in inputs)
    try:
        return _apply(transform, fn, inputs, vmapped), stats
    except RuntimeError as e:
        return e, stats


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_transform_matches_torch(name, backend, transform):
    expected, expected_stats = _run(transform, name, "torch")
    with normops.backend(backend):
        got, got_stats = _run(transform, name, "normops")
    if isinstance(expected, Exception):  # torch refuses: normops must refuse alike, stats untouched
        assert isinstance(got, type(expected)) and str(got) == str(expected), got
    else:
        assert not isinstance(got, Exception), got
        assert not any(t is None for t in torch.utils._pytree.tree_leaves(got)), "a tangent came back None"
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_stats, expected_stats, rtol=1e-12, atol=0)


def test_vmap_refuses_unbatched_running_stats_like_torch():
    """Guards the grid's error branch: torch's case does raise (were it to stop, the branch would
    compare nothing), and normops raises torch's message, stats untouched."""
    expected, stats = _run("vmap", "batch_norm_train_stats", "torch")
    assert isinstance(expected, RuntimeError) and "running_mean or running_var" in str(expected)
    got, got_stats = _run("vmap", "batch_norm_train_stats", "normops")
    assert str(got) == str(expected)
    torch.testing.assert_close(got_stats, _setup("batch_norm_train_stats", "torch")[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_with_batched_running_stats(backend):
    """Running statistics vmapped with the input: each sample's own are updated, as torch does."""
    x = make((2, 3, 4, 5), D, requires_grad=False)

    def run(bn):
        rm = torch.linspace(-0.5, 0.5, 8, dtype=D).reshape(2, 4)
        rv = torch.linspace(0.5, 2.0, 8, dtype=D).reshape(2, 4)
        y = vmap(lambda x_, m, v: bn(x_, m, v, None, None, True, 0.2))(x, rm, rv)
        return y, rm, rv

    with normops.backend(backend):
        got = run(F.batch_norm)
    torch.testing.assert_close(got, run(TF.batch_norm), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_ad_tangent_on_weight_only(backend):
    """A tangent on the weight alone (x a plain tensor) is still seen, and carried."""
    x = make((3, 4, 5), D, requires_grad=False)
    w, _ = params(4, D)
    dw = torch.randn(4, dtype=D)
    with fwAD.dual_level():
        wd = fwAD.make_dual(w.detach(), dw)
        with normops.backend(backend):
            got = fwAD.unpack_dual(F.group_norm(x, 2, wd, activation="silu")).tangent
        expected = fwAD.unpack_dual(TF.silu(TF.group_norm(x, 2, wd))).tangent
    assert got is not None
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_under_jvp_computes_in_fp32(dtype):
    """fp16/bf16 input with fp32 parameters and fp32 running statistics (ATen takes that mix only
    in some dtype combinations): under jvp the output keeps the input dtype and equals torch's fp32
    result rounded, and the running statistics are updated."""
    x = make((3, 4, 5), dtype, requires_grad=False)
    w, b = (t.detach() for t in params(4, torch.float32))
    t = torch.randn(3, 4, 5).to(dtype)
    rm, rv = torch.zeros(4), torch.ones(4)
    y, dy = jvp(lambda x_: F.batch_norm(x_, rm, rv, w, b, True, activation="gelu"), (x,), (t,))
    rm32, rv32 = torch.zeros(4), torch.ones(4)
    y32, dy32 = jvp(lambda x_: TF.gelu(TF.batch_norm(x_, rm32, rv32, w, b, True)), (x.float(),), (t.float(),))
    assert y.dtype == dy.dtype == dtype
    torch.testing.assert_close(y, y32.to(dtype))
    torch.testing.assert_close(dy, dy32.to(dtype))
    torch.testing.assert_close((rm, rv), (rm32, rv32))


def test_compiled_grad_matches_eager():
    """torch.compile over torch.func.grad of a normops norm traces the torch composition."""
    x = make((3, 4, 5), D, requires_grad=False)
    w, _ = (t.detach() for t in params(4, D))

    def loss(f, act):
        return lambda x_: act(f(x_, None, None, w, None, True)).square().sum()

    compiled = torch.compile(grad(loss(lambda *a: F.batch_norm(*a, activation="silu"), lambda y: y)),
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), grad(loss(TF.batch_norm, TF.silu))(x))


def test_compiled_graph_keeps_the_normops_ops():
    """Without a transform, torch.compile records the normops ops, not the transforms' torch
    composition (under dynamo, peek_interpreter_stack() returns an object even when the stack is
    empty)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    x = make((3, 4, 5), torch.float32, requires_grad=False)
    torch.compile(lambda t: F.layer_norm(F.group_norm(t, 2, activation="silu"), [5]), backend=backend,
                  fullgraph=True)(x)
    targets = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"normops.group_norm.default", "normops.row_norm.default"} <= targets, targets
