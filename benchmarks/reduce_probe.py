"""The reduce pass of the BN-ReLU-Conv1x1 backward, one configuration at a
time, its dW partials compared with float64 per row split and per K block
(docs/gpu.md, "The two failures").

    python benchmarks/reduce_probe.py OUT.json [--tiny]

On an H200 (Triton 3.6) the reduce configuration BLOCK_M=64, BLOCK_C=32, 8
warps, 2 stages gave a wrong dW in float16 with two K blocks (K = 136) and a
right one with one (K = 120); it was taken out of the lists.  This runs
``backward_sums`` of a dense layer alone, forced to that configuration, to
it with 1 stage, and to the list's first, at the failing test's case
(float16, K = 136, 133 rows of 39 channels sliced from 44, as the test's
inputs are) and then at one change each: an unsliced input; bfloat16; K =
120 (one K block); K = 256 (two full blocks); 4096 rows of 264 channels (and
that in bfloat16 at K = 256).  Pass 1 only (pass 2 sums the partials; the
GPU tests run both) and the dense layer's pass only (the transition's
failed too).  Each case's row in OUT.json holds the
relative error of dW (the partials summed), of each K block of it, of each
split's partial (the worst, and which splits are wrong), and of the sums
(``dbeta``, ``dgamma``), NaN counting as wrong, and which ptxas Triton
used.  Exits 1 if a configuration of the list is wrong (the one taken out is
what is being probed: its errors are the finding).

``TRITON_PTXAS_PATH`` picks the assembler, as for any Triton program;
benchmarks/gpu_check.sh runs this once with Triton's and, where there is one,
once with the CUDA toolkit's.  ``--tiny``: small shapes, fp32 data through the
Triton interpreter on the CPU (no GPU): a smoke test of this script.
"""

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast.backends.triton_kernels import bn_relu_conv  # noqa: E402
from densenet_fast.backends.triton_kernels.common import rows  # noqa: E402

TAKEN_OUT = bn_relu_conv._config(64, 32, 8, 2)
WRONG = 1e-2  # relative error above which a 16-bit result is wrong (the H200's was 0.97)


def case_fields(config, dtype: torch.dtype, m: int, c: int, k: int, sliced: bool) -> dict:
    return {"config": config_name(config), "listed": config in bn_relu_conv.REDUCE_CONFIGS[1],
            "dtype": str(dtype)[6:], "rows": m, "channels": c, "k": k, "x_sliced": sliced}


def config_name(config) -> str:
    kw = config.kwargs
    return f"m{kw['BLOCK_M']}-c{kw['BLOCK_C']}-w{config.num_warps}-s{config.num_stages}"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected).abs().max().item() / (scale or 1.0)


def wrong(error: float) -> bool:
    return not error <= WRONG  # NaN too


def probe(config, dtype: torch.dtype, m: int, c: int, k: int, device: str, seed: int, sliced: bool) -> dict:
    """``backward_sums`` forced to ``config`` against float64, on fresh data;
    ``sliced``: ``x`` is channels 3 to 3 + c of c + 5, as in the test (a row
    stride of c + 5 and a data pointer off 16-byte alignment: Triton compiles
    another kernel for it)."""
    g = torch.Generator().manual_seed(seed)
    left, right = (3, 2) if sliced else (0, 0)
    x = (torch.randn(m, left + c + right, generator=g) * 2 + 0.5).to(device=device, dtype=dtype)[:, left:left + c]
    weight = (0.2 * torch.randn(k, c, generator=g)).to(device=device, dtype=dtype)
    grad_out = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    mean, var = x.double().mean(0), x.double().var(0, unbiased=False)
    rstd = (var + 1e-5).rsqrt()
    gamma, beta = 1 + 0.1 * torch.randn(c, generator=g, dtype=torch.float64), 0.1 * torch.randn(c, generator=g,
                                                                                              dtype=torch.float64)
    scale, shift = gamma.to(device) * rstd, beta.to(device) - mean * gamma.to(device) * rstd
    fp32 = [t.float().contiguous() for t in (scale, shift, mean, rstd)]
    launcher = bn_relu_conv._reduce[1]
    launcher.usable = lambda grid, data, meta: [config]  # this instance only; the class's method otherwise
    try:
        dw_part, sums = bn_relu_conv.backward_sums(rows(x), *fp32, weight, rows(grad_out), pool=1)
        torch.cuda.synchronize() if device == "cuda" else None
    finally:
        del launcher.usable
    # float64 reference from the values the kernel sees: z rounded to the data dtype before the dot
    a = x.double() * fp32[0].double() + fp32[1].double()
    z = a.clamp(min=0).to(dtype).double()
    d = grad_out.double()
    grad_a = torch.where(a <= 0, 0.0, d @ weight.double())
    xhat = (x.double() - fp32[2].double()) * fp32[3].double()
    sums_ref = torch.stack([grad_a.sum(0), (grad_a * xhat).sum(0)])
    block_m, splits = config.kwargs["BLOCK_M"], dw_part.shape[0]
    tile = torch.arange(m, device=device) // block_m
    split_errors = []
    for s in range(splits):
        mine = (tile % splits) == s
        split_errors.append(relative_error(dw_part[s], d[mine].T @ z[mine]))
    dw_ref = d.T @ z
    dw = dw_part.sum(0)
    k_blocks = [(lo, min(lo + bn_relu_conv.MAX_BLOCK_K, k)) for lo in range(0, k, bn_relu_conv.MAX_BLOCK_K)]
    return {**case_fields(config, dtype, m, c, k, sliced), "splits": splits,
            "dw_error": relative_error(dw, dw_ref),
            "dw_error_per_k_block": {f"{lo}:{hi}": relative_error(dw[lo:hi], dw_ref[lo:hi]) for lo, hi in k_blocks},
            "worst_split_error": max(split_errors, key=lambda e: math.inf if math.isnan(e) else e),
            "wrong_splits": [s for s, e in enumerate(split_errors) if wrong(e)],
            "sums_error": relative_error(sums, sums_ref)}


def ptxas() -> dict:
    """The assembler Triton resolved (it falls back to its own where ``TRITON_PTXAS_PATH`` fails)."""
    try:
        from triton import knobs
        tool = knobs.nvidia.ptxas
        return {"path": tool.path, "version": tool.version, "TRITON_PTXAS_PATH": os.environ.get("TRITON_PTXAS_PATH")}
    except Exception as exc:  # noqa: BLE001  (older Triton, or none on the CPU)
        return {"unknown": repr(exc)[:200], "TRITON_PTXAS_PATH": os.environ.get("TRITON_PTXAS_PATH")}


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__.split("\n\n")[1])
    out, tiny = Path(argv[0]), "--tiny" in argv[1:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not tiny and device == "cpu":
        sys.exit("no GPU: only --tiny runs here (through the Triton interpreter)")
    configs = [TAKEN_OUT, bn_relu_conv._config(64, 32, 8, 1), bn_relu_conv.REDUCE_CONFIGS[1][0]]
    if tiny:
        cases = [(torch.float32, 133, 39, 136, True)]
    else:  # the H200's failing test first, then one thing changed at a time; compiles take most of the time
        cases = [(torch.float16, 133, 39, 136, True), (torch.float16, 133, 39, 136, False),
                 (torch.bfloat16, 133, 39, 136, True), (torch.float16, 133, 39, 120, True),
                 (torch.float16, 133, 39, 256, True), (torch.float16, 4096, 264, 136, False),
                 (torch.bfloat16, 4096, 264, 256, False)]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "ptxas": ptxas(), "wrong_above": WRONG, "rows": []}
    listed_wrong = 0
    for dtype, m, c, k, sliced in cases:
        for config in configs:
            started = time.perf_counter()
            try:
                row = probe(config, dtype, m, c, k, device, seed=m + k, sliced=sliced)
            except Exception as exc:  # noqa: BLE001  (recorded; the other cases run)
                row = {**case_fields(config, dtype, m, c, k, sliced), "error": f"{type(exc).__name__}: {exc}"[:500]}
            row["seconds"] = round(time.perf_counter() - started, 2)
            result["rows"].append(row)
            bad = "error" in row or wrong(row["dw_error"]) or wrong(row["sums_error"])
            listed_wrong += bad and row["listed"]
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(result['rows'])} cases; {listed_wrong} wrong among the listed configurations -> {out}")
    return 1 if listed_wrong else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
