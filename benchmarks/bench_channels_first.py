"""ConvNeXt's channels-first LayerNorm (normops.functional.layer_norm_channels_first) against the
permute composition ConvNeXt (transformers' ConvNextLayerNorm) and timm's LayerNorm2d run:
``layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)``.

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
CF_OPS = ("layer_norm_channels_first",)

# ConvNeXt-T at 224 px, batch 32: stage 1 (96 channels at 56x56: few channels, many positions) and
# stage 4 (768 channels at 7x7: many channels, 49 positions); ConvNeXt-B's stage 3 (512 at 14x14).
# Both layouts: a channels_last ConvNeXt reads channels contiguously, an NCHW one positions.
CONVNEXT_SHAPES = [(32, 96, 56, 56), (32, 768, 7, 7), (32, 512, 14, 14)]
CPU_SHAPES = [(2, 96, 16, 16)]

CUDA_SETS = [(CF_OPS, CONVNEXT_SHAPES, ("contiguous", "channels_last"))]
CPU_SETS = [(CF_OPS, CPU_SHAPES, ("contiguous", "channels_last"))]


def test_layer_norm_channels_first(case, measure):
    measure(case)
