"""The ``normops`` command line: ``check``, ``bench``, ``models``, ``demo``, ``guide``, ``inspect``.

One module per command, each an ``add_parser(subparsers)`` (its options) and the run it sets as
``func`` (its work): ``check`` and ``bench`` here (``normops.cli.check``, ``normops.cli.bench``,
around the logic in ``normops.check`` and ``normops.bench``); ``models``, ``demo``, ``guide`` and
``inspect`` with their code (``normops.models``, ``normops.lessons``, ``normops.guide``,
``normops.inspect``). What the commands share (dtype and device options, the text table, output
files) is ``normops.cliutil``. Data flows one way: this package imports those, never the reverse.

``main`` only dispatches: it checks the backend settings once, runs the command under
``--backend``, and turns Ctrl-C and a closed pipe into an exit status.
"""
import argparse
import contextlib
import os
import sys

import torch

from .. import __version__, backend, lessons
from ..backends import BACKENDS, backend_from_env
from ..check import triton_unavailable
from ..cliutil import default_device
from ..guide import add_parser as _add_guide_parser
from ..inspect import add_parser as _add_inspect_parser
from ..models import add_parser as _add_models_parser
from .bench import add_parser as _add_bench_parser
from .check import add_parser as _add_check_parser

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
        env = backend_from_env()
    except ValueError as e:
        return f"{e} (or unset it)"
    if args.command == "check" or not hasattr(args, "backend"):  # check compares backends itself; guide runs none
        return None
    if (args.backend or env) == "triton":
        why = triton_unavailable(getattr(args, "device", None) or torch.device(default_device()))
        return f"NORMOPS_BACKEND=triton: {why}" if why and not args.backend else why
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
