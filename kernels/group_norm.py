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
               (PER_SAMPLE: w[n, c], b[n, c], ada_group_norm's modulation 1 + scale, shift;
               TORCH_CASTING: x_hat, x_hat * w and z rounded to y's dtype in turn, diffusers'
               AdaGroupNorm's steps; the backward is the same, the roundings straight-through)
               The pivot keeps the mean's rounding small at a large offset (sum(x) / L rounds at
               the sum's magnitude: x = -50 + 0.01 randn lost 3 digits) and exact for a constant
               group (mean == x, so x_hat == 0 and dw == 0 exactly, as torch's).
    backward   dz = dy * act'(z)  (z rebuilt from x and the saved mean/rstd; nothing else saved)
               per channel:  a[n, c] = sum_s dz * x_hat          b[n, c] = sum_s dz
               c1 = sum_c w[c] * a[n, c] / L                     c2 = sum_c w[c] * b[n, c] / L
               dx = rstd * (w[c] * dz - c2 - x_hat * c1)
               dw[c] = sum_n a[n, c]                             db[c] = sum_n b[n, c]
               (PER_SAMPLE: dw[n, c] = a[n, c], db[n, c] = b[n, c], no sum over n)

Three algorithms (GroupNormConfig, kernels/config.py, picks):
    one pass   a program's groups fit in one tile: the whole computation stays in registers.
    looped     one persistent program per group block (at most one an SM, the groups in flight
               within L2): a statistics loop (Welford per lane, no reduction inside, lanes merged
               with Chan's formula after), then a normalize (backward: dx) loop that re-reads the
               group backwards, from L2. One launch forward.
    split      too few groups to fill the GPU (a VAE or video at N=1 has 32): each group's
               spatial axis is cut into chunks.
               forward   _group_norm_stats_kernel: (mean, M2) of each chunk; _group_norm_fwd_kernel:
                         every program combines its groups' chunks with Chan's formula (never
                         E[x^2] - E[x]^2), then normalizes its own chunk
               backward  _group_norm_bwd_sums_kernel: a, b of each (sample, chunk, channel);
                         _group_norm_bwd_kernel totals them per group in a fixed order, writes dx
dw and db: the per-program partials summed in a fixed order by _group_norm_param_grads_kernel, in
the parameters' dtype (the backward's one glue launch): deterministic, no atomics.

Bytes moved, for x of T elements of e bytes:
    forward, one pass      read x: T*e; write y: T*e; mean, rstd: 4*N*G each when a gradient is due
    forward, split         + a second read of x: T*e, from L2 when the tensor fits there (the
                           normalize pass walks the tensor backwards, starting where the statistics
                           pass ended); partials: 8*N*G*split
    forward, looped        + a second read of x: T*e, from L2 (the groups in flight fit there)
    backward, one pass     read x, dy: T*e each; write dx: T*e; partials a, b: 8*N*C
    backward, looped       + a second read of x and dy: 2*T*e, from L2
    backward, split        + a second read of x and dy: 2*T*e (L2 as above); partials: 8*N*C*split
"""
import math

import torch
import triton
import triton.language as tl

from normops.core import is_batch_invariant, memory_format_of

from .common import ACTIVATIONS, act, act_grad, inv_std, acc_type, dense, launch, stat_dtype
from .config import GN_LOOP_WARPS, GN_MAX_GROUP_CHANNELS, GroupNormConfig, programs_per_wave


@triton.jit
def _channels(g0, G, Cg, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    """[BLOCK_G, BLOCK_CG] channel indices of groups g0.., and their mask."""
    gi = g0 + tl.arange(0, BLOCK_G)
    chan = gi[:, None] * Cg + tl.arange(0, BLOCK_CG)[None, :]
    return chan, (gi < G)[:, None] & (tl.arange(0, BLOCK_CG) < Cg)[None, :]


@triton.jit
def _group_size(Cg, S, LARGE: tl.constexpr):
    """Cg * S: a group's element count (int64 when LARGE: one group can pass 2**31 elements)."""
    if LARGE:
        Cg = tl.cast(Cg, tl.int64)
    return Cg * S


@triton.jit
def _tile(chan, cmask, base, s0, S, C, CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, LARGE: tl.constexpr):
    """(tbase, offs, mask) of the tile of channels `chan`, positions s0..: its elements are at
    P + tbase + offs of a tensor P, tbase the sample's base (int64), offs int32.

    LARGE (a sample of 2**31 elements or more): the int64 part of an offset is a row's start, in
    tbase, and the lanes keep int32 offsets within their row: channels_last, each position's row
    (s * C, [1, 1, BLOCK_S]; the lanes, channels); NCHW, each channel's (c * S, [BLOCK_G,
    BLOCK_CG, 1]; the lanes, positions). Positions, masks and counts stay int32. Casting C and S
    to int64 instead made all of those int64, and 10 of the 86 configurations spilled on sm_90
    (up to 344 bytes, the channels_last looped forward); one int64 start a tile for channels_last
    (s0 * C, lanes chan + j * C) still spilled 8 bytes there (its lane offsets are loop-invariant,
    held in registers across the loops), and needs C * BLOCK_S < 2**31."""
    si = s0 + tl.arange(0, BLOCK_S)
    if LARGE and CHANNELS_LAST:
        base = base + (tl.cast(si, tl.int64) * C)[None, None, :]
        offs = chan[:, :, None]
    elif LARGE:
        base = base + tl.cast(chan, tl.int64)[:, :, None] * S
        offs = si[None, None, :]
    elif CHANNELS_LAST:
        offs = chan[:, :, None] + si[None, None, :] * C
    else:
        offs = chan[:, :, None] * S + si[None, None, :]
    return base, offs, cmask[:, :, None] & (si < S)[None, None, :]


@triton.jit
def _task(t, n_gblocks, split):
    """(group block, chunk, sample) of task t; the group block varies fastest, so programs running
    together share a sample's rows (channels_last) and its chunk of the positions."""
    return t % n_gblocks, (t // n_gblocks) % split, t // (n_gblocks * split)


@triton.jit
def _chunk(sp, chunk, S, BLOCK_S: tl.constexpr):
    """First position and tile count of chunk sp (a multiple of BLOCK_S positions; the last one ends at S)."""
    s_begin = sp * chunk
    return s_begin, tl.cdiv(tl.minimum(chunk, S - s_begin), BLOCK_S)


@triton.jit
def _pivot(X, base, gi, G, Cg, S, CHANNELS_LAST: tl.constexpr, LARGE: tl.constexpr):
    """[BLOCK_G] first element (channel gi * Cg, position 0) of each group: the shift x0."""
    first = gi * Cg if CHANNELS_LAST else _group_size(gi * Cg, S, LARGE)
    return tl.load(X + base + first, mask=gi < G, other=0.0)


@triton.jit
def _sum2(t):
    """Sum of a [BLOCK_G, BLOCK_CG, BLOCK_S] tile per group."""
    return tl.sum(tl.sum(t, 2), 1)


@triton.jit
def _affine(W, B, n, C, chan, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_SAMPLE: tl.constexpr,
            ACC: tl.constexpr):
    """Weight and bias of channels chan (of sample n when PER_SAMPLE: [N, C] parameters) as
    [BLOCK_G, BLOCK_CG, 1] (1 and 0 when absent)."""
    w = 1.0
    b = 0.0
    if PER_SAMPLE:
        chan = n * C + chan  # N * C is a parameter tensor's size: int32
    if HAS_W:
        w = tl.load(W + chan, mask=cmask, other=0.0).to(ACC)[:, :, None]
    if HAS_B:
        b = tl.load(B + chan, mask=cmask, other=0.0).to(ACC)[:, :, None]
    return w, b


@triton.jit
def _welford_tile(X, base, chan, cmask, x0, mean, m2, s0, s_end, count, S, C, CHANNELS_LAST: tl.constexpr,
                  BLOCK_S: tl.constexpr, ACC: tl.constexpr, LARGE: tl.constexpr):
    """One tile (positions s0.., below s_end) into the lanes' running (mean, M2); `count`: a valid
    lane's count with this tile."""
    tbase, offs, mask = _tile(chan, cmask, base, s0, S, C, CHANNELS_LAST, BLOCK_S, LARGE)
    mask = mask & (s0 + tl.arange(0, BLOCK_S) < s_end)[None, None, :]
    x = tl.load(X + tbase + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
    delta = tl.where(mask, x - x0[:, None, None] - mean, 0.0)
    mean += delta * (tl.full([], 1.0, ACC) / count)
    m2 += delta * tl.where(mask, x - x0[:, None, None] - mean, 0.0)
    return mean, m2


@triton.jit
def _chunk_stats(X, base, chan, cmask, x0, s_begin, n_tiles, S, C, CHANNELS_LAST: tl.constexpr,
                 BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, UNROLL: tl.constexpr,
                 ACC: tl.constexpr, LARGE: tl.constexpr):
    """(mean, M2) per group of x - x0 over n_tiles tiles from position s_begin.

    Welford per lane: every lane keeps the running mean and M2 of the values it loads, so the loop
    body has no reduction (no barrier: the next tile's loads issue at once). Only the last tile
    can be partial, so a valid lane's count at tile i is i + 1, one scalar reciprocal a tile. The
    lanes are merged once, after the loop, with Chan's formula. UNROLL = 2 takes two tiles an
    iteration (twice the loads in flight for the registers of one tile's state)."""
    mean = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=ACC)
    m2 = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=ACC)
    s_end = s_begin + n_tiles * BLOCK_S
    for i in range(0, n_tiles, UNROLL):
        for u in tl.static_range(UNROLL):  # tiles past the chunk's end are all masked
            mean, m2 = _welford_tile(X, base, chan, cmask, x0, mean, m2, s_begin + (i + u) * BLOCK_S, s_end,
                                     i + u + 1, S, C, CHANNELS_LAST, BLOCK_S, ACC, LARGE)
    _, _, last = _tile(chan, cmask, 0, s_begin + (n_tiles - 1) * BLOCK_S, S, C, CHANNELS_LAST, BLOCK_S, False)
    count = tl.where(cmask[:, :, None], n_tiles - 1, 0).to(ACC) + last.to(ACC)
    total = _sum2(count)
    group_mean = _sum2(count * mean) / total
    d = mean - group_mean[:, None, None]
    return group_mean, _sum2(m2 + count * d * d)


@triton.jit
def _group_norm_stats_kernel(
    X,                 # [N, C, *spatial] input, NCHW or channels_last
    PART,              # [N, G, split, 2] out: (mean, M2) of x - x0 over each group's chunk, ACC dtype
    G, Cg, S, C, n_gblocks, split, chunk,
    CHANNELS_LAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr, ACC: tl.constexpr,
    LARGE: tl.constexpr,  # a sample of 2**31 elements or more (_tile)
):
    """Split mode, pass 1: the statistics of one chunk (one program a task)."""
    gb, sp, n = _task(tl.program_id(0), n_gblocks, split)
    x_base = X + tl.cast(n, tl.int64) * C * S
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
    x0 = _pivot(x_base, 0, gi, G, Cg, S, CHANNELS_LAST, LARGE).to(ACC)
    s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
    mean, m2 = _chunk_stats(x_base, 0, chan, cmask, x0, s_begin, n_tiles, S, C, CHANNELS_LAST,
                            BLOCK_G, BLOCK_CG, BLOCK_S, UNROLL, ACC, LARGE)
    p = PART + ((tl.cast(n, tl.int64) * G + gi) * split + sp) * 2
    tl.store(p, mean, mask=gi < G)
    tl.store(p + 1, m2, mask=gi < G)


@triton.jit
def _combine(PART, n, gi, G, Cg, S, split, chunk, BLOCK_G: tl.constexpr, BLOCK_SPLIT: tl.constexpr,
             ACC: tl.constexpr, LARGE: tl.constexpr):
    """(mean, M2) of groups gi from their chunks' (mean, M2), of x - x0 (the mean is dmean):
    Chan's formula for many parts,
    mean = sum(n_i mean_i) / L, then M2 = sum(M2_i + n_i (mean_i - mean)^2), in a fixed order,
    BLOCK_SPLIT chunks at a time."""
    rows = (tl.cast(n, tl.int64) * G + gi)[:, None] * split
    total = _group_size(Cg, S, LARGE)
    acc = tl.zeros([BLOCK_G, BLOCK_SPLIT], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (gi < G)[:, None] & (sp < split)[None, :]
        n_i = tl.where(sp < split, _group_size(Cg, tl.minimum(chunk, S - sp * chunk), LARGE), 0).to(ACC)[None, :]
        acc += n_i * tl.load(PART + (rows + sp[None, :]) * 2, mask=m, other=0.0)
    mean = tl.sum(acc, 1) / total
    acc = tl.zeros([BLOCK_G, BLOCK_SPLIT], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (gi < G)[:, None] & (sp < split)[None, :]
        n_i = tl.where(sp < split, _group_size(Cg, tl.minimum(chunk, S - sp * chunk), LARGE), 0).to(ACC)[None, :]
        p = PART + (rows + sp[None, :]) * 2
        d = tl.load(p, mask=m, other=0.0) - mean[:, None]
        acc += tl.where(m, tl.load(p + 1, mask=m, other=0.0) + n_i * d * d, 0.0)
    return mean, tl.sum(acc, 1)


@triton.jit
def _group_norm_stats_combine_kernel(
    X,                 # [N, C, *spatial] input, NCHW or channels_last (its groups' pivots)
    PART,              # [N, G, split, 2] (mean, M2) of each chunk, from _group_norm_stats_kernel
    MEAN, M2,          # [N, G] out: each group's mean and sum of squared deviations, ACC dtype
    G, Cg, S, C, n_gblocks, split, chunk,
    CHANNELS_LAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr,
    LARGE: tl.constexpr,  # a sample of 2**31 elements or more (_tile)
):
    """group_norm_stats: the chunks of BLOCK_G groups of a sample combined (Chan's formula, as the
    split forward combines them), the pivot added back to the mean."""
    gb, n = tl.program_id(0) % n_gblocks, tl.program_id(0) // n_gblocks
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    x0 = _pivot(X, tl.cast(n, tl.int64) * C * S, gi, G, Cg, S, CHANNELS_LAST, LARGE).to(ACC)
    dmean, m2 = _combine(PART, n, gi, G, Cg, S, split, chunk, BLOCK_G, BLOCK_SPLIT, ACC, LARGE)
    tl.store(MEAN + n * G + gi, x0 + dmean, mask=gi < G)
    tl.store(M2 + n * G + gi, m2, mask=gi < G)


@triton.jit
def _torch_steps(x_hat, w, b, DT: tl.constexpr):
    """z = x_hat * w + b rounded as diffusers' AdaGroupNorm rounds it in dtype DT (the "torch"
    casting): group_norm's output, then the product with w (1 + scale, rounded by the caller),
    then the sum; each rounded to DT and back."""
    p = (x_hat.to(DT).to(x_hat.dtype) * w).to(DT).to(x_hat.dtype)
    return (p + b).to(DT).to(x_hat.dtype)


@triton.jit
def _normalize_tile(X, Y, base, chan, cmask, shift, scale, rstd, w, b, s0, s_begin, S, C, ACT: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr, LARGE: tl.constexpr,
                    TORCH_CASTING: tl.constexpr):
    """y = act((x - shift) * scale + b) for the tile at s0 (nothing where s0 < s_begin); scale is
    rstd * w (TORCH_CASTING: the steps rounded, _torch_steps)."""
    tbase, offs, mask = _tile(chan, cmask, base, s0, S, C, CHANNELS_LAST, BLOCK_S, LARGE)
    mask = mask & (s0 + tl.arange(0, BLOCK_S) >= s_begin)[None, None, :]
    x = tl.load(X + tbase + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    if TORCH_CASTING:
        z = _torch_steps((x - shift[:, None, None]) * rstd[:, None, None], w, b, Y.dtype.element_ty)
    else:
        z = (x - shift[:, None, None]) * scale + b
    tl.store(Y + tbase + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_fwd_kernel(
    X, Y,              # [N, C, *spatial] input, output, both in x's layout
    W, B,              # [C] weight, bias, or [N, C] when PER_SAMPLE
    MEAN, RSTD,        # [N, G] statistics, ACC dtype: out when STORE_STATS, in when STATS_IN
    PART,              # [N, G, split, 2] chunk statistics from _group_norm_stats_kernel (split > 1)
    G, Cg, S, C, n_gblocks, split, chunk, n_tasks, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_SAMPLE: tl.constexpr, ACT: tl.constexpr,
    STORE_STATS: tl.constexpr,
    INSTANCE: tl.constexpr,  # instance_norm's call: a constant channel with eps = 0 takes rstd 0 (inv_std)
    STATS_IN: tl.constexpr,  # group_norm_apply: normalize with the given MEAN, RSTD (ONE_PASS off)
    CHANNELS_LAST: tl.constexpr, ONE_PASS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, UNROLL: tl.constexpr,
    NORM_UNROLL: tl.constexpr,  # tiles an iteration of the normalize loop (UNROLL: of the statistics loop)
    ACC: tl.constexpr,
    LARGE: tl.constexpr,  # a sample of 2**31 elements or more (_tile)
    TORCH_CASTING: tl.constexpr,  # ada_group_norm's casting "torch": each step rounded (_torch_steps)
):
    """Tasks t = program_id, program_id + programs, ...: one pass (the tile in registers), looped
    (ONE_PASS and SPLIT off: the group's statistics loop, then the normalize loop re-reading the
    group from L2), or split (the chunks' statistics combined, then this chunk normalized)."""
    for t in range(tl.program_id(0), n_tasks, tl.num_programs(0)):
        # split: backwards, the stats kernel just read the tensor's end, still in L2
        gb, sp, n = _task(n_tasks - 1 - t if SPLIT else t, n_gblocks, split)
        base = tl.cast(n, tl.int64) * C * S
        gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
        chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
        x0 = _pivot(X, base, gi, G, Cg, S, CHANNELS_LAST, LARGE).to(ACC)
        s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
        if STATS_IN:  # the given mean is the shift itself (dmean 0), exactly; the pivot goes unused
            x0 = tl.load(MEAN + n * G + gi, mask=gi < G, other=0.0).to(ACC)
            dmean = tl.zeros([BLOCK_G], dtype=ACC)
            rstd = tl.load(RSTD + n * G + gi, mask=gi < G, other=0.0).to(ACC)
        elif ONE_PASS:
            tbase, offs, mask = _tile(chan, cmask, base, 0, S, C, CHANNELS_LAST, BLOCK_S, LARGE)
            d = tl.where(mask, tl.load(X + tbase + offs, mask=mask, other=0.0).to(ACC) - x0[:, None, None], 0.0)
            dmean = _sum2(d) / (Cg * S)
            xc = tl.where(mask, d - dmean[:, None, None], 0.0)
            rstd = inv_std(_sum2(xc * xc) / (Cg * S), eps, INSTANCE)
        elif SPLIT:
            dmean, m2 = _combine(PART, n, gi, G, Cg, S, split, chunk, BLOCK_G, BLOCK_SPLIT, ACC, LARGE)
            rstd = inv_std(m2 / _group_size(Cg, S, LARGE), eps, INSTANCE)
        else:
            dmean, m2 = _chunk_stats(X, base, chan, cmask, x0, 0, n_tiles, S, C, CHANNELS_LAST,
                                     BLOCK_G, BLOCK_CG, BLOCK_S, UNROLL, ACC, LARGE)
            rstd = inv_std(m2 / _group_size(Cg, S, LARGE), eps, INSTANCE)
        if STORE_STATS:
            if sp == 0:
                tl.store(MEAN + n * G + gi, x0 + dmean, mask=gi < G)
                tl.store(RSTD + n * G + gi, rstd, mask=gi < G)
        w, b = _affine(W, B, n, C, chan, cmask, HAS_W, HAS_B, PER_SAMPLE, ACC)
        scale = rstd[:, None, None] * w
        if ONE_PASS and not STATS_IN:
            if TORCH_CASTING:
                z = _torch_steps(xc * rstd[:, None, None], w, b, Y.dtype.element_ty)
            else:
                z = xc * scale + b
            tl.store(Y + tbase + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)
        else:
            shift = x0 + dmean
            for i in range(0, n_tiles, NORM_UNROLL):  # backwards: the last tiles read are the likeliest in L2
                for u in tl.static_range(NORM_UNROLL):  # all masked before the chunk's start
                    _normalize_tile(X, Y, base, chan, cmask, shift, scale, rstd, w, b,
                                    s_begin + (n_tiles - 1 - i - u) * BLOCK_S, s_begin, S, C, ACT, CHANNELS_LAST,
                                    BLOCK_S, ACC, LARGE, TORCH_CASTING)


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
def _saved(MEAN, RSTD, W, B, n, gb, G, Cg, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_SAMPLE: tl.constexpr,
           BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, ACC: tl.constexpr):
    """What a backward task holds throughout: its groups' saved mean and rstd ([BLOCK_G]), its
    channels, and their weight and bias."""
    gi = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    mean = tl.load(MEAN + n * G + gi, mask=gi < G, other=0.0)
    rstd = tl.load(RSTD + n * G + gi, mask=gi < G, other=0.0)
    chan, cmask = _channels(gb * BLOCK_G, G, Cg, BLOCK_G, BLOCK_CG)
    w, b = _affine(W, B, n, C, chan, cmask, HAS_W, HAS_B, PER_SAMPLE, ACC)
    return mean, rstd, chan, cmask, w, b


@triton.jit
def _chunk_sums(X, DY, base, chan, cmask, mean, rstd, w, b, s_begin, n_tiles, S, C, ACT: tl.constexpr,
                CHANNELS_LAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                BLOCK_S: tl.constexpr, ACC: tl.constexpr, LARGE: tl.constexpr):
    """Per channel, a = sum dz * x_hat and b = sum dz over n_tiles tiles from s_begin
    ([BLOCK_G, BLOCK_CG] each), summed per lane in the loop (no barrier there) and over the
    positions once after it."""
    a_acc = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=ACC)
    b_acc = tl.zeros([BLOCK_G, BLOCK_CG, BLOCK_S], dtype=ACC)
    for i in range(0, n_tiles):
        tbase, offs, mask = _tile(chan, cmask, base, s_begin + i * BLOCK_S, S, C, CHANNELS_LAST, BLOCK_S, LARGE)
        x_hat, dz = _grad_tile(X, DY, tbase, offs, mask, mean, rstd, w, b, ACT, ACC)
        a_acc += dz * x_hat
        b_acc += dz
    return tl.sum(a_acc, 2), tl.sum(b_acc, 2)


@triton.jit
def _group_norm_bwd_sums_kernel(
    DY, X,             # [N, C, *spatial] output gradient, input, both in x's layout
    W, B,              # [C] weight, bias, [N, C] when PER_SAMPLE (read for the activation's input only)
    MEAN, RSTD,        # [N, G] saved statistics
    PART,              # [N, 2, C, split] out: a and b of each (sample, channel, chunk), ACC dtype
    G, Cg, S, C, n_gblocks, split, chunk,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_SAMPLE: tl.constexpr, ACT: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr,
    ACC: tl.constexpr,
    LARGE: tl.constexpr,  # a sample of 2**31 elements or more (_tile)
):
    """Split mode, pass 1 of the backward: the per-channel sums over one chunk (one program a task)."""
    gb, sp, n = _task(tl.program_id(0), n_gblocks, split)
    base = tl.cast(n, tl.int64) * C * S
    mean, rstd, chan, cmask, w, b = _saved(MEAN, RSTD, W, B, n, gb, G, Cg, C, HAS_W, HAS_B, PER_SAMPLE, BLOCK_G,
                                           BLOCK_CG, ACC)
    s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
    a_sum, b_sum = _chunk_sums(X, DY, base, chan, cmask, mean, rstd, w, b, s_begin, n_tiles, S, C, ACT,
                               CHANNELS_LAST, BLOCK_G, BLOCK_CG, BLOCK_S, ACC, LARGE)
    p = PART + ((tl.cast(n, tl.int64) * 2 * C + chan) * split + sp)
    tl.store(p, a_sum, mask=cmask)
    tl.store(p + C * split, b_sum, mask=cmask)


@triton.jit
def _group_norm_bwd_kernel(
    DY, X,             # [N, C, *spatial] output gradient, input, both in x's layout
    W, B,              # [C] weight, bias, or [N, C] when PER_SAMPLE
    MEAN, RSTD,        # [N, G] saved statistics
    PART,              # [N, 2, C, split] per-channel a and b: written (split 1), or read (the chunks')
    DX,                # [N, C, *spatial] out, x's layout
    G, Cg, S, C, n_gblocks, split, chunk, n_tasks,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, PER_SAMPLE: tl.constexpr, ACT: tl.constexpr, WANT_DX: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, ONE_PASS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_SPLIT: tl.constexpr, ACC: tl.constexpr,
    LARGE: tl.constexpr,  # a sample of 2**31 elements or more (_tile)
):
    """Tasks as _group_norm_fwd_kernel's: the per-channel sums from one tile (ONE_PASS), a loop
    over the group (then stored for dw/db), or the chunks' partials (SPLIT, totalled here in a
    fixed order); then dx."""
    for t in range(tl.program_id(0), n_tasks, tl.num_programs(0)):
        gb, sp, n = _task(n_tasks - 1 - t if SPLIT else t, n_gblocks, split)  # split: backwards, as the forward
        base = tl.cast(n, tl.int64) * C * S
        mean, rstd, chan, cmask, w, b = _saved(MEAN, RSTD, W, B, n, gb, G, Cg, C, HAS_W, HAS_B, PER_SAMPLE,
                                               BLOCK_G, BLOCK_CG, ACC)
        s_begin, n_tiles = _chunk(sp, chunk, S, BLOCK_S)
        p = PART + (tl.cast(n, tl.int64) * 2 * C + chan) * split
        if ONE_PASS:
            tbase, offs, mask = _tile(chan, cmask, base, 0, S, C, CHANNELS_LAST, BLOCK_S, LARGE)
            x_hat, dz = _grad_tile(X, DY, tbase, offs, mask, mean, rstd, w, b, ACT, ACC)
            a_sum = tl.sum(dz * x_hat, 2)
            b_sum = tl.sum(dz, 2)
        elif SPLIT:
            a_sum = tl.zeros([BLOCK_G, BLOCK_CG], dtype=ACC)
            b_sum = tl.zeros([BLOCK_G, BLOCK_CG], dtype=ACC)
            for start in range(0, split, BLOCK_SPLIT):
                sp_i = start + tl.arange(0, BLOCK_SPLIT)
                m = cmask[:, :, None] & (sp_i < split)[None, None, :]
                a_sum += tl.sum(tl.load(p[:, :, None] + sp_i[None, None, :], mask=m, other=0.0), 2)
                b_sum += tl.sum(tl.load(p[:, :, None] + C * split + sp_i[None, None, :], mask=m, other=0.0), 2)
        else:
            a_sum, b_sum = _chunk_sums(X, DY, base, chan, cmask, mean, rstd, w, b, 0, n_tiles, S, C, ACT,
                                       CHANNELS_LAST, BLOCK_G, BLOCK_CG, BLOCK_S, ACC, LARGE)
        if not SPLIT:
            tl.store(p, a_sum, mask=cmask)
            tl.store(p + C, b_sum, mask=cmask)
        if WANT_DX:
            if HAS_W:
                a_sum = a_sum * tl.sum(w, 2)  # w[c] * a[n, c]: w is [BLOCK_G, BLOCK_CG, 1]
                b_sum = b_sum * tl.sum(w, 2)
            c1 = tl.sum(a_sum, 1)[:, None, None] / _group_size(Cg, S, LARGE)
            c2 = tl.sum(b_sum, 1)[:, None, None] / _group_size(Cg, S, LARGE)
            r = rstd[:, None, None]
            if ONE_PASS:
                dx = r * (w * dz - c2 - x_hat * c1)
                tl.store(DX + tbase + offs, dx.to(DX.dtype.element_ty), mask=mask)
            else:
                for i in range(0, n_tiles):  # backwards: the last tiles read are the likeliest in L2
                    tbase, offs, mask = _tile(chan, cmask, base, s_begin + (n_tiles - 1 - i) * BLOCK_S, S, C,
                                              CHANNELS_LAST, BLOCK_S, LARGE)
                    x_hat, dz = _grad_tile(X, DY, tbase, offs, mask, mean, rstd, w, b, ACT, ACC)
                    dx = r * (w * dz - c2 - x_hat * c1)
                    tl.store(DX + tbase + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_param_grads_kernel(
    PART,              # [N, 2, C, K] per-(sample, chunk) a and b, ACC dtype
    DW, DB,            # [C] out: dw = sum over samples and chunks of a, db of b, in the parameters' dtypes
    N, C, K,
    HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
):
    """The backward's one glue launch: the partials summed in a fixed order (deterministic) and
    cast, for BLOCK_C channels a program."""
    chan = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    b = tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC)
    for n in range(0, N):
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            m = (chan < C)[:, None] & (k < K)[None, :]
            p = PART + (tl.cast(n, tl.int64) * 2 * C + chan[:, None]) * K + k[None, :]
            if HAS_DW:
                a += tl.load(p, mask=m, other=0.0)
            if HAS_DB:
                b += tl.load(p + C * K, mask=m, other=0.0)
    if HAS_DW:
        tl.store(DW + chan, tl.sum(a, 1).to(DW.dtype.element_ty), mask=chan < C)
    if HAS_DB:
        tl.store(DB + chan, tl.sum(b, 1).to(DB.dtype.element_ty), mask=chan < C)


# --- launchers ---------------------------------------------------------------------------------

# A sample of this many elements or more takes int64 offsets within it (the LARGE flag, _tile).
LARGE_OFFSETS = 2**31


def supported(x, num_groups):
    """Whether these kernels take x: a group's channels must fit in one tile row (kernels/config.py).
    Any size: a sample's offsets past int32 take the LARGE flag."""
    return x.shape[1] // num_groups <= GN_MAX_GROUP_CHANNELS


def _per_sample(weight, bias):
    """Whether the parameters are [N, C], per (sample, channel) (ada_group_norm's), not [C]."""
    return any(p is not None and p.dim() == 2 for p in (weight, bias))


def _setup(x, num_groups, config, make):
    """(x in its dense layout, channels_last, (N, C, S, G), config, grid, the kernels' geometry
    arguments and tile constexprs)."""
    fmt = memory_format_of(x)  # channels_last(_3d) when x is dense in it: read in place
    channels_last = fmt != torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    n, c, s, g = x.shape[0], x.shape[1], math.prod(x.shape[2:]), num_groups
    large = c * s >= LARGE_OFFSETS
    mode = {"invariant": True} if is_batch_invariant() else {}  # outside the mode, today's call
    cfg = config or make(n, c, s, g, channels_last, programs_per_wave(x.device, GN_LOOP_WARPS), x.element_size(),
                         large, **mode)
    n_gblocks = triton.cdiv(g, cfg.block_g)
    tasks = n_gblocks * cfg.split * n
    grid = (cfg.programs or tasks,) if not cfg.one_pass and cfg.split == 1 else (tasks,)
    geometry = (g, c // g, s, c, n_gblocks, cfg.split, cfg.chunk)
    tile = dict(LARGE=large, CHANNELS_LAST=channels_last, BLOCK_G=cfg.block_g,
                BLOCK_CG=cfg.block_cg, BLOCK_S=cfg.block_s, ACC=acc_type(x.dtype), num_warps=cfg.num_warps)
    return x, cfg, (n, c, s, g), grid, tasks, geometry, tile


def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, config=None,
                   casting="fp32"):
    """The triton backend's group_norm forward (contract: normops/backends/__init__.py).
    `config` overrides the heuristic (tests use it to force the split path at small shapes)."""
    x, cfg, (n, c, s, g), grid, tasks, geometry, tile = _setup(x, num_groups, config, GroupNormConfig.forward)
    weight, bias = dense(weight), dense(bias)
    sd = stat_dtype(x.dtype)
    y = torch.empty_like(x)
    mean = torch.empty((n, g), dtype=sd, device=x.device) if need_stats else None
    rstd = torch.empty((n, g), dtype=sd, device=x.device) if need_stats else None
    split = not cfg.one_pass and cfg.split > 1
    part = None
    if split:
        part = torch.empty((n, g, cfg.split, 2), dtype=sd, device=x.device)
        launch(_group_norm_stats_kernel, grid, x, part, *geometry, UNROLL=cfg.unroll, **tile)
    launch(
        _group_norm_fwd_kernel, grid, x, y, weight if weight is not None else y, bias if bias is not None else y,
        mean if mean is not None else y, rstd if rstd is not None else y, part if part is not None else y,
        *geometry, tasks, eps, HAS_W=weight is not None, HAS_B=bias is not None,
        PER_SAMPLE=_per_sample(weight, bias), ACT=ACTIVATIONS[activation],
        STORE_STATS=need_stats, INSTANCE=instance, STATS_IN=False, ONE_PASS=cfg.one_pass, SPLIT=split,
        BLOCK_SPLIT=cfg.split_block, UNROLL=cfg.unroll, NORM_UNROLL=cfg.normalize_unroll,
        TORCH_CASTING=casting == "torch", **tile)
    return y, mean, rstd


def group_norm_stats(x, num_groups, config=None):
    """(mean, m2) [N, G] of x's groups, m2 the sum of squared deviations from the mean (the count,
    C / G * S, implied), in the statistics dtype (fp32, fp64 for fp64 x): the split forward's
    statistics pass (x read once), its chunks combined in a fixed order. For combining the
    statistics of a tensor's tiles (Chan's formula), then group_norm_apply."""
    x, cfg, (n, c, s, g), _, tasks, geometry, tile = _setup(x, num_groups, config, GroupNormConfig.forward)
    sd = stat_dtype(x.dtype)
    # any configuration's tiles and chunks serve (one pass: one chunk of one tile a group block)
    part = torch.empty((n, g, cfg.split, 2), dtype=sd, device=x.device)
    launch(_group_norm_stats_kernel, (tasks,), x, part, *geometry, UNROLL=cfg.unroll, **tile)
    mean, m2 = torch.empty((n, g), dtype=sd, device=x.device), torch.empty((n, g), dtype=sd, device=x.device)
    tile.pop("BLOCK_CG"), tile.pop("BLOCK_S")
    launch(_group_norm_stats_combine_kernel, (n * geometry[4],), x, part, mean, m2, *geometry,
           BLOCK_SPLIT=cfg.split_block, **tile)
    return mean, m2


def group_norm_apply(x, num_groups, mean, rstd, weight, bias, activation, config=None):
    """y = act((x - mean) * rstd * w + b) with the given statistics mean, rstd [N, G] (any float
    dtype, read as the statistics dtype): the forward's normalize pass alone. weight and bias: [C],
    [N, C] (per sample) or None; activation: a name of ACTIVATIONS."""
    x, cfg, (n, c, s, g), grid, tasks, geometry, tile = _setup(x, num_groups, config, GroupNormConfig.forward)
    weight, bias, mean, rstd = dense(weight), dense(bias), dense(mean), dense(rstd)
    y = torch.empty_like(x)
    split = not cfg.one_pass and cfg.split > 1
    launch(
        _group_norm_fwd_kernel, grid, x, y, weight if weight is not None else y, bias if bias is not None else y,
        mean, rstd, y, *geometry, tasks, 0.0, HAS_W=weight is not None, HAS_B=bias is not None,
        PER_SAMPLE=_per_sample(weight, bias), ACT=ACTIVATIONS[activation], STORE_STATS=False, INSTANCE=False,
        STATS_IN=True, ONE_PASS=False, SPLIT=split, BLOCK_SPLIT=cfg.split_block, UNROLL=cfg.unroll,
        NORM_UNROLL=cfg.normalize_unroll, TORCH_CASTING=False, **tile)
    return y


# The dw/db glue kernel: a program sums [N, K] partials for this many channels, K a chunk at a time.
PARAM_GRADS_BLOCK_C = 32
PARAM_GRADS_BLOCK_K = 32


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask, config=None):
    """The triton backend's group_norm backward (contract: normops/backends/__init__.py)."""
    x, cfg, (n, c, s, g), grid, tasks, geometry, tile = _setup(x, num_groups, config, GroupNormConfig.backward)
    dy = dy.contiguous(memory_format=memory_format_of(x))
    weight, bias = dense(weight), dense(bias)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    want_dx = output_mask[0]
    want_dw = output_mask[1] and weight is not None
    want_db = output_mask[2] and bias is not None
    dx = torch.empty_like(x) if want_dx else None
    split = not cfg.one_pass and cfg.split > 1
    # [N, 2, C, split]: per (sample, chunk) a and b of each channel (split 1 but in split mode)
    part = torch.empty((n, 2, c, cfg.split if split else 1), dtype=stat_dtype(x.dtype), device=x.device)
    per_sample = _per_sample(weight, bias)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, PER_SAMPLE=per_sample, ACT=ACTIVATIONS[activation],
                 **tile)
    w_arg = weight if weight is not None else rstd
    b_arg = bias if bias is not None else rstd
    if split:
        launch(_group_norm_bwd_sums_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, part, *geometry, **flags)
    if want_dx or not split:
        launch(_group_norm_bwd_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, part, dx if dx is not None else rstd,
               *geometry, tasks, WANT_DX=want_dx, ONE_PASS=cfg.one_pass, SPLIT=split,
               BLOCK_SPLIT=cfg.split_block, **flags)
    if not (want_dw or want_db):
        return dx, None, None
    if per_sample:  # dw[n, c], db[n, c]: the partials summed over the chunks only (a fixed-order torch sum)
        sums = part.sum(3)
        # copies, never views of one buffer: a custom op's outputs may not alias each other
        return (dx, sums[:, 0].to(weight.dtype, copy=True) if want_dw else None,
                sums[:, 1].to(bias.dtype, copy=True) if want_db else None)
    dw = torch.empty_like(weight) if want_dw else None
    db = torch.empty_like(bias) if want_db else None
    launch(_group_norm_param_grads_kernel, (triton.cdiv(c, PARAM_GRADS_BLOCK_C),), part,
           dw if dw is not None else part, db if db is not None else part, n, c, part.shape[3],
           HAS_DW=want_dw, HAS_DB=want_db, BLOCK_C=PARAM_GRADS_BLOCK_C, BLOCK_K=PARAM_GRADS_BLOCK_K,
           ACC=tile["ACC"], num_warps=4)
    return dx, dw, db
