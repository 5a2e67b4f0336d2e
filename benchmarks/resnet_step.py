"""What SHADE on every layer adds to a training step, measured side by side.

A CIFAR ResNet-20 (three stages of three basic blocks, 19 ReLUs), batch 64 of 3x32x32 float32,
SGD with momentum, in these variants of the same model:

    no-shade     the plain model (nn.ReLU)
    relu-keep-y  nn.ReLU in an autograd.Function that saves its input y for the backward: what
                 any SHADE pays before computing anything, since its gradient needs y where
                 y <= 0 (a ReLU saves only its output). This is a floor, not a competitor.
    shade_ops    shade_ops.convert(model) (the fused ShadeReLU), loss + 1e-3 * collect(model)
    shade-eager  the same with ShadeReLU on the eager reference (backend="reference")

Every round times one step of each variant, in a shuffled order (seeded), so that the machine's
drift, and the wake of the variant before, reach all of them alike. The overhead is the median
over rounds of (variant step / no-shade step of the same round). shade-eager, which moves far more
memory and would slow whatever follows it, gets rounds of its own, paired with no-shade.

    python benchmarks/resnet_step.py [--rounds 40] [--out benchmarks/results/resnet_step.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import shade_ops  # noqa: E402
from shade_ops.experiments.models import build_model  # noqa: E402

VARIANTS = ("no-shade", "relu-keep-y", "shade_ops", "shade-eager")
EAGER_BASELINE = "no-shade (eager rounds)"
BETA = 1e-3


class _KeepInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        return torch.relu(y)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0)


class ReLUKeepingInput(nn.Module):
    """nn.ReLU whose backward keeps y alive, as SHADE's must."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _KeepInput.apply(y)


def _replace_relus(model: nn.Module) -> None:
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, ReLUKeepingInput())
        else:
            _replace_relus(child)


def make_step(variant: str, batch: int, size: int, blocks: int):
    """A closure running one training step of `variant`; every variant starts from one seed."""
    torch.manual_seed(0)
    model = build_model("resnet", (3, size, size), 10, blocks=blocks)
    shade = variant in ("shade_ops", "shade-eager")
    if shade:
        shade_ops.convert(model, backend="cpu" if variant == "shade_ops" else "reference")
    elif variant == "relu-keep-y":
        _replace_relus(model)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator)
    target = torch.randint(0, 10, (batch,), generator=generator)
    return training_step(model, x, target, shade)


def training_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, shade: bool):
    """One SGD step (momentum 0.9) of model on (x, target), as a callable; with shade, the loss
    adds BETA times the penalties of the model's SHADE layers. (gpu_check.py times it too.)"""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), target)
        if shade:
            loss = loss + BETA * shade_ops.collect(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _interleave(steps: dict, rounds: int, rng: random.Random) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for v in order:
            start = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - start)
    return times


def measure(variants: list[str], rounds: int, warmup: int, batch: int, size: int,
            blocks: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per step of each variant, one entry per round; shade-eager's rounds (a quarter as
    many) are paired with no-shade steps of their own, kept under "no-shade (eager rounds)"."""
    steps = {v: make_step(v, batch, size, blocks) for v in variants}
    for step in steps.values():
        for _ in range(warmup):
            step()
    rng = random.Random(seed)
    times = _interleave({v: s for v, s in steps.items() if v != "shade-eager"}, rounds, rng)
    if "shade-eager" in steps:
        pairs = {v: steps[v] for v in ("no-shade", "shade-eager") if v in steps}
        eager = _interleave(pairs, max(1, rounds // 4), rng)
        times["shade-eager"] = eager["shade-eager"]
        if "no-shade" in eager:
            times[EAGER_BASELINE] = eager["no-shade"]
    return times


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarise(times: dict[str, list[float]], baseline: str = "no-shade") -> list[dict]:
    """Median and IQR of each variant's step, and of its per-round ratio to the baseline's."""
    rows = []
    for variant, values in times.items():
        if variant == EAGER_BASELINE:
            continue
        q1, median, q3 = _quartiles(values)
        row = dict(variant=variant, median_ms=median * 1e3, iqr_ms=(q3 - q1) * 1e3,
                   rounds=len(values))
        paired = times.get(EAGER_BASELINE if variant == "shade-eager" else baseline)
        if paired is not None:
            ratios = [t / b for t, b in zip(values, paired)]
            r1, ratio, r3 = _quartiles(ratios)
            row.update(overhead=ratio - 1, overhead_q1=r1 - 1, overhead_q3=r3 - 1)
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = ["| variant | step median (IQR), ms | overhead over no-shade: median of per-round "
             "ratios (IQR) |", "|---|---|---|"]
    for row in report["rows"]:
        overhead = "-" if "overhead" not in row or row["variant"] == "no-shade" else \
            f"{row['overhead']:+.1%} ({row['overhead_q1']:+.1%} to {row['overhead_q3']:+.1%})"
        lines.append(f"| {row['variant']} | {row['median_ms']:.1f} ({row['iqr_ms']:.1f}) | "
                     f"{overhead} |")
    a = report["args"]
    eager_rounds = max(1, a["rounds"] // 4)
    lines += ["", f"ResNet-{6 * a['blocks'] + 2}, batch {a['batch']} of 3x{a['size']}x{a['size']} "
              f"float32, SGD; {a['rounds']} shuffled rounds (shade-eager: {eager_rounds}) "
              f"after {a['warmup']} warm-up steps; "
              f"{report['machine']}, {report['threads']} threads, torch {report['torch']}, "
              f"shade_ops CPU kernels built for {report['cpu_capability']}; run {report['date']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=3,
                        help="basic blocks per stage (3: ResNet-20)")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--out", help="write the JSON here, and the markdown next to it (.md)")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    times = measure(variants, args.rounds, args.warmup, args.batch, args.size, args.blocks)
    from shade_ops import _ops

    report = dict(args=vars(args), rows=summarise(times), times_s=times,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{_cpu_name()}, {os.cpu_count()} CPUs", threads=torch.get_num_threads(),
                  torch=torch.__version__,
                  cpu_capability=getattr(getattr(_ops, "_C", None), "CPU_CAPABILITY", "none"))
    text = markdown(report)
    if args.out:  # written first: a closed stdout must not lose them
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
    print(text)
    return report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
