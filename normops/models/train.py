"""What the models share to train: the training loop, one optimizer step, the transformer's and the
LSTM's common training, random batches, and the record of a run (``Trained``).

The model modules import this; it imports no model (the runner over them, ``normops.models.runner``,
does), so the models and their runner form no import circle.
"""
import dataclasses
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.nn import functional as TF

from .norms import seeded


@dataclasses.dataclass
class Trained:
    """One training run: loss series per step, the metric on held-out data, and the timing."""
    name: str
    norm: str
    steps: int
    seconds: float  # the training steps only (data generation and evaluation excluded)
    losses: Dict[str, List[float]]
    metric: float
    model: torch.nn.Module
    draw_samples: Optional[Callable] = None  # draw_samples(fig): a figure of inputs and outputs

    @property
    def steps_per_s(self):
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


def loop(step, steps, desc, progress):
    """Call ``step(i) -> {loss name: float}`` for i in range(steps) under a tqdm bar; returns
    ``(losses {name: [float per step]}, seconds)``."""
    from tqdm import tqdm

    losses = {}
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True,
               disable=not progress)
    start = time.perf_counter()
    for i in bar:
        out = step(i)
        for k, v in out.items():
            losses.setdefault(k, []).append(v)
        if i % 10 == 0 or i == steps - 1:
            bar.set_postfix({k: f"{v:.3f}" for k, v in out.items()}, refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return losses, seconds


def optimizer_step(loss, opt, sched=None, clip=None):
    """One update from ``loss``: gradients (clipped to norm ``clip`` when given), the optimizer's
    step, the schedule's; returns ``{"cross-entropy": loss}`` for ``loop``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], clip)
    opt.step()
    if sched is not None:
        sched.step()
    return {"cross-entropy": loss.item()}


def train_sequences(name, norm, build, optimizer, task, accuracy, lr, batch, steps, seed, progress):
    """The transformer's and the LSTM's training: ``task(n, seed=...)`` generates (tokens, targets)
    (20,000 sequences to train on, 2,048 held out), cross-entropy at every position, a one-cycle
    schedule peaking at ``lr``, gradients clipped to norm 1. ``build()`` makes the model (after the
    seeding), ``optimizer(params)`` its optimizer, ``accuracy(model, x, y)`` the metric."""
    x, y = task(20000, seed=seed)
    x_test, y_test = task(2048, seed=seed + 1)
    g = seeded(seed)
    model = build()
    opt = optimizer(model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.1)

    def step(i):
        idx = batch_indices(len(x), batch, g)
        return optimizer_step(TF.cross_entropy(model(x[idx]).flatten(0, 1), y[idx].flatten()), opt, sched, clip=1.0)

    losses, seconds = loop(step, steps, f"{name} ({norm})", progress)

    def draw(fig):
        with torch.no_grad():
            pred = model(x_test[:16]).argmax(-1)
        draw_sequences(fig, x_test[:16], pred, y_test[:16])

    return Trained(name, norm, steps, seconds, losses, accuracy(model, x_test, y_test), model, draw)


def batch_indices(n, batch_size, g):
    """A random batch of indices into a dataset of n (with ``g``, a torch.Generator)."""
    return torch.randint(0, n, (batch_size,), generator=g)


def draw_sequences(fig, x, pred, target):
    """Digit sequences as a grid: input, expected output, the model's output with each wrong digit
    in red; the figure is sized to the grid."""
    rows, length = x.shape
    x, pred, target = x.tolist(), pred.tolist(), target.tolist()
    blocks = [("input", x, None), ("expected output", target, None), ("model output (wrong in red)", pred, target)]
    cell = 0.17  # inches per digit column at fontsize 9 (a digit and a space of monospace)
    gap = 2  # empty columns between blocks
    width = len(blocks) * length + (len(blocks) - 1) * gap
    fig.set_size_inches(width * cell + 0.3, (rows + 1.5) * 0.19 + 0.45)
    ax = fig.subplots()
    ax.axis("off")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(rows - 0.5, -1.5)  # row -1: the block headers
    for b, (title, values, truth) in enumerate(blocks):
        left = b * (length + gap)
        ax.text(left - 0.4, -1, title, fontsize=9, va="center", ha="left")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                wrong = truth is not None and v != truth[i][j]
                ax.text(left + j, i, str(v), fontsize=9, family="monospace", ha="center", va="center",
                        color="red" if wrong else "black", fontweight="bold" if wrong else "normal")
