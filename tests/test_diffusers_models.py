"""``normops.convert`` on diffusers: its norm classes one by one (RMSNorm, FP32LayerNorm and the adaLN
modules, whose twins keep the Linear and embeddings and fuse norm + modulation), then real models built
from tiny configs at random init, nothing downloaded: AutoencoderKL, DiTTransformer2DModel,
UNet2DConditionModel, SD3Transformer2DModel (diffusers' RMSNorm as QK norm), FluxTransformer2DModel
(AdaLayerNormZeroSingle) and PixArtTransformer2DModel (AdaLayerNormSingle: no norm inside, reported).

Each converted module or model against an unconverted deepcopy: outputs (every output of a tuple) and
parameter gradients in fp32, train and eval; bfloat16 outputs by the probe's 1-ulp rule
(``normops.hf.agree``); ``state_dict`` keys. Norm weights and the adaLN Linears are perturbed off their
init so that a wrong convention changes the outputs. Sizes are tiny: each model runs in about a second.
"""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import normops
import normops.functional as F
from normops import hf
from normops.convert import TWINS
from normops.hf import agree

diffusers = pytest.importorskip("diffusers")
dn = pytest.importorskip("diffusers.models.normalization")

# fp32: statistics summed in another order than torch's (the tolerance of tests/test_hf_models.py)
FP32 = dict(rtol=1e-5, atol=1e-6)
# gradients: sums over tokens with cancellation, so the atol is relative to the tensor's largest element;
# GRAD_FLOOR: a gradient that is zero in exact arithmetic (an attention key's bias: softmax ignores a shift
# of the keys) is fp32 rounding noise, some 1e-7 on these sizes
GRAD_RTOL, GRAD_ATOL, GRAD_FLOOR = 1e-4, 1e-5, 1e-6


def perturbed(module, seed=0):
    """module with every floating parameter moved off its init (norm weights ones, zero-initialised Linears), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def outputs(out):
    """The tensors of a forward's result: a tensor, a tuple, or a diffusers output object."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    if hasattr(out, "to_tuple"):
        return outputs(out.to_tuple())
    return []


def run(module, args, seed=1):
    torch.manual_seed(seed)  # the same label dropout draws in train mode
    return outputs(module(*args))


def backward(module, args):
    """Gradients of a fixed random projection of every output: the parameters' and the floating inputs'."""
    module.zero_grad(set_to_none=True)
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    outs = run(module, args)
    gen = torch.Generator().manual_seed(2)
    sum(((o * torch.randn(o.shape, generator=gen)).sum() for o in outs if o.is_floating_point())).backward()
    grads = {f"input {i}": a.grad for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.grad is not None}
    return grads | {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name, e in expected.items():
        assert_close(actual[name], e, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(e.abs().max()) + GRAD_FLOOR)


# --- the classes one by one ----------------------------------------------------------------------

def _x(*shape, dtype=torch.float32, seed=3):
    return (0.5 + 2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)


D, E = 32, 16
# name -> (module builder, its convention, its fused normops.functional, forward args builder (dtype))
CLASSES = {
    "rms": (lambda: dn.RMSNorm(D, 1e-6), "diffusers", None, lambda dt: (_x(2, 8, D, dtype=dt),)),
    "rms-no-weight": (lambda: dn.RMSNorm(D, 1e-6, elementwise_affine=False), "diffusers", None,
                      lambda dt: (_x(2, 8, D, dtype=dt),)),
    "rms-bias": (lambda: dn.RMSNorm(D, 1e-6, bias=True), "diffusers", None, lambda dt: (_x(2, 8, D, dtype=dt),)),
    "fp32-layer-norm": (lambda: dn.FP32LayerNorm(D), "fp32-layer-norm", None, lambda dt: (_x(2, 8, D, dtype=dt),)),
    "ada-zero": (lambda: dn.AdaLayerNormZero(D), "ada-zero", "ada_layer_norm",
                 lambda dt: (_x(2, 8, D, dtype=dt), None, None, None, _x(2, D, dtype=dt, seed=4))),
    "ada-zero-labels": (lambda: dn.AdaLayerNormZero(D, num_embeddings=10), "ada-zero", "ada_layer_norm",
                        lambda dt: (_x(2, 8, D, dtype=dt), torch.tensor([3.0, 500.0]), torch.tensor([1, 7]), dt)),
    "ada-zero-fp32-norm": (lambda: dn.AdaLayerNormZero(D, norm_type="fp32_layer_norm"), "ada-zero",
                           "ada_layer_norm", lambda dt: (_x(2, 8, D, dtype=dt), None, None, None,
                                                         _x(2, D, dtype=dt, seed=4))),
    "ada-zero-single": (lambda: dn.AdaLayerNormZeroSingle(D), "ada-zero-single", "ada_layer_norm",
                        lambda dt: (_x(2, 8, D, dtype=dt), _x(2, D, dtype=dt, seed=4))),
    "ada-continuous": (lambda: dn.AdaLayerNormContinuous(D, E), "ada-continuous", "ada_layer_norm",
                       lambda dt: (_x(2, 8, D, dtype=dt), _x(2, E, dtype=dt, seed=4))),
    "ada-continuous-no-affine": (lambda: dn.AdaLayerNormContinuous(D, E, elementwise_affine=False, eps=1e-6),
                                 "ada-continuous", "ada_layer_norm",
                                 lambda dt: (_x(2, 8, D, dtype=dt), _x(2, E, dtype=dt, seed=4))),
    # norm_type="rms_norm": diffusers' RMSNorm, fused by ada_rms_norm's casting "t5"
    "ada-continuous-rms": (lambda: dn.AdaLayerNormContinuous(D, E, norm_type="rms_norm"), "ada-continuous",
                           "ada_rms_norm", lambda dt: (_x(2, 8, D, dtype=dt), _x(2, E, dtype=dt, seed=4))),
    "ada-continuous-rms-no-affine": (lambda: dn.AdaLayerNormContinuous(D, E, elementwise_affine=False, eps=1e-6,
                                                                       norm_type="rms_norm"),
                                     "ada-continuous", "ada_rms_norm",
                                     lambda dt: (_x(2, 8, D, dtype=dt), _x(2, E, dtype=dt, seed=4))),
    "ada-one-embedding": (lambda: dn.AdaLayerNorm(D, num_embeddings=10), "ada", "ada_layer_norm",
                          lambda dt: (_x(2, 8, D, dtype=dt), torch.tensor(5))),
    "ada-per-sample": (lambda: dn.AdaLayerNorm(E, output_dim=2 * D, chunk_dim=1), "ada", "ada_layer_norm",
                       lambda dt: (_x(2, 8, D, dtype=dt), None, _x(2, E, dtype=dt, seed=4))),
    "ada-group": (lambda: dn.AdaGroupNorm(E, D, 4, act_fn="silu"), "ada-group", "ada_group_norm",
                  lambda dt: (_x(2, D, 4, 4, dtype=dt), _x(2, E, dtype=dt, seed=4))),
}


@pytest.fixture(params=sorted(CLASSES))
def one(request, monkeypatch):
    """(name, the module perturbed, its converted deepcopy, its convention, args builder, the fused call count)."""
    build, convention, fused, args = CLASSES[request.param]
    torch.manual_seed(0)
    module = perturbed(build())
    twin, report = normops.convert(copy.deepcopy(module), report=True)
    calls = []
    if fused is not None:  # count the fused calls: a twin that fell back to the composition would pass unfused
        real = getattr(F, fused)
        monkeypatch.setattr(F, fused, lambda *a, **k: calls.append(1) or real(*a, **k))
    return request.param, module, twin, report, convention, args, calls


def test_class_converts_by_its_convention(one):
    name, module, twin, report, convention, _, _ = one
    assert hf.convention_of(twin) == convention, str(report)
    assert type(twin).__name__ == type(module).__name__ and isinstance(twin, type(module))
    assert list(twin.state_dict()) == list(module.state_dict())
    assert [r.twin for r in report.rows][0].endswith(f"({convention})")
    for c in hf.candidates(module):  # the probe accepts it in fp32, bf16 and fp32 weights on bf16 input
        assert hf.probe(module, c)[0]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_class_fp32_outputs_and_grads(one, training):
    name, module, twin, _, _, args, calls = one
    module.train(training), twin.train(training)
    x = args(torch.float32)
    expected, actual = run(module, x), run(twin, x)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a, e, **FP32)
    assert calls or CLASSES[name][2] is None
    grads = backward(twin, x)
    assert_grads_close(grads, backward(module, x))
    if hasattr(module, "linear"):  # the modulation's gradients reach the Linear the twin kept
        assert grads["linear.weight"].abs().sum() > 0


def test_class_bf16_outputs(one):
    name, module, twin, _, _, args, calls = one
    x = args(torch.bfloat16)
    module, twin = module.to(torch.bfloat16), twin.to(torch.bfloat16)
    expected, actual = run(module, x), run(twin, x)
    for i, (a, e) in enumerate(zip(actual, expected)):
        ok, why = agree(a, e)
        assert ok, f"output {i}: {why}"
    assert calls or CLASSES[name][2] is None  # the fused call (AdaGroupNorm's: casting "torch")


def test_adaln_twin_pickles_and_keeps_its_children():
    module = perturbed(dn.AdaLayerNormZero(D))
    twin = normops.convert(copy.deepcopy(module))
    assert type(twin.norm) is nn.LayerNorm and type(twin.linear) is nn.Linear  # its children are left as they are
    again = pickle.loads(pickle.dumps(twin))
    assert hf.convention_of(again) == "ada-zero"
    x = CLASSES["ada-zero"][3](torch.float32)
    for a, e in zip(run(again, x), run(module, x)):
        assert_close(a, e, **FP32)


def test_registry_matches_diffusers_rmsnorm_by_qualified_name():
    # diffusers' RMSNorm is named like torch's: neither torch.nn.RMSNorm nor normops' own is matched
    assert [c.name for c in hf.candidates(dn.RMSNorm(D, 1e-6))] == ["diffusers"]
    assert hf.candidates(nn.RMSNorm(D)) == () and hf.candidates(normops.nn.RMSNorm(D)) == ()
    assert "diffusers" not in [c.name for c in hf.candidates(dn.MochiRMSNorm(D, 1e-6))]


def test_left_with_the_reason():
    single = dn.AdaLayerNormSingle(D)
    _, report = normops.convert(nn.ModuleDict({"adaln": single}), report=True)
    assert [(r.path, r.twin) for r in report.rows] == [("adaln", "")]
    assert "no norm inside" in report.rows[0].reason


def test_inspect_lists_adaln_modules_not_their_inner_norm():
    model = nn.ModuleDict({"a": dn.AdaLayerNormZero(D), "b": dn.AdaLayerNormContinuous(D, E, norm_type="rms_norm")})
    for m in (model, normops.convert(copy.deepcopy(model))):
        layers = {layer.name: layer for layer in normops.inspect(m).layers}
        assert sorted(layers) == ["a", "b"]  # b's RMSNorm is b's: ada_rms_norm fuses it (casting "t5")
        assert "emb=" in layers["a"].shape


# --- real models ---------------------------------------------------------------------------------

def _dit():
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                            sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    return model, (_x(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3]))


def _sd3():
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm")
    return model, (_x(2, 4, 8, 8), _x(2, 5, 16, seed=4), _x(2, 16, seed=5), torch.tensor([10, 500]))


def _flux():
    model = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                             pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    return model, (_x(2, 16, 4), _x(2, 5, 16, seed=4), _x(2, 16, seed=5), torch.tensor([0.1, 0.7]),
                   torch.zeros(16, 3), torch.zeros(5, 3))


def _unet():
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    return model, (_x(2, 4, 8, 8), torch.tensor([10, 500]), _x(2, 5, 16, seed=4))


def _vae():
    model = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                    layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    return model, (_x(2, 3, 16, 16),)


def _pixart():
    model = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                               out_channels=4, num_layers=1, sample_size=8, patch_size=2,
                                               cross_attention_dim=16, caption_channels=16, norm_num_groups=4)
    return model, (_x(2, 4, 8, 8), _x(2, 5, 16, seed=4), torch.tensor([10, 500]))


# name -> (builder, the twins expected: {convention or normops.nn class name: count}, the classes left)
MODELS = {
    "dit": (_dit, {"ada-zero": 2, "LayerNorm": 3}, set()),
    "sd3": (_sd3, {"ada-zero": 3, "ada-continuous": 2, "diffusers": 8, "LayerNorm": 3}, set()),
    "flux": (_flux, {"ada-zero": 2, "ada-zero-single": 1, "ada-continuous": 1, "RMSNorm": 6, "LayerNorm": 2}, set()),
    "unet": (_unet, {"GroupNorm": 21, "LayerNorm": 12}, set()),
    "vae": (_vae, {"GroupNorm": 24}, set()),
    "pixart": (_pixart, {"LayerNorm": 3}, {"AdaLayerNormSingle"}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    base, args = MODELS[request.param][0]()
    base = perturbed(base.eval())
    converted, report = normops.convert(copy.deepcopy(base), report=True)
    return request.param, base, converted, report, args


def _unconverted(model):
    """The norms convert reaches that are still third-party or torch.nn modules (an adaLN twin's children excepted)."""
    left, owned = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in owned):
            continue
        if hf.owns_children(m):
            owned.append(name)
        elif hf.candidates(m) or hf.not_a_norm(m) or type(m) in TWINS:
            left.append(type(m).__name__)
    return left


def test_model_every_norm_converted(model):
    name, base, converted, report, _ = model
    _, twins, allowed_left = MODELS[name]
    found = {}
    for r in report.converted:
        key = r.twin.rsplit("(", 1)[1].rstrip(")") if "(" in r.twin else r.twin.rsplit(".", 1)[1]
        found[key] = found.get(key, 0) + 1
    assert found == twins, str(report)
    assert {r.type.rsplit(".", 1)[1] for r in report.left} == allowed_left, str(report)
    assert set(_unconverted(converted)) == allowed_left
    assert list(converted.state_dict()) == list(base.state_dict())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_model_fp32_outputs_and_grads(model, training):
    _, base, converted, _, args = model
    base, converted = copy.deepcopy(base).train(training), copy.deepcopy(converted).train(training)
    expected, actual = run(base, args), run(converted, args)
    assert len(actual) == len(expected) > 0
    for a, e in zip(actual, expected):
        assert_close(a, e, **FP32)
    assert_grads_close(backward(converted, args), backward(base, args))
