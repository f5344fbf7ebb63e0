"""Compile every Triton kernel variant for a GPU architecture without a GPU.

    python benchmarks/triton_compile_check.py [--arch 90] [--max-shared 232448] [--all-configs]
                                              [--only NAME-PART] [--dtypes fp32 fp16 bf16]

Uses Triton's bundled ``ptxas``; prints each variant's registers, spill stack
and shared memory (from ``cuobjdump``) next to the launcher's shared-memory
estimate, and exits non-zero if a variant fails to compile, needs more shared
memory than its estimate (which must be an upper bound: the launchers prune
candidates with it), or more than ``--max-shared`` (default: the H100/H200's
227 KiB per block).  Candidates whose estimate exceeds ``--max-shared`` are
never launched on such a device and are skipped unless ``--all-configs``.
Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast.ops import bn_fold  # noqa: E402
from densenet_fast.ops import bn_relu as bn_relu_op  # noqa: E402
from densenet_fast.ops import bn_relu_conv  # noqa: E402
from densenet_fast.ops import channel_stats as stats_op  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PRECISIONS = {"fp32": ("ieee", "tf32"), "fp16": ("ieee",), "bf16": ("ieee",)}


def compile_variant(fn, args: dict, config: triton.Config, arch: int):
    """Compile ``fn`` with ``args`` (pointer dtype strings like ``"*bf16"``,
    ints, constexpr values) and ``config``'s meta-parameters."""
    values = {**args, **config.kwargs}
    signature, constexprs = {}, {}
    for param, name in zip(fn.params, fn.arg_names):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = value if isinstance(value, str) else "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resource_usage(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"registers {match[1]}, spill stack {match[2]} B" if match else out.strip()[-200:]


def variants(dtype: str, precision: str):
    """``(name, launcher, args)`` for every kernel variant the backend launches."""
    data = "*" + dtype
    fp32 = "*fp32"
    sizes = dict.fromkeys(["num_cells", "C", "K", "cells_key", "c_key", "H", "W", "cells_h", "cells_w", "out_h",
                           "out_w", "num_splits", "sxn", "sxh", "sxw", "swk", "swc", "son", "soh", "sow", "sdn",
                           "sdh", "sdw", "sgn", "sgh", "sgw", "M", "sx", "so", "T"], 17)
    common = dict(sizes, x_ptr=data, scale_ptr=fp32, shift_ptr=fp32, mean_ptr=fp32, rstd_ptr=fp32, w_ptr=data,
                  dout_ptr=data, out_ptr=data, gx_ptr=data, part_mean_ptr=fp32, part_m2_ptr=fp32,
                  stats_mean_ptr=fp32, stats_var_ptr=fp32, var_ptr=fp32, dw_part_ptr=fp32,
                  dw_ptr=fp32, sum_part_ptr=fp32, sums_ptr=fp32, counter_ptr="*i32", grad_means_ptr=fp32,
                  DOT_PRECISION=precision, BLOCK_K=128, BLOCK_C=64, BLOCK_S=bn_relu_conv.SPLITS_BLOCK,
                  SLAB=bn_relu_conv.DW_SLAB, STATS_GROUP=stats_op.STATS_GROUP, MERGE_BLOCK=stats_op.MERGE_BLOCK)
    for pool in (1, 2):
        shape = dict(common, SPATIAL=pool == 2, POOL=pool)
        for with_stats in ((True, False) if pool == 1 else (False,)):
            yield (f"forward pool={pool} stats={with_stats}", bn_relu_conv._forward[pool],
                   dict(shape, WITH_STATS=with_stats))
        # (HAS_GEMM, ONE_K_BLOCK): dense layers K = 128 (one block; the K loop for exact fp32, see
        # bn_relu_conv.one_k_block), transitions K up to 128 or beyond
        for has_gemm, one_k_block in ((True, True), (True, False), (False, True)) if pool == 1 else \
                ((True, True), (True, False)):
            gemm = dict(shape, HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k_block, BLOCK_K=128 if has_gemm else 16)
            yield f"reduce pool={pool} gemm={has_gemm} one_k={one_k_block}", bn_relu_conv._reduce[pool], gemm
            for batch_stats in (True, False):
                yield (f"dx pool={pool} gemm={has_gemm} one_k={one_k_block} batch_stats={batch_stats}",
                       bn_relu_conv._dx[pool], dict(gemm, BATCH_STATS=batch_stats, ACCUMULATE=pool == 1 and has_gemm))
    yield "tile stats", stats_op._tile_stats, common
    yield "bn_relu", bn_relu_op._bn_relu, common
    for update in (True, False):
        yield (f"fold update={update}", bn_fold._fold, dict(
            common, var_ptr=fp32, weight_ptr=fp32, bias_ptr=fp32, coeffs_ptr=fp32, running_mean_ptr=fp32,
            running_var_ptr=fp32, batches_ptr="*i64", eps="fp32", momentum="fp32", unbias="fp32", HAS_WEIGHT=True,
            HAS_BIAS=True, UPDATE=update, CUMULATIVE=False, BLOCK_C=bn_fold.BLOCK_C))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--all-configs", action="store_true", help="compile the pruned candidates too")
    parser.add_argument("--max-shared", type=int, default=232448, help="bytes of shared memory per block")
    parser.add_argument("--only", default="", help="only the variants whose name contains this")
    parser.add_argument("--dtypes", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles real GPU code")
    failures = 0
    for dtype in args.dtypes:
        element_size = 4 if dtype == "fp32" else 2
        for precision in PRECISIONS[dtype]:
            for name, launcher, kernel_args in variants(dtype, precision):
                if args.only not in name:
                    continue
                for config in launcher.candidates:
                    label = f"{dtype:4} {precision:4} {name:42} {config.kwargs} warps={config.num_warps} " \
                            f"stages={config.num_stages}"
                    meta = {**kernel_args, **config.kwargs}
                    estimate = (launcher.shared_memory(meta, config.num_stages, element_size)
                                if launcher.shared_memory else None)
                    pruned = estimate is not None and estimate > args.max_shared
                    if pruned and not args.all_configs:
                        print(f"skip {label}: estimate {estimate} B > {args.max_shared} B, never launched", flush=True)
                        continue
                    try:
                        kernel = compile_variant(launcher.fn, kernel_args, config, args.arch)
                    except Exception as exc:  # noqa: BLE001 - report every failing variant
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[-600:]}", flush=True)
                        continue
                    shared = kernel.metadata.shared
                    bad = (estimate is not None and shared > estimate) or (shared > args.max_shared and not pruned)
                    failures += bad
                    print(f"{'FAIL' if bad else 'ok  '} {label}: {resource_usage(kernel)}, shared {shared} B, "
                          f"estimate {estimate if estimate is not None else '-'} B{' (pruned)' if pruned else ''}",
                          flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
