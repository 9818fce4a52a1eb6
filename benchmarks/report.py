"""Render a benchmarks/ops.py JSON file as a Markdown table for RESULTS.md.

    python -m benchmarks.report ops.json [--ops layer_norm]
"""

from __future__ import annotations

import argparse
import json


def table(results: dict, ops: set[str] | None = None) -> str:
    lines = [
        f"Copy bandwidth measured in the same run: {results['copy_GBps']:.0f} GB/s (read + write).",
        "",
        "| op | shape | dtype | mode | lsjax ms | XLA ms | lsjax GB/s | % of copy BW | speedup |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        if ops and r["op"] not in ops:
            continue
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['ours_ms']:.4f} | {r['xla_ms']:.4f} "
            f"| {r['ours_GBps']:.0f} | {100 * r['ours_frac_copy_bw']:.0f}% | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json_file")
    parser.add_argument("--ops", default="")
    args = parser.parse_args()
    with open(args.json_file) as f:
        results = json.load(f)
    print(table(results, set(args.ops.split(",")) if args.ops else None))


if __name__ == "__main__":
    main()
