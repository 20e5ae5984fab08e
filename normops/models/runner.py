"""The five models listed once (``MODULES``), the runner over them, its table and its plots.

Each model module (``resnet``, ``transformer``, ``unet``, ``cyclegan``, ``lstm``) has ``NAME``,
``TASK``, ``METRIC``, ``TARGET``, ``HIGHER_IS_BETTER``, ``STEPS``, ``QUICK_STEPS``,
``MODEL`` (its nn.Module class, built as ``MODEL(norm)`` at its training size), ``INPUT_SHAPE``
(one example's shape; ``VOCAB`` where the inputs are digit sequences) and
``train(norm, steps, seed, progress) -> Trained``; ``run`` trains each selected one with every
norm in ``norms`` and returns one ``Row`` per model. Plots use matplotlib's ``Figure`` directly (the
Agg canvas, no pyplot): no GUI backend and no global state.
"""
import dataclasses
import math
import os
from typing import Dict, Optional, Sequence

import torch

from ..cliutil import save_figure, text_table
from . import cyclegan, lstm, resnet, transformer, unet
from .norms import check_norm
from .train import Trained

# The models, in the order of the table: every other list of them (the CLI's choices, `normops
# inspect`'s names, ``build``, ``example_input``) comes from this one.
MODULES = {m.NAME: m for m in (resnet, transformer, unet, cyclegan, lstm)}


@dataclasses.dataclass
class Row:
    """One model, trained with each norm: what ``run`` returns and ``format_rows`` prints."""
    model: str
    task: str
    metric: str
    target: float
    values: Dict[str, float]  # norm -> metric
    met: Optional[bool]  # every norm's metric reaches the target; None when not enforced (quick)
    steps_per_s: Dict[str, float]  # norm -> training steps per second
    seconds: Dict[str, float]  # norm -> training wall time


def met(value, target, higher_is_better):
    return value >= target if higher_is_better else value <= target


def run(names=None, out_dir="normops-models", quick=False, progress=True, norms=("normops", "torch"), steps=None,
        seed=0):
    """Train each model in ``names`` (default: all of ``MODULES``, in its order) once per norm in
    ``norms``, from ``seed``; write ``<name>_loss.png`` (loss curves, one line per norm) and
    ``<name>_samples.png`` (the first norm's model on held-out inputs) into ``out_dir`` (``None``:
    no plots). ``quick``: each model's few ``QUICK_STEPS`` and no targets (``Row.met`` is None);
    ``steps`` overrides the step count of every model. Returns one ``Row`` per model."""
    names = list(MODULES) if not names else list(names)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; expected one of {', '.join(MODULES)}")
    norms = [check_norm(n) for n in norms]
    if not norms:
        raise ValueError("norms must name at least one of 'normops', 'torch'")
    if out_dir is not None:
        _figure()  # matplotlib missing: fail now, not after the training
        os.makedirs(out_dir, exist_ok=True)
    rows = []
    for name in names:
        m = MODULES[name]
        n_steps = steps or (m.QUICK_STEPS if quick else m.STEPS)
        runs = [m.train(norm, steps=n_steps, seed=seed, progress=progress) for norm in norms]
        values = {r.norm: r.metric for r in runs}
        ok = None if quick else all(met(v, m.TARGET, m.HIGHER_IS_BETTER) for v in values.values())
        rows.append(Row(name, m.TASK, m.METRIC, m.TARGET, values, ok, {r.norm: r.steps_per_s for r in runs},
                        {r.norm: r.seconds for r in runs}))
        if out_dir is not None:
            plot_losses(runs, os.path.join(out_dir, f"{name}_loss.png"))
            plot_samples(runs[0], os.path.join(out_dir, f"{name}_samples.png"), m.TASK, m.METRIC)
    return rows


def format_rows(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table: the metric per norm, its target, whether every norm met
    it, and training steps/s per norm (speedup = normops steps/s over torch.nn's)."""
    norms = list(dict.fromkeys(n for r in rows for n in r.values))
    headers = ["model", "task", "metric"] + norms + ["target", "met"] + [f"{n} steps/s" for n in norms]
    if {"normops", "torch"} <= set(norms):
        headers.append("speedup")
    out = []
    for r in rows:
        cells = [r.model, r.task, r.metric] + [_num(r.values.get(n)) for n in norms]
        cells += [_num(r.target), "-" if r.met is None else ("yes" if r.met else "NO")]
        cells += [_num(r.steps_per_s.get(n), ".1f") for n in norms]
        if "speedup" in headers:
            a, b = r.steps_per_s.get("normops"), r.steps_per_s.get("torch")
            # a quick run (met is None) is a few untimed-warm-up steps: too few for a speed comparison
            cells.append(f"{a / b:.2f}x" if a and b and r.met is not None else "-")
        out.append(cells)
    return text_table(headers, out, right=set(headers[3:]) - {"met"})


def _num(v, fmt=".4g"):
    return "-" if v is None else format(v, fmt)


def _figure(**kw):
    from matplotlib.figure import Figure  # matplotlib: only the plots need it

    return Figure(layout="constrained", **kw)


def set_loss_scale(ax, values):
    """Log-scale ``ax``'s y axis when the positive ``values`` span a decade or more, else keep it
    linear; tick labels plain numbers (0.1, 2, 0.05) either way. A log axis over less than a decade
    (a short run's 2.25-2.43) has no power of ten to label, and matplotlib then writes its ticks as
    2.425x10^0."""
    from matplotlib import ticker

    finite = [v for v in values if math.isfinite(v)]
    if not (finite and min(finite) > 0 and max(finite) >= 10 * min(finite)):
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):  # the 2x and 5x ticks between powers of ten, where the axis spans under 2 decades
        return f"{v:g}" if round(v / 10 ** math.floor(math.log10(v) + 1e-9)) in (2, 5) else ""

    wide = math.log10(max(finite) / min(finite)) >= 2
    ax.yaxis.set_minor_formatter(ticker.NullFormatter() if wide else ticker.FuncFormatter(minor))


def plot_losses(runs: Sequence[Trained], path):
    """One panel per loss series, one line per norm: a running mean over the raw losses (faint);
    log-scaled when the losses span a decade or more."""
    from matplotlib import ticker

    keys = list(runs[0].losses)
    fig = _figure(figsize=(4.2 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for k, r in enumerate(runs):
            y = torch.tensor(r.losses[key], dtype=torch.float64)
            w = max(1, len(y) // 50)  # running mean over 2% of the steps, drawn over the raw losses
            smooth = torch.cat([y[:1].expand(w - 1), y]).unfold(0, w, 1).mean(1)
            ax.plot(y, color=f"C{k}", linewidth=0.5, alpha=0.3)
            ax.plot(smooth, color=f"C{k}", linewidth=1.2, linestyle="-" if k == 0 else "--",
                    label=f"{r.norm} norms ({r.steps_per_s:.1f} steps/s)")
        set_loss_scale(ax, [v for r in runs for v in r.losses[key]])
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # no step 0.5, no 150
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{key} loss" + (" (log scale)" if ax.get_yscale() == "log" else ""))
        ax.set_title(f"{runs[0].name}: training loss, {key}", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)


def plot_samples(trained: Trained, path, task, metric):
    """The model's ``draw_samples`` figure, titled with its task and its metric on held-out data."""
    fig = _figure(figsize=(8, 4.5))
    trained.draw_samples(fig)
    fig.suptitle(f"{trained.name} on {task} ({trained.norm} norms, {trained.steps} steps): "
                 f"{metric} {trained.metric:.4g}", fontsize=9)
    save_figure(fig, path, dpi=110)
