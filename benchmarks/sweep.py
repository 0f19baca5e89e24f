"""Reproduce the D4RL table, or any grid of tasks × seeds × λ × h, through submitit: SLURM jobs on a cluster, its
local executor on one machine (README "Reproduce the D4RL table").

    python benchmarks/sweep.py                                            # 9 tasks × 4 seeds at the published (h, λ)
    python benchmarks/sweep.py --cluster local --gpus 1 --runs-per-gpu 4  # one machine: 4 runs share its GPU
    python benchmarks/sweep.py --lams 1 2.5 5 --rollout-lengths 1 5 --dry-run -- --epochs 300   # mopo.py flags after --
    python benchmarks/sweep.py --collect sweeps/d4rl                      # the table: mean ± std over seeds

Stage 1 trains one ensemble per (task, seed) (`mopo.py --epochs 0`) in `<sweep-dir>/<task>/seed_<s>/model/`; stage 2
runs each (λ, h) on it (`--dynamics-path`) in `<sweep-dir>/<task>/lam_<λ>__h_<h>/seed_<s>/` (`default`: the task's
published value). mopo.py writes `runs/<run>/` under that working directory and its output to `mopo.log` there. A job
decides from the disk what to do (skip a finished run, `--resume` one with a checkpoint, or start), so a requeued job
and the same sweep run again both continue where the runs are.
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import cloudpickle
import numpy as np
import submitit
import tyro

MOPO = Path(__file__).resolve().parents[1] / "mopo.py"
# OfflineRL-Kit's MOPO scores (D4RL normalized, 4 seeds) at its own (h, λ); README "Per-task settings"
PUBLISHED = {
    "halfcheetah-medium-v2": (5, 0.5, "72.4 ± 4.2"), "hopper-medium-v2": (5, 5.0, "62.8 ± 38.1"),
    "walker2d-medium-v2": (5, 0.5, "84.1 ± 3.2"), "halfcheetah-medium-replay-v2": (5, 0.5, "72.1 ± 3.8"),
    "hopper-medium-replay-v2": (5, 2.5, "92.7 ± 20.7"), "walker2d-medium-replay-v2": (1, 2.5, "85.9 ± 5.3"),
    "halfcheetah-medium-expert-v2": (5, 2.5, "83.6 ± 12.5"), "hopper-medium-expert-v2": (5, 5.0, "74.6 ± 44.2"),
    "walker2d-medium-expert-v2": (1, 2.5, "108.2 ± 4.3"),
}
SET_BY_SWEEP = ("--env-id", "--seed", "--lam", "--rollout-length", "--dynamics-path", "--resume")


@dataclass
class Args:
    env_ids: tuple[str, ...] = tuple(PUBLISHED)
    """D4RL tasks (default: the 9 with a published OfflineRL-Kit score)"""
    seeds: tuple[int, ...] = (1, 2, 3, 4)
    """seeds; each (task, seed) trains one ensemble, shared by all its (λ, h)"""
    lams: tuple[float, ...] = ()
    """λ values (default: none passed, so mopo.py uses the task's published λ)"""
    rollout_lengths: tuple[int, ...] = ()
    """h values (default: the task's published h)"""
    mopo_flags: tyro.conf.Suppress[tuple[str, ...]] = ()
    """any other mopo.py flags, for every run: on the command line, everything after `--`"""
    sweep_dir: str = "sweeps/d4rl"
    """where the jobs' working directories and logs go"""
    cluster: Literal["auto", "slurm", "local"] = "auto"
    """slurm: one sbatch job per run; local: this machine; auto: slurm where `srun` exists"""
    timeout_min: int = 24 * 60
    """time limit per job; a job reaching it is checkpointed and requeued, at most --max-timeouts times"""
    max_timeouts: int = 3
    """requeues after a time limit per job (after a preemption: always)"""
    signal_delay_s: int = 120
    """seconds before the time limit at which the job is signalled to checkpoint"""
    partition: Optional[str] = None
    """SLURM partition"""
    gpus_per_job: int = 1
    """SLURM: GPUs per job"""
    cpus_per_job: int = 4
    """SLURM: CPUs per job (and torch threads)"""
    slurm: tuple[str, ...] = ()
    """SLURM: more sbatch options as key=value (account=..., qos=..., mem=32G)"""
    gpus: int = 0
    """local: GPUs of this machine to use (0: CPU only)"""
    runs_per_gpu: int = 4
    """local: runs sharing each GPU at once"""
    max_parallel: int = 2
    """local, CPU only: runs at once (torch threads = cores / runs)"""
    dry_run: bool = False
    """print the jobs and where each writes; submit nothing"""
    collect: Optional[str] = None
    """gather the results.json under this sweep folder into table.md and table.csv there; runs nothing"""


def read_results(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def expected_evaluations(a: dict) -> int:  # mopo.py evaluates every eval_freq epochs and after the last one
    return sum(1 for e in range(1, a["epochs"] + 1) if e % a["eval_freq"] == 0 or e == a["epochs"])


def complete(r: Optional[dict]) -> bool:
    return (r is not None and r["final_return"] is not None
            and len(r["evaluations"]) == expected_evaluations(r["args"]))


class Job(submitit.helpers.Checkpointable):
    """One mopo.py run in its working directory: skips it if finished, resumes the newest run folder holding a
    checkpoint, or starts afresh (a folder killed before its first checkpoint stays; a new one is made beside it)."""

    def __init__(self, workdir: str, flags: tuple, model_dir: Optional[str] = None, threads: int = 1):
        self.workdir, self.flags, self.model_dir, self.threads = workdir, tuple(flags), model_dir, threads

    def runs(self) -> list:  # run folders, newest first (mopo.py names them ..._<unix time>)
        folders = [p for p in (Path(self.workdir) / "runs").glob("*__*") if p.is_dir()]
        return sorted(folders, key=lambda p: int(p.name.rsplit("__", 1)[1]), reverse=True)

    def finished(self) -> Optional[Path]:  # stage 1 is done once it saved the ensemble
        return next((run for run in self.runs() if ((run / "dynamics.pt").is_file() if self.model_dir is None
                                                     else complete(read_results(run / "results.json")))), None)

    def to_resume(self) -> Optional[Path]:
        return next((run for run in self.runs() if (run / "checkpoint.pt").is_file()), None)

    def command(self) -> list:
        """mopo.py's flags for the state on disk now (call when not finished)."""
        if self.to_resume() is not None:
            return ["--resume", str(self.to_resume())]  # a resumed run keeps every setting it started with
        if self.model_dir is None:
            return [*self.flags, "--epochs", "0"]  # the last --epochs wins
        model = Job(self.model_dir, ()).finished()
        return [*self.flags, "--dynamics-path", str(model or Path(self.model_dir) / "runs" / "<stage-1 run>")]

    def __call__(self) -> str:
        if self.finished() is None:
            if self.model_dir is not None and Job(self.model_dir, ()).finished() is None:
                raise RuntimeError(f"{self.workdir}: no trained ensemble in {self.model_dir}")
            cmd = [sys.executable, str(MOPO), *self.command()]
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
            # SLURM signals every process of the job step; SIG_IGN survives exec, so submitit's checkpoint signal
            # (USR2) cannot kill mopo.py with its default action. mopo.py gets SIGTERM from checkpoint() instead.
            usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
            with open(Path(self.workdir) / "mopo.log", "a") as log:
                print(f"$ {shlex.join(cmd)}", file=log, flush=True)
                self._proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                              env={**os.environ, "OMP_NUM_THREADS": str(self.threads)},
                                              preexec_fn=lambda: signal.signal(usr_sig, signal.SIG_IGN))
                code = self._proc.wait()
            if code != 0:
                why = " (SIGTERM from outside the sweep: run the sweep again to resume)" if code == 143 else ""
                raise RuntimeError(f"mopo.py exited with {code}{why}; see {Path(self.workdir) / 'mopo.log'}")
        if self.finished() is None:  # or the runs waiting for this model would wait forever
            raise RuntimeError(f"mopo.py exited with 0 but {self.workdir} holds no finished run")
        return str(self.finished())

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit, in the job's main process, on the preemption or time-limit signal; it requeues what
        this returns. Forward SIGTERM to mopo.py, which writes checkpoint.pt at the update it is on and exits 143,
        and wait for that: the job exits (and SLURM kills what is left) as soon as this returns."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:  # WNOWAIT: wait without reaping, as __call__'s proc.wait() holds Popen's lock under this handler
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # already reaped
                pass
        # a new Job (a Popen does not pickle), whose call finds the checkpoint and resumes
        return submitit.helpers.DelayedSubmission(Job(self.workdir, self.flags, self.model_dir, self.threads))


def on_slurm(args: Args) -> bool:
    return args.cluster == "slurm" or args.cluster == "auto" and submitit.AutoExecutor.which() == "slurm"


def plan(args: Args) -> list:
    """[(job, the stage-1 job it waits for or None)], each stage-1 job before its runs."""
    flags = args.mopo_flags
    taken = [f for f in flags if f.split("=")[0] in SET_BY_SWEEP]
    if taken:
        raise SystemExit(f"error: the sweep sets {taken} itself (--env-ids, --seeds, --lams, --rollout-lengths)")
    root = Path(args.sweep_dir).resolve()
    parallel = args.gpus * args.runs_per_gpu or args.max_parallel
    threads = args.cpus_per_job if on_slurm(args) else max(1, len(os.sched_getaffinity(0)) // parallel)
    jobs = []
    for env_id in args.env_ids:
        for seed in args.seeds:
            base = ("--env-id", env_id, "--seed", str(seed), *flags)
            model = Job(str(root / env_id / f"seed_{seed}" / "model"), base, threads=threads)
            jobs.append((model, None))
            for lam in args.lams or (None,):
                for h in args.rollout_lengths or (None,):
                    setting = (["--lam", str(lam)] if lam is not None else []) + (
                        ["--rollout-length", str(h)] if h is not None else [])
                    name = f"lam_{'default' if lam is None else lam}__h_{'default' if h is None else h}"
                    jobs.append((Job(str(root / env_id / name / f"seed_{seed}"), (*base, *setting),
                                     model_dir=model.workdir, threads=threads), model))
    return jobs


def describe(job: Job, after: Optional[Job]) -> str:
    if job.finished() is not None:
        state = "done"
    else:
        state = "resume" if job.to_resume() is not None else "new"
        state += " after its model" if after is not None and after.finished() is None else ""
    line = f"{'model' if after is None else 'run':5} {state:22} {job.workdir}"
    return line if state == "done" else f"{line}\n      mopo.py {shlex.join(job.command())}"


def slurm_parameters(args: Args, dependency: Optional[str] = None) -> dict:
    """sbatch options of one job. A stage-2 job waits for its model with afterok: SLURM holds it while the model job
    runs or is requeued, and cancels it if the model job fails (kill-on-invalid-dep)."""
    extra = dict(kv.split("=", 1) for kv in args.slurm)
    return dict(time=args.timeout_min, signal_delay_s=args.signal_delay_s, gpus_per_node=args.gpus_per_job or None,
                cpus_per_task=args.cpus_per_job, partition=args.partition, stderr_to_stdout=True,
                dependency=f"afterok:{dependency}" if dependency else None,
                additional_parameters={"kill-on-invalid-dep": "yes", **extra})


def submit_slurm(args: Args, todo: list, folder: Path) -> None:
    """Submit everything at once; stage-2 jobs depend on their stage-1 job, so this returns right away."""
    executor = submitit.SlurmExecutor(folder, max_num_timeout=args.max_timeouts)
    ids = {}
    for job, after in todo:
        executor.update_parameters(**slurm_parameters(args, after and ids.get(after.workdir)),
                                   job_name=f"mopo-{Path(job.workdir).relative_to(Path(args.sweep_dir).resolve())}")
        ids[job.workdir] = executor.submit(job).job_id
        print(f"submitted {ids[job.workdir]}: {job.workdir}")
    print(f"{len(todo)} jobs submitted; when they are done: python {sys.argv[0]} --collect {args.sweep_dir}")


def run_local(args: Args, todo: list, folder: Path) -> list:
    """The local executor starts every job it is given at once and knows no dependencies, so this loop is the queue:
    at most one run per slot (a GPU id repeated --runs-per-gpu times, or --max-parallel CPU slots), and a stage-2 job
    starts once its model's dynamics.pt is saved (whole: mopo.py writes it atomically). Returns the failed jobs."""
    executor = submitit.LocalExecutor(folder, max_num_timeout=args.max_timeouts)
    executor.update_parameters(timeout_min=args.timeout_min, signal_delay_s=args.signal_delay_s,
                               stderr_to_stdout=True)
    slots = [g for g in range(args.gpus) for _ in range(args.runs_per_gpu)] or [None] * args.max_parallel
    running, failed = {}, []
    waiting = sorted(todo, key=lambda job_after: job_after[1] is not None)  # every model first
    while waiting or running:
        for slot, (job, sub) in list(running.items()):
            if sub.done():
                del running[slot]
                try:
                    sub.result()
                    print(f"finished {job.workdir}")
                except Exception as e:  # noqa: BLE001 - report and go on with the other runs
                    print(f"FAILED {job.workdir}: {str(e).strip().splitlines()[-1]} (log: {sub.paths.stdout})")
                    dropped = [j.workdir for j, after in waiting if after is not None and after.workdir == job.workdir]
                    waiting = [(j, after) for j, after in waiting if j.workdir not in dropped]
                    failed += [job.workdir, *dropped]
        for slot, gpu in enumerate(slots):
            if slot in running:
                continue
            ready = next((i for i, (_, after) in enumerate(waiting) if after is None or after.finished()), None)
            if ready is None:
                break
            job, _ = waiting.pop(ready)
            executor.update_parameters(gpus_per_node=0 if gpu is None else 1,  # CUDA_VISIBLE_DEVICES="" for CPU
                                       visible_gpus=() if gpu is None else (gpu,))
            running[slot] = (job, executor.submit(job))
            print(f"started {job.workdir}" + ("" if gpu is None else f" on GPU {gpu}"))
        time.sleep(0.5)
    return failed


def collect(sweep_dir: str) -> dict:
    """Per task and (h, λ): mean ± std over seeds of the final normalized score (the raw return where the task has no
    reference scores), the seeds whose run broke Theorem 4.4's bound at any evaluation (mopo.py's D18), next to the
    published figure at the published (h, λ). Missing, unreadable or unfinished results are listed by path, and the
    table is built from the rest."""
    root, problems, groups = Path(sweep_dir), [], defaultdict(dict)
    for run in sorted(p for p in root.rglob("runs/*__*") if p.is_dir()):
        r = read_results(run / "results.json")
        if r is None:
            state = "unreadable" if (run / "results.json").exists() else "missing (not evaluated yet?)"
            problems.append(f"{run / 'results.json'}: {state}")
        elif r["args"]["epochs"] > 0 and not complete(r):
            problems.append(f"{run / 'results.json'}: unfinished, {len(r['evaluations'])} of "
                            f"{expected_evaluations(r['args'])} evaluations")
        elif r["args"]["epochs"] > 0:  # epochs 0: a stage-1 model
            metric = "normalized score" if r["final_normalized_score"] is not None else "return"
            key = (r["env_id"], r["rollout_length"], r["lam"], metric)
            if r["seed"] in groups[key]:
                problems.append(f"{run}: a second run of seed {r['seed']}, not counted")
            else:
                groups[key][r["seed"]] = (r["final_normalized_score" if metric != "return" else "final_return"],
                                          r.get("bound_broken_evaluations"))  # D18's count; None: no gauge
    rows = []
    for (env_id, h, lam, metric), by_seed in sorted(groups.items()):
        values = [by_seed[s][0] for s in sorted(by_seed)]
        gauged = [by_seed[s][1] for s in sorted(by_seed) if by_seed[s][1] is not None]
        published = PUBLISHED.get(env_id, (None, None, ""))
        rows.append({"env_id": env_id, "rollout_length": h, "lam": lam, "metric": metric, "seeds": len(values),
                     "mean": float(np.mean(values)), "std": float(np.std(values)),
                     "per_seed": " ".join(f"{v:.1f}" for v in values),
                     "bound_broken": f"{sum(n > 0 for n in gauged)}/{len(gauged)}" if gauged else "",
                     "published": published[2] if published[:2] == (h, lam) else ""})
    lines = ["| task | h | λ | seeds | ours: mean ± std | per seed | metric | bound broken (seeds) | OfflineRL-Kit "
             "(4 seeds) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['env_id']} | {r['rollout_length']} | {r['lam']} | {r['seeds']} | {r['mean']:.1f} ± "
              f"{r['std']:.1f} | {r['per_seed']} | {r['metric']} | {r['bound_broken']} | {r['published']} |"
              for r in rows]
    for line in problems:
        print(f"not counted: {line}")
    print("\n".join(lines))
    (root / "table.md").write_text("\n".join(lines) + "\n")
    with open(root / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["env_id"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {root / 'table.md'} and table.csv; curves: python benchmarks/plot.py {root}/*/lam_*/seed_*/runs")
    return {"rows": rows, "problems": problems}


def main(args: Args):
    if args.collect is not None:
        return collect(args.collect)
    jobs = plan(args)
    if args.dry_run:
        for job, after in jobs:
            print(describe(job, after))
        print(f"{len(jobs)} jobs ({sum(after is None for _, after in jobs)} models); nothing submitted")
        return jobs
    todo = [(job, after) for job, after in jobs if job.finished() is None]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already finished; {len(todo)} to run")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # jobs need not find benchmarks/ on their path
    folder = Path(args.sweep_dir).resolve() / "submitit" / "%j"
    if on_slurm(args):
        return submit_slurm(args, todo, folder)
    failed = run_local(args, todo, folder)
    result = collect(args.sweep_dir)
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed or were skipped: {', '.join(failed)}")
    return result


if __name__ == "__main__":
    argv = sys.argv[1:]
    args, unknown = tyro.cli(Args, args=argv, return_unknown_args=True, description="Run a grid of mopo.py runs "
                             "through submitit, or --collect its table. mopo.py flags for every run go after --.")
    if unknown != (argv[argv.index("--") + 1:] if "--" in argv else []):
        raise SystemExit(f"error: unknown flags {unknown}; flags for mopo.py go after --")
    main(replace(args, mopo_flags=tuple(unknown)))
