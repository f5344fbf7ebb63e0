"""``bench memory``: the memory model against fresh-process measurements.

For every point (``MODEL:BATCH``, e.g. ``densenet_bc-1000:1`` or
``densenet121:8``) and recompute policy, one fresh worker measures the peak of
a steady-state training step above the parameters, gradients and optimizer
state (see :mod:`.worker`), and :func:`densenet_fast.memory.predict` predicts
it.  Reported per point: predicted and measured step bytes and the relative
error, the persistent bytes (counted in the worker, and predicted), where the
predicted peak is; then the worst error.  The default grid spans depths 40 to
1000 and batches 1 to 256, with large batches only at small depths and large
depths only at small batches, so that it runs in about an hour on 2 cores.
"""

from __future__ import annotations

import argparse

import torch

from ..memory import Architecture, OptimizerSpec, Setup, predict
from . import common
from .harness import MMAP_THRESHOLD, Runner, add_common_arguments
from .impls import ModelSpec
from .worker import DTYPES

DEFAULT_POINTS = ("densenet_bc-40:1", "densenet_bc-40:4", "densenet_bc-40:16", "densenet_bc-40:64",
                  "densenet_bc-40:256", "densenet_bc-100:1", "densenet_bc-100:16", "densenet_bc-100:64",
                  "densenet_bc-100:128", "densenet_bc-250:1", "densenet_bc-250:4", "densenet_bc-250:16",
                  "densenet_bc-502:1", "densenet_bc-502:4", "densenet_bc-1000:1", "densenet_bc-1000:4")
TOLERANCE = 0.10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS),
                        help="MODEL:BATCH, MODEL densenet_bc-<depth> or densenet121 (161, 169, 201, 264)")
    parser.add_argument("--policies", nargs="+", default=["keep", "recompute"], choices=["keep", "recompute"])
    parser.add_argument("--backend", default="auto", help="densenet_fast's backend (auto: the device's choice)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--growth-rate", type=int, default=12, help="k of densenet_bc")
    add_common_arguments(parser)


def parse_point(text: str, growth_rate: int) -> tuple[ModelSpec, int]:
    model, _, batch = text.rpartition(":")
    if not model or not batch.isdigit():
        raise SystemExit(f"a point is MODEL:BATCH, got {text!r}")
    return ModelSpec.parse(model, growth_rate), int(batch)


def architecture(spec: ModelSpec) -> Architecture:
    depth = spec.depth if spec.name == "densenet_bc" else None
    return Architecture.named(spec.name, depth, spec.growth_rate if depth else None, spec.num_classes)


def setup_of(args: argparse.Namespace, batch: int) -> Setup:
    return Setup(batch, args.image_size, DTYPES[args.dtype], DTYPES[args.autocast] if args.autocast else None,
                 args.device, None if args.backend == "auto" else args.backend, OptimizerSpec.parse(args.optimizer),
                 args.threads or torch.get_num_threads())


def run(args: argparse.Namespace) -> dict:
    points = [parse_point(p, args.growth_rate) for p in args.points]
    runner = Runner(args)
    settings = common.settings_of(args)
    settings["mmap_threshold_in_memory_workers"] = None if args.malloc_default else MMAP_THRESHOLD
    env = common.environment(args.device, settings)
    out = args.out or common.RESULTS_DIR / f"memory_model_{args.device.split(':')[0]}.json"
    rows = []
    jobs = [(spec, batch, policy) for spec, batch in points for policy in args.policies]
    for spec, batch, policy in common.progress(jobs, desc="memory model", enabled=not args.no_progress):
        setup = setup_of(args, batch)
        prediction = predict(architecture(spec), setup, policy)
        impl = f"fast-{setup.backend}-{policy}"
        measured = runner.memory(impl, spec, batch, None, runner.seconds_left())
        row = {"model": spec.label(), "depth": spec.depth if spec.name == "densenet_bc" else None, "batch": batch,
               "policy": policy, "impl": impl, "status": measured["status"],
               "predicted_step_bytes": prediction.step_bytes, "predicted_persistent_bytes": prediction.persistent_bytes,
               "predicted_peak_at": prediction.peak_at, "predicted_step": prediction.step,
               "wall_s": measured.get("wall_s")}
        if measured["status"] == "ok":
            row.update(measured_step_bytes=measured["peak_bytes"], measured_persistent_bytes=measured["persistent_bytes"],
                       error=prediction.step_bytes / measured["peak_bytes"] - 1,
                       step_seconds=measured["step_seconds"])
        else:
            row["failure"] = {k: v for k, v in measured.items() if k != "status"}
        rows.append(row)
        common.write_json({"benchmark": "memory", "partial": True, "environment": env, "rows": rows}, out)
    measured_rows = [r for r in rows if r["status"] == "ok"]
    worst = max(measured_rows, key=lambda r: abs(r["error"]), default=None)
    result = {"benchmark": "memory", "environment": common.finish_environment(env), "rows": rows,
              "worst": worst and {k: worst[k] for k in ("model", "batch", "policy", "error")},
              "within_tolerance": all(abs(r["error"]) <= TOLERANCE for r in measured_rows) and
              len(measured_rows) == len(rows), "tolerance": TOLERANCE}
    report(result, out, args)
    return result


def report(result: dict, out, args) -> None:
    table = [{"model": r["model"], "batch": r["batch"], "policy": r["policy"], "status": r["status"],
              "predicted_MiB": r["predicted_step_bytes"] / common.MIB,
              "measured_MiB": r["measured_step_bytes"] / common.MIB if r["status"] == "ok" else None,
              "error_%": 100 * r["error"] if r["status"] == "ok" else None,
              "persistent_MiB": r["predicted_persistent_bytes"] / common.MIB,
              "persistent_counted": r.get("measured_persistent_bytes") == r["predicted_persistent_bytes"],
              "peak_at": r["predicted_peak_at"]} for r in result["rows"]]
    print(common.format_table(table, list(table[0])))
    if result["worst"]:
        w = result["worst"]
        print(f"\nworst error {100 * w['error']:+.1f}% ({w['model']}, batch {w['batch']}, {w['policy']}); "
              f"all within {100 * TOLERANCE:.0f}%: {result['within_tolerance']}")
    common.save_result(result, out, None if args.no_plot else "plot_memory")


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
