"""The markdown summary of a per-call results file (benchmarks/run.py --suite percall).

    python benchmarks/percall_report.py benchmarks/results/percall_cpu_<date>.json [--out X.md]

Two tables against issue 19's goals: per call, ShadeReLU and the penalty forward+backward against
nn.ReLU at each size, quiet and busy (median, p90, p90 / median, the ratios of the medians and of
the p90s); per training step, SHADE on every ReLU against the plain step (median, p90, overhead).
A goal is marked where it applies, "meets" or "MISSES"; nothing here is a measurement of its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# issue 19: ShadeReLU fwd+bwd over nn.ReLU's, medians, by size; p90 over median at every size;
# a whole step with SHADE over the plain step
RATIO_GOALS = ((16_000, 70_000, 1.3), (1_000_000, 1_100_000, 1.1))
P90_GOAL = 2.0
STEP_GOAL_PCT = 5.0


def _ratio_goal(numel: int) -> float | None:
    return next((goal for low, high, goal in RATIO_GOALS if low <= numel < high), None)


def _mark(value: float | None, goal: float | None, fmt: str = "{:.2f}x") -> str:
    if value is None:
        return "-"
    text = fmt.format(value)
    if goal is None:
        return text
    return f"{text} ({'meets' if value <= goal else 'MISSES'} {fmt.format(goal)})"


def _us(ms: float | None) -> str:
    return "-" if ms is None else f"{ms * 1e3:,.0f}"


def _ms(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:,.1f}"


def percall_lines(doc: dict) -> list[str]:
    """The per-call table: one line per case and provider, nn.ReLU first."""
    rows = [r for r in doc["rows"] if r.get("suite") == "op" and r.get("op") != "copy"]
    if not rows:
        return []
    lines = ["Per call, forward+backward (us; every call timed alone; ratios to nn.ReLU in the "
             "same case; goals for ShadeReLU):", "",
             "| busy | elements | shape | op | provider | median | p90 | p90 / median "
             "| vs nn.ReLU (median) | vs nn.ReLU (p90) | samples |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    key = (lambda r: (r.get("busy", False), r["numel"], r["op"] != "shade_relu",
                      r["provider"] != "nn_relu"))
    for r in sorted(rows, key=key):
        shade = r["op"] == "shade_relu" and r["provider"] != "nn_relu"
        spread = r["time_ms_p90"] / r["time_ms"] if r.get("time_ms_p90") else None
        op = "nn.ReLU" if r["provider"] == "nn_relu" else r["op"]
        lines.append(
            f"| {'yes' if r.get('busy') else 'no'} | {r['numel']:,} | "
            f"{'x'.join(map(str, r['shape']))} | {op} | {r['provider']} | {_us(r['time_ms'])} | "
            f"{_us(r.get('time_ms_p90'))} | {_mark(spread, P90_GOAL if shade else None)} | "
            f"{_mark(r.get('ratio'), _ratio_goal(r['numel']) if shade else None)} | "
            f"{_mark(r.get('ratio_p90'), None)} | {r['samples']} |")
    return lines + [""]


def step_lines(doc: dict) -> list[str]:
    """The step table: one line per model, batch and SHADE provider."""
    rows = [r for r in doc["rows"] if r.get("suite") == "step" and r.get("provider") != "plain"]
    if not rows:
        return []
    plain = {(r["model"], r["batch"]): r for r in doc["rows"]
             if r.get("suite") == "step" and r.get("provider") == "plain"}
    lines = ["Training step (ms; SGD, cross-entropy + 1e-3 x collect; SHADE on every ReLU against "
             "the plain model, interleaved):", "",
             "| model | batch | plain median | plain p90 | SHADE | median | p90 | overhead "
             "(medians) | overhead (p90s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], r["provider"])):
        base = plain.get((r["model"], r["batch"]), {})
        pct = None if r.get("ratio") is None else 100 * (r["ratio"] - 1)
        pct90 = None if r.get("ratio_p90") is None else 100 * (r["ratio_p90"] - 1)
        fmt = "{:+.1f}%"
        lines.append(
            f"| {r['model']} | {r['batch']} | {_ms(base.get('time_ms'))} | "
            f"{_ms(base.get('time_ms_p90'))} | {r['provider']} | {_ms(r['time_ms'])} | "
            f"{_ms(r.get('time_ms_p90'))} | {_mark(pct, STEP_GOAL_PCT, fmt)} | "
            f"{_mark(pct90, None, fmt)} |")
    return lines + [""]


def summary(doc: dict, name: str = "") -> str:
    machine, versions = doc.get("machine", {}), doc.get("versions", {})
    head = [f"# Per-call cost{f' ({name})' if name else ''}", "",
            f"{machine.get('name', '?')}, {machine.get('threads', '?')} threads; torch "
            f"{versions.get('torch', '?')}, git {versions.get('git', '?')}; run {doc.get('date')}"
            f" in {doc.get('seconds', '?')} s; `{doc.get('command', '')}`.", ""]
    tail = [f"Left out by the budget: {', '.join(doc['skipped'])}." if doc.get("skipped") else "",
            f"Errors: {'; '.join(doc['errors'])}." if doc.get("errors") else ""]
    return "\n".join(head + percall_lines(doc) + step_lines(doc) + [t for t in tail if t]) \
        .rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results JSON of the percall suite")
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    text = summary(doc, Path(args.results).name)
    if args.out:
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
