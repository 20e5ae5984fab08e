"""Compile every kernel at every configuration the launch heuristics can pick, for sm_80 and
sm_90, without a GPU, and report registers, shared memory and spills (LOCAL) per kernel.

    python -m normops.kernels.aot [--targets 80,90] [--jobs N]

The resources are read from each cubin with ``cuobjdump --dump-resource-usage``, which ships in
the triton wheel. Exit status 1 on a compile error or any spill: LOCAL > 0, or STACK > 0 (ptxas
puts spilled registers in the stack frame, which LOCAL does not always count).
"""
import os

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when the tests' interpreter is on

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import row_norm  # noqa: E402
from .config import RowNormConfig  # noqa: E402

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


@dataclasses.dataclass(frozen=True)
class Job:
    kernel: str
    variant: str
    dtype: str
    config: RowNormConfig
    target: int


def _signature(fn, types, constexprs):
    """ASTSource with the specialization the JIT gives typical launches: every pointer, width and
    stride divisible by 16 (16-byte aligned tensors, power-of-two widths), which is what lets loads
    vectorize and changes the register count."""
    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    aligned = [name for name in fn.arg_names if name not in constexprs and name not in ("M", "inner", "eps")]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)


def _source(job):
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
                                  options={"num_warps": job.config.num_warps})
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


def jobs(targets):
    configs = {"fwd": sorted({RowNormConfig.forward(n) for n in WIDTHS}, key=lambda c: (not c.one_pass, c.block_n)),
               "bwd": sorted({RowNormConfig.backward(n) for n in WIDTHS}, key=lambda c: (not c.one_pass, c.block_n))}
    configs["bwd_sums"] = [c for c in configs["bwd"] if not c.one_pass]
    variants = [(v[0], d) for v in VARIANTS for d in DTYPES] + [(FP32_WEIGHT, "bf16")]
    return [Job(kernel, variant, dtype, cfg, target) for target in targets for kernel, cfgs in configs.items()
            for cfg in cfgs for variant, dtype in variants]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    todo = jobs([int(t) for t in args.targets.split(",")])
    print(f"triton {triton.__version__}: compiling {len(todo)} kernel x config x target combinations", flush=True)
    header = f"{'target':>6} {'kernel':9} {'variant':20} {'dtype':5} {'block_m':>7} {'block_n':>7} {'one_pass':>8} " \
             f"{'warps':>5} {'regs':>4} {'shared':>7} {'stack':>5} {'local':>5}  status"
    print(header)
    failures = 0
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for job, usage, error in pool.map(compile_one, todo):
            c = job.config
            spill = usage.get("LOCAL", 0) + usage.get("STACK", 0)  # ptxas spills to the stack frame too
            status = "ok" if error is None and spill == 0 else (error or "SPILLS")
            failures += status != "ok"
            print(f"sm_{job.target:<3} {job.kernel:9} {job.variant:20} {job.dtype:5} {c.block_m:7} {c.block_n:7} "
                  f"{str(c.one_pass):>8} {c.num_warps:5} {usage.get('REG', '-'):>4} {usage.get('SHARED', '-'):>7} "
                  f"{usage.get('STACK', '-'):>5} {usage.get('LOCAL', '-'):>5}  {status}", flush=True)
    print(f"{len(todo) - failures} ok, {failures} failed (compile error or spills)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
