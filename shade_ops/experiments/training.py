"""The paper's limited-samples experiment (Fig. 2a) and the training run it is made of.

    metrics = train(TrainConfig(dataset="digits-m", model="alexnet", samples=250,
                                regularizer="shade", beta=1e-3))
    result = sweep(SweepConfig())            # sizes x regularizers x seeds, chosen on validation
    write_report(result, "benchmarks/results", "2026-11-28")   # .json, .md table, .png plot

A sweep stopped by Ctrl-C raises :class:`Interrupted`, which holds the report of the runs done
(``write_report`` marks such a report partial and lists what is missing). Reports are written
atomically (``files.py``).

Every run of a seed trains on the same stratified subset of the training split from the same
initial weights, whatever the regularizer, so regularizers are compared pairwise. Hyper-parameters
(beta, weight decay, dropout rate) are chosen per training size by the mean validation accuracy
over the seeds; the test split is only ever used to report.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from .data import Dataset, Split, load_dataset
from .files import save_figure, write_text
from .models import build_model
from ..modules import collect, convert

__all__ = ["REGULARIZERS", "Interrupted", "SweepConfig", "TrainConfig", "check_splits",
           "markdown_table", "merge_reports", "missing_runs", "plot", "report_paths", "sweep",
           "train", "write_report"]

REGULARIZERS = ("none", "wd", "dropout", "shade", "shade+dropout")
_LABELS = {"none": "Baseline", "wd": "Weight decay", "dropout": "Dropout", "shade": "SHADE",
           "shade+dropout": "SHADE+D"}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``beta``, ``weight_decay`` and ``dropout`` only act when
    ``regularizer`` names them. It takes ``steps`` SGD steps when given, else ``epochs`` epochs
    but at least ``min_steps`` steps."""

    dataset: str = "digits-m"
    model: str = "alexnet"
    samples: int | None = None        # training samples drawn from the training split; None: all
    regularizer: str = "none"
    beta: float = 1e-3
    weight_decay: float = 1e-3
    dropout: float = 0.5
    epochs: int = 10
    steps: int | None = None
    min_steps: int = 0
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    seed: int = 0                     # the training subset, the initial weights, the batch order
    data_seed: int = 0                # the dataset itself: its splits and digits-m's backgrounds
    width: int | None = None          # the model's width (None: the model's default)
    backend: str = "auto"             # of the SHADE penalty
    information: bool = False         # record layer_information on the training set each epoch

    def __post_init__(self) -> None:
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"unknown regularizer {self.regularizer!r}; choose one of "
                             f"{', '.join(REGULARIZERS)}")
        _check_counts(self, positive=("samples", "steps", "batch_size", "width"),
                      natural=("epochs", "min_steps", "seed", "data_seed"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")

    @property
    def uses_shade(self) -> bool:
        return self.regularizer.startswith("shade")

    @property
    def effective(self) -> dict[str, float]:
        """The regularization this run really applies."""
        reg = self.regularizer
        return {"beta": self.beta if self.uses_shade else 0.0,
                "weight_decay": self.weight_decay if reg == "wd" else 0.0,
                "dropout": self.dropout if reg.endswith("dropout") else 0.0}


def _check_counts(config, positive: tuple[str, ...] = (), natural: tuple[str, ...] = ()) -> None:
    """ValueError for a field of ``positive`` that is not None or an int >= 1, or of ``natural``
    that is not an int >= 0: before any training, never at its first use."""
    for names, low in ((positive, 1), (natural, 0)):
        for name in names:
            value = getattr(config, name)
            if value is None and low == 1:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


class Interrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C (SIGINT): ``report`` holds the runs done so far (its
    ``results`` the sizes finished). A KeyboardInterrupt, so that it stops callers as one."""

    def __init__(self, report: dict) -> None:
        super().__init__("the sweep was interrupted")
        self.report = report


# Training images layer_information measures at each epoch when TrainConfig.information is on.
_INFORMATION_IMAGES = 1000


def _normalizer(split: Split) -> Callable[[torch.Tensor], torch.Tensor]:
    x = split.x.float() / 255
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3)
    return lambda images: (images.float() / 255 - mean) / std


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split,
             normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        logits = model(normalize(split.x[start:start + batch_size]))
        correct += (logits.argmax(1) == split.y[start:start + batch_size]).sum().item()
    return correct / max(len(split), 1)


def check_splits(data: Dataset, samples: int | None = None) -> None:
    """Raise ValueError unless ``samples`` (None: all) training images can be drawn from
    ``data`` and its validation and test splits have images: no run trains on 0 samples or
    reports an accuracy measured on none."""
    for part in ("train", "val", "test"):
        if len(getattr(data, part)) == 0:
            raise ValueError(f"the {part} split of {data.name} is empty (0 images, at least 1 "
                             f"needed)")
    if samples is not None and samples > len(data.train):
        raise ValueError(f"{samples} training samples were asked for, but the {data.name} "
                         f"training split has {len(data.train)} images: ask for at most "
                         f"{len(data.train)}")


def train(config: TrainConfig, data: Dataset | None = None, *, progress: bool = False,
          cache: str | None = None, root: str | None = None, predictions: bool = False) -> dict:
    """Train one model and return its metrics (accuracies are fractions in [0, 1]);
    ``predictions``: also the predicted class of every test image (``test_predictions``).

    Raises:
        ValueError: ``config.samples`` is more than the training split holds, or a split of
            ``data`` is empty (see :func:`check_splits`).
    """
    started = time.perf_counter()
    if data is None:
        data = load_dataset(config.dataset, seed=config.data_seed, root=root, cache=cache)
    check_splits(data, config.samples)
    train_split = data.train.subset(config.samples, config.seed) if config.samples else data.train
    normalize = _normalizer(train_split)
    effective = config.effective

    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    kwargs = {"width": config.width} if config.width is not None else {}
    model = build_model(config.model, data.in_shape, data.num_classes,
                        dropout=effective["dropout"], **kwargs)
    if config.uses_shade:
        convert(model, backend=config.backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=effective["weight_decay"])
    per_epoch = math.ceil(len(train_split) / config.batch_size)
    total = config.steps
    if total is None:
        total = max(config.epochs * per_epoch, config.min_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1))))

    order = torch.Generator().manual_seed(config.seed)
    x_all, y_all = normalize(train_split.x), train_split.y
    recent_ce: list[float] = []
    recent_penalty: list[float] = []
    bar = _progress(total, f"{config.model}/{config.regularizer}", progress)
    step = 0
    information: list[dict] = []

    def record() -> None:  # per layer H(Y), H(Y|C), I(Y;C), Var(Y|Z) on the training images
        from .information import layer_information

        probe = train_split.subset(_INFORMATION_IMAGES, config.seed)
        information.append({"step": step, "epoch": step / per_epoch,
                            "layers": layer_information(model, (normalize(probe.x), probe.y),
                                                        num_classes=data.num_classes)})

    if config.information:
        record()
    model.train()
    while step < total:
        for batch in torch.randperm(len(y_all), generator=order).split(config.batch_size):
            if step == total:
                break
            ce = F.cross_entropy(model(x_all[batch]), y_all[batch])
            loss = ce
            if config.uses_shade:
                shade = collect(model)
                loss = ce + config.beta * shade
                recent_penalty = (recent_penalty + [shade.item()])[-per_epoch:]
            recent_ce = (recent_ce + [ce.item()])[-per_epoch:]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if config.information and (step % per_epoch == 0 or step == total):
                record()
                model.train()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ce=f"{recent_ce[-1]:.3f}", refresh=False)
    if bar is not None:
        bar.close()

    return {
        "config": asdict(config),
        "effective": effective,
        "train_samples": len(train_split),
        "steps": total,
        "train_accuracy": accuracy(model, train_split, normalize),
        "val_accuracy": accuracy(model, data.val, normalize),
        "test_accuracy": accuracy(model, data.test, normalize),
        "final_cross_entropy": statistics.fmean(recent_ce) if recent_ce else None,
        "final_penalty": statistics.fmean(recent_penalty) if recent_penalty else None,
        "seconds": time.perf_counter() - started,
        **({"information": information} if config.information else {}),
        **({"test_predictions": _predict(model, data.test, normalize).tolist()}
           if predictions else {}),
    }


@torch.no_grad()
def _predict(model: torch.nn.Module, split: Split,
             normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500):
    model.eval()
    return torch.cat([model(normalize(split.x[i:i + batch_size])).argmax(1)
                      for i in range(0, len(split), batch_size)])


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr,
                mininterval=0.5)


# ---------------------------------------------------------------------------------------------
# the limited-samples sweep


@dataclass(frozen=True)
class SweepConfig:
    """The sweep of Fig. 2a: every size x regularizer x seed, hyper-parameters chosen on the
    validation split from the grids below.

    The default is the paper's Fig. 2a on ``mnist-m-5k`` (real MNIST digits, 1,500 validation
    and 1,500 test images): a run takes 15 epochs of SGD on batches of 32 but at least 300 steps
    (192 epochs at 50 samples, 470 steps at 1000), the AlexNet-like network at width 16; 13 runs
    per size and seed (1 + 3 weight decays + 3 dropout rates + 3 betas + 3 betas with dropout),
    5 sizes, 5 seeds: 325 runs. (The digits-m sweep of 2026-11-28 ran 25 epochs / 400 steps,
    4 seeds and beta in (3e-4, 1e-3, 3e-3); ``quick`` keeps that recipe.)
    """

    dataset: str = "mnist-m-5k"
    model: str = "alexnet"
    width: int | None = 16
    sizes: tuple[int, ...] = (50, 100, 250, 500, 1000)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    epochs: int = 15
    min_steps: int = 300
    batch_size: int = 32
    lr: float = 0.02
    betas: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    dropouts: tuple[float, ...] = (0.25, 0.5, 0.75)
    data_seed: int = 0
    regularizers: tuple[str, ...] = REGULARIZERS
    backend: str = "auto"

    @classmethod
    def quick(cls, **overrides) -> SweepConfig:
        """Two minutes on digits-m: baseline, dropout and SHADE at two sizes, two seeds,
        two-point grids;
        each run trained as in the full sweep (shorter runs would favour the baseline, which
        fits its training set fastest)."""
        base = dict(dataset="digits-m", sizes=(50, 250), seeds=(0, 1), epochs=25, min_steps=400,
                    regularizers=("none", "dropout", "shade"), betas=(1e-3, 3e-3),
                    dropouts=(0.25, 0.5))
        return cls(**{**base, **overrides})

    def __post_init__(self) -> None:
        for regularizer in self.regularizers:
            if regularizer not in REGULARIZERS:
                raise ValueError(f"unknown regularizer {regularizer!r}; choose among "
                                 f"{', '.join(REGULARIZERS)}")
        for name in ("sizes", "seeds", "regularizers"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for regularizer in self.regularizers:
            if not self.grid(regularizer):
                raise ValueError(f"{regularizer} is in the sweep but its grid is empty")
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"every size must be an int >= 1, got {size!r}")
        _check_counts(self, positive=("width", "batch_size"), natural=("epochs", "min_steps"))

    def grid(self, regularizer: str) -> list[dict[str, float]]:
        """The hyper-parameter settings tried for ``regularizer`` (shade+dropout's dropout rate
        is the one chosen for dropout at the same size)."""
        return {"none": [{}],
                "wd": [{"weight_decay": v} for v in self.weight_decays],
                "dropout": [{"dropout": v} for v in self.dropouts],
                "shade": [{"beta": v} for v in self.betas],
                "shade+dropout": [{"beta": v} for v in self.betas]}[regularizer]

    def run_count(self) -> int:
        return len(self.sizes) * len(self.seeds) * sum(len(self.grid(r))
                                                        for r in self.regularizers)


def sweep(config: SweepConfig, *, progress: bool = False, cache: str | None = None,
          root: str | None = None, on_size_done: Callable[[dict], None] | None = None) -> dict:
    """Run the sweep; returns ``{"config", "runs", "results", "seconds", ...}`` where
    ``results[size][regularizer]`` holds the chosen hyper-parameters and the test accuracies.

    Raises:
        Interrupted: on Ctrl-C (a KeyboardInterrupt during a run), with the report of the runs
            done so far.
    """
    started, cpu_started = time.perf_counter(), time.process_time()
    data = load_dataset(config.dataset, seed=config.data_seed, root=root, cache=cache)
    check_splits(data, max(config.sizes, default=None))  # before any run, not at the first too big
    base = TrainConfig(dataset=config.dataset, model=config.model, width=config.width,
                       epochs=config.epochs, min_steps=config.min_steps,
                       batch_size=config.batch_size, lr=config.lr,
                       data_seed=config.data_seed, backend=config.backend)
    bar = _progress(config.run_count(), "reproduce", progress)
    if bar is not None:
        bar.unit = "run"
    runs: list[dict] = []
    results: dict[str, dict] = {}
    report = {"config": asdict(config), **_environment(), "runs": runs, "results": results}

    try:
        for size in config.sizes:
            results[str(size)] = _sweep_size(config, base, data, size, runs, bar)
            report["seconds"] = time.perf_counter() - started
            report["cpu_seconds"] = time.process_time() - cpu_started
            if on_size_done is not None:
                on_size_done(report)
    except KeyboardInterrupt:
        report.update(seconds=time.perf_counter() - started,
                      cpu_seconds=time.process_time() - cpu_started)
        raise Interrupted(report) from None
    finally:
        if bar is not None:
            bar.close()
    report.update(seconds=time.perf_counter() - started,
                  cpu_seconds=time.process_time() - cpu_started)
    return report


def _sweep_size(config: SweepConfig, base: TrainConfig, data: Dataset, size: int,
                runs: list[dict], bar) -> dict[str, dict]:
    """Every run of one training size (appended to ``runs`` as each ends); returns the chosen
    setting of each regularizer."""
    chosen: dict[str, dict] = {}
    for regularizer in config.regularizers:
        settings = config.grid(regularizer)
        if regularizer == "shade+dropout" and "dropout" in chosen:
            settings = [{**s, "dropout": chosen["dropout"]["params"]["dropout"]}
                        for s in settings]
        candidates = []
        for params in settings:
            metrics = []
            for seed in config.seeds:
                run_config = replace(base, samples=size, regularizer=regularizer, seed=seed,
                                     **params)
                metrics.append(train(run_config, data))
                runs.append({"size": size, "regularizer": regularizer, "seed": seed,
                             "params": params, **_run_summary(metrics[-1])})
                if bar is not None:
                    bar.set_postfix(size=size, reg=regularizer, refresh=False)
                    bar.update(1)
            candidates.append((params, metrics))
        chosen[regularizer] = _choose(candidates)
    return chosen


def missing_runs(report: dict) -> list[str]:
    """The sizes of the report's config that its table lacks (a sweep stopped before them),
    each with the runs of it that were done, e.g. ``["250 (4 of 26 runs done)", ...]``; empty
    for a finished sweep."""
    config = report["config"]
    per_size = _sweep_config(config).run_count() // max(len(config["sizes"]), 1)
    done: dict[int, int] = {}
    for run in report["runs"]:
        done[run["size"]] = done.get(run["size"], 0) + 1
    return [f"{size} ({done.get(size, 0)} of {per_size} runs done)"
            for size in config["sizes"] if str(size) not in report["results"]]


def merge_reports(reports: list[dict]) -> dict:
    """One report from sweeps that differ only in their sizes (one size a process, run side by
    side): sizes in increasing order, runs and results joined, time and CPU time summed.

    Raises:
        ValueError: the sweeps differ in anything but their sizes, or two hold the same size.
    """
    def settings(report: dict) -> dict:
        return {k: v for k, v in report["config"].items() if k != "sizes"}

    first = reports[0]
    for other in reports[1:]:
        if settings(other) != settings(first):
            raise ValueError("the sweeps to merge differ in more than their sizes")
    sizes = sorted(int(s) for r in reports for s in r["results"])
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"a size is in two of the sweeps to merge: {sizes}")
    by_size = {s: r for r in reports for s in r["results"]}
    merged = {**first, "config": {**first["config"], "sizes": sizes},
              "runs": [run for r in reports for run in r["runs"]],
              "results": {str(s): by_size[str(s)]["results"][str(s)] for s in sizes},
              "seconds": sum(r.get("seconds", 0) for r in reports),
              "cpu_seconds": sum(r.get("cpu_seconds", 0) for r in reports),
              "wall_seconds": max(r.get("seconds", 0) for r in reports),
              "processes": len(reports)}
    merged["runs"].sort(key=lambda run: run["size"])
    return merged


def _run_summary(metrics: dict) -> dict:
    keys = ("train_accuracy", "val_accuracy", "test_accuracy", "final_cross_entropy",
            "final_penalty", "seconds")
    return {k: metrics[k] for k in keys}


def _choose(candidates: list[tuple[dict, list[dict]]]) -> dict:
    """The setting with the best mean validation accuracy over the seeds (the first on ties)."""
    def mean_val(candidate):
        return statistics.fmean(m["val_accuracy"] for m in candidate[1])

    params, metrics = max(candidates, key=mean_val)
    tests = [m["test_accuracy"] for m in metrics]
    return {"params": params,
            "val_mean": mean_val((params, metrics)),
            "test": tests,
            "test_mean": statistics.fmean(tests),
            "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "train_mean": statistics.fmean(m["train_accuracy"] for m in metrics)}


def _environment() -> dict:
    return {"shade_ops": __version__, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# the report: markdown table, plot, JSON


def _pct(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _paired_gain(results: dict, size: str, a: str, b: str) -> tuple[float, float, int]:
    """Mean and std over seeds of test(a) - test(b), in points, and the seeds a wins."""
    diffs = [x - y for x, y in zip(results[size][a]["test"], results[size][b]["test"])]
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return 100 * statistics.fmean(diffs), 100 * std, sum(d > 0 for d in diffs)


def _format_params(params: dict) -> str:
    names = {"beta": "β", "weight_decay": "wd", "dropout": "p"}
    return ", ".join(f"{names[k]}={v:g}" for k, v in params.items()) or "–"


def markdown_table(report: dict) -> str:
    """Test accuracy (%) per training size and regularizer, mean ± std over seeds; SHADE's
    paired gains over the others; the chosen hyper-parameters."""
    config, results = report["config"], report["results"]
    regs = list(config["regularizers"])
    sizes = list(results)
    seeds = len(config["seeds"])
    lines = [f"Test accuracy (%) on `{config['dataset']}` ({config['model']}), mean ± std over "
             f"{seeds} seeds; hyper-parameters chosen on the validation split.", "",
             "| samples | " + " | ".join(_LABELS[r] for r in regs) + " |",
             "|---:|" + "---:|" * len(regs)]
    for size in sizes:
        cells = [_pct(results[size][r]["test_mean"], results[size][r]["test_std"]) for r in regs]
        best = max(range(len(regs)), key=lambda i: results[size][regs[i]]["test_mean"])
        cells[best] = f"**{cells[best]}**"
        lines.append(f"| {size} | " + " | ".join(cells) + " |")

    others = [r for r in regs if r != "shade"]
    if "shade" in regs and others:
        lines += ["", f"SHADE minus each other regularizer, test points, paired by seed (mean ± "
                      f"std of the difference; in brackets the seeds out of {seeds} where SHADE "
                      f"is ahead):", "",
                  "| samples | " + " | ".join(f"vs {_LABELS[r]}" for r in others) + " |",
                  "|---:|" + "---:|" * len(others)]
        for size in sizes:
            cells = []
            for r in others:
                mean, std, wins = _paired_gain(results, size, "shade", r)
                cells.append(f"{mean:+.1f} ± {std:.1f} ({wins}/{seeds})")
            lines.append(f"| {size} | " + " | ".join(cells) + " |")

    lines += ["", "Chosen hyper-parameters (mean validation accuracy over seeds):", "",
              "| samples | " + " | ".join(_LABELS[r] for r in regs) + " |",
              "|---:|" + "---|" * len(regs)]
    edges = []
    for size in sizes:
        cells = []
        for r in regs:
            at_edge = _at_grid_edge(config, r, results[size][r]["params"])
            edges += [f"{_LABELS[r]} at {size} ({name})" for name in at_edge]
            cells.append(f"{_format_params(results[size][r]['params'])}"
                         f"{' (edge)' if at_edge else ''} "
                         f"(val {100 * results[size][r]['val_mean']:.1f})")
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    lines += ["", "Choices at an edge of their grid (the best value may lie outside it): "
              + (", ".join(edges) if edges else "none") + "."]
    return "\n".join(lines) + "\n"


_GRIDS = {"beta": "betas", "weight_decay": "weight_decays", "dropout": "dropouts"}


def _at_grid_edge(config: dict, regularizer: str, params: dict) -> list[str]:
    """The hyper-parameters of ``params`` chosen at the lowest or highest value of a grid of
    several (shade+dropout's dropout rate is dropout's choice, not its own)."""
    edge = []
    for name, value in params.items():
        if regularizer == "shade+dropout" and name == "dropout":
            continue
        grid = sorted(config.get(_GRIDS[name], ()))
        if len(grid) > 1 and value in (grid[0], grid[-1]):
            edge.append(f"{_format_params({name: value})}")
    return edge


def plot(report: dict, path: str | Path) -> None:
    """Test accuracy against training samples (log scale), mean ± std over seeds, as Fig. 2a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, results = report["config"], report["results"]
    sizes = [int(s) for s in results]
    styles = {"none": ("black", "o", 2.0), "shade": ("tab:red", "s", 2.0),
              "wd": ("tab:blue", "v", 1.0), "dropout": ("tab:green", "^", 1.0),
              "shade+dropout": ("tab:purple", "D", 1.0)}
    fig, ax = plt.subplots(figsize=(5.5, 4.0), dpi=120)
    for r in config["regularizers"]:
        mean = np.array([100 * results[str(s)][r]["test_mean"] for s in sizes])
        std = np.array([100 * results[str(s)][r]["test_std"] for s in sizes])
        color, marker, lw = styles[r]
        ax.plot(sizes, mean, color=color, marker=marker, lw=lw, ms=4, label=_LABELS[r],
                alpha=1.0 if lw > 1 else 0.7)
        ax.fill_between(sizes, mean - std, mean + std, color=color, alpha=0.12 if lw > 1 else 0.06)
    ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s // 1000}k" if s >= 1000 and s % 1000 == 0 else str(s)
                        for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("Number of training samples")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(f"{config['dataset']}, {config['model']}: mean ± std over "
                 f"{len(config['seeds'])} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report_paths(out_dir: str | Path, tag: str) -> dict[str, Path]:
    """Where :func:`write_report` writes the report of ``tag``."""
    return {ext: Path(out_dir) / f"reproduce_{tag}.{ext}" for ext in ("json", "md", "png")}


def write_report(report: dict, out_dir: str | Path, tag: str,
                 reading: str | None = None) -> dict[str, Path]:
    """``reproduce_<tag>.json``, ``.md`` (the table, the run's facts, ``reading`` when given) and
    ``.png`` in ``out_dir``, each written atomically; returns their paths. The report of a sweep
    stopped before some of its sizes says so in its header (and ``"missing"`` in the JSON)."""
    paths = report_paths(out_dir, tag)
    missing = missing_runs(report)
    write_text(paths["json"], json.dumps({**report, "missing": missing} if missing else report,
                                         indent=1) + "\n")
    plot(report, paths["png"])
    config = report["config"]
    facts = (f"`shade-ops reproduce`: {config['dataset']}, {config['model']} (width "
             f"{config['width']}), sizes {list(config['sizes'])}, seeds {list(config['seeds'])}, "
             f"{config['epochs']} epochs (at least {config['min_steps']} SGD steps) of "
             f"{config['batch_size']}-image batches a run (lr "
             f"{config['lr']}, momentum 0.9, cosine decay), grids β {list(config['betas'])}, "
             f"weight decay {list(config['weight_decays'])}, dropout "
             f"{list(config['dropouts'])}; {len(report['runs'])} runs in "
             f"{report.get('seconds', 0) / 60:.1f} min ({report.get('cpu_seconds', 0) / 60:.1f} "
             f"min of CPU time) on {report.get('threads', '?')} thread(s) "
             + (f"in all, {report['processes']} processes side by side (merge_reports), "
                f"{report['wall_seconds'] / 60:.1f} min for the longest "
                if "processes" in report else "") +
             f"(torch {report.get('torch', '?')}, {report.get('machine', '?')}).")
    if missing:
        facts = (f"**Partial report**: the run was stopped after {len(report['runs'])} of "
                 f"{len(report['runs']) + _left(report)} runs; missing from the table: sizes "
                 f"{', '.join(missing)}.\n\n" + facts)
    text = [f"# Limited-samples reproduction ({tag})", "", facts, "",
            f"![test accuracy against training samples](reproduce_{tag}.png)", "",
            markdown_table(report)]
    if reading:
        text += ["", reading.strip(), ""]
    write_text(paths["md"], "\n".join(text))
    return paths


def _left(report: dict) -> int:
    """The runs of the report's config that it does not hold."""
    return _sweep_config(report["config"]).run_count() - len(report["runs"])


def _sweep_config(config: dict) -> SweepConfig:
    """The SweepConfig of a report's ``config`` (its fields only: reports of older versions)."""
    names = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in config.items() if k in names})
