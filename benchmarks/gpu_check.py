"""The one-call GPU check (`make gpu-check`): install, the CUDA tests, and the speed of the Triton
kernels through the benchmark harness (benchmarks/harness.py), within BUDGET seconds (5.5
minutes, the install included; --quick: QUICK_BUDGET).

    python benchmarks/gpu_check.py                 # CUDA machine with torch and Triton, no network
    python benchmarks/gpu_check.py --quick         # the same in under 3 minutes, fewer shapes
    python benchmarks/gpu_check.py --dry-run       # CPU smoke test: tiny shapes, the interpreter
    python benchmarks/gpu_check.py --compile-only  # CPU: compile the kernels for a GPU with ptxas

On the GPU it (0) checks in seconds that torch sees a CUDA device and Triton imports, (1) runs
`pip install --no-deps --no-build-isolation -e .` from the repository root and checks that
shade_ops._C imports and the Triton backend is available for CUDA tensors (else it stops there,
saying why), (2) runs `pytest tests/test_triton.py -k cuda` with the compiled kernels (all of them
skipped counts as a failure), (3) checks the Triton penalty, gradient and state update at every
shape and dtype against the float64 reference (a disagreement is reported WRONG, not timed, and
fails the check), (4) runs the harness suite on the device: the copy bandwidth, the penalty's
forward, backward and forward+backward (training mode) for Triton, the eager reference and
torch.compile of it (do_bench medians, and CUDA-graph replays), ShadeReLU against nn.ReLU, and the
CIFAR ResNet-20 training step with SHADE on every layer against the plain step, contiguous and
channels_last, (5) runs the other tests that name cuda with the time left.

Results, in the harness's format (one JSON for CPU and GPU) plus a markdown table:
gpu_check.json and gpu_check_<date>_<device>.md under $OUT when OUT is set, and
gpu_check_<date>_<device>.json/.md under benchmarks/results/, written again after every step, so a
run killed at the time limit leaves what it measured. --dry-run writes only where --out /
--results-dir say.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))

SHAPES = [(256, 64, 56, 56), (256, 256, 14, 14), (8192, 4096)]
QUICK_SHAPES = [(256, 64, 56, 56), (8192, 4096)]
DRY_RUN_SHAPES = [(3, 5, 4, 6), (37, 9)]
# Seconds for the whole check, the install included: one device command may run 10 minutes and a
# session's device time is 15, so the default leaves room to run it once more.
BUDGET = 330.0
QUICK_BUDGET = 160.0
DTYPES = ["float32", "bfloat16"]
RELU_SHAPE = (128, 64, 16, 16)
DRY_RUN_RELU_SHAPE = (3, 5, 4, 6)
# batch, image and builder arguments of the ResNet step (blocks=3: ResNet-20)
RESNET = dict(batch=128, image=(3, 32, 32), kwargs=(("blocks", 3), ("width", 16)))
DRY_RUN_RESNET = dict(batch=2, image=(3, 8, 8), kwargs=(("blocks", 1), ("width", 4)))
MEMORY_FORMATS = ["contiguous", "channels_last"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The check's options, with the defaults that --dry-run and --quick imply."""
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
                        choices=["float32", "bfloat16", "float16", "float64"], dest="dtypes")
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out torch.compile of the reference")
    parser.add_argument("--no-model", action="store_true",
                        help="leave out ShadeReLU against nn.ReLU and the ResNet-20 step")
    parser.add_argument("--no-suite", action="store_true",
                        help="leave out the CPU suite's sweep over elements, layouts, dtypes and "
                             "units (run after the check's own shapes)")
    parser.add_argument("--quick", action="store_true",
                        help="under 3 minutes: fewer shapes, the other CUDA tests left out")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole check, install included; later steps are "
                             f"cut to fit (default {BUDGET:.0f}, {QUICK_BUDGET:.0f} with --quick)")
    parser.add_argument("--rep-ms", type=float, default=40.0,
                        help="do_bench repetition time per measurement, ms")
    parser.add_argument("--out", default=None,
                        help="folder for gpu_check.json and the markdown (default: $OUT; none "
                             "with --dry-run)")
    parser.add_argument("--results-dir", default=None,
                        help="folder for the JSON and markdown (default: benchmarks/results; "
                             "none with --dry-run, which writes nowhere in the tree)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.skip_install = args.skip_tests = args.skip_compile = True
    else:
        args.out = args.out or os.environ.get("OUT")
        args.results_dir = args.results_dir or os.path.join(ROOT, "benchmarks", "results")
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


def device_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': a file-name-safe device name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def result_name(device_name: str, when: datetime.date | None = None) -> str:
    """gpu_check_<date>_<device>.json: the results file (the markdown beside it, .md)."""
    when = when or datetime.date.today()
    return f"gpu_check_{when.isoformat()}_{device_slug(device_name)}.json"


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
        """Seconds left (negative once spent)."""
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
    tests/conftest.py would otherwise choose); cut to leave its reserve of the budget."""
    args, cap, reserve = TEST_RUNS[which]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    timeout = min(cap, budget.left() - reserve)
    if timeout < 20.0:
        return dict(command=" ".join(command), skipped="time budget")
    return run_command(command, timeout, _env(TRITON_INTERPRET="0", PYTHONUNBUFFERED="1"))


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


def _harness():
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import harness

    return harness


def suite_cases(args: argparse.Namespace) -> list:
    """The op cases of benchmarks/run.py's full suite on the device (the sweep over elements,
    the layouts and dtypes, the sweep over units), so that CPU and GPU results sit side by side;
    none with --dry-run, --quick or --no-suite."""
    if args.dry_run or args.quick or args.no_suite:
        return []
    _harness()
    import run

    return [case for case in run.suite("full", args.device).cases if case.phase != "step"]


def cases(args: argparse.Namespace, agreed: dict) -> tuple[list, list]:
    """(penalty cases, the rest) of the harness for the check: the penalty at every shape and
    dtype (Triton left out where it disagreed with the reference); then ShadeReLU against
    nn.ReLU, the ResNet's step with and without SHADE in each memory format, and last the CPU
    suite's op cases (suite_cases)."""
    Case = _harness().Case
    penalty = []
    for shape in args.shapes:
        for dtype in args.dtypes:
            providers = (("triton",) if agreed.get((tuple(shape), dtype)) else ()) + \
                ("reference",) + (() if args.skip_compile else ("compile",))
            penalty += [Case("penalty", phase, "nchw" if len(shape) == 4 else "nd", tuple(shape),
                             dtype, providers) for phase in _harness().PHASES]
    sweep = []
    for case in suite_cases(args):  # measured last: the budget cuts the tail
        if case not in penalty:
            keep = agreed.get((tuple(case.shape), case.dtype))
            sweep.append(dataclasses.replace(case, providers=tuple(
                p for p in case.providers if keep or p != "triton")))
    if args.no_model:
        return penalty, sweep
    relu = DRY_RUN_RELU_SHAPE if args.dry_run else RELU_SHAPE
    model = [Case("shade_relu", phase, "nchw", relu, dtype, ("triton", "nn_relu"))
             for dtype in args.dtypes for phase in ("forward", "forward_backward")]
    config = DRY_RUN_RESNET if args.dry_run else RESNET
    extra = (("model", "resnet20" if dict(config["kwargs"])["blocks"] == 3 else "resnet8"),
             ("builder", "resnet"), ("kwargs", config["kwargs"]))
    model += [Case("step_resnet20" if dict(config["kwargs"])["blocks"] == 3 else "step_resnet8",
                   "step", "channels_last" if fmt == "channels_last" else "nchw",
                   (config["batch"], *config["image"]), "float32", ("plain", "triton"), extra)
              for fmt in MEMORY_FORMATS]
    return penalty, model + sweep


def markdown(report: dict) -> str:
    """The report as markdown: tests, agreement, then one table of the harness rows, with
    Triton's speed-up over torch.compile (penalty) or its time over the baseline's (the rest)."""
    rows = report.get("rows", [])
    key = lambda r: (r["op"], tuple(r["shape"]), r["dtype"], r["phase"], r["layout"], r["timer"])
    base = {key(r): r for r in rows if r["provider"] in ("compile", "nn_relu", "plain")}
    header = ["op", "shape", "dtype", "phase", "layout", "provider", "timer",
              "median ms (q1-q3)", "GB/s", "of copy", "peak MB", "vs baseline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        other = base.get(key(r))
        versus = "-" if other is None or r is other or r["provider"] == "reference" else \
            (f"{other['time_ms'] / r['time_ms']:.2f}x faster" if r["op"] == "penalty"
             else f"{r['time_ms'] / other['time_ms']:.3f}x the time")
        spread = "" if r["time_ms_q1"] is None else \
            f" ({r['time_ms_q1']:.4f}-{r['time_ms_q3']:.4f})"
        lines.append("| " + " | ".join([
            r["op"], "x".join(map(str, r["shape"])), r["dtype"], r["phase"], r["layout"],
            r["provider"], r["timer"], f"{r['time_ms']:.4f}{spread}",
            "-" if r["gbps"] is None else f"{r['gbps']:.0f}",
            "-" if r["roofline"] is None else f"{r['roofline']:.0%}",
            "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2 ** 20:.1f}",
            versus]) + " |")
    versions = report.get("versions", {})
    return "\n\n".join(filter(None, [
        f"# shade_ops GPU check: {report.get('machine', {}).get('name', '?')}",
        f"{report.get('date')}; torch {versions.get('torch')}, triton {versions.get('triton')}, "
        f"commit {versions.get('git')}; penalty in training mode (state update included).",
        f"**Error:** {report['error']}" if report.get("error") else "",
        "\n".join(f"- failed: {e}" for e in report.get("errors", [])),
        "\n".join(f"- left out: {e}" for e in report.get("skipped", [])),
        "\n".join(f"- `{t.get('command')}`: {t.get('summary') or t.get('skipped') or 'see JSON'}"
                  for t in report.get("tests", [])),
        "\n".join(f"- {a['shape']} {a['dtype']}: {a['text']}" for a in report.get("agreement", [])),
        "\n".join(lines) if rows else "",
        f"Copy bandwidth: {report['copy_gbps']:.0f} GB/s." if report.get("copy_gbps") else "",
        f"Total {report.get('seconds')} s.",
    ]))


def write_results(report: dict, args: argparse.Namespace) -> list[str]:
    """gpu_check.json and the markdown under --out; the JSON and markdown, named by date and
    device, under --results-dir. Each file is replaced whole (written aside, then renamed)."""
    name = result_name(report.get("device_name") or args.device)
    md_name = name[:-len(".json")] + ".md"
    as_json, text = json.dumps(report, indent=1, default=str), markdown(report)
    written = []
    for folder, files in ((args.out, {"gpu_check.json": as_json, md_name: text}),
                          (args.results_dir, {name: as_json, md_name: text})):
        if not folder:
            continue
        os.makedirs(folder, exist_ok=True)
        for file_name, content in files.items():
            path = os.path.join(folder, file_name)
            with open(path + ".part", "w") as f:
                f.write(content + "\n")
            os.replace(path + ".part", path)
            written.append(path)
    return written


def _print_run(run: dict) -> dict:
    print(run.get("command"), "->", run.get("summary") or run.get("skipped")
          or run.get("tail", "")[-800:], flush=True)
    return run


def main(argv: list[str] | None = None) -> dict:
    """Runs the check (or --compile-only) and returns its report."""
    args = parse_args(argv)
    budget = Budget(args.budget)
    # The interpreter is chosen when Triton is imported: decide before anything imports it.
    os.environ["TRITON_INTERPRET"] = "1" if args.device == "cpu" and not args.compile_only \
        else "0"
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if args.compile_only:
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        import compile_report

        report = compile_report.compile_report(args.shapes, args.dtypes, args.arch)
        compile_report.print_report(report, args.arch)
        return dict(compile_report=report)

    report: dict = dict(schema=1, args=vars(args), tests=[], agreement=[], rows=[],
                        copy_gbps=None, written=[], device_name=args.device)
    started = time.monotonic()

    def save() -> None:
        """The results so far: a run killed at any point leaves them."""
        report["seconds"] = round(time.monotonic() - started, 1)
        report["written"] = write_results(report, args)

    try:
        _check(args, budget, report, save)
    except BaseException as error:  # noqa: BLE001  (whatever happened, write what there is)
        report["error"] = f"{type(error).__name__}: {error}"
        print("gpu_check failed:", report["error"], flush=True)
        if not isinstance(error, Exception):
            raise
    finally:
        save()
        print(markdown(report), flush=True)
        print("wrote", *report["written"], sep="\n  ")
    return report


def _check(args: argparse.Namespace, budget: Budget, report: dict, save) -> None:
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

    if args.device == "cuda":
        report["device_name"] = torch.cuda.get_device_name()
    harness = _harness()
    agreed = {}
    checked = [(tuple(shape), dtype) for shape in args.shapes for dtype in args.dtypes]
    checked += [(case.shape, case.dtype) for case in suite_cases(args)]
    for shape, dtype in dict.fromkeys(checked):
        try:
            ok, text = agreement(shape, dtype, args.device)
        except Exception as error:  # noqa: BLE001  (report, keep going)
            ok, text = False, f"WRONG: the check failed: {error!r:.200}"
        agreed[(tuple(shape), dtype)] = ok
        report["agreement"].append(dict(shape=list(shape), dtype=dtype, ok=ok, text=text))
        print(f"{'x'.join(map(str, shape))} {dtype}: {text}", flush=True)
    save()
    penalty, model = cases(args, agreed)
    torch.backends.cudnn.benchmark = True  # as a training script has it
    plan = harness.Plan(penalty + model, rounds=3 if args.dry_run else 15,
                        seconds_per_case=2.0, step_rounds=2 if args.dry_run else 10,
                        copy_numel=1 << (20 if args.device == "cpu" else 28))

    def progress(doc: dict) -> None:
        report.update({k: v for k, v in doc.items() if k != "seconds"})
        print(f"  {len(doc['rows'])} rows", flush=True)
        save()

    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:])
    reserve = 0.0 if args.skip_tests or args.quick else 60.0  # for the other CUDA tests
    progress(harness.run_plan(plan, args.device, command, budget.left() - reserve, progress))
    if not args.skip_tests and not args.quick:
        report["tests"].append(_print_run(run_tests(budget, "others")))


def succeeded(report: dict) -> bool:
    """No error, no case that failed, no result that disagrees with the reference, and every test
    run that ran passed.
    On a GPU the CUDA tests of the Triton backend must have run: all of them skipped (say,
    shade_ops._C did not build) is a failure, not a success."""
    tests = report.get("tests", [])
    if any(entry.get("stack", 0) for entry in report.get("compile_report", [])):
        return False  # --compile-only: a kernel spills registers to the stack
    if report.get("error") or report.get("errors") or \
            not all(a.get("ok") for a in report.get("agreement", [])):
        return False
    if not all(t.get("skipped") or t.get("returncode") in (0, 5) for t in tests):
        return False
    on_gpu = report.get("args", {}).get("device") == "cuda" and \
        not report.get("args", {}).get("skip_tests")
    return not on_gpu or any(re.search(r"\b[1-9]\d* passed", t.get("summary", ""))
                             for t in tests[:1])


if __name__ == "__main__":
    sys.exit(0 if succeeded(main()) else 1)
