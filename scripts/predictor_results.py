"""Issue #29's answer-level table: kvzip, the retrained predictor (predicted, predicted-prefill, -carry) and the
predictor shipped before, from the runs of `scripts/gpu_predictor_session.sh eval` (folders new-<task> and
shipped-<task>), merged, with context-clustered intervals and paired differences.

    python scripts/predictor_results.py RUNS_DIR docs/results/predictors-h100
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvzip_cache.eval.runner import cell_stats, paired_stats, read_rows

TASKS = {"needle-4000": "needle 4K", "needle-7000": "needle 7K", "squad-0": "squad"}
METHODS = ("kvzip", "predicted", "predicted-prefill", "predicted-prefill-carry", "predicted-shipped")
METRIC = {"needle": "contains", "squad": "contains"}


def cell(c) -> str:
    return f"{c.mean:.3f} [{c.lo:.3f}, {c.hi:.3f}]"


def diff(c) -> str:
    return f"{c.mean:+.3f} [{c.lo:+.3f}, {c.hi:+.3f}]"


def main(runs: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    merged, summary = [], {}
    lines = ["| task | questions / contexts | " + " | ".join(METHODS) + " |", "|---|---:|" + "---:|" * len(METHODS)]
    paired_lines = ["| task | predicted − kvzip | predicted-prefill − kvzip | predicted-prefill-carry − kvzip | "
                    "predicted − predicted-shipped |", "|---|---:|---:|---:|---:|"]
    for folder, label in TASKS.items():
        rows = read_rows(runs / f"new-{folder}" / "results.jsonl")
        for row in read_rows(runs / f"shipped-{folder}" / "results.jsonl"):
            rows.append({**row, "method": "predicted-shipped"})
        merged += rows
        task = rows[0]["task"]
        cells = cell_stats(rows)
        key = lambda m: (task, METRIC[task], m, 0.3)  # noqa: E731
        first = cells[key("kvzip")]
        lines.append(f"| {label} | {first.n} / {first.contexts} | "
                     + " | ".join(cell(cells[key(m)]) for m in METHODS) + " |")
        vs_kvzip, vs_shipped = paired_stats(rows, "kvzip", [0.3]), paired_stats(rows, "predicted-shipped", [0.3])
        paired_lines.append(f"| {label} | " + " | ".join(diff(vs_kvzip[key(m)]) for m in METHODS[1:4])
                            + f" | {diff(vs_shipped[key('predicted')])} |")
        summary[label] = {"cells": {m: cells[key(m)]._asdict() if hasattr(cells[key(m)], "_asdict")
                                    else vars(cells[key(m)]) for m in METHODS},
                          "vs_kvzip": {m: vars(vs_kvzip[key(m)]) for m in METHODS[1:4]},
                          "predicted_vs_shipped": vars(vs_shipped[key("predicted")])}
    text = "\n".join(["SmolLM2-135M-Instruct, bf16, H100 80GB, ratio 0.3, `contains` accuracy with context-clustered "
                      "95% intervals", "", *lines, "", "Paired differences (same questions; context-clustered 95% "
                      "intervals):", "", *paired_lines, ""])
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "results.jsonl", "w") as handle:
        for row in merged:
            handle.write(json.dumps(row) + "\n")
    print(text)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
