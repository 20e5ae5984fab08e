"""Regressions from issue #15: the backend context's scope (asyncio tasks, generators, threads),
and tracing (torch.fx, torch.jit) of the normops modules and functionals."""
import asyncio
import threading

import pytest
import torch

import normops
from normops.backends import current_backend, resolve

CPU = torch.device("cpu")


# --- the backend context: a context variable, not a thread-local ---------------------------------

def test_backend_context_is_per_asyncio_task():
    """Two tasks interleave on one thread, each inside its own block: each resolves its own
    backend (a thread-local stack gave the first task the second task's choice)."""
    seen = []

    async def task(name, entered, other_entered):
        with normops.backend(name):
            entered.set()
            await other_entered.wait()  # both blocks are open now
            for _ in range(2):
                seen.append((name, current_backend(CPU), resolve(torch.empty(1)).__name__.split(".")[-1]))
                await asyncio.sleep(0)  # let the other task run inside its block
        seen.append((name, current_backend(CPU)))

    async def main():
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(task("numpy", a, b), task("torch", b, a))

    normops.set_backend("triton")  # what each task returns to once its block closes
    try:
        asyncio.run(main())
    finally:
        normops.set_backend(None)
    assert sorted(seen) == sorted([("numpy", "numpy", "numpy_backend")] * 2 + [("torch", "torch", "torch_backend")] * 2
                                  + [("numpy", "triton"), ("torch", "triton")])
    assert [s[0] for s in seen[:4]] in (["torch", "numpy"] * 2, ["numpy", "torch"] * 2)  # they did interleave


def test_backend_context_of_a_suspended_generator_does_not_outlive_it():
    """A generator suspended inside its block, and its consumer's own block closing after the
    generator's: the consumer's block is innermost while open, and nothing is left behind."""
    def gen():
        with normops.backend("numpy"):
            yield current_backend(CPU)
        yield current_backend(CPU)

    g = gen()
    assert next(g) == "numpy"
    assert current_backend(CPU) == "numpy"  # a context variable cannot hide a suspended generator's block
    with normops.backend("triton"):
        assert current_backend(CPU) == "triton"
        assert next(g) == "triton"  # the generator's block closed; the consumer's is the one open
        assert current_backend(CPU) == "triton"
    assert current_backend(CPU) == "torch"


def test_backend_context_nested_and_restored_after_error():
    with normops.backend("numpy"):
        with pytest.raises(ZeroDivisionError):
            with normops.backend("triton"):
                assert current_backend(CPU) == "triton"
                1 / 0
        assert current_backend(CPU) == "numpy"
    assert current_backend(CPU) == "torch"


def test_backend_context_is_not_seen_by_other_threads_but_set_backend_is():
    """A block is this thread's; set_backend is process-wide, as it always was."""
    seen = []

    def other():
        seen.append(current_backend(CPU))

    def in_thread():
        t = threading.Thread(target=other)
        t.start()
        t.join()

    with normops.backend("numpy"):
        in_thread()
    normops.set_backend("numpy")
    try:
        in_thread()
        with normops.backend("triton"):
            assert current_backend(CPU) == "triton"  # a block still wins over set_backend
        assert current_backend(CPU) == "numpy"
    finally:
        normops.set_backend(None)
    assert seen == ["torch", "numpy"]
