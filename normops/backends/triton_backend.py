"""The "triton" backend: normops' Triton kernels (``normops.kernels``), the CUDA default.

Each function of the backend contract (see ``normops/backends/__init__.py``) that has a Triton
kernel is defined here and launches it; every other function is the torch backend's, so the
backend is complete while the kernels land one family at a time. On CPU tensors it runs only
under ``TRITON_INTERPRET=1``, Triton's interpreter, which is how the kernels are tested without
a GPU.
"""
from .torch_backend import (  # noqa: F401  (no Triton kernel yet: ATen's)
    batch_norm_bwd,
    batch_norm_fwd,
    group_norm_bwd,
    group_norm_fwd,
    row_norm_bwd,
    row_norm_fwd,
)
