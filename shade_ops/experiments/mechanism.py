"""The paper's Fig. 1 (what SHADE does to each layer) and Fig. 3 (images it gets right), measured.

    paths = mechanism(out_dir="benchmarks/results", tag="2026-11-29-mnist")

Trains the baseline and SHADE on the same training subset from the same initial weights (one
seed), recording :func:`shade_ops.experiments.information.layer_information` on the training images at every
epoch, then draws each layer's H(Y | C) over training and the information plane
(I(Y; C) against H(Y)) side by side, and the test images that the baseline gets wrong and SHADE
gets right, with both predictions.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .data import load_dataset
from .files import save_figure, write_text
from .training import TrainConfig, _environment, train

__all__ = ["mechanism"]

_RUNS = (("none", "Baseline"), ("shade", "SHADE"))


def mechanism(*, dataset: str = "mnist-m-5k", model: str = "alexnet", width: int | None = 16,
              samples: int = 500, epochs: int = 15, min_steps: int = 300, beta: float = 3e-3,
              seed: int = 0, out_dir: str | Path = "benchmarks/results", tag: str = "mechanism",
              cache: str | None = None, root: str | None = None,
              progress: bool = False) -> dict[str, Path]:
    """Run both trainings and write ``mechanism_<tag>.json``, ``.md``, ``_information.png`` and
    ``_images.png`` in ``out_dir`` (each atomically, once both trainings are done: a run stopped
    before leaves them as they were); returns their paths."""
    started = time.perf_counter()
    data = load_dataset(dataset, seed=0, root=root, cache=cache)
    base = TrainConfig(dataset=dataset, model=model, width=width, samples=samples,
                       epochs=epochs, min_steps=min_steps, seed=seed, beta=beta,
                       information=True)
    runs = {}
    for regularizer, _ in _RUNS:
        config = replace(base, regularizer=regularizer)
        runs[regularizer] = train(config, data, progress=progress, predictions=True)
    report = {"config": asdict(base), **_environment(), "runs": runs,
              "test_labels": data.test.y.tolist(),
              "seconds": time.perf_counter() - started}
    out = Path(out_dir)
    paths = {"json": out / f"mechanism_{tag}.json", "md": out / f"mechanism_{tag}.md",
             "information": out / f"mechanism_{tag}_information.png",
             "images": out / f"mechanism_{tag}_images.png"}
    write_text(paths["json"], json.dumps(report, indent=1) + "\n")
    plot_information(report, paths["information"])
    fixed = plot_fixed_images(report, data.test.x.numpy(), paths["images"])
    write_text(paths["md"], _markdown(report, tag, fixed))
    return paths


def _series(run: dict, key: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Epochs, layer names and ``(epochs, layers)`` values of ``key`` (per-unit mean)."""
    info = run["information"]
    epochs = np.array([r["epoch"] for r in info])
    names = [layer["name"] for layer in info[0]["layers"]]
    values = np.array([[layer[key] for layer in r["layers"]] for r in info])
    return epochs, names, values


def plot_information(report: dict, path: str | Path) -> None:
    """Top: each layer's H(Y | C) (nats per unit) over training, baseline | SHADE. Bottom: the
    information plane, I(Y; C) against H(Y) per unit, one trajectory a layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9.5, 7.5), dpi=110, sharey="row")
    for col, (regularizer, label) in enumerate(_RUNS):
        run = report["runs"][regularizer]
        epochs, names, h_yc = _series(run, "h_y_given_c_per_unit")
        _, _, h_y = _series(run, "h_y_per_unit")
        _, _, i_yc = _series(run, "i_y_c_per_unit")
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(names)))
        for j, name in enumerate(names):
            axes[0, col].plot(epochs, h_yc[:, j], color=colors[j], label=f"layer {j + 1} "
                              f"({name})")
            axes[1, col].plot(h_y[:, j], i_yc[:, j], color=colors[j], marker=".", ms=3)
            axes[1, col].plot(h_y[-1, j], i_yc[-1, j], color=colors[j], marker="o", ms=6)
        acc = 100 * run["test_accuracy"]
        axes[0, col].set_title(f"{label}: H(Y|C) per unit (test acc. {acc:.1f}%)", fontsize=10)
        axes[0, col].set_xlabel("epoch")
        axes[1, col].set_title(f"{label}: information plane (dot = end)", fontsize=10)
        axes[1, col].set_xlabel("H(Y) per unit (nats)")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("H(Y | C) per unit (nats)")
    axes[1, 0].set_ylabel("I(Y; C) per unit (nats)")
    axes[0, 1].legend(fontsize=7)
    c = report["config"]
    bins = [layer["bins"] for layer in report["runs"]["none"]["information"][0]["layers"]]
    fig.suptitle(f"{c['dataset']}, {c['model']} width {c['width']}, {c['samples']} training "
                 f"images, seed {c['seed']}; binned pre-activations (bins per layer: "
                 f"{bins}) on the training images", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _fixed(report: dict) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array(report["test_labels"])
    base = np.array(report["runs"]["none"]["test_predictions"])
    shade = np.array(report["runs"]["shade"]["test_predictions"])
    return (np.flatnonzero((base != labels) & (shade == labels)),
            np.flatnonzero((base == labels) & (shade != labels)))


def plot_fixed_images(report: dict, images: np.ndarray, path: str | Path,
                      count: int = 24) -> dict[str, int]:
    """``count`` test images the baseline gets wrong and SHADE right (the first of each class in
    turn), with both predictions (SH: SHADE's, the true class); returns how many
    test images each gets right where the other does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed, broken = _fixed(report)
    labels = np.array(report["test_labels"])
    base = np.array(report["runs"]["none"]["test_predictions"])
    # round-robin over the true classes, so that every digit shows up
    by_class = [list(fixed[labels[fixed] == c]) for c in np.unique(labels)]
    shown = []
    while len(shown) < min(count, len(fixed)):
        for queue in by_class:
            if queue and len(shown) < count:
                shown.append(queue.pop(0))
    cols = 8
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.5), dpi=110,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images[i].transpose(1, 2, 0))
        ax.set_title(f"base {base[i]} / SH {labels[i]}", fontsize=7)
    c = report["config"]
    fig.suptitle(f"Test images of {c['dataset']} the baseline gets wrong and SHADE right "
                 f"({len(fixed)} such images; {len(broken)} the other way round); seed "
                 f"{c['seed']}, {c['samples']} training images", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return {"baseline_wrong_shade_right": len(fixed), "baseline_right_shade_wrong": len(broken)}


def _markdown(report: dict, tag: str, fixed: dict[str, int]) -> str:
    c = report["config"]
    lines = [f"# The mechanism, measured ({tag})", "",
             f"`shade-ops mechanism`: {c['dataset']}, {c['model']} (width {c['width']}), "
             f"{c['samples']} training images, seed {c['seed']}, {c['epochs']} epochs (at least "
             f"{c['min_steps']} steps), SHADE β {c['beta']}; layer_information on the training "
             f"images every epoch; {report['seconds'] / 60:.1f} min on "
             f"{report.get('threads', '?')} thread(s).", "",
             f"![H(Y|C) over training and the information plane](mechanism_{tag}_information.png)",
             "", f"![test images the baseline gets wrong and SHADE right](mechanism_{tag}_images.png)",
             "", f"Test accuracy: baseline {100 * report['runs']['none']['test_accuracy']:.1f}%, "
             f"SHADE {100 * report['runs']['shade']['test_accuracy']:.1f}%; "
             f"{fixed['baseline_wrong_shade_right']} test images the baseline gets wrong and "
             f"SHADE right, {fixed['baseline_right_shade_wrong']} the other way round.", "",
             "Per layer, nats summed over units, at the start and the end of training "
             "(H(Y|C) start -> end; I(Y;C) start -> end; H(Y) end; Var(Y|Z) end):", "",
             "| layer | units | run | H(Y\\|C) | I(Y;C) | H(Y) end | Var(Y\\|Z) end |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for regularizer, label in _RUNS:
        info = report["runs"][regularizer]["information"]
        for j, (first, last) in enumerate(zip(info[0]["layers"], info[-1]["layers"])):
            lines.append(f"| {j + 1} ({last['name']}) | {last['units']} | {label} | "
                         f"{first['h_y_given_c']:.2f} -> {last['h_y_given_c']:.2f} | "
                         f"{first['i_y_c']:.2f} -> {last['i_y_c']:.2f} | {last['h_y']:.2f} | "
                         f"{last['var_y_given_z']:.3g} |")
    return "\n".join(lines) + "\n"
