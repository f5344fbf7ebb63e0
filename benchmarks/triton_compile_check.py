"""Compile every Triton kernel variant for a GPU architecture without a GPU.

    python benchmarks/triton_compile_check.py [--arch 90] [--max-shared 232448] [--all-configs]
                                              [--only NAME-PART] [--dtypes fp32 fp16 bf16] [--channels 256]

Uses Triton's bundled ``ptxas``; prints each variant's registers, spill stack
and shared memory (from ``cuobjdump``) next to the launcher's shared-memory
estimate, and the bytes per global load and store instruction (counted in
the PTX; ``cp.async`` copies count as loads), and exits non-zero if a variant
fails to compile, needs more shared memory than its estimate (which must be
an upper bound: the launchers prune candidates with it), or more than
``--max-shared`` (default: the H100/H200's 227 KiB per block).  Candidates
whose estimate exceeds ``--max-shared`` are never launched on such a device
and are skipped unless ``--all-configs``.  Must run without ``TRITON_INTERPRET``.

The arguments are specialised as a launch specialises them (aligned
pointers, integers divisible by 16 marked so, integers equal to 1 made
constants) for DenseNet-121-like shapes: a dense layer reading ``--channels``
channels with that row stride, ``K = 128``, and a transition of 28x28 images
with ``--channels`` channels.  ``--channels 124`` (growth rate 12) shows the
loads of a row stride and channel count that 16 does not divide.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast.backends.triton_kernels import bn_fold  # noqa: E402
from densenet_fast.backends.triton_kernels import bn_relu as bn_relu_op  # noqa: E402
from densenet_fast.backends.triton_kernels import bn_relu_conv  # noqa: E402
from densenet_fast.backends.triton_kernels import channel_stats as stats_op  # noqa: E402
from densenet_fast.backends.triton_kernels.common import vector_alignment  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PRECISIONS = {"fp32": ("ieee", "tf32"), "fp16": ("ieee",), "bf16": ("ieee",)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compile_variant(fn, args: dict, config: triton.Config, arch: int):
    """Compile ``fn`` with ``args`` (pointer dtype strings like ``"*bf16"``,
    ints, constexpr values) and ``config``'s meta-parameters, specialised as
    a launch would: pointers 16-byte aligned, ints divisible by 16 marked,
    ints equal to 1 constants."""
    values = {**args, **config.kwargs}
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        value = values[name]
        if param.is_constexpr or value == 1:
            signature[name], constexprs[name] = "constexpr", value
            continue
        signature[name] = value if isinstance(value, str) else "i32"
        if value.startswith("*") if isinstance(value, str) else value % 16 == 0:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
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


def access_widths(ptx: str) -> str:
    """Bytes per global load (``ld.global``, ``cp.async``) and store instruction, with counts."""
    widths = {"loads": Counter(), "stores": Counter()}
    for op, modifiers in re.findall(r"\b(ld|st)\.global((?:\.[\w:]+)+)", ptx):
        vector = re.search(r"\.v(\d)\b", modifiers)
        bits = re.search(r"\.[bfsu](\d+)\b", modifiers)
        widths["loads" if op == "ld" else "stores"][(int(vector[1]) if vector else 1) * int(bits[1]) // 8] += 1
    for size in re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], (0x[0-9a-f]+|\d+)", ptx):
        widths["loads"][int(size, 0)] += 1
    return "; ".join(f"{kind} " + " ".join(f"{size}B x{count}" for size, count in sorted(counts.items(), reverse=True))
                     for kind, counts in widths.items())


def with_alignment(sizes: dict, element_size: int) -> dict:
    """``sizes`` and the ``ALIGN`` of all their channel counts and row strides: what
    the launchers give them (the backward's first pass does not count ``grad_x``'s
    strides, equal to ``x``'s in :func:`shapes`)."""
    aligned = [value for name, value in sizes.items() if name in ("C", "K", "swk", "sx", "so") or
               name[:2] in ("sx", "so", "sd", "sg")]
    return dict(sizes, ALIGN=vector_alignment(element_size, *aligned))


def shapes(channels: int) -> dict[int, dict]:
    """The integer arguments per ``POOL``: a dense layer (row views, ``K = 128``)
    and a transition (28x28 images), ``channels`` input channels each."""
    k = 128
    dense = dict(num_cells=50176, C=channels, K=k, cells_key=65536, c_key=triton.next_power_of_2(channels),
                 H=1, W=1, cells_h=1, cells_w=1, out_h=1, out_w=1, num_splits=132, M=50176, swk=channels, swc=1,
                 sxn=channels, sxh=0, sxw=0, son=k, soh=0, sow=0, sdn=k, sdh=0, sdw=0, sgn=channels, sgh=0, sgw=0,
                 sx=channels)
    image, cells = dict(n=28 * 28 * channels, h=28 * channels, w=channels), dict(n=14 * 14 * k, h=14 * k, w=k)
    transition = dict(dense, num_cells=256 * 14 * 14, cells_key=65536, H=28, W=28, cells_h=14, cells_w=14,
                      out_h=14, out_w=14, **{f"s{t}{d}": stride for t, strides in (("x", image), ("g", image),
                                                                                     ("o", cells), ("d", cells))
                                             for d, stride in strides.items()})
    return {1: dense, 2: transition}


def variants(dtype: str, precision: str, channels: int):
    """``(name, launcher, args)`` for every kernel variant the backend launches."""
    data = "*" + dtype
    fp32 = "*fp32"
    sizes = shapes(channels)
    element_size = DTYPES[dtype].itemsize
    common = dict(x_ptr=data, scale_ptr=fp32, shift_ptr=fp32, mean_ptr=fp32, rstd_ptr=fp32, w_ptr=data,
                  dout_ptr=data, out_ptr=data, gx_ptr=data, part_mean_ptr=fp32, part_m2_ptr=fp32,
                  stats_mean_ptr=fp32, stats_var_ptr=fp32, var_ptr=fp32, dw_part_ptr=fp32,
                  dw_ptr=fp32, sum_part_ptr=fp32, sums_ptr=fp32, counter_ptr="*i32", grad_means_ptr=fp32,
                  DOT_PRECISION=precision, BLOCK_K=128, BLOCK_C=64, BLOCK_S=bn_relu_conv.SPLITS_BLOCK,
                  SLAB=bn_relu_conv.DW_SLAB, STATS_GROUP=stats_op.STATS_GROUP, MERGE_BLOCK=stats_op.MERGE_BLOCK)
    for pool in (1, 2):
        shape = dict(common, **with_alignment(sizes[pool], element_size), SPATIAL=pool == 2, POOL=pool)
        for with_stats in ((True, False) if pool == 1 else (False,)):
            yield (f"forward pool={pool} stats={with_stats}", bn_relu_conv._forward[pool],
                   dict(shape, WITH_STATS=with_stats))
        # (HAS_GEMM, ONE_K_BLOCK): dense layers K = 128 (one block), transitions K up to 128 or beyond; exact
        # fp32 always takes the K loop (bn_relu_conv.one_k_block)
        for has_gemm, one_k_block in ((True, True), (True, False), (False, True)) if pool == 1 else \
                ((True, True), (True, False)):
            if has_gemm and one_k_block and dtype == "fp32" and precision == "ieee":
                continue
            gemm = dict(shape, HAS_GEMM=has_gemm, ONE_K_BLOCK=one_k_block, BLOCK_K=128) if has_gemm else \
                with_alignment(dict(shape, HAS_GEMM=False, ONE_K_BLOCK=True, BLOCK_K=16, K=shape["C"],
                                    sdn=shape["sxn"], swk=0), element_size)  # dZ in place of dOut
            yield f"reduce pool={pool} gemm={has_gemm} one_k={one_k_block}", bn_relu_conv._reduce[pool], gemm
            for batch_stats in (True, False):
                yield (f"dx pool={pool} gemm={has_gemm} one_k={one_k_block} batch_stats={batch_stats}",
                       bn_relu_conv._dx[pool], dict(gemm, BATCH_STATS=batch_stats, ACCUMULATE=pool == 1 and has_gemm))
    yield "tile stats", stats_op._tile_stats, with_alignment(dict(common, M=50176, C=channels, sx=channels),
                                                               element_size)
    yield "bn_relu", bn_relu_op._bn_relu, with_alignment(dict(common, M=50176, C=128, sx=128, so=128),
                                                         element_size)  # the bottleneck, 4k wide
    for update in (True, False):
        yield (f"fold update={update}", bn_fold._fold, dict(
            common, C=channels, var_ptr=fp32, weight_ptr=fp32, bias_ptr=fp32, coeffs_ptr=fp32, running_mean_ptr=fp32,
            running_var_ptr=fp32, batches_ptr="*i64", eps="fp32", momentum="fp32", unbias="fp32", HAS_WEIGHT=True,
            HAS_BIAS=True, UPDATE=update, CUMULATIVE=False, BLOCK_C=bn_fold.BLOCK_C))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--all-configs", action="store_true", help="compile the pruned candidates too")
    parser.add_argument("--max-shared", type=int, default=232448, help="bytes of shared memory per block")
    parser.add_argument("--only", default="", help="only the variants whose name contains this")
    parser.add_argument("--dtypes", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--channels", type=int, default=256, help="input channels (and row stride) of the kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this compiles real GPU code")
    failures = 0
    for dtype in args.dtypes:
        element_size = DTYPES[dtype].itemsize
        for precision in PRECISIONS[dtype]:
            for name, launcher, kernel_args in variants(dtype, precision, args.channels):
                if args.only not in name:
                    continue
                for config in launcher.candidates_for(DTYPES[dtype], kernel_args):
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
                          f"estimate {estimate if estimate is not None else '-'} B{' (pruned)' if pruned else ''}; "
                          f"{access_widths(kernel.asm['ptx'])}", flush=True)
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
