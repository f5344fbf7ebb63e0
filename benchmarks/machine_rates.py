"""The two numbers of this machine's roofline: copy bandwidth (bytes read +
written per second, large fp32 tensor copy) and fp32 matmul rate (FLOP/s),
each the fastest of 20 runs.  ``python benchmarks/machine_rates.py [cpu|cuda]``"""

import sys

import torch

from densenet_fast.bench.common import device_name
from densenet_fast.bench.kernels import machine_rates

if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    rates = machine_rates(device, torch.float32, repeats=20)
    print(f"{device_name(device)}, {torch.get_num_threads()} threads: copy {rates['copy_bytes_per_s'] / 1e9:.2f} GB/s "
          f"({rates['copy_tensor_bytes'] / 2**20:.0f} MiB tensor), fp32 matmul {rates['matmul_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s (n={rates['matmul_n']})")
