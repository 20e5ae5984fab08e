"""``normops bench``: its options, and the run that prints, saves and plots the timings.

The cases (``BENCH_SHAPES`` per device), how each is timed, the results, their table, JSON records
and plot live in ``normops.bench``. A case that raises (OOM, say) is an error row; exit 1. Exit
status 0 when every case ran, 2 on a usage error.
"""
import argparse
import json
import sys
import time

from .. import bench, current_backend
from ..bench import (
    BENCH_DTYPE,
    BENCH_QUICK_REPS,
    BENCH_QUICK_WARMUP,
    BENCH_REPS,
    BENCH_WARMUP,
    bench_record,
    figure_class,
    format_bench_table,
    plan_bench,
    plot_speedups,
    run_bench_case,
)
from ..cliutil import DTYPES, atomic_output, default_device, device_arg, dtype_arg, error_text, positive_int_arg


def _op_arg(text):
    if text not in bench.OPS:
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; choose from {', '.join(bench.OPS)}")
    return text


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="time normops against torch.nn.functional on this machine",
        description="Time every normops op against the torch.nn.functional composition a user would "
                    "write (and torch.compile of it with --compile) at a few model-sized shapes, and "
                    "print median times, speedup, GB/s and % of the measured copy bandwidth. A case that "
                    "raises (out of memory, say) is an error in the table. Exit status 0 when every case "
                    "ran, 1 otherwise, 2 on a usage error.")
    p.add_argument("--op", action="append", type=_op_arg, metavar="OP",
                   help=f"time only this op (repeatable): {', '.join(bench.OPS)}")
    p.add_argument("--dtype", action="append", type=dtype_arg, metavar="DTYPE",
                   help=f"time this dtype (repeatable): {', '.join(DTYPES)}; default: "
                        f"{BENCH_DTYPE['cpu']} on CPU, {BENCH_DTYPE['cuda']} on CUDA")
    p.add_argument("--pass", dest="passes", action="append", choices=bench.PASSES,
                   help="time this pass (repeatable); default: fwd+bwd (fwd for add_rms_norm_, in place and "
                        "forward only)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the torch.nn composition")
    p.add_argument("--device", type=device_arg, help=f"device to run on; default: {default_device()}")
    p.add_argument("--reps", type=positive_int_arg,
                   help=f"timed calls per case and provider; default: {BENCH_REPS} ({BENCH_QUICK_REPS} with --quick)")
    p.add_argument("--quick", action="store_true", help="one small shape per op and few calls: a smoke test")
    p.add_argument("--json", metavar="PATH", help="write the environment and one record per case as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="draw the speedup per case as a bar chart (needs matplotlib)")
    p.set_defaults(func=run)
    return p


def run(args):
    try:
        device, cases, providers = plan_bench(args)
        if args.plot:
            figure_class()  # fail now, not after the whole run
    except ValueError as e:
        print(f"normops bench: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    warmup = BENCH_QUICK_WARMUP if args.quick else BENCH_WARMUP
    reps = args.reps or (BENCH_QUICK_REPS if args.quick else BENCH_REPS)
    start = time.perf_counter()
    env = bench.environment(device)
    try:
        peak = bench.copy_bandwidth(device)
    except Exception as e:  # no roofline: % peak shows "-"
        peak = None
        print(f"normops bench: copy bandwidth not measured: {error_text(e)}", file=sys.stderr)
    results = []
    bar = tqdm(cases, desc="normops bench", unit="case", file=sys.stderr, leave=False, dynamic_ncols=True)
    for op_name, shape, dt, pas in bar:
        bar.set_postfix_str(f"{op_name} {'x'.join(map(str, shape))} {dt} {pas}", refresh=False)
        results.append(run_bench_case(op_name, shape, dt, pas, device, providers, warmup, reps))
    bar.close()
    elapsed = time.perf_counter() - start

    print(f"normops {env['normops']} (backend {current_backend(device)}), torch {env['torch']}, "
          f"triton {env['triton'] or '-'}, python {env['python']}, {env['date']}")
    bandwidth = "not measured" if peak is None else f"{peak:.1f}"
    print(f"device {device}: {env['device']}; copy bandwidth {bandwidth} GB/s")
    print(format_bench_table(results, providers, peak))
    print(f"ms: median of {reps} calls after {warmup} warm-up; speedup = torch.nn ms / normops ms (> 1: normops "
          f"faster)\nGB/s: the minimum bytes normops' pass moves / its median; % peak: of the copy bandwidth")
    failed = [r for r in results if r.errors]
    if failed:
        print("\nerrors:")
        for r in failed:
            for p, msg in r.errors.items():
                print(f"  {r.op} {'x'.join(map(str, r.shape))} {r.dtype} {r.pas} {p}: {msg}")
    print(f"\n{len(results)} cases, {len(failed)} with errors, in {elapsed:.1f}s")
    try:
        if args.json:
            doc = {"environment": dict(env, copy_bandwidth_gbps=peak, backend=current_backend(device)),
                   "settings": {"device": str(device), "providers": providers, "warmup": warmup, "reps": reps,
                                "quick": args.quick},
                   "results": [bench_record(r, providers, peak) for r in results]}
            with atomic_output(args.json) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            print(f"wrote {args.json}")
        if args.plot:
            plot_speedups(results, providers, env, args.plot)
            print(f"wrote {args.plot}")
    except OSError as e:
        print(f"normops bench: error: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0
