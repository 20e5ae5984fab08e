"""GroupNorm over chunks, exactly: the statistics of a piece, Chan's combination of pieces'
statistics, and GroupNorm with given statistics. GroupNorm of a whole tensor equals
stats -> combine -> apply over any split of its spatial (or time) dims: a tiled VAE decode whose
every GroupNorm sees the whole image (``normops demo tiled-vae``), a video decoded frame chunk
by frame chunk.

Per (sample, group) a piece has n values, their mean and M2 = sum((x - mean)^2), computed in two
passes (mean first, then squared deviations: never E[x^2] - E[x]^2, which cancels). Two pieces
combine as (Chan, Golub and LeVeque 1979; the NumPy reference's docstring has the formula):

    n = n_a + n_b,  delta = mean_b - mean_a,
    mean = mean_a + delta * n_b / n,  M2 = M2_a + M2_b + delta^2 * n_a * n_b / n

written with the difference delta, so neither a large mean nor a large count cancels. Many pieces
combine as a balanced tree (error growth log2(pieces), not linear). An empty piece (n = 0, mean
0, M2 0) changes nothing. Then every piece is normalized with the whole's mean and
rstd = 1 / sqrt(M2 / n + eps): y = act((x - mean) * rstd * w + b).

Backends, from ``normops.backends.current_backend``:
- "triton": without a gradient, stats and apply launch the GroupNorm kernels
  (``normops.kernels.group_norm``: the split forward's statistics pass and a fixed-order combine
  of its chunks, and its normalize pass; the count from the shape, on the host); with one, or
  where the kernels do not take x (``fallback``), and for combine, the torch ops below.
- "torch": plain differentiable torch ops, so a backward through stats -> combine -> apply is GroupNorm's backward of the whole (up to
  rounding). The statistics' passes read the input in pieces of at most ``BLOCK`` values along its
  largest non-channel dim: ATen's CPU reductions cast a bf16/fp16 input to the fp32 accumulation
  dtype as a whole copy first, which the pieces bound to BLOCK values. apply makes one fp32
  temporary the size of its input (its output is that size anyway).
- "numpy": the float64 reference (``normops/backends/numpy_backend/group_stats.py``), no autograd:
  a call that needs a gradient is an error.
Counts are int64 (a video's group passes 2**24 values, where fp32 stops counting); mean and M2
are fp32, fp64 for fp64 input.
"""
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .. import backends
from ..core import activate, stat_dtype, suggested_format

# Values a piece of the statistics' passes holds: a 16 MiB fp32 temporary at most (when a slice
# along the split dim is not larger), small beside a tile worth splitting, large enough that the
# per-piece overhead (a few us) is nothing beside reading 4M values.
BLOCK = 1 << 22


class GroupStats(NamedTuple):
    """Statistics of a tensor [N, C, *S] per (sample, group): each [N, G]."""
    count: Tensor  # int64: values per (sample, group), C/G * prod(S)
    mean: Tensor   # fp32 (fp64 for fp64 input)
    m2: Tensor     # sum of squared deviations from mean; var = m2 / count


def _backend(x, grad, num_groups=None):
    """The backend module for a call on x, None for the torch ops; an error when a gradient is
    needed and that backend has none. The triton backend's kernels take stats and apply
    (``num_groups`` given) without a gradient, when its ``fallback`` takes x; anything else there
    runs the torch ops (differentiable; combine works on [N, G] tensors, no kernel's business)."""
    name = backends.current_backend(x.device)
    if name == "torch":
        return None
    module = backends.resolve(x, name)
    if name == "triton":
        return None if grad or num_groups is None or module.fallback("group_norm", x, num_groups) else module
    if grad:
        raise RuntimeError(f"normops' group-norm statistics on the {name} backend have no autograd, and this call "
                           f"needs a gradient: use normops.backend('torch') (plain differentiable torch ops), or "
                           f"call it under torch.no_grad()")
    return module


def _pieces(xg):
    """xg [N, G, C/G, *S] split along its largest dim past G into pieces of about BLOCK values."""
    d = max(range(2, xg.dim()), key=xg.size)
    per_index = xg.numel() // xg.size(d)
    return xg.split(max(1, BLOCK // max(per_index, 1)), dim=d)


def _torch_stats(x, num_groups):
    n, c = x.shape[:2]
    sd = stat_dtype(x)
    count = (c // num_groups) * math.prod(x.shape[2:])
    counts = torch.full((n, num_groups), count, dtype=torch.int64, device=x.device)
    if count == 0:
        zeros = x.new_zeros((n, num_groups), dtype=sd)
        return GroupStats(counts, zeros, zeros.clone())
    xg = x.unflatten(1, (num_groups, c // num_groups))  # a view in any layout (channels_last too)
    dims = tuple(range(2, xg.dim()))
    pieces = _pieces(xg)
    mean = sum(p.sum(dims, dtype=sd) for p in pieces) / count
    centre = mean.reshape(mean.shape + (1,) * len(dims))
    m2 = sum((p.to(sd) - centre).square().sum(dims) for p in pieces)
    return GroupStats(counts, mean, m2)


def group_norm_stats(x, num_groups, grad):
    """GroupStats of x [N, C, *S] (checked by the caller); ``grad``: a gradient is needed."""
    module = _backend(x, grad, num_groups) if x.numel() else None
    if module is None:
        return _torch_stats(x, num_groups)
    return GroupStats(*module.group_norm_stats(x, num_groups))


def _combine_torch(a, b):
    n = a.count + b.count
    sd = a.mean.dtype
    frac = torch.where(n > 0, b.count.to(sd) / n.clamp(min=1).to(sd), 0.0)  # n_b / n; 0 for two empty pieces
    delta = b.mean - a.mean
    return GroupStats(n, a.mean + delta * frac, a.m2 + b.m2 + delta.square() * (a.count.to(sd) * frac))


def combine_group_stats(stats: Sequence[GroupStats], grad) -> GroupStats:
    """One GroupStats of the pieces ``stats`` (checked by the caller), a balanced tree of Chan steps."""
    module = _backend(stats[0].mean, grad)
    step = _combine_torch if module is None else (lambda a, b: GroupStats(*module.combine_group_stats(a, b)))

    def tree(lo, hi):
        if hi - lo == 1:
            return stats[lo]
        mid = (lo + hi) // 2
        return step(tree(lo, mid), tree(mid, hi))

    return tree(0, len(stats))


def _torch_apply(x, num_groups, stats, weight, bias, eps, activation):
    n, c = x.shape[:2]
    sd = stats.mean.dtype
    rstd = torch.rsqrt(stats.m2 / stats.count.to(sd) + eps)
    per_channel = (n, num_groups, c // num_groups)
    # z = (x - mean) * rstd * w + b = x * scale + shift, scale and shift per (sample, channel)
    scale = rstd.unsqueeze(-1).expand(per_channel)
    shift = -stats.mean.unsqueeze(-1) * scale
    if weight is not None:
        scale = scale * weight.to(sd).reshape(1, num_groups, -1)
        shift = shift * weight.to(sd).reshape(1, num_groups, -1)
    if bias is not None:
        shift = shift + bias.to(sd).reshape(1, num_groups, -1)
    view = (n, c) + (1,) * (x.dim() - 2)
    z = torch.addcmul(shift.reshape(view), x.to(sd), scale.reshape(view))
    return activate(z, activation).to(x.dtype).contiguous(memory_format=suggested_format(x))


def group_norm_apply(x, num_groups, stats: GroupStats, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                     activation: str, grad) -> Tensor:
    """GroupNorm of x with the given statistics (checked by the caller)."""
    module = _backend(x, grad, num_groups) if x.numel() else None
    if module is None:
        return _torch_apply(x, num_groups, stats, weight, bias, eps, activation)
    return module.group_norm_apply(x, num_groups, stats.mean, stats.m2, stats.count, weight, bias, eps, activation)
