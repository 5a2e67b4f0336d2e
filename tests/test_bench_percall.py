"""The per-call suite (benchmarks/run.py --suite percall, `make bench-percall`) on tiny settings:
its rows follow the results format, quiet and busy, with p90s and ratios to nn.ReLU and to the
plain step; the spinning process of the busy cases is gone afterwards, errors included; the
architectures have the ReLU call sites they claim; the profile breakdown runs. No test asserts a
time."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402
import models  # noqa: E402
import percall_profile  # noqa: E402
import percall_report  # noqa: E402

ROW = {"suite", "op", "phase", "provider", "shape", "numel", "time_ms", "time_ms_p90", "samples",
       "timer", "busy", "baseline", "ratio", "ratio_p90", "warm"}


def _busy_processes(parent: int) -> list[int]:
    """The pids of busy_core's spinning processes started by process `parent`, still alive."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if harness.BUSY_MARK in args and str(parent) in args:
            found.append(int(pid))
    return found


@pytest.fixture(scope="module")
def percall(tmp_path_factory) -> tuple[dict, int]:
    """The tiny per-call suite in a process of its own: (its results, its pid)."""
    out = tmp_path_factory.mktemp("percall") / "percall.json"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
                             "--suite", "percall-quick", "--threads", "2", "--budget", "60",
                             "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(out.read_text()), proc.pid


def test_percall_rows_are_per_call_with_p90_and_ratios(percall):
    doc, _ = percall
    assert doc["schema"] == 1 and doc["errors"] == [] and doc["skipped"] == [], doc
    assert doc["machine"]["threads"] == 2
    ops = [r for r in doc["rows"] if r["suite"] == "op" and r["op"] != "copy"]
    assert {r["op"] for r in ops} == {"shade_relu", "penalty"}
    for row in ops:
        assert ROW <= set(row), sorted(ROW - set(row))
        assert row["timer"] == harness.PER_CALL_TIMER and row["phase"] == "forward_backward"
        assert row["samples"] >= 3 * 4 and math.prod(row["shape"]) == row["numel"]
        assert 0 < row["time_ms"] <= row["time_ms_p90"], row
        assert row["baseline"] == "nn_relu" and row["ratio"] > 0 and row["ratio_p90"] > 0
        if row["provider"] == "nn_relu":
            assert row["ratio"] == row["ratio_p90"] == 1.0


def test_every_op_case_runs_quiet_and_busy(percall):
    doc, _ = percall
    cases = {(r["op"], r["provider"], r["numel"], r["busy"]) for r in doc["rows"]
             if r["suite"] == "op" and r["op"] != "copy"}
    assert {(op, p, n) for op, p, n, busy in cases if busy} == \
        {(op, p, n) for op, p, n, busy in cases if not busy}
    assert {busy for *_, busy in cases} == {True, False}
    assert {n for _, _, n, _ in cases} == {4096, 16384}


def test_steps_of_the_three_architectures_against_plain(percall):
    doc, _ = percall
    steps = [r for r in doc["rows"] if r["suite"] == "step"]
    assert {r["model"] for r in steps} == {"resnet18", "shufflenet_v2_x0_5", "densenet121"}
    for row in steps:
        assert row["baseline"] == "plain" and row["busy"] is False and row["ratio"] > 0
        assert row["time_ms_p90"] >= row["time_ms"] > 0 and row["held_bytes"] is not None
    assert {r["provider"] for r in steps} - {"plain"}  # a SHADE provider beside plain
    text = percall_report.summary(doc)
    assert "| yes | 16,384 |" in text and "densenet121" in text and "overhead" in text


def test_no_busy_process_is_left(percall):
    _, pid = percall
    assert _busy_processes(pid) == []


def test_busy_core_spins_pinned_and_is_reaped_on_error():
    with pytest.raises(KeyError):
        with harness.busy_core() as proc:
            assert proc.poll() is None and _busy_processes(os.getpid()) == [proc.pid]
            if hasattr(os, "sched_getaffinity"):
                assert os.sched_getaffinity(proc.pid) == {harness.busy_cpu()}
            raise KeyError("the block fails")
    assert proc.returncode is not None and _busy_processes(os.getpid()) == []


@pytest.mark.parametrize("name, calls", [("resnet18", 17), ("shufflenet_v2_x0_5", 37),
                                         ("densenet121", 121)])
def test_architectures_have_their_relu_call_sites(name, calls):
    model = models.build(name, (3, 32, 32), 10).eval()
    assert models.relu_calls(model, torch.randn(1, 3, 32, 32)) == calls


def test_profile_breakdown_runs_and_survives_a_missing_piece(tmp_path):
    out = tmp_path / "profile.md"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "percall_profile.py"),
                           "--rounds", "3", "--each", "2", "--profile-calls", "3", "--top", "4",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert percall_profile.WHOLE in text and "the rest" in text and "cProfile" in text
    times = {percall_profile.WHOLE: [0.1, 0.1], percall_profile.RELU: [0.02, 0.03],
             "check_inputs": [0.01, 0.01]}
    lines = "\n".join(percall_profile.breakdown_lines(times, {"update_state op": "gone"}, None))
    assert "| update_state op | n/a |" in lines and "| the rest" in lines
