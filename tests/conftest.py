import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_default_backend():
    """Each test starts from the same seed and the device-default backend."""
    import normops

    torch.manual_seed(0)
    normops.set_backend(None)
    yield
    normops.set_backend(None)
