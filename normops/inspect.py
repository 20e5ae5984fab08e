"""``normops.inspect(model, example_input=None)``: a model's norm layers, and the likely mistakes.

(The module is ``normops.inspect``. Python 3 has no implicit relative imports, so ``import
inspect`` in the package's other modules is the standard library's; this module imports absolutely.
Only with the normops/ folder itself on sys.path would it shadow the standard library: it then
refuses to load, with the reason.)

For each norm layer (torch.nn's and normops' BatchNorm, SyncBatchNorm, InstanceNorm, GroupNorm,
LayerNorm, RMSNorm; normops' LayerNorm2d, a LayerNorm over the channels, dim 1) the report lists its qualified name, type, channels or normalized shape,
fused activation, training mode, the backend a call would use (``normops.current_backend`` of
its device; for a torch.nn norm, that it is not normops and ``normops.convert`` would swap it)
and what the triton backend would do with it: its kernel, or the torch backend where the kernels
do not take the configuration (``normops.ops.route`` with the triton backend).

Third-party norms of ``normops.hf``'s registry (Hugging Face transformers' ``*RMSNorm`` classes,
T5LayerNorm, ConvNextLayerNorm, the gated RMSNorms, timm's LayerNorm2d; diffusers' RMSNorm, FP32LayerNorm and adaLN
modules, whose own inner norm is then not listed) are listed too: unconverted, with what
``normops.convert`` would do with each (swap it, and by which convention, or leave it and why:
the registry's probe runs on a copy of the layer); converted, with their backend.

Static checks, from the module structure (an ``nn.Sequential`` runs its children in order, nested
Sequentials included; the other containers' order is their registration order):

| check                  | flags                                                              |
|------------------------|--------------------------------------------------------------------|
| activation-before-norm | a norm right after an activation in a Sequential (Act -> Norm)      |
| instance-norm-head     | an InstanceNorm followed only by pooling/flatten/linear to the end  |
| batch-norm-after-pool  | a BatchNorm right after a pooling to 1x1 (its statistics are over   |
|                        | the N samples only: it needs large batches)                        |

Dynamic checks, with ``example_input``: one forward with hooks on the norm layers, in the
caller's grad mode. The model's buffers (running statistics, ``num_batches_tracked``) and every
module's training flag are restored afterwards and the hooks removed, so the model is left as it
was. An exception in the forward is reported as a finding, not raised.

| check                  | flags                                                              |
|------------------------|--------------------------------------------------------------------|
| one-value-per-channel  | a norm using batch statistics on 1 value per channel (BatchNorm:   |
|                        | N * spatial == 1; InstanceNorm: spatial == 1): training fails      |
| train-under-no-grad    | BatchNorm/InstanceNorm with running statistics, in training mode   |
|                        | under torch.no_grad(): an evaluation that forgot model.eval()      |
| tiny-batch-statistics  | a training BatchNorm whose batch statistics cover fewer than 16    |
|                        | values per channel (N * spatial < 16: tiny batches, or a BatchNorm |
|                        | at or after a pooling to 1x1), or N == 1 (it trains as an          |
|                        | InstanceNorm, while eval uses running statistics of other batches) |
| forward-error          | any other exception of the example forward                        |
"""
if __name__ == "inspect":  # found as the standard library's inspect: normops/ itself is on sys.path
    raise ImportError("normops/inspect.py was imported as the standard library's `inspect` because the normops/ "
                      "folder is on sys.path (it is the current directory, or a script inside it was run); run "
                      "from another directory, or use `python -m`")

import contextlib
import dataclasses
import importlib
import math
import sys
from typing import List, Optional

import torch
from torch import nn

import normops.hf as hf
import normops.nn as normops_nn
from normops.backends import current_backend, triton_interpret
from normops.cliutil import error_text, positive_int_arg, text_table
from normops.convert import TWINS
from normops.core import ACTIVATIONS as NORMOPS_ACTIVATIONS
from normops.ops import route
from normops.ops.batch_norm import BatchNormSpec
from normops.ops.channels_first import ChannelsFirstSpec
from normops.ops.group_norm import GroupNormSpec

NORM_TYPES = hf.TORCH_NORMS
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
               nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
               nn.Tanhshrink, nn.LogSigmoid, nn.GLU, nn.Threshold)
POOLS = (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
         nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd)
# What may follow the last InstanceNorm of a classifier: its head (and other norms).
HEAD = POOLS + ACTIVATIONS + (nn.Flatten, nn.Linear, nn.modules.dropout._DropoutNd, nn.Identity, nn.Softmax,
                              nn.LogSoftmax)
# torch activation -> normops activation= (nn.GELU in its default erf form only: see _check_activation_before_norm)
FUSABLE = {act.module: name for name, act in NORMOPS_ACTIVATIONS.items() if name != "none"}
NOT_NORMOPS = "torch.nn (not normops; normops.convert(model) would swap it)"
THIRD_PARTY = "third-party (not normops; "  # + what normops.convert would do with it
MODEL = "(model)"  # the layer name of a finding about the whole model


@dataclasses.dataclass
class NormLayer:
    name: str                    # qualified name in the model, "(model)" for the model itself
    type: str                    # "torch.nn.BatchNorm2d", "normops.nn.GroupNorm", ...
    shape: str                   # channels or normalized shape: "C=64", "G=32, C=256 (8 per group)"
    activation: Optional[str]    # the fused activation (normops), else None
    training: bool
    backend: str                 # the normops backend a call would use, or why there is none
    triton: str                  # what the triton backend does with it: "kernel", "falls back to torch (...)", "-"
    device: str
    input: Optional[str] = None  # with an example input: the shape it saw, "not reached" or "not called"


@dataclasses.dataclass
class Finding:
    severity: str   # "error" (fails or computes the wrong thing) or "warning" (likely a mistake)
    layer: str      # qualified name of the layer, or "(model)"
    message: str
    advice: str
    check: str      # which check found it (see the module docstring)


@dataclasses.dataclass
class Report:
    model: str                   # the model's class name
    layers: List[NormLayer]
    findings: List[Finding]
    example: Optional[str] = None  # the example forward: input shape and grad mode, when one ran

    def __str__(self):
        return self.format()

    def format(self):
        forward = f"example forward: {self.example}" if self.example else "no example input (static checks only)"
        lines = [f"normops.inspect: {self.model}, {len(self.layers)} norm layer{'s' * (len(self.layers) != 1)}, "
                 f"{forward}"]
        if self.layers:
            headers = ["name", "type", "shape", "activation", "mode", "backend", "triton"]
            dynamic = self.example is not None
            rows = []
            for layer in self.layers:
                row = [layer.name, layer.type, layer.shape, layer.activation or "-",
                       "train" if layer.training else "eval", layer.backend, layer.triton]
                rows.append(row + [layer.input or "-"] if dynamic else row)
            lines.append(text_table(headers + ["input"] if dynamic else headers, rows))
        if not self.findings:
            lines.append("no findings")
        else:
            lines.append(f"\nfindings ({len(self.findings)}):")
            for f in self.findings:
                lines.append(f"  {f.severity} [{f.check}] {f.layer}: {f.message}")
                lines.append(f"    advice: {f.advice}")
        return "\n".join(lines)


def is_norm(module):
    return isinstance(module, NORM_TYPES + (normops_nn.GatedRMSNorm,))


def _family(m):
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "batch"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instance"
    if isinstance(m, nn.GroupNorm):
        return "group"
    if _channels_first(m):
        return "channels_first"
    return "row"  # LayerNorm, RMSNorm


def _channels_first(m):
    """A LayerNorm over dim 1 of (N, C, *): normops' LayerNorm2d, timm's LayerNorm2d and a
    ConvNextLayerNorm(data_format="channels_first"), converted or not."""
    if isinstance(m, normops_nn.LayerNorm2d) or getattr(m, "data_format", None) == "channels_first":
        return True
    return hf.convention_of(m) == hf.LAYERNORM2D.name or hf.LAYERNORM2D in hf.candidates(m)


def _third_party(m):
    """A norm of normops.hf's registry (Hugging Face transformers' RMSNorms...), converted or not."""
    return bool(hf.candidates(m)) or hf.convention_of(m) is not None


NORMOPS_MODULES = (normops_nn.FusedActivation, normops_nn.RowVariant)  # GatedRMSNorm has no fused activation


def _is_normops(m):
    return isinstance(m, NORMOPS_MODULES) or hf.convention_of(m) is not None


def _type_name(m):
    cls = type(m)
    if isinstance(m, NORMOPS_MODULES) and getattr(normops_nn, cls.__name__, None) is cls:
        return f"normops.nn.{cls.__name__}"
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _shape(m):
    if _third_party(m) and not hasattr(m, "normalized_shape"):
        return hf.shape_text(m)
    family = _family(m)
    if family == "group":
        return f"G={m.num_groups}, C={m.num_channels} ({m.num_channels // m.num_groups} per group)"
    if family == "row":
        return f"shape={tuple(m.normalized_shape)}"
    if family == "channels_first":
        return f"C={m.normalized_shape[0]}, channels first (dim 1)"
    stats = m.track_running_stats
    if family == "batch":
        return f"C={m.num_features}" + ("" if stats else ", no running stats")
    return f"C={m.num_features}" + (", running stats" if stats else "")


def _device(module, fallback):
    for t in module.parameters(recurse=False):
        return t.device
    for t in module.buffers(recurse=False):
        return t.device
    return fallback


def _backend(m, device, memo=None):
    if _is_normops(m):
        return current_backend(device)
    if hf.candidates(m):
        twin, how = hf.plan(m, memo)
        if twin is not None:
            return f"{THIRD_PARTY}normops.convert(model) would swap it: {how})"
        return f"{THIRD_PARTY}normops.convert leaves it: {how})"
    if type(m) in TWINS:
        return NOT_NORMOPS
    if type(m) is nn.SyncBatchNorm:
        return "torch.nn (not normops; normops.nn.SyncBatchNorm.convert_sync_batchnorm(model) would swap it)"
    return "torch.nn subclass (not normops; normops.convert leaves subclasses alone)"


def _triton_static(m):
    """What the triton backend does with layer m, as far as its configuration tells."""
    if hf.convention_of(m) is not None or isinstance(m, normops_nn.GatedRMSNorm):
        return "kernel"
    if not isinstance(m, normops_nn.FusedActivation):
        return "-"
    if _family(m) == "group":
        per_group, most = m.num_channels // m.num_groups, _max_group_channels()
        if per_group > most:
            return f"falls back to torch ({per_group} channels a group > {most})"
    if isinstance(m, normops_nn.SyncBatchNorm):
        return "kernel (one rank; torch ops when synchronizing ranks)"
    return "kernel"


def _max_group_channels():
    from normops.kernels.config import GN_MAX_GROUP_CHANNELS  # no triton there; imported on use

    return GN_MAX_GROUP_CHANNELS


def _kernel_module(name):
    """normops.kernels.<name> where importing it is what the triton backend would do anyway
    (already imported, CUDA, or TRITON_INTERPRET set): importing it elsewhere would fix
    triton.jit's mode before the user chose it. None otherwise, or without triton."""
    full = f"normops.kernels.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if not (torch.cuda.is_available() or triton_interpret()):
        return None
    try:
        return importlib.import_module(full)
    except ImportError:
        return None


def _triton_dynamic(m, x):
    """What the triton backend does with layer m on input x, as ``normops.ops.route`` answers it,
    where the kernels can be imported (see _kernel_module); None to keep the static answer."""
    if not isinstance(m, normops_nn.FusedActivation) or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    family = _family(m)
    if family == "row":
        return None
    if family == "channels_first":
        op, spec = "channels_first", ChannelsFirstSpec(m.eps, m.activation or "none")
    elif family == "group":
        op, spec = "group_norm", GroupNormSpec(m.num_groups, m.eps)
    elif family == "instance" and (m.training or not m.track_running_stats):
        op, spec = "group_norm", GroupNormSpec(x.shape[1], m.eps, instance=True)
    else:
        op, spec = "batch_norm", BatchNormSpec(m.training, m.eps)
        if x.numel() == 0:  # the batch-norm kernels take no empty input: known without importing them
            return "falls back to torch (empty input)"
    if _kernel_module(op) is None:
        return None
    how = route(op, x, spec, backend="triton")
    return f"falls back to torch ({how.reason})" if how.implementation == "torch fallback" else None


# --- static checks ------------------------------------------------------------------------------

def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _runs_in_order(m):
    """An nn.Sequential whose forward is Sequential's own: its children run in order."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _expand(prefix, seq):
    for name, child in seq.named_children():
        q = _join(prefix, name)
        if _runs_in_order(child):
            yield from _expand(q, child)
        else:
            yield q, child


def _chains(module, prefix=""):
    """Each outermost ordered Sequential as [(qualified name, module)] in execution order, nested
    Sequentials expanded in place; then the chains inside its other items, and so on."""
    if _runs_in_order(module):
        items = list(_expand(prefix, module))
        yield items
        for q, child in items:
            yield from _chains(child, q)
    else:
        for name, child in module.named_children():
            yield from _chains(child, _join(prefix, name))


def _activation_of(m):
    """The activation m applies last: an activation module, or a normops norm's fused one."""
    if isinstance(m, ACTIVATIONS):
        return type(m).__name__
    if is_norm(m) and getattr(m, "activation", None):
        return f"{type(m).__name__}(activation={m.activation!r})"
    return None


def _constructor(m, activation):
    """normops.nn's constructor for norm m, with a fused activation."""
    family = _family(m)
    name = type(m).__name__ if type(m) in TWINS or isinstance(m, normops_nn.FusedActivation) else None
    if name is None:
        return None
    if family == "group":
        args = f"{m.num_groups}, {m.num_channels}"
    elif family == "row":
        args = f"{list(m.normalized_shape)}"
    elif family == "channels_first":
        args = f"{m.normalized_shape[0]}"
    else:
        args = f"{m.num_features}"
    return f'normops.nn.{name}({args}, activation="{activation}")'


def _check_activation_before_norm(items, findings):
    for (prev_name, prev), (name, cur) in zip(items, items[1:]):
        act = _activation_of(prev)
        if act is None or not is_norm(cur):
            continue
        fused = FUSABLE.get(type(prev)) if getattr(prev, "approximate", "none") == "none" else None
        ctor = fused and _constructor(cur, fused)
        findings.append(Finding(
            "warning", name,
            f"{type(cur).__name__} directly after the activation {act} ({prev_name}): Activation -> Norm "
            f"instead of Norm -> Activation, so the norm re-centers what the activation produced",
            "the standard order is Conv/Linear -> Norm -> Activation: put the norm before the activation"
            + (f"; normops fuses the two: {ctor}" if ctor else ""),
            "activation-before-norm"))


def _pools_to_one(m):
    if not isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return False
    sizes = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
    return all(s == 1 for s in sizes)


def _check_batch_norm_after_pool(items, findings):
    for i, (name, cur) in enumerate(items):
        if not is_norm(cur) or _family(cur) != "batch":
            continue
        j = i - 1
        while j >= 0 and isinstance(items[j][1], (nn.Flatten, nn.Identity, nn.modules.dropout._DropoutNd)):
            j -= 1
        if j >= 0 and _pools_to_one(items[j][1]):
            pool = type(items[j][1]).__name__
            findings.append(Finding(
                "warning", name,
                f"{type(cur).__name__} directly after {pool} to 1x1 ({items[j][0]}): one value per channel per "
                f"sample, so its batch statistics cover only the N samples of a batch (in training, batch size 1 "
                f"fails and small batches give noisy statistics)",
                "this needs large batches (>= 16, the guide's threshold; `normops guide`); with smaller ones "
                "normalize before the pooling, or use LayerNorm on the pooled features",
                "batch-norm-after-pool"))


def _check_instance_norm_head(model, findings):
    leaves = [(name or MODEL, m) for name, m in model.named_modules() if not any(True for _ in m.children())]
    for i, (name, m) in enumerate(leaves):
        if not is_norm(m) or _family(m) != "instance":
            continue
        tail = [t for _, t in leaves[i + 1:]]
        head_only = all(isinstance(t, HEAD) or is_norm(t) for t in tail)
        if tail and head_only and any(isinstance(t, nn.Linear) for t in tail):
            head = " -> ".join(type(t).__name__ for t in tail)
            findings.append(Finding(
                "warning", name,
                f"{type(m).__name__} in a classifier head: followed only by {head} to the output",
                "InstanceNorm removes each image's contrast and style, information a classifier needs: use "
                "BatchNorm (batches >= 16) or GroupNorm (`normops guide --task image-classification --batch-size "
                "N`). In a GAN critic trained with a gradient penalty a per-sample norm is intended.",
                "instance-norm-head"))


# --- dynamic checks -----------------------------------------------------------------------------

def _train_eval_differ(m):
    return _family(m) in ("batch", "instance") and m.track_running_stats and m.running_mean is not None


TINY_BATCH_VALUES = 16  # the decision tree's "large batch (>= 16)"


def _tiny_batch(m, x):
    """Why a training BatchNorm's batch statistics on x are unreliable (not undefined: that is
    _one_value_per_channel), or None."""
    if _family(m) != "batch" or not m.training or not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    n, spatial = x.shape[0], math.prod(x.shape[2:])
    if n * spatial <= 1:
        return None
    if n * spatial < TINY_BATCH_VALUES:
        return f"its batch statistics cover {n * spatial} values per channel (N * spatial = {n} x {spatial})"
    if n == 1:
        return "at batch size 1 it normalizes each sample by its own statistics (an InstanceNorm)"
    return None


def _one_value_per_channel(m, x):
    """Whether norm m normalizes one value per channel with batch statistics on x (torch raises)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.numel() == 0:
        return False
    family = _family(m)
    spatial = math.prod(x.shape[2:])
    if family == "batch":
        uses_batch_stats = m.training or (m.running_mean is None and m.running_var is None)
        return uses_batch_stats and x.shape[0] * spatial == 1
    if family == "instance":
        return (m.training or not m.track_running_stats) and spatial == 1
    return False


@contextlib.contextmanager
def _restored(model):
    """Every buffer (the very tensor object and its values) and every training flag as they were."""
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules()
               for name, b in m._buffers.items() if b is not None]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, saved in buffers:
                m._buffers[name] = b
                b.copy_(saved)
        for m, training in modes:
            m.training = training


def _run_example(model, example_input, layers, findings):
    named = ((name or MODEL, m) for name, m in model.named_modules())
    by_module = {id(m): (name, m, layers[name]) for name, m in named if name in layers}
    entered = []       # names of the norm layers whose forward is running
    no_grad_train = []  # train/eval-dependent norms that ran in training mode under no_grad
    predicted = {}     # name -> its one-value-per-channel finding
    after = {}         # name -> a finding to report when its forward returns

    def pre_hook(module, args):
        name, m, layer = by_module[id(module)]
        x = args[0] if args else None
        layer.input = type(x).__name__
        if isinstance(x, torch.Tensor):
            layer.input = "x".join(map(str, x.shape)) or "scalar"
            layer.device = str(x.device)
            if _is_normops(m):  # the others' backend column does not depend on the device
                layer.backend = _backend(m, x.device)
            layer.triton = _triton_dynamic(m, x) or layer.triton
        if _one_value_per_channel(m, x):
            what = "N * spatial" if _family(m) == "batch" else "spatial size"
            predicted[name] = Finding(
                "error", name,
                f"{type(m).__name__} normalizes with batch statistics over 1 value per channel (input "
                f"{layer.input}, {what} == 1): they are undefined",
                "in training, feed more than one value per channel (a larger batch, or a norm before the "
                "pooling); for one sample at a time use LayerNorm or GroupNorm, or call model.eval() to use "
                "the running statistics",
                "one-value-per-channel")
            findings.append(predicted[name])
        tiny = None if name in predicted else _tiny_batch(m, x)
        if tiny:  # reported once the layer's forward has run (an error there is its own finding)
            after[name] = (Finding(
                "warning", name, f"{type(m).__name__} trains on input {layer.input}: {tiny}, so its running "
                f"statistics, used in eval, will not match what it trained on",
                f"train with batches of {TINY_BATCH_VALUES} or more values per channel, or use GroupNorm or "
                "LayerNorm, which do not depend on the batch", "tiny-batch-statistics"))
        if module.training and not torch.is_grad_enabled() and _train_eval_differ(m):
            no_grad_train.append(name)
        entered.append(name)

    def post_hook(module, args, output):
        name = by_module[id(module)][0]
        if entered and entered[-1] == name:
            entered.pop()
        if name in after:
            findings.append(after.pop(name))

    handles = []
    with _restored(model), torch.random.fork_rng(devices=[]):  # dropout in the forward: the caller's RNG stays
        try:
            for _, m, _ in by_module.values():
                handles.append(m.register_forward_pre_hook(pre_hook))
                handles.append(m.register_forward_hook(post_hook))
            for layer in layers.values():
                layer.input = "not called"
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, tuple):
                model(*example_input)
            else:
                model(example_input)
        except Exception as e:  # a failing forward is a finding, not a crash
            where = entered[-1] if entered else None
            if where in predicted:
                predicted[where].message += f"; the forward stopped here: {error_text(e)}"
            else:
                findings.append(Finding(
                    "error", where or MODEL, f"the example forward raised {error_text(e)}",
                    "fix the example input (shape, dtype, device) or the model; the layers after this point "
                    "were not checked", "forward-error"))
            for layer in layers.values():
                if layer.input == "not called":
                    layer.input = "not reached"
        finally:
            for h in handles:
                h.remove()
    if no_grad_train:
        shown = ", ".join(no_grad_train[:3]) + (f" and {len(no_grad_train) - 3} more" if len(no_grad_train) > 3 else "")
        findings.append(Finding(
            "warning", MODEL,
            f"{len(no_grad_train)} norm layer{'s' * (len(no_grad_train) > 1)} ran in training mode under "
            f"torch.no_grad() ({shown}): an evaluation that normalizes with the batch's statistics instead of the "
            f"running ones, and updates them (inspect restored them)",
            "call model.eval() before evaluating, model.train() before training again (recalibrating the running "
            "statistics under no_grad, as torch.optim.swa_utils.update_bn does, is the one intended use)",
            "train-under-no-grad"))


def _describe(example_input):
    def one(x):
        return "x".join(map(str, x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
    if isinstance(example_input, dict):
        text = ", ".join(f"{k}={one(v)}" for k, v in example_input.items())
    elif isinstance(example_input, tuple):
        text = ", ".join(one(x) for x in example_input)
    else:
        text = one(example_input)
    return f"input {text}, {'grad enabled' if torch.is_grad_enabled() else 'under torch.no_grad()'}"


# --- entry points -------------------------------------------------------------------------------

def _norm_modules(model, memo=None):
    """The norm layers, less those inside an adaLN module that normops computes (a twin, or one that
    convert would swap): its own norm is not called, convert leaves it."""
    out, owned = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in owned):
            continue
        if is_norm(m) or _third_party(m):
            out.append((name or MODEL, m))
        if hf.owns_children(m) or (m._modules and hf.candidates(m) and hf.plan(m, memo)[0] is not None):
            owned.append(name)
    return out


def inspect(model: nn.Module, example_input=None) -> Report:
    """The norm layers of ``model`` and the likely mistakes found (see the module docstring).

    ``example_input``, when given, runs one forward (``model(x)``; a tuple is unpacked into
    positional arguments, a dict into keyword arguments) under the caller's grad mode for the
    dynamic checks; the model's buffers and training flags are restored afterwards."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"normops.inspect expects an nn.Module, got {type(model).__name__}")
    fallback = next((t.device for t in model.parameters()), None) or next((t.device for t in model.buffers()), None)
    fallback = fallback or torch.device("cpu")
    layers, memo = {}, {}
    for name, m in _norm_modules(model, memo):
        device = _device(m, fallback)
        activation = getattr(m, "activation", None) if isinstance(m, normops_nn.FusedActivation) else None
        layers[name] = NormLayer(name, _type_name(m), _shape(m), activation, m.training,
                                 _backend(m, device, memo), _triton_static(m), str(device))
    findings = []
    for items in _chains(model):
        _check_activation_before_norm(items, findings)
        _check_batch_norm_after_pool(items, findings)
    _check_instance_norm_head(model, findings)
    example = None
    if example_input is not None:
        lazy = [name for name, m in model.named_modules()
                if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params()]
        if lazy:
            findings.append(Finding(
                "warning", lazy[0], "uninitialized lazy modules: a forward would initialize them, so inspect "
                "did not run the example", "run one forward (or build the model with sizes) before inspecting",
                "example-not-run"))
        else:
            example = _describe(example_input)
            _run_example(model, example_input, layers, findings)
    order = {name: i for i, name in enumerate(n or MODEL for n, _ in model.named_modules())}
    unique = list({(f.check, f.layer): f for f in findings}.values())  # a module in two places is found twice
    unique.sort(key=lambda f: (order.get(f.layer, -1), f.check))
    return Report(type(model).__name__, list(layers.values()), unique, example)


# --- the command --------------------------------------------------------------------------------

def resolve_model(name, batch_size=None):
    """(model, example input or None) for a model name, through the hook of ``normops.models``:
    ``build(name) -> nn.Module`` (KeyError or ValueError on an unknown name) and, when
    ``batch_size`` is given, ``example_input(name, batch_size)`` (a tensor, or a tuple of
    positional arguments; the example is None where it is missing). LookupError with a clear
    message when the package or ``build`` is missing or the name is unknown."""
    try:
        models = importlib.import_module("normops.models")
    except ImportError as e:
        raise LookupError(f"normops.models is not available ({e}); `normops inspect` resolves model names "
                          f"through normops.models.build(name)") from e
    build = getattr(models, "build", None)
    if build is None:
        raise LookupError("normops.models has no build(name): `normops inspect` resolves model names through it")
    try:
        model = build(name)
    except (KeyError, ValueError) as e:
        names = getattr(models, "NAMES", None)
        known = f"; choose from {', '.join(names)}" if names else ""
        raise LookupError(f"unknown model {name!r} ({e.args[0] if e.args else e}){known}") from e
    example_fn = getattr(models, "example_input", None)
    example = example_fn(name, batch_size) if batch_size is not None and example_fn is not None else None
    return model, example


def add_parser(subparsers):
    """Register ``normops inspect`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "inspect", help="list a model's norm layers, their backends and likely mistakes",
        description="List the norm layers of a practical model (normops.models) with the backend each would use, "
                    "and the likely mistakes found in its structure and, from one forward of an example batch, "
                    "in its use. Exit status 0 without findings, 1 with some, 2 on an unknown model.")
    p.add_argument("model", help="a model name of normops.models")
    p.add_argument("--batch-size", type=positive_int_arg, default=2, metavar="N",
                   help="batch size of the example forward (default 2; 1 exercises the batch-size checks)")
    p.add_argument("--eval", action="store_true", help="put the model in eval mode before the forward")
    p.add_argument("--no-grad", action="store_true", help="run the example forward under torch.no_grad()")
    p.add_argument("--static", action="store_true", help="structure only: no example forward")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args):
    """``normops inspect``; returns the exit status."""
    try:
        model, example = resolve_model(args.model, None if args.static else args.batch_size)
    except LookupError as e:
        print(f"normops inspect: error: {e.args[0]}", file=sys.stderr)
        return 2
    if example is None and not args.static:
        print("normops inspect: no example input (normops.models.example_input(name, batch_size) is missing): "
              "static checks only", file=sys.stderr)
    if args.eval:
        model.eval()
    with torch.no_grad() if args.no_grad else contextlib.nullcontext():
        report = inspect(model, example)
    print(report)
    n = len(report.findings)
    if n:
        print(f"\nexit status 1: {n} finding{'s' * (n != 1)} (0 when there are none)")
    return 1 if n else 0
