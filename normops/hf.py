"""The third-party norms ``normops.convert`` reaches: Hugging Face transformers' RMSNorm family, T5LayerNorm,
ConvNextLayerNorm and the gated RMSNorms (Mamba2RMSNormGated, Qwen3NextRMSNormGated); diffusers' RMSNorm,
FP32LayerNorm and adaLN modules (AdaLayerNormZero, AdaLayerNormZeroSingle, AdaLayerNormContinuous,
AdaLayerNorm, AdaGroupNorm).

transformers copies a norm into every model that uses it (LlamaRMSNorm has some 140 copies named
``<Model>RMSNorm``), so a class is matched by its name, never imported: this module needs no
transformers. A known name (``KNOWN``, or a base class of that name whose forward the class keeps)
gives its convention; any other ``*RMSNorm`` / ``*RMSNormGated`` class gets the conventions that
fit its attributes, and the probe picks among them.

Each convention is a forward that calls ``normops.functional`` the way the module computes (see the
row-norm variants: ``casting``, ``offset``, ``out_dtype``). Before a module is swapped, ``probe`` runs
its own forward and the convention's on a copy of it with a random weight (at init Gemma's weights
are zeros and Llama's ones, on which the two conventions agree: a random weight tells them apart
whatever is loaded later) in the module's dtype and in bfloat16 (a model converted in fp32 and cast
afterwards: fp32 does not tell the roundings apart), and keeps the module, with the reason, when the
outputs differ beyond ``agree``. Of the conventions the probe accepts, the one with the fewest
elements not bit-equal wins (the 1-ulp rule admits a double rounding in place of a single one).

diffusers' classes are known by qualified name (its RMSNorm is named like torch.nn.RMSNorm). Its adaLN
modules have submodules (a Linear, embeddings, the norm): the twin keeps them all, computes the modulation
with them as diffusers does and fuses norm + modulation (``ada_layer_norm`` / ``ada_group_norm``); the probe
runs on a deep copy with random weights, feeds the conditioning in the Linear's dtype and compares every
output of the forward's tuple. AdaLayerNormSingle has no norm inside: it is reported, not converted.

The twin's class is a subclass of the module's own class overriding ``forward`` only, with the same
name: ``isinstance`` and transformers' ``_init_weights`` (which tests ``"RMSNorm" in
module.__class__.__name__``) see the original, and ``repr`` and ``extra_repr`` are its own.
"""
import copy
import dataclasses
import functools
import inspect
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import functional as F
from .core import ulps_apart

__all__ = ["CONVENTIONS", "Convention", "KNOWN", "TORCH_NORMS", "agree", "candidates", "convention_of", "plan",
           "probe", "twin_class"]


# --- the comparison rule -------------------------------------------------------------------------

SHARE = 0.999   # bfloat16 / float16: this share of elements within 1 ulp (a rounding flip is 1 ulp)
FP_TOL = dict(rtol=1e-5, atol=1e-6)  # float32 / float64: HF's float32 statistics, summed in another order


def agree(actual: torch.Tensor, expected: torch.Tensor, share: float = SHARE) -> Tuple[bool, str]:
    """Whether ``actual`` matches ``expected`` to the precision of its dtype, and why not.

    Same shape, dtype and NaN positions. bfloat16/float16: at most 1 ulp apart (``ulps_apart``) on at
    least ``share`` of the elements; float32/float64: close
    (``FP_TOL``) everywhere: HF computes fp64 input in float32 too."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False, f"got {actual.dtype} {list(actual.shape)}, expected {expected.dtype} {list(expected.shape)}"
    a, e = actual.detach(), expected.detach()
    if not torch.equal(a.isnan(), e.isnan()):
        return False, "NaN at other positions"
    n = max(a.numel(), 1)
    if a.dtype in (torch.float16, torch.bfloat16):
        bad = int((ulps_apart(a, e) > 1).sum())
        ok = bad <= (1.0 - share) * n
        return ok, "" if ok else f"{bad} of {n} elements ({bad / n:.1%}) more than 1 ulp apart in {a.dtype}"
    bad = int((~torch.isclose(a, e, equal_nan=True, **FP_TOL)).sum())
    return bad == 0, "" if bad == 0 else f"{bad} of {n} elements not close (rtol {FP_TOL['rtol']})"


# --- the conventions ------------------------------------------------------------------------------

def _eps(m):
    """The module's epsilon: transformers names it ``variance_epsilon`` or ``eps`` (None: neither)."""
    return getattr(m, "variance_epsilon", getattr(m, "eps", None))


def _llama(self, hidden_states):
    """LlamaRMSNorm and its copies: ``weight * x_hat.to(input_dtype)``."""
    w = self.weight
    return F.rms_norm(hidden_states, w.shape, w, _eps(self), casting="llama",
                      out_dtype=torch.promote_types(w.dtype, hidden_states.dtype))


def _gemma(self, hidden_states):
    """GemmaRMSNorm and its copies: fp32 throughout, ``* (1 + weight)``, then the input's dtype."""
    w = self.weight
    return F.rms_norm(hidden_states, w.shape, w, _eps(self), offset=1.0, casting="fp32",
                      out_dtype=hidden_states.dtype)


def _fp32(self, hidden_states):
    """OLMo's ``(weight * x_hat).to(input_dtype)``, Gemma3n's and Moshi's ``x_hat * weight.float()``."""
    w = self.weight
    return F.rms_norm(hidden_states, w.shape, w, _eps(self), casting="fp32", out_dtype=hidden_states.dtype)


def _t5(self, hidden_states):
    """T5LayerNorm: x_hat rounded to a float16/bfloat16 weight's dtype, else kept in fp32 or wider."""
    w = self.weight
    half = w.dtype in (torch.float16, torch.bfloat16)
    out = w.dtype if half else torch.promote_types(w.dtype, torch.promote_types(hidden_states.dtype, torch.float32))
    return F.rms_norm(hidden_states, w.shape, w, _eps(self), casting="t5", out_dtype=out)


def _gate_first(self, hidden_states, gate=None):
    """Mamba2RMSNormGated: ``x * silu(gate)``, statistics per group of ``group_size``, llama rounding."""
    w = self.weight
    return F.gated_rms_norm(hidden_states, gate, w.shape, w, _eps(self), norm_before_gate=False,
                            group_size=self.group_size, casting="llama",
                            out_dtype=torch.promote_types(w.dtype, hidden_states.dtype))


def _norm_first(self, hidden_states, gate=None):
    """Qwen3NextRMSNormGated: llama RMSNorm, times ``silu(gate)`` in fp32, then the input's dtype."""
    w = self.weight
    return F.gated_rms_norm(hidden_states, gate, w.shape, w, _eps(self), norm_before_gate=True, casting="llama",
                            out_dtype=hidden_states.dtype)


def _convnext(self, features):
    """ConvNextLayerNorm: LayerNorm over the last dim (channels_last) or over dim 1 (channels_first,
    laid out as the original's, see _permuted_layout)."""
    if self.data_format == "channels_first":
        return F.layer_norm_channels_first(_permuted_layout(features), self.weight, self.bias, self.eps)
    return F.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps)


def _layer_norm_2d(self, x):
    """timm's LayerNorm2d (an nn.LayerNorm over the channels whose forward permutes them last and back)."""
    return F.layer_norm_channels_first(_permuted_layout(x), self.weight, self.bias, self.eps)


def _permuted_layout(x):
    """x in the layout the originals' permute composition leaves their output in: channels_last (an NCHW
    x is copied once, as their layer_norm copies the permuted view; a channels_last one is read in place).
    The layers after the norm then run in the layout they ran in before the conversion: with NCHW output,
    a converted ConvNext ran its depthwise convolutions and block permutes NCHW, 1.6x slower on the CPU."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _layer_norm_2d_check(m):
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return "not a LayerNorm over one dimension"
    return None


def _diffusers_rms(self, hidden_states):
    """diffusers' RMSNorm: T5's rounding with a weight (then ``+ bias``, rounded), without one
    ``x_hat`` in fp32 and back to the input's dtype."""
    w, b = self.weight, self.bias
    if w is None:
        return F.rms_norm(hidden_states, self.dim, None, self.eps, out_dtype=hidden_states.dtype)
    y = _t5(self, hidden_states)
    return y if b is None else y + b


def _fp32_layer_norm(self, inputs):
    """diffusers' FP32LayerNorm: layer norm in fp32 (weight and bias read in fp32), one rounding to the input's dtype."""
    return F.layer_norm(inputs, self.normalized_shape, self.weight, self.bias, self.eps, out_dtype=inputs.dtype)


# diffusers' adaLN modules keep their Linear (and embeddings); the twin computes the modulation with them as
# diffusers does, then norm + modulation in one call of normops.functional. casting="torch" rounds each step
# as diffusers' composition ``norm(x) * (1 + scale) + shift`` does; where the modulation's dtype is not x's
# (an fp32 Linear on bf16 activations, autocast: torch promotes the product) the twin runs that composition.

def _modulate(norm, x, scale, shift):
    """``norm(x) * (1 + scale[:, None]) + shift[:, None]`` for scale, shift (B, D), x (B, *, D), norm a LayerNorm
    or diffusers' RMSNorm (no bias; ada_rms_norm's casting "t5" is its rounding). A weight in another dtype
    than x makes diffusers' RMSNorm round to the weight's dtype (half) or return fp32: the composition then."""
    rms = not isinstance(norm, nn.LayerNorm)
    mixed = rms and norm.weight is not None and norm.weight.dtype != x.dtype
    if scale.dtype != x.dtype or shift.dtype != x.dtype or x.dim() < 2 or scale.dim() != 2 or mixed:
        return norm(x) * (1 + scale[:, None]) + shift[:, None]
    if rms:
        return F.ada_rms_norm(x, scale, shift, norm.eps, norm.weight, casting="t5")
    return F.ada_layer_norm(x, scale, shift, norm.eps, norm.weight, norm.bias, casting="torch")


def _ada_zero(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """AdaLayerNormZero (DiT, PixArt's blocks): six modulation chunks, the first two applied here."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
    return _modulate(self.norm, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


def _ada_zero_single(self, x, emb=None):
    """AdaLayerNormZeroSingle (Flux's single blocks): three chunks, the first two applied here."""
    emb = self.linear(self.silu(emb))
    shift_msa, scale_msa, gate_msa = emb.chunk(3, dim=1)
    return _modulate(self.norm, x, scale_msa, shift_msa), gate_msa


def _ada_continuous(self, x, conditioning_embedding):
    """AdaLayerNormContinuous (SD3's and Flux's output norm) with a LayerNorm or (norm_type="rms_norm")
    diffusers' RMSNorm."""
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return _modulate(self.norm, x, scale, shift)


def _ada(self, x, timestep=None, temb=None):
    """AdaLayerNorm: (scale, shift) from one embedding (chunk_dim 0, broadcast over the batch) or
    (shift, scale) per sample (chunk_dim 1, CogVideoX)."""
    if self.emb is not None:
        temb = self.emb(timestep)
    temb = self.linear(self.silu(temb))
    if self.chunk_dim == 1:
        shift, scale = temb.chunk(2, dim=1)
    else:
        scale, shift = temb.chunk(2, dim=0)
        if scale.dim() != 1 or x.dim() < 2:  # not one (D,) modulation for the whole batch: diffusers' composition
            return self.norm(x) * (1 + scale) + shift
        scale, shift = scale.expand(x.shape[0], -1), shift.expand(x.shape[0], -1)
    return _modulate(self.norm, x, scale, shift)


def _ada_group(self, x, emb):
    """AdaGroupNorm: group norm without affine, times ``1 + scale`` plus shift, per sample and channel.
    Fused; in float16/bfloat16 with casting "torch", which rounds after each step as diffusers does
    (the default "fp32" rounds once: >1 ulp apart on some 7-11% of the elements)."""
    if self.act:
        emb = self.act(emb)
    emb = self.linear(emb)
    emb = emb[:, :, None, None]
    scale, shift = emb.chunk(2, dim=1)
    if scale.dtype != x.dtype or x.dim() != 4:
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift
    casting = "torch" if x.dtype in (torch.float16, torch.bfloat16) else "fp32"
    return F.ada_group_norm(x, self.num_groups, scale, shift, self.eps, casting=casting)


def _rms_weight(m):
    """Why RMSNorm module m does not fit the conventions (a 1-D weight Parameter, a number eps), or None."""
    w = m._parameters.get("weight")
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return "no 1-D weight Parameter (weightless norms are not in the registry)"
    eps = _eps(m)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return "no number eps attribute (variance_epsilon or eps)"
    return None


def _gated_check(m):
    if getattr(m, "activation", "silu") != "silu":
        return f"gate activation {m.activation!r} (normops gates with silu)"
    return _rms_weight(m)


def _group_check(m):
    g = getattr(m, "group_size", None)
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or m.weight.shape[0] % g:
        return f"group_size {g!r} does not divide the weight's {m.weight.shape[0]}"
    return None


def _convnext_check(m):
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return "not a LayerNorm over one dimension"
    if getattr(m, "data_format", None) not in ("channels_last", "channels_first"):
        return f"data_format {getattr(m, 'data_format', None)!r}"
    return None


def _diffusers_rms_check(m):
    eps = _eps(m)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        return "no number eps attribute"
    for name in ("weight", "bias"):
        t = m._parameters.get(name)
        if t is not None and tuple(t.shape) != tuple(m.dim):
            return f"{name} of shape {tuple(t.shape)}, normalized shape {tuple(m.dim)}"
    if m.bias is not None and m.weight is None:
        return "a bias without a weight"
    return None


def _inner_norm_check(m):
    """Why the norm an adaLN module applies (``m.norm``) is not a LayerNorm over the last dim, or None."""
    norm = getattr(m, "norm", None)
    if getattr(norm, "activation", None) is not None:
        return f"its norm fuses an activation ({norm.activation!r})"
    if isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1:
        return None
    if norm is not None and DIFFUSERS_RMS in candidates(norm):  # _modulate: ada_rms_norm's casting "t5"
        why = _diffusers_rms_check(norm) or ("its RMSNorm has a bias" if norm.bias is not None else None)
        return None if why is None else f"its norm is diffusers' RMSNorm: {why}"
    return f"its norm is a {type(norm).__name__}, not a LayerNorm over one dimension"


def _ada_group_check(m):
    g, c = getattr(m, "num_groups", None), m.linear.out_features // 2
    if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or c % g:
        return f"num_groups {g!r} does not divide its {c} channels"
    return None


@dataclasses.dataclass(frozen=True)
class Convention:
    name: str
    forward: Callable
    check: Callable      # module -> why it does not fit, or None
    gated: bool = False  # forward(hidden_states, gate)
    # forward(module, rand, x_dtype, w_dtype) -> the probe's argument tuples; None: the row norms' (x,) or (x, gate)
    inputs: Optional[Callable] = None
    submodules: bool = False  # the module has submodules (a Linear...): the twin keeps them, the probe copies them


LLAMA = Convention("llama", _llama, _rms_weight)
GEMMA = Convention("gemma", _gemma, _rms_weight)
FP32 = Convention("fp32", _fp32, _rms_weight)
T5 = Convention("t5", _t5, _rms_weight)
GATE_FIRST = Convention("mamba2-gated", _gate_first,
                        lambda m: _gated_check(m) or _group_check(m), gated=True)
NORM_FIRST = Convention("qwen3next-gated", _norm_first, _gated_check, gated=True)
CONVNEXT = Convention("convnext", _convnext, _convnext_check)
LAYERNORM2D = Convention("layernorm2d", _layer_norm_2d, _layer_norm_2d_check)
DIFFUSERS_RMS = Convention("diffusers", _diffusers_rms, _diffusers_rms_check)
FP32_LAYER_NORM = Convention("fp32-layer-norm", _fp32_layer_norm, lambda m: None)


def _batch(m, rand, x_dtype, w_dtype):
    """(x (B, T, D) in x_dtype, a conditioning (B, E) in the Linear's dtype w_dtype) for an adaLN module."""
    x = rand(2, PROBE_ROWS // 2, m.norm.normalized_shape[0] if hasattr(m.norm, "normalized_shape") else m.norm.dim[0],
             dtype=x_dtype)
    return x, rand(2, m.linear.in_features, dtype=w_dtype)


def _zero_inputs(m, rand, x_dtype, w_dtype):
    x, emb = _batch(m, rand, x_dtype, w_dtype)
    if m.emb is None:
        return [(x, None, None, None, emb)]
    device = x.device  # timesteps (B,) and class labels (B,) for the embedding (DiT)
    labels = torch.arange(2, device=device) % m.emb.class_embedder.num_classes
    return [(x, torch.tensor([3.0, 701.0], device=device), labels, w_dtype)]


def _ada_inputs(m, rand, x_dtype, w_dtype):
    x, emb = _batch(m, rand, x_dtype, w_dtype)
    one = m.chunk_dim != 1  # chunk_dim 0: one embedding for the whole batch
    if m.emb is not None:
        return [(x, torch.tensor(5 if one else [5, 9], device=x.device) % m.emb.num_embeddings, None)]
    return [(x, None, emb[0] if one else emb)]


def _group_inputs(m, rand, x_dtype, w_dtype):
    return [(rand(2, m.linear.out_features // 2, 4, 4, dtype=x_dtype), rand(2, m.linear.in_features, dtype=w_dtype))]


ADA_ZERO = Convention("ada-zero", _ada_zero, _inner_norm_check, inputs=_zero_inputs, submodules=True)
ADA_ZERO_SINGLE = Convention("ada-zero-single", _ada_zero_single, _inner_norm_check,
                             inputs=lambda m, *a: [_batch(m, *a)], submodules=True)
ADA_CONTINUOUS = Convention("ada-continuous", _ada_continuous, _inner_norm_check,
                            inputs=lambda m, *a: [_batch(m, *a)], submodules=True)
ADA = Convention("ada", _ada, _inner_norm_check, inputs=_ada_inputs, submodules=True)
ADA_GROUP = Convention("ada-group", _ada_group, _ada_group_check, inputs=_group_inputs, submodules=True)
CONVENTIONS = (LLAMA, GEMMA, FP32, T5, GATE_FIRST, NORM_FIRST, CONVNEXT, LAYERNORM2D, DIFFUSERS_RMS, FP32_LAYER_NORM,
               ADA_ZERO, ADA_ZERO_SINGLE, ADA_CONTINUOUS, ADA, ADA_GROUP)

# The classes whose convention is known (VARIANTS.md: transformers 5.25), and their subclasses that keep their forward.
KNOWN = {
    "LlamaRMSNorm": LLAMA, "Qwen2RMSNorm": LLAMA, "Qwen3RMSNorm": LLAMA, "MistralRMSNorm": LLAMA,
    "Mamba2RMSNorm": LLAMA,
    "GemmaRMSNorm": GEMMA, "Gemma2RMSNorm": GEMMA, "Gemma3RMSNorm": GEMMA, "Qwen3NextRMSNorm": GEMMA,
    "T5LayerNorm": T5,
    "Mamba2RMSNormGated": GATE_FIRST, "Qwen3NextRMSNormGated": NORM_FIRST,
    "ConvNextLayerNorm": CONVNEXT,
    "LayerNorm2d": LAYERNORM2D,  # timm's (and its copies'): channels-first, the forward permutes
    # diffusers 0.42: by qualified name (its RMSNorm is named like torch.nn.RMSNorm)
    "diffusers.models.normalization.RMSNorm": DIFFUSERS_RMS,
    "diffusers.models.normalization.FP32LayerNorm": FP32_LAYER_NORM,
    "diffusers.models.normalization.AdaLayerNormZero": ADA_ZERO,
    "diffusers.models.normalization.AdaLayerNormZeroSingle": ADA_ZERO_SINGLE,
    "diffusers.models.normalization.AdaLayerNormContinuous": ADA_CONTINUOUS,
    "diffusers.models.normalization.AdaLayerNorm": ADA,
    "diffusers.models.normalization.AdaGroupNorm": ADA_GROUP,
}
# diffusers' modules that look like norms but have none inside, with the reason convert leaves them
NOT_NORMS = {
    "diffusers.models.normalization.AdaLayerNormSingle":
        "no norm inside (it only makes the modulation; the block's own LayerNorm is converted)",
}


TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)  # and their subclasses


def candidates(module) -> Tuple[Convention, ...]:
    """The conventions module may follow, most likely first; () when it is not a norm of the registry."""
    cls = type(module)
    if getattr(cls, "normops_convention", None) is not None or cls.__module__.split(".")[0] == "normops":
        return ()  # a twin already, or normops' own module
    for base in cls.__mro__:
        known = KNOWN.get(base.__name__) or KNOWN.get(f"{base.__module__}.{base.__qualname__}")
        if known is not None and cls.forward is base.forward:
            return (known,)
    if isinstance(module, TORCH_NORMS):  # a subclass of a torch.nn norm: convert leaves it alone
        return ()
    name = cls.__name__
    if name.endswith("RMSNormGated"):
        return (GATE_FIRST, NORM_FIRST) if hasattr(module, "group_size") else (NORM_FIRST,)
    if name.endswith("RMSNorm"):
        return (LLAMA, GEMMA, FP32, T5)
    return ()


# --- the twin classes -----------------------------------------------------------------------------

def _rebuild(cls, name):
    """Unpickling a twin: its class, made again from the original class and the convention's name."""
    twin_cls = twin_class(cls, next(c for c in CONVENTIONS if c.name == name))
    return twin_cls.__new__(twin_cls)


def _reduce_ex(self, protocol):
    # the twin class is made at run time and cannot be found by name: rebuild it from its parts
    return _rebuild, (type(self).__bases__[0], type(self).normops_convention), self.__getstate__()


def _forward(cls, convention):
    """The convention's forward, taking its arguments as cls's forward names them: a keyword call
    (``norm(hidden_states=x)``, ``norm(x, gate=z)``) is bound to cls's signature first."""
    signature, fn = inspect.signature(cls.forward), convention.forward

    def forward(self, *args, **kwargs):
        if kwargs:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            return fn(*bound.args)
        return fn(self, *args)
    forward.__doc__ = fn.__doc__
    return forward


@functools.lru_cache(maxsize=None)
def twin_class(cls, convention: Convention):
    """The subclass of ``cls`` whose forward is ``convention``'s; one per (class, convention)."""
    return type(cls.__name__, (cls,), {
        "forward": _forward(cls, convention), "normops_convention": convention.name, "__reduce_ex__": _reduce_ex,
        "__module__": __name__, "__qualname__": cls.__qualname__,
        "__doc__": f"{cls.__module__}.{cls.__qualname__} computed by normops.functional ({convention.name} convention)"})


def convention_of(module) -> Optional[str]:
    """The convention of a normops twin, None for any other module."""
    return getattr(type(module), "normops_convention", None)


# --- the probe ------------------------------------------------------------------------------------

PROBE_ROWS = 16  # rows of the probe input: with a hidden size of 32 or more, 512+ elements for the 99.9% rule


def _normalized_shape(module):
    """The shape a row norm normalizes: its weight's, else ``normalized_shape`` (torch) or ``dim`` (diffusers)."""
    w = module._parameters.get("weight")
    return tuple(w.shape) if w is not None else tuple(getattr(module, "normalized_shape", getattr(module, "dim", ())))


def _probe_inputs(module, convention, x_dtype, gen, w_dtype):
    """(args of forward) in x_dtype on module's device, with varied magnitudes and both signs; an
    adaLN module's conditioning in w_dtype (its Linear's)."""
    device = next(iter(module.parameters()), torch.empty(0)).device

    def rand(*shape, dtype=x_dtype):
        return (0.5 + 2.0 * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    if convention.inputs is not None:
        return convention.inputs(module, rand, x_dtype, w_dtype)
    shape = _normalized_shape(module)
    n = shape[0]
    if len(shape) > 1:
        return [(rand(PROBE_ROWS, *shape),)]
    if convention is CONVNEXT or convention is LAYERNORM2D:
        channels_first = convention is LAYERNORM2D or module.data_format == "channels_first"
        x = rand(2, n, 3, 3) if channels_first else rand(2, 3, 3, n)
        return [(x,)]
    x = rand(PROBE_ROWS, n)
    if not convention.gated:
        return [(x,)]
    calls = [(x, rand(PROBE_ROWS, n))]
    gate = inspect.signature(type(module).forward).parameters.get("gate")
    if gate is not None and gate.default is None:
        calls.append((x,))
    return calls


def _probe_copy(module, w_dtype, gen):
    """A shallow copy of module whose floating parameters are random (around 1, both signs rare) in w_dtype.
    A module with submodules (adaLN: a Linear, embeddings) is copied deeply, in eval mode (an embedding's
    label dropout would draw differently in the two forwards), matrices random at the scale of 1/sqrt(fan-in)."""
    if module._modules:
        p = copy.deepcopy(module).to(w_dtype).eval()
        for t in p.parameters():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=gen)
                t.copy_(r * t.shape[-1] ** -0.5 if t.dim() > 1 else 1.0 + 0.5 * r)
        return p
    p = copy.copy(module)
    p._parameters = {}
    for name, t in module._parameters.items():
        if t is not None and t.is_floating_point():
            r = 1.0 + 0.5 * torch.randn(t.shape, generator=gen)
            t = nn.Parameter(r.to(device=t.device, dtype=w_dtype), requires_grad=False)
        p._parameters[name] = t
    return p


def _arguments(fn):
    """The parameters of a forward after self."""
    return list(inspect.signature(fn).parameters.values())[1:]


def _signature_check(module, convention):
    """Why module's forward takes other arguments than the convention's (a twin would then fail on
    the model's own calls), or None."""
    own, conv = _arguments(type(module).forward), _arguments(convention.forward)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    if len(own) != len(conv) or any(p.kind in variadic for p in own):
        return (f"its forward takes ({', '.join(map(str, own))}), the {convention.name} convention's "
                f"({', '.join(map(str, conv))})")
    return None


def probe(module, convention: Convention) -> Tuple[bool, int, str]:
    """(accepted, elements not bit-equal, why not): module's own forward against ``convention``'s on a
    copy with random weights, in the module's dtype and in bfloat16 (weights bfloat16, or float32)."""
    why = convention.check(module) or _signature_check(module, convention)
    if why:
        return False, 0, why
    w = next(iter(module.parameters()), None)
    own = w.dtype if w is not None else torch.float32
    configs = list(dict.fromkeys([(own, own), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]))
    gen = torch.Generator().manual_seed(0)
    differ = 0
    with torch.no_grad():
        for w_dtype, x_dtype in configs:
            p = _probe_copy(module, w_dtype, gen)
            for args in _probe_inputs(module, convention, x_dtype, gen, w_dtype):
                try:
                    expected = type(module).forward(p, *args)
                except Exception as e:  # noqa: BLE001 (a forward that needs more than the probe gives)
                    if convention.submodules and w_dtype != x_dtype:
                        continue  # bf16 input on an fp32 Linear: the module itself cannot run it, nothing to match
                    return False, 0, f"probe: its own forward failed on {x_dtype} input: {type(e).__name__}: {e}"
                try:
                    actual = convention.forward(p, *args)
                except Exception as e:  # noqa: BLE001 (a normops.functional without the variant: keep the module)
                    return False, 0, f"probe: normops.functional failed: {type(e).__name__}: {e}"
                # a tuple (adaLN-Zero: the modulated x, then the gates and the MLP's modulation): each output
                pairs = list(zip(actual, expected)) if isinstance(expected, tuple) else [(actual, expected)]
                if isinstance(expected, tuple) and (not isinstance(actual, tuple) or len(actual) != len(expected)):
                    return False, 0, "probe: the convention returns another number of outputs"
                for i, (a, e) in enumerate(pairs):
                    ok, why = agree(a, e)
                    if not ok:
                        what = f"weight {w_dtype}, input {x_dtype}" + (
                            ", no gate" if len(args) == 1 and convention.gated else "") + (
                            f", output {i}" if len(pairs) > 1 else "")
                        return False, 0, f"probe ({what}): {why}"
                    differ += int((a != e).sum())
    return True, differ, ""


def plan(module, memo=None) -> Tuple[Optional[type], str]:
    """(twin class, convention name) for a registry norm the probe accepts, (None, why it stays) for one
    it does not, (None, "") for a module outside the registry. ``memo`` (a dict) keeps the decisions of
    one conversion, per class and what the decision depends on."""
    found = candidates(module)
    if not found:
        return None, not_a_norm(module) or ""
    if "forward" in module.__dict__:
        return None, "its forward is replaced on the instance (accelerate hooks?), so a twin's would not run"
    if module._modules and not all(c.submodules for c in found):
        return None, "it has submodules"
    w = next(iter(module.parameters()), None)
    if w is not None and w.is_meta:
        return None, "on the meta device: the probe needs values (convert after loading the weights)"
    key = _structure(module)
    if memo is not None and key in memo:
        return memo[key]
    accepted, reasons = [], {}
    for convention in found:
        ok, differ, why = probe(module, convention)
        if ok:
            accepted.append((differ, len(accepted), convention))
        else:
            reasons[convention.name] = why
    if accepted:
        convention = min(accepted, key=lambda a: a[:2])[2]
        out = twin_class(type(module), convention), convention.name
    elif len(set(reasons.values())) == 1:  # one structural reason, whatever the convention
        out = None, next(iter(reasons.values()))
    else:
        out = None, "; ".join(f"{name}: {why}" for name, why in reasons.items())
    if memo is not None:
        memo[key] = out
    return out


def not_a_norm(module) -> str:
    """Why convert leaves a module that looks like a norm of the registry but has none inside, or ""."""
    cls = type(module)
    return NOT_NORMS.get(f"{cls.__module__}.{cls.__qualname__}", "")


def owns_children(module) -> bool:
    """Whether module is a twin that computes its submodules' norm itself (adaLN): convert leaves its
    children as they are (the twin reads their parameters; its forward does not call them)."""
    name = convention_of(module)
    return name is not None and next(c for c in CONVENTIONS if c.name == name).submodules


def _structure(module):
    """What a probe's decision depends on: the classes, parameters (shape, dtype, device) and settings
    (numbers, strings: eps, group_size, chunk_dim...) of module and its submodules."""
    out = []
    for name, m in module.named_modules():
        params = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in m._parameters.items() if t is not None)
        settings = tuple(sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                                and isinstance(v, (bool, int, float, str, type(None)))))
        out.append((name, type(m), params, settings))
    return tuple(out)


def shape_text(module) -> str:
    """The normalized size of a registry norm, as inspect shows it (an adaLN module: its norm's, and the
    conditioning's size)."""
    if getattr(module, "linear", None) is not None and isinstance(module.linear, nn.Linear):
        if hasattr(module, "num_groups"):  # AdaGroupNorm
            c = module.linear.out_features // 2
            return f"G={module.num_groups}, C={c} ({c // module.num_groups} per group), emb={module.linear.in_features}"
        norm = getattr(module, "norm", None)
        if norm is not None:
            return f"shape={_normalized_shape(norm)}, emb={module.linear.in_features}"
    return f"shape={_normalized_shape(module)}"

