"""``normops.convert(model)``: swap the norms of an existing model for normops ones: the ``torch.nn``
norms for their ``normops.nn`` twins, and the third-party norms of ``normops.hf`` (Hugging Face
transformers' RMSNorm family, T5LayerNorm, ConvNextLayerNorm, the gated RMSNorms; diffusers' RMSNorm,
FP32LayerNorm and adaLN modules) for subclasses of their own class computed by ``normops.functional``,
each after a probe (see ``normops.hf``)."""
import dataclasses
from typing import List

from torch import nn as tnn

from . import hf, nn
from .cliutil import text_table

TWINS = {
    tnn.BatchNorm1d: nn.BatchNorm1d, tnn.BatchNorm2d: nn.BatchNorm2d, tnn.BatchNorm3d: nn.BatchNorm3d,
    tnn.LayerNorm: nn.LayerNorm, tnn.RMSNorm: nn.RMSNorm, tnn.GroupNorm: nn.GroupNorm,
    tnn.InstanceNorm1d: nn.InstanceNorm1d, tnn.InstanceNorm2d: nn.InstanceNorm2d,
    tnn.InstanceNorm3d: nn.InstanceNorm3d,
}


def _twin(module, cls):
    """An instance of cls that shares module's state: the same Parameter and buffer objects, the
    same hook dicts (so existing hook handles still remove their hooks), the same training flag
    and attributes. The containers of parameters, buffers and submodules are its own: a buffer or
    parameter registered later on the discarded original must not appear in the twin's state_dict."""
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
        twin.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])  # a shallow copy (dict / set)
    return twin


@dataclasses.dataclass
class Conversion:
    path: str     # qualified name in the model, "(model)" for the model itself
    type: str     # the original class: "torch.nn.LayerNorm", "transformers...LlamaRMSNorm"
    twin: str     # what replaced it ("normops.nn.LayerNorm", "normops.hf.LlamaRMSNorm (llama)"), "" if left
    reason: str   # why it was left, "" if converted


@dataclasses.dataclass
class ConvertReport:
    """What ``normops.convert(model, report=True)`` converted and what it left, one row a place."""
    rows: List[Conversion]

    @property
    def converted(self):
        return [r for r in self.rows if r.twin]

    @property
    def left(self):
        return [r for r in self.rows if not r.twin]

    def __str__(self):
        head = f"normops.convert: {len(self.converted)} converted, {len(self.left)} left"
        if not self.rows:
            return head
        rows = [[r.path, r.type, r.twin or "left: " + r.reason] for r in self.rows]
        return head + "\n" + text_table(["path", "type", "twin / reason"], rows)


def _qualname(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def _plan(module, memo):
    """(twin class or None, Conversion text: the twin's description or why not), or None for a
    module that is not a norm convert knows (normops' own included)."""
    if type(module) in TWINS:
        return TWINS[type(module)], _qualname(TWINS[type(module)])
    cls, how = hf.plan(module, memo)
    if cls is not None:
        return cls, f"{_qualname(cls)} ({how})"
    if how:
        return None, how
    if isinstance(module, tuple(TWINS)) and not isinstance(module, nn.FusedActivation) \
            and hf.convention_of(module) is None:
        return None, "a subclass of a torch.nn norm (it may override forward): left alone"
    return None


def _swap(module, cls):
    twin = _twin(module, cls)
    if cls in TWINS.values():
        twin.activation = None
    return twin


def convert(model: tnn.Module, report: bool = False):
    """Replace, in place, every norm normops computes by its normops twin:

    - every module whose type is exactly one of the nine torch.nn norms (BatchNorm1d/2d/3d,
      LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d) by its ``normops.nn`` twin. Subclasses
      are left alone: they may override forward;
    - the Hugging Face transformers norms of ``normops.hf`` (the ``*RMSNorm`` classes of Llama,
      Gemma, Qwen, Mistral..., T5LayerNorm, ConvNextLayerNorm, Mamba2RMSNormGated,
      Qwen3NextRMSNormGated) and diffusers' norms (RMSNorm, FP32LayerNorm, AdaLayerNormZero,
      AdaLayerNormZeroSingle, AdaLayerNormContinuous, AdaLayerNorm, AdaGroupNorm) by a subclass of
      their own class whose forward calls ``normops.functional``, when a probe on random weights
      finds it computes what the module does; the others are left, with the reason. An adaLN twin
      keeps its Linear and embeddings (it computes the modulation with them) and fuses its norm
      with the modulation: its children are left as they are.

    The twins share the Parameter and buffer objects of the modules they replace, so an optimizer
    built before the call keeps working; device, dtype, training mode, attributes, hooks and
    ``state_dict`` keys are kept, and a module that appears at several places is replaced by one
    twin. Returns the model (the twin itself when ``model`` is a norm), or with ``report=True`` the
    pair (model, ``ConvertReport``): one row per place of a norm, converted or left with the reason.
    """
    memo, rows, twins = {}, [], {}

    def visit(path, child):
        """child's twin (itself when it stays), and its row in the report."""
        if id(child) not in twins:
            planned = _plan(child, memo)
            twins[id(child)] = (child, None) if planned is None else (
                _swap(child, planned[0]) if planned[0] is not None else child, planned)
        twin, planned = twins[id(child)]
        if planned is not None:
            cls, text = planned
            rows.append(Conversion(path, _qualname(type(child)), text if cls else "", "" if cls else text))
        return twin

    leaf = not any(True for _ in model.children())
    if leaf or hf.candidates(model) or hf.not_a_norm(model):  # the model is a norm (an adaLN module has children)
        out = visit("(model)", model)
        if leaf or out is not model:  # a twin: an adaLN twin's children stay as they are
            return (out, ConvertReport(rows)) if report else out
    order = {name: i for i, (name, _) in enumerate(model.named_modules(remove_duplicate=False))}
    owned = []  # the paths of adaLN twins: their norm is computed by the twin, their children stay as they are
    for prefix, parent in list(model.named_modules()):
        if any(prefix == p or prefix.startswith(p + ".") for p in owned):
            continue
        for name, child in list(parent._modules.items()):
            if child is not None:
                path = f"{prefix}.{name}" if prefix else name
                twin = visit(path, child)
                if twin is not child:
                    setattr(parent, name, twin)
                if hf.owns_children(twin):
                    owned.append(path)
    rows.sort(key=lambda r: order.get(r.path, len(order)))
    return (model, ConvertReport(rows)) if report else model
