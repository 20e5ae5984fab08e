"""Channels-first LayerNorm in Triton (ConvNeXt's, timm's LayerNorm2d): each position of an (N, C, *S)
tensor normalized over its C channels, with a per-channel weight and bias, read in place in either
layout (NCHW: positions contiguous; channels_last: channels contiguous): one kernel, the strides as
arguments, no permuted copy. A stride of 1 is specialized by the JIT, so each layout compiles to
its own vectorized variant.

Math, per (sample n, position s), over the C channels (statistics in fp32, fp64 for fp64 input):
    forward    mean = p + sum(x - p) / C, p = x[0] (the pivot: a constant column has x - p = 0
               exactly, so x_hat = 0, as kernels/row_norm.py does)
               var = sum((x - mean)^2) / C       rstd = 1 / sqrt(var + eps)
               x_hat = (x - mean) * rstd         z = x_hat * w_c + b_c       y = act(z)
               C wider than a tile: per block of channels its mean and M2 about p, combined by
               Chan's formula (stable), then a second pass normalizes.
    backward   dz = dy * act'(z)                 g = dz * w_c
               c1 = sum(g * x_hat) / C           c2 = g0 + sum(g - g0) / C, g0 = g[0]
               dx = rstd * (g - c2 - x_hat * c1)
               dw_c = sum over (n, s) of dz * x_hat          db_c = sum over (n, s) of dz
The backward recomputes x_hat (and z) from x and the saved mean/rstd ([N, S] each).

Bytes moved, for N*C*S elements of e bytes:
    forward     read x, write y: N*C*S*e each; w, b: C*e; mean, rstd: 4*N*S each when a gradient
                will be needed. C wider than a tile: a second read of x (from L2: a program's tile
                of C x BLOCK_S is at most a few hundred KB).
    backward    read x, dy, write dx: N*C*S*e each; mean, rstd: 4*N*S each; dw, db partials: 4*P*C
                each, P = programs (about the SMs x 2), summed afterwards in a fixed order by
                torch (deterministic, no atomics). C wider than a tile: second reads of x and dy
                (L2), and each program's partial row read and written once per tile (its own row:
                C*8 bytes, L2-resident).
"""
import math

import torch
import triton
import triton.language as tl

from normops.core import suggested_format

from .common import ACTIVATIONS, act, act_grad, acc_type, dense, launch, stat_dtype
from .config import ChannelsFirstConfig, programs_per_wave


@triton.jit
def _tile(sb, c0, C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channels c0 + [0, BLOCK_C) and positions of block sb: (channel offsets, positions, mask)."""
    cs = c0 + tl.arange(0, BLOCK_C)
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    return cs, ss, (cs < C)[:, None] & (ss < S)[None, :]


@triton.jit
def _layer_norm_cf_fwd_kernel(
    X,     # [N, C, S] input, strides sx_n, sx_c, sx_s (NCHW: sx_s = 1; channels_last: sx_c = 1)
    Y,     # [N, C, S] output, x's strides
    W,     # [C] weight (unused without HAS_W)
    B,     # [C] bias (unused without HAS_B)
    MEAN,  # [N, S] fp32 mean (written with STORE_STATS)
    RSTD,  # [N, S] fp32 1 / std (written with STORE_STATS)
    C, S, sx_n, sx_c, sx_s, s_blocks, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, STORE_STATS: tl.constexpr,
    ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // s_blocks
    sb = pid % s_blocks
    xs = X + n * sx_n
    ys = Y + n * sx_n
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    smask = ss < S
    p = tl.load(xs + ss * sx_s, mask=smask, other=0.0).to(ACC)  # the pivot: channel 0
    if ONE_PASS:
        cs, ss, mask = _tile(sb, 0, C, S, BLOCK_C, BLOCK_S)
        offs = cs[:, None] * sx_c + ss[None, :] * sx_s
        x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
        mean = p + tl.sum(tl.where(mask, x - p[None, :], 0.0), 0) / C
        xc = tl.where(mask, x - mean[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / C + eps)
        z = xc * rstd[None, :]
        if HAS_W:
            z = z * tl.load(W + cs, mask=cs < C, other=0.0).to(ACC)[:, None]
        if HAS_B:
            z = z + tl.load(B + cs, mask=cs < C, other=0.0).to(ACC)[:, None]
        tl.store(ys + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)
    else:
        # Chan's combination of per-block (mean, M2) about the pivot, per position
        mean_p = tl.zeros((BLOCK_S,), dtype=ACC)
        m2 = tl.zeros((BLOCK_S,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cs, ss, mask = _tile(sb, c0, C, S, BLOCK_C, BLOCK_S)
            x = tl.load(xs + cs[:, None] * sx_c + ss[None, :] * sx_s, mask=mask, other=0.0).to(ACC)
            count = tl.full((), c0, ACC)  # the channels combined so far
            nb = tl.full((), tl.minimum(C - c0, BLOCK_C), ACC)
            d = tl.where(mask, x - p[None, :], 0.0)
            bmean = tl.sum(d, 0) / nb
            dc = tl.where(mask, d - bmean[None, :], 0.0)
            delta = bmean - mean_p
            total = count + nb
            mean_p += delta * (nb / total)
            m2 += tl.sum(dc * dc, 0) + delta * delta * (count * nb / total)
        mean = p + mean_p
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cs, ss, mask = _tile(sb, c0, C, S, BLOCK_C, BLOCK_S)
            offs = cs[:, None] * sx_c + ss[None, :] * sx_s
            x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
            z = (x - mean[None, :]) * rstd[None, :]
            if HAS_W:
                z = z * tl.load(W + cs, mask=cs < C, other=0.0).to(ACC)[:, None]
            if HAS_B:
                z = z + tl.load(B + cs, mask=cs < C, other=0.0).to(ACC)[:, None]
            tl.store(ys + offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + n * S + ss, mean, mask=smask)
        tl.store(RSTD + n * S + ss, rstd, mask=smask)


@triton.jit
def _params(W, B, cs, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    """(w, b) of channels cs in ACC; zeros (unused) where absent."""
    w = tl.zeros(cs.shape, dtype=ACC)
    b = tl.zeros(cs.shape, dtype=ACC)
    if HAS_W:
        w = tl.load(W + cs, mask=cs < C, other=0.0).to(ACC)
    if HAS_B:
        b = tl.load(B + cs, mask=cs < C, other=0.0).to(ACC)
    return w, b


@triton.jit
def _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """(dz, x_hat, g = dz * w) of one tile, zero outside the mask."""
    x_hat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    dz = dy
    if ACT != 0:
        z = x_hat
        if HAS_W:
            z = z * w[:, None]
        if HAS_B:
            z = z + b[:, None]
        dz = dz * act_grad(z, ACT)
    dz = tl.where(mask, dz, 0.0)
    g = dz
    if HAS_W:
        g = g * w[:, None]
    return dz, x_hat, g


@triton.jit
def _layer_norm_cf_bwd_kernel(
    X,      # [N, C, S] input, strides sx_n, sx_c, sx_s
    DY,     # [N, C, S] output gradient, strides sdy_n, sdy_c, sdy_s
    DX,     # [N, C, S] input gradient, x's strides
    W,      # [C] weight (unused without HAS_W)
    B,      # [C] bias (unused without HAS_B; the activation's input needs it)
    MEAN,   # [N, S] fp32 saved mean
    RSTD,   # [N, S] fp32 saved 1 / std
    DWP,    # [programs, C] fp32 partial dweight, a row per program (zeros in: the looped kernel adds)
    DBP,    # [programs, C] fp32 partial dbias
    C, S, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, s_blocks, tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, WANT_DX: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):
    """A persistent program: tiles pid, pid + programs, ...; its dw/db sums go to its partial row."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    if ONE_PASS:
        cs0 = tl.arange(0, BLOCK_C)
        w, b = _params(W, B, cs0, C, HAS_W, HAS_B, ACC)
        dw_acc = tl.zeros((BLOCK_C,), dtype=ACC)
        db_acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for t in range(pid, tiles, programs):
        n = t // s_blocks
        sb = t % s_blocks
        ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
        smask = ss < S
        mean = tl.load(MEAN + n.to(tl.int64) * S + ss, mask=smask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + n.to(tl.int64) * S + ss, mask=smask, other=0.0).to(ACC)
        xs = X + n.to(tl.int64) * sx_n
        dys = DY + n.to(tl.int64) * sdy_n
        dxs = DX + n.to(tl.int64) * sx_n
        if ONE_PASS:
            cs, ss, mask = _tile(sb, 0, C, S, BLOCK_C, BLOCK_S)
            offs = cs[:, None] * sx_c + ss[None, :] * sx_s
            x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dys + cs[:, None] * sdy_c + ss[None, :] * sdy_s, mask=mask, other=0.0).to(ACC)
            dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
            if WANT_DX:
                g0 = tl.sum(tl.where(cs[:, None] == 0, g, 0.0), 0)  # channel 0: the pivot
                c1 = tl.sum(g * x_hat, 0) / C
                c2 = g0 + tl.sum(tl.where(mask, g - g0[None, :], 0.0), 0) / C
                dx = rstd[None, :] * (g - c2[None, :] - x_hat * c1[None, :])
                tl.store(dxs + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if WANT_DW:
                dw_acc += tl.sum(dz * x_hat, 1)
            if WANT_DB:
                db_acc += tl.sum(dz, 1)
        else:
            c1 = tl.zeros((BLOCK_S,), dtype=ACC)
            c2 = tl.zeros((BLOCK_S,), dtype=ACC)
            g0 = tl.zeros((BLOCK_S,), dtype=ACC)
            if WANT_DX:
                for c0 in range(0, C, BLOCK_C):
                    cs, ss, mask = _tile(sb, c0, C, S, BLOCK_C, BLOCK_S)
                    w, b = _params(W, B, cs, C, HAS_W, HAS_B, ACC)
                    x = tl.load(xs + cs[:, None] * sx_c + ss[None, :] * sx_s, mask=mask,
                                other=0.0).to(ACC)
                    dy = tl.load(dys + cs[:, None] * sdy_c + ss[None, :] * sdy_s, mask=mask,
                                 other=0.0).to(ACC)
                    dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
                    if c0 == 0:
                        g0 = tl.sum(tl.where(cs[:, None] == 0, g, 0.0), 0)
                    c1 += tl.sum(g * x_hat, 0)
                    c2 += tl.sum(tl.where(mask, g - g0[None, :], 0.0), 0)
                c1 = c1 / C
                c2 = g0 + c2 / C
            for c0 in range(0, C, BLOCK_C):
                cs, ss, mask = _tile(sb, c0, C, S, BLOCK_C, BLOCK_S)
                cmask = cs < C
                w, b = _params(W, B, cs, C, HAS_W, HAS_B, ACC)
                offs = cs[:, None] * sx_c + ss[None, :] * sx_s
                x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
                dy = tl.load(dys + cs[:, None] * sdy_c + ss[None, :] * sdy_s, mask=mask,
                             other=0.0).to(ACC)
                dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
                if WANT_DX:
                    dx = rstd[None, :] * (g - c2[None, :] - x_hat * c1[None, :])
                    tl.store(dxs + offs, dx.to(DX.dtype.element_ty), mask=mask)
                if WANT_DW:  # this program's own row: no other program writes it
                    row = DWP + pid.to(tl.int64) * C + cs
                    tl.store(row, tl.load(row, mask=cmask, other=0.0) + tl.sum(dz * x_hat, 1), mask=cmask)
                if WANT_DB:
                    row = DBP + pid.to(tl.int64) * C + cs
                    tl.store(row, tl.load(row, mask=cmask, other=0.0) + tl.sum(dz, 1), mask=cmask)
    if ONE_PASS:
        if WANT_DW:
            tl.store(DWP + pid.to(tl.int64) * C + cs0, dw_acc, mask=cs0 < C)
        if WANT_DB:
            tl.store(DBP + pid.to(tl.int64) * C + cs0, db_acc, mask=cs0 < C)


def _view(t):
    """(t, its (N, C, S) strides): t itself when it is NCHW, channels_last(_3d) or the transposed
    (N, L, C) of a 3-D input (dense, its spatial dims one position axis of one stride), else a copy
    in its suggested layout. y and dx are torch.empty_like(t): t's strides."""
    if not (t.is_contiguous() or _channels_last(t)):
        t = t.contiguous(memory_format=suggested_format(t))
    ss = next((t.stride(d) for d in range(t.dim() - 1, 1, -1) if t.shape[d] != 1), 1)
    return t, (t.stride(0), t.stride(1), ss)


def _channels_last(t):
    """Dense with C innermost and the spatial dims in order: (N, *S, C) in memory."""
    return t.dim() > 2 and t.movedim(1, -1).is_contiguous()


def supported(x):
    """Whether the kernels take x: offsets within a sample are int32 (the sample's base is int64)."""
    return x[0].numel() < 2**31 if x.shape[0] else True


def layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats, config=None):
    """The triton backend's channels-first forward (contract: normops/backends/__init__.py):
    (y in x's layout, mean [N, *S], rstd [N, *S]) or (y, None, None). `config` overrides the heuristic."""
    weight, bias = dense(weight), dense(bias)
    x, (sx_n, sx_c, sx_s) = _view(x)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    y = torch.empty_like(x)
    sd = stat_dtype(x.dtype)
    mean = torch.empty((n,) + x.shape[2:], dtype=sd, device=x.device) if need_stats else None
    rstd = torch.empty((n,) + x.shape[2:], dtype=sd, device=x.device) if need_stats else None
    cfg = config or ChannelsFirstConfig.forward(c, s, channels_last=sx_c == 1 and c > 1)
    s_blocks = triton.cdiv(s, cfg.block_s)
    launch(_layer_norm_cf_fwd_kernel, (n * s_blocks,), x, y, weight if weight is not None else y,
           bias if bias is not None else y, mean if need_stats else y, rstd if need_stats else y,
           c, s, sx_n, sx_c, sx_s, s_blocks, eps, num_warps=cfg.num_warps,
           HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation], STORE_STATS=need_stats,
           ONE_PASS=cfg.one_pass, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, ACC=acc_type(x.dtype))
    return y, mean, rstd


def layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask, config=None):
    """The triton backend's channels-first backward: (dx in x's layout, dweight, dbias), None where
    output_mask says no or the parameter is absent."""
    weight, bias, mean, rstd = dense(weight), dense(bias), dense(mean), dense(rstd)
    x, (sx_n, sx_c, sx_s) = _view(x)
    dy, (sdy_n, sdy_c, sdy_s) = _view(dy)
    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    want_dx = bool(output_mask[0])
    want_dw = bool(output_mask[1]) and weight is not None
    want_db = bool(output_mask[2]) and bias is not None
    cfg = config or ChannelsFirstConfig.backward(c, s, channels_last=sx_c == 1 and c > 1)
    s_blocks = triton.cdiv(s, cfg.block_s)
    tiles = n * s_blocks
    programs = min(tiles, programs_per_wave(x.device, cfg.num_warps))
    dx = torch.empty_like(x) if want_dx else None
    acc = stat_dtype(x.dtype)
    parts = torch.zeros((2 if want_dw and want_db else 1, programs, c), dtype=acc, device=x.device) \
        if want_dw or want_db else None
    dwp = parts[0] if want_dw else None
    dbp = parts[-1] if want_db else None
    any_ = x if dx is None else dx
    launch(_layer_norm_cf_bwd_kernel, (programs,), x, dy, any_, weight if weight is not None else x,
           bias if bias is not None else x, mean, rstd, dwp if dwp is not None else any_,
           dbp if dbp is not None else any_, c, s, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, s_blocks, tiles,
           num_warps=cfg.num_warps, HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
           WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db, ONE_PASS=cfg.one_pass, BLOCK_C=cfg.block_c,
           BLOCK_S=cfg.block_s, ACC=acc_type(x.dtype))
    dw = dwp.sum(0).to(weight.dtype) if want_dw else None  # a fixed-order sum over the programs' rows
    db = dbp.sum(0).to(bias.dtype) if want_db else None
    return dx, dw, db
