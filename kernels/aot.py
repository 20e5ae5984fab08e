"""Compile every kernel at every configuration the launch heuristics can pick, for sm_80 and
sm_90, without a GPU, and report registers, shared memory and spills (LOCAL) per kernel.

    python -m normops.kernels.aot [--targets 80,90] [--jobs N]
                                  [--families row_norm,group_norm,batch_norm,channels_first] [--exhaustive]

Row norms: the configurations picked over the benchmark widths (they cover every one the heuristic
has). GroupNorm: the ones picked for the benchmark shapes and a set of extremes (no spatial dims,
1024 channels a group, a 1M-pixel instance plane...), in both layouts, and each of them again with
the LARGE flag (a sample of 2**31 elements or more), fp32 and gelu/w32; --exhaustive takes every
configuration the heuristic picks over a grid of every power-of-two channels-per-group (1..1024),
positions (1..4M) and group count (1..64), both layouts, batch 1 and 64 (about 1,500 a target).
BatchNorm: the ones picked for the ResNet-50 benchmark shapes and a set of extremes, both layouts,
training and eval; --exhaustive takes a grid of batch sizes (1..4096), channels (1..2048) and
positions (1..1M) instead.

The resources are read from each cubin with ``cuobjdump --dump-resource-usage``, which ships in
the triton wheel. Exit status 1 on a compile error or any spill: LOCAL > 0, or STACK > 0 (ptxas
puts spilled registers in the stack frame, which LOCAL does not always count).
"""
import os

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when the tests' interpreter is on

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import ada_norm, batch_norm, channels_first, group_norm, row_norm  # noqa: E402
from .common import launch_options, record  # noqa: E402
from .config import (AdaNormConfig, BatchNormConfig, GroupNormConfig, ParamGradsConfig, RowNormConfig,  # noqa: E402
                     invariant_programs, programs_per_sm, row_norm_bwd_programs)
from .config import ChannelsFirstConfig  # noqa: E402

# The widths the benchmarks run (transformer rows, narrow to 256K); the heuristics map them to
# the distinct configurations compiled here.
WIDTHS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144]
DTYPES = ("bf16", "fp16", "fp32")
# Flag sets: (name, IS_RMS, HAS_W, HAS_B, HAS_R, ACT); the heaviest ones in registers are the
# residual + gelu forward and the gelu backward.
VARIANTS = [("layer_norm", False, True, True, False, "none"), ("rms_norm", True, True, False, False, "none"),
            ("add_layer_norm+gelu", False, True, True, True, "gelu")]
# The language models' variants (normops.functional.rms_norm/gated_rms_norm's arguments), in bf16,
# the dtype they run in: each flag once, the gated ones with the llama roundings (the most code),
# the gate-first one grouped (Mamba2).
LLM_VARIANTS = {
    "rms_norm+gemma": dict(offset=1.0),
    "rms_norm+llama": dict(casting="llama"),
    "add_rms_norm+fp32_residual": dict(residual=torch.float32, out_dtype=torch.bfloat16),
    "gated_rms_norm": dict(gate=True, casting="llama"),
    "gated_rms_norm/first": dict(gate=True, norm_before_gate=False, casting="llama", group_size=32),
}
VARIANTS += [(name, True, True, False, "residual" in kw, "none") for name, kw in LLM_VARIANTS.items()]
# Norm + quantize (row_norm_quant_fwd, the one-pass forward with QUANT), in bf16, the serving dtype:
# dynamic per row and per 128-value group, int8, and a static scale after a residual add. float8
# compiles to the hardware's conversion on sm_90 and to the integer-op codes on sm_80 (as launched).
QUANT_VARIANTS = {
    "rms_quant/fp8": dict(rms=True, dtype=torch.float8_e4m3fn),
    "rms_quant/fp8/g128": dict(rms=True, dtype=torch.float8_e4m3fn, group_size=128),
    "rms_quant/int8": dict(rms=True, dtype=torch.int8),
    "add_ln_quant/fp8/static": dict(rms=False, residual=True, dtype=torch.float8_e4m3fn, static=True),
}
# Weights in fp32 under bf16/fp16 activations (the usual mixed-precision layout) cost registers.
FP32_WEIGHT = "layer_norm/w32"
H100_SMS = 132  # the row norms' backward grid, which sizes their glue kernel, on an H100


# GroupNorm (N, C, S = prod(spatial), G): the benchmark shapes (U-Net, VAE, video, instance norm
# in style transfer), then extremes: no spatial dims, one group of 1024 channels at 7x7 (the
# widest group a tile takes), a 1M-pixel instance plane, odd sizes, a ResNet-like batch.
GN_SHAPES = [(2, 320, 4096, 32), (2, 1280, 256, 32), (1, 512, 16384, 32), (1, 128, 8 * 65536, 32),
             (1, 64, 65536, 64), (4, 128, 16384, 128), (4, 256, 4096, 256),
             (8, 64, 1, 32), (2, 1024, 49, 1), (32, 1024, 1, 1), (4, 3, 1 << 20, 3), (2, 96, 7, 3),
             (64, 256, 3136, 32), (64, 32, 1024, 32)]
GN_PROGRAMS = 2 * 132  # programs_per_wave on an H100 (132 SMs) at 8 warps
GN_SMS = 132  # programs_per_wave at GroupNormConfig's 16 warps: an H100's SMs
# (name, HAS_W, HAS_B, ACT); gelu is the heaviest activation in registers (erf and exp).
GN_VARIANTS = [("group_norm", True, True, "none"), ("group_norm+gelu", True, True, "gelu")]


# BatchNorm (N, C, S): ResNet-50 at batch 256 and 32, every stage (112x112 to 7x7), BatchNorm1d
# on (N, C) features, a 3-D U-Net volume, and extremes: 2 values a channel, one channel, a
# 1M-position sample, 4096 rows of 3 channels.
BN_SHAPES = [(256, 64, 12544), (256, 256, 3136), (256, 128, 3136), (256, 512, 784), (256, 1024, 196),
             (256, 2048, 49), (32, 64, 12544), (32, 256, 3136), (32, 2048, 49), (1024, 512, 1), (32, 4096, 1),
             (8, 3, 1), (2, 1, 1), (2, 64, 9), (8, 32, 16384), (1, 64, 1 << 20), (4096, 3, 1), (3, 5, 7)]
BN_SMS = 132  # an H100's SMs: programs_per_wave(device, 16), the `sms` of BatchNormConfig
# (name, HAS_W, HAS_B, ACT); ReLU is the common fusion, gelu the heaviest in registers.
BN_VARIANTS = [("batch_norm", True, True, "none"), ("batch_norm+gelu", True, True, "gelu")]


# Channels-first LayerNorm (C, S = positions a sample): ConvNeXt's stages (T/S/B/L/XL: 96..2048
# channels, 56x56..7x7), its stem, and extremes: one channel, a wide C with one position.
CF_SHAPES = [(96, 3136), (192, 784), (384, 196), (768, 49), (128, 3136), (1536, 49), (2048, 49), (3, 50176),
             (1, 16), (4096, 1), (8192, 1)]
# (name, HAS_W, HAS_B, ACT)
CF_VARIANTS = [("layer_norm_cf", True, True, "none"), ("layer_norm_cf+gelu", True, True, "gelu")]


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    variant: str
    dtype: str
    config: object  # RowNormConfig, or (GroupNormConfig, channels_last)
    target: int


# The argument types the JIT gives a launch: a tensor is a pointer to its dtype, a Python float
# fp32, an int i32 (i64 from 2**31 on).
POINTERS = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
            torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8", torch.int8: "*i8"}
# The row norms' row strides compile as i64, as a launch on a tensor of 2**31 elements or more
# passes them: the worst case in registers.
WIDE = ("sx_o", "sx_i", "sr_o", "sr_i", "sdy_o", "sdy_i")
DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _type(name, value):
    if isinstance(value, torch.Tensor):
        return POINTERS[value.dtype]
    if isinstance(value, float):
        return "fp32"
    return "i64" if name in WIDE or not -2**31 <= value < 2**31 else "i32"


def _source(job):
    """ASTSource of the kernel `job` names, as its launcher launches it: the launcher runs on meta
    tensors under record(), and its recorded launch gives the kernel, the argument types and the
    constexprs. Its integer values are placeholders, so the specialization is the one the JIT gives
    typical launches: every pointer, width and stride divisible by 16 (16-byte aligned tensors,
    power-of-two widths), which is what lets loads vectorize and changes the register count, but
    the integers `unaligned` names (they usually are not); and the integers `ones` names as the
    constant 1 (the JIT specializes an integer argument equal to 1). (ASTSource, num_warps)."""
    family = _gn_launches if job.kernel.startswith("gn_") else _bn_launches if job.kernel.startswith("bn_") \
        else _ada_launches if job.kernel.startswith("ada_") else _cf_launches if job.kernel.startswith("cf_") \
        else _row_norm_launches
    with record() as launches:
        unaligned, ones = family(job)
    pattern = re.compile(f"_{job.kernel.removeprefix('gn_').removeprefix('bn_')}(_looped)?_kernel$")
    (fn, _, args, constexprs, num_warps), = [r for r in launches if pattern.search(r.kernel.fn.__name__)]
    names = [name for name in fn.arg_names if name not in constexprs]
    assert len(names) == len(args), (fn.fn.__name__, names, len(args))
    consts = {**constexprs, **{name: 1 for name in ones if name in fn.arg_names}}
    values = dict(zip(names, args))
    sig = {name: "constexpr" if name in consts else _type(name, values[name]) for name in fn.arg_names}
    aligned = [name for name in fn.arg_names if name not in consts and name not in unaligned]
    return ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                     attrs={(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}), num_warps


def _meta(shape, dtype, **kwargs):
    return torch.empty(shape, dtype=dtype, device="meta", **kwargs)


def _params(job, c):
    """The dtype of x, and the weight and bias (fp32 in a "/w32" variant) of a job's variant."""
    dtype = DTYPE[job.dtype]
    wdtype = torch.float32 if job.variant.endswith("/w32") else dtype
    return dtype, _meta(c, wdtype), _meta(c, wdtype)


def _quant_launches(job):
    kw = dict(QUANT_VARIANTS[job.variant])
    rms, residual, static = kw.pop("rms"), kw.pop("residual", False), kw.pop("static", False)
    x = _meta((4, 64), torch.bfloat16)
    w = _meta(64, torch.bfloat16)
    row_norm.row_norm_quant_fwd(x, x if residual else None, (64,), w, None if rms else w, 1e-5, rms, "none",
                                scale=_meta((), torch.float32) if static else None, fp8_hw=job.target >= 89,
                                config=job.config, **kw)
    return ("M", "inner", "eps", "n_scales"), ()


def _row_norm_launches(job):
    if job.variant in QUANT_VARIANTS:
        return _quant_launches(job)
    base = "layer_norm" if job.variant == FP32_WEIGHT else job.variant
    _, rms, has_w, has_b, has_r, act = next(v for v in VARIANTS if v[0] == base)
    kw = dict(LLM_VARIANTS.get(base, {}))
    dtype, w, b = _params(job, 64)
    w, b = (w if has_w else None), (b if has_b else None)
    x = _meta((4, 64), dtype)
    residual = _meta((4, 64), kw.pop("residual", dtype)) if has_r else None
    gate = x if kw.pop("gate", False) else None
    inp = x if residual is None else _meta((4, 64), torch.promote_types(dtype, residual.dtype))
    if job.kernel == "fwd":
        row_norm.row_norm_fwd(x, residual, (64,), w, b, 1e-5, rms, act, True, gate=gate, config=job.config, **kw)
    else:  # the glue kernel's job carries its own configuration
        cfg, grads = (RowNormConfig.backward(64), job.config) if job.kernel == "param_grads" else (job.config, None)
        rstd = _meta(4, torch.float32)
        kw.pop("out_dtype", None)
        # with a residual, as normops.ops runs it: dh added, dx for x and (another dtype) the residual
        streams = dict(dh=inp, dx_dtype=dtype, dresidual_dtype=inp.dtype) if has_r else {}
        row_norm.row_norm_bwd(x, inp, (64,), w, b, None if rms else rstd, rstd, rms, act,
                              (True, has_w, has_b, gate is not None), gate=gate, config=cfg, grads_config=grads, **kw,
                              **streams)
    return ("M", "inner", "eps"), ()


def _gn_launches(job):
    cfg, channels_last, large = job.config
    # placeholders: split (1, looped; 2, split) and chunk are runtime arguments
    cfg = dataclasses.replace(cfg, chunk=16)
    _, has_w, has_b, act = next(v for v in GN_VARIANTS if v[0] == job.variant.split("/")[0])
    instance = cfg.block_cg == 1
    dtype, w, b = _params(job, 2 if instance else 4)
    x = _meta((2, w.shape[0], 4, 4), dtype,
              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w, b = (w if has_w else None), (b if has_b else None)
    threshold = group_norm.LARGE_OFFSETS
    group_norm.LARGE_OFFSETS = 0 if large else threshold  # the placeholder sample takes LARGE when asked
    try:
        if job.kernel in ("gn_stats", "gn_fwd"):
            group_norm.group_norm_fwd(x, 2, w, b, 1e-5, act, True, instance=instance, config=cfg)
        else:
            stats = _meta((2, 2), torch.float32)
            group_norm.group_norm_bwd(x, x, 2, w, b, stats, stats, act, (True, True, True), config=cfg)
    finally:
        group_norm.LARGE_OFFSETS = threshold
    # InstanceNorm's Cg is 1
    return ("G", "Cg", "n_gblocks", "split", "n_tasks", "eps", "N", "K"), ("Cg",) if instance else ()


def _bn_launches(job):
    cfg, training, s_aligned = job.config
    cfg = dataclasses.replace(cfg, split=1)  # a placeholder: split is a runtime argument
    _, has_w, has_b, act = next(v for v in BN_VARIANTS if v[0] == job.variant.split("/")[0])
    dtype, w, b = _params(job, 8)
    w, b = (w if has_w else None), (b if has_b else None)
    x = _meta((4, 8) if cfg.block_s == 1 else (4, 8, 16), dtype)  # the (N * S, C, 1) view, or (N, C, S)
    stats = _meta(8, torch.float32)
    if job.kernel in ("bn_stats", "bn_finalize", "bn_fwd"):  # training: with the running statistics' update
        batch_norm.batch_norm_fwd(x, w, b, stats, stats, training, 1e-5, act, config=cfg,
                                  momentum=0.1 if training else None)
    else:
        batch_norm.batch_norm_bwd(x, x, w, b, stats, stats, stats, stats, training, 1e-5, act, (True, True, True),
                                  config=cfg)
    unaligned = ("s_tiles", "n_tiles", "c_blocks", "chunk", "split", "total", "eps") + \
        (() if s_aligned else ("C", "N") if cfg.block_s == 1 else ("S",))
    # the (N * S, C, 1) view: S and its tile count are 1
    return unaligned, ("S", "s_tiles") if cfg.block_s == 1 else ()


def _cf_launches(job):
    cfg, channels_last = job.config
    _, has_w, has_b, act = next(v for v in CF_VARIANTS if v[0] == job.variant.split("/")[0])
    dtype, w, b = _params(job, 32)
    w, b = (w if has_w else None), (b if has_b else None)
    x = _meta((2, 32, 4, 4), dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    stats = _meta((2, 4, 4), torch.float32)
    if job.kernel == "cf_fwd":
        channels_first.layer_norm_cf_fwd(x, w, b, 1e-6, act, True, config=cfg)
    else:
        channels_first.layer_norm_cf_bwd(x, x, w, b, stats, stats, act, (True, has_w, has_b), config=cfg)
    # C and S are any (7x7 positions, C = 3 at the stem); the unit stride is specialized to 1
    ones = ("sx_c", "sdy_c") if channels_last else ("sx_s", "sdy_s")
    return ("C", "S", "s_blocks", "tiles", "sx_n", "sdy_n", "sx_c", "sdy_c", "sx_s", "sdy_s", "eps"), ones


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """(job, {"REG": .., "SHARED": .., "LOCAL": ..}, error or None)."""
    try:
        source, num_warps = _source(job)
        compiled = triton.compile(source, target=GPUTarget("cuda", job.target, 32), options=launch_options(num_warps))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, check=True).stdout
        finally:
            os.unlink(f.name)
        usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[1])}
        return job, {"WARPS": num_warps, **usage}, None
    except Exception as e:  # report every failure, keep compiling the rest
        return job, {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _describe(job):
    """The launch configuration in one column."""
    if job.kernel in ("bn_finalize", "bn_bwd_finalize"):
        c = job.config[0]
        return f"combine {c.finalize_split} chunks x {c.finalize_c} channels"
    if job.kernel.startswith("bn_"):
        c, training, s_aligned = job.config
        unaligned = "" if s_aligned else " C%16" if c.block_s == 1 else " S%16"
        return (f"{'train' if training else 'eval '} tile={c.block_n}x{c.block_c}x{c.block_s}{unaligned} "
                f"{'one_pass' if c.one_pass else 'looped'}")
    if job.kernel == "ada_norm_param_grads":
        c = job.config
        pg = _ada_glue_config(c.block_n)
        return f"sum [B, P, K, {c.block_n}]: {pg.block_g}x{pg.block_n} tiles"
    if job.kernel.startswith("ada_"):
        c = job.config
        return f"rows={c.block_m} block_n={c.block_n}"
    if job.kernel.startswith("cf_"):
        c, channels_last = job.config
        return (f"{'NHWC' if channels_last else 'NCHW'} tile={c.block_c}x{c.block_s} ({c.c_lane}x{c.s_in} a "
                f"warp's) {'one_pass' if c.one_pass else 'looped'}")
    if job.kernel.startswith("gn_"):
        c, channels_last, large = job.config
        if job.kernel == "gn_param_grads":
            return "sum [N, 2, C, K] partials"
        split = f" split_block={c.split_block}" if job.kernel in ("gn_fwd", "gn_bwd") and c.split > 1 else ""
        return (f"{'NHWC' if channels_last else 'NCHW'} tile={c.block_g}x{c.block_cg}x{c.block_s} "
                f"{'one_pass' if c.one_pass else 'looped' if c.split == 1 else 'split'}{split}{' LARGE' if large else ''}")
    c = job.config
    if job.kernel == "param_grads":
        return f"programs={c.block_g} block_n={c.block_n}"
    return f"rows={c.block_m} block_n={c.block_n} {'one_pass' if c.one_pass else 'looped'}"


def channels_first_jobs(targets):
    """Every (kernel, configuration) the heuristic picks over CF_SHAPES, both layouts, per element
    size (the tile's vectors and per-thread budget depend on it)."""
    # fp16 compiles as bf16 does; gelu (erf and exp) is the heaviest in registers
    variants = [("layer_norm_cf", "fp32"), ("layer_norm_cf+gelu", "bf16"), ("layer_norm_cf+gelu/w32", "bf16")]
    jobs = set()
    for (c, s), channels_last, (variant, dtype) in itertools.product(CF_SHAPES, (False, True), variants):
        # the layout the launchers see (channels_last when C has stride 1 and C > 1): S = 1 is
        # channels_last in either memory format, C = 1 is NCHW; one compile each, not two
        channels_last = (channels_last or s == 1) and c > 1
        elem = 4 if dtype == "fp32" else 2
        jobs.add(("cf_fwd", ChannelsFirstConfig.forward(c, s, channels_last, elem), channels_last, variant, dtype))
        jobs.add(("cf_bwd", ChannelsFirstConfig.backward(c, s, channels_last, elem), channels_last, variant, dtype))
    return [Job(kernel, variant, dtype, (cfg, cl), target) for target in targets
            for kernel, cfg, cl, variant, dtype in sorted(jobs, key=str)]


def row_norm_jobs(targets):
    """Every (kernel, config) the heuristics pick over WIDTHS, for each variant and dtype (the
    backward's one-pass limit depends on the element size), and the glue kernel's configurations
    for 4096 rows of those widths on an H100."""
    variants = [(v[0], d) for v in VARIANTS if v[0] not in LLM_VARIANTS for d in DTYPES] + \
        [(FP32_WEIGHT, "bf16")] + [(name, "bf16") for name in LLM_VARIANTS]
    jobs = set()
    for (variant, dtype), n in itertools.product(variants, WIDTHS):
        elem = 4 if dtype == "fp32" or "fp32_residual" in variant else 2  # the backward's x: h, in fp32 there
        bwd = RowNormConfig.backward(n, elem, LLM_VARIANTS.get(variant, {}).get("gate", False))
        base = "layer_norm" if variant == FP32_WEIGHT else variant
        n_part = 1 + next(v for v in VARIANTS if v[0] == base)[3]  # dw, and db when there is a bias
        programs = row_norm_bwd_programs(bwd, n, elem, n_part, H100_SMS * programs_per_sm(bwd.num_warps))
        blocks = -(-4096 // bwd.block_m)
        grads = ParamGradsConfig.make(n, min(programs, blocks))
        # the batch-invariant mode's glue: its programs from the rows (config.invariant_programs)
        invariant = ParamGradsConfig.make(n, min(blocks, row_norm_bwd_programs(
            bwd, n, elem, n_part, invariant_programs(blocks, bwd.block_m))))
        jobs.update([("fwd", RowNormConfig.forward(n), variant, dtype), ("bwd", bwd, variant, dtype),
                     ("param_grads", grads, variant, dtype), ("param_grads", invariant, variant, dtype)])
    variants += [(name, "bf16") for name in QUANT_VARIANTS]
    jobs.update(("fwd", RowNormConfig.forward(n), name, "bf16") for name, n in itertools.product(QUANT_VARIANTS, WIDTHS)
                if RowNormConfig.forward(n).one_pass)
    order = {"fwd": 0, "bwd": 1, "param_grads": 2}
    key = lambda j: (order[j[0]], not getattr(j[1], "one_pass", True), j[1].block_n, str(j[1]),  # noqa: E731
                     variants.index((j[2], j[3])))
    return [Job(kernel, variant, dtype, cfg, target) for target in targets
            for kernel, cfg, variant, dtype in sorted(jobs, key=key)]


def _gn_grid():
    """Every (N, C, S, G) of the exhaustive sweep: powers of two of channels a group, positions and
    groups, batch 1 (split) and 64 (one program per group block)."""
    for cg, s, g, n in itertools.product([1 << i for i in range(11)], [1 << i for i in range(23)],
                                         [1 << i for i in range(7)], (1, 64)):
        yield n, cg * g, s, g


def group_norm_jobs(targets, exhaustive=False):
    """Every (kernel, configuration) the heuristic picks over the shapes, for each variant and dtype
    (the looped/split choice and the forward's unroll depend on the element size)."""
    shapes = list(_gn_grid()) if exhaustive else GN_SHAPES
    if exhaustive:  # the heaviest variant only, bf16 activations with fp32 parameters
        variants = [("group_norm+gelu/w32", "bf16")]
    else:
        # fp16 compiles as bf16 does (same width); gelu in fp32 is covered by its w32 mixed case
        variants = [("group_norm", "bf16"), ("group_norm", "fp32"), ("group_norm+gelu", "bf16"),
                    ("group_norm+gelu/w32", "bf16")]
    elems = sorted({DTYPE[dtype].itemsize for _, dtype in variants})
    configs = {"gn_fwd": set(), "gn_bwd": set()}
    for (n, c, s, g), channels_last, elem in itertools.product(shapes, (False, True), elems):
        if channels_last and s == 1:
            continue  # no positions: channels_last is plain contiguous, and runs as NCHW
        # and the batch-invariant mode's plans (looped with the widest tile where today's would split)
        for invariant in (False, True):
            fwd = GroupNormConfig.forward(n, c, s, g, channels_last, GN_SMS, elem, invariant=invariant)
            bwd = GroupNormConfig.backward(n, c, s, g, channels_last, GN_SMS, elem, invariant=invariant)
            # chunk, split and the grid are runtime: one compile serves every split > 1 (split_block
            # and whether split is 1, the looped kernels, are not)
            for kernel, cfg in (("gn_fwd", fwd), ("gn_bwd", bwd)):
                configs[kernel].add((dataclasses.replace(cfg, split=min(cfg.split, 2), chunk=0, programs=0),
                                     channels_last, False, elem))
    split = lambda c: not c.one_pass and c.split > 1  # noqa: E731
    configs["gn_stats"] = {(dataclasses.replace(c, split_block=1), cl, lg, e) for c, cl, lg, e in configs["gn_fwd"]
                           if split(c)}
    configs["gn_bwd_sums"] = {(dataclasses.replace(c, split_block=1), cl, lg, e)
                              for c, cl, lg, e in configs["gn_bwd"] if split(c)}
    # the dw/db glue kernel compiles the same whatever the tile: one placeholder configuration a dtype
    configs["gn_param_grads"] = {min((k for k in configs["gn_bwd"] if k[3] == e), key=str) for e in elems}
    order = lambda k: (not k[0].one_pass, k[0].split, k[1], k[0].block_g * k[0].block_cg * k[0].block_s,  # noqa: E731
                       str(k))
    jobs = [Job(kernel, variant, dtype, cfg[:3], target) for target in targets for kernel in
            ("gn_stats", "gn_fwd", "gn_bwd_sums", "gn_bwd", "gn_param_grads")
            for cfg in sorted(configs[kernel], key=order)
            for variant, dtype in (variants[:2] if kernel in ("gn_stats", "gn_param_grads") else variants)
            if DTYPE[dtype].itemsize == cfg[3]]
    # The same configurations with the LARGE flag (a sample of 2**31 elements or more: int64 row
    # starts, kernels/group_norm.py's _tile), for the two variants that spilled first when it cast
    # every offset: fp32 (the widest Welford state) and gelu over fp32 parameters.
    # (GroupNormConfig gives such a sample no looped kernels: those are left out.)
    large = [("group_norm", "fp32"), ("group_norm+gelu/w32", "bf16")]
    looped = lambda c: not c[0].one_pass and c[0].split == 1  # noqa: E731
    jobs += [Job(kernel, variant, dtype, (*cfg[:2], True), target) for target in targets
             for kernel in ("gn_stats", "gn_fwd", "gn_bwd_sums", "gn_bwd") for cfg in sorted(configs[kernel], key=order)
             if not looped(cfg) for variant, dtype in (large[:1] if kernel == "gn_stats" else large)
             if DTYPE[dtype].itemsize == cfg[3]]
    return jobs


def _bn_grid():
    """The (N, C, S) of the --exhaustive sweep: batch sizes, channel counts and positions (ResNet's
    7x7 to 112x112 planes among them), wherever N * C * S stays under 2**31."""
    for n, c, s in itertools.product((1, 2, 8, 32, 256, 4096), (1, 3, 64, 256, 2048),
                                     (1, 2, 7, 49, 196, 784, 3136, 12544, 65536, 1 << 20)):
        if n * s >= 2 and n * c * s < 2**31:
            yield n, c, s


def batch_norm_jobs(targets, exhaustive=False):
    """Every (kernel, configuration) the heuristic picks over the shapes, for each variant and dtype
    (the loop tiles depend on the element size)."""
    if exhaustive:
        variants = [("batch_norm+gelu/w32", "bf16")]
    else:
        variants = [("batch_norm", "bf16"), ("batch_norm", "fp32"), ("batch_norm+gelu", "bf16"),
                    ("batch_norm+gelu/w32", "bf16")]
    kernels = ("bn_stats", "bn_finalize", "bn_fwd", "bn_bwd_sums", "bn_bwd_finalize", "bn_bwd")
    configs = {k: set() for k in kernels}
    bare = dict(split=0, chunk=0, finalize_split=1, finalize_c=1)  # runtime arguments, or other kernels'
    for (n, c, s), channels_last, training in itertools.product(list(_bn_grid()) if exhaustive else BN_SHAPES,
                                                                (False, True), (True, False)):
        if channels_last and s == 1:
            continue  # no positions: channels_last is plain contiguous
        view = (n * s, c, 1) if channels_last or s == 1 else (n, c, s)
        # the JIT marks an integer argument divisible by 16 when it is: S, and C in the (N * S, C, 1) view
        aligned = view[2] % 16 == 0 if view[2] > 1 else view[1] % 16 == 0
        for variant, dtype in variants:
            elem = DTYPE[dtype].itemsize
            fwd = BatchNormConfig.forward(*view, training, BN_SMS, elem)
            bwd = BatchNormConfig.backward(*view, training, BN_SMS, elem)
            configs["bn_fwd"].add((dataclasses.replace(fwd, **bare), training, aligned, variant, dtype))
            configs["bn_bwd"].add((dataclasses.replace(bwd, **bare), training, aligned, variant, dtype))
            if not bwd.one_pass:
                configs["bn_bwd_sums"].add((dataclasses.replace(bwd, **bare), training, aligned, variant, dtype))
                configs["bn_bwd_finalize"].add((BatchNormConfig(1, 1, 1, 4, False, 0, 0, bwd.finalize_split,
                                                                bwd.finalize_c), True, True, *variants[0]))
            if training and not fwd.one_pass and (variant, dtype) in variants[:2]:  # no activation in them
                configs["bn_stats"].add((dataclasses.replace(fwd, **bare), True, aligned, variant, dtype))
                configs["bn_finalize"].add((BatchNormConfig(1, 1, 1, 4, False, 0, 0, fwd.finalize_split,
                                                            fwd.finalize_c), True, True, variant, dtype))
    order = lambda k: (not k[0].one_pass, not k[1], k[0].block_n * k[0].block_c * k[0].block_s, str(k))  # noqa: E731
    return [Job(kernel, variant, dtype, (cfg, training, aligned), target) for target in targets for kernel in kernels
            for cfg, training, aligned, variant, dtype in sorted(configs[kernel], key=order)]


# --- adaLN modulation (kernels/ada_norm.py) ------------------------------------------------------
# The diffusion transformers' widths (DiT-XL 1152, SD3 1536, Flux 3072) and the one-pass limits; the
# heaviest flag sets in registers: LayerNorm with weight, bias, residual and gate, the "torch"
# casting (its roundings), and RMSNorm alone. (name, IS_RMS, weight/bias, residual+gate, casting)
ADA_WIDTHS = [64, 1152, 1536, 3072, 4096, 8192]
ADA_VARIANTS = [("ada_layer_norm+residual+gate", False, True, True, "torch"),
                ("ada_layer_norm", False, False, False, "fp32"), ("ada_rms_norm+residual+gate", True, True, True, "fp32"),
                ("ada_layer_norm+affine", False, True, False, "torch"), ("ada_rms_norm+weight", True, True, False, "t5")]


def _ada_glue_config(d):
    """The glue kernel's largest tile at width d (ParamGradsConfig at many programs): its most registers."""
    return AdaNormConfig.glue(d, 2 ** 20)


def _ada_launches(job):
    _, rms, affine, gated, casting = next(v for v in ADA_VARIANTS if v[0] == job.variant)
    dtype = DTYPE[job.dtype]
    d = job.config.block_n
    x, row = _meta((2, 4, d), dtype), _meta((2, d), dtype)
    w, b = (_meta(d, dtype), None if rms else _meta(d, dtype)) if affine else (None, None)
    r, g = (x, row) if gated else (None, None)
    if job.kernel == "ada_norm_fwd":
        ada_norm.ada_norm_fwd(x, r, g, row, row, w, b, 1e-6, rms, casting, True, config=job.config)
    else:
        rstd = _meta((2, 4), torch.float32)
        ada_norm.ada_norm_bwd(x, x if gated else None, x, x if gated else None, g, row, w, b,
                              None if rms else rstd, rstd, rms, casting, [True] * 7, config=job.config,
                              grads_config=_ada_glue_config(d))
    return ("T", "stride_xt", "stride_rt"), ()


def ada_norm_jobs(targets):
    """The forward and backward configurations AdaNormConfig picks over ADA_WIDTHS, per variant."""
    jobs = []
    for target, (variant, *_), dtype, d in itertools.product(targets, ADA_VARIANTS, ("bf16", "fp32"), ADA_WIDTHS):
        jobs.append(Job("ada_norm_fwd", variant, dtype, AdaNormConfig.forward(d), target))
        gated = next(v for v in ADA_VARIANTS if v[0] == variant)[3]
        if AdaNormConfig.fits(d, True, gated, DTYPE[dtype].itemsize):  # wider: the torch backward (config.py)
            bwd = dataclasses.replace(AdaNormConfig.backward(d), programs=4)
            jobs.append(Job("ada_norm_bwd", variant, dtype, bwd, target))
            jobs.append(Job("ada_norm_param_grads", variant, dtype, bwd, target))
    return jobs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--families", default="row_norm,group_norm,batch_norm,ada_norm,channels_first",
                   help="kernel families, comma-separated")
    p.add_argument("--exhaustive", action="store_true",
                   help="GroupNorm and BatchNorm: every configuration over a full grid of shapes")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    families = args.families.split(",")
    todo = (row_norm_jobs(targets) if "row_norm" in families else []) + \
        (group_norm_jobs(targets, args.exhaustive) if "group_norm" in families else []) + \
        (batch_norm_jobs(targets, args.exhaustive) if "batch_norm" in families else []) + \
        (ada_norm_jobs(targets) if "ada_norm" in families else []) + \
        (channels_first_jobs(targets) if "channels_first" in families else [])
    print(f"triton {triton.__version__}: compiling {len(todo)} kernel x config x target combinations", flush=True)
    header = f"{'target':>6} {'kernel':11} {'variant':26} {'dtype':5} {'configuration':42} " \
             f"{'warps':>5} {'regs':>4} {'shared':>7} {'stack':>5} {'local':>5}  status"
    print(header)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for job, usage, error in pool.map(compile_one, todo):
            spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)  # ptxas spills to the stack frame too
            status = "ok" if error is None and spill == 0 else (error or "SPILLS")
            failures += status != "ok"
            print(f"sm_{job.target:<3} {job.kernel:11} {job.variant:26} {job.dtype:5} {_describe(job):42} "
                  f"{usage.get('WARPS', '-'):>5} {usage.get('REG', '-'):>4} {usage.get('SHARED', '-'):>7} "
                  f"{usage.get('STACK', '-'):>5} {usage.get('LOCAL', '-'):>5}  {status}", flush=True)
    print(f"{len(todo) - failures} ok, {failures} failed (compile error or spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
