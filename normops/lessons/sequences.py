"""Lesson ``sequences``: LayerNorm vs BatchNorm on token sequences of different lengths, padded to
a common length, and at batch size 1.

LayerNorm normalizes each token over its own features: a token's output depends on that token
only. BatchNorm1d on [N, C, L] normalizes each feature over every position of every sequence in
the batch, padding included: a sequence's output depends on which sequences share its batch and
on how much padding they bring, and the running statistics learn the padding too.
"""
import numpy as np
import torch

from ._common import error_text, figure, fmt, generator, header, lesson, max_diff, modules, save

NAME = "sequences"
DESCRIPTION = "LayerNorm vs BatchNorm on variable-length sequences (padding) and at batch size 1"

C = 4  # features per token
TOKEN_MEAN = (2.0, -1.0, 0.5, 3.0)  # embeddings are not centred: padding zeros then shift the statistics
TOKEN_STD = (1.0, 2.0, 0.5, 1.0)
LEN_A = 5  # the sequence whose outputs we follow


def tokens(length, g):
    """[length, C] token features."""
    return torch.tensor(TOKEN_MEAN) + torch.tensor(TOKEN_STD) * torch.randn(length, C, generator=g)


def pad(seqs):
    """[N, L, C] zero-padded to the longest, and the [N, L] mask of real tokens."""
    longest = max(len(s) for s in seqs)
    x = torch.zeros(len(seqs), longest, C)
    mask = torch.zeros(len(seqs), longest, dtype=torch.bool)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
        mask[i, :len(s)] = True
    return x, mask


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    ns = modules(norm)
    g = generator(seed)
    a = tokens(LEN_A, g)
    contexts = {
        "alone (batch 1)": [a],
        "with one of length 20": [a, tokens(20, g)],
        "in a batch of 8, lengths 3-30": [a] + [tokens(int(n), g) for n in torch.randint(3, 31, (7,), generator=g)],
    }
    print(f"tokens of {C} features, feature c ~ Normal({list(TOKEN_MEAN)}[c], {list(TOKEN_STD)}[c]); sequence A has "
          f"{LEN_A} tokens; padded batches are [N, L, C] with zeros after each sequence's end; norms from {norm}")

    bn, ln = ns.BatchNorm1d(C).train(), ns.LayerNorm(C)
    outs = {"batch": {}, "layer": {}}
    print(f"\n{'A in a batch':<32} {'padding':>8}  BatchNorm1d batch mean of feature 0 (A's tokens' own: "
          f"{float(a[:, 0].mean()):.3f})")
    with torch.no_grad():
        for name, seqs in contexts.items():
            x, mask = pad(seqs)
            outs["batch"][name] = bn(x.transpose(1, 2)).transpose(1, 2)[0, :LEN_A]  # BatchNorm1d wants [N, C, L]
            outs["layer"][name] = ln(x)[0, :LEN_A]
            real = x[mask]
            print(f"{name:<32} {1 - mask.float().mean():>8.0%}  {float(x[..., 0].mean()):.3f} (real tokens only: "
                  f"{float(real[:, 0].mean()):.3f})")
    names = list(contexts)
    spread = {k: max(max_diff(v[names[0]], v[n]) for n in names[1:]) for k, v in outs.items()}
    print(f"A's {LEN_A} token outputs across the three batches: BatchNorm1d max |diff| = {spread['batch']:.3f}, "
          f"LayerNorm max |diff| = {spread['layer']:.2e}")

    # running statistics learned from padded batches, then used in eval
    steps = 100  # instant either way: quick changes nothing here
    bn_run = ns.BatchNorm1d(C).train()
    pad_fraction, real_tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            seqs = [tokens(int(n), g) for n in torch.randint(3, 31, (8,), generator=g)]
            x, mask = pad(seqs)
            bn_run(x.transpose(1, 2))
            pad_fraction.append(float(1 - mask.float().mean()))
            real_tokens.append(x[mask])
        real = torch.cat(real_tokens)
        bn_run.eval()
        real_eval = bn_run(real.T.unsqueeze(0))[0].T  # every real token seen, normalized as in eval
        real_ln = ln(real)
    p = sum(pad_fraction) / steps
    print(f"\n{steps} training batches of 8 sequences of lengths 3-30 (on average {p:.0%} padding):")
    print(f"  BatchNorm1d running_mean {fmt(bn_run.running_mean)}")
    print(f"  mean of the real tokens  {fmt(real.mean(0))}  (x (1 - padding) = {fmt(real.mean(0) * (1 - p))})")
    print(f"  running_var              {fmt(bn_run.running_var)}")
    print(f"  var of the real tokens   {fmt(real.var(0))}")
    print(f"  in eval mode those real tokens come out with per-feature mean {fmt(real_eval.mean(0))} and std "
          f"{fmt(real_eval.std(0), '.3f')}, not 0 and 1")
    ln_std = real_ln.std(1, correction=0)
    print(f"  LayerNorm: every token comes out with mean 0 and std 1 over its features "
          f"(max |mean| {float(real_ln.mean(1).abs().max()):.1e}, std in [{float(ln_std.min()):.4f}, "
          f"{float(ln_std.max()):.4f}])")
    eval_mean_err = float(real_eval.mean(0).abs().max())

    # batch size 1
    x1 = a.T.unsqueeze(0)  # [1, C, L]
    with torch.no_grad():
        as_instance = max_diff(ns.BatchNorm1d(C).train()(x1), ns.InstanceNorm1d(C)(x1))
        try:
            ns.BatchNorm1d(C).train()(a.mean(0, keepdim=True))  # [1, C]: a pooled sequence embedding
            pooled_error = None
        except (ValueError, RuntimeError) as e:
            pooled_error = error_text(e)
        ln_pooled = ln(a.mean(0, keepdim=True))
    print("\nbatch size 1:")
    print(f"  BatchNorm1d on one sequence [1, C, L] normalizes each feature over that sequence's tokens, as "
          f"InstanceNorm1d does: max |diff| = {as_instance:.2e}")
    print(f"  BatchNorm1d on one pooled embedding [1, C] in training: {pooled_error or 'no error'}")
    print(f"  LayerNorm on the same [1, C]: {fmt(ln_pooled[0])} (each token, or embedding, normalizes itself)")

    fig = figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    for ax, kind, label in ((axes[0], "batch", "BatchNorm1d (train)"), (axes[1], "layer", "LayerNorm")):
        for k, name in enumerate(names):
            ax.plot(range(LEN_A), outs[kind][name][:, 0].numpy(), marker="o", color=f"C{k}", label=f"A {name}",
                    linestyle=("-", "--", ":")[k])
        ax.set_xlabel("token of sequence A")
        ax.set_ylabel(f"{label.split()[0]} output, feature 0")
        same = ", one line: they coincide" if spread[kind] < 1e-3 else ""
        ax.set_title(f"{label}: sequence A's feature 0\nin 3 different batches{same}", fontsize=9)
        ax.set_xticks(range(LEN_A))
    axes[0].legend(fontsize=7)
    xs = np.arange(C)
    axes[2].bar(xs - 0.2, real.mean(0).numpy(), 0.4, label="mean of the real tokens")
    axes[2].bar(xs + 0.2, bn_run.running_mean.numpy(), 0.4, label="BatchNorm1d running_mean")
    axes[2].set_xticks(range(C))
    axes[2].set_xlabel("feature")
    axes[2].set_ylabel("mean of the feature")
    axes[2].set_title(f"feature means vs BatchNorm1d running_mean\nafter {steps} padded batches "
                      f"({p:.0%} padding)", fontsize=9)
    axes[2].legend(fontsize=7)
    path = save(fig, out_dir, NAME)
    return {"batchnorm_context_max_diff": spread["batch"], "layernorm_context_max_diff": spread["layer"],
            "pad_fraction": p, "running_mean": bn_run.running_mean.tolist(), "real_token_mean": real.mean(0).tolist(),
            "running_var": bn_run.running_var.tolist(), "real_token_var": real.var(0).tolist(),
            "eval_real_token_mean": real_eval.mean(0).tolist(), "eval_real_token_std": real_eval.std(0).tolist(),
            "eval_output_mean_max_abs": eval_mean_err, "batch1_batchnorm_vs_instancenorm": as_instance,
            "batch1_pooled_error": pooled_error, "plot": path}
