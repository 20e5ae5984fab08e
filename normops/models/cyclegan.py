"""CycleGAN with InstanceNorm: a ResNet generator and a PatchGAN discriminator per direction,
translating between two generated image domains without paired examples.

Generator (Zhu et al. 2017, scaled down): 7x7 conv, a stride-2 conv, residual blocks, nearest
upsampling + 3x3 conv (no transposed conv: no checkerboard), 7x7 conv and tanh; every conv but
the last is followed by InstanceNorm2d -> ReLU, the ReLU fused with ``norm="normops"``
(``normops.nn.InstanceNorm2d(c, activation="relu")``). Discriminator: 4x4 convs with
InstanceNorm2d -> LeakyReLU(0.2) (LeakyReLU is not fused, so it follows the norm in both
variants), one real/fake score per patch. Losses: least-squares GAN, cycle consistency (weight
10) and a small identity term (0.5: the domains differ in colour, so identity is no goal).

Domains (``data.domains``): A, discs and squares in orange on dark blue; B, the same kind of
layouts in light blue with a dark border, on cream. Training draws A and B from different seeds
(unpaired). The metric translates 256 held-out *paired* layouts both ways, labels every pixel
with the nearest colour of the target domain's palette, and averages the per-colour IoU with the
true layout over colours and directions. Target: 0.6 (an unpaired translation is free to draw a
shape a pixel smaller; the border class, one pixel wide, is hit hardest by that).
"""
import itertools

import torch
from torch import nn
from torch.nn import functional as TF

from .data import PALETTE_A, PALETTE_B, domains
from .norms import norm_act, seeded
from .train import Trained, batch_indices, loop
from .unet import mean_iou

NAME = "cyclegan"
TASK = "plain <-> bordered shapes"
METRIC = "colour mean IoU"
TARGET = 0.6
HIGHER_IS_BETTER = True
STEPS = 900
QUICK_STEPS = 2
BATCH = 4
LR = 5e-4
SIZE = 24
CYCLE, IDENTITY = 10.0, 0.5


class ConvIN(nn.Sequential):
    """conv -> InstanceNorm2d -> ReLU (fused with normops). The convs before an InstanceNorm have
    no bias: the norm subtracts each channel's mean, a per-channel constant with it."""

    def __init__(self, norm, conv):
        n, act = norm_act(norm, "InstanceNorm2d", conv.out_channels, activation="relu")
        super().__init__(conv, n, act)


class ResBlock(nn.Module):
    def __init__(self, norm, c):
        super().__init__()
        self.a = ConvIN(norm, nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False))
        self.conv = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect", bias=False)
        self.norm = norm_act(norm, "InstanceNorm2d", c)[0]

    def forward(self, x):
        return x + self.norm(self.conv(self.a(x)))


class Generator(nn.Sequential):
    def __init__(self, norm="normops", channels=3, ngf=16, blocks=3):
        super().__init__(
            ConvIN(norm, nn.Conv2d(channels, ngf, 7, padding=3, padding_mode="reflect", bias=False)),
            ConvIN(norm, nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1, bias=False)),
            *[ResBlock(norm, 2 * ngf) for _ in range(blocks)],
            nn.Upsample(scale_factor=2),
            ConvIN(norm, nn.Conv2d(2 * ngf, ngf, 3, padding=1, padding_mode="reflect", bias=False)),
            nn.Conv2d(ngf, channels, 7, padding=3, padding_mode="reflect"),
            nn.Tanh())


class Discriminator(nn.Sequential):
    """PatchGAN: one score per overlapping patch."""

    def __init__(self, norm="normops", channels=3, ndf=16):
        def block(cin, cout, stride):
            n, _ = norm_act(norm, "InstanceNorm2d", cout)
            return [nn.Conv2d(cin, cout, 4, stride, 1, bias=False), n, nn.LeakyReLU(0.2)]

        super().__init__(nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2),
                         *block(ndf, 2 * ndf, 2), *block(2 * ndf, 4 * ndf, 1), nn.Conv2d(4 * ndf, 1, 4, 1, 1))


class CycleGAN(nn.Module):
    """The two generators (A -> B, B -> A) and the two discriminators (of A, of B)."""

    def __init__(self, norm="normops", ngf=16, blocks=3, ndf=16):
        super().__init__()
        self.g_ab, self.g_ba = Generator(norm, ngf=ngf, blocks=blocks), Generator(norm, ngf=ngf, blocks=blocks)
        self.d_a, self.d_b = Discriminator(norm, ndf=ndf), Discriminator(norm, ndf=ndf)

    def forward(self, a):
        """A -> B, the translation the model is trained for."""
        return self.g_ab(a)

    def generator_loss(self, a, b):
        """The generators' objective on a batch of a and b: (total, (fake a, fake b), {part: value})."""
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        adv = sum(TF.mse_loss(s, torch.ones_like(s)) for s in (self.d_b(fake_b), self.d_a(fake_a)))
        cycle = TF.l1_loss(self.g_ba(fake_b), a) + TF.l1_loss(self.g_ab(fake_a), b)
        identity = TF.l1_loss(self.g_ab(b), b) + TF.l1_loss(self.g_ba(a), a)
        return adv + CYCLE * cycle + IDENTITY * identity, (fake_a, fake_b), {"G adversarial": adv, "cycle": cycle}

    def discriminator_loss(self, a, b, fake_a, fake_b):
        loss = 0
        for d, real, fake in ((self.d_a, a, fake_a), (self.d_b, b, fake_b)):
            s_real, s_fake = d(real), d(fake.detach())
            loss = loss + 0.5 * (TF.mse_loss(s_real, torch.ones_like(s_real))
                                 + TF.mse_loss(s_fake, torch.zeros_like(s_fake)))
        return loss


def nearest_colour(x, palette):
    """[n, S, S] int64: the index of the palette colour nearest to each pixel of x [n, 3, S, S]."""
    colours = torch.tensor(palette, dtype=x.dtype).view(len(palette), 1, 3, 1, 1) * 2 - 1
    return ((x.unsqueeze(0) - colours) ** 2).sum(2).argmin(0)


def translation_iou(model, a, b):
    """Both translations of paired held-out layouts, each pixel labelled with its nearest colour of
    the target domain's palette: the mean over the two directions of the mean IoU over the colours."""
    with torch.no_grad():
        pairs = [(model.g_ab(a), b, PALETTE_B), (model.g_ba(b), a, PALETTE_A)]
    return sum(mean_iou(nearest_colour(out, p), nearest_colour(t, p), len(p)) for out, t, p in pairs) / 2


MODEL = CycleGAN  # built at its training size by normops.models.build
INPUT_SHAPE = (3, SIZE, SIZE)  # one example of the task's inputs (images of domain A), for normops.models.example_input


def train(norm="normops", steps=STEPS, seed=0, progress=False):
    a, _ = domains(2000, SIZE, seed=seed)
    _, b = domains(2000, SIZE, seed=seed + 1)  # other layouts: A and B are unpaired
    a_test, b_test = domains(256, SIZE, seed=seed + 2)
    g = seeded(seed)
    model = CycleGAN(norm)
    generators = itertools.chain(model.g_ab.parameters(), model.g_ba.parameters())
    discriminators = itertools.chain(model.d_a.parameters(), model.d_b.parameters())
    opt_g, opt_d = (torch.optim.Adam(p, LR, betas=(0.5, 0.999)) for p in (generators, discriminators))

    def decay(i):  # CycleGAN's schedule: the learning rate constant for half the steps, then linearly to 0
        return min(1.0, 2.0 * (1 - i / max(steps, 1)))

    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt_g, opt_d)]

    def step(i):
        ab, bb = a[batch_indices(len(a), BATCH, g)], b[batch_indices(len(b), BATCH, g)]
        loss_g, (fake_a, fake_b), parts = model.generator_loss(ab, bb)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        loss_d = model.discriminator_loss(ab, bb, fake_a, fake_b)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        for s in scheds:
            s.step()
        return {k: v.item() for k, v in parts.items()} | {"D": loss_d.item()}

    losses, seconds = loop(step, steps, f"{NAME} ({norm})", progress)
    iou = translation_iou(model, a_test, b_test)

    def draw(fig):
        with torch.no_grad():
            rows = [a_test[:6], model.g_ab(a_test[:6]), b_test[:6], model.g_ba(b_test[:6])]
        titles = ["domain A (real)", "A -> B (generated)", "domain B (real)", "B -> A (generated)"]
        axes = fig.subplots(4, 6)
        for r, (imgs, title) in enumerate(zip(rows, titles)):
            for k in range(6):
                axes[r, k].imshow(((imgs[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1), interpolation="nearest")
                axes[r, k].set_title(title, fontsize=7)
                axes[r, k].axis("off")

    return Trained(NAME, norm, steps, seconds, losses, iou, model, draw)


def tiny_loss(norm="normops", seed=0):
    """A 4-wide CycleGAN and its generator + discriminator loss on two 12x12 images of each domain:
    for the Triton-interpreter test."""
    seeded(seed)
    model = CycleGAN(norm, ngf=4, blocks=1, ndf=4)
    a, b = domains(2, 12, max_shapes=1, seed=seed)
    loss_g, (fake_a, fake_b), _ = model.generator_loss(a, b)
    return model, loss_g + model.discriminator_loss(a, b, fake_a, fake_b)
