"""The "triton" backend: normops' Triton kernels (``normops.kernels``), the CUDA default.

Each function of the backend contract (see ``normops/backends/__init__.py``) that has a Triton
kernel is defined here and launches it; every other function is the torch backend's, so the
backend is complete while the kernels land one family at a time. On CPU tensors it runs only
under ``TRITON_INTERPRET=1``, Triton's interpreter, which is how the kernels are tested without
a GPU.
"""
# Families without a Triton kernel yet: their plain calls go straight to ATen's norm, as on the torch
# backend (see normops.library.aten_direct); remove a family here when its kernel lands.
NATIVE = frozenset({"row_norm", "group_norm", "batch_norm"})

from .torch_backend import (  # noqa: F401,E402  (no Triton kernel yet: ATen's)
    batch_norm_bwd,
    batch_norm_fwd,
    group_norm_bwd,
    group_norm_fwd,
    row_norm_bwd,
    row_norm_fwd,
)
