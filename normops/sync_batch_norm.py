"""SyncBatchNorm: batch statistics over every rank of a ``torch.distributed`` process group.

Forward, per channel: each rank computes (count, mean, M2) of its own batch, the ranks exchange
them (one all_gather of a [3, C] tensor) and every rank combines them in rank order with Chan's
formula, mean = sum(n_r mean_r) / n, M2 = sum(M2_r + n_r (mean_r - mean)^2): exact for uneven
per-rank batches and for a rank with an empty one, and never E[x^2] - E[x]^2. Backward: the two
per-channel sums sum(dz) and sum(dz * (x - mean)) are all-reduced, then
    dx = (dz - sum(dz) / n - (x - mean) * rstd^2 * sum(dz (x - mean)) / n) * rstd * w
The weight and bias gradients stay per rank (DistributedDataParallel reduces them), as in torch.
Any backend and device torch.distributed supports: gloo on CPU tensors (which torch's own
SyncBatchNorm refuses) and NCCL on CUDA ones. Statistics accumulate in fp32 (fp64 for fp64) and are
exchanged and combined in fp64.

Bad input raises on every rank, never on one alone (the others would wait in the collective for
ever), and never reaches the statistics exchange (gloo aborts the process on tensors of different
sizes). Each rank first checks its own input as BatchNorm does; then the ranks all_gather a small
descriptor (that check's verdict, C, dtype, device type) and go on only when every rank passed and
all agree. Otherwise every rank gathers the details and raises the same error.
"""
import zlib

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from .core import ShapeError, activate, activation_backward, channel_view, stat_dtype


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, activation, group):
        c = x.shape[1]
        sd = stat_dtype(x)
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(sd)
        count = x.numel() // c
        if count:
            var, mean = torch.var_mean(xf, dim=dims, correction=0)
        else:
            var = mean = torch.zeros(c, dtype=sd, device=x.device)
        # [3, C]: n, mean, M2, exchanged and combined in fp64 (counts past 2^24 stay exact)
        local = torch.stack([torch.full_like(mean, count), mean, var * count]).double()
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        n_r, mean_r, m2_r = torch.stack(gathered).unbind(1)  # [ranks, C] each
        n = n_r.sum(0)
        total = int(n[0].item())
        if total <= 1:  # every rank sees the same total, so every rank raises: no rank is left waiting
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over all "
                             f"ranks (input size on this rank {list(x.shape)})")
        mean64 = (n_r * mean_r).sum(0) / n
        m2 = (m2_r + n_r * (mean_r - mean64).square()).sum(0)
        mean, rstd = mean64.to(sd), torch.rsqrt(m2 / n + eps).to(sd)
        scale = rstd if weight is None else rstd * weight.to(sd)
        z = (xf - channel_view(mean, x)) * channel_view(scale, x)
        if bias is not None:
            z = z + channel_view(bias.to(sd), x)
        y = activate(z.to(x.dtype), activation)
        if running_mean is not None:  # after everything that can fail; unbiased variance, as torch
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((m2 / (n - 1)).to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.cfg = (activation, group, total)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        activation, group, total = ctx.cfg
        sd = mean.dtype
        dims = [0] + list(range(2, x.dim()))
        xmu = x.to(sd) - channel_view(mean, x)
        dz = dy
        if activation != "none":  # the activation's input, rebuilt from x and the statistics
            scale = rstd if weight is None else rstd * weight.to(sd)
            z = xmu * channel_view(scale, x)
            if bias is not None:
                z = z + channel_view(bias.to(sd), x)
            dz = activation_backward(dy, z.to(x.dtype), activation)
        dz = dz.to(sd)
        sums = torch.stack([dz.sum(dims), (dz * xmu).sum(dims)])  # this rank's, for dw/db below
        both = sums.clone()
        dist.all_reduce(both, group=group)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            w = rstd if weight is None else rstd * weight.to(sd)
            dx = ((dz - channel_view(both[0] / total, x) - xmu * channel_view(rstd.square() * both[1] / total, x))
                  * channel_view(w, x)).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            dw = (sums[1] * rstd).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            db = sums[0].to(bias.dtype)
        return dx, dw, db, None, None, None, None, None, None


def _code(name):
    """A number for a dtype or device type name that every process computes alike (hash() is salted)."""
    return zlib.crc32(name.encode())


def _descriptor_device(group, x):
    """Where the descriptor is exchanged: on CPU, unless the group's backend is NCCL alone (it takes
    CUDA tensors only), whatever device this rank's (possibly bad) input is on."""
    if dist.get_backend(group) == "nccl":
        return x.device if isinstance(x, Tensor) and x.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_error(input, weight, bias, running_mean, running_var, check):
    """What this rank's own checks find wrong with its input (BatchNorm's, and the caller's ``check``),
    or None: caught, not raised, so that every rank raises it together."""
    try:
        if check is not None and isinstance(input, Tensor):  # a non-tensor is refused below
            check(input)
        F.check_per_channel(input, "SyncBatchNorm", running_mean, running_var, weight, bias)
    except (TypeError, ValueError, RuntimeError) as e:
        return e
    return None


def _agree(group, input, error):
    """Returns when every rank of ``group`` passed its own checks and all have the same C, dtype and
    device type; else raises one error, the same on every rank (decided from gathered data only)."""
    x = input if isinstance(input, Tensor) else None
    c = x.shape[1] if x is not None and x.dim() > 1 else -1
    dtype, device = (str(x.dtype), x.device.type) if x is not None else ("-", "-")
    mine = torch.tensor([error is None, c, _code(dtype), _code(device)], dtype=torch.int64,
                        device=_descriptor_device(group, input))
    ranks = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(ranks, mine, group=group)
    if all(bool(r[0]) and torch.equal(r, ranks[0]) for r in ranks):
        return
    # Something is wrong somewhere: every rank gathers the details (a second collective, on this
    # failure path only) and builds the same error from them.
    details = [None] * len(ranks)
    dist.all_gather_object(details, (None if error is None else (type(error), str(error)), c, dtype, device),
                           group=group)
    failed = [(r, e) for r, (e, *_) in enumerate(details) if e is not None]
    if failed:
        cls = failed[0][1][0]
        raise cls("SyncBatchNorm: " + "; ".join(f"on rank {r}: {message}" for r, (_, message) in failed)
                  + " (raised on every rank)")
    channels, dtypes = {d[1] for d in details}, {d[2] for d in details}
    cls = ShapeError if len(channels) > 1 else TypeError if len(dtypes) > 1 else RuntimeError
    raise cls("SyncBatchNorm needs the same number of channels, dtype and device type on every rank, got "
              + "; ".join(f"rank {r}: {d[1]} channels, {d[2]} on {d[3]}" for r, d in enumerate(details)))


def sync_batch_norm(input: Tensor, weight, bias, running_mean, running_var, eps, momentum, activation, group,
                    check=None):
    """Training-mode batch norm over every rank of `group` (statistics exchanged, then normalized);
    running statistics, when given, are updated in place with the global ones. ``check(input)``:
    the caller's own input checks, raising TypeError, ValueError or RuntimeError; like BatchNorm's
    own, a failure on any rank raises on every rank, before any statistics are exchanged."""
    _agree(group, input, _local_error(input, weight, bias, running_mean, running_var, check))
    return _SyncBatchNorm.apply(input, weight, bias, running_mean, running_var, float(eps), float(momentum),
                                activation, group)
