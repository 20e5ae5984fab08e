"""adaLN modulation (issue #18): normops.functional.ada_layer_norm, alone and with the gated
residual add (DiT's adaLN-Zero step), against diffusers' unfused torch composition
``h = gate[:, None] * x + r; F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]``.
The target: >= 2x the composition, fwd+bwd, at DiT-XL sizes in bf16.

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
OPS = ("ada_layer_norm", "ada_layer_norm_gate_residual")
# DiT-XL/2: batch 8, 1024 tokens (256px latents: 32x32 patches) and 4096 (512px), hidden 1152.
DIT_SHAPES = [(8, 1024, 1152), (8, 4096, 1152)]
CPU_SHAPES = [(2, 16, 64)]

CUDA_SETS = [(OPS, DIT_SHAPES, ("contiguous",))]
CPU_SETS = [(OPS, CPU_SHAPES, ("contiguous",))]


def test_ada_norm(case, measure):
    measure(case)
