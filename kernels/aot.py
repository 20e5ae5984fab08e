"""Compile every kernel at every configuration the launch heuristics can pick, for sm_80 and
sm_90, without a GPU, and report registers, shared memory and spills (LOCAL) per kernel.

    python -m normops.kernels.aot [--targets 80,90] [--jobs N] [--families row_norm,group_norm]
                                  [--exhaustive]

Row norms: the configurations picked over the benchmark widths (they cover every one the heuristic
has). GroupNorm: the ones picked for the benchmark shapes and a set of extremes (no spatial dims,
1024 channels a group, a 1M-pixel instance plane...), in both layouts; --exhaustive takes every
configuration the heuristic picks over a grid of every power-of-two channels-per-group (1..1024),
positions (1..4M) and group count (1..64), both layouts, batch 1 and 64 (about 1,500 a target).

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

from . import group_norm, row_norm  # noqa: E402
from .config import GroupNormConfig, RowNormConfig  # noqa: E402

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
        consts = dict(STORE_STATS=True, ONE_PASS=cfg.one_pass, BLOCK_SPLIT=cfg.split_block, **flags, **tile)
    elif job.kernel == "gn_bwd_sums":
        fn = group_norm._group_norm_bwd_sums_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN="*fp32", RSTD="*fp32", PART="*fp32", **ints)
        consts = dict(**flags, **tile)
    else:
        fn = group_norm._group_norm_bwd_kernel
        types = dict(DY=e, X=e, W=we, B=we, MEAN="*fp32", RSTD="*fp32", PART="*fp32", DX=e, **ints)
        consts = dict(WANT_DX=True, ONE_PASS=cfg.one_pass, **flags, **tile)
    return _signature(fn, types, consts, unaligned=("G", "Cg", "n_gblocks", "split", "eps"))


def _source(job):
    if job.kernel.startswith("gn_"):
        return _gn_source(job)
    base = "layer_norm" if job.variant == FP32_WEIGHT else job.variant
    _, rms, has_w, has_b, has_r, act = next(v for v in VARIANTS if v[0] == base)
    e = "*" + job.dtype
    we = "*fp32" if job.variant == FP32_WEIGHT else e
    stat = "*fp32"
    cfg = job.config
    if job.kernel == "fwd":
        fn = row_norm._row_norm_fwd_kernel
        types = dict(X=e, R=e, Y=e, H=e, W=we, B=we, MEAN=stat, RSTD=stat, M="i32", N="i32", inner="i32",
                     sx_o="i64", sx_i="i64", sr_o="i64", sr_i="i64", eps="fp32")
        consts = dict(IS_RMS=rms, HAS_W=has_w, HAS_B=has_b, HAS_R=has_r, ACT=act, STORE_STATS=True,
                      ONE_PASS=cfg.one_pass, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, ACC=tl.float32)
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
                                  options={"num_warps": _config(job).num_warps})
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
    return job.config[0] if job.kernel.startswith("gn_") else job.config


def _describe(job):
    """The launch configuration in one column."""
    if job.kernel.startswith("gn_"):
        c, channels_last = job.config
        split = f" split_block={c.split_block}" if job.kernel == "gn_fwd" and not c.one_pass else ""
        return (f"{'NHWC' if channels_last else 'NCHW'} tile={c.block_g}x{c.block_cg}x{c.block_s} "
                f"{'one_pass' if c.one_pass else 'looped'}{split}")
    c = job.config
    return f"rows={c.block_m} block_n={c.block_n} {'one_pass' if c.one_pass else 'looped'}"


def row_norm_jobs(targets):
    configs = {"fwd": sorted({RowNormConfig.forward(n) for n in WIDTHS}, key=lambda c: (not c.one_pass, c.block_n)),
               "bwd": sorted({RowNormConfig.backward(n) for n in WIDTHS}, key=lambda c: (not c.one_pass, c.block_n))}
    configs["bwd_sums"] = [c for c in configs["bwd"] if not c.one_pass]
    variants = [(v[0], d) for v in VARIANTS for d in DTYPES] + [(FP32_WEIGHT, "bf16")]
    return [Job(kernel, variant, dtype, cfg, target) for target in targets for kernel, cfgs in configs.items()
            for cfg in cfgs for variant, dtype in variants]


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--families", default="row_norm,group_norm", help="kernel families, comma-separated")
    p.add_argument("--exhaustive", action="store_true", help="GroupNorm: every configuration over the full grid")
    args = p.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",")]
    families = args.families.split(",")
    todo = (row_norm_jobs(targets) if "row_norm" in families else []) + \
        (group_norm_jobs(targets, args.exhaustive) if "group_norm" in families else [])
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
