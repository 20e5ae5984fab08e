"""GroupNorm, GroupNorm + SiLU and InstanceNorm over (N, C, *spatial) inputs, 32 groups (C divisible by 32).

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
GROUP_OPS = ("group_norm", "group_norm+silu")

# Stable Diffusion 1.x/2.x U-Net at 512x512 (64x64 latents), batch 2 (classifier-free guidance):
# the outer blocks' 320 channels at 64x64 and the innermost 1280 channels at 16x16 (40 channels
# of 256 pixels per group). Both layouts: diffusers' speed-up guide moves the U-Net to channels_last.
UNET_SHAPES = [(2, 320, 64, 64), (2, 1280, 16, 16)]
# Stable Diffusion VAE decoder at 512x512: 512 channels at 128x128, batch 1. (The encoder's
# 1x128x256x256 has the same 32 groups of 262,144 elements, each one contiguous block in NCHW,
# so it would measure the same thing again.)
VAE_SHAPES = [(1, 512, 128, 128)]
# The whole SD VAE decoder's GroupNorm(+SiLU) shapes, 32 groups, bf16, batch 1: at 512x512 output
# 512 ch at 64x64 (mid block) and 128x128, 256 at 256x256, 128 at 512x512; at 1024x1024 output each
# of those at twice the side (the largest, 128 x 1024 x 1024, is 2**27 elements a sample). The
# 512x512 decoder's (1, 512, 128, 128) is VAE_SHAPES'.
VAE_DECODER_SHAPES = [(1, 512, 64, 64), (1, 256, 256, 256), (1, 128, 512, 512),
                      (1, 512, 256, 256), (1, 256, 512, 512), (1, 128, 1024, 1024)]
# Small-batch video, (N, C, D, H, W): 8 frames of 256x256 at 128 channels. Only N x 32 = 32
# groups of 2M elements each: too few for one program per group to fill a GPU.
VIDEO_SHAPES = [(1, 128, 8, 256, 256)]
# Instance norm in image-to-image generators (fast style transfer, CycleGAN-style ResNet
# generators): 64 channels at 256x256 (inference, batch 1), training batches of 4 at 128 channels
# x 128x128 and 256 channels x 64x64; planes of 65,536, 16,384 and 4,096 elements.
STYLE_SHAPES = [(1, 64, 256, 256), (4, 128, 128, 128), (4, 256, 64, 64)]
# CPU smoke set: a 4-D input (both layouts) for every op, a 5-D one for GroupNorm.
CPU_SHAPES = [(2, 64, 8, 8)]
CPU_SHAPES_5D = [(1, 32, 2, 8, 8)]

# (ops, shapes, layouts) benchmarked on a GPU, and the smoke set without one.
CUDA_SETS = [(GROUP_OPS, UNET_SHAPES, ("contiguous", "channels_last")),
             (GROUP_OPS, VAE_SHAPES + VIDEO_SHAPES, ("contiguous",)),
             (("instance_norm",), STYLE_SHAPES, ("contiguous",)),
             (GROUP_OPS, VAE_DECODER_SHAPES, ("contiguous",))]
CPU_SETS = [(GROUP_OPS + ("instance_norm",), CPU_SHAPES, ("contiguous", "channels_last")),
            (GROUP_OPS, CPU_SHAPES_5D, ("contiguous",))]


def test_group_norm(case, measure):
    measure(case)
