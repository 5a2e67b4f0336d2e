"""The training-step cases of the benchmark harness (benchmarks/harness.py), which replaced
benchmarks/resnet_step.py: SHADE on every layer of a model against the plain step, on tiny
settings."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shade_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import harness  # noqa: E402

RESNET8 = (("model", "resnet20"), ("builder", "resnet"), ("kwargs", (("blocks", 1), ("width", 4))))


def _case(layout: str = "nchw", providers: tuple[str, ...] = ("plain", "reference")):
    return harness.Case("step_resnet20", "step", layout, (2, 3, 8, 8), "float32", providers,
                        RESNET8)


def test_a_step_trains_and_shade_adds_its_penalty():
    plain, plain_forward = harness.step_call(_case(), "plain", "cpu")
    shade, shade_forward = harness.step_call(_case(), "reference", "cpu")
    # the same weights and batch: SHADE's loss is the plain one plus BETA times the penalties
    with torch.no_grad():
        assert shade_forward().item() > plain_forward().item()
    before = plain_forward().item()
    for _ in range(5):
        plain()
    assert plain_forward().item() != before  # the step updates the weights


def test_step_rows_carry_model_batch_and_held_memory():
    rows = harness.run_case(_case(), "cpu", rounds=3, seconds=5.0)
    assert [r["provider"] for r in rows] == ["plain", "reference"]
    for row in rows:
        assert row["suite"] == "step" and row["model"] == "resnet20" and row["batch"] == 2
        assert row["memory_format"] == "contiguous" and row["samples"] == 3
        assert row["time_ms"] > 0 and row["peak_bytes"] > 0
    held = {r["provider"]: r["held_bytes"] for r in rows}
    assert held["plain"] == 0
    # the eager reference keeps y and its intermediates alive to the backward: more than ReLU
    assert held["reference"] > 0


def test_held_bytes_counts_what_the_forward_keeps():
    kept = []

    def forward():
        kept.append(torch.empty(1 << 18))  # 1 MiB that outlives the call
        return torch.empty(1 << 16)        # 256 KiB, the "loss", alive until measured
    assert harness.held_bytes(forward, "cpu") == (1 << 20) + (1 << 18)


_ONE_THREAD = """
import sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, "benchmarks")
import harness
case = harness.Case("step_resnet20", "step", "channels_last", (2, 3, 8, 8), "float32",
                    ("plain", "cpu"), {resnet8!r})
onednn = torch.backends.mkldnn.enabled
doc = harness.run_plan(harness.Plan([case], rounds=2, step_rounds=2, copy_numel=1 << 16), "cpu",
                       "test", 120.0)
rows = [r for r in doc["rows"] if r["suite"] == "step"]
assert len(rows) == 2 and all(r["time_ms"] > 0 for r in rows), rows
assert rows[0]["memory_format"] == "channels_last"
assert torch.backends.mkldnn.enabled == onednn
"""


def test_channels_last_resnet_step_on_one_thread():
    """The ResNet's step on one thread, channels_last, in a process of its own: oneDNN's backward
    of the 4 -> 8 strided 1x1 shortcut on an NHWC input corrupted the heap there ("double free or
    corruption", oneDNN issue #6035), so the harness turns oneDNN off for CPU steps, and on again
    after."""
    if "cpu" not in shade_ops.available_backends("cpu"):
        pytest.skip("shade_ops._C is not built")
    done = subprocess.run([sys.executable, "-c", _ONE_THREAD.format(resnet8=RESNET8)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-3000:])
