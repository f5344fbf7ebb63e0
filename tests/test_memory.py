"""The memory model and the planner: predictions against a fresh process's
measured step, the planner's choice against brute force, the error when nothing
fits, the ``plan`` command's JSON, and per-block policies (recompute="auto"
included) against torchvision in float64."""

import copy
import itertools
import json
import os
import subprocess
import sys
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from densenet_fast import (MemoryBudgetError, available_backends, cli, densenet121, densenet_bc, memory, plan,
                           planner)
from densenet_fast import train as trainer
from densenet_fast.bench import common, harness, monai_impls
from densenet_fast.bench.memory import STEADY_STEPS
from densenet_fast.bench.impls import ModelSpec
from densenet_fast.memory import (Architecture, OptimizerSpec, Setup, StepSimulation, format_bytes, parse_bytes,
                                  predict)
from densenet_fast.models import MemoryPlanNotice
from densenet_fast.monai import DenseNet as MonaiDenseNet
from densenet_fast.monai import DenseNet121 as MonaiDenseNet121
from helpers import check_training_float64, make_pair
from helpers import one_thread  # noqa: F401  (fixture)

BC40 = Architecture.named("densenet_bc", 40)


def test_parse_and_format_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("2 GB") == 2 * 10**9 and parse_bytes(512) == 512
    assert parse_bytes("1.5MiB") == 3 * 2**19
    assert parse_bytes("8gb") == 8 * 10**9 and parse_bytes("512mib") == 2**29 and parse_bytes("1k") == 1024
    assert parse_bytes(np.int64(2**40)) == 2**40 and parse_bytes(np.float32(1024.5)) == 1024  # NumPy's numbers
    for bad in ("lots", "-1GiB", "1e", 0, "0.5", 0.3, "1e-12GiB", "inf", "1e400", "nan", float("nan"), np.float64("nan")):
        with pytest.raises(ValueError, match="memory"):
            parse_bytes(bad)
    for bad in ("1.5", "2.5B", "1.5 b"):  # a unit forgotten
        with pytest.raises(ValueError, match="in bytes is a whole number.*'(1.5|2.5)GiB'"):
            parse_bytes(bad)
    assert parse_bytes("1.5e9") == 1500000000 and parse_bytes("1.5 kB") == 1500
    assert parse_bytes("2PiB") == 2**51 and parse_bytes("1 PB") == 10**15
    assert parse_bytes("2EiB") == 2**61 and parse_bytes("1 EB") == 10**18 and parse_bytes(format_bytes(2**62)) == 2**62
    for bad in (True, np.bool_(True), [1], None):
        with pytest.raises(TypeError, match="a memory budget is a number of bytes"):
            parse_bytes(bad)
    assert format_bytes(3 * 2**29) == "1.5 GiB" and format_bytes(1000 * 2**20) == "1000 MiB"
    assert format_bytes(3 * 2**40) == "3 TiB"
    assert format_bytes(5000 * 2**40) == "4.88 PiB" and format_bytes(1e30) == "8.67e+11 EiB"  # (909494701772928256 TiB)


def test_persistent_bytes_are_parameters_gradients_and_optimizer_state():
    params = BC40.parameter_count() * 4
    assert BC40.parameter_count() == sum(p.numel() for p in densenet_bc(40).parameters())
    for optimizer, state in (("sgd", 1), ("sgd-plain", 0), ("adam", 2)):
        p = predict(BC40, Setup(4, 32, optimizer=OptimizerSpec.parse(optimizer)), "keep")
        assert p.persistent_bytes == params * (2 + state)


def test_recompute_is_leaner_and_memory_grows_with_batch_and_depth():
    setup = Setup(16, 32)
    keep, recompute = predict(BC40, setup, "keep"), predict(BC40, setup, "recompute")
    assert recompute.step_bytes < keep.step_bytes and keep.step["kept_bottlenecks"] > 0
    assert "kept_bottlenecks" not in recompute.step
    assert predict(BC40, setup.with_batch(32), "keep").step_bytes > keep.step_bytes
    assert predict(BC40.with_depth(100), setup, "keep").step_bytes > keep.step_bytes


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_dropouts_bytes_match_a_fresh_process(policy):
    """Dropout's masks and products raise the measured step by what the model
    predicts (within a quarter; 3 MiB for DenseNet-BC-40 at batch 64, measured
    3.0-3.2 MiB, noise about 0.1 MiB), and the prediction with dropout is within
    10% of the measurement."""
    backend, arch = cpu_backend(), Architecture.named("densenet_bc", 40, drop_rate=0.2)
    setup = Setup(64, 32, backend=backend, threads=2)
    plain = measure_in_a_fresh_process(ModelSpec("densenet_bc", 40), 64, 32, policy, backend)
    dropped = measure_in_a_fresh_process(ModelSpec("densenet_bc", 40, drop_rate=0.2), 64, 32, policy, backend)
    predicted, predicted_plain = predict(arch, setup, policy), predict(BC40, setup, policy)
    added = predicted.step_bytes - predicted_plain.step_bytes
    assert added > 2 * 2**20
    assert abs((dropped["peak_bytes"] - plain["peak_bytes"]) / added - 1) < 0.25, (plain, dropped, added)
    assert abs(predicted.step_bytes / dropped["peak_bytes"] - 1) < 0.10


@pytest.mark.parametrize("budget_mib", [14, 18, 22, 26, 30, 40, 48])
def test_auto_is_the_fastest_fitting_assignment(budget_mib):
    """Brute force over the 8 per-block assignments of DenseNet-BC-40."""
    setup, budget = Setup(16, 32), budget_mib * 2**20
    fitting = []
    for policies in itertools.product(("keep", "recompute"), repeat=3):
        p = predict(BC40, setup, policies)
        if p.total_bytes <= budget:
            fitting.append((planner.step_time_ratio(BC40, setup, policies)[0], p.total_bytes, policies))
    choice = planner.best_fitting(BC40, setup, budget)
    assert planner.any_fits(BC40, setup, budget) == bool(fitting)
    assert memory.persistent_bytes(BC40, setup) == p.persistent_bytes
    if not fitting:
        assert choice is None
        return
    assert choice is not None and choice.prediction.total_bytes <= budget
    assert (choice.step_time_ratio, choice.prediction.total_bytes, choice.policies) == min(fitting)


def test_searches_agree_with_the_predictions():
    setup, budget = Setup(16, 32), parse_bytes("256MiB")
    for policy in ("keep", "recompute", "auto"):
        depth = planner.deepest_depth(BC40, setup, budget, policy)
        assert planner.best_fitting(BC40.with_depth(depth), setup, budget, policy) is not None
        assert planner.best_fitting(BC40.with_depth(depth + 6), setup, budget, policy) is None
        batch = planner.largest_batch(BC40, setup, budget, policy)
        assert planner.best_fitting(BC40, setup.with_batch(batch), budget, policy) is not None
        assert planner.best_fitting(BC40, setup.with_batch(batch + 1), budget, policy) is None
    depths = {p: planner.deepest_depth(BC40, setup, budget, p) for p in ("keep", "recompute", "auto")}
    assert depths["keep"] < depths["recompute"] <= depths["auto"]


def test_a_budget_below_the_persistent_bytes_is_answered_without_simulating(monkeypatch):
    setup = Setup(16, 32)
    budget = memory.persistent_bytes(BC40, setup) - 1
    assert predict(BC40, setup, "recompute").total_bytes > budget  # what the short cut stands for
    monkeypatch.setattr(planner, "predict", lambda *args: pytest.fail("simulated"))
    monkeypatch.setattr(planner, "heap_exits", lambda *args: pytest.fail("simulated"))
    assert planner.best_fitting(BC40, setup, budget) is None and not planner.any_fits(BC40, setup, budget)
    assert planner.largest_batch(BC40, setup, budget) is None


def test_largest_true_tries_the_limit_before_bisecting_up_to_it():
    tried = []

    def below(limit):
        return lambda x: tried.append(x) or x <= limit
    for limit, high in ((0, 100), (1, 100), (37, 100), (64, 100), (99, 100), (100, 100), (500, 100), (5, 5), (4, 5)):
        tried.clear()
        assert planner.largest_true(below(limit), 1, high) == (None if limit < 1 else min(limit, high))
        assert len(tried) == len(set(tried)) <= 2 * high.bit_length() + 1
        if limit >= high:  # the doubling reached the limit: one more try, no bisection
            assert tried[-1] == high and len(tried) <= high.bit_length() + 1


BF16 = torch.bfloat16


@pytest.mark.parametrize("model, setup, policy", [
    (("densenet121", None), Setup(1, 32, autocast=BF16), "recompute"),  # the peak at the optimizer update: flat
    (("densenet_bc", 22, dict(spatial_dims=3)), Setup(1, (32, 32, 32)), "keep"),  # batch 1 by im2col: above 2
    (("densenet121", None, dict(spatial_dims=1)), Setup(1, (48,)), "recompute"),  # flat, dips at 86 and 128
    (("densenet_bc", 22, dict(tree="monai")), Setup(1, 16, autocast=BF16), "keep"),  # a workspace with a constant part
    (("densenet_bc", 40, dict(growth_rate=4)), Setup(1, 4, autocast=BF16, threads=16), "keep"),  # exits off the line
], ids=["densenet121", "bc22-3d", "monai121-1d", "monai-bc22", "bc40-k4"])
def test_the_largest_batch_is_the_largest_that_fits(model, setup, policy):
    """Where the predicted peak dips as the batch grows, the batch search still
    finds the largest batch that fits, against every batch tried (1 to 399)."""
    arch = Architecture.named(*model[:2], **(model[2] if len(model) > 2 else {}))
    peaks = {b: predict(arch, setup.with_batch(b), policy).total_bytes for b in range(1, 400)}
    dips = [b for b in range(2, 400) if peaks[b] < peaks[b - 1]]
    assert dips and set(dips) <= {1, 2} | memory.heap_exits(arch, setup, policy)
    budgets = sorted(peak for peak in set(peaks.values()) if peak < min(list(peaks.values())[-50:]))
    for budget in [*budgets[::max(1, len(budgets) // 40)], *(peaks[b] for b in dips)]:
        expected = max(b for b, peak in peaks.items() if peak <= budget)
        assert planner.largest_batch(arch, setup, budget, policy) == expected, budget


DEPTH_CASES = [  # growth rate, image size, tree, setup, policy
    (4, (4, 4), "torchvision", Setup(16, 4, autocast=BF16, threads=16), "keep"),  # dips at 262: dW's copies capped
    (4, (4, 4), "torchvision", Setup(1, 4, autocast=BF16, threads=16), "recompute"),
    (12, (48,), "monai", Setup(2, 48, threads=16), "recompute"),
    (12, (16, 16, 16), "monai", Setup(1, 16), "keep"),
    (12, (32, 32), "torchvision", Setup(16, 32, backend="torch"), "keep"),
]


@pytest.mark.parametrize("growth_rate, size, tree, setup, policy", DEPTH_CASES)
def test_the_deepest_depth_is_the_deepest_that_fits(growth_rate, size, tree, setup, policy):
    """Where the predicted peak dips as the model deepens, the depth search
    still finds the deepest model that fits, against every depth from 10 to
    358; the floor it bisects on grows and stays below the prediction."""
    base = Architecture.named("densenet_bc", 10, growth_rate, spatial_dims=len(size), tree=tree)
    setup = replace(setup, image_size=size)
    depths = range(10, 359, 6)
    peaks = {d: predict(base.with_depth(d), setup, policy).total_bytes for d in depths}
    floors = [memory.peak_floor(base.with_depth(d), setup, policy) for d in depths]
    assert floors == sorted(floors) and all(f <= peaks[d] for f, d in zip(floors, depths))
    dips = [d for d in depths[1:] if peaks[d] < peaks[d - 6]]
    budgets = sorted(peak for peak in set(peaks.values()) if peak < min(list(peaks.values())[-10:]))
    for budget in [*budgets[::max(1, len(budgets) // 12)], *(peaks[d] for d in dips)]:
        expected = max(d for d, peak in peaks.items() if peak <= budget)
        assert planner.deepest_depth(base, setup, budget, policy) == expected, budget


def test_heap_exits_follow_onednn_and_take_only_batches_above_2():
    arch, setup = Architecture.named("densenet_bc", 22, growth_rate=24), Setup(1, 4, autocast=BF16)
    peaks = {}
    for onednn in (True, False):
        with torch.backends.mkldnn.flags(enabled=onednn):
            peaks[onednn] = [predict(arch, setup.with_batch(b), "keep").total_bytes for b in (1, 2, 3)]
            planner.largest_batch(arch, setup, peaks[onednn][2], "keep")  # each after the other's, cached
    with torch.backends.mkldnn.flags(enabled=False):  # im2col: batch 3 below batch 2
        assert peaks[False][2] < peaks[False][1] and planner.largest_batch(arch, setup, peaks[False][2], "keep") == 3
    assert memory.heap_exits(arch, setup, "keep", up_to=2) == memory.heap_exits(arch, setup, "keep", 1) == set()
    with pytest.raises(ValueError, match="up_to must be a positive integer"):
        memory.heap_exits(arch, setup, "keep", up_to=10.5)


def test_nothing_fits_says_what_does():
    x = torch.randn(16, 3, 32, 32)
    model = densenet_bc(40, recompute="auto", memory_budget="20MiB")
    with pytest.raises(MemoryBudgetError) as error:
        model(x)
    text = str(error.value)
    assert "DenseNet-BC-40 (k=12) at batch 16" in text and "more than the memory budget of 20 MiB" in text
    batch = planner.largest_batch(BC40, Setup(16, 32), 20 * 2**20)
    depth = planner.deepest_depth(BC40, Setup(16, 32), 20 * 2**20)
    assert 1 < batch < 16 and 10 <= depth < 40
    assert f"the largest batch that fits is {batch}." in text and f"is depth {depth}." in text
    with pytest.raises(ValueError, match="needs a memory budget"):
        densenet_bc(40, recompute="auto")
    with pytest.raises(MemoryBudgetError):  # a fixed policy under a budget is checked too
        densenet_bc(40, recompute="keep", memory_budget="5MiB")(x)


def test_the_refusal_answers_for_the_policy_asked():
    """With a fixed policy the refusal's largest batch and deepest depth are
    that policy's, not auto's (which fit more, so they were wrong advice)."""
    budget = int(32.7 * 2**20)
    keep = planner.largest_batch(BC40, Setup(16, 32), budget, "keep"), \
        planner.deepest_depth(BC40, Setup(16, 32), budget, "keep")
    auto = planner.largest_batch(BC40, Setup(16, 32), budget), planner.deepest_depth(BC40, Setup(16, 32), budget)
    assert keep[0] < auto[0] and keep[1] < auto[1]
    with pytest.raises(MemoryBudgetError) as error:
        planner.choose(BC40, Setup(16, 32), budget, "keep")
    assert f"the largest batch that fits is {keep[0]}." in str(error.value)
    assert f"is depth {keep[1]}." in str(error.value)


def test_plan_command_json(capsys):
    assert cli.main(["plan", "--model", "densenet_bc", "--depth", "100", "--growth-rate", "12", "--batch", "16",
                     "--image-size", "32", "--budget", "64MiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for policy in ("keep", "recompute", "auto"):
        entry = result["policies"][policy]
        assert entry["persistent_bytes"] > 0 and entry["step_bytes"] > 0
        assert entry["total_bytes"] == entry["persistent_bytes"] + entry["step_bytes"]
    assert result["policies"] == plan("densenet_bc", depth=100, batch=16, budget="64MiB")["policies"]
    assert set(result["deepest_depth"]) == set(result["largest_batch"]) == {"keep", "recompute", "auto"}
    assert result["search_limits"] == {"largest_batch": planner.MAX_BATCH,
                                       "deepest_depth": 6 * planner.MAX_DEPTH_LAYERS + 4}
    # without a budget the same keys, for scripts (they were missing): the searches and auto are null
    assert cli.main(["plan", "--model", "densenet_bc", "--depth", "100", "--batch", "16", "--json"]) == 0
    unbudgeted = json.loads(capsys.readouterr().out)
    assert set(unbudgeted) == set(result)
    assert unbudgeted["policies"]["auto"] is None and unbudgeted["deepest_depth"] is None
    assert unbudgeted["largest_batch"] is None and unbudgeted["policies"]["keep"]["fits"] is None
    assert cli.main(["plan", "--model", "densenet121", "--batch", "8", "--image-size", "224"]) == 0
    assert "keep:" in capsys.readouterr().out
    # nothing fits: the plan all the same, and exit status 1 for scripts
    assert cli.main(["plan", "--depth", "100", "--batch", "16", "--budget", "16MiB", "--json"]) == 1
    assert "the largest batch that fits is" in json.loads(capsys.readouterr().out)["policies"]["auto"]["error"]
    assert cli.main(["plan", "--depth", "100", "--batch", "16", "--budget", "16MiB"]) == 1
    assert "auto:" in capsys.readouterr().out


def test_the_memory_available_honours_a_containers_cgroup_limit(tmp_path):
    """cgroup v2 and v1 trees as Linux lays them out: the least room under the
    limits of the process's cgroup and its ancestors, the inactive file cache
    counted as free; no limit, or nothing readable: None."""
    def write(folder, **files):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name.replace("_", ".", 1)).write_text(text)

    own = tmp_path / "cgroup"
    own.write_text("0::/pod/app\n")
    v2 = tmp_path / "v2"
    write(v2 / "pod" / "app", memory_max="max\n", memory_current="100\n", memory_stat="inactive_file 10\n")
    write(v2 / "pod", memory_max="1000\n", memory_current="700\n", memory_stat="anon 400\ninactive_file 300\n")
    assert memory.cgroup_memory_room(str(own), str(v2)) == 1000 - (700 - 300)
    write(v2, memory_max="500\n", memory_current="450\n", memory_stat="inactive_file 0\n")  # a tighter root
    assert memory.cgroup_memory_room(str(own), str(v2)) == 50
    own.write_text("12:cpu,cpuacct:/\n4:memory:/job\n0::/\n")
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "job", memory_limit_in_bytes="2000\n", memory_usage_in_bytes="1500\n",
          memory_stat="cache 600\ntotal_inactive_file 500\n")
    write(v1 / "memory", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="1\n",
          memory_stat="total_inactive_file 0\n")  # (no limit)
    assert memory.cgroup_memory_room(str(own), str(v1)) == 2000 - (1500 - 500)
    assert memory.cgroup_memory_room(str(own), str(tmp_path / "missing")) is None
    assert memory.cgroup_memory_room(str(tmp_path / "no-such-file"), str(v1)) is None


def test_plan_into_a_pipe_its_reader_closed_ends_quietly():
    """``python -m densenet_fast plan ... | head -1``: the reader leaves before the
    output is written; exit status 1 and no BrokenPipeError traceback (nor a
    word: the pipe's reader chose to stop)."""
    process = subprocess.Popen([sys.executable, "-m", "densenet_fast", "plan", "--depth", "40", "--batch", "16"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1 and err == b"", err
    # a broken pipe of the command's own, with its output still read: an error, said
    broken = ("import runpy; from densenet_fast import cli; "
              "cli.main = lambda: (_ for _ in ()).throw(BrokenPipeError(32, 'Broken pipe')); "
              "runpy.run_module('densenet_fast', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr == "error: [Errno 32] Broken pipe\n", result.stderr


def test_plan_takes_a_dropout(capsys):
    """``--drop-rate`` (``drop_rate=``) plans a named model with dropout after each
    dense layer: whole channels in MONAI's tree on volumes, single values on
    images; the plan says so and refuses a bad rate, or a rate for a model given whole."""
    assert cli.main(["plan", "--depth", "40", "--batch", "64", "--drop-rate", "0.2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    arch = Architecture.named("densenet_bc", 40, drop_rate=0.2)
    setup = Setup(64, 32)
    assert result["policies"]["keep"]["step_bytes"] == predict(arch, setup, "keep").step_bytes \
        > predict(BC40, setup, "keep").step_bytes
    assert result["model"]["description"] == "DenseNet-BC-40 (k=12), dropout 0.2"
    assert result["model"]["drop_rate"] == 0.2 and not result["model"]["channel_dropout"]
    volumes = plan("densenet_bc", depth=40, image_size=(16, 16, 16), drop_rate=0.2)["model"]
    assert volumes["channel_dropout"] and volumes["description"].endswith("dropout 0.2 (whole channels)")
    assert cli.main(["plan", "--drop-rate", "1"]) == 2
    assert "drop_rate must be in [0, 1), got 1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="drop_rate shape a named model"):
        plan(densenet_bc(40), drop_rate=0.2)


def test_plan_names_a_bad_image_size():
    for bad in (32.0, "32", True):  # (a float was "object of type 'float' has no len()")
        with pytest.raises(TypeError, match="image_size is one side"):
            plan("densenet_bc", depth=40, batch=2, image_size=bad)
    assert plan("densenet_bc", depth=40, batch=2, image_size=np.int64(16))["setup"]["image_size"] == [16, 16]


def test_plan_takes_the_training_processs_threads(capsys):
    """The CPU backends' scratch grows with the threads: a plan made on a small
    machine for a larger one says so (it took this process's threads, unsaid)."""
    here, larger = (plan("densenet_bc", depth=100, batch=16, threads=t) for t in (2, 64))
    assert here["setup"]["threads"] == 2 and larger["setup"]["threads"] == 64
    assert larger["policies"]["recompute"]["step_bytes"] > 1.1 * here["policies"]["recompute"]["step_bytes"]
    assert plan("densenet_bc", depth=40, batch=4)["setup"]["threads"] == torch.get_num_threads()
    assert cli.main(["plan", "--depth", "100", "--batch", "16", "--threads", "64", "--budget", "1KiB"]) == 1
    said = capsys.readouterr().out
    assert " backend, 64 threads)" in said and "largest batch for this model: keep none fits" in said
    assert cli.main(["plan", "--threads", "0"]) == 2 and "threads must be a positive integer" in \
        capsys.readouterr().err


def test_plan_says_what_it_leaves_out(capsys, monkeypatch):
    """On the CPU in float16/bfloat16, where the CPU runs those GEMMs in oneDNN,
    the plan (data, text and the model's notice) says that oneDNN's cached GEMM
    primitives are not counted; in float32, or where oneDNN lacks the dtype,
    nothing is said."""
    def notes(result):
        return [entry["not_counted"] for entry in result["policies"].values() if entry is not None]

    assert notes(plan("densenet_bc", depth=40, batch=4)) == [[], []]
    monkeypatch.setattr(memory, "onednn_convolves", lambda dtype: False)
    assert notes(plan("densenet_bc", depth=40, batch=4, autocast="bfloat16")) == [[], []]
    monkeypatch.setattr(memory, "onednn_convolves", lambda dtype: True)
    for dtype in ("bfloat16", "float16"):
        assert all(len(n) == 1 and "oneDNN's cached primitives" in n[0]
                   for n in notes(plan("densenet_bc", depth=40, batch=4, autocast=dtype)))
    assert cli.main(["plan", "--model", "densenet_bc", "--depth", "40", "--batch", "4", "--autocast", "bfloat16"]) == 0
    assert "not counted: oneDNN's cached primitives" in capsys.readouterr().out
    model = densenet_bc(40, recompute="auto", memory_budget="1GiB")
    monkeypatch.setattr(memory, "_mmap_threshold", memory.CPU_HEAP_BELOW)  # as a trainer's process
    with pytest.warns(MemoryPlanNotice, match="not counted: oneDNN's cached primitives"):
        model.plan_for(4, 32, autocast=torch.bfloat16)


def test_a_cpu_plan_warns_where_the_process_allocates_otherwise(monkeypatch, capsys):
    """The model on the CPU assumes glibc's mmap threshold at CPU_HEAP_BELOW: a
    plan made in a process that did not set it (nor MALLOC_MMAP_THRESHOLD_ to
    it) warns, once per input shape; the plan command says what it assumes."""
    def heap_warnings(batch):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.plan_for(batch, 32)
        return [str(w.message) for w in caught if "mmap threshold" in str(w.message)]

    model = densenet_bc(40, recompute="auto", memory_budget="1GiB")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(memory, "_mmap_threshold", None)
    assert not memory.cpu_heap_as_modelled()
    warned = heap_warnings(2)
    assert len(warned) == 1 and "set_mmap_threshold()" in warned[0] and "MALLOC_MMAP_THRESHOLD_=65536" in warned[0]
    assert heap_warnings(2) == []  # a planned shape is not planned again
    monkeypatch.setattr(memory, "_mmap_threshold", 2 * memory.CPU_HEAP_BELOW)
    assert len(heap_warnings(3)) == 1
    monkeypatch.setattr(memory, "_mmap_threshold", memory.CPU_HEAP_BELOW)
    assert heap_warnings(4) == []
    monkeypatch.setattr(memory, "_mmap_threshold", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(memory.CPU_HEAP_BELOW))
    assert heap_warnings(5) == []
    monkeypatch.setattr(memory, "glibc_malloc", lambda: None)  # another C library, or jemalloc preloaded
    assert not memory.cpu_heap_as_modelled() and not memory.set_mmap_threshold()
    warned = heap_warnings(6)
    assert len(warned) == 1 and "does not allocate with glibc's malloc" in warned[0]
    assert cli.main(["plan", "--model", "densenet_bc", "--depth", "40", "--batch", "4"]) == 0
    assert "assumes: glibc's mmap threshold of 64 KiB in the training process" in capsys.readouterr().out
    assert "mmap threshold" in plan("densenet_bc", depth=40, batch=4)["assumes"][0]
    if not torch.cuda.is_available():
        assert plan("densenet_bc", depth=40, batch=4, device="cuda")["assumes"] == [
            "a GPU of 132 multiprocessors (the triton kernels' partial sums follow the count; there is no GPU "
            "here: an H100's or H200's)"]
    assert plan("densenet_bc", depth=40, batch=4, device="cuda", backend="torch")["assumes"] == []


def test_set_mmap_threshold_maps_what_the_model_puts_off_the_heap(tmp_path):
    """In a fresh process (it changes the process's allocator for good), with
    glibc's adaptive threshold raised to 8 MiB and 6 MiB free at the heap's top:
    a 512 KiB tensor comes from the heap; after set_mmap_threshold() a 4 MiB
    tensor is mapped on its own (glibc's count of mapped blocks rises: the top
    was trimmed), and so is a 2 MiB one after 64 freed 60 KiB blocks left the
    top large again (the trim threshold is back at 128 KiB), while a block just
    below CPU_HEAP_BELOW comes from the heap."""
    script = tmp_path / "probe.py"
    script.write_text("""
import ctypes, torch
from densenet_fast import memory
info = memory.heap_info()
if info is None:
    raise SystemExit("skip: needs glibc 2.33 or later as this process's malloc")
libc = memory.glibc_malloc()
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
if info.fordblks - info.keepcost >= 2 << 20:
    raise SystemExit("skip: free blocks inside the heap could serve the probes")
def mapped(nbytes):
    before = memory.heap_info().hblks
    t = torch.empty(nbytes, dtype=torch.uint8)
    return memory.heap_info().hblks - before
big = torch.empty(8 << 20, dtype=torch.uint8)
del big  # freeing a mapped 8 MiB raises glibc's threshold to 8 MiB and its trim threshold to 16 MiB
libc.free(libc.malloc(6 << 20))  # from the heap's top, which keeps it
before = [memory.cpu_heap_as_modelled(), mapped(512 << 10)]
after = [memory.set_mmap_threshold(), memory.cpu_heap_as_modelled(), mapped(4 << 20)]
for block in reversed([libc.malloc(60 << 10) for _ in range(64)]):
    libc.free(block)
print(*before, *after, mapped(2 << 20), mapped(memory.CPU_HEAP_BELOW - 4096))
""")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    if result.returncode == 1 and "skip: " in result.stderr:
        pytest.skip(result.stderr.strip().split("skip: ")[-1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0", "True", "True", "1", "1", "0"]


def test_the_memory_model_knows_each_backends_dtypes():
    """memory.NATIVE_DTYPES (which backend's kernels run for a dtype) is what the backends say."""
    from densenet_fast.backends.extension_backend import CppBackend, CudaBackend
    from densenet_fast.backends.triton_kernels.common import DATA_DTYPES
    assert set(memory.NATIVE_DTYPES["cpp"]) == set(CppBackend.native_dtypes)
    assert set(memory.NATIVE_DTYPES["cuda"]) == set(CudaBackend.native_dtypes)
    assert set(memory.NATIVE_DTYPES["triton"]) == set(DATA_DTYPES)


def test_the_gpu_kernels_partial_sums_follow_the_multiprocessors(monkeypatch):
    """The memory model sizes the Triton backward's partial sums with the rule its
    launcher splits by, for the GPU's multiprocessors (it assumed 64 splits: 796
    MB for a transition of 2492 channels to 1246 at batch 64, where one split is
    made), over the cells of 2 x 2 pixels that cover odd sides too; 1-D and 3-D
    transitions as the torch backend's primitives, which run them; and the CUDA
    kernels' float64 partials per row block, left out of the floor's step."""
    from densenet_fast.backends import gpu_partials
    from densenet_fast.backends.triton_kernels import bn_relu_conv, channel_stats, common
    assert memory.TRITON_STATS_ROWS == channel_stats.TILE_STATS_BLOCK_M
    assert memory.TRITON_MAX_BLOCK_K == bn_relu_conv.MAX_BLOCK_K
    dense_layer_tiles = bn_relu_conv.FORWARD_CONFIGS[1] + bn_relu_conv.EXACT_FP32_FORWARD_CONFIGS
    assert memory.TRITON_MIN_BLOCK_M == min(config.kwargs["BLOCK_M"] for config in dense_layer_tiles)
    monkeypatch.setattr(common, "gpu_limits", lambda device: common.GpuLimits(232448, 132))
    cuda = torch.device("cuda")
    for cells, c, k in [(16384, 2492, 1246), (65536, 48, 48), (65536, 1000, 0), (100, 20, 48), (7, 3, 0)]:
        k_blocks = -(-k // 128) if k else 1
        assert common.num_splits(cells, c, k, k_blocks, 4, cuda) == \
            gpu_partials.backward_splits(cells, c, k, k_blocks, 4, 132)
    arch = Architecture.named("densenet_bc", 1000, 12)
    sim = StepSimulation(arch, Setup(64, 32, device="cuda", backend="triton", multiprocessors=132), ("keep",) * 3)
    # a transition of 2492 channels to 1246 at 64 x 16 x 16, pooled to 64 x 8 x 8: 39 x 10 channel and output
    # blocks fill the GPU in 1 split, so dW's partials (1, 1246, 2492) and dW itself, fp32
    assert sim.workspace.transition_backward(16384, 4096, 2492, 1246, (16, 16)) == 2 * 1246 * 2492 * 4
    # 128 channels to 64 at 64 x 29 x 29: 14400 cells (12544 pooled pixels) of 2 x 64 channel blocks, 84 splits
    # where the partials reach a quarter of the bytes read (73 for 12544 cells)
    assert sim.workspace.transition_backward(64 * 29 * 29, 64 * 14 * 14, 128, 64, (29, 29)) == 84 * 66 * 128 * 4
    volumes = StepSimulation(Architecture.named("densenet_bc", 40, 12, spatial_dims=3),
                             Setup(2, (16, 16, 16), device="cuda", backend="triton"), ("keep",) * 3)
    torch_primitives = memory.TorchWorkspace(volumes)
    for transition in ("transition", "transition_backward"):
        assert getattr(volumes.workspace, transition)(8192, 1024, 100, 50, (16, 16, 16)) == \
            getattr(torch_primitives, transition)(8192, 1024, 100, 50, (16, 16, 16)) > 0
    # a dense layer's 1x1 convolution, 48 channels to 48 at 64 x 32 x 32: 264 splits of 64 rows
    assert sim.workspace.bn_relu_conv1x1_backward(65536, 48, 48) == 264 * 50 * 48 * 4
    on_a100 = StepSimulation(arch, Setup(64, 32, device="cuda", backend="triton", multiprocessors=108),
                             ("keep",) * 3)
    assert on_a100.workspace.bn_relu_conv1x1_backward(65536, 48, 48) == 216 * 50 * 48 * 4
    cuda_sim = StepSimulation(arch, Setup(64, 32, device="cuda", backend="cuda", multiprocessors=132), ("keep",) * 3)
    # 4 blocks per multiprocessor over 2 blocks of 128 channels: 264 row blocks of 2 float64 sums per channel
    assert cuda_sim.workspace.channel_stats(65536, 200) == 2 * 264 * 200 * 8
    assert cuda_sim.workspace.bn_relu_backward(1000, 200) == 2 * 8 * 200 * 8  # at least 128 rows per block
    float64 = StepSimulation(arch, Setup(64, 32, torch.float64, device="cuda", backend="cuda", multiprocessors=132),
                             ("keep",) * 3)
    assert float64.workspace.channel_stats(65536, 200) == 2 * 132 * 200 * 8  # 2 channels a lane: 4 blocks of them
    floor = StepSimulation(arch, Setup(64, 32, device="cuda", backend="cuda", multiprocessors=132), ("keep",) * 3,
                           floor=True)
    assert floor.workspace.channel_stats(65536, 200) == 0  # not monotonic in m or c
    if not torch.cuda.is_available():
        assert Setup(2, 32, device="cuda").multiprocessors == memory.ASSUMED_MULTIPROCESSORS
    assert Setup(2, 32, device="cpu", multiprocessors=7).multiprocessors is None
    with pytest.raises(ValueError, match="multiprocessors must be a positive integer"):
        Setup(2, 32, device="cuda", multiprocessors=0)


def test_plan_command_for_volumes(capsys):
    """Three sides are a volume: MONAI's tree of the named model, which is the
    architecture of densenet_fast.monai's model of that name."""
    assert cli.main(["plan", "--model", "densenet121", "--batch", "2", "--image-size", "64", "128", "128",
                     "--in-channels", "1", "--num-classes", "2", "--budget", "1GiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["setup"]["image_size"] == [64, 128, 128] and result["model"]["spatial_dims"] == 3
    assert result["model"]["description"] == "3-D DenseNet-121"
    model = MonaiDenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    assert result["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["policies"] == plan(model, batch=2, image_size=(64, 128, 128), budget="1GiB")["policies"]
    assert result["largest_batch"]["recompute"] >= 2 and result["deepest_depth"] is None
    assert plan(model, batch=2, image_size=64)["setup"]["image_size"] == [64, 64, 64]  # one side: a cube
    with pytest.raises(ValueError, match="3 spatial dimension"):
        plan(model, batch=2, image_size=(64, 128))
    assert cli.main(["plan", "--image-size", "8", "8", "8", "8"]) == 2  # a user's error, as argparse's are
    assert "--image-size takes 1 to 3 sides, got 4" in capsys.readouterr().err


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_monais_tree_is_the_model_the_benchmarks_and_the_trainer_build(dims):
    """The architecture the planner predicts for MONAI's tree is the module the
    benchmarks build (and, in 3-D, the trainer), in every dimension: 2-D too,
    where the name alone would mean torchvision's tree (CIFAR stem)."""
    spec = monai_impls.bc_spec(40, 12, [32] * dims)
    built = monai_impls.build("fast-torch-keep", spec, "cpu", False)
    arch = Architecture.of(built)
    assert arch == monai_impls.architecture(spec) == Architecture.named("densenet_bc", 40, 12, 2, 1, dims, "monai")
    assert arch.parameter_count() == sum(p.numel() for p in built.parameters())
    assert arch.with_depth(40) == arch and arch.tree == "monai" and arch.stem == "imagenet"
    if dims == 3:
        options = dict(model="densenet_bc", depth=40, growth_rate=12, in_channels=1, num_classes=2, drop_rate=0.0,
                       backend=None)
        assert Architecture.of(trainer.build_volume_model(options)) == arch
    with pytest.raises(ValueError, match="torchvision's tree"):
        Architecture.named("densenet_bc", 40, spatial_dims=3, tree="torchvision")


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_the_cpus_convolution_scratch_is_not_predicted_on_a_gpu(capability, monkeypatch):
    """oneDNN's gemm weight-gradient scratch is the CPU's, and only an AVX2 CPU's:
    a 3-D step on CUDA or on AVX-512 does not depend on the host's threads, on
    an AVX2 CPU it does."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    arch = Architecture.named("densenet_bc", 40, 12, 2, 1, spatial_dims=3)
    for device, depends in (("cuda", False), ("cpu", capability == "AVX2")):
        steps = {predict(arch, Setup(4, (32, 32, 32), device=device, backend="torch", threads=t), "keep").step_bytes
                 for t in (1, 16)}
        assert (len(steps) == 2) == depends, (device, steps)


def test_bad_sizes_and_arguments_are_refused():
    for bad in (32.0, (3.5, 2), [0, 3], True, "32", (1, 2, 3, 4)):
        with pytest.raises(ValueError, match="image_size must be"):
            Setup(1, bad)
    with pytest.raises(ValueError, match="too small for this model"):
        plan("densenet_bc", depth=40, image_size=(8, 8, 8), batch=2)
    least = densenet121().min_input_size()[0]  # the model's own rule
    assert plan("densenet121", image_size=least, batch=2)["policies"]["keep"]["total_bytes"] > 0
    with pytest.raises(ValueError, match=f"an input of 32x{least - 1} is too small .* at least {least} on every side"):
        plan("densenet121", image_size=(32, least - 1), batch=2)
    with pytest.raises(ValueError, match="shape a named model"):
        plan(BC40, batch=2, image_size=32, in_channels=5)
    model = densenet_bc(40, memory_budget="1GiB")
    model.features.denseblock2.denselayer3.relu1 = torch.nn.GELU()  # that block runs the plain path
    for plans in (lambda: model(torch.randn(2, 3, 32, 32)), lambda: plan(model, batch=2, image_size=32)):
        with pytest.raises(ValueError, match="denselayer3"):
            plans()


@pytest.mark.parametrize("monai", [False, True], ids=["torchvision", "monai"])
@pytest.mark.parametrize("name", ["features", "features.denseblock2", "features.transition1"])
@pytest.mark.filterwarnings("ignore:densenet_fast. the memory model assumes glibc:RuntimeWarning")
def test_a_budget_refuses_training_features_blocks_or_transitions_on_their_own(name, monai):
    """The budget plans the model's whole step; a training forward of part of it
    alone (a custom head on ``features``) would run unplanned policies."""
    model = (MonaiDenseNet(2, 3, 4, init_features=8, growth_rate=4, block_config=(2, 2)) if monai
             else densenet_bc(16, 4))
    model.set_memory_budget("1GiB")
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()  # the whole model: planned
    inputs = {}
    handle = model.get_submodule(name).register_forward_pre_hook(lambda module, args: inputs.setdefault(name, args))
    with torch.no_grad():
        model(x)
    handle.remove()
    part = model.get_submodule(name)
    with pytest.raises(MemoryBudgetError, match="called on its own in a training forward.*the model's set_memory_"
                                                "budget\\(None\\) \\(for a copy of this module: before copying it"):
        part(*inputs[name])
    with torch.no_grad():  # not a training step
        part(*inputs[name])
    model.set_memory_budget(None)
    part(*inputs[name]).sum().backward()
    copy.deepcopy(part)(*inputs[name]).sum().backward()  # the advice holds for a copy


@pytest.mark.parametrize("monai, observe", [
    (False, lambda model: model.features.register_forward_hook(lambda *_: None)),
    (False, lambda model: model.features.denseblock2.register_forward_pre_hook(lambda *_: None)),
    (False, lambda model: model.features.transition1.register_full_backward_hook(lambda *_: None)),
    (False, lambda model: torch.nn.modules.module.register_module_forward_hook(lambda *_: None)),
    (True, lambda model: model.class_layers.register_forward_hook(lambda *_: None)),
], ids=["features", "block", "transition", "every_module", "monai_class_layers"])
@pytest.mark.filterwarnings("ignore:densenet_fast. the memory model assumes glibc:RuntimeWarning")
def test_a_budget_refuses_hooks_that_unfuse_the_stages(monai, observe):
    """A hook on features, a block or a transition (or on every module) runs a
    block apart from its transition or head, with a copy of its buffer: not the
    step the memory model describes."""
    model = (MonaiDenseNet(2, 3, 4, init_features=8, growth_rate=4, block_config=(2, 2)) if monai
             else densenet_bc(16, 4))
    x = torch.randn(2, 3, 16, 16)
    model.set_memory_budget("1GiB")
    model(x).sum().backward()  # unobserved: planned
    handle = observe(model)
    try:
        with torch.no_grad():  # not a training step: not planned
            model(x)
        with pytest.raises(ValueError, match="hook on (features|class_layers)|every module"):
            model(x)
        with pytest.raises(ValueError, match="hook on (features|class_layers)|every module"):
            plan(model, batch=2, image_size=16)
        model.eval()  # evaluation is not planned
        model(x)
    finally:
        handle.remove()
    model.train()
    model(x).sum().backward()


@pytest.mark.filterwarnings("ignore:densenet_fast. the memory model assumes glibc:RuntimeWarning")
def test_a_budget_takes_optimizer_presets_empty_batches_and_meta_models():
    """set_memory_budget takes a preset's name, as plan() and --optimizer do (it
    failed at the first step); an empty batch and a meta model's training
    forward plan nothing (both failed: batch 0, device 'meta'); plan_for plans
    a meta model on the CPU, as plan() does."""
    model = densenet_bc(10, 4, num_classes=3)
    model.set_memory_budget("64MiB", optimizer="adam")
    adam = plan("densenet_bc", depth=10, growth_rate=4, num_classes=3, batch=2, image_size=16, optimizer="adam")
    assert model.plan_for(2, 16).prediction.persistent_bytes == adam["policies"]["keep"]["persistent_bytes"]
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    for bad in (torch.optim.SGD, 5):
        with pytest.raises(TypeError, match="optimizer is an OptimizerSpec or a preset's name"):
            model.set_memory_budget("32MiB", optimizer=bad)
    assert (model.memory_budget, model.memory_optimizer) == (2**26, OptimizerSpec.parse("adam"))  # unchanged
    model.set_memory_budget("32MiB")
    assert (model.memory_budget, model.memory_optimizer) == (2**25, OptimizerSpec.parse("adam"))  # kept
    assert model(torch.randn(0, 3, 16, 16)).shape == (0, 3)  # as without a budget
    with torch.device("meta"):
        meta = densenet_bc(10, 4, num_classes=3, memory_budget="64MiB")
    assert meta(torch.randn(2, 3, 16, 16, device="meta")).shape == (2, 3)
    on_cpu = densenet_bc(10, 4, num_classes=3, memory_budget="64MiB")
    assert meta.plan_for(2, 16).prediction == on_cpu.plan_for(2, 16).prediction


def test_bad_model_shapes_devices_and_dtypes_are_refused():
    for bad in (dict(growth_rate=0), dict(growth_rate=-3), dict(growth_rate=1.5), dict(num_classes=0),
                dict(in_channels=-1)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            plan("densenet_bc", depth=40, batch=2, **bad)
    for device in ("mps", "meta", "gpu"):
        with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
            plan("densenet_bc", depth=40, batch=2, device=device)
    with pytest.raises(ValueError, match="the cuda backend runs on CUDA tensors, not on cpu ones"):
        plan("densenet_bc", depth=40, batch=2, device="cpu", backend="cuda")
    with pytest.raises(ValueError, match="autocast computes in bfloat16 or float16"):
        plan("densenet_bc", depth=40, batch=2, autocast="float64")
    assert Setup(2, 32, torch.float64, autocast=BF16).compute_dtype == torch.float64  # autocast leaves float64 alone
    assert predict(BC40, Setup(2, 32, torch.float64, autocast=BF16)).total_bytes == \
        predict(BC40, Setup(2, 32, torch.float64)).total_bytes
    densenet121 = Architecture.named("densenet121", None)  # four blocks; its DenseNet-BCs have three
    assert planner.deepest_depth(densenet121, Setup(2, 32), 2**28, "auto") > 10
    with pytest.raises(ValueError, match="describes the dtypes"):
        plan("densenet_bc", depth=40, batch=2, dtype=torch.int64)
    for bad in (dict(dtype=torch.int64), dict(dtype="float"), dict(autocast=torch.float64), dict(autocast="")):
        with pytest.raises(ValueError, match="describes the dtypes|bfloat16 or float16"):
            Setup(2, 32, **bad)  # the memory model's own entry refuses them too
    assert Setup(2, 32, "float64", "bfloat16") == Setup(2, 32, torch.float64, torch.bfloat16)


def test_a_models_plan_is_in_its_dtype_and_keeps_its_bottleneck_width():
    """plan(model) and model.plan_for agree on a bfloat16 model; the depth search
    builds DenseNet-BCs of the model's bn_size."""
    model = densenet_bc(22, bn_size=2, memory_budget="64MiB").to(torch.bfloat16)
    out = plan(model, batch=4, image_size=32, budget="64MiB")
    choice = model.plan_for(4, 32)
    assert out["setup"]["dtype"] == "bfloat16" and out["model"]["bn_size"] == 2
    assert out["policies"]["auto"]["total_bytes"] == choice.prediction.total_bytes
    assert model.plan_for(4, 32, autocast="bfloat16", dtype="float32").prediction.total_bytes > 0
    arch = Architecture.of(model)
    assert arch.with_depth(100).bn_size == 2 and "bn_size 2" in out["model"]["description"]
    on_torch = densenet_bc(22, backend="torch", memory_budget="64MiB")  # the backend is the model's too
    assert plan(on_torch, batch=4, image_size=32, budget="64MiB")["policies"]["auto"]["total_bytes"] == \
        on_torch.plan_for(4, 32).prediction.total_bytes
    with torch.device("meta"):
        assert plan(densenet_bc(22), batch=4, image_size=32)["setup"]["device"] == "cpu"
    depth = out["deepest_depth"]["auto"]
    assert planner.best_fitting(arch.with_depth(depth), Setup(4, 32, torch.bfloat16), 64 * 2**20) is not None


@pytest.mark.usefixtures("one_thread")
def test_a_plan_is_made_again_for_a_new_classifier_or_thread_count():
    """A plan stored for an input shape is not reused after the architecture
    changed (a classifier replaced for fine-tuning: its parameters count) or,
    on the CPU, the thread count (the C++ kernels hold a tile per thread):
    ``plan_for`` and a training step both plan again."""
    model = densenet_bc(22, num_classes=10, recompute="auto", memory_budget="1GiB")
    x = torch.randn(2, 3, 32, 32)

    def planned_step() -> tuple[str, ...]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(x).sum().backward()
        return tuple(str(w.message) for w in caught if issubclass(w.category, MemoryPlanNotice))

    def expected() -> int:
        arch, setup = Architecture.of(model), Setup(2, 32, threads=torch.get_num_threads(), backend=model.backend)
        return planner.choose(arch, setup, model.memory_budget).prediction.total_bytes

    assert len(planned_step()) == 1 and planned_step() == ()  # planned once for this input
    before = model.plan_for(2, 32).prediction
    model.classifier = torch.nn.Linear(model.classifier.in_features, 3000)
    assert len(planned_step()) == 1
    after = model.plan_for(2, 32).prediction
    assert after.persistent_bytes > before.persistent_bytes and after.total_bytes == expected()
    torch.set_num_threads(3)
    assert len(planned_step()) == 1
    assert model.plan_for(2, 32).prediction.total_bytes == expected()
    if model.backend in (None, "cpp") and "cpp" in available_backends():  # per-thread tiles: a plan of its own
        assert model.plan_for(2, 32).prediction.total_bytes != after.total_bytes


@pytest.mark.filterwarnings("ignore::densenet_fast.models.MemoryPlanNotice", "ignore::RuntimeWarning")
def test_a_policy_set_or_a_budget_removed_is_planned_again():
    """A budget between ``recompute``'s and ``keep``'s step: a step planned under
    ``recompute`` fits, ``keep`` set afterwards is checked again and refused (a
    stored plan let it run over the budget); ``auto`` plans each batch and
    applies each input's stored plan again (a batch after another kept the
    other's policies); the budget of an ``auto`` model cannot be removed."""
    model = densenet_bc(22, 4, recompute="recompute")
    x = torch.randn(4, 3, 16, 16)
    arch, setup = Architecture.of(model), Setup(4, 16, threads=torch.get_num_threads(), backend=model.backend)
    keep, recompute = (predict(arch, setup, policy).total_bytes for policy in ("keep", "recompute"))
    model.set_memory_budget((keep + recompute) // 2)
    model(x).sum().backward()
    model.set_recompute("keep")
    with pytest.raises(MemoryBudgetError):
        model(x)
    model.set_recompute("auto")
    policies = []
    for batch in (4, 2, 4):
        model(x[:batch]).sum().backward()
        policies.append(tuple(block.recompute for block in model.blocks()))
    assert policies[0] != policies[1] == ("keep",) * 3 and policies[2] == policies[0]
    with pytest.raises(ValueError, match='recompute="auto" needs a memory budget'):
        model.set_memory_budget(None)


def test_blocks_whose_dropout_differs_are_not_planned():
    """The memory model describes one dropout in every dense layer (it read the
    first layer's): a model whose blocks differ is refused, not under-counted
    (layers of one block that differ run the plain path, refused too)."""
    model = densenet_bc(22, drop_rate=0.2, memory_budget="1GiB")
    model.plan_for(2, 32)
    for layer in model.features.denseblock1.children():
        layer.drop_rate = 0.0  # the blocks after it keep their masks
    with pytest.raises(ValueError, match="dense blocks with dropout and without it"):
        model.plan_for(2, 32)
    model.features.denseblock2.denselayer2.drop_rate = 0.0
    with pytest.raises(ValueError, match="dense layers of one block with different dropout .denselayer2"):
        model.plan_for(2, 32)
    for block in model.blocks():
        for layer in block.children():
            layer.drop_rate = 0.1
    model.plan_for(2, 32)


@pytest.mark.filterwarnings("ignore::densenet_fast.models.MemoryPlanNotice")
def test_a_plan_is_made_for_each_gpu(monkeypatch):
    """Plans on two GPUs are two (their multiprocessors size the kernels'
    partial sums); a bare ``"cuda"`` is the current GPU's plan.  (Two GPUs
    of 132 and 20 multiprocessors, as torch.cuda would report them.)"""
    counts = {0: 132, 1: 20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(multi_processor_count=counts[index]))
    model = densenet_bc(40, recompute="auto", memory_budget="8GiB")
    first, second = (model.plan_for(64, 32, device=f"cuda:{index}") for index in (0, 1))
    assert model.plan_for(64, 32, device="cuda") is first and model.plan_for(64, 32, device="cuda:1") is second
    assert sorted(key[4] for key in model._memory_plans) == [("cuda", 0), ("cuda", 1)]


def test_depth_search_keeps_the_volume_and_monais_stem():
    """The deepest-depth answer for a 3-D MONAI DenseNet-BC is a 3-D MONAI DenseNet-BC."""
    arch = Architecture.of(MonaiDenseNet(3, 1, 2, init_features=24, growth_rate=12, block_config=(6, 6, 6)))
    assert arch == Architecture.named("densenet_bc", 40, 12, num_classes=2, in_channels=1, spatial_dims=3)
    assert arch.depth == 40 and arch.with_depth(100) == replace(arch, block_config=(16, 16, 16))
    setup, budget = Setup(2, (32, 32, 32)), parse_bytes("64MiB")
    depth = planner.deepest_depth(arch, setup, budget, "recompute")
    assert predict(arch.with_depth(depth), setup, "recompute").total_bytes <= budget
    assert predict(arch.with_depth(depth + 6), setup, "recompute").total_bytes > budget


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("recompute", [("keep", "recompute", "keep"), ("recompute", "keep", "recompute"), "auto"])
def test_per_block_policies_equal_torchvision_float64(recompute):
    config = dict(growth_rate=6, block_config=(3, 2, 3), num_init_features=12, num_classes=5, stem="cifar")
    ours, tv = make_pair(**config)
    if recompute == "auto":  # a budget between recompute's and keep's: a mixed assignment
        arch, setup = Architecture.of(ours), Setup(3, (13, 11), torch.float64)
        low, high = (predict(arch, setup, p).total_bytes for p in ("recompute", "keep"))
        ours.set_memory_budget((low + high) // 2)
        ours.set_recompute("auto")
    else:
        ours.set_recompute(recompute)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_float64(ours, tv, (3, 13, 11), steps=2)
    if recompute == "auto":
        notices = [w for w in caught if issubclass(w.category, MemoryPlanNotice)]
        assert len(notices) == 1  # once per input shape
        chosen = tuple(block.recompute for block in ours.blocks())
        assert len(set(chosen)) == 2 and ours.recompute == "auto", chosen
        assert f"recompute={chosen}" in str(notices[0].message)


def measure_in_a_fresh_process(model: ModelSpec, batch: int, size, policy: str, backend: str,
                               offload: bool = False, steps: int = STEADY_STEPS) -> dict:
    """What ``bench memory``'s worker measures for one point: its persistent bytes
    and its step's highest peak over the steady-state steps (2 threads, SGD)."""
    spec = {"mode": "memory", "impls": [f"fast-{backend}-{policy}"], "model": model.to_dict(), "batch": batch,
            "image_size": size, "device": "cpu", "steps": steps, "warmup_batch": min(2, batch),
            "threads": 2, "malloc_mmap_threshold": harness.MMAP_THRESHOLD, "optimizer": "sgd", "offload": offload}
    measured = common.run_worker(spec, timeout_s=300)
    assert measured["status"] == "ok", measured
    return measured


def cpu_backend() -> str:
    return "cpp" if "cpp" in available_backends() else "torch"


@pytest.mark.parametrize("policy", ["keep", "recompute"])
@pytest.mark.parametrize("volume", [False, True], ids=["images", "volumes"])
def test_prediction_matches_a_fresh_process(policy, volume):
    """The predicted step within 10% of a fresh process's highest over the steps
    ``bench memory`` measures (the steady state), the persistent bytes exact
    (cpp backend where built): DenseNet-BC-40 at batch 16 on 32x32 images, and
    MONAI's DenseNet-BC-40 at batch 4 on 64^3 volumes (one channel, 2 classes)."""
    backend = cpu_backend()
    if volume:
        model, arch = monai_impls.bc_spec(40, 12, [64, 64, 64]), Architecture.named(
            "densenet_bc", 40, 12, num_classes=2, in_channels=1, spatial_dims=3)
        batch, size = 4, [64, 64, 64]
    else:
        model, arch, batch, size = ModelSpec("densenet_bc", 40), BC40, 16, 32
    measured = measure_in_a_fresh_process(model, batch, size, policy, backend)
    predicted = predict(arch, Setup(batch, size, backend=backend, threads=2), policy)
    assert measured["persistent_bytes"] == predicted.persistent_bytes
    assert abs(predicted.step_bytes / measured["peak_bytes"] - 1) < 0.10, (predicted.step, measured)


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_an_offloaded_prediction_matches_a_fresh_process(policy):
    """Saved tensors offloaded (``Setup.offload``; on the CPU ``bench memory
    --offload``'s stand-in keeps them in a file): DenseNet-121 on 64x64 at batch
    4, where the copies of the parameters that backward unpacks raise the peak
    (ignoring the offload predicts 13-17% under the measurement): the
    predicted step within 10% of the highest of 6 steps (12 take twice as long;
    with 4 the prediction was 6% over)."""
    backend = cpu_backend()
    arch = Architecture.named("densenet121")
    measured = measure_in_a_fresh_process(ModelSpec.parse("densenet121"), 4, 64, policy, backend, offload=True,
                                          steps=6)
    predicted = predict(arch, Setup(4, 64, backend=backend, threads=2, offload=True), policy)
    ignored = predict(arch, Setup(4, 64, backend=backend, threads=2), policy)
    assert abs(predicted.step_bytes / measured["peak_bytes"] - 1) < 0.10, (predicted.step, measured)
    assert ignored.step_bytes < 0.9 * measured["peak_bytes"]  # the case tells the two apart
    assert predicted.step["unpacked_copies"] > 0


def test_offload_is_planned_on_cuda_only(capsys):
    """plan --offload, plan(offload=True) and a model planned with it refuse the
    CPU, where save_on_cpu saves nothing; on CUDA the plan says what it assumes
    and its setup has the offload."""
    assert cli.main(["plan", "--offload"]) == 2
    assert "on the CPU it saves nothing" in capsys.readouterr().err
    model = densenet_bc(depth=40, memory_budget="1GiB")
    model.set_memory_budget("1GiB", offload=True)
    with pytest.raises(ValueError, match="on the CPU it saves nothing"):
        model.plan_for(2, 32)
    out = planner.plan(model, device="cuda", batch=2)
    assert out["setup"]["offload"] and any("save_on_cpu" in text for text in out["assumes"])
    with pytest.raises(TypeError, match="True or False"):
        model.set_memory_budget("1GiB", offload="yes")
    model.set_memory_budget("2GiB")  # keeps the offload, as it keeps the optimizer
    assert model.memory_offload


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_the_smallest_networks_peak_counts_the_c_heap(policy):
    """DenseNet-BC-40 at batch 1, the smallest network the issue's 10% target
    covers (a total of 4-5.5 MiB): the predicted total (persistent and step)
    within 10% of a fresh process's, with the C heap's pages beyond the step's
    small tensors counted on the CPU (``heap_pages``, 400 KiB, 7-9% of the
    total; without it the predictions were 5-14% short and outside 10% in
    about half the runs, so this bound alone does not pin the constant)."""
    backend = cpu_backend()
    measured = measure_in_a_fresh_process(ModelSpec("densenet_bc", 40), 1, 32, policy, backend)
    predicted = predict(BC40, Setup(1, 32, backend=backend, threads=2), policy)
    assert predicted.step["heap_pages"] == memory.CPU_HEAP_PAGES
    total = measured["persistent_bytes"] + measured["peak_bytes"]
    assert abs(predicted.total_bytes / total - 1) < 0.10, (predicted.step, measured)
    assert "heap_pages" not in predict(BC40, Setup(1, 32, device="cuda", backend="torch"), policy).step


@pytest.mark.parametrize("policy", ["keep", "recompute"])
def test_tiles_of_more_rows_than_a_stage_has_count_only_its_rows(policy):
    """DenseNet-BC-40 at batch 1 on 8x8 images: its last stages have 16 and 4
    pixels, far fewer rows than a C++ kernel's per-thread tile, of which only
    the rows written become resident. The predicted total within 10% of a
    fresh process's (measured 2.4-6.3% over; counting whole tiles predicted
    26-28% over)."""
    backend = cpu_backend()
    measured = measure_in_a_fresh_process(ModelSpec("densenet_bc", 40), 1, 8, policy, backend)
    predicted = predict(BC40, Setup(1, 8, backend=backend, threads=2), policy)
    total = measured["persistent_bytes"] + measured["peak_bytes"]
    assert abs(predicted.total_bytes / total - 1) < 0.10, (predicted.step, measured)
