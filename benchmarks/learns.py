"""Does MOPO learn? End-to-end evidence on CPU from datasets made here (no download).

    python benchmarks/learns.py --tasks halfcheetah-random    # 3 seeds × (one model, MOPO, λ = 0); ~1.5 h, 2 cores
    python benchmarks/learns.py --tasks hopper-medium --seeds 1  # one seed; the others later, into the same folder
    python benchmarks/learns.py --tasks pendulum hopper       # the earlier, short evidence (20k updates)

For each task: write a D4RL-layout dataset (benchmarks/make_dataset.py, a fixed seed: "random" = D4RL's random recipe;
"medium" = the stochastic actions of the SAC actor committed in benchmarks/behaviour/; "medium-replay" = that actor's
training replay buffer, written by `make_dataset.py train-behaviour --replay-out`), then per seed train the dynamics
ensemble once (`mopo.py --epochs 0`) and run MOPO and MOPO with λ = 0 (plain MBPO) on that same ensemble
(`--dynamics-path`). Jobs run `--jobs` at a time, each on one torch thread; a seed's two runs are queued once its
ensemble is saved.

The D4RL-named tasks train as D4RL's task of that name (`--env-id halfcheetah-medium-v2 --dataset-path ...`): the
published (h, λ), D4RL's normalized score, mopo.py's default evaluation. pendulum and hopper are gymnasium tasks
without reference scores (raw returns). Each finished seed's results.json files go to run_results/ at once and the
table is rewritten; a seed whose three runs are there already is not run again, so a long benchmark can be split over
several calls, and a run a call left unfinished resumes from its last checkpoint in the next. Prints and writes
table.md and summary.json; draw the curves and the gauge with benchmarks/plot.py (the table says the commands). Each
run's gauge (D17) says whether Theorem 4.4's bound broke (D18): the table counts them.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import mopo  # noqa: E402
from make_dataset import make_dataset, make_medium  # noqa: E402

BEHAVIOUR = HERE / "behaviour"  # the SAC actors behind the medium data, and (not committed) their replay buffers
# task: (gymnasium id of the data, mopo.py --env-id, transitions, mopo.py flags)
TASKS = {
    # D4RL's halfcheetah-random recipe; 60 epochs of 1,000 updates; the dynamics capped at 100 epochs (CPU time)
    "halfcheetah-random": ("HalfCheetah-v4", "halfcheetah-random-v2", 100_000, [
        "--epochs", "60", "--dynamics-max-epochs", "100"]),
    # D4RL's medium recipe (behaviour/*_medium_actor.pt); twice the rows, so the dynamics cap is halved: the same
    # number of gradient steps as the random task's 100 epochs (CPU time)
    "halfcheetah-medium": ("HalfCheetah-v4", "halfcheetah-medium-v2", 200_000, [
        "--epochs", "60", "--dynamics-max-epochs", "50"]),
    "hopper-medium": ("Hopper-v4", "hopper-medium-v2", 200_000, ["--epochs", "60", "--dynamics-max-epochs", "50"]),
    # the actor's whole training replay buffer (its size: the steps it took); regenerate it with train-behaviour
    "hopper-medium-replay": ("Hopper-v4", "hopper-medium-replay-v2", 0, [
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
    """tasks to run, of: halfcheetah-random, halfcheetah-medium, hopper-medium, hopper-medium-replay, pendulum,
    hopper"""
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
    report_only: bool = False
    """write the table from the runs already in run_results/, run nothing"""
    extra_lams: tuple[float, ...] = ()
    """more λs on each seed's ensemble (variant `lam<λ>`), beside MOPO at the published λ and λ = 0"""
    device: str = "cpu"
    """mopo.py's --device for every job (cuda: every job on the GPU, `--jobs` of them at once)"""


def data_recipe(task: str) -> str:
    return task.split("-", 1)[1] if "-" in task else "random"


def run(cmd, cwd, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") as f:  # a resumed run's log goes on after its first part
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed; see {log}")


def run_dir(cwd, exp_name):
    return sorted((Path(cwd) / "runs").glob(f"*__{exp_name}__*"))[-1]  # the newest: its name ends in a time


def resume_flags(cwd, exp_name) -> list[str]:
    """`--resume <folder>` for a run an earlier call left unfinished (stopped, killed, the machine shut down): its
    checkpoint.pt is there and its results are not in run_results/ (else it is not run again); none for a new run."""
    left = sorted((Path(cwd) / "runs").glob(f"*__{exp_name}__*/checkpoint.pt"))
    return ["--resume", str(left[-1].parent.relative_to(cwd))] if left else []


def data_summary(task: str, returns: np.ndarray, transitions: int) -> dict:
    """The episodes' returns, and their D4RL normalized score where the task has reference scores (mopo.py's)."""
    scores = mopo.summarize(mopo.make_task(TASKS[task][1]), {"return": returns})
    out = {"mean_return": scores["return"], "std_return": scores["return_std"], "episodes": len(returns),
           "transitions": transitions}
    return out | ({"normalized_score": scores["normalized_score"]} if "normalized_score" in scores else {})


def write_dataset(task: str, out_dir: Path, transitions: int = 0, behaviour: Path = BEHAVIOUR) -> tuple[Path, dict]:
    """The task's dataset (seed 0), with `transitions` rows if > 0, else the task's; and a summary of its episodes.
    An earlier call's file is kept when what made it (the task, its rows, the bytes of make_dataset.py, mopo.py and
    the actor or replay file it is drawn from) is unchanged: its `recipe` attribute, written last, says so."""
    gym_id, _, default, _ = TASKS[task]
    path, transitions = out_dir / f"{task.replace('-', '_')}.hdf5", transitions or default
    family, recipe = gym_id.split("-")[0].lower(), data_recipe(task)
    actor, replay = behaviour / f"{family}_medium_actor.pt", behaviour / f"{family}_medium_replay.hdf5"
    digest = hashlib.sha256(f"{task} {transitions}".encode())
    drawn_from = {"medium": [actor], "medium-replay": [replay]}.get(recipe, [])
    for source in [HERE / "make_dataset.py", HERE.parent / "mopo.py", *drawn_from]:
        digest.update(source.read_bytes() if source.is_file() else b"")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("recipe") == digest.hexdigest():
                return path, json.loads(f.attrs["summary"])
    except OSError:  # absent, or cut off while it was written: written (again)
        pass
    if recipe == "medium":
        returns = make_medium(path, actor, transitions, seed=0)
    elif recipe == "medium-replay":
        if not replay.is_file():
            raise FileNotFoundError(f"{replay} is missing: python benchmarks/make_dataset.py train-behaviour ... "
                                    f"--replay-out {replay} writes it (see benchmarks/README.md)")
        shutil.copyfile(replay, path)
        returns, transitions = episode_returns(path), len(h5py.File(path, "r")["rewards"])
    else:
        returns = make_dataset(path, gym_id, transitions, seed=0)
    summary = data_summary(task, returns, transitions)
    with h5py.File(path, "a") as f:
        f.attrs["summary"], f.attrs["recipe"] = json.dumps(summary), digest.hexdigest()
    return path, summary


def episode_returns(path: Path) -> np.ndarray:
    """The returns of a file's complete episodes (each ends at a terminal or a timeout)."""
    with h5py.File(path, "r") as f:
        rewards, ends = f["rewards"][()], f["terminals"][()] | f["timeouts"][()]
    return np.array([part.sum() for part in np.split(rewards, np.flatnonzero(ends) + 1)[:-1]])


def saved_runs(out_dir: Path) -> dict:
    """(task, seed) → {variant: results} of the runs in run_results/ (earlier calls'), the newest of each variant."""
    found = {}
    for file in sorted((out_dir / "run_results").glob("*/results.json")):
        task, variant, seed = file.parent.name.split("__")[1].rsplit("-", 2)
        found.setdefault((task, int(seed.removeprefix("s"))), {})[variant] = json.loads(file.read_text())
    return found


def main(args: Args) -> dict:
    quick = args.epochs > 0 or args.dynamics_max_epochs > 0
    out_dir = Path(args.out_dir or (Path("learns_quick") if quick else HERE / "results" / "learns")
                   / "+".join(args.tasks)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    def flags(task, seed):  # paths relative to out_dir, where every job runs: the results hold no absolute path
        _, env_id, _, extra = TASKS[task]
        extra = list(extra)
        for name, value in (("--epochs", args.epochs), ("--dynamics-max-epochs", args.dynamics_max_epochs)):
            if value > 0:
                extra[extra.index(name) + 1] = str(value)
        return [sys.executable, str(HERE.parent / "mopo.py"), "--env-id", env_id, "--dataset-path", paths[task].name,
                "--seed", str(seed), "--device", args.device, *extra]

    def job(task, seed, variant, *extra) -> tuple[Path, dict]:
        """One mopo.py run, or the rest of one an earlier call left; its folder, and its results.json with its wall
        time (a resumed run's: "resumed_wall_s", this call's part), kept in run_results/ at once."""
        name, start = f"{task}-{variant}-s{seed}", time.time()
        resume = resume_flags(out_dir, name)
        run(flags(task, seed) + ["--exp-name", name, *extra, *resume], out_dir, out_dir / f"{name}.log")
        folder = run_dir(out_dir, name)
        wall = {"resumed_wall_s" if resume else "wall_s": time.time() - start}
        results = json.loads((folder / "results.json").read_text()) | wall
        (out_dir / "run_results" / folder.name).mkdir(parents=True, exist_ok=True)
        (out_dir / "run_results" / folder.name / "results.json").write_text(json.dumps(results, indent=2))
        return folder.relative_to(out_dir), results

    start, paths, behaviour = time.time(), {}, {}
    results = {k: v for k, v in saved_runs(out_dir).items() if k[0] in args.tasks}
    for task in args.tasks:
        paths[task], behaviour[task] = write_dataset(task, out_dir)
    variants = [("mopo", [])] + [(f"lam{x}", ["--lam", str(x)]) for x in args.extra_lams] + [("lam0", ["--lam", "0.0"])]
    todo = [(t, s) for t in args.tasks for s in args.seeds
            if not {v for v, _ in variants} <= set(results.get((t, s), {}))]

    def model(task, seed) -> tuple[Path, dict]:
        """The seed's ensemble: the saved one where an earlier call's weights are still here, else trained anew."""
        saved = sorted((out_dir / "runs").glob(f"*__{task}-model-s{seed}__*/dynamics.pt"))
        if saved and "model" in results.get((task, seed), {}):
            return saved[-1].parent.relative_to(out_dir), results[(task, seed)]["model"]
        return job(task, seed, "model", "--epochs", "0")
    if args.report_only:
        return report(args, behaviour, results, time.time() - start, out_dir)
    print(f"runs already in {out_dir.name}/run_results: {[(k, sorted(v)) for k, v in sorted(results.items())]}; "
          f"seeds to run: {todo}", flush=True)
    pool = ThreadPoolExecutor(args.jobs)
    try:  # a failed job ends the benchmark: the queued ones are cancelled
        models = {pool.submit(model, t, s): (t, s) for t, s in todo}
        policies, runs = {}, {}
        for future in as_completed(models):
            (task, seed), (folder, r) = models[future], future.result()
            earlier = {v: done for v, done in results.get((task, seed), {}).items() if v != "model"}
            runs[(task, seed)] = {"model": r} | earlier
            policies |= {pool.submit(job, task, seed, v, "--dynamics-path", str(folder), *lam): (task, seed, v)
                         for v, lam in variants if v not in runs[(task, seed)]}
        for future in as_completed(policies):  # a seed's table row as soon as its runs are done
            task, seed, variant = policies[future]
            runs[(task, seed)][variant] = future.result()[1]
            if {v for v, _ in variants} <= set(runs[(task, seed)]):
                results[(task, seed)] = runs[(task, seed)]
                report(args, behaviour, results, time.time() - start, out_dir)
    finally:
        pool.shutdown(cancel_futures=True)
    return report(args, behaviour, results, time.time() - start, out_dir)


def fmt(values):
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "–"


def bound(run: dict) -> str:
    """How many of a run's evaluations broke Theorem 4.4's bound (D18), from its per-evaluation record."""
    evaluations = run["evaluations"]
    return f"{sum(e.get('bound_broken', 0) > 0 for e in evaluations)}/{len(evaluations)}"


def run_summary(variant: str, results: dict) -> dict:
    """A model run: its wall time and the ensemble's statistics; a policy run: its results.json."""
    return {"wall_s": results.get("wall_s"), **results["dynamics"]} if variant == "model" else results


def report(args: Args, behaviour: dict, results: dict, wall: float, out_dir: Path) -> dict:
    root = HERE.parent  # the commands name the folder from the repository's root, never by an absolute path
    where = out_dir.relative_to(root) if out_dir.is_relative_to(root) else out_dir.name
    lines = ["| task | data | MOPO final | per seed | λ = 0 (MBPO) final | per seed | MOPO beats the data on every "
             "seed | bound broken (evaluations, MOPO per seed) |", "|---|---|---|---|---|---|---|---|"]
    table = {}
    for task in args.tasks:
        seeds = {v: sorted(s for (t, s), runs in results.items() if t == task and v in runs) for v in ("mopo", "lam0")}
        d4rl = "-" in task  # D4RL-named tasks: normalized score; the gymnasium ones: raw returns
        key = "final_normalized_score" if d4rl else "final_return"
        data = behaviour[task]["normalized_score" if d4rl else "mean_return"]
        mopo = [results[(task, s)]["mopo"][key] for s in seeds["mopo"]]  # each seed's as it lands
        lam0 = [results[(task, s)]["lam0"][key] for s in seeds["lam0"]]
        beats = bool(mopo) and all(m > data for m in mopo)
        broken = [bound(results[(task, s)]["mopo"]) for s in seeds["mopo"]]
        table[task] = {"behaviour": behaviour[task], "metric": key, "seeds": seeds, "mopo": mopo, "lam0": lam0,
                       "beats": beats, "bound_broken": broken, "flags": TASKS[task][3],
                       "lam": results[(task, seeds["mopo"][0])]["mopo"]["lam"] if mopo else None}
        per_seed = {v: ", ".join(f"s{s} {x:.1f}" for s, x in zip(seeds[v], xs)) for v, xs in (("mopo", mopo),
                                                                                            ("lam0", lam0))}
        lines.append(f"| {task} | {data:.1f} | {fmt(mopo)} | {per_seed['mopo']} | {fmt(lam0)} | {per_seed['lam0']} | "
                     f"{'yes' if beats else 'NO'} | {', '.join(broken)} |")
    lines += [f"\nwall time of this call {wall / 60:.1f} min, {args.jobs} jobs at a time, 1 torch thread each, "
              f"--device {args.device}. D4RL-named tasks: D4RL normalized score; pendulum, hopper: raw returns.",
              f"Curves: python benchmarks/plot.py {where}/run_results --label-by lam --out {where}/curves.png",
              f"Gauge: python benchmarks/plot.py {where}/run_results/*mopo-s* --gauge --out {where}/gauge.png"]
    for (task, seed), runs in sorted(results.items()):
        for variant in sorted(set(runs) - {"model", "mopo", "lam0"}):  # --extra-lams, on the seed's ensemble
            key = "final_normalized_score" if "-" in task else "final_return"
            lines.append(f"{task} seed {seed}, λ = {runs[variant]['lam']}: {runs[variant][key]:.1f}, bound broken at "
                         f"{bound(runs[variant])} evaluations")
    text = "\n".join(lines)
    print(text, flush=True)
    (out_dir / "table.md").write_text(text + "\n")
    summary = {"tasks": table, "wall_s_of_this_call": wall, "args": vars(args) | {"out_dir": "."},
               "runs": {f"{t}/seed_{s}": {v: run_summary(v, r[v]) for v in r} for (t, s), r in sorted(results.items())}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
