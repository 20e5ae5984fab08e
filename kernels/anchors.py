"""Kernels shaped as the published ones the roofline (kernels/roofline.py) is calibrated on.

Liger-Kernel's RMSNorm and LayerNorm forwards, as measured in ../shared/perf-anchors.md, are one
program per row holding the whole row (BLOCK_SIZE = the next power of two of the width) at the warps
of Liger's `calculate_settings`: 4, 8 from 2K, 16 from 8K, 32 from 32K, no register cap. These are
written here to that structure (same loads, stores, reductions and launch settings), not copied,
so that the model can be run on launches like the ones that produced the published times. They
are never run by normops.
"""
import torch
import triton
import triton.language as tl

from .common import Launch
from .config import next_pow2


@triton.jit
def _anchor_rms_norm_fwd_kernel(Y, X, W, RSTD, stride, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _anchor_layer_norm_fwd_kernel(Y, X, W, B, MEAN, RSTD, stride, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * stride + cols, (d * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


def liger_warps(n):
    """Liger's calculate_settings: warps by block size."""
    block = next_pow2(n)
    return 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4


def liger_launch(norm, x, weight, bias=None):
    """The Launch of a Liger-shaped forward over x [rows, n] (meta tensors do)."""
    m, n = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block = dict(BLOCK_SIZE=next_pow2(n))
    if norm == "rms_norm":
        return Launch(_anchor_rms_norm_fwd_kernel, (m,), (y, x, weight, rstd, n, n, 1e-6), block, liger_warps(n))
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    return Launch(_anchor_layer_norm_fwd_kernel, (m,), (y, x, weight, bias, mean, rstd, n, n, 1e-5), block,
                  liger_warps(n))


# Compiled as Liger launches them: without normops' register cap (common.launch_options).
KERNELS = (_anchor_rms_norm_fwd_kernel, _anchor_layer_norm_fwd_kernel)
