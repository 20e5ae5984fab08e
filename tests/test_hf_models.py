"""``normops.convert`` on real Hugging Face transformers models: Llama, Gemma, Qwen3 (QK-norm), T5,
Mamba2 (gated norm), Qwen3-Next (gated norm, Gemma-style norms) and ConvNext, each built from a config
at a tiny size with random init, nothing downloaded. Each converted model against an unconverted
deepcopy: the norms counted by convention, outputs and parameter gradients in fp32, outputs in
bfloat16 (the 1-ulp rule of ``normops.hf.agree``), one SGD step, greedy ``generate()`` with the KV
cache, ``state_dict`` keys and the Parameter objects. Then the registry's probe: it tells the
conventions apart on weights where they agree (Gemma's zeros and Llama's ones at init), picks the
convention of transformers' copies whose name it does not know, and leaves the others with the reason.

Norm weights are perturbed (``perturbed``) so that a wrong convention (offset, rounding) changes the
outputs. Sizes are a hidden size of 32 and two layers: the whole file runs in seconds on two cores.
"""
import copy
import importlib
import pickle
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

import normops
from normops import hf
from normops.hf import agree

transformers = pytest.importorskip("transformers")

VOCAB = 64
DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=2)
# fp32: the statistics summed in another order than torch's, then two layers (forward and backward) of fp32 rounding
FP32 = dict(rtol=1e-5, atol=1e-6)
# gradients: sums over tokens with cancellation, so an element's error is on the scale of the largest
# element of its tensor, not its own: atol relative to the tensor's max (GRAD_ATOL * max |grad|)
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def _qwen3_next():
    config = transformers.Qwen3NextConfig(
        **DECODER, head_dim=8, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, layer_types=["linear_attention", "full_attention"])
    return transformers.Qwen3NextForCausalLM(config)


# name -> (builder, the conventions normops.convert should find, with their counts)
MODELS = {
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER)),
              {"llama": 5}),  # 2 per layer + the final norm
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**DECODER, head_dim=8)),
              {"gemma": 5}),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DECODER, head_dim=8)),
              {"llama": 9}),  # + q_norm and k_norm per layer
    "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
               vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
           {"t5": 12}),  # encoder 2 per layer + final, decoder 3 per layer + final
    "mamba2": (lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
                   vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
                   num_heads=8, n_groups=2, chunk_size=8, pad_token_id=0, eos_token_id=1, bos_token_id=2)),
               {"llama": 3, "mamba2-gated": 2}),  # the gated norm: statistics per group of 64 // n_groups
    "qwen3next": (_qwen3_next, {"gemma": 7, "qwen3next-gated": 1}),  # one linear-attention layer: its gated norm
}


def perturbed(model, seed=0):
    """model with every 1-D norm weight moved off its init (Gemma zeros, Llama ones), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module", params=sorted(MODELS))
def base(request):
    torch.manual_seed(0)
    return request.param, perturbed(MODELS[request.param][0]().eval())


def tokens(seed=1, n=7):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, n), generator=gen)


def forward(name, model, ids):
    extra = {"decoder_input_ids": ids[:, :5]} if name == "t5" else {}
    return model(ids, **extra).logits


def pair(base_model, dtype=None):
    """(converted deepcopy, unconverted deepcopy), cast to dtype after the conversion."""
    model, ref = normops.convert(copy.deepcopy(base_model)), copy.deepcopy(base_model)
    return (model.to(dtype), ref.to(dtype)) if dtype else (model, ref)


# --- the helper rule ----------------------------------------------------------------------------

def test_agree_counts_ulps_and_the_share():
    e = torch.linspace(-4, 4, 1000, dtype=torch.bfloat16)
    up = torch.nextafter(e, torch.full_like(e, 100.0))
    assert agree(up, e)[0]  # 1 ulp everywhere
    two = e.clone()
    two[100:102] = torch.nextafter(up[100:102], torch.full_like(e[:2], 100.0))  # 2 ulps on 0.2%
    ok, why = agree(two, e)
    assert not ok and "2 of 1000" in why and "more than 1 ulp" in why
    assert agree(two, e, share=0.99)[0]
    assert not agree(e.float(), e)[0]  # the dtype counts
    f = torch.randn(100)
    assert agree(f * (1 + 1e-7), f)[0] and not agree(f * (1 + 1e-3), f)[0]


# --- converted models against the unconverted --------------------------------------------------

def test_convert_finds_every_norm(base):
    name, model = base
    model = copy.deepcopy(model)
    originals = {n: (type(m), m) for n, m in model.named_modules()}
    sd_keys = list(model.state_dict())
    params = dict(model.named_parameters())
    _, report = normops.convert(model, report=True)
    assert report.left == [], str(report)
    found = Counter(r.twin.rsplit("(", 1)[1].rstrip(")") for r in report.converted)
    assert found == Counter(MODELS[name][1]), str(report)
    for r in report.converted:
        twin = model.get_submodule(r.path)
        cls, original = originals[r.path]
        assert isinstance(twin, cls) and type(twin).__name__ == cls.__name__  # HF's _init_weights tests both
        assert hf.convention_of(twin) and hf.convention_of(original) is None
        assert twin.weight is original.weight
    assert list(model.state_dict()) == sd_keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert f"{len(report.converted)} converted, 0 left" in str(report)


def test_fp32_outputs_and_gradients_match(base):
    name, base_model = base
    model, ref = pair(base_model)
    ids = tokens()
    out, want = forward(name, model, ids), forward(name, ref, ids)
    assert_close(out, want, **FP32)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    grads = 0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is not None:
            atol = GRAD_ATOL * float(q.grad.abs().max())
            assert_close(p.grad, q.grad, rtol=GRAD_RTOL, atol=atol, msg=lambda m, n=n: f"{n}.grad: {m}")
            grads += "norm" in n.lower()
    assert grads >= sum(MODELS[name][1].values())


def test_bf16_outputs_within_one_ulp(base):
    """Converted in fp32, then cast: the probe checked each norm's convention in bfloat16 too."""
    name, base_model = base
    model, ref = pair(base_model, torch.bfloat16)
    ids = tokens(2)
    out, want = forward(name, model, ids), forward(name, ref, ids)
    assert out.dtype == want.dtype  # Mamba2's logits are upcast to fp32: exactly, so the bf16 rule applies
    ok, why = agree(out.bfloat16(), want.bfloat16())
    assert ok, why


def test_sgd_step_gives_the_same_loss(base):
    name, base_model = base
    model, ref = pair(base_model)
    ids = tokens(3)
    losses = []
    for m in (model, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(2):  # the second loss sees the step's updated norm weights
            opt.zero_grad()
            loss = forward(name, m, ids).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    assert_close(losses[:2], losses[2:], **FP32)
    assert not torch.equal(losses[0], losses[1])  # the step changed something


def test_greedy_generate_gives_the_same_tokens(base):
    name, base_model = base
    model, ref = pair(base_model)
    ids = tokens(4, 5)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    with torch.no_grad():
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(got, want)


# --- identity, state, HF's own code on the twins ------------------------------------------------

def _llama():
    torch.manual_seed(0)
    return perturbed(MODELS["llama"][0]().eval())


def test_hf_init_weights_reaches_the_twins():
    """transformers' _init_weights picks norms by class name: Gemma's twins still start at zeros."""
    model = normops.convert(perturbed(MODELS["gemma"][0]()))
    norms = [m for m in model.modules() if hf.convention_of(m) == "gemma"]
    for m in norms:
        model._init_weights(m)
    assert norms and all(torch.equal(m.weight, torch.zeros_like(m.weight)) for m in norms)


def test_shared_norm_one_twin_hooks_pickle_idempotent():
    model = _llama()
    layer = model.model.layers[0]
    layer.extra_norm = layer.input_layernorm  # one module at two places
    calls = []
    hook = layer.input_layernorm.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    _, report = normops.convert(model, report=True)
    assert layer.extra_norm is layer.input_layernorm and hf.convention_of(layer.extra_norm) == "llama"
    assert len(report.converted) == 6  # one row per place
    ids = tokens()
    want = forward("llama", model, ids)
    assert calls and all(hf.convention_of(c.__new__(c)) for c in calls)
    hook.remove()  # a lambda does not pickle
    clone = pickle.loads(pickle.dumps(model))  # the twin classes are rebuilt from their parts
    assert type(clone.model.norm) is type(model.model.norm)
    assert_close(forward("llama", clone, ids), want, rtol=0, atol=0)
    assert_close(forward("llama", copy.deepcopy(model), ids), want, rtol=0, atol=0)
    modules = dict(model.named_modules())
    _, again = normops.convert(model, report=True)
    assert again.rows == [] and all(m is modules[n] for n, m in model.named_modules())


def test_convnext_channels_first_and_last():
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                             image_size=16)
    torch.manual_seed(0)
    base = perturbed(transformers.ConvNextModel(config).eval())
    for m in base.modules():  # LayerNorm biases too
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.bias, std=0.3)
    model, report = normops.convert(copy.deepcopy(base), report=True)
    found = Counter(r.twin.rsplit("(", 1)[1].rstrip(")") if "(" in r.twin else r.twin for r in report.converted)
    assert found == {"convnext": 4, "normops.nn.LayerNorm": 1} and not report.left, str(report)
    formats = {m.data_format for m in model.modules() if hf.convention_of(m) == "convnext"}
    assert formats == {"channels_first", "channels_last"}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_close(model(x).last_hidden_state, base(x).last_hidden_state, **FP32)


# --- the probe ------------------------------------------------------------------------------------

def hf_class(module, name):
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def test_probe_tells_gemma_from_llama_at_init():
    """At init Gemma's weight is zeros (1 + 0) and Llama's ones: the same output either way. The probe
    perturbs the weight, so the wrong convention is caught whatever weights are loaded later."""
    gemma, llama = hf_class("gemma", "GemmaRMSNorm")(32), hf_class("llama", "LlamaRMSNorm")(32)
    x = torch.randn(4, 32)
    assert torch.equal(gemma(x), llama(x))
    assert hf.probe(gemma, hf.GEMMA)[0] and hf.probe(llama, hf.LLAMA)[0]
    assert not hf.probe(gemma, hf.LLAMA)[0] and not hf.probe(llama, hf.GEMMA)[0]


@pytest.mark.parametrize("module, name, expected", [
    ("phi3", "Phi3RMSNorm", "llama"),             # a copy of LlamaRMSNorm
    ("olmo2", "Olmo2RMSNorm", "fp32"),            # (weight * x_hat).to(input_dtype)
    ("gemma3n", "Gemma3nRMSNorm", "fp32"),        # x_hat * weight.float(), type_as
    ("recurrent_gemma", "RecurrentGemmaRMSNorm", "gemma"),
    ("idefics", "IdeficsRMSNorm", "t5"),          # T5LayerNorm's rounding
    ("zamba2", "Zamba2RMSNormGated", "mamba2-gated"),
    ("qwen3_5", "Qwen3_5RMSNormGated", "qwen3next-gated"),
])
def test_unknown_names_get_the_convention_the_probe_picks(module, name, expected):
    cls = hf_class(module, name)
    m = cls(32, group_size=8) if "group_size" in cls.__init__.__code__.co_varnames else cls(32)
    assert name not in hf.KNOWN
    twin_cls, how = hf.plan(m)
    assert how == expected and twin_cls.__name__ == name and issubclass(twin_cls, cls)


@pytest.mark.parametrize("module, name, reason", [
    ("kimi_linear", "KimiLinearRMSNormGated", "gate activation 'sigmoid'"),
    ("falcon_h1", "FalconH1RMSNormGated", "probe"),  # its weight multiply is fp32: bf16 outputs differ
    ("nanochat", "NanoChatRMSNorm", "no 1-D weight Parameter"),
])
def test_norms_the_registry_cannot_compute_are_left_with_the_reason(module, name, reason):
    m = torch.nn.Sequential(hf_class(module, name)(32) if module != "nanochat" else hf_class(module, name)())
    original = m[0]
    model, report = normops.convert(m, report=True)
    assert model[0] is original and report.converted == []
    assert [r.path for r in report.left] == ["0"] and reason in report.left[0].reason
    assert reason in str(report)


def test_a_user_norm_with_another_convention_is_left():
    class ScaledRMSNorm(torch.nn.Module):  # an RMSNorm by name, times 2: no convention computes it
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return 2 * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), ScaledRMSNorm(32))
    _, report = normops.convert(model, report=True)
    assert type(model[1]) is ScaledRMSNorm
    assert [r.path for r in report.left] == ["1"] and "probe" in report.left[0].reason


def test_inspect_shows_what_convert_would_do():
    model = _llama()
    model.model.layers[0].gated = hf_class("kimi_linear", "KimiLinearRMSNormGated")(32)
    layers = {item.name: item for item in normops.inspect(model).layers}
    assert "would swap it: llama" in layers["model.norm"].backend
    assert "leaves it: gate activation 'sigmoid'" in layers["model.layers.0.gated"].backend
    normops.convert(model)
    layers = {item.name: item for item in normops.inspect(model).layers}
    assert layers["model.norm"].type == "normops.hf.LlamaRMSNorm"
    assert layers["model.norm"].backend == normops.current_backend(torch.device("cpu"))


@pytest.mark.parametrize("name", ["llama", "mamba2", "qwen3next"])
def test_on_the_triton_kernels(name, monkeypatch):
    """The converted models on the Triton kernels (the interpreter without a GPU): fp32 outputs and
    the norm weights' gradients equal the unconverted model's (Llama, and both gated norms)."""
    pytest.importorskip("triton")
    if not normops.backends.triton_interpret() and not torch.cuda.is_available():
        pytest.skip("the triton backend takes CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(0)
    model, ref = pair(perturbed(MODELS[name][0]().eval()))
    ids = tokens()
    from normops.kernels import row_norm as kernels
    launches, real = [], kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, *a, **kw: launches.append(kw) or real(kernel, grid, *a, **kw))
    with normops.backend("triton"):
        out = forward(name, model, ids)
        out.square().mean().backward()
    assert len(launches) >= 2 * sum(MODELS[name][1].values())  # a forward and a backward launch a norm, at least
    assert any(kw.get("HAS_GATE") for kw in launches) == (name != "llama")
    want = forward(name, ref, ids)
    want.square().mean().backward()
    assert_close(out, want, **FP32)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if "norm" in n.lower() and q.grad is not None:
            assert_close(p.grad, q.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(q.grad.abs().max()), msg=n)


# --- channels-first LayerNorm: ConvNext, and a timm-style LayerNorm2d ----------------------------------

def _layer_norms_with_biases(model):
    """model with every LayerNorm's weight and bias moved off init (ones, zeros), in place."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convnext_model_channels_first_outputs_and_gradients_match(train):
    """ConvNextModel: every ConvNextLayerNorm converted (channels_first ones by
    layer_norm_channels_first, no permute), outputs and parameter gradients as the unconverted model's."""
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_stages=3,
                                         image_size=32)
    torch.manual_seed(0)
    base = _layer_norms_with_biases(transformers.ConvNextModel(config)).train(train)
    model, report = normops.convert(copy.deepcopy(base), report=True)
    cls = hf_class("convnext", "ConvNextLayerNorm")
    left = [n for n, m in model.named_modules() if isinstance(m, cls) and hf.convention_of(m) is None]
    assert not left and not report.left, str(report)
    assert any(getattr(m, "data_format", None) == "channels_first" for m in model.modules()
               if hf.convention_of(m) == "convnext")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, want = model(x).last_hidden_state, base(x).last_hidden_state
    assert_close(out, want, **FP32)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    twins = {f"{n}.{k}" for n, m in model.named_modules() if hf.convention_of(m) == "convnext" for k in ("weight", "bias")}
    compared = set()
    for (n, p), (_, q) in zip(model.named_parameters(), base.named_parameters()):
        if q.grad is None:  # the pooler's norm: last_hidden_state does not reach it
            assert p.grad is None, n
            continue
        atol = GRAD_ATOL * float(q.grad.abs().max())
        assert_close(p.grad, q.grad, rtol=GRAD_RTOL, atol=atol, msg=lambda m, n=n: f"{n}.grad: {m}")
        compared.add(n)
    assert twins and twins <= compared  # every converted norm's weight and bias gradient


class LayerNorm2d(torch.nn.LayerNorm):
    """timm.layers.LayerNorm2d as timm writes it (timm is not a dependency)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = torch.nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def test_timm_layer_norm_2d_is_converted():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), LayerNorm2d(8), torch.nn.GELU(), torch.nn.Conv2d(8, 4, 1))
    _layer_norms_with_biases(model)
    converted, report = normops.convert(copy.deepcopy(model), report=True)
    assert hf.convention_of(converted[1]) == "layernorm2d" and not report.left, str(report)
    assert sorted(converted[1].state_dict()) == ["bias", "weight"]
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 9, 9).contiguous(memory_format=fmt)
        assert_close(converted(x), model(x), **FP32)
