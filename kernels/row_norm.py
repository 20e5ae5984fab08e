"""LayerNorm and RMSNorm in Triton: forward and backward, one kernel family.

RMS vs LayerNorm, weight, bias, residual add and activation are ``tl.constexpr`` flags. The two
forward algorithms are two kernels sharing their load (with the residual add) and affine +
activation epilogue: ``_row_norm_fwd_kernel``, whole rows in registers (one pass), and
``_row_norm_fwd_looped_kernel``, wider rows in column blocks (two passes over each row). The
backward is one kernel either way, that takes its per-row sums from a row-sums kernel when rows
are wider than a block (``ONE_PASS`` off). ``RowNormConfig`` (config.py) picks.

Math, per row of N elements (RMSNorm: mean = 0, var = mean(h^2)):
    forward    h = x + r (optional residual)      mean = p + sum(h - p) / N, p = h[0] (exact for a constant row)
               var = sum((h - mean)^2) / N         rstd = 1 / sqrt(var + eps)
               x_hat = (h - mean) * rstd           z = x_hat * w + b           y = act(z)
    backward   dz = dy * act'(z)                   g = dz * w
               c1 = sum(g * x_hat) / N             c2 = sum(g) / N  (RMSNorm: 0)
               dx = rstd * (g - c2 - x_hat * c1)
               dw = sum over rows of dz * x_hat    db = sum over rows of dz
The backward recomputes x_hat (and z) from x and the saved fp32 mean/rstd; nothing else is saved.

Bytes moved, for M rows of N elements of e bytes (the speed to expect is bytes / bandwidth):
    forward, one pass       read x (+ r): M*N*e each; w, b: N*e; write y (+ h): M*N*e each;
                            mean, rstd: 4*M each, only when a gradient will be needed
    forward, looped         as one pass, plus a second read of x (or h): + M*N*e, from L2 when the
                            rows in flight fit there (persistent grid; see the kernel)
    backward, one pass      read x, dy: M*N*e each; write dx: M*N*e; dw, db partials: 4*G*N each,
                            G = programs (~SMs), then one reduction over them
    backward, looped        as one pass, plus a row-sums kernel reading x and dy: + 2*M*N*e
Statistics and reductions accumulate in fp32 (fp64 for fp64 input); dw/db are per-program fp32
partials summed afterwards in a fixed order: deterministic, no atomics.

Rows may be strided: row r of x is at (r // inner) * stride_outer + (r % inner) * stride_inner,
which covers any layout whose normalized dims are contiguous and whose batch dims collapse to two.
"""
import math

import torch
import triton
import triton.language as tl

from .common import ACTIVATIONS, act, act_grad, acc_type, dense, launch, param_grads, stat_dtype
from .config import RowNormConfig, programs_per_wave

@triton.jit
def _row_offsets(rows, inner, s_outer, s_inner):
    rows = rows.to(tl.int64)
    return (rows // inner) * s_outer + (rows % inner) * s_inner


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
def _affine_act_store(x_hat, Y, y_offs, mask, W, B, cols, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACT: tl.constexpr, ACC: tl.constexpr, EVICT: tl.constexpr):
    """y = act(x_hat * w + b) stored at Y + y_offs; w and b are read at cols (x_hat's last dim)."""
    z = x_hat
    if HAS_W:
        z = z * tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    if HAS_B:
        z = z + tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)
    tl.store(Y + y_offs, act(z, ACT).to(Y.dtype.element_ty), mask=mask, eviction_policy=EVICT)


@triton.jit
def _row_norm_fwd_kernel(
    X, R, Y, H,        # [M, N] input, residual (strided rows); output y, h = x + r (contiguous)
    W, B,              # [N] weight, bias
    MEAN, RSTD,        # [M] fp32 statistics, written when STORE_STATS
    M, N, inner,       # rows, columns; rows are (outer, inner) pairs, see the module docstring
    sx_o, sx_i,        # row strides of X
    sr_o, sr_i,        # row strides of R
    eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    ACT: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """One pass, rows up to BLOCK_N wide: BLOCK_M whole rows in registers, one read of x (and r),
    one write of y (and h)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x_ptrs = X + _row_offsets(rows, inner, sx_o, sx_i)[:, None] + cols[None, :]
    out_offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = _add_residual(tl.load(x_ptrs, mask=mask, other=0.0),
                      R + _row_offsets(rows, inner, sr_o, sr_i)[:, None] + cols[None, :], H + out_offs, mask,
                      HAS_R, ACC, "")
    mean = 0.0  # RMSNorm has none (and stores none)
    if IS_RMS:
        xc = x
    else:
        pivot = _pivot(X + _row_offsets(rows, inner, sx_o, sx_i), R + _row_offsets(rows, inner, sr_o, sr_i), H,
                       rows < M, HAS_R, ACC)
        xs = tl.where(mask, x - pivot[:, None], 0.0)
        mean_s = tl.sum(xs, 1) / N  # the mean about the pivot
        xc = tl.where(mask, xs - mean_s[:, None], 0.0)
        mean = pivot + mean_s
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    _affine_act_store(xc * rstd[:, None], Y, out_offs, mask, W, B, cols, cols < N, HAS_W, HAS_B, ACT, ACC, "")
    _store_stats(MEAN, RSTD, rows, mean, rstd, rows < M, IS_RMS, STORE_STATS)


@triton.jit
def _row_norm_fwd_looped_kernel(
    X, R, Y, H,        # [M, N] input, residual (strided rows); output y, h = x + r (contiguous, read back)
    W, B,              # [N] weight, bias
    MEAN, RSTD,        # [M] fp32 statistics, written when STORE_STATS
    M, N, inner,       # rows (program p takes p, p + programs, ...), columns; (outer, inner) pairs
    sx_o, sx_i,        # row strides of X
    sr_o, sr_i,        # row strides of R
    eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    ACT: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Rows wider than a block, one at a time over a persistent grid of a few programs per SM:
    pass 1 combines per-block (count, mean, M2) with Chan's formula (stable, unlike
    sum(x^2) - sum(x)^2), pass 2 normalizes. Pass 2 walks the blocks backwards and pass 1 asks the
    cache to keep what it loads, so the second read of a row mostly hits L2: the rows in flight
    (programs x N x e bytes) are sized to fit in it."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    n_blocks = tl.cdiv(N, BLOCK_N)
    n_prog = tl.num_programs(0)
    for it in range(0, tl.cdiv(M - pid, n_prog)):
        row = pid.to(tl.int64) + it * n_prog
        x_row = X + _row_offsets(row, inner, sx_o, sx_i)
        r_row = R + _row_offsets(row, inner, sr_o, sr_i)
        count = tl.zeros([], dtype=ACC)
        mean = tl.zeros([], dtype=ACC)  # about the pivot, for LayerNorm
        m2 = tl.zeros([], dtype=ACC)
        pivot = 0.0
        if not IS_RMS:
            pivot = _pivot(x_row, r_row, H, N > 0, HAS_R, ACC)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            x = tl.load(x_row + c, mask=c < N, other=0.0, eviction_policy="evict_last")
            x = _add_residual(x, r_row + c, H + row * N + c, c < N, HAS_R, ACC, "evict_last")
            n_b = tl.minimum(N - start, BLOCK_N).to(ACC)
            if IS_RMS:
                m2 += tl.sum(x * x, 0)
            else:
                x = tl.where(c < N, x - pivot, 0.0)
                mean_b = tl.sum(x, 0) / n_b
                d = tl.where(c < N, x - mean_b, 0.0)
                m2_b = tl.sum(d * d, 0)
                total = count + n_b
                delta = mean_b - mean
                mean += delta * (n_b / total)
                m2 += m2_b + delta * delta * (count * n_b / total)
                count = total
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        _store_stats(MEAN, RSTD, row, pivot + mean, rstd, None, IS_RMS, STORE_STATS)
        if HAS_R:
            tl.debug_barrier()  # pass 2 reads h back: make pass 1's stores visible to the block
        for i in range(0, n_blocks):
            c = (n_blocks - 1 - i) * BLOCK_N + cols  # backwards: the last blocks loaded are in cache
            if HAS_R:
                x = tl.load(H + row * N + c, mask=c < N, other=0.0, eviction_policy="evict_first").to(ACC)
            else:
                x = tl.load(x_row + c, mask=c < N, other=0.0, eviction_policy="evict_first").to(ACC)
            if IS_RMS:
                x_hat = x * rstd
            else:
                x_hat = ((x - pivot) - mean) * rstd
            _affine_act_store(x_hat, Y + row * N, c, c < N, W, B, c, c < N, HAS_W, HAS_B, ACT, ACC, "evict_first")
        if HAS_R:
            tl.debug_barrier()  # the next row's pass 1 must not overtake this pass 2 in h


@triton.jit
def _row_norm_grad(x, dy, mean, rstd, w, b, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   ACT: tl.constexpr):
    """x_hat, dz = dy * act'(z) and g = dz * w for a block (fp32; mean/rstd broadcast already)."""
    if IS_RMS:
        x_hat = x * rstd
    else:
        x_hat = (x - mean) * rstd
    dz = dy
    if ACT != 0:
        z = x_hat
        if HAS_W:
            z = z * w
        if HAS_B:
            z = z + b
        dz = dy * act_grad(z, ACT)
    g = dz
    if HAS_W:
        g = dz * w
    return x_hat, dz, g


@triton.jit
def _row_norm_bwd_sums_kernel(
    DY, X,             # [M, N] output gradient, input (strided rows)
    W, B,              # [N] weight, bias
    MEAN, RSTD,        # [M] saved statistics
    SUMS,              # [M, 2] out: c1 = sum(g * x_hat) / N, c2 = sum(g) / N
    N, inner, sdy_o, sdy_i, sx_o, sx_i,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Wide rows only: the two per-row sums of dx, one program per row, looping over columns."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + _row_offsets(row, inner, sx_o, sx_i)
    dy_row = DY + _row_offsets(row, inner, sdy_o, sdy_i)
    rstd = tl.load(RSTD + row)
    mean = 0.0
    if not IS_RMS:
        mean = tl.load(MEAN + row)
    cols = tl.arange(0, BLOCK_N)
    c1 = tl.zeros((BLOCK_N,), dtype=ACC)
    c2 = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        m = c < N
        x = tl.load(x_row + c, mask=m, other=0.0).to(ACC)
        dy = tl.load(dy_row + c, mask=m, other=0.0).to(ACC)
        w = 1.0
        b = 0.0
        if HAS_W:
            w = tl.load(W + c, mask=m, other=0.0).to(ACC)
        if HAS_B:
            b = tl.load(B + c, mask=m, other=0.0).to(ACC)
        x_hat, dz, g = _row_norm_grad(x, dy, mean, rstd, w, b, IS_RMS, HAS_W, HAS_B, ACT)
        c1 += tl.where(m, g * x_hat, 0.0)
        c2 += tl.where(m, g, 0.0)
    tl.store(SUMS + row * 2, tl.sum(c1, 0) / N)
    tl.store(SUMS + row * 2 + 1, tl.sum(c2, 0) / N)


@triton.jit
def _row_norm_bwd_kernel(
    DY, X,             # [M, N] output gradient, input (strided rows)
    W, B,              # [N] weight, bias
    MEAN, RSTD,        # [M] saved statistics
    SUMS,              # [M, 2] row sums from _row_norm_bwd_sums_kernel (looped mode only)
    DX,                # [M, N] out, contiguous
    PART,              # [G, 2, N] out: fp32 partial dw (PART[:, 0]) and db (PART[:, 1]), a row per program
    M, N, inner, sdy_o, sdy_i, sx_o, sx_i,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, ONE_PASS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Grid (column blocks, G): program (j, p) takes columns block j of row blocks p, p + G, ...,
    writing dx there and its own dw/db partial row. One pass: one column block holds the whole
    row and the row sums are computed here; looped: they come precomputed in SUMS."""
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    n_prog = tl.num_programs(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for rb in range(pid_g, tl.cdiv(M, BLOCK_M), n_prog):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        # w and b are re-read for every row block (cache hits) rather than held across the loop:
        # their registers are what the wide one-pass configurations need to stay spill-free.
        w = 1.0
        b = 0.0
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        if HAS_B:
            b = tl.load(B + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        x = tl.load(X + _row_offsets(rows, inner, sx_o, sx_i)[:, None] + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + _row_offsets(rows, inner, sdy_o, sdy_i)[:, None] + cols[None, :], mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)[:, None]
        mean = 0.0
        if not IS_RMS:
            mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)[:, None]
        x_hat, dz, g = _row_norm_grad(x.to(ACC), dy.to(ACC), mean, rstd, w, b, IS_RMS, HAS_W, HAS_B, ACT)
        x_hat = tl.where(mask, x_hat, 0.0)
        dz = tl.where(mask, dz, 0.0)
        if WANT_DX:
            if ONE_PASS:
                g = tl.where(mask, g, 0.0)
                c1 = tl.sum(g * x_hat, 1) / N
                c2 = tl.sum(g, 1) / N
            else:
                rows64 = rows.to(tl.int64)
                c1 = tl.load(SUMS + rows64 * 2, mask=row_mask, other=0.0)
                c2 = tl.load(SUMS + rows64 * 2 + 1, mask=row_mask, other=0.0)
            if IS_RMS:
                dx = rstd * (g - x_hat * c1[:, None])
            else:
                dx = rstd * (g - c2[:, None] - x_hat * c1[:, None])
            tl.store(DX + rows.to(tl.int64)[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += tl.sum(dz * x_hat, 0)
        if WANT_DB:
            db += tl.sum(dz, 0)
    if WANT_DW:
        tl.store(PART + pid_g.to(tl.int64) * 2 * N + cols, dw, mask=col_mask)
    if WANT_DB:
        tl.store(PART + pid_g.to(tl.int64) * 2 * N + N + cols, db, mask=col_mask)


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


def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats, config=None):
    """The triton backend's row_norm forward (contract: normops/backends/__init__.py). `config`
    overrides the heuristic (the AOT compiler passes each configuration it compiles)."""
    weight, bias = dense(weight), dense(bias)
    k = len(normalized_shape)
    n = math.prod(normalized_shape)
    m = x.numel() // n
    batch = x.shape[: x.dim() - k]
    xv, rv, inner, (sx_o, sx_i), (sr_o, sr_i) = _rows_pair(x, x if residual is None else residual, k)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else y
    sd = stat_dtype(x.dtype)
    mean = torch.empty(batch, dtype=sd, device=x.device) if need_stats and not rms else None
    rstd = torch.empty(batch, dtype=sd, device=x.device) if need_stats else None
    cfg = config or RowNormConfig.forward(n)
    args = (xv, rv, y, h, weight if weight is not None else y, bias if bias is not None else y,
            mean if mean is not None else y, rstd if rstd is not None else y, m, n, inner, sx_o, sx_i, sr_o, sr_i, eps)
    flags = dict(IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_R=residual is not None,
                 ACT=ACTIVATIONS[activation], STORE_STATS=need_stats, BLOCK_N=cfg.block_n, ACC=acc_type(x.dtype))
    if cfg.one_pass:  # a program per block of rows
        launch(_row_norm_fwd_kernel, (triton.cdiv(m, cfg.block_m),), *args, num_warps=cfg.num_warps,
               BLOCK_M=cfg.block_m, **flags)
    else:  # a persistent grid (see the kernel)
        launch(_row_norm_fwd_looped_kernel, (min(m, programs_per_wave(x.device, cfg.num_warps)),), *args,
               num_warps=cfg.num_warps, **flags)
    return y, (h if residual is not None else None), mean, rstd


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, config=None):
    """The triton backend's row_norm backward (contract: normops/backends/__init__.py); `config` as
    in row_norm_fwd."""
    weight, bias = dense(weight), dense(bias)
    k = len(normalized_shape)
    n = math.prod(normalized_shape)
    m = x.numel() // n
    xv, dyv, inner, (sx_o, sx_i), (sdy_o, sdy_i) = _rows_pair(x, dy, k)
    want_dx = output_mask[0]
    want_dw = output_mask[1] and weight is not None
    want_db = output_mask[2] and bias is not None
    cfg = config or RowNormConfig.backward(n, x.element_size())
    sd = stat_dtype(x.dtype)
    n_col = triton.cdiv(n, cfg.block_n)
    n_row_blocks = triton.cdiv(m, cfg.block_m)
    g = max(1, min(n_row_blocks, programs_per_wave(x.device, cfg.num_warps) // n_col))
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if want_dx else None
    # dw and db partials share one buffer: one reduction launch (and one cast) for both
    part = torch.empty((g, 2, n), dtype=sd, device=x.device) if want_dw or want_db else None
    stats_mean = mean if mean is not None else rstd
    sums = rstd
    flags = dict(IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None, ACT=ACTIVATIONS[activation])
    w_arg = weight if weight is not None else rstd
    b_arg = bias if bias is not None else rstd
    if want_dx and not cfg.one_pass:
        sums = torch.empty((m, 2), dtype=sd, device=x.device)
        launch(_row_norm_bwd_sums_kernel, (m,),
               dyv, xv, w_arg, b_arg, stats_mean, rstd, sums, n, inner, sdy_o, sdy_i, sx_o, sx_i,
               num_warps=cfg.num_warps, BLOCK_N=cfg.block_n, ACC=acc_type(x.dtype), **flags)
    launch(_row_norm_bwd_kernel, (n_col, g),
           dyv, xv, w_arg, b_arg, stats_mean, rstd, sums,
           dx if dx is not None else rstd, part if part is not None else rstd,
           m, n, inner, sdy_o, sdy_i, sx_o, sx_i,
           num_warps=cfg.num_warps, WANT_DX=want_dx, WANT_DW=want_dw, WANT_DB=want_db, ONE_PASS=cfg.one_pass,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=acc_type(x.dtype), **flags)
    if part is None:
        return dx, None, None
    sums = part.sum(0)  # a fixed-order reduction over programs: deterministic
    return (dx, *param_grads(sums, weight, bias, want_dw, want_db))
