"""Row norms: LayerNorm, RMSNorm and residual-add + RMSNorm over the last dim of [tokens, hidden],
the RMSNorm variants of issue #17 beside them, and RMSNorm + float8 quantize (issue #19).

Cases and timing: benchmarks/conftest.py; ops, providers and the bytes model: normops.bench.
"""
OPS = ("layer_norm", "rms_norm", "add_rms_norm")
# Each against its Hugging Face module's formula (normops.bench): Gemma's weight offset, Llama's
# casting, an fp32 residual stream under bf16/fp16 activations, Qwen3-Next's gate after the norm,
# Mamba2's gate before a grouped norm, and vLLM's in-place fused add (forward only, inference).
VARIANT_OPS = ("rms_norm_gemma", "rms_norm_llama", "add_rms_norm_fp32_residual", "gated_rms_norm",
               "gated_rms_norm_grouped", "add_rms_norm_")

# Norm + quantize for an fp8 matrix multiply (inference), per row and per 128 values (issue #19).
QUANT_OPS = ("rms_norm_quant", "rms_norm_quant_g128")
QUANT_SHAPES = [(4096, 4096), (4096, 8192)]

# Transformer activations [tokens, hidden]: 4096 tokens (a few sequences of a batch) at the hidden
# sizes of BERT-large/GPT-2 medium (1024), Llama-2-7B (4096), Llama-2-70B (8192) and beyond to 64K,
# where a row no longer fits one program's registers and the column-looped kernels run.
TRANSFORMER_SHAPES = [(4096, n) for n in (1024, 4096, 8192, 16384, 32768, 65536)]
# Narrow rows (per-head QK-norm, small models): 4096 short reductions, bound by launch and
# per-row overhead rather than bandwidth.
NARROW_SHAPES = [(4096, n) for n in (128, 256, 512)]
# CPU smoke set: one narrow and one wider row, small enough that every case runs in milliseconds.
CPU_SHAPES = [(64, 128), (64, 1024)]

# (ops, shapes, layouts) benchmarked on a GPU, and the smoke set without one. The variants run at
# the transformer widths (the models that carry them; the narrow rows are the plain ops' QK-norm),
# and in the smoke set at the wider row only.
CUDA_SETS = [(OPS, TRANSFORMER_SHAPES + NARROW_SHAPES, ("contiguous",)),
             (VARIANT_OPS, TRANSFORMER_SHAPES, ("contiguous",)), (QUANT_OPS, QUANT_SHAPES, ("contiguous",))]
CPU_SETS = [(OPS, CPU_SHAPES, ("contiguous",)), (VARIANT_OPS, CPU_SHAPES[1:], ("contiguous",)),
            (QUANT_OPS, CPU_SHAPES[1:], ("contiguous",))]


def test_row_norm(case, measure):
    measure(case)
