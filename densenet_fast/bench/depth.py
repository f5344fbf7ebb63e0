"""``bench depth``: peak memory and step time of one training step versus depth
for DenseNet-BC, and the deepest depth each implementation trains under a
memory budget.

1. Sweep: for every depth of ``--depths`` and every implementation, one fresh
   process measures the peak memory of a training step (see
   :mod:`.worker`); then one process per depth of ``--time-depths`` times all
   implementations round-robin on the same inputs.
2. Fits: memory versus depth, linear and quadratic (coefficients, R^2), and
   ratios against torchvision eager at ``--reference-depth``.
3. Budget (``--budget-gib`` > 0): for each implementation, predict from the
   fit the deepest depth (``6n + 4``) whose step fits the budget, then probe
   around it (fresh process each, stopped once it exceeds the budget) until
   the boundary is pinned to ``--resolution``: the deepest depth that fitted
   and the shallowest that did not.  The time left under ``--max-minutes`` is
   shared equally by the implementations; a probe whose predicted step time
   exceeds ``--probe-timeout`` or half its share is not run, and the result
   is then a verified lower bound (``limited_by``) next to the prediction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import common
from .common import evaluate, fit
from .harness import MMAP_THRESHOLD, Runner, add_common_arguments, resolve_impls
from .impls import ModelSpec

DEFAULT_DEPTHS = (40, 76, 112)


def snap(depth: float) -> int:
    """The nearest valid DenseNet-BC depth ``6n + 4`` (n >= 1)."""
    return 6 * max(1, round((depth - 4) / 6)) + 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEFAULT_DEPTHS),
                        help="depths (6n+4) of the sweep (default: %(default)s)")
    parser.add_argument("--time-depths", type=int, nargs="*", default=None,
                        help="depths at which all implementations are timed round-robin (default: every sweep depth)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--growth-rate", type=int, default=12)
    parser.add_argument("--impls", nargs="+", default=None,
                        help="implementations (default: tv-eager tv-memeff and densenet_fast's automatic backend "
                             "with each recompute policy; --all-backends for every backend)")
    parser.add_argument("--all-backends", action="store_true")
    parser.add_argument("--budget-gib", type=float, default=2.0, help="memory budget of one step; 0 skips the search")
    parser.add_argument("--max-depth", type=int, default=5000, help="deepest depth the search considers")
    parser.add_argument("--resolution", type=float, default=0.05,
                        help="stop the search once the boundary is known to this fraction of the depth (or 6 layers)")
    parser.add_argument("--probe-timeout", type=float, default=300.0, help="seconds one probe may take")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="wall-clock limit of the whole run")
    parser.add_argument("--reference-depth", type=int, default=100)
    add_common_arguments(parser)


def training_flops(depth: int, growth_rate: int, batch: int, image_size: int) -> float:
    """FLOPs of one DenseNet-BC training step: 3x the forward's (backward costs
    two forwards), counting the stem, every layer's 1x1 and 3x3 convolutions
    and the transitions' 1x1 convolutions (2 FLOPs per multiply-add)."""
    n, k = (depth - 4) // 6, growth_rate
    pixels, channels = batch * image_size * image_size, 2 * k
    forward = 2.0 * pixels * 3 * channels * 9
    for block in range(3):
        for layer in range(n):
            forward += 2.0 * pixels * ((channels + layer * k) * 4 * k + 4 * k * k * 9)
        channels += n * k
        if block < 2:
            pixels //= 4
            forward += 2.0 * pixels * channels * (channels // 2)  # pooled before the 1x1 convolution
            channels //= 2
    return 3 * forward


def bc_spec(args: argparse.Namespace, depth: int) -> ModelSpec:
    return ModelSpec("densenet_bc", depth, args.growth_rate, 10)


# -- fits ----------------------------------------------------------------------------------
def growth_fit(depths: list[float], values: list[float]) -> Optional[dict]:
    """The quadratic fit if its curvature is positive, else the linear one."""
    quadratic = fit(depths, values, 2)
    if quadratic is not None and quadratic["coefficients"][2] > 0:
        return quadratic
    return fit(depths, values, 1)


def deepest_under(model_fit: Optional[dict], limit: float, max_depth: int) -> Optional[int]:
    """The deepest valid depth <= ``max_depth`` whose fitted value is <= ``limit``."""
    if model_fit is None:
        return None
    best = None
    for depth in range(10, max_depth + 1, 6):
        if evaluate(model_fit, depth) <= limit:
            best = depth
        elif best is not None:
            break
    return best


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
        result = runner.memory(impl, bc_spec(args, depth), args.batch, safety, runner.seconds_left())
        points.append({"impl": impl, "depth": depth, "kind": "sweep", **result})
        if impl == impls[-1]:
            if depth in time_depths:
                result = runner.time(impls, bc_spec(args, depth), args.batch)
                timings[depth] = result.get("impls", {i: result for i in impls})
            checkpoint(points, timings)
    return points, timings


def search_budget(runner: Runner, impl: str, points: list[dict], args, seconds: float) -> dict:
    """Deepest depth of ``impl`` whose training step fits ``--budget-gib`` (see
    module docstring), spending at most about ``seconds``."""
    budget = args.budget_gib * common.GIB
    deadline = time.monotonic() + seconds
    mine = [p for p in points if p["impl"] == impl]
    fits = lambda p: p["status"] == "ok" and p["peak_bytes"] <= budget  # noqa: E731
    lo = max((p["depth"] for p in mine if fits(p)), default=None)
    hi = min((p["depth"] for p in mine if not fits(p) and p["status"] in ("ok", "over_budget", "oom")), default=None)
    limited_by = None
    while True:
        measured = [p for p in mine if p["status"] == "ok"]
        memory_fit = growth_fit([p["depth"] for p in measured], [p["peak_bytes"] for p in measured])
        flops = lambda d: training_flops(d, args.growth_rate, args.batch, args.image_size)  # noqa: E731
        seconds_per_flop = float(np.median([p["step_seconds"][-1] / flops(p["depth"]) for p in measured] or [0.0]))
        predicted = deepest_under(memory_fit, budget, args.max_depth)
        if lo is None or (hi is not None and hi - lo <= max(6, args.resolution * lo)):
            break
        if lo + 6 > args.max_depth:
            limited_by = "max-depth"
            break
        if predicted is not None and predicted > lo and (hi is None or predicted < hi):
            candidate = predicted
        elif hi is None:  # the fit says lo is the boundary: check just above it
            candidate = min(lo + max(6, 6 * round(args.resolution * lo / 6)), args.max_depth)
        else:
            candidate = snap((lo + hi) / 2)
        seconds_left = min(runner.seconds_left(), deadline - time.monotonic())
        affordable = max((d for d in range(10, args.max_depth + 1, 6)
                          if seconds_per_flop * flops(d) <= min(args.probe_timeout, seconds_left / 2)), default=None)
        if affordable is None or candidate > affordable:
            candidate = affordable or lo
            if candidate <= lo:
                limited_by = "time"
                break
        result = runner.memory(impl, bc_spec(args, candidate), args.batch, budget,
                               min(args.probe_timeout * 2, runner.seconds_left()))
        point = {"impl": impl, "depth": candidate, "kind": "probe", **result}
        points.append(point)
        mine.append(point)
        if fits(point):
            lo = candidate
        elif point["status"] in ("ok", "over_budget", "oom"):
            hi = candidate
        else:
            limited_by = point["status"]
            break
    return {"impl": impl, "deepest_fitting": lo, "shallowest_exceeding": hi,
            "boundary_pinned": hi is not None and lo is not None, "limited_by": None if hi is not None else limited_by,
            "predicted_deepest": predicted}


def summarize_fits(points: list[dict], impls: list[str]) -> dict:
    out = {}
    for impl in impls:
        ok = [p for p in points if p["impl"] == impl and p["status"] == "ok" and p["kind"] == "sweep"]
        depths, mib = [p["depth"] for p in ok], [p["peak_bytes"] / common.MIB for p in ok]
        out[impl] = {"unit": "MiB vs depth (layers)", "linear": fit(depths, mib, 1), "quadratic": fit(depths, mib, 2)}
    return out


def ratios(points: list[dict], timings: dict, impls: list[str], depth: int) -> dict:
    """Memory and step time of each implementation over torchvision eager's (and memory_efficient's) at ``depth``."""
    peak = {p["impl"]: p["peak_bytes"] for p in points
            if p["depth"] == depth and p["status"] == "ok" and p["kind"] == "sweep"}
    times = {impl: r["seconds"]["median"] for impl, r in timings.get(depth, {}).items() if r["status"] == "ok"}
    out = {}
    for impl in impls:
        row = {}
        for ref in ("tv-eager", "tv-memeff"):
            if impl in peak and ref in peak:
                row[f"memory_over_{ref}"] = peak[impl] / peak[ref]
            if impl in times and ref in times:
                row[f"time_over_{ref}"] = times[impl] / times[ref]
        out[impl] = row
    return out


def run(args: argparse.Namespace) -> dict:
    for d in args.depths + (args.time_depths or []):
        if snap(d) != d:
            raise SystemExit(f"depth {d} is not of the form 6n + 4")
    impls = resolve_impls(args)
    runner = Runner(args)
    settings = common.settings_of(args)
    settings.update({"impls": impls, "mmap_threshold_in_memory_workers": None if args.malloc_default else MMAP_THRESHOLD,
                     "memory": "peak RSS above baseline in a fresh process (GPU: max_memory_allocated above baseline)"})
    env = common.environment(args.device, settings)

    out = args.out or default_out(args)

    def checkpoint(points, timings, searches=()):
        partial = {"benchmark": "depth", "partial": True, "environment": env, "points": points,
                   "timings": {str(d): t for d, t in timings.items()}, "budget_search": list(searches)}
        common.write_json(partial, out)

    points, timings = sweep(runner, impls, args, checkpoint)
    searches = []
    if args.budget_gib > 0:
        order = sorted(impls, key=lambda i: -max((p["peak_bytes"] for p in points if p["impl"] == i
                                                  and p["status"] == "ok"), default=0))
        for i, impl in enumerate(common.progress(order, desc="budget search", enabled=not args.no_progress)):
            share = runner.seconds_left() / (len(order) - i)  # what is left, shared fairly
            searches.append(search_budget(runner, impl, points, args, share))
            checkpoint(points, timings, searches)
    result = {"benchmark": "depth", "environment": common.finish_environment(env), "points": points,
              "timings": {str(d): t for d, t in timings.items()}, "fits": summarize_fits(points, impls),
              "ratios_at_reference_depth": ratios(points, timings, impls, args.reference_depth),
              "budget_search": searches}
    report(result, args, out)
    return result


def default_out(args) -> Path:
    return common.RESULTS_DIR / f"depth_{args.device.split(':')[0]}_b{args.batch}.json"


def report(result: dict, args, out: Path) -> None:
    rows = []
    timings = result["timings"]
    for p in result["points"]:
        t = timings.get(str(p["depth"]), {}).get(p["impl"], {}) if p["kind"] == "sweep" else {}
        rows.append({"impl": p["impl"], "depth": p["depth"], "kind": p["kind"], "status": p["status"],
                     "peak_MiB": p["peak_bytes"] / common.MIB if p["status"] == "ok" else None,
                     "step_s (median)": t.get("seconds", {}).get("median")})
    print(common.format_table(rows, ["impl", "depth", "kind", "status", "peak_MiB", "step_s (median)"]))
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
        print(f"\ndeepest depth under {args.budget_gib} GiB\n" + common.format_table(
            result["budget_search"], ["impl", "deepest_fitting", "shallowest_exceeding", "limited_by",
                                      "predicted_deepest"]))
    common.save_result(result, out, None if args.no_plot else "plot_depth")


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
