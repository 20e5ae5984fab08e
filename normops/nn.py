"""Drop-in modules: subclasses of their ``torch.nn`` twins that override ``forward`` only.

Constructor arguments, defaults, parameters, buffers, ``state_dict`` keys, ``reset_parameters``,
``_load_from_state_dict`` versioning and train/eval semantics are torch's own, so a ``torch.nn``
checkpoint loads into these modules and back. The one addition is the keyword-only
``activation=None | "relu" | "silu" | "gelu"``, fused into the norm (shown in ``repr`` when set).
Keyword-only arguments of newer torch versions (``bias=`` on GroupNorm and the batch/instance
norms) pass through to torch.

Tracing and scripting: ``torch.fx.symbolic_trace`` records LayerNorm, RMSNorm and GroupNorm as a call
to their ``normops.functional`` function, and the batch, instance and sync batch norms inside a
model as ``call_module`` leaves, as torch's are (see ``_fx_leaf``). ``torch.jit.trace`` records the
``normops::`` ops. ``torch.jit.script`` cannot compile them (see ``__prepare_scriptable__``).
"""
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn

from . import functional as F
from .core import activation_name
from .sync_batch_norm import sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GatedRMSNorm", "GroupNorm", "InstanceNorm1d",
           "InstanceNorm2d", "InstanceNorm3d", "LayerNorm", "RMSNorm", "SyncBatchNorm"]
__all__ += ["LayerNorm2d"]


class FusedActivation:
    """The fused activation: validated once, shown by ``extra_repr`` when set."""

    activation = None  # class default, so converted modules (see normops.convert) have it too

    def _set_activation(self, activation):
        self.activation = None if activation_name(activation) == "none" else activation

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return f"{s}, activation={self.activation!r}" if self.activation else s

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is about to compile, so the error names the
        # module instead of a keyword-only argument deep in normops.functional
        raise RuntimeError(
            f"torch.jit.script cannot compile normops.nn.{type(self).__name__}: its forward is Python (input "
            f"validation, then normops:: custom ops implemented in Python), which TorchScript does not "
            f"compile. Use torch.jit.trace (it records the normops:: ops), torch.compile or torch.export.")


def _fx_leaf(module, input):
    """``torch.fx.symbolic_trace`` through a batch or instance norm: a ``call_module`` node, the leaf
    torch makes of its own norms. Their forward checks the input's shape in Python (instance norm
    also takes unbatched input) and a cumulative momentum reads ``num_batches_tracked``: a Proxy
    can answer neither, so the traced graph calls the module, which checks at run time. The root
    of a trace has no module to call: like torch's, these norms cannot be traced on their own."""
    path = input.tracer.path_of_module(module)
    if not path:
        raise fx.proxy.TraceError(
            f"torch.fx.symbolic_trace cannot trace a normops.nn.{type(module).__name__} as the root module (nor "
            f"can it torch.nn's): its forward checks the input's shape in Python. Trace a model that contains "
            f"it (it is recorded as a call_module leaf), or a function calling normops.functional.")
    return input.tracer.create_proxy("call_module", path, (input,), {})


class RowVariant:
    """The row norms' variants (``normops.functional.rms_norm``): a weight ``offset`` (Gemma's
    ``1 + weight``; the weight then starts at 0, so the scale starts at 1 as without one), the
    ``casting`` mode and the output dtype; shown by ``extra_repr`` when set."""

    offset = 0.0        # class defaults, so converted modules have them too
    casting = "fp32"
    out_dtype = None

    def _set_variant(self, offset, casting, out_dtype):
        F._check_variant(self.weight, offset, casting, out_dtype)
        self.offset, self.casting, self.out_dtype = float(offset), casting, out_dtype
        if self.offset:
            self.reset_parameters()  # the weight starts at 0: the identity scale, offset + 0

    def reset_parameters(self):
        """torch's init, but a weight with an offset starts at 0 (Gemma's init): the scale offset + 0."""
        super().reset_parameters()
        if self.offset and self.weight is not None:
            nn.init.zeros_(self.weight)

    def _variant(self):
        return dict(offset=self.offset, casting=self.casting, out_dtype=self.out_dtype)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        set_ = [f"{k}={v!r}" for k, v, d in (("offset", self.offset, 0.0), ("casting", self.casting, "fp32"),
                                             ("out_dtype", self.out_dtype, None)) if v != d]
        return ", ".join(p for p in (s, *set_) if p)


class LayerNorm(RowVariant, FusedActivation, nn.LayerNorm):
    __doc__ = nn.LayerNorm.__doc__

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 *, activation=None, offset=0.0, casting="fp32", out_dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._set_activation(activation)
        self._set_variant(offset, casting, out_dtype)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, activation=self.activation,
                            **self._variant())


class RMSNorm(RowVariant, FusedActivation, nn.RMSNorm):
    __doc__ = nn.RMSNorm.__doc__

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None,
                 *, activation=None, offset=0.0, casting="fp32", out_dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self._set_activation(activation)
        self._set_variant(offset, casting, out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps, activation=self.activation,
                          **self._variant())


class GatedRMSNorm(RowVariant, nn.Module):
    """Gated RMSNorm (Mamba2, Qwen3-Next): ``forward(x, gate=None)`` is
    ``normops.functional.gated_rms_norm(x, gate, normalized_shape, weight, eps, ...)``:
    ``rms_norm(x) * weight * silu(gate)``, or ``rms_norm(x * silu(gate)) * weight`` with
    ``norm_before_gate=False``; ``group_size`` normalizes each row in groups. The weight is
    ones-initialised (zeros with ``offset=1.0``, so the norm starts as the identity scale either way)."""

    def __init__(self, normalized_shape, eps=None, *, group_size=None, norm_before_gate=True, offset=0.0,
                 casting="fp32", out_dtype=None, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.group_size = group_size
        F._check_group_size(self.normalized_shape, group_size)
        self.norm_before_gate = bool(norm_before_gate)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        self._set_variant(offset, casting, out_dtype)

    def reset_parameters(self):
        nn.init.constant_(self.weight, 0.0 if self.offset else 1.0)  # the scale starts at 1 either way

    def forward(self, x: Tensor, gate: Optional[Tensor] = None) -> Tensor:
        return F.gated_rms_norm(x, gate, self.normalized_shape, self.weight, self.eps,
                                norm_before_gate=self.norm_before_gate, group_size=self.group_size, **self._variant())

    def extra_repr(self) -> str:
        s = f"{self.normalized_shape}, eps={self.eps}, group_size={self.group_size}, " \
            f"norm_before_gate={self.norm_before_gate}"
        return ", ".join(p for p in (s, super().extra_repr()) if p)


class LayerNorm2d(FusedActivation, nn.LayerNorm):
    """LayerNorm over the channels (dim 1) of an (N, C, *) tensor: timm's LayerNorm2d, ConvNeXt's
    ``data_format="channels_first"``. A ``torch.nn.LayerNorm`` over ``num_channels`` (parameters
    ``weight`` and ``bias`` of shape [C], timm's state-dict keys), computed in place for NCHW and
    channels_last input (``normops.functional.layer_norm_channels_first``), output in the input's layout."""

    def __init__(self, num_channels, eps=1e-6, affine=True, device=None, dtype=None, *, activation=None):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine, device=device, dtype=dtype)
        self._set_activation(activation)

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm_channels_first(input, self.weight, self.bias, self.eps, activation=self.activation)


class GroupNorm(FusedActivation, nn.GroupNorm):
    __doc__ = nn.GroupNorm.__doc__

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None,
                 *, activation=None, **kwargs):
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, **kwargs)
        self._set_activation(activation)

    def forward(self, input: Tensor) -> Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, activation=self.activation)


class _BatchNorm(FusedActivation):
    """torch's ``_BatchNorm.forward``, except that nothing is updated until the input has passed
    validation: a failed call leaves ``num_batches_tracked`` and the running statistics as they were."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, activation=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self._set_activation(activation)

    def _plan(self):
        """(momentum factor, running statistics to pass, batch statistics?, count this batch?)"""
        factor = 0.0 if self.momentum is None else self.momentum
        track = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if track and self.momentum is None:  # cumulative moving average over the batches seen
            factor = 1.0 / float(self.num_batches_tracked + 1)
        # Batch statistics in training, and in eval when there are no running ones.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        stats = not self.training or self.track_running_stats
        running = (self.running_mean, self.running_var) if stats else (None, None)
        return factor, running, bn_training, track

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return _fx_leaf(self, input)
        self._check_input_dim(input)
        factor, running, bn_training, track = self._plan()
        out = F.batch_norm(input, *running, self.weight, self.bias, bn_training, factor, self.eps,
                           activation=self.activation)
        if track:
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    __doc__ = nn.BatchNorm1d.__doc__


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    __doc__ = nn.BatchNorm2d.__doc__


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    __doc__ = nn.BatchNorm3d.__doc__


class _InstanceNorm(FusedActivation):
    """torch's ``_InstanceNorm`` with the normops functional (and its activation)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, device=None,
                 dtype=None, *, activation=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self._set_activation(activation)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return _fx_leaf(self, input)
        return super().forward(input)

    def _apply_instance_norm(self, input):
        return F.instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               self.training or not self.track_running_stats,
                               self.momentum if self.momentum is not None else 0.0, self.eps,
                               activation=self.activation)


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    __doc__ = nn.InstanceNorm1d.__doc__


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    __doc__ = nn.InstanceNorm2d.__doc__


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    __doc__ = nn.InstanceNorm3d.__doc__


class SyncBatchNorm(_BatchNorm, nn.modules.batchnorm._BatchNorm):
    """torch's SyncBatchNorm (same signature, buffers, ``state_dict`` and errors), for any backend
    ``torch.distributed`` runs: gloo on CPU tensors as well as NCCL on CUDA ones (see
    ``normops.sync_batch_norm``). In training with more than one rank the batch statistics cover
    every rank's batch; otherwise it is BatchNorm. ``convert_sync_batchnorm`` converts torch's and
    normops' BatchNorm modules, keeping a normops module's activation.

    Unlike the other modules it is not a subclass of its torch twin: DistributedDataParallel
    refuses ``torch.nn.SyncBatchNorm`` instances in CPU modules, which this one serves."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, activation=None, **kwargs):
        nn.modules.batchnorm._BatchNorm.__init__(self, num_features, eps, momentum, affine, track_running_stats,
                                                 device, dtype, **kwargs)
        self.process_group = process_group
        self._set_activation(activation)

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input):
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _check_input(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return _fx_leaf(self, input)
        factor, running, bn_training, track = self._plan()
        group = None
        if bn_training and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            if dist.get_world_size(group) == 1:
                group = None
        if group is None:
            self._check_input(input)
            return super().forward(input)
        # the input checks run inside, where a failure on one rank is raised on every rank
        out = sync_batch_norm(input, self.weight, self.bias, *running, self.eps, factor,
                              activation_name(self.activation), group, check=self._check_input)
        if track:
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Every BatchNorm*D under `module` (torch's or normops', not already a SyncBatchNorm)
        replaced by a normops SyncBatchNorm sharing its parameters and buffers; returns the module
        (the new one when `module` itself is a BatchNorm)."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, activation=getattr(module, "activation", None))
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
