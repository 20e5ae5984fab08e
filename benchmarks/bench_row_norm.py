"""Row norms: LayerNorm, RMSNorm and residual-add + RMSNorm over the last dim of [tokens, hidden].

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
OPS = ("layer_norm", "rms_norm", "add_rms_norm")

# Transformer activations [tokens, hidden]: 4096 tokens (a few sequences of a batch) at the hidden
# sizes of BERT-large/GPT-2 medium (1024), Llama-2-7B (4096), Llama-2-70B (8192) and beyond to 64K,
# where a row no longer fits one program's registers and the column-looped kernels run.
TRANSFORMER_SHAPES = [(4096, n) for n in (1024, 4096, 8192, 16384, 32768, 65536)]
# Narrow rows (per-head QK-norm, small models): 4096 short reductions, bound by launch and
# per-row overhead rather than bandwidth.
NARROW_SHAPES = [(4096, n) for n in (128, 256, 512)]
# CPU smoke set: one narrow and one wider row, small enough that every case runs in milliseconds.
CPU_SHAPES = [(64, 128), (64, 1024)]

# (ops, shapes, layouts) benchmarked on a GPU, and the smoke set without one.
CUDA_SETS = [(OPS, TRANSFORMER_SHAPES + NARROW_SHAPES, ("contiguous",))]
CPU_SETS = [(OPS, CPU_SHAPES, ("contiguous",))]


def test_row_norm(case, measure):
    measure(case)
