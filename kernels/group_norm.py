"""GroupNorm in Triton, and InstanceNorm as GroupNorm with groups == channels: forward and
backward, NCHW and channels_last, fused activation, one kernel family.

Shapes: x is (N, C, *spatial), S = prod(spatial), G groups of Cg = C / G channels, L = Cg * S
elements a group. NCHW puts x[n, c, s] at n*C*S + c*S + s, channels_last(_3d) at
n*C*S + s*C + c; a program reads [BLOCK_G groups, BLOCK_CG channels, BLOCK_S positions] tiles
and the CHANNELS_LAST flag says which axis is contiguous, so both layouts are read in place.

Math, per group (n, g):
    forward    x0 = the group's first element (a pivot), d = x - x0 (exact near x0)
               dmean = sum(d) / L      mean = x0 + dmean      var = sum((d - dmean)^2) / L
               rstd = 1 / sqrt(var + eps)        x_hat = (d - dmean) * rstd
               z = x_hat * w[c] + b[c]          y = act(z)
               The pivot keeps the mean's rounding small at a large offset (sum(x) / L rounds at
               the sum's magnitude: x = -50 + 0.01 randn lost 3 digits) and exact for a constant
               group (mean == x, so x_hat == 0 and dw == 0 exactly, as torch's).
    backward   dz = dy * act'(z)  (z rebuilt from x and the saved mean/rstd; nothing else saved)
               per channel:  a[n, c] = sum_s dz * x_hat          b[n, c] = sum_s dz
               c1 = sum_c w[c] * a[n, c] / L                     c2 = sum_c w[c] * b[n, c] / L
               dx = rstd * (w[c] * dz - c2 - x_hat * c1)
               dw[c] = sum_n a[n, c]                             db[c] = sum_n b[n, c]

Programs: one per (block of groups, spatial chunk, sample). When a program's groups fit in one
tile (one pass) the whole computation stays in registers. Otherwise (too big a group, or too few
groups to fill the GPU: a video VAE at N=1 has 32) each group's spatial axis is split into chunks:
    forward    _group_norm_stats_kernel: (mean, M2) of each chunk; _group_norm_fwd_kernel: every
               program combines its groups' chunks with Chan's formula (never E[x^2] - E[x]^2),
               then normalizes its own chunk
    backward   _group_norm_bwd_sums_kernel: a, b of each (sample, chunk, channel), totalled over
               the chunks by torch; _group_norm_bwd_kernel: sums them per group, then writes dx
dw and db are the chunk partials summed in torch in a fixed order: deterministic, no atomics.

Bytes moved, for x of T elements of e bytes:
    forward, one pass      read x: T*e; write y: T*e; mean, rstd: 4*N*G each when a gradient is due
    forward, split         + a second read of x: T*e, from L2 when the tensor fits there (the
                           normalize pass walks the tensor backwards, starting where the statistics
                           pass ended); partials: 8*N*G*split
    backward, one pass     read x, dy: T*e each; write dx: T*e; partials a, b: 8*N*C
    backward, split        + a second read of x and dy: 2*T*e (L2 as above); partials: 8*N*C*split
"""
import math

import torch
import triton
import triton.language as tl

from normops.core import memory_format_of

from .common import ACTIVATIONS, act, act_grad, inv_std, acc_type, dense, launch, param_grads, stat_dtype
from .config import GN_MAX_GROUP_CHANNELS, LOOP_WARPS, GroupNormConfig, programs_per_wave


@triton.jit
def _channels(g0, G, Cg, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """[BLOCK_G, BLOCK_CG] channel indices of groups g0.., and their mask."""
    gi = g0 + tl.arange(0, BLOCK_G)
    chan = gi[:, None] * Cg + tl.arange(0, BLOCK_CG)[None, :]
    return chan, (gi < G)[:, None] & (tl.arange(0, BLOCK_CG) < Cg)[None, :]


@triton.jit
def _tile(chan, cmask, s0, S, C, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr):
    """Offsets (from the sample's start) and mask of the tile of channels `chan`, positions s0.."""
    si = s0 + tl.arange(0, BLOCK_S)
    if CHANNELS_LAST:
        offs = chan[:, :, None] + si[None, None, :] * C
    else:
        offs = chan[:, :, None] * S + si[None, None, :]
    return offs, cmask[:, :, None] & (si < S)[None, None, :]


@triton.jit
def _program(n_gblocks, split, REVERSED: tl.constexpr):
    """(group block, chunk, sample) of this program; the group block varies fastest, so programs
    running together share a sample's rows (channels_last) and its chunk of the positions."""
    pid = tl.program_id(0)
    if REVERSED:
        pid = tl.num_programs(0) - 1 - pid
    return pid % n_gblocks, (pid // n_gblocks) % split, pid // (n_gblocks * split)


@triton.jit
def _chunk(sp, chunk, S, BLOCK_S: tl.constexpr):
    """First position and tile count of chunk sp (the normalize passes walk its tiles backwards)."""
    s_begin = sp * chunk
    return s_begin, tl.cdiv(tl.minimum(chunk, S - s_begin), BLOCK_S)


@triton.jit
def _pivot(X, base, gi, G, Cg, S, CHANNELS_LAST: tl.constexpr):
    """[BLOCK_G] first element (channel gi * Cg, position 0) of each group: the shift x0."""
    first = gi * Cg if CHANNELS_LAST else gi * Cg * S
    return tl.load(X + base + first, mask=gi < G, other=0.0)


@triton.jit
def _sum2(t):
    """Sum of a [BLOCK_G, BLOCK_CG, BLOCK_S] tile per group."""
    return tl.sum(tl.sum(t, 2), 1)


@triton.jit
def _affine(W, B, chan, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """Per-channel weight and bias as [BLOCK_G, BLOCK_CG, 1] (1 and 0 when absent)."""
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(W + chan, mask=cmask, other=0.0).to(ACC)[:, :, None]
    if HAS_B:
        b = tl.load(B + chan, mask=cmask, other=0.0).to(ACC)[:, :, None]
    return w, b


@triton.jit
def _group_norm_stats_kernel(
    X,                 # [N, C, *spatial] input, NCHW or channels_last
    PART,              # [N, G, split, 2] out: (mean, M2) of each group's chunk, ACC dtype
    G, Cg, S, C, n_gblocks, split, chunk,
    CHANNELS_LAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
):
    """Split mode, pass 1: Chan's running (count, mean, M2) of x - x0 over the tiles of this chunk."""
    gb, sp, n = _program(n_gblocks, split, False)
    x_base = X + n.to(tl.int64) * C * S
    chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
    x0 = _pivot(x_base, 0, gb * BLOCK_G + tl.arange(0, BLOCK_G), G, Cg, S, CHANNELS_LAST).to(ACC)
    count = tl.zeros([], dtype=ACC)
    mean = tl.zeros([BLOCK_G], dtype=ACC)
    m2 = tl.zeros([BLOCK_G], dtype=ACC)
    s_begin = sp * chunk
    for s0 in range(s_begin, tl.minimum(S, s_begin + chunk), BLOCK_S):
        offs, mask = _tile(chan, cmask, s0, S, C, CHANNELS_LAST, BLOCK_S)
        x = tl.load(x_base + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
        x = tl.where(mask, x - x0[:, None, None], 0.0)
        n_b = (Cg * tl.minimum(BLOCK_S, S - s0)).to(ACC)
        mean_b = _sum2(x) / n_b
        d = tl.where(mask, x - mean_b[:, None, None], 0.0)
        m2_b = _sum2(d * d)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    p = PART + ((n.to(tl.int64) * G + gi) * split + sp) * 2
    tl.store(p, mean, mask=gi < G)
    tl.store(p + 1, m2, mask=gi < G)


@triton.jit
def _combine(PART, n, gi, G, Cg, S, split, chunk, eps, INSTANCE: tl.constexpr,
             BLOCK_G: tl.constexpr, BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr):
    """(mean, rstd) of groups gi from their chunks' (mean, M2), of x - x0 (the mean is dmean):
    Chan's formula for many parts,
    mean = sum(n_i mean_i) / L, then M2 = sum(M2_i + n_i (mean_i - mean)^2), in a fixed order,
    BLOCK_SPLIT chunks at a time."""
    rows = (n.to(tl.int64) * G + gi)[:, None] * split
    total = Cg * S
    acc = tl.zeros([BLOCK_G, BLOCK_SPLIT], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (gi < G)[:, None] & (sp < split)[None, :]
        n_i = tl.where(sp < split, Cg * tl.minimum(chunk, S - sp * chunk), 0).to(ACC)[None, :]
        acc += n_i * tl.load(PART + (rows + sp[None, :]) * 2, mask=m, other=0.0)
    mean = tl.sum(acc, 1) / total
    acc = tl.zeros([BLOCK_G, BLOCK_SPLIT], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (gi < G)[:, None] & (sp < split)[None, :]
        n_i = tl.where(sp < split, Cg * tl.minimum(chunk, S - sp * chunk), 0).to(ACC)[None, :]
        p = PART + (rows + sp[None, :]) * 2
        d = tl.load(p, mask=m, other=0.0) - mean[:, None]
        acc += tl.where(m, tl.load(p + 1, mask=m, other=0.0) + n_i * d * d, 0.0)
    return mean, inv_std(tl.sum(acc, 1) / total, eps, INSTANCE)


@triton.jit
def _group_norm_fwd_kernel(
    X, Y,              # [N, C, *spatial] input, output, both in x's layout
    W, B,              # [C] weight, bias
    MEAN, RSTD,        # [N, G] out: statistics, ACC dtype, written when STORE_STATS
    PART,              # [N, G, split, 2] chunk statistics from _group_norm_stats_kernel (split mode)
    G, Cg, S, C, n_gblocks, split, chunk, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, STORE_STATS: tl.constexpr,
    INSTANCE: tl.constexpr,  # instance_norm's call: a constant channel with eps = 0 takes rstd 0 (inv_std)
    CHANNELS_LAST: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr,
):
    # split mode walks the tensor backwards: the stats pass just read its end, which is in L2
    gb, sp, n = _program(n_gblocks, split, not ONE_PASS)
    base = n.to(tl.int64) * C * S
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
    x0 = _pivot(X, base, gi, G, Cg, S, CHANNELS_LAST).to(ACC)
    if ONE_PASS:
        offs, mask = _tile(chan, cmask, 0, S, C, CHANNELS_LAST, BLOCK_S)
        d = tl.where(mask, tl.load(X + base + offs, mask=mask, other=0.0).to(ACC) - x0[:, None, None], 0.0)
        dmean = _sum2(d) / (Cg * S)
        xc = tl.where(mask, d - dmean[:, None, None], 0.0)
        rstd = inv_std(_sum2(xc * xc) / (Cg * S), eps, INSTANCE)
    else:
        dmean, rstd = _combine(PART, n, gi, G, Cg, S, split, chunk, eps, INSTANCE, BLOCK_G, BLOCK_SPLIT, ACC)
    if STORE_STATS:
        if sp == 0:
            tl.store(MEAN + n * G + gi, x0 + dmean, mask=gi < G)
            tl.store(RSTD + n * G + gi, rstd, mask=gi < G)
    w, b = _affine(W, B, chan, cmask, HAS_W, HAS_B, ACC)
    scale = rstd[:, None, None] * w
    if ONE_PASS:
        tl.store(Y + base + offs, act(xc * scale + b, ACT).to(Y.dtype.element_ty), mask=mask)
    else:
        s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
        for i in range(0, n_tiles):
            offs, mask = _tile(chan, cmask, s_begin + (n_tiles - 1 - i) * BLOCK_S, S, C, CHANNELS_LAST, BLOCK_S)
            x = tl.load(X + base + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
            z = ((x - x0[:, None, None]) - dmean[:, None, None]) * scale + b
            tl.store(Y + base + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT: tl.constexpr, ACC: tl.constexpr):
    """x_hat and dz = dy * act'(z) of one tile, zero outside the mask."""
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(ACC)
    x_hat = tl.where(mask, (x - mean[:, None, None]) * rstd[:, None, None], 0.0)
    if ACT != 0:
        dz = dz * act_grad(x_hat * w + b, ACT)
    return x_hat, tl.where(mask, dz, 0.0)


@triton.jit
def _saved(MEAN, RSTD, W, B, n, gb, G, Cg, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
           BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, ACC: tl.constexpr):
    """What a backward program holds throughout: its groups' saved mean and rstd ([BLOCK_G]), its
    channels, and their weight and bias."""
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    mean = tl.load(MEAN + n * G + gi, mask=gi < G, other=0.0)
    rstd = tl.load(RSTD + n * G + gi, mask=gi < G, other=0.0)
    chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
    w, b = _affine(W, B, chan, cmask, HAS_W, HAS_B, ACC)
    return mean, rstd, chan, cmask, w, b


@triton.jit
def _group_norm_bwd_sums_kernel(
    DY, X,             # [N, C, *spatial] output gradient, input, both in x's layout
    W, B,              # [C] weight, bias (read for the activation's input only)
    MEAN, RSTD,        # [N, G] saved statistics
    PART,              # [N, split, 2, C] out: a and b of each (sample, chunk, channel), ACC dtype
    G, Cg, S, C, n_gblocks, split, chunk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Split mode, pass 1 of the backward: the per-channel sums over this chunk."""
    gb, sp, n = _program(n_gblocks, split, False)
    base = n.to(tl.int64) * C * S
    mean, rstd, chan, cmask, w, b = _saved(MEAN, RSTD, W, B, n, gb, G, Cg, HAS_W, HAS_B, BLOCK_G, BLOCK_CG, ACC)
    a_sum = tl.zeros([BLOCK_G, BLOCK_CG], dtype=ACC)
    b_sum = tl.zeros([BLOCK_G, BLOCK_CG], dtype=ACC)
    s_begin = sp * chunk
    for s0 in range(s_begin, tl.minimum(S, s_begin + chunk), BLOCK_S):
        offs, mask = _tile(chan, cmask, s0, S, C, CHANNELS_LAST, BLOCK_S)
        x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
        a_sum += tl.sum(dz * x_hat, 2)
        b_sum += tl.sum(dz, 2)
    p = PART + (n.to(tl.int64) * split + sp) * 2 * C + chan
    tl.store(p, a_sum, mask=cmask)
    tl.store(p + C, b_sum, mask=cmask)


@triton.jit
def _group_norm_bwd_kernel(
    DY, X,             # [N, C, *spatial] output gradient, input, both in x's layout
    W, B,              # [C] weight, bias
    MEAN, RSTD,        # [N, G] saved statistics
    PART,              # [N, 2, C] per-channel a and b: written (one pass), or read (split: the chunk sums' totals)
    DX,                # [N, C, *spatial] out, x's layout
    G, Cg, S, C, n_gblocks, split, chunk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, WANT_DX: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ONE_PASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
    BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    gb, sp, n = _program(n_gblocks, split, not ONE_PASS)
    base = n.to(tl.int64) * C * S
    mean, rstd, chan, cmask, w, b = _saved(MEAN, RSTD, W, B, n, gb, G, Cg, HAS_W, HAS_B, BLOCK_G, BLOCK_CG, ACC)
    if ONE_PASS:
        offs, mask = _tile(chan, cmask, 0, S, C, CHANNELS_LAST, BLOCK_S)
        x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
        a_sum = tl.sum(dz * x_hat, 2)
        b_sum = tl.sum(dz, 2)
        p = PART + n.to(tl.int64) * 2 * C + chan
        tl.store(p, a_sum, mask=cmask)
        tl.store(p + C, b_sum, mask=cmask)
    else:
        p = PART + n.to(tl.int64) * 2 * C + chan  # the chunks' sums, totalled (in torch) per sample
        a_sum = tl.load(p, mask=cmask, other=0.0)
        b_sum = tl.load(p + C, mask=cmask, other=0.0)
    if WANT_DX:
        if HAS_W:
            a_sum = a_sum * tl.sum(w, 2)  # w[c] * a[n, c]: w is [BLOCK_G, BLOCK_CG, 1]
            b_sum = b_sum * tl.sum(w, 2)
        c1 = tl.sum(a_sum, 1)[:, None, None] / (Cg * S)
        c2 = tl.sum(b_sum, 1)[:, None, None] / (Cg * S)
        r = rstd[:, None, None]
        if ONE_PASS:
            dx = r * (w * dz - c2 - x_hat * c1)
            tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
            for i in range(0, n_tiles):
                offs, mask = _tile(chan, cmask, s_begin + (n_tiles - 1 - i) * BLOCK_S, S, C, CHANNELS_LAST,
                                   BLOCK_S)
                x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
                dx = r * (w * dz - c2 - x_hat * c1)
                tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

def supported(x, num_groups):
    """Whether these kernels take x: the per-sample offsets are int32 and a group's channels must
    fit in one tile row (kernels/config.py)."""
    c = x.shape[1]
    return c // num_groups <= GN_MAX_GROUP_CHANNELS and c * math.prod(x.shape[2:]) < 2**31


def _geometry(x, num_groups):
    n, c = x.shape[0], x.shape[1]
    return n, c, math.prod(x.shape[2:]), num_groups


def _grid(cfg, n, groups):
    n_gblocks = triton.cdiv(groups, cfg.block_g)
    return n_gblocks, (n_gblocks * cfg.split * n,)


def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, config=None):
    """The triton backend's group_norm forward (contract: normops/backends/__init__.py).
    `config` overrides the heuristic (tests use it to force the split path at small shapes)."""
    fmt = memory_format_of(x)  # channels_last(_3d) when x is dense in it: read in place
    channels_last = fmt != torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    weight, bias = dense(weight), dense(bias)
    n, c, s, g = _geometry(x, num_groups)
    cfg = config or GroupNormConfig.forward(n, c, s, g, channels_last, programs_per_wave(x.device, LOOP_WARPS))
    n_gblocks, grid = _grid(cfg, n, g)
    sd = stat_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty((n, g), dtype=sd, device=x.device) if need_stats else None
    rstd = torch.empty((n, g), dtype=sd, device=x.device) if need_stats else None
    part = None
    geometry = (g, c // g, s, c, n_gblocks, cfg.split, cfg.chunk)
    tile = dict(CHANNELS_LAST=channels_last, BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg, BLOCK_S=cfg.block_s,
                ACC=acc_type(x.dtype), num_warps=cfg.num_warps)
    if not cfg.one_pass:
        part = torch.empty((n, g, cfg.split, 2), dtype=sd, device=x.device)
        launch(_group_norm_stats_kernel, grid, x, part, *geometry, **tile)
    launch(
        _group_norm_fwd_kernel, grid, x, y, weight if weight is not None else y, bias if bias is not None else y,
        mean if mean is not None else y, rstd if rstd is not None else y, part if part is not None else y,
        *geometry, eps, HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
        STORE_STATS=need_stats, INSTANCE=instance, ONE_PASS=cfg.one_pass, BLOCK_SPLIT=cfg.split_block, **tile)
    return y, mean, rstd


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask, config=None):
    """The triton backend's group_norm backward (contract: normops/backends/__init__.py)."""
    fmt = memory_format_of(x)
    channels_last = fmt != torch.contiguous_format
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    weight, bias = dense(weight), dense(bias)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    want_dx = output_mask[0]
    want_dw = output_mask[1] and weight is not None
    want_db = output_mask[2] and bias is not None
    n, c, s, g = _geometry(x, num_groups)
    cfg = config or GroupNormConfig.backward(n, c, s, g, channels_last, programs_per_wave(x.device, LOOP_WARPS))
    n_gblocks, grid = _grid(cfg, n, g)
    sd = stat_dtype(x.dtype)
    dx = torch.empty_like(x) if want_dx else None
    part = torch.empty((n, cfg.split, 2, c), dtype=sd, device=x.device)
    geometry = (g, c // g, s, c, n_gblocks, cfg.split, cfg.chunk)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
                 CHANNELS_LAST=channels_last, BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg, BLOCK_S=cfg.block_s,
                 ACC=acc_type(x.dtype), num_warps=cfg.num_warps)
    w_arg = weight if weight is not None else rstd
    b_arg = bias if bias is not None else rstd
    if not cfg.one_pass:
        launch(_group_norm_bwd_sums_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, part, *geometry, **flags)
    # [N, 2, C]: the chunks' sums totalled in a fixed order (deterministic), in one parallel reduction
    # rather than chunk after chunk in every dx program
    part = part.sum(1) if cfg.split > 1 else part[:, 0]
    if cfg.one_pass or want_dx:
        launch(_group_norm_bwd_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, part, dx if dx is not None else rstd,
               *geometry, WANT_DX=want_dx, ONE_PASS=cfg.one_pass, **flags)
    if not (want_dw or want_db):
        return dx, None, None
    sums = part.sum(0)  # [2, C], a fixed-order reduction over samples: deterministic
    return (dx, *param_grads(sums, weight, bias, want_dw, want_db))
