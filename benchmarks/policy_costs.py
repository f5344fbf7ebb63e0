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

``--policies recompute auto --budget-gib B`` times ``recompute="auto"`` (the
model built with budget ``B``, which plans itself) against the fixed
policies instead, the same way, beside the planner's predicted ratio: whether
``auto`` is no slower than the fixed policy at the same depth.
"""

import argparse
import statistics
import sys

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
    parser.add_argument("--policies", nargs="+", default=["keep", "recompute"], choices=["keep", "recompute", "auto"])
    parser.add_argument("--budget-gib", type=float, default=None, help="the budget auto plans under")
    parser.add_argument("--out", type=common.output_file, default=None,
                        help="default: benchmarks/results/policy_costs_cpu.json, or -2, -3... where taken")
    args = parser.parse_args(argv)
    if ("auto" in args.policies) != (args.budget_gib is not None) or len(set(args.policies)) < 2:
        parser.error("two or more policies; auto with --budget-gib, and --budget-gib only with auto")
    budget = args.budget_gib * common.GIB if args.budget_gib else None
    env = common.environment(args.device, common.settings_of(args))
    impls = {policy: f"fast-{args.backend}-{policy}" for policy in args.policies}
    rows = []
    for depth in args.depths:
        medians = {policy: [] for policy in args.policies}
        for order in (args.policies, args.policies[::-1]):
            spec = {"mode": "time", "impls": [impls[p] for p in order],
                    "model": ModelSpec("densenet_bc", depth, args.growth_rate).to_dict(),
                    "batch": args.batch, "image_size": args.image_size, "device": args.device, "dtype": "float32",
                    "optimizer": "sgd", "warmup": 1, "repeats": args.repeats, "memory_budget": budget}
            result = common.run_worker(spec, timeout_s=3 * 3600)
            for policy in order:
                medians[policy].append(result["impls"][impls[policy]]["seconds"]["median"])
        rows.append(cost_row(depth, medians, args, budget))
        print(rows[-1], flush=True)
    result = {"benchmark": "policy_costs", "environment": common.finish_environment(env), "rows": rows}
    costs = [r["recompute_cost_per_flop"] for r in rows if "recompute_cost_per_flop" in r]
    if costs:
        result["recompute_cost_per_flop_median"] = statistics.median(costs)
        print(f"recompute cost per FLOP (median over depths): {result['recompute_cost_per_flop_median']:.3f}")
    out = args.out or common.new_result_path("policy_costs_cpu.json")
    common.write_json(result, out)
    print(f"wrote {out}")
    return result


def cost_row(depth: int, medians: dict, args, budget) -> dict:
    """One depth's medians (per policy, one per order) and what they give: the
    cost of a recomputed FLOP (keep and recompute timed), auto's time over each
    fixed policy's beside the planner's prediction (auto timed)."""
    arch = Architecture.named("densenet_bc", depth, args.growth_rate)
    setup = Setup(args.batch, args.image_size, torch.float32, None, args.device, args.backend)
    seconds = {policy: statistics.mean(values) for policy, values in medians.items()}
    row = {"depth": depth, **{f"{policy}_s_by_order": values for policy, values in medians.items()}}
    flops = planner.training_flops(arch, setup)
    if "keep" in seconds and "recompute" in seconds:
        ratio = seconds["recompute"] / seconds["keep"]
        recomputed = planner.recompute_flops(arch, setup, ("recompute",) * 3)
        row.update(recompute_over_keep=ratio, recompute_flops_fraction=recomputed / flops,
                   recompute_cost_per_flop=(ratio - 1) * flops / recomputed)
    if "auto" in seconds:
        choice = planner.best_fitting(arch, setup, budget, "auto")
        row["auto_policies"] = list(choice.policies) if choice else None
        for policy in seconds.keys() - {"auto"}:
            row[f"auto_over_{policy}"] = seconds["auto"] / seconds[policy]
            if choice:
                row[f"auto_over_{policy}_predicted"] = (planner.step_time_ratio(arch, setup, choice.policies)[0]
                                                         / planner.step_time_ratio(arch, setup, (policy,) * 3)[0])
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
