"""The paper's Table 1 on the data that is here: no regularisation, weight decay, dropout, SHADE
and SHADE+dropout on the four architectures, trained on one training set.

    report = architectures(ArchitecturesConfig())
    write_architectures_report(report, "benchmarks/results", "2026-11-29-mnist")

Each architecture is one :func:`~shade_ops.experiments.training.sweep` at one size (the whole training
split by default), so seeds pair the regularizers exactly as in Fig. 2a and any hyper-parameter
grid of more than one value is chosen on the validation split. Stopped by Ctrl-C, it raises
:class:`~shade_ops.experiments.training.Interrupted` with the report of the runs done, which
:func:`write_architectures_report` writes as a partial report.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from .files import write_text
from .models import MODELS
from .training import (_LABELS, REGULARIZERS, Interrupted, SweepConfig, _at_grid_edge,
                       _environment, sweep)

__all__ = ["ArchitecturesConfig", "architectures", "architectures_table", "report_paths",
           "runs_done", "write_architectures_report"]


@dataclass(frozen=True)
class ArchitecturesConfig:
    """Table 1 at a CPU's scale: the four models at the widths below, on ``samples`` training
    images (the whole 2,000-image training split of mnist-m-5k), 3 seeds, 4 epochs of batches of
    32 (252 steps), one weight decay, one dropout rate, and beta chosen from two values on the
    validation split (a fixed beta of 3e-3 cost the MLP 23 points: its penalty sums 768 units);
    no wider grids: the budget of 90 minutes of a 2-core machine for the whole table does not
    hold them."""

    dataset: str = "mnist-m-5k"
    samples: int = 2000
    models: tuple[str, ...] = ("mlp", "alexnet", "resnet", "inception")
    widths: dict[str, int] = field(default_factory=lambda: {"mlp": 256, "alexnet": 16,
                                                             "resnet": 8, "inception": 8})
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 4
    min_steps: int = 0
    batch_size: int = 32
    lr: float = 0.02
    betas: tuple[float, ...] = (3e-4, 3e-3)
    weight_decays: tuple[float, ...] = (1e-3,)
    dropouts: tuple[float, ...] = (0.5,)
    regularizers: tuple[str, ...] = REGULARIZERS
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models must not be empty")
        for model in self.models:
            if model not in MODELS:
                raise ValueError(f"unknown model {model!r}; choose among {', '.join(MODELS)}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or \
                self.samples < 1:
            raise ValueError(f"samples must be an int >= 1, got {self.samples!r}")
        for model in self.models:  # every sweep's own checks, before the first model trains
            self.sweep_config(model)

    @classmethod
    def quick(cls, **overrides) -> ArchitecturesConfig:
        """About a minute: digits-m, 200 images, one seed, one epoch, baseline, dropout and
        SHADE on the four models at small widths."""
        base = dict(dataset="digits-m", samples=200, seeds=(0,), epochs=1, min_steps=100,
                    regularizers=("none", "dropout", "shade"), betas=(3e-3,),
                    widths={"mlp": 64, "alexnet": 8, "resnet": 4, "inception": 4})
        return cls(**{**base, **overrides})

    def sweep_config(self, model: str) -> SweepConfig:
        return SweepConfig(dataset=self.dataset, model=model, width=self.widths.get(model),
                           sizes=(self.samples,), seeds=self.seeds, epochs=self.epochs,
                           min_steps=self.min_steps, batch_size=self.batch_size, lr=self.lr,
                           betas=self.betas, weight_decays=self.weight_decays,
                           dropouts=self.dropouts, regularizers=self.regularizers,
                           backend=self.backend)

    def run_count(self) -> int:
        return sum(self.sweep_config(m).run_count() for m in self.models)


def architectures(config: ArchitecturesConfig, *, progress: bool = False,
                  cache: str | None = None, root: str | None = None,
                  on_model_done: Callable[[dict], None] | None = None) -> dict:
    """One sweep per model; returns ``{"config", "models": {model: sweep report}, "seconds"}``.

    Raises:
        Interrupted: on Ctrl-C, with the report of the models done and, under ``"stopped"``,
            the sweep report of the model it stopped in (``{"model", "report"}``).
    """
    started = time.perf_counter()
    report = {"config": asdict(config), **_environment(), "models": {}}
    model = None
    try:
        for model in config.models:
            report["models"][model] = sweep(config.sweep_config(model), progress=progress,
                                            cache=cache, root=root)
            report["seconds"] = time.perf_counter() - started
            if on_model_done is not None:
                on_model_done(report)
    except KeyboardInterrupt as stop:
        report["seconds"] = time.perf_counter() - started
        if isinstance(stop, Interrupted) and model not in report["models"]:
            report["stopped"] = {"model": model, "report": stop.report}
        raise Interrupted(report) from None
    report["seconds"] = time.perf_counter() - started
    return report


def runs_done(report: dict) -> int:
    """The runs an architectures report holds, those of the model it was stopped in too."""
    stopped = report.get("stopped")
    return (sum(len(sub["runs"]) for sub in report["models"].values())
            + (len(stopped["report"]["runs"]) if stopped else 0))


def _missing(report: dict) -> list[str]:
    """The models of the report's config that its table lacks, with the runs of each done."""
    names = {f.name for f in fields(ArchitecturesConfig)}
    config = ArchitecturesConfig(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in report["config"].items() if k in names})
    stopped = report.get("stopped") or {}
    missing = []
    for model in config.models:
        if model not in report["models"]:
            done = len(stopped["report"]["runs"]) if stopped.get("model") == model else 0
            missing.append(f"{model} ({done} of {config.sweep_config(model).run_count()} runs "
                           f"done)")
    return missing


def architectures_table(report: dict) -> str:
    """Test accuracy (%) per model and regularizer (mean ± std over seeds), SHADE's paired gains
    and the minutes each model took."""
    config = report["config"]
    regs = list(config["regularizers"])
    size = str(config["samples"])
    seeds = len(config["seeds"])
    lines = [f"Test accuracy (%) on `{config['dataset']}`, {config['samples']} training images, "
             f"mean ± std over {seeds} seeds.", "",
             "| model | " + " | ".join(_LABELS[r] for r in regs) + " | minutes |",
             "|---|" + "---:|" * (len(regs) + 1)]
    for model, sub in report["models"].items():
        results = sub["results"][size]
        means = {r: results[r]["test_mean"] for r in regs}
        best = max(regs, key=means.get)
        cells = [f"{100 * means[r]:.1f} ± {100 * results[r]['test_std']:.1f}" for r in regs]
        cells[regs.index(best)] = f"**{cells[regs.index(best)]}**"
        lines.append(f"| {model} (width {sub['config']['width']}) | " + " | ".join(cells)
                     + f" | {sub['seconds'] / 60:.1f} |")
    others = [r for r in regs if r != "shade"]
    if "shade" in regs and others:
        lines += ["", f"SHADE minus each other regularizer, test points, paired by seed (mean ± "
                      f"std; in brackets the seeds out of {seeds} where SHADE is ahead):", "",
                  "| model | " + " | ".join(f"vs {_LABELS[r]}" for r in others) + " |",
                  "|---|" + "---:|" * len(others)]
        for model, sub in report["models"].items():
            results = sub["results"][size]
            cells = []
            for r in others:
                diffs = [a - b for a, b in zip(results["shade"]["test"], results[r]["test"])]
                std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
                cells.append(f"{100 * statistics.fmean(diffs):+.1f} ± {100 * std:.1f} "
                             f"({sum(d > 0 for d in diffs)}/{seeds})")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    chosen = []
    for model, sub in report["models"].items():
        for r in regs:
            params = sub["results"][size][r]["params"]
            if "beta" in params:
                edge = " (edge of the grid)" if _at_grid_edge(sub["config"], r, params) else ""
                chosen.append(f"{model} {_LABELS[r]} β={params['beta']:g}{edge}")
    if chosen:
        lines += ["", "β chosen on the validation split: " + "; ".join(chosen) + "."]
    return "\n".join(lines) + "\n"


def report_paths(out_dir: str | Path, tag: str) -> dict[str, Path]:
    """Where :func:`write_architectures_report` writes the report of ``tag``."""
    return {ext: Path(out_dir) / f"architectures_{tag}.{ext}" for ext in ("json", "md")}


def write_architectures_report(report: dict, out_dir: str | Path, tag: str) -> dict[str, Path]:
    """``architectures_<tag>.json`` and ``.md`` in ``out_dir``, each written atomically; returns
    their paths. The report of a run stopped before some models says so in its header."""
    paths = report_paths(out_dir, tag)
    missing = _missing(report)
    write_text(paths["json"], json.dumps({**report, "missing": missing} if missing else report,
                                         indent=1) + "\n")
    c = report["config"]
    facts = (f"`shade-ops architectures`: {c['dataset']}, {c['samples']} training images, "
             f"models {list(c['models'])} at widths {c['widths']}, seeds {list(c['seeds'])}, "
             f"{c['epochs']} epochs (at least {c['min_steps']} steps) of {c['batch_size']}-image "
             f"batches (lr {c['lr']}, momentum 0.9, cosine decay), β {list(c['betas'])}, weight "
             f"decay {list(c['weight_decays'])}, dropout {list(c['dropouts'])} (grids of one "
             f"value are fixed, not chosen); {report.get('seconds', 0) / 60:.1f} min on "
             f"{report.get('threads', '?')} thread(s) (torch {report.get('torch', '?')}).")
    if missing:  # a run stopped early: its report holds the models done so far
        facts = (f"**Partial report**: the run was stopped after {runs_done(report)} runs; "
                 f"missing from the table: {', '.join(missing)}.\n\n" + facts)
    write_text(paths["md"], "\n".join([f"# Table 1 on the data that is here ({tag})", "", facts,
                                       "", architectures_table(report)]))
    return paths
