"""Seeded, deterministic data for the five models: the same seed gives equal tensors.

| function           | model       | what                                                               |
|--------------------|-------------|--------------------------------------------------------------------|
| ``digits``           | ResNet      | scikit-learn's bundled 8x8 digits, split by a seeded permutation   |
| ``sort_task``        | Transformer | random digit sequences and the same digits sorted                  |
| ``running_sum_task`` | LSTM        | random digits; at each step, the running sum of the digits mod 10  |
| ``shapes``           | U-Net       | noisy images of discs and squares, and their per-pixel class masks |
| ``domains``          | CycleGAN    | the same layouts drawn two ways: plain (domain A), bordered (B)    |

Everything random comes from a ``torch.Generator`` seeded with ``seed``; nothing reads or
advances torch's global generator.
"""
import math

import torch

SHAPE_CLASSES = ("background", "disc", "square")


def generator(seed):
    return torch.Generator().manual_seed(seed)


def digits(seed=0, test_fraction=0.2):
    """``(x_train, y_train, x_test, y_test)`` from ``sklearn.datasets.load_digits`` (1797 images):
    x is [N, 1, 8, 8] float32 standardized with the training set's mean and std, y is [N] int64."""
    from sklearn.datasets import load_digits  # scikit-learn: only this dataset needs it

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=generator(seed))
    n_test = round(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    return (x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test]


def sort_task(n, length=10, vocab=10, seed=0):
    """``(x, y)``, both [n, length] int64: x random digits in [0, vocab), y = x sorted."""
    x = torch.randint(0, vocab, (n, length), generator=generator(seed))
    return x, x.sort(dim=1).values


def running_sum_task(n, length=16, vocab=10, seed=0):
    """``(x, y)``, both [n, length] int64: x random digits in [0, vocab), y[t] = (x[0] + ... + x[t])
    mod vocab: a counter with ``vocab`` states, carried over the whole sequence."""
    x = torch.randint(0, vocab, (n, length), generator=generator(seed))
    return x, x.cumsum(dim=1) % vocab


def _layouts(n, size, g, max_shapes):
    """Up to ``max_shapes`` shapes per image: class [n, k] (0 = none), centre y/x [n, k], radius [n, k]."""
    count = torch.randint(1, max_shapes + 1, (n, 1), generator=g)
    cls = torch.randint(1, len(SHAPE_CLASSES), (n, max_shapes), generator=g) * (torch.arange(max_shapes) < count)
    centre = 2 + torch.rand(2, n, max_shapes, generator=g) * (size - 4)
    radius = size * (0.1 + 0.12 * torch.rand(n, max_shapes, generator=g))
    return cls, centre, radius


def _inside(cls, centre, radius, size, shrink=0.0):
    """[n, k, size, size] bool: pixel centres inside each shape (radius reduced by ``shrink``)."""
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    dy = pos.view(1, 1, size, 1) - centre[0][..., None, None]
    dx = pos.view(1, 1, 1, size) - centre[1][..., None, None]
    r = (radius - shrink)[..., None, None]
    disc = dy * dy + dx * dx <= r * r
    square = torch.maximum(dy.abs(), dx.abs()) <= r * (math.sqrt(math.pi) / 2)  # the disc's area
    c = cls[..., None, None]
    return (c == 1) & disc | (c == 2) & square


def shapes(n, size=32, max_shapes=3, noise=0.1, seed=0):
    """``(images, masks)``: images [n, 1, size, size] float32, a random gray background with up to
    ``max_shapes`` discs and squares of random gray levels plus Gaussian noise, so that only the
    geometry tells a disc from a square; masks [n, size, size] int64 with SHAPE_CLASSES indices."""
    g = generator(seed)
    cls, centre, radius = _layouts(n, size, g, max_shapes)
    inside = _inside(cls, centre, radius, size)
    level = 0.5 + 0.5 * torch.rand(n, max_shapes, generator=g)
    background = (0.4 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, 1, size, size)
    mask = torch.zeros(n, size, size, dtype=torch.int64)
    image = background.clone()
    for j in range(max_shapes):
        mask = torch.where(inside[:, j], cls[:, j, None, None], mask)
        image = torch.where(inside[:, j, None], level[:, j, None, None, None], image)
    image = image + noise * torch.randn(image.shape, generator=g)
    return image, mask


# Domain A: shapes filled in orange on dark blue. Domain B: filled in light blue with a dark
# 1-pixel border, on cream. The palettes list the background colour first.
PALETTE_A = ((0.0, 0.0, 0.4), (1.0, 0.5, 0.0))
PALETTE_B = ((1.0, 0.95, 0.8), (0.4, 0.7, 1.0), (0.1, 0.1, 0.1))


def _draw(labels, palette):
    """[n, 1, S, S] palette indices -> [n, 3, S, S] colours in [-1, 1]."""
    colours = torch.tensor(palette, dtype=torch.float32) * 2 - 1  # [k, 3]
    return colours[labels.squeeze(1)].permute(0, 3, 1, 2).contiguous()


def domains(n, size=24, max_shapes=2, seed=0):
    """``(a, b)``, both [n, 3, size, size] in [-1, 1]: the same random layouts of discs and squares
    drawn in domain A's style (``PALETTE_A``: filled) and B's (``PALETTE_B``: filled, bordered).
    CycleGAN trains on unpaired draws (a and b from different seeds); the pairing of a and b from
    one seed measures its translations."""
    g = generator(seed)
    cls, centre, radius = _layouts(n, size, g, max_shapes)
    filled = _inside(cls, centre, radius, size).any(1, keepdim=True)  # [n, 1, S, S]
    # The border of the union: inside it, not inside the union shrunk by one pixel.
    border = filled & ~_inside(cls, centre, radius, size, shrink=1.0).any(1, keepdim=True)
    return _draw(filled.long(), PALETTE_A), _draw(filled.long() + border.long(), PALETTE_B)
