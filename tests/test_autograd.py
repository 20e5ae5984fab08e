"""gradcheck and gradgradcheck in float64 through every op, backend and fused activation.

torch.nn's norms support double backward, so a drop-in must: the second derivative goes through
the differentiable ``*_backward`` ops (see normops/ops/)."""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normops
from cases import BACKENDS, F, make, params

ACTIVATIONS = [None, "relu", "silu", "gelu"]


def _cases(activation):
    """name -> (function, inputs) on tiny float64 shapes; relu's kink is avoided by the data."""
    a = activation
    x4 = make((2, 6, 3, 2), torch.float64, offset=0.3, scale=1.0)
    x3 = make((3, 4, 5), torch.float64, offset=0.3, scale=1.0)
    r3 = make((3, 4, 5), torch.float64, offset=0.0, seed=7)
    w5, b5 = params((5,), torch.float64)
    w6, b6 = params(6, torch.float64)
    rm, rv = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64), torch.linspace(0.5, 2, 6, dtype=torch.float64)
    return {
        "layer_norm": (lambda x, w, b: F.layer_norm(x, [5], w, b, activation=a), (x3, w5, b5)),
        "layer_norm_2d": (lambda x: F.layer_norm(x, [4, 5], activation=a), (x3,)),
        "rms_norm": (lambda x, w: F.rms_norm(x, [5], w, activation=a), (x3, w5)),
        "add_layer_norm": (lambda x, r, w, b: F.add_layer_norm(x, r, [5], w, b), (x3, r3, w5, b5)),
        "add_rms_norm": (lambda x, r, w: F.add_rms_norm(x, r, [5], w), (x3, r3, w5)),
        "group_norm": (lambda x, w, b: F.group_norm(x, 3, w, b, activation=a), (x4, w6, b6)),
        "instance_norm": (lambda x, w, b: F.instance_norm(x, weight=w, bias=b, activation=a), (x4, w6, b6)),
        "batch_norm_train": (lambda x, w, b: F.batch_norm(x, None, None, w, b, True, activation=a), (x4, w6, b6)),
        "batch_norm_eval": (lambda x, w, b: F.batch_norm(x, rm, rv, w, b, False, activation=a), (x4, w6, b6)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("op", list(_cases(None)))
def test_gradcheck_and_gradgradcheck(backend, activation, op):
    if op.startswith("add_") and activation is not None:
        pytest.skip("add_*_norm has no activation")
    fn, inputs = _cases(activation)[op]
    with normops.backend(backend):
        assert gradcheck(fn, inputs)
        assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Only some inputs need a gradient: the others get none, and the rest stay right."""
    x = make((3, 5), torch.float64, requires_grad=False)
    w, b = params((5,), torch.float64)
    b.requires_grad_(False)
    with normops.backend(backend):
        assert gradcheck(lambda w: F.layer_norm(x, [5], w, b), (w,))
        y = F.layer_norm(x, [5], w, b)
        (gw,) = torch.autograd.grad(y.sum(), [w])
    assert gw.shape == w.shape and x.grad is None and b.grad is None


def test_no_grad_skips_statistics(monkeypatch):
    """Without a gradient to compute, the forward is asked for no statistics."""
    seen = []
    real = normops.ops.row_norm.row_norm

    def spy(spec, x, residual, weight, bias, need_stats, *args, **kwargs):
        seen.append(need_stats)
        return real(spec, x, residual, weight, bias, need_stats, *args, **kwargs)

    monkeypatch.setattr(normops.ops.row_norm, "row_norm", spy)
    x = torch.randn(3, 5)
    w = torch.randn(5, requires_grad=True)
    F.rms_norm(x, [5], w)
    with torch.no_grad():
        F.rms_norm(x, [5], w)
    F.rms_norm(x, [5], w.detach())
    assert seen == [True, False, False]


def test_backward_is_an_op():
    """The backward graph calls normops::row_norm_backward (what a Triton kernel will implement).
    (RMSNorm: an fp32 layer_norm with an activation is torch's autograd on ATen, route "composed".)"""
    x = torch.randn(4, 8, requires_grad=True)
    y = F.rms_norm(x, [8], activation="silu")
    g = torch.randn_like(y)
    with torch.profiler.profile() as prof:
        y.backward(g)
    names = {e.name for e in prof.events()}
    assert "normops::row_norm_backward" in names
