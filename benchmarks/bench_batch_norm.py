"""BatchNorm and BatchNorm + ReLU in training mode (batch statistics, running statistics updated),
and BatchNorm in inference (running statistics).

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
OPS = ("batch_norm", "batch_norm+relu", "batch_norm_eval")

# ResNet-50 training at batch 256 (224x224 ImageNet): the stem's 64 channels at 112x112, the
# first stage's 256 channels at 56x56, and the last stage's 2048 channels at 7x7 (few elements per
# channel: 12,544). Both layouts: NHWC (channels_last) is how ResNets are trained on tensor cores.
RESNET50_SHAPES = [(256, 64, 112, 112), (256, 256, 56, 56), (256, 2048, 7, 7)]
# CPU smoke set: one small 4-D input, in both layouts.
CPU_SHAPES = [(8, 16, 8, 8)]

# (ops, shapes, layouts) benchmarked on a GPU, and the smoke set without one.
CUDA_SETS = [(OPS, RESNET50_SHAPES, ("contiguous", "channels_last"))]
CPU_SETS = [(OPS, CPU_SHAPES, ("contiguous", "channels_last"))]


def test_batch_norm(case, measure):
    measure(case)
