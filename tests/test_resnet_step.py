"""benchmarks/resnet_step.py, the ResNet training-step overhead benchmark, on tiny settings."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resnet_step():
    spec = importlib.util.spec_from_file_location(
        "resnet_step", os.path.join(ROOT, "benchmarks", "resnet_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summary_pairs_each_round_with_its_own_baseline():
    rs = _resnet_step()
    times = {"no-shade": [1.0, 2.0, 1.0], "shade_ops": [1.1, 2.2, 1.1],
             "shade-eager": [3.0], rs.EAGER_BASELINE: [1.5]}
    rows = {row["variant"]: row for row in rs.summarise(times)}
    assert set(rows) == {"no-shade", "shade_ops", "shade-eager"}
    # a drift that doubles both in round 2 leaves the per-round ratio at 1.1
    assert rows["shade_ops"]["overhead"] == pytest.approx(0.1)
    assert rows["shade_ops"]["median_ms"] == pytest.approx(1100.0)
    assert rows["shade-eager"]["overhead"] == pytest.approx(1.0)  # 3.0 / 1.5, its own rounds
    assert rows["no-shade"]["overhead"] == pytest.approx(0.0)


def test_tiny_run_writes_json_and_markdown(tmp_path):
    rs = _resnet_step()
    out = tmp_path / "step.json"
    report = rs.main(["--rounds", "4", "--warmup", "1", "--batch", "2", "--size", "8",
                      "--blocks", "1", "--out", str(out)])
    variants = [row["variant"] for row in report["rows"]]
    assert variants == ["no-shade", "relu-keep-y", "shade_ops", "shade-eager"]
    assert all(row["median_ms"] > 0 for row in report["rows"])
    assert len(report["times_s"]["shade_ops"]) == 4 and len(report["times_s"]["shade-eager"]) == 1
    saved = json.loads(out.read_text())
    assert saved["rows"] == report["rows"]
    text = (tmp_path / "step.md").read_text()
    assert "| shade_ops |" in text and "ResNet-8, batch 2 of 3x8x8" in text


def test_keep_input_relu_matches_relu():
    import torch

    rs = _resnet_step()
    y = torch.randn(3, 4, 5, requires_grad=True)
    g = torch.randn(3, 4, 5)
    (grad,) = torch.autograd.grad(rs.ReLUKeepingInput()(y), y, g)
    (expected,) = torch.autograd.grad(torch.relu(y), y, g)
    assert torch.equal(grad, expected)


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        _resnet_step().main(["--variants", "no-shade,fast"])


def test_core_ratios_runs_and_judges_the_goals(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "core_ratios", os.path.join(ROOT, "benchmarks", "core_ratios.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    times = {"penalty shade_ops": [1.0, 2.0], "penalty eager": [12.0, 24.0],
             "penalty compile": [1.5, 3.0], "ShadeReLU": [1.2, 2.4], "nn.ReLU": [1.0, 2.0]}
    ratios = module.summary(times)["ratios"]
    assert ratios["penalty: eager / shade_ops"]["median"] == pytest.approx(12.0)
    assert ratios["penalty: eager / shade_ops"]["met"]
    assert not ratios["penalty: compile / shade_ops"]["met"]  # 1.5x < 2x
    assert ratios["ShadeReLU / nn.ReLU"]["met"]
    if "cpu" in __import__("shade_ops").available_backends("cpu"):
        report = module.main(["--rounds", "2", "--out", str(tmp_path / "r.json")])
        assert set(report["ratios"]) == set(module.RATIOS)
        assert (tmp_path / "r.md").read_text().startswith("Side-by-side ratios")
