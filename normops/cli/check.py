"""``normops check``: its options, and the run that prints one table row per case.

What is compared and how closely, and which cases the options select, live in ``normops.check``.
Exit status: 0 when every case passes, 1 otherwise, 2 on a usage error.
"""
import argparse
import sys
import time

import torch

from .. import __version__
from ..backends import backend_from_env
from ..check import OP_NAMES, format_table, plan_cases, run_case
from ..cliutil import DTYPES, default_device, device_arg, dtype_arg


def _op_arg(text):
    """An op name, or a family: 'batch_norm' selects batch_norm:train and batch_norm:eval (an exact
    name wins: 'layer_norm' is layer_norm alone, not layer_norm:silu)."""
    if text in OP_NAMES or any(n.split(":")[0] == text for n in OP_NAMES):
        return text
    raise argparse.ArgumentTypeError(f"unknown op {text!r}; choose from {', '.join(OP_NAMES)} "
                                     f"(or a family before ':', e.g. batch_norm)")


def add_parser(sub):
    p = sub.add_parser(
        "check", help="check every op, backend and dtype against torch.nn.functional",
        description="Run every normops op forward and backward on every available backend and dtype, "
                    "compare outputs, gradients and running statistics with torch.nn.functional in "
                    "float64, and gradcheck the float64 cases. Exit status 0 when all pass, 1 otherwise.")
    p.add_argument("--backend", action="append", choices=("torch", "numpy", "triton"),
                   help="check only this backend (repeatable); default: every available one")
    p.add_argument("--dtype", action="append", type=dtype_arg, metavar="DTYPE",
                   help=f"check only this dtype (repeatable): {', '.join(DTYPES)}")
    p.add_argument("--op", action="append", type=_op_arg, metavar="OP",
                   help=f"check only this op or family (repeatable): {', '.join(OP_NAMES)}")
    p.add_argument("--quick", action="store_true", help="float32 and float64 only")
    p.add_argument("--device", action="append", type=device_arg,
                   help=f"device to run on (repeatable); default: {default_device()}")
    p.set_defaults(func=run)
    return p


def run(args):
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
    if backend_from_env():
        print(f"NORMOPS_BACKEND={backend_from_env()} is not used here: check compares every backend "
              f"(--backend selects them)")
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
