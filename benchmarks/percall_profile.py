"""Where the fixed cost of one small ShadeReLU call goes (issue 19): a table to paste into
docs/benchmarks.md, "Per-call cost".

    python benchmarks/percall_profile.py [--shape 2x128x8x8] [--rounds 300] [--threads 2]
                                         [--busy] [--out build/percall_profile.md]

For one ShadeReLU forward+backward (its penalty in the loss) at `--shape` (16k elements by
default), the pieces timed alone, each call by itself, in the harness's shuffled interleaved
rounds (harness.cpu_times with `each`): the whole call; nn.ReLU forward+backward; the raw fused
op (torch.ops.shade_ops.relu_penalty_forward and its backward through autograd); the state update
op (torch.ops.shade_ops.update_state); the input checks (shade_ops._layout.check_inputs); the
backend lookup (shade_ops._ops.resolve_backend); the nn.Module attribute sets that one
ShadeReLU call makes on itself (counted in a call, then replayed); the rest by difference. Then
the cProfile entries of many calls (the most own time first, per ShadeReLU call) and the torch
profiler's op list of one call.

The library's internals change: a piece whose entry point is gone is reported "n/a" and left
out of the difference, and the script still runs. Times on a busy machine mean little; compare
the pieces within one run.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import math
import os
import pstats
import sys
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import harness  # noqa: E402
import shade_ops  # noqa: E402

WHOLE, RELU = "ShadeReLU forward+backward (the whole call)", "nn.ReLU forward+backward"
# disjoint parts of the whole call: their sum is taken from it, the rest is "the rest"
PARTS = ("raw fused op forward+backward", "update_state op", "the plan's check (_Plan.fits)",
         "the fast path's mode checks", "module attribute sets")
# what a call no longer runs once its site has a plan (modules._Plan): timed for the record
CHECKED_ONLY = ("check_inputs (the checked path)", "resolve_backend (the checked path)")


def _call(act: nn.Module, y: torch.Tensor, grad_out: torch.Tensor, one: torch.Tensor):
    return torch.autograd.grad((act(y), act.penalty), y, (grad_out, one))


def _attribute_sets(act: nn.Module, call: Callable[[], object]) -> list[tuple[str, object]]:
    """The (name, value) of every attribute set on `act` itself during call()."""
    seen: list[tuple[str, object]] = []
    cls = type(act)

    class Counting(cls):  # a subclass for one call: the class itself stays as it is
        def __setattr__(self, name, value):
            seen.append((name, value))
            super().__setattr__(name, value)

    Counting.__name__ = cls.__name__
    act.__class__ = Counting
    try:
        call()
    finally:
        object.__setattr__(act, "__class__", cls)  # not through Counting, so not counted
    return seen


def pieces(shape: tuple[int, ...], backend: str) -> tuple[dict[str, Callable], dict[str, str]]:
    """(name -> callable of each piece that exists here, name -> why a piece is missing)."""
    torch.manual_seed(0)
    y = (torch.randn(shape) * 2 + 0.3).requires_grad_()
    grad_out, one, units = torch.randn_like(y), torch.ones(()), shape[1]
    act = shade_ops.ShadeReLU(units, backend=backend).train()
    relu = nn.ReLU()
    calls = {WHOLE: lambda: _call(act, y, grad_out, one),
             RELU: lambda: torch.autograd.grad((relu(y),), y, (grad_out,))}
    missing: dict[str, str] = {}
    state = shade_ops.ShadeState(units)

    def add(name: str, make: Callable[[], Callable]) -> None:
        try:
            call = make()
            call()
            calls[name] = call
        except Exception as error:  # noqa: BLE001  (an internal gone or changed: say so, go on)
            missing[name] = f"{type(error).__name__}: {error!s:.120}"

    def raw():
        op = torch.ops.shade_ops.relu_penalty_forward

        def call():
            value, _, out, _ = op(y, state.mu, "mean")
            return torch.autograd.grad((out, value), y, (grad_out, one))
        return call

    def update():
        op = torch.ops.shade_ops.update_state
        with torch.no_grad():
            sums = torch.ops.shade_ops.relu_penalty_forward(y, state.mu, "mean")[1]
        p, mu = state.p.clone(), state.mu.clone()
        return lambda: op(p, mu, sums, 0.8)

    def checks():
        from shade_ops._layout import check_inputs
        return lambda: check_inputs(y, state, 1, "mean", backend)

    def resolve():
        from shade_ops._ops import resolve_backend
        return lambda: resolve_backend(backend, y.device)

    def plan_check():
        act(y)
        plan = act._plans[0]
        return lambda: plan.fits(act, y)

    def mode_checks():
        from shade_ops import modules
        checks = (modules._is_compiling, modules._is_tracing, modules._is_exporting)

        def call():
            return (any(check() for check in checks) or not modules._is_grad_enabled()
                    or modules._saved_tensors_hooks(False) is not None)
        return call

    def attribute_sets():
        other = shade_ops.ShadeReLU(units, backend=backend).train()
        _call(other, y, grad_out, one)
        sets = _attribute_sets(other, lambda: _call(other, y, grad_out, one))

        def call():
            for name, value in sets:
                nn.Module.__setattr__(other, name, value)
        call.count = len(sets)  # type: ignore[attr-defined]
        return call

    def empty_module():  # not a part: what any module call costs (nn.ReLU's too)
        module = nn.Identity()
        return lambda: module(y)

    for name, make in zip(PARTS + CHECKED_ONLY,
                          (raw, update, plan_check, mode_checks, attribute_sets, checks, resolve)):
        add(name, make)
    add("(for scale) an nn.Identity call", empty_module)
    return calls, missing


def cprofile_lines(call: Callable, calls: int, top: int) -> list[str]:
    """Markdown: the `top` functions by own time over `calls` calls, per call."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    entries = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"cProfile of {calls} calls, per call (us; own time, then with callees):", "",
             "| function | calls | own | cumulative |", "|---|---:|---:|---:|"]
    for (path, line, func), (_, ncalls, own, cumulative, _) in entries:
        where = "~" if path == "~" else f"{_short(path)}:{line}"
        lines.append(f"| `{func}` ({where}) | {ncalls / calls:g} | {own / calls * 1e6:.1f} | "
                     f"{cumulative / calls * 1e6:.1f} |")
    return lines + [""]


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.relpath(path, harness.ROOT) if path.startswith(harness.ROOT) else path


def torch_profiler_lines(call: Callable, top: int) -> list[str]:
    """Markdown: the ops of one call in the torch profiler, the most own CPU time first."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    lines = ["The torch profiler's ops of one call (us, the profiler's own cost included):", "",
             "| op | count | own CPU | CPU with children |", "|---|---:|---:|---:|"]
    lines += [f"| `{e.key}` | {e.count} | {e.self_cpu_time_total:.1f} | "
              f"{e.cpu_time_total:.1f} |" for e in events]
    return lines + [""]


def breakdown_lines(times: dict[str, list[float]], missing: dict[str, str],
                    sets: int | None) -> list[str]:
    """Markdown: median and p90 of each piece, its share of the whole call, the rest."""
    med = {name: harness.quartiles(t)[0] * 1e3 for name, t in times.items()}
    p90 = {name: (harness.p90(t) or 0) * 1e3 for name, t in times.items()}
    whole = med[WHOLE]
    lines = ["| piece | median (us) | p90 (us) | of the whole call |", "|---|---:|---:|---:|"]
    for name in (WHOLE, RELU, *PARTS):
        if name in missing:
            lines.append(f"| {name} | n/a | n/a | ({missing[name]}) |")
        elif name in med:
            label = f"{name} ({sets} of them)" if name == PARTS[-1] and sets is not None else name
            lines.append(f"| {label} | {med[name]:.1f} | {p90[name]:.1f} | "
                         f"{100 * med[name] / whole:.0f}% |")
    parts = [med[name] for name in PARTS if name in med]
    rest = whole - sum(parts)
    lines.append(f"| the rest (the whole call less the {len(parts)} parts above) | {rest:.1f} | "
                 f"| {100 * rest / whole:.0f}% |")
    lines.append(f"| ShadeReLU over nn.ReLU | {whole - med[RELU]:+.1f} | "
                 f"| {whole / med[RELU]:.2f}x |")
    for name in med:
        if name not in (WHOLE, RELU, *PARTS):
            lines.append(f"| {name} | {med[name]:.1f} | {p90[name]:.1f} | "
                         f"{100 * med[name] / whole:.0f}% |")
    return lines + [""]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2x128x8x8", help="NCHW, 'x'-separated")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--each", type=int, default=5, help="calls timed alone per round")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-calls", type=int, default=500)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--busy", action="store_true",
                        help="time the pieces while another core spins (harness.busy_core)")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split("x"))
    calls, missing = pieces(shape, args.backend)
    sets = getattr(calls.get(PARTS[-1]), "count", None)
    with harness.busy_core() if args.busy else contextlib.nullcontext():
        times = harness.cpu_times(calls, args.rounds, args.seconds, each=args.each)
    samples = min(len(t) for t in times.values())
    lines = [f"# One ShadeReLU call, {args.shape} ({math.prod(shape):,} elements)", "",
             f"{harness.machine_info('cpu')['name']}, {args.threads} threads, torch "
             f"{torch.__version__}, git {harness.versions()['git']}; backend {args.backend}; "
             f"each call timed alone, {args.each} a round in {args.rounds} shuffled rounds "
             f"(at least {samples} samples a piece){', another core busy' if args.busy else ''}; "
             f"`python benchmarks/percall_profile.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`.", ""]
    lines += breakdown_lines(times, missing, sets)
    lines += cprofile_lines(calls[WHOLE], args.profile_calls, args.top)
    lines += torch_profiler_lines(calls[WHOLE], args.top)
    text = "\n".join(lines).rstrip() + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
