"""normops.nn.SyncBatchNorm on 2 CPU processes over gloo (torch's own refuses CPU tensors).

Each rank normalizes its slice of one global batch, slices of uneven size and one of them empty;
the outputs, input gradients, summed weight/bias gradients and running statistics must equal one
process's BatchNorm on the whole batch. Float64, so the comparison is tight.
"""
import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normops

WORLD = 2
C = 3
# (rows of rank 0, rows of rank 1), activation, momentum
CASES = [((3, 5), "relu", 0.1), ((4, 0), None, None), ((1, 2), "silu", 0.3)]


def _global_batch(case):
    g = torch.Generator().manual_seed(case)
    n = sum(CASES[case][0])
    x = 3 + 2 * torch.randn(n, C, 4, 5, generator=g, dtype=torch.float64)
    dy = torch.randn(n, C, 4, 5, generator=g, dtype=torch.float64)
    w = 1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(C, generator=g, dtype=torch.float64)
    return x, dy, w, b


def _module(cls, w, b, activation, momentum):
    m = cls(C, momentum=momentum, activation=activation).double()
    with torch.no_grad():
        m.weight.copy_(w), m.bias.copy_(b)
    return m


def _step(m, x, dy, steps=2):
    """Two training steps (running statistics move twice), then the output and grads of a third."""
    for _ in range(steps):
        m(x)
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(dy)
    return y.detach(), x.grad, m.weight.grad, m.bias.grad


# Bad input on one rank or both (issue #15): module kwargs and this rank's input. Every rank must
# raise the same error, before any statistics are exchanged (different C aborted both processes in
# gloo; an int64 input gave truncated output and updated the running statistics).
BAD = {
    "channels_differ": lambda rank: (dict(affine=False, track_running_stats=False),
                                     torch.randn(4, C + rank, 5, dtype=torch.float64)),
    "channels_not_num_features": lambda rank: ({}, torch.randn(4, C + rank, 5, dtype=torch.float64)),
    "int64_on_every_rank": lambda rank: ({}, torch.randint(0, 9, (4, C, 5))),
    "int64_on_one_rank": lambda rank: ({}, torch.randint(0, 9, (4, C, 5)) if rank else torch.randn(4, C, 5)),
    "dtypes_differ": lambda rank: ({}, torch.randn(4, C, 5, dtype=torch.float64 if rank else torch.float32)),
    "1d_on_one_rank": lambda rank: ({}, torch.randn(4, C) if rank else torch.randn(C)),
}


def _bad_inputs(rank):
    """{case: (error type, message, running_mean, running_var, num_batches_tracked)}, then a good
    step's output, which shows the ranks are still in step after the errors."""
    out = {}
    for case, make in BAD.items():
        kwargs, x = make(rank)
        m = normops.nn.SyncBatchNorm(C, **kwargs).to(x.dtype if x.is_floating_point() else torch.float32)
        try:
            m(x)
            out[case] = None
        except Exception as e:  # whatever it is, the test reports it
            stats = [None if t is None else t.clone() for t in (m.running_mean, m.running_var)]
            tracked = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
            out[case] = (type(e).__name__, str(e), *stats, tracked)
    x, _, _, _ = _global_batch(0)
    out["good_after"] = normops.nn.SyncBatchNorm(C).double()(x[rank * 3:rank * 3 + 3]).detach()
    return out


def _worker(rank, init_file, results):
    # a short timeout: a rank left waiting in a collective fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for case, (rows, activation, momentum) in enumerate(CASES):
            x, dy, w, b = _global_batch(case)
            lo = sum(rows[:rank])
            sl = slice(lo, lo + rows[rank])
            m = _module(normops.nn.SyncBatchNorm, w, b, activation, momentum)
            y, dx, dw, db = _step(m, x[sl], dy[sl])
            dist.all_reduce(dw), dist.all_reduce(db)  # what DistributedDataParallel would sum
            out[case] = (y, dx, dw, db, m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        # under DistributedDataParallel: its gradient averaging on top of the synced statistics
        x, dy, w, b = _global_batch(0)
        rows = CASES[0][0]
        lo = sum(rows[:rank])
        net = torch.nn.Sequential(torch.nn.Conv2d(C, C, 1, bias=False).double(),
                                  _module(normops.nn.SyncBatchNorm, w, b, "relu", 0.1))
        torch.nn.init.eye_(net[0].weight.view(C, C))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        ddp(x[lo:lo + rows[rank]]).backward(dy[lo:lo + rows[rank]])
        out["ddp"] = net[1].weight.grad.clone()
        # fp32, channels_last, uneven
        x, dy, w, b = (t.float() for t in _global_batch(0))
        lo = sum(rows[:rank])
        sl = slice(lo, lo + rows[rank])
        m = _module(normops.nn.SyncBatchNorm, w, b, "gelu", 0.1).float()
        cl = torch.channels_last
        out["fp32_cl"] = _step(m, x[sl].contiguous(memory_format=cl), dy[sl].contiguous(memory_format=cl))[:2]
        # one value per channel over both ranks: every rank raises (none is left waiting) and the
        # running statistics are untouched
        m = normops.nn.SyncBatchNorm(C).double()
        try:
            m(torch.randn(1 - rank, C, dtype=torch.float64))
        except ValueError as e:
            out["error"] = (str(e), m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
        out["bad"] = _bad_inputs(rank)
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as d:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(os.path.join(d, "init"), results), nprocs=WORLD, join=True)
        return dict(results)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"rows{c[0]}-{c[1]}-momentum{c[2]}" for c in CASES])
def test_matches_single_process(ranks, case):
    rows, activation, momentum = CASES[case]
    x, dy, w, b = _global_batch(case)
    ref = _module(normops.nn.BatchNorm2d, w, b, activation, momentum)
    y, dx, dw, db = _step(ref, x, dy)
    got = [ranks[r][case] for r in range(WORLD)]
    close = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([g[0] for g in got]), y, **close)
    torch.testing.assert_close(torch.cat([g[1] for g in got]), dx, **close)
    for g in got:
        torch.testing.assert_close(g[2], dw, **close)
        torch.testing.assert_close(g[3], db, **close)
        torch.testing.assert_close(g[4], ref.running_mean, **close)
        torch.testing.assert_close(g[5], ref.running_var, **close)
        assert g[6] == int(ref.num_batches_tracked) == 3


def test_under_ddp(ranks):
    """DDP averages the per-rank weight gradients: world size x that = the single-process sum."""
    x, dy, w, b = _global_batch(0)
    _, _, dw, _ = _step(_module(normops.nn.BatchNorm2d, w, b, "relu", 0.1), x, dy, steps=0)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["ddp"] * WORLD, dw, rtol=1e-10, atol=1e-10)


def test_single_process_is_batch_norm():
    """Without an initialized process group (or in eval) it is BatchNorm; torch's state_dict keys."""
    x = torch.randn(4, C, 5, 5)
    m, ref = normops.nn.SyncBatchNorm(C), torch.nn.BatchNorm2d(C)
    torch.testing.assert_close(m(x), ref(x))
    assert list(m.state_dict()) == list(torch.nn.SyncBatchNorm(C).state_dict())
    with pytest.raises(ValueError, match="expected at least 2D input"):
        m(torch.randn(3))


def test_convert_sync_batchnorm_keeps_state_and_activation():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, C, 1), torch.nn.BatchNorm2d(C),
                              normops.nn.BatchNorm2d(C, activation="silu"))
    old = net[1]
    out = normops.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert out is net and isinstance(net[1], normops.nn.SyncBatchNorm) and isinstance(net[2], normops.nn.SyncBatchNorm)
    assert net[1].weight is old.weight and net[1].running_mean is old.running_mean
    assert net[1].activation is None and net[2].activation == "silu"


def test_too_few_values_raise_on_every_rank(ranks):
    for r in range(WORLD):
        message, mean, var, tracked = ranks[r]["error"]
        assert "Expected more than 1 value per channel when training, got 1 over all ranks" in message
        assert torch.equal(mean, torch.zeros(C, dtype=torch.float64)) and torch.equal(var, torch.ones(C, dtype=torch.float64))
        assert tracked == 0


def test_fp32_channels_last(ranks):
    x, dy, w, b = (t.float() for t in _global_batch(0))
    y, dx, _, _ = _step(_module(normops.nn.BatchNorm2d, w, b, "gelu", 0.1).float(), x, dy)
    got = [ranks[r]["fp32_cl"] for r in range(WORLD)]
    assert all(g[0].is_contiguous(memory_format=torch.channels_last) for g in got)
    torch.testing.assert_close(torch.cat([g[0] for g in got]), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([g[1] for g in got]), dx, rtol=1e-5, atol=1e-5)


EXPECTED = {  # error type, the words that must be in the message
    "channels_differ": ("ShapeError", "same number of channels, dtype and device type on every rank, got rank 0: "
                                      "3 channels, torch.float64 on cpu; rank 1: 4 channels"),
    "channels_not_num_features": ("ShapeError", "on rank 1: expected running_mean of shape [4], got [3]"),
    "int64_on_every_rank": ("TypeError", "on rank 0: input must be a floating-point tensor"),
    "int64_on_one_rank": ("TypeError", "on rank 1: input must be a floating-point tensor"),
    "dtypes_differ": ("TypeError", "rank 0: 3 channels, torch.float32 on cpu; rank 1: 3 channels, torch.float64"),
    "1d_on_one_rank": ("ValueError", "on rank 0: expected at least 2D input (got 1D input)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_the_same_error_on_every_rank(ranks, case):
    """Checked across ranks before any statistics are exchanged; running statistics untouched."""
    kind, words = EXPECTED[case]
    got = [ranks[r]["bad"][case] for r in range(WORLD)]
    assert got[0] is not None and got[1] is not None, got
    assert got[0][:2] == got[1][:2]  # the same error, word for word, on every rank
    assert got[0][0] == kind and words in got[0][1], got[0]
    for _, _, mean, var, tracked in got:
        if mean is not None:
            assert torch.equal(mean, torch.zeros_like(mean)) and torch.equal(var, torch.ones_like(var))
            assert tracked == 0


def test_ranks_stay_in_step_after_bad_input(ranks):
    x, _, _, _ = _global_batch(0)
    ref = normops.nn.BatchNorm2d(C).double()(x[:6])
    torch.testing.assert_close(torch.cat([ranks[r]["bad"]["good_after"] for r in range(WORLD)]), ref)
