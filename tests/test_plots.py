"""benchmarks/plots.py, the figures and summary of the benchmark results files, on synthetic
results generated here (no measurements)."""
from __future__ import annotations

import importlib.util
import json
import os
import struct

import pytest

pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = [4096, 16384, 65536, 262144, 1048576, 4194304, 16777216]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plots():
    spec = importlib.util.spec_from_file_location(
        "plots", os.path.join(ROOT, "benchmarks", "plots.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(provider: str, numel: int, time_ms: float, layout: str = "nchw",
         dtype: str = "float32", op: str = "penalty", phase: str = "forward_backward",
         peak: int | None = None, copy_gbps: float = 10.0) -> dict:
    units = 64 if layout in ("nchw", "channels_last") else 256
    itemsize = 2 if dtype == "bfloat16" else 4
    moved = 3 * numel * itemsize
    gbps = moved / (time_ms * 1e-3) / 1e9
    return {"suite": "op", "op": op, "phase": phase, "provider": provider, "layout": layout,
            "shape": [numel // (units * 16), units, 4, 4] if layout != "nld"
            else [numel // (units * 8), 8, units], "units": units, "numel": numel,
            "dtype": dtype, "time_ms": time_ms, "time_ms_q1": 0.95 * time_ms,
            "time_ms_q3": 1.05 * time_ms, "samples": 25, "timer": "cpu-perf_counter",
            "peak_bytes": peak, "bytes_moved": moved, "gbps": gbps,
            "roofline": gbps / copy_gbps}


def synthetic(device: str = "cpu", name: str = "Synthetic CPU", eager_speedup: float = 20.0,
              compile_speedup: float = 4.0, exponent: float = 1.0, fixed_ms: float = 0.02,
              sizes: list[int] = SIZES, layouts=(("nchw", "float32"), ("channels_last", "float32"),
                                                 ("nchw", "bfloat16"), ("nld", "float32")),
              steps: bool = True) -> dict:
    """A results dict in the schema: the fused time is fixed_ms + c * numel ** exponent, the
    baselines a constant multiple of it (so the speed-ups are the given ones at every size)."""
    fused = "cpu" if device == "cpu" else "triton"
    rows = []
    for layout, dtype in layouts:
        for n in sizes:
            t = fixed_ms + 1e-6 * n ** exponent
            itemsize = 2 if dtype == "bfloat16" else 4
            rows.append(_row(fused, n, t, layout, dtype, peak=n * itemsize))
            rows.append(_row("reference", n, t * eager_speedup, layout, dtype,
                             peak=6 * n * itemsize))
            rows.append(_row("compile", n, t * compile_speedup, layout, dtype,
                             peak=2 * n * itemsize))
    for n in sizes:
        rows.append(_row("copy", n, 0.005 + 0.8e-6 * n, op="copy", phase="forward"))
        rows.append(_row(fused, n, 0.01 + 0.5e-6 * n, op="shade_relu", phase="forward_backward"))
        rows.append(_row("nn_relu", n, 0.008 + 0.4e-6 * n, op="shade_relu",
                         phase="forward_backward"))
    if steps:
        for model, plain_ms in (("mlp", 2.0), ("resnet20", 40.0)):
            for provider, factor in (("plain", 1.0), (fused, 1.05), ("reference", 1.4)):
                rows.append({"suite": "step", "op": f"step_{model}", "phase": "step",
                             "provider": provider, "layout": "nchw", "dtype": "float32",
                             "model": model, "batch": 128, "memory_format": "contiguous",
                             "time_ms": plain_ms * factor, "time_ms_q1": None,
                             "time_ms_q3": None, "samples": 10, "timer": "cpu-perf_counter",
                             "peak_bytes": None, "bytes_moved": None, "gbps": None,
                             "roofline": None,
                             "held_bytes": None if provider == "plain" else
                             int(plain_ms * factor * 1e5)})
    return {"schema": 1, "date": "2026-11-29T06:12:00Z",
            "machine": {"device": device, "name": name, "cpu_capability": "avx2", "threads": 2,
                        "hostname_hash": "synthetic"},
            "versions": {"python": "3.11", "torch": "synthetic", "triton": None,
                         "shade_ops": "0.1.0", "git": "synthetic"},
            "command": "tests/test_plots.py synthetic", "copy_gbps": 10.0, "rows": rows}


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 300 <= width <= 2500 and 200 <= height <= 3000, (path, width, height)
    assert len(data) > 10_000, (path, len(data))


def test_cli_draws_every_figure_and_writes_the_summary(tmp_path, capsys):
    plots = _plots()
    cpu, gpu = tmp_path / "cpu.json", tmp_path / "gpu.json"
    # three layouts: a main panel and a 2x2 grid of small multiples
    cpu.write_text(json.dumps(synthetic(layouts=(("nchw", "float32"), ("nchw", "bfloat16"),
                                                 ("nld", "float32")))))
    # report.py's phase spelling, and a file without steps or peak memory
    gpu_data = synthetic("cuda", "Synthetic GPU", steps=False, layouts=(("nchw", "float32"),))
    for row in gpu_data["rows"]:
        row["phase"] = row["phase"].replace("forward_backward", "forward+backward")
        row["peak_bytes"] = None
    gpu.write_text(json.dumps(gpu_data))
    out = tmp_path / "out"
    assert plots.main([str(cpu), str(gpu), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "summary.md").read_text() == printed
    assert "Synthetic CPU [cpu]" in printed and "Synthetic GPU [cuda]" in printed
    names = ("time_vs_numel.png", "speedup.png", "memory.png", "step_overhead.png",
             "roofline.png")
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "summary.md"])
    for name in names:
        _assert_png(out / name)


def test_summary_flags_missed_and_met_goals():
    plots = _plots()
    fast = synthetic(name="Fast", eager_speedup=25.0, compile_speedup=3.0)
    slow = synthetic(name="Slow", eager_speedup=25.0, compile_speedup=3.0)
    # one layout misses 10x over eager at one size >= 1M: the minimum over layouts shows it
    for row in slow["rows"]:
        if (row["provider"] == "reference" and row["layout"] == "channels_last"
                and row["op"] == "penalty" and row["numel"] == 4194304):
            row["time_ms"] /= 5.0       # 25x -> 5x
    table = {(line["numel"]): line for line in plots.goal_table(slow)}
    assert set(table) == {1048576, 4194304, 16777216}        # only sizes >= 1M
    assert table[4194304]["reference"] == pytest.approx(5.0)
    assert table[4194304]["reference_meets"] is False
    assert "channels_last" in table[4194304]["reference_at"]
    assert table[1048576]["reference_meets"] is True
    assert all(line["compile_meets"] for line in table.values())

    text = plots.summary([fast, slow])
    fast_part, slow_part = text.split("## Slow")
    assert "MISSES" not in fast_part
    assert "25.00x (meets 10x)" in fast_part and "3.00x (meets 2x)" in fast_part
    assert "5.00x (MISSES 10x)" in slow_part
    assert "10x over eager: MISSES (2/3 sizes)" in slow_part
    assert "2x over compile: meets (3/3 sizes)" in slow_part
    # peak memory, fused vs eager (synthetic: 1/6)
    assert "0.17" in fast_part


@pytest.mark.parametrize("exponent", [1.0, 0.8, 1.3])
def test_fit_exponent_recovers_power_law(exponent):
    plots = _plots()
    sizes = [2 ** k for k in range(10, 26)]
    times = [3e-6 * n ** exponent for n in sizes]
    assert plots.fit_exponent(sizes, times) == pytest.approx(exponent, abs=1e-9)
    assert plots.fit_exponent(sizes[:1], times[:1]) is None


def test_exponent_above_1m_ignores_the_fixed_cost_below():
    plots = _plots()
    sizes = [2 ** k for k in range(10, 26)]
    with_fixed = [0.5 + 1e-6 * n for n in sizes]
    assert plots.fit_exponent(sizes, with_fixed) < 0.8           # all sizes: bent by the 0.5 ms
    assert plots.fit_exponent(sizes, with_fixed, 4_000_000) == pytest.approx(1.0, abs=0.05)
    data = synthetic(exponent=1.0, fixed_ms=0.0, layouts=(("nchw", "float32"),))
    exps = plots.exponents(data)
    assert exps[("cpu", "nchw", "float32")] == pytest.approx(1.0, abs=1e-6)
    assert "- fused (cpu): float32 nchw 1.00" in plots.summary([data])


def test_knee_is_where_fixed_costs_stop_dominating():
    plots = _plots()
    sizes = [2 ** k for k in range(10, 26, 2)]
    # time per element = 1e-6 + 1.0 / n: falls fast while the fixed 1 ms dominates
    times = [1.0 + 1e-6 * n for n in sizes]
    k = plots.knee(sizes, times)
    assert k is not None and 2 ** 19 <= k <= 2 ** 22
    assert plots.knee(sizes, [1e-6 * n for n in sizes]) == sizes[0]   # linear from the start
    assert plots.knee([1000], [1.0]) is None


def test_quick_suite_only_and_missing_fields(tmp_path, capsys):
    plots = _plots()
    quick = synthetic(name="Quick", sizes=[4096, 65536], layouts=(("nchw", "float32"),),
                      steps=False)
    for row in quick["rows"]:
        for field in ("peak_bytes", "gbps", "time_ms_q1", "time_ms_q3"):
            row.pop(field, None)
    quick["rows"] = [r for r in quick["rows"] if r["provider"] != "compile"]
    # rows missing the fields that key them
    broken = [dict(quick["rows"][0]) for _ in range(4)]
    broken[0]["provider"] = None
    del broken[1]["numel"]
    broken[2]["time_ms"] = None
    del broken[3]["layout"], broken[3]["shape"]
    quick["rows"] += broken
    written = plots.draw_all([quick], tmp_path)
    assert {p.name for p in written} == {"time_vs_numel.png", "speedup.png"}
    notes = capsys.readouterr().err
    assert "failed" not in notes
    assert "memory.png skipped" in notes and "step_overhead.png skipped" in notes
    assert "roofline.png skipped" in notes
    text = plots.summary([quick])
    assert "No fused penalty forward+backward rows at >= 1M elements" in text

    # nothing at all: no figures, a summary that says so
    empty = {"schema": 1, "machine": {"device": "cpu", "name": "Empty"}}
    assert plots.draw_all([empty], tmp_path / "empty") == []
    assert "No penalty forward+backward rows" in plots.summary([empty])
