"""Bad input: a clear error that names the argument and what was expected, and running
statistics untouched by a call that fails."""
import pytest
import torch

import normops
from cases import F


def _bn_stats():
    return torch.zeros(4), torch.ones(4)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.layer_norm(torch.randn(3, 6), [5]), RuntimeError, r"normalized_shape=\[5\].*size \[3, 6\]"),
    (lambda: F.layer_norm(torch.randn(3, 6), []), ValueError, "at least one dimension"),
    (lambda: F.layer_norm(torch.randn(3, 6), [6], torch.ones(5)), ValueError, r"weight of shape \[6\], got \[5\]"),
    (lambda: F.layer_norm(torch.randn(3, 6), [6], None, torch.ones(2, 3)), ValueError, r"bias of shape \[6\]"),
    (lambda: F.rms_norm(torch.randn(3, 6), [6], torch.ones(7)), ValueError, "weight of shape"),
    (lambda: F.group_norm(torch.randn(3, 6, 2), 4), RuntimeError, "divisible by num_groups"),
    (lambda: F.group_norm(torch.randn(3, 6, 2), 0), ValueError, "num_groups=0"),
    (lambda: F.group_norm(torch.randn(6), 2), ValueError, r"\(N, C, \*\)"),
    (lambda: F.group_norm(torch.randn(1, 3), 3), ValueError, "more than 1 value per group"),
    (lambda: F.group_norm(torch.randn(3, 6, 2), 3, torch.ones(3)), ValueError, r"weight of shape \[6\]"),
    (lambda: F.batch_norm(torch.randn(1, 4), None, None, training=True), ValueError, "more than 1 value per channel"),
    (lambda: F.batch_norm(torch.randn(1, 4, 1, 1), None, None, training=True), ValueError, "more than 1 value"),
    (lambda: F.batch_norm(torch.randn(5, 4), None, None, training=False), RuntimeError, "running_mean must be defined"),
    (lambda: F.batch_norm(torch.randn(5, 4), torch.zeros(3), torch.ones(3)), ValueError, r"running_mean of shape \[4\]"),
    (lambda: F.batch_norm(torch.randn(5, 4), torch.zeros(4), None), ValueError, "given together"),
    (lambda: F.instance_norm(torch.randn(2, 4, 1)), ValueError, "more than 1 spatial element"),
    (lambda: F.instance_norm(torch.randn(2, 4, 3), use_input_stats=False), ValueError, "running_mean and running_var"),
    (lambda: F.layer_norm(torch.arange(6).view(1, 6), [6]), TypeError, "floating-point.*torch.int64"),
    (lambda: F.batch_norm(torch.ones(2, 3, dtype=torch.int32), None, None, training=True), TypeError, "int32"),
    (lambda: F.layer_norm(torch.randn(2, 6), [6], torch.ones(6, dtype=torch.int64)), TypeError, "weight"),
    (lambda: F.layer_norm([1.0, 2.0], [2]), TypeError, "input must be a Tensor"),
    (lambda: F.layer_norm(torch.randn(2, 6), [6], torch.ones(6, device="meta")), RuntimeError,
     "expected weight on cpu.*meta"),
    (lambda: F.layer_norm(torch.randn(2, 6), [6], activation="tanh"), ValueError, "activation must be.*'tanh'"),
    (lambda: F.add_layer_norm(torch.randn(2, 6), torch.randn(2, 5), [6]), ValueError, "residual of the input's shape"),
    # a residual of another floating dtype is an fp32 residual stream (tests/test_row_variants.py); not an int one
    (lambda: F.add_rms_norm(torch.randn(2, 6), torch.ones(2, 6, dtype=torch.int32), [6]), TypeError,
     "residual must be a floating-point tensor"),
    (lambda: F.rms_norm(torch.randn(2, 6), [6], torch.ones(6), casting="bf16"), ValueError, "unknown casting 'bf16'"),
    (lambda: F.gated_rms_norm(torch.randn(2, 6), torch.randn(2, 6), [6], group_size=4), normops.core.ShapeError,
     "group_size=4 must divide"),
    (lambda: normops.nn.LayerNorm(4, activation="swish"), ValueError, "activation must be"),
    (lambda: normops.nn.BatchNorm2d(4)(torch.randn(2, 4)), ValueError, "expected 4D input"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_shape_errors_are_both_value_and_runtime_errors():
    """torch raises RuntimeError for some of these and ValueError for others; ours are both, so
    code written against either keeps working."""
    with pytest.raises(ValueError):
        F.layer_norm(torch.randn(3, 6), [5])
    with pytest.raises(RuntimeError):
        F.batch_norm(torch.randn(1, 4), None, None, training=True)


def test_failed_call_leaves_running_stats():
    rm, rv = _bn_stats()
    bad_calls = [
        lambda: F.batch_norm(torch.randn(1, 4), rm, rv, training=True),
        lambda: F.batch_norm(torch.randn(5, 4), rm, rv, torch.ones(3), training=True),
        lambda: F.batch_norm(torch.randn(5, 4), rm, rv, training=True, activation="tanh"),
        lambda: F.instance_norm(torch.randn(2, 4, 1), rm, rv),
        lambda: F.instance_norm(torch.randn(2, 4, 3), rm, rv, torch.ones(5)),
    ]
    for call in bad_calls:
        with pytest.raises((ValueError, RuntimeError, TypeError)):
            call()
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_failed_module_call_leaves_buffers():
    bn = normops.nn.BatchNorm1d(4, momentum=None)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for bad in (torch.randn(1, 4), torch.randn(5, 3), torch.randn(2, 4, 3, 3)):
        with pytest.raises((ValueError, RuntimeError)):
            bn(bad)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown normops backend 'cuda'"):
        normops.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown normops backend"):
        with normops.backend("jax"):
            pass
    monkeypatch.setenv("NORMOPS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="NORMOPS_BACKEND='tpu'"):
        F.layer_norm(torch.randn(2, 3), [3])
    monkeypatch.delenv("NORMOPS_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with normops.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            F.layer_norm(torch.randn(2, 3), [3])
