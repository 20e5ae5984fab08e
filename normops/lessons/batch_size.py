"""Lesson ``batch-size``: BatchNorm vs LayerNorm vs GroupNorm vs InstanceNorm across batch sizes.

One small CNN (``small_cnn``) per norm and batch size, trained for one epoch on the digits with
Adam at lr 1e-3 * sqrt(batch size) (the square-root scaling keeps the noise of an update about
equal across batch sizes), then scored on the test set in eval mode.

BatchNorm trains with the statistics of the batch and predicts with running averages of them. At
batch size 1 (a CNN has H*W values per channel, so torch allows it) the batch statistics are one
image's own: training normalizes every image by itself, like InstanceNorm, while eval normalizes
by the average image. The larger the image-to-image differences in those statistics, the larger
that mismatch; the digit scans are all normalized alike, so the lesson varies each image's
exposure (contrast and brightness) as photos would vary, and measures both. The other norms use
per-image statistics in training and eval alike.
"""
import copy

import torch

from ._common import (accuracy, digits, error_text, figure, functional, generator, header, lesson, max_diff, modules,
                      save, small_cnn, train_epoch, vary_exposure)

NAME = "batch-size"
DESCRIPTION = "BatchNorm vs LayerNorm vs GroupNorm vs InstanceNorm accuracy on the digits across batch sizes 1-64"

KINDS = ("batch", "layer", "group", "instance")
LABELS = {"batch": "BatchNorm2d", "layer": "LayerNorm", "group": "GroupNorm", "instance": "InstanceNorm2d"}
BATCH_SIZES, QUICK_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64), (1, 4, 16)
N_TRAIN, QUICK_N_TRAIN = None, 500  # None: all 1347 training digits
LR = 1e-3


def train_cnn(kind, norm, batch_size, seed, x, y):
    torch.manual_seed(seed)
    model = small_cnn(kind, norm)
    opt = torch.optim.Adam(model.parameters(), lr=LR * batch_size ** 0.5)
    train_epoch(model, opt, x, y, batch_size, generator(seed + 1))
    return model


@torch.no_grad()
def train_eval_gap(model, x, batch_size, norm):
    """How differently the first BatchNorm normalizes in training (batches of ``batch_size``) and in
    eval (running statistics): RMS of the difference of its two outputs over the RMS of the eval
    one, on ``x``."""
    conv, bn = model[0], model[1]
    h = conv(x)
    ev = functional(norm).batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    tr = torch.cat([functional(norm).batch_norm(h[i:i + batch_size], None, None, bn.weight, bn.bias, True)
                    for i in range(0, len(h) - batch_size + 1, batch_size)])
    return float((tr - ev[:len(tr)]).square().mean().sqrt() / ev.square().mean().sqrt())


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    sizes = QUICK_BATCH_SIZES if quick else BATCH_SIZES
    x, y, xt, yt = digits(seed, QUICK_N_TRAIN if quick else N_TRAIN)
    xe, xte = vary_exposure(x, seed + 2), vary_exposure(xt, seed + 3)
    spread = {"scans": float(x.mean((1, 2, 3)).std()), "exposure": float(xe.mean((1, 2, 3)).std())}
    print(f"small CNN (conv-norm-ReLU x 2, linear) per norm, {len(y)} training digits, 1 epoch, Adam lr {LR} x "
          f"sqrt(batch size), test accuracy ({len(yt)} digits) in eval mode; norms from {norm}")
    print(f"digits under varied exposure: per-image contrast x exp(U(-1.5, 1.5)), brightness + U(-1, 1); the std "
          f"over images of an image's mean pixel is {spread['exposure']:.3f} (the scans as given: "
          f"{spread['scans']:.3f})")

    acc, gap, at_one = {k: {} for k in KINDS}, {}, {}
    for bs in sizes:
        for kind in KINDS:
            model = train_cnn(kind, norm, bs, seed, xe, y)
            acc[kind][bs] = accuracy(model, xte, yt)
            if kind == "batch":
                gap[bs] = train_eval_gap(model, xte, bs, norm)
            if bs == 1:
                at_one[kind] = model
    print(f"\n{'batch size':>10}  " + "  ".join(f"{LABELS[k]:>14}" for k in KINDS) + "  BatchNorm train/eval gap")
    for bs in sizes:
        print(f"{bs:>10}  " + "  ".join(f"{acc[k][bs]:>14.1%}" for k in KINDS) + f"  {gap[bs]:>24.3f}")
    big = sizes[-1]
    print(f"BatchNorm at batch 1: {acc['batch'][1]:.1%} vs {acc['batch'][big]:.1%} at batch {big}; the per-image "
          f"norms at batch 1: " + ", ".join(f"{LABELS[k]} {acc[k][1]:.1%}" for k in KINDS[1:]))
    print("train/eval gap: RMS(first BatchNorm's output with batch statistics - with running statistics) / RMS(the "
          "latter), on the test images")
    momentum = at_one["batch"][1].momentum
    print("steps in the epoch: " + ", ".join(f"batch {bs}: {len(y) // bs}" for bs in sizes) + f"; the running "
          f"statistics keep (1 - {momentum})^steps of their initial 0 and 1: at batch {sizes[-1]} "
          f"{(1 - momentum) ** (len(y) // sizes[-1]):.3f}")

    # at batch 1, BatchNorm2d's training is InstanceNorm2d's: the same network comes out
    bn1, in1 = at_one["batch"], at_one["instance"]
    same_weights = max(max_diff(p, q) for p, q in zip(bn1.parameters(), in1.parameters()))
    bn1_per_image = accuracy(copy.deepcopy(bn1), xte, yt, train_mode=True, batch_size=1)
    print(f"at batch 1 BatchNorm2d in training computes what InstanceNorm2d (affine) computes: trained from the same "
          f"seed on the same batches, their weights differ by at most {same_weights:.1e}. Only eval differs: running "
          f"statistics {acc['batch'][1]:.1%}, each image's own statistics (InstanceNorm2d {acc['instance'][1]:.1%}; "
          f"the BatchNorm net in train mode, one image at a "
          f"time, {bn1_per_image:.1%})")

    # the same at batch 1 on the scans as given: per-image statistics alike, little mismatch
    scans = {bs: accuracy(train_cnn("batch", norm, bs, seed, x, y), xt, yt) for bs in (1, big)}
    print(f"the scans as given (no exposure variation): BatchNorm at batch 1 {scans[1]:.1%}, at batch {big} "
          f"{scans[big]:.1%}")

    # batch 1 with BatchNorm on features without spatial dims
    bn1d = modules(norm).BatchNorm1d(32).train()
    try:
        bn1d(torch.randn(1, 32))
        bn1d_error = None
    except (ValueError, RuntimeError) as e:
        bn1d_error = error_text(e)
    print(f"BatchNorm1d(32) in training on a batch of 1 feature vector (1, 32): {bn1d_error or 'no error'}")
    with torch.no_grad():
        h = torch.randn(1, 16, 8, 8)
        as_instance = max_diff(modules(norm).BatchNorm2d(16).train()(h), modules(norm).InstanceNorm2d(16)(h))
    print(f"BatchNorm2d in training on a batch of 1 image (1, 16, 8, 8) normalizes it by itself: max |BatchNorm2d - "
          f"InstanceNorm2d| = {as_instance:.2e}")

    fig = figure(figsize=(10, 3.8))
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    for k, kind in enumerate(KINDS):
        ax.plot(sizes, [acc[kind][bs] for bs in sizes], marker="o", color=f"C{k}", label=LABELS[kind])
    ax.plot([1, big], [scans[1], scans[big]], marker="x", linestyle=":", color="C0",
            label="BatchNorm2d, scans as given")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_title("digits under varied exposure, 1 epoch", fontsize=9)
    ax.legend(fontsize=8)
    ax2.plot(sizes, [gap[bs] for bs in sizes], marker="o", color="C0")
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(sizes, [str(s) for s in sizes])
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("RMS(train - eval output) / RMS(eval output)")
    ax2.set_title("BatchNorm train/eval gap (first layer)", fontsize=9)
    path = save(fig, out_dir, NAME)
    return {"batch_sizes": list(sizes), "accuracy": {k: {str(bs): a for bs, a in v.items()} for k, v in acc.items()},
            "batchnorm_train_eval_gap": {str(bs): v for bs, v in gap.items()},
            "batchnorm_scans_accuracy": {str(bs): v for bs, v in scans.items()}, "image_mean_spread": spread,
            "batch1_batchnorm_vs_instancenorm_weights": same_weights,
            "batch1_batchnorm_per_image_accuracy": bn1_per_image,
            "batchnorm1d_batch1_error": bn1d_error, "batchnorm2d_batch1_vs_instance": as_instance, "plot": path}
