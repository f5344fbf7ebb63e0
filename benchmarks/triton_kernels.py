"""The Triton kernels at DenseNet-121 shapes: a preset of ``bench kernels``.

    python benchmarks/triton_kernels.py OUTDIR [--tiny] [bench kernels options]

Runs ``python -m densenet_fast bench kernels`` for the triton backend and
torch's unfused ops (channels-last, with torchvision's concatenation) on the
fused BN-ReLU-Conv1x1 and the transition, forward and backward, in bf16:
DenseNet-121's block-3 layers reading C = 256, 512, 768 and 1024 channels of
the block's 1024-channel buffer (batch 256, 14x14, bottleneck 128) and its
block-1 layers reading 128 and 256 of 256 (56x56), the widest of each being
the transition's input; each result is checked against float32 autograd
(``--check``).  ``OUTDIR/triton_kernels.json`` is rewritten after every case,
and a case that fails is recorded with its error while the others run.  With
``DENSENET_FAST_CONFIG_LOG=<file>`` every kernel configuration chosen is logged
there.  Options after OUTDIR override the preset's (``--help`` lists them).

``--tiny`` runs small fp32 shapes, on the CPU through the Triton interpreter
when there is no GPU: a smoke test of this script, not a measurement.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast import cli  # noqa: E402

COMMON = ["--backends", "triton", "--primitives", "bn_relu_conv1x1", "bn_relu_conv1x1_backward", "transition",
          "transition_backward", "--channels-last", "--check", "--no-plot", "--no-progress"]
FULL = ["--device", "cuda", "--dtype", "bfloat16", "--batch", "256", "--warmup", "5", "--repeats", "20", "--shapes",
        "121-block3-C256", "121-block3-C512", "121-block3-C768", "121-block3-C1024", "121-block1-C128",
        "121-block1-C256"]
TINY = ["--device", "cuda" if torch.cuda.is_available() else "cpu", "--dtype", "float32", "--warmup", "1",
        "--repeats", "2", "--shapes", "tiny-C24", "tiny-C40"]


def main(argv: list[str]) -> int:
    """``bench kernels`` with the preset: its exit status."""
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__.split("\n\n")[1])
    outdir, options = Path(argv[0]), argv[1:]
    tiny = "--tiny" in options
    if not tiny and not torch.cuda.is_available():
        sys.exit("no GPU: only --tiny runs here (through the Triton interpreter)")
    return cli.main(["bench", "kernels", *COMMON, *(TINY if tiny else FULL), "--out",
                     str(outdir / "triton_kernels.json"), *(option for option in options if option != "--tiny")])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
