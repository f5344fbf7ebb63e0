"""How far 16-bit gradients of a trained DenseNet-BC are from float64, per
backend, and how much of the cpp backend's excess each backward primitive
carries (run with the torch backend's version of it instead).

    python benchmarks/gradient_precision.py --depth 40 --steps 300
    python benchmarks/gradient_precision.py --primitives

Trains DenseNet-BC-``depth`` (k=12) in float32 on the embedded digits
(16x16, batch 32, SGD lr 0.1, momentum 0.9) for ``--steps`` steps, then
prints the relative error ``|g - g64| / |g64|`` of all parameter gradients
of one training-mode step on 32 images in bfloat16 and float16 (weights and
input cast), against the float64 gradients of the same weights
(docs/cpp.md, "16-bit gradients").  ``--primitives`` instead compares one
bfloat16 ``bn_relu_backward`` (every ReLU passing, dL/dz = a common part +
N(0, 1)) and one ``bn_relu_conv1x1_backward`` weight gradient (65,536 rows,
16 channels, 8 outputs) of both backends against float64.
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from densenet_fast import densenet_bc
from densenet_fast.backends import extension_backend, torch_backend

SWAPPED = ("bn_relu_backward", "bn_relu_conv1x1_backward", "transition_backward")


def trained_model(depth: int, steps: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The trained model and a batch of 32 images and labels."""
    torch.manual_seed(0)
    digits = load_digits()
    images = F.interpolate(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16, size=16,
                           mode="bilinear")
    labels = torch.tensor(digits.target)
    model = densenet_bc(depth, 12, num_classes=10, in_channels=1, backend="torch")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (32,))
        optimizer.zero_grad()
        F.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
    return model, images[:32], labels[:32]


def gradients(model: torch.nn.Module, dtype: torch.dtype, backend: str, x: torch.Tensor, y: torch.Tensor
              ) -> torch.Tensor:
    """All parameter gradients of one training step of a copy in ``dtype``, as one float64 vector."""
    copied = copy.deepcopy(model).to(dtype).train()
    copied.set_backend(backend)
    F.cross_entropy(copied(x.to(dtype)).double(), y).backward()
    return torch.cat([p.grad.double().flatten() for p in copied.parameters()])


def primitive_errors() -> None:
    """The relative errors of single primitives of both backends (``--primitives``)."""
    torch.manual_seed(0)
    backends = {"cpp": extension_backend.CppBackend(), "torch": torch_backend.TorchBackend()}

    def error(got: torch.Tensor, exact: torch.Tensor) -> float:
        return ((got.double() - exact).norm() / exact.norm()).item()
    rows, channels = 4096, 8
    x = (torch.randn(rows, channels) + 5).bfloat16()  # x * scale + shift > 0: every ReLU passes
    mean, rstd = x.double().mean(0), (x.double().var(0, unbiased=False) + 1e-5).rsqrt()
    scale, shift = rstd, -mean * rstd + 5
    batch_mean = lambda sums: sums / rows  # noqa: E731
    for common in (0.0, 10.0, 100.0):
        grad_z = (common + torch.randn(rows, channels)).bfloat16()
        exact = grad_z.double()
        backends["torch"].bn_relu_backward(x.double(), scale, shift, mean, rstd, exact.clone(), exact, batch_mean)
        errors = []
        for backend in backends.values():
            grad = grad_z.clone()
            backend.bn_relu_backward(x, *(t.float() for t in (scale, shift, mean, rstd)), grad, grad, batch_mean)
            errors.append(f"{error(grad, exact):.2e}")
        print(f"bn_relu_backward, bfloat16, common part {common:g}: dx error cpp {errors[0]}, torch {errors[1]}")
    rows, channels, outputs = 65536, 16, 8
    x = torch.rand(rows, channels) + 1  # with scale 1 and shift 0, z = x
    ones, zeros = torch.ones(channels), torch.zeros(channels)
    signs = {"random": torch.randn(rows, 1),
             "+1 then -1": torch.cat([torch.ones(rows // 2, 1), -torch.ones(rows // 2, 1)])}
    for name, sign in signs.items():
        grad_out = sign.expand(rows, outputs) * (1 + 0.01 * torch.randn(rows, outputs))
        for dtype in (torch.bfloat16, torch.float16):
            exact = grad_out.to(dtype).double().t() @ x.to(dtype).double()
            errors = []
            for backend in backends.values():
                grad_weight = backend.bn_relu_conv1x1_backward(
                    x.to(dtype), ones, zeros, zeros, ones, torch.randn(outputs, channels).to(dtype),
                    grad_out.to(dtype), torch.zeros(rows, channels, dtype=dtype), None)[0]
                errors.append(f"{error(grad_weight, exact):.2e}")
            print(f"bn_relu_conv1x1_backward, {dtype}, dOut {name}: grad_weight error cpp {errors[0]}, "
                  f"torch {errors[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--primitives", action="store_true", help="single primitives, no model")
    args = parser.parse_args()
    if args.primitives:
        primitive_errors()
        return
    model, x, y = trained_model(args.depth, args.steps)
    exact = gradients(model, torch.float64, "torch", x, y)
    dtypes = (torch.bfloat16, torch.float16)

    def errors(backend: str) -> str:
        return "  ".join(f"{((gradients(model, d, backend, x, y) - exact).norm() / exact.norm()).item():.2e}"
                         for d in dtypes)
    print(f"relative gradient error ({', '.join(map(str, dtypes))}), DenseNet-BC-{args.depth} after {args.steps} "
          f"steps")
    print(f"torch backend: {errors('torch')}")
    print(f"cpp backend: {errors('cpp')}")
    for name in SWAPPED:
        own = getattr(extension_backend.CppBackend, name)
        setattr(extension_backend.CppBackend, name, getattr(torch_backend.TorchBackend, name))
        try:
            print(f"cpp backend with the torch backend's {name}: {errors('cpp')}")
        finally:
            setattr(extension_backend.CppBackend, name, own)


if __name__ == "__main__":
    main()
