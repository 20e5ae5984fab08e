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

from normops.core import is_batch_invariant, suggested_format

from .common import ACTIVATIONS, act, act_grad, acc_type, dense, launch, stat_dtype
from .config import ChannelsFirstConfig, ParamGradsConfig, invariant_programs, programs_per_wave
from .row_norm import param_grads_kernel


@triton.jit
def _tile(sb, c0, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_LANE: tl.constexpr, S_IN: tl.constexpr):
    """Channels c0 + [0, BLOCK_C) as [BLOCK_C / C_LANE, C_LANE] and the positions of block sb as
    [BLOCK_S / S_IN, S_IN]: the tile is their 4-D product (_c4, _s4), whose layout puts a warp's
    lanes on c_lane x s_in and the warps on the positions first (config.ChannelsFirstConfig)."""
    cs = c0 + tl.arange(0, BLOCK_C // C_LANE)[:, None] * C_LANE + tl.arange(0, C_LANE)[None, :]
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S // S_IN)[:, None] * S_IN + tl.arange(0, S_IN)[None, :]
    return cs, ss


@triton.jit
def _c4(t):
    """A [channels] tensor of _tile broadcast over the tile."""
    return t[:, None, :, None]


@triton.jit
def _s4(t):
    """A [positions] tensor of _tile broadcast over the tile."""
    return t[None, :, None, :]


@triton.jit
def _csum(t):
    """Sum over the channels: a [positions] tensor."""
    return tl.sum(tl.sum(t, 2), 0)


@triton.jit
def _ssum(t):
    """Sum over the positions a warp holds (s_in): [channels, warps' positions, channels], reduced
    over the warps only once a program (the dw/db partials)."""
    return tl.sum(t, 3)


@triton.jit
def _affine_act_store(x_hat, ys, offs, mask, W, B, cs, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACT: tl.constexpr, ACC: tl.constexpr):
    """y = act(x_hat * w + b), w and b of the tile's channels cs, stored at ys + offs in ys's dtype."""
    w, b = _params(W, B, cs, C, HAS_W, HAS_B, ACC)
    z = x_hat
    if HAS_W:
        z = z * _c4(w)
    if HAS_B:
        z = z + _c4(b)
    tl.store(ys + offs, act(z, ACT).to(ys.dtype.element_ty), mask=mask)


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
    ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_LANE: tl.constexpr,
    S_IN: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n = pid // s_blocks
    sb = pid % s_blocks
    xs = X + n * sx_n
    ys = Y + n * sx_n
    if ONE_PASS:
        cs, ss = _tile(sb, 0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
        mask = _c4(cs < C) & _s4(ss < S)
        offs = _c4(cs) * sx_c + _s4(ss) * sx_s
        x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
        # the pivot: channel 0, loaded apart (L1) rather than reduced out of the tile, which took
        # an exchange between the warps where they split the channels
        p = tl.load(xs + ss * sx_s, mask=ss < S, other=0.0).to(ACC)
        mean = p + _csum(tl.where(mask, x - _s4(p), 0.0)) / C
        xc = tl.where(mask, x - _s4(mean), 0.0)
        rstd = 1.0 / tl.sqrt(_csum(xc * xc) / C + eps)
        _affine_act_store(xc * _s4(rstd), ys, offs, mask, W, B, cs, C, HAS_W, HAS_B, ACT, ACC)
    else:
        # Chan's combination of per-block (mean, M2) about the pivot, per position
        p = tl.zeros((BLOCK_S // S_IN, S_IN), dtype=ACC)
        mean_p = tl.zeros((BLOCK_S // S_IN, S_IN), dtype=ACC)
        m2 = tl.zeros((BLOCK_S // S_IN, S_IN), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            cs, ss = _tile(sb, c0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
            mask = _c4(cs < C) & _s4(ss < S)
            x = tl.load(xs + _c4(cs) * sx_c + _s4(ss) * sx_s, mask=mask, other=0.0).to(ACC)
            if c0 == 0:  # the pivot: channel 0, in the first block
                p = _csum(tl.where(_c4(cs == 0), x, 0.0))
            count = tl.full((), c0, ACC)  # the channels combined so far
            nb = tl.full((), tl.minimum(C - c0, BLOCK_C), ACC)
            d = tl.where(mask, x - _s4(p), 0.0)
            bmean = _csum(d) / nb
            dc = tl.where(mask, d - _s4(bmean), 0.0)
            delta = bmean - mean_p
            total = count + nb
            mean_p += delta * (nb / total)
            m2 += _csum(dc * dc) + delta * delta * (count * nb / total)
        mean = p + mean_p
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cs, ss = _tile(sb, c0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
            mask = _c4(cs < C) & _s4(ss < S)
            offs = _c4(cs) * sx_c + _s4(ss) * sx_s
            x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
            _affine_act_store((x - _s4(mean)) * _s4(rstd), ys, offs, mask, W, B, cs, C, HAS_W, HAS_B, ACT, ACC)
    if STORE_STATS:
        tl.store(MEAN + n * S + ss, mean, mask=ss < S)
        tl.store(RSTD + n * S + ss, rstd, mask=ss < S)


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
    x_hat = tl.where(mask, (x - _s4(mean)) * _s4(rstd), 0.0)
    dz = dy
    if ACT != 0:
        z = x_hat
        if HAS_W:
            z = z * _c4(w)
        if HAS_B:
            z = z + _c4(b)
        dz = dz * act_grad(z, ACT)
    dz = tl.where(mask, dz, 0.0)
    g = dz
    if HAS_W:
        g = g * _c4(w)
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
    PART,   # [programs, K, C] fp32 partials, a row per program: dw (WANT_DW), then db (WANT_DB)
    C, S, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, s_blocks, tiles,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, WANT_DX: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    ONE_PASS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, C_LANE: tl.constexpr,
    S_IN: tl.constexpr, ACC: tl.constexpr,
):
    """A persistent program: tiles pid, pid + programs, ...; its dw/db sums go to its partial row,
    written whole by it (no zeros beforehand: the glue kernel reads every row)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    dwp = PART + pid.to(tl.int64) * (WANT_DW + WANT_DB) * C
    dbp = dwp + WANT_DW * C
    if ONE_PASS:
        cs0, _ = _tile(0, 0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
        w, b = _params(W, B, cs0, C, HAS_W, HAS_B, ACC)
        # per warp's positions: summed over the warps once, after the loop
        dw_acc = tl.zeros((BLOCK_C // C_LANE, BLOCK_S // S_IN, C_LANE), dtype=ACC)
        db_acc = tl.zeros((BLOCK_C // C_LANE, BLOCK_S // S_IN, C_LANE), dtype=ACC)
    else:  # the row starts at zero, then each tile adds to it
        for c0 in range(0, C, BLOCK_C):
            cs, _ = _tile(0, c0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
            if WANT_DW:
                tl.store(dwp + cs, tl.zeros(cs.shape, dtype=ACC), mask=cs < C)
            if WANT_DB:
                tl.store(dbp + cs, tl.zeros(cs.shape, dtype=ACC), mask=cs < C)
    for t in range(pid, tiles, programs):
        n = t // s_blocks
        sb = t % s_blocks
        xs = X + n.to(tl.int64) * sx_n
        dys = DY + n.to(tl.int64) * sdy_n
        dxs = DX + n.to(tl.int64) * sx_n
        if ONE_PASS:
            cs, ss = _tile(sb, 0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
            mean = tl.load(MEAN + n.to(tl.int64) * S + ss, mask=ss < S, other=0.0).to(ACC)
            rstd = tl.load(RSTD + n.to(tl.int64) * S + ss, mask=ss < S, other=0.0).to(ACC)
            mask = _c4(cs < C) & _s4(ss < S)
            offs = _c4(cs) * sx_c + _s4(ss) * sx_s
            x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dys + _c4(cs) * sdy_c + _s4(ss) * sdy_s, mask=mask, other=0.0).to(ACC)
            dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
            # dw/db first: dz dies before dx's cross-warp reductions (with gelu it spilled there)
            if WANT_DW:
                dw_acc += _ssum(dz * x_hat)
            if WANT_DB:
                db_acc += _ssum(dz)
            if WANT_DX:
                g0 = _csum(tl.where(_c4(cs == 0), g, 0.0))  # channel 0: the pivot
                c1 = _csum(g * x_hat) / C
                c2 = g0 + _csum(tl.where(mask, g - _s4(g0), 0.0)) / C
                dx = _s4(rstd) * (g - _s4(c2) - x_hat * _s4(c1))
                tl.store(dxs + offs, dx.to(DX.dtype.element_ty), mask=mask)
        else:
            cs, ss = _tile(sb, 0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
            mean = tl.load(MEAN + n.to(tl.int64) * S + ss, mask=ss < S, other=0.0).to(ACC)
            rstd = tl.load(RSTD + n.to(tl.int64) * S + ss, mask=ss < S, other=0.0).to(ACC)
            c1 = tl.zeros(mean.shape, dtype=ACC)
            c2 = tl.zeros(mean.shape, dtype=ACC)
            g0 = tl.zeros(mean.shape, dtype=ACC)
            if WANT_DX:
                for c0 in range(0, C, BLOCK_C):
                    cs, ss = _tile(sb, c0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
                    mask = _c4(cs < C) & _s4(ss < S)
                    w, b = _params(W, B, cs, C, HAS_W, HAS_B, ACC)
                    x = tl.load(xs + _c4(cs) * sx_c + _s4(ss) * sx_s, mask=mask, other=0.0).to(ACC)
                    dy = tl.load(dys + _c4(cs) * sdy_c + _s4(ss) * sdy_s, mask=mask, other=0.0).to(ACC)
                    dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
                    if c0 == 0:
                        g0 = _csum(tl.where(_c4(cs == 0), g, 0.0))
                    c1 += _csum(g * x_hat)
                    c2 += _csum(tl.where(mask, g - _s4(g0), 0.0))
                c1 = c1 / C
                c2 = g0 + c2 / C
            for c0 in range(0, C, BLOCK_C):
                cs, ss = _tile(sb, c0, BLOCK_C, BLOCK_S, C_LANE, S_IN)
                mask = _c4(cs < C) & _s4(ss < S)
                w, b = _params(W, B, cs, C, HAS_W, HAS_B, ACC)
                offs = _c4(cs) * sx_c + _s4(ss) * sx_s
                x = tl.load(xs + offs, mask=mask, other=0.0).to(ACC)
                dy = tl.load(dys + _c4(cs) * sdy_c + _s4(ss) * sdy_s, mask=mask, other=0.0).to(ACC)
                dz, x_hat, g = _dz_xhat(x, dy, w, b, mean, rstd, mask, HAS_W, HAS_B, ACT)
                if WANT_DX:
                    dx = _s4(rstd) * (g - _s4(c2) - x_hat * _s4(c1))
                    tl.store(dxs + offs, dx.to(DX.dtype.element_ty), mask=mask)
                if WANT_DW:  # this program's own row: no other program writes it
                    tl.store(dwp + cs, tl.load(dwp + cs, mask=cs < C, other=0.0) + tl.sum(_ssum(dz * x_hat), 1),
                             mask=cs < C)
                if WANT_DB:
                    tl.store(dbp + cs, tl.load(dbp + cs, mask=cs < C, other=0.0) + tl.sum(_ssum(dz), 1),
                             mask=cs < C)
    if ONE_PASS:
        if WANT_DW:
            tl.store(dwp + cs0, tl.sum(dw_acc, 1), mask=cs0 < C)
        if WANT_DB:
            tl.store(dbp + cs0, tl.sum(db_acc, 1), mask=cs0 < C)


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
    cfg = config or ChannelsFirstConfig.forward(c, s, sx_c == 1 and c > 1, x.element_size())
    s_blocks = triton.cdiv(s, cfg.block_s)
    launch(_layer_norm_cf_fwd_kernel, (n * s_blocks,), x, y, weight if weight is not None else y,
           bias if bias is not None else y, mean if need_stats else y, rstd if need_stats else y,
           c, s, sx_n, sx_c, sx_s, s_blocks, eps, num_warps=cfg.num_warps,
           HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation], STORE_STATS=need_stats,
           ONE_PASS=cfg.one_pass, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, C_LANE=cfg.c_lane, S_IN=cfg.s_in,
           ACC=acc_type(x.dtype))
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
    cfg = config or ChannelsFirstConfig.backward(c, s, sx_c == 1 and c > 1, x.element_size())
    s_blocks = triton.cdiv(s, cfg.block_s)
    tiles = n * s_blocks
    # the batch-invariant mode: a program per config.BI_CHUNK_ROWS positions' tiles, not per SM
    programs = min(tiles, invariant_programs(tiles, cfg.block_s) if is_batch_invariant()
                   else programs_per_wave(x.device, cfg.num_warps))
    dx = torch.empty_like(x) if want_dx else None
    acc = stat_dtype(x.dtype)
    # every program writes its whole row (its sums, or zeros): no zeros launch beforehand
    part = torch.empty((programs, want_dw + want_db, c), dtype=acc, device=x.device) if want_dw or want_db else None
    any_ = x if dx is None else dx
    launch(_layer_norm_cf_bwd_kernel, (programs,), x, dy, any_, weight if weight is not None else x,
           bias if bias is not None else x, mean, rstd, part if part is not None else any_,
           c, s, sx_n, sx_c, sx_s, sdy_n, sdy_c, sdy_s, s_blocks, tiles,
           num_warps=cfg.num_warps, HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
           WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db, ONE_PASS=cfg.one_pass, BLOCK_C=cfg.block_c,
           BLOCK_S=cfg.block_s, C_LANE=cfg.c_lane, S_IN=cfg.s_in, ACC=acc_type(x.dtype))
    if part is None:
        return dx, None, None
    # the one glue launch: a fixed-order sum over the programs' rows, cast to the parameters' dtype
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if want_dw else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=x.device) if want_db else None
    pg = ParamGradsConfig.make(c, programs)
    launch(param_grads_kernel, (triton.cdiv(c, pg.block_n), 1), part, dw if want_dw else db,
           db if want_db else dw, programs, c, num_warps=pg.num_warps, WANT_DW=want_dw, WANT_DB=want_db,
           GROUPED=False, BLOCK_G=pg.block_g, BLOCK_N=pg.block_n, ACC=acc_type(x.dtype))
    return dx, dw, db
