"""BatchNorm in Triton: training and inference forward, backward, fused activation, NCHW and
channels_last, one kernel family.

Shapes: x is (N, C, *spatial), S = prod(spatial); every channel is normalized over its M = N * S
values. The kernels see x as (N', C, S'): NCHW is (N, C, S), x[n, c, s] at n*C*S + c*S + s, and
channels_last(_3d) is (N * S, C, 1), a matrix of rows of C contiguous channels (as is any input with
no spatial dims). A program reads [BLOCK_N, BLOCK_C, BLOCK_S] tiles and reduces over the first and
last axes, so both layouts are read in place by one code path.

Math, per channel c:
    training   mean = sum(x) / M     var = sum((x - mean)^2) / M     rstd = 1 / sqrt(var + eps)
               and, when the launcher is given momentum, the running statistics in place:
               running = (1 - momentum) * running + momentum * batch (mean, and the unbiased
               var * M / (M - 1)), in the kernel that computes the batch statistics
    eval       mean, var: the running statistics
    forward    x_hat = (x - mean) * rstd           z = x_hat * w + b          y = act(z)
               computed as (x - mean) * scale + b with scale = w * rstd, not x * scale + shift:
               subtracting the mean first keeps fp32 exact when |mean| >> std (x = 1e4 + randn)
    backward   dz = dy * act'(z)  (z rebuilt from x and the statistics; nothing else saved)
               sum_dz = sum(dz)    sum_dzx = sum(dz * x_hat)    dw = sum_dzx    db = sum_dz
               training: dx = w * rstd * (dz - sum_dz / M - x_hat * sum_dzx / M)
               eval:     dx = w * rstd * dz  (constant statistics)

Programs: one per (channel block, chunk of the N' x S' tiles). When a channel block's whole
reduction fits in one tile (one pass) everything stays in registers: one launch. Otherwise, one
wave of programs (SMs x 16 // warps, the occupancy the launch budget allows) loops over tiles of
64 bytes a thread (forward; 32 of each of x and dy backward), ~4 MB of loads in flight on an H100,
with per-lane accumulators (one reduction over the tile after the loop, no barrier inside it):
    forward    _batch_norm_stats_kernel: (count, mean, M2) of each chunk (sums about a shift, the
               chunk's first-tile mean); _batch_norm_finalize_kernel combines the chunks of each
               channel with Chan's formula (never E[x^2] - E[x]^2) into mean, rstd and the unbiased
               variance, and updates the running statistics; _batch_norm_fwd_kernel normalizes
               (eval: this kernel alone, from the running statistics). 3 launches.
    backward   _batch_norm_bwd_sums_kernel: sum_dz, sum_dzx of each (chunk, channel);
               _batch_norm_bwd_finalize_kernel totals them over the chunks in a fixed order
               (deterministic, no atomics) and writes dw, db in the parameters' dtype;
               _batch_norm_bwd_kernel writes dx. 3 launches (eval dx alone: 1).
The normalize passes walk the tensor backwards, so the end that the reduction pass just read is
still in L2.

Bytes moved, for x of T elements of e bytes (per-channel vectors are negligible):
    training forward   one pass: read x, write y: 2*T*e;  split: + a second read of x: 3*T*e
    eval forward       read x, write y: 2*T*e
    backward           one pass: read x, dy, write dx: 3*T*e;  split: + a second read of x, dy: 5*T*e
                       (eval without dw/db: 3*T*e)
"""
import functools
import math

import torch
import triton
import triton.language as tl

from normops.core import is_batch_invariant, memory_format_of

from .common import ACTIVATIONS, act, act_grad, acc_type, dense, launch, stat_dtype
from .config import BI_PLANNED_SMS, BatchNormConfig, programs_per_wave


@triton.jit
def _program(c_blocks, REVERSED: tl.constexpr):
    """(channel block, chunk) of this program; the channel block varies fastest, so programs that
    run together read neighbouring channels of the same samples: one contiguous region."""
    pid = tl.program_id(0)
    if REVERSED:
        pid = tl.num_programs(0) - 1 - pid
    return pid % c_blocks, pid // c_blocks


@triton.jit
def _tile(t, s_tiles, c0, N, C, S, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile t: samples (n) block t // s_tiles, positions block t % s_tiles, channels c0... Returns
    the tile's int64 start, its [BLOCK_N, BLOCK_C, BLOCK_S] int32 offsets from there, the mask,
    and how many of its values each channel has."""
    n0 = (t // s_tiles) * BLOCK_N
    s0 = (t % s_tiles) * BLOCK_S
    ni = tl.arange(0, BLOCK_N)
    ci = c0 + tl.arange(0, BLOCK_C)
    si = tl.arange(0, BLOCK_S)
    offs = ni[:, None, None] * (C * S) + ci[None, :, None] * S + si[None, None, :]
    mask = ((n0 + ni) < N)[:, None, None] & (ci < C)[None, :, None] & ((s0 + si) < S)[None, None, :]
    count = tl.minimum(BLOCK_N, N - n0) * tl.minimum(BLOCK_S, S - s0)
    return n0.to(tl.int64) * C * S + s0, offs, mask, count


@triton.jit
def _sum(t):
    """Per-channel sum of a [BLOCK_N, BLOCK_C, BLOCK_S] tile."""
    return tl.sum(tl.sum(t, 2), 0)


@triton.jit
def _center(x, mask, count):
    """Per-channel mean of a tile and the tile minus it (zero outside the mask). sum(x) / count
    rounds at the magnitude of the sum (x = 1e4 + randn: ~1e-3 off, which the backward's x_hat
    would inherit); the mean of the residuals, small numbers, takes that error back out."""
    mean = _sum(x) / count
    xc = tl.where(mask, x - _bcast(mean), 0.0)
    shift = tl.where(_finite(mean), _sum(xc) / count, 0.0)  # an inf in x: the mean is inf, as torch's
    return mean + shift, tl.where(mask, xc - _bcast(shift), 0.0)


@triton.jit
def _finite(v):
    return v - v == 0.0  # inf - inf and nan - nan are nan


@triton.jit
def _bcast(v):
    """A per-channel [BLOCK_C] vector as [1, BLOCK_C, 1]."""
    return v[None, :, None]


@triton.jit
def _affine(W, B, c0, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Weight and bias of channels c0.. as [BLOCK_C] vectors (1 and 0 when absent)."""
    ci = c0 + tl.arange(0, BLOCK_C)
    w = tl.full([BLOCK_C], 1.0, ACC)
    b = tl.zeros([BLOCK_C], ACC)
    if HAS_W:
        w = tl.load(W + ci, mask=ci < C, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(B + ci, mask=ci < C, other=0.0).to(ACC)
    return w, b


@triton.jit
def _stats(MEAN, RSTD, VAR, c0, C, eps, RUNNING: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """mean and rstd of channels c0.. as [BLOCK_C] vectors: training, the saved MEAN and RSTD (VAR
    unread); RUNNING (eval), the running MEAN and VAR, with rstd = 1 / sqrt(var + eps) taken here
    (RSTD unread)."""
    ci = c0 + tl.arange(0, BLOCK_C)
    mean = tl.load(MEAN + ci, mask=ci < C, other=0.0).to(ACC)
    if RUNNING:
        rstd = 1.0 / tl.sqrt(tl.load(VAR + ci, mask=ci < C, other=1.0).to(ACC) + eps)
    else:
        rstd = tl.load(RSTD + ci, mask=ci < C, other=1.0).to(ACC)
    return mean, rstd


@triton.jit
def _batch_norm_stats_kernel(
    X,                 # (N', C, S') input
    PART,              # [split, 3, C] out: (count, mean, M2) of each channel over each chunk, ACC dtype
    N, C, S, s_tiles, n_tiles, c_blocks, chunk,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Training forward, split mode, pass 1: (count, mean, M2) of this chunk's tiles. Every lane
    sums x - shift and its square; the tile is reduced once, after the loop (a reduction in the
    loop would cost barriers every iteration). The shift, the mean of the chunk's first tile, keeps
    the sums small where |mean| >> std (x = 1e4 + randn), so M2 = sum(d^2) - sum(d)^2 / n does not
    cancel; the chunks are then combined with Chan's formula (never E[x^2] - E[x]^2)."""
    cb, sp = _program(c_blocks, False)
    c0 = cb * BLOCK_C
    t_begin = sp * chunk
    t_end = tl.minimum(n_tiles, t_begin + chunk)
    base, offs, mask, n_b = _tile(t_begin, s_tiles, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
    shift_c = _sum(tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)) / n_b
    shift_c = tl.where(_finite(shift_c), shift_c, 0.0)  # an inf in x: the sums carry it, as torch's
    shift = _bcast(shift_c)
    s1 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=ACC)
    s2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=ACC)
    count = 0
    for t in range(t_begin, t_end):
        base, offs, mask, n_b = _tile(t, s_tiles, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
        x = tl.load(X + base + offs, mask=mask, other=0.0, eviction_policy="evict_last").to(ACC)
        d = tl.where(mask, x - shift, 0.0)
        s1 += d
        s2 += d * d
        count += n_b
    count = count.to(ACC)
    d_mean = _sum(s1) / count
    m2 = _sum(s2) - _sum(s1) * d_mean
    ci = c0 + tl.arange(0, BLOCK_C)
    p = PART + sp * 3 * C + ci
    tl.store(p, tl.zeros([BLOCK_C], dtype=ACC) + count, mask=ci < C)
    tl.store(p + C, shift_c + d_mean, mask=ci < C)
    tl.store(p + 2 * C, tl.where(m2 < 0.0, 0.0, m2), mask=ci < C)  # rounding; a NaN stays


@triton.jit
def _update_running(RMEAN, RVAR, ci, C, mean, var, momentum):
    """running = (1 - momentum) * running + momentum * batch, for the mean and the unbiased var of
    channels ci, computed in the statistics' dtype and stored in the buffers' own."""
    rm = tl.load(RMEAN + ci, mask=ci < C, other=0.0).to(mean.dtype)
    rv = tl.load(RVAR + ci, mask=ci < C, other=0.0).to(mean.dtype)
    tl.store(RMEAN + ci, ((1.0 - momentum) * rm + momentum * mean).to(RMEAN.dtype.element_ty), mask=ci < C)
    tl.store(RVAR + ci, ((1.0 - momentum) * rv + momentum * var).to(RVAR.dtype.element_ty), mask=ci < C)


@triton.jit
def _batch_norm_finalize_kernel(
    PART,              # [split, 3, C] chunk statistics from _batch_norm_stats_kernel
    MEAN, RSTD, VAR,   # [C] out: batch mean, rstd, unbiased variance, ACC dtype
    RMEAN, RVAR,       # [C] running mean and var, updated in place (UPDATE), their own dtype
    C, split, total, eps, momentum,
    UPDATE: tl.constexpr, BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Chan's formula for many parts, in a fixed order: mean = sum(n_i mean_i) / M, then
    M2 = sum(M2_i + n_i (mean_i - mean)^2). The mean is summed as offsets from the first chunk's,
    small numbers: n_i mean_i themselves would round at the magnitude of the whole sum. Then the
    running statistics' update, the op's last write (UPDATE)."""
    ci = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ref = tl.load(PART + C + ci, mask=ci < C, other=0.0)
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=ACC)
    inf = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=ACC)  # the chunks' infinite means, whose sum is the mean then
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (sp < split)[:, None] & (ci < C)[None, :]
        p = PART + sp[:, None] * 3 * C + ci[None, :]
        mean_i = tl.load(p + C, mask=m, other=0.0)
        acc += tl.where(m, tl.load(p, mask=m, other=0.0) * (mean_i - ref[None, :]), 0.0)
        inf += tl.where(_finite(mean_i), 0.0, mean_i)
    inf_sum = tl.sum(inf, 0)
    mean = tl.where(inf_sum == 0.0, ref + tl.sum(acc, 0) / total, inf_sum)
    acc = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (sp < split)[:, None] & (ci < C)[None, :]
        p = PART + sp[:, None] * 3 * C + ci[None, :]
        d = tl.load(p + C, mask=m, other=0.0) - mean[None, :]
        acc += tl.where(m, tl.load(p + 2 * C, mask=m, other=0.0) + tl.load(p, mask=m, other=0.0) * d * d, 0.0)
    m2 = tl.sum(acc, 0)
    tl.store(MEAN + ci, mean, mask=ci < C)
    tl.store(RSTD + ci, 1.0 / tl.sqrt(m2 / total + eps), mask=ci < C)
    tl.store(VAR + ci, m2 / (total - 1), mask=ci < C)
    if UPDATE:
        _update_running(RMEAN, RVAR, ci, C, mean, m2 / (total - 1), momentum)


@triton.jit
def _batch_norm_fwd_kernel(
    X, Y,              # (N', C, S') input, output
    W, B,              # [C] weight, bias
    MEAN, RSTD, VAR,   # [C] training: out (one pass) or in (split; VAR unused); eval: running mean
                       # and var in, RSTD unused
    RMEAN, RVAR,       # [C] running mean and var, updated in place (UPDATE: training, one pass)
    N, C, S, s_tiles, n_tiles, c_blocks, chunk, eps, momentum,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, RUNNING: tl.constexpr, ONE_PASS: tl.constexpr,
    UPDATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    cb, sp = _program(c_blocks, not ONE_PASS)
    c0 = cb * BLOCK_C
    if ONE_PASS:  # training, the channel block's whole N' x S' in this tile
        ci = c0 + tl.arange(0, BLOCK_C)
        base, offs, mask, count = _tile(0, 1, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
        x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
        mean, xc = _center(x, mask, count)
        m2 = _sum(xc * xc)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        tl.store(MEAN + ci, mean, mask=ci < C)
        tl.store(RSTD + ci, rstd, mask=ci < C)
        tl.store(VAR + ci, m2 / (count - 1), mask=ci < C)
        if UPDATE:
            _update_running(RMEAN, RVAR, ci, C, mean, m2 / (count - 1), momentum)
        w, b = _affine(W, B, c0, C, HAS_W, HAS_B, BLOCK_C, ACC)
        z = xc * _bcast(rstd * w) + _bcast(b)
        tl.store(Y + base + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)
    else:
        mean, rstd = _stats(MEAN, RSTD, VAR, c0, C, eps, RUNNING, BLOCK_C, ACC)
        w, b = _affine(W, B, c0, C, HAS_W, HAS_B, BLOCK_C, ACC)
        mean, scale, b = _bcast(mean), _bcast(rstd * w), _bcast(b)
        t_begin = sp * chunk
        t_count = tl.minimum(chunk, n_tiles - t_begin)
        for i in range(0, t_count):
            base, offs, mask, _ = _tile(t_begin + t_count - 1 - i, s_tiles, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
            x = tl.load(X + base + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
            tl.store(Y + base + offs, act((x - mean) * scale + b, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT: tl.constexpr, ACC: tl.constexpr):
    """x_hat and dz = dy * act'(z) of one tile, zero outside the mask ([BLOCK_C] stats broadcast)."""
    x = tl.load(X + base + offs, mask=mask, other=0.0).to(ACC)
    dz = tl.load(DY + base + offs, mask=mask, other=0.0).to(ACC)
    x_hat = tl.where(mask, (x - _bcast(mean)) * _bcast(rstd), 0.0)
    if ACT != 0:
        dz = dz * act_grad(x_hat * _bcast(w) + _bcast(b), ACT)
    return x_hat, tl.where(mask, dz, 0.0)


@triton.jit
def _batch_norm_bwd_sums_kernel(
    DY, X,             # (N', C, S') output gradient, input
    W, B,              # [C] weight, bias (read for the activation's input only)
    MEAN, RSTD, VAR,   # [C] training: saved mean and rstd (VAR unused); eval: running mean and var (RSTD unused)
    PART,              # [split, 2, C] out: sum_dzx and sum_dz of each (chunk, channel), ACC dtype
    N, C, S, s_tiles, n_tiles, c_blocks, chunk, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, RUNNING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """Backward, split mode, pass 1: the per-channel sums over this chunk, summed per lane in the
    loop and reduced over the tile once, after it."""
    cb, sp = _program(c_blocks, False)
    c0 = cb * BLOCK_C
    mean, rstd = _stats(MEAN, RSTD, VAR, c0, C, eps, RUNNING, BLOCK_C, ACC)
    w, b = _affine(W, B, c0, C, HAS_W, HAS_B, BLOCK_C, ACC)
    sum_dzx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=ACC)
    sum_dz = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], dtype=ACC)
    for t in range(sp * chunk, tl.minimum(n_tiles, (sp + 1) * chunk)):
        base, offs, mask, _ = _tile(t, s_tiles, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
        x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
        sum_dzx += dz * x_hat
        sum_dz += dz
    ci = c0 + tl.arange(0, BLOCK_C)
    p = PART + sp * 2 * C + ci
    tl.store(p, _sum(sum_dzx), mask=ci < C)
    tl.store(p + C, _sum(sum_dz), mask=ci < C)


@triton.jit
def _store_sums(SUMS, DW, DB, ci, C, sum_dzx, sum_dz, WANT_SUMS: tl.constexpr, HAS_DW: tl.constexpr,
                HAS_DB: tl.constexpr):
    """The totals of channels ci: fp32 (ACC) for the dx kernel (WANT_SUMS), and dw, db cast."""
    if WANT_SUMS:
        tl.store(SUMS + ci, sum_dzx, mask=ci < C)
        tl.store(SUMS + C + ci, sum_dz, mask=ci < C)
    if HAS_DW:
        tl.store(DW + ci, sum_dzx.to(DW.dtype.element_ty), mask=ci < C)
    if HAS_DB:
        tl.store(DB + ci, sum_dz.to(DB.dtype.element_ty), mask=ci < C)


@triton.jit
def _batch_norm_bwd_finalize_kernel(
    PART,              # [split, 2, C] sum_dzx, sum_dz of each chunk from _batch_norm_bwd_sums_kernel
    SUMS,              # [2, C] out: their totals, ACC dtype (WANT_SUMS: the dx kernel's input)
    DW, DB,            # [C] out: dweight = sum_dzx, dbias = sum_dz in the parameters' dtype (HAS_DW, HAS_DB)
    C, split,
    WANT_SUMS: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_SPLIT: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """The chunks' sums totalled in a fixed order (deterministic, no atomics), and cast: the
    backward's one small launch besides its two passes."""
    ci = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    dzx = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=ACC)
    dz = tl.zeros([BLOCK_SPLIT, BLOCK_C], dtype=ACC)
    for start in range(0, split, BLOCK_SPLIT):
        sp = start + tl.arange(0, BLOCK_SPLIT)
        m = (sp < split)[:, None] & (ci < C)[None, :]
        p = PART + sp[:, None] * 2 * C + ci[None, :]
        dzx += tl.load(p, mask=m, other=0.0)
        dz += tl.load(p + C, mask=m, other=0.0)
    _store_sums(SUMS, DW, DB, ci, C, tl.sum(dzx, 0), tl.sum(dz, 0), WANT_SUMS, HAS_DW, HAS_DB)


@triton.jit
def _dx(dz, x_hat, k, c1, c2, RUNNING: tl.constexpr):
    """dx of a tile: k = w * rstd, c1 = sum_dzx / M, c2 = sum_dz / M (training only)."""
    dx = k * dz
    if not RUNNING:
        dx = k * (dz - c2 - x_hat * c1)
    return dx


@triton.jit
def _batch_norm_bwd_kernel(
    DY, X,             # (N', C, S') output gradient, input
    W, B,              # [C] weight, bias
    MEAN, RSTD, VAR,   # [C] training: saved mean and rstd (VAR unused); eval: running mean and var (RSTD unused)
    SUMS,              # [2, C] sum_dzx, sum_dz, the chunks' totals (split, training)
    DX,                # (N', C, S') out
    DW, DB,            # [C] out (one pass): dweight, dbias in the parameters' dtype (HAS_DW, HAS_DB)
    N, C, S, s_tiles, n_tiles, c_blocks, chunk, eps, total,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, RUNNING: tl.constexpr,
    WANT_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    cb, sp = _program(c_blocks, not ONE_PASS)
    c0 = cb * BLOCK_C
    ci = c0 + tl.arange(0, BLOCK_C)
    mean, rstd = _stats(MEAN, RSTD, VAR, c0, C, eps, RUNNING, BLOCK_C, ACC)
    w, b = _affine(W, B, c0, C, HAS_W, HAS_B, BLOCK_C, ACC)
    if ONE_PASS:
        base, offs, mask, _ = _tile(0, 1, c0, N, C, S, BLOCK_N, BLOCK_C, BLOCK_S)
        x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
        sum_dzx = _sum(dz * x_hat)
        sum_dz = _sum(dz)
        _store_sums(SUMS, DW, DB, ci, C, sum_dzx, sum_dz, False, HAS_DW, HAS_DB)
    elif not RUNNING:
        sum_dzx = tl.load(SUMS + ci, mask=ci < C, other=0.0)
        sum_dz = tl.load(SUMS + C + ci, mask=ci < C, other=0.0)
    if WANT_DX:
        k = _bcast(w * rstd)
        c1 = 0.0
        c2 = 0.0
        if not RUNNING:
            c1 = _bcast(sum_dzx / total)
            c2 = _bcast(sum_dz / total)
        if ONE_PASS:
            dx = _dx(dz, x_hat, k, c1, c2, RUNNING)
            tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            t_begin = sp * chunk
            t_count = tl.minimum(chunk, n_tiles - t_begin)
            for i in range(0, t_count):
                base, offs, mask, _ = _tile(t_begin + t_count - 1 - i, s_tiles, c0, N, C, S,
                                            BLOCK_N, BLOCK_C, BLOCK_S)
                x_hat, dz = _grad_tile(X, DY, base, offs, mask, mean, rstd, w, b, ACT, ACC)
                dx = _dx(dz, x_hat, k, c1, c2, RUNNING)
                tl.store(DX + base + offs, dx.to(DX.dtype.element_ty), mask=mask)


# --- launchers ---------------------------------------------------------------------------------

def _geometry(x):
    """The (N', C, S') the kernels see x as, in its own memory format (see the module docstring)."""
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    return (n * s, c, 1) if s == 1 or memory_format_of(x) != torch.contiguous_format else (n, c, s)


def supported(x):
    """Whether these kernels take x: not empty, and the offsets inside any tile they may use fit int32."""
    return x.numel() > 0 and _offsets_fit(*_geometry(x))


@functools.lru_cache(maxsize=1024)
def _offsets_fit(n, c, s):
    """A tile's offsets from its int64 start reach block_n * C * S' (block_n does not depend on the
    program count; the widest tiles are those of 2-byte elements), and its first sample index
    n0 = tile * block_n, int32 in _tile, reaches N'."""
    return n < 2**31 - 2**16 and all(
        cfg.block_n * c * s < 2**31 for training in (False, True)
        for cfg in (BatchNormConfig.forward(n, c, s, training, 1, 2), BatchNormConfig.backward(n, c, s, training, 1, 2)))


def _config(make, x, n, c, s, training):
    """The heuristic's configuration for x: `make` is BatchNormConfig.forward or .backward. The
    batch-invariant mode plans for config.BI_PLANNED_SMS whatever the device: the split of the
    statistics and of dW/dB (eval's too) then depends on the shape only."""
    sms = BI_PLANNED_SMS if is_batch_invariant() else programs_per_wave(x.device, 16)
    return make(n, c, s, training, sms, x.element_size())


def _launch_geometry(cfg, n, c, s):
    s_tiles = triton.cdiv(s, cfg.block_s)
    n_tiles = triton.cdiv(n, cfg.block_n) * s_tiles
    c_blocks = triton.cdiv(c, cfg.block_c)
    return (n, c, s, s_tiles, n_tiles, c_blocks, cfg.chunk), (c_blocks * cfg.split,)


def _tile_args(cfg, x):
    return dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, ACC=acc_type(x.dtype),
                num_warps=cfg.num_warps)


def _running_buffers(running_mean, running_var, c):
    """The running statistics the forward updates in place, checked before any kernel runs (so a
    bad call leaves them as they were): [C] each, any float dtype. A non-contiguous one is updated
    in a contiguous copy, written back after the kernels (the second return value)."""
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None or t.numel() != c or not t.is_floating_point():
            raise ValueError(f"batch_norm_fwd: momentum given, so {name} must be a float tensor of {c} "
                             f"elements to update; got {None if t is None else (tuple(t.shape), t.dtype)}")
    dense_pair = [t.contiguous().view(c) for t in (running_mean, running_var)]
    write_back = [(t, d) for t, d in zip((running_mean, running_var), dense_pair) if not t.is_contiguous()]
    return dense_pair, write_back


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation, config=None,
                   momentum=None):
    """The triton backend's batch_norm forward (contract: normops/backends/__init__.py). `config`
    overrides the heuristic (tests use it to force the split path at small shapes).

    momentum (training only): also update running_mean and running_var in place, as
    running = (1 - momentum) * running + momentum * batch (the unbiased variance), inside the
    kernel that computes the batch statistics: no separate launches. The caller passes torch's
    factor (1 / num_batches_tracked for momentum=None, the cumulative average). None (the
    default): the running statistics are only read (eval) and never written."""
    x = x.contiguous(memory_format=memory_format_of(x))  # channels_last(_3d) stays: read in place
    n, c, s = _geometry(x)
    weight, bias = dense(weight), dense(bias)
    cfg = config or _config(BatchNormConfig.forward, x, n, c, s, training)
    geometry, grid = _launch_geometry(cfg, n, c, s)
    update = training and momentum is not None
    (rmean, rvar), write_back = _running_buffers(running_mean, running_var, c) if update else ((None, None), ())
    y = torch.empty_like(x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation], **_tile_args(cfg, x))
    w_arg, b_arg = (weight if weight is not None else y), (bias if bias is not None else y)
    if not training:
        launch(_batch_norm_fwd_kernel, grid, x, y, w_arg, b_arg, dense(running_mean), y, dense(running_var), y, y,
               *geometry, eps, 0.0, RUNNING=True, ONE_PASS=False, UPDATE=False, **flags)  # RSTD, RMEAN, RVAR (y) unread
        return y, None, None, None
    sd = stat_dtype(x.dtype)
    mean, rstd, var = (torch.empty(c, dtype=sd, device=x.device) for _ in range(3))
    rmean, rvar = (rmean, rvar) if update else (mean, mean)  # unread placeholders without an update
    momentum = float(momentum) if update else 0.0
    if not cfg.one_pass:
        part = torch.empty((cfg.split, 3, c), dtype=sd, device=x.device)
        launch(_batch_norm_stats_kernel, grid, x, part, *geometry, **_tile_args(cfg, x))
        launch(_batch_norm_finalize_kernel, (triton.cdiv(c, cfg.finalize_c),),
               part, mean, rstd, var, rmean, rvar, c, cfg.split, n * s, eps, momentum, UPDATE=update,
               BLOCK_SPLIT=cfg.finalize_split, BLOCK_C=cfg.finalize_c, ACC=acc_type(x.dtype), num_warps=4)
    launch(_batch_norm_fwd_kernel, grid, x, y, w_arg, b_arg, mean, rstd, var, rmean, rvar, *geometry, eps, momentum,
           RUNNING=False, ONE_PASS=cfg.one_pass, UPDATE=update and cfg.one_pass, **flags)
    for buffer, updated in write_back:
        buffer.copy_(updated)
    return y, mean, rstd, var


def batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd, training, eps,
                   activation, output_mask, config=None):
    """The triton backend's batch_norm backward (contract: normops/backends/__init__.py)."""
    fmt = memory_format_of(x)
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    n, c, s = _geometry(x)
    weight, bias = dense(weight), dense(bias)
    mean = dense(save_mean if training else running_mean)
    # training reads the saved rstd, eval the running variance (the kernels take rstd from it); the
    # one not read gets `mean` as a placeholder
    rstd, var = (dense(save_rstd), mean) if training else (mean, dense(running_var))
    want_dx = output_mask[0]
    want_dw = output_mask[1] and weight is not None
    want_db = output_mask[2] and bias is not None
    if not (want_dx or want_dw or want_db):
        return None, None, None
    cfg = config or _config(BatchNormConfig.backward, x, n, c, s, training)
    geometry, grid = _launch_geometry(cfg, n, c, s)
    sd = stat_dtype(x.dtype)
    dx = torch.empty_like(x) if want_dx else None
    dw = torch.empty_like(weight) if want_dw else None
    db = torch.empty_like(bias) if want_db else None
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
                 RUNNING=not training, **_tile_args(cfg, x))
    w_arg, b_arg = (weight if weight is not None else mean), (bias if bias is not None else mean)
    dw_arg, db_arg = (dw if want_dw else mean), (db if want_db else mean)
    sums = mean  # unread unless the split path's dx needs the totals (training)
    if not cfg.one_pass and (training or want_dw or want_db):
        part = torch.empty((cfg.split, 2, c), dtype=sd, device=x.device)
        launch(_batch_norm_bwd_sums_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, var, part, *geometry, eps, **flags)
        want_sums = training and want_dx
        sums = torch.empty((2, c), dtype=sd, device=x.device) if want_sums else mean
        launch(_batch_norm_bwd_finalize_kernel, (triton.cdiv(c, cfg.finalize_c),), part, sums, dw_arg, db_arg,
               c, cfg.split, WANT_SUMS=want_sums, HAS_DW=want_dw, HAS_DB=want_db, BLOCK_SPLIT=cfg.finalize_split,
               BLOCK_C=cfg.finalize_c, ACC=acc_type(x.dtype), num_warps=4)
    if cfg.one_pass or want_dx:
        launch(_batch_norm_bwd_kernel, grid, dy, x, w_arg, b_arg, mean, rstd, var, sums,
               dx if dx is not None else mean, dw_arg, db_arg, *geometry, eps, n * s, WANT_DX=want_dx,
               HAS_DW=want_dw and cfg.one_pass, HAS_DB=want_db and cfg.one_pass, ONE_PASS=cfg.one_pass, **flags)
    return dx, dw, db
