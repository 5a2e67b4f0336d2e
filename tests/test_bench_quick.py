"""The benchmark harness (benchmarks/harness.py, benchmarks/run.py): the quick suite runs and
writes the one results format (docs/benchmarks.md, "Results format"); its memory measure is right
on a known allocation. No test asserts a time."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

import shade_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402

TOP = {"schema", "date", "machine", "versions", "command", "copy_gbps", "rows"}
MACHINE = {"device", "name", "cpu_capability", "threads", "hostname_hash"}
VERSIONS = {"python", "torch", "triton", "shade_ops", "git"}
ROW = {"suite", "op", "phase", "provider", "layout", "shape", "units", "numel", "dtype",
       "time_ms", "time_ms_q1", "time_ms_q3", "samples", "timer", "peak_bytes", "bytes_moved",
       "gbps", "roofline"}
STEP = {"model", "batch", "memory_format", "held_bytes"}
CHOICES = {
    "suite": {"op", "step"},
    "op": {"penalty", "shade_relu", "copy", "step_mlp", "step_resnet8", "step_resnet20"},
    "phase": {"forward", "backward", "forward_backward", "step"},
    "provider": {"cpu", "triton", "reference", "compile", "nn_relu", "plain", "copy",
                 "cpu" + harness.RECOMPUTE, "triton" + harness.RECOMPUTE},
    "layout": {"nchw", "channels_last", "nd", "nld"},
    "dtype": {"float32", "bfloat16"},
    "timer": {"cpu-perf_counter", "cuda-do_bench", "cuda-graph"},
}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """The quick suite, run as `make bench-quick` runs it, in a process of its own."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
                           "--suite", "quick", "--budget", "30", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_quick_suite_follows_the_schema(quick):
    assert TOP <= set(quick) and quick["schema"] == 1
    assert MACHINE <= set(quick["machine"]) and quick["machine"]["device"] == "cpu"
    assert VERSIONS <= set(quick["versions"]) and quick["versions"]["torch"] == torch.__version__
    assert quick["date"].endswith("Z") and _positive(quick["copy_gbps"])
    assert quick["rows"] and quick["errors"] == [], quick["errors"]
    for row in quick["rows"]:
        assert ROW <= set(row), sorted(ROW - set(row))
        for name, allowed in CHOICES.items():
            assert row[name] in allowed, (name, row[name])
        assert math.prod(row["shape"]) == row["numel"] and _positive(row["units"])
        assert _positive(row["time_ms"]) and row["samples"] >= 1
        if row["samples"] > 1:
            assert row["time_ms_q1"] <= row["time_ms"] <= row["time_ms_q3"], row
        assert row["peak_bytes"] is not None and row["peak_bytes"] >= 0, row  # CPU: measured
        assert isinstance(row["warm"], bool), row  # CPU rows say whether they were timed warm
        if row["suite"] == "op":
            assert _positive(row["bytes_moved"]) and _positive(row["gbps"])
            assert row["roofline"] == pytest.approx(row["gbps"] / quick["copy_gbps"])
        else:
            assert STEP <= set(row) and row["phase"] == "step" and row["held_bytes"] is not None


def test_quick_suite_has_fused_reference_and_step_rows(quick):
    providers = {(r["op"], r["provider"]) for r in quick["rows"]}
    assert ("copy", "copy") in providers
    if "cpu" in shade_ops.available_backends("cpu"):
        assert {("penalty", "cpu"), ("shade_relu", "cpu"), ("step_mlp", "cpu")} <= providers
    assert {("penalty", "reference"), ("shade_relu", "nn_relu"), ("step_mlp", "plain"),
            ("step_resnet8", "plain")} <= providers
    phases = {r["phase"] for r in quick["rows"] if r["op"] == "penalty"}
    assert phases == set(harness.PHASES)
    plain = [r for r in quick["rows"] if r["provider"] == "plain"]
    assert all(r["held_bytes"] == 0 for r in plain)  # the baseline of held memory is itself


def test_recompute_relu_gives_back_the_memory_shade_holds(quick):
    if "cpu" not in shade_ops.available_backends("cpu"):
        pytest.skip("needs the native CPU backend")
    held = {r["provider"]: r["held_bytes"] for r in quick["rows"] if r["op"] == "step_resnet8"}
    # SHADE keeps every ReLU's input: 4 ReLU call sites of (8, 8, 16, 16) float32 and more
    assert held["cpu"] >= 4 * 8 * 8 * 16 * 16 * 4
    assert held["cpu" + harness.RECOMPUTE] < held["cpu"] / 4


def test_cpu_memory_trace_on_a_known_allocation():
    def allocate():
        kept = torch.empty(1 << 20)        # 4 MiB, alive at the end
        dropped = torch.empty(1 << 21)     # 8 MiB, freed inside
        del dropped
        return kept

    peak, net = harness.cpu_memory_trace(allocate)
    assert peak == (4 << 20) + (8 << 20) and net == 4 << 20


def test_shapes_and_bytes_moved():
    for layout in harness.LAYOUTS:
        for numel, units in ((1 << 11, 64), (1 << 21, 16), (1 << 21, 1024)):
            shape = harness.shape_for(layout, numel, units)
            case = harness.Case("penalty", "forward_backward", layout, shape)
            assert case.units == units and numel // 2 <= case.numel <= numel
    case = harness.Case("shade_relu", "forward", "nld", (2, 3, 5), "bfloat16")
    row = harness.make_row(case, "cpu", [1.0, 2.0, 3.0], "cpu-perf_counter", 0, copy_gbps=1.0)
    assert row["bytes_moved"] == 2 * 30 * 2 and row["units"] == 5
    assert row["time_ms"] == 2.0 and row["gbps"] == pytest.approx(120 / 2e-3 / 1e9)
    assert harness.quartiles([5.0]) == (5.0, None, None)


def test_a_case_interleaves_its_providers():
    order = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    times = harness.cpu_times(calls, rounds=4, seconds=60, min_sample_s=0, warm_below_s=0)
    assert all(len(t) == 4 for t in times.values())
    rounds = [order[6 + 3 * i: 9 + 3 * i] for i in range(4)]  # after 2 warm calls each
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # shuffled, not one fixed order


def test_a_slow_provider_samples_less_in_shared_rounds():
    """A provider past its share of the seconds stops at 3 samples; the others go on to
    `rounds`, each of their rounds shuffled as before."""
    order = []

    def slow():
        order.append("slow")
        time.sleep(0.1)

    calls = {"slow": slow, "a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = harness.cpu_times(calls, rounds=8, seconds=0.3, min_sample_s=0, warm_below_s=0)
    assert len(times["slow"]) == 3 and len(times["a"]) == len(times["b"]) == 8
    timed = order[6:]  # after 2 warm calls each
    assert sorted(timed[:9]) == sorted(["slow", "a", "b"] * 3)  # 3 shared rounds first
    assert sorted(timed[9:]) == ["a"] * 5 + ["b"] * 5


def test_short_calls_are_timed_warm():
    """A call under warm_below_s runs once untimed before each sample; a longer one does not."""
    order = []

    def slow():
        order.append("slow")
        time.sleep(0.02)

    calls = {"fast": lambda: order.append("fast"), "slow": slow}
    warmed = set()
    harness.cpu_times(calls, rounds=3, seconds=60, min_sample_s=0, warm_below_s=0.01,
                      warmed=warmed)
    assert warmed == {"fast"}
    rounds = order[4:]  # after 2 warm calls each
    assert len(rounds) == 3 * 3  # each round: fast twice (warm, timed), slow once
    for i in range(3):
        assert sorted(rounds[3 * i: 3 * i + 3]) == ["fast", "fast", "slow"]


def test_triton_host_overhead_runs(tmp_path):
    """benchmarks/triton_host_overhead.py (the launchers' host cost, old against new) on a few
    calls: it loads the old launchers from git, so it breaks when the modules they import move."""
    pytest.importorskip("triton")
    if subprocess.run(["git", "cat-file", "-e", "fdb8588^{commit}"], cwd=ROOT,
                      capture_output=True).returncode != 0:
        pytest.skip("the git history of commit fdb8588 is not in this clone")
    out = tmp_path / "host.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks",
                                                        "triton_host_overhead.py"),
                           "--rounds", "2", "--calls", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shade_relu forward+backward" in done.stdout and out.exists()
