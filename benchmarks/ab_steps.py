"""Whole training steps with SHADE on every ReLU against the plain model, for two checkouts of
shade_ops side by side (before and after a change): each checkout runs in processes of its own,
alternating (A, B, A, B, ...), and each process times the plain and the SHADE step interleaved,
so that the overhead a process reports is a ratio measured in one process, on one machine state.

    python benchmarks/ab_steps.py --root before=/path/to/old/checkout --root after=. \
        --reps 3 --out benchmarks/results/percall_ab_steps_<date>.json

Each checkout must have its extension built in place (``python setup.py build_ext --inplace``).
The architectures are this checkout's ``benchmarks/models.py`` (the same for both sides).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = [("resnet18", 2), ("resnet18", 16), ("shufflenet_v2_x0_5", 2),
         ("shufflenet_v2_x0_5", 16), ("densenet121", 2), ("densenet121", 16)]


def one_process(root: str, rounds: int) -> list[dict]:
    """In a child process: every case, plain and SHADE steps interleaved, medians in ms."""
    sys.path[:0] = [HERE, root]
    import copy

    import torch

    import models
    import shade_ops
    if not os.path.abspath(shade_ops.__file__).startswith(os.path.abspath(root)):
        raise RuntimeError(f"imported {shade_ops.__file__}, not the checkout at {root}")
    torch.set_num_threads(2)
    results = []
    for name, batch in CASES:
        torch.manual_seed(0)
        plain = models.build(name, (3, 64, 64), num_classes=10)
        shade = shade_ops.convert(copy.deepcopy(plain))
        x, target = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))

        def step(model, with_shade):
            loss = torch.nn.functional.cross_entropy(model(x), target)
            if with_shade:
                loss = loss + 1e-3 * shade_ops.collect(model)
            loss.backward()

        for _ in range(3):
            step(plain, False)
            step(shade, True)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for with_shade in ((False, True) if r % 2 else (True, False)):
                start = time.perf_counter()
                step(shade if with_shade else plain, with_shade)
                times[with_shade].append(time.perf_counter() - start)
        plain_ms = statistics.median(times[False]) * 1e3
        shade_ms = statistics.median(times[True]) * 1e3
        results.append({"model": name, "batch": batch, "plain_ms": plain_ms,
                        "shade_ms": shade_ms, "overhead_pct": (shade_ms / plain_ms - 1) * 100})
    return results


def _commit(root: str) -> str:
    done = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return done.stdout.strip() + ("+changes" if dirty else "") if done.returncode == 0 else "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", action="append", required=True, metavar="NAME=PATH",
                        help="a checkout to time, named (give two or more)")
    parser.add_argument("--reps", type=int, default=3, help="processes per checkout")
    parser.add_argument("--rounds", type=int, default=16, help="steps per provider per case")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.child, args.rounds)))
        return
    roots = dict(item.split("=", 1) for item in args.root)
    runs = []
    for rep in range(args.reps):
        for name, root in roots.items():
            done = subprocess.run([sys.executable, __file__, "--root", "x=x", "--child",
                                   os.path.abspath(root), "--rounds", str(args.rounds)],
                                  check=True, capture_output=True, text=True)
            runs.append({"checkout": name, "rep": rep, "cases": json.loads(done.stdout)})
    summary = []
    for model, batch in CASES:
        row = {"model": model, "batch": batch}
        for name in roots:
            values = [c["overhead_pct"] for run in runs if run["checkout"] == name
                      for c in run["cases"] if (c["model"], c["batch"]) == (model, batch)]
            row[name] = {"overhead_pct": values, "median": statistics.median(values)}
        summary.append(row)
        print(f"{model:20} batch {batch:2}  " + "  ".join(
            f"{name} +{row[name]['median']:.1f}% {[round(v, 1) for v in row[name]['overhead_pct']]}"
            for name in roots))
    if args.out:
        from harness import machine_info
        with open(args.out, "w") as f:
            json.dump({"command": "python benchmarks/ab_steps.py " + " ".join(
                           argv if argv is not None else sys.argv[1:]),
                       "machine": machine_info("cpu"), "roots": roots,
                       "commits": {name: _commit(root) for name, root in roots.items()},
                       "summary": summary,
                       "runs": runs, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                      f, indent=1)


if __name__ == "__main__":
    main()
