"""LayerNorm and RMSNorm in Triton: forward and backward, one kernel family.

RMS vs LayerNorm, weight, bias, residual add and activation are ``tl.constexpr`` flags, and so are
the language models' variants: the weight offset (W_OFFSET: y = x_hat * (offset + w)), the casting
modes' roundings (XHAT: the dtype x_hat is rounded to before the weight; PROD: the dtype x_hat * w is
rounded to before a gate), the gate (HAS_GATE: y = z * silu(gate); GATE_FIRST: the norm of
x * silu(gate)). Groups (a row normalized in groups of n columns) are the grid's second dimension:
group j is the row norm of columns [j * n, (j + 1) * n), with its own statistics. The two
forward algorithms are two kernels sharing their load (with the residual add) and affine +
activation epilogue: ``_row_norm_fwd_kernel``, whole rows in registers (one pass), and
``_row_norm_fwd_looped_kernel``, wider rows in column blocks (two passes over each row). The
backward is two launches at any width: ``_row_norm_bwd_kernel`` (rows in registers) or
``_row_norm_bwd_looped_kernel`` (wider rows, two passes over each, the second from L2), persistent
programs that write per-program fp32 dW/dB partials, then ``_row_norm_param_grads_kernel``, which
sums them in a fixed order into the parameters' dtype. ``RowNormConfig`` (config.py) picks.

Math, per row of N elements (RMSNorm: mean = 0, var = mean(h^2)):
    forward    h = x + r (optional residual)      mean = p + sum(h - p) / N, p = h[0] (exact for a constant row)
               var = sum((h - mean)^2) / N         rstd = 1 / sqrt(var + eps)
               x_hat = (h - mean) * rstd           z = x_hat * w + b           y = act(z)
    backward   dz = dy * act'(z)                   g = dz * w
               c1 = sum(g * x_hat) / N             c2 = g0 + sum(g - g0) / N, g0 = g[0] (RMSNorm: 0)
               dx = rstd * (g - c2 - x_hat * c1)  (a constant row, x_hat = 0 and g constant: exactly 0)
               dw = sum over rows of dz * x_hat    db = sum over rows of dz
The backward recomputes x_hat (and z) from x and the saved fp32 mean/rstd; nothing else is saved.
Variants: g = dz * (offset + w); a gate after the norm: dgate = dz * z * silu'(gate), dz *= silu(gate);
a gate first: dx and dgate from du (the gradient of u = x * silu(gate)). Roundings are straight-through,
but dw = sum(dz * x_hat as rounded), which is what autograd through a Hugging Face module computes.

Bytes moved, for M rows of N elements of e bytes (the speed to expect is bytes / bandwidth):
    forward, one pass       read x (+ r): M*N*e each; w, b: N*e; write y (+ h): M*N*e each;
                            mean, rstd: 4*M each, only when a gradient will be needed
    forward, looped         as one pass, plus a second read of x (or h): + M*N*e, from L2 when the
                            rows in flight fit there (persistent grid; see the kernel)
    backward, one pass      read x, dy: M*N*e each; write dx: M*N*e; dw, db partials: 4*G*N each,
                            G = programs (~SMs), then one reduction over them (the second launch)
    backward, looped        as one pass, plus a second read of x and dy: + 2*M*N*e, from L2 (G is
                            capped so the rows in flight and the partial rows fit there)
A gate adds a read of M*N*e forward (a gate first is read in both passes of the looped kernel, the
second from L2) and a read and a dgate write backward (both passes of the looped backward read it).
With a residual, the backward adds dh (the gradient of h from later layers: one more read) to dx
and writes it for x and, for an fp32 residual stream under bf16 x, once more in fp32.
Statistics and reductions accumulate in fp32 (fp64 for fp64 input); dw/db are per-program fp32
partials summed afterwards in a fixed order: deterministic, no atomics.

Rows may be strided: row r of x is at (r // inner) * stride_outer + (r % inner) * stride_inner,
which covers any layout whose normalized dims are contiguous and whose batch dims collapse to two.
"""
import math

import torch
import triton
import triton.language as tl

from normops.core import MIN_QUANT_SCALE, QUANT_MAX, casting_dtypes, is_batch_invariant

from .common import ACTIVATIONS, act, act_grad, acc_type, dense, launch, stat_dtype
from .config import (ParamGradsConfig, RowNormConfig, invariant_programs, programs_per_wave, row_norm_bwd_programs,
                     row_norm_fwd_programs)

@triton.jit
def _row_offsets(rows, inner, s_outer, s_inner):
    rows = rows.to(tl.int64)
    return (rows // inner) * s_outer + (rows % inner) * s_inner


@triton.jit
def _group(N, GROUPED: tl.constexpr):
    """(group index, groups, the group's first column): program_id(1) when the rows are normalized
    in groups, else constants (0, 1, 0) that fold away: the plain kernels compile as before."""
    if GROUPED:
        grp = tl.program_id(1)
        return grp, tl.num_programs(1), grp * N
    else:
        return 0, 1, 0


@triton.jit
def _pivot(x_ptrs, r_ptrs, H, mask, HAS_R: tl.constexpr, ACC: tl.constexpr):
    """Each row's first h (x + r rounded as _add_residual rounds it): the origin LayerNorm's
    statistics are taken about. A constant row then has h - pivot = 0 exactly, so its mean is exact
    and x_hat is 0 (sum(h) / N can be an ulp off, which rstd = 1/sqrt(eps) magnifies), and a row
    far from 0 keeps its digits (h - pivot is exact for h near the pivot)."""
    p = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_R:
        p = (p.to(ACC) + tl.load(r_ptrs, mask=mask, other=0.0).to(ACC)).to(H.dtype.element_ty)
    return p.to(ACC)


# The forward kernels' shared steps. Their arguments keep the order in which the single kernel
# these were split from computed things (x loaded before the residual's pointers, y's pointer
# formed after the affine): ptxas's register counts follow that order (up to 8 apart otherwise).
@triton.jit
def _add_residual(x, r_ptrs, h_ptrs, mask, HAS_R: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr):
    """h = x (+ r) in ACC; with a residual, h is stored too, rounded to the input dtype as torch's add."""
    if HAS_R:
        r = tl.load(r_ptrs, mask=mask, other=0.0)
        x = (x.to(ACC) + r.to(ACC)).to(h_ptrs.dtype.element_ty)
        tl.store(h_ptrs, x, mask=mask, eviction_policy=EVICT)
    return x.to(ACC)


@triton.jit
def _store_stats(MEAN, RSTD, rows, mean, rstd, mask, IS_RMS: tl.constexpr, STORE_STATS: tl.constexpr):
    """mean (LayerNorm only) and rstd at rows, when a gradient will need them; mask None: rows in range."""
    if STORE_STATS:
        if not IS_RMS:
            tl.store(MEAN + rows, mean, mask=mask)
        tl.store(RSTD + rows, rstd, mask=mask)


@triton.jit
def _gate(Z, offs, mask, HAS_GATE: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr):
    """(gate, silu(gate)) at Z + offs, or (0, 1) without a gate."""
    gz = 0.0
    sg = 1.0
    if HAS_GATE:
        gz = tl.load(Z + offs, mask=mask, other=0.0, eviction_policy=EVICT).to(ACC)
        sg = act(gz, 2)
    return gz, sg


@triton.jit
def _scaled(z, w, HAS_W: tl.constexpr, W_OFFSET: tl.constexpr):
    """z * (offset + w)."""
    if HAS_W:
        if W_OFFSET != 0.0:  # a constexpr: adding 0.0 is not free (x + 0.0 is not x for x = -0.0)
            w = w + W_OFFSET
        z = z * w
    return z


@triton.jit
def _affine(x_hat, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr,
            PROD: tl.constexpr, ACC: tl.constexpr):
    """(x_hat as the casting mode rounds it, z = x_hat * (offset + w) + b as rounded before a gate)."""
    x_hat = x_hat.to(XHAT).to(ACC)  # XHAT == ACC: no rounding (compiled away)
    z = _scaled(x_hat, w, HAS_W, W_OFFSET)
    if HAS_B:
        z = z + b
    return x_hat, z.to(PROD).to(ACC)


@triton.jit
def _affine_act(x_hat, sg, W, B, cols, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr, GATE_AFTER: tl.constexpr,
                ACC: tl.constexpr):
    """y = act(x_hat * (offset + w) + b) (times silu(gate) when GATE_AFTER) in ACC; w and b are read
    at cols (x_hat's last dim), each where it is used (the order ptxas allocates best)."""
    z = x_hat.to(XHAT).to(ACC)
    if HAS_W:
        z = _scaled(z, tl.load(W + cols, mask=col_mask, other=0.0).to(ACC), HAS_W, W_OFFSET)
    if HAS_B:
        z = z + tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)
    z = z.to(PROD).to(ACC)
    if GATE_AFTER:
        z = z * sg
    return act(z, ACT)


@triton.jit
def _affine_act_store(x_hat, sg, Y, y_offs, mask, W, B, cols, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACT: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr,
                      GATE_AFTER: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr):
    """_affine_act's y stored at Y + y_offs in Y's dtype."""
    y = _affine_act(x_hat, sg, W, B, cols, col_mask, HAS_W, HAS_B, ACT, W_OFFSET, XHAT, PROD, GATE_AFTER, ACC)
    tl.store(Y + y_offs, y.to(Y.dtype.element_ty), mask=mask, eviction_policy=EVICT)


# Quantized outputs (normops::row_norm_quant): QUANT numbers the codes (their finite maxima:
# normops.core.QUANT_MAX).
Q_FP8 = 1     # float8_e4m3fn, its bits computed with integer ops: any target, and the interpreter (whose
#               fp32 -> fp8e4nv conversion truncates and does not saturate)
Q_FP8_HW = 2  # float8_e4m3fn by the hardware's conversion (sm_89+: cvt.rn.satfinite, the same bits)
Q_INT8 = 3


@triton.jit
def _e4m3_bits(v):
    """float8_e4m3fn's bits of v (fp32), rounded to nearest even and saturated at +-448 as torch's
    .to(torch.float8_e4m3fn) does, NaN kept: integer ops on fp32's bits. Normal e4m3 values (from
    2**-6) keep 3 of fp32's 23 mantissa bits (round half to even on the 20 dropped; a carry moves
    the exponent), rebiased from 127 to 7; subnormals are multiples of 2**-9, rounded by the
    1.5 * 2**23 trick, and their codes are those multiples (8 is 2**-6, the first normal)."""
    a = tl.abs(v)
    a = tl.where(a > 448.0, 448.0, a)  # NaN compares false: kept
    bits = a.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.uint32)
    code = tl.where(a < 0.015625, sub, normal)
    code = tl.where(a != a, 0x7F, code)
    return (code | ((v.to(tl.uint32, bitcast=True) >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _quantized(v, QUANT: tl.constexpr):
    """v (y / scale, fp32) in the quantized dtype's code: saturated at its finite max, rounded to
    nearest even (int8: by the 1.5 * 2**23 trick; NaN gives 0)."""
    if QUANT == 1:
        return _e4m3_bits(v)
    elif QUANT == 2:
        return v.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    else:
        v = tl.where(v != v, 0.0, tl.minimum(tl.maximum(v, -128.0), 127.0))
        return ((v + 12582912.0) - 12582912.0).to(tl.int8)


@triton.jit
def _quant_store(y, Q, SCALES, offs, mask, rows, row_mask, n_scales, QUANT: tl.constexpr, Q_GROUP: tl.constexpr,
                 STATIC: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """A tile of whole rows of y (fp32, as the output dtype rounded it; 0 outside mask) quantized
    into Q: q = y * (1 / scale), saturated and rounded. STATIC: one given scale at SCALES; else
    dynamic, scale = max(amax |y| / QMAX, MIN_SCALE) per row (Q_GROUP 0) or per Q_GROUP consecutive
    values (n_scales a row), stored at SCALES row-major. Scales and their inverses are divided
    rounded to nearest (div_rn), as torch divides: the other backends compute the same numbers."""
    if STATIC:  # a scale below MIN_SCALE (unchecked: a tensor) quantizes as MIN_SCALE: 1 / scale stays finite
        q = y * tl.math.div_rn(1.0, tl.maximum(tl.load(SCALES), MIN_SCALE))
    elif Q_GROUP == 0:
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y), 1), QMAX), MIN_SCALE)
        q = y * tl.math.div_rn(1.0, scale)[:, None]
        tl.store(SCALES + rows, scale, mask=row_mask)
    else:
        y3 = tl.reshape(y, [BLOCK_M, BLOCK_N // Q_GROUP, Q_GROUP])
        scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(y3), 2), QMAX), MIN_SCALE)
        q = tl.reshape(y3 * tl.math.div_rn(1.0, scale)[:, :, None], [BLOCK_M, BLOCK_N])
        g = tl.arange(0, BLOCK_N // Q_GROUP)
        tl.store(SCALES + rows.to(tl.int64)[:, None] * n_scales + g[None, :], scale,
                 mask=row_mask[:, None] & (g < n_scales)[None, :])
    tl.store(Q + offs, _quantized(q, QUANT), mask=mask)


@triton.jit
def _row_norm_fwd_kernel(
    X, R, Y, H, Z,     # input, residual (strided rows); output y, h = x + r; gate (y's layout)
    W, B,              # [G * N] weight, bias
    MEAN, RSTD,        # [M, G] fp32 statistics, written when STORE_STATS
    SCALES,            # QUANT: the given scale (STATIC), or out: [M, n_scales] fp32 scales
    M, N, inner,       # rows, columns of a group; rows are (outer, inner) pairs, see the module docstring
    sx_o, sx_i,        # row strides of X
    sr_o, sr_i,        # row strides of R
    eps, n_scales,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    ACT: tl.constexpr, STORE_STATS: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, GROUPED: tl.constexpr,
    QUANT: tl.constexpr, Q_GROUP: tl.constexpr, STATIC: tl.constexpr, ROUND: tl.constexpr, QMAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """One pass, rows up to BLOCK_N wide: BLOCK_M whole rows (of group program_id(1)) in registers,
    one read of x (and r, gate), one write of y (and h). QUANT (not 0): y, rounded to ROUND (the
    dtype torch's norm returns; fp32 for fp32/fp64 input), is written quantized into Y, with its
    scales (_quant_store)."""
    pid = tl.program_id(0)
    grp, n_grp, col0 = _group(N, GROUPED)
    cols = tl.arange(0, BLOCK_N)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x_ptrs = X + col0 + _row_offsets(rows, inner, sx_o, sx_i)[:, None] + cols[None, :]
    out_offs = rows.to(tl.int64)[:, None] * (N * n_grp) + col0 + cols[None, :]
    x = _add_residual(tl.load(x_ptrs, mask=mask, other=0.0),
                      R + col0 + _row_offsets(rows, inner, sr_o, sr_i)[:, None] + cols[None, :], H + out_offs, mask,
                      HAS_R, ACC, "")
    _, sg = _gate(Z, out_offs, mask, HAS_GATE, ACC, "")
    if GATE_FIRST:
        x = x * sg
    mean = 0.0  # RMSNorm has none (and stores none)
    if IS_RMS:
        xc = x
    else:
        pivot = _pivot(X + col0 + _row_offsets(rows, inner, sx_o, sx_i), R + col0 + _row_offsets(rows, inner, sr_o, sr_i),
                       H, rows < M, HAS_R, ACC)
        xs = tl.where(mask, x - pivot[:, None], 0.0)
        mean_s = tl.sum(xs, 1) / N  # the mean about the pivot
        xc = tl.where(mask, xs - mean_s[:, None], 0.0)
        mean = pivot + mean_s
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    if QUANT:
        y = _affine_act(xc * rstd[:, None], sg, W + col0, B + col0, cols, cols < N, HAS_W, HAS_B, ACT, W_OFFSET,
                        XHAT, PROD, HAS_GATE and not GATE_FIRST, ACC)
        _quant_store(tl.where(mask, y.to(ROUND).to(tl.float32), 0.0), Y, SCALES, out_offs, mask, rows, rows < M,
                     n_scales, QUANT, Q_GROUP, STATIC, QMAX, MIN_SCALE, BLOCK_M, BLOCK_N)
    else:
        _affine_act_store(xc * rstd[:, None], sg, Y, out_offs, mask, W + col0, B + col0, cols, cols < N, HAS_W,
                          HAS_B, ACT, W_OFFSET, XHAT, PROD, HAS_GATE and not GATE_FIRST, ACC, "")
    _store_stats(MEAN, RSTD, rows * n_grp + grp, mean, rstd, rows < M, IS_RMS, STORE_STATS)


@triton.jit
def _row_norm_fwd_looped_kernel(
    X, R, Y, H, Z,     # input, residual (strided rows); output y, h = x + r (read back); gate (y's layout)
    W, B,              # [G * N] weight, bias
    MEAN, RSTD,        # [M, G] fp32 statistics, written when STORE_STATS
    M, N, inner,       # rows (program p takes p, p + programs, ...), columns of a group; (outer, inner) pairs
    sx_o, sx_i,        # row strides of X
    sr_o, sr_i,        # row strides of R
    eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    ACT: tl.constexpr, STORE_STATS: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Rows wider than a block, one at a time over a persistent grid of a few programs per SM:
    pass 1 keeps Welford's (mean, M2) per lane (stable, unlike sum(x^2) - sum(x)^2), merged with
    Chan's formula after the loop, pass 2 normalizes. Pass 2 walks the blocks backwards and pass 1 asks the
    cache to keep what it loads, so the second read of a row mostly hits L2: the rows in flight
    (programs x N x e bytes) are sized to fit in it. A gate is read in both passes (the second from L2)."""
    pid = tl.program_id(0)
    grp, n_grp, col0 = _group(N, GROUPED)
    cols = tl.arange(0, BLOCK_N)
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_prog = tl.num_programs(0)
    for it in range(0, tl.cdiv(M - pid, n_prog)):
        row = pid.to(tl.int64) + it * n_prog
        x_row = X + col0 + _row_offsets(row, inner, sx_o, sx_i)
        r_row = R + col0 + _row_offsets(row, inner, sr_o, sr_i)
        out_row = row * N * n_grp + col0
        # Per lane: the running sum of squares (RMSNorm), or Welford's running mean and M2 about
        # the pivot (LayerNorm; only the last block is partial, so a valid lane's count at block i
        # is i + 1). No reduction in the loop, so no barrier: the next block's loads issue at once.
        lane_mean = tl.zeros([BLOCK_N], dtype=ACC)
        lane_m2 = tl.zeros([BLOCK_N], dtype=ACC)
        pivot = 0.0
        if not IS_RMS:
            pivot = _pivot(x_row, r_row, H, N > 0, HAS_R, ACC)
        for i in range(0, n_blocks):
            c = i * BLOCK_N + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0, eviction_policy="evict_last")
            x = _add_residual(x, r_row + c, H + out_row + c, c < N, HAS_R, ACC, "evict_last")
            if GATE_FIRST:
                x = x * _gate(Z, out_row + c, c < N, HAS_GATE, ACC, "evict_last")[1]
            if IS_RMS:
                lane_m2 += x * x
            else:
                delta = tl.where(c < N, x - pivot - lane_mean, 0.0)
                lane_mean += delta * (tl.full([], 1.0, ACC) / (i + 1))
                lane_m2 += delta * tl.where(c < N, x - pivot - lane_mean, 0.0)
        mean = tl.zeros([], dtype=ACC)
        if IS_RMS:
            m2 = tl.sum(lane_m2, 0)
        else:  # the lanes merged once (Chan): the mean of their means, M2 plus their spread
            count = (n_blocks - 1 + ((n_blocks - 1) * BLOCK_N + cols < N)).to(ACC)
            mean = tl.sum(count * lane_mean, 0) / N
            d = lane_mean - mean
            m2 = tl.sum(lane_m2 + count * d * d, 0)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        _store_stats(MEAN, RSTD, row * n_grp + grp, pivot + mean, rstd, None, IS_RMS, STORE_STATS)
        if HAS_R:
            tl.debug_barrier()  # pass 2 reads h back: make pass 1's stores visible to the block
        for i in range(0, n_blocks):
            c = (n_blocks - 1 - i) * BLOCK_N + cols  # backwards: the last blocks loaded are in cache
            if HAS_R:
                x = tl.load(H + out_row + c, mask=c < N, other=0.0, eviction_policy="evict_first").to(ACC)
            else:
                x = tl.load(x_row + c, mask=c < N, other=0.0, eviction_policy="evict_first").to(ACC)
            _, sg = _gate(Z, out_row + c, c < N, HAS_GATE, ACC, "evict_first")
            if GATE_FIRST:
                x = x * sg
            if IS_RMS:
                x_hat = x * rstd
            else:
                x_hat = ((x - pivot) - mean) * rstd
            _affine_act_store(x_hat, sg, Y + out_row, c, c < N, W + col0, B + col0, c, c < N, HAS_W, HAS_B, ACT,
                              W_OFFSET, XHAT, PROD, HAS_GATE and not GATE_FIRST, ACC, "evict_first")
        if HAS_R:
            tl.debug_barrier()  # the next row's pass 1 must not overtake this pass 2 in h


@triton.jit
def _row_norm_grad(x, dy, gz, mean, rstd, w, b, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACT: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr,
                   HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, ACC: tl.constexpr):
    """For a block (fp32; mean/rstd broadcast already): x_hat, x_hat as the casting mode rounds it
    (dw's factor: the forward multiplied that), dz (the gradient reaching x_hat * (offset + w) + b),
    g = dz * (offset + w), and the gate's gradient when the gate comes after the norm. Roundings
    are straight-through. With GATE_FIRST, x_hat is that of u = x * silu(gate): the caller turns
    du into dx and dgate."""
    sg = 1.0
    if HAS_GATE:
        sg = act(gz, 2)
    if GATE_FIRST:
        x = x * sg
    if IS_RMS:
        x_hat = x * rstd
    else:
        x_hat = (x - mean) * rstd
    x_r, z = _affine(x_hat, w, b, HAS_W, HAS_B, W_OFFSET, XHAT, PROD, ACC)
    gate_after: tl.constexpr = HAS_GATE and not GATE_FIRST
    dz = dy
    if ACT != 0:
        zg = z
        if gate_after:
            zg = z * sg
        dz = dy * act_grad(zg, ACT)
    dgate = 0.0
    if gate_after:
        dgate = dz * z * act_grad(gz, 2)
        dz = dz * sg
    g = dz
    if HAS_W:
        if W_OFFSET != 0.0:
            w = w + W_OFFSET
        g = dz * w
    return x_hat, x_r, dz, g, dgate


@triton.jit
def _gate_first_grads(du, x, gz, GATE_FIRST: tl.constexpr):
    """(dx, dgate) from du, the gradient of u = x * silu(gate) when the gate comes first; else (du, 0)."""
    dgate = 0.0
    if GATE_FIRST:
        dgate = du * x * act_grad(gz, 2)
        du = du * act(gz, 2)
    return du, dgate


@triton.jit
def _store_dx(dx, DX, DH, DR, offs, mask, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, ACC: tl.constexpr):
    """dx (+ dh, the gradient of h = x + residual reaching it from later layers) stored in x's dtype,
    and in the residual's when that differs (an fp32 residual stream): one pass for both inputs."""
    if HAS_DH:
        dx = dx + tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if STORE_DR:
        tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)


@triton.jit
def _add2(a1, a2, b1, b2):
    return a1 + b1, a2 + b2


@triton.jit
def _grad_block(x_row, dy_row, z_row, W, B, c, m, mean, rstd, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, ACT: tl.constexpr, W_OFFSET: tl.constexpr, XHAT: tl.constexpr,
                PROD: tl.constexpr, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr, ACC: tl.constexpr,
                EVICT: tl.constexpr):
    """_row_norm_grad of the columns c (mask m) of a row, and the x and gate it read: w and b kept in
    cache (every row reads them), x, dy and the gate as EVICT says (the looped backward's pass 1
    keeps them for pass 2). At column 0 it is the pivot g0 of LayerNorm's dx, computed as the tile
    computes it: mean(g) is taken about it, so a constant g (a constant row's) gives exactly 0, not
    the rounding of N * g / N times rstd (which can be large there)."""
    w = 1.0
    b = 0.0
    if HAS_W:
        w = tl.load(W + c, mask=m, other=0.0, eviction_policy="evict_last").to(ACC)
    if HAS_B:
        b = tl.load(B + c, mask=m, other=0.0, eviction_policy="evict_last").to(ACC)
    x = tl.load(x_row + c, mask=m, other=0.0, eviction_policy=EVICT).to(ACC)
    dy = tl.load(dy_row + c, mask=m, other=0.0, eviction_policy=EVICT).to(ACC)
    gz, _ = _gate(z_row, c, m, HAS_GATE, ACC, EVICT)
    x_hat, x_r, dz, g, dgate = _row_norm_grad(x, dy, gz, mean, rstd, w, b, IS_RMS, HAS_W, HAS_B, ACT, W_OFFSET,
                                              XHAT, PROD, HAS_GATE, GATE_FIRST, ACC)
    return x_hat, x_r, dz, g, dgate, x, gz


@triton.jit
def _row_norm_bwd_kernel(
    DY, X, Z,          # output gradient, input (strided rows); gate (dx's layout)
    W, B,              # [G * N] weight, bias
    MEAN, RSTD,        # [M, G] saved statistics
    DH,                # gradient of h = x + residual, added to dx (contiguous), when HAS_DH
    DX, DG, DR,        # out: dx, dgate, dx again in the residual's dtype when STORE_DR (contiguous)
    PART,              # [G, P, K, N] out: fp32 partial dw ([.., 0, :]) then db, K = WANT_DW + WANT_DB, per program
    M, N, inner, sdy_o, sdy_i, sx_o, sx_i,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr,
    GROUPED: tl.constexpr, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, WANT_DG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """One pass, rows up to BLOCK_N wide, over a persistent grid of P programs (per group): program
    p takes the blocks of BLOCK_M rows p, p + P, ... (one row at 1K and wider). dw/db accumulate
    elementwise in a [BLOCK_M, BLOCK_N] tile, summed over its rows once at the end: the loop body's
    only cross-warp reduction is the two row sums of dx, taken together (one shared-memory round)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    grp, n_grp, col0 = _group(N, GROUPED)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    need_du: tl.constexpr = WANT_DX or (WANT_DG and GATE_FIRST)
    dw = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    db = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for rb in range(pid, tl.cdiv(M, BLOCK_M), n_prog):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        # w and b are re-read every iteration (cache hits) rather than held across the loop: the
        # 8K configurations reached the 128-register cap holding them (sm_90), and those loads
        # outside the loop made a second, barrier-heavy region of in-flight bytes.
        w = 1.0
        b = 0.0
        if HAS_W:
            w = tl.load(W + col0 + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        if HAS_B:
            b = tl.load(B + col0 + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        x_rows = X + col0 + _row_offsets(rows, inner, sx_o, sx_i)[:, None]
        dy_rows = DY + col0 + _row_offsets(rows, inner, sdy_o, sdy_i)[:, None]
        out_rows = rows.to(tl.int64)[:, None] * (N * n_grp) + col0
        out_offs = out_rows + cols[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_rows + cols[None, :], mask=mask, other=0.0)
        gz, _ = _gate(Z, out_offs, mask, HAS_GATE, ACC, "")
        stat_rows = rows * n_grp + grp
        rstd = tl.load(RSTD + stat_rows, mask=row_mask, other=0.0)[:, None]
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + stat_rows, mask=row_mask, other=0.0)[:, None]
        x_hat, x_r, dz, g, dgate = _row_norm_grad(x, dy.to(ACC), gz, mean, rstd, w, b, IS_RMS, HAS_W, HAS_B, ACT,
                                                  W_OFFSET, XHAT, PROD, HAS_GATE, GATE_FIRST, ACC)
        x_hat = tl.where(mask, x_hat, 0.0)
        if need_du:
            g = tl.where(mask, g, 0.0)
            if IS_RMS:
                c1 = tl.sum(g * x_hat, 1) / N
                du = rstd * (g - x_hat * c1[:, None])
            else:
                first = tl.zeros((BLOCK_M, 1), dtype=tl.int32)  # column 0 of each row: the pivot
                _, _, _, g0, _, _, _ = _grad_block(x_rows, dy_rows, Z + out_rows, W + col0, B + col0, first, row_mask[:, None], mean, rstd, IS_RMS, HAS_W,
                                                   HAS_B, ACT, W_OFFSET, XHAT, PROD, HAS_GATE, GATE_FIRST, ACC,
                                                   "evict_last")
                g = tl.where(mask, g - g0, 0.0)
                c1, c2 = tl.reduce((g * x_hat, g), 1, _add2)
                du = rstd * (g - c2[:, None] / N - x_hat * (c1[:, None] / N))
            dx, dg_first = _gate_first_grads(du, x, gz, GATE_FIRST)
            if GATE_FIRST:
                dgate = dg_first
            if WANT_DX:
                _store_dx(dx, DX, DH, DR, out_offs, mask, HAS_DH, STORE_DR, ACC)
        if WANT_DG:
            tl.store(DG + out_offs, dgate.to(DG.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dz * tl.where(mask, x_r, 0.0)
        if WANT_DB:
            db += tl.where(mask, dz, 0.0)
    part = PART + (grp * n_prog + pid).to(tl.int64) * (WANT_DW + WANT_DB) * N + cols
    if WANT_DW:
        tl.store(part, tl.sum(dw, 0), mask=col_mask)
    if WANT_DB:
        tl.store(part + WANT_DW * N, tl.sum(db, 0), mask=col_mask)


@triton.jit
def _row_norm_bwd_looped_kernel(
    DY, X, Z,          # output gradient, input (strided rows); gate (dx's layout)
    W, B,              # [G * N] weight, bias
    MEAN, RSTD,        # [M, G] saved statistics
    DH,                # gradient of h = x + residual, added to dx (contiguous), when HAS_DH
    DX, DG, DR,        # out: dx, dgate, dx again in the residual's dtype when STORE_DR (contiguous)
    PART,              # [G, P, K, N] out: fp32 partial dw then db as in _row_norm_bwd_kernel
    M, N, inner, sdy_o, sdy_i, sx_o, sx_i,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    W_OFFSET: tl.constexpr, XHAT: tl.constexpr, PROD: tl.constexpr, HAS_GATE: tl.constexpr, GATE_FIRST: tl.constexpr,
    GROUPED: tl.constexpr, HAS_DH: tl.constexpr, STORE_DR: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, WANT_DG: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Rows wider than a block, each owned by one program of a persistent grid of P (rows p,
    p + P, ...). Pass 1 walks the row's column blocks (2 * BLOCK_N wide: P is small at the widest
    rows, and its loads in flight are what reads x and dy from DRAM) summing g * x_hat and g elementwise (reduced
    once, after the loop: no barrier in it); pass 2 walks them backwards, re-reading x and dy (the
    row was just read: L2 hits, the last blocks first), writes dx and adds dz * x_hat and dz into
    the program's own fp32 partial row in PART (read-modify-write, the first row writes). P is
    sized so that P partial rows and P rows of x and dy fit in L2 (config.py)."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    grp, n_grp, col0 = _group(N, GROUPED)
    cols = tl.arange(0, BLOCK_N)
    cols1 = tl.arange(0, 2 * BLOCK_N)  # pass 1 holds fewer values a column: blocks twice as wide
    n_blocks = tl.cdiv(N, BLOCK_N)
    need_du: tl.constexpr = WANT_DX or (WANT_DG and GATE_FIRST)
    part = PART + (grp * n_prog + pid).to(tl.int64) * (WANT_DW + WANT_DB) * N
    W = W + col0
    B = B + col0
    for it in range(0, tl.cdiv(M - pid, n_prog)):
        row = pid.to(tl.int64) + it * n_prog
        x_row = X + col0 + _row_offsets(row, inner, sx_o, sx_i)
        dy_row = DY + col0 + _row_offsets(row, inner, sdy_o, sdy_i)
        out_row = row * N * n_grp + col0
        rstd = tl.load(RSTD + row * n_grp + grp)
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + row * n_grp + grp)
        c1 = 0.0
        c2 = 0.0
        g0 = 0.0
        if need_du and not IS_RMS:
            _, _, _, g0, _, _, _ = _grad_block(x_row, dy_row, Z + out_row, W, B, 0, True, mean, rstd, IS_RMS, HAS_W,
                                               HAS_B, ACT, W_OFFSET, XHAT, PROD, HAS_GATE, GATE_FIRST, ACC,
                                               "evict_last")
        if need_du:
            s1 = tl.zeros((2 * BLOCK_N,), dtype=ACC)
            s2 = tl.zeros((2 * BLOCK_N,), dtype=ACC)
            for start in range(0, N, 2 * BLOCK_N):
                c = tl.max_contiguous(start + cols1, 4)  # as in pass 2 (see there)
                m = c < N
                x_hat, _, _, g, _, _, _ = _grad_block(x_row, dy_row, Z + out_row, W, B, c, m, mean, rstd, IS_RMS,
                                                      HAS_W, HAS_B, ACT, W_OFFSET, XHAT, PROD, HAS_GATE, GATE_FIRST,
                                                      ACC, "evict_last")
                s1 += tl.where(m, g * x_hat, 0.0)
                s2 += tl.where(m, g - g0, 0.0)
            if IS_RMS:
                c1 = tl.sum(s1, 0) / N
            else:
                c1, c2 = tl.reduce((s1, s2), 0, _add2)
                c1 = c1 / N
                c2 = c2 / N
        later = it > 0  # the program's first row writes its partial row, later ones add to it
        for i in range(0, n_blocks):
            # backwards: the last blocks loaded are in cache. Runs of 4 (16 bytes of the fp32
            # partials): wider bf16 loads would give x and the partials different register
            # layouts, converted through shared memory (4 barriers an iteration, sm_90).
            c = tl.max_contiguous((n_blocks - 1 - i) * BLOCK_N + cols, 4)
            m = c < N
            x_hat, x_r, dz, g, dgate, x, gz = _grad_block(x_row, dy_row, Z + out_row, W, B, c, m, mean, rstd,
                                                          IS_RMS, HAS_W, HAS_B, ACT, W_OFFSET, XHAT, PROD, HAS_GATE,
                                                          GATE_FIRST, ACC, "evict_first")
            if need_du:
                if IS_RMS:
                    du = rstd * (g - x_hat * c1)
                else:
                    du = rstd * ((g - g0) - c2 - x_hat * c1)
                dx, dg_first = _gate_first_grads(du, x, gz, GATE_FIRST)
                if GATE_FIRST:
                    dgate = dg_first
                if WANT_DX:
                    _store_dx(dx, DX, DH, DR, out_row + c, m, HAS_DH, STORE_DR, ACC)
            if WANT_DG:
                tl.store(DG + out_row + c, dgate.to(DG.dtype.element_ty), mask=m)
            if WANT_DW:
                acc = tl.load(part + c, mask=m & later, other=0.0, eviction_policy="evict_last")
                tl.store(part + c, acc + dz * x_r, mask=m, eviction_policy="evict_last")
            if WANT_DB:
                acc = tl.load(part + WANT_DW * N + c, mask=m & later, other=0.0, eviction_policy="evict_last")
                tl.store(part + WANT_DW * N + c, acc + dz, mask=m, eviction_policy="evict_last")


@triton.jit
def _row_norm_param_grads_kernel(
    PART,              # [NG, G, K, N] fp32 partials from the backward kernels: dw (when WANT_DW) then db
    DW, DB,            # [NG * N] out: dweight, dbias, in the parameters' dtypes
    G, N,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """dw and db from the partials: each program sums BLOCK_N columns of group program_id(1) over
    the G programs' rows, BLOCK_G at a time, always in the same order (deterministic), and stores
    them cast to the parameter dtype: the backward's one glue launch."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    k = WANT_DW + WANT_DB
    grp, _, col0 = _group(N, GROUPED)
    if GROUPED:
        PART += grp.to(tl.int64) * G * k * N
    acc_w = tl.zeros((BLOCK_G, BLOCK_N), dtype=ACC)
    acc_b = tl.zeros((BLOCK_G, BLOCK_N), dtype=ACC)
    for start in range(0, G, BLOCK_G):
        rows = start + tl.arange(0, BLOCK_G)
        mask = (rows < G)[:, None] & col_mask[None, :]
        ptrs = PART + rows.to(tl.int64)[:, None] * k * N + cols[None, :]
        if WANT_DW:
            acc_w += tl.load(ptrs, mask=mask, other=0.0)
        if WANT_DB:
            acc_b += tl.load(ptrs + WANT_DW * N, mask=mask, other=0.0)
    out = col0 + cols
    if WANT_DW:
        tl.store(DW + out, tl.sum(acc_w, 0).to(DW.dtype.element_ty), mask=col_mask)
    if WANT_DB:
        tl.store(DB + out, tl.sum(acc_b, 0).to(DB.dtype.element_ty), mask=col_mask)


# --- launchers ---------------------------------------------------------------------------------

def _rows(t, k):
    """(tensor, inner, stride_outer, stride_inner) addressing t as rows of its last k dims: in
    place when those dims are contiguous and the batch dims collapse to at most two, else a copy."""
    n = math.prod(t.shape[t.dim() - k:])
    trailing_contiguous = t[(0,) * (t.dim() - k)].is_contiguous()  # t[()] is t itself when no batch dims
    dims = []  # (size, stride) of the batch dims, innermost first, merged where contiguous
    for size, stride in reversed(list(zip(t.shape[: t.dim() - k], t.stride()[: t.dim() - k]))):
        if size == 1:
            continue
        if dims and dims[-1][0] * dims[-1][1] == stride:
            dims[-1] = (dims[-1][0] * size, dims[-1][1])
        else:
            dims.append((size, stride))
    if not trailing_contiguous or len(dims) > 2:
        t = t.contiguous()
        dims = [(t.numel() // max(n, 1), n)]
    if not dims:
        return t, 1, n, n
    if len(dims) == 1:
        return t, dims[0][0], 0, dims[0][1]
    return t, dims[0][0], dims[1][1], dims[0][1]


def _rows_pair(a, b, k):
    """_rows of two same-shape tensors that must share one row decomposition (one `inner`)."""
    av, inner, sa_o, sa_i = _rows(a, k)
    bv, inner_b, sb_o, sb_i = _rows(b, k)
    if inner != inner_b:
        (av, inner, sa_o, sa_i), (bv, _, sb_o, sb_i) = _rows(a.contiguous(), k), _rows(b.contiguous(), k)
    return av, bv, inner, (sa_o, sa_i), (sb_o, sb_i)


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def _variant(inp_dtype, weight, offset, casting, gate, norm_before_gate):
    """The variant constexprs: the weight offset, the dtype x_hat is rounded to before the weight
    (XHAT; the accumulation type: no rounding), the dtype x_hat * w is rounded to before a gate
    after the norm (PROD), and the gate's flags. The casting modes: normops.core.casting_dtypes."""
    acc = acc_type(inp_dtype)
    xhat, prod = casting_dtypes(casting, inp_dtype, None if weight is None else weight.dtype)
    gate_after = gate is not None and norm_before_gate
    return dict(W_OFFSET=float(offset), XHAT=_TL[xhat] if xhat else acc, PROD=_TL[prod] if prod and gate_after else acc,
                HAS_GATE=gate is not None, GATE_FIRST=gate is not None and not norm_before_gate)


def _groups(normalized_shape, group_size):
    """(groups, columns of a group): a row of n values normalized as n // group_size groups."""
    n = math.prod(normalized_shape)
    if not group_size or group_size == n:
        return 1, n
    return n // group_size, group_size


def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats, *, offset=0.0,
                 casting="fp32", out_dtype=None, gate=None, norm_before_gate=True, group_size=0, out=None,
                 config=None):
    """The triton backend's row_norm forward (contract: normops/backends/__init__.py). `config`
    overrides the heuristic (the AOT compiler passes each configuration it compiles). Groups are
    a second grid dimension: group j is the row norm of columns [j * n, (j + 1) * n). `out`: the
    (y, h) tensors to write, contiguous (they may be x and the residual themselves: each row is read
    before its h and y are stored, and the looped kernel's second pass reads h, not x)."""
    weight, bias = dense(weight), dense(bias)
    gate = None if gate is None else gate.contiguous()  # read in y's layout
    k = len(normalized_shape)
    groups, n = _groups(normalized_shape, group_size)
    m = x.numel() // (n * groups)
    batch = x.shape[: x.dim() - k] + ((groups,) if groups > 1 else ())
    xv, rv, inner, (sx_o, sx_i), (sr_o, sr_i) = _rows_pair(x, x if residual is None else residual, k)
    inp_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if out is not None:
        y, h = out
    else:
        y = torch.empty(x.shape, dtype=out_dtype or inp_dtype, device=x.device)
        h = torch.empty(x.shape, dtype=inp_dtype, device=x.device) if residual is not None else y
    sd = stat_dtype(inp_dtype)
    mean = torch.empty(batch, dtype=sd, device=x.device) if need_stats and not rms else None
    rstd = torch.empty(batch, dtype=sd, device=x.device) if need_stats else None
    cfg = config or RowNormConfig.forward(n)
    ptrs = (xv, rv, y, h, gate if gate is not None else y, weight if weight is not None else y,
            bias if bias is not None else y, mean if mean is not None else y, rstd if rstd is not None else y)
    sizes = (m, n, inner, sx_o, sx_i, sr_o, sr_i, eps)
    flags = _fwd_flags(cfg, inp_dtype, rms, weight, bias, residual, activation, need_stats, offset, casting, gate,
                       norm_before_gate, groups)
    if cfg.one_pass:  # a program per block of rows (and group)
        launch(_row_norm_fwd_kernel, (triton.cdiv(m, cfg.block_m), groups), *ptrs, y, *sizes, 0,
               num_warps=cfg.num_warps, BLOCK_M=cfg.block_m, **flags, **_NO_QUANT)
    else:  # a persistent grid (see the kernel), shared by the groups
        programs = row_norm_fwd_programs(n, x.element_size(), residual is not None,
                                         programs_per_wave(x.device, cfg.num_warps))
        launch(_row_norm_fwd_looped_kernel, (min(m, max(1, programs // groups)), groups), *ptrs, *sizes,
               num_warps=cfg.num_warps, **flags)
    return y, (h if residual is not None else None), mean, rstd


def _fwd_flags(cfg, inp_dtype, rms, weight, bias, residual, activation, need_stats, offset, casting, gate=None,
               norm_before_gate=True, groups=1):
    """The forward kernels' constexprs, but the quantize flags (row_norm_fwd's and row_norm_quant_fwd's)."""
    return dict(IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
                ACT=ACTIVATIONS[activation], STORE_STATS=need_stats, BLOCK_N=cfg.block_n, ACC=acc_type(inp_dtype),
                **_variant(inp_dtype, weight, offset, casting, gate, norm_before_gate), GROUPED=groups > 1)


_NO_QUANT = dict(QUANT=0, Q_GROUP=0, STATIC=False, ROUND=tl.float32, QMAX=0.0, MIN_SCALE=0.0)


def quant_supported(normalized_shape, group_size):
    """Whether the kernels take a row_norm_quant call: rows that fit one pass (the dynamic scale
    needs the whole row before the first store), and groups of a power-of-two size (a row's tile
    is reshaped into them)."""
    n = math.prod(normalized_shape)
    return RowNormConfig.forward(n).one_pass and (not group_size or group_size & (group_size - 1) == 0)


def row_norm_quant_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, *, offset=0.0,
                       casting="fp32", dtype=torch.float8_e4m3fn, scale=None, group_size=0, fp8_hw=None,
                       config=None):
    """The triton backend's row_norm_quant (contract: normops/backends/__init__.py): the one-pass
    forward kernel with QUANT, rows that ``quant_supported``. ``fp8_hw``: float8 by the hardware's
    conversion (default: on a device of compute capability 8.9 or later), else by integer ops."""
    weight, bias = dense(weight), dense(bias)
    k = len(normalized_shape)
    n = math.prod(normalized_shape)
    m = x.numel() // n
    xv, rv, inner, (sx_o, sx_i), (sr_o, sr_i) = _rows_pair(x, x if residual is None else residual, k)
    inp_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    h = torch.empty(x.shape, dtype=inp_dtype, device=x.device) if residual is not None else None
    n_scales = n // group_size if group_size else 1
    scales = scale if scale is not None else \
        torch.empty(x.shape[: x.dim() - k] + (n_scales,), dtype=torch.float32, device=x.device)
    if fp8_hw is None:
        fp8_hw = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
    quant = Q_INT8 if dtype == torch.int8 else Q_FP8_HW if fp8_hw else Q_FP8
    qv = q.view(torch.uint8) if quant == Q_FP8 else q
    cfg = config or RowNormConfig.forward(n)
    flags = dict(_fwd_flags(cfg, inp_dtype, rms, weight, bias, residual, activation, False, offset, casting),
                 QUANT=quant, Q_GROUP=group_size or 0, STATIC=scale is not None,
                 ROUND=_TL[inp_dtype] if inp_dtype.itemsize == 2 else tl.float32, QMAX=QUANT_MAX[dtype],
                 MIN_SCALE=MIN_QUANT_SCALE)
    launch(_row_norm_fwd_kernel, (triton.cdiv(m, cfg.block_m), 1), xv, rv, qv, h if h is not None else qv, qv,
           weight if weight is not None else qv, bias if bias is not None else qv, scales, scales, scales,
           m, n, inner, sx_o, sx_i, sr_o, sr_i, eps, n_scales, num_warps=cfg.num_warps, BLOCK_M=cfg.block_m, **flags)
    return q, scales, h


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, *, offset=0.0,
                 casting="fp32", gate=None, norm_before_gate=True, group_size=0, dh=None, dx_dtype=None,
                 dresidual_dtype=None, config=None, grads_config=None):
    """The triton backend's row_norm backward (contract: normops/backends/__init__.py); `config` as
    in row_norm_fwd, `grads_config` the glue kernel's (a ParamGradsConfig). Two launches: the
    backward kernel (dx, dgate and per-program dw/db partials), then, when a parameter gradient is
    wanted, _row_norm_param_grads_kernel. x is not empty (the ops answer empty inputs without kernels).
    With a residual: `dh` (the gradient of h from later layers) is added to dx in the kernel, dx is
    written in `dx_dtype` (x's) and, when `dresidual_dtype` differs, once more in that dtype: the
    fifth result (else None: the residual's gradient is dx)."""
    weight, bias = dense(weight), dense(bias)
    gate = None if gate is None else gate.contiguous()
    dh = None if dh is None else dh.contiguous()
    k = len(normalized_shape)
    groups, n = _groups(normalized_shape, group_size)
    m = x.numel() // (n * groups)
    xv, dyv, inner, (sx_o, sx_i), (sdy_o, sdy_i) = _rows_pair(x, dy, k)
    want_dx = output_mask[0]
    want_dw = output_mask[1] and weight is not None
    want_db = output_mask[2] and bias is not None
    want_dg = len(output_mask) > 3 and output_mask[3] and gate is not None
    cfg = config or RowNormConfig.backward(n, x.element_size(), gate is not None)
    acc = acc_type(x.dtype)
    n_part = want_dw + want_db
    # the batch-invariant mode: programs from the rows, not the device (config.BI_CHUNK_ROWS), so
    # the partials, and the glue's BLOCK_G (ParamGradsConfig.make(n, g)), depend on the shape only
    wave = (invariant_programs(triton.cdiv(m, cfg.block_m), cfg.block_m) * groups if is_batch_invariant()
            else programs_per_wave(x.device, cfg.num_warps))
    programs = row_norm_bwd_programs(cfg, n, x.element_size(), n_part, wave)
    # every program gets a row: it writes its partials
    g = max(1, min(triton.cdiv(m, cfg.block_m), programs // groups))
    dx = torch.empty(x.shape, dtype=dx_dtype or x.dtype, device=x.device) if want_dx else None
    store_dr = want_dx and dresidual_dtype is not None and dresidual_dtype != dx.dtype
    dr = torch.empty(x.shape, dtype=dresidual_dtype, device=x.device) if store_dr else None
    dg = torch.empty(x.shape, dtype=gate.dtype, device=x.device) if want_dg else None
    # the dw and db partials share one buffer, [groups, programs, n_part, n]: one reduction launch for both
    part = torch.empty((groups, g, n_part, n), dtype=stat_dtype(x.dtype), device=x.device) if n_part else None
    args = (dyv, xv, gate if gate is not None else rstd, weight if weight is not None else rstd,
            bias if bias is not None else rstd, mean if mean is not None else rstd, rstd,
            dh if dh is not None else rstd, dx if dx is not None else rstd, dg if dg is not None else rstd,
            dr if dr is not None else rstd, part if part is not None else rstd, m, n, inner, sdy_o, sdy_i, sx_o, sx_i)
    flags = dict(IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation],
                 WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db, WANT_DG=want_dg, BLOCK_N=cfg.block_n, ACC=acc,
                 HAS_DH=want_dx and dh is not None, STORE_DR=store_dr,
                 **_variant(x.dtype, weight, offset, casting, gate, norm_before_gate), GROUPED=groups > 1)
    if cfg.one_pass:
        launch(_row_norm_bwd_kernel, (g, groups), *args, num_warps=cfg.num_warps, BLOCK_M=cfg.block_m, **flags)
    else:
        launch(_row_norm_bwd_looped_kernel, (g, groups), *args, num_warps=cfg.num_warps, **flags)
    if part is None:
        return dx, None, None, dg, dr
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=x.device) if want_dw else None
    db = torch.empty(bias.shape, dtype=bias.dtype, device=x.device) if want_db else None
    pg = grads_config or ParamGradsConfig.make(n, g)
    launch(_row_norm_param_grads_kernel, (triton.cdiv(n, pg.block_n), groups), part, dw if want_dw else db,
           db if want_db else dw, g, n, num_warps=pg.num_warps, WANT_DW=want_dw, WANT_DB=want_db, GROUPED=groups > 1,
           BLOCK_G=pg.block_g, BLOCK_N=pg.block_n, ACC=acc)
    return dx, dw, db, dg, dr


# Shared with kernels/ada_norm.py: the torch -> Triton dtypes, and the pair sum of its two row
# reductions taken together (LayerNorm's dx); with kernels/channels_first.py: the fixed-order sum of
# per-program dW/dB partials.
TL_DTYPES = _TL
add_pair = _add2
param_grads_kernel = _row_norm_param_grads_kernel
