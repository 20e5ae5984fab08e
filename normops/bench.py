"""What a benchmark of a norm is, shared by ``normops bench`` and the suites in ``benchmarks/``.

A case is (op, shape, dtype, device, provider, pass). Providers:
    "normops"   normops.functional on the device's default backend
    "torch"     the torch.nn.functional composition a user would write (eager)
    "compile"   torch.compile of that same eager composition
Passes: "fwd", "bwd" (the backward alone, on a graph built once), "fwd+bwd".

Timing is honest on a GPU: every timed call ends with a synchronize, the inputs rotate through
enough copies that a call never finds them in L2, and warm-up calls (compilation included) are not
timed. The bytes model is the minimum a kernel must move (each tensor read or written once, except
where the algorithm needs two passes: BatchNorm training), so GB/s = bytes / time and % of peak =
GB/s / the copy bandwidth measured in the same process.

``normops bench`` (``normops.cli.bench``) plans its cases here (``plan_bench``: the model-sized
shapes per device, ``BENCH_SHAPES``), times each with ``run_bench_case`` into a ``BenchResult``,
and prints, saves and plots them with ``format_bench_table``, ``bench_record`` and ``plot_speedups``.
"""
import dataclasses
import datetime
import functools
import math
import platform
import statistics
import time
from typing import Tuple

import torch
from torch.nn import functional as TF

from . import __version__
from . import functional as F
from .backends import current_backend
from .cliutil import DTYPES, default_device, error_text, save_figure, text_table, writable_file
from .core import gated_group_size

PROVIDERS = ("normops", "torch", "compile")
PASSES = ("fwd", "bwd", "fwd+bwd")


@dataclasses.dataclass(frozen=True)
class Op:
    """One benchmarked op: its inputs and both implementations.

    ``make(shape, dtype, device)`` -> (inputs dict, needs_grad names); ``ours``/``ref`` take the
    inputs dict and return the output (a tensor, or a tuple whose first element is differentiated).
    ``reads``/``writes``: activation-sized tensors the forward reads and writes (the minimum), and
    ``bwd_reads``/``bwd_writes`` for the backward, in units of the input's size; ``wide``: how many
    of those four are the fp32 residual stream instead (promote_types(input dtype, float32), 4
    bytes an element under bf16); ``stream_grad``: the backward also writes the residual's gradient
    in the stream's dtype where that is wider than x's (else x's gradient serves both).
    ``forward_only``: an inference op, no backward.
    """
    name: str
    family: str
    make: callable
    ours: callable
    ref: callable
    reads: int
    writes: int
    bwd_reads: int
    bwd_writes: int
    wide: Tuple[int, int, int, int] = (0, 0, 0, 0)
    stream_grad: bool = False
    forward_only: bool = False
    trains_residual: bool = False  # the residual is differentiated too (its gradient differs from x's)
    out_itemsize: int = 0  # bytes an element of the forward's writes: a quantized output's (0: the input's)

    @property
    def passes(self):
        return ("fwd",) if self.forward_only else PASSES


def _row_inputs(shape, dtype, device, residual=False, residual_dtype=None, gate=False):
    n = shape[-1]
    t = {"x": torch.randn(shape, dtype=dtype, device=device),
         "w": torch.ones(n, dtype=dtype, device=device), "b": torch.zeros(n, dtype=dtype, device=device)}
    if residual:
        t["r"] = torch.randn(shape, dtype=residual_dtype or dtype, device=device)
    if gate:
        t["g"] = torch.randn(shape, dtype=dtype, device=device)
    return t


# The Hugging Face modules' formulas (transformers 5.25), the torch composition a user of those
# models runs: statistics in fp32, then each module's own roundings.
def _hf_normalize(u, eps, group_size=None):
    """u (fp32) * rsqrt(mean(u^2) + eps) over the last dim, or over its groups of group_size."""
    g = u if group_size is None else u.unflatten(-1, (-1, group_size))
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(u.shape)


def _gemma_rms_norm(x, w, eps):  # GemmaRMSNorm: fp32 throughout, (1 + w), then x's dtype
    return (_hf_normalize(x.float(), eps) * (1.0 + w.float())).type_as(x)


def _llama_rms_norm(x, w, eps):  # LlamaRMSNorm: x_hat rounded to x's dtype, then w *
    return w * _hf_normalize(x.float(), eps).to(x.dtype)


def _qwen3_next_gated(x, gate, w, eps):  # Qwen3NextRMSNormGated: the Llama norm, then * silu(gate)
    return (_llama_rms_norm(x, w, eps) * TF.silu(gate.float())).to(x.dtype)


def _mamba2_gated(x, gate, w, eps, group_size):  # Mamba2RMSNormGated: * silu(gate), then grouped norm
    return w * _hf_normalize(x.float() * TF.silu(gate.float()), eps, group_size).to(x.dtype)


def _vllm_add_rms_norm_(x, r, w, eps):
    """vLLM's fused_add_rms_norm semantics in torch, in place: r += x, x <- rms_norm(r) * w."""
    r.add_(x)
    x.copy_(TF.rms_norm(r, r.shape[-1:], w, eps))
    return x, r


def _quantized_ref(y, group_size=None):
    """The composition a serving stack runs after a norm: per-row (or per-group) dynamic float8
    scales, then the quantize (vLLM's per-token / DeepSeek-V3's per-128 scaled_fp8_quant)."""
    g = y.float().unflatten(-1, (-1, group_size or y.shape[-1]))
    scales = (g.abs().amax(-1) / 448.0).clamp_min(2.0 ** -126)
    q = (g * (1.0 / scales)[..., None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.flatten(-2), scales


def _channel_inputs(shape, dtype, device):
    c = shape[1]
    return {"x": torch.randn(shape, dtype=dtype, device=device),
            "w": torch.ones(c, dtype=dtype, device=device), "b": torch.zeros(c, dtype=dtype, device=device)}


def _bn_inputs(shape, dtype, device):
    """BatchNorm as mixed precision runs it: fp16/bf16 activations, fp32 weight, bias and running
    statistics. (torch's CUDA NCHW training backward rejects bf16 parameters with fp32 running
    statistics, and its CPU kernels reject them in the forward.)"""
    t = _channel_inputs(shape, dtype, device)
    p = torch.float64 if dtype == torch.float64 else torch.float32
    t["w"], t["b"] = t["w"].to(p), t["b"].to(p)
    t["rm"] = torch.zeros(shape[1], dtype=p, device=device)
    t["rv"] = torch.ones(shape[1], dtype=p, device=device)
    return t


def _groups(c):
    return 32 if c % 32 == 0 else 1


OPS = {op.name: op for op in [
    Op("layer_norm", "row_norm", _row_inputs,
       lambda t: F.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"]),
       lambda t: TF.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"]), 1, 1, 2, 1),
    Op("rms_norm", "row_norm", _row_inputs,
       lambda t: F.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6),
       lambda t: TF.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6), 1, 1, 2, 1),
    Op("add_rms_norm", "row_norm", functools.partial(_row_inputs, residual=True),
       lambda t: F.add_rms_norm(t["x"], t["r"], t["x"].shape[-1:], t["w"], 1e-6),
       # backward of y only (h unused downstream here): reads h and dy, writes one dx for x and r
       lambda t: (lambda h: (TF.rms_norm(h, h.shape[-1:], t["w"], 1e-6), h))(t["x"] + t["r"]), 2, 2, 2, 1),
    # The row-norm variants (issue #17), each against its Hugging Face module's formula. Bytes: a
    # gate is one more read forward, a read and a dgate write backward; the fp32 residual stream
    # reads r and writes h at 4 bytes (its backward: h read at 4 bytes, dx written in x's dtype).
    Op("rms_norm_gemma", "row_norm", _row_inputs,
       lambda t: F.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6, offset=1.0),
       lambda t: _gemma_rms_norm(t["x"], t["w"], 1e-6), 1, 1, 2, 1),
    Op("rms_norm_llama", "row_norm", _row_inputs,
       lambda t: F.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6, casting="llama"),
       lambda t: _llama_rms_norm(t["x"], t["w"], 1e-6), 1, 1, 2, 1),
    Op("add_rms_norm_fp32_residual", "row_norm",
       functools.partial(_row_inputs, residual=True, residual_dtype=torch.float32),
       lambda t: F.add_rms_norm(t["x"], t["r"], t["x"].shape[-1:], t["w"], 1e-6, out_dtype=t["x"].dtype),
       lambda t: (lambda h: (TF.rms_norm(h, h.shape[-1:], t["w"].float(), 1e-6).to(t["x"].dtype), h))(t["x"] + t["r"]),
       2, 2, 2, 1, wide=(1, 1, 1, 0), stream_grad=True),
    Op("gated_rms_norm", "row_norm", functools.partial(_row_inputs, gate=True),
       lambda t: F.gated_rms_norm(t["x"], t["g"], t["x"].shape[-1:], t["w"], 1e-6, casting="llama"),
       lambda t: _qwen3_next_gated(t["x"], t["g"], t["w"], 1e-6), 2, 1, 3, 2),
    Op("gated_rms_norm_grouped", "row_norm", functools.partial(_row_inputs, gate=True),
       lambda t: F.gated_rms_norm(t["x"], t["g"], t["x"].shape[-1:], t["w"], 1e-6, norm_before_gate=False,
                                  group_size=gated_group_size(t["x"].shape[-1]), casting="llama"),
       lambda t: _mamba2_gated(t["x"], t["g"], t["w"], 1e-6, gated_group_size(t["x"].shape[-1])), 2, 1, 3, 2),
    # In place, for inference: reads x and r, writes r (h) and x (y).
    Op("add_rms_norm_", "row_norm", functools.partial(_row_inputs, residual=True),
       lambda t: F.add_rms_norm_(t["x"], t["r"], t["x"].shape[-1:], t["w"], 1e-6),
       lambda t: _vllm_add_rms_norm_(t["x"], t["r"], t["w"], 1e-6), 2, 2, 0, 0, forward_only=True),
    # Norm + quantize, for inference: reads x, writes q in float8 (1 byte an element) and the scales.
    Op("rms_norm_quant", "row_norm", _row_inputs,
       lambda t: F.rms_norm_quant(t["x"], t["x"].shape[-1:], t["w"], 1e-6),
       lambda t: _quantized_ref(TF.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6)), 1, 1, 0, 0,
       forward_only=True, out_itemsize=1),
    Op("rms_norm_quant_g128", "row_norm", _row_inputs,
       lambda t: F.rms_norm_quant(t["x"], t["x"].shape[-1:], t["w"], 1e-6, group_size=128),
       lambda t: _quantized_ref(TF.rms_norm(t["x"], t["x"].shape[-1:], t["w"], 1e-6), 128), 1, 1, 0, 0,
       forward_only=True, out_itemsize=1),
    Op("group_norm", "group_norm", _channel_inputs,
       lambda t: F.group_norm(t["x"], _groups(t["x"].shape[1]), t["w"], t["b"]),
       lambda t: TF.group_norm(t["x"], _groups(t["x"].shape[1]), t["w"], t["b"]), 1, 1, 2, 1),
    Op("group_norm+silu", "group_norm", _channel_inputs,
       lambda t: F.group_norm(t["x"], _groups(t["x"].shape[1]), t["w"], t["b"], activation="silu"),
       lambda t: TF.silu(TF.group_norm(t["x"], _groups(t["x"].shape[1]), t["w"], t["b"])), 1, 1, 2, 1),
    Op("instance_norm", "group_norm", _channel_inputs,
       lambda t: F.instance_norm(t["x"], weight=t["w"], bias=t["b"]),
       lambda t: TF.instance_norm(t["x"], weight=t["w"], bias=t["b"]), 1, 1, 2, 1),
    # BatchNorm training needs the batch statistics before it can normalize: two reads of x.
    Op("batch_norm", "batch_norm", _bn_inputs,
       lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True),
       lambda t: TF.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True), 2, 1, 4, 1),
    Op("batch_norm+relu", "batch_norm", _bn_inputs,
       lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True, activation="relu"),
       lambda t: TF.relu(TF.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], True)), 2, 1, 4, 1),
    # Inference: the running statistics normalize, one elementwise pass (backward: dx, dw, db
    # read dy and x once).
    Op("batch_norm_eval", "batch_norm", _bn_inputs,
       lambda t: F.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], False),
       lambda t: TF.batch_norm(t["x"], t["rm"], t["rv"], t["w"], t["b"], False), 1, 1, 2, 1),
    # ConvNeXt's channels-first LayerNorm (dim 1), against the permute composition ConvNeXt and timm
    # run (its permuted copies are the cost normops saves; the minimum bytes are one read and write)
    Op("layer_norm_channels_first", "channels_first", _channel_inputs,
       lambda t: F.layer_norm_channels_first(t["x"], t["w"], t["b"], 1e-6),
       lambda t: TF.layer_norm(t["x"].permute(0, 2, 3, 1), t["x"].shape[1:2], t["w"], t["b"], 1e-6).permute(0, 3, 1, 2),
       1, 1, 2, 1),
]}


def bytes_moved(op, shape, dtype, pas):
    """The minimum bytes a pass of op must move (activation-sized tensors only; parameters and
    statistics are a rounding error at benchmark sizes)."""
    if pas not in op.passes:
        raise ValueError(f"{op.name} has no {pas} pass (it is forward only)")
    numel = math.prod(shape)
    size = numel * dtype.itemsize
    wide = numel * torch.promote_types(dtype, torch.float32).itemsize - size  # what a wide tensor adds
    out = numel * op.out_itemsize if op.out_itemsize else size
    fwd = op.reads * size + op.writes * out + (op.wide[0] + op.wide[1]) * wide
    bwd = (op.bwd_reads + op.bwd_writes) * size + (op.wide[2] + op.wide[3]) * wide + \
        (size + wide if op.stream_grad and wide else 0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pas]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_format(layout, ndim):
    """The torch memory format of a benchmark layout name for an ndim-D input: "channels_last" is
    channels_last_3d on 5-D inputs, and plain contiguous where neither applies."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d} if layout == "channels_last" else {}
    return formats.get(ndim, torch.contiguous_format)


def _copies(shape, dtype, device):
    """How many input copies to rotate through so that none is still in L2 when reused."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(256, math.ceil(2 * l2 / max(size, 1)) + 1))  # tiny shapes: many copies, little memory


_GRAD_INPUTS = ("x", "w", "b", "g")  # what a backward differentiates (the residual: see add_rms_norm's bytes)


def _clear_grads(inputs):
    for t in inputs.values():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def make_runner(op_name, shape, dtype, device, provider, pas, memory_format=torch.contiguous_format, sync=True,
                copies=None):
    """A zero-argument callable running one timed call (synchronized on a GPU unless `sync` is
    false: time_events times back-to-back calls). The input (and residual) are laid out in
    `memory_format`; the incoming gradient, one per input set, in the layout of the provider's own
    output, as the next layer of a network would hand it back. `copies`: input sets to rotate
    through (default: enough to leave L2)."""
    op = OPS[op_name]
    if pas not in op.passes:
        raise ValueError(f"{op_name} has no {pas} pass (it is forward only)")
    device = torch.device(device)
    fn = {"normops": op.ours, "torch": op.ref}.get(provider)
    eager = op.ours if provider == "normops" else op.ref  # the provider's output layout, uncompiled
    if provider == "compile":
        torch._dynamo.reset()  # a fresh cache: no shape-generalized or stale graph from an earlier case
        fn = torch.compile(op.ref)
    grad = pas != "fwd"
    inputs = []
    for _ in range(copies or _copies(shape, dtype, device)):
        t = op.make(shape, dtype, device)
        for k in ("x", "r", "g"):
            if k in t:
                t[k] = t[k].contiguous(memory_format=memory_format)
        for k in _GRAD_INPUTS + (("r",) if op.trains_residual else ()):
            if k in t:
                t[k].requires_grad_(grad)
        inputs.append(t)
    state = {"i": 0}

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if pas == "bwd":  # graphs built once; each call runs one backward (retained for the next)
        outs = [first(fn(t)) for t in inputs]
        grads = [torch.randn_like(o) for o in outs]

        def run():
            i = state["i"] = (state["i"] + 1) % len(inputs)
            _clear_grads(inputs[i])  # no accumulation kernel into an existing .grad
            outs[i].backward(grads[i], retain_graph=True)
            if sync:
                _sync(device)
    else:
        if grad:
            with torch.no_grad():  # (torch's instance_norm output is contiguous whatever the input's)
                dys = [torch.randn_like(first(eager(t))) for t in inputs]

        def run():
            i = state["i"] = (state["i"] + 1) % len(inputs)
            out = first(fn(inputs[i]))
            if grad:
                _clear_grads(inputs[i])
                out.backward(dys[i])
            if sync:
                _sync(device)
    return run


def time_runner(run, warmup=3, reps=20):
    """Median, p20 and p80 wall time in ms of `run` (already synchronized per call)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) * 1e3)
    return _summary(times)


@functools.lru_cache(maxsize=None)
def _sleep_cycles_per_ms(device):
    """Clock cycles of torch.cuda._sleep per ms on a CUDA device, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / max(start.elapsed_time(end), 1e-3)


def time_events(run, device, warmup=3, trial_ms=5.0, trials=5, max_calls=50):
    """Per-call times in ms of an unsynchronized `run` (make_runner(sync=False)), both from trials
    of `calls` back-to-back calls between two CUDA events (on a CPU device, wall time):
      median_ms, p20_ms, p80_ms: GPU time. The stream is held by a sleep kernel while the host
        queues the calls, so the GPU runs them with no launch gaps: the kernels' time, with the
        host work per call hidden, as in a training step whose host runs ahead.
      wall_ms: the same loop without the sleep. When it is well above median_ms, the host, not
        the GPU, bounds a loop that waits on nothing else ("host-bound").
    `calls` fills about trial_ms from a synchronized first call, at most max_calls (with a few
    launches a call, that keeps the queued launches under the depth at which queueing blocks)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    for _ in range(warmup):
        run()
    _sync(device)
    t = time.perf_counter()
    run()
    _sync(device)
    calls = max(1, min(max_calls, int(trial_ms / max((time.perf_counter() - t) * 1e3, 1e-3))))

    def trial(sleep_ms=0.0):
        """(ms per call between the events, host ms per call to queue them, whether the sleep
        still held the stream when the last call was queued)."""
        _sync(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if sleep_ms:
                torch.cuda._sleep(int(_sleep_cycles_per_ms(device.index) * min(sleep_ms, 1000.0)))
            start.record()
        t = time.perf_counter()
        for _ in range(calls):
            run()
        host = (time.perf_counter() - t) * 1e3 / calls
        if not cuda:
            return host, host, True
        covered = not sleep_ms or not start.query()  # the GPU had not reached `start` yet
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls, host, covered

    wall = [trial() for _ in range(trials)]
    host_ms = statistics.median(h for _, h, _ in wall)
    gpu, covered = [], 0
    for _ in range(trials if cuda else 0):
        # the sleep outlasts the queueing by half again, plus 1 ms, in cycles measured once; if the
        # clock has risen since and the sleep ended early, again with a longer one. (A sleep too
        # short only lets host gaps back in: the time can come out longer, never shorter.)
        sleep = 1.5 * calls * host_ms + 1.0
        for _ in range(3):
            ms, _, ok = trial(sleep)
            if ok:
                break
            sleep *= 4
        gpu.append(ms)
        covered += ok
    gpu = gpu or [w for w, _, _ in wall]
    return dict(_summary(gpu), wall_ms=statistics.median(w for w, _, _ in wall), host_ms=host_ms, calls=calls,
                sleep_covered=covered / trials if cuda else None)


def _summary(times):
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 5 else [times[0], None, None, times[-1]]
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3]}


def time_interleaved(runners, warmup=3, reps=20, errors=None):
    """time_runner for several providers of one case at once, one call of each per round in a
    rotating order, so that drift and bursts of other load hit them alike. A runner that raises is
    dropped, its message put in ``errors`` (a dict) if given."""
    runners = dict(runners)
    times = {name: [] for name in runners}
    for i in range(warmup + reps):
        names = list(runners)
        for name in names[i % len(names):] + names[: i % len(names)] if names else []:
            try:
                t = time.perf_counter()
                runners[name]()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t) * 1e3)
            except Exception as e:  # reported by the caller, the other providers go on
                if errors is not None:
                    errors[name] = f"{type(e).__name__}: {e}"
                del runners[name]
    return {name: _summary(ts) for name, ts in times.items() if ts and name in runners}


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device):
    """Measured device-memory copy bandwidth in GB/s (read + write counted), the roofline."""
    device = torch.device(device)
    n = (1 << 28) if device.type == "cuda" else (1 << 24)  # 1 GiB / 64 MiB of fp32 per buffer
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t = time_events(lambda: b.copy_(a), device, warmup=3, trial_ms=20.0, trials=5)
    return 2 * a.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """Provenance for a result: device, versions, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
            "triton": triton_version, "normops": __version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def extra_info(op_name, shape, dtype, device, provider, pas, median_ms):
    """What every benchmark record carries besides its times."""
    moved = bytes_moved(OPS[op_name], shape, dtype, pas)
    gbps = moved / (median_ms * 1e-3) / 1e9
    peak = copy_bandwidth(str(device))
    return {"op": op_name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "provider": provider,
            "pass": pas, "bytes": moved, "gbps": gbps, "peak_gbps": peak, "pct_of_peak": 100 * gbps / peak,
            **environment(device)}


# --- normops bench: which cases ----------------------------------------------------------------

# Default shapes per device type, looked up by op name, else by the op's family. CPU: past the
# caches (4-25 MiB of fp32 per tensor, so memory-bound like on a GPU) yet a few ms per call, so the
# default run takes seconds on two cores. CUDA: where the norms sit in the models normops targets.
BENCH_SHAPES = {
    "cpu": {
        "row_norm": [(4096, 1024), (1024, 4096)],   # tokens x hidden: many narrow rows, fewer wide ones
        "group_norm": [(8, 256, 32, 32)],           # a U-Net block at low resolution, 32 groups
        "instance_norm": [(8, 64, 64, 64)],         # a style-transfer layer
        "batch_norm": [(32, 64, 56, 56)],           # ResNet stage 1 at batch 32
        "channels_first": [(8, 96, 56, 56)],        # ConvNeXt-T stage 1 at batch 8
        "ada_layer_norm": [(8, 256, 1152)],         # DiT-XL's width, 256 tokens (256 px, patch 2)
        "ada_layer_norm_gate_residual": [(8, 256, 1152)],
    },
    "cuda": {
        "row_norm": [(4096, 1024), (4096, 8192)],   # 4096 tokens at BERT-large and Llama-70B widths
        "group_norm": [(2, 320, 64, 64),            # SD U-Net first block, 512 px, batch 2 (CFG)
                       (1, 512, 128, 128),          # SD VAE decoder, 512 px
                       (1, 128, 512, 512),          # SD VAE decoder's last block, 512 px (32 groups of 1M)
                       (1, 128, 8, 256, 256)],      # video VAE: 8 frames of 256x256 (32 groups of 2M)
        "instance_norm": [(16, 64, 128, 128)],      # style-transfer generator's 64-channel layer, 256 px
        "batch_norm": [(256, 256, 56, 56),          # ResNet-50 at batch 256: stage 1 (large H*W) ...
                       (256, 2048, 7, 7)],          # ... and the last stage (many channels, small H*W)
        "channels_first": [(32, 96, 56, 56),        # ConvNeXt-T at batch 32: stage 1 (96 channels) ...
                           (32, 768, 7, 7)],        # ... and stage 4 (768 channels at 7x7)
        "ada_layer_norm": [(8, 1024, 1152), (8, 4096, 1152)],  # DiT-XL at 512 px and 1024 px, batch 8
        "ada_layer_norm_gate_residual": [(8, 1024, 1152), (8, 4096, 1152)],
    },
}
# --quick: one small shape per op, a smoke test of the whole path (for tests and CI), not a measurement
BENCH_QUICK_SHAPES = {"row_norm": [(256, 512)], "group_norm": [(2, 64, 16, 16)], "instance_norm": [(2, 32, 16, 16)],
                      "batch_norm": [(8, 32, 16, 16)], "channels_first": [(2, 96, 8, 8)],
                      "ada_layer_norm": [(2, 16, 64)], "ada_layer_norm_gate_residual": [(2, 16, 64)]}
BENCH_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}  # what each device's models run in
BENCH_WARMUP, BENCH_REPS = 3, 20
BENCH_QUICK_WARMUP, BENCH_QUICK_REPS = 1, 5  # 5: the fewest for which time_runner gives real p20/p80


@dataclasses.dataclass
class BenchResult:
    op: str
    shape: Tuple[int, ...]
    dtype: str
    pas: str
    device: str
    bytes: int = 0
    times: dict = dataclasses.field(default_factory=dict)   # provider -> {"median_ms", "p20_ms", "p80_ms"}
    errors: dict = dataclasses.field(default_factory=dict)  # provider -> message

    def ms(self, provider):
        t = self.times.get(provider)
        return t and t["median_ms"]

    def speedup(self, provider="torch"):
        """provider's median over normops's: > 1 when normops is faster."""
        ours, theirs = self.ms("normops"), self.ms(provider)
        return theirs / ours if ours and theirs else None

    def gbps(self, provider="normops"):
        ms = self.ms(provider)
        return self.bytes / (ms * 1e-3) / 1e9 if ms else None


def bench_shapes(op, device, quick):
    table = BENCH_QUICK_SHAPES if quick else BENCH_SHAPES.get(device.type, BENCH_SHAPES["cuda"])
    return table.get(op.name) or table[op.family]


def plan_bench(args):
    """(device, [(op name, shape, dtype name, pass)], providers) for the parsed options, or raise
    ValueError (usage)."""
    device = args.device or torch.device(default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            writable_file(path, opt)
    ops = list(dict.fromkeys(args.op or OPS))
    dtypes = list(dict.fromkeys(args.dtype or [BENCH_DTYPE.get(device.type, "float32")]))
    passes = list(dict.fromkeys(args.passes or ["fwd+bwd"]))
    # a forward-only op runs the passes asked that it has, its forward by default
    op_passes = {name: [p for p in passes if p in OPS[name].passes] or ([] if args.passes else ["fwd"])
                 for name in ops}
    cases = [(name, shape, dt, pas) for name in ops for shape in bench_shapes(OPS[name], device, args.quick)
             for dt in dtypes for pas in op_passes[name]]
    if not cases:
        raise ValueError(f"no case: {', '.join(ops)} {'has' if len(ops) == 1 else 'have'} no "
                         f"{'/'.join(passes)} pass (forward only)")
    return device, cases, ["normops", "torch"] + (["compile"] if args.compile else [])


def run_bench_case(op_name, shape, dtype_name, pas, device, providers, warmup, reps):
    """Time one case with every provider; a provider that raises (OOM, compile failure) is recorded
    in .errors, never raised."""
    dtype = DTYPES[dtype_name]
    res = BenchResult(op_name, tuple(shape), dtype_name, pas, str(device),
                      bytes_moved(OPS[op_name], shape, dtype, pas))
    runners = {}
    for provider in providers:
        try:  # make_runner starts compile providers from a fresh dynamo cache
            runners[provider] = make_runner(op_name, shape, dtype, device, provider, pas)
        except Exception as e:  # one failing case is an error in the table, not a crash
            res.errors[provider] = error_text(e)
    errors = {}
    res.times = time_interleaved(runners, warmup=warmup, reps=reps, errors=errors)
    res.errors.update(errors)
    del runners
    if res.errors and device.type == "cuda":
        torch.cuda.empty_cache()  # give an OOM's cached blocks back before the next case
    return res


# --- normops bench: output ---------------------------------------------------------------------

def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_bench_table(results, providers, peak):
    labels = {"normops": "normops ms", "torch": "torch.nn ms", "compile": "compile ms"}
    headers = ["op", "shape", "dtype", "pass"] + [labels[p] for p in providers] + ["speedup", "GB/s", "% peak"]
    rows = []
    for r in results:
        gbps = r.gbps()
        rows.append([r.op, "x".join(map(str, r.shape)), r.dtype, r.pas]
                    + ["error" if p in r.errors else _fmt(r.ms(p), ".3f") for p in providers]
                    + [_fmt(r.speedup(), ".2f"), _fmt(gbps, ".1f"),
                       _fmt(gbps and peak and 100 * gbps / peak, ".0f")])
    return text_table(headers, rows, right=set(headers[4:]))


def bench_record(r, providers, peak):
    """One JSON record: the case, each provider's median/p20/p80 (or its error), derived numbers."""
    rec = {"op": r.op, "family": OPS[r.op].family, "shape": list(r.shape), "dtype": r.dtype, "pass": r.pas,
           "device": r.device, "bytes": r.bytes, "status": "error" if r.errors else "ok"}
    for p in providers:
        if p in r.errors:
            rec[p] = {"error": r.errors[p]}
        else:
            gbps = r.gbps(p)
            rec[p] = dict(r.times[p], gbps=gbps, pct_of_peak=peak and 100 * gbps / peak)
    gbps = r.gbps()
    rec.update(speedup=r.speedup(), gbps=gbps, pct_of_peak=gbps and peak and 100 * gbps / peak)
    if "compile" in providers:
        rec["speedup_vs_compile"] = r.speedup("compile")
    return rec


def figure_class():
    """matplotlib's Figure (no pyplot: no GUI backend, no global state), imported only for --plot;
    ValueError (usage) without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError(f"--plot needs matplotlib ({e}); install it with `pip install matplotlib` "
                         f"or `pip install -e '.[bench]'`")
    return Figure


def plot_speedups(results, providers, env, path):
    """A horizontal bar per case: torch.nn time / normops time (and compile's, if timed); 1 = parity."""
    series = [("torch", "vs torch.nn.functional")] + (
        [("compile", "vs torch.compile(torch.nn.functional)")] if "compile" in providers else [])
    labels = [f"{r.op} {'x'.join(map(str, r.shape))} {r.dtype} {r.pas}" for r in results]
    fig = figure_class()(figsize=(9, 1.6 + 0.32 * len(results) * len(series)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(series)
    for k, (provider, label) in enumerate(series):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(results))]
        vals = [r.speedup(provider) for r in results]
        bars = ax.barh(ys, [v or 0 for v in vals], height, label=label)
        ax.bar_label(bars, ["error" if v is None else f"{v:.2f}x" for v in vals], padding=2, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    # bar_label writes past the bar's end: leave room for the longest bar's label inside the axes
    longest = max([r.speedup(p) or 0 for r in results for p, _ in series] + [1.0])
    ax.set_xlim(0, longest * 1.15)
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of normops = other's median time / normops' median time (> 1: normops faster)")
    versus = " and torch.compile" if len(series) > 1 else ""
    device = results[0].device if results else env["device_type"]
    ax.set_title(f"normops (backend {current_backend(torch.device(device))}) vs torch.nn.functional{versus}: "
                 f"speedup per case\n{env['device']} ({device}), normops {env['normops']}, torch {env['torch']}, "
                 f"{env['date'][:10]}", fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)  # "best": where it covers the fewest bars
    save_figure(fig, path, dpi=120)


# --- adaLN modulation (issue #18): shape (B, T, D), per-sample scale/shift/gate (B, D) ------------
# Against diffusers' unfused composition (BasicTransformerBlock / DiT's adaLN-Zero step). Bytes: with
# residual and gate, the forward reads x, r and writes y, h; the backward (of y) reads h, dy and x
# (dgate), writes dx and dr. Alone: x -> y; backward reads x, dy, writes dx.
def _ada_inputs(shape, dtype, device, residual=False):
    b, d = shape[0], shape[-1]
    t = {"x": torch.randn(shape, dtype=dtype, device=device),
         "scale": 0.1 * torch.randn(b, d, dtype=dtype, device=device),
         "shift": 0.1 * torch.randn(b, d, dtype=dtype, device=device)}
    if residual:
        t["r"] = torch.randn(shape, dtype=dtype, device=device)
        t["g"] = torch.randn(b, d, dtype=dtype, device=device)
    return t


def _diffusers_ada(t):
    h = t["g"][:, None] * t["x"] + t["r"] if "r" in t else t["x"]
    y = TF.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + t["scale"][:, None]) + t["shift"][:, None]
    return (y, h) if "r" in t else y


OPS.update({op.name: op for op in [
    Op("ada_layer_norm", "row_norm", _ada_inputs,
       lambda t: F.ada_layer_norm(t["x"], t["scale"], t["shift"], 1e-6), _diffusers_ada, 1, 1, 2, 1),
    Op("ada_layer_norm_gate_residual", "row_norm", functools.partial(_ada_inputs, residual=True),
       lambda t: F.ada_layer_norm(t["x"], t["scale"], t["shift"], 1e-6, residual=t["r"], gate=t["g"]),
       _diffusers_ada, 2, 2, 3, 2, trains_residual=True),  # DiT: h is the next block's residual stream
]})
_GRAD_INPUTS += ("scale", "shift")  # adaLN's per-sample modulation is trained too
