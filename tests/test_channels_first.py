"""The channels-first LayerNorm (``normops.functional.layer_norm_channels_first``, ``normops.nn.LayerNorm2d``):
ConvNeXt's LayerNorm over dim 1 of (N, C, *), on every backend, against torch's permute composition
``layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)`` (the tolerance rule of cases.py) and the
NumPy reference, NCHW and channels_last, 3-D to 5-D, odd C, C = 1, an empty batch; gradcheck and
gradgradcheck in float64; the Triton kernels under the interpreter at small shapes (one pass and
looped over channel blocks).
"""
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normops
from cases import CHANNELS_LAST, CUDA, DEVICE, DTYPES, F, TF, assert_close_to_reference, err, layout_copies, make, \
    params
from normops.backends import numpy_backend

# (N, C, *S): odd C, C = 1, 3-D (N, C, L), 5-D, one position, an empty batch
SHAPES = [(2, 7, 3, 5), (2, 1, 3, 4), (3, 5, 7), (2, 6, 2, 3, 3), (4, 9, 1, 1), (0, 6, 4, 4)]


def torch_cf(x, w, b, eps=1e-6, activation=None):
    """The reference: torch's LayerNorm over the channels moved last, moved back."""
    y = TF.layer_norm(x.movedim(1, -1), (x.shape[1],), w, b, eps).movedim(-1, 1)
    return {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu, None: lambda t: t}[activation](y)


def _layout(x, channels_last):
    return x.contiguous(memory_format=CHANNELS_LAST[x.dim()]) if channels_last and x.dim() in CHANNELS_LAST else x


def _inputs(shape, dtype, channels_last):
    x = _layout(make(shape, dtype).detach(), channels_last).requires_grad_()
    return [x, *params(shape[1], dtype)]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch_permute_composition(shape, channels_last, dtype, backend):
    inputs = _inputs(shape, dtype, channels_last)
    assert_close_to_reference(lambda x, w, b: F.layer_norm_channels_first(x, w, b), torch_cf, inputs, backend, dtype)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_output_keeps_the_input_memory_format(backend, channels_last):
    x = _layout(make((2, 6, 3, 5), torch.float32, requires_grad=False), channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x.requires_grad_()
    w, b = params(6, torch.float32)
    with normops.backend(backend):
        y = F.layer_norm_channels_first(x, w, b)
        (dx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 1, 3), (3, 4)], ids=str)
def test_agrees_with_the_numpy_reference(shape, activation):
    x = make(shape, torch.float64, requires_grad=False)
    w, b = params(shape[1], torch.float64)
    y, mean, rstd = numpy_backend.layer_norm_cf_fwd(x, w.detach(), b.detach(), 1e-6, activation or "none", True)
    ty, tmean, trstd = normops.backends.load("torch").layer_norm_cf_fwd(x, w.detach(), b.detach(), 1e-6,
                                                                        activation or "none", True)
    assert mean.shape == (shape[0],) + shape[2:] and mean.dtype == torch.float64
    torch.testing.assert_close(y, ty)
    torch.testing.assert_close(y, torch_cf(x, w, b, activation=activation))
    torch.testing.assert_close(rstd, trstd)
    dy = torch.randn(shape, dtype=torch.float64)
    w, b = w.detach(), b.detach()
    ours = numpy_backend.layer_norm_cf_bwd(dy, x, w, b, mean, rstd, activation or "none", [True, True, True])
    theirs = normops.backends.load("torch").layer_norm_cf_bwd(dy, x, w, b, mean, rstd, activation or "none",
                                                              [True, True, True])
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_gradcheck_and_gradgradcheck(backend, activation, channels_last):
    x = _layout(make((2, 5, 3, 2), torch.float64, requires_grad=False), channels_last).requires_grad_()
    w, b = params(5, torch.float64)
    fn = lambda x, w, b: F.layer_norm_channels_first(x, w, b, 1e-5, activation=activation)  # noqa: E731
    with normops.backend(backend):
        assert gradcheck(fn, (x, w, b))
        assert gradgradcheck(fn, (x, w, b))


def test_no_weight_no_bias_and_no_grad():
    x = make((2, 4, 3, 3), torch.float32, requires_grad=False)
    torch.testing.assert_close(F.layer_norm_channels_first(x), torch_cf(x, None, None))
    w, _ = params(4, torch.float32)
    torch.testing.assert_close(F.layer_norm_channels_first(x, w), torch_cf(x, w, None))


def test_constant_channels_give_exactly_the_bias():
    """A position whose channels are all equal has x_hat = 0 exactly (ATen LayerNorm's Welford; the
    kernels' pivot), so y = b, at any offset."""
    x = torch.full((2, 5, 3, 3), 1234.5678)
    w, b = params(5, torch.float32)
    y = F.layer_norm_channels_first(x, w.detach(), b.detach())
    assert torch.equal(y, b.detach().reshape(1, 5, 1, 1).expand_as(y))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_torch_backend_copies_only_nchw(channels_last):
    """The torch backend runs ATen's LayerNorm on the channels-last view (torch_backend.py says
    why): a channels_last input is read in place, no copy each way; an NCHW one is copied: x in and
    y out in the forward, dy and x in and dx out in the backward."""
    x = _layout(make((2, 6, 4, 5), torch.float32, requires_grad=False), channels_last).requires_grad_()
    w, b = params(6, torch.float32)
    dy = torch.ones_like(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, normops.backend("torch"):
        y = F.layer_norm_channels_first(x, w, b)
        y.backward(dy)
    copies = [e.name for e in prof.events()].count("aten::copy_")
    assert copies == (0 if channels_last else 5)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_bad_input_gets_a_clear_error():
    x = torch.randn(2, 4, 3)
    with pytest.raises(normops.core.ShapeError, match="weight"):
        F.layer_norm_channels_first(x, torch.ones(3))
    with pytest.raises(normops.core.ShapeError, match=r"\(N, C, \*\)"):
        F.layer_norm_channels_first(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        F.layer_norm_channels_first(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(normops.core.DtypeError):
        F.layer_norm_channels_first(x.double(), torch.ones(4))


def test_layer_norm_2d_module_is_timms():
    m = normops.nn.LayerNorm2d(6)
    assert isinstance(m, torch.nn.LayerNorm) and m.eps == 1e-6 and m.normalized_shape == (6,)
    assert sorted(m.state_dict()) == ["bias", "weight"]
    assert normops.nn.LayerNorm2d(6, affine=False).weight is None
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = make((2, 6, 5, 5), torch.float32, requires_grad=False).contiguous(memory_format=torch.channels_last)
    y = m(x)
    torch.testing.assert_close(y, torch_cf(x, m.weight, m.bias))
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_torch_compile_and_export_trace_the_op():
    x = make((2, 6, 3, 3), torch.float32, requires_grad=False)
    m = normops.nn.LayerNorm2d(6)
    ep = torch.export.export(m, (x,))
    assert "normops.layer_norm_channels_first" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), m(x))


# --- the Triton kernels ----------------------------------------------------------------------------

@pytest.fixture(params=["one_pass", "looped"])
def path(request, monkeypatch):
    """The one-pass kernels, then tiles of a few channels (several channel blocks a position): a
    budget of one element a thread and one warp across a column leave 1-4 channels a tile."""
    pytest.importorskip("triton")
    from normops.kernels import config
    if request.param == "looped":
        for budget in ("CF_FWD_PER_THREAD", "CF_BWD_PER_THREAD", "CF_MAX_WARPS"):
            monkeypatch.setattr(config, budget, 1)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 7, 3, 5), (2, 1, 2, 3), (2, 6, 5), (0, 3, 2, 2)], ids=str)
def test_triton_matches_torch(shape, channels_last, dtype, path):
    inputs = [t.detach().to(DEVICE).requires_grad_() for t in _inputs(shape, dtype, channels_last)]
    inputs[0] = _layout(inputs[0].detach(), channels_last).requires_grad_()
    assert_close_to_reference(lambda x, w, b: F.layer_norm_channels_first(x, w, b), torch_cf, inputs, "triton", dtype)


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_triton_gradcheck_and_the_numpy_reference(activation, path):
    x = make((2, 9, 2, 3), torch.float64, requires_grad=False).to(DEVICE).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w, b = (p.detach().to(DEVICE).requires_grad_() for p in params(9, torch.float64))
    fn = lambda x, w, b: F.layer_norm_channels_first(x, w, b, activation=activation)  # noqa: E731
    with normops.backend("triton"):
        assert gradcheck(fn, (x, w, b))
        y = fn(x, w, b)
    with normops.backend("numpy"):
        assert err(y, fn(x, w, b)) < 1e-12


def test_triton_reads_strided_inputs_in_place():
    """A non-dense input (a channel slice of a channels_last tensor) is copied once to its layout;
    NCHW and channels_last ones are read in place (no layout copy)."""
    pytest.importorskip("triton")
    x = make((2, 12, 3, 4), torch.float32, requires_grad=False).to(DEVICE)
    w, b = (p.detach().to(DEVICE) for p in params(6, torch.float32))
    with normops.backend("triton"):
        for t in (x[:, :6], x[:, :6].contiguous(memory_format=torch.channels_last)):
            with layout_copies() as copies:
                y = F.layer_norm_channels_first(t, w, b)
            assert err(y, torch_cf(t, w, b)) < 1e-5
            assert copies == ([] if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)
                              else [tuple(t.shape)])


@pytest.mark.skipif(not CUDA, reason="real sizes need a GPU")
@pytest.mark.parametrize("shape", [(32, 96, 56, 56), (32, 768, 7, 7), (2, 2048, 7, 7)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_convnext_shapes(shape, channels_last):
    inputs = [t.detach().cuda().requires_grad_() for t in _inputs(shape, torch.bfloat16, False)]
    inputs[0] = _layout(inputs[0].detach(), channels_last).requires_grad_()
    assert_close_to_reference(lambda x, w, b: F.layer_norm_channels_first(x, w, b), torch_cf, inputs, "triton",
                              torch.bfloat16)


def test_inspect_knows_the_channels_first_norms():
    """normops.inspect: LayerNorm2d and a ConvNext's channels_first ConvNextLayerNorm (before and
    after convert) show their channels and the channels-first kernel's route; the fusion advice
    builds a LayerNorm2d with the channel count, not a normalized shape."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                         image_size=32)
    model = transformers.ConvNextModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    first = {"embeddings.layernorm", "encoder.stages.1.downsampling_layer.0"}
    for converted in (False, True):
        if converted:
            normops.convert(model)
        layers = {layer.name: layer for layer in normops.inspect(model, x).layers}
        for name, layer in layers.items():
            assert (layer.shape.startswith("C=") and "channels first" in layer.shape) == (name in first), layer
        assert all(layers[n].backend == "torch" if converted else "would swap it: convnext" in layers[n].backend
                   for n in first)
        assert all(layers[n].triton == ("kernel" if converted else "-") for n in first)
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU(), normops.nn.LayerNorm2d(8))
    report = normops.inspect(seq, x)
    assert [(layer.shape, layer.triton) for layer in report.layers] == [("C=8, channels first (dim 1)", "kernel")]
    assert 'normops.nn.LayerNorm2d(8, activation="gelu")' in report.findings[0].advice


def test_cli_check_covers_the_op(capsys, monkeypatch):
    """``normops check --op layer_norm_channels_first`` compares it with torch's permute composition on
    each backend, and fails a backend whose output is off."""
    from normops import cli
    from normops.backends import torch_backend
    assert cli.main(["check", "--quick", "--op", "layer_norm_channels_first", "--backend", "torch", "--backend",
                     "numpy"]) == 0
    out = capsys.readouterr().out
    assert "layer_norm_channels_first  torch" in out and "layer_norm_channels_first  numpy" in out
    assert "4 passed, 0 failed" in out
    fwd = torch_backend.layer_norm_cf_fwd
    monkeypatch.setattr(torch_backend, "layer_norm_cf_fwd", lambda x, *a: (lambda y, m, r: (y * 1.01, m, r))(*fwd(x, *a)))
    assert cli.main(["check", "--quick", "--op", "layer_norm_channels_first", "--backend", "torch"]) == 1
    assert "0 passed, 2 failed" in capsys.readouterr().out


def test_converted_convnext_norms_keep_the_originals_layout():
    """A converted ConvNextLayerNorm(channels_first) and timm's LayerNorm2d return what the originals'
    permute composition returns, channels_last, whatever the input's layout: the convolutions after
    them run as before the conversion (hf._permuted_layout)."""
    transformers = pytest.importorskip("transformers")
    from normops import hf
    original = transformers.models.convnext.modeling_convnext.ConvNextLayerNorm(6, data_format="channels_first")
    converted = normops.convert(torch.nn.Sequential(original))[0]
    assert hf.convention_of(converted) == "convnext"
    for channels_last in (False, True):
        x = _layout(make((2, 6, 5, 4), torch.float32, requires_grad=False), channels_last)
        y, want = converted(x), original(x)
        torch.testing.assert_close(y, want)
        assert y.stride() == want.stride() and y.is_contiguous(memory_format=torch.channels_last)
