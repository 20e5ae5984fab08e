"""The static roofline: predicted % of DRAM bandwidth for every GPU case of the benchmark suites,
from the kernels the launch heuristics pick, compiled for the GPU without one.

    python -m normops.kernels.roofline [--gpu h100-sxm] [--check] [-k SUBSTRING] [--json FILE]
                                       [--anchors] [--jobs N]

Each case of ``benchmarks/bench_*.py``'s CUDA_SETS (op, shape, layout, dtype; forward and backward
apart) runs its launcher on meta tensors, planned for the GPU (``config.planning_for``), under
``common.record()`` and a dispatch mode that counts the torch operations it runs (glue). Every
Triton launch is compiled as the JIT would specialize it, and its facts are read from the cubin:
registers, stack and shared memory (``cuobjdump --dump-resource-usage``), and from the SASS
(``nvdisasm``) the global loads (count x width) and barriers of each loop body and of the
straight-line code.

The model, per op (times add up; GPU numbers in GPUS):
- Launch cost: FIRST_LAUNCH_US for the op's first launch (launch, ramp-up, tail and the benchmark's
  L2 flush: the one fixed cost that brings a bytes-only model within ~5% of 17 of the 18
  non-spilling published H100 points, ../shared/perf-anchors.md), LAUNCH_US for each further one
  (Triton or torch glue): a launch queued behind another pays only its ramp-up and tail.
- DRAM bytes of a launch: each tensor argument once, at its size; a tensor a program reads twice
  (REREADS, with the span one program re-reads), or one an earlier launch of the op touched, is
  read the second time from L2 when what was touched in between fits L2_FRACTION of the L2 (the
  programs in flight x their spans; the earlier launches' bytes), else from DRAM again. Spilled
  registers (STACK + LOCAL) are DRAM traffic: stored and loaded once per program a thread.
- Memory time = max(DRAM bytes / (EFFICIENCY x peak, or the latency bound if lower),
  (DRAM + L2 bytes) / the L2 bandwidth).
- Latency bound (Little's law): programs in flight = min(grid, SMs x programs resident an SM, from
  the registers, warps and shared memory); a region (a loop body, or the code outside loops)
  requests the bytes of its global loads per program (SASS: LDG count x width x threads) every
  DRAM_LATENCY_NS + BARRIER_NS per barrier in it. The regions that stream (the innermost loops
  that load, or else the rest; at least a quarter of the largest's bytes) share the traffic
  equally: bandwidth = their harmonic mean. The code around inner loops (once a row or group: its
  statistics' reductions) is not charged: an optimism where rows or groups are short.
- % of peak = the op's ideal bytes (IDEAL: what normops.bench.bytes_moved counts: read x, write y;
  x, dy, dx backward; BatchNorm training's two reads; adaLN with the gated residual: x, r -> y, h,
  backward h, dy, x (dgate) -> dx, dresidual; adaLN's (B, D) scale, shift and gate uncounted, as
  there) / predicted time / peak.

The launchers run as the benchmarks call them: adaLN (kernels/ada_norm.py) as DiT's LayerNorm,
no weight or bias, grid (row blocks, B) forward, (P, B) programs backward then the glue that sums
their partials (however many launches the launcher makes: read from record(), not assumed);
channels-first LayerNorm (kernels/channels_first.py) on [C, BLOCK_S] tiles of the input in its
own layout (NCHW or channels_last: each compiles to its own variant), whose looped kernels (C
wider than a tile) re-read x (and dy) tile by tile (REREADS, span "tile"). GroupNorm's LARGE flag
(int64 offsets past 2**31 elements a sample) is a constexpr, compiled as the JIT would; no
benchmark case sets it (the largest VAE decoder shape is 2**27 elements a sample).

Targets (issue #20): TARGETS per op and pass, as % of peak, for calls moving >= 512 MB. A smaller
call cannot reach an absolute figure through its fixed launch cost, so there the target is scaled
by what a perfect kernel with the op's allowed launches (IDEAL_LAUNCHES) reaches at that size under
the same model: target x perfect% / (EFFICIENCY x 100) (../shared/perf-anchors.md: match the best
modelled anchor below 512 MB). GroupNorm with fewer groups than SMs and an x (backward: x and dy)
past L2 (the video case; the VAE's backward) cannot avoid a second read: its target is
TWO_READ_SHARE of that two-read ceiling. The row-norm variants (issue #17, ROW_VARIANTS: weight
offset, casting, fp32 residual stream, gates, groups, in place) have their plain op's target, and
per byte (ideal bytes / predicted time, column "/byte") at least VARIANT_SHARE of plain RMSNorm's at
the same shape, dtype and pass ("SLOW" otherwise). Issue #18's ops: adaLN (ADA_NORMS) has the row
norms' targets by its width D (85% forward, 70% backward): a LayerNorm of rows, its (B, D)
modulation read once a program, a pass of streamed rows like add+RMSNorm's; channels-first
LayerNorm (CHANNELS_FIRST) has LayerNorm's by its channel count C: the same reduction over a
strided axis, one read and one write in either layout (the permute copies are what it saves).
Both: one forward launch, the backward kernel and one glue launch (IDEAL_LAUNCHES). The VAE
decoder's GroupNorm shapes (batch 1, 32 groups) are GroupNorm cases under the rules above (the
two-read ceiling where x is past L2); the issue names no bound of its own for them. Every op: at
most one glue launch (a torch operation, or a Triton launch with no activation-sized tensor).
``--check`` exits 1 on a case below its target, slow or with more glue, and on an anchor the model misses
by more than ANCHOR_TOLERANCE: a model that does not reproduce the published points judges nothing.
A failing case is listed at the end with its reasons (BELOW, GLUE, SLOW, ERROR) and what limits
it (``limits``: latency-bound launches, L2 re-reads, spills, the launches after the first).
OPEN_SHORTFALLS lists cases known below target with their predicted % when listed and why: --check
reports them apart and passes them while they stay at that % (a regression fails, and so does an
entry whose case has reached its target: stale), so a known gap stays in view, its target unchanged.
"""
import os

if __name__ == "__main__":  # compile real kernels even where the tests' interpreter is on (imported
    os.environ["TRITON_INTERPRET"] = "0"  # by the tests, it leaves their kernels as they are)

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from normops.core import case_id, gated_group_size  # noqa: E402

from . import ada_norm, anchors, batch_norm, channels_first, group_norm, row_norm  # noqa: E402
from .common import launch_options, record  # noqa: E402
from .config import planning_for  # noqa: E402


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    arch: int  # compute capability the kernels are compiled for
    dram_tbps: float
    l2_tbps: float  # sustained L2 read bandwidth
    l2_mb: float
    sms: int
    smem_kb: int = 228  # shared memory an SM
    regs: int = 65536  # 32-bit registers an SM
    warps: int = 64  # resident warps an SM
    programs: int = 32  # resident thread blocks an SM


GPUS = {
    "h100-sxm": GPU("NVIDIA H100 SXM 80GB", 90, 3.35, 5.5, 50, 132),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 90, 2.0, 4.5, 50, 114),
    "h200": GPU("NVIDIA H200", 90, 4.8, 5.5, 50, 132),
    "a100-sxm": GPU("NVIDIA A100 SXM 80GB", 80, 2.04, 3.8, 40, 108, smem_kb=164),
}

def gpu_named(device_name):
    """The GPUS key for a CUDA device name (torch.cuda.get_device_name), or None."""
    name = device_name.upper()
    for marker, key in (("H200", "h200"), ("H100 PCIE", "h100-pcie"), ("H100", "h100-sxm"), ("A100", "a100-sxm")):
        if marker in name:
            return key
    return None


EFFICIENCY = 0.895  # what the best published non-spilling kernels sustain at large sizes
FIRST_LAUNCH_US = 6.75
LAUNCH_US = 2.0
DRAM_LATENCY_NS = 700
BARRIER_NS = 50
L2_FRACTION = 0.6  # of the L2 a re-read may count on (two partitions, other traffic)
ANCHOR_TOLERANCE = 0.10
ABSOLUTE_FROM_BYTES = 512e6
TWO_READ_SHARE = 0.90

# Tensors a program of a kernel reads a second time (by its constexprs), and the span between its
# two reads: "row" (a row of x: the row norms' looped kernels), "group" (a GroupNorm group).
REREADS = {
    # pass 2 reads h = x + r back (written by pass 1) with a residual, else x again; a gate before
    # the norm is read in both passes (after it: in pass 2 only, once)
    "_row_norm_fwd_looped_kernel": (lambda c: ("H" if c["HAS_R"] else "X",) + ("Z",) * c["GATE_FIRST"], "row"),
    "_row_norm_bwd_looped_kernel": (lambda c: ("X", "DY") + ("Z",) * c["HAS_GATE"], "row"),
    # looped (neither one-pass nor split): statistics (sums) loop, then the normalize (dx) loop
    "_group_norm_fwd_kernel": (lambda c: () if c["ONE_PASS"] or c["SPLIT"] else ("X",), "group"),
    "_group_norm_bwd_kernel": (lambda c: () if c["ONE_PASS"] or c["SPLIT"] else ("X", "DY"), "group"),
    # channels-first LayerNorm over more channels than a tile holds: the statistics loop over the
    # channel blocks, then the normalize (dx) loop re-reading them; span: a [C, BLOCK_S] tile
    "_layer_norm_cf_fwd_kernel": (lambda c: () if c["ONE_PASS"] else ("X",), "tile"),
    "_layer_norm_cf_bwd_kernel": (lambda c: ("X", "DY") if c["WANT_DX"] and not c["ONE_PASS"] else (), "tile"),
}

# (reads, writes) of activation-sized tensors, forward and backward: normops.bench's bytes model
# (tests/test_roofline.py holds the two equal).
IDEAL = {
    "layer_norm": ((1, 1), (2, 1)), "rms_norm": ((1, 1), (2, 1)), "add_rms_norm": ((2, 2), (2, 1)),
    "group_norm": ((1, 1), (2, 1)), "group_norm+silu": ((1, 1), (2, 1)), "instance_norm": ((1, 1), (2, 1)),
    "batch_norm": ((2, 1), (4, 1)), "batch_norm+relu": ((2, 1), (4, 1)), "batch_norm_eval": ((1, 1), (2, 1)),
    # the row-norm variants: a gate is one more read forward, a read and a dgate write backward;
    # the in-place add has no backward (None)
    "rms_norm_gemma": ((1, 1), (2, 1)), "rms_norm_llama": ((1, 1), (2, 1)),
    "add_rms_norm_fp32_residual": ((2, 2), (2, 1)), "gated_rms_norm": ((2, 1), (3, 2)),
    "gated_rms_norm_grouped": ((2, 1), (3, 2)), "add_rms_norm_": ((2, 2), None),
    # adaLN (issue #18): scale, shift, gate are (B, D), uncounted (bench.bytes_moved: a rounding
    # error at B*D of B*T*D). Alone: x -> y, backward x, dy -> dx. With the gated residual: x, r ->
    # y, h; backward (of y: h's gradient from later layers absent) reads h, dy and x (dgate),
    # writes dx and dresidual.
    "ada_layer_norm": ((1, 1), (2, 1)), "ada_layer_norm_gate_residual": ((2, 2), (3, 2)),
    # ConvNeXt's LayerNorm over dim 1, read in place in either layout: LayerNorm's bytes
    "layer_norm_channels_first": ((1, 1), (2, 1)),
    # norm + quantize (issue #19), inference: x -> q, q in OUT_ITEMSIZE bytes an element; the
    # scales (4 bytes a row or a 128-value group) uncounted, as in normops.bench
    "rms_norm_quant": ((1, 1), None), "rms_norm_quant_g128": ((1, 1), None),
}
# The ops whose forward writes are not of the input's size (bench.Op.out_itemsize): float8 codes.
OUT_ITEMSIZE = {"rms_norm_quant": 1, "rms_norm_quant_g128": 1}
# Of those, how many (fwd reads, writes, bwd reads, writes) are the fp32 residual stream:
# promote_types(dtype, float32) bytes an element (r and h forward, h backward; dx is x's dtype).
WIDE = {"add_rms_norm_fp32_residual": (1, 1, 1, 0)}
# The ops whose backward also writes the residual's gradient in the stream's dtype where that is
# wider than x's (bench.Op.stream_grad): one more write, of the stream's size.
STREAM_GRAD = {"add_rms_norm_fp32_residual"}
# The launches of a perfect kernel for the op: one forward (BatchNorm training: statistics, then
# normalize), and the backward's kernel plus the one glue launch that sums dW/dB partials.
IDEAL_LAUNCHES = {"fwd": 1, "bwd": 2}
TWO_PASS_LAUNCHES = {"fwd": 2, "bwd": 3}  # BatchNorm training; GroupNorm split over chunks

# The row-norm variants of normops.bench (issue #17): the launcher's variant arguments of each
# (gate: a gate of x's shape and dtype; residual: its dtype, or "in place"). Target: as plain
# RMSNorm's, and per byte (ideal bytes / predicted time) at least VARIANT_SHARE of plain RMSNorm's
# at the same shape, dtype and pass.
ROW_VARIANTS = {
    "rms_norm_gemma": dict(offset=1.0),  # GemmaRMSNorm
    "rms_norm_llama": dict(casting="llama"),  # LlamaRMSNorm
    "add_rms_norm_fp32_residual": dict(residual=torch.float32),  # bf16/fp16 x, fp32 residual stream
    "gated_rms_norm": dict(gate=True, casting="llama"),  # Qwen3NextRMSNormGated
    "gated_rms_norm_grouped": dict(gate=True, casting="llama", norm_before_gate=False, grouped=True),  # Mamba2
    "add_rms_norm_": dict(residual="in place"),  # vLLM's fused_add_rms_norm
}
VARIANT_BASE = "rms_norm"
VARIANT_SHARE = 0.95

# Open shortfalls: cases known below target, each with its predicted % when it was listed and why.
# --check reports them apart and does not fail on them, but fails when one predicts below its
# listed % (a regression) or reaches its target (the entry is stale: remove it). A list, not a
# lower target: the target stays the issue's, and the gap stays in view until a kernel closes it.
# ConvNeXt's wide stages in NCHW (C = 512, 768 split over warps): the cross-warp reductions (mean
# and variance; dx's two sums) leave the kernels latency-bound. Tried, not yet spill-free: one
# (count, mean, M2) reduction forward, a 32-warp backward (8 B on sm_80).
_CF_NCHW_WIDE = "NCHW, C split over warps: latency-bound by its cross-warp reductions"
OPEN_SHORTFALLS = {
    f"layer_norm_channels_first-{shape}-{dtype}-{pas}": (pct, _CF_NCHW_WIDE)
    for shape, pas, pct in (("32x768x7x7", "fwd", 15.5), ("32x768x7x7", "bwd", 14.0),
                            ("32x512x14x14", "fwd", 26.0), ("32x512x14x14", "bwd", 22.7))
    for dtype in ("bfloat16", "float16")}
OPEN_SLACK = 0.1  # % of peak a listed case may move without failing (the listing's rounding, compile noise)

ROW_NORMS = ("layer_norm", "rms_norm", "add_rms_norm") + tuple(ROW_VARIANTS)
# RMSNorm + float8 quantize (kernels/row_norm.py's QUANT), per row and per 128 values: the row norms'
# forward target (85%), counting bf16 in and float8 out, as the issue reads it
QUANT_NORMS = {"rms_norm_quant": None, "rms_norm_quant_g128": 128}
ADA_NORMS = ("ada_layer_norm", "ada_layer_norm_gate_residual")  # kernels/ada_norm.py, (B, T, D)
CHANNELS_FIRST = ("layer_norm_channels_first",)  # kernels/channels_first.py, (N, C, *S) over C
GROUP_NORMS = ("group_norm", "group_norm+silu", "instance_norm")
BATCH_NORMS = ("batch_norm", "batch_norm+relu", "batch_norm_eval")


def target(case):
    """The issue's absolute target for a case, % of peak (None: no target, reported only)."""
    op, shape, pas = case.op, case.shape, case.pas
    if op in ROW_NORMS + ADA_NORMS + CHANNELS_FIRST + tuple(QUANT_NORMS):  # the normalized width: C for channels-first
        width = shape[1] if op in CHANNELS_FIRST else shape[-1]
        if pas == "bwd":
            return 70.0 if width <= 65536 else None
        return 85.0 if width <= 65536 else 70.0
    if op in GROUP_NORMS:
        return 75.0 if pas == "fwd" else 65.0
    if op == "batch_norm_eval":
        return 85.0 if pas == "fwd" else None
    return 70.0 if pas == "fwd" else None


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    layout: str
    dtype: torch.dtype
    pas: str

    @property
    def id(self):
        return case_id(self.op, self.shape, self.layout, self.dtype, self.pas)

    @property
    def elem(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def ideal_bytes(self):
        bwd = self.pas == "bwd"
        reads, writes = IDEAL[self.op][bwd]
        wide = sum(WIDE.get(self.op, (0, 0, 0, 0))[2 * bwd: 2 * bwd + 2])
        numel = math.prod(self.shape)
        stream = torch.promote_types(self.dtype, torch.float32).itemsize
        extra = stream if bwd and self.op in STREAM_GRAD and stream > self.elem else 0
        out = OUT_ITEMSIZE.get(self.op, self.elem)
        return (reads * self.elem + writes * out) * numel + wide * numel * (stream - self.elem) + extra * numel

    @property
    def base(self):
        """The plain case a variant is judged against per byte, or None."""
        return dataclasses.replace(self, op=VARIANT_BASE) if self.op in ROW_VARIANTS else None


def _load(path):
    spec = importlib.util.spec_from_file_location(f"_roofline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # acceptance_points is imported by its neighbours by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def benchmark_cases(acceptance=False):
    """Every CUDA case of benchmarks/bench_*.py (a source checkout's), forward and backward, in the
    suites' dtypes; with `acceptance`, also the normops cases of benchmarks/acceptance_points.py
    (bf16 where the point names no dtype, the acceptance run's default)."""
    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    if not root.is_dir():
        raise SystemExit(f"no benchmarks/ folder at {root}: run from a source checkout of normops")
    cases = []
    for path in sorted(root.glob("bench_*.py")):
        for ops, shapes, layouts in _load(path).CUDA_SETS:
            for op, shape, layout, dtype, pas in _product(ops, shapes, layouts):
                cases.append(Case(op, tuple(shape), layout, dtype, pas))
    if acceptance:
        points = _load(root / "acceptance_points.py")
        for c in points.all_cases(points.points(["row_norm", "group_norm", "batch_norm"]), compile_=False):
            dtype = getattr(torch, c.dtype or "bfloat16")
            for pas in c.pas.split("+"):
                if c.provider == "normops" and c.op in IDEAL and IDEAL[c.op][pas == "bwd"]:
                    cases.append(Case(c.op, tuple(c.shape), c.layout, dtype, pas))
    return list(dict.fromkeys(cases))


def _product(ops, shapes, layouts):
    """The cases of a set, in the passes each op has (an in-place op: no backward)."""
    return [c for c in itertools.product(ops, shapes, layouts, (torch.float32, torch.bfloat16, torch.float16),
                                         ("fwd", "bwd")) if IDEAL[c[0]][c[4] == "bwd"]]


# --- running a case's launchers on meta tensors ----------------------------------------------

class _Glue(TorchDispatchMode):
    """Counts the torch operations that would run a CUDA kernel (not views, allocations or metadata)."""
    FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
            "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
            "is_contiguous", "_local_scalar_dense"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = _tensors((args, kwargs, out))
        # an op on no tensor (torch.promote_types of two dtypes) runs no kernel either
        if tensors and not func.is_view and func._schema.name.split("::")[-1] not in self.FREE:
            self.ops.append((func._schema.name, sum(t.numel() * t.element_size() for t in tensors)))
        return out


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _meta(shape, dtype, layout="contiguous"):
    fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
           "channels_last_3d": torch.channels_last_3d}[layout]
    return torch.empty(shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)


def run_case(case, gpu):
    """(launches, glue ops) of a case's launcher on meta tensors, planned for `gpu`."""
    x = _meta(case.shape, case.dtype, case.layout)
    other = _meta(case.shape, case.dtype, case.layout)  # dy, or the residual: a tensor of its own
    c = case.shape[-1] if case.op in ROW_NORMS + ADA_NORMS + tuple(QUANT_NORMS) else case.shape[1]
    w, b = _meta(c, case.dtype), _meta(c, case.dtype)
    stats = lambda *s: _meta(s, torch.float32)  # noqa: E731
    glue = _Glue()
    with planning_for(gpu.sms), record() as launches, glue:
        if case.op in ROW_NORMS:
            _run_row_norm(case, x, other, w, b)
        elif case.op in QUANT_NORMS:  # as the benchmark calls it: dynamic scales, float8 codes as launched there
            row_norm.row_norm_quant_fwd(x, None, case.shape[-1:], w, None, 1e-6, True, "none",
                                        group_size=QUANT_NORMS[case.op], fp8_hw=gpu.arch >= 89)
        elif case.op in ADA_NORMS:
            _run_ada_norm(case, x, other)
        elif case.op in CHANNELS_FIRST:
            mean, rstd = (_meta((case.shape[0],) + case.shape[2:], torch.float32) for _ in "mr")
            if case.pas == "fwd":
                channels_first.layer_norm_cf_fwd(x, w, b, 1e-6, "none", True)
            else:  # dy in y's layout (y is x's): as the next layer hands it back
                channels_first.layer_norm_cf_bwd(other, x, w, b, mean, rstd, "none", [True, True, True])
        elif case.op in GROUP_NORMS:
            groups = c if case.op == "instance_norm" else 32
            act = "silu" if case.op == "group_norm+silu" else "none"
            instance = case.op == "instance_norm"
            if case.pas == "fwd":
                group_norm.group_norm_fwd(x, groups, w, b, 1e-5, act, True, instance=instance)
            else:
                s = stats(case.shape[0], groups)
                group_norm.group_norm_bwd(other, x, groups, w, b, s, s, act, (True, True, True))
        else:
            training = case.op != "batch_norm_eval"
            act = "relu" if case.op == "batch_norm+relu" else "none"
            rm, rv = stats(c), stats(c)
            if case.pas == "fwd":
                # training: the running statistics updated in the kernels, as normops.functional asks
                batch_norm.batch_norm_fwd(x, w, b, rm, rv, training, 1e-5, act, momentum=0.1 if training else None)
            else:
                batch_norm.batch_norm_bwd(other, x, w, b, rm, rv, stats(c), stats(c), training, 1e-5, act,
                                          (True, True, True))
    return launches, glue.ops


def _run_row_norm(case, x, other, w, b):
    """The launches of a row-norm case (a variant's as ROW_VARIANTS says), as normops.ops runs them."""
    rows, n = math.prod(case.shape[:-1]), case.shape[-1]
    v = dict(ROW_VARIANTS.get(case.op, {}))
    residual = v.pop("residual", "same" if case.op == "add_rms_norm" else None)
    gate = _meta(case.shape, case.dtype) if v.pop("gate", False) else None
    groups = 1
    if v.pop("grouped", False):
        v["group_size"] = gated_group_size(n)
        groups = n // v["group_size"]
    rms = case.op != "layer_norm"
    bias = None if rms else b
    rstd = _meta((rows, groups) if groups > 1 else (rows,), torch.float32)
    mean = None if rms else _meta((rows,), torch.float32)
    if residual == torch.float32:  # the residual stream: h = x + r in promote_types(x, r)
        wide = torch.promote_types(case.dtype, residual)
        other = _meta(case.shape, wide)
        if case.pas == "bwd":
            x, other = other, _meta(case.shape, case.dtype)  # the saved h, and dy in y's (x's) dtype
    if case.pas == "fwd":
        # in place (out=(x, r)) writes x and r: y and h of their own here, so that each write counts
        # (an argument is counted once at its size); the compiled kernel and the bytes are the same
        row_norm.row_norm_fwd(x, other if residual else None, (n,), w, bias, 1e-6, rms, "none",
                              residual != "in place", out_dtype=case.dtype if residual else None, gate=gate, **v)
    else:
        # with a residual stream of another dtype, the kernel writes x's gradient and the residual's
        streams = dict(dx_dtype=case.dtype, dresidual_dtype=x.dtype) if x.dtype != case.dtype else {}
        row_norm.row_norm_bwd(other, x, (n,), w, bias, mean, rstd, rms, "none",
                              (True, True, bias is not None, gate is not None), gate=gate, **v, **streams)


def _run_ada_norm(case, x, other):
    """The launches of an adaLN case as the benchmark calls it (normops.bench): DiT's LayerNorm
    without weight or bias, eps 1e-6, "fp32" casting; scale, shift (and gate) [B, D] in x's dtype.
    With the gated residual, other is r forward; backward it is dy, and every gradient
    bench.bytes_moved counts is asked for (dx, dresidual, dgate, dscale, dshift), h's own absent."""
    b, t, d = case.shape
    gated = case.op == "ada_layer_norm_gate_residual"
    scale, shift = _meta((b, d), case.dtype), _meta((b, d), case.dtype)
    gate = _meta((b, d), case.dtype) if gated else None
    if not ada_norm.supported(x, backward=case.pas == "bwd"):
        raise ValueError(f"D = {d}: the triton backend runs the torch backend's code here, not the kernels")
    if case.pas == "fwd":
        ada_norm.ada_norm_fwd(x, other if gated else None, gate, scale, shift, None, None, 1e-6, False, "fp32", True)
    else:
        mean, rstd = _meta((b, t), torch.float32), _meta((b, t), torch.float32)
        h = _meta(case.shape, case.dtype) if gated else None
        ada_norm.ada_norm_bwd(other, None, x, h, gate, scale, None, None, mean, rstd, False, "fp32",
                              [True, gated, gated, True, True, False, False])


# --- compiling a launch and reading its facts ------------------------------------------------

# fp16 is compiled as bf16: the same widths, loads and reductions (the AOT tables of
# kernels/aot.py show the same registers within a few), at a third fewer compiles.
POINTERS = {torch.float16: "*bf16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
            torch.float8_e4m3fn: "*fp8e4nv", torch.uint8: "*u8", torch.int8: "*i8"}  # float8 codes


def source_key(launch):
    """What the JIT specializes a launch on, hashable: (kernel name, signature, constexprs, aligned
    argument indices, warps, register cap). Pointers are taken 16-byte aligned (the caching
    allocator's), an int is marked divisible by 16 when it is, and an int equal to 1 becomes the
    constant 1, as triton.jit does."""
    fn = launch.kernel
    names = [n for n in fn.arg_names if n not in launch.constexprs]
    assert len(names) == len(launch.args), (fn.fn.__name__, names, len(launch.args))
    sig, consts, aligned = [], dict(launch.constexprs), []
    for name, value in zip(names, launch.args):
        if value is None:
            consts[name] = None
        elif isinstance(value, torch.Tensor):
            sig.append((name, POINTERS[value.dtype]))
            aligned.append(name)
        elif isinstance(value, bool):
            sig.append((name, "i1"))
        elif isinstance(value, float):
            sig.append((name, "fp32"))
        elif value == 1:
            consts[name] = 1
        else:
            sig.append((name, "i32" if -2**31 <= value < 2**31 else "i64"))
            if value % 16 == 0:
                aligned.append(name)
    options = {"num_warps": launch.num_warps} if fn in anchors.KERNELS else launch_options(launch.num_warps)
    return (fn.fn.__module__, fn.fn.__name__, tuple(sig), tuple(sorted(consts.items(), key=str)), tuple(aligned),
            tuple(sorted(options.items())))


_KERNELS = {k.fn.__name__: k for m in (row_norm, group_norm, batch_norm, ada_norm, channels_first, anchors)
            for k in vars(m).values()
            if isinstance(k, triton.runtime.JITFunction)}


def _bin(tool):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the compiled kernel says: per thread registers, stack and local bytes; shared memory a
    program; and per region (loop body or straight-line code) the bytes of global loads a thread
    issues and the barriers, with the load widths seen."""
    regs: int
    stack: int
    local: int
    shared: int
    regions: tuple  # ((load bytes a thread, barriers, is an innermost loop), ...)
    load_widths: tuple


def compile_facts(key, arch):
    """Facts of the launch `key` (source_key) compiled for sm_`arch`, or an error string."""
    try:
        _, name, sig, consts, aligned, options = key
        fn = _KERNELS[name]
        consts = dict(consts)
        signature = {n: "constexpr" if n in consts else dict(sig)[n] for n in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature,
                           constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                           attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(compiled.asm["cubin"])
        try:
            usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([_bin("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
        finally:
            os.unlink(f.name)
        res = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.split("Function", 1)[1])}
        regions, widths = sass_regions(sass)
        return Facts(res["REG"], res.get("STACK", 0), res.get("LOCAL", 0), res.get("SHARED", 0), regions, widths)
    except Exception as e:  # reported per case, the others go on
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


_INSTRUCTION = re.compile(r"/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def sass_regions(sass):
    """((load bytes a thread, barriers, is an innermost loop) per region, load widths): a region is
    the body of a loop (a backward branch's span, less the loops nested in it) or the code outside
    every loop."""
    labels, code, pending = {}, [], []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTRUCTION.search(line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            code.append((addr, m.group(2)))
    loops = []
    for addr, text in code:
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if m and labels.get(m.group(1), addr + 1) <= addr:
            loops.append((labels[m.group(1)], addr))

    def region(addr):  # the innermost loop holding addr, or None
        inside = [lp for lp in loops if lp[0] <= addr <= lp[1]]
        return min(inside, key=lambda lp: lp[1] - lp[0]) if inside else None

    totals, widths = {}, set()
    for addr, text in code:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] if text.split() else ""
        key = region(addr)
        loads, barriers = totals.get(key, (0, 0))
        if op.startswith(("LDG", "LDGSTS")):
            parts = op.split(".")
            width = next((_LOAD_BYTES[p] for p in parts if p in _LOAD_BYTES), 4)
            widths.add(width)
            loads += width
        elif op.startswith("BAR.") and ".ARV" not in op:
            barriers += 1
        totals[key] = (loads, barriers)
    def innermost(lp):
        return lp is not None and not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)

    return tuple((loads, bars, innermost(key)) for key, (loads, bars) in totals.items()), tuple(sorted(widths))


# --- the model -------------------------------------------------------------------------------

def resident(facts, num_warps, gpu):
    """Programs an SM holds at once: registers (allocated 256 a warp at a time), warps, shared memory."""
    regs_warp = -(-max(facts.regs, 1) * 32 // 256) * 256
    by_regs = (gpu.regs // regs_warp) // num_warps
    by_smem = (gpu.smem_kb * 1024) // (facts.shared + 1024) if facts.shared else gpu.programs
    return max(0, min(by_regs, gpu.warps // num_warps, by_smem, gpu.programs))


def latency_bandwidth(facts, num_warps, programs, gpu):
    """Little's law over the streaming regions (bytes/s), and the programs in flight."""
    in_flight = min(programs, gpu.sms * resident(facts, num_warps, gpu))
    threads = 32 * num_warps
    # The innermost loops stream when any loads (the code around them runs once a program, or once
    # a row or group of a persistent program's outer loop); else the rest, a one-pass tile.
    loops = [(loads, bars) for loads, bars, loop in facts.regions if loop and loads]
    regions = loops or [(loads, bars) for loads, bars, _ in facts.regions]
    top = max((loads for loads, _ in regions), default=0)
    streams = [(loads, bars) for loads, bars in regions if top and loads * 4 >= top]
    if not streams or not in_flight:
        return float("inf"), in_flight
    rates = [in_flight * loads * threads / ((DRAM_LATENCY_NS + BARRIER_NS * bars) * 1e-9) for loads, bars in streams]
    return len(rates) / sum(1 / r for r in rates), in_flight


@dataclasses.dataclass
class Prediction:
    case: Case
    time_us: float = 0.0
    pct: float = 0.0
    target: float = None
    launches: list = dataclasses.field(default_factory=list)  # per launch: a dict of what was modelled
    glue: int = 0
    error: str = None
    per_byte: float = None  # a variant's bytes / time over its plain case's (Case.base), or None

    @property
    def slow(self):
        """A variant below VARIANT_SHARE of its plain case's bandwidth per byte."""
        return self.per_byte is not None and self.per_byte < VARIANT_SHARE - 1e-9

    @property
    def failures(self):
        """Why the case fails the check: ERROR, BELOW (its target), GLUE (more than one glue
        launch), SLOW (a variant, per byte); empty when it passes."""
        if self.error is not None:
            return ["ERROR"]
        return ([] if self.target is None or self.pct >= self.target - 1e-9 else ["BELOW"]) + \
            (["GLUE"] if self.glue > 1 else []) + (["SLOW"] if self.slow else [])

    @property
    def ok(self):
        return not self.failures

    @property
    def open(self):
        """An OPEN_SHORTFALLS entry whose only failure is BELOW, at or above its listed %: reported,
        not failed."""
        listed = OPEN_SHORTFALLS.get(self.case.id)
        return listed is not None and self.failures == ["BELOW"] and self.pct >= listed[0] - OPEN_SLACK


def limits(p, gpu):
    """What holds a case's predicted time up, from its launch records: the launches bound by
    Little's law below EFFICIENCY x peak, the bytes re-read from L2, spills, the launches and glue."""
    out, peak = [], EFFICIENCY * gpu.dram_tbps
    for r in p.launches:
        if r.get("latency_tbps") is not None and r["latency_tbps"] < peak:
            out.append(f"{r['kernel'].strip('_')} latency-bound at {r['latency_tbps']:.2f} TB/s "
                       f"({r['in_flight']} programs in flight, {r['resident']} an SM, {r['regs']} regs)")
        if r.get("l2_mb"):
            out.append(f"{r['kernel'].strip('_')} re-reads {r['l2_mb']:.1f} MB from L2")
        if r.get("spill"):
            out.append(f"{r['kernel'].strip('_')} spills {r['spill']} bytes a thread")
    extra = sum(r["us"] for r in p.launches[1:])
    if len(p.launches) > 1:
        out.append(f"{len(p.launches)} launches ({p.glue} glue): {extra:.1f} of {p.time_us:.1f} us after the first")
    return "; ".join(out) or "bandwidth"


def _units(case, span, launch):
    """How many spans of `span` kind x holds (a row of G groups: G spans, program_id(1) the group)."""
    if span == "row":
        return math.prod(case.shape[:-1]) * (launch.grid[1] if len(launch.grid) > 1 else 1)
    if span == "tile":  # channels-first: [C, BLOCK_S] tiles of each sample's positions
        return case.shape[0] * -(-math.prod(case.shape[2:]) // launch.constexprs["BLOCK_S"])
    return case.shape[0] * (case.shape[1] if case.op == "instance_norm" else 32)


def is_glue(launch, case):
    """A Triton launch on no activation-sized tensor (a partials sum, a finalize): glue."""
    activation = math.prod(case.shape)
    return not any(isinstance(a, torch.Tensor) and a.numel() == activation for a in launch.args)


def predict_launches(launches, glue_ops, facts, gpu, case=None):
    """(time in us, per-launch records, glue launches) of an op's launches under the model."""
    peak = gpu.dram_tbps * 1e12
    l2_budget = L2_FRACTION * gpu.l2_mb * 1e6
    seen, footprint, time, records, glue = {}, 0.0, 0.0, [], 0
    for i, launch in enumerate(launches):
        f = facts[source_key(launch)]
        if isinstance(f, str):
            raise RuntimeError(f"{launch.kernel.fn.__name__}: {f}")
        names = [n for n in launch.kernel.arg_names if n not in launch.constexprs]
        tensors = {}
        for name, value in zip(names, launch.args):
            if isinstance(value, torch.Tensor) and id(value) not in tensors:
                tensors[id(value)] = (name, value)
        programs = math.prod(launch.grid)
        dram = l2 = 0.0
        rereads, span = REREADS.get(launch.kernel.fn.__name__, (lambda c: (), None))
        rereads = rereads(launch.constexprs)
        bw_latency, in_flight = latency_bandwidth(f, launch.num_warps, programs, gpu)
        for key, (name, t) in tensors.items():
            size = t.numel() * t.element_size()
            if key in seen:  # touched by an earlier launch of the op
                if footprint - seen[key] <= l2_budget:  # what was touched since, itself included
                    l2 += size
                else:
                    dram += size
            else:
                dram += size
            if name in rereads:
                working = in_flight * sum(v.numel() * v.element_size() for n, v in tensors.values()
                                          if n in rereads) / _units(case, span, launch)
                if working <= l2_budget:
                    l2 += size
                else:
                    dram += size
        spill = (f.stack + f.local) * 32 * launch.num_warps * programs * 2
        dram += spill
        bw = min(EFFICIENCY * peak, bw_latency)
        mem = max(dram / bw, (dram + l2) / (gpu.l2_tbps * 1e12))
        cost = (FIRST_LAUNCH_US if i == 0 else LAUNCH_US) + mem * 1e6
        time += cost
        glued = case is not None and is_glue(launch, case)
        glue += glued
        records.append(dict(kernel=launch.kernel.fn.__name__, grid=list(launch.grid), warps=launch.num_warps,
                            regs=f.regs, spill=f.stack + f.local, resident=resident(f, launch.num_warps, gpu),
                            in_flight=in_flight, barriers=[b for _, b, _ in f.regions],
                            load_bytes=[lb for lb, _, _ in f.regions], widths=list(f.load_widths),
                            dram_mb=dram / 1e6, l2_mb=l2 / 1e6, latency_tbps=min(bw_latency, 1e15) / 1e12,
                            us=cost, glue=glued))
        for key in tensors:
            seen.setdefault(key, footprint)
        footprint += dram
    for name, moved in glue_ops:
        cost = (FIRST_LAUNCH_US if not records else LAUNCH_US) + moved / (EFFICIENCY * peak) * 1e6
        time += cost
        glue += 1
        records.append(dict(kernel=name, us=cost, glue=True, dram_mb=moved / 1e6))
    return time, records, glue


def perfect_pct(ideal_bytes, launches, gpu, dram_bytes=None):
    """% of peak of a perfect kernel: `dram_bytes` (default: the ideal bytes) at EFFICIENCY, and
    the launch costs of `launches` launches."""
    peak = gpu.dram_tbps * 1e12
    t = FIRST_LAUNCH_US + LAUNCH_US * (launches - 1) + (dram_bytes or ideal_bytes) / (EFFICIENCY * peak) * 1e6
    return 100 * ideal_bytes / (t * 1e-6) / peak


def case_target(case, gpu):
    """The target of a case (module docstring), % of peak, or None."""
    absolute = target(case)
    if absolute is None:
        return None
    ideal = case.ideal_bytes()
    two_pass = case.op in ("batch_norm", "batch_norm+relu")
    launches = (TWO_PASS_LAUNCHES if two_pass else IDEAL_LAUNCHES)[case.pas]
    if case.op in GROUP_NORMS:
        groups = case.shape[0] * (case.shape[1] if case.op == "instance_norm" else 32)
        x_bytes = math.prod(case.shape) * case.elem
        reread = x_bytes * (1 if case.pas == "fwd" else 2)  # x (and dy, backward) read twice
        if groups < gpu.sms and reread > L2_FRACTION * gpu.l2_mb * 1e6:
            extra = reread
            return TWO_READ_SHARE * perfect_pct(ideal, TWO_PASS_LAUNCHES[case.pas], gpu, ideal + extra)
    if ideal >= ABSOLUTE_FROM_BYTES:
        return absolute
    return absolute * perfect_pct(ideal, launches, gpu) / (EFFICIENCY * 100)


def predict(cases, gpu, jobs=1):
    """A Prediction per case."""
    runs = {}
    for case in cases:
        try:
            runs[case] = run_case(case, gpu)
        except Exception as e:
            runs[case] = f"{type(e).__name__}: {e}"
    keys = {source_key(lc) for r in runs.values() if not isinstance(r, str) for lc in r[0]}
    facts = compile_all(keys, gpu.arch, jobs)
    out = []
    for case in cases:
        p = Prediction(case, target=case_target(case, gpu))
        if isinstance(runs[case], str):
            p.error = runs[case]
        else:
            try:
                p.time_us, p.launches, p.glue = predict_launches(*runs[case], facts, gpu, case)
                p.pct = 100 * case.ideal_bytes() / (p.time_us * 1e-6) / (gpu.dram_tbps * 1e12)
            except RuntimeError as e:
                p.error = str(e)
        out.append(p)
    by_case = {p.case: p for p in out}
    for p in out:  # % of peak is bytes / time over a constant: its ratio is the ratio per byte
        base = by_case.get(p.case.base)
        if base is not None and p.error is None and base.error is None and base.pct:
            p.per_byte = p.pct / base.pct
        elif p.case.base is not None and p.error is None:
            p.error = f"no plain case {p.case.base.id} to compare per byte"
    return out


def compile_all(keys, arch, jobs):
    keys = sorted(keys, key=str)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        return dict(zip(keys, pool.map(functools.partial(compile_facts, arch=arch), keys)))


# --- the published anchors -------------------------------------------------------------------

# (label, norm, rows, width, dtype, published % of peak): ../shared/perf-anchors.md
LIGER_POINTS = (
    [("Liger RMSNorm bf16, 32768 rows", "rms_norm", 32768, n, torch.bfloat16, pct)
     for n, pct in [(256, 58.1), (512, 63.5), (1024, 77.2), (2048, 84.0), (4096, 86.7), (8192, 84.7),
                    (16384, 79.0), (32768, 85.4), (65536, 19.5)]]
    + [("Liger RMSNorm bf16, 4096 rows", "rms_norm", 4096, n, torch.bfloat16, pct)
       for n, pct in [(1024, 41), (2048, 57), (4096, 69), (8192, 79), (16384, 84)]]
    + [("Liger LayerNorm fp32, 4096 rows", "layer_norm", 4096, n, torch.float32, pct)
       for n, pct in [(1024, 53), (2048, 69), (4096, 79), (8192, 85), (16384, 87)]])
# QuACK's RMSNorm (CuTe DSL, not Triton: nothing to compile) is modelled as what it is published
# to be: one launch, no spills, never latency-bound, i.e. the perfect kernel of perfect_pct.
QUACK_POINTS = [("QuACK RMSNorm bf16", rows, n, pct) for rows, n, pct in
                [(32768, 256, 57), (32768, 512, 69), (32768, 1024, 77), (32768, 2048, 82), (32768, 4096, 87),
                 (32768, 8192, 89), (32768, 16384, 88), (32768, 32768, 89), (32768, 65536, 90),
                 (16384, 131072, 89), (8192, 262144, 84)]]


def anchor_rows(gpu, jobs=1):
    """[(label, width, published %, predicted %, spills)] on the H100 numbers the anchors were
    published on."""
    rows, launches = [], []
    for label, norm, m, n, dtype, pct in LIGER_POINTS:
        x, w = _meta((m, n), dtype), _meta(n, dtype)
        launches.append((label, n, pct, anchors.liger_launch(norm, x, w, w if norm == "layer_norm" else None), x))
    facts = compile_all({source_key(lc) for *_, lc, _ in launches}, gpu.arch, jobs)
    for label, n, pct, launch, x in launches:
        f = facts[source_key(launch)]
        if isinstance(f, str):
            rows.append((label, n, pct, None, f))
            continue
        t, _, _ = predict_launches([launch], [], facts, gpu)
        ideal = 2 * x.numel() * x.element_size()
        rows.append((label, n, pct, 100 * ideal / (t * 1e-6) / (gpu.dram_tbps * 1e12), f.stack + f.local))
    for label, m, n, pct in QUACK_POINTS:
        rows.append((label + f", {m} rows", n, pct, perfect_pct(2 * m * n * 2, 1, gpu), 0))
    return rows


def anchor_misses(rows):
    """The non-spilling published points the model misses by more than ANCHOR_TOLERANCE (relative)."""
    return [r for r in rows if r[4] == 0 and (r[3] is None or abs(r[3] - r[2]) > ANCHOR_TOLERANCE * r[2])]


# ../shared/perf-anchors.md: with its launch cost a bytes model came within ~5% of 17 of the 18
# non-spilling Liger points; one (RMSNorm 16K at 32768 rows, 79% published, a dip none of the
# modelled resources explains) is allowed to stay outside.
ANCHOR_MISSES_ALLOWED = 1


# --- command line ----------------------------------------------------------------------------

def _fmt_case(p):
    c = p.case
    kernels = "+".join(r["kernel"].removeprefix("_").removesuffix("_kernel") for r in p.launches)
    verdict = "+".join(p.failures) or "ok"
    target = f"{p.target:5.1f}" if p.target is not None else "    -"
    per_byte = f"{p.per_byte:5.2f}" if p.per_byte is not None else "    -"
    return (f"{c.id:60} {p.pct:6.1f} {target} {per_byte} {len(p.launches):>3} {p.glue:>4}  {verdict:10}  "
            f"{p.error or kernels}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", default="h100-sxm", choices=sorted(GPUS),
                   help="the GPU whose numbers the model uses (default h100-sxm)")
    p.add_argument("--check", action="store_true", help="exit 1 on a case below target, or an anchor missed")
    p.add_argument("-k", dest="select", default="", help="only cases whose id contains this")
    p.add_argument("--json", help="write every prediction, launch by launch, to this file")
    p.add_argument("--anchors", action="store_true", help="only the published anchors")
    p.add_argument("--acceptance", action="store_true",
                   help="also the cases of benchmarks/acceptance_points.py (the GPU acceptance run's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    gpu = GPUS[args.gpu]
    print(f"roofline for {gpu.name} (sm_{gpu.arch}, {gpu.dram_tbps} TB/s, {gpu.sms} SMs), triton {triton.__version__}")
    failed = False
    if args.gpu.startswith("h100-sxm") or args.anchors:
        rows = anchor_rows(GPUS["h100-sxm"], args.jobs)
        print(f"\n{'published anchor (H100 SXM)':36} {'N':>7} {'pub %':>6} {'model':>6} {'spill':>5}")
        for label, n, pct, pred, spill in rows:
            model = f"{pred:6.1f}" if pred is not None else " error"
            print(f"{label:36} {n:>7} {pct:6.1f} {model} {spill:>5}")
        misses = anchor_misses(rows)
        good = len(misses) <= ANCHOR_MISSES_ALLOWED
        print(f"anchors: {len(rows) - len(misses)} of {len(rows)} within {ANCHOR_TOLERANCE:.0%} "
              f"({len(misses)} non-spilling missed, {ANCHOR_MISSES_ALLOWED} allowed): {'ok' if good else 'FAILED'}")
        failed |= not good
        if args.anchors:
            return 1 if args.check and failed else 0
    cases = [c for c in benchmark_cases(args.acceptance) if args.select in c.id]
    cases = list(dict.fromkeys(cases + [c.base for c in cases if c.base]))  # a variant's plain case too
    preds = predict(cases, gpu, args.jobs)
    print(f"\n{'case':60} {'pred %':>6} {'target':>5} {'/byte':>5} {'lch':>3} {'glue':>4}  {'':10}  kernels")
    for pred in preds:
        print(_fmt_case(pred))
    below = [pred for pred in preds if not pred.ok and not pred.open]
    known = [pred for pred in preds if pred.open]
    stale = [pred for pred in preds if pred.ok and pred.case.id in OPEN_SHORTFALLS]
    print(f"/byte: a row-norm variant's bandwidth per byte over plain {VARIANT_BASE}'s (same shape, dtype, pass); "
          f"target {VARIANT_SHARE}")
    if known:
        print(f"\nopen shortfalls ({len(known)}, OPEN_SHORTFALLS): case, predicted % / target, listed %, why")
        for q in known:
            listed, why = OPEN_SHORTFALLS[q.case.id]
            print(f"  {q.case.id}: {q.pct:.1f} / {q.target:.1f}, listed {listed:.1f}: {why}")
    if below:
        print(f"\nfailing ({len(below)}): case, predicted % / target, why, what limits it")
        for q in below:
            target = f"{q.target:.1f}" if q.target is not None else "-"
            why = "+".join(q.failures) + (" (below its OPEN_SHORTFALLS %)" if q.case.id in OPEN_SHORTFALLS else "")
            print(f"  {q.case.id}: {q.pct:.1f} / {target} {why}: {q.error or limits(q, gpu)}")
    if stale:
        print(f"\nstale OPEN_SHORTFALLS entries ({len(stale)}, now at or above target: remove them): "
              + ", ".join(q.case.id for q in stale))
    print(f"{len(preds) - len(below) - len(known)} of {len(preds)} cases at or above target"
          + (f", {len(known)} open shortfalls" if known else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": dataclasses.asdict(gpu), "triton": triton.__version__, "cases": [
                {"id": q.case.id, "op": q.case.op, "shape": q.case.shape, "dtype": str(q.case.dtype),
                 "pass": q.case.pas, "predicted_pct": q.pct, "predicted_us": q.time_us, "target_pct": q.target,
                 "per_byte_vs_plain": q.per_byte,
                 "glue": q.glue, "error": q.error, "launches": q.launches} for q in preds]}, f, indent=1)
    failed |= bool(below) or bool(stale)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
