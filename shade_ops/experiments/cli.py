"""The ``shade-ops`` command line (``python -m shade_ops`` too): ``train``, ``reproduce``, ``demo``.

    shade-ops train --dataset digits-m --model mlp --samples 100 --epochs 1 \\
        --regularizer shade --beta 0.001 --seed 0 --out run.json
    shade-ops reproduce [--quick]         # Fig. 2a on mnist-m-5k (--quick: digits-m)
    shade-ops architectures [--quick]     # Table 1: the five regularizers on the four models
    shade-ops mechanism                   # Fig. 1 and 3: information curves, images SHADE fixes
    shade-ops demo                        # a short SHADE training, fused vs eager step time
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _common(parser: argparse.ArgumentParser, threads_default: int | None) -> None:
    parser.add_argument("--threads", type=int, default=threads_default,
                        help="torch threads (default: %(default)s; None is torch's default)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding mnist-m/cifar10 (default: $SHADE_OPS_DATA or ./data)")
    parser.add_argument("--cache", default=None,
                        help="cache folder (default: $SHADE_OPS_CACHE or ~/.cache/shade_ops)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .training import REGULARIZERS, SweepConfig, TrainConfig
    from .models import MODELS

    parser = argparse.ArgumentParser(
        prog="shade-ops", description="SHADE regularizer experiments (Blot et al.).")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = TrainConfig()
    train = commands.add_parser("train", help="train one model, print its test accuracy")
    train.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    train.add_argument("--model", choices=MODELS, default=defaults.model)
    train.add_argument("--samples", type=int, default=None,
                       help="training samples drawn from the training split (default: all)")
    train.add_argument("--epochs", type=int, default=defaults.epochs)
    train.add_argument("--steps", type=int, default=None, help="SGD steps (overrides --epochs)")
    train.add_argument("--regularizer", choices=REGULARIZERS, default=defaults.regularizer)
    train.add_argument("--beta", type=float, default=defaults.beta, help="SHADE's weight")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    train.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--width", type=int, default=None, help="model width (default: model's)")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--data-seed", type=int, default=defaults.data_seed)
    train.add_argument("--backend", default=defaults.backend, help="SHADE backend")
    train.add_argument("--out", default=None, help="write the metrics JSON here")
    _common(train, None)

    sweep = SweepConfig()
    reproduce = commands.add_parser(
        "reproduce", help="the limited-samples sweep of the paper's Fig. 2a",
        description="Every training size x regularizer x seed; beta, weight decay and dropout "
                    "rate chosen on the validation split. Writes reproduce_<tag>.md (table), "
                    ".png (plot) and .json into --out-dir. The default (325 runs on mnist-m-5k) "
                    "takes about 40 minutes of one idle core; --quick (digits-m) about two.")
    reproduce.add_argument("--quick", action="store_true", help="a run of a few minutes")
    reproduce.add_argument("--dataset", choices=DATASETS, default=None)
    reproduce.add_argument("--model", choices=MODELS, default=None)
    reproduce.add_argument("--width", type=int, default=None)
    reproduce.add_argument("--sizes", type=_ints, default=None,
                           help=f"comma-separated (default {','.join(map(str, sweep.sizes))})")
    reproduce.add_argument("--seeds", type=int, default=None,
                           help=f"number of seeds (default {len(sweep.seeds)})")
    reproduce.add_argument("--epochs", type=int, default=None,
                           help=f"epochs a run (default {sweep.epochs})")
    reproduce.add_argument("--min-steps", type=int, default=None,
                           help=f"but at least this many SGD steps (default {sweep.min_steps})")
    reproduce.add_argument("--lr", type=float, default=None)
    reproduce.add_argument("--betas", type=_floats, default=None)
    reproduce.add_argument("--weight-decays", type=_floats, default=None)
    reproduce.add_argument("--dropouts", type=_floats, default=None)
    reproduce.add_argument("--regularizers", default=None,
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
                    "--quick: about a minute on digits-m. Writes architectures_<tag>.md/.json.")
    arch.add_argument("--quick", action="store_true", help="a run of about a minute")
    arch.add_argument("--dataset", choices=DATASETS, default=None)
    arch.add_argument("--models", default=None, help=f"comma-separated subset of {MODELS}")
    arch.add_argument("--samples", type=int, default=None)
    arch.add_argument("--seeds", type=int, default=None)
    arch.add_argument("--epochs", type=int, default=None)
    arch.add_argument("--betas", type=_floats, default=None)
    arch.add_argument("--out-dir", default="benchmarks/results")
    arch.add_argument("--tag", default=None)
    _common(arch, 1)

    mech = commands.add_parser(
        "mechanism", help="Fig. 1 and 3: per-layer H(Y|C), I(Y;C) over training; images fixed",
        description="Trains the baseline and SHADE on the same training subset from the same "
                    "weights, recording shade_ops.experiments.information.layer_information every epoch; "
                    "draws each layer's H(Y|C) over training and the information plane side by "
                    "side, and the test images the baseline gets wrong and SHADE right. Writes "
                    "mechanism_<tag>.json/.md/_information.png/_images.png.")
    mech.add_argument("--dataset", choices=DATASETS, default="mnist-m-5k")
    mech.add_argument("--model", choices=MODELS, default="alexnet")
    mech.add_argument("--width", type=int, default=16)
    mech.add_argument("--samples", type=int, default=500)
    mech.add_argument("--epochs", type=int, default=15)
    mech.add_argument("--min-steps", type=int, default=300)
    mech.add_argument("--beta", type=float, default=3e-3)
    mech.add_argument("--seed", type=int, default=0)
    mech.add_argument("--out-dir", default="benchmarks/results")
    mech.add_argument("--tag", default=None)
    _common(mech, 1)

    demo = commands.add_parser("demo", help="a short SHADE training on scikit-learn's digits")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--timing-steps", type=int, default=15,
                      help="timed training steps per backend (median reported)")
    _common(demo, 1)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = {"train": _train, "reproduce": _reproduce, "architectures": _architectures,
               "mechanism": _mechanism, "demo": _demo}[args.command]
    try:
        return command(args)
    except (FileNotFoundError, ImportError, ValueError) as error:  # a missing dataset or package,
        # a bad option value
        print(f"shade-ops {args.command}: error: {error}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
        print(f"metrics written to {args.out}")
    return 0


def _overrides(args: argparse.Namespace, names: tuple[str, ...], listed: str) -> dict:
    """The config fields given on the command line: `names` as they are, `--seeds N` as seeds
    0..N-1, and `listed` (a comma-separated option) as a tuple."""
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.seeds is not None:
        overrides["seeds"] = tuple(range(args.seeds))
    if getattr(args, listed) is not None:
        overrides[listed] = tuple(item.strip() for item in getattr(args, listed).split(","))
    return overrides


def _tag(args: argparse.Namespace) -> str:
    """The results' file tag: --tag, else the date (prefixed by quick_ for --quick, where the
    command has it)."""
    today = datetime.date.today().isoformat()
    return args.tag or (f"quick_{today}" if getattr(args, "quick", False) else today)


def _reproduce(args: argparse.Namespace) -> int:
    from .training import SweepConfig, markdown_table, sweep, write_report

    overrides = _overrides(args, ("dataset", "model", "width", "sizes", "epochs", "min_steps",
                                  "lr", "betas", "weight_decays", "dropouts"), "regularizers")
    config = SweepConfig.quick(**overrides) if args.quick else SweepConfig(**overrides)
    tag = _tag(args)
    print(f"reproduce: {config.run_count()} runs ({config.dataset}, {config.model}, sizes "
          f"{list(config.sizes)}, {len(config.seeds)} seeds, {config.epochs} epochs but at least "
          f"{config.min_steps} steps a run, "
          f"{torch.get_num_threads()} thread(s))", flush=True)

    def save(report: dict) -> None:  # after every size, so a long run leaves its results so far
        write_report(report, args.out_dir, tag)

    report = sweep(config, progress=not args.no_progress, cache=args.cache,
                   root=args.data_root, on_size_done=save)
    paths = write_report(report, args.out_dir, tag)
    print(markdown_table(report))
    print(f"{len(report['runs'])} runs in {report['seconds'] / 60:.1f} min; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _architectures(args: argparse.Namespace) -> int:
    from .architectures import (ArchitecturesConfig, architectures, architectures_table,
                                write_architectures_report)

    overrides = _overrides(args, ("dataset", "samples", "epochs", "betas"), "models")
    config = (ArchitecturesConfig.quick(**overrides) if args.quick
              else ArchitecturesConfig(**overrides))
    tag = _tag(args)
    print(f"architectures: {config.run_count()} runs ({config.dataset}, {config.samples} images, "
          f"models {list(config.models)}, {len(config.seeds)} seeds, {config.epochs} epochs, "
          f"{torch.get_num_threads()} thread(s))", flush=True)
    report = architectures(config, progress=not args.no_progress, cache=args.cache,
                           root=args.data_root,
                           on_model_done=lambda r: write_architectures_report(r, args.out_dir, tag))
    paths = write_architectures_report(report, args.out_dir, tag)
    print(architectures_table(report))
    print(f"done in {report['seconds'] / 60:.1f} min; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _mechanism(args: argparse.Namespace) -> int:
    from .mechanism import mechanism

    paths = mechanism(dataset=args.dataset, model=args.model, width=args.width,
                      samples=args.samples, epochs=args.epochs, min_steps=args.min_steps,
                      beta=args.beta, seed=args.seed, out_dir=args.out_dir,
                      tag=_tag(args), cache=args.cache, root=args.data_root,
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
