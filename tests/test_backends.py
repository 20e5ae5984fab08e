"""Backend choice: per call, from the device and the user's setting, in a fixed precedence."""
import contextlib
import threading

import pytest
import torch

import normops
from normops.backends import current_backend, numpy_backend, torch_backend
from cases import F


@pytest.fixture
def calls(monkeypatch):
    """Which backend module ran row_norm_fwd, in call order."""
    seen = []
    for name, mod in (("torch", torch_backend), ("numpy", numpy_backend)):
        real = mod.row_norm_fwd

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, "row_norm_fwd", spy)
    return seen


def _ln(x):
    """A layer norm that always goes through the backends (a fused activation: never ATen-direct)."""
    return F.layer_norm(x, [3], activation="relu")


def test_cpu_default_is_torch(calls, monkeypatch):
    monkeypatch.delenv("NORMOPS_BACKEND", raising=False)
    _ln(torch.randn(2, 3))
    assert calls == ["torch"]
    assert current_backend(torch.device("cpu")) == "torch"
    assert current_backend(torch.device("cuda")) == "triton"


def test_precedence(calls, monkeypatch):
    """with backend(...) > set_backend(...) > NORMOPS_BACKEND > device default."""
    x = torch.randn(2, 3)
    monkeypatch.setenv("NORMOPS_BACKEND", "numpy")  # read per call, not at import
    _ln(x)
    normops.set_backend("torch")
    _ln(x)
    with normops.backend("numpy"):
        _ln(x)
        with normops.backend("torch"):
            _ln(x)
        _ln(x)
    normops.set_backend(None)
    monkeypatch.delenv("NORMOPS_BACKEND")
    _ln(x)
    assert calls == ["numpy", "torch", "numpy", "torch", "numpy", "torch"]


def test_context_is_per_thread(calls):
    x = torch.randn(2, 3)
    done = threading.Event()

    def other():
        _ln(x)
        done.set()

    with normops.backend("numpy"):
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert done.is_set() and calls == ["torch"]


def test_context_restores_after_error(calls):
    with pytest.raises(ZeroDivisionError):
        with normops.backend("numpy"):
            1 / 0
    _ln(torch.randn(2, 3))
    assert calls == ["torch"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels are compiled for it; importing "
                    "them here under TRITON_INTERPRET=1 would run this worker's CUDA tests in the interpreter")
def test_triton_backend_under_interpreter(monkeypatch):
    """With TRITON_INTERPRET=1 the triton backend accepts CPU tensors: that is how its kernels
    are tested without a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 6, 5, requires_grad=True)
    with normops.backend("triton"):
        y = F.group_norm(x, 3)
        z = F.group_norm(x, 3, activation="silu")
        (y.sum() + z.sum()).backward()
    ref = torch.nn.functional.group_norm(x, 3)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(z, torch.nn.functional.silu(ref))


def test_backward_uses_the_backend_of_its_call(calls, monkeypatch):
    """The backward runs where the backend is resolved at backward time: per call, like forward."""
    seen = []
    real = numpy_backend.row_norm_bwd
    monkeypatch.setattr(numpy_backend, "row_norm_bwd", lambda *a, **k: seen.append(1) or real(*a, **k))
    x = torch.randn(2, 3, requires_grad=True)
    with normops.backend("numpy"):
        _ln(x).sum().backward()
    assert seen == [1]


def test_plain_fp32_goes_straight_to_aten(calls):
    """On the torch backend a plain fp32 norm is ATen's own (same kernels, no Python autograd); a
    fused activation, RMSNorm or a low-precision input goes through the normops ops."""
    x = torch.randn(2, 3, requires_grad=True)
    y = F.layer_norm(x, [3])
    assert calls == [] and y.grad_fn.name() == "NativeLayerNormBackward0"
    F.layer_norm(x, [3], activation="relu")
    F.rms_norm(x, [3])
    F.layer_norm(x.detach().bfloat16(), [3])
    assert calls == ["torch", "torch", "torch"]
    with normops.backend("numpy"):
        F.layer_norm(x, [3])
    assert calls[-1] == "numpy"


def test_compiled_kernels_refuse_cpu_tensors_clearly(monkeypatch):
    """TRITON_INTERPRET set after normops.kernels was imported without it: the kernels are compiled
    ones, which cannot read CPU tensors; the call says so instead of failing inside Triton."""
    pytest.importorskip("triton")
    from normops.backends import triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    with normops.backend("triton"), pytest.raises(RuntimeError, match="imported before TRITON_INTERPRET was set"):
        F.layer_norm(torch.randn(2, 3), [3])


def test_triton_calls_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: a call on another device's tensors makes theirs
    current for its duration (checked with stand-ins here; the two-GPU test below runs it)."""
    pytest.importorskip("triton")
    from normops.backends import triton_backend

    entered = []

    class Tensor:  # what the guard reads of a CUDA tensor on device 1
        is_cuda, device = True, torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: entered.append(d) or contextlib.nullcontext())
    assert triton_backend._on_its_device(lambda t, a, k=None: (a, k))(Tensor(), 1, k=2) == (1, 2)
    assert entered == [torch.device("cuda", 1)]
    Tensor.device = torch.device("cuda", 0)
    triton_backend._on_its_device(lambda t: None)(Tensor())
    assert len(entered) == 1  # already current: no switch


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_on_the_second_gpu():
    x = (3.0 + 2.0 * torch.randn(6, 300, device="cuda:1")).requires_grad_()
    w = torch.rand(300, device="cuda:1", requires_grad=True)
    with normops.backend("triton"):
        y = F.layer_norm(x, [300], w)
        g = F.group_norm(x.reshape(6, 30, 10), 5)
    (y.sum() + g.square().sum()).backward()
    assert torch.cuda.current_device() == 0
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    (torch.nn.functional.layer_norm(xr, [300], wr).sum()
     + torch.nn.functional.group_norm(xr.reshape(6, 30, 10), 5).square().sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)


def test_route_says_which_backend_and_implementation_runs_and_why(monkeypatch):
    """normops.ops.route decides a call once: the backend, what chose it, the implementation
    (ATen directly, the op on the torch backend, the NumPy reference, a Triton fallback) and why."""
    from normops import ops
    from normops.ops.group_norm import GroupNormSpec
    from normops.ops.row_norm import RowNormSpec

    x = torch.randn(4, 8)
    plain, fused = RowNormSpec((8,), 1e-5), RowNormSpec((8,), 1e-5, activation="relu")
    r = ops.route("row_norm", x, plain, (x, None, None), aten=True)
    assert (r.backend, r.implementation, r.chosen_by) == ("torch", "aten", "the cpu default")
    # a fused activation: the backend's ATen composition under torch's autograd; fp16/bf16 take the op
    assert ops.route("row_norm", x, fused, (x, None, None), aten=True).implementation == "composed"
    half = x.bfloat16()
    assert ops.route("row_norm", half, fused, (half, None, None), aten=True).implementation == "torch"
    with normops.backend("numpy"):
        r = ops.route("row_norm", x, fused, (x, None, None))
    assert (r.backend, r.implementation, r.chosen_by) == ("numpy", "numpy", "with normops.backend(...)")
    monkeypatch.setenv("NORMOPS_BACKEND", "numpy")
    assert ops.route("row_norm", x, fused, (x, None, None)).chosen_by == "NORMOPS_BACKEND"
    normops.set_backend("torch")
    assert ops.route("row_norm", x, fused, (x, None, None)).chosen_by == "normops.set_backend(...)"
    wide = torch.randn(1, 2048, 2)  # 2048 channels a group: more than the Triton kernels take
    r = ops.route("group_norm", wide, GroupNormSpec(1, 1e-5), backend="triton")
    assert r.implementation == "torch fallback" and r.reason and r.module is normops.backends.load("torch")
    assert ops.route("row_norm", x[:0], plain, (x[:0], None, None)).implementation == "none"
