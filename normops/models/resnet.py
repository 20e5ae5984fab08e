"""ResNet with BatchNorm2d, classifying scikit-learn's 8x8 handwritten digits.

Conv -> BatchNorm2d -> ReLU blocks: with ``norm="normops"`` the ReLU is fused into the norm
(``normops.nn.BatchNorm2d(c, activation="relu")``); with ``norm="torch"`` it is
``torch.nn.BatchNorm2d(c)`` then ``nn.ReLU()``. A stem, two stages of basic residual blocks (the
second halves 8x8 to 4x4), global average pooling and a linear classifier. Evaluated in eval mode
(BatchNorm's running statistics) on a held-out fifth of the 1797 images.
"""
import torch
from torch import nn
from torch.nn import functional as TF

from .data import digits
from .norms import norm_act, seeded
from .train import Trained, batch_indices, loop, optimizer_step

NAME = "resnet"
TASK = "digits 8x8 (sklearn)"
METRIC = "test accuracy"
TARGET = 0.95
HIGHER_IS_BETTER = True
STEPS = 800
QUICK_STEPS = 3
BATCH = 64
LR = 3e-3


class ConvNorm(nn.Module):
    """3x3 conv (no bias: the norm has one) -> BatchNorm2d -> ReLU (fused with normops) or none."""

    def __init__(self, norm, cin, cout, stride=1, relu=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm, self.act = norm_act(norm, "BatchNorm2d", cout, activation="relu" if relu else None)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class Block(nn.Module):
    """Basic residual block: relu(ConvNorm(ConvNorm(x), no relu) + skip(x)), skip a 1x1 conv + BN
    when the shape changes."""

    def __init__(self, norm, cin, cout, stride=1):
        super().__init__()
        self.a = ConvNorm(norm, cin, cout, stride)
        self.b = ConvNorm(norm, cout, cout, relu=False)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      norm_act(norm, "BatchNorm2d", cout)[0])

    def forward(self, x):
        return TF.relu(self.b(self.a(x)) + (x if self.skip is None else self.skip(x)))


class ResNet(nn.Module):
    def __init__(self, norm="normops", widths=(32, 64), blocks=2, in_channels=1, classes=10):
        super().__init__()
        self.stem = ConvNorm(norm, in_channels, widths[0])
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(Block(norm, c, w, stride=2 if i > 0 and j == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def accuracy(model, x, y, batch=512):
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train()
    return (pred == y).float().mean().item()


MODEL = ResNet  # built at its training size by normops.models.build
INPUT_SHAPE = (1, 8, 8)  # one example of the task's inputs (the digits' shape), for normops.models.example_input


def train(norm="normops", steps=STEPS, seed=0, progress=False):
    x, y, x_test, y_test = digits(seed)
    g = seeded(seed)
    model = ResNet(norm)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=max(steps, 1), pct_start=0.2)

    def step(i):
        idx = batch_indices(len(x), BATCH, g)
        # Augmentation: the batch shifted by up to a pixel each way (padded with the blank value).
        xb = TF.pad(x[idx], (1, 1, 1, 1), value=float(x.min()))
        dy, dx = torch.randint(0, 3, (2,), generator=g).tolist()
        loss = TF.cross_entropy(model(xb[:, :, dy:dy + 8, dx:dx + 8]), y[idx])
        return optimizer_step(loss, opt, sched)

    losses, seconds = loop(step, steps, f"{NAME} ({norm})", progress)
    acc = accuracy(model, x_test, y_test)

    def draw(fig):
        model.eval()
        with torch.no_grad():
            pred = model(x_test[:24]).argmax(1)
        model.train()
        fig.set_size_inches(9, 4.8)
        for k, ax in enumerate(fig.subplots(3, 8).flat):
            ax.imshow(x_test[k, 0], cmap="gray_r")
            ok = pred[k] == y_test[k]
            ax.set_title(f"pred {pred[k].item()} / label {y_test[k].item()}", fontsize=8,
                         color="black" if ok else "red", fontweight="normal" if ok else "bold")
            ax.axis("off")
        fig.supxlabel("held-out digits: the model's prediction / the true label; wrong predictions in red",
                      fontsize=8)

    return Trained(NAME, norm, steps, seconds, losses, acc, model, draw)


def tiny_loss(norm="normops", seed=0):
    """A tiny ResNet and its loss on a batch of two 8x8 images: for the Triton-interpreter test."""
    g = seeded(seed)
    model = ResNet(norm, widths=(4, 8), blocks=1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    return model, TF.cross_entropy(model(x), torch.tensor([3, 7]))
