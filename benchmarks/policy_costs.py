"""The measured cost of recomputing, for the planner's step-time ratios.

For each depth, one fresh process times a DenseNet-BC training step with
``keep`` and with ``recompute`` round-robin on the same inputs and weights,
then a second process in the opposite order (the position in the round-robin
can matter on a busy machine).  From the medians of both:
``ratio = t_recompute / t_keep`` and the cost of a recomputed FLOP relative to
an average FLOP of the step, ``a = (ratio - 1) * F / R``
(:func:`densenet_fast.planner.step_time_ratio`).  The median ``a`` over the
depths is what ``densenet_fast/policy_costs.json`` holds for the device.

    python benchmarks/policy_costs.py --depths 40 76 --batch 16 --repeats 5 \\
        --out benchmarks/results/policy_costs_cpu.json
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

from densenet_fast import planner
from densenet_fast.bench import common
from densenet_fast.bench.impls import ModelSpec
from densenet_fast.memory import Architecture, Setup


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[40, 76])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--growth-rate", type=int, default=12)
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/policy_costs_cpu.json"))
    args = parser.parse_args(argv)
    env = common.environment(args.device, common.settings_of(args))
    keep, recompute = f"fast-{args.backend}-keep", f"fast-{args.backend}-recompute"
    rows = []
    for depth in args.depths:
        medians = {keep: [], recompute: []}
        for order in ([keep, recompute], [recompute, keep]):
            spec = {"mode": "time", "impls": order, "model": ModelSpec("densenet_bc", depth, args.growth_rate).to_dict(),
                    "batch": args.batch, "image_size": args.image_size, "device": args.device, "dtype": "float32",
                    "optimizer": "sgd", "warmup": 1, "repeats": args.repeats}
            result = common.run_worker(spec, timeout_s=3600)
            for impl in order:
                medians[impl].append(result["impls"][impl]["seconds"]["median"])
        arch = Architecture.named("densenet_bc", depth, args.growth_rate)
        setup = Setup(args.batch, args.image_size, torch.float32, None, args.device, args.backend)
        ratio = statistics.mean(medians[recompute]) / statistics.mean(medians[keep])
        flops = planner.training_flops(arch, setup)
        recomputed = planner.recompute_flops(arch, setup, ("recompute",) * 3)
        rows.append({"depth": depth, "keep_s_by_order": medians[keep], "recompute_s_by_order": medians[recompute],
                     "recompute_over_keep": ratio, "recompute_flops_fraction": recomputed / flops,
                     "recompute_cost_per_flop": (ratio - 1) * flops / recomputed})
        print(rows[-1], flush=True)
    result = {"benchmark": "policy_costs", "environment": common.finish_environment(env), "rows": rows,
              "recompute_cost_per_flop_median": statistics.median(r["recompute_cost_per_flop"] for r in rows)}
    common.write_json(result, args.out)
    print(f"recompute cost per FLOP (median over depths): {result['recompute_cost_per_flop_median']:.3f}; "
          f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
