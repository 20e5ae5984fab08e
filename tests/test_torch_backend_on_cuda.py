"""The torch backend's fp16/bf16 layer, RMS and group norms as it runs them on CUDA, emulated on the CPU.

ATen's CUDA kernels for those norms read weight and bias in the input's dtype: fp32 parameters with
a bf16 input raise "expected scalar type BFloat16 but found Float" there, where the CPU has a
mixed-type path. So off the CPU the torch backend computes them in fp32 (``torch_backend._in_fp32``).
Here ``_in_fp32`` answers as on CUDA, and ATen's layer/group/RMS norm ops are wrapped to refuse any
fp16/bf16 tensor, which is stricter than CUDA: the results must still obey the tolerance rule of
cases.py, with bf16/fp16 and with fp32 parameters. InstanceNorm runs batch norm's kernels, which
CUDA gives fp32 parameters with low-precision input as the CPU does.
"""
import pytest
import torch

from cases import (LOW, F, TF, assert_close_to_reference, make, params, torch_add_layer_norm, torch_add_rms_norm)
from normops.backends import torch_backend

STRICT = ("native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward",
          "_fused_rms_norm")


class _NoLowPrecisionNorms:
    """torch.ops.aten, except that the ops in STRICT raise on an fp16/bf16 tensor argument."""

    def __getattr__(self, name):
        op = getattr(torch.ops.aten, name)
        if name not in STRICT:
            return op

        def strict(*args):
            low = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in LOW]
            if low:
                raise RuntimeError(f"aten.{name} got {low[0]}: the CUDA path must run it in fp32")
            return op(*args)
        return strict


@pytest.fixture
def as_on_cuda(monkeypatch):
    monkeypatch.setattr(torch_backend, "_in_fp32", lambda x: x.dtype in LOW)
    monkeypatch.setattr(torch_backend, "aten", _NoLowPrecisionNorms())


def _params(shape, dtype, param_dtype):
    return [t.to(param_dtype) for t in params(shape, dtype)]


def test_the_emulation_refuses_low_precision(as_on_cuda):
    """The wrapper does refuse what the CUDA path must not pass (else the tests below prove nothing)."""
    x = make((3, 8), torch.bfloat16)
    with pytest.raises(RuntimeError, match="must run it in fp32"):
        torch_backend.aten.native_layer_norm(x, [8], None, None, 1e-5)


@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_layer_and_rms_norm(as_on_cuda, dtype, param_dtype, activation):
    x = make((4, 3, 40), dtype)
    w, b = _params((40,), dtype, dtype if param_dtype == "same" else param_dtype)
    act = TF.silu if activation else (lambda t: t)
    assert_close_to_reference(lambda x, w, b: F.layer_norm(x, [40], w, b, activation=activation),
                              lambda x, w, b: act(TF.layer_norm(x, [40], w, b)), [x, w, b], "torch", dtype)
    assert_close_to_reference(lambda x, w: F.rms_norm(x, [40], w, 1e-6, activation=activation),
                              lambda x, w: act(TF.rms_norm(x, [40], w, 1e-6)), [x, w], "torch", dtype)
    assert_close_to_reference(lambda x: F.layer_norm(x, [3, 40]), lambda x: TF.layer_norm(x, [3, 40]), [x],
                              "torch", dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_add_norms(as_on_cuda, dtype):
    x, r = make((3, 5, 33), dtype), make((3, 5, 33), dtype, seed=5)
    w, b = params((33,), dtype)
    assert_close_to_reference(lambda x, r, w: F.add_rms_norm(x, r, [33], w),
                              lambda x, r, w: torch_add_rms_norm(x, r, [33], w), [x, r, w], "torch", dtype)
    assert_close_to_reference(lambda x, r, w, b: F.add_layer_norm(x, r, [33], w, b),
                              lambda x, r, w, b: torch_add_layer_norm(x, r, [33], w, b), [x, r, w, b], "torch", dtype)


@pytest.mark.parametrize("param_dtype", ["same", torch.float32], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_group_and_instance_norm(as_on_cuda, dtype, param_dtype, channels_last):
    x = make((2, 6, 5, 7), dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _params((6,), dtype, dtype if param_dtype == "same" else param_dtype)
    for activation, act in ((None, lambda t: t), ("silu", TF.silu)):
        assert_close_to_reference(lambda x, w, b: F.group_norm(x, 3, w, b, activation=activation),
                                  lambda x, w, b: act(TF.group_norm(x, 3, w, b)), [x, w, b], "torch", dtype)
    assert_close_to_reference(lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
                              lambda x, w, b: TF.instance_norm(x, weight=w, bias=b), [x, w, b], "torch", dtype)
    with torch.no_grad():
        y = F.group_norm(x, 3, w, b)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) == channels_last
