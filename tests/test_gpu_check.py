"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs (on the
CPU, through the Triton interpreter, with a few tests and tiny shapes) and
leaves the evidence the real run must leave: steps.jsonl, junit XML per test
shard, JSON per benchmark, the environment and the Triton configurations chosen."""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["environment", "build", "triton_tests", "gpu_tests", "triton_kernels", "memory_model", "model_bench"]
SHARDS = 2  # the dry run's


@pytest.fixture(scope="module")
def evidence(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "GIT_REVISION": "named-by-the-caller"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return out


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_step_ends_ok_within_its_limit(evidence):
    steps = {step["step"]: step for step in read_lines(evidence / "steps.jsonl")}
    assert sorted(steps) == sorted(STEPS)
    for step in steps.values():
        assert step["status"] == "ok" and step["rc"] == 0 and step["seconds"] <= step["limit"], step
    environment = json.loads((evidence / "environment.json").read_text())
    assert environment["dry_run"] and environment["triton_interpret"] == "1"
    assert environment["torch"] and environment["triton"] and len(environment["source_sha256"]) == 64
    # the caller's name for the tree, before the checkout's git metadata (the first GPU run's copied tree
    # carried an older commit's)
    assert environment["git_revision"] == "named-by-the-caller"


@pytest.mark.parametrize("name", ["triton_tests", "gpu_tests"])
def test_test_shards_write_junit_and_share_out_the_tests(evidence, name):
    names = []
    for shard in range(SHARDS):
        root = ET.parse(evidence / f"{name}_{shard}.xml").getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert int(suite.get("failures")) == int(suite.get("errors")) == 0
        names += [case.get("classname") + "::" + case.get("name") for case in suite.iter("testcase")]
    assert names and len(names) == len(set(names))  # every test in exactly one shard
    if name == "triton_tests":
        assert any("test_bn_relu[" in n for n in names) and any("configuration_follows" in n for n in names)


def test_benchmarks_write_json_and_log_configurations(evidence):
    kernels = json.loads((evidence / "triton_kernels.json").read_text())
    triton = [row for row in kernels["rows"] if row.get("impl") == "triton"]  # 4 primitives at 2 tiny shapes
    assert len(triton) == 8 and all(row["correct"] for row in triton)
    assert not any("error" in row for row in kernels["rows"])
    memory = json.loads((evidence / "memory.json").read_text())
    assert [(row["policy"], row["status"]) for row in memory["rows"]] == [("keep", "ok"), ("recompute", "ok")]
    assert all(row["measured_step_bytes"] > 0 and row["predicted_step_bytes"] > 0 for row in memory["rows"])
    models = json.loads((evidence / "models.json").read_text())
    assert [row["impl"] for row in models["rows"]] == ["tv-eager", "fast-triton-keep"]
    assert all(row["status"] == "ok" and row["train_peak_MiB"] > 0 and row["train_step_s"] > 0
               for row in models["rows"])
    kernels_logged = {record["kernel"] for record in read_lines(evidence / "triton_configs.jsonl")}
    assert {"_forward_kernel", "_reduce_kernel", "_dx_kernel", "_bn_relu_kernel"} <= kernels_logged


def test_the_steps_asked_for_run_and_no_others(tmp_path):
    """``--steps reduce_probe,depth_budget,offload_model,kernel_graphs``: the
    environment and those, each leaving its JSON (the reduce probe's cases, the
    budget's searches, the memory model with the offload and without, the
    kernels, here without CUDA graphs); an unknown step is refused before
    anything runs."""
    env = {**os.environ, "PYTHON": sys.executable}
    script = str(REPO / "benchmarks" / "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--dry-run", "--steps",
                           "reduce_probe,depth_budget,offload_model,kernel_graphs", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = read_lines(tmp_path / "steps.jsonl")
    assert [step["step"] for step in steps] == ["environment", "kernel_graphs", "reduce_probe", "offload_model",
                                                "offload_baseline", "depth_budget"]
    kernel_rows = json.loads((tmp_path / "triton_kernels_graphs.json").read_text())["rows"]
    assert kernel_rows and all(row.get("correct", True) and "error" not in row for row in kernel_rows)
    for name, offload in (("memory_offload.json", True), ("memory_no_offload.json", False)):
        memory = json.loads((tmp_path / name).read_text())
        assert memory["environment"]["settings"]["offload"] is offload
        assert [row["status"] for row in memory["rows"]] == ["ok", "ok"]
    probe = json.loads((tmp_path / "reduce_probe.json").read_text())
    assert probe["rows"] and all(row["dw_error"] < 1e-5 and not row["wrong_splits"] for row in probe["rows"])
    assert any(not row["listed"] for row in probe["rows"]) and any(row["listed"] for row in probe["rows"])
    searches = json.loads((tmp_path / "depth.json").read_text())["budget_search"]
    assert [row["impl"] for row in searches] == ["fast-torch-keep", "fast-torch-auto"]
    assert all(row["predicted_deepest"] and row["deepest_fitting"] for row in searches), searches
    refused = subprocess.run(["bash", script, "--dry-run", "--steps", "triton_tests,nonsense", str(tmp_path / "x")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "unknown step: nonsense" in refused.stderr
    assert not (tmp_path / "x" / "steps.jsonl").exists()
