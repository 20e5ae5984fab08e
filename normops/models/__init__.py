"""The five practical models, trained end to end on CPU with normops norms or torch.nn norms.

| model         | norm (fused with normops)          | task (seeded data)                    | target                 |
|---------------|------------------------------------|---------------------------------------|------------------------|
| resnet        | BatchNorm2d + ReLU                 | scikit-learn's 8x8 digits             | test accuracy >= 0.95  |
| transformer   | residual add + LayerNorm, pre-norm | sort 16 digits                        | sequence acc. >= 0.98  |
| unet          | GroupNorm + SiLU                   | segment discs and squares (3 classes) | mean IoU >= 0.9        |
| cyclegan      | InstanceNorm2d + ReLU              | plain <-> bordered shapes, unpaired   | colour mean IoU >= 0.6 |
| lstm          | LayerNorm on gates and cell state  | running sum of digits mod 10          | digit accuracy >= 0.99 |

Each model takes ``norm="normops" | "torch"``; both variants have the same parameters and
``state_dict`` keys, so a seed gives both the same weights (``normops.models.norms``).

``run(names=None, out_dir="normops-models", quick=False, progress=True, norms=("normops", "torch"),
steps=None, seed=0, threads=None) -> [Row]`` trains them (``normops.models.runner.run``) and
``format_rows(rows)`` prints the table. ``add_parser(subparsers)`` registers the ``models``
command of ``normops``'s CLI; ``run_cli(args)`` returns 0 when every target is met (always, with
``--quick``, which checks no target), 1 otherwise, 2 on a usage error.
"""
import contextlib
import sys
import time

import torch

from ..cliutil import positive_int_arg, writable_folder
from .runner import MODULES, Row, format_rows
from .runner import run as _run
from .train import Trained

MODELS = tuple(MODULES)  # the names, in the table's order (the registry is runner.MODULES)
NAMES = MODELS  # what normops.inspect lists for an unknown name

__all__ = ["MODELS", "NAMES", "Row", "Trained", "add_parser", "build", "example_input", "format_rows", "run",
           "run_cli"]


def build(name, norm="normops"):
    """Model ``name`` at its training size, untrained (``normops inspect`` uses it). KeyError on an
    unknown name."""
    return _module(name).MODEL(norm)


def example_input(name, batch_size):
    """A random batch of ``batch_size`` inputs of model ``name``, shaped as its task's: digit
    sequences for the models with a vocabulary, standard-normal images for the others."""
    m, g = _module(name), torch.Generator().manual_seed(0)
    shape = (batch_size, *m.INPUT_SHAPE)
    vocab = getattr(m, "VOCAB", None)
    return torch.randint(0, vocab, shape, generator=g) if vocab else torch.randn(shape, generator=g)


def _module(name):
    if name not in MODULES:
        raise KeyError(f"no model {name!r}")
    return MODULES[name]


@contextlib.contextmanager
def _threads(n):
    """torch's intra-op thread count set to ``n`` inside the block (unchanged for None)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(names=None, out_dir="normops-models", quick=False, progress=True, norms=("normops", "torch"), steps=None,
        seed=0, threads=None):
    """Train each model of ``names`` (default: all of ``MODELS``) with each norm of ``norms`` from
    ``seed``, and return one ``Row`` per model: model, task, metric, target, the metric per norm,
    whether every norm met the target (None with ``quick``), steps/s and seconds per norm.
    Writes ``<model>_loss.png`` and ``<model>_samples.png`` into ``out_dir`` (None: no files).
    ``quick``: a few steps per model, no targets; ``steps``: this many steps for every model;
    ``threads``: torch's intra-op threads while training (restored after; on a shared machine, 1
    avoids the threads waiting on each other at these small sizes)."""
    with _threads(threads), torch.random.fork_rng(devices=[]):  # training seeds torch's RNG: the caller's stays
        return _run(names, out_dir, quick, progress, norms, steps, seed)


def add_parser(subparsers):
    """Register ``models`` on an argparse subparsers object (``normops models --help``)."""
    p = subparsers.add_parser(
        "models", help="train the five practical models with normops and torch.nn norms",
        description="Train ResNet (BatchNorm), a Transformer encoder (LayerNorm), U-Net (GroupNorm), CycleGAN "
                    "(InstanceNorm) and an LSTM (LayerNorm) on seeded tasks on CPU, each with normops norms and "
                    "with torch.nn norms; print each model's metric, target and training steps/s, and save loss "
                    "curves and samples as PNG. Exit status 0 when every target is met (--quick checks none), "
                    "1 otherwise, 2 on a usage error.")
    p.add_argument("--only", action="append", choices=MODELS, metavar="NAME",
                   help=f"train only this model (repeatable): {', '.join(MODELS)}")
    p.add_argument("--norm", action="append", choices=("normops", "torch"), dest="norms",
                   help="train with only these norms (repeatable); default: both")
    p.add_argument("--out", default="normops-models", metavar="DIR", help="where the PNGs go (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a few steps per model and no targets: a smoke test")
    p.add_argument("--steps", type=positive_int_arg, metavar="N", help="train every model for N steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the weights (default: %(default)s)")
    p.add_argument("--threads", type=positive_int_arg, metavar="N", help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args):
    """``normops models ...``: train, print the table, return the exit status."""
    start = time.perf_counter()
    try:
        norms = tuple(dict.fromkeys(args.norms or ("normops", "torch")))
        writable_folder(args.out)  # before any training
        rows = run(args.only, args.out, args.quick, args.progress, norms, args.steps, args.seed, args.threads)
    except (ImportError, OSError, ValueError) as e:  # scikit-learn or matplotlib missing, out dir not writable
        print(f"normops models: error: {e}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, seed {args.seed}"
          + (", quick: targets not checked" if args.quick else ""))
    print(format_rows(rows))
    print(f"\nsteps/s: training steps per second (data and evaluation excluded); PNGs in {args.out}; "
          f"{time.perf_counter() - start:.1f}s")
    return 0 if all(r.met is not False for r in rows) else 1
