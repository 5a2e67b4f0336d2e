"""The shade-ops command line end to end, on runs small enough for a test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shade_ops.experiments import data as data_module
from shade_ops.experiments.architectures import ArchitecturesConfig
from shade_ops.experiments.cli import main
from shade_ops.experiments.training import SweepConfig

from conftest import fake_cifar10, fake_mnist_m

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _train(cache, out, *extra):
    return main(["train", "--dataset", "digits-m", "--model", "mlp", "--samples", "100",
                 "--epochs", "1", "--regularizer", "shade", "--beta", "0.01", "--seed", "0",
                 "--width", "32", "--out", str(out), "--cache", cache, "--no-progress",
                 *extra])


def test_train_writes_metrics(tmp_path, cache, capsys):
    assert _train(cache, tmp_path / "run.json") == 0
    printed = capsys.readouterr().out
    assert "test accuracy:" in printed
    metrics = json.loads((tmp_path / "run.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["train_samples"] == 100
    assert metrics["steps"] == 4                       # ceil(100 / 32): one epoch
    assert metrics["final_penalty"] > 0
    assert metrics["effective"] == {"beta": 0.01, "weight_decay": 0.0, "dropout": 0.0}
    assert f"{100 * metrics['test_accuracy']:.2f}%" in printed


def test_train_is_deterministic(tmp_path, cache):
    for name in ("a.json", "b.json"):
        assert _train(cache, tmp_path / name, "--regularizer", "shade+dropout") == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    for key in ("test_accuracy", "val_accuracy", "final_penalty", "final_cross_entropy"):
        assert a[key] == b[key], key


def test_train_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--dataset", "cifar10", "--data-root", str(tmp_path),
                 "--cache", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


# ---- splits that cannot be made: exit 2 and a message on stderr, before any training ----------

def test_train_more_samples_than_the_training_split(tmp_path, cache, capsys):
    assert _train(cache, tmp_path / "run.json", "--samples", "1001") == 2
    captured = capsys.readouterr()
    assert "1001 training samples" in captured.err and "has 1000 images" in captured.err
    assert "test accuracy" not in captured.out and not (tmp_path / "run.json").exists()


def test_reproduce_size_larger_than_the_training_split(tmp_path, cache, capsys):
    code = main(["reproduce", "--dataset", "digits-m", "--sizes", "20,1500", "--seeds", "1",
                 "--model", "mlp",
                 "--out-dir", str(tmp_path), "--cache", cache, "--no-progress"])
    assert code == 2
    assert "1500 training samples" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "runs before the error left results"


@pytest.mark.parametrize("name, make, expected", [
    ("cifar10", lambda root: fake_cifar10(root, 6, 4), "has 30 training images"),
    ("mnist-m", lambda root: fake_mnist_m(root, 6, 0), "no test images"),
], ids=["cifar10-too-small", "mnist-m-no-test"])
def test_train_local_dataset_that_cannot_be_split(tmp_path, capsys, monkeypatch, name, make,
                                                  expected):
    if name == "mnist-m":  # enough training images for a 3-image validation split
        monkeypatch.setattr(data_module, "_LOCAL_VAL", 3)
    code = main(["train", "--dataset", name, "--data-root", str(make(tmp_path / "data")),
                 "--cache", str(tmp_path / "cache"), "--no-progress", "--steps", "1"])
    captured = capsys.readouterr()
    assert code == 2 and expected in captured.err and "test accuracy" not in captured.out


def test_reproduce_tiny_sweep(tmp_path, cache, capsys):
    out = tmp_path / "results"
    code = main(["reproduce", "--dataset", "digits-m", "--sizes", "20,40", "--seeds", "2",
                 "--epochs", "1",
                 "--min-steps", "2", "--model", "mlp", "--width", "16", "--betas", "1e-3,3e-3",
                 "--weight-decays", "1e-3,5e-3", "--dropouts", "0.25,0.5", "--out-dir", str(out),
                 "--tag", "tiny", "--cache", cache, "--no-progress"])
    assert code == 0
    md = (out / "reproduce_tiny.md").read_text()
    assert "| 20 |" in md and "| 40 |" in md and "SHADE" in md and "±" in md
    # two-point grids: every choice sits at an edge, and the table says so
    assert "(edge)" in md and "Choices at an edge of their grid" in md and "SHADE at 20" in md
    png = (out / "reproduce_tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    report = json.loads((out / "reproduce_tiny.json").read_text())
    # 2 sizes x 2 seeds x (1 + 2 + 2 + 2 + 2) runs
    assert len(report["runs"]) == 36
    for size in ("20", "40"):
        chosen = report["results"][size]
        assert set(chosen) == {"none", "wd", "dropout", "shade", "shade+dropout"}
        dropout = chosen["dropout"]["params"]["dropout"]
        assert chosen["shade+dropout"]["params"]["dropout"] == dropout
        assert len(chosen["shade"]["test"]) == 2
    assert "36 runs" in capsys.readouterr().out


def test_quick_sweep_is_small():
    quick = SweepConfig.quick()
    assert quick.run_count() == 20 and quick.regularizers == ("none", "dropout", "shade")
    # the quick one stays on digits-m with the recipe of its 2026-11-28 sweep; the default is
    # Fig. 2a on mnist-m-5k: 5 sizes x 5 seeds x 13 settings
    assert (quick.dataset, quick.epochs, quick.min_steps) == ("digits-m", 25, 400)
    assert SweepConfig().dataset == "mnist-m-5k" and SweepConfig().run_count() == 325


def test_architectures_quick(tmp_path, cache, capsys):
    started = time.perf_counter()
    code = main(["architectures", "--quick", "--out-dir", str(tmp_path), "--tag", "q",
                 "--cache", cache, "--no-progress"])
    assert code == 0
    assert time.perf_counter() - started < 300          # the promise of --quick
    report = json.loads((tmp_path / "architectures_q.json").read_text())
    assert list(report["models"]) == ["mlp", "alexnet", "resnet", "inception"]
    for sub in report["models"].values():
        assert set(sub["results"]["200"]) == {"none", "dropout", "shade"}
        assert len(sub["runs"]) == 3
    md = (tmp_path / "architectures_q.md").read_text()
    for model in ("mlp", "alexnet", "resnet", "inception"):
        assert f"| {model} (width" in md and f"| {model} |" in md
    assert "vs Baseline" in md and "12 runs" in capsys.readouterr().out


def test_architectures_default_is_table_1():
    config = ArchitecturesConfig()
    assert config.dataset == "mnist-m-5k" and config.samples == 2000
    assert config.models == ("mlp", "alexnet", "resnet", "inception")
    assert len(config.seeds) == 3 and config.run_count() == 4 * 3 * 7  # 2 betas


def test_mechanism_tiny(tmp_path, cache):
    code = main(["mechanism", "--dataset", "digits-m", "--samples", "60", "--epochs", "2",
                 "--min-steps", "0", "--width", "4", "--out-dir", str(tmp_path), "--tag", "t",
                 "--cache", cache, "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "mechanism_t.json").read_text())
    for run in report["runs"].values():
        assert len(run["information"]) == 3                 # before training, 2 epochs
        assert len(run["information"][0]["layers"]) == 4    # the AlexNet's four ReLU sites
        assert len(run["test_predictions"]) == len(report["test_labels"])
    for name in ("mechanism_t_information.png", "mechanism_t_images.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert "| 1 (features.1) |" in (tmp_path / "mechanism_t.md").read_text()


def test_demo_runs(cache, capsys):
    assert main(["demo", "--steps", "3", "--timing-steps", "2", "--cache", cache,
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "SHADE penalty" in printed
    assert "fused (backend='cpu')" in printed or "timing skipped" in printed


def test_python_m_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "shade_ops", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    for command in ("train", "reproduce", "architectures", "mechanism", "demo"):
        assert command in done.stdout


def test_merge_reports_joins_sweeps_of_other_sizes(tmp_path, cache):
    from shade_ops.experiments.training import merge_reports, write_report

    common = ["--dataset", "digits-m", "--seeds", "2", "--epochs", "1", "--min-steps", "2",
              "--model", "mlp", "--width", "8", "--regularizers", "none,shade",
              "--betas", "1e-3", "--cache", cache, "--no-progress", "--out-dir", str(tmp_path)]
    for size in (40, 20):
        assert main(["reproduce", "--sizes", str(size), "--tag", f"s{size}", *common]) == 0
    parts = [json.loads((tmp_path / f"reproduce_s{s}.json").read_text()) for s in (40, 20)]
    merged = merge_reports(parts)
    assert merged["config"]["sizes"] == [20, 40] and list(merged["results"]) == ["20", "40"]
    assert len(merged["runs"]) == 8 and merged["processes"] == 2
    md = write_report(merged, tmp_path, "merged")["md"].read_text()
    assert "| 20 |" in md and "| 40 |" in md and "2 processes side by side" in md
    other = {**parts[0], "config": {**parts[0]["config"], "lr": 1.0}}
    with pytest.raises(ValueError, match="more than their sizes"):
        merge_reports([other, parts[1]])
    with pytest.raises(ValueError, match="two of the sweeps"):
        merge_reports([parts[0], parts[0]])
