"""pytest-benchmark suites: normops against torch (eager and compiled), one bench_*.py per norm family.

    python -m pytest benchmarks                                     # time every case, table per group
    python -m pytest benchmarks --benchmark-json=results.json       # ... and keep the records
    python -m pytest benchmarks --benchmark-disable -q              # smoke test: every case run once (CI)
    python -m pytest benchmarks -k "rms_norm and 4096x8192"         # a subset

benchmarks/pytest.ini is found by these commands (it becomes the rootdir), so `python -m pytest tests`
never collects the suites.

A case is (op, shape, layout, dtype, pass, provider), the cases of normops.bench plus a layout.
Each bench_*.py names its sets of (ops, shapes, layouts): CUDA_SETS run on a GPU in fp32, bf16 and
fp16; without CUDA the small CPU_SETS run in fp32 only; each in every pass its op has (an in-place
op: fwd only). Providers are normops, torch and compile; torch.compile is left out on the CPU
(minutes of compiling for tiny shapes) unless NORMOPS_BENCH_COMPILE=1, and NORMOPS_BENCH_COMPILE=0
leaves it out on a GPU too.
NORMOPS_BENCH_ROUNDS (default 20) and NORMOPS_BENCH_WARMUP (default 3) set the timed and untimed
calls per case, the defaults of normops.bench.time_runner.

Cases sharing a group ("<op>-<shape>[-<layout>]-<dtype>-<pass>") differ only by provider, so the
table puts them side by side. Each record's extra_info carries bytes, GB/s and % of the copy
bandwidth (normops.bench.extra_info), the device and versions, the layout and median/p20/p80.
"""
import dataclasses
import gc
import os
import statistics

import pytest
import torch

from normops import bench
from normops.core import case_id

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    shape: tuple
    layout: str
    dtype: torch.dtype
    pas: str
    provider: str

    @property
    def memory_format(self):
        return bench.memory_format(self.layout, len(self.shape))

    @property
    def group(self):
        """What the providers are compared on: everything but the provider."""
        return case_id(self.op, self.shape, self.layout, self.dtype, self.pas)

    @property
    def id(self):
        return f"{self.group}-{self.provider}"


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _providers(device):
    compile_ = os.environ.get("NORMOPS_BENCH_COMPILE", "1" if device == "cuda" else "0") == "1"
    return tuple(p for p in bench.PROVIDERS if compile_ or p != "compile")


def pytest_generate_tests(metafunc):
    """Parametrize a bench file's `case` argument from its CUDA_SETS or CPU_SETS."""
    if "case" not in metafunc.fixturenames:
        return
    device = _device()
    sets = metafunc.module.CUDA_SETS if device == "cuda" else metafunc.module.CPU_SETS
    dtypes = DTYPES if device == "cuda" else (torch.float32,)
    # torch.compile compiles every case from scratch (seconds each): it is timed on the pass users
    # train with, fwd+bwd (an in-place op's fwd), unless NORMOPS_BENCH_COMPILE_ALL_PASSES=1. That
    # keeps a full GPU run to 1944 cases, 288 of them compiled, instead of 2484 with 828.
    all_passes = os.environ.get("NORMOPS_BENCH_COMPILE_ALL_PASSES") == "1"
    cases = [Case(op, tuple(shape), layout, dtype, pas, provider)
             for ops, shapes, layouts in sets for op in ops for shape in shapes for layout in layouts
             for dtype in dtypes for pas in bench.OPS[op].passes for provider in _providers(device)
             if provider != "compile" or pas == bench.OPS[op].passes[-1] or all_passes]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def make_runner(case, device):
    """normops.bench.make_runner for the case, in the case's layout."""
    if case.provider == "compile":
        # Each compile case starts from a clean dynamo cache: otherwise every case after the first
        # recompiles the same ref lambda, its shapes turn dynamic, and past the recompile limit
        # dynamo silently falls back to eager.
        torch._dynamo.reset()
    return bench.make_runner(case.op, case.shape, case.dtype, device, case.provider, case.pas,
                             memory_format=case.memory_format)


def _is_oom(exc):
    """A CUDA out-of-memory error, raised directly or wrapped (torch.compile wraps what its backend raises)."""
    while exc is not None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _time(benchmark, case, device):
    """Build the case's runner and time it; the runner's tensors are freed when this returns."""
    torch.manual_seed(0)
    run = make_runner(case, device)
    # Disabled (--benchmark-disable), pedantic calls run once and records nothing.
    benchmark.pedantic(run, rounds=int(os.environ.get("NORMOPS_BENCH_ROUNDS", 20)),
                       warmup_rounds=int(os.environ.get("NORMOPS_BENCH_WARMUP", 3)), iterations=1)


@pytest.fixture
def measure(benchmark):
    """measure(case): time one case under pytest-benchmark and fill its record's extra_info."""
    device = _device()

    def measure(case):
        benchmark.group = case.group
        oom = False
        try:
            _time(benchmark, case, device)
        except Exception as e:
            if not _is_oom(e):
                raise
            oom = True
        if oom:  # outside the except block, so the traceback no longer holds the tensors
            gc.collect()
            torch.cuda.empty_cache()
            pytest.skip(f"out of GPU memory: {case.id}")
        if not benchmark.stats:  # benchmarks disabled
            return
        times = sorted(t * 1e3 for t in benchmark.stats.stats.data)  # seconds -> ms
        median = statistics.median(times)
        q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0]] * 4  # as bench.time_runner
        benchmark.extra_info.update(bench.extra_info(case.op, case.shape, case.dtype, device, case.provider,
                                                     case.pas, median))
        benchmark.extra_info.update(layout=case.layout, median_ms=median, p20_ms=q[0], p80_ms=q[3])

    return measure
