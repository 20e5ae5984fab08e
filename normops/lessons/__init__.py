"""``normops demo <lesson>``: the original material's lessons, run live.

Each lesson prints what it shows with the numbers it measured (nothing canned), saves a plot
``<out>/<lesson>.png`` and returns the numbers as a dict:

| lesson         | module           | what it shows                                                            |
|----------------|------------------|--------------------------------------------------------------------------|
| batchnorm      | ``batch_norm``   | batch statistics, running averages, train vs eval, by hand vs the module |
| with-without   | ``with_without`` | one MLP on the digits with and without norm layers, small and large lr   |
| batch-size     | ``batch_size``   | Batch/Layer/Group/InstanceNorm accuracy across batch sizes 1-64          |
| sequences      | ``sequences``    | LayerNorm vs BatchNorm on padded variable-length sequences, batch 1      |
| style          | ``style``        | InstanceNorm removes per-image contrast and brightness                   |
| mistakes       | ``mistakes``     | no model.eval(), BatchNorm at batch 1, InstanceNorm for classification   |
| tiled-vae      | ``tiled_vae``    | a VAE decoded in tiles, GroupNorm over all tiles: exact vs diffusers'    |

``run(name, out_dir=".", quick=False, *, seed=0, norm="normops")`` runs one lesson; ``norm`` picks
normops' modules or torch's. ``quick`` shrinks the training lessons to a few seconds (the effects
stay visible; the numbers are rougher). A lesson runs on one thread and leaves torch's global RNG
and thread count as it found them (``_common.lesson``). The digits lessons need scikit-learn, the
plots matplotlib, tiled-vae diffusers; they are imported on first use only.

``add_parser(subparsers)`` registers ``normops demo`` on the ``normops`` command line.
"""
import argparse
import importlib
import sys
import traceback

from . import batch_norm, batch_size, mistakes, sequences, style, tiled_vae, with_without
from ..cliutil import writable_folder
from ._common import NORMS

__all__ = ["LESSONS", "add_parser", "run", "run_cli"]

# name -> (one-line description, lesson function), in teaching order
LESSONS = {m.NAME: (m.DESCRIPTION, m.run) for m in (batch_norm, with_without, batch_size, sequences, style, mistakes,
                                                  tiled_vae)}


def _unknown(name):
    return f"unknown lesson {name!r}; choose from: {', '.join(LESSONS)} (or 'all')"


def run(name, out_dir=".", quick=False, *, seed=0, norm="normops"):
    """Run lesson ``name`` (printing as it goes); returns its measured results, with ``plot`` (the
    saved PNG's path) and ``seconds``. Raises ValueError for an unknown lesson or norm."""
    if name not in LESSONS:
        raise ValueError(_unknown(name))
    return LESSONS[name][1](out_dir, quick=quick, seed=seed, norm=norm)


def format_list():
    width = max(map(len, LESSONS))
    return "\n".join(f"  {name:<{width}}  {desc}" for name, (desc, _) in LESSONS.items())


def add_parser(subparsers):
    """Register ``demo`` on ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns its parser."""
    p = subparsers.add_parser(
        "demo", help="run a lesson of the original material: measured numbers and a plot",
        description="Run a lesson from the original normalization material: it prints what it shows with "
                    "the numbers it measured and saves a plot <out>/<lesson>.png. Lessons:\n" + format_list(),
        epilog="Exit status: 0 when the lessons ran, 1 when one failed, 2 on a usage error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lesson", nargs="?", metavar="LESSON", help="a lesson name, or 'all' to run every lesson")
    p.add_argument("--list", action="store_true", help="list the lessons and exit")
    p.add_argument("--out", default=".", metavar="DIR", help="folder for the plots (created if missing); default: .")
    p.add_argument("--quick", action="store_true", help="smaller training runs: each lesson in a few seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights; default: 0")
    p.add_argument("--norm", choices=NORMS, default="normops",
                   help="whose norm modules the lessons use; default: normops")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args):
    """``normops demo``: 0 when every lesson asked for ran, 1 when one raised (its traceback on
    stderr; ``all`` goes on with the next), 2 for a missing or unknown lesson."""
    if args.list:
        print(format_list())
        return 0
    if args.lesson is None:
        print(f"normops demo: error: name a lesson (or 'all', or --list):\n{format_list()}", file=sys.stderr)
        return 2
    if args.lesson != "all" and args.lesson not in LESSONS:
        print(f"normops demo: error: {_unknown(args.lesson)}", file=sys.stderr)
        return 2
    names = list(LESSONS) if args.lesson == "all" else [args.lesson]
    try:  # what every lesson needs, checked before any of them trains
        writable_folder(args.out)
        for module in ("matplotlib", "sklearn"):
            importlib.import_module(module)
    except ValueError as e:
        print(f"normops demo: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"normops demo: error: {e} (pip install 'normops[models]')", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        try:
            results = run(name, args.out, args.quick, seed=args.seed, norm=args.norm)
        except Exception as e:  # one failing lesson is reported; `all` goes on with the next
            traceback.print_exc(file=sys.stderr)
            print(f"normops demo: lesson {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"({name}: {results['seconds']:.1f} s)")
    if len(names) > 1:
        print(f"\n{len(names) - len(failed)} of {len(names)} lessons ran"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
