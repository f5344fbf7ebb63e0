"""``bench models``: one model, every implementation side by side.

Training step and inference: images/s (all implementations timed round-robin
in one process on the same inputs and weights), peak memory (a fresh process
per implementation and mode), and the largest training batch under
``--budget-gib`` (peak memory at ``--batch`` and ``--batch // 2`` fitted
linearly in the batch, then that batch and the next verified in fresh
processes stopped above the budget, bisecting where the fit was too
optimistic).

GPU sizes: ``--device cuda --model densenet121 --batch 256 --image-size 224
--autocast bfloat16 --channels-last --compile``.

MONAI's DenseNets on volumes (:mod:`.monai_impls`): ``--model monai-densenet121
--image-size 64x128x128 --batch 2 --train-only`` compares MONAI eager, MONAI
with a checkpoint per dense layer, ``torch.compile(MONAI)`` (``--compile``)
and densenet_fast.monai.

``--quick`` (for a time-limited run, such as benchmarks/gpu_check.sh): training
only, one fresh process per implementation, in the order given, that measures
the peak memory of ``--warmup + --repeats`` steps and times the last
``--repeats``; the JSON is rewritten after each implementation, and
torchvision's implementations are skipped (and say so) where torchvision is
not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Optional

from .. import planner
from . import common
from .common import fit
from . import monai_impls
from .harness import (MMAP_THRESHOLD, Runner, add_common_arguments, check_budget_steps, check_impls, image_size,
                      model_budget, resolve_impls)
from .impls import TORCHVISION_IMPLS, ModelSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="densenet_bc-40", help="densenet121 (161, 169, 201, 264) or densenet_bc-<depth>; "
                        "MONAI's: monai-densenet121 (169, 201, 264) with a volume --image-size")
    parser.add_argument("--growth-rate", type=common.at_least(1), default=None,
                        help="k of densenet_bc-<depth> (default 12)")
    parser.add_argument("--batch", type=common.at_least(1), default=16)
    parser.add_argument("--image-size", type=image_size, default=32,
                        help="side of square images, or DxHxW for volumes (MONAI models)")
    parser.add_argument("--train-only", action="store_true",
                        help="the training step at --batch only (no inference, no half batch, no largest batch)")
    parser.add_argument("--impls", nargs="+", default=None, help="default: every implementation that runs here")
    parser.add_argument("--budget-gib", type=common.non_negative_number, default=0.5,
                        help="budget of the largest-batch search (0: skip)")
    parser.add_argument("--quick", action="store_true",
                        help="training only: one process per implementation times --warmup + --repeats steps and "
                             "their peak memory (no --steps)")
    parser.add_argument("--max-minutes", type=common.positive_number, default=1e9, help="no worker runs past this")
    add_common_arguments(parser)
    parser.set_defaults(steps=None)  # 2, except under --quick, which takes none (run)


MAX_BATCH_PROBES = 12  # fresh processes per largest-batch search, the first verification included


def largest_batch(runner: Runner, impl: str, spec: ModelSpec, measured: dict, args) -> dict:
    """Largest training batch whose step peak fits the budget: a linear fit over
    the measured batches predicts it; fresh processes then measure from there,
    in steps of 1, 2, 4, ... batches up (or down, where the prediction does not
    fit) and then by bisection, until a batch that fits and the next, over the
    budget, are both measured (``boundary_pinned``), after
    :data:`MAX_BATCH_PROBES` processes, or at a process that neither finished
    nor exceeded the budget (a timeout, an error)."""
    budget = args.budget_gib * common.GIB
    ok = {b: r["peak_bytes"] for b, r in measured.items() if r.get("status") == "ok"}
    line = fit(list(ok), list(ok.values()), 1)
    if line is None or line["coefficients"][1] <= 0:
        return {"largest_batch": None, "why": "need two measured batches"}
    intercept, per_image = line["coefficients"]
    predicted = int((budget - intercept) // per_image)
    if predicted < 1:
        return {"largest_batch": None, "predicted": predicted, "why": "not even one image fits"}
    probes = []

    def fits(batch: int) -> Optional[bool]:
        """Whether ``batch``'s step peak fits, in a fresh process; ``None`` where it
        neither finished nor exceeded the budget (a timeout, an error)."""
        check = runner.memory(impl, spec, batch, budget, runner.seconds_left(), memory_budget=model_budget(impl, args))
        probes.append({"batch": batch, "status": check["status"], "peak_bytes": check.get("peak_bytes")})
        if check["status"] == "ok":
            return check["peak_bytes"] <= budget
        return False if check["status"] in ("over_budget", "oom") else None

    fitting = max((b for b, peak in ok.items() if peak <= budget), default=0)  # the largest batch known to fit
    exceeding = min((b for b, peak in ok.items() if peak > budget), default=None)  # the smallest known not to

    def below_exceeding(batch: int) -> int:
        return batch if exceeding is None else min(batch, exceeding - 1)

    batch = below_exceeding(max(predicted, fitting + 1))
    step, outcomes = 1, set()  # from the prediction, steps of 1, 2, 4, ... the way it was off, then bisection
    while len(probes) < MAX_BATCH_PROBES and (exceeding is None or exceeding - fitting > 1):
        verdict = fits(batch)
        if verdict is None:
            break
        if verdict:
            fitting = batch
        else:
            exceeding = batch
        outcomes.add(verdict)
        if outcomes == {True}:
            batch = below_exceeding(fitting + step)
        elif outcomes == {False} and exceeding - step > fitting:
            batch = exceeding - step
        else:
            batch = (fitting + exceeding) // 2
        step *= 2
    return {"largest_batch": fitting or None, "predicted": predicted, "boundary_pinned": exceeding == fitting + 1,
            "probes": probes, "per_image_MiB": per_image / common.MIB, "intercept_MiB": intercept / common.MIB}


def run(args: argparse.Namespace) -> dict:
    if args.quick and args.steps is not None:
        raise ValueError("--quick runs --warmup + --repeats steps in each worker (it times them); --steps is for "
                         "the other modes")
    args.steps = 2 if args.steps is None else args.steps
    if not args.train_only and not args.quick:  # (neither searches the largest batch; --quick sets the steps)
        check_budget_steps(args)
    monai = args.model.startswith(monai_impls.PREFIX)
    if isinstance(args.image_size, list) and not monai:
        raise ValueError(f"--image-size {args.image_size}: several sides are for the MONAI models (monai-densenet121)")
    if args.growth_rate is not None and not args.model.startswith("densenet_bc-"):
        raise ValueError(f"--growth-rate is for densenet_bc-<depth>; {args.model} has its own")
    spec = monai_impls.parse(args.model, args.image_size) if monai else \
        ModelSpec.parse(args.model, args.growth_rate or 12)
    impls = (args.impls or monai_impls.default_impls(args.device, args.compile)) if monai else resolve_impls(args)
    check_impls(impls, monai, args)
    modes = ("train",) if args.train_only else ("train", "infer")
    runner = Runner(args)
    settings = common.settings_of(args)
    settings.update({"impls": impls, "mmap_threshold_in_memory_workers": None if args.malloc_default else MMAP_THRESHOLD})
    env = common.environment(args.device, settings)
    if args.quick:
        return run_quick(args, spec, impls, runner, env)
    size = size_text(args.image_size)
    name = f"{args.model}_{size}" if monai else args.model
    out = args.out or common.new_result_path(f"models_{args.device.split(':')[0]}_{name}_b{args.batch}.json")
    timings = {mode: time_impls(runner, impls, spec, args, train=mode == "train") for mode in modes}
    rows, details = [], {}
    safety = 0.7 * common.available_memory_bytes()
    for impl in common.progress(impls, desc="memory", enabled=not args.no_progress):
        batches = {args.batch} if args.train_only else {args.batch, max(1, args.batch // 2)}
        train = {b: runner.memory(impl, spec, b, safety, runner.seconds_left(), memory_budget=model_budget(impl, args))
                 for b in batches}
        infer = None if args.train_only else runner.memory(impl, spec, args.batch, safety, runner.seconds_left(),
                                                           train=False, memory_budget=model_budget(impl, args))
        search = largest_batch(runner, impl, spec, train, args) if args.budget_gib > 0 and not args.train_only else {}
        details[impl] = {"train_memory": {str(b): r for b, r in train.items()}, "infer_memory": infer,
                         "largest_batch": search,
                         "timing": {mode: t.get("impls", {}).get(impl, t) for mode, t in timings.items()}}
        row = {"impl": impl}
        for mode in modes:
            timing = details[impl]["timing"][mode]
            if timing.get("status") == "ok":
                row[f"{mode}_step_s"] = timing["seconds"]["median"]
                row[f"{mode}_images_per_s"] = args.batch / timing["seconds"]["median"]
        for mode, result in (("train", train[args.batch]), ("infer", infer)):
            if result is None:
                continue
            row[f"{mode}_peak_MiB"] = result["peak_bytes"] / common.MIB if result["status"] == "ok" else None
        row["largest_batch"] = search.get("largest_batch")
        row["largest_batch_pinned"] = search.get("boundary_pinned")
        rows.append(row)
        common.write_json({"benchmark": "models", "partial": True, "model": spec.to_dict(), "environment": env,
                           "rows": rows, "details": details}, out)  # a run stopped early keeps what it measured
    result = {"benchmark": "models", "model": spec.to_dict(), "model_label": spec.label(),
              "environment": common.finish_environment(env), "rows": rows, "details": details}
    columns = ["impl", "train_step_s", "train_images_per_s", "infer_images_per_s", "train_peak_MiB",
               "infer_peak_MiB", "largest_batch", "largest_batch_pinned"]
    if monai:
        reference = next((r for r in rows if r["impl"] == "monai-eager"), {})
        for row in rows:  # against MONAI eager: the targets are at most 0.3x its memory at no more time
            for key in ("train_step_s", "train_peak_MiB"):
                if row.get(key) is not None and reference.get(key):
                    row[f"{key}_vs_monai"] = row[key] / reference[key]
        columns += ["train_step_s_vs_monai", "train_peak_MiB_vs_monai"]
    print(f"{spec.label()}, batch {args.batch}, {size}, {env['device_name']}")
    print(common.format_table(rows, columns))
    common.save_result(result, out, None if args.no_plot or monai else "plot_models")  # plots: square images
    return result


QUICK_COLUMNS = ["impl", "status", "train_step_s", "train_images_per_s", "train_peak_MiB"]


def time_impls(runner: Runner, impls: list[str], spec: ModelSpec, args: argparse.Namespace, train: bool) -> dict:
    """Step times of ``impls`` at ``--batch``: one worker for those with a fixed
    policy, one for those that plan under the budget (``fast-<backend>-auto``),
    as ``{"impls": {impl: result}}`` (a failed worker's result for each of its own)."""
    timed: dict = {}
    for planned in (False, True):
        group = [impl for impl in impls if (model_budget(impl, args) is not None) == planned]
        if group:
            result = runner.time(group, spec, args.batch, train=train, memory_budget=model_budget(group[0], args))
            timed.update(result.get("impls", {impl: result for impl in group}))
    return {"impls": timed}


def size_text(image_size) -> str:
    """``32x32`` for ``--image-size 32``, ``16x16x16`` for volumes' ``16x16x16``."""
    return planner.size_text(image_size if isinstance(image_size, list) else [image_size] * 2)


def run_quick(args: argparse.Namespace, spec: ModelSpec, impls: list[str], runner: Runner, env: dict) -> dict:
    """``--quick``: one memory worker per implementation that also times its steps."""
    args.steps = args.warmup + args.repeats  # the memory workers time every step; the first --warmup do not count
    out = args.out or common.new_result_path(
        f"models_{args.device.split(':')[0]}_{args.model}_b{args.batch}_quick.json")
    result = {"benchmark": "models", "quick": True, "model": spec.to_dict(), "model_label": spec.label(),
              "environment": env, "rows": [], "details": {}}
    print(f"{spec.label()}, batch {args.batch}, {size_text(args.image_size)}, {env['device_name']}")
    # a row per implementation as it ends, under one header: the names' and the longest status's widths
    widths = [max(map(len, impls)), len("over_budget")] + [0] * (len(QUICK_COLUMNS) - 2)
    print(common.format_table([], QUICK_COLUMNS, min_widths=widths), flush=True)
    for impl in impls:
        if impl in TORCHVISION_IMPLS and importlib.util.find_spec("torchvision") is None:
            measured = {"status": "skipped", "why": "torchvision is not installed"}
            common.outcomes["failed"] += 1  # (a worker's outcome is counted by run_worker)
        elif runner.seconds_left() <= 0:
            measured = {"status": "timeout", "why": "--max-minutes spent before it started"}
            common.outcomes["failed"] += 1
        else:
            measured = runner.memory(impl, spec, args.batch, 0.7 * common.available_memory_bytes(),
                                     runner.seconds_left(), memory_budget=model_budget(impl, args))
        row = {"impl": impl, "status": measured["status"]}
        if measured["status"] == "ok":
            median = common.summarize(measured["step_seconds"][args.warmup:])["median"]
            row.update(train_step_s=median, train_images_per_s=args.batch / median,
                       train_peak_MiB=measured["peak_bytes"] / common.MIB)
        result["rows"].append(row)
        result["details"][impl] = measured
        print(common.format_table([row], QUICK_COLUMNS, header=False, min_widths=widths), flush=True)
        common.write_json(result, out)  # after each implementation: a run stopped by a time limit keeps the others
    common.finish_environment(env)
    common.save_result(result, out, None)
    return result


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
