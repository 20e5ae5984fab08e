"""Regressions from issue #15: the backend context's scope (asyncio tasks, generators, threads),
and tracing (torch.fx, torch.jit) of the normops modules and functionals."""
import asyncio
import copy
import os
import threading
import warnings

import pytest
import torch

import normops
from normops.backends import current_backend, resolve
from cases import F

CPU = torch.device("cpu")


# --- the backend context: a context variable, not a thread-local ---------------------------------

def test_backend_context_is_per_asyncio_task():
    """Two tasks interleave on one thread, each inside its own block: each resolves its own
    backend (a thread-local stack gave the first task the second task's choice)."""
    seen = []

    async def task(name, entered, other_entered):
        with normops.backend(name):
            entered.set()
            await other_entered.wait()  # both blocks are open now
            for _ in range(2):
                seen.append((name, current_backend(CPU), resolve(torch.empty(1)).__name__.split(".")[-1]))
                await asyncio.sleep(0)  # let the other task run inside its block
        seen.append((name, current_backend(CPU)))

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task("numpy", a, b), task("torch", b, a))

    normops.set_backend("triton")  # what each task returns to once its block closes
    try:
        asyncio.run(main())
    finally:
        normops.set_backend(None)
    assert sorted(seen) == sorted([("numpy", "numpy", "numpy_backend")] * 2 + [("torch", "torch", "torch_backend")] * 2
                                  + [("numpy", "triton"), ("torch", "triton")])
    assert [s[0] for s in seen[:4]] in (["torch", "numpy"] * 2, ["numpy", "torch"] * 2)  # they did interleave


def test_backend_context_of_a_suspended_generator_does_not_outlive_it():
    """A generator suspended inside its block, and its consumer's own block closing after the
    generator's: the consumer's block is innermost while open, and nothing is left behind."""
    def gen():
        with normops.backend("numpy"):
            yield current_backend(CPU)
        yield current_backend(CPU)

    g = gen()
    assert next(g) == "numpy"
    assert current_backend(CPU) == "numpy"  # a context variable cannot hide a suspended generator's block
    with normops.backend("triton"):
        assert current_backend(CPU) == "triton"
        assert next(g) == "triton"  # the generator's block closed; the consumer's is the one open
        assert current_backend(CPU) == "triton"
    assert current_backend(CPU) == "torch"


def test_backend_context_nested_and_restored_after_error():
    with normops.backend("numpy"):
        with pytest.raises(ZeroDivisionError):
            with normops.backend("triton"):
                assert current_backend(CPU) == "triton"
                1 / 0
        assert current_backend(CPU) == "numpy"
    assert current_backend(CPU) == "torch"


def test_backend_context_is_not_seen_by_other_threads_but_set_backend_is():
    """A block is this thread's; set_backend is process-wide, as it always was."""
    seen = []

    def other():
        seen.append(current_backend(CPU))

    def in_thread():
        t = threading.Thread(target=other)
        t.start()
        t.join()

    with normops.backend("numpy"):
        in_thread()
    normops.set_backend("numpy")
    try:
        in_thread()
        with normops.backend("triton"):
            assert current_backend(CPU) == "triton"  # a block still wins over set_backend
        assert current_backend(CPU) == "numpy"
    finally:
        normops.set_backend(None)
    assert seen == ["torch", "numpy"]


# --- tracing: torch.fx.symbolic_trace, torch.jit.trace, torch.jit.script -------------------------

# module, input (training mode: the batch and instance norms also update running statistics)
MODULES = {
    "LayerNorm": lambda: (normops.nn.LayerNorm(8, activation="silu"), torch.randn(3, 8)),
    "RMSNorm": lambda: (normops.nn.RMSNorm(8), torch.randn(3, 8)),
    "GroupNorm": lambda: (normops.nn.GroupNorm(2, 4), torch.randn(2, 4, 3)),
    "BatchNorm1d": lambda: (normops.nn.BatchNorm1d(4, momentum=None), torch.randn(3, 4)),
    "BatchNorm2d": lambda: (normops.nn.BatchNorm2d(4, activation="relu"), torch.randn(2, 4, 3, 3)),
    "BatchNorm3d": lambda: (normops.nn.BatchNorm3d(4), torch.randn(2, 4, 2, 2, 2)),
    "InstanceNorm1d": lambda: (normops.nn.InstanceNorm1d(4, affine=True, track_running_stats=True),
                               torch.randn(4, 5)),  # unbatched: a shape decision at run time
    "InstanceNorm2d": lambda: (normops.nn.InstanceNorm2d(4, affine=True), torch.randn(2, 4, 3, 3)),
    "InstanceNorm3d": lambda: (normops.nn.InstanceNorm3d(4), torch.randn(2, 4, 2, 2, 2)),
    "SyncBatchNorm": lambda: (normops.nn.SyncBatchNorm(4), torch.randn(2, 4, 3)),
}
FUNCTIONAL = "LayerNorm", "RMSNorm", "GroupNorm"  # recorded as their normops.functional call
ROOT_REFUSED = [name for name in MODULES if name not in FUNCTIONAL]


def _same_run(traced, module, x):
    """traced (made from module) and a copy of module, from the same state, give the same output,
    input gradient and running statistics."""
    ref = copy.deepcopy(module)
    ref.load_state_dict(module.state_dict())
    outs = []
    for m in (traced, ref):
        xg = x.clone().requires_grad_()
        y = m(xg)
        y.square().sum().backward()
        outs.append((y, xg.grad, [b.clone() for b in m.buffers()]))
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.parametrize("name", list(MODULES))
def test_fx_symbolic_trace_of_a_model_with_each_module(name):
    module, x = MODULES[name]()
    model = torch.nn.Sequential(torch.nn.Identity(), module)
    gm = torch.fx.symbolic_trace(model)
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module")][1:]  # after the Identity
    if name in FUNCTIONAL:
        assert [n.target for n in calls] == [getattr(normops.functional, name.lower().replace("norm", "_norm"))]
    else:
        assert [(n.op, n.target) for n in calls] == [("call_module", "1")]  # a leaf, as torch's own
    _same_run(gm, model, x)
    if name.startswith(("BatchNorm", "InstanceNorm1d")):
        with pytest.raises(ValueError, match="expected .*D input"):  # its shape check runs in the graph
            gm(torch.randn(2))


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_fx_symbolic_trace_of_a_module_alone(name):
    module, x = MODULES[name]()
    _same_run(torch.fx.symbolic_trace(module), module, x)


@pytest.mark.parametrize("name", ROOT_REFUSED)
def test_fx_symbolic_trace_of_a_batch_or_instance_norm_alone_says_why_not(name):
    module, _ = MODULES[name]()
    with pytest.raises(torch.fx.proxy.TraceError, match=f"normops.nn.{name} as the root module.*Trace a model"):
        torch.fx.symbolic_trace(module)


FUNCTIONALS = {  # name: (call, inputs)
    "layer_norm": (lambda x, w, b: F.layer_norm(x, [5], w, b, activation="gelu"), (5,)),
    "rms_norm": (lambda x, w, b: F.rms_norm(x, [5], w, eps=1e-3), (5,)),
    "group_norm": (lambda x, w, b: F.group_norm(x.reshape(3, 5, 1), 5, w, b), (5,)),
    "instance_norm": (lambda x, w, b: F.instance_norm(x.reshape(1, 3, 5), weight=w[:3], bias=b[:3]), (5,)),
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, activation="relu"), (5,)),
    "add_layer_norm": (lambda x, w, b: F.add_layer_norm(x, x.flip(0), [5], w, b)[0], (5,)),
    "add_rms_norm": (lambda x, w, b: F.add_rms_norm(x, 2 * x, [5], w)[1], (5,)),
}


@pytest.mark.parametrize("name", list(FUNCTIONALS))
def test_fx_symbolic_trace_records_the_normops_functional(name):
    fn, (c,) = FUNCTIONALS[name]
    gm = torch.fx.symbolic_trace(fn)
    assert getattr(normops.functional, name) in [n.target for n in gm.graph.nodes]
    x, w, b = torch.randn(3, c), torch.rand(c) + 0.5, torch.randn(c)
    torch.testing.assert_close(gm(x, w, b), fn(x, w, b))


JIT_BACKENDS = ["torch", "numpy", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the triton backend on CPU tensors needs the interpreter"))]


@pytest.mark.parametrize("backend", JIT_BACKENDS)
@pytest.mark.parametrize("name", ["LayerNorm", "GroupNorm", "BatchNorm2d", "InstanceNorm1d"])
def test_jit_trace_records_the_normops_ops(name, backend):
    """The trace holds normops:: ops, which pick their backend when the trace runs: before, the
    eager fast path ran under the tracer, which froze NumPy's results into constants and sent
    tracer values into Triton."""
    module, x = MODULES[name]()
    with normops.backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the Python shape checks
        traced = torch.jit.trace(module, x)
        assert any(n.kind().startswith("normops::") for n in traced.graph.nodes())
        _same_run(traced, module, 1 + 2 * torch.randn(x.shape))  # another input than the traced one


def test_jit_trace_made_without_grad_trains():
    """Traced under no_grad, a module still keeps the statistics its backward needs when replayed
    with grad (need_stats was recorded as False)."""
    module, x = MODULES["LayerNorm"]()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(module, x)
    _same_run(traced, module, x)


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm2d"])
def test_jit_script_says_it_cannot_compile_normops_modules(name):
    module, _ = MODULES[name]()
    for target in (module, torch.nn.Sequential(torch.nn.Linear(4, 4), module)):
        with pytest.raises(RuntimeError, match=f"torch.jit.script cannot compile normops.nn.{name}.*torch.jit.trace"):
            torch.jit.script(target)
