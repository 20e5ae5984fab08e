"""adaLN modulation in Triton (DiT, SD3, Flux): the row-norm family's per-sample-modulated kernels.

x [B, T, D]; scale, shift, gate [B, D], one row per sample, shared by its T tokens. Per row (t) of
sample b, over its D values (RMSNorm: mean = 0, var = mean(h^2), no bias):
    forward    h = r + gate[b] * x (optional residual; no gate: r + x), rounded to h's dtype, stored
               mean = p + sum(h - p) / D, p = h[0]     var = sum((h - mean)^2) / D     rstd = 1 / sqrt(var + eps)
               x_hat = (h - mean) * rstd    n = x_hat * w + b    y = n * (1 + scale[b]) + shift[b]
    backward   dshift[b] = sum_t dy          dscale[b] = sum_t dy * n       dn = dy * (1 + scale[b])
               g = dn * w    c1 = sum(g * x_hat) / D    c2 = g0 + sum(g - g0) / D, g0 = g[0] (RMSNorm: 0)
               dh_total = rstd * (g - c2 - x_hat * c1) + dh   (dh: h's own gradient from later layers)
               dresidual = dh_total          dx = gate[b] * dh_total        dgate[b] = sum_t dh_total * x
               dw = sum_b (1 + scale[b]) * S_b, S_b = sum_t dy * x_hat      db = sum_b (1 + scale[b]) * dshift[b]
The pivots p and g0 are row_norm.py's: a constant row has x_hat == 0 exactly (sum(h) / D can be an
ulp off, which rstd = 1/sqrt(eps), 1000 at DiT's eps = 1e-6, magnifies), so y == n's bias term
modulated, and a constant g gives dx == 0. dw and db factor 1 + scale[b] out of the sums over a
sample's tokens (it is constant over them): the backward keeps four column sums at most, not five.
CASTING "torch" (TORCH_CASTING) rounds each step to h's dtype as diffusers' composition does
(gate * x, then + r; n; 1 + scale; n * (1 + scale); + shift), "t5" also rounds x_hat to a half
weight's dtype before the weight (XHAT: diffusers' RMSNorm, T5LayerNorm); the backward takes n,
x_hat and 1 + scale as rounded (straight-through otherwise); "fp32": one rounding, at y. See
normops/backends/numpy_backend/ada_norm.py for the derivation.

Grids. Forward: (row blocks of T, B): a program's rows are all of one sample, so it loads scale,
shift, gate (and w, b) once. Backward: (P, B) programs, each looping over its sample's row blocks
p, p + P, ...; each writes K = 2-4 fp32 partial rows (deterministic, no atomics) to [B, P, K, D]:
sum dy * n, sum dy, sum dh_total * x (dgate wanted), S (dw wanted). The glue kernel,
``_ada_norm_param_grads_kernel``, sums each sample's P rows in a fixed order into dscale[b],
dshift[b], dgate[b], and dw, db in the same pass: the backward's one glue launch (roofline.py).

Rows stay in registers (one pass): D <= ADA_ONE_PASS_MAX forward, ADA_BWD_ONE_PASS_MAX backward
(ADA_BWD_HALF_ONE_PASS_MAX for 16-bit h without dgate's sum, config.py); wider rows run the torch
backend (``supported``).

Bytes, for M = B*T rows of D elements of e bytes (scale/shift/gate: B*D*e each, negligible):
    forward     read x (+ r): M*D*e each; write y (+ h): M*D*e each; mean, rstd: 4*M each (training)
    backward    read h (or x), dy: M*D*e each; (+ x with a gate, + dh with a residual); write dx (+
                dresidual with a gate): M*D*e; partials 4 * B * P * K * D written, read once by the glue
The unfused diffusers composition (gate*x; +r; layer_norm; 1+scale; *; +shift) moves ~13 M*D*e
forward; this moves 4 M*D*e (with residual and gate).
"""
import torch
import triton
import triton.language as tl

from normops.core import casting_dtypes, is_batch_invariant

from .common import acc_type, dense, launch, stat_dtype
from .config import AdaNormConfig, ada_norm_bwd_programs, invariant_programs, programs_per_wave
from .row_norm import TL_DTYPES, add_pair


@triton.jit
def _rnd(v, DT: tl.constexpr, ROUND: tl.constexpr):
    """v rounded to dtype DT and back to its own when ROUND (the "torch" casting), else v."""
    if ROUND:
        return v.to(DT).to(v.dtype)
    return v


@triton.jit
def _ada_h(x, r, gate, HD: tl.constexpr, HAS_R: tl.constexpr, HAS_GATE: tl.constexpr, TORCH_CASTING: tl.constexpr,
           ACC: tl.constexpr):
    """h = r + gate * x (no gate: r + x) rounded to h's dtype HD, in ACC (gate * x rounded first
    under the torch casting), or x without a residual. The tile and its pivot (column 0) both
    take h from here: the same operations, so the pivot is the tile's first h."""
    h = x.to(ACC)
    if HAS_R:
        if HAS_GATE:
            h = _rnd(h * gate, HD, TORCH_CASTING)
        h = (h + r.to(ACC)).to(HD).to(ACC)
    return h


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
    HAS_GATE: tl.constexpr, STORE_STATS: tl.constexpr, TORCH_CASTING: tl.constexpr, XHAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < T
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    HD: tl.constexpr = Y.dtype.element_ty
    x_rows = X + b * stride_xb + rows.to(tl.int64) * stride_xt
    r_rows = R + b * stride_rb + rows.to(tl.int64) * stride_rt
    out = b * T * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    r = 0.0
    if HAS_R:
        r = tl.load(r_rows[:, None] + cols[None, :], mask=mask, other=0.0)
    gate = 1.0
    if HAS_GATE:
        gate = tl.load(GATE + b * D + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    h = _ada_h(tl.load(x_rows[:, None] + cols[None, :], mask=mask, other=0.0), r, gate, HD, HAS_R, HAS_GATE,
               TORCH_CASTING, ACC)
    if HAS_R:
        tl.store(H + out, h.to(HD), mask=mask)
    if IS_RMS:
        mean = tl.zeros((BLOCK_M,), dtype=ACC)
        hc = h
    else:  # about the pivot, each row's first h (row_norm.py's _pivot): a constant row gives x_hat == 0 exactly
        r0 = 0.0
        if HAS_R:
            r0 = tl.load(r_rows, mask=row_mask, other=0.0)
        gate0 = 1.0
        if HAS_GATE:
            gate0 = tl.load(GATE + b * D).to(ACC)
        pivot = _ada_h(tl.load(x_rows, mask=row_mask, other=0.0), r0, gate0, HD, HAS_R, HAS_GATE, TORCH_CASTING,
                       ACC)
        hs = tl.where(mask, h - pivot[:, None], 0.0)
        mean_s = tl.sum(hs, 1) / D
        hc = tl.where(mask, hs - mean_s[:, None], 0.0)
        mean = pivot + mean_s
    rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, 1) / D + eps)
    if STORE_STATS:
        stat_rows = b * T + rows
        if not IS_RMS:
            tl.store(MEAN + stat_rows, mean, mask=row_mask)
        tl.store(RSTD + stat_rows, rstd, mask=row_mask)
    n = (hc * rstd[:, None]).to(XHAT).to(ACC)  # XHAT == ACC: no rounding (the "t5" casting's x_hat)
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
    PART,         # [B, P, K, D] fp32 out: sum_t dy * n, sum_t dy, (sum_t dh_total * x), (sum_t dy * x_hat)
    T, D,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_DH: tl.constexpr, TORCH_CASTING: tl.constexpr, XHAT: tl.constexpr,
    WANT_DX: tl.constexpr, WANT_DR: tl.constexpr, WANT_DG: tl.constexpr, WANT_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """Program (p, b) takes sample b's row blocks p, p + P, ...: dx (and dresidual) per row, and four
    column sums at most over its rows (the K partial rows): dscale's, dshift's, dgate's and S, dw's
    sum_t dy * x_hat before the factor 1 + scale[b] (the glue kernel applies it, per sample)."""
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    b = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < D
    HD: tl.constexpr = HN.dtype.element_ty
    acc_sc = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_sh = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_g = tl.zeros((BLOCK_N,), dtype=ACC)
    acc_s = tl.zeros((BLOCK_N,), dtype=ACC)
    for start in range(p * BLOCK_M, T, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < T
        mask = row_mask[:, None] & col_mask[None, :]
        row_offs = b * T * D + rows.to(tl.int64) * D
        offs = row_offs[:, None] + cols[None, :]
        stat_rows = b * T + rows
        # the per-sample and parameter rows are re-read every iteration (cache hits), not held
        # across the loop: fewer registers live at once (as row_norm's backward)
        one_plus = _rnd(1.0 + tl.load(SCALE + b * D + cols, mask=col_mask, other=0.0).to(ACC), HD, TORCH_CASTING)
        w = 1.0
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        h = tl.load(HN + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        rstd = tl.load(RSTD + stat_rows, mask=row_mask, other=0.0)
        if IS_RMS:
            x_hat = h * rstd[:, None]
        else:
            x_hat = (h - tl.load(MEAN + stat_rows, mask=row_mask, other=0.0)[:, None]) * rstd[:, None]
        x_hat = tl.where(mask, x_hat, 0.0)
        x_r = x_hat.to(XHAT).to(ACC)  # the factor the forward multiplied w by
        n = x_r * w
        if HAS_B:
            n += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
        acc_sc += tl.sum(dy * _rnd(n, HD, TORCH_CASTING), 0)
        acc_sh += tl.sum(dy, 0)
        if WANT_DW:
            acc_s += tl.sum(dy * x_r, 0)
        if WANT_DX or WANT_DR or WANT_DG:
            g = (dy * one_plus[None, :]) * w
            if IS_RMS:
                c1 = tl.sum(g * x_hat, 1)
                dht = (g - x_hat * (c1[:, None] / D)) * rstd[:, None]
            else:  # mean(g) about g0, each row's first g (row_norm.py): a constant g gives exactly 0
                g0 = tl.load(DY + row_offs, mask=row_mask, other=0.0).to(ACC) * _rnd(
                    1.0 + tl.load(SCALE + b * D).to(ACC), HD, TORCH_CASTING)
                if HAS_W:
                    g0 = g0 * tl.load(W).to(ACC)
                g = tl.where(mask, g - g0[:, None], 0.0)
                c1, c2 = tl.reduce((g * x_hat, g), 1, add_pair)
                dht = (g - c2[:, None] / D - x_hat * (c1[:, None] / D)) * rstd[:, None]
            if HAS_DH:
                dht += tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
            if WANT_DR:
                tl.store(DR + offs, dht.to(DR.dtype.element_ty), mask=mask)
            if WANT_DX:
                gate = 1.0
                if HAS_GATE:
                    gate = tl.load(GATE + b * D + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
                tl.store(DX + offs, (dht * gate).to(DX.dtype.element_ty), mask=mask)
            if WANT_DG:
                acc_g += tl.sum(dht * tl.load(X + offs, mask=mask, other=0.0).to(ACC), 0)
    K: tl.constexpr = 2 + WANT_DG + WANT_DW
    part = PART + (b * n_prog + p) * K * D + cols  # this program's partial rows, sample-major: [B, P, K, D]
    tl.store(part, acc_sc, mask=col_mask)
    tl.store(part + D, acc_sh, mask=col_mask)
    if WANT_DG:
        tl.store(part + 2 * D, acc_g, mask=col_mask)
    if WANT_DW:
        tl.store(part + (2 + WANT_DG) * D, acc_s, mask=col_mask)


@triton.jit
def _ada_norm_param_grads_kernel(
    PART,         # [B, P, K, D] fp32 partials of the backward kernel (its PART)
    SCALE,        # [B, D]: dw and db take each sample's 1 + scale[b] (as the forward rounded it)
    DSCALE, DSHIFT, DGATE,  # [B, D] out, in their dtypes (DGATE: WANT_DG)
    DW, DB,       # [D] out, in the parameters' dtypes (WANT_DW, WANT_DB)
    B, P, D,
    HD: tl.constexpr, TORCH_CASTING: tl.constexpr, WANT_DG: tl.constexpr, WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr,
):
    """The backward's one glue launch: per BLOCK_N columns, each sample's P partial rows summed
    BLOCK_P at a time in a fixed order (deterministic) into dscale[b], dshift[b], dgate[b], and,
    in the same pass, dw = sum_b (1 + scale[b]) * S_b and db = sum_b (1 + scale[b]) * dshift[b]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    K: tl.constexpr = 2 + WANT_DG + WANT_DW
    dw = tl.zeros((BLOCK_N,), dtype=ACC)
    db = tl.zeros((BLOCK_N,), dtype=ACC)
    for b in range(0, B):
        sc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
        sh = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
        sg = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
        s = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
        for start in range(0, P, BLOCK_P):
            prog = start + tl.arange(0, BLOCK_P)
            mask = (prog < P)[:, None] & col_mask[None, :]
            ptrs = PART + (b * P + prog).to(tl.int64)[:, None] * K * D + cols[None, :]
            sc += tl.load(ptrs, mask=mask, other=0.0)
            sh += tl.load(ptrs + D, mask=mask, other=0.0)
            if WANT_DG:
                sg += tl.load(ptrs + 2 * D, mask=mask, other=0.0)
            if WANT_DW:
                s += tl.load(ptrs + (2 + WANT_DG) * D, mask=mask, other=0.0)
        out = b * D + cols
        dshift = tl.sum(sh, 0)
        tl.store(DSCALE + out, tl.sum(sc, 0).to(DSCALE.dtype.element_ty), mask=col_mask)
        tl.store(DSHIFT + out, dshift.to(DSHIFT.dtype.element_ty), mask=col_mask)
        if WANT_DG:
            tl.store(DGATE + out, tl.sum(sg, 0).to(DGATE.dtype.element_ty), mask=col_mask)
        if WANT_DW or WANT_DB:
            one_plus = _rnd(1.0 + tl.load(SCALE + out, mask=col_mask, other=0.0).to(ACC), HD, TORCH_CASTING)
            if WANT_DW:
                dw += one_plus * tl.sum(s, 0)
            if WANT_DB:
                db += one_plus * dshift
    if WANT_DW:
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_mask)
    if WANT_DB:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_mask)


# --- launchers ---------------------------------------------------------------------------------

def supported(x, backward=False, gated=False, h=None):
    """Whether the (backward) kernels take x [B, T, D] (h: the saved residual stream, or None): rows
    in registers up to config.ADA_ONE_PASS_MAX (backward: ADA_BWD_ONE_PASS_MAX, or
    ADA_BWD_HALF_ONE_PASS_MAX for 16-bit h when dgate is not wanted (``gated``): three sums, not four)."""
    return AdaNormConfig.fits(x.shape[-1], backward, gated, (x if h is None else h).element_size())


def _last_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _casting(casting, hd, weight):
    """The casting's constexprs: TORCH_CASTING (each step rounded to h's dtype: "torch" and "t5")
    and XHAT, the dtype x_hat is rounded to before the weight ("t5": a half weight's, by
    normops.core.casting_dtypes; else the accumulation type: no rounding)."""
    xhat = casting_dtypes("t5", hd, None if weight is None else weight.dtype)[0] if casting == "t5" else None
    return dict(TORCH_CASTING=casting in ("torch", "t5"), XHAT=TL_DTYPES[xhat] if xhat else acc_type(hd))


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
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=acc_type(hd), **_casting(casting, hd, weight))
    return y, h, mean, rstd


def ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, casting, output_mask, *, config=None,
                 grads_config=None):
    """The triton backend's ada_norm backward: (dx, dresidual, dgate, dscale, dshift, dweight,
    dbias), None where ``output_mask`` says no; dshift in scale's dtype (the op casts it). Two
    launches: the backward kernel (dx, dresidual, per-program partial rows), then the glue kernel
    (``grads_config``: a ParamGradsConfig, else AdaNormConfig.glue's) that sums them."""
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
    if is_batch_invariant():  # a sample's P from its T alone: its dscale/dshift/dgate rows whatever B (config.py)
        p = invariant_programs(triton.cdiv(T, cfg.block_m), cfg.block_m)
    else:
        p = ada_norm_bwd_programs(cfg, B, T, cfg.programs or programs_per_wave(x.device, cfg.num_warps))
    dx = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if want_dx else None
    dr = torch.empty((B, T, D), dtype=hn.dtype, device=x.device) if want_dr else None
    part = torch.empty((B, p, 2 + want_dg + want_dw, D), dtype=stat_dtype(hn.dtype), device=x.device)
    flags = _casting(casting, hn.dtype, weight)
    launch(_ada_norm_bwd_kernel, (p, B), dy, dh if dh is not None else dy, x, hn,
           gate if gate is not None else scale, scale, weight if weight is not None else scale,
           bias if bias is not None else scale, mean if mean is not None else rstd, rstd,
           dx if dx is not None else dy, dr if dr is not None else dy, part, T, D,
           num_warps=cfg.num_warps, IS_RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None,
           HAS_GATE=gate is not None, HAS_DH=dh is not None, WANT_DX=want_dx, WANT_DR=want_dr, WANT_DG=want_dg,
           WANT_DW=want_dw, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=acc, **flags)
    dscale, dshift = (torch.empty((B, D), dtype=scale.dtype, device=x.device) for _ in range(2))
    dgate = torch.empty((B, D), dtype=gate.dtype, device=x.device) if want_dg else None
    dw = torch.empty((D,), dtype=weight.dtype, device=x.device) if want_dw else None
    db = torch.empty((D,), dtype=bias.dtype, device=x.device) if want_db else None
    pg = grads_config or AdaNormConfig.glue(D, p)
    launch(_ada_norm_param_grads_kernel, (triton.cdiv(D, pg.block_n),), part, scale, dscale, dshift,
           dgate if dgate is not None else dscale, dw if dw is not None else dscale, db if db is not None else dscale,
           B, p, D, num_warps=pg.num_warps, HD=TL_DTYPES[hn.dtype], TORCH_CASTING=flags["TORCH_CASTING"],
           WANT_DG=want_dg, WANT_DW=want_dw, WANT_DB=want_db, BLOCK_P=pg.block_g, BLOCK_N=pg.block_n, ACC=acc)
    grads = (dx, dr, dgate, dscale, dshift, dw, db)
    return tuple(g if want else None for g, want in zip(grads, output_mask))
