"""Pre-norm Transformer encoder with LayerNorm, learning to sort sequences of digits.

The residual stream ``h`` passes through sublayers (attention, MLP, attention, MLP, ...), each
reading the LayerNorm of the stream. The residual add of one sublayer and the LayerNorm the next
one reads are one step, ``y, h = add_norm(sublayer(y), h)``: with ``norm="normops"`` the fused
``normops.functional.add_layer_norm``; with ``norm="torch"`` ``h = out + h; y = ln(h)``. The last
LayerNorm of the stream is the final norm before the output head.

Task: a sequence of 16 random digits in, the same digits sorted out (one token per position,
non-causal attention). Target: 98% of 2048 held-out sequences sorted right, every token of them.
"""
import torch
from torch import nn
from torch.nn import functional as TF

from .data import sort_task
from .norms import add_norm, check_norm, residual_layer_norm, seeded
from .train import train_sequences

NAME = "transformer"
TASK = "sort 16 digits"
METRIC = "sequence accuracy"
TARGET = 0.98
HIGHER_IS_BETTER = True
STEPS = 1500
QUICK_STEPS = 3
BATCH = 64
LR = 2e-3
LENGTH, VOCAB = 16, 10


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = TF.scaled_dot_product_attention(q, k, v)  # [b, heads, t, d / heads]
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Sequential):
    def __init__(self, dim, hidden):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Encoder(nn.Module):
    def __init__(self, norm="normops", vocab=VOCAB, length=LENGTH, dim=64, heads=4, layers=2):
        super().__init__()
        self.norm_kind = check_norm(norm)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.sublayers = nn.ModuleList()
        for _ in range(layers):
            self.sublayers.extend([Attention(dim, heads), MLP(dim, 4 * dim)])
        # norms[i] feeds sublayer i; norms[-1] is the final norm, before the head.
        self.norms = nn.ModuleList(residual_layer_norm(norm, dim) for _ in range(2 * layers + 1))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        y = self.norms[0](h)
        for sublayer, ln in zip(self.sublayers, self.norms[1:]):
            y, h = add_norm(self.norm_kind, sublayer(y), h, ln)
        return self.head(y)


def sequence_accuracy(model, x, y):
    """The fraction of sequences with every token right."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).all(-1).float().mean().item()


MODEL = Encoder  # built at its training size by normops.models.build
INPUT_SHAPE = (LENGTH,)  # one example of the task's inputs (digit sequences), for normops.models.example_input


def train(norm="normops", steps=STEPS, seed=0, progress=False):
    return train_sequences(NAME, norm, lambda: Encoder(norm),
                           lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=0.01),
                           lambda n, seed: sort_task(n, LENGTH, VOCAB, seed=seed), sequence_accuracy, LR, BATCH,
                           steps, seed, progress)


def tiny_loss(norm="normops", seed=0):
    """A one-layer, 16-wide encoder and its loss on two sequences of 6: for the Triton-interpreter test."""
    seeded(seed)
    model = Encoder(norm, length=6, dim=16, heads=2, layers=1)
    x, y = sort_task(2, 6, VOCAB, seed=seed)
    return model, TF.cross_entropy(model(x).flatten(0, 1), y.flatten())
