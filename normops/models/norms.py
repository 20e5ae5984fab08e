"""The one place the five models choose between normops and torch.nn norms.

``norm="normops"`` builds ``normops.nn`` modules with the activation fused into the norm, and
uses the fused residual add + LayerNorm (``normops.functional.add_layer_norm``);
``norm="torch"`` builds the ``torch.nn`` twin followed by a separate activation module, and adds
the residual before the LayerNorm. The activation module (``nn.Identity`` when fused) sits beside
the norm, not around it, and has no parameters, so both variants have the same ``state_dict``
keys and consume the same random numbers at construction: a checkpoint moves between them, and a
seed gives both the same weights.
"""
import torch
from torch import nn

import normops
from normops import functional as F
from normops.core import ACTIVATIONS

NORMS = ("normops", "torch")


def check_norm(norm):
    """``norm`` itself when it is one of ``NORMS`` (the models' and the lessons' choice), else ValueError."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}; got {norm!r}")
    return norm


def norm_act(norm, kind, *args, activation=None, **kwargs):
    """``(norm module, activation module)``: for ``norm_act("normops", "BatchNorm2d", 64,
    activation="relu")`` that is ``(normops.nn.BatchNorm2d(64, activation="relu"), nn.Identity())``;
    for ``"torch"`` it is ``(torch.nn.BatchNorm2d(64), nn.ReLU())``. Apply as ``act(norm(x))``."""
    if check_norm(norm) == "normops":
        return getattr(normops.nn, kind)(*args, activation=activation, **kwargs), nn.Identity()
    # the torch.nn module computing the same activation (nn.GELU's default is the erf form normops fuses)
    return getattr(nn, kind)(*args, **kwargs), ACTIVATIONS[activation or "none"].module()


class ResidualLayerNorm(normops.nn.LayerNorm):
    """``normops.nn.LayerNorm`` that also takes a pre-norm block's residual: ``ln(x, residual)`` is
    one fused ``normops.functional.add_layer_norm`` returning ``(y, h = x + residual)``. A module
    call, so hooks (``normops.inspect``'s) see it; its parameters and state_dict are LayerNorm's."""

    def forward(self, input, residual=None):
        if residual is None:
            return super().forward(input)
        return F.add_layer_norm(input, residual, self.normalized_shape, self.weight, self.bias, self.eps)


def residual_layer_norm(norm, dim):
    """The LayerNorm of a pre-norm residual stream: ``ResidualLayerNorm`` (normops) or torch.nn's."""
    return ResidualLayerNorm(dim) if check_norm(norm) == "normops" else nn.LayerNorm(dim)


def add_norm(norm, x, residual, ln):
    """The pre-norm residual step ``h = x + residual; y = ln(h)``; returns ``(y, h)``. With normops
    it is one fused ``add_layer_norm`` call (``ResidualLayerNorm``)."""
    if norm == "normops":
        return ln(x, residual)
    h = x + residual
    return ln(h), h


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seeded(seed):
    """Seed torch's global generator (model initialization) and return a fresh generator for data."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
