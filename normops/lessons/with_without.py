"""Lesson ``with-without``: the same MLP trained on the digits with and without normalization.

Same seed (so the same initial Linear weights: norm layers draw no random numbers), same batches
in the same order, same plain SGD; only the norm layers differ. At a small learning rate the
un-normalized net barely starts in the epochs given; at a large one it diverges or dies, while
BatchNorm keeps every layer's input at zero mean and unit variance whatever the weights do.
"""
import math

import torch
from torch import nn

from ._common import accuracy, digits, figure, generator, header, lesson, modules, save, set_loss_scale, train_epoch

NAME = "with-without"
DESCRIPTION = "training curves of one MLP on the digits with and without norm layers, at a small and a large lr"

KINDS = ("none", "batch", "layer")
LABELS = {"none": "no norm", "batch": "BatchNorm1d", "layer": "LayerNorm"}
STYLES = {"none": "-", "batch": "-", "layer": "--"}  # dashed: LayerNorm and no norm may coincide
DEPTH, WIDTH, BATCH = 4, 64, 32
LRS, QUICK_LRS = (0.05, 0.5, 2.0), (0.05, 2.0)
EPOCHS, QUICK_EPOCHS = 10, 3


def mlp(kind, norm):
    """64 -> [Linear(64) -> norm -> ReLU] x DEPTH -> Linear(10), PyTorch's default init."""
    ns = modules(norm)
    layers, width = [], 64
    for _ in range(DEPTH):
        layers.append(nn.Linear(width, WIDTH))
        if kind == "batch":
            layers.append(ns.BatchNorm1d(WIDTH))
        elif kind == "layer":
            layers.append(ns.LayerNorm(WIDTH))
        layers.append(nn.ReLU())
        width = WIDTH
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train_run(kind, norm, lr, epochs, seed, data):
    """Per-epoch mean train loss (nan once diverged) and test accuracy."""
    x, y, xt, yt = data
    torch.manual_seed(seed)
    model = mlp(kind, norm)
    first_linear = model[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = generator(seed + 1)  # the same batch order for every run
    losses, accs = [], []
    for _ in range(epochs):
        loss = train_epoch(model, opt, x, y, BATCH, g) if not losses or math.isfinite(losses[-1]) else math.nan
        losses.append(loss)
        accs.append(accuracy(model, xt, yt) if math.isfinite(loss) else 0.0)
    return {"loss": losses, "test_acc": accs}, first_linear


def _epoch_reaching(accs, level=0.9):
    return next((i + 1 for i, a in enumerate(accs) if a >= level), None)


def status(r):
    """What a run did: diverged (a non-finite loss), stuck (the loss of uniform guessing, ln 10,
    and chance accuracy), or learning."""
    loss, acc = r["loss"][-1], r["test_acc"][-1]
    if math.isnan(loss):
        return "diverged"
    if abs(loss - math.log(10)) < 0.05 and acc < 0.2:
        return "stuck at chance"
    return "learning"


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    lrs, epochs = (QUICK_LRS, QUICK_EPOCHS) if quick else (LRS, EPOCHS)
    x, y, xt, yt = digits(seed)
    data = (x.flatten(1), y, xt.flatten(1), yt.flatten(0))
    print(f"MLP 64 -> [Linear {WIDTH} -> norm -> ReLU] x {DEPTH} -> 10 on {len(y)} digits (test: {len(yt)}), "
          f"plain SGD, batch {BATCH}, {epochs} epochs, seed {seed}; norms from {norm}")
    runs, inits = {}, []
    for lr in lrs:
        for kind in KINDS:
            runs[(lr, kind)], w0 = train_run(kind, norm, lr, epochs, seed, data)
            inits.append(w0)
    same_init = all(torch.equal(inits[0], w) for w in inits)
    print(f"same initial weights in every run: {same_init}")
    print(f"\n{'lr':>5}  {'model':<12} {'loss ep 1':>9} {'final loss':>10} {'test acc':>8}  {'epoch >= 90%':>12}  "
          f"status")
    for (lr, kind), r in runs.items():
        r["status"] = status(r)
        reach = _epoch_reaching(r["test_acc"])
        print(f"{lr:>5}  {LABELS[kind]:<12} {r['loss'][0]:>9.3f} {r['loss'][-1]:>10.3f} {r['test_acc'][-1]:>8.1%}  "
              f"{reach or 'never':>12}  {r['status']}")
    print(f"(ln 10 = {math.log(10):.3f}: the loss of guessing uniformly among the 10 classes)")
    for lr in lrs:
        none, batch = runs[(lr, "none")], runs[(lr, "batch")]
        print(f"lr {lr}: without norm {none['test_acc'][-1]:.1%}, with BatchNorm {batch['test_acc'][-1]:.1%} "
              f"after {epochs} epochs")

    from matplotlib.ticker import MaxNLocator  # matplotlib: imported on first use

    fig = figure(figsize=(3.8 * len(lrs), 5.6))
    axes = fig.subplots(2, len(lrs), squeeze=False)
    ep = range(1, epochs + 1)
    for j, lr in enumerate(lrs):
        for k, kind in enumerate(KINDS):
            r = runs[(lr, kind)]
            style = dict(marker="o", markersize=3, color=f"C{k}", label=LABELS[kind], linestyle=STYLES[kind])
            axes[0, j].plot(ep, r["loss"], **style)
            axes[1, j].plot(ep, r["test_acc"], **style)
        set_loss_scale(axes[0, j], [v for (lr_, _), r in runs.items() if lr_ == lr for v in r["loss"]])
        axes[0, j].set_title(f"lr {lr}: training loss (a line that stops: diverged)", fontsize=9)
        axes[1, j].set_title(f"lr {lr}: test accuracy", fontsize=9)
        axes[1, j].set_ylim(0, 1)
        axes[0, j].set_ylabel("training loss, epoch mean" + (" (log)" if axes[0, j].get_yscale() == "log" else ""))
        axes[1, j].set_ylabel("test accuracy")
        for ax in axes[:, j]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs
            ax.set_xlabel("epoch")
    axes[1, 0].legend(fontsize=8)
    path = save(fig, out_dir, NAME)
    return {"lrs": list(lrs), "epochs": epochs, "same_init": same_init,
            "runs": {f"{kind}@{lr}": r for (lr, kind), r in runs.items()}, "plot": path}
