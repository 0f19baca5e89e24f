"""Plot learning curves from mopo.py runs: score against gradient updates, mean ± std across seeds, one panel per task.

    python benchmarks/plot.py runs/hopper-medium-v2__mopo__* runs/walker2d-medium-v2__mopo__* --out curves.png
    python benchmarks/plot.py benchmarks/results/learns/runs --label-by exp_name

Each argument is a run folder (holding results.json) or a folder of run folders. Runs are grouped into panels by
`env_id` and into curves by `--label-by` (an args field; default: one curve per task). The y-axis is the D4RL
normalized score where the task has one, else the raw return (tasks without reference scores). Seeds of one curve
are aligned on the evaluation steps they share.
"""

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import tyro


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run folders, or folders holding run folders"""
    out: str = "curves.png"
    """the PNG to write"""
    label_by: Optional[str] = None
    """an args field that splits a task's runs into curves (e.g. exp_name, lam, penalty)"""
    title: str = ""
    """figure title (say what machine and settings made the runs)"""


def find_results(paths):
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            yield json.loads((path / "results.json").read_text())
        elif path.is_dir():
            for file in sorted(path.glob("*/results.json")):
                yield json.loads(file.read_text())
        else:
            raise FileNotFoundError(f"{path}: neither a run folder (with results.json) nor a folder of runs")


def curves(results, label_by):
    """{env_id: {label: (steps, mean, std, seeds, metric)}} from a list of results.json contents."""
    grouped = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r["evaluations"]:
            label = f"{label_by}={r['args'].get(label_by)}" if label_by else r["env_id"]
            grouped[r["env_id"]][label].append(r["evaluations"])
    out = defaultdict(dict)
    for env_id, by_label in grouped.items():
        for label, runs in by_label.items():
            metric = "normalized_score" if all("normalized_score" in e for ev in runs for e in ev) else "return"
            steps = sorted(set.intersection(*({e["step"] for e in ev} for ev in runs)))
            values = np.array([[next(e[metric] for e in ev if e["step"] == s) for s in steps] for ev in runs])
            out[env_id][label] = (np.array(steps), values.mean(0), values.std(0), len(runs), metric)
    return out


def main(args: Args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(list(find_results(args.runs)), args.label_by)
    if not data:
        raise SystemExit("no evaluations found in the given runs")
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.8), squeeze=False)
    for ax, (env_id, by_label) in zip(axes[0], sorted(data.items())):
        for label, (steps, mean, std, seeds, metric) in sorted(by_label.items()):
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.25)
        ax.set_title(env_id)
        ax.set_xlabel("gradient updates")
        ax.set_ylabel("D4RL normalized score" if metric == "normalized_score" else "return (no reference scores)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
