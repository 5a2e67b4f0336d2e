"""Turn a pytest-benchmark JSON file into the markdown tables the README quotes.

    python benchmarks/report.py results.json [--op penalty] [--baseline eager --baseline compile]
                                             [--cost]

One row per (op, shape, dtype, phase): the median time of every implementation with its
interquartile range, and the speed-up of the fused one over each baseline, all from the same run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def rows_from(data: dict) -> dict:
    table = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], "x".join(map(str, info["shape"])), info["dtype"], info["phase"])
        stats = bench["stats"]
        table[key][info["implementation"]] = (stats["median"], stats["iqr"])
    return table


def markdown(data: dict, fused: str, baselines: list[str], cost: bool = False) -> str:
    """cost=False: speed-up columns (baseline time / fused time); cost=True: the fused time as a
    multiple of each baseline's (fused time / baseline time)."""
    table = rows_from(data)
    impls = [fused] + baselines
    ratio_name = "time / {b}'s" if cost else "speed-up vs {b}"
    header = ["op", "shape", "dtype", "phase"] + [f"{i} median (IQR), ms" for i in impls] + \
        [f"{fused} " + ratio_name.format(b=b) for b in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(table, key=lambda k: (k[0], k[1], k[2], ["forward", "backward",
                                                                  "forward+backward"].index(k[3])
                                            if k[3] in ("forward", "backward",
                                                        "forward+backward") else 9)):
        results = table[key]
        cells = [f"{results[i][0] * 1e3:.3f} ({results[i][1] * 1e3:.3f})" if i in results
                 else "-" for i in impls]
        ratios = [f"{(results[fused][0] / results[b][0] if cost else results[b][0] / results[fused][0]):.2f}x"
                  if b in results and fused in results else "-" for b in baselines]
        lines.append("| " + " | ".join([*key, *cells, *ratios]) + " |")
    machine = data.get("machine_info", {})
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
                 f"{machine.get('cpu', {}).get('count', '?')} cores; "
                 f"run {data.get('datetime', '?')}; times are medians over the rounds.")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_file")
    parser.add_argument("--fused", default="shade_ops")
    parser.add_argument("--baseline", action="append", dest="baselines")
    parser.add_argument("--op", help="only the rows of this op")
    parser.add_argument("--cost", action="store_true",
                        help="fused time / baseline time instead of speed-ups")
    args = parser.parse_args(argv)
    with open(args.json_file) as f:
        data = json.load(f)
    if args.op:
        data = {**data, "benchmarks": [b for b in data["benchmarks"]
                                       if b["extra_info"]["op"] == args.op]}
    print(markdown(data, args.fused, args.baselines or ["eager", "compile"], args.cost))


if __name__ == "__main__":
    main()
