"""Shared test cases: shapes, dtypes, tolerances, and the reference each op is compared with.

Tolerance rule (from flash-attention's tests): in a low-precision dtype, our error against a
float64 reference may be at most twice the error of torch's own same-dtype result, plus a small
atol. Torch's error is the honest yardstick: the inputs and outputs are rounded to the dtype, so
no implementation can do much better, and one that does much worse has a real bug. The atol is
``normops.check.TOLERANCE[dtype].beyond_torch``: one table, with its reasons, for the tests and
``normops check``.
"""
import contextlib
import importlib.util
import pathlib

import torch
from torch.nn import functional as TF

import normops
from normops import functional as F  # noqa: F401  (the tests take F and TF from here)
from normops.check import TOLERANCE

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "numpy"]

# (input shape, normalized_shape): odd widths exercise masks, 1-element rows, empty batches,
# a 4097-wide row (just past a power of two) and a multi-dim normalized_shape.
ROW_SHAPES = [((3, 7), (7,)), ((2, 3, 781), (781,)), ((5, 1), (1,)), ((1, 1), (1,)), ((0, 5), (5,)),
              ((4, 3, 5), (3, 5)), ((2, 4097), (4097,)), ((6,), (6,))]
# (input shape, num_groups): G=1, G=C, odd C/G, 1x1 spatial, 1-D/2-D/3-D spatial, no spatial, empty.
GROUP_SHAPES = [((2, 6, 5, 3), 3), ((1, 4, 7), 1), ((3, 6), 6), ((2, 4, 1, 1), 2), ((2, 6, 2, 3, 3), 2),
                ((2, 9, 5), 3), ((0, 6, 4), 3)]
# (N, C, *spatial) for batch and instance norm; instance norm needs more than one spatial element.
BATCH_SHAPES = [(4, 3), (2, 5, 7), (3, 4, 5, 6), (2, 3, 2, 3, 4), (2, 1, 1, 1), (0, 3, 4)]
# (torch itself fails on an empty instance_norm; test_empty_outputs covers ours)
INSTANCE_SHAPES = [(2, 3, 5), (3, 4, 5, 6), (1, 2, 3, 2, 4), (2, 5, 2)]


# The Triton tests run on CUDA where there is one, else in Triton's interpreter on CPU tensors.
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LOW = [torch.float16, torch.bfloat16]
ACTIVATIONS = {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by input dim


def on_device(t, fmt=None):
    """A leaf copy of t on DEVICE (in memory format `fmt` when given) that requires grad."""
    t = t.detach().to(DEVICE)
    if fmt is not None:
        t = t.contiguous(memory_format=fmt)
    return t.requires_grad_()


def make(shape, dtype, offset=3.0, scale=2.0, requires_grad=True, seed=0, device="cpu"):
    """Shifted data (mean far from 0), so a variance computed as E[x^2] - E[x]^2 would show.
    Drawn on `device` (a CUDA generator there: real-size tensors are not drawn on the host)."""
    g = torch.Generator(device).manual_seed(seed)
    t = (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64, device=device)).to(dtype)
    return t.requires_grad_(requires_grad)


def params(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    return w, b


@contextlib.contextmanager
def layout_copies():
    """The shapes of the tensors that ``Tensor.contiguous`` really copied inside the block (a call
    on a tensor already in the asked layout is a no-op and is not counted)."""
    copies = []
    real = torch.Tensor.contiguous

    def counting(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        if out.data_ptr() != t.data_ptr():
            copies.append(tuple(t.shape))
        return out

    torch.Tensor.contiguous = counting
    try:
        yield copies
    finally:
        torch.Tensor.contiguous = real


def argparse_rejects(main, argv):
    """main(argv) stops in argument parsing with argparse's usage-error exit status, 2."""
    try:
        main(argv)
    except SystemExit as e:
        return e.code == 2
    return False


def err(a, ref):
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref.double()).abs().max().item()


def forward_backward(fn, inputs, seed=2):
    """Outputs of fn(*inputs) and the gradients of every input that requires grad, for a fixed
    random cotangent. Returns a flat list of tensors."""
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = fn(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    # drawn where the outputs are (the host would take a minute over the real-size CUDA cases), with
    # the same seed for every call, so that ours, torch's and the fp64 reference share one cotangent
    cots = [torch.randn(o.shape, generator=torch.Generator(o.device).manual_seed(seed + i), dtype=torch.float64,
                        device=o.device).to(o.dtype) for i, o in enumerate(outs)]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, cots, allow_unused=True) if leaves else []
    return [o.detach() for o in outs] + [gr if gr is not None else torch.zeros(()) for gr in grads]


def to64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in inputs]


def assert_close_to_reference(ours_fn, torch_fn, inputs, backend, dtype):
    """Outputs and gradients of ours_fn on `backend` in `dtype` obey the tolerance rule against
    torch_fn in float64; torch_fn in `dtype` is the yardstick."""
    with normops.backend(backend):
        ours = forward_backward(ours_fn, inputs)
    same = forward_backward(torch_fn, inputs)
    ref = forward_backward(torch_fn, to64(inputs))
    assert len(ours) == len(ref)
    for i, (o, s, r) in enumerate(zip(ours, same, ref)):
        assert o.shape == r.shape, f"result {i}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert o.dtype == s.dtype, f"result {i}: dtype {o.dtype} != torch's {s.dtype}"
        bound = tolerance(s, r, dtype)
        assert err(o, r) <= bound, f"result {i}: error {err(o, r):.3g} > {bound:.3g} (torch's own: {err(s, r):.3g})"


def tolerance(same, ref, dtype):
    """The rule: the error against the fp64 result `ref` that a result may have, given torch's own
    `dtype` result `same`: twice torch's error, plus ``TOLERANCE[dtype].beyond_torch`` relative to
    the result's magnitude."""
    atol = TOLERANCE[dtype].beyond_torch
    return 2 * err(same, ref) + atol * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)


# The ops side by side: name -> (normops function, torch reference), both taking (x, w, b).
def _act(activation):
    return {"relu": TF.relu, "silu": TF.silu, "gelu": TF.gelu, None: lambda t: t}[activation]


def torch_layer_norm(x, shape, w, b, eps=1e-5, activation=None):
    return _act(activation)(TF.layer_norm(x, shape, w, b, eps))


def torch_rms_norm(x, shape, w, eps=None, activation=None):
    return _act(activation)(TF.rms_norm(x, shape, w, eps))


def torch_group_norm(x, g, w, b, eps=1e-5, activation=None):
    return _act(activation)(TF.group_norm(x, g, w, b, eps))


def torch_instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5, activation=None):
    return _act(activation)(TF.instance_norm(x, rm, rv, w, b, use_input_stats, momentum, eps))


def torch_batch_norm(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5, activation=None):
    return _act(activation)(TF.batch_norm(x, rm, rv, w, b, training, momentum, eps))


def torch_add_layer_norm(x, r, shape, w, b, eps=1e-5):
    h = x + r
    return TF.layer_norm(h, shape, w, b, eps), h


def torch_add_rms_norm(x, r, shape, w, eps=None):
    h = x + r
    return TF.rms_norm(h, shape, w, eps), h


def torch_gated_rms_norm(x, gate, shape, w, eps=None, *, norm_before_gate=True, group_size=None, offset=0.0):
    """normops.functional.gated_rms_norm's formula composed with torch's rms_norm; the result in x's
    dtype, as torch's rms_norm keeps it whatever the weight's."""
    u = x * TF.silu(gate) if gate is not None and not norm_before_gate else x
    g = group_size or shape[-1]
    y = TF.rms_norm(u.unflatten(-1, (-1, g)), [g], None, eps).flatten(-2)
    if w is not None:
        y = y * (w + offset if offset else w)
    return (y * TF.silu(gate) if gate is not None and norm_before_gate else y).to(x.dtype)


def benchmark_script(name):
    """benchmarks/<name>.py (a script, not in a package) imported as a module."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"normops_benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
