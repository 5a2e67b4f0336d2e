"""One benchmark harness for shade_ops, CPU and CUDA: cases declared as data, one runner, one
results format ("schema": 1, described in docs/benchmarks.md).

A Case is (op, phase, layout, shape, dtype, providers); run_case times every provider of a case
side by side. CPU: perf_counter, every provider still sampling once per round in a shuffled order
(an allocation-heavy one slows whatever runs next, so that wake reaches all of them alike), each
up to its share of the case's time, short calls timed warm (cpu_times); medians and quartiles
over samples; or (the per-call suite) every call timed alone, a few back to back each round, so
that a row's p90 describes single calls. A case can run while a spinning process holds another
core (busy_core). CUDA: triton.testing.do_bench, plus a "cuda-graph" row replaying the
call in a CUDA graph where it can be captured. Peak memory of one call beyond what was allocated
before it: CUDA max_memory_allocated; CPU the running sum of the profiler's memory events.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (ROOT, HERE):  # shade_ops; benchmarks/models.py
    if _path not in sys.path:
        sys.path.insert(0, _path)

import shade_ops  # noqa: E402
from shade_ops import ShadeState, reference  # noqa: E402

SCHEMA = 1
PHASES = ("forward", "backward", "forward_backward")
LAYOUTS = ("nchw", "channels_last", "nd", "nld")
RECOMPUTE = "+recompute_relu"  # a step provider suffix: the forward inside recompute_relu()
PER_CALL_TIMER = "cpu-perf_counter-call"  # a sample is one call (Plan.calls_each)
BASELINES = ("nn_relu", "plain")  # a row's ratio: its time over this provider's in its case
BUSY_MARK = "shade_ops-bench-busy"  # in the spinning process's command line (busy_core)
BETA = 1e-3  # loss = cross_entropy + BETA * shade_ops.collect(model) in the step rows
# bytes moved per element, in units of the element size: penalty forward reads y, backward reads
# y and writes grad_y; ShadeReLU also writes its output and reads the output's gradient
TRAFFIC = {("penalty", "forward"): 1, ("penalty", "backward"): 2,
           ("penalty", "forward_backward"): 3, ("shade_relu", "forward"): 2,
           ("shade_relu", "backward"): 3, ("shade_relu", "forward_backward"): 5,
           ("copy", "forward"): 2}


def build_model(name: str, in_shape: tuple[int, ...], num_classes: int = 10,
                **kwargs) -> nn.Module:
    """The benchmarks' torchvision-style architectures by name (benchmarks/models.py), else the
    experiments' model builder (each imported on first use: the op suites need neither)."""
    import models

    if name in models.BUILDERS:
        return models.build(name, in_shape, num_classes, **kwargs)
    from shade_ops.experiments.models import build_model as build
    return build(name, in_shape, num_classes, **kwargs)


@dataclass(frozen=True)
class Case:
    """One thing to measure, against each of `providers`."""

    op: str                       # penalty | shade_relu | copy | step_mlp | step_resnet20
    phase: str                    # forward | backward | forward_backward | step
    layout: str                   # nchw | channels_last | nd | nld
    shape: tuple[int, ...]
    dtype: str = "float32"
    providers: tuple[str, ...] = ()
    extra: tuple = ()             # step cases: (("model", "resnet20"), ("builder", "resnet"),
    #                               ("kwargs", (("blocks", 3),))); any case: (("busy", True),)
    #                               to run it while another core spins (busy_core)

    @property
    def units(self) -> int:
        """Units of the case: the last dim for nld, else dim 1."""
        return self.shape[-1] if self.layout == "nld" else self.shape[1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def busy(self) -> bool:
        """Whether the case runs while a spinning process holds another core."""
        return bool(dict(self.extra).get("busy", False))


def shape_for(layout: str, numel: int, units: int) -> tuple[int, ...]:
    """A shape of about `numel` elements with `units` units in `layout`."""
    per_unit = max(1, numel // units)
    if layout in ("nchw", "channels_last"):
        side = next(s for s in (16, 8, 4, 2, 1) if per_unit >= s * s * 2 or s == 1)
        return (max(1, per_unit // (side * side)), units, side, side)
    if layout == "nld":
        length = 16 if per_unit >= 32 else 1
        return (max(1, per_unit // length), length, units)
    return (per_unit, units)


def fused_backends(device: str) -> list[str]:
    """shade_ops' fused backends usable on `device` (no Triton interpreter on the CPU)."""
    names = [b for b in shade_ops.available_backends(device) if b != "reference"]
    return [b for b in names if not (device == "cpu" and b == "triton")]


def make_input(case: Case, device: str, seed: int = 0) -> torch.Tensor:
    """The activations of a case, in its layout, requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    y = (torch.randn(case.shape, generator=gen, device=device) * 2 + 0.3).to(
        getattr(torch, case.dtype))
    if case.layout == "channels_last":
        y = y.contiguous(memory_format=torch.channels_last)
    return y.requires_grad_()


_COMPILED: dict = {}


def _penalty_fn(provider: str, unit_dim: int) -> Callable:
    if provider == "reference":
        return lambda y, s: reference.penalty(y, s, unit_dim=unit_dim)
    if provider == "compile":  # one compiled function; torch.compile specialises it per shape
        if unit_dim not in _COMPILED:
            _COMPILED[unit_dim] = torch.compile(
                lambda y, s: reference.penalty(y, s, unit_dim=unit_dim), fullgraph=True,
                dynamic=False)
        return _COMPILED[unit_dim]
    return lambda y, s: shade_ops.penalty(y, s, unit_dim=unit_dim, backend=provider)


def op_call(case: Case, provider: str, device: str) -> Callable[[], object]:
    """The callable timed for one provider of an op case (training mode: the state updates).
    The backward phase runs its forward once here and times autograd.grad(retain_graph=True)."""
    if case.op == "copy":
        x = make_input(case, device).detach()
        out = torch.empty_like(x)
        return lambda: out.copy_(x)
    y = make_input(case, device)
    unit_dim = -1 if case.layout == "nld" else 1
    if provider == "nn_relu":  # the baseline of either op: nn.ReLU forward+backward
        relu, grad_out = nn.ReLU(), torch.randn_like(y)
        forward, upstream = (lambda: (relu(y),)), (grad_out,)
    elif case.op == "penalty":
        fn, state = _penalty_fn(provider, unit_dim), ShadeState(case.units, device=device)
        forward, upstream = (lambda: (fn(y, state),)), None
    else:  # shade_relu
        grad_out = torch.randn_like(y)
        act = shade_ops.ShadeReLU(case.units, unit_dim=unit_dim,
                                  backend=provider).to(device).train()
        one = torch.ones((), device=device)
        forward, upstream = (lambda: (act(y), act.penalty)), (grad_out, one)
    if case.phase == "forward":
        return forward
    if case.phase == "forward_backward":
        return lambda: torch.autograd.grad(forward(), y, upstream)
    outputs = forward()
    return lambda: torch.autograd.grad(outputs, y, upstream, retain_graph=True)


def step_call(case: Case, provider: str, device: str) -> tuple[Callable, Callable]:
    """(one training step, its forward alone returning the loss) of a step case: SGD with
    momentum 0.9 on a fixed batch; with SHADE (provider = convert's backend) on every layer, the
    loss adds BETA * collect(model); provider "plain" is the model as built; a provider ending
    in RECOMPUTE runs the forward inside shade_ops.recompute_relu()."""
    extra = dict(case.extra)
    torch.manual_seed(0)  # the same weights for every provider
    model = build_model(extra["builder"], case.shape[1:], 10, **dict(extra.get("kwargs", ())))
    backend = provider.removesuffix(RECOMPUTE)
    context = shade_ops.recompute_relu if provider.endswith(RECOMPUTE) else contextlib.nullcontext
    if provider != "plain":
        shade_ops.convert(model, backend=backend)
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(case.shape, generator=gen).to(device).contiguous(memory_format=fmt)
    target = torch.randint(0, 10, (case.shape[0],), generator=gen).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def forward() -> torch.Tensor:
        with context():
            loss = nn.functional.cross_entropy(model(x), target)
            return loss + BETA * shade_ops.collect(model) if provider != "plain" else loss

    def step() -> None:
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, forward


# ---- memory ------------------------------------------------------------------------------

def cpu_memory_trace(fn: Callable[[], object]) -> tuple[int, int]:
    """(peak, net) bytes the CPU allocator holds during fn() beyond what it held before: the
    running sum, in time order, of the profiler's allocation events ("[memory]" nodes of its
    event tree, frees negative). FunctionEvent.cpu_memory_usage would not do: the profiler
    charges an allocation to the op that made it, and only unattributed frees stay "[memory]"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    allocations, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        size = getattr(node.extra_fields, "alloc_size", None)
        if size is not None and getattr(node.extra_fields, "device", None) == torch.device("cpu"):
            allocations.append((node.start_time_ns, size))
    running = peak = 0
    for _, size in sorted(allocations, key=lambda a: a[0]):
        running += size
        peak = max(peak, running)
    return peak, running


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes of one call of fn beyond what was allocated before it; None if unmeasurable."""
    try:
        if device == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        return cpu_memory_trace(fn)[0]
    except Exception:  # noqa: BLE001  (a profiler that cannot run here: no figure, not a crash)
        return None


def held_bytes(forward: Callable[[], object], device: str) -> int | None:
    """Bytes still allocated at the end of forward() (its graph, saved tensors) beyond before."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = forward()
        held = torch.cuda.memory_allocated() - before
        del loss
        return held
    holder: list = []
    try:
        return cpu_memory_trace(lambda: holder.append(forward()))[1]
    except Exception:  # noqa: BLE001
        return None
    finally:
        holder.clear()


# ---- timing ------------------------------------------------------------------------------

def quartiles(values: list[float]) -> tuple[float, float | None, float | None]:
    """(median, q1, q3); quartiles None with one sample."""
    if len(values) == 1:
        return values[0], None, None
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q2, q1, q3


def p90(values: list[float]) -> float | None:
    """The 90th percentile (inclusive, as the quartiles); None with one sample."""
    if len(values) < 2:
        return None
    return statistics.quantiles(values, n=10, method="inclusive")[8]


_SPIN = """
import os, sys
cpu = int(sys.argv[1])
if cpu >= 0:
    os.sched_setaffinity(0, {cpu})
print("spinning", flush=True)
while True:
    pass
"""


def busy_cpu() -> int:
    """The core busy_core spins on: CPU 1 where this process may use it (the second of two),
    else the last one it may use; -1 where the OS cannot pin a process (no pinning then)."""
    if not hasattr(os, "sched_getaffinity"):
        return -1
    allowed = sorted(os.sched_getaffinity(0))
    return 1 if 1 in allowed else allowed[-1]


@contextlib.contextmanager
def busy_core(cpu: int | None = None):
    """A separate Python process spinning on one core (busy_cpu() by default, pinned with
    os.sched_setaffinity) for the duration of the block, as another job on a shared machine
    would: the block starts once it spins; it is killed and reaped on the way out, errors
    included. Yields its Popen. Its command line holds BUSY_MARK and this process's pid (so a
    test can see that none is left). RuntimeError if it stopped spinning before the end."""
    cpu = busy_cpu() if cpu is None else cpu
    proc = subprocess.Popen([sys.executable, "-I", "-c", _SPIN, str(cpu), BUSY_MARK,
                             str(os.getpid())], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "spinning":
            raise RuntimeError(f"the busy process did not start (exit {proc.wait()})")
        yield proc
        if proc.poll() is not None:
            raise RuntimeError(f"the busy process ended early (exit {proc.returncode})")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_times(calls: dict[str, Callable], rounds: int, seconds: float, device: str = "cpu",
              min_sample_s: float = 2e-3, warm_below_s: float = 0.05, seed: int = 0,
              warmed: set[str] | None = None, each: int = 0) -> dict[str, list[float]]:
    """Milliseconds per call of each callable, in rounds: every round runs each provider still
    sampling once (a sample of `number` calls, enough for min_sample_s), in a shuffled order. A
    provider samples until it has `rounds` samples or has spent its share of `seconds` (an equal
    one), and has at least 3: so eager at 33M elements (2 s a call) takes 3 samples while the
    fused op and torch.compile beside it take a dozen or more, every one of them in a round
    shared with the providers still sampling.

    A call that takes less than `warm_below_s` runs once untimed before each of its samples: the
    first call after another provider finds the caches cold and the thread pool asleep (on this
    machine about 0.6 ms, and more after an allocation-heavy one), a cost that belongs to neither
    provider and would otherwise swamp a 1 ms op timed once a sample. Longer calls are timed cold:
    that cost is then a percent of theirs. The names of the providers timed warm are added to
    `warmed` when given (a row's "warm").

    With `each` > 0 a provider's turn in a round is `each` calls back to back (after the warm
    one), each timed alone: a sample is one call, a round gives `each` of them, and `rounds`
    counts rounds. Percentiles over such samples describe single calls (a call that waits for a
    core shows), where a sample of many calls averages the waits away.
    """
    numbers, warm = {}, set() if warmed is None else warmed
    for name, call in calls.items():
        call()  # warm: compiled, allocated
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        one = time.perf_counter() - start
        numbers[name] = each or max(1, min(1000, int(min_sample_s / max(one, 1e-7))))
        if one < warm_below_s:
            warm.add(name)
    times: dict[str, list[float]] = {name: [] for name in calls}
    done, spent = dict.fromkeys(calls, 0), dict.fromkeys(calls, 0.0)
    share, rng = seconds / max(1, len(calls)), random.Random(seed)
    while True:
        order = [name for name in calls
                 if done[name] < 3 or (done[name] < rounds and spent[name] < share)]
        if not order:
            return times
        rng.shuffle(order)
        for name in order:
            began = time.perf_counter()
            if name in warm:
                calls[name]()
            _sync(device)
            if each:
                for _ in range(each):
                    start = time.perf_counter()
                    calls[name]()
                    _sync(device)
                    times[name].append((time.perf_counter() - start) * 1e3)
                end = time.perf_counter()
            else:
                start = time.perf_counter()
                for _ in range(numbers[name]):
                    calls[name]()
                _sync(device)
                end = time.perf_counter()
                times[name].append((end - start) * 1e3 / numbers[name])
            done[name] += 1
            spent[name] += end - began


def cuda_times(make: Callable[[], Callable], rep_ms: float) -> tuple[list[float], float | None]:
    """([q1, median, q3] ms from triton.testing.do_bench of make()'s callable, median ms of a
    CUDA-graph replay of another one, or None where it cannot be captured). The graph's callable
    is made on the capturing stream, since a backward runs on the stream of its forward."""
    import triton.testing

    call = make()
    for _ in range(2):  # compiled, tuned, allocated: do_bench sizes its loop on its first call
        call()
    torch.cuda.synchronize()
    q = triton.testing.do_bench(call, warmup=max(5, int(rep_ms / 4)), rep=int(rep_ms),
                                quantiles=[0.25, 0.5, 0.75])
    stream = torch.cuda.Stream()
    try:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            captured = make()
            captured()
            captured()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured()
        torch.cuda.current_stream().wait_stream(stream)
        graph_ms = triton.testing.do_bench(graph.replay, warmup=max(5, int(rep_ms / 4)),
                                           rep=int(rep_ms), return_mode="median")
    except Exception:  # noqa: BLE001  (a provider whose call cannot be captured)
        torch.cuda.current_stream().wait_stream(stream)
        graph_ms = None
    return list(q), graph_ms


# ---- rows --------------------------------------------------------------------------------

def make_row(case: Case, provider: str, times_ms: list[float], timer: str,
             peak: int | None, copy_gbps: float | None, warm: bool | None = None) -> dict:
    """One row of the results format (``warm``: timed warm by cpu_times; None on CUDA). Its
    baseline, ratio and ratio_p90 are None here: run_case fills them from the case's rows."""
    median, q1, q3 = quartiles(times_ms)
    traffic = TRAFFIC.get((case.op, case.phase))
    moved = None if traffic is None else traffic * case.numel * \
        torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    gbps = None if moved is None or median <= 0 else moved / (median * 1e-3) / 1e9
    row = dict(suite="step" if case.phase == "step" else "op", op=case.op, phase=case.phase,
               provider=provider, layout=case.layout, shape=list(case.shape), units=case.units,
               numel=case.numel, dtype=case.dtype, time_ms=median, time_ms_q1=q1, time_ms_q3=q3,
               time_ms_p90=p90(times_ms), samples=len(times_ms), timer=timer, peak_bytes=peak,
               bytes_moved=moved, gbps=gbps,
               roofline=gbps / copy_gbps if gbps and copy_gbps else None, warm=warm,
               busy=case.busy, baseline=None, ratio=None, ratio_p90=None)
    if case.phase == "step":
        extra = dict(case.extra)
        row.update(model=extra["model"], batch=case.shape[0],
                   memory_format="channels_last" if case.layout == "channels_last"
                   else "contiguous")
    return row


def add_ratios(rows: list[dict]) -> None:
    """Each row's time over that of the case's baseline (BASELINES: nn_relu for the ops, plain
    for the steps) with the same timer: the medians' ratio and the p90s'."""
    for row in rows:
        base = next((r for r in rows if r["provider"] in BASELINES and r["timer"] == row["timer"]),
                    None)
        if base is None:
            continue
        row["baseline"] = base["provider"]
        row["ratio"] = row["time_ms"] / base["time_ms"] if base["time_ms"] else None
        mine, theirs = row["time_ms_p90"], base["time_ms_p90"]
        row["ratio_p90"] = mine / theirs if mine is not None and theirs else None


def run_case(case: Case, device: str, rounds: int, seconds: float,
             copy_gbps: float | None = None, rep_ms: float = 40.0, each: int = 0) -> list[dict]:
    """The rows of one case, every provider measured side by side (CPU, each > 0: every call
    timed alone, `each` of them a round; see cpu_times), while another core spins if the case
    is busy."""
    calls, forwards = {}, {}
    for provider in case.providers:
        if case.phase == "step":
            calls[provider], forwards[provider] = step_call(case, provider, device)
        else:
            calls[provider] = op_call(case, provider, device)
    with busy_core() if case.busy else contextlib.nullcontext():
        rows = _time_case(case, calls, device, rounds, seconds, copy_gbps, rep_ms, each)
    add_ratios(rows)
    if case.phase == "step":
        held = {p: held_bytes(f, device) for p, f in forwards.items()}
        for row in rows:
            base, mine = held.get("plain"), held.get(row["provider"])
            row["held_bytes"] = None if base is None or mine is None else mine - base
    return rows


def _time_case(case: Case, calls: dict[str, Callable], device: str, rounds: int, seconds: float,
               copy_gbps: float | None, rep_ms: float, each: int) -> list[dict]:
    rows = []
    if device == "cuda":
        for provider, call in calls.items():
            fresh = (lambda p=provider: step_call(case, p, device)[0]) if case.phase == "step" \
                else (lambda p=provider: op_call(case, p, device))
            made = iter([call])  # do_bench times this one; the graph captures a fresh one
            q, graph = cuda_times(lambda: next(made, None) or fresh(), rep_ms)
            peak = peak_bytes(call, device)
            row = make_row(case, provider, [q[1]], "cuda-do_bench", peak, copy_gbps)
            row.update(time_ms_q1=q[0], time_ms_q3=q[2])
            rows.append(row)
            if graph is not None:
                rows.append(make_row(case, provider, [graph], "cuda-graph", peak, copy_gbps))
    else:
        warmed: set[str] = set()
        times = cpu_times(calls, rounds, seconds, device, warmed=warmed, each=each)
        for provider, call in calls.items():
            rows.append(make_row(case, provider, times[provider],
                                 PER_CALL_TIMER if each else "cpu-perf_counter",
                                 peak_bytes(call, device), copy_gbps, provider in warmed))
    return rows


def copy_bandwidth(device: str, numel: int, rounds: int = 10) -> tuple[float, dict]:
    """(GB/s of out.copy_(x), bytes read + written, float32 x of `numel`; its row)."""
    case = Case("copy", "forward", "nd", (numel // 64, 64), "float32", ("copy",))
    call = op_call(case, "copy", device)
    warmed: set[str] = set()
    if device == "cuda":
        q, graph = cuda_times(lambda: call, 40.0)
        times, timer, warm = [min(t for t in (q[1], graph) if t)], "cuda-do_bench", None
    else:
        times = cpu_times({"copy": call}, rounds, 5.0, device, warmed=warmed)["copy"]
        timer, warm = "cpu-perf_counter", "copy" in warmed
    row = make_row(case, "copy", times, timer, peak_bytes(call, device), None, warm)
    row["roofline"] = 1.0
    return row["gbps"], row


# ---- the run -----------------------------------------------------------------------------

def machine_info(device: str) -> dict:
    """The results format's "machine"."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f
                            if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    capability = getattr(getattr(shade_ops, "_C", None), "CPU_CAPABILITY", None) or \
        torch.backends.cpu.get_cpu_capability()
    return dict(device=device, name=f"{name} ({os.cpu_count()} cores, {capability})"
                if device == "cpu" else name, cpu_capability=str(capability).lower(),
                threads=torch.get_num_threads(),
                hostname_hash=hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12])


def versions() -> dict:
    """The results format's "versions"."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        git = None
    return dict(python=platform.python_version(), torch=torch.__version__,
                triton=triton_version, shade_ops=getattr(shade_ops, "__version__", None), git=git)


@dataclass
class Plan:
    """A suite: its cases, with the rounds and seconds each may take."""

    cases: list[Case]
    rounds: int = 15
    seconds_per_case: float = 4.0
    step_rounds: int = 10
    copy_numel: int = 1 << 24
    calls_each: int = 0  # > 0: op cases time every call alone, this many a round (cpu_times)


def run_plan(plan: Plan, device: str, command: str, budget_s: float,
             on_progress: Callable[[dict], None] | None = None) -> dict:
    """Measures the copy bandwidth, then every case of the plan while the budget lasts (cases
    that would start past it are listed under "skipped", cases that fail under "errors");
    returns the results document. on_progress gets the document after each case (incremental
    saves)."""
    start = time.monotonic()
    onednn = torch.backends.mkldnn.enabled
    copy_gbps, copy_row = copy_bandwidth(device, plan.copy_numel)
    doc = dict(schema=SCHEMA, date=datetime.datetime.now(datetime.timezone.utc)
               .strftime("%Y-%m-%dT%H:%M:%SZ"), machine=machine_info(device), versions=versions(),
               command=command, copy_gbps=copy_gbps, rows=[copy_row], skipped=[], errors=[])
    try:
        for index, case in enumerate(plan.cases):
            left = budget_s - (time.monotonic() - start)
            label = f"{case.op} {case.phase} {case.layout} {'x'.join(map(str, case.shape))} " \
                f"{case.dtype}" + (" busy" if case.busy else "")
            if left < 2.0:
                doc["skipped"].append(f"{label}: time budget")
                continue
            is_step = case.phase == "step"
            # oneDNN's jit_1x1 backward_weights writes past its scratchpad for a strided 1x1 conv
            # on an NHWC input with few channels (oneDNN issue #6035): ATen's convs (much slower)
            # for channels_last steps on the CPU
            torch.backends.mkldnn.enabled = onednn and not (
                is_step and device == "cpu" and case.layout == "channels_last")
            share = left / max(1, len(plan.cases) - index)
            began = time.monotonic()
            try:
                doc["rows"] += run_case(case, device, plan.step_rounds if is_step else plan.rounds,
                                        min(share, plan.seconds_per_case * (3 if is_step else 1)),
                                        copy_gbps, each=0 if is_step else plan.calls_each)
            except Exception as error:  # noqa: BLE001  (report it, measure the other cases)
                doc["errors"].append(f"{label}: {type(error).__name__}: {error!s:.300}")
            print(f"{label}: {time.monotonic() - began:.1f} s", flush=True)
            if index + 1 < len(plan.cases) and plan.cases[index + 1].shape != case.shape:
                torch._dynamo.reset()  # compiled code of one shape at a time
            if on_progress is not None:
                on_progress(doc)
    finally:
        torch.backends.mkldnn.enabled = onednn
    doc["seconds"] = round(time.monotonic() - start, 1)
    return doc
