"""What the batch-invariant mode costs: normops' forward+backward with the mode off and on, timed
interleaved (off, on, off, on...) on the same inputs, the median of each.

    python benchmarks/batch_invariant_cost.py [--device cpu|cuda] [--reps 20]

On the CPU that is the torch backend (ATen's norms, with dW/dB and the per-sample sums as fixed-order
trees in the mode); on a GPU, the Triton kernels (the backward's programs planned from the row count).
"""
import argparse
import statistics
import time

import torch

import normops
from normops import bench

CASES = [("layer_norm", (4096, 1024), "float32"), ("layer_norm", (4096, 1024), "bfloat16"),
         ("rms_norm", (4096, 1024), "float32"), ("rms_norm", (1024, 4096), "bfloat16"),
         ("group_norm", (8, 256, 32, 32), "float32"), ("ada_layer_norm", (8, 256, 1152), "float32")]
CUDA_CASES = [("layer_norm", (4096, 4096), "bfloat16"), ("rms_norm", (4096, 8192), "bfloat16"),
              ("group_norm", (2, 320, 64, 64), "bfloat16"), ("group_norm", (1, 512, 128, 128), "bfloat16"),
              ("ada_layer_norm", (8, 1024, 1152), "bfloat16")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"{bench.device_name(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'op':16} {'shape':18} {'dtype':9} {'off ms':>8} {'on ms':>8} {'on/off':>7}")
    for op, shape, dtype in CUDA_CASES if device.type == "cuda" else CASES:
        run = bench.make_runner(op, shape, getattr(torch, dtype), device, "normops", "fwd+bwd")
        times = {False: [], True: []}
        for _ in range(3):  # warm up both
            for mode in times:
                with normops.batch_invariant(mode):
                    run()
        for _ in range(args.reps):
            for mode in times:
                with normops.batch_invariant(mode):
                    start = time.perf_counter()
                    run()
                    times[mode].append(time.perf_counter() - start)
        off, on = (statistics.median(times[m]) * 1e3 for m in (False, True))
        print(f"{op:16} {'x'.join(map(str, shape)):18} {dtype:9} {off:8.2f} {on:8.2f} {on / off:7.2f}")


if __name__ == "__main__":
    main()
