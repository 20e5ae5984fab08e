"""Lesson ``mistakes``: the common mistakes of the original material, made on purpose and measured.

1. Forgetting ``model.eval()``: a BatchNorm net keeps normalizing with the statistics of whatever
   batch it is given, so an image's prediction depends on its batch companions, and every
   "inference" batch rewrites the running statistics (even under ``torch.no_grad()``).
2. BatchNorm with batch size 1: on [1, C] features training raises; on [1, C, H, W] it runs,
   as InstanceNorm; a data loader whose last batch holds one sample raises mid-epoch.
3. InstanceNorm for classification when the class is in the per-image statistics: here, the
   exposure of an image. InstanceNorm removes exactly that, so the net cannot see the class.
"""
import copy

import numpy as np
import torch

from ._common import (accuracy, digits, error_text, figure, generator, header, lesson, max_diff, modules, save,
                      small_cnn, train_epoch)
from .with_without import mlp

NAME = "mistakes"
DESCRIPTION = "common mistakes, live: no model.eval(), BatchNorm at batch size 1, InstanceNorm for classification"

BATCH = 32
EXPOSURES = (0.5, 1.0, 2.0)  # class k of the exposure task: images scaled by EXPOSURES[k]


def forgot_eval(norm, seed):
    x, y, xt, yt = digits(seed)
    x, xt = x.flatten(1), xt.flatten(1)
    torch.manual_seed(seed)
    model = mlp("batch", norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = generator(seed + 1)
    for _ in range(3):
        train_epoch(model, opt, x, y, BATCH, g)
    bn = model[1]  # the first BatchNorm1d
    print(f"1. forgetting model.eval(): the BatchNorm MLP of lesson with-without, trained 3 epochs on {len(y)} digits "
          f"(batch {BATCH})")
    g = generator(seed + 5)
    img, label = xt[:1], int(yt[0])
    other = int(yt[1:][yt[1:] != label][0])
    others = xt[1:][torch.randperm(len(yt) - 1, generator=g)[:BATCH - 1]]
    same_class = xt[1:][yt[1:] == other][:BATCH - 1]
    batches = {f"with {BATCH - 1} random digits": torch.cat([img, others]),
               "with 1 random digit": torch.cat([img, others[:1]]),
               f"with {len(same_class)} digits '{other}'": torch.cat([img, same_class])}
    logits = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            probe = copy.deepcopy(model).train(mode == "train")  # a copy: train mode rewrites running stats
            logits[mode] = {name: probe(b)[0] for name, b in batches.items()}
    names = list(batches)
    spread = {m: max(max_diff(v[names[0]], v[n]) for n in names[1:]) for m, v in logits.items()}
    print(f"   test image 0 (a '{label}') in three batches: its logits differ by up to {spread['eval']:.1e} in eval "
          f"mode, {spread['train']:.2f} in train mode")
    for name in names:
        print(f"   {name:<26} eval mode predicts {int(logits['eval'][name].argmax())}, train mode "
              f"{int(logits['train'][name].argmax())}")

    # every test digit, in two different random batchings
    perms = [torch.randperm(len(yt), generator=g) for _ in range(2)]
    flipped = {}
    with torch.no_grad():
        for mode in ("eval", "train"):
            preds = []
            for perm in perms:
                probe = copy.deepcopy(model).train(mode == "train")
                pred = torch.cat([probe(xt[perm[i:i + BATCH]]).argmax(1) for i in range(0, len(yt), BATCH)])
                preds.append(torch.empty_like(pred).scatter_(0, perm, pred))  # back in test-set order
            flipped[mode] = float((preds[0] != preds[1]).float().mean())
    print(f"   test digits whose answer changes when the batches of {BATCH} are shuffled differently: "
          f"{flipped['train']:.1%} in train mode, {flipped['eval']:.1%} in eval mode")

    acc = {"eval": accuracy(model, xt, yt)}
    acc[f"train mode, random batches of {BATCH}"] = accuracy(copy.deepcopy(model), xt, yt, True, BATCH)
    acc["train mode, random batches of 2"] = accuracy(copy.deepcopy(model), xt, yt, True, 2)
    order = torch.argsort(yt, stable=True)  # batches sorted by class: one or two digits per batch
    probe = copy.deepcopy(model)
    before = int(probe[1].num_batches_tracked)
    acc[f"train mode, class-sorted batches of {BATCH}"] = accuracy(probe, xt[order], yt[order], True, BATCH)
    acc["eval after that"] = accuracy(probe, xt, yt)
    drift = max_diff(probe[1].running_mean, bn.running_mean)
    print("   test accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
    print(f"   the class-sorted pass, under torch.no_grad(), still made {int(probe[1].num_batches_tracked) - before} "
          f"running-statistics updates: the first BatchNorm's running_mean moved by up to {drift:.3f}")
    return {"label": label, "eval_logit_spread": spread["eval"], "train_logit_spread": spread["train"],
            "flipped": flipped,
            "predictions": {m: {n: int(v.argmax()) for n, v in d.items()} for m, d in logits.items()},
            "logits": {m: {n: v.tolist() for n, v in d.items()} for m, d in logits.items()},
            "accuracy": acc, "running_mean_drift": drift}


def batch_of_one(norm, seed):
    ns = modules(norm)
    print("\n2. BatchNorm with batch size 1")
    try:
        ns.BatchNorm1d(16).train()(torch.randn(1, 16))
        error = None
    except (ValueError, RuntimeError) as e:
        error = error_text(e)
    print(f"   BatchNorm1d(16) training on [1, 16]: {error or 'no error'}")
    bn = ns.BatchNorm1d(16).eval()
    eval_ok = bool(torch.isfinite(bn(torch.randn(1, 16))).all())
    print(f"   the same module in eval mode (running statistics): {'finite output, no error' if eval_ok else 'fails'}")
    with torch.no_grad():
        h = torch.randn(1, 8, 8, 8)
        as_instance = max_diff(ns.BatchNorm2d(8).train()(h), ns.InstanceNorm2d(8)(h))
    print(f"   BatchNorm2d training on one image [1, 8, 8, 8] raises nothing: it normalizes the image by itself, "
          f"max |BatchNorm2d - InstanceNorm2d| = {as_instance:.1e}")

    # a loop without drop_last: 101 samples in batches of 4 leave one sample for the last batch
    x, y, _, _ = digits(seed, 101)
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), ns.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 10))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    loop_error, steps = None, 0
    try:
        for i in range(0, len(y), 4):
            loss = torch.nn.functional.cross_entropy(mlp(x[i:i + 4]), y[i:i + 4])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    except (ValueError, RuntimeError) as e:
        loop_error = error_text(e)
    print(f"   an epoch over {len(y)} samples in batches of 4 without drop_last: {steps} steps, then at the last "
          f"batch ({len(y) % 4} sample): {loop_error or 'no error'}")
    return {"error": error, "eval_ok": eval_ok, "batchnorm2d_vs_instancenorm": as_instance,
            "loop_error": loop_error, "loop_steps": steps}


def exposure_task(x, seed):
    """Each digit scaled by a random one of EXPOSURES (x 0.9-1.1 jitter); the label is which."""
    g = generator(seed)
    label = torch.randint(0, len(EXPOSURES), (len(x),), generator=g)
    jitter = torch.empty(len(x), 1, 1, 1).uniform_(0.9, 1.1, generator=g)
    return x * torch.tensor(EXPOSURES)[label].view(-1, 1, 1, 1) * jitter, label


def instance_for_classification(norm, seed, quick):
    x, _, xt, _ = digits(seed, 500 if quick else None)
    xe, ye = exposure_task(x, seed + 7)
    xte, yte = exposure_task(xt, seed + 8)
    epochs = 1 if quick else 2
    print(f"\n3. InstanceNorm for classification: is a digit under- (x{EXPOSURES[0]}), normally (x{EXPOSURES[1]}) or "
          f"over-exposed (x{EXPOSURES[2]})? {len(ye)} training digits, {epochs} epoch(s), batch 16, chance 1/3")
    acc, models = {}, {}
    for kind in ("batch", "layer", "instance"):
        torch.manual_seed(seed)
        models[kind] = small_cnn(kind, norm, classes=len(EXPOSURES))
        opt = torch.optim.Adam(models[kind].parameters(), lr=4e-3)
        for _ in range(epochs):
            train_epoch(models[kind], opt, xe, ye, 16, generator(seed + 1))
        acc[kind] = accuracy(models[kind], xte, yte)
    with torch.no_grad():
        models["instance"].eval()
        out = [models["instance"](xt[:50] * e) for e in EXPOSURES]
    blind = max(max_diff(out[0], o) for o in out[1:])
    answers = torch.stack([o.argmax(1) for o in out])
    same_answer = float((answers == answers[0]).all(0).float().mean())
    print(f"   test accuracy: BatchNorm2d {acc['batch']:.1%}, LayerNorm {acc['layer']:.1%}, "
          f"InstanceNorm2d {acc['instance']:.1%}")
    print(f"   the InstanceNorm net on 50 test digits, each at the three exposures: logits max |diff| = {blind:.1e}, "
          f"the same answer for all three exposures for {same_answer:.0%} of the digits")
    return {"accuracy": acc, "instance_logit_diff_across_exposures": blind, "instance_same_answer": same_answer}


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    print(f"norms from {norm}\n")
    ev = forgot_eval(norm, seed)
    one = batch_of_one(norm, seed)
    inst = instance_for_classification(norm, seed, quick)

    fig = figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    contexts = list(ev["logits"]["train"])
    width = 0.8 / (len(contexts) + 1)
    classes = np.arange(10)
    ax1.bar(classes - 0.4 + width / 2, ev["logits"]["eval"][contexts[0]], width, color="black", label="eval, any batch")
    for k, name in enumerate(contexts):
        ax1.bar(classes - 0.4 + width * (k + 1.5), ev["logits"]["train"][name], width, label=f"train mode, {name}")
    ax1.set_xticks(range(10))
    ax1.set_xlabel("class (digit)")
    ax1.set_ylabel("logit")
    # the test set's first image (a '6' with seed 0), not the digit zero: its peak is its own class
    label, predicted = ev["label"], ev["predictions"]["eval"][contexts[0]]
    verdict = "right" if predicted == label else "wrong"
    ax1.set_title(f"no model.eval(): logits of the first test image, a '{label}'\neval mode: peak at {predicted} "
                  f"({verdict}) in any batch\ntrain mode: the logits change with the batch", fontsize=9)
    ax1.legend(fontsize=6)
    names = list(ev["accuracy"])
    bars = ax2.bar(range(len(names)), [ev["accuracy"][n] for n in names], color=["black"] + [f"C{k}" for k in range(4)])
    ax2.bar_label(bars, fmt="{:.0%}", fontsize=7)
    short = ["eval", f"train mode\nrandom, {BATCH}", "train mode\nrandom, 2", f"train mode\nsorted, {BATCH}",
             "eval after\nsorted pass"]  # the keys of forgot_eval's accuracy, in order
    ax2.set_xticks(range(len(names)), short, fontsize=7)
    ax2.set_ylim(0, 1.1)  # room for the 100% bars' labels
    ax2.set_ylabel("test accuracy")
    ax2.set_title("BatchNorm MLP: test accuracy, eval mode vs\ntrain mode (no model.eval()) in batches", fontsize=9)
    kinds = list(inst["accuracy"])
    bars = ax3.bar(range(len(kinds)), [inst["accuracy"][k] for k in kinds], color=["C0", "C1", "C3"])
    ax3.bar_label(bars, fmt="{:.0%}", fontsize=7)
    ax3.axhline(1 / len(EXPOSURES), color="black", linestyle=":", label="chance")
    ax3.set_xticks(range(len(kinds)), ["BatchNorm2d", "LayerNorm", "InstanceNorm2d"], fontsize=8)
    ax3.set_ylim(0, 1.1)
    ax3.set_ylabel("test accuracy")
    ax3.set_title(f"is a digit x{EXPOSURES[0]}, x{EXPOSURES[1]} or x{EXPOSURES[2]} exposed? InstanceNorm\n"
                  f"removes the image's intensity, the very class", fontsize=9)
    ax3.legend(fontsize=7)
    path = save(fig, out_dir, NAME)
    return {"forgot_eval": ev, "batch_of_one": one, "instance_classification": inst, "plot": path}
