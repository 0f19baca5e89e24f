"""Does MOPO learn? End-to-end evidence on CPU from datasets made here (no download).

    python benchmarks/learns.py                      # both tasks, 3 seeds, MOPO and λ = 0; ~1 h on 2 cores
    python benchmarks/learns.py --tasks pendulum --seeds 1

For each task: write a D4RL-layout dataset with uniformly random actions (benchmarks/make_dataset.py), then per seed
train the dynamics ensemble once (`mopo.py --epochs 0`) and run MOPO and MOPO with λ = 0 (plain MBPO) on that same
ensemble (`--dynamics-path`). Prints and saves a table of the behaviour data's mean return against the final return
(the last evaluation's mean over episodes; mean ± std over seeds). These tasks have no D4RL reference scores, so all
numbers are raw returns. Runs go `--jobs` at a time, each on one torch thread.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_dataset import make_dataset  # noqa: E402

# task: (gymnasium id, dataset transitions, mopo.py flags). Settings sized for ~30 min per task on 2 CPU cores.
# InvertedPendulum needs h = 25: random episodes end within ~6 steps, so every start state sits near the track's
# centre, and a policy that drifts only fails 20-50 steps later; with h = 5 (pilot runs: 40-70 return) the value
# function never sees that, with h = 25 the policy holds the pole for all 1,000 steps.
TASKS = {
    "pendulum": ("InvertedPendulum-v4", 20_000, [
        "--lam", "1.0", "--rollout-length", "25", "--epochs", "20", "--steps-per-epoch", "1000",
        "--rollout-batch-size", "2000", "--rollout-freq", "250", "--eval-freq", "2", "--eval-episodes", "5",
        "--dynamics-max-epochs", "50"]),
    "hopper": ("Hopper-v4", 50_000, [
        "--lam", "1.0", "--rollout-length", "5", "--epochs", "20", "--steps-per-epoch", "1000",
        "--rollout-batch-size", "5000", "--rollout-freq", "250", "--eval-freq", "2", "--eval-episodes", "5",
        "--dynamics-max-epochs", "50"]),
}


@dataclass
class Args:
    tasks: tuple[str, ...] = ("pendulum", "hopper")
    """tasks to run, of: pendulum, hopper"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds (each gets its own ensemble, shared by its MOPO and λ = 0 runs)"""
    jobs: int = 2
    """runs at a time (one torch thread each)"""
    out_dir: str = "benchmarks/results/learns"
    """where datasets, runs and the table go"""
    dynamics_max_epochs: int = 0
    """if > 0, overrides the per-task cap on dynamics epochs (for a quick look)"""
    epochs: int = 0
    """if > 0, overrides the per-task number of epochs (for a quick look)"""


def run(cmd, cwd, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")


def latest_run(cwd, exp_name):
    (run_dir,) = sorted((Path(cwd) / "runs").glob(f"*__{exp_name}__*"))
    return run_dir


def seed_chain(args, task, seed, dataset, cwd):
    """Train the ensemble once, then MOPO and λ = 0 on it; returns {variant: results}."""
    gym_id, _, flags = TASKS[task]
    flags = list(flags)
    for name, value in (("--dynamics-max-epochs", args.dynamics_max_epochs), ("--epochs", args.epochs)):
        if value > 0:
            flags[flags.index(name) + 1] = str(value)
    base = [sys.executable, str(HERE.parent / "mopo.py"), "--env-id", gym_id, "--dataset-path", str(dataset),
            "--seed", str(seed), *flags]
    model_name = f"{task}-model-s{seed}"
    run(base + ["--epochs", "0", "--exp-name", model_name], cwd, cwd / f"{model_name}.log")
    model = latest_run(cwd, model_name)
    out = {}
    for variant, lam in (("mopo", None), ("lam0", "0.0")):
        name = f"{task}-{variant}-s{seed}"
        extra = ["--dynamics-path", str(model), "--exp-name", name] + (["--lam", lam] if lam else [])
        start = time.time()
        run(base + extra, cwd, cwd / f"{name}.log")
        out[variant] = json.loads((latest_run(cwd, name) / "results.json").read_text())
        out[variant]["wall_s"] = time.time() - start
    return out


def fmt(values):
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def main(args: Args) -> dict:
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    behaviour, chains = {}, []
    for task in args.tasks:
        gym_id, num_steps, _ = TASKS[task]
        dataset = out_dir / f"{task}_random.hdf5"
        returns = make_dataset(dataset, gym_id, num_steps, seed=0)
        behaviour[task] = {"mean_return": float(returns.mean()), "std_return": float(returns.std()),
                           "episodes": len(returns), "transitions": num_steps}
        chains += [(task, seed, dataset) for seed in args.seeds]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: (c[0], c[1], seed_chain(args, *c, out_dir)), chains))
    wall = time.time() - start

    table = {}
    lines = ["| task | behaviour data: mean return | MOPO final return | MOPO per seed | λ = 0 (MBPO) final return "
             "| λ = 0 per seed | MOPO beats data on every seed |", "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        mopo = [r["mopo"]["final_return"] for t, _, r in results if t == task]
        lam0 = [r["lam0"]["final_return"] for t, _, r in results if t == task]
        beats = all(m > behaviour[task]["mean_return"] for m in mopo)
        table[task] = {"behaviour": behaviour[task], "mopo": mopo, "lam0": lam0, "mopo_beats_data": beats,
                       "lam": next(r["mopo"]["lam"] for t, _, r in results if t == task),
                       "env_id": TASKS[task][0], "flags": TASKS[task][2]}
        lines.append(f"| {TASKS[task][0]} | {behaviour[task]['mean_return']:.1f} | {fmt(mopo)} | "
                     f"{', '.join(f'{v:.0f}' for v in mopo)} | {fmt(lam0)} | {', '.join(f'{v:.0f}' for v in lam0)} "
                     f"| {'yes' if beats else 'NO'} |")
    lines.append(f"\nwall time {wall / 60:.1f} min for {len(chains)} seed chains, {args.jobs} at a time, "
                 f"1 torch thread each; raw returns (no D4RL reference scores exist for these tasks).")
    text = "\n".join(lines)
    print(text)
    (out_dir / "table.md").write_text(text + "\n")
    summary = {"tasks": table, "wall_s": wall, "args": vars(args), "runs": results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
