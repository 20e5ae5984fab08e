"""torch.compile sees the Triton launches: on CUDA, a call the kernels compute is traced into its
launchers (normops.ops.traced_into), each launch a triton_kernel_wrapper node that Inductor compiles
and launches itself; other calls stay the opaque op. Without a GPU, the trace is checked on fake
tensors (test_traced_into_kernels); the compiled CUDA run is test_compiled_cuda_launches_the_kernels."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from torch._library import simple_registry
from torch._subclasses.functional_tensor import FunctionalTensorMode

import normops
from cases import F, forward_backward, make, params

ROUTED_OPS = ["row_norm", "row_norm_backward", "group_norm", "group_norm_backward", "batch_norm",
              "batch_norm_backward"]

# family -> (norm, x's shape, channels of weight and bias)
CASES = {
    "row_norm": (lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, activation="gelu"), (8, 256), 256),
    "group_norm": (lambda x, w, b: F.group_norm(x, 4, w, b), (2, 8, 5, 5), 8),
    "batch_norm": (lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), (4, 8, 5), 8),
}


@pytest.mark.parametrize("name", ROUTED_OPS)
def test_rule_registered(name):
    """Each routed op has its rule for FunctionalTensorMode, the mode AOTAutograd traces in."""
    rules = simple_registry.singleton.find(f"normops::{name}").torch_dispatch_rules
    assert rules.find(FunctionalTensorMode) is not None


# Run without TRITON_INTERPRET (the kernels must be JITFunctions, which wrap_triton traces), in a
# process of its own, as it stands in for what a CPU-only machine lacks: a CUDA target for the
# kernels' TTIR (the mutation analysis of triton_kernel_wrapper_functional), and CUDA itself. A CPU
# build cannot take views of fake CUDA tensors, so the inputs are fake CPU tensors with the rule's
# KERNEL_DEVICES and the triton backend's device check widened to the CPU.
_TRACE = r"""
import json, torch, triton
from triton.backends.compiler import GPUTarget
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._functorch.aot_autograd import aot_export_joint_simple
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
import normops, normops.ops as ops, normops.backends as backends
from normops.backends import triton_backend
from normops.kernels.common import launch_options
from test_triton_op import CASES

class Driver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

triton.runtime.driver.set_active(Driver())
ops.KERNEL_DEVICES = ("cpu",)
backends.triton_interpret = lambda: True
triton_backend.INTERPRETED = True

def trace(norm, shape, c, backend, decompose=True):
    with FakeTensorMode():
        args = [torch.randn(s, requires_grad=True) for s in (shape, (c,), (c,))]
    with normops.backend(backend), torch._functorch.config.patch(decompose_custom_triton_ops=decompose):
        gm = aot_export_joint_simple(lambda *a: (norm(*a).sum(),), args, trace_joint=True)
    nodes = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        node = {"target": str(n.target)}
        if "triton_kernel_wrapper" in node["target"]:
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            node["kernel"] = k.fn.fn.__name__
            node["options"] = [{"num_warps": c.num_warps, **c.kwargs} for c in k.configs]
            node["expected"] = [launch_options(c.num_warps) for c in k.configs]
        nodes.append(node)
    return nodes

print(json.dumps({f"{family} {backend} {decompose}": trace(*case, backend, decompose)
                  for family, case in CASES.items()
                  for backend, decompose in (("triton", True), ("torch", True), ("triton", False))}))
"""


@pytest.fixture(scope="module")
def traces():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _TRACE], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(CASES))
def test_traced_into_kernels(traces, family):
    """On the triton backend the forward and backward graph holds the kernels' launches, each with
    its launch options (num_warps, maxnreg), and no normops op."""
    nodes = traces[f"{family} triton True"]
    targets = {n["target"] for n in nodes}
    assert not any(t.startswith("normops.") for t in targets), targets
    kernels = {n["kernel"] for n in nodes if "kernel" in n}
    assert {f"_{family}_fwd_kernel", f"_{family}_bwd_kernel"} <= kernels, kernels
    assert all("triton_kernel_wrapper_mutation" not in t for t in targets)  # functionalized
    for n in nodes:
        if "kernel" in n:
            assert n["options"] == n["expected"], n


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("how", ["torch backend", "export"])
def test_other_routes_stay_opaque(traces, family, how):
    """The torch backend, and torch.export (which turns decompose_custom_triton_ops off to keep
    custom ops whole and serializable), keep the normops op and its backward op, no kernel."""
    nodes = traces[f"{family} torch True" if how == "torch backend" else f"{family} triton False"]
    targets = {n["target"] for n in nodes}
    assert {f"normops.{family}.default", f"normops.{family}_backward.default"} <= targets, targets
    assert not any("triton" in t for t in targets)


def test_maxnreg_reaches_inductor_codegen():
    """launch puts maxnreg in the config's kwargs, as Inductor writes a user kernel's configs out
    (config_to_dict) and reads them back (config_from_dict): a Config option maxnreg is dropped."""
    from torch._inductor.runtime.triton_heuristics import config_from_dict, config_to_dict

    back = config_from_dict(config_to_dict(triton.Config({"maxnreg": 128}, num_warps=4)))
    assert (back.maxnreg, back.num_warps, back.kwargs) == (128, 4, {})


def test_eager_launch_is_direct(monkeypatch):
    """An eager call launches the kernels itself, not through wrap_triton's HOP (which costs ~1 ms
    a launch in eager mode)."""
    def refuse(kernel):
        raise AssertionError("wrap_triton in an eager call")

    monkeypatch.setattr(torch.library, "wrap_triton", refuse)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU (conftest)
    x = make((4, 16), torch.float32, device=device)
    w, b = (t.detach().to(device).requires_grad_() for t in params(16, torch.float32))
    with normops.backend("triton"):
        y = F.layer_norm(x, (16,), w, b)
        y.sum().backward()
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (16,), w, b))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor compiles the kernels for a GPU")
@pytest.mark.parametrize("family", list(CASES))
def test_compiled_cuda_launches_the_kernels(family):
    """torch.compile on CUDA: Inductor's code launches normops' kernels (with their maxnreg) and
    calls no normops op; under CUDA graphs (reduce-overhead) nothing is skipped. Values and
    gradients match eager normops: the same kernels, only the partial dW/dB sums reduced by
    Inductor's kernel instead of ATen's (a different fp32 order, hence not bitwise)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    norm, shape, c = CASES[family]
    torch._dynamo.reset()
    x = make(shape, torch.float32, device="cuda")
    w, b = (t.detach().cuda().requires_grad_() for t in params(c, torch.float32))
    eager = forward_backward(norm, [x, w, b])
    compiled = torch.compile(norm, fullgraph=True)
    got, codes = run_and_get_code(lambda: forward_backward(compiled, [x, w, b]))
    code = "\n".join(codes)
    assert "torch.ops.normops" not in code
    assert f"_{family}_fwd_kernel" in code and f"_{family}_bwd_kernel" in code
    assert "'maxnreg'" in code
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(norm, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # recording, then replays
        got = [t.clone() for t in forward_backward(graphed, [x, w, b])]
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
