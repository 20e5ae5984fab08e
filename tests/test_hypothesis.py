"""Property-based parity: hypothesis draws shapes, dtypes, groups and backends; every draw must
obey the tolerance rule of cases.py against torch.nn.functional."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

from cases import DTYPES, F, TF, assert_close_to_reference, make, params  # noqa: E402

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
dims = st.integers(min_value=1, max_value=9)
backends = st.sampled_from(["torch", "numpy"])
dtypes = st.sampled_from(DTYPES)


@SETTINGS
@given(batch=st.lists(st.integers(0, 4), min_size=0, max_size=2), norm=st.lists(dims, min_size=1, max_size=2),
       dtype=dtypes, backend=backends, rms=st.booleans(), affine=st.booleans())
def test_row_norm(batch, norm, dtype, backend, rms, affine):
    x = make(tuple(batch) + tuple(norm), dtype)
    w, b = params(tuple(norm), dtype)
    if not affine:
        w, b = w.detach().fill_(1.0), b.detach().fill_(0.0)  # not learnable: no gradient asked for
    if rms:
        assert_close_to_reference(lambda x, w: F.rms_norm(x, norm, w, 1e-5),
                                  lambda x, w: TF.rms_norm(x, norm, w, 1e-5), [x, w], backend, dtype)
    else:
        assert_close_to_reference(lambda x, w, b: F.layer_norm(x, norm, w, b),
                                  lambda x, w, b: TF.layer_norm(x, norm, w, b), [x, w, b], backend, dtype)


@SETTINGS
@given(n=st.integers(1, 3), groups=st.integers(1, 4), per_group=st.integers(1, 3),
       spatial=st.lists(dims, min_size=0, max_size=3), dtype=dtypes, backend=backends)
def test_group_norm(n, groups, per_group, spatial, dtype, backend):
    c = groups * per_group
    if n * per_group * torch.Size(spatial).numel() == 1:
        return  # one value per group: an error in torch and here, covered in test_errors
    x = make((n, c) + tuple(spatial), dtype)
    w, b = params(c, dtype)
    assert_close_to_reference(lambda x, w, b: F.group_norm(x, groups, w, b),
                              lambda x, w, b: TF.group_norm(x, groups, w, b), [x, w, b], backend, dtype)


@SETTINGS
@given(n=st.integers(1, 4), c=st.integers(1, 5), spatial=st.lists(dims, min_size=0, max_size=3),
       dtype=dtypes, backend=backends, training=st.booleans())
def test_batch_norm(n, c, spatial, dtype, backend, training):
    shape = (n, c) + tuple(spatial)
    if training and n * torch.Size(spatial).numel() == 1:
        return  # one value per channel: an error, covered in test_errors
    x = make(shape, dtype)
    w, b = params(c, dtype)
    rm = make(c, dtype, offset=1.0, requires_grad=False)
    rv = make(c, dtype, offset=2.0, scale=0.5, requires_grad=False).abs()
    assert_close_to_reference(lambda x, rm, rv, w, b: F.batch_norm(x, rm, rv, w, b, training),
                              lambda x, rm, rv, w, b: TF.batch_norm(x, rm, rv, w, b, training),
                              [x, rm, rv, w, b], backend, dtype)
