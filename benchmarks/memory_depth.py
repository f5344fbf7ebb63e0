"""The depth sweep: DenseNet-BC (k=12), batch 64, 32x32, one training step,
depths 40/100/160/250; peak memory (fresh process each) and step time at depth
100 for torchvision eager, memory_efficient and densenet_fast (each policy).
Same as ``python -m densenet_fast bench depth`` with these defaults; any of its
options may be added (``--help``).  Without ``--out`` it writes
``benchmarks/results/memory_depth_cpu_b64.json``, or ``-2``, ``-3``... where taken."""

import sys

from densenet_fast import cli
from densenet_fast.bench import common

DEPTH_SWEEP = ["--depths", "40", "100", "160", "250", "--batch", "64", "--time-depths", "100", "--budget-gib", "0"]

if __name__ == "__main__":
    out = common.out_unless_given(sys.argv[1:], "memory_depth_cpu_b64.json")
    raise SystemExit(cli.main(["bench", "depth", *DEPTH_SWEEP, *out, *sys.argv[1:]]))
