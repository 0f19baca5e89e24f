"""Plot learning curves from mopo.py runs: score against gradient updates, mean ± std across seeds, one panel per task.

    python benchmarks/plot.py runs/hopper-medium-v2__mopo__* runs/walker2d-medium-v2__mopo__* --out curves.png
    python benchmarks/plot.py benchmarks/results/learns/halfcheetah-random/run_results --label-by lam

Each argument is a run folder (holding results.json) or a folder of run folders. Runs are grouped into panels by
`env_id` and into curves by `--label-by` (an args field; default: one curve per task). The y-axis is the D4RL
normalized score where the task has one, else the raw return (tasks without reference scores). Seeds of one curve
are aligned on the evaluation steps they share.

    python benchmarks/plot.py runs/<run> --gauge --out gauge.png

`--gauge` draws instead, one column per run, the policy's real return, its return in the learned model and its
penalized model return (Σ r − λ·u), each ± std over the evaluation episodes, with the episode lengths (env vs
model) below: MOPO's Theorem 4.4 says penalized ≤ real when λ is large enough (see README, "Choosing λ and h").
Runs made before mopo.py logged these keys are skipped with a note.
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
    gauge: bool = False
    """per run: real, model and penalized model returns (and episode lengths) against gradient updates"""


def find_runs(paths):
    """(run folder, results.json contents) for each run folder in `paths`; a half-written file is skipped, and said."""
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            files = [path / "results.json"]
        elif path.is_dir():
            files = sorted(path.glob("*/results.json"))
        else:
            raise FileNotFoundError(f"{path}: neither a run folder (with results.json) nor a folder of runs")
        for file in files:
            try:
                yield file.parent, json.loads(file.read_text())
            except json.JSONDecodeError as e:
                print(f"skipped {file}: not valid JSON ({e})")


def find_results(paths):
    for _, results in find_runs(paths):
        yield results


def curves(results, label_by):
    """{env_id: {label: (steps, mean, std, seeds, metric)}} from a list of results.json contents."""
    grouped = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r["evaluations"]:
            value = r[label_by] if label_by in ("lam", "rollout_length") else r["args"].get(label_by)  # as used
            label = f"{label_by}={value}" if label_by else r["env_id"]
            grouped[r["env_id"]][label].append(r["evaluations"])
    out = defaultdict(dict)
    for env_id, by_label in grouped.items():
        for label, runs in by_label.items():
            metric = "normalized_score" if all("normalized_score" in e for ev in runs for e in ev) else "return"
            steps = sorted(set.intersection(*({e["step"] for e in ev} for ev in runs)))
            values = np.array([[next(e[metric] for e in ev if e["step"] == s) for s in steps] for ev in runs])
            out[env_id][label] = (np.array(steps), values.mean(0), values.std(0), len(runs), metric)
    return out


RETURNS = {"return": ("real env", "black"), "model_return": ("learned model", "tab:blue"),
           "penalized_model_return": ("penalized model, r − λ·u", "tab:orange")}
LENGTHS = {"length": ("real env", "black"), "model_length": ("learned model", "tab:blue")}


def gauge(results):
    """(steps, {key: (mean, std)}) for the keys of RETURNS and LENGTHS, from the evaluations that have them;
    None for a run made before mopo.py logged them."""
    def has(e, k):
        return k in e and f"{k}_std" in e

    evals = [e for e in results["evaluations"] if all(has(e, k) for k in RETURNS)]
    if not evals:
        return None
    keys = [k for k in (*RETURNS, *LENGTHS) if all(has(e, k) for e in evals)]
    return np.array([e["step"] for e in evals]), {
        k: (np.array([e[k] for e in evals], float), np.array([e[f"{k}_std"] for e in evals], float)) for k in keys}


def run_title(folder, results):
    """env_id, λ, h and seed where results.json has them, else the run folder's name."""
    if all(results.get(k) is not None for k in ("env_id", "lam", "rollout_length", "seed")):
        return f"{results['env_id']}  λ={results['lam']:g}  h={results['rollout_length']}  seed={results['seed']}"
    return Path(folder).name


def plot_gauge(args, plt):
    runs = []
    for folder, results in find_runs(args.runs):
        data = gauge(results)
        if data is None:
            print(f"skipped {folder}: no model_return in its evaluations (run made before the gauge)")
        else:
            broken = [e["bound_broken"] for e in results["evaluations"] if "bound_broken" in e]  # mopo.py's D18
            warned = f"; warned (D18) at {int(sum(broken))}/{len(broken)}" if broken else ""
            runs.append((run_title(folder, results), warned, *data))
    if not runs:
        raise SystemExit("no run has the gauge keys (model_return, penalized_model_return): rerun with the current "
                         "mopo.py")
    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 5.5), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [2, 1]})
    for (title, warned, steps, series), top, bottom in zip(runs, axes[0], axes[1]):
        for ax, keys in ((top, RETURNS), (bottom, LENGTHS)):
            for key, (label, color) in keys.items():
                if key in series:
                    mean, std = series[key]
                    ax.plot(steps, mean, marker="o", markersize=3, color=color, label=label)
                    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
            ax.grid(alpha=0.3)
        held = int((series["penalized_model_return"][0] <= series["return"][0]).sum())
        top.set_title(f"{title}\npenalized ≤ real at {held}/{len(steps)} evaluations{warned}", fontsize=9)
        top.set_ylabel("return (raw)")
        top.legend(fontsize=8)
        bottom.set_ylabel("episode length")
        bottom.set_xlabel("gradient updates")
        if bottom.lines:
            bottom.legend(fontsize=8)
    return fig


def plot_curves(args, plt):
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
    return fig


def main(args: Args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_gauge(args, plt) if args.gauge else plot_curves(args, plt)
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return Path(args.out)


if __name__ == "__main__":
    main(tyro.cli(Args))
