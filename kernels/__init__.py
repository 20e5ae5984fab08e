"""normops.kernels: the Triton kernels (the only code that imports triton). Nothing runs at import."""
