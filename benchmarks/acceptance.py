"""The performance points of the kernel issues (#3 row norms, #4 GroupNorm/InstanceNorm, #5
BatchNorm, #17 the language-model row-norm variants, #18 adaLN), measured in one bounded call on a GPU, with a verdict for each point.

    python benchmarks/acceptance.py [--out DIR] [--mirror DIR] [--budget SECONDS] [--tests]
                                    [--families row_norm,group_norm,batch_norm] [--dtype bfloat16]
                                    [--warm-jobs N] [--no-compile] [--smoke]

A lent GPU here has 15 minutes of device time, starting the machine included. The pytest-benchmark
suites (benchmarks/bench_*.py) time 1134 cases, 162 of them under torch.compile, each by the host
clock: they do not fit. This times the cases the points name, and nothing else:
  1. with --tests, the Triton CUDA tests and `normops check --device cuda` start in the
     background (pytest-xdist where it is installed), while
  2. --warm-jobs processes call every case once (normops and torch.compile), filling Triton's and
     Inductor's on-disk caches in parallel, so that the timed pass compiles nothing;
  3. once all that is done or out of its --warm-budget, the timed pass runs alone on the GPU, one
     subprocess per family and torch.compile's cases last (a crash, or a CUDA error that kills the
     context, costs one family), until --budget is spent. Each case is timed by
     normops.bench.time_events: GPU time per call of back-to-back calls between CUDA events, the
     stream held while the host queues them, inputs rotating through enough copies that none is
     in L2; the host-paced time is recorded too (`host_bound` where it is 10% slower);
  4. each point gets PASS, MISS (a check under its bound), ERROR (a case failed, none missed) or
     INCOMPLETE (cases not measured), with its worst measured check.
Written as it comes, under --out and copied into --mirror (the device tool's $OUT): acceptance.jsonl
(a record per timed case, flushed at once), then acceptance.json and acceptance.md (the table,
printed last); tests.log and check.log with --tests. A watchdog writes the report from what was
measured and exits at --budget + 60 s, should anything hang.

--smoke maps every shape to a tiny one and runs on the CPU: it exercises this script (CI does,
through tests/test_acceptance.py), it measures nothing.
"""
import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from normops import bench
from normops.core import case_id

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: tests/ and benchmarks/results/
if HERE not in sys.path:  # imported by path (tests/cases.benchmark_script) rather than run
    sys.path.insert(0, HERE)
from acceptance_points import Case, all_cases, points, smoke_points, verdict  # noqa: E402


# --- measuring ---------------------------------------------------------------------------------

def _runner(case, dtype, device, sync, copies=None):
    return bench.make_runner(case.op, case.shape, dtype, device, case.provider, case.pas,
                             memory_format=bench.memory_format(case.layout, len(case.shape)), sync=sync, copies=copies)


# CUDA errors after which the process's context is unusable: the timed pass stops there.
STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
          "illegal instruction", "launch timed out", "hardware stack error", "invalid program counter",
          "not supported on global/shared address space")


def _sticky(text):
    """Whether an error's text names one of the STICKY CUDA errors."""
    return any(s in text for s in STICKY)


def _record_of(case):
    """What a record says of its case (load() builds the case back from it)."""
    return {"op": case.op, "shape": list(case.shape), "layout": case.layout, "pass": case.pas,
            "provider": case.provider, "case_dtype": case.dtype}


def _dtype(case, default):
    return getattr(torch, case.dtype) if case.dtype else default


def measure(case, dtype, device, peak):
    """A record of one case: its times (or its error) and the derived GB/s and % of peak, from
    the GPU time (bench.time_events); `host_bound` when the host-paced loop is 10% slower."""
    dtype = _dtype(case, dtype)
    rec = dict(_record_of(case), dtype=str(dtype).replace("torch.", ""))
    try:
        torch.manual_seed(0)
        run = _runner(case, dtype, device, sync=False)
        rec.update(bench.time_events(run, device))
        del run
    except Exception as e:  # an OOM or a compile failure is a record, and the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    gc.collect()  # the runner's tensors go before the next case allocates its own
    if "error" in rec:
        if device.type == "cuda" and not _sticky(rec["error"]):
            try:
                torch.cuda.empty_cache()  # outside the except block: the traceback no longer holds them
            except RuntimeError as e:  # a sticky error STICKY does not know
                rec["error"] += f"; then {e}"[:200]
        return rec
    if case.provider == "torch" and case.op.startswith("batch_norm"):
        rec["torch_backend"] = _batch_norm_backend(case, dtype, device)
    moved = bench.bytes_moved(bench.OPS[case.op], case.shape, dtype, case.pas)
    gbps = moved / (rec["median_ms"] * 1e-3) / 1e9
    rec.update(bytes=moved, gbps=gbps, pct_of_peak=100 * gbps / peak, host_bound=rec["wall_ms"] > 1.1 * rec["median_ms"])
    return rec


def _batch_norm_backend(case, dtype, device):
    """Which of its kernels torch's batch_norm runs on the case (cuDNN, MIOpen or native), or None."""
    try:
        t = bench.OPS[case.op].make(case.shape, dtype, device)
        x = t["x"].contiguous(memory_format=bench.memory_format(case.layout, len(case.shape)))
        return str(torch._C._select_batch_norm_backend(x, t["w"], t["b"], t["rm"], t["rv"],
                                                       case.op != "batch_norm_eval", 1e-5)).split(".")[-1]
    except Exception:  # a private function: absent or changed in another torch
        return None


def _unusable(rec):
    """Whether the error of a record left the CUDA context unusable."""
    return _sticky(rec.get("error", "")) or "; then " in rec.get("error", "")


def timed(cases, dtype, device, peak, jsonl, deadline):
    """The timed pass over the cases jsonl has no record of yet (a pass started again after a
    crash goes on from there), a record appended per case, until the deadline or a CUDA error
    that leaves the context unusable."""
    done = load(jsonl)[1]
    cases = [c for c in cases if c not in done]
    with open(jsonl, "a") as f:
        for i, case in enumerate(cases):
            if time.time() > deadline:
                print(f"budget spent: {len(cases) - i} cases not measured", flush=True)
                return 0
            rec = measure(case, dtype, device, peak)
            f.write(json.dumps(rec) + "\n")
            f.flush()
            value = rec.get("error") or (f"{rec['median_ms']:.4f} ms, {rec['pct_of_peak']:.0f}% of peak"
                                         f"{' (host-bound: ' + format(rec['wall_ms'], '.4f') + ' ms)' if rec['host_bound'] else ''}")
            print(f"[{i + 1}/{len(cases)}] {case.label} {case.provider}: {value}", flush=True)
            if _unusable(rec):
                print("a CUDA error left the context unusable: this pass stops", flush=True)
                return 3
    return 0


def warm(cases, dtype, device):
    """Call each case once (compiling its kernels into the on-disk caches); failures are left
    for the timed pass to record."""
    for case in cases:
        try:
            run = _runner(case, _dtype(case, dtype), device, sync=True, copies=1)  # one input set: compiling is the point
            run()
            del run
        except Exception as e:
            print(f"warm {case}: {type(e).__name__}: {e}"[:300], flush=True)
            if _sticky(str(e)):
                return


# Subprocesses compile and test beside each other during the warm-up: one Inductor compile thread
# and one OpenMP thread each, so that 16 cores are not asked for 100 threads.
QUIET = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _base_command(args):
    return [sys.executable, os.path.abspath(__file__), "--dtype", args.dtype, "--device", str(args.device)] + \
        (["--smoke"] if args.smoke else []) + (["--no-compile"] if args.no_compile else [])


CHILDREN = []  # every subprocess started: stopped with this process (watchdog, SIGTERM)


def _spawn(cmd, log=None, env=None):
    """A subprocess in a session of its own (so that its children can be stopped with it), run
    from the repository, its output in `log` (else this process's)."""
    out = open(log, "w") if log else None
    try:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, cwd=ROOT,
                             start_new_session=True, env=dict(os.environ, **(env or {})))
    finally:
        if out:
            out.close()
    CHILDREN.append(p)
    return p


def _stop(procs, grace=0.0):
    """Stop the subprocesses that still run, all at once, each with its session: SIGINT first when
    `grace` (pytest then prints what failed so far), SIGKILL after."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        running = [p for p in procs if p.poll() is None]
        if not running or not wait:
            continue
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + wait
        for p in running:
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                pass


def _wait(procs, deadline, grace=0.0):
    """{name: exit code} of subprocesses waited for until the deadline; those still running then
    are stopped (_stop) and get "timeout"."""
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    late = [n for n in procs if n not in codes]
    _stop([procs[n] for n in late], grace)
    for n in late:
        print(f"{n}: stopped at its deadline", flush=True)
        codes[n] = "timeout"
    return codes


def _side_runs(out, deadline, results):
    """The Triton tests on CUDA (pytest-xdist where installed) and normops check, side by side;
    their exit codes (or "timeout") into results."""
    try:
        import xdist  # noqa: F401
        parallel = ["-n", "8"]
    except ImportError:
        parallel = []
    files = [os.path.join("tests", f"test_triton_{f}.py") for f in ("row_norm", "group_norm", "batch_norm")]
    pytest = [sys.executable, "-m", "pytest", *files, "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider", *parallel]
    procs = {"tests": _spawn(pytest, os.path.join(out, "tests.log"), QUIET),
             "check": _spawn([sys.executable, "-m", "normops.cli", "check", "--device", "cuda"],
                             os.path.join(out, "check.log"), QUIET)}
    from normops.kernels.roofline import gpu_named
    gpu = gpu_named(torch.cuda.get_device_name())
    if gpu:  # the model's predictions for this GPU, to set beside what is measured (calibration.md)
        procs["roofline"] = _spawn([sys.executable, "-m", "normops.kernels.roofline", "--gpu", gpu, "--jobs", "4", "--acceptance",
                                    "--json", os.path.join(out, "roofline.json")],
                                   os.path.join(out, "roofline.log"), QUIET)
    results.update(_wait(procs, deadline, grace=15.0))


# A timed pass that writes no record for this long has hung (a case takes seconds; the first of a
# pass also imports torch and starts CUDA; a torch.compile case compiles what the warm-up left).
STALL_S = {"normops,torch": 60.0, "compile": 120.0}


def _family_cases(args, family, providers):
    """The cases of one family's timed pass, in the order it times them."""
    return [c for c in all_cases(smoke_points([family]) if args.smoke else points([family]))
            if c.provider in providers.split(",")]


def _timed_family(args, family, providers, peak, out, deadline):
    """One family's timed pass in a subprocess. One that hangs (no record in STALL_S), crashes or
    loses its CUDA context is started again past the case it was on, at most 3 times; that case
    gets an error record."""
    jsonl = os.path.join(out, "acceptance.jsonl")
    order = _family_cases(args, family, providers)
    cmd = _base_command(args) + ["--timed", f"{family}:{providers}", "--peak", str(peak), "--deadline",
                                 str(deadline), "--out", out]
    for _ in range(4):
        p = _spawn(cmd)
        size, grown = os.path.getsize(jsonl), time.time()
        stalled = False
        while True:
            try:
                p.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if os.path.getsize(jsonl) != size:
                size, grown = os.path.getsize(jsonl), time.time()
            stalled = time.time() - grown > STALL_S[providers]
            if stalled or time.time() > deadline + 30:
                _stop([p])
                break
        left = [c for c in order if c not in load(jsonl)[1]]
        if not left or not (stalled or p.returncode):
            return
        why = f"stalled: no record in {STALL_S[providers]:.0f} s" if stalled else f"its pass exited {p.returncode}"
        if p.returncode != 3:  # 3: it stopped after recording a CUDA error; else the case in flight failed
            with open(jsonl, "a") as f:
                f.write(json.dumps(dict(_record_of(left[0]), error=why)) + "\n")
        print(f"timed pass {family}:{providers}: {why} at {left[0].label}", flush=True)
        if time.time() > deadline:
            return


# --- verdicts ----------------------------------------------------------------------------------

def _case_of(rec):
    return Case(rec["op"], tuple(rec["shape"]), rec["layout"], rec["pass"], rec["provider"], rec.get("case_dtype"))


def load(jsonl):
    """(environment, {Case: record}) from an acceptance.jsonl."""
    env, results = {}, {}
    if not os.path.exists(jsonl):
        return env, results
    with open(jsonl) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:  # a line half written when a process was killed
                continue
            if "environment" in rec:
                env = rec["environment"]
            else:
                results[_case_of(rec)] = rec
    return env, results


def _fmt_value(check, value):
    if value is None:
        return "-"
    return f"{value:.1f}%" if check.kind == "pct" else f"{value:.3f}x"


def _describe(check):
    if check.kind == "speedup":
        return f"{check.case.label} vs {check.against}"
    if check.kind == "per_byte":
        return f"{check.case.label} vs {check.against.op}"
    return check.case.label


def _host_bound(point, results):
    """How many of the point's normops records are host-bound (bench.time_events)."""
    recs = [results.get(c.case) for c in point.checks]
    return sum(1 for r in recs if r and r.get("host_bound"))


def report(pts, results, env, extra):
    """The markdown summary: environment, then a row per point."""
    lines = [f"# Acceptance run: {env.get('device')}, {env.get('date')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, normops {env.get('normops')}; dtype "
             f"{env.get('dtype')}; NORMOPS_MAXNREG {env.get('maxnreg')}; copy bandwidth {env.get('copy_gbps', 0):.0f} GB/s; "
             f"{extra}", "",
             "Times are GPU time per call (bench.time_events: the stream held while the calls are queued); "
             "host-bound counts the point's normops cases whose host-paced loop was over 10% slower.", "",
             "| issue | point | verdict | worst case | value | bound | measured | host-bound |",
             "|---|---|---|---|---|---|---|---|"]
    for p in pts:
        status, check, value, n = verdict(p, results)
        cells = (_describe(check), _fmt_value(check, value), _fmt_value(check, check.bound)) if check else ("-",) * 3
        lines.append(f"| #{p.issue} | {p.text} | {status} | {' | '.join(cells)} | {n}/{len(p.checks)} "
                     f"| {_host_bound(p, results)} |")
    backends = sorted({(r["dtype"], r["torch_backend"]) for r in results.values() if r.get("torch_backend")})
    if backends:
        lines += ["", "torch's BatchNorm kernels (torch._C._select_batch_norm_backend): "
                  + ", ".join(f"{b} in {d}" for d, b in backends) + "."]
    errors = [r for r in results.values() if "error" in r]
    if errors:
        lines += ["", "Errors:"] + [f"- {r['op']} {r['shape']} {r['layout']} {r['pass']} {r['provider']}: "
                                    f"{r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def finish(pts, out, extra, mirror=None):
    """acceptance.md and acceptance.json from the records so far; copies into `mirror`."""
    env, results = load(os.path.join(out, "acceptance.jsonl"))
    text = report(pts, results, env, extra)
    with open(os.path.join(out, "acceptance.md"), "w") as f:
        f.write(text)
    summary = []
    for p in pts:
        status, check, value, n = verdict(p, results)
        summary.append(dict(issue=p.issue, point=p.text, verdict=status, worst=check and _describe(check),
                            value=value, bound=check and check.bound, measured=n, checks=len(p.checks)))
    with open(os.path.join(out, "acceptance.json"), "w") as f:
        json.dump({"environment": env, "records": list(results.values()), "points": summary}, f, indent=1)
    calibration(out, results)
    _mirror(out, mirror)
    return text


def calibration(out, results):
    """calibration.md: each measured normops case beside what kernels/roofline.py predicted for it
    (roofline.json, written by the side run), both as % of the GPU's nominal bandwidth, so that the
    model can be corrected where it is wrong. Nothing without roofline.json."""
    path = os.path.join(out, "roofline.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        model = json.load(f)
    predicted = {c["id"]: c for c in model["cases"]}
    peak = model["gpu"]["dram_tbps"] * 1e3  # GB/s
    lines = [f"# Measured beside predicted ({model['gpu']['name']}, {peak:.0f} GB/s nominal; "
             f"triton {model['triton']} for the model)", "",
             "| case | measured % | predicted % | measured us | predicted us | ratio |", "|---|---|---|---|---|---|"]
    for r in results.values():
        if r.get("provider") != "normops" or "gbps" not in r:
            continue
        name = lambda pas: case_id(r["op"], r["shape"], r["layout"], r["dtype"], pas)  # noqa: E731
        parts = [predicted.get(name(p)) for p in r["pass"].split("+")]  # fwd+bwd: both predictions
        if not all(parts):
            continue
        us = sum(p["predicted_us"] for p in parts)
        pct = 100 * r["bytes"] / (us * 1e-6) / (peak * 1e9)
        lines.append(f"| {name(r['pass'])} | {100 * r['gbps'] / peak:.1f} | {pct:.1f} | {1e3 * r['median_ms']:.1f} "
                     f"| {us:.1f} | {1e3 * r['median_ms'] / us:.2f} |")
    with open(os.path.join(out, "calibration.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _mirror(out, mirror):
    """Copy the results files into `mirror` (the device tool's $OUT: what comes back)."""
    if not mirror:
        return
    for name in ("acceptance.jsonl", "acceptance.md", "acceptance.json", "tests.log", "check.log", "roofline.json",
                 "calibration.md"):
        src = os.path.join(out, name)
        if os.path.exists(src):
            with open(src, "rb") as f, open(os.path.join(mirror, name), "wb") as g:
                g.write(f.read())


# --- main --------------------------------------------------------------------------------------

def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="results folder (default: benchmarks/results/<gpu>-<date>)")
    p.add_argument("--mirror", help="a folder that gets a copy of the results as they grow (the device tool's $OUT)")
    p.add_argument("--budget", type=float, default=420.0,
                   help="seconds for the whole run; cases left when it is spent are not measured")
    p.add_argument("--families", default="row_norm,group_norm,batch_norm")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16; float32 with --smoke")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warm-jobs", type=int, default=8, help="parallel warm-up processes (0: none)")
    p.add_argument("--warm-budget", type=float, default=180.0, help="seconds at most for the warm-up and tests")
    p.add_argument("--tests", action="store_true", help="run the Triton CUDA tests and normops check during the warm-up")
    p.add_argument("--no-compile", action="store_true", help="leave the torch.compile cases out")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: exercises the script, measures nothing")
    p.add_argument("--warm-shard", help=argparse.SUPPRESS)  # i/n: a warm-up subprocess
    p.add_argument("--timed", help=argparse.SUPPRESS)  # FAMILY:normops,torch|compile: a timed-pass subprocess
    p.add_argument("--peak", type=float, help=argparse.SUPPRESS)  # with --timed: the copy bandwidth
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # with --timed: epoch seconds
    args = p.parse_args(argv)
    if args.smoke and args.device == "cuda":
        args.device = "cpu"
    args.dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    args.device = torch.device(args.device)
    return args


def _passes(families, cases):
    """The timed pass in subprocesses, one per family that has cases, torch.compile's cases last:
    a crash (or a dead CUDA context) costs one family, and the slow compiles the end of the budget."""
    passes = [(f, "normops,torch") for f in families] + [(f, "compile") for f in families]
    return [(f, providers) for f, providers in passes
            if any(bench.OPS[c.op].family == f and c.provider in providers.split(",") for c in cases)]


def _no_autotune_cache():
    """Inductor keeps the configs it benchmarks at a kernel's first launch, and writes whether to
    into the kernel's cached source: off in the warm-up, which benchmarks them on a crowded GPU, so
    that the timed pass picks its own, alone."""
    import torch._inductor.config as inductor_config
    try:
        inductor_config.autotune_local_cache = False
    except AttributeError:  # another torch without this knob
        pass


def main(argv=None):
    start = time.time()
    args = _args(argv)
    families = args.families.split(",")
    pts = smoke_points(families) if args.smoke else points(families)
    dtype = getattr(torch, args.dtype)
    cases = all_cases(pts, compile_=not args.no_compile)
    if args.warm_shard:
        i, n = map(int, args.warm_shard.split("/"))
        _no_autotune_cache()
        warm([c for c in cases[i::n] if c.provider != "torch"], dtype, args.device)
        return 0
    if args.timed:
        family, providers = args.timed.split(":")
        _no_autotune_cache()
        return timed(_family_cases(args, family, providers), dtype, args.device, args.peak, os.path.join(args.out, "acceptance.jsonl"), args.deadline)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("acceptance: CUDA is not available (use --smoke for a CPU run of the script)", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out or os.path.join(ROOT, "benchmarks", "results", "".join(
        ch if ch.isalnum() or ch in "._-" else "-" for ch in bench.device_name(args.device)) + time.strftime("-%Y-%m-%d")))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "acceptance.jsonl"), "w"):
        pass  # a fresh record file: an earlier run's records would count as measured
    deadline = start + args.budget
    side = {}

    def extra(note=""):
        tests = f"; tests exit {side.get('tests')}, normops check exit {side.get('check')}" if args.tests else ""
        return f"{time.time() - start:.0f} s{tests}{note}"

    def bail(note, code):
        """Stop every subprocess, write the report from what was measured, exit."""
        try:
            _stop(CHILDREN)
            finish(pts, out, extra(note), args.mirror)
        finally:
            os._exit(code)

    # a hang the deadlines miss (a stuck synchronize, say), or `timeout` sending SIGTERM
    watchdog = threading.Timer(args.budget + 60, bail, ("; stopped by the watchdog", 3))
    watchdog.daemon = True
    watchdog.start()
    sigterm = signal.signal(signal.SIGTERM, lambda *_: bail("; stopped by SIGTERM", 4))
    try:
        return _run(args, pts, cases, families, out, start, deadline, side, extra)
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGTERM, sigterm)


def _run(args, pts, cases, families, out, start, deadline, side, extra):
    """main's run once its safety nets are up: warm-up and tests, the timed passes, the report."""
    warm_deadline = min(start + args.warm_budget, deadline - 60)
    print(f"acceptance: {len(pts)} points, {len(cases)} cases; warm-up with {args.warm_jobs} jobs", flush=True)
    tests = threading.Thread(target=_side_runs, args=(out, warm_deadline, side)) if args.tests else None
    if tests:
        tests.start()
    shards = {f"warm-up shard {i}": _spawn(_base_command(args) + ["--families", args.families, "--warm-shard",
                                                                  f"{i}/{args.warm_jobs}"], env=QUIET)
              for i in range(args.warm_jobs)}
    _wait(shards, warm_deadline)
    if tests:
        tests.join()
        print(f"tests: {side.get('tests')}, check: {side.get('check')} (logs in {out})", flush=True)
        _mirror(out, args.mirror)
    env = dict(bench.environment(args.device), dtype=args.dtype, copy_gbps=bench.copy_bandwidth(str(args.device)),
               maxnreg=os.environ.get("NORMOPS_MAXNREG", "default"))
    if args.device.type == "cuda":
        torch.cuda.empty_cache()  # the copy buffers, before the timed subprocesses allocate
    print(f"warm-up done at {time.time() - start:.0f} s; copy bandwidth {env['copy_gbps']:.0f} GB/s", flush=True)
    with open(os.path.join(out, "acceptance.jsonl"), "w") as f:
        f.write(json.dumps({"environment": env}) + "\n")
    for family, providers in _passes(families, cases):
        if time.time() > deadline:
            break
        _timed_family(args, family, providers, env["copy_gbps"], out, deadline)
        _mirror(out, args.mirror)
    text = finish(pts, out, extra(), args.mirror)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
