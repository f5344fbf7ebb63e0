"""The benchmark harness: the fresh-process worker, the budget search against
known memory curves, and every subcommand end to end at tiny sizes.

The search and the model/depth subcommands run on a fake worker whose memory
follows a known formula, so the test knows the right answers; one test runs a
real worker process.
"""

import argparse
import functools
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from densenet_fast import cli, planner
from densenet_fast.bench import common, depth, harness, kernels, models, worker
from densenet_fast.bench import memory as bench_memory
from densenet_fast.memory import Architecture, Setup
from densenet_fast.bench.impls import ModelSpec, Step, build, make_inputs, share_weights

MIB = common.MIB


def fake_peak(impl: str, spec: ModelSpec, batch: int) -> float:
    """Bytes of one step: quadratic in depth for torchvision eager, linear otherwise."""
    d = spec.depth
    per_image = 0.01 * d + (0.002 * d * d if impl == "tv-eager" else 0.0) + (0.05 * d if impl == "tv-memeff" else 0.0)
    return (1.0 + per_image * batch) * MIB


@pytest.fixture
def fake_workers(monkeypatch):
    calls = []

    def memory(self, impl, spec, batch, limit_bytes, timeout_s, train=True, memory_budget=None):
        calls.append((impl, spec.depth, batch))
        peak = fake_peak(impl, spec, batch) * (1.0 if train else 0.5)
        if limit_bytes is not None and peak > limit_bytes:
            return {"status": "over_budget"}
        return {"status": "ok", "peak_bytes": peak, "baseline_bytes": 0, "step_seconds": [1e-3 * spec.depth]}

    def time_(self, impls, spec, batch, train=True, memory_budget=None):
        return {"status": "ok", "impls": {i: {"status": "ok", "seconds": common.summarize([1e-3 * spec.depth] * 3)}
                                          for i in impls}}

    monkeypatch.setattr(harness.Runner, "memory", memory)
    monkeypatch.setattr(harness.Runner, "time", time_)
    return calls


def deepest_true(impl: str, batch: int, budget: float) -> int:
    """The deepest depth whose parameters, gradients, momentum and fake step peak fit ``budget``."""
    settings = argparse.Namespace(family="torchvision", growth_rate=12, dtype="float32", optimizer="sgd")
    return max(d for d in range(10, 3000, 6)
               if depth.persistent_bytes(settings, d) + fake_peak(impl, ModelSpec("densenet_bc", d), batch) <= budget)


def test_training_flops():
    """DenseNet-BC-100 (k=12) forward is about 0.29 GMAC per 32x32 image (Huang et al.)."""
    per_image_macs = planner.training_flops(Architecture.named("densenet_bc", 100), Setup(1, 32)) / 3 / 2
    assert 0.25e9 < per_image_macs < 0.32e9


def test_budget_search_pins_the_boundary(fake_workers, tmp_path):
    """From any prediction (the planner's for densenet_fast, which does not know
    the fake peaks, and the fits for torchvision) the search pins the boundary."""
    impls = ["tv-eager", "tv-memeff", "fast-torch-recompute"]
    budget = 600 * MIB
    args = ["--depths", "16", "28", "40", "--batch", "8", "--budget-gib", str(budget / common.GIB),
            "--impls", *impls, "--out", str(tmp_path / "d.json"), "--no-progress"]
    result = depth.main(args)
    for found in result["budget_search"]:
        truth = deepest_true(found["impl"], 8, budget)
        assert found["deepest_fitting"] == truth, found
        assert found["shallowest_exceeding"] == truth + 6, found
        assert found["at_deepest"]["total_bytes"] <= budget < found["beyond"].get("total_bytes", float("inf"))
    tv_eager = result["budget_search"][0]
    assert tv_eager["prediction_right"]  # the quadratic fit of the sweep is exact for the fake peaks
    probes = [c for c in fake_workers if c[0] == "tv-eager"][3:]
    assert probes == [("tv-eager", tv_eager["deepest_fitting"], 8), ("tv-eager", tv_eager["deepest_fitting"] + 6, 8)]
    capped = depth.main(args + ["--max-depth", "202", "--impls", "fast-torch-recompute", "--no-plot",
                                "--out", str(tmp_path / "c.json")])
    assert capped["budget_search"][0]["deepest_fitting"] == 202  # = 6 * 33 + 4
    assert capped["budget_search"][0]["limited_by"] == "max-depth"
    fits = result["fits"]
    assert fits["fast-torch-recompute"]["linear"]["r2"] == pytest.approx(1.0)
    assert fits["tv-eager"]["quadratic"]["coefficients"][2] == pytest.approx(0.002 * 8, rel=1e-6)
    ratio = result["ratios_at_reference_depth"]  # at the sweep's deepest depth, by default
    assert set(ratio["fast-torch-recompute"]) == {f"{what}_over_{ref}" for what in ("memory", "time")
                                                  for ref in ("tv-eager", "tv-memeff")}
    deepest = ModelSpec("densenet_bc", 40)  # ours over theirs, not theirs over ours
    assert ratio["fast-torch-recompute"]["memory_over_tv-eager"] == pytest.approx(
        fake_peak("fast-torch-recompute", deepest, 8) / fake_peak("tv-eager", deepest, 8))
    written = json.loads((tmp_path / "d.json").read_text())
    assert written["environment"]["settings"]["batch"] == 8 and "git_revision" in written["environment"]
    assert (tmp_path / "d.png").stat().st_size > 10_000
    timed_at_28 = depth.main(args + ["--time-depths", "28", "--budget-gib", "0", "--out", str(tmp_path / "t.json"),
                                     "--no-plot"])  # the deepest timed depth, where time ratios are
    assert timed_at_28["environment"]["settings"]["reference_depth"] == 28
    assert "time_over_tv-eager" in timed_at_28["ratios_at_reference_depth"]["fast-torch-recompute"]
    calls = list(fake_workers)
    reused = depth.main(args[4:] + ["--reuse-sweep", str(tmp_path / "d.json"), "--budget-gib", "0",
                                    "--out", str(tmp_path / "r.json"), "--no-plot"])  # (args[:4]: --depths)
    assert fake_workers == calls and reused["points"] == [p for p in result["points"] if p["kind"] == "sweep"]
    assert reused["ratios_at_reference_depth"] == ratio  # the sweep's depths
    reuse = ["--reuse-sweep", str(tmp_path / "d.json")]
    for more, message in (([*reuse, "--batch", "4"], "--batch 8 there, 4 here"),
                          ([*reuse, "--depths", "10"], "--depths \\[16, 28, 40\\] there, \\[10\\] here"),
                          ([*reuse, "--impls", "fast-torch-keep"], "holds no sweep point of fast-torch-keep"),
                          (["--reference-depth", "100"], "--reference-depth 100: not among the sweep's depths"),
                          (["--time-depths", "28", "52"], "--time-depths 52: not among --depths 16 28 40")):
        with pytest.raises(ValueError, match=message):  # (the command line's exit status 2)
            depth.main(args + more)
    assert fake_workers == calls


def test_models_subcommand_largest_batch(fake_workers, tmp_path):
    impls = ["tv-eager", "fast-torch-keep"]
    result = models.main(["--model", "densenet_bc-40", "--batch", "8", "--budget-gib", str(100 * MIB / common.GIB),
                          "--impls", *impls, "--out", str(tmp_path / "m.json"), "--no-progress"])
    for row in result["rows"]:
        per_image = (fake_peak(row["impl"], ModelSpec("densenet_bc", 40), 2) - MIB) / 2
        assert row["largest_batch"] == int((100 * MIB - MIB) // per_image)
        assert row["train_images_per_s"] == pytest.approx(8 / 0.04)
    assert (tmp_path / "m.png").exists()


@pytest.mark.parametrize("curvature", [0.0, 1e-4, -1e-4], ids=["linear", "convex", "concave"])
def test_models_largest_batch_is_pinned_where_the_linear_fit_misses(fake_workers, monkeypatch, curvature, tmp_path):
    """Peaks that curve away from the fit over batches 4 and 8: the search still
    finds the largest batch under the budget and measures the next one over it."""
    linear = harness.Runner.memory

    def curved(self, impl, spec, batch, limit_bytes, timeout_s, train=True, memory_budget=None):
        result = linear(self, impl, spec, batch, None, timeout_s, train)
        peak = result["peak_bytes"] + curvature * (batch - 4) * (batch - 8) * MIB
        over = limit_bytes is not None and peak > limit_bytes
        return {"status": "over_budget"} if over else {**result, "peak_bytes": peak}

    monkeypatch.setattr(harness.Runner, "memory", curved)
    budget = 100 * MIB
    result = models.main(["--model", "densenet_bc-40", "--batch", "8", "--budget-gib", str(budget / common.GIB),
                          "--impls", "fast-torch-keep", "--out", str(tmp_path / "m.json"), "--no-progress",
                          "--no-plot"])
    spec = ModelSpec("densenet_bc", 40)
    truth = max(b for b in range(1, 1000)
                if fake_peak("fast-torch-keep", spec, b) + curvature * (b - 4) * (b - 8) * MIB <= budget)
    search = result["details"]["fast-torch-keep"]["largest_batch"]
    assert result["rows"][0]["largest_batch"] == truth and search["boundary_pinned"]
    assert [p["batch"] for p in search["probes"]][-1] in (truth, truth + 1)


class CurvedPeaks:
    """A fake runner for :func:`models.largest_batch`: step peaks of ``1 + 0.4 b + c b^2`` MiB,
    an error above ``fails_above`` images."""

    def __init__(self, curvature: float, fails_above: float = float("inf")) -> None:
        self.curvature, self.fails_above = curvature, fails_above

    def peak(self, batch: int) -> float:
        return (1 + 0.4 * batch + self.curvature * batch * batch) * MIB

    def memory(self, impl, spec, batch, limit_bytes, timeout_s, memory_budget=None):
        if batch > self.fails_above:
            return {"status": "error"}
        peak = self.peak(batch)
        return {"status": "over_budget"} if peak > limit_bytes else {"status": "ok", "peak_bytes": peak}

    def seconds_left(self) -> float:
        return 1e9


@pytest.mark.parametrize("measured", [(4, 8), (150, 250)], ids=["both_fit", "one_over"])
def test_largest_batch_search_probes_each_batch_once_between_what_is_known(measured):
    runner, budget = CurvedPeaks(5e-4), 100 * MIB
    result = models.largest_batch(runner, "fast-torch-keep", ModelSpec("densenet_bc", 40),
                                  {b: {"status": "ok", "peak_bytes": runner.peak(b)} for b in measured},
                                  argparse.Namespace(budget_gib=budget / common.GIB))
    probed = [p["batch"] for p in result["probes"]]
    known_fit = max(b for b in measured if runner.peak(b) <= budget)
    known_over = min((b for b in measured if runner.peak(b) > budget), default=float("inf"))
    assert len(set(probed)) == len(probed) and all(known_fit < b < known_over for b in probed)
    assert result["largest_batch"] == max(b for b in range(1, 300) if runner.peak(b) <= budget)
    assert result["boundary_pinned"]


def test_largest_batch_search_stops_at_a_failed_process():
    """An error is not a measurement over the budget: the search stops there, unpinned."""
    runner = CurvedPeaks(0.0, fails_above=150)
    result = models.largest_batch(runner, "fast-torch-keep", ModelSpec("densenet_bc", 40),
                                  {b: {"status": "ok", "peak_bytes": runner.peak(b)} for b in (4, 8)},
                                  argparse.Namespace(budget_gib=100 * MIB / common.GIB))
    assert result["probes"][-1]["status"] == "error" and not result["boundary_pinned"]
    assert runner.peak(result["largest_batch"]) <= 100 * MIB and result["largest_batch"] <= 150


def test_models_subcommand_needs_two_steps_for_its_budget_search(fake_workers, tmp_path):
    argv = ["--model", "densenet_bc-40", "--batch", "2", "--steps", "1", "--impls", "tv-eager",
            "--out", str(tmp_path / "m.json"), "--no-progress", "--no-plot"]
    with pytest.raises(ValueError, match="--steps 2 or more"):
        models.main(argv)
    assert fake_workers == []
    models.main(argv + ["--train-only"])  # no search: one step is enough
    assert fake_workers


def test_kernels_subcommand(tmp_path):
    result = kernels.main(["--batch", "1", "--batch-bc", "1", "--repeats", "1", "--warmup", "0", "--backends", "torch",
                           "--check", "--out", str(tmp_path / "k.json"), "--no-plot", "--no-progress"])
    primitives = {r["primitive"] for r in result["rows"]}
    assert primitives == set(kernels.PRIMITIVES)
    assert {r["impl"] for r in result["rows"]} == {"torch", kernels.BASELINE}
    assert all(r["median_ms"] > 0 and r["GB_per_s"] > 0 and r["roofline_fraction"] > 0 for r in result["rows"])
    assert result["machine"]["copy_bytes_per_s"] > 0 and result["machine"]["matmul_flops_per_s"] > 0
    checked = [r for r in result["rows"] if r["impl"] == "torch"]  # against float32 autograd of the unfused ops
    assert len(checked) == 4 * len(kernels.PRIMITIVES) and all(r["correct"] for r in checked)
    assert json.loads((tmp_path / "k.json").read_text())["rows"] == result["rows"]


def test_kernels_check_finds_a_wrong_result_and_a_failing_call_stops_nothing(tmp_path, monkeypatch, capsys):
    """--check against float32 autograd: a backward that swaps grad_gamma and
    grad_beta is not correct, and bench exits 1 (it exited 0: the GPU check's
    kernel step said ok); a backend call that raises leaves its error in the
    JSON, the other implementations and cases are measured, and bench fails."""
    from densenet_fast.backends.torch_backend import TorchBackend

    backward = TorchBackend.bn_relu_backward
    monkeypatch.setattr(TorchBackend, "bn_relu_backward", lambda *args: backward(*args)[::-1])
    monkeypatch.setattr(TorchBackend, "bn_relu", lambda *args: 1 / 0)
    assert cli.main(["bench", "kernels", "--shapes", "tiny-C24", "tiny-C40", "--repeats", "1", "--warmup", "2",
                     "--backends", "torch", "--primitives", "bn_relu", "bn_relu_backward", "channel_stats", "--check",
                     "--out", str(tmp_path / "k.json"), "--no-plot", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: 2 result(s) did not match" in err and "error: 2 call(s) raised" in err  # (both said)
    assert err.count("ZeroDivisionError") == 2  # one traceback per case (warm-up stops at the first)
    result = json.loads((tmp_path / "k.json").read_text())
    rows = {(r["primitive"], r["shape"], r["impl"]): r for r in result["rows"]}
    for shape in ("tiny-C24", "tiny-C40"):
        assert "ZeroDivisionError" in rows["bn_relu", shape, "torch"]["error"]
        assert rows["bn_relu", shape, kernels.BASELINE]["median_ms"] > 0  # (the whole case used to be lost)
        assert not rows["bn_relu_backward", shape, "torch"]["correct"]
        assert rows["channel_stats", shape, "torch"]["correct"]
    assert "partial" not in result
    assert cli.main(["bench", "kernels", "--shapes", "tiny-C24", "--repeats", "1", "--warmup", "0", "--backends",
                     "torch", "--primitives", "bn_relu_backward", "--check", "--out", str(tmp_path / "k2.json"),
                     "--no-plot", "--no-progress"]) == 1
    assert "error: 1 result(s) did not match the reference" in capsys.readouterr().err


def test_kernels_stopped_early_say_partial(tmp_path, monkeypatch, capsys):
    """Ctrl-C after the first case: exit 130, and the JSON written after that
    case says it is partial."""
    measure, calls = kernels.measure, []

    def stopped(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args)

    monkeypatch.setattr(kernels, "measure", stopped)
    assert cli.main(["bench", "kernels", "--shapes", "tiny-C24", "--primitives", "channel_stats", "bn_relu",
                     "--repeats", "1", "--warmup", "0", "--backends", "torch", "--out", str(tmp_path / "k.json"),
                     "--no-plot", "--no-progress"]) == 130
    result = json.loads((tmp_path / "k.json").read_text())
    assert result["partial"] is True and {row["primitive"] for row in result["rows"]} == {"channel_stats"}


def test_machine_rates_copy_32_mib_and_take_the_faster_product(monkeypatch):
    """The copy moves 32 MiB whatever the dtype (bfloat16 copied 16 MiB, within
    the L3 with its copy); the matmul rate is the faster of the data's dtype and
    float32, which alone is timed fully (one float16 product takes seconds on a
    CPU without 16-bit units)."""
    timed = []

    def time_function(fn, device, warmup, repeats):
        if isinstance(fn, functools.partial):  # a product: bfloat16 ten times slower than float32
            dtype = fn.args[0].dtype
            timed.append((dtype, warmup, repeats))
            return [10.0 if dtype == torch.bfloat16 else 1.0] * repeats
        return [1.0] * repeats

    monkeypatch.setattr(common, "time_function", time_function)
    rates = kernels.machine_rates("cpu", torch.bfloat16, repeats=5)
    assert rates["copy_tensor_bytes"] == 32 * 2**20 and rates["copy_bytes_per_s"] == 2 * 32 * 2**20
    assert rates["matmul_dtype"] == "float32" and rates["matmul_flops_per_s"] == 2 * 1024**3
    assert timed == [(torch.bfloat16, 1, 1), (torch.float32, 1, 1), (torch.float32, 2, 5)]


def test_kernel_costs_count_the_weights_and_the_pooled_pixels():
    """Bytes and FLOPs of an odd-sized (5x5) shape, from the tensors each call
    must read or write: x (50 pixels x 24 channels), the bottleneck (16), the
    transition's 2x2 output pixels of 12 channels, pooled from 4 x 8 pixels."""
    shape = kernels.layer_shapes(1, 1)["tiny-C24"]
    x, weight, out, weight_t, out_t = 2 * 25 * 24, 16 * 24, 2 * 25 * 16, 12 * 24, 2 * 4 * 12
    pooled_x = 2 * 16 * 24
    assert kernels.cost("bn_relu_conv1x1", shape, torch.float32) == (4 * (x + weight + out), 2 * x * 16)
    assert kernels.cost("bn_relu_conv1x1_backward", shape, torch.bfloat16) == \
        (2 * (3 * x + weight + out) + 4 * weight, 4 * x * 16)  # the weight's gradient in float32
    assert kernels.cost("transition", shape, torch.float32) == (4 * (pooled_x + weight_t + out_t), 2 * 8 * 24 * 12)
    assert kernels.cost("transition_backward", shape, torch.float64) == \
        (8 * (pooled_x + x + weight_t + out_t) + 8 * weight_t, 4 * 8 * 24 * 12)


def test_depth_predicts_with_the_workers_threads():
    """bench depth --threads: the predictions take the workers' threads (the
    CPU kernels' scratch is per thread; they took this process's)."""
    parser = argparse.ArgumentParser()
    depth.add_arguments(parser)
    assert depth.step_setup(parser.parse_args(["--threads", "7"])).threads == 7
    assert depth.step_setup(parser.parse_args([])).threads == torch.get_num_threads()


def test_cpp_cpu_preset_runs_through_the_command_line(tmp_path):
    """benchmarks/cpp_cpu.py: the preset's options, then the user's; errors are
    the command line's (one line, exit 2; it gave a traceback)."""
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "cpp_cpu.py"), "kernels"]
    tiny = ["--shapes", "tiny-C24", "--primitives", "channel_stats", "--repeats", "1", "--warmup", "0", "--no-plot",
            "--no-progress", "--out", str(tmp_path / "k.json")]
    bad = subprocess.run(script + tiny + ["--backends", "nosuch"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr, bad.stderr
    done = subprocess.run(script + tiny + ["--backends", "torch"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    settings = json.loads((tmp_path / "k.json").read_text())["environment"]["settings"]
    assert settings["batch_bc"] == 64 and settings["backends"] == ["torch"]


def test_presets_never_replace_a_result(tmp_path, monkeypatch):
    """A preset given no --out writes under a fresh name (memory_depth.py and
    policy_costs.py wrote over their committed JSON); one given --out keeps it."""
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    (tmp_path / "memory_depth_cpu_b64.json").write_text("{}")
    fresh = common.out_unless_given(["--repeats", "3"], "memory_depth_cpu_b64.json")
    assert fresh == ["--out", str(tmp_path / "memory_depth_cpu_b64-2.json")]
    assert common.out_unless_given(["--out", "a.json"], "x.json") == common.out_unless_given(["--out=a.json"], "x.json") == []
    preset = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_depth.py"
    assert "--out" not in preset.read_text().split("DEPTH_SWEEP = ", 1)[1].split("\n\n", 1)[0]


def test_kernels_run_float32_without_tf32_and_with_the_threads_asked(tmp_path, monkeypatch):
    """TF32 is off while bench kernels runs (the matmul rate and --check assume
    float32 products; the Triton kernels follow cuDNN's switch), --threads set;
    both restored after."""
    from densenet_fast.backends.torch_backend import TorchBackend

    seen = []
    channel_stats = TorchBackend.channel_stats
    monkeypatch.setattr(TorchBackend, "channel_stats", lambda *args: (
        seen.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32), channel_stats(*args))[1])
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    threads = torch.get_num_threads()
    result = kernels.main(["--shapes", "tiny-C24", "--repeats", "1", "--warmup", "0", "--backends", "torch",
                           "--primitives", "channel_stats", "--threads", "3", "--out", str(tmp_path / "k.json"),
                           "--no-plot", "--no-progress"])
    assert seen and not any(seen) and torch.backends.cudnn.allow_tf32
    assert result["environment"]["torch_threads"] == 3 and torch.get_num_threads() == threads  # --threads, restored


def test_cli_runs_bench(fake_workers, tmp_path):
    argv = ["bench", "depth", "--depths", "10", "16", "--budget-gib", "0", "--out", str(tmp_path / "c.json"), "--no-plot"]
    assert cli.build_parser("bench").parse_args(argv).bench_run is depth.run
    assert cli.main(argv) == 0
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["environment"]["settings"]["depths"] == [10, 16]
    assert written["environment"]["command"].startswith("python")


def test_a_result_without_out_replaces_no_earlier_one(fake_workers, monkeypatch, tmp_path):
    """Given no --out, a run writes beside the results in benchmarks/results/
    under a name of its own (it overwrote the committed ones)."""
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    monkeypatch.setattr(common, "RESULTS_DIR", results)
    committed = results / "depth_cpu_b16.json"
    committed.write_text("{}\n")
    argv = ["bench", "depth", "--depths", "10", "--budget-gib", "0", "--batch", "16", "--no-plot", "--no-progress"]
    assert cli.main(argv) == 0 and cli.main(argv) == 0
    assert committed.read_text() == "{}\n"
    assert sorted(p.name for p in results.iterdir()) == ["depth_cpu_b16-2.json", "depth_cpu_b16-3.json",
                                                          "depth_cpu_b16.json"]
    assert json.loads((results / "depth_cpu_b16-3.json").read_text())["environment"]["settings"]["depths"] == [10]


def test_failed_workers_say_why_and_bench_fails_when_nothing_was_measured(monkeypatch, capsys, tmp_path):
    """Each failure's reason on stderr (it was in the JSON only), and exit status
    1 when no implementation measured anything (it was 0)."""
    def worker(spec, timeout_s, rss_limit_bytes):
        if spec["impls"] == ["tv-eager"] and healthy:
            return {"status": "ok", "peak_bytes": 1e6, "baseline_bytes": 0, "step_seconds": [0.1, 0.1]}
        return {"status": "error", "error": "InputError('input images of 8x8 are too small')"}

    monkeypatch.setattr(common, "_run_worker", worker)
    argv = ["bench", "models", "--quick", "--impls", "tv-eager", "fast-torch-keep", "--warmup", "0", "--repeats", "1",
            "--no-plot", "--no-progress", "--out", str(tmp_path / "m.json")]
    healthy = False
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "tv-eager: error: InputError('input images of 8x8 are too small')" in err
    assert "fast-torch-keep: error: InputError('input images of 8x8 are too small')" in err
    assert "error: nothing was measured" in err
    healthy = True
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "nothing was measured" not in err
    table = out.splitlines()[1:5]  # one header (it was repeated per implementation), a row each, lined up
    assert table[0].split() == models.QUICK_COLUMNS and set(table[1]) == {"-", " "}
    assert [line.split()[:2] for line in table[2:]] == [["tv-eager", "ok"], ["fast-torch-keep", "error"]]
    assert len({len(line) for line in table}) == 1


def test_ctrl_c_stops_the_worker_too(monkeypatch, capsys, tmp_path):
    """Ctrl-C in the benchmark ends its worker (left running, it measured for
    nobody) and bench exits 130 with one line, not a traceback."""
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.subprocess, "Popen", Recorded)
    monkeypatch.setattr(common, "_watch", interrupted)
    argv = ["bench", "models", "--quick", "--impls", "tv-eager", "--no-plot", "--no-progress", "--out",
            str(tmp_path / "m.json")]
    assert cli.main(argv) == 130
    assert "bench: interrupted" in capsys.readouterr().err
    workers = [p for p in started if "densenet_fast.bench.worker" in p.args]
    assert len(workers) == 1 and workers[0].returncode == -signal.SIGKILL  # stopped, not running on


def test_models_writes_each_implementation_before_the_next(fake_workers, monkeypatch, tmp_path):
    """Stopped during its second implementation, bench models keeps the first in
    its JSON (it wrote only at the end)."""
    memory = harness.Runner.memory

    def stopped_at_the_second(self, impl, *args, **kwargs):
        if impl == "fast-torch-keep":
            raise KeyboardInterrupt
        return memory(self, impl, *args, **kwargs)

    monkeypatch.setattr(harness.Runner, "memory", stopped_at_the_second)
    out = tmp_path / "m.json"
    assert cli.main(["bench", "models", "--model", "densenet_bc-10", "--batch", "2", "--impls", "tv-eager",
                     "fast-torch-keep", "--budget-gib", "0", "--no-plot", "--no-progress", "--out", str(out)]) == 130
    written = json.loads(out.read_text())
    assert written["partial"] and [row["impl"] for row in written["rows"]] == ["tv-eager"]


def test_worker_process_measures_a_step():
    spec = {"mode": "memory", "impls": ["fast-torch-recompute"], "model": ModelSpec("densenet_bc", 10).to_dict(),
            "batch": 4, "image_size": 8, "device": "cpu", "steps": 3, "warmup_batch": 2,
            "malloc_mmap_threshold": harness.MMAP_THRESHOLD}
    result = common.run_worker(spec, timeout_s=120)
    assert result["status"] == "ok", result
    assert 0 < result["peak_bytes"] < 200 * MIB and result["baseline_bytes"] > 0
    assert len(result["step_seconds"]) == len(result["step_peak_bytes"]) == 3
    assert result["peak_bytes"] == max(result["step_peak_bytes"]) and min(result["step_peak_bytes"]) > 0


def test_peak_sampler_windows():
    """Each restart() returns the peak of its own window, not an earlier one's."""
    with common.AnonPeakSampler() as sampler:
        # A private anonymous mapping of its own, returned by close(). (A 64 MiB tensor is not always:
        # glibc serves it from a free heap chunk, resident before and after, if earlier tests left one.)
        block = mmap.mmap(-1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, 64 * MIB, mmap.PAGESIZE):  # touched: resident
            block[offset] = 1
        with_block = sampler.restart()
        block.close()
        sampler.restart()  # the window that ends here began with the block still there
        without_block = sampler.restart()
    assert with_block - without_block > 32 * MIB


def test_implementations_share_weights_and_agree():
    """Same weights and inputs: torchvision (CIFAR stem) and densenet_fast give the same outputs."""
    spec = ModelSpec("densenet_bc", 16, growth_rate=4)
    tv, fast = build("tv-eager", spec, "cpu", False, seed=3), build("fast-torch-keep", spec, "cpu", False, seed=5)
    share_weights([tv, fast])
    x, y = make_inputs(spec, 3, 9, "cpu", False)
    assert x.std() > 0.5
    Step(tv, x, y, train=False, autocast_dtype=None)  # sets eval mode
    Step(fast, x, y, train=False, autocast_dtype=None)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), tv(x), rtol=1e-4, atol=1e-5)


def test_models_subcommand_takes_monai_models_and_volumes(fake_workers, tmp_path):
    result = models.main(["--model", "monai-densenet121", "--image-size", "8x16x12", "--batch", "2", "--train-only",
                          "--impls", "monai-eager", "monai-ckpt", "fast-torch-keep", "--out", str(tmp_path / "v.json"),
                          "--no-progress"])
    assert result["model"]["name"] == "monai-densenet121-3d"
    assert [r["impl"] for r in result["rows"]] == ["monai-eager", "monai-ckpt", "fast-torch-keep"]
    assert {batch for _, _, batch in fake_workers} == {2}  # --train-only: no half batch, no search
    for row in result["rows"]:
        assert "infer_peak_MiB" not in row and "infer_images_per_s" not in row
        assert row["train_peak_MiB_vs_monai"] == pytest.approx(row["train_peak_MiB"] / result["rows"][0]["train_peak_MiB"])
    written = json.loads((tmp_path / "v.json").read_text())
    assert written["environment"]["settings"]["image_size"] == [8, 16, 12]
    with pytest.raises(SystemExit):
        models.main(["--image-size", "8x0x8"])
    with pytest.raises(ValueError, match="several sides are for the MONAI models"):
        models.main(["--image-size", "8x8x8", "--impls", "tv-eager", "--out", str(tmp_path / "x.json")])


def test_monai_implementations_share_weights_and_agree():
    """MONAI eager, MONAI checkpointed per dense layer and densenet_fast.monai: same
    weights and inputs give the same gradients (1-D, float64: the last block must
    see more than one value per channel, or its batch norm's gradient is rounding
    noise) and the same outputs on volumes."""
    pytest.importorskip("monai")
    from densenet_fast.bench import monai_impls

    impls = ["monai-eager", "monai-ckpt", "fast-torch-keep"]
    spec = monai_impls.parse("monai-densenet121", [200])
    built = {impl: build(impl, spec, "cpu", False, seed=i).double() for i, impl in enumerate(impls)}
    share_weights(list(built.values()))
    x, y = make_inputs(spec, 2, [200], "cpu", False)
    assert x.shape == (2, 1, 200) and x.std() > 0.5
    grads = {}
    for impl, model in built.items():
        torch.nn.functional.cross_entropy(model(x.double()), y).backward()
        grads[impl] = [p.grad for p in model.parameters()]
    for impl in impls[1:]:
        for mine, theirs in zip(grads[impl], grads["monai-eager"]):
            torch.testing.assert_close(mine, theirs, rtol=1e-7, atol=1e-9)
    volumes = monai_impls.parse("monai-densenet121", [29, 32, 30])
    built = [build(impl, volumes, "cpu", True, seed=i).eval() for i, impl in enumerate(impls[::2])]
    share_weights(built)
    x, _ = make_inputs(volumes, 1, [29, 32, 30], "cpu", True)
    assert x.shape == (1, 1, 29, 32, 30) and x.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        outputs = [model(x) for model in built]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=1e-4, atol=1e-5)


def test_depth_subcommand_takes_monai_models_and_volumes(fake_workers, tmp_path):
    """``--family monai``: MONAI's DenseNet-BC-shaped model on volumes, its
    parameters counted exactly, references MONAI eager and checkpointed, and the
    search pins each boundary, from the planner's prediction for densenet_fast
    and from the sweep's fit for MONAI's."""
    pytest.importorskip("monai")
    from monai.networks.nets import DenseNet
    from densenet_fast.bench import monai_impls

    impls = ["monai-eager", "monai-ckpt", "fast-torch-recompute"]
    budget = 40 * MIB
    result = depth.main(["--family", "monai", "--image-size", "16x20x16", "--depths", "16", "28", "40",
                         "--reference-depth", "28", "--batch", "2", "--budget-gib", str(budget / common.GIB),
                         "--impls", *impls, "--out", str(tmp_path / "m.json"), "--no-progress", "--no-plot"])
    spec = monai_impls.bc_spec(40, 12, [16, 20, 16])
    assert spec.name == "monai-densenet_bc-3d"
    theirs = DenseNet(**monai_impls.constructor_arguments(spec))
    parameters = monai_impls.architecture(spec).parameter_count()
    assert parameters == sum(p.numel() for p in theirs.parameters())
    point = next(p for p in result["points"] if p["depth"] == 40)
    assert point["persistent_bytes"] == 3 * 4 * parameters  # SGD: momentum
    settings = argparse.Namespace(family="monai", growth_rate=12, dtype="float32", optimizer="sgd",
                                  image_size=[16, 20, 16])
    for found in result["budget_search"]:
        truth = max(d for d in range(10, 3000, 6) if depth.persistent_bytes(settings, d) +
                    fake_peak(found["impl"], ModelSpec("x", d), 2) <= budget)
        assert (found["deepest_fitting"], found["shallowest_exceeding"]) == (truth, truth + 6), found
        assert ("predicted_total_bytes" in found["at_deepest"]) == found["impl"].startswith("fast-")
    assert set(result["ratios_at_reference_depth"]["fast-torch-recompute"]) == {
        "memory_over_monai-eager", "memory_over_monai-ckpt", "time_over_monai-eager", "time_over_monai-ckpt"}
    assert result["policy_costs"] == {}


def test_bad_points_are_refused_before_any_measurement_and_quick_takes_no_steps(fake_workers, capsys, tmp_path):
    """A bad --points entry is refused before the first point is measured (after
    it, before); --quick, which runs --warmup + --repeats steps per worker,
    refuses --steps (it ignored it), and runs without it whatever --budget-gib
    (it searches no largest batch)."""
    argv = ["bench", "memory", "--points", "densenet_bc-10:2", "densenet_bc-11:2", "--out", str(tmp_path / "m.json")]
    assert cli.main(argv) == 2
    assert "got 11" in capsys.readouterr().err and fake_workers == []
    for points, message in ((["densenet_bc-abc:2"], "takes a whole number of layers, got 'densenet_bc-abc'"),
                            (["densenet_bc-10:²"], "a point is MODEL:BATCH, got 'densenet_bc-10:²'")):  # (int())
        assert cli.main(["bench", "memory", "--points", *points, "--out", str(tmp_path / "m.json")]) == 2
        assert message in capsys.readouterr().err and fake_workers == []
    for argv, message in ((["memory", "--points", "densenet_bc-10:2", "--compile"], "--compile adds"),
                          (["memory", "--points", "densenet_bc-10:2", "densenet_bc-10:0"], "batch must be a positive"),
                          (["memory", "--points", "monai-densenet_bc-16:1", "--image-size", "8x8x8"], "too small"),
                          (["memory", "--points", "densenet_bc-10:2", "--drop-rate", "1"], "drop_rate must be in [0, 1)"),
                          (["models", "--model", "densenet121", "--growth-rate", "4"], "--growth-rate is for"),
                          (["kernels", "--device", "cpu", "--cuda-graphs"], "give --device cuda")):
        assert cli.main(["bench", *argv, "--out", str(tmp_path / "m.json")]) == 2  # (they were ignored)
        assert message in capsys.readouterr().err and fake_workers == []
    quick = ["bench", "models", "--quick", "--warmup", "0", "--repeats", "1", "--impls", "tv-eager", "--no-plot",
             "--no-progress", "--out", str(tmp_path / "q.json")]
    assert cli.main(quick + ["--steps", "1"]) == 2
    assert "--steps is for the other modes" in capsys.readouterr().err and fake_workers == []
    assert cli.main(quick + ["--budget-gib", "1"]) == 0
    assert fake_workers and json.loads((tmp_path / "q.json").read_text())["rows"][0]["status"] == "ok"
    calls = list(fake_workers)
    assert cli.main(quick + ["--max-minutes", "1e-9"]) == 1  # its time spent before the first started: it said 0
    assert "nothing was measured" in capsys.readouterr().err and fake_workers == calls


@pytest.mark.parametrize("subcommand, argv", [
    (kernels, ["--repeats", "0"]), (kernels, ["--batch-bc", "-2"]), (kernels, ["--device", "foo"]),
    (kernels, ["--device", "cuda"] if not torch.cuda.is_available() else ["--warmup", "-1"]),
    (models, ["--steps", "0"]), (models, ["--batch", "0"]), (models, ["--budget-gib", "-1"]),
    (models, ["--max-minutes", "nan"]), (depth, ["--budget-gib", "inf"]), (depth, ["--growth-rate", "0"]),
])
def test_bad_bench_numbers_and_devices_are_usage_errors(subcommand, argv, fake_workers, capsys, tmp_path):
    """argparse refuses them (exit status 2) before anything is measured."""
    with pytest.raises(SystemExit) as exit_:
        subcommand.main(argv + ["--no-plot", "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert fake_workers == []


def test_a_result_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """Found when it is written, after --out was checked (a full disk, a folder
    removed meanwhile): CommandFailed, exit status 1 (it was a traceback)."""
    common.write_json({"x": 1}, tmp_path / "r.json")
    with pytest.raises(cli.CommandFailed, match="cannot write .*r.json/x.json \\(File exists\\)"):
        common.write_json({"x": 1}, tmp_path / "r.json" / "x.json")  # (its clean-up raised in turn)
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(cli.CommandFailed, match="cannot write .*r.json \\(No space left on device\\)"):
        common.write_json({"x": 2}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": 1} and os.listdir(tmp_path) == ["r.json"]


def test_bad_output_paths_and_result_files_are_usage_errors(fake_workers, capsys, tmp_path):
    """Refused before anything is measured: an --out under a file or naming a
    directory, a --repredict file that is missing, not JSON or another benchmark's."""
    (tmp_path / "file").write_text("")
    (tmp_path / "depth.json").write_text(json.dumps({"benchmark": "depth", "environment": {}, "rows": []}))
    (tmp_path / "read-only.json").write_text("")
    (tmp_path / "read-only.json").chmod(0o444)
    (tmp_path / "plot-taken.png").mkdir()
    (tmp_path / "run.1.png").mkdir()  # the plot of --out run.1 (with_suffix made it run.png, run.2's too)
    assert common.plot_path(tmp_path / "run.2") == tmp_path / "run.2.png"
    assert common.plot_path(tmp_path / "r.JSON") == tmp_path / "r.png"
    cases = [(kernels, ["--out", str(tmp_path / "file" / "x.json")], "not a writable directory"),
             (kernels, ["--out", str(tmp_path / "run.1")], "run.1.png: it is a directory"),
             (kernels, ["--out", str(tmp_path / "x.png")], "give a name such as"),  # the plot went over the JSON
             (kernels, ["--out", str(tmp_path / "plot-taken.json")], "plot-taken.png: it is a directory"),
             (models, ["--out", str(tmp_path)], "is a directory"),
             (kernels, ["--out", str(tmp_path / ("x" * 300))], "File name too long"),
             (bench_memory, ["--repredict", str(tmp_path / "missing.json")], "cannot read"),
             (bench_memory, ["--repredict", str(tmp_path / "file")], "cannot read"),
             (bench_memory, ["--repredict", str(tmp_path / "depth.json")], "not a result of bench memory"),
             (depth, ["--reuse-sweep", str(tmp_path / "missing.json")], "cannot read"),
             (depth, ["--reuse-sweep", str(tmp_path / "depth.json")], "not a result of bench depth")]
    if os.geteuid() != 0:  # root writes read-only files
        cases.append((kernels, ["--out", str(tmp_path / "read-only.json")], "a directory or read-only"))
    for subcommand, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            subcommand.main(argv + ["--no-plot"])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv
    assert fake_workers == []


def test_memory_repredict_predicts_a_result_again(fake_workers, monkeypatch, tmp_path):
    """--repredict measures nothing, keeps the measurements and predicts them as
    the model does now; --no-plot of the command line holds (the file's does not)."""
    memory = harness.Runner.memory
    monkeypatch.setattr(harness.Runner, "memory", lambda *args, **kwargs: {
        **memory(*args, **kwargs), "persistent_bytes": MIB})
    measured = bench_memory.main(["--points", "densenet_bc-16:2", "densenet_bc-22:3", "--policies", "keep",
                                  "recompute", "--out", str(tmp_path / "m.json"), "--no-progress"])
    calls = list(fake_workers)
    again = bench_memory.main(["--repredict", str(tmp_path / "m.json"), "--out", str(tmp_path / "again.json"),
                               "--no-plot"])
    assert fake_workers == calls and (tmp_path / "m.png").exists() and not (tmp_path / "again.png").exists()
    assert again["rows"] == measured["rows"] == json.loads((tmp_path / "again.json").read_text())["rows"]
    assert measured["environment"]["settings"]["multiprocessors"] is None  # a GPU's count, recorded for CUDA
    on_a100 = argparse.Namespace(**{**measured["environment"]["settings"], "device": "cuda", "multiprocessors": 108})
    assert bench_memory.setup_of(on_a100, 4).multiprocessors == 108  # predicted again for the GPU measured


def test_models_checks_implementation_names_and_plans_auto_under_the_budget(fake_workers, monkeypatch, tmp_path):
    argv = ["--model", "densenet_bc-16", "--batch", "2", "--train-only", "--no-progress", "--no-plot",
            "--out", str(tmp_path / "m.json")]
    with pytest.raises(ValueError, match="unknown implementation.*fast-cpp-kep, bogus"):
        models.main(argv + ["--impls", "tv-eager", "fast-cpp-kep", "bogus"])
    with pytest.raises(ValueError, match="give --budget-gib above 0"):
        models.main(argv + ["--impls", "fast-torch-auto", "--budget-gib", "0"])
    budgets = []
    memory = harness.Runner.memory
    monkeypatch.setattr(harness.Runner, "memory", lambda self, impl, *args, memory_budget=None, **kwargs: (
        budgets.append((impl, memory_budget)), memory(self, impl, *args, memory_budget=memory_budget, **kwargs))[1])
    models.main(argv + ["--impls", "fast-torch-keep", "fast-torch-auto", "--budget-gib", "0.25"])
    assert set(budgets) == {("fast-torch-keep", None), ("fast-torch-auto", 0.25 * common.GIB)}


@pytest.mark.parametrize("argv, message", [
    (["--family", "monai", "--image-size", "8x16x16"], "sides of at least 16"),
    (["--image-size", "16x16x16"], "several sides are for --family monai"),
    (["--budget-gib", "1", "--steps", "1"], "--steps 2 or more"),
])
def test_depth_subcommand_refuses_what_it_cannot_measure(fake_workers, tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        depth.main(argv + ["--out", str(tmp_path / "x.json"), "--no-progress", "--no-plot"])
    assert fake_workers == []


def test_depth_search_writes_every_probe_before_the_next(fake_workers, monkeypatch, tmp_path):
    """A probe can take an hour: each one is on disk before the next starts."""
    out = tmp_path / "d.json"
    fake = harness.Runner.memory
    on_disk = []

    def memory(self, impl, spec, *args, **kwargs):
        if out.exists():
            on_disk.append(len([p for p in json.loads(out.read_text())["points"] if p["kind"] == "probe"]))
        return fake(self, impl, spec, *args, **kwargs)

    monkeypatch.setattr(harness.Runner, "memory", memory)
    result = depth.main(["--depths", "16", "28", "40", "--batch", "8", "--budget-gib", str(600 * MIB / common.GIB),
                         "--impls", "tv-eager", "--out", str(out), "--no-progress", "--no-plot"])
    probes = len([p for p in result["points"] if p["kind"] == "probe"])
    assert probes >= 2 and on_disk[-probes:] == list(range(probes))


def test_policy_costs_times_auto_against_a_fixed_policy(tmp_path):
    """benchmarks/policy_costs.py with auto: both orders timed, auto's ratio over
    recompute beside the planner's, and the assignment auto chose."""
    out = tmp_path / "costs.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "policy_costs.py"
    subprocess.run([sys.executable, str(script), "--depths", "16", "--batch", "2", "--repeats", "1",
                    "--policies", "recompute", "auto", "--budget-gib", "0.25", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    row, = json.loads(out.read_text())["rows"]
    assert len(row["auto_s_by_order"]) == len(row["recompute_s_by_order"]) == 2
    assert row["auto_policies"] == ["keep", "keep", "keep"]  # everything fits 256 MiB at depth 16
    assert row["auto_over_recompute"] > 0 and row["auto_over_recompute_predicted"] < 1


# -- what the published numbers are made of ------------------------------------------------------
def test_memory_errors_are_the_prediction_against_the_measurement(tmp_path, capsys):
    """``error`` is predicted / measured - 1 for the step, ``total_error`` the same
    for persistent + step, and the worst error is the largest in size."""
    settings = argparse.Namespace(image_size=32, growth_rate=12, drop_rate=0.0, dtype="float32", autocast=None,
                                  device="cpu", backend="torch", optimizer="sgd", threads=2, offload=False,
                                  no_plot=True)
    predicted = bench_memory.row(settings, "densenet_bc-16:2", "keep", {"status": "error"})
    step, persistent = predicted["predicted_step_bytes"], 3 * MIB
    rows = [bench_memory.row(settings, point, "keep", {"status": "ok", "peak_bytes": step / (1 + error),
                                                       "persistent_bytes": persistent})
            for point, error in (("densenet_bc-16:2", -0.3), ("densenet_bc-16:2", 0.1))]
    assert [r["error"] for r in rows] == pytest.approx([-0.3, 0.1])
    total = predicted["predicted_persistent_bytes"] + step
    assert rows[0]["total_error"] == pytest.approx(total / (persistent + step / 0.7) - 1)
    result = bench_memory.finish({}, rows, settings, tmp_path / "m.json")
    assert result["worst"]["error"]["error"] == pytest.approx(-0.3)
    assert "worst error of the step (peak above persistent): -30.0%" in capsys.readouterr().out


def test_every_implementation_gets_the_same_inputs_and_tv_memeff_checkpoints():
    spec = ModelSpec("densenet_bc", 10, growth_rate=4)
    torch.manual_seed(0)
    first = make_inputs(spec, 3, 8, "cpu", False)
    torch.manual_seed(1)  # whatever drew from torch's generator before
    assert all(torch.equal(a, b) for a, b in zip(first, make_inputs(spec, 3, 8, "cpu", False)))
    for impl, checkpointed in (("tv-memeff", True), ("tv-eager", False)):
        layers = [m for m in build(impl, spec, "cpu", False).modules() if hasattr(m, "memory_efficient")]
        assert layers and all(layer.memory_efficient is checkpointed for layer in layers), impl


def test_timed_steps_share_weights_after_untimed_warm_up_steps(monkeypatch):
    """``bench models``' timing worker: every implementation's timed steps run on
    the same weights and inputs, each after ``warmup`` untimed steps."""
    calls, timed = {}, []
    call = Step.__call__
    monkeypatch.setattr(Step, "__call__", lambda step: (calls.__setitem__(id(step), calls.get(id(step), 0) + 1),
                                                         call(step))[1])
    monkeypatch.setattr(common, "time_once", lambda step, device: (
        timed.append((calls.get(id(step), 0), {k: v.clone() for k, v in step.model.state_dict().items()}, step.x)),
        step(), 1.0)[2])
    spec = {"mode": "time", "impls": ["tv-eager", "fast-torch-keep"], "batch": 2, "image_size": 8, "device": "cpu",
            "model": ModelSpec("densenet_bc", 10, 4).to_dict(), "warmup": 2, "repeats": 1}
    result = worker.measure_time(spec)
    assert {r["status"] for r in result["impls"].values()} == {"ok"} and len(timed) == 2
    (before_a, weights_a, x_a), (before_b, weights_b, x_b) = timed
    assert before_a == before_b == 2
    assert torch.equal(x_a, x_b) and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_failures_are_named_as_what_they_are(monkeypatch, tmp_path):
    """An out-of-memory error of either device is "oom" (a finding, not a failure),
    a model whose own planner refuses is "refused" (it does not fit), a worker
    that printed no result is an "error", a timeout measured nothing, and a
    result name whose plot exists is taken."""
    assert worker.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert worker.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not worker.is_out_of_memory(ValueError("bad input"))
    monkeypatch.setattr(worker, "measure_memory", lambda spec: (_ for _ in ()).throw(
        planner.MemoryBudgetError("nothing fits")))
    assert worker.run({"mode": "memory"})["status"] == "refused"
    args = argparse.Namespace(budget_gib=1.0)
    assert depth.verdict({"status": "refused"}, args) is False and depth.verdict({"status": "timeout"}, args) is None
    failed = common.outcomes["failed"]
    monkeypatch.setattr(common, "_run_worker", lambda spec, timeout_s, limit: {"status": "timeout", "wall_s": 1.0})
    common.run_worker({"impls": ["fast-torch-keep"]}, 1.0)
    assert common.outcomes["failed"] == failed + 1
    monkeypatch.undo()
    monkeypatch.setattr(common.sys, "executable", "/bin/false")  # a worker that exits without a result line
    assert common._run_worker({"impls": ["fast-torch-keep"]}, 30.0, None)["status"] == "error"
    monkeypatch.undo()
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    (tmp_path / "x.png").write_bytes(b"")
    assert common.new_result_path("x.json").name == "x-2.json"


def test_warm_up_calls_and_steps_are_not_timed(fake_workers, monkeypatch, tmp_path):
    calls = []
    assert common.time_function(lambda: calls.append(1), "cpu", warmup=2, repeats=3) and len(calls) == 5
    monkeypatch.setattr(harness.Runner, "memory", lambda self, impl, spec, batch, limit, timeout, train=True,
                        memory_budget=None: {"status": "ok", "peak_bytes": MIB, "baseline_bytes": 0,
                                             "step_seconds": [10.0, 10.0, 1.0, 2.0, 3.0]})
    result = models.main(["--model", "densenet_bc-16", "--batch", "2", "--quick", "--impls", "fast-torch-keep",
                          "--warmup", "2", "--repeats", "3", "--no-progress", "--out", str(tmp_path / "q.json")])
    assert result["rows"][0]["train_step_s"] == 2.0  # the median of the three timed steps


def test_runner_gives_the_worker_the_budget_of_auto(monkeypatch):
    sent = []
    monkeypatch.setattr(common, "run_worker", lambda spec, timeout_s, limit=None: sent.append(spec) or {})
    args = argparse.Namespace(image_size=8, device="cpu", dtype="float32", autocast=None, channels_last=False,
                              optimizer="sgd", steps=2, warmup=1, repeats=1, threads=1, full_warmup=False,
                              malloc_default=False)
    harness.Runner(args).memory("fast-torch-auto", ModelSpec("densenet_bc", 16), 2, None, 10.0,
                                memory_budget=64 * MIB)
    assert sent[0]["memory_budget"] == 64 * MIB


def watch(code: str, timeout_s: float, limit_bytes: float) -> str:
    """Why ``common._watch`` stopped a Python child running ``code`` ("done" when it ran to its end)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        return common._watch(proc, lines, time.monotonic(), timeout_s, limit_bytes)[0] or "done"
    finally:
        proc.kill()
        proc.wait()
        reader.join(timeout=5)


def test_the_watcher_limits_the_growth_above_the_baseline_and_names_a_timeout():
    """A worker is stopped when its resident memory grows more than the limit
    above the baseline it announces (not when the baseline itself is above the
    limit), and one that outlives its time is a timeout, not over the budget."""
    grows = ("import time\nheld = b'1' * (200 * 2**20)\n"
             "rss = int(open('/proc/self/statm').read().split()[1]) * {page}\n"
             "print({prefix!r} + str(rss), flush=True)\nmore = b'2' * (20 * 2**20)\ntime.sleep(1)\n")
    code = grows.format(page=mmap.PAGESIZE, prefix=common.BASELINE_PREFIX)
    assert watch(code, 60, 50 * MIB) == "done"  # 20 MiB above a baseline of 200 MiB and more
    assert watch(code, 60, 5 * MIB) == "over_budget"
    assert watch("import time\ntime.sleep(30)\n", 0.5, 50 * MIB) == "timeout"
