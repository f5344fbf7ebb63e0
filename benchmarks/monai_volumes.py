"""MONAI's 3-D DenseNet-121 (one input channel, 2 classes) on two 64x128x128
volumes, one training step: MONAI eager, MONAI with torch.utils.checkpoint per
dense layer, and densenet_fast.monai (C++ backend, each recompute policy); peak
memory above the model in a fresh process per implementation, time round-robin
in one process. Same as ``python -m densenet_fast bench models`` with these
options; any of its options may be added (``--help``), e.g. ``--compile`` for
torch.compile(MONAI) or ``--image-size 32x64x64`` for a smaller volume."""

import sys

from densenet_fast import cli

PRESET = ["--model", "monai-densenet121", "--image-size", "64x128x128", "--batch", "2", "--train-only",
          "--steps", "1", "--warmup", "1", "--repeats", "2",
          "--impls", "monai-eager", "monai-ckpt", "fast-cpp-keep", "fast-cpp-recompute"]

if __name__ == "__main__":
    raise SystemExit(cli.main(["bench", "models", *PRESET, *sys.argv[1:]]))
