import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    """Each test starts from the same seed, the device-default backend and the batch-invariant mode off."""
    import normops

    torch.manual_seed(0)
    normops.set_backend(None)
    normops.set_batch_invariant(False)
    yield
    normops.set_backend(None)
    normops.set_batch_invariant(False)
