"""``normops.convert(model)``: swap the ``torch.nn`` norms of an existing model for normops ones."""
from torch import nn as tnn

from . import nn

TWINS = {
    tnn.BatchNorm1d: nn.BatchNorm1d, tnn.BatchNorm2d: nn.BatchNorm2d, tnn.BatchNorm3d: nn.BatchNorm3d,
    tnn.LayerNorm: nn.LayerNorm, tnn.RMSNorm: nn.RMSNorm, tnn.GroupNorm: nn.GroupNorm,
    tnn.InstanceNorm1d: nn.InstanceNorm1d, tnn.InstanceNorm2d: nn.InstanceNorm2d,
    tnn.InstanceNorm3d: nn.InstanceNorm3d,
}


def _twin(module):
    """A normops module that shares module's state: the same Parameter and buffer objects, the same
    hook dicts (so existing hook handles still remove their hooks), the same training flag. The
    containers of parameters, buffers and submodules are its own: a buffer or parameter registered
    later on the discarded original must not appear in the twin's state_dict."""
    twin = TWINS[type(module)].__new__(TWINS[type(module)])
    twin.__dict__.update(module.__dict__)
    for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
        twin.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])  # a shallow copy (dict / set)
    twin.activation = None
    return twin


def convert(model: tnn.Module) -> tnn.Module:
    """Replace, in place, every module whose type is exactly one of the nine torch.nn norms
    (BatchNorm1d/2d/3d, LayerNorm, RMSNorm, GroupNorm, InstanceNorm1d/2d/3d) by its normops twin.

    Subclasses of those norms are left alone: they may override forward. The twins share the
    Parameter and buffer objects of the modules they replace, so an optimizer built before the
    call keeps working; device, dtype, training mode, hooks and ``state_dict`` keys are kept, and a
    module that appears at several places is replaced by one twin. Returns the model (the twin
    itself when ``model`` is a norm).
    """
    if type(model) in TWINS:
        return _twin(model)
    memo = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in TWINS:
                if id(child) not in memo:
                    memo[id(child)] = _twin(child)
                setattr(parent, name, memo[id(child)])
    return model
