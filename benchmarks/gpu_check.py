"""The one-call GPU check (`make gpu-check`): install, the CUDA tests, and the speed of the Triton
kernels against the eager reference and torch.compile of it, and of SHADE in a model, within
BUDGET seconds (5.5 minutes, the install included; --quick: QUICK_BUDGET).

    python benchmarks/gpu_check.py                 # CUDA machine with torch and Triton, no network
    python benchmarks/gpu_check.py --quick         # the same in under 3 minutes, fewer shapes
    python benchmarks/gpu_check.py --dry-run       # CPU smoke test: tiny shapes, the interpreter
    python benchmarks/gpu_check.py --compile-only  # CPU: compile the kernels for a GPU with ptxas

On the GPU it (0) checks in seconds that torch sees a CUDA device and Triton imports, (1) runs
`pip install --no-deps --no-build-isolation -e .` from the repository root and checks that
shade_ops._C imports and the Triton backend is available for CUDA tensors (else it stops there,
saying why), (2) runs `pytest tests/test_triton.py -k cuda` with the compiled kernels (all of them
skipped counts as a failure), (3) measures the
device-to-device copy bandwidth, then times forward, backward and forward+backward of the penalty
(training mode: the state update included) for Triton, the eager reference and torch.compile of the
reference, float32 and bfloat16, at the benchmark shapes: `triton.testing.do_bench` medians of the
Python call (what a caller sees) and of a CUDA-graph replay of it (device time alone), (4) measures
issue 4's two model-level ratios: `ShadeReLU(backend="triton")` in training mode against
`nn.ReLU` at (128, 64, 16, 16), forward and forward+backward side by side on the same input (the
goal: forward+backward at most 1.1x), and the training step of a CIFAR ResNet-20 (batch 128 of
3x32x32 float32, cross-entropy, SGD with momentum 0.9, cudnn.benchmark on) after
`shade_ops.convert(model, backend="triton")` with `1e-3 * shade_ops.collect(model)` in the loss
against the same step without SHADE, contiguous and channels_last: warm-up steps, then the median
over rounds of synchronised steps, the two variants taking turns so that drift hits both, and the
median of CUDA-graph replays of one step (the goal: SHADE adds at most 3%), (5) with the time
left, tries other tile sizes and program counts of the Triton kernels, and (6) runs the other
tests that name cuda. Each step is cut to fit the budget; the penalty benchmark leaves
MODEL_SECONDS to step (4). Achieved bandwidth counts the bytes that must move: the forward reads
y; the backward reads y and writes the gradient.

--dry-run runs steps (3) and (4) on the CPU through the Triton interpreter, at tiny shapes: the
penalty at DRY_RUN_SHAPES, ShadeReLU at 3x5x4x6, and a ResNet-8 of width 4 on a batch of two
3x8x8 images (1 warm-up step and 2 rounds of 1 step): 10-20 s on two CPU cores.

Before a shape is timed, the Triton penalty, gradient and state update at that shape and dtype are
checked against the float64 reference (a disagreement is reported WRONG, not timed, and fails the
check). Every row is printed as it is measured.

Results: gpu_check.json and gpu_check_<date>_<device>.md under $OUT when OUT is set, and the
markdown and JSON under benchmarks/results/, written again after every step, so a run killed at
the time limit leaves what it measured. --dry-run writes only where --out / --results-dir say.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = [(256, 64, 56, 56), (256, 256, 14, 14), (8192, 4096)]
QUICK_SHAPES = [(256, 64, 56, 56), (8192, 4096)]
DRY_RUN_SHAPES = [(3, 5, 4, 6), (37, 9)]
# Seconds for the whole check, the install included: one device command may run 10 minutes and a
# session's device time is 15, so the default leaves room to run it once more.
BUDGET = 330.0
QUICK_BUDGET = 160.0
DTYPES = ["float32", "bfloat16"]
IMPLEMENTATIONS = ["triton", "eager", "compile"]
PHASES = ["forward", "backward", "forward+backward"]
# settings of shade_ops._triton to try with the time left (graph times of Triton alone)
SWEEP = [
    {},  # the defaults
    {"_TILE": 1024, "_NUM_WARPS": 4},
    {"_TILE": 2048, "_NUM_WARPS": 4},
    {"_TILE": 4096, "_NUM_WARPS": 8},
    {"_FWD_PER_SM": 8, "_BWD_PER_SM": 64},
    {"_FWD_PER_SM": 2, "_BWD_PER_SM": 8},
]
GOAL_COPY_FRACTION = 0.8     # forward and backward, each, of the copy bandwidth
GOAL_SPEEDUP = 1.2           # forward+backward over torch.compile of the reference
COPY_BYTES = 1 << 30         # the tensor copied to measure the bandwidth (1 GiB)

# The model-level step (issue 4): ShadeReLU against nn.ReLU at one shape, and a CIFAR ResNet's
# training step with SHADE on every layer against the same step without.
RELU_SHAPE = (128, 64, 16, 16)
DRY_RUN_RELU_SHAPE = (3, 5, 4, 6)
RELU_PHASES = ["forward", "forward+backward"]
# batch and image of the input; blocks and width of shade_ops.models.ResNet (blocks=3: ResNet-20);
# warm-up steps, then rounds of `steps` steps of each variant, interleaved
RESNET = dict(batch=128, image=(3, 32, 32), blocks=3, width=16, warmup=10, rounds=15, steps=10)
DRY_RUN_RESNET = dict(batch=2, image=(3, 8, 8), blocks=1, width=4, warmup=1, rounds=2, steps=1)
MEMORY_FORMATS = ["contiguous", "channels_last"]
SHADE_BETA = 1e-3            # loss = cross_entropy + SHADE_BETA * shade_ops.collect(model)
MODEL_SECONDS = 60.0         # what the penalty benchmark leaves to the model-level step
GOAL_RELU_RATIO = 1.1        # ShadeReLU forward+backward over nn.ReLU's, at most
GOAL_STEP_OVERHEAD = 0.03    # SHADE on every layer, of the ResNet-20 training step, at most


# ---- what runs anywhere ------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke test: tiny shapes through TRITON_INTERPRET=1, no install, "
                             "no tests, no torch.compile (implies --device cpu)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="where to benchmark (default: cuda, or cpu with --dry-run)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every kernel the benchmark shapes launch for --arch with "
                             "ptxas, without a GPU, and report registers and vector loads")
    parser.add_argument("--arch", type=int, default=90, help="compute capability for "
                        "--compile-only (90: H100/H200)")
    parser.add_argument("--shape", action="append", type=parse_shape, dest="shapes",
                        help="a shape to benchmark, e.g. 256x64x56x56 (repeatable)")
    parser.add_argument("--dtype", action="append",
                        choices=["float32", "bfloat16", "float16", "float64"],
                        dest="dtypes")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out torch.compile of the reference")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the tile sweep")
    parser.add_argument("--no-model", action="store_true",
                        help="leave out the model-level step (ShadeReLU against nn.ReLU, and the "
                             "ResNet-20 training step with and without SHADE)")
    parser.add_argument("--quick", action="store_true",
                        help="under 3 minutes: one shape per layout, float32 and bfloat16, no "
                             "sweep, the other CUDA tests left out")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check, install included; later steps are "
                             f"cut to fit (default {BUDGET:.0f}, {QUICK_BUDGET:.0f} with --quick)")
    parser.add_argument("--rep-ms", type=float, default=40.0,
                        help="do_bench repetition time per measurement, ms")
    parser.add_argument("--out", default=None,
                        help="folder for gpu_check.json and the markdown (default: $OUT; none "
                             "with --dry-run)")
    parser.add_argument("--results-dir", default=None,
                        help="folder for the markdown (default: benchmarks/results; none with "
                             "--dry-run, which writes nowhere in the tree)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.skip_install = args.skip_tests = args.skip_compile = True
        args.no_sweep = True
    else:
        args.out = args.out or os.environ.get("OUT")
        args.results_dir = args.results_dir or os.path.join(ROOT, "benchmarks", "results")
    if args.quick:
        args.no_sweep = True
    args.budget = args.budget or (QUICK_BUDGET if args.quick else BUDGET)
    args.device = args.device or "cuda"
    args.shapes = args.shapes or (DRY_RUN_SHAPES if args.dry_run else
                                  QUICK_SHAPES if args.quick else SHAPES)
    args.dtypes = args.dtypes or DTYPES
    return args


def parse_shape(text: str) -> tuple[int, ...]:
    """'256x64x56x56' -> (256, 64, 56, 56)."""
    try:
        shape = tuple(int(part) for part in re.split(r"[x,]", text.strip()) if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is integers joined by 'x', got {text!r}")
    if len(shape) < 2 or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"a shape needs at least 2 positive dims, got {text!r}")
    return shape


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def bytes_moved(shape: tuple[int, ...], dtype: str, phase: str) -> int:
    """Bytes that must cross the memory bus: the forward reads y, the backward reads y and writes
    the gradient, forward+backward does both."""
    tensor = math.prod(shape) * DTYPE_BYTES[dtype]
    return {"forward": 1, "backward": 2, "forward+backward": 3}[phase] * tensor


def bandwidth_gbs(num_bytes: int, ms: float | None) -> float | None:
    return None if not ms else num_bytes / (ms * 1e-3) / 1e9


@dataclass
class Row:
    """One measurement: an implementation, a phase, a shape and a dtype."""

    shape: tuple
    dtype: str
    phase: str
    impl: str
    ms: float | None = None          # do_bench median
    ms_p20: float | None = None
    ms_p80: float | None = None
    graph_ms: float | None = None    # do_bench_cudagraph median: device time alone
    gbs: float | None = None
    copy_fraction: float | None = None
    graph_gbs: float | None = None
    graph_copy_fraction: float | None = None
    note: str = ""

    def fill_bandwidth(self, copy_gbs: float | None) -> None:
        moved = bytes_moved(self.shape, self.dtype, self.phase)
        self.gbs = bandwidth_gbs(moved, self.ms)
        self.graph_gbs = bandwidth_gbs(moved, self.graph_ms)
        if copy_gbs:
            self.copy_fraction = self.gbs / copy_gbs if self.gbs else None
            self.graph_copy_fraction = self.graph_gbs / copy_gbs if self.graph_gbs else None


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def speedups(rows: list[Row], baseline: str = "compile") -> dict:
    """(shape, dtype, phase) -> (do_bench speed-up, graph speed-up) of triton over baseline."""
    by_key = {(tuple(r.shape), r.dtype, r.phase, r.impl): r for r in rows}
    result = {}
    for (shape, dtype, phase, impl), row in by_key.items():
        base = by_key.get((shape, dtype, phase, baseline))
        if impl != "triton" or base is None:
            continue
        result[(shape, dtype, phase)] = (
            base.ms / row.ms if base.ms and row.ms else None,
            base.graph_ms / row.graph_ms if base.graph_ms and row.graph_ms else None)
    return result


def markdown_table(rows: list[Row], copy_gbs: float | None) -> str:
    """The results as one markdown table, triton's speed-up over torch.compile in the last
    columns."""
    ups = speedups(rows)
    header = ["shape", "dtype", "phase", "impl", "median ms (p20-p80)", "GB/s", "of copy",
              "graph ms", "graph GB/s", "graph of copy", "vs compile", "graph vs compile"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        up = ups.get((tuple(r.shape), r.dtype, r.phase), (None, None)) if r.impl == "triton" \
            else (None, None)
        spread = "" if r.ms_p20 is None else f" ({r.ms_p20:.4f}-{r.ms_p80:.4f})"
        median = (_fmt(r.ms, ".4f") + spread) if r.ms is not None else (r.note or "-")
        lines.append("| " + " | ".join([
            "x".join(map(str, r.shape)), r.dtype, r.phase, r.impl, median,
            _fmt(r.gbs, ".0f"), _fmt(r.copy_fraction, ".0%"), _fmt(r.graph_ms, ".4f"),
            _fmt(r.graph_gbs, ".0f"), _fmt(r.graph_copy_fraction, ".0%"),
            _fmt(up[0], ".2f", "x"), _fmt(up[1], ".2f", "x")]) + " |")
    lines.append("")
    lines.append(f"Copy bandwidth (`torch.empty_like(x).copy_(x)`, read + write): "
                 f"{_fmt(copy_gbs, '.0f')} GB/s.")
    return "\n".join(lines)


def goals(rows: list[Row], shapes: list[tuple]) -> list[dict]:
    """The issue's goals at the given shapes: forward and backward each at least 80% of the copy
    bandwidth; forward+backward at least 1.2x faster than torch.compile of the reference. Judged
    on do_bench and on graph (device-only) times."""
    ups = speedups(rows)
    checks = []
    for r in rows:
        if r.impl != "triton" or tuple(r.shape) not in {tuple(s) for s in shapes}:
            continue
        if r.phase in ("forward", "backward"):
            for timing, value in (("do_bench", r.copy_fraction),
                                  ("graph", r.graph_copy_fraction)):
                checks.append(dict(shape=list(r.shape), dtype=r.dtype, phase=r.phase,
                                   timing=timing, goal=f">= {GOAL_COPY_FRACTION:.0%} of copy",
                                   value=value, unit="%", met=None if value is None
                                   else value >= GOAL_COPY_FRACTION))
        else:
            up = ups.get((tuple(r.shape), r.dtype, r.phase), (None, None))
            for timing, value in zip(("do_bench", "graph"), up):
                checks.append(dict(shape=list(r.shape), dtype=r.dtype, phase=r.phase,
                                   timing=timing, goal=f">= {GOAL_SPEEDUP}x torch.compile",
                                   value=value, unit="x", met=None if value is None
                                   else value >= GOAL_SPEEDUP))
    return checks


def _shown(value: float | None, unit: str) -> str:
    """A goal's value: 'x' a ratio (1.23x), '%' a fraction (81%), '+%' an overhead (+2.1%)."""
    if value is None:
        return "-"
    return {"x": f"{value:.2f}x", "%": f"{value:.0%}", "+%": f"{value:+.1%}"}[unit]


def goals_markdown(checks: list[dict]) -> str:
    lines = ["| shape | dtype | phase | timing | goal | value | met |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        # reports written before checks had a unit: the speed-ups were those over compile
        unit = c.get("unit") or ("x" if "compile" in c["goal"] else "%")
        shown = _shown(c["value"], unit)
        met = {True: "yes", False: "NO", None: "-"}[c["met"]]
        lines.append(f"| {'x'.join(map(str, c['shape']))} | {c['dtype']} | {c['phase']} | "
                     f"{c['timing']} | {c['goal']} | {shown} | {met} |")
    return "\n".join(lines)


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': a file-name-safe device name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def result_name(device_name: str, when: datetime.date | None = None) -> str:
    when = when or datetime.date.today()
    return f"gpu_check_{when.isoformat()}_{device_slug(device_name)}.md"


def pytest_summary(output: str) -> str:
    """The last summary line of a pytest run ('3 passed, 1 skipped in 2.1s'), or ''."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", line):
            return line.strip("= ").strip()
    return ""


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_command(command: list[str], timeout: float, env: dict | None = None) -> dict:
    """Runs a command from the repository root; never raises."""
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=max(1.0, timeout))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) \
            else (error.stdout or "")
        output, code = output + f"\n[timed out after {timeout:.0f}s]", None
    except OSError as error:
        output, code = str(error), None
    return dict(command=" ".join(command), returncode=code, seconds=time.monotonic() - start,
                summary=pytest_summary(output), tail=output[-3000:])


def _env(**overrides: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(overrides)
    return env


def install(budget: Budget) -> dict:
    """pip install -e . without network; then, if shade_ops._C does not import from the
    repository (no pip, or an install that put it elsewhere), `setup.py build_ext --inplace`."""
    result = run_command([sys.executable, "-m", "pip", "install", "--no-deps",
                          "--no-build-isolation", "-e", "."], min(240.0, budget.left() / 2))
    check = [sys.executable, "-c", "import shade_ops._C"]
    if run_command(check, 60.0, _env())["returncode"] != 0:
        result["fallback"] = run_command([sys.executable, "setup.py", "build_ext", "--inplace"],
                                         min(240.0, budget.left() / 2))
        result["fallback"]["imports"] = run_command(check, 60.0, _env())["returncode"] == 0
    return result


TEST_RUNS = {
    # the CUDA tests of the Triton backend: before the benchmark, which needs them to pass
    "triton": (["tests/test_triton.py", "-k", "cuda"], 120.0, 120.0),
    # the other tests that name cuda, with the time the benchmark leaves
    "others": (["tests", "--ignore=tests/test_triton.py", "-m", "not slow", "-k", "cuda"], 60.0,
               20.0),
}


def run_tests(budget: Budget, which: str) -> dict:
    """One pytest run of TEST_RUNS with compiled kernels (not the interpreter, which
    tests/conftest.py would otherwise choose); cut to leave `reserve` seconds of the budget."""
    args, cap, reserve = TEST_RUNS[which]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    timeout = min(cap, budget.left() - reserve)
    if timeout < 20.0:
        return dict(command=" ".join(command), skipped="time budget")
    return run_command(command, timeout, _env(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1"))


# ---- timing ------------------------------------------------------------------------------

def quantiles(times: list[float]) -> list[float]:
    """[p20, median, p80] of times, interpolated linearly between ranks as do_bench's are."""
    times = sorted(times)

    def at(q: float) -> float:
        position = q * (len(times) - 1)
        below = int(position)
        above = min(below + 1, len(times) - 1)
        return times[below] + (times[above] - times[below]) * (position - below)

    return [at(0.2), statistics.median(times), at(0.8)]


def _cpu_bench(fn, reps: int = 5) -> list[float]:
    """(p20, median, p80) ms of fn on the CPU."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def graph_ms(make_fn, rep_ms: float) -> float:
    """do_bench median of one CUDA-graph replay of make_fn()'s callable: device time without the
    Python and launch costs, the L2 cache flushed between replays as do_bench does. Everything,
    make_fn() included, runs on one side stream, because a backward runs on the stream of its
    forward."""
    import torch
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_fn()
        fn()
        fn()  # warm: compiled, cached, allocated
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        return triton.testing.do_bench(graph.replay, warmup=max(5, int(rep_ms / 4)),
                                       rep=int(rep_ms), return_mode="median")
    finally:
        del graph


def time_call(make_fn, device: str, rep_ms: float) -> tuple[list[float], float | None, str]:
    """([p20, median, p80] ms from do_bench of make_fn()'s callable, graph median ms or None,
    note)."""
    if device == "cpu":
        return _cpu_bench(make_fn()), None, ""
    import triton.testing

    quantiles = triton.testing.do_bench(make_fn(), warmup=max(5, int(rep_ms / 4)),
                                        rep=int(rep_ms), quantiles=[0.2, 0.5, 0.8])
    try:
        graph, note = graph_ms(make_fn, rep_ms), ""
    except Exception as error:  # noqa: BLE001  (a baseline that cannot be captured)
        graph, note = None, f"graph: {type(error).__name__}: {error!s:.80}"
    return list(quantiles), graph, note


def copy_bandwidth(device: str, rep_ms: float, num_bytes: int = COPY_BYTES) -> float:
    """GB/s of `torch.empty_like(x).copy_(x)` (bytes read + bytes written)."""
    import torch

    x = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).normal_()
    (_, median, _), graph, _ = time_call(lambda: lambda: torch.empty_like(x).copy_(x), device,
                                         rep_ms)
    best = min(t for t in (median, graph) if t)  # the copy's own speed, launch cost aside
    return 2 * x.numel() * x.element_size() / (best * 1e-3) / 1e9


def _penalty_calls(impl: str, y, state):
    """For one implementation in training mode, makers of the (forward, backward,
    forward+backward) callables: the backward's maker runs the forward it differentiates."""
    import torch

    import shade_ops
    from shade_ops import reference

    if impl == "triton":
        def forward():
            return shade_ops.penalty(y, state, backend="triton")
    elif impl == "eager":
        def forward():
            return reference.penalty(y, state)
    else:
        def reference_penalty(t):
            return reference.penalty(t, state)

        compiled = torch.compile(reference_penalty, dynamic=False)

        def forward():
            return compiled(y)

    def make_backward():
        value = forward()
        return lambda: torch.autograd.grad(value, y, retain_graph=True)

    def both():
        return torch.autograd.grad(forward(), y)

    return (lambda: forward), make_backward, (lambda: both)


def agreement(shape: tuple, dtype_name: str, device: str) -> tuple[bool, str]:
    """Whether the Triton penalty, its gradient and the updated state agree with the float64
    reference at `shape` and `dtype_name` (checked before that shape is timed), and how close."""
    import torch

    import shade_ops
    from shade_ops import reference

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device=device).manual_seed(0)
    y = (torch.randn(shape, generator=generator, device=device) * 2 + 0.3).to(dtype)
    y.requires_grad_()
    y64 = y.detach().double().requires_grad_()
    state, state64 = (shade_ops.ShadeState(shape[1], device=device, dtype=t)
                      for t in (torch.float32, torch.float64))
    value = shade_ops.penalty(y, state, backend="triton")
    expected = reference.penalty(y64, state64)
    (grad,) = torch.autograd.grad(value, y)
    (grad64,) = torch.autograd.grad(expected, y64)

    def relative(a, b) -> float:
        return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()

    errors = {"penalty": relative(value, expected), "grad": relative(grad, grad64),
              "mu": relative(state.mu, state64.mu)}
    limits = {"penalty": 1e-4, "grad": 1e-4 if dtype == torch.float32 else 1e-2, "mu": 1e-4}
    ok = all(errors[k] <= limits[k] for k in errors)
    text = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    return ok, ("agrees" if ok else "WRONG") + f" with float64 reference ({text})"


def _print_row(row) -> None:
    ms = f"{row.ms:.4f} ms" if row.ms else "-"
    graph = f", graph {row.graph_ms:.4f} ms" if getattr(row, "graph_ms", None) else ""
    print(f"  {'x'.join(map(str, row.shape))} {row.dtype} {row.phase} {row.impl}: {ms}{graph}"
          f" {row.note}".rstrip(), flush=True)


def benchmark(args, budget: Budget, copy_gbs: float | None, reserve: float = 0.0,
              on_rows=None) -> list[Row]:
    """The penalty's rows at args.shapes and args.dtypes, each shape first checked against the
    reference (a Triton result that disagrees is reported WRONG and not timed); an implementation
    is skipped when it would leave less than `reserve` seconds (for the steps after it) of the
    budget. `on_rows` gets the rows of each shape and dtype as they are measured."""
    import torch

    import shade_ops

    rows = []
    for shape in args.shapes:
        for dtype_name in args.dtypes:
            start_rows = len(rows)
            try:
                ok, checked = agreement(shape, dtype_name, args.device)
            except Exception as error:  # noqa: BLE001  (report, keep going)
                ok, checked = False, f"WRONG: the check failed: {error!r:.200}"
            print(f"{'x'.join(map(str, shape))} {dtype_name}: {checked}", flush=True)
            dtype = getattr(torch, dtype_name)
            y = torch.randn(shape, dtype=dtype, device=args.device).requires_grad_()
            state = shade_ops.ShadeState(shape[1], device=args.device)
            for impl in IMPLEMENTATIONS:
                if impl == "triton" and not ok:
                    rows += [Row(shape, dtype_name, p, impl, note=checked) for p in PHASES]
                    continue
                if impl == "compile" and args.skip_compile:
                    continue
                if budget.left() < (90.0 if impl == "compile" else 20.0) + reserve:
                    rows += [Row(shape, dtype_name, p, impl, note="skipped: time budget")
                             for p in PHASES]
                    continue
                calls = _penalty_calls(impl, y, state)
                try:
                    start = time.monotonic()
                    calls[2]()()  # compiles what needs compiling, forward and backward
                    warm = time.monotonic() - start
                except Exception as error:  # noqa: BLE001  (report, keep going)
                    rows += [Row(shape, dtype_name, p, impl, note=f"failed: {error!r:.200}")
                             for p in PHASES]
                    continue
                for phase, call in zip(PHASES, calls):
                    row = Row(shape, dtype_name, phase, impl)
                    try:
                        (p20, median, p80), row.graph_ms, row.note = time_call(
                            call, args.device, args.rep_ms)
                        row.ms, row.ms_p20, row.ms_p80 = median, p20, p80
                    except Exception as error:  # noqa: BLE001
                        row.note = f"failed: {error!r:.200}"
                    if phase == "forward" and warm > 5:
                        row.note = (row.note + f" warm-up {warm:.0f}s").strip()
                    if impl == "triton":
                        row.note = (row.note + " " + checked).strip()
                    row.fill_bandwidth(copy_gbs)
                    rows.append(row)
                    _print_row(row)
            if on_rows is not None:
                on_rows(rows[start_rows:])
            del y, state
            if args.device == "cuda":
                torch.cuda.empty_cache()
    return rows


def sweep(args, budget: Budget, copy_gbs: float | None) -> list[dict]:
    """Triton's forward and backward (graph times) at the settings of SWEEP."""
    import torch

    import shade_ops
    from shade_ops import _triton

    defaults = {name: getattr(_triton, name) for setting in SWEEP for name in setting}
    results = []
    try:
        for setting in SWEEP:
            for name, value in {**defaults, **setting}.items():
                setattr(_triton, name, value)
            _triton._PLANS.clear()  # the launch plans were made with the previous settings
            for shape in args.shapes:
                for dtype_name in args.dtypes:
                    if budget.left() < 60.0:
                        return results
                    y = torch.randn(shape, dtype=getattr(torch, dtype_name),
                                    device=args.device).requires_grad_()
                    state = shade_ops.ShadeState(shape[1], device=args.device)
                    forward, backward, _ = _penalty_calls("triton", y, state)  # makers
                    entry = dict(setting=setting or "defaults", shape=list(shape),
                                 dtype=dtype_name)
                    for phase, call in (("forward", forward), ("backward", backward)):
                        try:
                            graph = graph_ms(call, args.rep_ms / 2)
                        except Exception as error:  # noqa: BLE001
                            entry[phase] = f"failed: {error!r:.120}"
                            continue
                        gbs = bandwidth_gbs(bytes_moved(shape, dtype_name, phase), graph)
                        entry[phase] = dict(graph_ms=graph, gbs=gbs,
                                            copy_fraction=gbs / copy_gbs if gbs and copy_gbs
                                            else None)
                    results.append(entry)
    finally:
        for name, value in defaults.items():
            setattr(_triton, name, value)
        _triton._PLANS.clear()
    return results


def sweep_markdown(results: list[dict]) -> str:
    lines = ["| setting | shape | dtype | forward graph ms (of copy) | "
             "backward graph ms (of copy) |", "|---|---|---|---|---|"]
    for e in results:
        cells = []
        for phase in ("forward", "backward"):
            m = e.get(phase)
            cells.append(m if isinstance(m, str) or m is None else
                         f"{_fmt(m['graph_ms'], '.4f')} ({_fmt(m['copy_fraction'], '.0%')})")
        setting = e["setting"] if isinstance(e["setting"], str) else \
            ", ".join(f"{k.strip('_')}={v}" for k, v in e["setting"].items())
        lines.append(f"| {setting} | {'x'.join(map(str, e['shape']))} | "
                     f"{e['dtype']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ---- model level: ShadeReLU against nn.ReLU, and a ResNet's training step ----------------

@dataclass
class ModelRow:
    """One model-level measurement with SHADE (impl "shade", the Triton backend) or without
    ("plain"): of model "ReLU" (ShadeReLU against nn.ReLU) or of a ResNet's training step."""

    model: str                       # "ReLU", or "ResNet-20" and the like
    shape: tuple                     # the input's
    dtype: str
    phase: str                       # "forward", "forward+backward" or "training step"
    impl: str                        # "shade" or "plain"
    memory_format: str = "contiguous"
    ms: float | None = None          # median of do_bench (ReLU), or over rounds of steps
    ms_p20: float | None = None
    ms_p80: float | None = None
    graph_ms: float | None = None    # median of CUDA-graph replays: device time alone
    rounds: int | None = None        # training step: the rounds timed
    note: str = ""


def model_ratios(rows: list[ModelRow]) -> dict:
    """(model, shape, dtype, phase, memory_format) -> (ratio, graph ratio): shade's time over
    plain's."""
    by_key = {(r.model, tuple(r.shape), r.dtype, r.phase, r.memory_format, r.impl): r
              for r in rows}
    result = {}
    for (*key, impl), row in by_key.items():
        plain = by_key.get((*key, "plain"))
        if impl != "shade" or plain is None:
            continue
        result[tuple(key)] = (
            row.ms / plain.ms if row.ms and plain.ms else None,
            row.graph_ms / plain.graph_ms if row.graph_ms and plain.graph_ms else None)
    return result


def model_goals(rows: list[ModelRow]) -> list[dict]:
    """Issue 4's goals, as checks like goals()'s: ShadeReLU's forward+backward at most 1.1x
    nn.ReLU's, and SHADE on every layer adding at most 3% to the ResNet's training step (each
    memory format measured). Judged on the Python-call (do_bench) or synchronised-step (wall)
    times and on graph (device-only) times."""
    checks = []
    for (model, shape, dtype, phase, memory_format), ratios in model_ratios(rows).items():
        if model == "ReLU" and phase == "forward+backward":
            label, timings, values = "ShadeReLU forward+backward", ("do_bench", "graph"), ratios
            goal, unit, limit = f"<= {GOAL_RELU_RATIO}x nn.ReLU", "x", GOAL_RELU_RATIO
        elif phase == "training step":
            label = f"{model} training step" + (
                "" if memory_format == "contiguous" else f", {memory_format}")
            timings = ("wall", "graph")
            values = tuple(None if ratio is None else ratio - 1.0 for ratio in ratios)
            goal, unit, limit = (f"<= +{GOAL_STEP_OVERHEAD:.0%} without SHADE", "+%",
                                 GOAL_STEP_OVERHEAD)
        else:
            continue  # ShadeReLU's forward alone: shown in the table, no goal
        for timing, value in zip(timings, values):
            checks.append(dict(shape=list(shape), dtype=dtype, phase=label, timing=timing,
                               goal=goal, value=value, unit=unit,
                               met=None if value is None else value <= limit))
    return checks


def model_table(rows: list[ModelRow]) -> str:
    """The model-level rows as one markdown table, shade's time over plain's on shade's rows."""
    ratios = model_ratios(rows)
    header = ["model", "input", "dtype", "format", "phase", "impl", "median ms (p20-p80)",
              "graph ms", "shade / plain", "graph shade / plain", "note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        ratio = ratios.get((r.model, tuple(r.shape), r.dtype, r.phase, r.memory_format),
                           (None, None)) if r.impl == "shade" else (None, None)
        spread = "" if r.ms_p20 is None else f" ({r.ms_p20:.4f}-{r.ms_p80:.4f})"
        rounds = "" if r.rounds is None else f", {r.rounds} rounds"
        lines.append("| " + " | ".join([
            r.model, "x".join(map(str, r.shape)), r.dtype, r.memory_format, r.phase, r.impl,
            _fmt(r.ms, ".4f") + spread + rounds if r.ms is not None else "-",
            _fmt(r.graph_ms, ".4f"), _fmt(ratio[0], ".3f", "x"), _fmt(ratio[1], ".3f", "x"),
            r.note.replace("|", "/")]) + " |")
    return "\n".join(lines)


MODEL_TEXT = (
    "shade: `shade_ops.ShadeReLU(backend=\"triton\")` in training mode (the state update "
    "included), or the ResNet after `shade_ops.convert(model, backend=\"triton\")` with "
    f"`{SHADE_BETA:g} * shade_ops.collect(model)` added to the loss; plain: `nn.ReLU`, or the "
    "ResNet as built. ReLU: do_bench medians of the Python call, the backward one "
    "`autograd.grad((out, penalty), y, (g, 1))` (plain: `autograd.grad(out, y, g)`). Training "
    "step: cross-entropy, SGD with momentum 0.9, cudnn.benchmark on; the median over rounds of "
    "steps timed between device synchronisations, the two variants taking turns in each round; "
    "graph: do_bench median of a CUDA-graph replay of one step.")


def _relu_calls(impl: str, y, g):
    """Makers of the (forward, forward+backward) callables of ShadeReLU(backend="triton") in
    training mode (impl "shade") or of nn.ReLU ("plain") on y. The backward is one
    autograd.grad, of out with gradient g and of the penalty with gradient 1: the loss's
    gradients, without timing a reduction to a loss."""
    import torch

    import shade_ops

    if impl == "shade":
        module = shade_ops.ShadeReLU(backend="triton").train()
        one = torch.ones((), device=y.device)

        def both():
            out = module(y)
            return torch.autograd.grad((out, module.penalty), y, (g, one))
    else:
        module = torch.nn.ReLU()

        def both():
            return torch.autograd.grad(module(y), y, g)

    return (lambda: lambda: module(y)), (lambda: both)


def relu_benchmark(args, budget: Budget) -> list[ModelRow]:
    """ShadeReLU against nn.ReLU on the same input (RELU_SHAPE; DRY_RUN_RELU_SHAPE with
    --dry-run), forward and forward+backward, each of args.dtypes, timed side by side."""
    import torch

    shape = DRY_RUN_RELU_SHAPE if args.dry_run else RELU_SHAPE
    rows = []
    for dtype_name in args.dtypes:
        if budget.left() < 30.0:
            rows += [ModelRow("ReLU", shape, dtype_name, phase, impl, note="skipped: time budget")
                     for phase in RELU_PHASES for impl in ("shade", "plain")]
            continue
        y = torch.randn(shape, dtype=getattr(torch, dtype_name),
                        device=args.device).requires_grad_()
        g = torch.randn_like(y)
        calls, notes = {}, {}
        for impl in ("shade", "plain"):
            calls[impl] = _relu_calls(impl, y, g)
            start = time.monotonic()
            try:
                calls[impl][1]()()  # compiles the kernels and makes the state, not timed
            except Exception as error:  # noqa: BLE001  (report, keep going)
                calls[impl] = None
                notes[impl] = f"failed: {error!r:.200}"
                continue
            warm = time.monotonic() - start
            notes[impl] = f"warm-up {warm:.0f}s" if warm > 5 else ""
        for index, phase in enumerate(RELU_PHASES):
            for impl in ("shade", "plain"):  # side by side: the same input, one after the other
                row = ModelRow("ReLU", shape, dtype_name, phase, impl, note=notes[impl])
                if calls[impl] is not None:
                    try:
                        (row.ms_p20, row.ms, row.ms_p80), row.graph_ms, note = time_call(
                            calls[impl][index], args.device, args.rep_ms)
                        row.note = (row.note + " " + note).strip()
                    except Exception as error:  # noqa: BLE001
                        row.note = f"failed: {error!r:.200}"
                rows.append(row)
        del y, g, calls
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _training_step(model, x, target, shade: bool):
    """The step of benchmarks/resnet_step.py (SGD, loss + SHADE_BETA * collect(model))."""
    import importlib.util

    # loaded from its file: putting benchmarks/ on sys.path would let its conftest.py shadow the
    # tests' one in every process started afterwards (the gloo test's spawned workers)
    spec = importlib.util.spec_from_file_location(
        "resnet_step", os.path.join(os.path.dirname(os.path.abspath(__file__)), "resnet_step.py"))
    resnet_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resnet_step)

    assert resnet_step.BETA == SHADE_BETA
    return resnet_step.training_step(model, x, target, shade)


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved_steps(steps: dict, device: str, rounds: int, per_round: int, budget: Budget,
                      min_left: float = 0.0) -> dict:
    """name -> ms per call of steps[name] in each round. A round runs `per_round` calls of each
    callable in turn, timed between device synchronisations; the order reverses every other
    round, so that drift (clocks, heat) and what one variant leaves behind hit all alike. After
    3 rounds, stops early when less than `min_left` seconds of the budget are left."""
    names = list(steps)
    times: dict = {name: [] for name in names}
    for index in range(rounds):
        if index >= 3 and budget.left() < min_left:
            break
        for name in names if index % 2 == 0 else names[::-1]:
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(per_round):
                steps[name]()
            _synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3 / per_round)
    return times


def resnet_benchmark(args, budget: Budget) -> list[ModelRow]:
    """The training step of the CIFAR ResNet of RESNET (DRY_RUN_RESNET with --dry-run), float32,
    with SHADE on every layer and without, in each of MEMORY_FORMATS while the budget lasts."""
    import torch

    config = DRY_RUN_RESNET if args.dry_run else RESNET
    name = f"ResNet-{6 * config['blocks'] + 2}"
    shape = (config["batch"], *config["image"])
    rows = []
    tuned = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as a training script has it: SHADE against tuned convs
    onednn = torch.backends.mkldnn.enabled
    if args.device == "cpu":
        # oneDNN's jit_1x1 backward_weights (v3.12, as in torch 2.13) writes past its scratchpad
        # for a strided 1x1 conv on an NHWC input with fewer input channels than its channel
        # block (8 with AVX2, 16 with AVX-512; oneDNN issue #6035): the ResNet's 4 -> 8
        # shortcut, channels_last, on one thread, corrupts the heap. ATen's own convs instead.
        torch.backends.mkldnn.enabled = False
    try:
        for memory_format in MEMORY_FORMATS:
            if budget.left() < (60.0 if memory_format == "contiguous" else 45.0):
                rows += [ModelRow(name, shape, "float32", "training step", impl, memory_format,
                                  note="skipped: time budget") for impl in ("shade", "plain")]
                continue
            try:
                rows += _resnet_rows(name, shape, config, memory_format, args, budget)
            except Exception as error:  # noqa: BLE001  (report, keep going)
                rows += [ModelRow(name, shape, "float32", "training step", impl, memory_format,
                                  note=f"failed: {error!r:.200}") for impl in ("shade", "plain")]
            if args.device == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.backends.cudnn.benchmark = tuned
        torch.backends.mkldnn.enabled = onednn
    return rows


def _resnet_rows(name: str, shape: tuple, config: dict, memory_format: str, args,
                 budget: Budget) -> list[ModelRow]:
    """The shade and plain rows of one memory format: medians over interleaved rounds of
    synchronised steps, and on a GPU the median of CUDA-graph replays of one step (device time
    alone: what the launches cost aside)."""
    import torch

    import shade_ops
    from shade_ops.experiments.models import build_model

    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=args.device).contiguous(memory_format=layout)
    target = torch.randint(0, 10, (shape[0],), device=args.device)
    steps, notes = {}, {}
    for impl in ("shade", "plain"):
        torch.manual_seed(0)  # the same weights for both
        model = build_model("resnet", config["image"], 10, blocks=config["blocks"],
                            width=config["width"])
        if impl == "shade":
            shade_ops.convert(model, backend="triton")
        model = model.to(device=args.device, memory_format=layout).train()
        steps[impl] = _training_step(model, x, target, shade=impl == "shade")
        start = time.monotonic()
        for _ in range(config["warmup"]):  # the first compiles the kernels, tunes the convs
            steps[impl]()
        _synchronize(args.device)
        warm = time.monotonic() - start
        notes[impl] = f"warm-up {warm:.0f}s" if warm > 5 else ""
    times = interleaved_steps(steps, args.device, config["rounds"], config["steps"], budget,
                              min_left=20.0)
    rows = []
    for impl in ("shade", "plain"):
        row = ModelRow(name, shape, "float32", "training step", impl, memory_format,
                       rounds=len(times[impl]), note=notes[impl])
        row.ms_p20, row.ms, row.ms_p80 = quantiles(times[impl])
        rows.append(row)
    if args.device == "cuda":
        for row in rows:
            if budget.left() < 30.0:
                row.note = (row.note + " graph skipped: time budget").strip()
                continue
            try:
                row.graph_ms = graph_ms(lambda step=steps[row.impl]: step, 2 * args.rep_ms)
            except Exception as error:  # noqa: BLE001  (a step that cannot be captured)
                row.note = (row.note + f" graph: {type(error).__name__}: {error!s:.80}").strip()
    return rows


# ---- compile-only: the GPU kernels without a GPU -----------------------------------------

def compile_report(shapes, dtypes, arch: int = 90) -> list[dict]:
    """Compiles, with ptxas and no GPU, every kernel the forward, backward and update launch at
    `shapes`, and reports registers, spills and vector loads of each. Needs a process where Triton
    was imported without TRITON_INTERPRET=1; patches Triton's launch to compile only."""
    import subprocess as sp
    import tempfile

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    compiled = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, tuple(grid), kernel))
        return kernel

    driver.set_active(CompileOnlyDriver())
    JITFunction.run = compile_only
    from shade_ops import _triton
    from shade_ops._layout import units_view

    if _triton.INTERPRETED:
        raise RuntimeError("--compile-only needs Triton imported without TRITON_INTERPRET=1")
    _triton.INTERPRETED = True  # lets the launchers take CPU tensors: nothing is launched
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    report = []
    for shape in shapes:
        for dtype_name in dtypes:
            y = torch.empty(shape, dtype=getattr(torch, dtype_name))
            view, mu = units_view(y, 1), torch.zeros(2, shape[1])
            compiled.clear()
            start = time.monotonic()
            _triton.penalty_forward(view, mu, "mean")
            _triton.penalty_backward(torch.ones(()), view, mu, "mean")
            _triton.update_state(torch.ones(2, shape[1]), mu, torch.ones(4, shape[1]), 0.8)
            seconds = time.monotonic() - start
            for name, grid, kernel in compiled:
                ptx = kernel.asm["ptx"]
                entry = dict(shape=list(shape), dtype=dtype_name, kernel=name, grid=list(grid),
                             # 8- and 16-byte loads, pipelined ones (cp.async to shared memory)
                             # included
                             vector_loads=len(re.findall(r"ld\.global[.\w]*\.v[24]\.", ptx))
                             + len(re.findall(r"cp\.async\.c[ag]\.shared\.global.*, 0x(?:8|10)",
                                              ptx)),
                             async_copies=len(re.findall(r"cp\.async\.c[ag]\.shared", ptx)),
                             shared_bytes=kernel.metadata.shared,
                             scalar_loads=len(re.findall(r"ld\.global[.\w]*\.b(?:16|32|64) ",
                                                         ptx)),
                             seconds=round(seconds, 2))
                with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                    f.write(kernel.asm["cubin"])
                    f.flush()
                    usage = sp.run([cuobjdump, "--dump-resource-usage", f.name],
                                   capture_output=True, text=True).stdout
                found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+)", usage)
                if found:
                    entry["registers"], entry["stack"], entry["shared"] = map(int, found.groups())
                report.append(entry)
    return report


# ---- main --------------------------------------------------------------------------------

def _versions(device: str) -> dict:
    import torch

    info = dict(torch=torch.__version__, python=sys.version.split()[0], device=device)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = None
    return info


def write_results(report: dict, markdown: str, args) -> list[str]:
    """gpu_check.json and the markdown under --out; the markdown and the JSON, named by date and
    device, under --results-dir. Each file is replaced whole (written aside, then renamed), so
    a run killed while writing leaves the previous version."""
    name = result_name(report["versions"]["device_name"])
    as_json = json.dumps(report, indent=1, default=str)
    written = []
    for folder, files in ((args.out, {"gpu_check.json": as_json, name: markdown}),
                          (args.results_dir, {name: markdown,
                                              name[:-len(".md")] + ".json": as_json})):
        if not folder:
            continue
        os.makedirs(folder, exist_ok=True)
        for file_name, text in files.items():
            path = os.path.join(folder, file_name)
            with open(path + ".part", "w") as f:
                f.write(text + "\n")
            os.replace(path + ".part", path)
            written.append(path)
    return written


def _print_run(run: dict) -> dict:
    print(run.get("command"), "->", run.get("summary") or run.get("skipped")
          or run.get("tail", "")[-800:], flush=True)
    return run


def preflight(device: str, after_install: bool) -> str | None:
    """Why the check cannot run here, in seconds rather than after minutes of install and tests,
    or None. Before the install: torch, a CUDA device, Triton. After it, in a fresh process (what
    the tests and benchmarks will import): shade_ops._C built, and the Triton backend available
    for CUDA tensors."""
    if device != "cuda":
        return None
    if not after_install:
        try:
            import torch
        except ImportError as error:
            return f"torch does not import: {error}"
        if not torch.cuda.is_available():
            return f"no CUDA device visible to torch {torch.__version__} (use --dry-run on a CPU)"
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return f"Triton does not import: {error}"
        return None
    probe = run_command([sys.executable, "-c",
                         "import shade_ops, shade_ops._C; "
                         "print(shade_ops.available_backends('cuda'))"], 120.0,
                        _env(TRITON_INTERPRET="0"))
    if probe["returncode"] != 0:
        return f"shade_ops._C does not import after the install: {probe['tail'][-600:]}"
    if "'triton'" not in probe["tail"]:
        return f"the Triton backend is not available for CUDA tensors: {probe['tail'][-300:]}"
    return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    budget = Budget(args.budget)
    # The interpreter is chosen when Triton is imported: decide before anything imports it.
    os.environ["TRITON_INTERPRET"] = "1" if args.device == "cpu" and not args.compile_only \
        else "0"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)

    if args.compile_only:
        report = compile_report(args.shapes, args.dtypes, args.arch)
        print(json.dumps(report, indent=1))
        import triton
        print(f"compiled for sm_{args.arch} with Triton {triton.__version__}", file=sys.stderr)
        for entry in report:  # a readable summary on stderr; stdout stays one JSON document
            print(f"{'x'.join(map(str, entry['shape'])):>16} {entry['dtype']:>9} "
                  f"{entry['kernel']:<30} grid {entry['grid'][0]:>7} "
                  f"regs {entry.get('registers', '?'):>3} stack {entry.get('stack', '?'):>3} "
                  f"shared {entry.get('shared_bytes', '?'):>6} "
                  f"vector loads {entry['vector_loads']}", file=sys.stderr)
        return dict(compile_report=report)

    report: dict = dict(started=datetime.datetime.now().isoformat(timespec="seconds"),
                        args={k: v for k, v in vars(args).items()}, tests=[], rows=[],
                        model_rows=[], goals=[], sweep=[], copy_gbs=None, written=[])

    def save() -> None:
        """The results so far, JSON and markdown: a run killed at any point leaves them."""
        report["seconds"] = round(args.budget - budget.left(), 1)
        report.setdefault("versions", _versions(args.device))
        report["written"] = write_results(report, report_markdown(report), args)

    try:
        _check(args, budget, report, save)
    except BaseException as error:  # noqa: BLE001  (whatever happened, write what there is)
        report["error"] = f"{type(error).__name__}: {error}"
        print("gpu_check failed:", report["error"], flush=True)
        if not isinstance(error, Exception):
            raise
    finally:
        save()
        print(report_markdown(report), flush=True)
        print("wrote", *report["written"], sep="\n  ")
    return report


def _check(args, budget: Budget, report: dict, save) -> None:
    """The steps of the check, each adding to `report` and saving it."""
    why = preflight(args.device, after_install=False)
    if why:
        raise RuntimeError(f"pre-flight: {why}")
    if not args.skip_install:
        print("installing ...", flush=True)
        report["install"] = install(budget)
        print(report["install"]["tail"][-1500:], flush=True)
        why = preflight(args.device, after_install=True)
        if why:
            raise RuntimeError(f"pre-flight after the install: {why}")
        save()
    if not args.skip_tests:
        print("testing ...", flush=True)
        report["tests"].append(_print_run(run_tests(budget, "triton")))
        save()

    import torch

    from shade_ops import _ops

    report["versions"] = _versions(args.device)
    report["backends"] = _ops.available_backends(args.device)
    report["copy_gbs"] = copy_gbs = copy_bandwidth(
        args.device, args.rep_ms, COPY_BYTES if args.device == "cuda" else 1 << 22)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    save()

    def add_rows(rows: list[Row]) -> None:
        report["rows"] += [asdict(r) for r in rows]
        save()

    rows = benchmark(args, budget, copy_gbs, reserve=0.0 if args.no_model else MODEL_SECONDS,
                     on_rows=add_rows)
    report["goals"] = goals(rows, args.shapes)
    save()
    if not args.no_model:
        print("model level: ShadeReLU, ResNet training step ...", flush=True)
        model_rows = relu_benchmark(args, budget)
        report["model_rows"] = [asdict(r) for r in model_rows]
        save()
        model_rows += resnet_benchmark(args, budget)
        report["model_rows"] = [asdict(r) for r in model_rows]
        report["goals"] += model_goals(model_rows)
        save()
    if not args.no_sweep and args.device == "cuda":
        report["sweep"] = sweep(args, budget, copy_gbs)
        save()
    if not args.skip_tests and not args.quick:
        report["tests"].append(_print_run(run_tests(budget, "others")))


def report_markdown(report: dict) -> str:
    versions = report["versions"]
    rows = [Row(**{**r, "shape": tuple(r["shape"])}) for r in report["rows"]]
    model_rows = [ModelRow(**{**r, "shape": tuple(r["shape"])})
                  for r in report.get("model_rows", [])]
    return "\n\n".join(filter(None, [
        f"# shade_ops GPU check: {versions['device_name']}",
        f"{report['started']}; torch {versions['torch']}, triton {versions['triton']}, commit "
        f"{versions.get('commit')}; the penalty in training mode (state update included), "
        f"reduction mean; do_bench medians, and do_bench medians of CUDA-graph replays (graph).",
        f"**Error:** {report['error']}" if report.get("error") else "",
        "\n".join(f"- `{t.get('command')}`: {t.get('summary') or t.get('skipped') or 'see JSON'}"
                  for t in report["tests"]),
        markdown_table(rows, report["copy_gbs"]) if rows else "",
        f"## Model level\n\n{MODEL_TEXT}\n\n{model_table(model_rows)}" if model_rows else "",
        "## Goals\n\n" + goals_markdown(report["goals"]) if report["goals"] else "",
        ("## Tile sweep (Triton, graph times)\n\n" + sweep_markdown(report["sweep"]))
        if report["sweep"] else "",
        f"Total {report['seconds']} s.",
    ]))


def succeeded(report: dict) -> bool:
    """No error, no result that disagrees with the reference, and every test run that ran passed.
    On a GPU the CUDA tests of the Triton backend must have run: all of them skipped (say,
    shade_ops._C did not build) is a failure, not a success."""
    tests = report.get("tests", [])
    if any(entry.get("stack", 0) for entry in report.get("compile_report", [])):
        return False  # --compile-only: a kernel spills registers to the stack
    if report.get("error") or any("WRONG" in r.get("note", "") for r in report.get("rows", [])):
        return False
    if not all(t.get("skipped") or t.get("returncode") in (0, 5) for t in tests):
        return False
    on_gpu = report.get("args", {}).get("device") == "cuda" and \
        not report.get("args", {}).get("skip_tests")
    return not on_gpu or any(re.search(r"\b[1-9]\d* passed", t.get("summary", ""))
                             for t in tests[:1])


if __name__ == "__main__":
    sys.exit(0 if succeeded(main()) else 1)
