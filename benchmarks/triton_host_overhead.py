"""The host (Python) cost of the Triton launchers, with every kernel launch replaced by a no-op.

    python benchmarks/triton_host_overhead.py [--rounds 40] [--calls 200] [--out FILE.json]

What it times: one ShadeReLU forward+backward (``relu_penalty_forward`` then ``penalty_backward``
with grad_out) and one training forward of the penalty (``penalty_forward`` then
``update_state``), called straight through the launchers of ``shade_ops._triton``: argument
checks, launch plans, allocations, the launch calls themselves with the kernels stubbed. It
leaves out the dispatcher and autograd around the ops (the same for both) and Triton's own launch
path (``JITFunction.run``: binding and launching, which needs a GPU), which costs per launch, so
the launch count is reported too.

Old against new: the launchers of commit ``OLD_COMMIT`` are loaded from git as a module of their
own, next to the current ``shade_ops._triton``, both with stubbed kernels, and the calls of every
variant are interleaved in shuffled rounds in one process; medians and quartiles over rounds.
Tensors are on the ``meta`` device (allocation is a bookkeeping step there, as in the CUDA
caching allocator; CPU allocations of several MB cost page mappings a GPU run does not pay) and,
for comparison, on the CPU. Needs no GPU; runs with Triton imported without the interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import types

os.environ["TRITON_INTERPRET"] = "0"  # before anything imports Triton: no numpy wrappers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OLD_COMMIT = "fdb8588"
SHAPE = (128, 64, 16, 16)
KERNELS = ("_penalty_fwd_columns_kernel", "_penalty_fwd_runs_kernel", "_penalty_finalize_kernel",
           "_penalty_total_kernel", "_penalty_bwd_kernel", "_update_state_kernel",
           "_penalty_fwd_kernel")


class StubKernel:
    """kernel[grid](...) that launches nothing and counts the launches."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        self.launches += 1
        return _no_op


def _no_op(*args, **kwargs):
    return None


def stub(module) -> dict[str, StubKernel]:
    stubs = {}
    for name in KERNELS:
        if hasattr(module, name):
            stubs[name] = StubKernel()
            setattr(module, name, stubs[name])
    module.INTERPRETED = True  # lets the launchers take CPU (and meta) tensors
    getattr(module, "_PLANS", {}).clear()
    return stubs


def load_old(commit: str = OLD_COMMIT) -> types.ModuleType:
    """shade_ops/_triton.py as of `commit`, as a module of its own: its registration of the ops
    is left out (the current module has registered them), its `from . import` made absolute."""
    source = subprocess.run(["git", "show", f"{commit}:shade_ops/_triton.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    source = source[:source.index("# ---- registration")]
    # the names it took from _ops (accumulation_dtype, PenaltyOps, ...) are in _registry now
    source = source.replace("from . import _ops", "from shade_ops import _registry as _ops")
    path = os.path.join(tempfile.mkdtemp(), f"shade_ops_triton_{commit}.py")
    with open(path, "w") as f:  # triton.jit reads the source of its functions from a file
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"shade_ops_triton_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def workloads(module, device: str):
    import torch

    y = torch.empty(SHAPE, device=device)
    go = torch.empty(SHAPE, device=device)
    grad_penalty = torch.empty((), device=device)
    mu = torch.empty(2, SHAPE[1], device=device)
    p = torch.empty(2, SHAPE[1], device=device)

    def relu_forward_backward():
        module.relu_penalty_forward(y, mu, "mean")
        module.penalty_backward(grad_penalty, y, mu, "mean", go)

    def penalty_forward_update():
        _, sums, _ = module.penalty_forward(y, mu, "mean")
        module.update_state(p, mu, sums, 0.8)

    return {"shade_relu forward+backward": relu_forward_backward,
            "penalty forward+update": penalty_forward_update}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def measure(rounds: int, calls: int, devices: list[str], seed: int = 0) -> dict:
    import torch

    from shade_ops import _triton as new

    old = load_old()
    modules = {"old": old, "new": new}
    stubs = {name: stub(module) for name, module in modules.items()}
    variants = []  # (impl, device, workload name, call)
    for device in devices:
        for impl, module in modules.items():
            for name, call in workloads(module, device).items():
                variants.append((impl, device, name, call))
    launches = {}
    for impl, device, name, call in variants:  # warm-up (plans, caches); count launches
        before = sum(s.launches for s in stubs[impl].values())
        call()
        launches[(impl, name)] = sum(s.launches for s in stubs[impl].values()) - before
        for _ in range(calls):
            call()
    times = {variant[:3]: [] for variant in variants}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = list(variants)
        rng.shuffle(order)
        for impl, device, name, call in order:
            start = time.perf_counter_ns()
            for _ in range(calls):
                call()
            times[(impl, device, name)].append((time.perf_counter_ns() - start) / calls / 1e3)
    rows = []
    for device in devices:
        for name in workloads(old, device):
            old_q = quartiles(times[("old", device, name)])
            new_q = quartiles(times[("new", device, name)])
            rows.append(dict(device=device, workload=name, old_us=old_q, new_us=new_q,
                             ratio=old_q[1] / new_q[1],
                             old_launches=launches[("old", name)],
                             new_launches=launches[("new", name)]))
    return dict(rows=rows, rounds=rounds, calls=calls, shape=list(SHAPE), old_commit=OLD_COMMIT,
                torch=torch.__version__, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"))


def markdown(result: dict) -> str:
    lines = [f"Host cost of the Triton launchers, kernels stubbed, shape {tuple(result['shape'])} "
             f"float32; medians (quartiles) over {result['rounds']} shuffled rounds of "
             f"{result['calls']} calls; old = commit {result['old_commit']}; "
             f"torch {result['torch']}, Python {result['python']}, {result['date']}.", "",
             "| tensors | workload | old, us | new, us | old / new | launches old -> new |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        o, n = row["old_us"], row["new_us"]
        lines.append(f"| {row['device']} | {row['workload']} | {o[1]:.1f} ({o[0]:.1f}-{o[2]:.1f}) "
                     f"| {n[1]:.1f} ({n[0]:.1f}-{n[2]:.1f}) | {row['ratio']:.2f}x "
                     f"| {row['old_launches']} -> {row['new_launches']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--device", action="append", dest="devices",
                        help="tensor device (repeatable; default: meta and cpu)")
    parser.add_argument("--out", help="write the result as JSON here, and the table next to it")
    args = parser.parse_args(argv)
    result = measure(args.rounds, args.calls, args.devices or ["meta", "cpu"])
    table = markdown(result)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return result


if __name__ == "__main__":
    main()
