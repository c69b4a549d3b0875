"""The headline table of docs/results/README.md: every run folder, KVzip at one ratio against full and the baselines.

    python scripts/results_headline.py [ratio]      # default 0.3
"""

import json
import sys
from pathlib import Path

from kvzip_cache.eval.methods import BASELINES
from kvzip_cache.eval.runner import mean_scores, read_rows
from kvzip_cache.eval.tasks import TASK_METRICS

ratio = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
print(f"| run | metric | questions | full | kvzip at {ratio:g} | kvzip / full | best baseline at {ratio:g} | "
      "kvzip - best baseline |")
print("|---|---|---:|---:|---:|---:|---|---:|")
for folder in sorted(Path("docs/results").iterdir()):
    rows = read_rows(folder / "results.jsonl")
    if not rows:
        continue
    model = json.loads((folder / "config.json").read_text())["model"]
    means = mean_scores([r for r in rows if r.get("model") == model])
    for task in sorted({r["task"] for r in rows}):
        for metric in TASK_METRICS[task][:1]:
            full, kvzip = means.get((task, metric, "full", 1.0)), means.get((task, metric, "kvzip", ratio))
            if full is None or kvzip is None:
                continue
            baselines = {b: means[(task, metric, b, ratio)] for b in BASELINES if (task, metric, b, ratio) in means}
            n = sum(1 for r in rows if r["method"] == "full")
            best = max(baselines, key=baselines.get) if baselines else None
            best_text = f"{best} {baselines[best]:.3f}" if best else "-"
            gap = f"{kvzip - baselines[best]:+.3f}" if best else "-"
            share = f"{kvzip / full:.0%}" if full else "-"
            print(f"| {folder.name} | {metric} | {n} | {full:.3f} | {kvzip:.3f} | {share} | {best_text} | {gap} |")
