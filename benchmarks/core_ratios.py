"""The speed goals of the core ops and ShadeReLU as ratios measured side by side: every variant
timed once per round, in a shuffled order, and the ratios taken within each round (a shared,
noisy machine slows all variants of a round alike); medians and quartiles over the rounds.

    python benchmarks/core_ratios.py --rounds 40 --out benchmarks/results/core_ratios_<date>.json

Goals (float32, (128, 64, 16, 16), forward+backward, training mode so the update is included):
the penalty at least 10x the eager reference and 2x ``torch.compile`` of it; ShadeReLU at most
1.5x ``nn.ReLU``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import sys

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import shade_ops  # noqa: E402
from shade_ops import ShadeState, reference  # noqa: E402

SHAPE = (128, 64, 16, 16)


def _load_resnet_step():
    # its shuffled rounds and machine name, loaded from its file (benchmarks/ is not a package)
    spec = importlib.util.spec_from_file_location(
        "resnet_step", os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet_step.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_RESNET_STEP = _load_resnet_step()


def variants() -> dict:
    """name -> a callable running one forward+backward."""
    y = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_()
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    states = {name: ShadeState(SHAPE[1]) for name in ("cpu", "eager", "compile")}
    compiled = torch.compile(lambda t, s: reference.penalty(t, s), fullgraph=True)
    act, relu = shade_ops.ShadeReLU(SHAPE[1], backend="cpu"), nn.ReLU()

    def penalty(fn, state):
        return lambda: torch.autograd.grad(fn(y, state), y)

    def shade_relu():
        out = act(y)
        torch.autograd.backward((out, act.penalty), (g, torch.tensor(0.01)))

    def plain_relu():
        torch.autograd.backward(relu(y), g)

    return {
        "penalty shade_ops": penalty(lambda t, s: shade_ops.penalty(t, s, backend="cpu"),
                                     states["cpu"]),
        "penalty eager": penalty(reference.penalty, states["eager"]),
        "penalty compile": penalty(compiled, states["compile"]),
        "ShadeReLU": shade_relu,
        "nn.ReLU": plain_relu,
    }


RATIOS = {  # name: (numerator, denominator, goal, goal text)
    "penalty: eager / shade_ops": ("penalty eager", "penalty shade_ops", 10.0, ">= 10x"),
    "penalty: compile / shade_ops": ("penalty compile", "penalty shade_ops", 2.0, ">= 2x"),
    "ShadeReLU / nn.ReLU": ("ShadeReLU", "nn.ReLU", 1.5, "<= 1.5x"),
}


def measure(rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Milliseconds per call of each variant, one entry per round (resnet_step's rounds)."""
    calls = variants()
    for call in calls.values():  # warm: compiled, allocated
        call()
        call()
    seconds = _RESNET_STEP._interleave(calls, rounds, random.Random(seed))
    return {name: [t * 1e3 for t in times] for name, times in seconds.items()}


def summary(times: dict[str, list[float]]) -> dict:
    def quartiles(values):
        q = statistics.quantiles(values, n=4)
        return {"median": statistics.median(values), "p25": q[0], "p75": q[2]}

    ratios = {}
    for name, (top, bottom, goal, text) in RATIOS.items():
        per_round = [a / b for a, b in zip(times[top], times[bottom])]
        stats = quartiles(per_round)
        met = stats["median"] <= goal if text.startswith("<=") else stats["median"] >= goal
        ratios[name] = {**stats, "goal": text, "met": met}
    return {"ms": {name: quartiles(values) for name, values in times.items()}, "ratios": ratios}


def markdown(report: dict) -> str:
    lines = [f"Side-by-side ratios, {report['shape']} float32 forward+backward (training mode), "
             f"{report['rounds']} shuffled rounds, {report['threads']} threads; "
             f"{report['machine']}; torch {report['torch']}; {report['date']}.", "",
             "| variant | median ms (quartiles) |", "|---|---|"]
    lines += [f"| {name} | {s['median']:.3f} ({s['p25']:.3f}-{s['p75']:.3f}) |"
              for name, s in report["ms"].items()]
    lines += ["", "| ratio | median (quartiles) of per-round ratios | goal | met |",
              "|---|---|---|---|"]
    lines += [f"| {name} | {r['median']:.2f}x ({r['p25']:.2f}-{r['p75']:.2f}) | {r['goal']} | "
              f"{'yes' if r['met'] else 'NO'} |" for name, r in report["ratios"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path; the markdown goes beside it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"shape": "x".join(map(str, SHAPE)), "rounds": args.rounds,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{_RESNET_STEP._cpu_name()}, {os.cpu_count()} cores, kernels built for "
                         f"{getattr(getattr(shade_ops._ops, '_C', None), 'CPU_CAPABILITY', '?')}",
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")}
    report.update(summary(measure(args.rounds)))
    text = markdown(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
