"""The "torch" backend: ATen's native norm kernels, with the fused extras composed around them.

This is the default off-GPU, and it must be as fast as ``torch.nn`` on the CPU, so every
forward and backward here is one call to the same ATen kernel ``torch.nn`` uses
(``native_layer_norm``, ``native_group_norm``, ``native_batch_norm``...), with the activation,
the residual add and the dtype bookkeeping of the backend contract around it.

RMSNorm is the exception: ATen has a fused CPU forward (``_fused_rms_norm``) but no CPU
backward, so the backward is a short composition (see ``_rms_backward``).

ATen has no fused norm+activation pass: the activation is one more pass over the norm's output,
applied in place (``_activate``). An fp32/fp64 eager call with an activation runs the forward here
under torch's own autograd (route "composed", ``normops.ops.route``), whose backward keeps the
activation's input; the op's backward (fp16/bf16, RMSNorm) recomputes it from x and the statistics.
Off the CPU, fp16/bf16 layer, RMS and group norms run in fp32 (see ``_in_fp32``): ATen's CUDA
kernels take no fp32 parameters with a low-precision input.
See ``normops/backends/__init__.py`` for the contract.
"""
import math

import torch

from ..core import (MIN_QUANT_SCALE, QUANT_MAX, activate, activation_backward, casting_dtypes, channel_view,
                    is_batch_invariant, memory_format_of, stat_dtype)

aten = torch.ops.aten

# Families whose plain fp32/fp64 eager call normops.functional hands straight to ATen's own norm
# (torch.layer_norm, torch.group_norm, torch.batch_norm): exactly what this backend computes.
NATIVE = frozenset({"row_norm", "group_norm", "batch_norm"})


def _native_stat_dtype(x, weight, bias):
    # ATen's CPU kernels return statistics in the input dtype, except when a low-precision
    # input meets fp32 parameters ("mixed type"); its backward wants them back the same way.
    params = [p for p in (weight, bias) if p is not None]
    if params and all(p.dtype != x.dtype for p in params):
        return params[0].dtype
    return x.dtype


def _opmath(x, *params):
    """Reduced-precision inputs take ATen's mixed-type path (fp32 parameters): its statistics
    are fp32, as the contract asks, and the affine transform runs in fp32. Other inputs take
    parameters of their own dtype (an fp32 residual stream's h with the bf16 x's parameters)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return [None if p is None else p.float() for p in params]
    return [_to(p, x.dtype) for p in params]


def _in_fp32(x):
    """Whether this call runs in fp32: fp16/bf16 layer, RMS and group norms off the CPU. ATen's
    CUDA kernels for those read weight and bias in the input's dtype (no fp32 parameters with a
    low-precision input, unlike the CPU's mixed-type path) and return statistics in dtypes of their
    own; in fp32 every parameter dtype is right and the statistics are the contract's. It costs an
    fp32 copy of the input: this backend is CUDA's fallback, the triton one its default."""
    return x.dtype in (torch.float16, torch.bfloat16) and x.device.type != "cpu"


def _f32(t):
    return None if t is None else t.float()


def _fixed_sum(t, dims):
    """t summed over `dims`: t.sum(dims), or in the batch-invariant mode (normops.batch_invariant) a
    pairwise tree of elementwise adds over the flattened `dims` (halves added, an odd last slice
    carried), whose bits depend on the shape alone: torch's reductions (and ATen's norm backwards'
    dW/dB) split a reduction among threads, so their bits depend on torch.get_num_threads() and,
    for a sum per sample, on the other samples. The dW/dB and per-sample sums of this backend."""
    if not is_batch_invariant():
        return t.sum(dims)
    dims = sorted(d % t.dim() for d in dims)
    kept = [d for d in range(t.dim()) if d not in dims]
    t = t.permute(dims + kept).reshape((-1,) + tuple(t.shape[d] for d in kept))
    if t.shape[0] == 0:
        return t.new_zeros(t.shape[1:])
    while t.shape[0] > 1:
        half = t.shape[0] // 2
        t = torch.cat((t[:half] + t[half:2 * half], t[2 * half:])) if t.shape[0] % 2 else t[:half] + t[half:]
    return t[0].clone()  # one slice: never a view of t (dz may be the caller's dy, which autograd accumulates into)


def _cast(t, like):
    return None if t is None or like is None else _to(t, like.dtype)


def _to(t, dtype):
    return t if t is None or t.dtype == dtype else t.to(dtype)  # .to() itself costs a microsecond


_IN_PLACE = {"relu": torch.relu_, "silu": lambda t: torch.nn.functional.silu(t, inplace=True), "gelu": aten.gelu_}
_BACKWARD_INTO = {  # dy * act'(z), written over z (elementwise, so z may be its own output)
    "relu": lambda dy, z: aten.threshold_backward.grad_input(dy, z, 0, grad_input=z),
    "silu": lambda dy, z: aten.silu_backward.grad_input(dy, z, grad_input=z),
    "gelu": lambda dy, z: aten.gelu_backward.grad_input(dy, z, grad_input=z),
}


# The batch-invariant mode's elementwise pieces: at most this many elements, a multiple of 64.
# ATen's CPU elementwise loops run SIMD vectors in their body and a scalar loop on the tail (and on
# each thread's chunk boundary past its 32768-element grain), and an activation's scalar code gives
# other bits than its vector code (silu, gelu: a fused multiply-add here, none there), so an
# element's bits depend on its place in the flattened tensor. Pieces below the grain run on one
# thread, and a multiple of 64 (two vectors of 32 bf16 values, AVX-512's widest unrolled step)
# leaves no tail: every element takes the vector code.
INVARIANT_PIECE = 16384


def _elementwise_invariant(op, *ts):
    """op(*ts) (an elementwise op of same-shaped tensors, out of place): outside the batch-invariant
    mode op itself; in it, rows (the last dim) padded with zeros to a multiple of 64, flattened,
    op applied to INVARIANT_PIECE-element pieces, the padding dropped (a new contiguous tensor)."""
    if not is_batch_invariant():
        return op(*ts)
    shape = ts[0].shape
    d = shape[-1] if ts[0].dim() else 1
    flat = [torch.nn.functional.pad(t.reshape(-1, d), (0, -d % 64)).reshape(-1) for t in ts]
    out = torch.cat([op(*(f[i:i + INVARIANT_PIECE] for f in flat))
                     for i in range(0, flat[0].numel(), INVARIANT_PIECE)])
    return out.reshape(-1, d + -d % 64)[:, :d].reshape(shape)


def _activate(y, activation):
    """act(y) on a norm's fresh output y, in place: no second buffer and no allocation. Out of
    place only where torch's autograd records a graph through y (the "composed" route) and the
    activation's backward reads its input (silu, gelu); relu's reads its output, which in place
    keeps, and no ATen norm's backward reads the norm's output. The batch-invariant mode computes
    it by _elementwise_invariant's pieces (then copied over y where in place)."""
    if activation == "none":
        return y
    if is_batch_invariant():
        z = _elementwise_invariant(lambda t: activate(t, activation), y)
        return z if y.requires_grad and torch.is_grad_enabled() else y.copy_(z)
    if activation != "relu" and y.requires_grad and torch.is_grad_enabled():
        return activate(y, activation)
    return _IN_PLACE[activation](y)


def _activation_backward(dy, z, activation):
    """dy * act'(z) for z recomputed here (this backend's own buffer): written over z (a new
    tensor in the batch-invariant mode)."""
    if activation == "none":
        return dy
    if is_batch_invariant():
        return _act_backward(dy, z, activation)
    return _BACKWARD_INTO[activation](dy, z)


def _act_backward(dy, z, activation):
    """core.activation_backward, by _elementwise_invariant's pieces in the batch-invariant mode."""
    return _elementwise_invariant(lambda a, b: activation_backward(a, b, activation), dy, z)


def _row_mean(t, dims=(-1,)):
    """t's mean over `dims` (the last by default), kept: in the batch-invariant mode a _fixed_sum
    (torch's reduction splits a row among threads when the rows are few and wide, so a row's bits
    depend on the batch)."""
    if not is_batch_invariant():
        return t.mean(dims, keepdim=True)
    kept = tuple(1 if d - t.dim() in dims or d in dims else size for d, size in enumerate(t.shape))
    return _fixed_sum(t, dims).reshape(kept) / math.prod(t.shape[d] for d in dims)


# --- LayerNorm / RMSNorm ---------------------------------------------------------------------

def _rms_forward(x, normalized_shape, weight, eps):
    """(y, rstd) with rstd keeping the normalized dims as 1s, like ATen's. In the batch-invariant
    mode the sum of squares is a _fixed_sum: ATen's splits a wide row (past its 32K-element grain)
    among threads when the rows are fewer than the threads, so a row's bits depend on the batch."""
    if hasattr(aten, "_fused_rms_norm") and not is_batch_invariant():
        return aten._fused_rms_norm(x, list(normalized_shape), weight, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(stat_dtype(x))
    rstd = torch.rsqrt(_row_mean(xf.square(), dims) + eps)
    y = xf * rstd
    if weight is not None:
        y = y * weight
    return y.to(x.dtype), rstd


def row_norm_fwd(x, residual, normalized_shape, weight, bias, eps, rms, activation, need_stats, *, offset=0.0,
                 casting="fp32", out_dtype=None, gate=None, norm_before_gate=True, group_size=0):
    h = x + residual if residual is not None else None
    inp = h if h is not None else x
    if _is_variant(inp, weight, offset, casting, out_dtype, gate, group_size):
        y, mean, rstd = _variant_fwd(inp, normalized_shape, weight, bias, eps, rms, activation, offset, casting,
                                     out_dtype, gate, norm_before_gate, group_size)
        return y, h, (mean if need_stats else None), (rstd if need_stats else None)
    if _in_fp32(inp):
        y, _, mean, rstd = row_norm_fwd(inp.float(), None, normalized_shape, _f32(weight), _f32(bias), eps, rms,
                                        activation, need_stats)
        return y.to(inp.dtype), h, mean, rstd
    batch_shape = inp.shape[: inp.dim() - len(normalized_shape)]
    weight, bias = _opmath(inp, weight, bias)
    if rms:
        y, rstd = _rms_forward(inp, normalized_shape, weight, eps)
        mean = None
        if bias is not None:  # not reachable from the public API; kept for the contract
            y = y + bias
    else:
        y, mean, rstd = aten.native_layer_norm(inp, list(normalized_shape), weight, bias, eps)
    y = _activate(y, activation).contiguous()
    if not need_stats:
        return y, h, None, None
    sd = stat_dtype(inp)
    mean = None if mean is None else _to(mean.reshape(batch_shape), sd)
    return y, h, mean, _to(rstd.reshape(batch_shape), sd)


# --- the variants: weight offset, casting modes, output dtype, gate, groups ----------------------
# Composed in the statistics dtype around ATen's unweighted norm (its statistics, its x_hat), with
# the casting modes' roundings where the Hugging Face modules round (backends/__init__.py).

def _is_variant(inp, weight, offset, casting, out_dtype, gate, group_size):
    """Whether a call needs the variant path: the plain one (ATen's norm) serves a casting mode
    whose roundings are to the statistics dtype (fp32 Llama or T5 with fp32 weights: no-ops)."""
    if offset or gate is not None or group_size or (out_dtype is not None and out_dtype != inp.dtype):
        return True
    sd = stat_dtype(inp)
    return any(d not in (None, sd) for d in casting_dtypes(casting, inp.dtype, None if weight is None else weight.dtype))


def _grouped(t, normalized_shape, group_size):
    """t viewed as rows of group_size (the normalized dims then one) and the normalized shape of a row."""
    if not group_size:
        return t, list(normalized_shape)
    return t.unflatten(-1, (-1, group_size)), [group_size]


def _variant_inputs(inp, weight, bias, offset, casting, gate, norm_before_gate):
    """In the statistics dtype: u (the normalized input), silu(gate), offset + w, b, the dtypes
    x_hat and x_hat * w are rounded to (None: not rounded)."""
    sd = stat_dtype(inp)
    u = inp.to(sd)
    sg = None if gate is None else _elementwise_invariant(torch.nn.functional.silu, gate.to(sd))
    if sg is not None and not norm_before_gate:
        u = u * sg
    w = _to(weight, sd)
    if w is not None and offset:
        w = w + offset
    xhat_dtype, prod_dtype = casting_dtypes(casting, inp.dtype, None if weight is None else weight.dtype)
    return u, sg, w, _to(bias, sd), xhat_dtype, prod_dtype


def _rounded(t, dtype):
    return t if dtype is None or dtype == t.dtype else t.to(dtype).to(t.dtype)


def _variant_fwd(inp, normalized_shape, weight, bias, eps, rms, activation, offset, casting, out_dtype, gate,
                 norm_before_gate, group_size):
    u, sg, w, b, xhat_dtype, prod_dtype = _variant_inputs(inp, weight, bias, offset, casting, gate, norm_before_gate)
    ug, shape = _grouped(u, normalized_shape, group_size)
    if rms:
        x_hat, rstd = _rms_forward(ug, shape, None, eps)
        mean = None
    else:
        x_hat, mean, rstd = aten.native_layer_norm(ug, shape, None, None, eps)
    z = _rounded(x_hat.reshape(u.shape), xhat_dtype)
    if w is not None:
        z = z * w
    if b is not None:
        z = z + b
    if sg is not None and norm_before_gate:
        z = _rounded(z, prod_dtype) * sg
    y = _activate(z, activation).to(out_dtype or inp.dtype)
    stats_shape = ug.shape[: ug.dim() - len(shape)]
    return y, None if mean is None else mean.reshape(stats_shape), rstd.reshape(stats_shape)


def _variant_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, offset, casting,
                 gate, norm_before_gate, group_size):
    """(dx, dw, db, dgate): ATen's (or _rms_backward's) dx of the unweighted norm of u given
    g = dz * (offset + w); the roundings straight-through, dw of x_hat as rounded."""
    u, sg, w, b, xhat_dtype, prod_dtype = _variant_inputs(x, weight, bias, offset, casting, gate, norm_before_gate)
    ug, shape = _grouped(u, normalized_shape, group_size)
    keep = ug.shape[: ug.dim() - len(shape)] + (1,) * len(shape)
    x_hat = ug * rstd.reshape(keep) if rms else (ug - mean.reshape(keep)) * rstd.reshape(keep)
    x_hat = x_hat.reshape(u.shape)
    x_r = _rounded(x_hat, xhat_dtype)
    z = x_r if w is None else x_r * w
    if b is not None:
        z = z + b
    dz = dy.to(u.dtype)
    gate_after = sg is not None and norm_before_gate
    if gate_after:
        z = _rounded(z, prod_dtype)
    if activation != "none":
        dz = _activation_backward(dz, z * sg if gate_after else z.clone(), activation)
    dgate = None
    if gate_after:
        dgate = _act_backward(dz * z, gate.to(u.dtype), "silu")  # dz * z * silu'(gate)
        dz = dz * sg
    want_dg = len(output_mask) > 3 and output_mask[3] and gate is not None
    dx = None
    if output_mask[0] or (want_dg and not norm_before_gate):
        g = dz if w is None else dz * w
        gg = g.reshape(ug.shape)
        if rms:
            du, _ = _rms_backward(gg, ug, shape, None, rstd, (True, False))
        else:
            du = aten.native_layer_norm_backward(gg, ug, shape, mean.reshape(keep), rstd.reshape(keep), None, None,
                                                 [True, False, False])[0]
        du = du.reshape(u.shape)
        if sg is not None and not norm_before_gate:
            dgate = _act_backward(du * x.to(u.dtype), gate.to(u.dtype), "silu")
            du = du * sg
        dx = du.to(x.dtype)
    lead = tuple(range(x.dim() - len(normalized_shape)))
    dw = _fixed_sum(dz * x_r, lead).to(weight.dtype) if output_mask[1] and weight is not None else None
    db = _fixed_sum(dz, lead).to(bias.dtype) if output_mask[2] and bias is not None else None
    return (dx if output_mask[0] else None), dw, db, (dgate.to(gate.dtype) if want_dg else None)


def _rms_backward(dz, x, normalized_shape, weight, rstd, output_mask):
    # x_hat = x * r, g = dz * w:  dx = r * (g - x_hat * mean(g * x_hat)) = r * g - x * r^3 * mean(dz * x * w)
    # and dw = sum over rows of dz * x_hat = r @ (dz * x): one product P = dz * x feeds both
    # reductions (two matrix-vector products), then dx is three elementwise passes; the textbook
    # form above takes seven passes and two reductions.
    n = math.prod(normalized_shape)
    sd = stat_dtype(x)
    xf = x.reshape(-1, n).to(sd)
    dzf = dz.reshape(-1, n).to(sd)
    r = rstd.reshape(-1, 1).to(sd)
    w = None if weight is None else weight.reshape(n).to(sd)
    p = dzf * xf
    dx = dw = None
    if output_mask[0]:
        if is_batch_invariant():  # BLAS's gemv takes rows in blocks: a row's dot product depends on M
            s = _fixed_sum(p if w is None else p * w, (1,)).unsqueeze(1)
        else:
            s = p.sum(1, keepdim=True) if w is None else torch.mv(p, w).unsqueeze(1)
        c = r.pow(3).mul_(s).div_(-n)
        g = dzf * w if w is not None else dzf.clone()
        dx = g.mul_(r).addcmul_(xf, c).to(x.dtype).reshape(x.shape)
    if output_mask[1] and weight is not None:
        dw = _fixed_sum(p * r, (0,)) if is_batch_invariant() else torch.mv(p.t(), r.reshape(-1))
        dw = dw.reshape(weight.shape)
    return dx, dw


def row_norm_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, *, offset=0.0,
                 casting="fp32", gate=None, norm_before_gate=True, group_size=0):
    if _is_variant(x, weight, offset, casting, dy.dtype, gate, group_size):
        return _variant_bwd(dy, x, normalized_shape, weight, bias, mean, rstd, rms, activation, output_mask, offset,
                            casting, gate, norm_before_gate, group_size)
    output_mask = output_mask[:3]
    # fp16/bf16 with a bias and no weight: ATen's CPU backward then takes no fp32 statistics
    # ("expected scalar type Half but found Float": its mixed-type path keys on the weight)
    no_mixed_path = weight is None and bias is not None and x.dtype in (torch.float16, torch.bfloat16)
    if _in_fp32(x) or no_mixed_path:
        dx, dw, db, _ = row_norm_bwd(dy.float(), x.float(), normalized_shape, _f32(weight), _f32(bias), mean, rstd,
                                     rms, activation, output_mask)
        return None if dx is None else dx.to(x.dtype), _cast(dw, weight), _cast(db, bias), None
    k = len(normalized_shape)
    keep = x.shape[: x.dim() - k] + (1,) * k  # ATen keeps the normalized dims as 1s
    w, b = _opmath(x, weight, bias)
    dz = dy
    if activation != "none":
        z = _recompute_row(x, normalized_shape, w, b, mean, rstd, rms)
        dz = _activation_backward(dy, z, activation)
    if rms:
        dx, dw = _rms_backward(dz, x, normalized_shape, w, rstd, output_mask)
        db = _fixed_sum(dz.reshape(-1, b.numel()), (0,)) if b is not None and output_mask[2] else None
    else:
        nd = _native_stat_dtype(x, w, b)
        # the batch-invariant mode: ATen's dx, dW/dB as fixed-order sums (its own are per thread)
        invariant = is_batch_invariant() and any(output_mask[1:])
        dx, dw, db = aten.native_layer_norm_backward(
            dz, x, list(normalized_shape), _to(mean.reshape(keep), nd), _to(rstd.reshape(keep), nd),
            w, b, [output_mask[0], False, False] if invariant else list(output_mask))
        if invariant:
            sd = stat_dtype(x)
            dzf = dz.to(sd).reshape(-1, math.prod(normalized_shape))
            x_hat = _recompute_row(x.to(sd), normalized_shape, None, None, mean, rstd, False).reshape(dzf.shape)
            dw = _fixed_sum(dzf * x_hat, (0,)).reshape(w.shape) if output_mask[1] and w is not None else None
            db = _fixed_sum(dzf, (0,)).reshape(b.shape) if output_mask[2] and b is not None else None
    return dx, _cast(dw, weight), _cast(db, bias), None


def _recompute_row(x, normalized_shape, weight, bias, mean, rstd, rms):
    """z = x_hat * w + b from the saved statistics, in x's dtype (the activation's input)."""
    k = len(normalized_shape)
    keep = x.shape[: x.dim() - k] + (1,) * k
    sd = stat_dtype(x)
    z = x.to(sd)
    if not rms:
        z = z - mean.reshape(keep).to(sd)
    z = z * rstd.reshape(keep).to(sd)
    if weight is not None:
        z = z * weight.to(sd)
    if bias is not None:
        z = z + bias.to(sd)
    return z.to(x.dtype)


# --- norm + quantize (normops::row_norm_quant), for inference --------------------------------------

def quantize(y, k, dtype, scale=None, group_size=0):
    """(q, scales): y (a norm's output, as its dtype rounded it) over its last k dims quantized to
    ``dtype`` (``QUANT_MAX``'s keys), in fp32 arithmetic: q = y * (1 / scale) saturated at the
    dtype's finite max and rounded to nearest even. ``scale`` given: one for the tensor (static; below
    MIN_QUANT_SCALE it quantizes as MIN_QUANT_SCALE);
    else per row, or per ``group_size`` consecutive values of a row, max(amax |y| / max,
    MIN_QUANT_SCALE), shaped batch + (scales a row,)."""
    qmax = QUANT_MAX[dtype]
    rows = y.float().flatten(y.dim() - k)
    if scale is None:
        groups = rows.unflatten(-1, (-1, group_size or rows.shape[-1]))
        scales = (groups.abs().amax(-1) / qmax).clamp_min(MIN_QUANT_SCALE)
        v = (groups * (1.0 / scales)[..., None]).flatten(-2)
    else:
        scales = scale
        v = rows * (1.0 / scale.clamp_min(MIN_QUANT_SCALE))  # 1 / scale finite, as dynamic scales
    v = v.clamp(-qmax - (dtype == torch.int8), qmax)  # int8 saturates at -128 and 127; NaN stays NaN
    q = torch.round(v).nan_to_num(0.0).to(dtype) if dtype == torch.int8 else v.to(dtype)
    return q.reshape(y.shape), scales



# --- channels-first LayerNorm (ConvNeXt's): dim 1 of (N, C, *) ----------------------------------
# The row norm above on x.movedim(1, -1), the channels last: ATen's LayerNorm, fp32 statistics
# (Welford: a constant position gives x_hat = 0 exactly) and results bitwise torch's permute
# composition's. channels_last input (and S = 1) is then a dense (N, *S, C) view: read in place, no
# copy. NCHW input is copied channels-last by ATen on the way in (x, and dy and x in the backward),
# and y and dx are copied back to NCHW (normops.ops.channels_first: the output keeps x's layout).
# Those copies are still faster on the CPU than reducing over dim 1 in place: var_mean over the
# strided dim 1 and the elementwise passes ran 3x torch's composition (8x96x56x56 fp32, fwd+bwd);
# a per-sample loop (batch_norm of (C, S): not exact, its sums are sequential) or transposes chunked
# over N stayed within the noise of these copies. "No permute copies" is the Triton kernels' promise.

def layer_norm_cf_fwd(x, weight, bias, eps, activation, need_stats):
    y, _, mean, rstd = row_norm_fwd(x.movedim(1, -1), None, x.shape[1:2], weight, bias, eps, False, activation,
                                    need_stats)
    return y.movedim(-1, 1), mean, rstd


def layer_norm_cf_bwd(dy, x, weight, bias, mean, rstd, activation, output_mask):
    dx, dw, db, _ = row_norm_bwd(dy.movedim(1, -1), x.movedim(1, -1), x.shape[1:2], weight, bias, mean, rstd,
                                 False, activation, output_mask)
    return None if dx is None else dx.movedim(-1, 1), dw, db


# --- GroupNorm (and InstanceNorm, G == C) ----------------------------------------------------

def group_norm_fwd(x, num_groups, weight, bias, eps, activation, need_stats, instance=False, casting="fp32"):
    fmt = memory_format_of(x)
    if is_batch_invariant() and fmt != torch.contiguous_format:
        # the batch-invariant mode: ATen's channels_last kernels (and InstanceNorm's (1, N*C, S) view,
        # a view at N = 1, a copy above) give a sample bits that depend on the batch; its NCHW ones do
        # not (tests/test_batch_invariant.py): NCHW, y copied back
        y, mean, rstd = group_norm_fwd(x.contiguous(), num_groups, weight, bias, eps, activation, need_stats,
                                       instance, casting)
        return y.contiguous(memory_format=fmt), mean, rstd
    if casting == "torch":  # diffusers' AdaGroupNorm: group_norm's output, * w, + b, each rounded to x's dtype
        # a weight of ones in the statistics dtype: ATen's CPU kernel then keeps fp32 statistics
        ones = torch.ones(x.shape[1], dtype=stat_dtype(x), device=x.device)
        y, mean, rstd = group_norm_fwd(x, num_groups, ones, None, eps, "none", need_stats)
        for p, step in ((weight, y.mul_), (bias, y.add_)):
            if p is not None:  # [C] or [N, C]: broadcast over the positions
                step(p.to(x.dtype).reshape(p.shape + (1,) * (x.dim() - 2)))
        return _activate(y, activation), mean, rstd
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    if instance:
        y, mean, rstd = _instance_norm_fwd(x, weight, bias, eps, activation)
        return (y, mean, rstd) if need_stats else (y, None, None)
    x = x.contiguous(memory_format=memory_format_of(x))  # ATen's kernel wants a dense layout
    weight, bias = _opmath(x, weight, bias)
    if _in_fp32(x) or _per_sample(weight, bias):
        # statistics first, then y = x * scale + shift with scale, shift per (sample, channel), written
        # straight into y in x's dtype: no full-size temporary (an fp32 copy of a bf16 input is twice
        # its size; a > 2**31-element video tensor lands here, the kernels' fallback), one rounding
        mean, rstd, y = _group_stats(x, num_groups, eps)
        y = _recompute_group(x, num_groups, weight, bias, mean, rstd, out=y)
    else:
        y, mean, rstd = aten.native_group_norm(x, weight, bias, n, c, hw, num_groups, eps)
    y = _activate(y, activation)
    if not need_stats:
        return y, None, None
    sd = stat_dtype(x)
    return y, _to(mean, sd), _to(rstd, sd)


def _per_sample(weight, bias):
    """Whether the affine parameters are per (sample, channel), [N, C] (ada_group_norm's), not [C]."""
    return any(p is not None and p.dim() == 2 for p in (weight, bias))


# Elements of x converted to fp32 at once (64 MiB of fp32) where the whole would be a full-size
# temporary: bounded, and large enough that the per-chunk launches cost nothing next to the chunk's
# own memory traffic.
GN_CHUNK = 2**24


def _chunks(xg):
    """Index tuples into xg [N, G, C/G, *spatial] of pieces of at most GN_CHUNK elements: whole
    groups of one sample, or a group's channels when a group is larger (at least one channel)."""
    n, groups, cg = xg.shape[:3]
    plane = xg[0, 0, 0].numel()
    g_step = max(1, GN_CHUNK // (cg * plane))
    c_step = cg if g_step > 1 or cg * plane <= GN_CHUNK else max(1, GN_CHUNK // plane)
    for i in range(n):
        for g0 in range(0, groups, g_step):
            for c0 in range(0, cg, c_step):
                yield i, slice(g0, g0 + g_step), slice(c0, c0 + c_step)


def _group_stats(x, num_groups, eps):
    """(mean, rstd) [N, G] in the statistics dtype, and an uninitialized buffer like x for y.

    On the CPU, ATen's kernel (fp32 parameters make it return fp32 statistics for fp16/bf16: its
    mixed-type path). Elsewhere fp16/bf16 (``_in_fp32``): two passes over GN_CHUNK pieces (each
    converted to fp32 on its own: never an fp32 copy of x), the sums, then the squared deviations
    from the exact mean (never E[x^2] - E[x]^2)."""
    n, c = x.shape[0], x.shape[1]
    sd = stat_dtype(x)
    if not _in_fp32(x):
        ones = torch.ones(c, dtype=sd, device=x.device)
        y, mean, rstd = aten.native_group_norm(x, ones, None, n, c, math.prod(x.shape[2:]), num_groups, eps)
        return _to(mean, sd), _to(rstd, sd), y
    xg = x.unflatten(1, (num_groups, c // num_groups))  # a view in either layout
    count = x[0].numel() // num_groups
    total = torch.zeros((n, num_groups), dtype=sd, device=x.device)
    m2 = torch.zeros_like(total)
    dims = tuple(range(1, xg.dim() - 1))  # a piece [groups, channels, *spatial]: all but the groups
    for i, g, ch in _chunks(xg):
        total[i, g] += xg[i, g, ch].to(sd).sum(dims)
    mean = total / count
    for i, g, ch in _chunks(xg):
        d = xg[i, g, ch].to(sd) - mean[i, g].reshape((-1,) + (1,) * len(dims))
        m2[i, g] += d.square_().sum(dims)
    return mean, torch.rsqrt(m2 / count + eps), torch.empty_like(x)


def _affine_recompute(x, scale, shift):
    """z = x * scale + shift in one pass (scale, shift broadcast, in the statistics dtype), in x's
    dtype: the activation's input, rebuilt from x and the saved statistics."""
    return torch.addcmul(shift, x, scale).to(x.dtype)


def _recompute_group(x, num_groups, weight, bias, mean, rstd, out=None):
    """z = (x - mean) * rstd * w + b = x * scale + shift, scale and shift per (sample, channel);
    weight and bias [C] or [N, C] (per sample). Into ``out`` (x's dtype) when given."""
    n, c = x.shape[0], x.shape[1]
    sd = stat_dtype(x)
    per_channel = (n, num_groups, c // num_groups)
    scale = rstd.to(sd).unsqueeze(-1).expand(per_channel)
    shift = -mean.to(sd).unsqueeze(-1) * scale
    if weight is not None:
        scale = scale * weight.to(sd).reshape(-1, num_groups, c // num_groups)
        shift = shift * weight.to(sd).reshape(-1, num_groups, c // num_groups)
    if bias is not None:
        shift = shift + bias.to(sd).reshape(-1, num_groups, c // num_groups)
    view = (n, c) + (1,) * (x.dim() - 2)
    if out is not None:  # piece by piece: the CPU's addcmul into a bf16 out makes an fp32 temporary of it
        grouped = per_channel + (1,) * (x.dim() - 2)
        scale, shift = scale.reshape(grouped), shift.reshape(grouped)
        xg, yg = x.unflatten(1, per_channel[1:]), out.unflatten(1, per_channel[1:])
        for piece in _chunks(xg):
            torch.addcmul(shift[piece], xg[piece], scale[piece], out=yg[piece])
        return out
    return _affine_recompute(x, scale.reshape(view), shift.reshape(view))


def group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, activation, output_mask):
    n, c = x.shape[0], x.shape[1]
    hw = math.prod(x.shape[2:])
    per_sample = _per_sample(weight, bias)  # [N, C] parameters: _per_sample_bwd computes in fp32 itself
    # InstanceNorm runs batch norm's kernels, which take fp32 parameters
    if num_groups != c and _in_fp32(x) and not per_sample:
        dx, dw, db = group_norm_bwd(dy.float(), x.float(), num_groups, _f32(weight), _f32(bias), mean, rstd,
                                    activation, output_mask)
        return None if dx is None else dx.to(x.dtype), _cast(dw, weight), _cast(db, bias)
    # the batch-invariant mode: NCHW (the per-sample formulas below read it), dx copied back
    fmt = torch.contiguous_format if is_batch_invariant() else memory_format_of(x)
    if fmt != memory_format_of(x):
        dx, dw, db = group_norm_bwd(dy.contiguous(), x.contiguous(), num_groups, weight, bias, mean, rstd, activation,
                                    output_mask)
        return None if dx is None else dx.contiguous(memory_format=memory_format_of(x)), dw, db
    x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    w, b = _opmath(x, weight, bias)
    dz = dy
    if activation != "none":
        z = _recompute_group(x, num_groups, w, b, mean, rstd)
        dz = _activation_backward(dy, z, activation).contiguous(memory_format=fmt)  # into z
    if per_sample:
        return _per_sample_bwd(dz, x, num_groups, w, b, weight, bias, mean, rstd, output_mask)
    if is_batch_invariant():
        # ATen's backward sums a group's terms in an order that depends on the thread count and the
        # batch (dx too: bf16, tests/test_batch_invariant.py): the per-sample formulas (_fixed_sum)
        # with the [C] parameters broadcast, dW/dB their per-sample sums summed over N (_fixed_sum)
        ew, eb = (None if p is None else p.expand(n, c) for p in (w, b))
        dx, dw, db = _per_sample_bwd(dz, x, num_groups, ew, eb, ew, eb, mean, rstd, output_mask)
        return (dx, None if dw is None else _cast(_fixed_sum(dw, (0,)), weight),
                None if db is None else _cast(_fixed_sum(db, (0,)), bias))
    if num_groups == c:
        return _instance_norm_bwd(dz, x, weight, bias, mean, rstd, output_mask)
    nd = _native_stat_dtype(x, w, b)
    want_dw = output_mask[1] and w is not None
    want_db = output_mask[2] and b is not None
    mask = [output_mask[0], want_dw, want_db and w is not None]  # ATen computes dbias only with a weight
    # torch 2.13's CPU kernel for channels_last input crashes (SIGSEGV) when dx is not asked for: ask
    mask[0] = mask[0] or fmt != torch.contiguous_format
    dx, dw, db = aten.native_group_norm_backward(dz, x, _to(mean, nd), _to(rstd, nd), w, n, c, hw, num_groups, mask)
    dx = dx if output_mask[0] else None
    if want_db and w is None:
        db = dz.transpose(0, 1).reshape(c, -1).sum(1)
    return dx, _cast(dw if want_dw else None, weight), _cast(db if want_db else None, bias)


def _per_sample_bwd(dz, x, num_groups, w, b, weight, bias, mean, rstd, output_mask):
    """The backward with [N, C] parameters (kernels/group_norm.py's math, in the statistics dtype):
    a[n, c] = sum_s dz * x_hat and b[n, c] = sum_s dz are dw and db themselves (no sum over N), and
    dx = rstd * (w * dz - c2 - x_hat * c1). The fp32 temporaries are x-sized: this is the CPU path
    and the kernels' fallback, and dx (x - mean, not x) keeps no cancellation at a large offset."""
    n, c = x.shape[0], x.shape[1]
    sd = stat_dtype(x)
    view = (n, c) + (1,) * (x.dim() - 2)
    per = (n, num_groups, c // num_groups)
    r = rstd.to(sd).unsqueeze(-1).expand(per).reshape(view)
    xc = x.to(sd) - mean.to(sd).unsqueeze(-1).expand(per).reshape(view)
    dzf = dz.to(sd)
    a_sum = _fixed_sum((dzf * xc).reshape(n, c, -1), (2,)) * r.reshape(n, c)  # a[n, c]
    b_sum = _fixed_sum(dzf.reshape(n, c, -1), (2,))                            # b[n, c]
    dx = None
    if output_mask[0]:
        wv = torch.ones((), dtype=sd, device=x.device) if w is None else w.to(sd).reshape(n, c)
        count = x[0].numel() // num_groups
        c1 = _fixed_sum((wv * a_sum).reshape(per), (-1,)).unsqueeze(-1).expand(per).reshape(view) / count
        c2 = _fixed_sum((wv * b_sum).reshape(per), (-1,)).unsqueeze(-1).expand(per).reshape(view) / count
        dx = (r * (dzf * wv.reshape(view) if w is not None else dzf) - r * c2 - xc * (r * r * c1)).to(x.dtype)
    dw = _cast(a_sum, weight) if output_mask[1] and w is not None else None
    db = _cast(b_sum, bias) if output_mask[2] and b is not None else None
    return dx, dw, db


def _instance_view(x, *per_channel):
    """InstanceNorm (G == C) as torch.instance_norm computes it: batch norm over the (1, N*C, S)
    view, with the per-channel parameters repeated N times. ATen's group-norm kernels lose digits
    at large offsets (x = 1e4 + randn: rstd off by 3e-4 in fp32); its batch-norm ones do not."""
    n = x.shape[0]
    return [x.reshape(1, n * x.shape[1], -1)] + [None if p is None else p.repeat(n) for p in per_channel]


def _instance_norm_fwd(x, weight, bias, eps, activation):
    xv, wv, bv = _instance_view(x, weight, bias)
    y, mean, rstd, _ = batch_norm_fwd(xv, wv, bv, None, None, True, eps, activation)
    return y.reshape(x.shape), mean.reshape(x.shape[0], -1), rstd.reshape(x.shape[0], -1)


def _instance_norm_bwd(dz, x, weight, bias, mean, rstd, output_mask):
    n, c = x.shape[0], x.shape[1]
    xv, wv, bv = _instance_view(x, weight, bias)
    dx, dw, db = batch_norm_bwd(dz.reshape(xv.shape), xv, wv, bv, None, None, mean.reshape(-1),
                                rstd.reshape(-1), True, 0.0, "none", output_mask)
    return (None if dx is None else dx.reshape(x.shape), None if dw is None else dw.reshape(n, c).sum(0),
            None if db is None else db.reshape(n, c).sum(0))


# --- BatchNorm -------------------------------------------------------------------------------

def update_running_stats(running_mean, running_var, mean, var, momentum):
    """running = (1 - momentum) * running + momentum * batch, for the mean and the (unbiased) var,
    computed in fp64 and stored in the buffers' dtype, as torch's CPU kernel does."""
    for running, batch in ((running_mean, mean), (running_var, var)):
        running.copy_(running.double() * (1.0 - momentum) + batch.double() * momentum)


def batch_norm_fwd(x, weight, bias, running_mean, running_var, training, eps, activation):
    weight, bias, running_mean, running_var = _opmath(x, weight, bias, running_mean, running_var)
    if training:
        # The functional variant returns the new running statistics instead of writing them;
        # with zeros in and momentum 1 they are the batch mean and the unbiased batch variance.
        zeros = torch.zeros(x.shape[1], dtype=stat_dtype(x), device=x.device)
        y, save_mean, save_rstd, _, batch_var = aten._native_batch_norm_legit_functional(
            x, weight, bias, zeros, zeros.clone(), True, 1.0, eps)
        return _activate(y, activation), save_mean, save_rstd, batch_var
    y, _, _ = aten._native_batch_norm_legit_no_training(x, weight, bias, running_mean, running_var, 0.0, eps)
    return _activate(y, activation), None, None, None


def _recompute_batch(x, weight, bias, mean, rstd):
    sd = stat_dtype(x)
    scale = rstd.to(sd) if weight is None else rstd.to(sd) * weight.to(sd)
    shift = -mean.to(sd) * scale
    if bias is not None:
        shift = shift + bias.to(sd)
    return _affine_recompute(x, channel_view(scale, x), channel_view(shift, x))


def batch_norm_bwd(dy, x, weight, bias, running_mean, running_var, save_mean, save_rstd,
                   training, eps, activation, output_mask):
    w, b, running_mean, running_var = _opmath(x, weight, bias, running_mean, running_var)
    dz = dy
    if activation != "none":
        if training:
            mean, rstd = save_mean, save_rstd
        else:
            mean, rstd = running_mean, torch.rsqrt(running_var.to(stat_dtype(x)) + eps)
        dz = _activation_backward(dy, _recompute_batch(x, w, b, mean, rstd), activation)
    dx, dw, db = aten.native_batch_norm_backward(
        dz, x, w, running_mean, running_var, save_mean, save_rstd, training, eps, list(output_mask))
    return (dx if output_mask[0] else None,
            _cast(dw, weight) if output_mask[1] else None,
            _cast(db, bias) if output_mask[2] else None)


# --- adaLN modulation (normops::ada_norm): DiT's adaLN-Zero block step ------------------------------
# x [B, T, D]; gate, scale, shift [B, D]. h = residual + gate[b] * x (with a residual), y = norm(h) *
# (1 + scale[b]) + shift[b]. A composition of torch ops in the statistics dtype; the casting "torch"
# is diffusers' own composition, op for op, in h's dtype (bit for bit), "t5" the same with diffusers'
# RMSNorm (x_hat rounded to a half weight's dtype before the weight). The math and the rounding rule:
# normops/backends/numpy_backend/ada_norm.py.

def _ada_h(x, residual, gate, casting):
    """h (rounded to its dtype), or None without a residual."""
    if residual is None:
        return None
    hd = torch.promote_types(x.dtype, residual.dtype)
    if casting in ("torch", "t5"):  # diffusers: gate.unsqueeze(1) * x + residual, each op in h's dtype
        gx = x.to(hd) if gate is None else gate.to(hd).unsqueeze(1) * x.to(hd)
        return gx + residual.to(hd)
    sd = stat_dtype(x if hd == x.dtype else residual)
    gx = x.to(sd) if gate is None else gate.to(sd).unsqueeze(1) * x.to(sd)
    return (gx + residual.to(sd)).to(hd)


def _ada_stats(h, eps, rms):
    """(mean or None, rstd), [B, T], in the statistics dtype. LayerNorm's about each row's first h
    (kernels/row_norm.py's pivot): a constant row's mean is exact, so its x_hat is 0 exactly."""
    hs = h.to(stat_dtype(h))
    if rms:
        return None, torch.rsqrt(_row_mean(hs.square()).squeeze(-1) + eps)
    pivot = hs[..., :1]
    if is_batch_invariant():  # _row_mean's reason: two passes of _fixed_sum
        mean = _row_mean(hs - pivot)
        var = _row_mean((hs - pivot - mean).square_()).squeeze(-1)
        mean = mean.squeeze(-1)
    else:
        var, mean = torch.var_mean(hs - pivot, -1, correction=0)
    return mean + pivot.squeeze(-1), torch.rsqrt(var + eps)


def _ada_xhat_dtype(casting, dtype, weight):
    """The dtype x_hat is rounded to before the weight: "t5"'s (a half weight's, core.casting_dtypes), else None."""
    return casting_dtypes("t5", dtype, None if weight is None else weight.dtype)[0] if casting == "t5" else None


def _ada_n(h, weight, bias, mean, rstd, xhat_dtype=None):
    """(n = norm(h) * w + b, x_hat, x_hat as rounded to xhat_dtype before the weight) in the statistics dtype."""
    hs = h.to(stat_dtype(h))
    x_hat = (hs if mean is None else hs - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    x_r = _rounded(x_hat, xhat_dtype)
    n = x_r if weight is None else x_r * weight.to(hs.dtype)
    return (n if bias is None else n + bias.to(hs.dtype)), x_hat, x_r


def _ada_plain(inp, weight, bias, casting):
    """Whether the plain row norm (ATen's LayerNorm / RMSNorm, above) computes norm(h): in the
    statistics dtype every casting's rounding is a no-op, except "t5"'s of a half weight, and
    ATen's fused kernels then beat the composition below (three passes and their temporaries)."""
    return (inp.dtype == stat_dtype(inp) and _ada_xhat_dtype(casting, inp.dtype, weight) is None
            and all(t is None or t.dtype == inp.dtype for t in (weight, bias)))


def ada_norm_fwd(x, residual, gate, scale, shift, weight, bias, eps, rms, casting, need_stats):
    h = _ada_h(x, residual, gate, casting)
    inp = x if h is None else h
    if _ada_plain(inp, weight, bias, casting):
        n, _, mean, rstd = row_norm_fwd(inp, None, inp.shape[-1:], weight, bias, eps, rms, "none", need_stats)
        y = torch.addcmul(shift.to(inp.dtype).unsqueeze(1), n, 1 + scale.to(inp.dtype).unsqueeze(1))
        return y, h, mean, rstd
    mean, rstd = _ada_stats(inp, eps, rms)
    if casting in ("torch", "t5"):  # the norm in h's dtype as torch's (or diffusers' RMSNorm), then each op rounded
        D = inp.shape[-1]
        if casting == "torch" and (inp.device.type == "cpu" or all(t is None or t.dtype == inp.dtype
                                                                   for t in (weight, bias))):
            n = torch.rms_norm(inp, (D,), weight, eps) if rms else torch.layer_norm(inp, (D,), weight, bias, eps)
            n = n.to(inp.dtype)  # fp32 parameters may promote it
        else:
            n = _ada_n(inp, weight, bias, mean, rstd, _ada_xhat_dtype(casting, inp.dtype, weight))[0].to(inp.dtype)
        y = n * (1 + scale.to(inp.dtype).unsqueeze(1)) + shift.to(inp.dtype).unsqueeze(1)
    else:
        n = _ada_n(inp, weight, bias, mean, rstd)[0]
        y = (n * (1 + scale.to(n.dtype).unsqueeze(1)) + shift.to(n.dtype).unsqueeze(1)).to(inp.dtype)
    if not need_stats:
        return y, h, None, None
    return y, h, mean, rstd


def ada_norm_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, casting, output_mask, eps=None):
    """(dx, dresidual, dgate, dscale, dshift, dweight, dbias) in the statistics dtype, None where
    ``output_mask`` says no. h: the saved residual stream (None: x was normalized). A composition of
    differentiable torch ops: with ``eps`` given, the statistics are recomputed from h (the double
    backward differentiates it so, see normops.ops.ada_norm)."""
    inp = x if h is None else h
    sd = stat_dtype(inp)
    if eps is None and _ada_plain(inp, weight, bias, casting):
        return _ada_plain_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, output_mask)
    if eps is not None:
        mean, rstd = _ada_stats(inp, eps, rms)
    n, x_hat, x_r = _ada_n(inp, weight, bias, mean, rstd, _ada_xhat_dtype(casting, inp.dtype, weight))
    dyf = dy.to(sd)
    one_plus = 1 + scale.to(sd).unsqueeze(1)
    if casting in ("torch", "t5"):  # the factors as the forward rounded them (straight-through otherwise)
        n, one_plus = _rounded(n, inp.dtype), _rounded(one_plus, inp.dtype)
    dn = dyf * one_plus
    g = dn if weight is None else dn * weight.to(sd)
    gx = _row_mean(g * x_hat)
    if rms:
        dht = rstd.unsqueeze(-1) * (g - x_hat * gx)
    else:  # mean(g) about each row's first g (the kernels' g0): a constant g gives exactly 0
        gc = g - g[..., :1]
        dht = rstd.unsqueeze(-1) * (gc - _row_mean(gc) - x_hat * gx)
    if dh is not None:
        dht = dht + dh.to(sd)
    with_gate = gate is not None and h is not None
    grads = (dht * gate.to(sd).unsqueeze(1) if with_gate else dht,
             None if h is None else dht,
             _fixed_sum(dht * x.to(sd), (1,)) if with_gate else None,
             _fixed_sum(dyf * n, (1,)), _fixed_sum(dyf, (1,)),
             None if weight is None else _fixed_sum(dn * x_r, (0, 1)),
             None if bias is None else _fixed_sum(dn, (0, 1)))
    return tuple(g_ if want else None for g_, want in zip(grads, output_mask))


def _ada_plain_bwd(dy, dh, x, h, gate, scale, weight, bias, mean, rstd, rms, output_mask):
    """ada_norm_bwd where _ada_plain holds: the modulation's gradients around ATen's norm backward
    (dn = dy * (1 + scale) is the gradient reaching the norm's output)."""
    inp = x if h is None else h
    d = inp.shape[-1:]
    want_dh = any(output_mask[:3])
    dn = dy * (1 + scale.to(inp.dtype).unsqueeze(1))
    dscale = _fixed_sum(dy * _recompute_row(inp, d, weight, bias, mean, rstd, rms), (1,)) if output_mask[3] else None
    dshift = _fixed_sum(dy, (1,)) if output_mask[4] else None
    dht, dw, db, _ = row_norm_bwd(dn, inp, d, weight, bias, mean, rstd, rms, "none",
                                  [want_dh, output_mask[5], output_mask[6]])
    if dht is not None and dh is not None:
        dht = dht + dh
    with_gate = gate is not None and h is not None
    grads = (dht * gate.unsqueeze(1) if with_gate and output_mask[0] else dht,
             None if h is None else dht,
             _fixed_sum(dht * x, (1,)) if with_gate and output_mask[2] else None,
             dscale, dshift, dw, db)
    return tuple(g if want else None for g, want in zip(grads, output_mask))
