"""The torch.library contract: opcheck, fake/meta tensors, torch.compile(fullgraph=True),
torch.export and autocast."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import normops
from cases import F, TF, make, params

ops = torch.ops.normops


def _op_samples():
    x = make((3, 4, 5), torch.float32)
    r = make((3, 4, 5), torch.float32, seed=3)
    x4 = make((2, 6, 3, 3), torch.float32)
    xcl = make((2, 6, 3, 3), torch.float32).detach().to(memory_format=torch.channels_last).requires_grad_()
    w5, b5 = params((5,), torch.float32)
    w6, b6 = params(6, torch.float32)
    rm, rv = torch.zeros(6), torch.ones(6)
    mean, rstd = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    dy = torch.randn(3, 4, 5, requires_grad=True)
    dy4 = torch.randn(2, 6, 3, 3, requires_grad=True)
    gmean, grstd = torch.randn(2, 3), torch.rand(2, 3) + 0.5
    ada = [make((3, 5), torch.float32, seed=s) for s in (9, 10, 11)]  # scale, shift, gate: (B, D)
    smean, srstd = torch.randn(6), torch.rand(6) + 0.5
    plain = (0.0, "fp32", None, True, 0)  # offset, casting, out_dtype, norm_before_gate, group_size
    gate = make((3, 4, 6), torch.float32, seed=4)
    x6, w6r = make((3, 4, 6), torch.float32, seed=5), params((6,), torch.float32)[0]
    r64 = make((3, 4, 5), torch.float64, seed=6)
    return {
        "row_norm": (ops.row_norm.default, (x, None, None, [5], w5, b5, 1e-5, False, "gelu", True, *plain)),
        "row_norm_residual_rms": (ops.row_norm.default, (x, r, None, [5], w5, None, 1e-6, True, "none", True, *plain)),
        "row_norm_no_stats": (ops.row_norm.default, (x.detach(), None, None, [4, 5], None, None, 1e-5, False, "none",
                                                     False, *plain)),
        "row_norm_offset_llama": (ops.row_norm.default, (x, None, None, [5], w5, None, 1e-6, True, "none", True, 1.0,
                                                         "llama", torch.bfloat16, True, 0)),
        "row_norm_residual_fp64": (ops.row_norm.default, (x, r64, None, [5], w5, b5, 1e-5, False, "none", True, 0.0,
                                                          "fp32", torch.float32, True, 0)),
        "row_norm_gated_groups": (ops.row_norm.default, (x6, None, gate, [6], w6r, None, 1e-6, True, "none", True,
                                                         0.0, "fp32", None, False, 3)),
        "row_norm_gated_after": (ops.row_norm.default, (x6, None, gate, [6], w6r, None, 1e-6, True, "none", True,
                                                        0.0, "fp32", None, True, 0)),
        "row_norm_backward": (ops.row_norm_backward.default,
                              (dy, x, None, None, [5], w5, b5, mean, rstd, 1e-5, False, "silu",
                               [True, True, True, False], 0.0, "fp32", True, 0, None, None)),
        "row_norm_backward_rms": (ops.row_norm_backward.default,
                                  (dy, x, None, None, [5], w5, None, None, rstd, 1e-5, True, "none",
                                   [True, False, False, False], *plain[:2], *plain[3:], None, None)),
        "row_norm_backward_gated": (ops.row_norm_backward.default,
                                    (torch.randn(3, 4, 6, requires_grad=True), x6, gate, None, [6], w6r, None, None,
                                     torch.rand(3, 4, 2) + 0.5, 1e-5, True, "none", [True, True, False, True], 1.0,
                                     "fp32", False, 3, None, None)),
        "row_norm_backward_residual_streams": (ops.row_norm_backward.default,
                                               (dy, x, None, torch.randn(3, 4, 5, requires_grad=True), [5], w5,
                                                None, None, rstd, 1e-5, True, "none", [True, True, False, False],
                                                *plain[:2], *plain[3:], torch.bfloat16, torch.float32)),
        "fused_add_rms_norm": (ops.fused_add_rms_norm.default, (x.detach().clone(), r.detach().clone(), [5],
                                                                w5.detach(), 1e-6)),
        "group_norm": (ops.group_norm.default, (x4, w6, b6, 3, 1e-5, "relu", False, "fp32", True)),
        "group_norm_channels_last": (ops.group_norm.default, (xcl, w6, None, 2, 1e-5, "none", False, "fp32", True)),
        "instance_norm": (ops.group_norm.default, (x4, w6, b6, 6, 1e-5, "silu", True, "fp32", True)),
        # issue #18: per-sample affine (ada_group_norm), adaLN, channels-first LayerNorm
        "group_norm_per_sample": (ops.group_norm.default, (x4, 1 + 0.1 * make((2, 6), torch.float32, seed=7),
                                                           make((2, 6), torch.float32, seed=8), 3, 1e-5, "silu",
                                                           False, "torch", True)),
        "ada_norm": (ops.ada_norm.default, (x, None, None, ada[0], ada[1], None, None, 1e-6, False, "fp32", True)),
        "ada_norm_residual_gate": (ops.ada_norm.default, (x, r, ada[2], ada[0], ada[1], w5, b5, 1e-6, False, "torch",
                                                          True)),
        "ada_norm_rms": (ops.ada_norm.default, (x, r, None, ada[0], ada[1], w5, None, 1e-6, True, "t5", True)),
        "ada_norm_backward": (ops.ada_norm_backward.default,
                              (dy, None, x, None, None, ada[0], None, None, mean, rstd, 1e-6, False, "fp32",
                               [True, False, False, True, True, False, False])),
        "layer_norm_channels_first": (ops.layer_norm_channels_first.default, (x4, w6, b6, 1e-6, "gelu", True)),
        "layer_norm_channels_first_cl": (ops.layer_norm_channels_first.default, (xcl, w6, None, 1e-6, "none", True)),
        "group_norm_backward": (ops.group_norm_backward.default,
                                (dy4, x4, w6, b6, gmean, grstd, 3, 1e-5, "silu", [True, True, True])),
        "batch_norm_train": (ops.batch_norm.default, (x4, w6, b6, None, None, True, 1e-5, "none")),
        "batch_norm_eval": (ops.batch_norm.default, (xcl, w6, b6, rm, rv, False, 1e-5, "relu")),
        "batch_norm_backward": (ops.batch_norm_backward.default,
                                (dy4, x4, w6, b6, None, None, smean, srstd, True, 1e-5, "none", [True, True, True])),
        "batch_norm_backward_eval": (ops.batch_norm_backward.default,
                                     (dy4, x4, w6, None, rm, rv, None, None, False, 1e-5, "gelu", [True, True, False])),
        "update_running_stats": (ops.update_running_stats.default, (rm.clone(), rv.clone(), smean, srstd, 0.1)),
    }


@pytest.mark.parametrize("backend", ["torch", "numpy", "triton"])
@pytest.mark.parametrize("name", list(_op_samples()))
def test_opcheck(backend, name):
    if backend == "triton":
        pytest.importorskip("triton")
        if not normops.backends.triton_interpret():
            pytest.skip("the samples are CPU tensors: the triton backend takes them only under TRITON_INTERPRET=1")
    op, args = _op_samples()[name]
    with normops.backend(backend):
        torch.library.opcheck(op, args)


def test_meta_and_fake_tensors():
    """Shapes, dtypes and memory formats come out of the fake kernels without computing anything."""
    with FakeTensorMode():
        x = torch.empty(8, 6, 5, 7, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        w = torch.empty(6)
        assert F.group_norm(x, 3, w, w).is_contiguous(memory_format=torch.channels_last)
        assert F.batch_norm(x, None, None, w, w, True).dtype == torch.bfloat16
        assert F.layer_norm(x, [7]).shape == (8, 6, 5, 7)
        out, h = F.add_rms_norm(x.contiguous(), x.contiguous(), [5, 7])
        assert out.shape == h.shape == x.shape
    m = torch.empty(4, 3, 16, device="meta")
    assert F.instance_norm(m).device.type == "meta"
    assert F.rms_norm(m, [16]).shape == m.shape


def _all_norms(x, w, b, h, rm, rv):
    y = F.group_norm(x, 2, w, b, activation="silu")
    y = F.batch_norm(y, rm, rv, w, b, True)
    y = F.instance_norm(y, weight=w, bias=b)
    y = F.layer_norm(y, y.shape[-1:], activation="gelu")
    y = F.rms_norm(y, y.shape[-1:])
    y, h = F.add_layer_norm(y, h, y.shape[-1:])
    return y * 2 + h


def test_compile_fullgraph():
    """One compiled function through every op: no graph break, same values, gradients and
    running-statistics updates as eager."""
    x = make((3, 4, 5, 6), torch.float32)
    h = make((3, 4, 5, 6), torch.float32, seed=4)
    w, b = params(4, torch.float32)
    stats_eager, stats_compiled = [torch.zeros(4), torch.ones(4)], [torch.zeros(4), torch.ones(4)]
    eager = _all_norms(x, w, b, h, *stats_eager)
    g_eager = torch.autograd.grad(eager.square().sum(), [x, w, b, h])
    compiled = torch.compile(_all_norms, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, h, *stats_compiled)
    g_out = torch.autograd.grad(out.square().sum(), [x, w, b, h])
    torch.testing.assert_close(out, eager)
    # an eager fp32 call with a fused activation runs ATen's norm and activation under torch's
    # autograd (the CPU's "composed" route), the compiled graph the normops op: the same math,
    # the weight gradients' sums in another order (differences ~6e-6 relative)
    for a, e in zip(g_out + tuple(stats_compiled), g_eager + tuple(stats_eager)):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-5)


def test_compile_inductor_module():
    """The default inductor backend, through a module, with a second call that reuses the graph."""
    m = torch.nn.Sequential(normops.nn.LayerNorm(16), normops.nn.RMSNorm(16, activation="relu"))
    c = torch.compile(m, fullgraph=True)
    for seed in range(2):
        x = make((4, 16), torch.float32, seed=seed)
        torch.testing.assert_close(c(x), m(x))


@pytest.mark.parametrize("train", [False, True])
def test_export(train):
    model = torch.nn.Sequential(
        normops.nn.BatchNorm2d(4), normops.nn.GroupNorm(2, 4, activation="silu"), normops.nn.InstanceNorm2d(4),
        torch.nn.Flatten(), normops.nn.LayerNorm(4 * 3 * 3))
    model.train(train)
    x = make((2, 4, 3, 3), torch.float32, requires_grad=False)
    ep = torch.export.export(model, (x,))
    ops_in_graph = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "normops.batch_norm.default" in ops_in_graph and "normops.row_norm.default" in ops_in_graph
    if train:
        assert "normops.update_running_stats.default" in ops_in_graph
    ref = [p.clone() for p in model.buffers()]
    expected = model(x)
    for buf, r in zip(model.buffers(), ref):  # undo the eager call's update before the exported one
        buf.copy_(r)
    torch.testing.assert_close(ep.module()(x), expected)


@pytest.mark.parametrize("op", ["layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_autocast_matches_torch(op, dtype):
    """Under CPU autocast torch leaves norms in the input dtype; so does normops."""
    x = make((2, 4, 3, 5), dtype, requires_grad=False)
    ours, ref = {
        "layer_norm": (lambda t: F.layer_norm(t, [5]), lambda t: TF.layer_norm(t, [5])),
        "rms_norm": (lambda t: F.rms_norm(t, [5]), lambda t: TF.rms_norm(t, [5])),
        "group_norm": (lambda t: F.group_norm(t, 2), lambda t: TF.group_norm(t, 2)),
        "batch_norm": (lambda t: F.batch_norm(t, None, None, training=True),
                       lambda t: TF.batch_norm(t, None, None, training=True)),
        "instance_norm": (lambda t: F.instance_norm(t), lambda t: TF.instance_norm(t)),
    }[op]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x).dtype == ref(x).dtype
