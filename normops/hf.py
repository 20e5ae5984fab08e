"""The third-party norms ``normops.convert`` reaches: Hugging Face transformers' RMSNorm family, T5LayerNorm,
ConvNextLayerNorm and the gated RMSNorms (Mamba2RMSNormGated, Qwen3NextRMSNormGated).

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
    read in place: no permuted copies)."""
    if self.data_format == "channels_first":
        return F.layer_norm_channels_first(features, self.weight, self.bias, self.eps)
    return F.layer_norm(features, self.normalized_shape, self.weight, self.bias, self.eps)


def _layer_norm_2d(self, x):
    """timm's LayerNorm2d (an nn.LayerNorm over the channels whose forward permutes them last and back)."""
    return F.layer_norm_channels_first(x, self.weight, self.bias, self.eps)


def _layer_norm_2d_check(m):
    if not isinstance(m, nn.LayerNorm) or len(m.normalized_shape) != 1:
        return "not a LayerNorm over one dimension"
    return None


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


@dataclasses.dataclass(frozen=True)
class Convention:
    name: str
    forward: Callable
    check: Callable      # module -> why it does not fit, or None
    gated: bool = False  # forward(hidden_states, gate)


LLAMA = Convention("llama", _llama, _rms_weight)
GEMMA = Convention("gemma", _gemma, _rms_weight)
FP32 = Convention("fp32", _fp32, _rms_weight)
T5 = Convention("t5", _t5, _rms_weight)
GATE_FIRST = Convention("mamba2-gated", _gate_first,
                        lambda m: _gated_check(m) or _group_check(m), gated=True)
NORM_FIRST = Convention("qwen3next-gated", _norm_first, _gated_check, gated=True)
CONVNEXT = Convention("convnext", _convnext, _convnext_check)
LAYERNORM2D = Convention("layernorm2d", _layer_norm_2d, _layer_norm_2d_check)
CONVENTIONS = (LLAMA, GEMMA, FP32, T5, GATE_FIRST, NORM_FIRST, CONVNEXT, LAYERNORM2D)

# The classes whose convention is known (VARIANTS.md: transformers 5.25), and their subclasses that keep their forward.
KNOWN = {
    "LlamaRMSNorm": LLAMA, "Qwen2RMSNorm": LLAMA, "Qwen3RMSNorm": LLAMA, "MistralRMSNorm": LLAMA,
    "Mamba2RMSNorm": LLAMA,
    "GemmaRMSNorm": GEMMA, "Gemma2RMSNorm": GEMMA, "Gemma3RMSNorm": GEMMA, "Qwen3NextRMSNorm": GEMMA,
    "T5LayerNorm": T5,
    "Mamba2RMSNormGated": GATE_FIRST, "Qwen3NextRMSNormGated": NORM_FIRST,
    "ConvNextLayerNorm": CONVNEXT,
    "LayerNorm2d": LAYERNORM2D,  # timm's (and its copies'): channels-first, the forward permutes
}


TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)  # and their subclasses


def candidates(module) -> Tuple[Convention, ...]:
    """The conventions module may follow, most likely first; () when it is not a norm of the registry."""
    cls = type(module)
    if getattr(cls, "normops_convention", None) is not None or cls.__module__.split(".")[0] == "normops":
        return ()  # a twin already, or normops' own module
    for base in cls.__mro__:
        if base.__name__ in KNOWN and cls.forward is base.forward:
            return (KNOWN[base.__name__],)
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


def _probe_inputs(module, convention, x_dtype, gen):
    """(args of forward) in x_dtype on module's device, with varied magnitudes and both signs."""
    n = module.weight.shape[0] if module._parameters.get("weight") is not None else module.normalized_shape[0]
    device = next(iter(module.parameters()), torch.empty(0)).device

    def rand(*shape):
        return (0.5 + 2.0 * torch.randn(shape, generator=gen)).to(device=device, dtype=x_dtype)
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
    """A shallow copy of module whose floating parameters are random (around 1, both signs rare) in w_dtype."""
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
            for args in _probe_inputs(module, convention, x_dtype, gen):
                try:
                    expected = type(module).forward(p, *args)
                except Exception as e:  # noqa: BLE001 (a forward that needs more than the probe gives)
                    return False, 0, f"probe: its own forward failed on {x_dtype} input: {type(e).__name__}: {e}"
                try:
                    actual = convention.forward(p, *args)
                except Exception as e:  # noqa: BLE001 (a normops.functional without the variant: keep the module)
                    return False, 0, f"probe: normops.functional failed: {type(e).__name__}: {e}"
                ok, why = agree(actual, expected)
                if not ok:
                    what = f"weight {w_dtype}, input {x_dtype}" + (", no gate" if len(args) == 1 and convention.gated else "")
                    return False, 0, f"probe ({what}): {why}"
                differ += int((actual != expected).sum())
    return True, differ, ""


def plan(module, memo=None) -> Tuple[Optional[type], str]:
    """(twin class, convention name) for a registry norm the probe accepts, (None, why it stays) for one
    it does not, (None, "") for a module outside the registry. ``memo`` (a dict) keeps the decisions of
    one conversion, per class and what the decision depends on."""
    found = candidates(module)
    if not found:
        return None, ""
    if "forward" in module.__dict__:
        return None, "its forward is replaced on the instance (accelerate hooks?), so a twin's would not run"
    if module._modules:
        return None, "it has submodules"
    w = next(iter(module.parameters()), None)
    if w is not None and w.is_meta:
        return None, "on the meta device: the probe needs values (convert after loading the weights)"
    key = (type(module), tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in module._parameters.items()
                               if t is not None),
           getattr(module, "group_size", None), getattr(module, "data_format", None))
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


def shape_text(module) -> str:
    """The normalized size of a registry norm, as inspect shows it."""
    w = module._parameters.get("weight")
    if w is not None:
        return f"shape={tuple(w.shape)}"
    return f"shape={tuple(getattr(module, 'normalized_shape', ()))}"

