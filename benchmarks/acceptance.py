"""The performance points of the kernel issues (#3 row norms, #4 GroupNorm/InstanceNorm, #5
BatchNorm), measured in one bounded call on a GPU, with a verdict for each point.

    python benchmarks/acceptance.py [--out DIR] [--budget SECONDS] [--families row_norm,group_norm,batch_norm]
                                    [--dtype bfloat16] [--warm-jobs N] [--tests] [--no-compile] [--smoke]

A lent GPU here has 15 minutes of device time, starting the machine included. The pytest-benchmark
suites (benchmarks/bench_*.py) time 1134 cases, 162 of them under torch.compile, each by the host
clock: they do not fit. This times the cases the points name, and nothing else:
  1. with --tests, the Triton CUDA tests (and `normops check --device cuda`) start in the
     background, under pytest-xdist where it is installed, while
  2. --warm-jobs processes call every case once (normops and torch.compile), filling Triton's and
     Inductor's on-disk caches in parallel, so that the timed pass compiles nothing;
  3. once both are done, the timed pass runs alone on the GPU, point by point, until the budget is
     spent: normops.bench.time_events (CUDA events around back-to-back calls, inputs rotating
     through enough copies that none is in L2);
  4. each point gets PASS, MISS or INCOMPLETE (cases left unmeasured, none missed) and its worst
     measured value.
Written as it comes, under --out: acceptance.jsonl (a record per timed case, flushed at once, so
a run killed at a time limit keeps what it measured), then acceptance.json and acceptance.md (the
table, printed last); tests.log and check.log with --tests.

--smoke maps every shape to a tiny one and runs on the CPU: it exercises this script (CI does,
through tests/test_acceptance.py), it measures nothing.
"""
import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import threading
import time

import torch

from normops import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: tests/ and benchmarks/results/
# --- the points --------------------------------------------------------------------------------

TOKENS = 4096  # the rows of every row-norm point (#3: "H100, bf16, 4096 rows")
SD_UNET = [(2, 320, 64, 64), (2, 1280, 16, 16)]  # #4, 32 groups
VIDEO = (1, 128, 8, 256, 256)  # #4, the small-batch video shape, 32 groups
STYLE = [(1, 64, 256, 256), (4, 128, 128, 128), (4, 256, 64, 64)]  # #4, InstanceNorm2d
RESNET50 = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)]  # #5
LAYOUTS = ("contiguous", "channels_last")


@dataclasses.dataclass(frozen=True)
class Case:
    """What one timed call is: an op of normops.bench on a shape, layout and pass, by a provider."""
    op: str
    shape: tuple
    layout: str
    pas: str
    provider: str = "normops"

    def by(self, provider):
        return dataclasses.replace(self, provider=provider)

    @property
    def label(self):
        layout = "" if self.layout == "contiguous" else " cl"
        return f"{self.op} {'x'.join(map(str, self.shape))}{layout} {self.pas}"


@dataclasses.dataclass(frozen=True)
class Check:
    """One measured condition, value >= bound:
        "pct"      normops' GB/s on `case` as a percentage of the measured copy bandwidth
        "speedup"  time of `case` by provider `against` / time by normops
        "per_byte" normops' GB/s on `case` / its GB/s on the case `against` (a fused op against
                   the plain one: 0.95 = at most 5% dearer per byte)"""
    kind: str
    case: Case
    bound: float
    against: object = None

    def cases(self):
        other = self.case.by(self.against) if self.kind == "speedup" else self.against
        return [self.case] + ([other] if other is not None else [])


@dataclasses.dataclass(frozen=True)
class Point:
    issue: int
    text: str
    checks: tuple


def _rows(op, widths, pas):
    return [Case(op, (TOKENS, w), "contiguous", pas) for w in widths]


def points(families):
    """The performance sections of issues #3, #4 and #5, as checks on cases."""
    out = []
    if "row_norm" in families:
        k = 1024
        fwd, fwd_wide, bwd = [k * i for i in (1, 2, 4, 8, 16, 32, 64)], [128 * k, 256 * k], [k * i for i in (1, 2, 4, 8, 16, 32)]
        fast, compiled, narrow = [4 * k, 8 * k, 16 * k, 32 * k, 64 * k, 256 * k], [4 * k, 16 * k, 64 * k], [128, 256, 512, k]
        norms = ("layer_norm", "rms_norm")
        out += [
            Point(3, "forward >= 85% of copy bandwidth, widths 1K-64K",
                  tuple(Check("pct", c, 85) for op in norms for c in _rows(op, fwd, "fwd"))),
            Point(3, "forward >= 70% of copy bandwidth, widths 128K-256K",
                  tuple(Check("pct", c, 70) for op in norms for c in _rows(op, fwd_wide, "fwd"))),
            Point(3, "backward (dx, dw, db) >= 70% of copy bandwidth, widths 1K-32K",
                  tuple(Check("pct", c, 70) for op in norms for c in _rows(op, bwd, "bwd"))),
            Point(3, "fwd+bwd >= 1.5x torch.nn at widths >= 4K",
                  tuple(Check("speedup", c, 1.5, "torch") for op in norms for c in _rows(op, fast, "fwd+bwd"))),
            Point(3, "fwd+bwd >= 1.2x torch.compile at widths >= 4K",
                  tuple(Check("speedup", c, 1.2, "compile") for op in norms for c in _rows(op, compiled, "fwd+bwd"))),
            Point(3, "never slower than torch.nn at widths 128-1K (fwd, fwd+bwd)",
                  tuple(Check("speedup", c, 1.0, "torch") for op in norms for pas in ("fwd", "fwd+bwd")
                        for c in _rows(op, narrow, pas))),
            Point(3, "add+RMSNorm costs at most 5% more per byte than RMSNorm (fwd, fwd+bwd, 1K-64K)",
                  tuple(Check("per_byte", c, 0.95, dataclasses.replace(c, op="rms_norm"))
                        for pas in ("fwd", "fwd+bwd") for c in _rows("add_rms_norm", fwd, pas))),
        ]
    if "group_norm" in families:
        sd = [Case("group_norm", s, layout, "fwd+bwd") for layout in LAYOUTS for s in SD_UNET]
        gn_shapes = [(s, layout) for layout in LAYOUTS for s in SD_UNET] + [(VIDEO, "contiguous")]
        out += [
            Point(4, "GroupNorm fwd+bwd >= 3x torch.nn on the SD U-Net shapes, NCHW",
                  tuple(Check("speedup", c, 3.0, "torch") for c in sd if c.layout == "contiguous")),
            Point(4, "GroupNorm fwd+bwd >= 5x torch.nn on the SD U-Net shapes, channels_last",
                  tuple(Check("speedup", c, 5.0, "torch") for c in sd if c.layout == "channels_last")),
            Point(4, "GroupNorm fwd+bwd >= 10x torch.nn on the small-batch video shape",
                  (Check("speedup", Case("group_norm", VIDEO, "contiguous", "fwd+bwd"), 10.0, "torch"),)),
            Point(4, "GroupNorm+SiLU fwd+bwd >= 3x torch.nn GroupNorm then F.silu",
                  tuple(Check("speedup", Case("group_norm+silu", s, layout, "fwd+bwd"), 3.0, "torch")
                        for s, layout in gn_shapes)),
            Point(4, "GroupNorm forward >= 75% of copy bandwidth on those shapes",
                  tuple(Check("pct", Case("group_norm", s, layout, "fwd"), 75) for s, layout in gn_shapes)),
            Point(4, "GroupNorm backward >= 65% of copy bandwidth on those shapes",
                  tuple(Check("pct", Case("group_norm", s, layout, "bwd"), 65) for s, layout in gn_shapes)),
            Point(4, "InstanceNorm2d fwd+bwd >= 3x torch.nn on the style-transfer shapes",
                  tuple(Check("speedup", Case("instance_norm", s, "contiguous", "fwd+bwd"), 3.0, "torch")
                        for s in STYLE)),
        ]
    if "batch_norm" in families:
        def bn(op, layout, pas):
            return [Case(op, s, layout, pas) for s in RESNET50]
        out += [
            Point(5, "BatchNorm2d training fwd+bwd within 10% of cuDNN, channels_last",
                  tuple(Check("speedup", c, 1 / 1.1, "torch") for c in bn("batch_norm", "channels_last", "fwd+bwd"))),
            Point(5, "BatchNorm2d training fwd+bwd >= 1.5x cuDNN, NCHW",
                  tuple(Check("speedup", c, 1.5, "torch") for c in bn("batch_norm", "contiguous", "fwd+bwd"))),
            Point(5, "BatchNorm2d+ReLU fwd+bwd >= 1.3x torch.nn BatchNorm2d then ReLU",
                  tuple(Check("speedup", c, 1.3, "torch") for layout in LAYOUTS
                        for c in bn("batch_norm+relu", layout, "fwd+bwd"))),
            Point(5, "training forward >= 70% of copy bandwidth (2 reads + 1 write)",
                  tuple(Check("pct", c, 70) for layout in LAYOUTS for c in bn("batch_norm", layout, "fwd"))),
            Point(5, "inference forward >= 85% of copy bandwidth",
                  tuple(Check("pct", c, 85) for layout in LAYOUTS for c in bn("batch_norm_eval", layout, "fwd"))),
        ]
    return out


def smoke_points(families):
    """points() on tiny shapes: every dim at most 4 (rows: 8 x width / 1024)."""
    def small(case):
        shape = (8, max(1, case.shape[1] // 1024)) if case.op in ("layer_norm", "rms_norm", "add_rms_norm") else \
            (min(case.shape[0], 2), 32) + tuple(min(d, 4) for d in case.shape[2:])
        return dataclasses.replace(case, shape=shape)

    def check(c):
        against = small(c.against) if isinstance(c.against, Case) else c.against
        return dataclasses.replace(c, case=small(c.case), against=against)
    return [dataclasses.replace(p, checks=tuple(check(c) for c in p.checks)) for p in points(families)]


def all_cases(pts, compile_=True):
    """Every case the points need, once, in the points' order."""
    cases = {c: None for p in pts for check in p.checks for c in check.cases()}
    return [c for c in cases if compile_ or c.provider != "compile"]


# --- measuring ---------------------------------------------------------------------------------

def _memory_format(case):
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return formats.get(len(case.shape), torch.contiguous_format) if case.layout == "channels_last" \
        else torch.contiguous_format


def _runner(case, dtype, device, sync, copies=None):
    return bench.make_runner(case.op, case.shape, dtype, device, case.provider, case.pas,
                             memory_format=_memory_format(case), sync=sync, copies=copies)


def measure(case, dtype, device, peak):
    """A record of one case: its times (or its error) and the derived GB/s and % of peak."""
    rec = {"op": case.op, "shape": list(case.shape), "layout": case.layout, "pass": case.pas,
           "provider": case.provider, "dtype": str(dtype).replace("torch.", "")}
    try:
        torch.manual_seed(0)
        run = _runner(case, dtype, device, sync=False)
        rec.update(bench.time_events(run, device))
        del run
    except Exception as e:  # an OOM or a compile failure is a record, and the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    gc.collect()  # the runner's tensors go before the next case allocates its own
    if "error" in rec:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # outside the except block: the traceback no longer holds them
        return rec
    moved = bench.bytes_moved(bench.OPS[case.op], case.shape, dtype, case.pas)
    gbps = moved / (rec["median_ms"] * 1e-3) / 1e9
    rec.update(bytes=moved, gbps=gbps, pct_of_peak=100 * gbps / peak)
    return rec


def warm(cases, dtype, device):
    """Call each case once (compiling its kernels into the on-disk caches); failures are left
    for the timed pass to record."""
    for case in cases:
        try:
            run = _runner(case, dtype, device, sync=True, copies=1)  # one input set: compiling is the point
            run()
            del run
        except Exception as e:
            print(f"warm {case}: {type(e).__name__}: {e}"[:300], flush=True)


def _warm_parallel(args, jobs, deadline):
    """--warm-jobs subprocesses of this script, each warming every jobs-th case."""
    base = [sys.executable, os.path.abspath(__file__), "--dtype", args.dtype, "--families", args.families,
            "--device", str(args.device)] + (["--smoke"] if args.smoke else []) + (["--no-compile"] if args.no_compile else [])
    procs = [subprocess.Popen(base + ["--warm-shard", f"{i}/{jobs}"]) for i in range(jobs)]
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            print("warm-up: a shard ran out of time; its cases compile in the timed pass", flush=True)


def _run_logged(cmd, log, deadline):
    """Run cmd with its output in log; its exit code, or 'timeout' when killed at the deadline."""
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            return p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            return "timeout"


def _tests(out, deadline, results):
    """The Triton tests on CUDA, then normops check; exit codes into results."""
    try:
        import xdist  # noqa: F401
        parallel = ["-n", "8"]
    except ImportError:
        parallel = []
    files = [os.path.join("tests", f"test_triton_{f}.py") for f in ("row_norm", "group_norm", "batch_norm")]
    results["tests"] = _run_logged([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", *parallel],
                                   os.path.join(out, "tests.log"), deadline)
    results["check"] = _run_logged([sys.executable, "-m", "normops.cli", "check", "--device", "cuda"],
                                   os.path.join(out, "check.log"), deadline)


# --- verdicts ----------------------------------------------------------------------------------

def check_value(check, results):
    """The check's value from the measured records (keyed by Case), or None if not measured."""
    rec = results.get(check.case)
    if rec is None or "error" in rec:
        return None
    if check.kind == "pct":
        return rec["pct_of_peak"]
    other = results.get(check.case.by(check.against) if check.kind == "speedup" else check.against)
    if other is None or "error" in other:
        return None
    return other["median_ms"] / rec["median_ms"] if check.kind == "speedup" else rec["gbps"] / other["gbps"]


def verdict(point, results):
    """(PASS | MISS | INCOMPLETE, worst measured check or None, its value, measured count)."""
    values = [(c, check_value(c, results)) for c in point.checks]
    measured = [(c, v) for c, v in values if v is not None]
    worst = min(measured, key=lambda cv: cv[1] / cv[0].bound, default=(None, None))
    if any(v < c.bound for c, v in measured):
        status = "MISS"
    else:
        status = "PASS" if len(measured) == len(values) else "INCOMPLETE"
    return status, worst[0], worst[1], len(measured)


def _fmt_value(check, value):
    if value is None:
        return "-"
    return f"{value:.0f}%" if check.kind == "pct" else f"{value:.2f}x"


def report(pts, results, env, extra):
    """The markdown summary: environment, then a row per point."""
    lines = [f"# Acceptance run: {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, triton {env['triton']}, normops {env['normops']}; dtype {env['dtype']}; "
             f"copy bandwidth {env['copy_gbps']:.0f} GB/s; {extra}", "",
             "| issue | point | verdict | worst case | value | bound | measured |",
             "|---|---|---|---|---|---|---|"]
    for p in pts:
        status, check, value, n = verdict(p, results)
        case = check.case.label + (f" vs {check.against}" if check and check.kind == "speedup" else "") if check else "-"
        bound = _fmt_value(check, check.bound) if check else "-"
        lines.append(f"| #{p.issue} | {p.text} | {status} | {case} | {_fmt_value(check, value) if check else '-'} "
                     f"| {bound} | {n}/{len(p.checks)} |")
    errors = [r for r in results.values() if "error" in r]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['op']} {r['shape']} {r['layout']} {r['pass']} {r['provider']}: "
                                    f"{r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------

def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: benchmarks/results/<gpu>-<date>)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole run; cases left when it is spent are not measured")
    p.add_argument("--families", default="row_norm,group_norm,batch_norm")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16; float32 with --smoke (CPU BatchNorm takes no bf16 with fp32 running stats)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warm-jobs", type=int, default=8, help="parallel warm-up processes (0: none)")
    p.add_argument("--warm-budget", type=float, default=150.0, help="seconds at most for the warm-up and tests")
    p.add_argument("--tests", action="store_true", help="run the Triton CUDA tests and normops check during the warm-up")
    p.add_argument("--no-compile", action="store_true", help="leave the torch.compile cases out")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: exercises the script, measures nothing")
    p.add_argument("--warm-shard", help=argparse.SUPPRESS)  # i/n: a warm-up subprocess
    args = p.parse_args(argv)
    if args.smoke and args.device == "cuda":
        args.device = "cpu"
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.device = torch.device(args.device)
    return args


def main(argv=None):
    start = time.time()
    args = _args(argv)
    families = args.families.split(",")
    pts = smoke_points(families) if args.smoke else points(families)
    dtype = getattr(torch, args.dtype)
    cases = all_cases(pts, compile_=not args.no_compile)
    if args.warm_shard:
        i, n = map(int, args.warm_shard.split("/"))
        warm([c for c in cases[i::n] if c.provider != "torch"], dtype, args.device)
        return 0
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("acceptance: CUDA is not available (use --smoke for a CPU run of the script)", file=sys.stderr)
        return 2
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "".join(
        ch if ch.isalnum() or ch in "._-" else "-" for ch in bench.device_name(args.device)) + time.strftime("-%Y-%m-%d"))
    os.makedirs(out, exist_ok=True)
    deadline = start + args.budget
    results, side = {}, {}
    tests = None
    if args.tests:
        tests = threading.Thread(target=_tests, args=(out, start + args.warm_budget, side))
        tests.start()
    print(f"acceptance: {len(pts)} points, {len(cases)} cases; warm-up with {args.warm_jobs} jobs", flush=True)
    if args.warm_jobs:
        _warm_parallel(args, args.warm_jobs, start + args.warm_budget)
    if tests is not None:
        tests.join()
        print(f"tests: {side.get('tests')}, check: {side.get('check')} (logs in {out})", flush=True)
    env = dict(bench.environment(args.device), dtype=args.dtype, copy_gbps=bench.copy_bandwidth(str(args.device)))
    print(f"warm-up done at {time.time() - start:.0f} s; copy bandwidth {env['copy_gbps']:.0f} GB/s", flush=True)
    with open(os.path.join(out, "acceptance.jsonl"), "w") as f:
        f.write(json.dumps({"environment": env}) + "\n")
        for i, case in enumerate(cases):
            if time.time() > deadline:
                print(f"budget spent: {len(cases) - i} cases not measured", flush=True)
                break
            rec = measure(case, dtype, args.device, env["copy_gbps"])
            results[case] = rec
            f.write(json.dumps(rec) + "\n")
            f.flush()
            value = rec.get("error") or f"{rec['median_ms']:.4f} ms  {rec['pct_of_peak']:.0f}%"
            print(f"[{i + 1}/{len(cases)}] {case.label} {case.provider}: {value}", flush=True)
    extra = f"{len(results)}/{len(cases)} cases in {time.time() - start:.0f} s"
    if args.tests:
        extra += f"; tests exit {side.get('tests')}, normops check exit {side.get('check')}"
    text = report(pts, results, env, extra)
    with open(os.path.join(out, "acceptance.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "acceptance.json"), "w") as f:
        json.dump({"environment": env, "records": list(results.values()),
                   "points": [dict(issue=p.issue, point=p.text, verdict=verdict(p, results)[0]) for p in pts]}, f, indent=1)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
