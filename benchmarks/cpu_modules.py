"""normops modules vs their torch.nn twins on the CPU: forward + backward, interleaved.

    python benchmarks/cpu_modules.py [--reps 30] [--threads N] [--out DIR]

Each case builds the modules from the same state and times ``y = m(x); y.backward(dy)``,
rotating which runs first in every repetition so drift (frequency, other load) hits all alike.
Reports the median time of each and the median of the per-repetition ratios normops / torch.nn
(the foundation issue's target: <= 1.10 for every case), next to a control: a second copy of the
torch.nn module timed the same way, whose ratio to the first is the noise floor of the machine.
With --out it writes a JSON record with the machine, versions and date.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

import torch

import normops
import normops.bench

# name, torch.nn module factory, input shape: the sizes the foundation issue names.
CASES = [
    ("LayerNorm", lambda: torch.nn.LayerNorm(1024), (4096, 1024)),
    ("RMSNorm", lambda: torch.nn.RMSNorm(1024), (4096, 1024)),
    ("GroupNorm", lambda: torch.nn.GroupNorm(32, 256), (8, 256, 32, 32)),
    ("InstanceNorm2d", lambda: torch.nn.InstanceNorm2d(64), (8, 64, 64, 64)),
    ("BatchNorm2d", lambda: torch.nn.BatchNorm2d(64), (32, 64, 56, 56)),
]


def _step(module, x, dy):
    t = time.perf_counter()
    module(x).backward(dy)
    return time.perf_counter() - t


def run_case(name, factory, shape, reps, warmup=3):
    torch.manual_seed(0)
    ref = factory()
    control = copy.deepcopy(ref)
    ours = normops.convert(factory())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(shape).requires_grad_()
    dy = torch.randn(shape)
    slots = [("normops", ours), ("torch.nn", ref), ("control", control)]
    times = {label: [] for label, _ in slots}
    for i in range(warmup + reps):
        for label, module in slots[i % 3:] + slots[: i % 3]:  # rotate who runs first
            x.grad = None
            t = _step(module, x, dy)
            if i >= warmup:
                times[label].append(t)
    ratio = [a / b for a, b in zip(times["normops"], times["torch.nn"])]
    noise = [a / b for a, b in zip(times["control"], times["torch.nn"])]
    return {"case": name, "shape": list(shape), "reps": reps,
            "normops_ms": 1e3 * statistics.median(times["normops"]),
            "torch_ms": 1e3 * statistics.median(times["torch.nn"]),
            "ratio": statistics.median(ratio),
            # torch.nn against a second copy of itself, timed the same way: the noise floor
            "control_ratio": statistics.median(noise)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="folder for a JSON record")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'case':16s} {'shape':>20s} {'normops ms':>11s} {'torch.nn ms':>12s} {'ratio':>7s} {'control':>8s}")
    for name, factory, shape in CASES:
        r = run_case(name, factory, shape, args.reps)
        rows.append(r)
        print(f"{name:16s} {str(tuple(shape)):>20s} {r['normops_ms']:11.2f} {r['torch_ms']:12.2f} {r['ratio']:7.3f} "
              f"{r['control_ratio']:8.3f}")
    record = {
        "what": "forward+backward, normops CPU backend vs torch.nn, median of interleaved repetitions",
        "machine": {"platform": platform.platform(), "processor": normops.bench.device_name("cpu"),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "normops": normops.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "results": rows,
    }
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cpu_modules.json"), "w") as f:
            json.dump(record, f, indent=1)
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.3f} (target <= 1.10)")
    return record


if __name__ == "__main__":
    main()
