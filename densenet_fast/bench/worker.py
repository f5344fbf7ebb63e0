"""A fresh process that measures one configuration and prints ``RESULT <json>``.

``python -m densenet_fast.bench.worker '<spec json>'`` with the keys of
:func:`run`.  Run by :func:`densenet_fast.bench.common.run_worker`, which
watches its memory.  Modes:

- ``memory``: one implementation; runs a warm-up step on ``warmup_batch``
  images, prints ``BASELINE <bytes>`` (parameters, gradients and optimizer
  state now exist), runs ``steps`` steps, and reports the peak above that
  baseline (resident memory on the CPU, allocated memory on a GPU), each
  step's peak, the bytes of the parameters, gradients and optimizer state,
  and the seconds of each step;
- ``time``: several implementations on the same inputs, ``warmup`` steps
  each, then ``repeats`` rounds that time one step of each in turn (so load
  changes hit all of them alike).
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from ..memory import OptimizerSpec, set_mmap_threshold, trim_heap
from ..planner import MemoryBudgetError
from . import common
from .impls import ModelSpec, Step, build, make_inputs, share_weights

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate" in text or \
        "not enough memory" in text


def make_step(impl: str, spec: dict) -> Step:
    model_spec = ModelSpec(**spec["model"])
    device, channels_last = spec["device"], spec.get("channels_last", False)
    model = build(impl, model_spec, device, channels_last, seed=spec.get("seed", 0),  # the budget: for -auto only
                  memory_budget=spec.get("memory_budget") if impl.endswith("-auto") else None)
    model = model.to(DTYPES[spec.get("dtype", "float32")])
    x, y = make_inputs(model_spec, spec["batch"], spec["image_size"], device, channels_last)
    x = x.to(DTYPES[spec.get("dtype", "float32")])
    autocast = spec.get("autocast")
    return Step(model, x, y, spec.get("train", True), DTYPES[autocast] if autocast else None,
                OptimizerSpec.parse(spec.get("optimizer", "sgd")), spec.get("offload", False))


def persistent_bytes(step: Step) -> int:
    """Bytes of the parameters, their gradients and the optimizer's state tensors now."""
    tensors = [t for p in step.model.parameters() for t in (p, p.grad) if t is not None]
    if step.optimizer is not None:
        tensors += [t for state in step.optimizer.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def warm_up_shapes(impl: str, spec: dict) -> None:
    """One step of the depth-10 twin of a DenseNet-BC at the real batch, before
    the model is built: the libraries' per-shape state (oneDNN's primitives for
    the 3x3 convolutions, whose shapes do not depend on the depth; about 1 MiB
    on the CPU) then exists before the baseline instead of counting as the step's."""
    make_step(impl, {**spec, "model": {**spec["model"], "depth": 10}})()


def warmed_up_step(spec: dict) -> Step:
    """The step of ``spec["impls"][0]``, warmed up for a memory measurement: the
    warm-up step on ``warmup_batch`` images done and (with
    ``malloc_mmap_threshold``) the C heap trimmed."""
    if "densenet_bc" in spec["model"]["name"] and spec.get("warmup_batch"):
        warm_up_shapes(spec["impls"][0], spec)
    step = make_step(spec["impls"][0], spec)
    warmup_batch = spec.get("warmup_batch", 0)
    if warmup_batch:  # load code pages, initialise libraries (and compile) on a tiny batch
        real_x, real_y = step.x, step.y
        step.x, step.y = real_x[:warmup_batch].clone(), real_y[:warmup_batch].clone()
        step()
        step.x, step.y = real_x, real_y
    if spec.get("malloc_mmap_threshold") and spec.get("trim_heap", True):
        # The warm-up step left the C heap at its high-water mark (freed small blocks stay
        # resident): give them back so that the measured steps' heap counts in full too.
        trim_heap()
    return step


def measure_memory(spec: dict) -> dict:
    device = spec["device"]
    step = warmed_up_step(spec)
    warmup_batch = spec.get("warmup_batch", 0)
    common.synchronize(device)
    cuda = device.startswith("cuda")
    if cuda:
        baseline = torch.cuda.memory_allocated()
    else:
        if warmup_batch:
            common.reset_peak_rss()
        baseline = common.current_rss_bytes()
    baseline_anon = common.current_anon_bytes()
    print(common.BASELINE_PREFIX + str(baseline), flush=True)
    seconds, step_peaks = [], []
    with common.AnonPeakSampler() as sampler:
        for _ in range(spec.get("steps", 2)):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds.append(common.time_once(step, device))
            step_peaks.append(torch.cuda.max_memory_allocated() - baseline if cuda
                              else sampler.restart() - baseline_anon)
    result = {"status": "ok", "baseline_bytes": baseline, "persistent_bytes": persistent_bytes(step),
              "step_seconds": seconds, "step_peak_bytes": step_peaks, "peak_bytes": max(step_peaks)}
    return result if cuda else {**result, "peak_rss_bytes": common.peak_rss_bytes() - baseline}


def measure_time(spec: dict) -> dict:
    device = spec["device"]
    steps, results = {}, {}
    for impl in spec["impls"]:
        try:
            steps[impl] = make_step(impl, spec)
            for _ in range(spec.get("warmup", 1)):
                steps[impl]()
            common.synchronize(device)
        except Exception as exc:  # one implementation failing must not stop the others
            steps.pop(impl, None)
            results[impl] = {"status": "oom" if is_out_of_memory(exc) else "error", "error": repr(exc)[-500:]}
    if steps:
        share_weights([step.model for step in steps.values()])
    seconds = {impl: [] for impl in steps}
    for _ in range(spec.get("repeats", 3)):
        for impl, step in steps.items():
            seconds[impl].append(common.time_once(step, device))
    for impl, values in seconds.items():
        results[impl] = {"status": "ok", "seconds": common.summarize(values)}
    return {"status": "ok", "impls": results}


def run(spec: dict) -> dict:
    if spec.get("malloc_mmap_threshold"):
        set_mmap_threshold(spec["malloc_mmap_threshold"])  # resident memory then follows the live tensors
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        return measure_memory(spec) if spec["mode"] == "memory" else measure_time(spec)
    except MemoryBudgetError as exc:  # recompute="auto" found nothing that fits, before any work
        return {"status": "refused", "error": str(exc)}
    except Exception as exc:
        status = "oom" if is_out_of_memory(exc) else "error"
        return {"status": status, "error": repr(exc)[-500:], "traceback": traceback.format_exc()[-2000:]}


if __name__ == "__main__":
    print(common.RESULT_PREFIX + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
    os._exit(0)  # skip interpreter teardown: it touches memory after the measurement
