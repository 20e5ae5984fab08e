"""Lesson ``tiled-vae``: a VAE decoder run over a latent in tiles, exactly, with every GroupNorm
normalizing each tile with the statistics of all tiles; against diffusers' own tiled decode.

A VAE decoder's GroupNorms normalize over the whole image, so decoding tiles separately
(diffusers' ``enable_tiling()``: overlapping tiles, each through the whole decoder, blended at the
seams) changes every GroupNorm's statistics, tile by tile: the colors and contrast drift between
tiles and the blend hides the seam only partly. GroupNorm statistics combine exactly (Chan's
formula: ``normops.functional.combine_group_stats``), so a decoder can run on tiles layer by layer
and still compute the whole image's function:

- a 3x3 convolution takes a one-pixel halo from the neighbouring tiles' activations (zeros at the
  image border, the conv's own padding), so each tile's output is the whole conv's;
- a GroupNorm (and the SiLU after it) takes ``group_norm_stats`` of every tile, combines them,
  and applies the result to each tile as the following conv reads it (halo included): the
  normalized activation exists one tile at a time;
- the nearest upsampling and the 1x1 convs run per tile;
- the mid-block's attention (global over all positions) runs on the assembled latent-resolution
  activation, the decoder's smallest (64 channels x latent pixels here): tiling it would need
  attention's own two-pass softmax statistics, another lesson.

The walk keeps, at its peak, a layer's input and output as tiles plus a resnet's residual: it
saves the whole decode's full-size temporaries (the normalized activation, the SiLU's output) and
no more (measured at latent 64x64: 40 MiB, the whole decode 56 MiB), where diffusers' tiling runs
one tile through the whole decoder at a time (2.8 MiB) and gives up exactness. The lesson
measures both errors against the whole decode and each method's peak tensor memory.

The model is a tiny AutoencoderKL at random initialization (nothing downloaded): block_out_channels
(32, 64, 64), 8 groups, a 4x upsampling decoder; quick: latent 16x16 -> image 64x64, else 48x48 ->
192x192; ``python benchmarks/tiled_vae.py --latent 128`` for bigger.
"""
import argparse
import contextlib
import os
import sys

import torch
from torch.nn import functional as F

from .. import functional as nf
from ._common import figure, header, lesson, save

NAME = "tiled-vae"
DESCRIPTION = "a VAE decoded in tiles, each GroupNorm from all tiles' statistics: exact, unlike diffusers' tiling"

CONFIG = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
              up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, latent_channels=4,
              sample_size=32)  # diffusers' tile: 32 image pixels = 8 latent pixels, overlapping by a quarter
LATENT = {True: 16, False: 48}  # latent side, quick or not
TILE = 6  # the exact walk's tile side in latent pixels: uneven on purpose (16 = 6 + 6 + 4)


def tiny_vae(seed=0):
    """The lesson's AutoencoderKL, random init, eval mode; diffusers is imported here, on first use."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise RuntimeError(f"the tiled-vae lesson needs diffusers ({e}): pip install diffusers")
    torch.manual_seed(seed)
    return AutoencoderKL(**CONFIG).eval()


# --- a tensor as a grid of tiles -------------------------------------------------------------------

def split(x, tile):
    """x [N, C, H, W] as a grid (rows of tiles) of at most tile x tile pixels (views)."""
    return [list(row.split(tile, 3)) for row in x.split(tile, 2)]


def assemble(grid):
    return torch.cat([torch.cat(row, 3) for row in grid], 2)


def each(grid, fn, *others):
    return [[fn(*ts) for ts in zip(*rows)] for rows in zip(grid, *others)]


def with_halo(grid, i, j, p):
    """Tile (i, j) with p rows / columns of its neighbours' on each side (corners too), and the
    zero padding (left, right, top, bottom) that the image border still needs."""
    rows = []
    for di in (-1, 0, 1):
        if not 0 <= i + di < len(grid):
            continue
        parts = []
        for dj in (-1, 0, 1):
            if not 0 <= j + dj < len(grid[0]):
                continue
            t = grid[i + di][j + dj]
            t = t[:, :, -p:] if di < 0 else t[:, :, :p] if di > 0 else t
            parts.append(t[..., -p:] if dj < 0 else t[..., :p] if dj > 0 else t)
        rows.append(torch.cat(parts, 3))
    return torch.cat(rows, 2), (p * (j == 0), p * (j == len(grid[0]) - 1), p * (i == 0), p * (i == len(grid) - 1))


def conv(grid, layer, pre=None):
    """A stride-1 zero-padded conv over the grid, exactly: each tile with its halo; ``pre`` (the
    norm and activation before the conv) applied to the haloed tile before the border's zeros."""
    p = layer.padding[0]
    if layer.stride != (1, 1) or layer.padding != (p, p) or layer.kernel_size != (2 * p + 1,) * 2 \
            or layer.padding_mode != "zeros":
        raise ValueError(f"the tiled walk takes stride-1, zero-padded 'same' convs, got {layer}")
    out = []
    for i, row in enumerate(grid):
        out.append([])
        for j in range(len(row)):
            x, border = with_halo(grid, i, j, p) if p else (grid[i][j], None)
            x = pre(x) if pre is not None else x
            out[-1].append(F.conv2d(F.pad(x, border) if p else x, layer.weight, layer.bias))
    return out


def norm_act(grid, norm):
    """GroupNorm + SiLU with the statistics of every tile: a function for ``conv``'s ``pre``."""
    stats = nf.combine_group_stats([nf.group_norm_stats(t, norm.num_groups) for row in grid for t in row])
    return lambda x: nf.group_norm_apply(x, stats, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu")


def resnet(grid, block):
    """diffusers' ResnetBlock2D (no time embedding, no resampling, eval: dropout is identity)."""
    if block.upsample is not None or block.downsample is not None or block.time_emb_proj is not None \
            or not isinstance(block.nonlinearity, torch.nn.SiLU):
        raise ValueError(f"the tiled walk takes the VAE decoder's plain SiLU resnets, got {block}")
    h = conv(grid, block.conv1, norm_act(grid, block.norm1))
    h = conv(h, block.conv2, norm_act(h, block.norm2))
    shortcut = grid if block.conv_shortcut is None else conv(grid, block.conv_shortcut)
    return each(shortcut, lambda a, b: (a + b) / block.output_scale_factor, h)


def upsample(grid, up):
    if up.use_conv_transpose or up.norm is not None or not up.interpolate or not up.use_conv:
        raise ValueError(f"the tiled walk takes nearest-upsampling + conv, got {up}")
    return conv(each(grid, lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")), up.conv)


def whole(grid, module):
    """A global module (attention) on the assembled activation, split back into the same tiles."""
    out = module(assemble(grid))
    heights, widths = [row[0].shape[2] for row in grid], [t.shape[3] for t in grid[0]]
    return [list(row.split(widths, 3)) for row in out.split(heights, 2)]


@torch.no_grad()
def exact_tiled_decode(vae, z, tile=TILE):
    """vae.decode(z) computed on tiles of tile x tile latent pixels, layer by layer."""
    grid = split(z, tile)
    if vae.post_quant_conv is not None:
        grid = conv(grid, vae.post_quant_conv)
    dec = vae.decoder
    if not isinstance(dec.conv_act, torch.nn.SiLU):
        raise ValueError(f"the tiled walk takes a SiLU decoder, got {dec.conv_act}")
    grid = conv(grid, dec.conv_in)
    grid = resnet(grid, dec.mid_block.resnets[0])
    for attn, block in zip(dec.mid_block.attentions, dec.mid_block.resnets[1:]):
        if attn is not None:
            grid = whole(grid, attn)
        grid = resnet(grid, block)
    for up in dec.up_blocks:
        for block in up.resnets:
            grid = resnet(grid, block)
        for u in up.upsamplers or ():
            grid = upsample(grid, u)
    grid = conv(grid, dec.conv_out, norm_act(grid, dec.conv_norm_out))
    return assemble(grid)


@torch.no_grad()
def diffusers_decode(vae, z, tiling):
    """diffusers' own decode, whole or with ``enable_tiling()``."""
    vae.enable_tiling() if tiling else vae.disable_tiling()
    try:
        return vae.decode(z).sample
    finally:
        vae.disable_tiling()


@contextlib.contextmanager
def _quiet_fd2():
    """File descriptor 2 to /dev/null: the profiler's C++ side writes a line there at each start and
    stop ("USDT: ... profiler_start"), past sys.stderr. An exception still reaches the caller."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_bytes(fn):
    """(fn(), the peak of tensor memory allocated during fn above what was allocated before it):
    torch.cuda's peak statistics on CUDA; on the CPU, the profiler's record of every allocation and
    free (profile_memory), summed in time order."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return out, peak


def compare(latent, seed=0, tile=TILE, device="cpu"):
    """Decode one latent [1, 4, latent, latent] three ways; the errors against the whole decode
    and the peaks (bytes). Also the exact walk in float64, whose error is summation order only."""
    vae = tiny_vae(seed).to(device)
    z = torch.randn(1, CONFIG["latent_channels"], latent, latent, generator=torch.Generator().manual_seed(seed + 1))
    z = z.to(device)
    ref, peak_whole = peak_bytes(lambda: diffusers_decode(vae, z, False))
    exact, peak_exact = peak_bytes(lambda: exact_tiled_decode(vae, z, tile))
    seams, peak_tiled = peak_bytes(lambda: diffusers_decode(vae, z, True))
    vae64, z64 = vae.double(), z.double()
    err64 = (exact_tiled_decode(vae64, z64, tile) - diffusers_decode(vae64, z64, False)).abs().max().item()
    return dict(latent=latent, image=ref.shape[-1], tile=tile, diffusers_tile=vae.tile_latent_min_size,
                output_max=ref.abs().max().item(), exact_err=(exact - ref).abs().max().item(),
                diffusers_tiled_err=(seams - ref).abs().max().item(), exact_err_float64=err64,
                peak_whole=peak_whole, peak_exact=peak_exact, peak_diffusers_tiled=peak_tiled), (ref, exact, seams)


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


def report(r):
    print(f"tiny AutoencoderKL (random init), latent {r['latent']}x{r['latent']} -> image {r['image']}x{r['image']}; "
          f"exact walk on {r['tile']}x{r['tile']} latent tiles, diffusers' tiles {r['diffusers_tile']} latent pixels "
          f"overlapping by a quarter, blended")
    print(f"\n{'decode':<34} {'max |err| vs whole':>20} {'peak tensor memory':>20}")
    print(f"{'whole (diffusers)':<34} {'-':>20} {_mib(r['peak_whole']):>20}")
    print(f"{'tiled, GroupNorm over all tiles':<34} {r['exact_err']:>20.2e} {_mib(r['peak_exact']):>20}")
    print(f"{'tiled, diffusers enable_tiling()':<34} {r['diffusers_tiled_err']:>20.2e} "
          f"{_mib(r['peak_diffusers_tiled']):>20}")
    print(f"\n(outputs up to {r['output_max']:.2f}; the exact walk in float64: max |err| {r['exact_err_float64']:.1e}, "
          f"summation order only)")


def plot(out_dir, images):
    ref, exact, seams = (t[0].float().cpu() for t in images)
    fig = figure(figsize=(12, 4))
    axes = fig.subplots(1, 3)
    lo, hi = ref.min(), ref.max()
    axes[0].imshow(((ref - lo) / (hi - lo)).permute(1, 2, 0).numpy())
    axes[0].set_title("whole decode (random-init VAE)")
    floor = 1e-9  # log scale: an exact zero shows as the floor
    for ax, out, title in ((axes[1], exact, "exact tiles: |err|"), (axes[2], seams, "diffusers tiling: |err|")):
        im = ax.imshow(torch.log10((out - ref).abs().amax(0) + floor).numpy(), vmin=-9, vmax=1, cmap="magma")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="log10 max over channels")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    return save(fig, out_dir, NAME)


@lesson
def run(out_dir, *, quick, seed, norm):
    header(f"{NAME}: {DESCRIPTION}")
    print(f"(the exact walk's statistics are normops.functional's group_norm_stats / combine_group_stats / "
          f"group_norm_apply whatever --norm says: torch has no chunk statistics; the whole decode is diffusers' own)")
    results, images = compare(LATENT[quick], seed)
    report(results)
    results["plot"] = plot(out_dir, images)
    return results


def main(argv=None):
    """The comparison at any size (``benchmarks/tiled_vae.py``), without the plot."""
    p = argparse.ArgumentParser(prog="benchmarks/tiled_vae.py", description=__doc__.split("\n")[0])
    p.add_argument("--latent", type=int, default=64, help="latent side in pixels (image: 4x); default 64")
    p.add_argument("--tile", type=int, default=16, help="the exact walk's tile side (latent pixels); default 16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    report(compare(args.latent, args.seed, args.tile)[0])
