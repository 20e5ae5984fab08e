"""U-Net with GroupNorm + SiLU, segmenting generated images of discs and squares.

Every convolution is Conv -> GroupNorm -> SiLU: with ``norm="normops"`` the SiLU is fused
(``normops.nn.GroupNorm(g, c, activation="silu")``); with ``norm="torch"`` it is
``torch.nn.GroupNorm(g, c)`` then ``nn.SiLU()``. Two downsampling levels (max-pool), a bottleneck,
two upsampling levels (transposed conv) with skip connections, and a 1x1 head over three
classes: background, disc, square. The shapes have random gray levels on a random background with
noise, so only their geometry tells them apart.

Target: a mean intersection-over-union of 0.9 over the three classes on 256 held-out images.
"""
import torch
from torch import nn
from torch.nn import functional as TF

from .data import SHAPE_CLASSES, shapes
from .norms import norm_act, seeded
from .train import Trained, batch_indices, loop, optimizer_step

NAME = "unet"
TASK = "segment discs/squares"
METRIC = "mean IoU"
TARGET = 0.9
HIGHER_IS_BETTER = True
STEPS = 800
QUICK_STEPS = 3
BATCH = 16
LR = 3e-3
SIZE = 32


class ConvGN(nn.Module):
    """3x3 conv -> GroupNorm(groups, cout) -> SiLU (fused with normops)."""

    def __init__(self, norm, cin, cout, groups):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm, self.act = norm_act(norm, "GroupNorm", groups, cout, activation="silu")

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class DoubleConv(nn.Sequential):
    def __init__(self, norm, cin, cout, groups):
        super().__init__(ConvGN(norm, cin, cout, groups), ConvGN(norm, cout, cout, groups))


class UNet(nn.Module):
    def __init__(self, norm="normops", in_channels=1, classes=len(SHAPE_CLASSES), widths=(16, 32, 64), groups=8):
        super().__init__()
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(DoubleConv(norm, c, w, groups))
            c = w
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(DoubleConv(norm, 2 * w, w, groups))
            c = w
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else TF.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def mean_iou(pred, target, classes=len(SHAPE_CLASSES)):
    """Intersection over union per class over all pixels, averaged over the classes."""
    ious = []
    for k in range(classes):
        p, t = pred == k, target == k
        union = (p | t).sum()
        if union > 0:
            ious.append(((p & t).sum() / union).item())
    return sum(ious) / len(ious)


def predict(model, x, batch=64):
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    model.train()
    return out


MODEL = UNet  # built at its training size by normops.models.build
INPUT_SHAPE = (1, SIZE, SIZE)  # one example of the task's inputs (images), for normops.models.example_input


def train(norm="normops", steps=STEPS, seed=0, progress=False):
    x, m = shapes(4000, SIZE, seed=seed)
    x_test, m_test = shapes(256, SIZE, seed=seed + 1)
    g = seeded(seed)
    model = UNet(norm)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=max(steps, 1), pct_start=0.1)

    def step(i):
        idx = batch_indices(len(x), BATCH, g)
        loss = TF.cross_entropy(model(x[idx]), m[idx])
        return optimizer_step(loss, opt, sched)

    losses, seconds = loop(step, steps, f"{NAME} ({norm})", progress)
    iou = mean_iou(predict(model, x_test), m_test)

    def draw(fig):
        from matplotlib import colormaps
        from matplotlib.patches import Patch

        pred = predict(model, x_test[:6])
        axes = fig.subplots(3, 6)
        cmap = colormaps["viridis"].resampled(len(SHAPE_CLASSES))
        for k in range(6):
            for row, (img, title) in enumerate([(x_test[k, 0], "input image"), (m_test[k], "true mask"),
                                                (pred[k], "predicted mask")]):
                ax = axes[row, k]
                ax.imshow(img, cmap="gray" if row == 0 else cmap, vmin=None if row == 0 else 0,
                          vmax=None if row == 0 else len(SHAPE_CLASSES) - 1, interpolation="nearest")
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        fig.legend([Patch(color=cmap(c)) for c in range(len(SHAPE_CLASSES))], SHAPE_CLASSES, loc="outside lower center",
                   ncol=len(SHAPE_CLASSES), fontsize=8, title="mask classes", title_fontsize=8)

    return Trained(NAME, norm, steps, seconds, losses, iou, model, draw)


def tiny_loss(norm="normops", seed=0):
    """A U-Net of widths 4 and 8 and its loss on two 8x8 images: for the Triton-interpreter test."""
    seeded(seed)
    model = UNet(norm, widths=(4, 8), groups=2)
    x, m = shapes(2, 8, max_shapes=1, seed=seed)
    return model, TF.cross_entropy(model(x), m)
