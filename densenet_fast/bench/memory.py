"""``bench memory``: the memory model against fresh-process measurements.

For every point (``MODEL:BATCH``, e.g. ``densenet_bc-1000:1`` or
``densenet121:8``; MONAI's trees as ``monai-densenet_bc-40:2`` or
``monai-densenet121:1``, on volumes with ``--image-size 32x32x32``) and
recompute policy, one fresh worker measures the highest
peak of 12 training steps (``--steps``; the CPU's steps vary a little) above the parameters,
gradients and optimizer state (see :mod:`.worker`), and :func:`densenet_fast.memory.predict` predicts
it.  Reported per point: predicted and measured step bytes and the relative
error, the persistent bytes (counted in the worker, and predicted), the error
of the total (persistent + step), where the predicted peak is; then the worst
errors.  ``--repredict FILE`` predicts a result file's measurements again with
the memory model as it is now (measuring is slow, predicting is not).  The default grid spans depths 40 to
1000 and batches 1 to 256, with large batches only at small depths and large
depths only at small batches, so that it runs in a few hours on 2 cores.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from ..memory import Architecture, OptimizerSpec, Setup, predict
from . import common, monai_impls
from .harness import MMAP_THRESHOLD, Runner, add_common_arguments, image_size
from .impls import ModelSpec
from .worker import DTYPES

DEFAULT_POINTS = ("densenet_bc-40:1", "densenet_bc-40:4", "densenet_bc-40:16", "densenet_bc-40:64",
                  "densenet_bc-40:256", "densenet_bc-100:1", "densenet_bc-100:16", "densenet_bc-100:64",
                  "densenet_bc-100:128", "densenet_bc-250:1", "densenet_bc-250:4", "densenet_bc-250:16",
                  "densenet_bc-502:1", "densenet_bc-502:4", "densenet_bc-1000:1", "densenet_bc-1000:4")
TOLERANCE = 0.10
STEADY_STEPS = 12  # measured steps per point: with per-layer gradients the CPU's step grew until about the tenth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", nargs="+", default=list(DEFAULT_POINTS),
                        help="MODEL:BATCH, MODEL densenet_bc-<depth> or densenet121 (161, 169, 201, 264); "
                             "with a monai- prefix MONAI's tree (one input channel, two classes)")
    parser.add_argument("--repredict", type=common.result_file("memory"), default=None,
                        help="measure nothing: predict again the measurements of this result file (with its "
                             "settings) and write the result to --out (default: the same file)")
    parser.add_argument("--policies", nargs="+", default=["keep", "recompute"], choices=["keep", "recompute"])
    parser.add_argument("--backend", default="auto", help="densenet_fast's backend (auto: the device's choice)")
    parser.add_argument("--image-size", type=image_size, default=32,
                        help="side of square images, or DxHxW (volumes, MONAI's trees)")
    parser.add_argument("--growth-rate", type=common.at_least(1), default=12, help="k of densenet_bc")
    parser.add_argument("--drop-rate", type=float, default=0.0,
                        help="dropout after each dense layer, in [0, 1) (torchvision's drop_rate; MONAI's "
                             "dropout_prob, whole channels on images and volumes; default: none)")
    parser.add_argument("--offload", action="store_true",
                        help="the forward and loss under save_on_cpu on CUDA (train --offload); on the CPU a stand-in "
                             "that keeps the saved tensors in a file (densenet_fast.bench.impls.offloaded)")
    add_common_arguments(parser)
    parser.set_defaults(steps=STEADY_STEPS)


def parse_point(text: str, args: argparse.Namespace) -> tuple[ModelSpec, int]:
    """The model and batch of ``MODEL:BATCH``, with ``--drop-rate`` (absent from older results: 0)."""
    model, _, batch = text.rpartition(":")
    if not model or not batch.isdecimal():
        raise ValueError(f"a point is MODEL:BATCH, got {text!r}")
    if model.startswith(monai_impls.PREFIX + "densenet_bc-"):
        bc = ModelSpec.parse(model[len(monai_impls.PREFIX):], args.growth_rate)
        spec = monai_impls.bc_spec(bc.depth, bc.growth_rate, args.image_size)
    elif model.startswith(monai_impls.PREFIX):
        spec = monai_impls.parse(model, args.image_size)
    elif isinstance(args.image_size, list):
        raise ValueError(f"--image-size {args.image_size}: several sides are for MONAI's trees (monai-...)")
    else:
        spec = ModelSpec.parse(model, args.growth_rate)
    return replace(spec, drop_rate=getattr(args, "drop_rate", 0.0)), int(batch)


def architecture(spec: ModelSpec) -> Architecture:
    if monai_impls.is_monai(spec):
        return monai_impls.architecture(spec)
    depth = spec.depth if spec.name == "densenet_bc" else None
    return Architecture.named(spec.name, depth, spec.growth_rate if depth else None, spec.num_classes,
                              drop_rate=spec.drop_rate)


def setup_of(args: argparse.Namespace, batch: int) -> Setup:
    """The planner's setup of a point (``multiprocessors``: the measured GPU's, in its
    result's settings: a result predicted again elsewhere keeps its GPU)."""
    return Setup(batch, args.image_size, DTYPES[args.dtype], DTYPES[args.autocast] if args.autocast else None,
                 args.device, None if args.backend == "auto" else args.backend, OptimizerSpec.parse(args.optimizer),
                 args.threads, getattr(args, "multiprocessors", None),
                 getattr(args, "offload", False))


def row(args: argparse.Namespace, point: str, policy: str, measured: dict) -> dict:
    """One point: the prediction beside the measurement."""
    spec, batch = parse_point(point, args)
    setup = setup_of(args, batch)
    prediction = predict(architecture(spec), setup, policy)
    out = {"point": point, "model": spec.label(), "depth": spec.depth if "densenet_bc" in spec.name else None,
           "batch": batch, "policy": policy, "impl": f"fast-{setup.backend}-{policy}", "status": measured["status"],
           "predicted_step_bytes": prediction.step_bytes, "predicted_persistent_bytes": prediction.persistent_bytes,
           "predicted_peak_at": prediction.peak_at, "predicted_step": prediction.step, "measured": measured}
    if measured["status"] == "ok":
        total = measured["persistent_bytes"] + measured["peak_bytes"]
        out.update(measured_step_bytes=measured["peak_bytes"], measured_persistent_bytes=measured["persistent_bytes"],
                   error=prediction.step_bytes / measured["peak_bytes"] - 1,
                   total_error=prediction.total_bytes / total - 1)
    return out


def run(args: argparse.Namespace) -> dict:
    if args.compile:
        raise ValueError("--compile adds torch.compile(torchvision) to the other benchmarks; this one measures "
                         "densenet_fast's policies against the memory model")
    if args.repredict:
        return repredict(args)
    parsed = {p: parse_point(p, args) for p in args.points}  # every point checked before the first is measured
    for spec, batch in parsed.values():  # (the batch by Setup, the image size against the model)
        architecture(spec).spatial_sizes(setup_of(args, batch).image_size)
    points = [(p, policy) for p in args.points for policy in args.policies]
    runner = Runner(args)
    settings = common.settings_of(args)
    settings["mmap_threshold_in_memory_workers"] = None if args.malloc_default else MMAP_THRESHOLD
    settings["multiprocessors"] = Setup(1, 1, device=args.device).multiprocessors
    env = common.environment(args.device, settings)
    out = args.out or common.new_result_path(f"memory_model_{args.device.split(':')[0]}.json")
    rows = []
    for point, policy in common.progress(points, desc="memory model", enabled=not args.no_progress):
        spec, batch = parsed[point]
        impl = f"fast-{setup_of(args, batch).backend}-{policy}"
        rows.append(row(args, point, policy, runner.memory(impl, spec, batch, None, runner.seconds_left())))
        common.write_json({"benchmark": "memory", "partial": True, "environment": env, "rows": rows}, out)
    env = common.finish_environment(env)
    env["predicted_at_revision"] = env["git_revision_at_end"]
    return finish(env, rows, args, out)


def repredict(args: argparse.Namespace) -> dict:
    """The measurements of ``args.repredict``, predicted by the memory model as it is now."""
    old = json.loads(args.repredict.read_text())
    env = old["environment"]
    settings = argparse.Namespace(**{**vars(args), **env["settings"], "repredict": None, "no_plot": args.no_plot})
    rows = [row(settings, r["point"], r["policy"], r["measured"]) for r in old["rows"]]
    env["predicted_at_revision"] = common.git_revision()
    return finish(env, rows, settings, args.out or args.repredict)


def finish(env: dict, rows: list[dict], args: argparse.Namespace, out) -> dict:
    measured = [r for r in rows if r["status"] == "ok"]
    worst = {key: max(measured, key=lambda r: abs(r[key]), default=None) for key in ("error", "total_error")}
    result = {"benchmark": "memory", "environment": env, "rows": rows, "tolerance": TOLERANCE,
              "worst": {key: r and {k: r[k] for k in ("model", "batch", "policy", key)} for key, r in worst.items()},
              "all_measured": len(measured) == len(rows),
              "within_tolerance": {key: all(abs(r[key]) <= TOLERANCE for r in measured)
                                   for key in ("error", "total_error")}}
    report(result, out, args)
    return result


def report(result: dict, out, args) -> None:
    table = [{"model": r["model"], "batch": r["batch"], "policy": r["policy"], "status": r["status"],
              "predicted_MiB": r["predicted_step_bytes"] / common.MIB,
              "measured_MiB": r["measured_step_bytes"] / common.MIB if r["status"] == "ok" else None,
              "error_%": 100 * r["error"] if r["status"] == "ok" else None,
              "persistent_MiB": r["predicted_persistent_bytes"] / common.MIB,
              "persistent_counted": r.get("measured_persistent_bytes") == r["predicted_persistent_bytes"],
              "total_error_%": 100 * r["total_error"] if r["status"] == "ok" else None,
              "peak_at": r["predicted_peak_at"]} for r in result["rows"]]
    print(common.format_table(table, list(table[0])))
    for key, what in (("error", "step (peak above persistent)"), ("total_error", "total (persistent + step)")):
        w = result["worst"][key]
        if w:
            print(f"worst error of the {what}: {100 * w[key]:+.1f}% ({w['model']}, batch {w['batch']}, {w['policy']}); "
                  f"all within {100 * TOLERANCE:.0f}%: {result['within_tolerance'][key]}")
    common.save_result(result, out, None if args.no_plot else "plot_memory")


def main(argv=None) -> dict:
    return common.script_main(__doc__, add_arguments, run, argv)
