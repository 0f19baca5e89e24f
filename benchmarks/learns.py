"""Does MOPO learn? End-to-end evidence on CPU from datasets made here (no download).

    python benchmarks/learns.py --tasks halfcheetah-random    # 3 seeds × (one model, MOPO, λ = 0); ~1.5 h, 2 cores
    python benchmarks/learns.py --tasks pendulum hopper       # the earlier, short evidence (20k updates)

For each task: write a D4RL-layout dataset with uniformly random actions (benchmarks/make_dataset.py: D4RL's "random"
recipe, 1,000-step episodes, terminals and timeouts recorded, a fixed seed), then per seed train the dynamics ensemble
once (`mopo.py --epochs 0`) and run MOPO and MOPO with λ = 0 (plain MBPO) on that same ensemble (`--dynamics-path`).
Jobs run `--jobs` at a time, each on one torch thread; a seed's two runs are queued once its ensemble is saved.

halfcheetah-random is trained as D4RL's task of that name (`--env-id halfcheetah-random-v2 --dataset-path ...`): the
published (h, λ) = (5, 0.5), D4RL's normalized score, mopo.py's default evaluation. pendulum and hopper are gymnasium
tasks without reference scores (raw returns). Prints and writes table.md and summary.json; draw the curves and the
gauge with benchmarks/plot.py (the table says the commands).
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import mopo  # noqa: E402
from make_dataset import make_dataset  # noqa: E402

# task: (gymnasium id of the data, mopo.py --env-id, transitions, mopo.py flags)
TASKS = {
    # D4RL's halfcheetah-random recipe; 60 epochs of 1,000 updates; the dynamics capped at 100 epochs (CPU time)
    "halfcheetah-random": ("HalfCheetah-v4", "halfcheetah-random-v2", 100_000, [
        "--epochs", "60", "--dynamics-max-epochs", "100"]),
    # InvertedPendulum needs h = 25: random episodes end within ~6 steps, so every start state sits near the track's
    # centre, and a drifting policy fails only 20-50 steps later, which 5-step rollouts never reach.
    "pendulum": ("InvertedPendulum-v4", "InvertedPendulum-v4", 20_000, [
        "--lam", "1.0", "--rollout-length", "25", "--epochs", "20", "--rollout-batch-size", "2000",
        "--rollout-freq", "250", "--eval-freq", "2", "--eval-episodes", "5", "--dynamics-max-epochs", "50"]),
    "hopper": ("Hopper-v4", "Hopper-v4", 50_000, [
        "--lam", "1.0", "--rollout-length", "5", "--epochs", "20", "--rollout-batch-size", "5000",
        "--rollout-freq", "250", "--eval-freq", "2", "--eval-episodes", "5", "--dynamics-max-epochs", "50"]),
}


@dataclass
class Args:
    tasks: tuple[str, ...] = ("halfcheetah-random",)
    """tasks to run, of: halfcheetah-random, pendulum, hopper"""
    seeds: tuple[int, ...] = (1, 2, 3)
    """seeds (each gets its own ensemble, shared by its MOPO and λ = 0 runs)"""
    jobs: int = 2
    """jobs at a time (one torch thread each)"""
    out_dir: str = ""
    """where datasets, runs and the table go (default: benchmarks/results/learns/<tasks>; with an override of
    --epochs or --dynamics-max-epochs, learns_quick/<tasks>, so a quick look never overwrites the results)"""
    epochs: int = 0
    """if > 0, overrides the task's number of epochs (for a quick look)"""
    dynamics_max_epochs: int = 0
    """if > 0, overrides the task's cap on dynamics epochs (for a quick look)"""
    device: str = "cpu"
    """mopo.py's --device for every job (cuda: every job on the GPU, `--jobs` of them at once)"""


def run(cmd, cwd, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed; see {log}")


def run_dir(cwd, exp_name):
    return sorted((Path(cwd) / "runs").glob(f"*__{exp_name}__*"))[-1]  # the newest: its name ends in a time


def data_summary(task: str, returns: np.ndarray, transitions: int) -> dict:
    """The episodes' returns, and their D4RL normalized score where the task has reference scores (mopo.py's)."""
    scores = mopo.summarize(mopo.make_task(TASKS[task][1]), {"return": returns})
    out = {"mean_return": scores["return"], "std_return": scores["return_std"], "episodes": len(returns),
           "transitions": transitions}
    return out | ({"normalized_score": scores["normalized_score"]} if "normalized_score" in scores else {})


def write_dataset(task: str, out_dir: Path, transitions: int = 0) -> tuple[Path, dict]:
    """The task's dataset (seed 0), with `transitions` rows if > 0, else the task's; and a summary of its episodes."""
    gym_id, _, default, _ = TASKS[task]
    path, transitions = out_dir / f"{task.replace('-', '_')}.hdf5", transitions or default
    returns = make_dataset(path, gym_id, transitions, seed=0)
    return path, data_summary(task, returns, transitions)


def main(args: Args) -> dict:
    quick = args.epochs > 0 or args.dynamics_max_epochs > 0
    out_dir = Path(args.out_dir or (Path("learns_quick") if quick else HERE / "results" / "learns")
                   / "+".join(args.tasks)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    def flags(task, seed):
        _, env_id, _, extra = TASKS[task]
        extra = list(extra)
        for name, value in (("--epochs", args.epochs), ("--dynamics-max-epochs", args.dynamics_max_epochs)):
            if value > 0:
                extra[extra.index(name) + 1] = str(value)
        return [sys.executable, str(HERE.parent / "mopo.py"), "--env-id", env_id, "--dataset-path", str(paths[task]),
                "--seed", str(seed), "--device", args.device, *extra]

    def job(task, seed, variant, *extra) -> tuple[Path, dict]:
        """One mopo.py run; its folder and results.json, with its wall time."""
        name, start = f"{task}-{variant}-s{seed}", time.time()
        run(flags(task, seed) + ["--exp-name", name, *extra], out_dir, out_dir / f"{name}.log")
        folder = run_dir(out_dir, name)
        return folder, json.loads((folder / "results.json").read_text()) | {"wall_s": time.time() - start}

    start, paths, behaviour, results = time.time(), {}, {}, {}
    for task in args.tasks:
        paths[task], behaviour[task] = write_dataset(task, out_dir)
    pool = ThreadPoolExecutor(args.jobs)
    try:  # a failed job ends the benchmark: the queued ones are cancelled
        models = {pool.submit(job, t, s, "model", "--epochs", "0"): (t, s) for t in args.tasks for s in args.seeds}
        policies = {}
        for future in as_completed(models):
            (task, seed), (folder, r) = models[future], future.result()
            results[(task, seed)] = {"model": {"wall_s": r["wall_s"], **r["dynamics"]}}
            policies |= {pool.submit(job, task, seed, v, "--dynamics-path", str(folder), *lam): (task, seed, v)
                         for v, lam in (("mopo", []), ("lam0", ["--lam", "0.0"]))}
        for future, (task, seed, variant) in policies.items():
            results[(task, seed)][variant] = future.result()[1]
    finally:
        pool.shutdown(cancel_futures=True)
    wall = time.time() - start
    return report(args, behaviour, results, wall, out_dir)


def fmt(values):
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def report(args: Args, behaviour: dict, results: dict, wall: float, out_dir: Path) -> dict:
    lines = ["| task | data | MOPO final | per seed | λ = 0 (MBPO) final | per seed | MOPO beats the data on every "
             "seed |", "|---|---|---|---|---|---|---|"]
    table = {}
    for task in args.tasks:
        key = "final_normalized_score" if task == "halfcheetah-random" else "final_return"
        data = behaviour[task]["normalized_score" if task == "halfcheetah-random" else "mean_return"]
        mopo = [results[(task, s)]["mopo"][key] for s in args.seeds]
        lam0 = [results[(task, s)]["lam0"][key] for s in args.seeds]
        beats = all(m > data for m in mopo)
        table[task] = {"behaviour": behaviour[task], "metric": key, "mopo": mopo, "lam0": lam0, "beats": beats,
                       "lam": results[(task, args.seeds[0])]["mopo"]["lam"], "flags": TASKS[task][3]}
        lines.append(f"| {task} | {data:.1f} | {fmt(mopo)} | {', '.join(f'{v:.1f}' for v in mopo)} | {fmt(lam0)} | "
                     f"{', '.join(f'{v:.1f}' for v in lam0)} | {'yes' if beats else 'NO'} |")
    lines += [f"\nwall time {wall / 60:.1f} min, {args.jobs} jobs at a time, 1 torch thread each, --device "
              f"{args.device}. halfcheetah-random: D4RL normalized score; pendulum, hopper: raw returns.",
              f"Curves: python benchmarks/plot.py {out_dir}/runs --label-by lam --out curves.png",
              f"Gauge: python benchmarks/plot.py {out_dir}/runs/*mopo-s* --gauge --out gauge.png"]
    text = "\n".join(lines)
    print(text)
    (out_dir / "table.md").write_text(text + "\n")
    summary = {"tasks": table, "wall_s": wall, "args": vars(args),
               "runs": {f"{t}/seed_{s}": r for (t, s), r in results.items()}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
