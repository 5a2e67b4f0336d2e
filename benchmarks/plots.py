"""Draw the benchmark figures and a markdown summary from one or more results JSON files.

    python benchmarks/plots.py RESULTS.json [MORE.json ...] --out-dir DIR

Each file is one machine, in the results format of the benchmark harness (schema 1: a header
with ``machine``, ``versions``, ``copy_gbps`` and a list of ``rows``, each one measurement with
``suite``, ``op``, ``phase``, ``provider``, ``layout``, ``dtype``, ``numel``, ``time_ms`` and,
where measured, ``peak_bytes``, ``gbps``, ``held_bytes``); CPU and GPU files are drawn side by
side, every panel titled with the machine's name and device. Writes into DIR:

* ``time_vs_numel.png``: penalty forward+backward time against the number of elements per
  provider, log-log, with a dashed slope-1 reference and the knee of the fused kernel (where its
  time per element stops falling by more than 20%); float32 NCHW is the main panel, the other
  layouts / dtypes are small multiples;
* ``speedup.png``: fused / eager and fused / compile speed-ups across the sweep per layout and
  dtype, with the 10x and 2x goals and a line at 1M elements;
* ``memory.png``: peak memory per provider across the sweep (forward+backward);
* ``step_overhead.png``: training-step time with SHADE over the plain step per model and
  provider (% bars with absolute ms), and the memory held at the end of forward if measured;
* ``roofline.png``: achieved GB/s per row against the number of elements, with the copy
  bandwidth of the same run (only when rows carry ``gbps``);
* ``summary.md``: the speed-ups at each size >= 1M elements (the minimum over layouts, dtypes and
  unit counts) against the goals, the growth exponent of time above 1M elements, and fused vs
  eager peak memory. The summary is also printed.

A figure whose data is missing is skipped with a printed note. The functions are importable:
``load(paths)``, ``summary(results)``, ``draw_all(results, out_dir)``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

FUSED_PROVIDERS = ("cpu", "triton")     # shade_ops' own backends
EAGER = "reference"
COMPILE = "compile"
SPEEDUP_GOALS = {EAGER: 10.0, COMPILE: 2.0}   # fused must be this many times faster
BIG = 1_000_000                         # the goals apply from this many elements on
KNEE_DROP = 0.2                         # knee: time per element stops falling by more than this
MAIN_COMBO = ("nchw", "float32")
DPI = 110
COLORS = {"cpu": "C0", "triton": "C3", "reference": "C1", "compile": "C2", "nn_relu": "C4",
          "plain": "0.5", "cpu+recompute_relu": "C9", "triton+recompute_relu": "C6"}
MARKERS = {"cpu": "o", "triton": "D", "reference": "s", "compile": "^", "nn_relu": "v",
           "plain": "x"}
PROVIDER_NAMES = {"cpu": "fused (cpu)", "triton": "fused (triton)", "reference": "eager",
                  "compile": "torch.compile", "nn_relu": "nn.ReLU", "plain": "plain",
                  "cpu+recompute_relu": "fused (cpu), recompute_relu",
                  "triton+recompute_relu": "fused (triton), recompute_relu"}

Result = dict[str, Any]
Row = dict[str, Any]


# ----------------------------------------------------------------------------------- loading ---

def load(paths: Iterable[str | Path]) -> list[Result]:
    """Read results files; each becomes a dict with its ``rows`` (a list, possibly empty) and the
    file it came from under ``"_path"``. Phases written ``forward+backward`` are normalised to
    ``forward_backward``."""
    results = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with 'rows', "
                             f"got {type(data).__name__}")
        data = normalise(data)
        data["_path"] = str(path)
        results.append(data)
    return results


def normalise(result: Result) -> Result:
    """A copy of one result with defaults filled in: ``rows`` a list of dicts, the phase name
    ``forward_backward``, ``machine`` a dict."""
    result = dict(result)
    result["machine"] = dict(result.get("machine") or {})
    rows = []
    for row in result.get("rows") or []:
        if not isinstance(row, dict):
            continue
        row = dict(row)
        if row.get("phase") == "forward+backward":
            row["phase"] = "forward_backward"
        rows.append(row)
    result["rows"] = rows
    return result


def label(result: Result) -> str:
    """The series / panel name of one file: machine name and device."""
    machine = result.get("machine") or {}
    name = machine.get("name") or Path(result.get("_path", "?")).stem
    device = machine.get("device")
    return f"{name} [{device}]" if device else str(name)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def select(result: Result, **match: Any) -> list[Row]:
    """The rows of a result whose fields equal ``match`` (a tuple value matches any of its
    members)."""
    out = []
    for row in result.get("rows", []):
        ok = True
        for key, want in match.items():
            got = row.get(key)
            if isinstance(want, tuple):
                ok = got in want
            else:
                ok = got == want
            if not ok:
                break
        if ok:
            out.append(row)
    return out


def penalty_rows(result: Result) -> list[Row]:
    """Penalty forward+backward rows with a time and an element count."""
    return [r for r in select(result, suite="op", op="penalty", phase="forward_backward")
            if _number(r.get("time_ms")) is not None and _number(r.get("numel"))]


def combo(row: Row) -> tuple[str, str]:
    """(layout, dtype) of a row."""
    return (str(row.get("layout") or "?"), str(row.get("dtype") or "?"))


def combos(rows: Sequence[Row]) -> list[tuple[str, str]]:
    """The (layout, dtype) pairs present, float32 NCHW (else the most frequent) first."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for row in rows:
        counts[combo(row)] += 1
    order = sorted(counts, key=lambda c: (c != MAIN_COMBO, -counts[c], c))
    return order


def fused_providers(rows: Sequence[Row]) -> list[str]:
    """The fused providers (cpu / triton) present in rows."""
    present = {r.get("provider") for r in rows}
    return [p for p in FUSED_PROVIDERS if p in present]


def series(rows: Sequence[Row], provider: str, field: str = "time_ms"
           ) -> tuple[np.ndarray, np.ndarray]:
    """(numel, value) of one provider sorted by numel; several rows of one numel (other unit
    counts or shapes) give their median. Rows without the field are left out."""
    by_numel: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        if row.get("provider") != provider:
            continue
        value, numel = _number(row.get(field)), _number(row.get("numel"))
        if value is None or not numel:
            continue
        by_numel[int(numel)].append(value)
    numels = sorted(by_numel)
    return (np.array(numels, dtype=float),
            np.array([statistics.median(by_numel[n]) for n in numels], dtype=float))


# ------------------------------------------------------------------------------------ analysis ---

def fit_exponent(numels: Sequence[float], times: Sequence[float],
                 min_numel: float = 0.0) -> float | None:
    """Slope of log(time) against log(numel) over the points with numel >= min_numel (least
    squares); None with fewer than two distinct sizes."""
    pts = [(n, t) for n, t in zip(numels, times) if n >= min_numel and n > 0 and t > 0]
    if len({n for n, _ in pts}) < 2:
        return None
    x = np.log([n for n, _ in pts])
    y = np.log([t for _, t in pts])
    return float(np.polyfit(x, y, 1)[0])


def knee(numels: Sequence[float], times: Sequence[float], drop: float = KNEE_DROP
         ) -> float | None:
    """The first size from which the time per element stops falling by more than ``drop`` (the
    next size's time per element is above (1 - drop) of this one's): below it fixed costs
    dominate. None with fewer than two sizes or when it falls all the way."""
    pts = sorted((n, t) for n, t in zip(numels, times) if n > 0 and t > 0)
    if len(pts) < 2:
        return None
    per = [t / n for n, t in pts]
    for i in range(len(pts) - 1):
        if per[i + 1] > (1.0 - drop) * per[i]:
            return float(pts[i][0])
    return None


def _group(rows: Sequence[Row]) -> dict[tuple, dict[str, Row]]:
    """Rows keyed by (layout, dtype, shape, units, numel) then provider (the last one wins)."""
    groups: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        shape = tuple(row.get("shape") or ())
        key = (*combo(row), shape, row.get("units"), int(row["numel"]))
        groups[key][row.get("provider")] = row
    return groups


def speedups(result: Result) -> list[dict[str, Any]]:
    """One entry per measured penalty forward+backward configuration and fused provider: layout,
    dtype, shape, units, numel, fused provider, its time and the speed-up over eager and compile
    (baseline time / fused time; None where the baseline is missing), and the peak bytes of
    fused and eager."""
    out = []
    for (layout, dtype, shape, units, numel), by_prov in _group(penalty_rows(result)).items():
        for fused in FUSED_PROVIDERS:
            if fused not in by_prov:
                continue
            t_fused = _number(by_prov[fused].get("time_ms"))
            entry: dict[str, Any] = {"layout": layout, "dtype": dtype, "shape": shape,
                                     "units": units, "numel": numel, "fused": fused,
                                     "time_ms": t_fused}
            for base in (EAGER, COMPILE):
                t_base = _number(by_prov.get(base, {}).get("time_ms"))
                entry[base] = t_base / t_fused if t_base and t_fused else None
            entry["peak_fused"] = _number(by_prov[fused].get("peak_bytes"))
            entry["peak_eager"] = _number(by_prov.get(EAGER, {}).get("peak_bytes"))
            out.append(entry)
    return sorted(out, key=lambda e: (e["fused"], e["numel"], e["layout"], e["dtype"]))


def goal_table(result: Result, min_numel: int = BIG) -> list[dict[str, Any]]:
    """Per fused provider and size >= min_numel: the minimum speed-up over eager and over compile
    across layouts / dtypes / unit counts (with the configuration that gave it), whether each
    meets its goal, and the fused and eager peak bytes of the configuration with the largest
    fused / eager ratio."""
    by_size: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for entry in speedups(result):
        if entry["numel"] >= min_numel:
            by_size[(entry["fused"], entry["numel"])].append(entry)
    table = []
    for (fused, numel), entries in sorted(by_size.items()):
        line: dict[str, Any] = {"fused": fused, "numel": numel}
        for base, goal in SPEEDUP_GOALS.items():
            have = [e for e in entries if e[base] is not None]
            if have:
                worst = min(have, key=lambda e: e[base])
                line[base] = worst[base]
                line[f"{base}_at"] = f"{worst['layout']} {worst['dtype']} u={worst['units']}"
                line[f"{base}_meets"] = worst[base] >= goal
            else:
                line[base] = None
                line[f"{base}_at"] = ""
                line[f"{base}_meets"] = None
        mem = [e for e in entries if e["peak_fused"] is not None and e["peak_eager"]]
        if mem:
            worst = max(mem, key=lambda e: e["peak_fused"] / e["peak_eager"])
            line["peak_fused"], line["peak_eager"] = worst["peak_fused"], worst["peak_eager"]
        else:
            one = next((e for e in entries if e["peak_fused"] is not None), None)
            line["peak_fused"] = one["peak_fused"] if one else None
            line["peak_eager"] = None
        table.append(line)
    return table


def exponents(result: Result, min_numel: int = BIG) -> dict[tuple[str, str, str], float]:
    """Growth exponent of the penalty forward+backward time above min_numel elements, per
    (provider, layout, dtype) with at least two sizes there."""
    rows = penalty_rows(result)
    out = {}
    for c in combos(rows):
        sub = [r for r in rows if combo(r) == c]
        for provider in sorted({str(r.get("provider")) for r in sub}):
            n, t = series(sub, provider)
            slope = fit_exponent(n, t, min_numel)
            if slope is not None:
                out[(provider, *c)] = slope
    return out


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def _fmt_numel(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _verdict(ratio: float | None, meets: bool | None, goal: float) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x ({'meets' if meets else 'MISSES'} {goal:g}x)"


def summary(results: Sequence[Result]) -> str:
    """Markdown: per file, the fused penalty forward+backward speed-up over eager and compile at
    each size >= 1M elements (minimum over layouts / dtypes / units, marked ``meets`` or
    ``MISSES`` against the 10x / 2x goals), the growth exponents above 1M elements, and fused vs
    eager peak memory."""
    lines = ["# shade_ops benchmark summary", ""]
    for i, raw in enumerate(results):
        result = normalise(raw) | {"_path": raw.get("_path", f"results{i}")}
        versions = result.get("versions") or {}
        lines.append(f"## {label(result)}")
        lines.append("")
        meta = [f"file `{Path(result.get('_path', '?')).name}`"]
        if result.get("date"):
            meta.append(f"run {result['date']}")
        if versions.get("git"):
            meta.append(f"git {versions['git']}")
        if versions.get("torch"):
            meta.append(f"torch {versions['torch']}")
        if versions.get("triton"):
            meta.append(f"triton {versions['triton']}")
        if _number(result.get("copy_gbps")):
            meta.append(f"copy {result['copy_gbps']:.3g} GB/s")
        lines.append("; ".join(meta) + ".")
        lines.append("")
        table = goal_table(result)
        if not penalty_rows(result):
            lines.append("No penalty forward+backward rows.")
        elif not table:
            lines.append(f"No fused penalty forward+backward rows at >= {_fmt_numel(BIG)} "
                         "elements (a quick-suite run?).")
        else:
            lines.append("Penalty forward+backward, fused speed-up (baseline time / fused time; "
                         "the minimum over layouts, dtypes and unit counts) and peak memory "
                         "(of the configuration with the largest fused / eager ratio):")
            lines.append("")
            lines.append("| fused | numel | vs eager | worst at | vs compile | worst at | "
                         "peak fused | peak eager | fused / eager |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for line in table:
                ratio = (f"{line['peak_fused'] / line['peak_eager']:.2f}"
                         if line["peak_fused"] is not None and line["peak_eager"] else "-")
                lines.append(
                    f"| {line['fused']} | {_fmt_numel(line['numel'])} "
                    f"| {_verdict(line[EAGER], line[f'{EAGER}_meets'], SPEEDUP_GOALS[EAGER])} "
                    f"| {line[f'{EAGER}_at']} "
                    f"| {_verdict(line[COMPILE], line[f'{COMPILE}_meets'], SPEEDUP_GOALS[COMPILE])}"
                    " "
                    f"| {line[f'{COMPILE}_at']} "
                    f"| {_fmt_bytes(line['peak_fused'])} | {_fmt_bytes(line['peak_eager'])} "
                    f"| {ratio} |")
            lines.append("")
            verdicts = []
            for base, goal in SPEEDUP_GOALS.items():
                flags = [line[f"{base}_meets"] for line in table
                         if line[f"{base}_meets"] is not None]
                if flags:
                    name = "eager" if base == EAGER else "compile"
                    verdicts.append(f"{goal:g}x over {name}: "
                                    f"{'meets' if all(flags) else 'MISSES'} "
                                    f"({sum(flags)}/{len(flags)} sizes)")
            if verdicts:
                lines.append("Goals: " + "; ".join(verdicts) + ".")
                lines.append("")
        exps = exponents(result)
        if exps:
            lines.append(f"Growth exponent of time vs numel above {_fmt_numel(BIG)} elements "
                         "(slope of log time on log numel; 1.0 = linear):")
            lines.append("")
            for provider in _provider_order(p for p, _, _ in exps):
                mine = [(c, e) for (p, *c), e in exps.items() if p == provider]
                mine.sort(key=lambda ce: (tuple(ce[0]) != MAIN_COMBO, ce[0]))
                lines.append(f"- {PROVIDER_NAMES.get(provider, provider)}: " + ", ".join(
                    f"{dt} {lay} {e:.2f}" for (lay, dt), e in mine))
            lines.append("")
        steps = step_table(result)
        if steps:
            lines.append("Training step with SHADE over the plain step: " + ", ".join(
                f"{s['model']} {PROVIDER_NAMES.get(s['provider'], s['provider'])} "
                f"{s['overhead_pct']:+.1f}% ({s['time_ms']:.3g} vs {s['plain_ms']:.3g} ms)"
                for s in steps) + ".")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def step_table(result: Result) -> list[dict[str, Any]]:
    """Per step configuration (model, batch, memory format) and SHADE provider: its time, the
    plain step's, the % overhead and held_bytes (None when absent)."""
    groups: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in select(result, suite="step"):
        if _number(row.get("time_ms")) is None:
            continue
        model = row.get("model") or str(row.get("op", "?")).replace("step_", "")
        key = (str(model), row.get("batch"), row.get("memory_format"), row.get("dtype"))
        groups[key][str(row.get("provider"))] = row
    out = []
    for (model, batch, fmt, dtype), by_prov in groups.items():
        plain = by_prov.get("plain")
        if plain is None:
            continue
        t_plain = float(plain["time_ms"])
        for provider, row in by_prov.items():
            if provider == "plain":
                continue
            t = float(row["time_ms"])
            out.append({"model": model, "batch": batch, "memory_format": fmt, "dtype": dtype,
                        "provider": provider, "time_ms": t, "plain_ms": t_plain,
                        "overhead_pct": 100.0 * (t - t_plain) / t_plain if t_plain else math.nan,
                        "held_bytes": _number(row.get("held_bytes"))})
    order = {p: i for i, p in enumerate((*FUSED_PROVIDERS, COMPILE, EAGER))}
    return sorted(out, key=lambda s: (s["model"], str(s["batch"]), str(s["memory_format"]),
                                      order.get(s["provider"], 9), s["provider"]))


# ------------------------------------------------------------------------------------- figures ---

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _note(msg: str) -> None:
    print(f"plots: {msg}", file=sys.stderr)


def _provider_order(providers: Iterable[str]) -> list[str]:
    rank = {p: i for i, p in enumerate((*FUSED_PROVIDERS, COMPILE, EAGER, "nn_relu", "plain"))}
    return sorted({str(p) for p in providers if p is not None},
                  key=lambda p: (rank.get(p, 99), p))


def _per_file(results: Sequence[Result], data_of: Callable, figure: str, missing: str,
              keep: Callable = bool) -> list | None:
    """``(result, data_of(result))`` for every file whose data ``keep`` accepts; None, with a note
    that ``figure`` is skipped for want of ``missing``, when no file has any."""
    per_file = [(result, data) for result in results for data in [data_of(result)] if keep(data)]
    if not per_file:
        _note(f"{figure} skipped: {missing}")
        return None
    return per_file


def _panels(files: int, height: float, nrows: int = 1, **kwargs):
    """``(fig, axes)``: ``nrows`` rows of panels, one column a results file, at most 11 in wide."""
    return _plt().subplots(nrows, files, figsize=(min(5.2 * files, 11.0), height * nrows),
                           squeeze=False, **kwargs)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return path


def _numel_axis(ax, minor: bool = True) -> None:
    """Log x axis with a grid; minor=False drops the minor log ticks (small multiples: they
    cost most of the drawing time and crowd a small panel)."""
    ax.set_xscale("log")
    ax.grid(True, which="major", alpha=0.3)
    if minor:
        ax.grid(True, which="minor", alpha=0.1)
    else:
        ax.minorticks_off()


def _draw_time_panel(ax, rows: Sequence[Row], small: bool) -> None:
    providers = _provider_order(r.get("provider") for r in rows)
    fused = fused_providers(rows)
    for provider in providers:
        n, t = series(rows, provider)
        if not len(n):
            continue
        _, q1 = series(rows, provider, "time_ms_q1")
        _, q3 = series(rows, provider, "time_ms_q3")
        ax.plot(n, t, marker=MARKERS.get(provider, "."), color=COLORS.get(provider),
                label=PROVIDER_NAMES.get(provider, provider), ms=3 if small else 5,
                lw=1.0 if small else 1.5)
        if not small and len(q1) == len(n) and len(q3) == len(n):
            ax.fill_between(n, q1, q3, color=COLORS.get(provider), alpha=0.2, lw=0)
    ax.set_yscale("log")
    _numel_axis(ax, minor=not small)
    ref_provider = fused[0] if fused else (providers[0] if providers else None)
    if ref_provider is None:
        return
    n, t = series(rows, ref_provider)
    if len(n) >= 2:
        xs = np.array([n.min(), n.max()])
        ax.plot(xs, t[-1] * xs / n[-1], ls="--", color="k", lw=0.8, alpha=0.6,
                label="slope 1 (linear)")
    k = knee(n, t)
    if k is not None and fused:
        ax.axvline(k, color=COLORS.get(ref_provider), ls=":", lw=1.0)
        if not small:
            ax.annotate(f"knee {_fmt_numel(k)}", xy=(k, 0.02),
                        xycoords=("data", "axes fraction"), xytext=(3, 0),
                        textcoords="offset points", fontsize=8, color=COLORS.get(ref_provider))


def draw_time_vs_numel(results: Sequence[Result], path: Path) -> Path | None:
    """Figure 1: penalty forward+backward time vs numel, one row per file: float32 NCHW (or the
    most frequent combination) large on the left, up to four other layouts / dtypes as a 2x2 grid
    of small multiples on the right."""
    per_file = _per_file(results, penalty_rows, "time_vs_numel.png",
                         "no penalty forward_backward rows")
    if per_file is None:
        return None
    plt = _plt()
    max_small = 4
    n_small = min(max_small, max(len(combos(rows)) - 1 for _, rows in per_file))
    small_cols = 0 if n_small == 0 else (1 if n_small == 1 else 2)
    ncols = 1 + small_cols
    width_ratios = [2.2] + [1] * small_cols
    fig = plt.figure(figsize=(6.0 + 2.0 * small_cols, 5.0 * len(per_file)))
    grid = fig.add_gridspec(len(per_file) * 2, ncols, width_ratios=width_ratios)
    for i, (result, rows) in enumerate(per_file):
        cs = combos(rows)
        main = fig.add_subplot(grid[2 * i:2 * i + 2, 0])
        _draw_time_panel(main, [r for r in rows if combo(r) == cs[0]], small=False)
        main.set_title(f"{label(result)}\npenalty fwd+bwd, {cs[0][1]} {cs[0][0]}", fontsize=10)
        main.set_xlabel("elements")
        main.set_ylabel("time (ms)")
        main.legend(fontsize=8, loc="upper left")
        extra = cs[1:1 + n_small]
        if len(cs) - 1 > n_small:
            _note(f"time_vs_numel.png: {label(result)}: {len(cs) - 1 - n_small} layout/dtype "
                  "panels left out")
        for j, c in enumerate(extra):
            cell = grid[2 * i + j // small_cols, 1 + j % small_cols] if small_cols == 2 \
                else grid[2 * i:2 * i + 2, 1]
            ax = fig.add_subplot(cell, sharey=main)
            _draw_time_panel(ax, [r for r in rows if combo(r) == c], small=True)
            ax.set_title(f"{c[1]} {c[0]}", fontsize=8, pad=2)
            ax.tick_params(labelsize=7, labelleft=False)
    fig.suptitle("Penalty forward+backward time vs size (dotted: knee of the fused kernel, "
                 "where time/element\nstops falling by >20%; dashed: slope 1 through its "
                 "largest size)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def draw_speedup(results: Sequence[Result], path: Path) -> Path | None:
    """Figure 2: eager / fused and compile / fused time ratios vs numel per layout and dtype, one
    panel per file, with the 10x and 2x goals and a line at 1M elements."""
    per_file = _per_file(results, speedups, "speedup.png",
                         "no fused penalty rows with an eager or compile baseline",
                         keep=lambda s: any(e[EAGER] is not None or e[COMPILE] is not None
                                            for e in s))
    if per_file is None:
        return None
    fig, axes = _panels(len(per_file), 4.4, sharey=True)
    for ax, (result, entries) in zip(axes[0], per_file):
        keys = sorted({(e["fused"], e["layout"], e["dtype"]) for e in entries},
                      key=lambda k: ((k[1], k[2]) != MAIN_COMBO, k))
        for ci, key in enumerate(keys):
            color = f"C{ci % 10}"
            sub = [e for e in entries if (e["fused"], e["layout"], e["dtype"]) == key]
            for base, ls, marker in ((EAGER, "-", "o"), (COMPILE, "--", "^")):
                pts: dict[int, list[float]] = defaultdict(list)
                for e in sub:
                    if e[base] is not None:
                        pts[e["numel"]].append(e[base])
                if not pts:
                    continue
                xs = sorted(pts)
                ys = [min(pts[x]) for x in xs]       # the worst over unit counts
                fused = "" if len({k[0] for k in keys}) == 1 else f"{key[0]} "
                ax.plot(xs, ys, ls=ls, marker=marker, ms=4, color=color,
                        label=f"{fused}{key[2]} {key[1]}" if base == EAGER or
                        not any(e[EAGER] is not None for e in sub) else None)
        for goal, name in ((SPEEDUP_GOALS[EAGER], "eager goal"),
                           (SPEEDUP_GOALS[COMPILE], "compile goal")):
            ax.axhline(goal, color="k", lw=1.0, ls=":" if goal < 5 else "-.", alpha=0.7)
            ax.annotate(f"{goal:g}x {name}", xy=(0.01, goal), xycoords=("axes fraction", "data"),
                        xytext=(0, 2), textcoords="offset points", fontsize=8)
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.axvline(BIG, color="0.4", lw=1.0, ls="--")
        ax.annotate("1M", xy=(BIG, 1.0), xytext=(3, 3), textcoords="offset points",
                    fontsize=8, color="0.3")
        ax.set_yscale("log")
        _numel_axis(ax)
        ax.set_title(label(result), fontsize=10)
        ax.set_xlabel("elements")
        ax.legend(fontsize=7, loc="best", ncol=1)
    axes[0][0].set_ylabel("speed-up of fused (baseline time / fused time)")
    fig.suptitle("Penalty forward+backward speed-up of the fused kernel (solid, circles: over "
                 "eager;\ndashed, triangles: over torch.compile; the worst over unit counts)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def draw_memory(results: Sequence[Result], path: Path) -> Path | None:
    """Figure 3: peak bytes of the penalty forward+backward per provider vs numel (float32 NCHW
    or the most frequent combination), log-log, one panel per file."""
    per_file = _per_file(
        results, lambda result: [r for r in penalty_rows(result)
                                 if _number(r.get("peak_bytes")) is not None],
        "memory.png", "no penalty forward_backward rows with peak_bytes")
    if per_file is None:
        return None
    fig, axes = _panels(len(per_file), 4.2)
    for ax, (result, rows) in zip(axes[0], per_file):
        c = combos(rows)[0]
        sub = [r for r in rows if combo(r) == c]
        for provider in _provider_order(r.get("provider") for r in sub):
            n, b = series(sub, provider, "peak_bytes")
            keep = b > 0
            if keep.any():
                ax.plot(n[keep], b[keep] / 1e6, marker=MARKERS.get(provider, "."),
                        color=COLORS.get(provider), label=PROVIDER_NAMES.get(provider, provider))
        n_all = np.array(sorted({int(r["numel"]) for r in sub}), dtype=float)
        nbytes = 2 if c[1] in ("bfloat16", "float16") else 4
        if len(n_all):
            ax.plot(n_all, n_all * nbytes / 1e6, ls="--", color="k", lw=0.8, alpha=0.6,
                    label="one input-sized tensor")
        ax.set_yscale("log")
        _numel_axis(ax)
        ax.set_title(f"{label(result)}\n{c[1]} {c[0]}", fontsize=10)
        ax.set_xlabel("elements")
        ax.set_ylabel("peak memory beyond inputs (MB)")
        ax.legend(fontsize=8)
    fig.suptitle("Penalty forward+backward peak memory", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def draw_step_overhead(results: Sequence[Result], path: Path) -> Path | None:
    """Figure 4: % overhead of the training step with SHADE over the plain step per model and
    provider (bars annotated with the absolute ms), and held_bytes per model if present."""
    per_file = _per_file(results, step_table, "step_overhead.png",
                         "no step rows with a plain baseline")
    if per_file is None:
        return None
    has_held = any(s["held_bytes"] is not None for _, steps in per_file for s in steps)
    nrows = 2 if has_held else 1
    fig, axes = _panels(len(per_file), 3.6, nrows)
    for col, (result, steps) in enumerate(per_file):
        configs = list(dict.fromkeys(
            (s["model"], s["batch"], s["memory_format"], s["dtype"]) for s in steps))
        providers = _provider_order(s["provider"] for s in steps)
        width = 0.8 / max(1, len(providers))
        ax = axes[0][col]
        for pi, provider in enumerate(providers):
            for ci, cfg in enumerate(configs):
                s = next((s for s in steps if s["provider"] == provider and
                          (s["model"], s["batch"], s["memory_format"], s["dtype"]) == cfg), None)
                if s is None:
                    continue
                x = ci + (pi - (len(providers) - 1) / 2) * width
                ax.bar(x, s["overhead_pct"], width, color=COLORS.get(provider),
                       label=PROVIDER_NAMES.get(provider, provider) if ci == 0 or
                       provider not in ax.get_legend_handles_labels()[1] else None)
                ax.annotate(f"{s['time_ms']:.3g} ms\n(plain {s['plain_ms']:.3g})",
                            xy=(x, s["overhead_pct"]), ha="center",
                            va="bottom" if s["overhead_pct"] >= 0 else "top",
                            fontsize=7, xytext=(0, 2 if s["overhead_pct"] >= 0 else -2),
                            textcoords="offset points")
        names = [_cfg_name(cfg, configs) for cfg in configs]
        ax.set_xticks(range(len(configs)), names, fontsize=8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("step time over plain (%)")
        ax.set_title(label(result), fontsize=10)
        ax.margins(y=0.25)
        _dedupe_legend(ax)
        if has_held:
            ax2 = axes[1][col]
            held = [s for s in steps if s["held_bytes"] is not None]
            for pi, provider in enumerate(providers):
                for ci, cfg in enumerate(configs):
                    s = next((s for s in held if s["provider"] == provider and
                              (s["model"], s["batch"], s["memory_format"], s["dtype"]) == cfg),
                             None)
                    if s is None:
                        continue
                    x = ci + (pi - (len(providers) - 1) / 2) * width
                    ax2.bar(x, s["held_bytes"] / 1e6, width, color=COLORS.get(provider),
                            label=PROVIDER_NAMES.get(provider, provider))
                    ax2.annotate(_fmt_bytes(s["held_bytes"]), xy=(x, s["held_bytes"] / 1e6),
                                 ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                                 textcoords="offset points")
            ax2.set_xticks(range(len(configs)), names, fontsize=8)
            ax2.set_ylabel("held at end of forward\nbeyond plain (MB)")
            ax2.margins(y=0.2)
            if not held:
                ax2.text(0.5, 0.5, "no held_bytes", transform=ax2.transAxes, ha="center")
            else:
                _dedupe_legend(ax2)
    fig.suptitle("Training step with SHADE vs the plain step", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _cfg_name(cfg: tuple, configs: Sequence[tuple]) -> str:
    """Model name plus the fields that differ between configurations."""
    model, batch, fmt, dtype = cfg
    parts = [str(model)]
    same_model = [c for c in configs if c[0] == model]
    if len({c[1] for c in same_model}) > 1 and batch is not None:
        parts.append(f"b{batch}")
    if len({c[2] for c in same_model}) > 1 and fmt:
        parts.append(str(fmt))
    if len({c[3] for c in same_model}) > 1 and dtype:
        parts.append(str(dtype))
    return "\n".join(parts)


def _dedupe_legend(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    if seen:
        ax.legend(seen.values(), seen.keys(), fontsize=8)


def draw_roofline(results: Sequence[Result], path: Path) -> Path | None:
    """Figure 5: achieved GB/s of every op row with ``gbps`` vs numel (colour: provider, marker:
    op / phase), with the copy bandwidth of the same run as a horizontal line."""
    per_file = _per_file(
        results, lambda result: [r for r in select(result, suite="op")
                                 if _number(r.get("gbps")) is not None and _number(r.get("numel"))],
        "roofline.png", "no rows with gbps")
    if per_file is None:
        return None
    fig, axes = _panels(len(per_file), 4.6)
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    for ax, (result, rows) in zip(axes[0], per_file):
        kinds = sorted({(str(r.get("op")), str(r.get("phase"))) for r in rows})
        marker_of = {k: markers[i % len(markers)] for i, k in enumerate(kinds)}
        # one layout / dtype per op and phase (float32 NCHW where measured), so that series do
        # not mix them
        main_of = {k: combos([r for r in rows if (str(r.get("op")), str(r.get("phase"))) == k])[0]
                   for k in kinds}
        for provider in _provider_order(r.get("provider") for r in rows):
            for kind in kinds:
                sub = [r for r in rows if r.get("provider") == provider
                       and (str(r.get("op")), str(r.get("phase"))) == kind
                       and combo(r) == main_of[kind]]
                if not sub:
                    continue
                n, g = series(sub, provider, "gbps")
                is_copy = kind[0] == "copy"
                name = (f"{PROVIDER_NAMES.get(provider, provider)}: " if not is_copy else "") + \
                    f"{kind[0]} {kind[1].replace('forward_backward', 'fwd+bwd')} " \
                    f"({main_of[kind][1]} {main_of[kind][0]})"
                ax.plot(n, g, marker=marker_of[kind], ms=4, lw=0.8, alpha=0.85,
                        color="0.25" if is_copy else COLORS.get(provider), label=name)
        copy = _number(result.get("copy_gbps"))
        if copy:
            ax.axhline(copy, color="k", ls="--", lw=1.0)
            ax.annotate(f"copy {copy:.3g} GB/s", xy=(0.01, copy),
                        xycoords=("axes fraction", "data"), xytext=(0, 3),
                        textcoords="offset points", fontsize=8)
        ax.set_yscale("log")
        _numel_axis(ax)
        ax.set_title(label(result), fontsize=10)
        ax.set_xlabel("elements")
        ax.set_ylabel("achieved GB/s (bytes_moved / time)")
        ax.legend(fontsize=7, ncol=2 if len(per_file) == 1 else 1, loc="upper center",
                  bbox_to_anchor=(0.5, -0.2))
    fig.suptitle("Achieved bandwidth vs the measured copy bandwidth", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


FIGURES = {
    "time_vs_numel.png": draw_time_vs_numel,
    "speedup.png": draw_speedup,
    "memory.png": draw_memory,
    "step_overhead.png": draw_step_overhead,
    "roofline.png": draw_roofline,
}


def draw_all(results: Sequence[Result], out_dir: str | Path) -> list[Path]:
    """Draw every figure whose data is present into out_dir (created if needed); returns the
    paths written. A figure that has no data, or fails, is skipped with a note on stderr."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [normalise(r) | {"_path": r.get("_path", f"results{i}")}
               for i, r in enumerate(results)]
    written = []
    for name, draw in FIGURES.items():
        try:
            path = draw(results, out / name)
        except Exception as exc:  # one bad figure must not cost the others
            _note(f"{name} failed: {type(exc).__name__}: {exc}")
            _plt().close("all")
            continue
        if path is not None:
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: draw the figures, write and print summary.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results JSON files (one per machine)")
    parser.add_argument("--out-dir", required=True, help="where the PNGs and summary.md go")
    args = parser.parse_args(argv)
    results = load(args.results)
    written = draw_all(results, args.out_dir)
    text = summary(results)
    summary_path = Path(args.out_dir) / "summary.md"
    summary_path.write_text(text)
    sys.stdout.write(text)
    for path in [*written, summary_path]:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
