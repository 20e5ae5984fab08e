"""adaLN modulation in Triton (DiT, SD3, Flux): the row-norm family's per-sample-modulated kernels.

x [B, T, D]; scale, shift, gate [B, D], one row per sample, shared by its T tokens. Per row (t) of
sample b, over its D values (RMSNorm: mean = 0, var = mean(h^2), no bias):
    forward    h = r + gate[b] * x (optional residual; no gate: r + x), rounded to h's dtype, stored
               mean = sum(h) / D    var = sum((h - mean)^2) / D    rstd = 1 / sqrt(var + eps)
               x_hat = (h - mean) * rstd    n = x_hat * w + b    y = n * (1 + scale[b]) + shift[b]
    backward   dshift[b] = sum_t dy          dscale[b] = sum_t dy * n       dn = dy * (1 + scale[b])
               dw = sum_{b,t} dn * x_hat     db = sum_{b,t} dn              g = dn * w[None, :]
               dh_total = rstd * (g - sum(g) / D - x_hat * sum(g * x_hat) / D) + dh   (dh: h's own gradient)
               dresidual = dh_total          dx = gate[b] * dh_total        dgate[b] = sum_t dh_total * x
CASTING "torch" (TORCH_CASTING) rounds each step to h's dtype as diffusers' composition does
(gate * x, then + r; n; 1 + scale; n * (1 + scale); + shift), and the backward takes n and 1 + scale
as rounded (straight-through otherwise); "fp32": one rounding, at y. See
normops/backends/numpy_backend/ada_norm.py for the derivation.

Grids. Forward: (row blocks of T, B): a program's rows are all of one sample, so it loads scale,
shift, gate (and w, b) once. Backward: (P, B) programs, each looping over its sample's row blocks
p, p + P, ...; each writes fp32 partial rows (deterministic, no atomics): [B, P, 2, D] (dscale,
dshift), [B, P, 1, D] (dgate), [B * P, 2, D] (dw, db), summed in a fixed order by row_norm's
``row_norm_param_grads_kernel`` (per sample with GROUPED, over all B * P for dw/db).

Rows stay in registers (one pass): D <= ADA_ONE_PASS_MAX forward, ADA_BWD_ONE_PASS_MAX backward
(config.py: the backward's accumulators spill past it); wider rows run the torch backend (``supported``).

Bytes, for M = B*T rows of D elements of e bytes (scale/shift/gate: B*D*e each, negligible):
    forward     read x (+ r): M*D*e each; write y (+ h): M*D*e each; mean, rstd: 4*M each (training)
    backward    read h (or x), dy: M*D*e each; (+ x with a gate, + dh with a residual); write dx (+
                dresidual with a gate): M*D*e; partials 4 * P * B * D * 5, summed by 3 small launches
The unfused diffusers composition (gate*x; +r; layer_norm; 1+scale; *; +shift) moves ~13 M*D*e
forward; this moves 4 M*D*e (with residual and gate).
"""
import torch
import triton
import triton.language as tl

from .common import acc_type, dense, launch, stat_dtype
from .config import AdaNormConfig, ParamGradsConfig, ada_norm_bwd_programs, programs_per_wave
from .row_norm import row_norm_param_grads_kernel


@triton.jit
def _rnd(v, DT: tl.constexpr, ROUND: tl.constexpr):
    """v rounded to dtype DT and back to its own when ROUND (the "torch" casting), else v."""
    if ROUND:
        return v.to(DT).to(v.dtype)
    return v


@triton.jit
def _ada_norm_fwd_kernel(
    X,            # [B, T, D] input, strides (stride_xb, stride_xt, 1)
    R,            # [B, T, D] residual, strides (stride_rb, stride_rt, 1) (HAS_R)
    Y,            # [B, T, D] out, contiguous, h's dtype
    H,            # [B, T, D] out: h = r + gate * x, contiguous (HAS_R)
    GATE,         # [B, D] (HAS_GATE)
    SCALE, SHIFT,  # [B, D]
    W, BIAS,      # [D] (HAS_W, HAS_B)
    MEAN, RSTD,   # [B, T] fp32 out (STORE_STATS; MEAN: LayerNorm only)
    T, D, stride_xb, stride_xt, stride_rb, stride_rt, eps,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_R: tl.constexpr,
    HAS_GATE: tl.constexpr, STORE_STATS: tl.constexpr, TORCH_CASTING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < T
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    HD: tl.constexpr = Y.dtype.element_ty
    x = tl.load(X + b * stride_xb + rows.to(tl.int64)[:, None] * stride_xt + cols[None, :], mask=mask, other=0.0)
    out = b * T * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    h = x.to(ACC)
    if HAS_R:
        r = tl.load(R + b * stride_rb + rows.to(tl.int64)[:, None] * stride_rt + cols[None, :], mask=mask, other=0.0)
        if HAS_GATE:
            gate = tl.load(GATE + b * D + cols, mask=col_mask, other=0.0).to(ACC)
            h = _rnd(h * gate[None, :], HD, TORCH_CASTING)
        h = (h + r.to(ACC)).to(HD)
        tl.store(H + out, h, mask=mask)
        h = h.to(ACC)
    if IS_RMS:
        mean = tl.zeros((BLOCK_M,), dtype=ACC)
        hc = h
    else:
        mean = tl.sum(h, 1) / D
        hc = tl.where(mask, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, 1) / D + eps)
    if STORE_STATS:
        stat_rows = b * T + rows
        if not IS_RMS:
            tl.store(MEAN + stat_rows, mean, mask=row_mask)
        tl.store(RSTD + stat_rows, rstd, mask=row_mask)
    n = hc * rstd[:, None]
    if HAS_W:
        n = n * tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    if HAS_B:
        n = n + tl.load(BIAS + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    scale = tl.load(SCALE + b * D + cols, mask=col_mask, other=0.0).to(ACC)
    shift = tl.load(SHIFT + b * D + cols, mask=col_mask, other=0.0).to(ACC)
    one_plus = _rnd(1.0 + scale, HD, TORCH_CASTING)
    y = _rnd(_rnd(n, HD, TORCH_CASTING) * one_plus[None, :], HD, TORCH_CASTING) + shift[None, :]
    tl.store(Y + out, y.to(HD), mask=mask)


@triton.jit
def _ada_norm_bwd_kernel(
    DY,           # [B, T, D] contiguous, y's gradient
    DH,           # [B, T, D] contiguous, h's gradient from later layers (HAS_DH)
    X,            # [B, T, D] contiguous, the input (read for dgate)
    HN,           # [B, T, D] contiguous: what was normalized (h, or x without a residual)
    GATE, SCALE,  # [B, D]
    W,            # [D] (HAS_W)
    BIAS,         # [D] (HAS_B)
    MEAN, RSTD,   # [B, T] (MEAN: LayerNorm only)
    DX,           # [B, T, D] out, x's dtype (WANT_DX)
    DR,           # [B, T, D] out, h's dtype (WANT_DR)
    PART_S,       # [B, P, 2, D] fp32 out: dscale, dshift partials (both always)
    PART_G,       # [B, P, 1, D] fp32 out: dgate partials (WANT_DG)
    PART_W,       # [B, P, K, D] fp32 out: dw, db partials (K = WANT_DW + WANT_DB)
    T, D,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_DH: tl.constexpr, TORCH_CASTING: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DR: tl.constexpr, WANT_DG: tl.constexpr,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < D
    HD: tl.constexpr = HN.dtype.element_ty
    scale = tl.load(SCALE + b * D + cols, mask=col_mask, other=0.0).to(ACC)
    one_plus = _rnd(1.0 + scale, HD, TORCH_CASTING)
    w = tl.full((BLOCK_N,), 1.0, ACC)
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)
    bias = tl.zeros((BLOCK_N,), dtype=ACC)
    if HAS_B:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(ACC)
    gate = tl.full((BLOCK_N,), 1.0, ACC)
    if HAS_GATE:
        gate = tl.load(GATE + b * D + cols, mask=col_mask, other=0.0).to(ACC)
    acc_sc = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_sh = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_g = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_w = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(p * BLOCK_M, T, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        mask = row_mask[:, None] & col_mask[None, :]
        offs = b * T * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
        stat_rows = b * T + rows
        h = tl.load(HN + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + stat_rows, mask=row_mask, other=0.0)
        if IS_RMS:
            x_hat = h * rstd[:, None]
        else:
            x_hat = (h - tl.load(MEAN + stat_rows, mask=row_mask, other=0.0)[:, None]) * rstd[:, None]
        x_hat = tl.where(mask, x_hat, 0.0)
        n = _rnd(x_hat * w[None, :] + bias[None, :], HD, TORCH_CASTING)
        acc_sc += tl.sum(dy * n, 0)
        acc_sh += tl.sum(dy, 0)
        dn = dy * one_plus[None, :]
        if WANT_DW:
            acc_w += tl.sum(dn * x_hat, 0)
        if WANT_DB:
            acc_b += tl.sum(dn, 0)
        if WANT_DX or WANT_DR or WANT_DG:
            g = dn * w[None, :]
            c1 = tl.sum(g * x_hat, 1) / D
            if IS_RMS:
                dht = (g - x_hat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, 1) / D
                dht = (g - c2[:, None] - x_hat * c1[:, None]) * rstd[:, None]
            if HAS_DH:
                dht += tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
            if WANT_DR:
                tl.store(DR + offs, dht.to(DR.dtype.element_ty), mask=mask)
            if WANT_DX:
                tl.store(DX + offs, (dht * gate[None, :]).to(DX.dtype.element_ty), mask=mask)
            if WANT_DG:
                acc_g += tl.sum(dht * tl.load(X + offs, mask=mask, other=0.0).to(ACC), 0)
    part = b * n_prog + p  # this program's partial row, sample-major: [B, P]
    tl.store(PART_S + part * 2 * D + cols, acc_sc, mask=col_mask)
    tl.store(PART_S + part * 2 * D + D + cols, acc_sh, mask=col_mask)
    if WANT_DG:
        tl.store(PART_G + part * D + cols, acc_g, mask=col_mask)
    k: tl.constexpr = WANT_DW + WANT_DB
    if WANT_DW:
        tl.store(PART_W + part * k * D + cols, acc_w, mask=col_mask)
    if WANT_DB:
        tl.store(PART_W + part * k * D + WANT_DW * D + cols, acc_b, mask=col_mask)


# --- launchers ---------------------------------------------------------------------------------

def supported(x, backward=False):
    """Whether the (backward) kernels take x [B, T, D]: rows in registers up to config.ADA_ONE_PASS_MAX
    (ADA_BWD_ONE_PASS_MAX)."""
    return AdaNormConfig.fits(x.shape[-1], backward)


def _last_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def ada_norm_fwd(x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats, *, config=None):
    """The triton backend's ada_norm forward (normops/ops/ada_norm.py): x, residual [B, T, D] (rows
    read in place when their last dim is contiguous); gate, scale, shift [B, D]; weight, bias [D]."""
    x, residual = _last_contiguous(x), _last_contiguous(residual)
    gate, scale, shift, weight, bias = (dense(t) for t in (gate, scale, shift, weight, bias))
    B, T, D = x.shape
    hd = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty((B, T, D), dtype=hd, device=x.device)
    h = torch.empty((B, T, D), dtype=hd, device=x.device) if residual is not None else None
    sd = stat_dtype(hd)
    mean = torch.empty((B, T), dtype=sd, device=x.device) if need_stats and not rms else None
    rstd = torch.empty((B, T), dtype=sd, device=x.device) if need_stats else None
    cfg = config or AdaNormConfig.forward(D)
    r = residual if residual is not None else x
    launch(_ada_norm_fwd_kernel, (triton.cdiv(T, cfg.block_m), B), x, r, y, h if h is not None else y,
           gate if gate is not None else scale, scale, shift, weight if weight is not None else scale,
           bias if bias is not None else scale, mean if mean is not None else y, rstd if rstd is not None else y,
           T, D, x.stride(0), x.stride(1), r.stride(0), r.stride(1), eps,
           num_warps=cfg.num_warps, IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
           HAS_R=residual is not None, HAS_GATE=gate is not None and residual is not None, STORE_STATS=need_stats,
           TORCH_CASTING=casting == "torch", BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=acc_type(hd))
    return y, h, mean, rstd


def _sums(part, out_dtypes, groups, g, d, acc, device):
    """The fixed-order sums of partials [groups, g, k, d] (k = len(out_dtypes)) by row_norm's glue
    kernel: one [groups, d] result per slot (groups = 1: [d])."""
    outs = [torch.empty((groups, d), dtype=dt, device=device) for dt in out_dtypes]
    pg = ParamGradsConfig.make(d, g)
    launch(row_norm_param_grads_kernel, (triton.cdiv(d, pg.block_n), groups), part, outs[0], outs[-1], g, d,
           num_warps=pg.num_warps, WANT_DW=True, WANT_DB=len(outs) == 2, GROUPED=groups > 1,
           BLOCK_G=pg.block_g, BLOCK_N=pg.block_n, ACC=acc)
    return outs


def ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, casting, output_mask, *, config=None):
    """The triton backend's ada_norm backward: (dx, dresidual, dgate, dscale, dshift, dweight,
    dbias), None where ``output_mask`` says no; dshift in scale's dtype (the op casts it). Two
    launch kinds: the backward kernel (dx, dresidual, per-program partials), then the glue sums."""
    dy, x = dy.contiguous(), x.contiguous()
    hn = x if h is None else h.contiguous()
    dh = None if dh is None or h is None else dh.contiguous()
    gate = None if gate is None or h is None else dense(gate)
    scale, weight, bias = dense(scale), dense(weight), dense(bias)
    B, T, D = x.shape
    want_dx, want_dr = output_mask[0], output_mask[1] and h is not None
    want_dg = output_mask[2] and gate is not None
    want_dw, want_db = output_mask[5] and weight is not None, output_mask[6] and bias is not None
    cfg = config or AdaNormConfig.backward(D)
    acc = acc_type(hn.dtype)
    k = want_dw + want_db
    p = ada_norm_bwd_programs(cfg, B, T, cfg.programs or programs_per_wave(x.device, cfg.num_warps))
    sd = stat_dtype(hn.dtype)
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if want_dx else None
    dr = torch.empty((B, T, D), dtype=hn.dtype, device=x.device) if want_dr else None
    part_s = torch.empty((B, p, 2, D), dtype=sd, device=x.device)
    part_g = torch.empty((B, p, 1, D), dtype=sd, device=x.device) if want_dg else None
    part_w = torch.empty((B, p, k, D), dtype=sd, device=x.device) if k else None
    launch(_ada_norm_bwd_kernel, (p, B), dy, dh if dh is not None else dy, x, hn,
           gate if gate is not None else scale, scale, weight if weight is not None else scale,
           bias if bias is not None else scale, mean if mean is not None else rstd, rstd,
           dx if dx is not None else dy, dr if dr is not None else dy, part_s,
           part_g if part_g is not None else part_s, part_w if part_w is not None else part_s, T, D,
           num_warps=cfg.num_warps, IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
           HAS_GATE=gate is not None, HAS_DH=dh is not None, TORCH_CASTING=casting == "torch",
           WANT_DX=want_dx, WANT_DR=want_dr, WANT_DG=want_dg, WANT_DW=want_dw, WANT_DB=want_db,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=acc)
    dscale, dshift = _sums(part_s, (scale.dtype, scale.dtype), B, p, D, acc, x.device)
    dgate = _sums(part_g, (gate.dtype,), B, p, D, acc, x.device)[0] if want_dg else None
    dw = db = None
    if k:
        sums = _sums(part_w.view(1, B * p, k, D), [t.dtype for t, want in ((weight, want_dw), (bias, want_db))
                                                   if want], 1, B * p, D, acc, x.device)
        sums = [t[0] for t in sums]
        dw, db = (sums[0], sums[-1]) if k == 2 else ((sums[0], None) if want_dw else (None, sums[0]))
    grads = (dx, dr, dgate, dscale, dshift, dw, db)
    return tuple(g if want else None for g, want in zip(grads, output_mask))

