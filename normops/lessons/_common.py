"""What the lessons share: the norm implementation to use, the digits data, a small CNN and its
training loop, a plot figure, and the wrapper that gives every lesson the same calling convention.

Every lesson is ``lesson(out_dir=".", *, quick=False, seed=0, norm="normops") -> dict``: it prints
what it shows, with the numbers it measured, saves ``<out_dir>/<name>.png`` and returns the
numbers (JSON-friendly: floats, ints, strings, lists, dicts). ``norm`` picks whose modules compute
the norms: ``"normops"`` (``normops.nn``, ``normops.functional``) or ``"torch"`` (``torch.nn``,
``torch.nn.functional``); the two give the same numbers up to float rounding.
"""
import functools
import math
import os
import time

import torch
from torch import nn

from ..cliutil import error_text, save_figure  # noqa: F401  (error_text: re-exported for the lessons)
from ..models.data import generator  # noqa: F401  (the lessons' seeded generators too)
from ..models.norms import NORMS, check_norm  # noqa: F401
from ..models.runner import set_loss_scale  # noqa: F401  (the loss axes of the models' plots)

CNN_KINDS = ("none", "batch", "layer", "group", "instance")
GROUPS = 4  # GroupNorm groups in the CNN: 16 and 32 channels, 4 or 8 per group


# --- which implementation ------------------------------------------------------------------------

def modules(norm):
    """The module namespace of ``norm``: ``normops.nn`` or ``torch.nn``."""
    if check_norm(norm) == "torch":
        return nn
    from .. import nn as normops_nn

    return normops_nn


def functional(norm):
    """The functional namespace of ``norm``: ``normops.functional`` or ``torch.nn.functional``."""
    if check_norm(norm) == "torch":
        return nn.functional
    from .. import functional as normops_functional

    return normops_functional


def other(norm):
    return "torch" if check_norm(norm) == "normops" else "normops"


# --- the calling convention ----------------------------------------------------------------------

def lesson(fn):
    """Give ``fn(out_dir, quick, seed, norm)`` the lessons' calling convention and isolation: the
    output folder is created; the lesson runs on one thread, from ``torch.manual_seed(seed)``,
    inside ``torch.random.fork_rng`` (the caller's thread count and global RNG state come back as
    they were); its runtime is added to the results as ``seconds``.

    One thread: the lessons' tensors are tiny (a step is ~0.5 ms of microsecond ops), where
    intra-op threads cost more than they give, and on a shared 2-core machine two threads were
    4-20x slower than one (measured: a 10-epoch MLP run took 0.55 s on one thread, 10.3 s on two
    while two other jobs ran). It also makes the numbers independent of the machine's core count.
    """
    @functools.wraps(fn)
    def run(out_dir=".", *, quick=False, seed=0, norm="normops"):
        check_norm(norm)
        os.makedirs(out_dir, exist_ok=True)
        threads = torch.get_num_threads()
        start = time.perf_counter()
        try:
            torch.set_num_threads(1)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                results = fn(out_dir, quick=quick, seed=seed, norm=norm)
        finally:
            torch.set_num_threads(threads)
        results["seconds"] = round(time.perf_counter() - start, 2)
        return results

    return run


def header(title):
    print(f"\n== {title} ==")


def max_diff(a, b):
    """max |a - b| as a float (0.0 for empty tensors)."""
    a, b = (torch.as_tensor(t).detach().to(torch.float64) for t in (a, b))
    return float((a - b).abs().max()) if a.numel() else 0.0


def fmt(values, spec="+.3f"):
    """A list of floats as ``[a, b, c]`` with ``spec``."""
    return "[" + ", ".join(format(float(v), spec) for v in values) + "]"


# --- plots ---------------------------------------------------------------------------------------

def figure(**kw):
    """A matplotlib Figure drawn by the Agg canvas: no pyplot, so no GUI backend and no global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError(f"the lessons' plots need matplotlib ({e}); install it with `pip install matplotlib`")
    fig = Figure(layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def save(fig, out_dir, name):
    path = os.path.join(out_dir, f"{name}.png")
    save_figure(fig, path, dpi=100)
    print(f"plot: {path}")
    return path


# --- data ----------------------------------------------------------------------------------------

@functools.cache
def _load_digits():
    try:
        from sklearn.datasets import load_digits  # scikit-learn: only the digits lessons need it
    except ImportError as e:
        raise RuntimeError(f"this lesson needs scikit-learn's bundled digits ({e}); install it with "
                           f"`pip install scikit-learn`")
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


N_TEST = 450  # of the 1797 digits: 25% held out, 1347 to train on


def digits(seed=0, n_train=None):
    """``(x_train, y_train, x_test, y_test)``: scikit-learn's 8x8 digits as [N, 1, 8, 8] float32 in
    [0, 1] (the raw 0..16 pixel counts / 16), split by a permutation seeded with ``seed``;
    ``n_train`` keeps only the first that many training images."""
    x, y = _load_digits()
    x = x.unsqueeze(1) / 16.0
    perm = torch.randperm(len(y), generator=generator(seed))
    test, train = perm[:N_TEST], perm[N_TEST:]
    if n_train is not None:
        train = train[:n_train]
    return x[train], y[train], x[test], y[test]


def vary_exposure(x, seed, contrast=1.5, brightness=1.0):
    """Each image scaled by its own contrast ``exp(U(-contrast, contrast))`` and shifted by its own
    brightness ``U(-brightness, brightness)``, as photos taken under different lighting would be
    (the digits are scans that were all normalized alike)."""
    g = generator(seed)
    gain = torch.empty(len(x), 1, 1, 1).uniform_(-contrast, contrast, generator=g).exp()
    shift = torch.empty(len(x), 1, 1, 1).uniform_(-brightness, brightness, generator=g)
    return gain * x + shift


# --- a small CNN and its training ----------------------------------------------------------------

def norm2d(kind, channels, size, norm):
    """The norm layer of ``kind`` for [N, channels, size, size] activations."""
    ns = modules(norm)
    if kind == "batch":
        return ns.BatchNorm2d(channels)
    if kind == "layer":  # over (C, H, W) per image, as the original material writes it
        return ns.LayerNorm([channels, size, size])
    if kind == "group":
        return ns.GroupNorm(GROUPS, channels)
    if kind == "instance":  # affine, like the others, so only the statistics differ
        return ns.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm kind {kind!r}; expected one of {CNN_KINDS}")


def small_cnn(kind, norm, classes=10):
    """conv 3x3 (1 -> 16) -> norm -> ReLU -> conv 3x3 stride 2 (16 -> 32, 8x8 -> 4x4) -> norm -> ReLU
    -> linear (512 -> classes): Conv -> Norm -> Activation, the standard order. Norm layers draw no
    random numbers, so one seed gives every kind the same conv and linear weights."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm2d(kind, 16, 8, norm), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), norm2d(kind, 32, 4, norm), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, classes))


def train_epoch(model, opt, x, y, batch_size, g):
    """One epoch of shuffled minibatches (``g`` draws the order); a last batch smaller than
    ``batch_size`` is dropped (``drop_last``), so every step sees ``batch_size`` samples. Returns
    the mean training loss, or nan as soon as a loss is not finite (the run has diverged)."""
    model.train()
    order = torch.randperm(len(y), generator=g)
    total, seen = 0.0, 0
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i:i + batch_size]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if not math.isfinite(loss.item()):
            return math.nan
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def accuracy(model, x, y, train_mode=False, batch_size=None):
    """Fraction of ``x`` classified as ``y``, in eval mode (or train mode, batch by batch: what a
    forgotten ``model.eval()`` computes; it also updates BatchNorm's running statistics). The
    model's mode is restored."""
    was = model.training
    model.train(train_mode)
    try:
        bs = batch_size or len(y)
        pred = torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(y), bs)])
    finally:
        model.train(was)
    return float((pred == y).float().mean())
