"""normops: fused normalization layers for PyTorch.

Drop-in ``torch.nn`` norms (``normops.nn``), ``torch.nn.functional``-compatible functions
(``normops.functional``) and ``normops.convert(model)`` to swap the norms of an existing model
(torch.nn's, and Hugging Face transformers' RMSNorm family, T5LayerNorm, ConvNextLayerNorm and gated
RMSNorms: ``normops.hf``).
Triton kernels on CUDA, ATen on CPU, a NumPy float64 reference everywhere; see ``normops.backends``.
"""
from . import functional, nn, ops
from .backends import BACKENDS, backend, current_backend, set_backend
from .convert import convert
from .core import batch_invariant, is_batch_invariant, set_batch_invariant
from .inspect import inspect

__version__ = "0.1.0"

__all__ = ["BACKENDS", "backend", "batch_invariant", "convert", "current_backend", "functional", "inspect",
           "is_batch_invariant", "nn", "ops", "set_backend", "set_batch_invariant", "__version__"]
