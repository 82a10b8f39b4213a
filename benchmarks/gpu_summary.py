"""The compact table of benchmarks/gpu_check.sh: one row per side of each train_throughput.py
run, its ratios, the sweep's line, and the rows that failed or were skipped.

    python benchmarks/gpu_summary.py RESULTS.jsonl [OUT.json]

RESULTS.jsonl holds the JSON lines gpu_check.sh collected (train_throughput.py --json,
lora_sweep.py --json, or {"name", "failed"|"skipped"} for a row that gave none); OUT.json gets
them all, as {"rows": [...]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def mib(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def percent(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_throughput(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'model':<11} {'side':<22} {'tokens/s':>9} {'peak MiB':>9} {'MFU':>6} {'trainable':>11}"
    )
    for row in rows:
        for side in row["sides"].values():
            print(
                f"{row['model']:<11} {side['label']:<22} {side['tokens_per_s']:9.0f} "
                f"{mib(side['peak_memory_bytes']):>9} {percent(side['mfu']):>6} "
                f"{side['trainable_params']:>11}"
            )
    for row in rows:
        for label, value in row["ratios"].items():
            print(f"{row['model']:<11} {label}: {value:.2f}x")


def print_sweep(row: dict[str, Any]) -> None:
    best = row.get("best") or {}
    scores = ""
    if row.get("test_accuracy") is not None:
        scores = f", best trial {best.get('number')}: test accuracy {row['test_accuracy']:.4f}"
        scores += f", macro-F1 {row['test_f1']:.4f}"
    print(
        f"sweep ({' '.join(row['overrides'])}): {row['trials']}, wall {row['wall_s']:.1f}s, "
        f"peak RSS of the process tree {mib(row['peak_tree_rss_bytes'])} MiB{scores}"
    )


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    lines = Path(sys.argv[1]).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    devices = {row["device"] for row in rows if "device" in row}
    print(f"device: {', '.join(sorted(devices)) or 'unknown'}")
    throughput = [row for row in rows if "sides" in row]
    if throughput:
        first = throughput[0]
        print(
            f"{first['steps']} steps (timed 2..N), batch {first['batch_size']}, max_length "
            f"{first['max_length']}, median of {first['repeats']}; peak memory: {first['memory']}"
        )
        print_throughput(throughput)
    for row in rows:
        if "wall_s" in row:
            print_sweep(row)
        elif "sides" not in row:
            what = row.get("failed") or row.get("skipped")
            status = "failed" if "failed" in row else "skipped"
            name = row.get("name") or f"{row.get('model')} {row.get('adapter')}"
            print(f"{name}: {status}: {what}")
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
