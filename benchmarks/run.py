"""Run a benchmark suite of shade_ops and write the results format (benchmarks/harness.py).

    python benchmarks/run.py --suite full --device cpu --out benchmarks/results/cpu_<date>.json
    python benchmarks/run.py --suite quick --out build/bench_quick.json --budget 40

Suites (CPU): "full" times the penalty (forward, backward, forward+backward, training mode) and
ShadeReLU (forward+backward) in four layouts and two dtypes against the eager reference,
torch.compile of it and nn.ReLU; a sweep over elements (2^11 .. 2^25; every layout and dtype)
and over units (16 .. 1024); the training step of an MLP and a CIFAR ResNet-20 with SHADE on every layer against the
plain step (and with the forward inside shade_ops.recompute_relu). "quick" is a handful of small cases of the same kinds, in well under a minute.

"percall" (issue 19: a ShadeReLU call should cost about what an nn.ReLU call costs) times
ShadeReLU forward+backward and the penalty forward+backward (its value in the loss), each against
nn.ReLU forward+backward on the same input, at 4k, 16k, 32k, 64k and 1M float32 NCHW elements,
every call timed alone (8 a round, shuffled rounds), once on a quiet machine and once while a
spinning process holds another core (rows "busy": true); then the training step (cross-entropy +
1e-3 x collect, backward, SGD) of torchvision-style ResNet-18, ShuffleNet-v2 x0.5 and DenseNet-121
(benchmarks/models.py) at batch 2 and 16 of 3x64x64, with SHADE on every ReLU against the plain
step. "percall-quick": the same kinds of case on tiny settings (tests/test_bench_percall.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from harness import Case, Plan, fused_backends, shape_for  # noqa: E402


def step_cases(device: str, quick: bool, providers: tuple[str, ...]) -> list[Case]:
    """The training steps: an MLP and a CIFAR ResNet-20 (quick: a ResNet-8, small inputs,
    narrow layers)."""
    mlp_kwargs = (("width", 64),) if quick else (("width", 512),)
    resnet_kwargs = (("blocks", 1 if quick else 3), ("width", 8 if quick else 16))
    resnet = "resnet8" if quick else "resnet20"
    batch, side = (8, 16) if quick else (64, 32)
    return [
        Case("step_mlp", "step", "nchw", (32 if quick else 128, 1, 28, 28), "float32", providers,
             (("model", "mlp"), ("builder", "mlp"), ("kwargs", mlp_kwargs))),
        Case(f"step_{resnet}", "step", "nchw", (batch, 3, side, side), "float32", providers,
             (("model", resnet), ("builder", "resnet"), ("kwargs", resnet_kwargs))),
    ]


# the per-call sizes of issue 19: 4k, 16k, 32k, 64k and 1M elements
PERCALL_SHAPES = ((2, 32, 8, 8), (2, 128, 8, 8), (2, 64, 16, 16), (2, 128, 16, 16),
                  (16, 64, 32, 32))
PERCALL_MODELS = ("resnet18", "shufflenet_v2_x0_5", "densenet121")


def percall_plan(device: str, quick: bool) -> Plan:
    """The per-call suite: ShadeReLU and the penalty against nn.ReLU, quiet then busy, every call
    timed alone; then the whole steps of PERCALL_MODELS with SHADE against plain (quick: two
    small sizes, batch 2 of 3x16x16, narrow models, a DenseNet of fewer layers)."""
    fused = tuple(fused_backends(device))[:1] or ("reference",)
    shapes = PERCALL_SHAPES[:2] if quick else PERCALL_SHAPES
    cases = [Case(op, "forward_backward", "nchw", shape, "float32", fused + ("nn_relu",),
                  (("busy", busy),))
             for busy in (False, True) for shape in shapes for op in ("shade_relu", "penalty")]
    batches, side = ((2,), 16) if quick else ((2, 16), 64)
    tiny = {"resnet18": (("width", 4),), "densenet121": (("block_config", (2, 2, 2)),),
            "shufflenet_v2_x0_5": (("stages_out_channels", (8, 8, 16, 32, 64)),)}
    for batch in batches:
        for model in PERCALL_MODELS:
            kwargs = tiny[model] if quick else ()
            cases.append(Case(f"step_{model}", "step", "nchw", (batch, 3, side, side), "float32",
                              ("plain",) + fused,
                              (("model", model), ("builder", model), ("kwargs", kwargs))))
    if quick:
        return Plan(cases, rounds=4, seconds_per_case=0.3, step_rounds=3, copy_numel=1 << 18,
                    calls_each=4)
    return Plan(cases, rounds=60, seconds_per_case=5.0, step_rounds=20, copy_numel=1 << 24,
                calls_each=8)


def suite(name: str, device: str) -> Plan:
    """The cases of suite `name` ("quick", "full", "percall" or "percall-quick") on `device`."""
    if name.startswith("percall"):
        return percall_plan(device, name == "percall-quick")
    fused = tuple(fused_backends(device))
    penalty = fused + ("reference", "compile")
    relu = fused + ("reference", "nn_relu")
    steps = ("plain",) + fused + tuple(b + harness.RECOMPUTE for b in fused) + \
        (() if name == "quick" else ("reference",))
    cases: list[Case] = []
    if name == "quick":
        small = shape_for("nchw", 1 << 15, 16)
        cases += [Case("penalty", phase, "nchw", small, "float32",
                       penalty if phase == "forward_backward" else fused + ("reference",))
                  for phase in harness.PHASES]
        cases += [Case("penalty", "forward_backward", "nd", shape_for("nd", numel, 64),
                       "float32", fused + ("reference",)) for numel in (1 << 12, 1 << 18)]
        cases.append(Case("shade_relu", "forward_backward", "nld", shape_for("nld", 1 << 15, 32),
                          "float32", relu))
        return Plan(cases + step_cases(device, True, steps), rounds=5, seconds_per_case=0.5,
                    step_rounds=3, copy_numel=1 << 20)
    big = 1 << (20 if device == "cpu" else 25)
    # 2^11 .. 2^25 elements on the CPU (4.2 decades), every factor 4 below 1M and 2 above
    exponents = (11, 13, 15, 17, 19, 20, 21, 22, 23, 24, 25) if device == "cpu" \
        else range(14, 30, 2)
    # first what matters most, should the budget run out: the sweep over elements, the base
    # shape, the training steps; then the other layouts, bfloat16 and the sweep over units
    for exponent in exponents:
        shape = shape_for("nchw", 1 << exponent, 64)
        cases.append(Case("penalty", "forward_backward", "nchw", shape, "float32", penalty))
    # the same sweep, sparser, in every other layout and dtype; torch.compile (a compilation of
    # seconds per shape) from 1M elements on, where its goal is
    for dtype in ("float32", "bfloat16"):
        for layout in harness.LAYOUTS:
            cases += [Case("penalty", "forward_backward", layout,
                           shape_for(layout, 1 << exponent, 64), dtype,
                           penalty if 1 << exponent >= 1 << 20 else fused + ("reference",))
                      for exponent in exponents[::2] if (layout, dtype) != ("nchw", "float32")]
    for dtype in ("float32", "bfloat16"):
        for layout in harness.LAYOUTS:
            shape = shape_for(layout, big, 64)
            cases += [Case("penalty", phase, layout, shape, dtype, penalty)
                      for phase in harness.PHASES]
            cases.append(Case("shade_relu", "forward_backward", layout, shape, dtype, relu))
        if dtype == "float32":
            cases += step_cases(device, False, steps)
    for units in (16, 64, 256, 1024):
        cases.append(Case("penalty", "forward_backward", "nchw", shape_for("nchw", big, units),
                          "float32", penalty))
    unique = list(dict.fromkeys(cases))  # the sweeps cross the layout cases at one shape
    return Plan(unique, rounds=30, seconds_per_case=8.0, step_rounds=12, copy_numel=1 << 24)


def main(argv: list[str] | None = None) -> dict:
    """Runs the suite, writes the JSON (after every case) and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["quick", "full", "percall", "percall-quick"],
                        default="quick")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", required=True, help="the results JSON")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run; cases past it are left out "
                             "(default: 40 quick, 540 full, 420 percall, 40 percall-quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice; on a loaded machine "
                             "two threads' barriers make times snap to scheduler ticks)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget = args.budget or {"full": 540.0, "percall": 420.0}.get(args.suite, 40.0)
    plan = suite(args.suite, args.device)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)

    def save(doc: dict) -> None:
        with open(args.out + ".part", "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(args.out + ".part", args.out)

    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = harness.run_plan(plan, args.device, command, budget, on_progress=save)
    save(doc)
    print(f"{len(doc['rows'])} rows in {doc['seconds']} s, copy {doc['copy_gbps']:.1f} GB/s; "
          f"{len(doc['skipped'])} cases left out by the budget -> {args.out}")
    return doc


if __name__ == "__main__":
    main()
