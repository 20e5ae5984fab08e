"""Lesson ``batchnorm``: how BatchNorm works, computed step by step in NumPy (float64) and checked
against ``BatchNorm2d`` (normops' or torch's) and the other implementation.

    training:  mu_c = mean over (N, H, W) of channel c        n = N * H * W values
               var_c = mean((x - mu_c)^2)                     biased: this one normalizes
               y = (x - mu_c) / sqrt(var_c + eps) * w_c + b_c
               running_mean = (1 - m) * running_mean + m * mu_c
               running_var  = (1 - m) * running_var  + m * var_c * n / (n - 1)   unbiased
               momentum=None: m = 1 / (batches seen), a plain average of every batch's statistics
    eval:      y = (x - running_mean) / sqrt(running_var + eps) * w + b
"""
import copy

import numpy as np
import torch

from ._common import fmt, figure, generator, header, lesson, max_diff, modules, other, save

NAME = "batchnorm"
DESCRIPTION = "how BatchNorm works: batch statistics, running averages (momentum, unbiased var), train vs eval"

C, N, H, W = 3, 8, 4, 4
TRUE_MEAN = (2.0, -1.0, 0.5)  # the data: channel c ~ Normal(TRUE_MEAN[c], TRUE_STD[c])
TRUE_STD = (3.0, 0.5, 1.0)
MOMENTUM, EPS = 0.1, 1e-5
STEPS, QUICK_STEPS = 60, 20


def by_hand(x, running_mean, running_var, w, b, momentum):
    """One training step in NumPy float64: (y, batch mean, biased var, unbiased var, new running
    mean, new running var)."""
    x = x.astype(np.float64)
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mu = x.mean(axis=(0, 2, 3))
    var = ((x - mu[:, None, None]) ** 2).mean(axis=(0, 2, 3))  # two-pass, biased
    var_unbiased = var * n / (n - 1)
    y = (x - mu[:, None, None]) / np.sqrt(var[:, None, None] + EPS) * w[:, None, None] + b[:, None, None]
    new_mean = (1 - momentum) * running_mean + momentum * mu
    new_var = (1 - momentum) * running_var + momentum * var_unbiased
    return y, mu, var, var_unbiased, new_mean, new_var


def eval_by_hand(x, running_mean, running_var, w, b):
    s = (slice(None), None, None)
    return (x.astype(np.float64) - running_mean[s]) / np.sqrt(running_var[s] + EPS) * w[s] + b[s]


def data(seed, steps):
    """``steps`` float32 batches [N, C, H, W] of the data, and float64 weight and bias (a
    trained-looking affine, not 1 and 0), all drawn from ``seed``."""
    g = generator(seed)
    mean, std = torch.tensor(TRUE_MEAN).view(1, C, 1, 1), torch.tensor(TRUE_STD).view(1, C, 1, 1)
    batches = [mean + std * torch.randn(N, C, H, W, generator=g) for _ in range(steps)]
    w = (1 + 0.5 * torch.randn(C, generator=g)).double().numpy()
    b = (0.5 * torch.randn(C, generator=g)).double().numpy()
    return batches, w, b


def _module(norm, momentum, w, b):
    m = modules(norm).BatchNorm2d(C, eps=EPS, momentum=momentum)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(w))
        m.bias.copy_(torch.from_numpy(b))
    return m


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    steps = QUICK_STEPS if quick else STEPS
    batches, w, b = data(seed, steps)
    n = N * H * W
    name = f"{norm}.nn.BatchNorm2d"
    print(f"data: batches of {N} images x {C} channels x {H}x{W} pixels, channel c ~ Normal(mean {list(TRUE_MEAN)}"
          f"[c], std {list(TRUE_STD)}[c]); each channel is normalized over N*H*W = {n} values")

    # --- step 1, by hand and by the module --------------------------------------------------------
    bn = _module(norm, MOMENTUM, w, b).train()
    x = batches[0]
    y_hand, mu, var, var_u, rm_hand, rv_hand = by_hand(x.numpy(), np.zeros(C), np.ones(C), w, b, MOMENTUM)
    y_mod = bn(x).detach()
    print("\nstep 1, training mode: the batch statistics")
    print(f"  batch mean mu_c                      {fmt(mu)}")
    print(f"  batch var, biased (normalizes)       {fmt(var)}")
    print(f"  batch var, unbiased x n/(n-1)        {fmt(var_u)}   (n/(n-1) = {n / (n - 1):.5f})")
    err_y = max_diff(y_hand, y_mod)
    print(f"  y = (x - mu) / sqrt(var + eps) * w + b: by hand vs {name}: max |diff| = {err_y:.2e}")
    out = y_mod.double().numpy()
    print(f"  output per channel: mean {fmt(out.mean(axis=(0, 2, 3)))} (= b {fmt(b)}), "
          f"std {fmt(out.std(axis=(0, 2, 3)), '.3f')} (= |w| {fmt(np.abs(w), '.3f')})")
    err_rm1, err_rv1 = max_diff(rm_hand, bn.running_mean), max_diff(rv_hand, bn.running_var)
    biased_rv = 0.9 * np.ones(C) + MOMENTUM * var
    biased_off = max_diff(biased_rv, bn.running_var)
    print(f"  running_mean = 0.9 * 0 + 0.1 * mu           {fmt(bn.running_mean)}  by hand: max |diff| = {err_rm1:.2e}")
    print(f"  running_var  = 0.9 * 1 + 0.1 * var_unbiased {fmt(bn.running_var)}  by hand: max |diff| = {err_rv1:.2e}")
    print(f"  (with the biased var the running_var would be off by up to {biased_off:.2e})")

    # --- many steps: running averages, momentum 0.1 and momentum=None ----------------------------
    cumulative = _module(norm, None, w, b).train()
    cumulative(x)
    rm, rv = rm_hand, rv_hand
    hist = {"mean": [bn.running_mean.tolist()], "var": [bn.running_var.tolist()],
            "cum_mean": [cumulative.running_mean.tolist()], "cum_var": [cumulative.running_var.tolist()]}
    mus, vars_u = [mu], [var_u]
    err_run = max(err_rm1, err_rv1)
    for xb in batches[1:]:
        bn(xb)
        cumulative(xb)
        _, mu_k, _, var_u_k, rm, rv = by_hand(xb.numpy(), rm, rv, w, b, MOMENTUM)
        mus.append(mu_k)
        vars_u.append(var_u_k)
        err_run = max(err_run, max_diff(rm, bn.running_mean), max_diff(rv, bn.running_var))
        for key, t in (("mean", bn.running_mean), ("var", bn.running_var), ("cum_mean", cumulative.running_mean),
                       ("cum_var", cumulative.running_var)):
            hist[key].append(t.tolist())
    err_cum = max(max_diff(np.mean(mus, axis=0), cumulative.running_mean),
                  max_diff(np.mean(vars_u, axis=0), cumulative.running_var))
    true_var = np.square(TRUE_STD)
    print(f"\nafter {steps} steps (num_batches_tracked = {int(bn.num_batches_tracked)})")
    print(f"  momentum 0.1: running_mean {fmt(bn.running_mean)}  running_var {fmt(bn.running_var)}")
    print(f"  momentum None: running_mean {fmt(cumulative.running_mean)}  running_var {fmt(cumulative.running_var)}")
    print(f"  the data's true mean         {fmt(TRUE_MEAN)}  true var    {fmt(true_var)}")
    print(f"  every step's running statistics by hand vs the module: max |diff| = {err_run:.2e}")
    print(f"  momentum=None is the plain average of the {steps} batch means and unbiased vars: "
          f"max |diff| = {err_cum:.2e}")

    # --- eval mode --------------------------------------------------------------------------------
    bn.eval()
    x = batches[-1]
    y_eval = bn(x).detach()
    y_eval_hand = eval_by_hand(x.numpy(), bn.running_mean.double().numpy(), bn.running_var.double().numpy(), w, b)
    err_eval = max_diff(y_eval_hand, y_eval)
    y_train_hand = by_hand(x.numpy(), rm, rv, w, b, MOMENTUM)[0]
    train_vs_eval = max_diff(y_train_hand, y_eval)
    alone = max_diff(bn(x[:1]).detach(), y_eval[:1])
    alone_train = max_diff(copy.deepcopy(bn).train()(x[:1]).detach(), y_train_hand[:1])  # a copy: bn keeps its stats
    print("\neval mode: the running statistics normalize, nothing is updated")
    print(f"  y = (x - running_mean) / sqrt(running_var + eps) * w + b: by hand vs module: max |diff| = {err_eval:.2e}")
    print(f"  the same batch in train mode vs eval mode: max |diff| = {train_vs_eval:.3f}")
    print(f"  image 0 alone vs inside its batch: eval mode max |diff| = {alone:.2e}, "
          f"train mode {alone_train:.3f} (its batch statistics changed)")

    # --- the other implementation -----------------------------------------------------------------
    twin = _module(other(norm), MOMENTUM, w, b).train()
    bn2 = _module(norm, MOMENTUM, w, b).train()
    err_twin_y = max(max_diff(twin(xb).detach(), bn2(xb).detach()) for xb in batches)
    err_twin_buf = max(max_diff(twin.running_mean, bn2.running_mean), max_diff(twin.running_var, bn2.running_var))
    twin.eval()
    bn2.eval()
    err_twin_y = max(err_twin_y, max_diff(twin(batches[0]).detach(), bn2(batches[0]).detach()))
    print(f"\n{norm} vs {other(norm)} BatchNorm2d on the same {steps} batches: outputs max |diff| = "
          f"{err_twin_y:.2e}, running statistics max |diff| = {err_twin_buf:.2e}")

    fig = figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    steps_axis = np.arange(1, steps + 1)
    panels = ((axes[0], "mean", TRUE_MEAN, "running_mean"), (axes[1], "var", true_var, "running_var"))
    for ax, key, true, label in panels:
        for c in range(C):
            color = f"C{c}"
            ax.plot(steps_axis, [h[c] for h in hist[key]], color=color, label=f"channel {c}, momentum 0.1")
            ax.plot(steps_axis, [h[c] for h in hist[f"cum_{key}"]], color=color, linestyle="--",
                    label=f"channel {c}, momentum None")
            ax.axhline(true[c], color=color, linewidth=0.6, linestyle=":")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{label} per channel")
        ax.set_title(f"{label} ({norm}); dotted: the data's true {key}", fontsize=9)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=C, fontsize=7)
    path = save(fig, out_dir, NAME)

    return {
        "steps": steps, "train_output_err": err_y, "running_step1_err": max(err_rm1, err_rv1),
        "biased_var_would_be_off": biased_off, "running_err": err_run, "cumulative_err": err_cum,
        "eval_output_err": err_eval, "train_vs_eval_max_diff": train_vs_eval,
        "eval_alone_vs_in_batch": alone, "train_alone_vs_in_batch": alone_train,
        "num_batches_tracked": int(bn.num_batches_tracked), "running_mean": bn.running_mean.tolist(),
        "running_var": bn.running_var.tolist(), "cumulative_mean": cumulative.running_mean.tolist(),
        "cumulative_var": cumulative.running_var.tolist(), "true_mean": list(TRUE_MEAN), "true_var": true_var.tolist(),
        "vs_other_output_err": err_twin_y, "vs_other_running_err": err_twin_buf, "plot": path,
    }
