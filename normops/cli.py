"""The ``normops`` command line: ``check``, ``bench``, ``models``, ``demo``, ``guide``, ``inspect``.

``models``, ``demo``, ``guide`` and ``inspect`` live with their code (``normops.models``,
``normops.lessons``, ``normops.guide``, ``normops.inspect``), each registering its parser here.

``normops check`` runs every op on every available backend and dtype, forward and backward,
against ``torch.nn.functional`` in float64, and prints one table row per case (what is compared
and how closely: ``normops.check``). Exit status: 0 when every case passes, 1 otherwise, 2 on a
usage error.

``normops bench`` times each op of ``normops.bench.OPS`` (normops against the torch.nn.functional
composition, and torch.compile of it with ``--compile``) at a few model-sized shapes per device
(``BENCH_SHAPES``) and prints median ms, speedup, GB/s and % of the measured copy bandwidth, under
the device and versions; ``--json`` and ``--plot`` save them. What a case is, how it is timed and
the bytes model live in ``normops.bench``. A case that raises (OOM, say) is an error row; exit 1.

Each command is one ``_add_<command>_parser`` (its options) plus one ``_run_<command>`` (its work);
``main`` only dispatches.
"""
import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Tuple

import torch

from . import __version__, backend, bench, current_backend, lessons
from .backends import BACKENDS, backend_from_env
from .guide import add_parser as _add_guide_parser
from .inspect import add_parser as _add_inspect_parser
from .models import add_parser as _add_models_parser
from .check import (  # noqa: F401  (OP_NAMES: read by the tests)
    DTYPES,
    OP_NAMES,
    _default_device,
    _device_arg,
    _dtype_arg,
    _error_text,
    _op_arg,
    _table,
    _triton_unavailable,
    atomic_output,
    format_table,
    plan_cases,
    positive_int_arg,
    run_case,
    save_figure,
    writable_file,
)


# --- check -------------------------------------------------------------------------------------

def _add_check_parser(sub):
    p = sub.add_parser(
        "check", help="check every op, backend and dtype against torch.nn.functional",
        description="Run every normops op forward and backward on every available backend and dtype, "
                    "compare outputs, gradients and running statistics with torch.nn.functional in "
                    "float64, and gradcheck the float64 cases. Exit status 0 when all pass, 1 otherwise.")
    p.add_argument("--backend", action="append", choices=("torch", "numpy", "triton"),
                   help="check only this backend (repeatable); default: every available one")
    p.add_argument("--dtype", action="append", type=_dtype_arg, metavar="DTYPE",
                   help=f"check only this dtype (repeatable): {', '.join(DTYPES)}")
    p.add_argument("--op", action="append", type=_op_arg, metavar="OP",
                   help=f"check only this op or family (repeatable): {', '.join(OP_NAMES)}")
    p.add_argument("--quick", action="store_true", help="float32 and float64 only")
    p.add_argument("--device", action="append", type=_device_arg,
                   help=f"device to run on (repeatable); default: {_default_device()}")
    p.set_defaults(func=_run_check)


def _run_check(args):
    try:
        cases, skipped = plan_cases(args)
    except ValueError as e:
        print(f"normops check: error: {e}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    start = time.perf_counter()
    results = []
    bar = tqdm(cases, desc="normops check", unit="case", file=sys.stderr, leave=False, dynamic_ncols=True)
    for op, name, dt, device in bar:
        bar.set_postfix_str(f"{op.name} {name} {dt}", refresh=False)
        results.append(run_case(op, name, dt, device))
    bar.close()
    elapsed = time.perf_counter() - start

    devices = sorted({r.device for r in results})
    print(f"normops {__version__}, torch {torch.__version__}, device {', '.join(devices)}")
    ran = dict.fromkeys(f"{r.backend} ({r.device})" for r in results)
    print(f"backends checked: {', '.join(ran)}")
    for (name, device), why in skipped.items():
        print(f"backend skipped: {name} ({device}): {why}")
    print(format_table(results, show_device=len(devices) > 1))
    print("err, tol: the compared tensor (output, gradient or running statistic) closest to its tolerance; "
          "tol = rel tol x max(1, max|ref|)")
    failed = [r for r in results if r.status != "ok"]
    if failed:
        print("\nfailures:")
        for r in failed:
            for d in r.details:
                print(f"  {r.op} {r.backend} {r.dtype} {r.device}: {d}")
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed in {elapsed:.1f}s")
    return 1 if failed else 0


# --- bench: which cases ------------------------------------------------------------------------

# Default shapes per device type, looked up by op name, else by the op's family. CPU: past the
# caches (4-25 MiB of fp32 per tensor, so memory-bound like on a GPU) yet a few ms per call, so the
# default run takes seconds on two cores. CUDA: where the norms sit in the models normops targets.
BENCH_SHAPES = {
    "cpu": {
        "row_norm": [(4096, 1024), (1024, 4096)],   # tokens x hidden: many narrow rows, fewer wide ones
        "group_norm": [(8, 256, 32, 32)],           # a U-Net block at low resolution, 32 groups
        "instance_norm": [(8, 64, 64, 64)],         # a style-transfer layer
        "batch_norm": [(32, 64, 56, 56)],           # ResNet stage 1 at batch 32
    },
    "cuda": {
        "row_norm": [(4096, 1024), (4096, 8192)],   # 4096 tokens at BERT-large and Llama-70B widths
        "group_norm": [(2, 320, 64, 64),            # SD U-Net first block, 512 px, batch 2 (CFG)
                       (1, 512, 128, 128)],         # SD VAE decoder, 512 px
        "instance_norm": [(16, 64, 128, 128)],      # style-transfer generator's 64-channel layer, 256 px
        "batch_norm": [(256, 256, 56, 56),          # ResNet-50 at batch 256: stage 1 (large H*W) ...
                       (256, 2048, 7, 7)],          # ... and the last stage (many channels, small H*W)
    },
}
# --quick: one small shape per op, a smoke test of the whole path (for tests and CI), not a measurement
BENCH_QUICK_SHAPES = {"row_norm": [(256, 512)], "group_norm": [(2, 64, 16, 16)], "instance_norm": [(2, 32, 16, 16)],
                      "batch_norm": [(8, 32, 16, 16)]}
BENCH_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # what each device's models run in
BENCH_WARMUP, BENCH_REPS = 3, 20
BENCH_QUICK_WARMUP, BENCH_QUICK_REPS = 1, 5  # 5: the fewest for which time_runner gives real p20/p80


@dataclasses.dataclass
class BenchResult:
    op: str
    shape: Tuple[int, ...]
    dtype: str
    pas: str
    device: str
    bytes: int = 0
    times: dict = dataclasses.field(default_factory=dict)   # provider -> {"median_ms", "p20_ms", "p80_ms"}
    errors: dict = dataclasses.field(default_factory=dict)  # provider -> message

    def ms(self, provider):
        t = self.times.get(provider)
        return t and t["median_ms"]

    def speedup(self, provider="torch"):
        """provider's median over normops's: > 1 when normops is faster."""
        ours, theirs = self.ms("normops"), self.ms(provider)
        return theirs / ours if ours and theirs else None

    def gbps(self, provider="normops"):
        ms = self.ms(provider)
        return self.bytes / (ms * 1e-3) / 1e9 if ms else None


def _bench_shapes(op, device, quick):
    table = BENCH_QUICK_SHAPES if quick else BENCH_SHAPES.get(device.type, BENCH_SHAPES["cuda"])
    return table.get(op.name) or table[op.family]


def _bench_op_arg(text):
    if text not in bench.OPS:
        raise argparse.ArgumentTypeError(f"unknown op {text!r}; choose from {', '.join(bench.OPS)}")
    return text


def plan_bench(args):
    """(device, [(op name, shape, dtype name, pass)], providers) for the parsed options, or raise
    ValueError (usage)."""
    device = args.device or torch.device(_default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            writable_file(path, opt)
    ops = list(dict.fromkeys(args.op or bench.OPS))
    dtypes = list(dict.fromkeys(args.dtype or [BENCH_DTYPE.get(device.type, "float32")]))
    passes = list(dict.fromkeys(args.passes or ["fwd+bwd"]))
    cases = [(name, shape, dt, pas) for name in ops for shape in _bench_shapes(bench.OPS[name], device, args.quick)
             for dt in dtypes for pas in passes]
    return device, cases, ["normops", "torch"] + (["compile"] if args.compile else [])


def run_bench_case(op_name, shape, dtype_name, pas, device, providers, warmup, reps):
    """Time one case with every provider; a provider that raises (OOM, compile failure) is recorded
    in .errors, never raised."""
    dtype = DTYPES[dtype_name]
    res = BenchResult(op_name, tuple(shape), dtype_name, pas, str(device),
                      bench.bytes_moved(bench.OPS[op_name], shape, dtype, pas))
    runners = {}
    for provider in providers:
        try:  # make_runner starts compile providers from a fresh dynamo cache
            runners[provider] = bench.make_runner(op_name, shape, dtype, device, provider, pas)
        except Exception as e:  # one failing case is an error in the table, not a crash
            res.errors[provider] = _error_text(e)
    errors = {}
    res.times = bench.time_interleaved(runners, warmup=warmup, reps=reps, errors=errors)
    res.errors.update(errors)
    del runners
    if res.errors and device.type == "cuda":
        torch.cuda.empty_cache()  # give an OOM's cached blocks back before the next case
    return res


# --- bench: output -----------------------------------------------------------------------------

def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_bench_table(results, providers, peak):
    labels = {"normops": "normops ms", "torch": "torch.nn ms", "compile": "compile ms"}
    headers = ["op", "shape", "dtype", "pass"] + [labels[p] for p in providers] + ["speedup", "GB/s", "% peak"]
    rows = []
    for r in results:
        gbps = r.gbps()
        rows.append([r.op, "x".join(map(str, r.shape)), r.dtype, r.pas]
                    + ["error" if p in r.errors else _fmt(r.ms(p), ".3f") for p in providers]
                    + [_fmt(r.speedup(), ".2f"), _fmt(gbps, ".1f"),
                       _fmt(gbps and peak and 100 * gbps / peak, ".0f")])
    return _table(headers, rows, right=set(headers[4:]))


def bench_record(r, providers, peak):
    """One JSON record: the case, each provider's median/p20/p80 (or its error), derived numbers."""
    rec = {"op": r.op, "family": bench.OPS[r.op].family, "shape": list(r.shape), "dtype": r.dtype, "pass": r.pas,
           "device": r.device, "bytes": r.bytes, "status": "error" if r.errors else "ok"}
    for p in providers:
        if p in r.errors:
            rec[p] = {"error": r.errors[p]}
        else:
            gbps = r.gbps(p)
            rec[p] = dict(r.times[p], gbps=gbps, pct_of_peak=peak and 100 * gbps / peak)
    gbps = r.gbps()
    rec.update(speedup=r.speedup(), gbps=gbps, pct_of_peak=gbps and peak and 100 * gbps / peak)
    if "compile" in providers:
        rec["speedup_vs_compile"] = r.speedup("compile")
    return rec


def _figure_class():
    """matplotlib's Figure (no pyplot: no GUI backend, no global state), imported only for --plot."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib ({e}); install it with `pip install matplotlib` "
                         f"or `pip install -e '.[bench]'`")
    return Figure


def plot_speedups(results, providers, env, path):
    """A horizontal bar per case: torch.nn time / normops time (and compile's, if timed); 1 = parity."""
    series = [("torch", "vs torch.nn.functional")] + (
        [("compile", "vs torch.compile(torch.nn.functional)")] if "compile" in providers else [])
    labels = [f"{r.op} {'x'.join(map(str, r.shape))} {r.dtype} {r.pas}" for r in results]
    fig = _figure_class()(figsize=(9, 1.6 + 0.32 * len(results) * len(series)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for k, (provider, label) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(results))]
        vals = [r.speedup(provider) for r in results]
        bars = ax.barh(ys, [v or 0 for v in vals], height, label=label)
        ax.bar_label(bars, ["error" if v is None else f"{v:.2f}x" for v in vals], padding=2, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    # bar_label writes past the bar's end: leave room for the longest bar's label inside the axes
    longest = max([r.speedup(p) or 0 for r in results for p, _ in series] + [1.0])
    ax.set_xlim(0, longest * 1.15)
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of normops = other's median time / normops' median time (> 1: normops faster)")
    versus = " and torch.compile" if len(series) > 1 else ""
    device = results[0].device if results else env["device_type"]
    ax.set_title(f"normops (backend {current_backend(torch.device(device))}) vs torch.nn.functional{versus}: "
                 f"speedup per case\n{env['device']} ({device}), normops {env['normops']}, torch {env['torch']}, "
                 f"{env['date'][:10]}", fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)  # "best": where it covers the fewest bars
    save_figure(fig, path, dpi=120)


def _add_bench_parser(sub):
    p = sub.add_parser(
        "bench", help="time normops against torch.nn.functional on this machine",
        description="Time every normops op against the torch.nn.functional composition a user would "
                    "write (and torch.compile of it with --compile) at a few model-sized shapes, and "
                    "print median times, speedup, GB/s and % of the measured copy bandwidth. A case that "
                    "raises (out of memory, say) is an error in the table. Exit status 0 when every case "
                    "ran, 1 otherwise, 2 on a usage error.")
    p.add_argument("--op", action="append", type=_bench_op_arg, metavar="OP",
                   help=f"time only this op (repeatable): {', '.join(bench.OPS)}")
    p.add_argument("--dtype", action="append", type=_dtype_arg, metavar="DTYPE",
                   help=f"time this dtype (repeatable): {', '.join(DTYPES)}; default: "
                        f"{BENCH_DTYPE['cpu']} on CPU, {BENCH_DTYPE['cuda']} on CUDA")
    p.add_argument("--pass", dest="passes", action="append", choices=bench.PASSES,
                   help="time this pass (repeatable); default: fwd+bwd")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the torch.nn composition")
    p.add_argument("--device", type=_device_arg, help=f"device to run on; default: {_default_device()}")
    p.add_argument("--reps", type=positive_int_arg,
                   help=f"timed calls per case and provider; default: {BENCH_REPS} ({BENCH_QUICK_REPS} with --quick)")
    p.add_argument("--quick", action="store_true", help="one small shape per op and few calls: a smoke test")
    p.add_argument("--json", metavar="PATH", help="write the environment and one record per case as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="draw the speedup per case as a bar chart (needs matplotlib)")
    p.set_defaults(func=_run_bench)
    return p


def _run_bench(args):
    try:
        device, cases, providers = plan_bench(args)
        if args.plot:
            _figure_class()  # fail now, not after the whole run
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
        print(f"normops bench: copy bandwidth not measured: {_error_text(e)}", file=sys.stderr)
    results = []
    bar = tqdm(cases, desc="normops bench", unit="case", file=sys.stderr, leave=False, dynamic_ncols=True)
    for op_name, shape, dt, pas in bar:
        bar.set_postfix_str(f"{op_name} {'x'.join(map(str, shape))} {dt} {pas}", refresh=False)
        results.append(run_bench_case(op_name, shape, dt, pas, device, providers, warmup, reps))
    bar.close()
    elapsed = time.perf_counter() - start

    print(f"normops {env['normops']} (backend {current_backend(device)}), torch {env['torch']}, "
          f"triton {env['triton'] or '-'}, python {env['python']}, {env['date']}")
    print(f"device {device}: {env['device']}; copy bandwidth {_fmt(peak, '.1f', 'not measured')} GB/s")
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


# --- entry point -------------------------------------------------------------------------------

EXIT_STATUS = ("exit status: 0 ok; 1 findings or failures (a check or case that failed, a target missed, "
               "a likely mistake found); 2 usage error (bad option, value or environment, nothing run); "
               "130 interrupted (Ctrl-C)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line: what is wrong, and where the help is; exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _add_backend_arg(p):
    p.add_argument("--backend", choices=BACKENDS,
                   help="the backend normops' norms run on (default: NORMOPS_BACKEND if set, else the "
                        "device's: triton on CUDA, torch on the CPU)")
    return p


def build_parser():
    parser = _Parser(prog="normops", description="normops: fused normalization layers for PyTorch.",
                     epilog=f"Every command: {EXIT_STATUS}.")
    parser.add_argument("--version", action="version", version=f"normops {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check_parser(sub)  # its --backend selects the backends to compare (repeatable)
    for add in (_add_bench_parser, _add_models_parser, lessons.add_parser, _add_inspect_parser):
        _add_backend_arg(add(sub))
    _add_guide_parser(sub)
    return parser


def _backend_error(args):
    """Why the backend settings cannot run this command (NORMOPS_BACKEND, ``--backend``), or None:
    checked once, before any work."""
    try:
        backend_from_env()
    except ValueError as e:
        return f"{e} (or unset it)"
    name = getattr(args, "backend", None)
    if args.command != "check" and name == "triton":
        device = getattr(args, "device", None) or torch.device(_default_device())
        return _triton_unavailable(device)
    return None


def main(argv=None):
    """``normops COMMAND ...``; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    error = _backend_error(args)
    if error:
        print(f"normops {args.command}: error: {error}", file=sys.stderr)
        return 2
    name = getattr(args, "backend", None) if args.command != "check" else None
    try:
        with backend(name) if name else contextlib.nullcontext():
            return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback; files are written whole or not at all
        print(f"\nnormops {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `normops ... | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
