"""``bench depth``: peak memory and step time of one training step versus depth
for DenseNet-BC, and the deepest depth each implementation trains under a
memory budget.

1. Sweep: for every depth of ``--depths`` and every implementation, one fresh
   process measures the peak memory of a training step (see
   :mod:`.worker`); then one process per depth of ``--time-depths`` times all
   implementations round-robin on the same inputs.
2. Fits: memory versus depth, linear and quadratic (coefficients, R^2), and
   ratios against torchvision eager at ``--reference-depth``.
3. Budget (``--budget-gib`` > 0): a training step fits when its parameters,
   gradients and optimizer state plus its peak above them fit the budget.
   For each implementation, predict the deepest depth (``6n + 4``) that fits:
   densenet_fast's from the planner (:func:`densenet_fast.planner.deepest_depth`,
   before anything runs), torchvision's from the fit of the sweep.  Then verify
   that depth and the next one (6 layers deeper) in fresh processes, each
   stopped once it exceeds the budget.  When the prediction is right that is
   all; when it is not, the search walks on from the failing side (steps
   doubling, then bisection) until the deepest fitting and the shallowest
   exceeding depth are 6 layers apart.  ``fast-<backend>-auto`` is the model
   built with ``recompute="auto"`` and the budget: it plans itself, and where
   no assignment is predicted to fit it refuses before any work.

``--family monai`` measures MONAI's ``DenseNet`` shaped as DenseNet-BC
(:mod:`.monai_impls`), on images or volumes (``--image-size 16x16x16``):
MONAI eager and checkpointed against densenet_fast.monai, whose depths the
planner predicts for MONAI's tree as for torchvision's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Optional

from .. import planner
from ..memory import Architecture, OptimizerSpec, Setup
from . import common, monai_impls
from .common import evaluate, fit
from .harness import (MMAP_THRESHOLD, Runner, add_common_arguments, check_budget_steps, check_impls, image_size,
                      model_budget, resolve_impls)
from .impls import ModelSpec
from .worker import DTYPES

DEFAULT_DEPTHS = (40, 76, 112)


def snap(depth: float) -> int:
    """The nearest valid DenseNet-BC depth ``6n + 4`` (n >= 1)."""
    return 6 * max(1, round((depth - 4) / 6)) + 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=None,
                        help=f"depths (6n+4) of the sweep (default: {' '.join(map(str, DEFAULT_DEPTHS))})")
    parser.add_argument("--time-depths", type=int, nargs="*", default=None,
                        help="depths of --depths at which all implementations are timed round-robin (default: every "
                             "sweep depth)")
    parser.add_argument("--batch", type=common.at_least(1), default=16)
    parser.add_argument("--image-size", type=image_size, default=32,
                        help="side of square images, or DxHxW for volumes (--family monai)")
    parser.add_argument("--family", default="torchvision", choices=["torchvision", "monai"],
                        help="torchvision's DenseNet-BC tree, or MONAI's DenseNet shaped as DenseNet-BC")
    parser.add_argument("--growth-rate", type=common.at_least(1), default=12)
    parser.add_argument("--impls", nargs="+", default=None,
                        help="implementations (default: tv-eager tv-memeff and densenet_fast's automatic backend "
                             "with each recompute policy; --all-backends for every backend)")
    parser.add_argument("--all-backends", action="store_true")
    parser.add_argument("--budget-gib", type=common.non_negative_number, default=2.0,
                        help="memory budget of a training step (parameters, gradients, optimizer state and the "
                             "step's peak above them); 0 skips the search")
    parser.add_argument("--max-depth", type=int, default=10000, help="deepest depth the search considers")
    parser.add_argument("--probe-timeout", type=common.positive_number, default=4 * 3600.0,
                        help="seconds one probe may take")
    parser.add_argument("--max-minutes", type=common.positive_number, default=24 * 60.0,
                        help="wall-clock limit of the whole run")
    parser.add_argument("--reference-depth", type=int, default=None,
                        help="depth of the sweep at which the ratios to the eager and checkpointed references are "
                             "given (default: the deepest)")
    parser.add_argument("--reuse-sweep", type=common.result_file("depth", ("points", "timings")), default=None,
                        help="take the sweep's points, timings and depths from this result file (of a run with the "
                             "same measurement settings) instead of measuring them")
    add_common_arguments(parser)


def bc_spec(args: argparse.Namespace, depth: int) -> ModelSpec:
    if args.family == "monai":
        return monai_impls.bc_spec(depth, args.growth_rate, args.image_size)
    return ModelSpec("densenet_bc", depth, args.growth_rate, 10)


def planned(impl: str) -> bool:
    """Whether the planner predicts ``impl``'s memory (densenet_fast's, either tree)."""
    return impl.startswith("fast-")


def step_setup(args: argparse.Namespace, backend: Optional[str] = None) -> Setup:
    """The training step of the run, as the memory model describes it (with the
    workers' --threads: the C++ kernels' tiles are per thread)."""
    return Setup(args.batch, args.image_size, DTYPES[args.dtype], DTYPES[args.autocast] if args.autocast else None,
                 args.device, backend, OptimizerSpec.parse(args.optimizer), threads=args.threads)


def bc_architecture(args: argparse.Namespace, depth: int) -> Architecture:
    if args.family == "monai":
        return monai_impls.architecture(bc_spec(args, depth))
    return Architecture.named("densenet_bc", depth, args.growth_rate)


def persistent_bytes(args: argparse.Namespace, depth: int) -> int:
    """Parameters, gradients and optimizer state of depth ``depth``: the same
    for every implementation (torchvision's or MONAI's tree is the same network)."""
    optimizer = OptimizerSpec.parse(args.optimizer)
    dtype = DTYPES[args.dtype]
    return bc_architecture(args, depth).parameter_count() * dtype.itemsize * (2 + optimizer.state_tensors())


# -- fits ----------------------------------------------------------------------------------
def growth_fit(depths: list[float], values: list[float]) -> Optional[dict]:
    """The quadratic fit if its curvature is positive, else the linear one."""
    quadratic = fit(depths, values, 2)
    if quadratic is not None and quadratic["coefficients"][2] > 0:
        return quadratic
    return fit(depths, values, 1)


def predicted_deepest(impl: str, points: list[dict], args) -> Optional[int]:
    """The deepest depth predicted to fit the budget: the planner's for densenet_fast,
    the fit of the sweep's measured peaks for the others."""
    budget = args.budget_gib * common.GIB
    if planned(impl):
        _, backend, policy = impl.split("-")
        setup = step_setup(args, None if backend == "auto" else backend)
        return planner.deepest_depth(bc_architecture(args, 10), setup, budget, policy)
    measured = [p for p in points if p["impl"] == impl and p["status"] == "ok"]
    memory_fit = growth_fit([p["depth"] for p in measured], [p["peak_bytes"] for p in measured])
    if memory_fit is None:
        return None
    n = planner.largest_true(lambda n: persistent_bytes(args, 6 * n + 4) + evaluate(memory_fit, 6 * n + 4) <= budget,
                             1, (args.max_depth - 4) // 6)
    return None if n is None else 6 * n + 4


# -- the run -------------------------------------------------------------------------------
def sweep(runner: Runner, impls: list[str], args, checkpoint) -> tuple[list[dict], dict]:
    """Memory of every (depth, implementation), each in a fresh process, and
    the round-robin timings at the timed depths; ``checkpoint(points, timings)``
    is called after each depth."""
    points, timings = [], {}
    safety = 0.7 * common.available_memory_bytes()  # never let a worker exhaust the machine
    time_depths = args.depths if args.time_depths is None else args.time_depths
    jobs = [(d, i) for d in args.depths for i in impls]
    bar = common.progress(jobs, desc="memory vs depth", enabled=not args.no_progress)
    for depth, impl in bar:
        result = runner.memory(impl, bc_spec(args, depth), args.batch, safety, runner.seconds_left(),
                               memory_budget=model_budget(impl, args))
        point = {"impl": impl, "depth": depth, "kind": "sweep", **result, "persistent_bytes": persistent_bytes(args, depth)}
        if result["status"] == "ok":
            point["total_bytes"] = point["persistent_bytes"] + result["peak_bytes"]
        points.append(point)
        if impl == impls[-1]:
            if depth in time_depths:
                result = runner.time(impls, bc_spec(args, depth), args.batch,
                                     memory_budget=args.budget_gib * common.GIB or None)
                timings[depth] = result.get("impls", {i: result for i in impls})
            checkpoint(points, timings)
    return points, timings


def verdict(point: dict, args) -> Optional[bool]:
    """Whether a measured step fits the budget (``None``: unknown, e.g. a timeout).
    A model that refused (its own planner found nothing that fits) does not."""
    if point["status"] == "ok":
        return point["total_bytes"] <= args.budget_gib * common.GIB
    return False if point["status"] in ("over_budget", "oom", "refused") else None


def search_budget(runner: Runner, impl: str, points: list[dict], args, probed: Callable[[], None]) -> dict:
    """Deepest depth of ``impl`` whose training step fits ``--budget-gib`` (see
    the module docstring): the prediction, then the next depth, then a walk if
    the prediction was wrong; ``probed()`` after each probe (written to disk:
    one probe can take an hour)."""
    mine = [p for p in points if p["impl"] == impl]
    lo = max((p["depth"] for p in mine if verdict(p, args)), default=None)
    hi = min((p["depth"] for p in mine if verdict(p, args) is False), default=None)
    predicted = predicted_deepest(impl, points, args)
    candidate = min(predicted if predicted is not None else 10, args.max_depth)
    step, probes, limited_by = 6, 0, None
    while not (lo is not None and hi is not None and hi - lo <= 6):
        candidate = max(candidate, (lo or 4) + 6)  # inside what is known
        if hi is not None:
            candidate = min(candidate, hi - 6)
        if candidate > args.max_depth:
            limited_by = "max-depth"
            break
        if candidate < 10:
            break  # not even the shallowest depth fits
        point = probe(runner, impl, candidate, args)
        points.append(point)
        probed()
        fits = verdict(point, args)
        if fits is None:
            limited_by = point["status"]
            break
        lo, hi = (candidate, hi) if fits else (lo, candidate)
        probes += 1
        if probes == 1:  # the prediction's neighbour: the boundary, if the prediction was right
            candidate += 6 if fits else -6
        elif lo is not None and hi is not None:
            candidate = snap((lo + hi) / 2)
        else:
            step *= 2
            candidate += step if fits else -step
    at = lambda d: next((p for p in reversed(points) if p["impl"] == impl and p["depth"] == d), {})  # noqa: E731
    return {"impl": impl, "predicted_deepest": predicted, "deepest_fitting": lo, "shallowest_exceeding": hi,
            "boundary_pinned": lo is not None and hi is not None and hi - lo <= 6, "limited_by": limited_by,
            "prediction_right": predicted is not None and predicted == lo and hi == lo + 6,
            "at_deepest": at(lo) if lo is not None else None, "beyond": at(hi) if hi is not None else None}


def probe(runner: Runner, impl: str, depth: int, args) -> dict:
    """One fresh process at ``depth``, stopped once its step exceeds the budget
    above the parameters, gradients and optimizer state; with the prediction."""
    persistent = persistent_bytes(args, depth)
    budget = args.budget_gib * common.GIB
    result = runner.memory(impl, bc_spec(args, depth), args.batch, budget - persistent,
                           min(args.probe_timeout, runner.seconds_left()), memory_budget=model_budget(impl, args))
    point = {"impl": impl, "depth": depth, "kind": "probe", **result, "persistent_bytes": persistent}
    if result["status"] == "ok":
        point["total_bytes"] = persistent + result["peak_bytes"]
    if planned(impl):
        _, backend, policy = impl.split("-")
        setup = step_setup(args, None if backend == "auto" else backend)
        choice = planner.best_fitting(bc_architecture(args, depth), setup, budget, policy) if policy == "auto" \
            else planner.evaluate(bc_architecture(args, depth), setup, (policy,) * 3)
        if choice is not None:
            point["predicted_policies"] = list(choice.policies)
            point["predicted_total_bytes"] = choice.prediction.total_bytes
            point["predicted_step_bytes"] = choice.prediction.step_bytes
            point["predicted_step_time_ratio"] = choice.step_time_ratio
    return point


def summarize_fits(points: list[dict], impls: list[str]) -> dict:
    out = {}
    for impl in impls:
        ok = [p for p in points if p["impl"] == impl and p["status"] == "ok" and p["kind"] == "sweep"]
        depths, mib = [p["depth"] for p in ok], [p["peak_bytes"] / common.MIB for p in ok]
        out[impl] = {"unit": "MiB vs depth (layers)", "linear": fit(depths, mib, 1), "quadratic": fit(depths, mib, 2)}
    return out


REFERENCES = {"torchvision": ("tv-eager", "tv-memeff"), "monai": ("monai-eager", "monai-ckpt")}


def ratios(points: list[dict], timings: dict, impls: list[str], depth: int, family: str) -> dict:
    """Memory and step time of each implementation over the family's eager and
    checkpointed ones (torchvision's, or MONAI's) at ``depth``."""
    peak = {p["impl"]: p["peak_bytes"] for p in points
            if p["depth"] == depth and p["status"] == "ok" and p["kind"] == "sweep"}
    times = {impl: r["seconds"]["median"] for impl, r in timings.get(depth, {}).items() if r["status"] == "ok"}
    out = {}
    for impl in impls:
        row = {}
        for ref in REFERENCES[family]:
            if impl in peak and ref in peak:
                row[f"memory_over_{ref}"] = peak[impl] / peak[ref]
            if impl in times and ref in times:
                row[f"time_over_{ref}"] = times[impl] / times[ref]
        out[impl] = row
    return out


def policy_costs(timings: dict, args) -> dict:
    """Per backend, the measured cost of recomputing: at every timed depth the step
    time of ``recompute`` over ``keep`` (same process, round-robin), and the cost of
    a recomputed FLOP relative to an average FLOP of the step,
    ``a = (ratio - 1) * F / R`` (:func:`densenet_fast.planner.step_time_ratio`);
    with ``auto`` timed too, its measured ratio beside the planner's."""
    out: dict = {}
    for depth, results in sorted(timings.items(), key=lambda item: int(item[0])):
        median = {impl: r["seconds"]["median"] for impl, r in results.items() if r["status"] == "ok"}
        for impl in median:
            _, backend, policy = impl.split("-") if impl.startswith("fast-") else ("", "", "")
            if policy != "recompute" or f"fast-{backend}-keep" not in median:
                continue
            setup = step_setup(args, backend)
            arch = bc_architecture(args, int(depth))
            ratio = median[impl] / median[f"fast-{backend}-keep"]
            flops, recomputed = planner.training_flops(arch, setup), planner.recompute_flops(arch, setup, ("recompute",) * 3)
            row = {"depth": int(depth), "keep_s": median[f"fast-{backend}-keep"], "recompute_s": median[impl],
                   "recompute_over_keep": ratio, "recompute_flops_fraction": recomputed / flops,
                   "recompute_cost_per_flop": (ratio - 1) * flops / recomputed}
            auto = f"fast-{backend}-auto"
            if auto in median and args.budget_gib > 0:
                choice = planner.best_fitting(arch, setup, args.budget_gib * common.GIB, "auto")
                row.update(auto_over_keep=median[auto] / median[f"fast-{backend}-keep"],
                           auto_policies=list(choice.policies) if choice else None)
            out.setdefault(backend, {"depths": []})["depths"].append(row)
    for summary in out.values():
        costs = sorted(r["recompute_cost_per_flop"] for r in summary["depths"])
        summary["recompute_cost_per_flop_median"] = costs[len(costs) // 2]
    return out


# what a reused sweep's measurements depend on, beside the implementations
SWEEP_SETTINGS = ("family", "batch", "image_size", "growth_rate", "device", "dtype", "autocast", "channels_last",
                  "optimizer", "steps", "warmup", "repeats", "threads", "full_warmup", "malloc_default")


def reused_sweep(args: argparse.Namespace, impls: list[str]) -> tuple[list[dict], dict, dict]:
    """The points, timings and environment of ``--reuse-sweep``'s run, which must
    have measured with this run's settings (one it did not record is taken as
    equal; ``--depths`` and ``--time-depths``, where given, as well)."""
    old = json.loads(args.reuse_sweep.read_text())
    settings = old["environment"].get("settings", {})
    given = [key for key in ("depths", "time_depths") if getattr(args, key) is not None]
    different = [f"--{key.replace('_', '-')} {settings[key]} there, {getattr(args, key)} here"
                 for key in (*SWEEP_SETTINGS, *given) if key in settings and settings[key] != getattr(args, key)]
    if different:
        raise ValueError(f"--reuse-sweep {args.reuse_sweep} measured with other settings: {'; '.join(different)}")
    points = [p for p in old["points"] if p["kind"] == "sweep" and p["impl"] in impls]
    if not points:
        raise ValueError(f"--reuse-sweep {args.reuse_sweep} holds no sweep point of {' '.join(impls)}")
    return points, {int(d): t for d, t in old["timings"].items()}, old["environment"]


def run(args: argparse.Namespace) -> dict:
    check_budget_steps(args)
    for d in (args.depths or []) + (args.time_depths or []):
        if snap(d) != d:
            raise ValueError(f"depth {d} is not of the form 6n + 4")
    if args.family == "monai":
        monai_impls.spatial_dims(args.image_size)
        sides = args.image_size if isinstance(args.image_size, list) else [args.image_size]
        if min(sides) < 16:  # stem /4 and two transitions /2 each
            raise ValueError(f"--image-size {args.image_size}: MONAI's DenseNet-BC needs sides of at least 16")
        impls = args.impls or monai_impls.default_impls(args.device, args.compile)
    elif isinstance(args.image_size, list):
        raise ValueError(f"--image-size {args.image_size}: several sides are for --family monai")
    else:
        impls = resolve_impls(args)
    check_impls(impls, args.family == "monai", args)
    if args.impls is None and args.budget_gib > 0:  # and recompute="auto" under the budget
        impls += list(dict.fromkeys(i.rsplit("-", 1)[0] + "-auto" for i in impls if i.startswith("fast-")))
    if args.reuse_sweep:  # the depths it measured (a stopped run's file lists more)
        points, timings, sweep_env = reused_sweep(args, impls)
        args.depths = sorted({p["depth"] for p in points})
        timed = args.time_depths = sorted(timings)
    else:
        args.depths = args.depths or list(DEFAULT_DEPTHS)
        timed = args.depths if args.time_depths is None else args.time_depths
        missing = sorted(set(timed) - set(args.depths))
        if missing:
            raise ValueError(f"--time-depths {' '.join(map(str, missing))}: not among --depths "
                             f"{' '.join(map(str, args.depths))} (timing runs with the sweep)")
    if args.reference_depth is None:  # the deepest timed, for time ratios too
        args.reference_depth = max(timed or args.depths)
    elif args.reference_depth not in args.depths:
        raise ValueError(f"--reference-depth {args.reference_depth}: not among the sweep's depths "
                         f"{' '.join(map(str, args.depths))}")
    runner = Runner(args)
    settings = common.settings_of(args)
    settings.update({"impls": impls, "mmap_threshold_in_memory_workers": None if args.malloc_default else MMAP_THRESHOLD,
                     "memory": "peak RSS above baseline in a fresh process (GPU: max_memory_allocated above baseline)"})
    if args.reuse_sweep:
        settings["sweep_from"] = {"file": str(args.reuse_sweep), "git_revision": sweep_env.get("git_revision")}
    env = common.environment(args.device, settings)

    out = args.out or default_out(args)

    def checkpoint(points, timings, searches=()):
        partial = {"benchmark": "depth", "partial": True, "environment": env, "points": points,
                   "timings": {str(d): t for d, t in timings.items()}, "budget_search": list(searches)}
        common.write_json(partial, out)

    if not args.reuse_sweep:
        points, timings = sweep(runner, impls, args, checkpoint)
    searches = []
    if args.budget_gib > 0:
        for impl in common.progress(impls, desc="budget search", enabled=not args.no_progress):
            searches.append(search_budget(runner, impl, points, args, lambda: checkpoint(points, timings, searches)))
            checkpoint(points, timings, searches)
    result = {"benchmark": "depth", "environment": common.finish_environment(env), "points": points,
              "timings": {str(d): t for d, t in timings.items()}, "fits": summarize_fits(points, impls),
              "ratios_at_reference_depth": ratios(points, timings, impls, args.reference_depth, args.family),
              "budget_search": searches, "policy_costs": policy_costs(timings, args)}
    report(result, args, out)
    return result


def budget_row(search: dict) -> dict:
    """The search's result with the prediction beside the measurement at the deepest depth."""
    at = search["at_deepest"] or {}
    mib = lambda key: at[key] / common.MIB if key in at else None  # noqa: E731
    return {"impl": search["impl"], "predicted": search["predicted_deepest"], "deepest_fitting":
            search["deepest_fitting"], "shallowest_exceeding": search["shallowest_exceeding"],
            "limited_by": search["limited_by"], "predicted_MiB": mib("predicted_total_bytes"),
            "measured_MiB": mib("total_bytes"), "policies": "/".join(at.get("predicted_policies", [])) or None}


def default_out(args) -> Path:
    family = "" if args.family == "torchvision" else "monai_"
    size = "x".join(map(str, args.image_size)) + "_" if isinstance(args.image_size, list) else ""
    return common.new_result_path(f"depth_{family}{size}{args.device.split(':')[0]}_b{args.batch}.json")


def report(result: dict, args, out: Path) -> None:
    rows = []
    timings = result["timings"]
    for p in result["points"]:
        t = timings.get(str(p["depth"]), {}).get(p["impl"], {}) if p["kind"] == "sweep" else {}
        rows.append({"impl": p["impl"], "depth": p["depth"], "kind": p["kind"], "status": p["status"],
                     "peak_MiB": p["peak_bytes"] / common.MIB if p["status"] == "ok" else None,
                     "total_MiB": p["total_bytes"] / common.MIB if p["status"] == "ok" else None,
                     "step_s (median)": t.get("seconds", {}).get("median")})
    print(common.format_table(rows, ["impl", "depth", "kind", "status", "peak_MiB", "total_MiB", "step_s (median)"]))
    fits = [{"impl": impl, "linear R2": f["linear"]["r2"] if f["linear"] else None,
             "MiB/layer": f["linear"]["coefficients"][1] if f["linear"] else None,
             "quadratic R2": f["quadratic"]["r2"] if f["quadratic"] else None,
             "MiB/layer^2": f["quadratic"]["coefficients"][2] if f["quadratic"] else None}
            for impl, f in result["fits"].items()]
    print("\nmemory ~ depth fits\n" + common.format_table(fits, list(fits[0])))
    ratio_rows = [{"impl": impl, **r} for impl, r in result["ratios_at_reference_depth"].items()]
    if any(len(r) > 1 for r in ratio_rows):
        columns = sorted({k for r in ratio_rows for k in r} - {"impl"})
        print(f"\nratios at depth {args.reference_depth}\n" + common.format_table(ratio_rows, ["impl"] + columns))
    if result["budget_search"]:
        print(f"\ndeepest depth whose training step fits {args.budget_gib} GiB\n" + common.format_table(
            [budget_row(s) for s in result["budget_search"]], list(budget_row(result["budget_search"][0]))))
    for backend, summary in result.get("policy_costs", {}).items():
        print(f"\nrecompute's cost on the {backend} backend (step time over keep's, same process)\n" +
              common.format_table(summary["depths"], list(summary["depths"][0])))
    common.save_result(result, out, None if args.no_plot else "plot_depth")


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
