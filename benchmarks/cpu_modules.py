"""normops modules vs their torch.nn twins on the CPU: forward + backward, interleaved.

    python benchmarks/cpu_modules.py [--reps 30] [--threads N] [--out DIR] [--fused]

Each case builds the modules from the same state and times ``y = m(x); y.backward(dy)``,
rotating which runs first in every repetition so drift (frequency, other load) hits all alike.
Reports the median time of each and the median of the per-repetition ratios normops / torch.nn
(the foundation issue's target: <= 1.10 for every case), next to a control: a second copy of the
torch.nn module timed the same way, whose ratio to the first is the noise floor of the machine.
With --fused it times the fused variants instead (an activation, a residual add) against the
torch.nn composition a user would write (norm, then activation; add, then norm), where normops must
be at least as fast (ratio <= 1.00). With --out it writes a JSON record with the machine, versions
and date.
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
import normops.functional as F

# name, torch.nn module factory, input shape: the sizes the foundation issue names.
CASES = [
    ("LayerNorm", lambda: torch.nn.LayerNorm(1024), (4096, 1024)),
    ("RMSNorm", lambda: torch.nn.RMSNorm(1024), (4096, 1024)),
    ("GroupNorm", lambda: torch.nn.GroupNorm(32, 256), (8, 256, 32, 32)),
    ("InstanceNorm2d", lambda: torch.nn.InstanceNorm2d(64), (8, 64, 64, 64)),
    ("BatchNorm2d", lambda: torch.nn.BatchNorm2d(64), (32, 64, 56, 56)),
]


class AddNorm(torch.nn.Module):
    """y of a pre-norm residual step, h = x + r; y = norm(h), with a fixed residual r (h unused
    downstream): ``fused(x, r, norm)`` (normops' add_*_norm) or torch's add, then the norm."""

    def __init__(self, norm, r, fused=None):
        super().__init__()
        self.norm, self.r, self.fused = norm, r, fused

    def forward(self, x):
        return self.norm(x + self.r) if self.fused is None else self.fused(x, self.r, self.norm)[0]


def _fused_cases():
    """name, make() -> (normops module, torch.nn composition from the same state), input shape:
    each fused variant at the shape of its norm in CASES."""
    acts = {"relu": torch.nn.ReLU, "silu": torch.nn.SiLU, "gelu": torch.nn.GELU}
    norms = [("LayerNorm", (1024,), (4096, 1024)), ("RMSNorm", (1024,), (4096, 1024)),
             ("GroupNorm", (32, 256), (8, 256, 32, 32)), ("BatchNorm2d", (64,), (32, 64, 56, 56))]
    cases = []
    for name, args, shape in norms:
        for act, module in acts.items():
            def make(name=name, args=args, act=act, module=module):
                composition = torch.nn.Sequential(getattr(torch.nn, name)(*args), module())
                fused = getattr(normops.nn, name)(*args, activation=act)
                fused.load_state_dict(composition[0].state_dict())
                return fused, composition
            cases.append((f"{name}+{act}", make, shape))
    residual = [("add_layer_norm", lambda: torch.nn.LayerNorm(1024),
                 lambda x, r, m: F.add_layer_norm(x, r, m.normalized_shape, m.weight, m.bias, m.eps)),
                ("add_rms_norm", lambda: torch.nn.RMSNorm(1024),
                 lambda x, r, m: F.add_rms_norm(x, r, m.normalized_shape, m.weight, m.eps))]
    for name, norm, fused in residual:
        def make(norm=norm, fused=fused):
            r = torch.randn(4096, 1024)
            composition = AddNorm(norm(), r)
            return AddNorm(copy.deepcopy(composition.norm), r, fused), composition
        cases.append((name, make, (4096, 1024)))
    return cases


def _step(module, x, dy):
    t = time.perf_counter()
    module(x).backward(dy)
    return time.perf_counter() - t


def _pair(factory):
    """(normops module, torch.nn module) from the same state, for a CASES factory."""
    ref = factory()
    ours = normops.convert(factory())
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run_case(name, make, shape, reps, warmup=3):
    """``make()`` -> (normops module, torch.nn module), from the same state."""
    torch.manual_seed(0)
    ours, ref = make()
    control = copy.deepcopy(ref)
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
    p.add_argument("--fused", action="store_true", help="time the fused variants against the torch.nn composition")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"{'case':16s} {'shape':>20s} {'normops ms':>11s} {'torch.nn ms':>12s} {'ratio':>7s} {'control':>8s}")
    cases = _fused_cases() if args.fused else [(n, lambda f=f: _pair(f), s) for n, f, s in CASES]
    for name, make, shape in cases:
        r = run_case(name, make, shape, args.reps)
        rows.append(r)
        print(f"{name:16s} {str(tuple(shape)):>20s} {r['normops_ms']:11.2f} {r['torch_ms']:12.2f} {r['ratio']:7.3f} "
              f"{r['control_ratio']:8.3f}")
    record = {
        "what": "forward+backward, normops CPU backend vs torch.nn"
                + (" composition, fused variants" if args.fused else "") + ", median of interleaved repetitions",
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
    print(f"worst ratio {worst:.3f} (target <= {1.0 if args.fused else 1.1:.2f})")
    return record


if __name__ == "__main__":
    main()
