"""LSTM with layer-normalized gates (Ba, Kiros & Hinton 2016), learning a running sum mod 10.

The cell normalizes the input and the recurrent contributions to the four gates separately, then
the cell state before its tanh::

    i, f, g, o = split(LN_x(W_x x_t) + LN_h(W_h h_{t-1}) + b)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN_c(c_t))

The LayerNorms are ``normops.nn.LayerNorm`` or ``torch.nn.LayerNorm`` (``norm=``); the tanh of the
cell state is not one of the activations normops fuses, so it follows the norm in both.

Task: 16 random digits in; at each step, out the sum of the digits so far mod 10 (a counter of
10 states carried through the whole sequence). Target: 99% of the output digits of 2048
held-out sequences right.
"""
import torch
from torch import nn
from torch.nn import functional as TF

from .data import running_sum_task
from .norms import norm_act, seeded
from .train import train_sequences

NAME = "lstm"
TASK = "running digit sum mod 10"
METRIC = "digit accuracy"
TARGET = 0.99
HIGHER_IS_BETTER = True
STEPS = 1000
QUICK_STEPS = 3
BATCH = 64
LR = 5e-3
LENGTH, VOCAB = 16, 10


class LayerNormLSTMCell(nn.Module):
    def __init__(self, norm, input_size, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.wx = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.wh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.ln_x = norm_act(norm, "LayerNorm", 4 * hidden_size)[0]
        self.ln_h = norm_act(norm, "LayerNorm", 4 * hidden_size)[0]
        self.ln_c = norm_act(norm, "LayerNorm", hidden_size)[0]
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        with torch.no_grad():  # forget-gate bias 1: remember by default at the start
            self.bias[hidden_size:2 * hidden_size] = 1.0

    def forward(self, x, state):
        h, c = state
        i, f, g, o = (self.ln_x(self.wx(x)) + self.ln_h(self.wh(h)) + self.bias).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
        return h, c


class LSTM(nn.Module):
    """Embedding -> one LayerNorm-LSTM layer unrolled over time -> a linear head per step."""

    def __init__(self, norm="normops", vocab=VOCAB, dim=32, hidden=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.cell = LayerNormLSTMCell(norm, dim, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)  # [batch, time, dim]
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        out = []
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
            out.append(h)
        return self.head(torch.stack(out, dim=1))


def digit_accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


MODEL = LSTM  # built at its training size by normops.models.build
INPUT_SHAPE = (LENGTH,)  # one example of the task's inputs (digit sequences), for normops.models.example_input


def train(norm="normops", steps=STEPS, seed=0, progress=False):
    return train_sequences(NAME, norm, lambda: LSTM(norm), lambda params: torch.optim.Adam(params, lr=LR),
                           lambda n, seed: running_sum_task(n, LENGTH, VOCAB, seed=seed), digit_accuracy, LR, BATCH,
                           steps, seed, progress)


def tiny_loss(norm="normops", seed=0):
    """An 8-wide LSTM and its loss on two sequences of 4: for the Triton-interpreter test."""
    seeded(seed)
    model = LSTM(norm, dim=8, hidden=8)
    x, y = running_sum_task(2, 4, VOCAB, seed=seed)
    return model, TF.cross_entropy(model(x).flatten(0, 1), y.flatten())
