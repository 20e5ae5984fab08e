"""The torch backend's CPU fast paths: the "composed" route of fp32/fp64 fused activations (ATen's
norm and activation under torch's autograd), the in-place activation of the op path (fp16/bf16,
RMSNorm) and RMSNorm's backward by matrix-vector products. Each is compared with torch's
composition by the tolerance rule (``cases.assert_close_to_reference``)."""
import pytest
import torch

import normops
from cases import (DTYPES, F, assert_close_to_reference, make, params, torch_batch_norm, torch_group_norm,
                   torch_layer_norm, torch_rms_norm)
from normops import ops
from normops.ops.batch_norm import BatchNormSpec
from normops.ops.group_norm import GroupNormSpec
from normops.ops.row_norm import RowNormSpec

ACTS = ["relu", "silu", "gelu"]

# name -> (normops function, torch composition, input shape), both taking (x, w, b, activation)
FUSED = {
    "layer_norm": (lambda x, w, b, a: F.layer_norm(x, [x.shape[-1]], w, b, activation=a),
                   lambda x, w, b, a: torch_layer_norm(x, [x.shape[-1]], w, b, activation=a), (6, 37)),
    "rms_norm": (lambda x, w, b, a: F.rms_norm(x, [x.shape[-1]], w, activation=a),
                 lambda x, w, b, a: torch_rms_norm(x, [x.shape[-1]], w, activation=a), (6, 37)),
    "group_norm": (lambda x, w, b, a: F.group_norm(x, 3, w, b, activation=a),
                   lambda x, w, b, a: torch_group_norm(x, 3, w, b, activation=a), (2, 6, 5, 3)),
    "batch_norm": (lambda x, w, b, a: F.batch_norm(x, None, None, w, b, True, activation=a),
                   lambda x, w, b, a: torch_batch_norm(x, None, None, w, b, True, activation=a), (4, 6, 5)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_activation_matches_torch_composition(name, act, dtype):
    ours, ref, shape = FUSED[name]
    x = make(shape, dtype)
    w, b = params(shape[-1] if name.endswith("layer_norm") or name == "rms_norm" else shape[1], dtype)
    assert_close_to_reference(lambda x, w, b: ours(x, w, b, act), lambda x, w, b: ref(x, w, b, act),
                              [x, w, b], "torch", dtype)


@pytest.mark.parametrize("name", ["layer_norm", "group_norm", "batch_norm"])
def test_fp32_fused_activation_is_torch_autograd(name):
    """fp32 with an activation takes route "composed": torch's autograd nodes, no normops op, and
    relu is applied in place on the norm's output (no second buffer)."""
    ours, _, shape = FUSED[name]
    x = make(shape, torch.float32)
    w, b = params(shape[-1] if name == "layer_norm" else shape[1], torch.float32)
    family, spec = {"layer_norm": ("row_norm", RowNormSpec((37,), 1e-5, activation="relu")),
                    "group_norm": ("group_norm", GroupNormSpec(3, 1e-5, "relu")),
                    "batch_norm": ("batch_norm", BatchNormSpec(True, 1e-5, "relu"))}[name]
    assert ops.route(family, x, spec, (x, w, b), aten=True).implementation == "composed"
    y = ours(x, w, b, "relu")
    assert type(y.grad_fn).__name__ == "ReluBackward0"  # relu_'s node: ATen's graph, not the op's Function
    assert y._version > 0  # in place
    y = ours(x, w, b, "silu")
    assert type(y.grad_fn).__name__ == "SiluBackward0"  # out of place: silu's backward reads its input


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_backward_matches_torch(dtype, weighted):
    """RMSNorm's backward (dx = r*dz*w - x*r^3*mean(dz*x*w), dw = r @ (dz*x)) against torch's."""
    x = make((5, 4, 33), dtype)
    w = params(33, dtype)[0] if weighted else None
    assert_close_to_reference(lambda x, w: F.rms_norm(x, [33], w), lambda x, w: torch_rms_norm(x, [33], w),
                              [x, w], "torch", dtype)


def test_rms_backward_one_gradient_at_a_time():
    """output_mask: dx alone, dw alone."""
    x = make((3, 8), torch.float32)
    w = params(8, torch.float32)[0]
    for need_x, need_w in ((True, False), (False, True)):
        xx, ww = x.detach().requires_grad_(need_x), w.detach().requires_grad_(need_w)
        xr, wr = x.detach().double().requires_grad_(need_x), w.detach().double().requires_grad_(need_w)
        F.rms_norm(xx, [8], ww).sum().backward()
        torch_rms_norm(xr, [8], wr).sum().backward()
        for ours, ref in ((xx, xr), (ww, wr)):
            if ref.requires_grad:
                torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
            else:
                assert ours.grad is None


def test_op_path_activation_in_place_keeps_retained_graph():
    """bf16 takes the op: its backward writes the activation's gradient over its own recomputed
    buffer, never over a saved tensor, so a retained graph gives the same gradient twice."""
    x = make((2, 6, 5, 3), torch.bfloat16)
    w, b = params(6, torch.bfloat16)
    with normops.backend("torch"):
        y = F.group_norm(x, 3, w, b, activation="silu")
        g = torch.randn_like(y)
        first = torch.autograd.grad(y, (x, w, b), g, retain_graph=True)
        second = torch.autograd.grad(y, (x, w, b), g)
    for a, c in zip(first, second):
        assert torch.equal(a, c)
