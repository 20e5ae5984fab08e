"""Compile every kernel at every configuration the launch heuristics can pick, for sm_80 and
sm_90, without a GPU, and report registers, shared memory and spills (LOCAL) per kernel.

    python -m normops.kernels.aot [--targets 80,90] [--jobs N]
                                  [--families row_norm,group_norm,batch_norm] [--exhaustive]

Row norms: the configurations picked over the benchmark widths (they cover every one the heuristic
has). GroupNorm: the ones picked for the benchmark shapes and a set of extremes (no spatial dims,
1024 channels a group, a 1M-pixel instance plane...), in both layouts; --exhaustive takes every
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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import batch_norm, group_norm, row_norm  # noqa: E402
from .common import launch_options  # noqa: E402
from .config import BatchNormConfig, GroupNormConfig, RowNormConfig  # noqa: E402

# The widths the benchmarks run (transformer rows, narrow to 256K); the heuristics map them to
# the distinct configurations compiled here.
WIDTHS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144]
DTYPES = ("bf16", "fp16", "fp32")
# Flag sets: (name, IS_RMS, HAS_W, HAS_B, HAS_R, ACT); the heaviest ones in registers are the
# residual + gelu forward and the gelu backward.
VARIANTS = [("layer_norm", False, True, True, False, 0), ("rms_norm", True, True, False, False, 0),
            ("add_layer_norm+gelu", False, True, True, True, 3)]
# Weights in fp32 under bf16/fp16 activations (the usual mixed-precision layout) cost registers.
FP32_WEIGHT = "layer_norm/w32"


# GroupNorm (N, C, S = prod(spatial), G): the benchmark shapes (U-Net, VAE, video, instance norm
# in style transfer), then extremes: no spatial dims, one group of 1024 channels at 7x7 (the
# widest group a tile takes), a 1M-pixel instance plane, odd sizes, a ResNet-like batch.
GN_SHAPES = [(2, 320, 4096, 32), (2, 1280, 256, 32), (1, 512, 16384, 32), (1, 128, 8 * 65536, 32),
             (1, 64, 65536, 64), (4, 128, 16384, 128), (4, 256, 4096, 256),
             (8, 64, 1, 32), (2, 1024, 49, 1), (32, 1024, 1, 1), (4, 3, 1 << 20, 3), (2, 96, 7, 3),
             (64, 256, 3136, 32), (64, 32, 1024, 32)]
GN_PROGRAMS = 2 * 132  # programs_per_wave on an H100 (132 SMs) at the loop kernels' 8 warps
# (name, HAS_W, HAS_B, ACT); gelu is the heaviest activation in registers (erf and exp).
GN_VARIANTS = [("group_norm", True, True, 0), ("group_norm+gelu", True, True, 3)]


# BatchNorm (N, C, S): ResNet-50 at batch 256 and 32, every stage (112x112 to 7x7), BatchNorm1d
# on (N, C) features, a 3-D U-Net volume, and extremes: 2 values a channel, one channel, a
# 1M-position sample, 4096 rows of 3 channels.
BN_SHAPES = [(256, 64, 12544), (256, 256, 3136), (256, 128, 3136), (256, 512, 784), (256, 1024, 196),
             (256, 2048, 49), (32, 64, 12544), (32, 256, 3136), (32, 2048, 49), (1024, 512, 1), (32, 4096, 1),
             (8, 3, 1), (2, 1, 1), (2, 64, 9), (8, 32, 16384), (1, 64, 1 << 20), (4096, 3, 1), (3, 5, 7)]
BN_PROGRAMS = GN_PROGRAMS
# (name, HAS_W, HAS_B, ACT); ReLU is the common fusion, gelu the heaviest in registers.
BN_VARIANTS = [("batch_norm", True, True, 0), ("batch_norm+gelu", True, True, 3)]


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    variant: str
    dtype: str
    config: object  # RowNormConfig, or (GroupNormConfig, channels_last)
    target: int


def _signature(fn, types, constexprs, unaligned=("M", "inner", "eps")):
    """ASTSource with the specialization the JIT gives typical launches: every pointer, width and
    stride divisible by 16 (16-byte aligned tensors, power-of-two widths), which is what lets loads
    vectorize and changes the register count; `unaligned` names the integers that usually are not."""
    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    aligned = [name for name in fn.arg_names if name not in constexprs and name not in unaligned]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _gn_source(job):
    cfg, channels_last = job.config
    _, has_w, has_b, act = next(v for v in GN_VARIANTS if v[0] == job.variant.split("/")[0])
    e = "*" + job.dtype
    we = "*fp32" if job.variant.endswith("/w32") else e
    ints = dict(G="i32", Cg="i32", S="i32", C="i32", n_gblocks="i32", split="i32", chunk="i32")
    tile = dict(CHANNELS_LAST=channels_last, BLOCK_G=cfg.block_g, BLOCK_CG=cfg.block_cg, BLOCK_S=cfg.block_s,
                ACC=tl.float32)
    if cfg.block_cg == 1:
        tile["Cg"] = 1  # the JIT specializes an integer argument equal to 1 (InstanceNorm's Cg)
    flags = dict(HAS_W=has_w, HAS_B=has_b, ACT=act)
    if job.kernel == "gn_stats":
        fn, types, consts = group_norm._group_norm_stats_kernel, dict(X=e, PART="*fp32", **ints), tile
    elif job.kernel == "gn_fwd":
        fn = group_norm._group_norm_fwd_kernel
        types = dict(X=e, Y=e, W=we, B=we, MEAN="*fp32", RSTD="*fp32", PART="*fp32", eps="fp32", **ints)
        consts = dict(STORE_STATS=True, INSTANCE=cfg.block_cg == 1, ONE_PASS=cfg.one_pass, BLOCK_SPLIT=cfg.split_block,
                      **flags, **tile)
    elif job.kernel == "gn_bwd_sums":
        fn = group_norm._group_norm_bwd_sums_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN="*fp32", RSTD="*fp32", PART="*fp32", **ints)
        consts = dict(**flags, **tile)
    else:
        fn = group_norm._group_norm_bwd_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN="*fp32", RSTD="*fp32", PART="*fp32", DX=e, **ints)
        consts = dict(WANT_DX=True, ONE_PASS=cfg.one_pass, **flags, **tile)
    return _signature(fn, types, consts, unaligned=("G", "Cg", "n_gblocks", "split", "eps"))


def _bn_source(job):
    cfg, training, s_aligned = job.config
    _, has_w, has_b, act = next(v for v in BN_VARIANTS if v[0] == job.variant.split("/")[0])
    e = "*" + job.dtype
    we = "*fp32" if job.variant.endswith("/w32") else e
    ints = dict(N="i32", C="i32", S="i32", s_tiles="i32", n_tiles="i32", c_blocks="i32", chunk="i32")
    tile = dict(BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_c, BLOCK_S=cfg.block_s, ACC=tl.float32)
    if cfg.block_s == 1:
        tile.update(S=1, s_tiles=1)  # the (N * S, C, 1) view: the JIT specializes integers equal to 1
    flags = dict(HAS_W=has_w, HAS_B=has_b, ACT=act, RUNNING=not training)
    stats = dict(MEAN="*fp32", RSTD="*fp32", VAR="*fp32")
    if job.kernel == "bn_stats":
        fn, types, consts = batch_norm._batch_norm_stats_kernel, dict(X=e, PART="*fp32", **ints), tile
    elif job.kernel == "bn_finalize":
        fn = batch_norm._batch_norm_finalize_kernel
        types = dict(PART="*fp32", C="i32", split="i32", total="i32", eps="fp32", **stats)
        consts = dict(BLOCK_SPLIT=cfg.finalize_split, BLOCK_C=cfg.finalize_c, ACC=tl.float32)
    elif job.kernel == "bn_fwd":
        fn = batch_norm._batch_norm_fwd_kernel
        types = dict(X=e, Y=e, W=we, B=we, eps="fp32", **stats, **ints)
        consts = dict(ONE_PASS=cfg.one_pass, **flags, **tile)
    elif job.kernel == "bn_bwd_sums":
        fn = batch_norm._batch_norm_bwd_sums_kernel
        types = dict(DY=e, X=e, W=we, B=we, PART="*fp32", eps="fp32", **stats, **ints)
        consts = dict(**flags, **tile)
    else:
        fn = batch_norm._batch_norm_bwd_kernel
        types = dict(DY=e, X=e, W=we, B=we, SUMS="*fp32", DX=e, eps="fp32", total="i32", **stats, **ints)
        consts = dict(WANT_DX=True, ONE_PASS=cfg.one_pass, **flags, **tile)
    unaligned = ("s_tiles", "n_tiles", "c_blocks", "chunk", "split", "total", "eps") + \
        (() if s_aligned else ("C", "N") if cfg.block_s == 1 else ("S",))
    return _signature(fn, types, consts, unaligned=unaligned)


def _source(job):
    if job.kernel.startswith("gn_"):
        return _gn_source(job)
    if job.kernel.startswith("bn_"):
        return _bn_source(job)
    base = "layer_norm" if job.variant == FP32_WEIGHT else job.variant
    _, rms, has_w, has_b, has_r, act = next(v for v in VARIANTS if v[0] == base)
    e = "*" + job.dtype
    we = "*fp32" if job.variant == FP32_WEIGHT else e
    stat = "*fp32"
    cfg = job.config
    if job.kernel == "fwd":
        fn = row_norm._row_norm_fwd_kernel if cfg.one_pass else row_norm._row_norm_fwd_looped_kernel
        types = dict(X=e, R=e, Y=e, H=e, W=we, B=we, MEAN=stat, RSTD=stat, M="i32", N="i32", inner="i32",
                     sx_o="i64", sx_i="i64", sr_o="i64", sr_i="i64", eps="fp32")
        consts = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_b, HAS_R=has_r, ACT=act, STORE_STATS=True,
                      BLOCK_N=cfg.block_n, ACC=tl.float32, **(dict(BLOCK_M=cfg.block_m) if cfg.one_pass else {}))
    elif job.kernel == "bwd":
        fn = row_norm._row_norm_bwd_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN=stat, RSTD=stat, SUMS=stat, DX=e, PART=stat, M="i32",
                     N="i32", inner="i32", sdy_o="i64", sdy_i="i64", sx_o="i64", sx_i="i64")
        consts = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_b, ACT=act, WANT_DX=True, WANT_DW=has_w, WANT_DB=has_b,
                      ONE_PASS=cfg.one_pass, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=tl.float32)
    else:
        fn = row_norm._row_norm_bwd_sums_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN=stat, RSTD=stat, SUMS=stat, N="i32", inner="i32", sdy_o="i64",
                     sdy_i="i64", sx_o="i64", sx_i="i64")
        consts = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_b, ACT=act, BLOCK_N=cfg.block_n, ACC=tl.float32)
    return _signature(fn, types, consts)


def _cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_one(job):
    """(job, {"REG": .., "SHARED": .., "LOCAL": ..}, error or None)."""
    try:
        compiled = triton.compile(_source(job), target=GPUTarget("cuda", job.target, 32),
                                  options=launch_options(_config(job).num_warps))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, check=True).stdout
        finally:
            os.unlink(f.name)
        usage = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[1])}
        return job, usage, None
    except Exception as e:  # report every failure, keep compiling the rest
        return job, {}, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _config(job):
    if job.kernel == "bn_finalize":
        return dataclasses.replace(job.config[0], num_warps=4)  # batch_norm_fwd launches it at 4 warps
    return job.config[0] if job.kernel.startswith(("gn_", "bn_")) else job.config


def _describe(job):
    """The launch configuration in one column."""
    if job.kernel == "bn_finalize":
        c = job.config[0]
        return f"combine {c.finalize_split} chunks x {c.finalize_c} channels"
    if job.kernel.startswith("bn_"):
        c, training, s_aligned = job.config
        unaligned = "" if s_aligned else " C%16" if c.block_s == 1 else " S%16"
        return (f"{'train' if training else 'eval '} tile={c.block_n}x{c.block_c}x{c.block_s}{unaligned} "
                f"{'one_pass' if c.one_pass else 'looped'}")
    if job.kernel.startswith("gn_"):
        c, channels_last = job.config
        split = f" split_block={c.split_block}" if job.kernel == "gn_fwd" and not c.one_pass else ""
        return (f"{'NHWC' if channels_last else 'NCHW'} tile={c.block_g}x{c.block_cg}x{c.block_s} "
                f"{'one_pass' if c.one_pass else 'looped'}{split}")
    c = job.config
    return f"rows={c.block_m} block_n={c.block_n} {'one_pass' if c.one_pass else 'looped'}"


def row_norm_jobs(targets):
    """Every (kernel, config) the heuristics pick over WIDTHS, for each variant and dtype (the
    backward's one-pass limit depends on the element size)."""
    variants = [(v[0], d) for v in VARIANTS for d in DTYPES] + [(FP32_WEIGHT, "bf16")]
    jobs = set()
    for (variant, dtype), n in itertools.product(variants, WIDTHS):
        bwd = RowNormConfig.backward(n, 4 if dtype == "fp32" else 2)
        picks = [("fwd", RowNormConfig.forward(n)), ("bwd", bwd)] + ([] if bwd.one_pass else [("bwd_sums", bwd)])
        jobs.update((kernel, cfg, variant, dtype) for kernel, cfg in picks)
    order = {"fwd": 0, "bwd": 1, "bwd_sums": 2}
    return [Job(kernel, variant, dtype, cfg, target) for target in targets for kernel, cfg, variant, dtype in
            sorted(jobs, key=lambda j: (order[j[0]], not j[1].one_pass, j[1].block_n, variants.index((j[2], j[3]))))]


def _gn_grid():
    """Every (N, C, S, G) of the exhaustive sweep: powers of two of channels a group, positions and
    groups, batch 1 (split) and 64 (one program per group block)."""
    for cg, s, g, n in itertools.product([1 << i for i in range(11)], [1 << i for i in range(23)],
                                         [1 << i for i in range(7)], (1, 64)):
        yield n, cg * g, s, g


def group_norm_jobs(targets, exhaustive=False):
    shapes = list(_gn_grid()) if exhaustive else GN_SHAPES
    configs = {"gn_fwd": set(), "gn_bwd": set()}
    for (n, c, s, g), channels_last in itertools.product(shapes, (False, True)):
        if channels_last and s == 1:
            continue  # no positions: channels_last is plain contiguous, and runs as NCHW
        fwd = GroupNormConfig.forward(n, c, s, g, channels_last, GN_PROGRAMS)
        bwd = GroupNormConfig.backward(n, c, s, g, channels_last, GN_PROGRAMS)
        # split and chunk are runtime arguments: one compile serves them all; split_block is not
        configs["gn_fwd"].add((dataclasses.replace(fwd, split=0, chunk=0), channels_last))
        configs["gn_bwd"].add((dataclasses.replace(bwd, split=0, chunk=0, split_block=1), channels_last))
    configs["gn_stats"] = {(dataclasses.replace(c, split_block=1), cl) for c, cl in configs["gn_fwd"] if not c.one_pass}
    configs["gn_bwd_sums"] = {k for k in configs["gn_bwd"] if not k[0].one_pass}
    if exhaustive:  # the heaviest variant only, bf16 activations with fp32 parameters
        variants = [("group_norm+gelu/w32", "bf16")]
    else:
        # fp16 compiles as bf16 does (same width); gelu in fp32 is covered by its w32 mixed case
        variants = [("group_norm", "bf16"), ("group_norm", "fp32"), ("group_norm+gelu", "bf16"),
                    ("group_norm+gelu/w32", "bf16")]
    order = lambda k: (not k[0].one_pass, k[1], k[0].block_g * k[0].block_cg * k[0].block_s, str(k))  # noqa: E731
    return [Job(kernel, variant, dtype, cfg, target) for target in targets for kernel in
            ("gn_stats", "gn_fwd", "gn_bwd_sums", "gn_bwd") for cfg in sorted(configs[kernel], key=order)
            for variant, dtype in variants]


def _bn_grid():
    """The (N, C, S) of the --exhaustive sweep: batch sizes, channel counts and positions (ResNet's
    7x7 to 112x112 planes among them), wherever N * C * S stays under 2**31."""
    for n, c, s in itertools.product((1, 2, 8, 32, 256, 4096), (1, 3, 64, 256, 2048),
                                     (1, 2, 7, 49, 196, 784, 3136, 12544, 65536, 1 << 20)):
        if n * s >= 2 and n * c * s < 2**31:
            yield n, c, s


def batch_norm_jobs(targets, exhaustive=False):
    configs = {"bn_fwd": set(), "bn_bwd": set()}
    for (n, c, s), channels_last, training in itertools.product(list(_bn_grid()) if exhaustive else BN_SHAPES,
                                                                (False, True), (True, False)):
        if channels_last and s == 1:
            continue  # no positions: channels_last is plain contiguous
        view = (n * s, c, 1) if channels_last or s == 1 else (n, c, s)
        # the JIT marks an integer argument divisible by 16 when it is: S, and C in the (N * S, C, 1) view
        aligned = view[2] % 16 == 0 if view[2] > 1 else view[1] % 16 == 0
        fwd = BatchNormConfig.forward(*view, training, BN_PROGRAMS)
        bwd = BatchNormConfig.backward(*view, training, BN_PROGRAMS)
        # split and chunk are runtime arguments: one compile serves them all
        configs["bn_fwd"].add((dataclasses.replace(fwd, split=0, chunk=0), training, aligned))
        configs["bn_bwd"].add((dataclasses.replace(bwd, split=0, chunk=0, finalize_split=1, finalize_c=1),
                               training, aligned))
    split_fwd = [k for k in configs["bn_fwd"] if k[1] and not k[0].one_pass]
    configs["bn_stats"] = {(dataclasses.replace(c, finalize_split=1, finalize_c=1), True, a) for c, _, a in split_fwd}
    configs["bn_finalize"] = {(BatchNormConfig(1, 1, 1, 4, False, 0, 0, c.finalize_split, c.finalize_c), True, True)
                              for c, _, _ in split_fwd}
    configs["bn_fwd"] = {(dataclasses.replace(c, finalize_split=1, finalize_c=1), t, a)
                         for c, t, a in configs["bn_fwd"]}
    configs["bn_bwd_sums"] = {k for k in configs["bn_bwd"] if not k[0].one_pass}
    if exhaustive:
        variants = [("batch_norm+gelu/w32", "bf16")]
    else:
        variants = [("batch_norm", "bf16"), ("batch_norm", "fp32"), ("batch_norm+gelu", "bf16"),
                    ("batch_norm+gelu/w32", "bf16")]
    order = lambda k: (not k[0].one_pass, not k[1], k[0].block_n * k[0].block_c * k[0].block_s, str(k))  # noqa: E731
    return [Job(kernel, variant, dtype, cfg, target) for target in targets for kernel in
            ("bn_stats", "bn_finalize", "bn_fwd", "bn_bwd_sums", "bn_bwd") for cfg in sorted(configs[kernel], key=order)
            for variant, dtype in (variants[:2] if kernel in ("bn_stats", "bn_finalize") else variants)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--families", default="row_norm,group_norm,batch_norm", help="kernel families, comma-separated")
    p.add_argument("--exhaustive", action="store_true",
                   help="GroupNorm and BatchNorm: every configuration over a full grid of shapes")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    families = args.families.split(",")
    todo = (row_norm_jobs(targets) if "row_norm" in families else []) + \
        (group_norm_jobs(targets, args.exhaustive) if "group_norm" in families else []) + \
        (batch_norm_jobs(targets, args.exhaustive) if "batch_norm" in families else [])
    print(f"triton {triton.__version__}: compiling {len(todo)} kernel x config x target combinations", flush=True)
    header = f"{'target':>6} {'kernel':11} {'variant':20} {'dtype':5} {'configuration':42} " \
             f"{'warps':>5} {'regs':>4} {'shared':>7} {'stack':>5} {'local':>5}  status"
    print(header)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for job, usage, error in pool.map(compile_one, todo):
            spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)  # ptxas spills to the stack frame too
            status = "ok" if error is None and spill == 0 else (error or "SPILLS")
            failures += status != "ok"
            print(f"sm_{job.target:<3} {job.kernel:11} {job.variant:20} {job.dtype:5} {_describe(job):42} "
                  f"{_config(job).num_warps:5} {usage.get('REG', '-'):>4} {usage.get('SHARED', '-'):>7} "
                  f"{usage.get('STACK', '-'):>5} {usage.get('LOCAL', '-'):>5}  {status}", flush=True)
    print(f"{len(todo) - failures} ok, {failures} failed (compile error or spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
