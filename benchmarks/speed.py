"""How fast are mopo.py's three loops? Each measured as the program runs it, next to the bare compute of the same
networks on pre-made tensors, in the same process; then what an evaluation and a checkpoint cost, (on request) a
measured stretch of `mopo.main`, and a projection of a full D4RL-sized run from the measured parts.

    python benchmarks/speed.py --threads 1            # CPU, ~2 min
    python benchmarks/speed.py --threads 2 --out speed_2threads.json
    python benchmarks/speed.py --device cuda --dynamics-to-early-stop   # on a GPU machine: eager and CUDA graph
    python benchmarks/speed.py --dataset-size 1000000 # D4RL-sized data

Loops (hopper dims: obs 11, act 3; the dataset is generated from Hopper-v4 with random actions):
- dynamics epoch: one epoch of `train_dynamics` on `model_data` of the dataset (bootstrap batches of 7×256); bare =
  the same number of forward+backward+Adam steps of the same ensemble on one pre-made batch.
- rollout round: `rollout` of `--rollout-batch-size` start states × h steps, its `step_fn` `model_step` bound as
  `main` binds it (aleatoric penalty, hopper termination function), after the ensemble is trained for one epoch (so
  terminations are realistic); bare = actor + ensemble forward on pre-made tensors with the same number of rows per
  step.
- SAC update: batch sampling (`sample_mixed`, real_ratio 0.05) + `sac_update` of a `mopo.SAC` with its
  `sac_optimizers`; bare = `sac_update` on one pre-made batch.
- MOPO phase: `--rollout-freq` updates plus one rollout round, as in `main` → updates/s.
On CUDA each loop also runs as `main` runs it with `--cuda-graph` (the default there): the SAC update recorded once by
`mopo.cuda_graph` (its own SAC module and capturable Adams) and replayed; the dynamics epoch with a graph per full
minibatch (a call captures once, so the marginal cost of an epoch, from a 1- and a 3-epoch call, is given too). The
"mopo.py" column of the first table is then the eager path (`--no-cuda-graph`).

Evaluation, as `main` runs it every `eval_freq` epochs, in turn with training (`mopo.evaluate`: 10 episodes side by
side in a SyncVectorEnv, the policy on a CPU copy; Theorem 4.4's gauge `model_returns` on the training modules, from
the episodes' start states, up to 1000 steps, seeded as `evaluate` seeds it):
- hopper, with the benchmark's actor (short episodes: its policy falls at once): the episodes, the gauge, and one
  whole `evaluate` call with the gauge bound as `main` binds it (a CUDA graph on CUDA);
- full length: HalfCheetah (`halfcheetah-medium-v2`'s env never terminates: 10 × 1000 steps) with a random-init actor,
  and the gauge for 1000 steps in an ensemble of HalfCheetah's dims (random init, mean head zeroed so that 1000 model
  steps stay finite: same compute), on CPU twins and, on CUDA, on GPU modules, eager and as a CUDA graph (what
  `main` runs there); also the same 10 episodes in an AsyncVectorEnv (forkserver; its workers re-import this script,
  as they would mopo.py), for information;
- one policy checkpoint write (`save_checkpoint`: SAC, optimizer states, the full model buffer, RNG states), as
  `main` writes every 10 epochs.

`--e2e-epochs N` (default 20 on CUDA, 0 = skip on CPU): `mopo.main` on hopper-medium-v2 with the generated data and
an ensemble trained here (`--dynamics-path`), N epochs of 1,000 updates, 10 evaluation episodes every `eval_freq`
epochs and after the last, all other settings default, in a temporary folder; on CUDA once with CUDA graphs and once
eager (`--skip-eager-e2e`; `--e2e-eager-epochs`); `--budget-s` shortens (or skips) either run to end in time. Its wall
time is measured around `main`; its parts by timing what `main` calls: `rollout`, `save_checkpoint` and `evaluate`
(device synced) and `record` (the evaluation's logging). Policy phase = first rollout to the end of `main`; updates/s
excl. eval leaves out main's time in evaluations (`evaluate` + `record`) and checkpoint writes.

Projection of a D4RL-sized default run from the measured parts (not a measured run): 1M transitions, 1,000 epochs of
1,000 updates, an evaluation every `mopo.Args().eval_freq` epochs (200), each a whole evaluation (10 full-length
episodes + the gauge, as `main` gauges on the device) in the training thread, a checkpoint every 10 epochs (the
last among them) and at the start (101), dynamics to early stopping; with `--dynamics-to-early-stop` the ensemble is
also trained to early stopping on the generated data (its epoch count stands in for E; capped by
`--early-stop-max-s`, checked at epoch ends; an ensemble stopped by that cap is not used).
Peak memory: max RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA (after the loops).
"""

import copy
import functools
import json
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import gymnasium as gym
import torch
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import mopo  # noqa: E402
from make_dataset import make_dataset  # noqa: E402


# D4RL-sized, at main's defaults: an evaluation every eval_freq epochs and after the last; a checkpoint every
# checkpoint_freq epochs and after the last, and one before the first update
DEFAULTS, FULL_EPOCHS = mopo.Args(), 1000
FULL_RUN = {"transitions": 1_000_000, "epochs": FULL_EPOCHS, "updates": FULL_EPOCHS * DEFAULTS.steps_per_epoch,
            "eval_freq": DEFAULTS.eval_freq, "evaluations": -(-FULL_EPOCHS // DEFAULTS.eval_freq),
            "checkpoints": -(-FULL_EPOCHS // DEFAULTS.checkpoint_freq) + 1, "budget_s": 1800}
OBS_DIM, ACT_DIM = 11, 3  # hopper's, the dims of the loops measured


@dataclass
class Args:
    threads: int = 1
    """torch CPU threads"""
    device: str = "cpu"
    """torch device"""
    dataset_size: int = 100_000
    """transitions in the generated hopper dataset"""
    dataset_path: Optional[str] = None
    """a hopper file (benchmarks/make_dataset.py) to use instead of generating one; made there if missing"""
    rollout_batch_size: int = 50_000
    """start states per rollout round"""
    rollout_length: int = 5
    """h"""
    rollout_freq: int = 1000
    """updates per rollout round in the MOPO-phase measurement"""
    sac_updates: int = 300
    """timed SAC updates (after warm-up)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    gauge_horizon: int = 1000
    """steps of the gauge's model episodes (main: the env's horizon, 1000)"""
    async_eval: bool = True
    """also time the full-length episodes in gymnasium's AsyncVectorEnv (forkserver; informational)"""
    dynamics_to_early_stop: bool = False
    """also train an ensemble on the dataset until early stopping (dynamics_max_epochs None): its epochs and time"""
    early_stop_max_s: float = 90.0
    """stop that training at the first epoch end after this many seconds (reported as not converged)"""
    e2e_epochs: Optional[int] = None
    """epochs of the end-to-end `mopo.main` run (default: 20 on CUDA, 0 = none on CPU)"""
    e2e_eager_epochs: Optional[int] = None
    """epochs of the eager end-to-end run on CUDA (default: --e2e-epochs)"""
    skip_eager_e2e: bool = False
    """on CUDA, run the end-to-end segment only with CUDA graphs"""
    budget_s: Optional[float] = None
    """the script's own time limit: the eager end-to-end run is shortened (or skipped) to end by then"""
    seed: int = 0
    """seed"""
    out: str = "speed.json"
    """where the JSON goes (rewritten after each part)"""


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return (time.perf_counter() - start) / repeat, out


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@contextmanager
def optional(results, part):
    """A part whose failure must not cost the rest (one GPU run brings back all it can): its error is printed and
    kept in results["errors"]."""
    try:
        yield
    except Exception as e:
        traceback.print_exc()
        results.setdefault("errors", {})[part] = repr(e)


def sac_modules(obs_dim, act_dim, action_space, margs, device, capturable=False):
    """A SAC module and its three fused Adams, as `main` builds them."""
    sac = mopo.SAC(obs_dim, act_dim, action_space, margs.alpha).to(device)
    return sac, mopo.sac_optimizers(sac, margs, device, capturable)


def hopper_step(dynamics):
    """`model_step` bound as `main` binds it for hopper-medium-v2 (aleatoric penalty)."""
    return functools.partial(mopo.model_step, dynamics, penalty_kind="aleatoric", termination_fn=mopo.hopper_done)


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, device, Path(tmp))


def run(args: Args, device: torch.device, tmp: Path) -> dict:
    """Each part in turn (the loops, evaluation, checkpoint, dynamics to early stopping, end to end, projection),
    its results written to --out as it ends; then the tables."""
    began = time.perf_counter()
    cuda = device.type == "cuda"
    margs = mopo.Args(env_id="hopper-medium-v2", dynamics_max_epochs=1, rollout_batch_size=args.rollout_batch_size,
                      rollout_length=args.rollout_length, rollout_freq=args.rollout_freq, cuda_graph=False)
    task = mopo.make_task(margs.env_id)
    path, real = hopper_buffer(args, tmp, device)
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
               "dataset_size": real.size, "cpu": platform_name(),
               "gpu": torch.cuda.get_device_name(device) if cuda else None}
    save = functools.partial(report, results, args.out, began)

    model_rows = mopo.model_data(real)  # (s, a, [r, Δs])
    head = tuple(x[:5000] for x in model_rows)  # for warm-ups: first calls pay one-time library set-up
    dynamics, stats, eager_s = dynamics_epoch(margs, model_rows, head, device, results)
    if cuda:
        dynamics_epoch_graph(margs, model_rows, head, eager_s, device, results)
    save("dynamics epoch")

    dynamics.eval()  # as main, after model training
    modules = functools.partial(sac_modules, OBS_DIM, ACT_DIM, action_space(task), margs, device)
    sac, opts = modules()
    step_fn, h = hopper_step(dynamics), args.rollout_length
    start_obs = real.split(real.sample(args.rollout_batch_size))[0]
    rows = rollout_round(sac.actor, dynamics, step_fn, start_obs, h, device, results)
    save("rollout round")

    model_buffer = mopo.ReplayBuffer(margs.model_retain_epochs * args.rollout_batch_size * h, OBS_DIM, ACT_DIM, device)
    while model_buffer.size < model_buffer.capacity:
        model_buffer.add(rows)
    sample = lambda: real.split(mopo.sample_mixed(real, model_buffer, margs.batch_size, margs.real_ratio))  # noqa: E731
    update = sac_step(sac, opts, sample, margs)
    bare = functools.partial(mopo.sac_update, sac, opts, sample(), margs)  # on one pre-made batch
    eager_s, bare_update_s = sac_update_costs(args, update, bare, device, results)
    graph = sac_update_graph(args, margs, modules, sample, eager_s, device, results) if cuda else None
    save("SAC update")

    bare_phase_s = results["rollout_round"]["bare_s"] + args.rollout_freq * bare_update_s
    eager_s = mopo_phase(args, model_buffer, rollout_fn(sac.actor, step_fn, start_obs, h), update, bare_phase_s,
                         device, results)
    if graph:  # rollouts from the graph path's actor, as in main
        g_actor, g_update = graph
        mopo_phase_graph(args, model_buffer, rollout_fn(g_actor, step_fn, start_obs, h), g_update, eager_s, device,
                         results)
    results["peak_memory_mb"] = peak_memory_mb(device)
    results["dynamics_stats"] = stats
    save("MOPO phase")

    evaluation_costs(args, task, sac.actor, dynamics, device, results)
    save("evaluation")
    results["checkpoint"] = checkpoint_cost(tmp, margs, real.size, dynamics, sac, opts, model_buffer, device)
    save("checkpoint")

    trained = dynamics  # what the end-to-end run loads: this 1-epoch ensemble, or the early-stopped one
    if args.dynamics_to_early_stop:
        if (model := dynamics_to_early_stop(args, margs, model_rows, device, results)) is not None:
            trained, stats = model, results["dynamics_early_stop"]["stats"]
        save("dynamics to early stopping")

    e2e_epochs = args.e2e_epochs if args.e2e_epochs is not None else (20 if cuda else 0)
    if e2e_epochs > 0:
        dyn_path = tmp / "dynamics.pt"
        mopo.atomic_save(dyn_path, {"state_dict": trained.state_dict(), "config": trained.config,
                                    "env_id": margs.env_id, "stats": stats})
        end_to_end_runs(args, e2e_epochs, path, dyn_path, device, tmp, results, began)

    results["projection"] = projection(results)
    save("projection")
    print(table(results))
    return results


def report(results: dict, out: str, began: float, part: str) -> None:
    """A part is done: say so, and rewrite the JSON with the results so far."""
    print(f"[{time.perf_counter() - began:6.1f} s] {part} done", flush=True)
    Path(out).write_text(json.dumps(results, indent=2))


def hopper_buffer(args: Args, tmp: Path, device: torch.device) -> tuple[Path, mopo.ReplayBuffer]:
    """The hopper dataset's file (--dataset-path, made there if missing, or generated in tmp) and its transitions in
    a ReplayBuffer on the device."""
    path = Path(args.dataset_path).resolve() if args.dataset_path else tmp / "hopper_random.hdf5"
    if not path.exists():
        make_dataset(path, "Hopper-v4", args.dataset_size, seed=args.seed)
    data = mopo.load_dataset(path, OBS_DIM, ACT_DIM)
    real = mopo.ReplayBuffer(len(data["observations"]), OBS_DIM, ACT_DIM, device)
    real.add(mopo.to_rows(*(torch.as_tensor(data[k], device=device) for k in mopo.DATA_KEYS)))
    return path, real


def ensemble(device: torch.device) -> mopo.EnsembleDynamics:
    """A fresh ensemble of hopper's dims."""
    return mopo.EnsembleDynamics(OBS_DIM, ACT_DIM).to(device)


def action_space(task: mopo.Task) -> gym.spaces.Box:
    """The task's action space, from an env made and closed."""
    env = mopo.make_env(task)
    space = env.action_space
    env.close()
    return space


def dynamics_epoch(margs, model_rows, head, device, out: dict) -> tuple[mopo.EnsembleDynamics, dict, float]:
    """Dynamics epoch: one epoch of `train_dynamics` on model_rows (after a warm-up on head) next to the bare steps,
    into out["dynamics_epoch"]; the trained ensemble, its stats and the epoch's seconds."""
    dynamics = ensemble(device)
    mopo.train_dynamics(ensemble(device), head, margs)  # warm-up
    seconds, stats = timed(lambda: mopo.train_dynamics(dynamics, model_rows, margs), device)
    obs = model_rows[0]
    n_train = len(obs) - min(int(0.2 * len(obs)), margs.holdout_size)
    steps = -(-n_train // margs.dynamics_batch_size)
    bare_step_s = bare_dynamics_step_s(model_rows, margs.dynamics_batch_size, device)
    out["dynamics_epoch"] = {"s": seconds, "bare_s": bare_step_s * steps, "steps": steps,
                             "ratio_bare_over_ours": bare_step_s * steps / seconds}
    return dynamics, stats, seconds


def bare_dynamics_step_s(model_rows, batch_size: int, device: torch.device) -> float:
    """Seconds of one forward+backward+Adam step of a fresh ensemble on one pre-made bootstrap batch (7 × batch_size
    rows of model_rows)."""
    obs, act, target = model_rows
    model = ensemble(device)
    optimizer = mopo.dynamics_optimizer(model, lr=1e-3)
    idx = torch.randint(len(obs), (7, batch_size), device=device)
    x_obs, x_act, y = obs[idx], act[idx], target[idx]

    def bare_step():
        loss = mopo.dynamics_loss(model, x_obs, x_act, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    timed(bare_step, device, 5)
    return timed(bare_step, device, 50)[0]


def dynamics_epoch_graph(margs, model_rows, head, eager_s: float, device: torch.device, out: dict) -> None:
    """The same epoch with a CUDA graph per full minibatch (each on a fresh ensemble); each call captures once, so also
    3 epochs: into out["dynamics_epoch"]."""
    with optional(out, "dynamics epoch, CUDA graph"):
        gargs = replace(margs, cuda_graph=True)
        mopo.train_dynamics(ensemble(device), head, gargs)  # warm-up: graph memory pool
        one, _ = timed(lambda: mopo.train_dynamics(ensemble(device), model_rows, gargs), device)
        three, _ = timed(lambda: mopo.train_dynamics(ensemble(device), model_rows,
                                                     replace(gargs, dynamics_max_epochs=3)), device)
        out["dynamics_epoch"] |= {"graph_s": one, "graph_marginal_s": (three - one) / 2, "graph_3_epochs_s": three,
                                  "eager_over_graph": eager_s / one}


def rollout_fn(actor, step_fn, start_obs, h: int):
    """One rollout round, as main runs it: `rollout` of start_obs for h steps (λ = 1)."""
    return functools.partial(mopo.rollout, actor, step_fn, start_obs, h, 1.0)


def rollout_round(actor, dynamics, step_fn, start_obs, h: int, device: torch.device, out: dict) -> torch.Tensor:
    """Rollout round: a rollout round (after a warm-up on 4096 start states) next to the bare forward passes, into
    out["rollout_round"]; the rows it made."""
    timed(rollout_fn(actor, step_fn, start_obs[:4096], h), device)
    seconds, (rows, _) = timed(rollout_fn(actor, step_fn, start_obs, h), device)
    pre_made = torch.randn(len(rows), OBS_DIM, device=device)  # one forward row per transition the rollout made
    bare_s, _ = timed(lambda: bare_rollout(actor, dynamics, pre_made), device)
    out["rollout_round"] = {"s": seconds, "transitions": len(rows), "transitions_per_s": len(rows) / seconds,
                            "bare_s": bare_s, "ratio_bare_over_ours": bare_s / seconds}
    return rows


@torch.no_grad()
def bare_rollout(actor, dynamics, obs):
    """Actor + ensemble forward on the pre-made rows obs, in `rollout`'s chunks."""
    for chunk in obs.split(mopo.ROLLOUT_CHUNK_CPU if obs.device.type == "cpu" else len(obs)):
        a, _ = actor.sample(chunk)
        dynamics(chunk, a)


def sac_step(sac, opts, sample, margs):
    """One SAC update as main runs it: `sac_update` on a fresh batch from sample()."""
    return lambda: mopo.sac_update(sac, opts, sample(), margs)


def sac_update_costs(args: Args, update, bare, device: torch.device, out: dict) -> tuple[float, float]:
    """SAC update: `update` (sampling included, after 20 for warm-up) next to `bare` (the update on one pre-made
    batch), into out["sac_update"]; seconds per update of each."""
    timed(update, device, 20)
    seconds, _ = timed(update, device, args.sac_updates)
    bare_s, _ = timed(bare, device, args.sac_updates)
    out["sac_update"] = {"ms": seconds * 1e3, "bare_ms": bare_s * 1e3, "ratio_bare_over_ours": bare_s / seconds}
    return seconds, bare_s


def sac_update_graph(args: Args, margs, modules, sample, eager_s: float, device: torch.device, out: dict):
    """main's graph path: its own SAC module and capturable Adams (from `modules`), the same update recorded once by
    `mopo.cuda_graph` and replayed, into out["sac_update"]; its actor and update, or None where it failed."""
    with optional(out, "SAC update, CUDA graph"):
        g_sac, g_opts = modules(capturable=True)
        g_update = mopo.cuda_graph(sac_step(g_sac, g_opts, sample, margs))
        timed(g_update, device, 20)  # 3 eager calls on a side stream, the capture, 16 replays
        g_seconds, _ = timed(g_update, device, args.sac_updates)
        out["sac_update"] |= {"graph_ms": g_seconds * 1e3, "eager_over_graph": eager_s / g_seconds}
        return g_sac.actor, g_update
    return None


def phase_s(model_buffer, roll, update, rollout_freq: int, device: torch.device) -> float:
    """Seconds of one MOPO phase as main runs it: a rollout round into the model buffer, then rollout_freq updates."""
    def phase():
        rows, _ = roll()
        model_buffer.add(rows)
        for _ in range(rollout_freq):
            update()
    return timed(phase, device)[0]


def mopo_phase(args: Args, model_buffer, roll, update, bare_s: float, device: torch.device, out: dict) -> float:
    """MOPO phase: --rollout-freq updates plus one rollout round → updates/s, next to the bare loops' bare_s, into
    out["mopo_phase"]; its seconds."""
    seconds = phase_s(model_buffer, roll, update, args.rollout_freq, device)
    out["mopo_phase"] = {"updates_per_s": args.rollout_freq / seconds, "bare_updates_per_s":
                         args.rollout_freq / bare_s, "ratio_ours_over_bare": bare_s / seconds}
    return seconds


def mopo_phase_graph(args: Args, model_buffer, roll, update, eager_s: float, device: torch.device, out: dict) -> None:
    """The MOPO phase with the graph path's rollouts and update, as main runs it on CUDA: into out["mopo_phase"]."""
    with optional(out, "MOPO phase, CUDA graph"):
        seconds = phase_s(model_buffer, roll, update, args.rollout_freq, device)
        out["mopo_phase"] |= {"graph_updates_per_s": args.rollout_freq / seconds, "graph_over_eager": eager_s / seconds}


def checkpoint_cost(tmp: Path, margs, real_size: int, dynamics, sac, opts, model_buffer, device) -> dict:
    """One policy checkpoint as main writes it (`save_checkpoint` adds the RNG states), written to tmp and removed:
    its seconds, model rows and size."""
    header = {"args": asdict(margs), "data_fingerprint": [real_size, 0.0], "phase": "policy",  # main's checkpoint
              "dynamics": dynamics.state_dict(), "results": {}}
    checkpoint = lambda: mopo.save_checkpoint(tmp, header | {  # noqa: E731
        "step": 0, "sac": sac.state_dict(), "optimizers": {k: o.state_dict() for k, o in opts.items()},
        "model_buffer": model_buffer.state_dict()})
    seconds, _ = timed(checkpoint, device)
    cost = {"s": seconds, "model_buffer_rows": model_buffer.size, "mb": (tmp / "checkpoint.pt").stat().st_size / 2**20}
    (tmp / "checkpoint.pt").unlink()
    return cost


def dynamics_to_early_stop(args: Args, margs, model_rows, device: torch.device, out: dict):
    """Dynamics to early stopping: a fresh ensemble trained as main trains it (`train_to_early_stop`, capped by
    --early-stop-max-s), into out["dynamics_early_stop"]; the ensemble if it stopped early, else None (its weights
    are mid-training, no elites)."""
    with optional(out, "dynamics to early stopping"):
        model = ensemble(device)
        out["dynamics_early_stop"] = train_to_early_stop(
            model, model_rows, replace(margs, dynamics_max_epochs=None, cuda_graph=device.type == "cuda"), device,
            args.early_stop_max_s)
        if out["dynamics_early_stop"]["early_stopped"]:
            return model
    return None


def end_to_end_runs(args: Args, e2e_epochs: int, dataset: Path, dyn_path: Path, device: torch.device, tmp: Path,
                    results: dict, began: float) -> None:
    """End to end: `end_to_end` with CUDA graphs and (unless --skip-eager-e2e) eager on CUDA, else once on CPU, each
    shortened to end by --budget-s (estimated from the parts measured so far): results["end_to_end"]."""
    cuda = device.type == "cuda"

    def fit_budget(epochs, updates_per_s, eval_s_per_epoch, setup_s):
        """As many of `epochs` as end by --budget-s (each: its updates, its share of evaluations and checkpoints;
        setup_s before them)."""
        if args.budget_s is None:
            return epochs
        left = args.budget_s - (time.perf_counter() - began) - setup_s - 10
        return min(epochs, int(left / (DEFAULTS.steps_per_epoch / updates_per_s + eval_s_per_epoch)))
    full, rates = results["evaluation_full_length"], results["mopo_phase"]
    runs = results["end_to_end"] = []
    for graph in ([True, False] if cuda and not args.skip_eager_e2e else [cuda]):
        rate = rates.get("graph_updates_per_s", rates["updates_per_s"]) if graph else rates["updates_per_s"]
        if runs:  # evaluations, writes and setup as the first run measured them
            g = runs[0]
            eval_s, setup_s = (g["evaluation_s"] + g["checkpoint_s"]) / g["epochs"], g["setup_s"]
        else:  # a full-length evaluation bounds hopper's; one every eval_freq epochs (and after the last)
            eval_s = ((full["sync_s"] + main_gauge_s(full)) / DEFAULTS.eval_freq
                      + results["checkpoint"]["s"] / DEFAULTS.checkpoint_freq)
            setup_s = 15
        label = ("cuda graph" if graph else "cuda eager") if cuda else "cpu"
        epochs = fit_budget((args.e2e_eager_epochs or e2e_epochs) if label == "cuda eager" else e2e_epochs, rate,
                            eval_s, setup_s)
        if epochs < 1:
            results["end_to_end_skipped"] = f"{label}: no epoch fits --budget-s {args.budget_s}"
            break
        with optional(results, f"end to end, {label}"):
            runs.append(end_to_end(args, dataset, dyn_path, device, graph, epochs, tmp, label))
        report(results, args.out, began, f"end to end, {label}")


def seeded(fn, seed):
    """fn() with torch's RNG seeded as `evaluate` seeds the gauge, the caller's RNG untouched."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []):
        torch.manual_seed(seed)
        return fn()


def start_states(envs, seed, device):
    """The episodes' start states, as `evaluate` resets `envs` with `seed` (the gauge's start)."""
    obs, _ = envs.reset(seed=seed)
    return torch.as_tensor(obs, dtype=torch.float32, device=device)


def evaluation_costs(args, task, actor, dynamics, device, out: dict) -> None:
    """Seconds per evaluation (`evaluate`'s episodes with a CPU copy of the actor, the gauge on the training modules),
    for hopper and for full-length HalfCheetah episodes; hopper's also as one whole `evaluate` call with the gauge
    bound as main binds it; HalfCheetah's gauge on CPU twins, and on CUDA eager and as a graph (as main runs it)."""
    n, lam, seed, cuda = args.eval_episodes, 1.0, args.seed, device.type == "cuda"
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(task)] * n)
    eval_actor = copy.deepcopy(actor).cpu()
    seconds, episodes = timed(lambda: mopo.evaluate(eval_actor, envs, seed), device)
    start, step_fn = start_states(envs, seed, device), hopper_step(dynamics)
    gauge_s, gauge = timed(lambda: seeded(lambda: mopo.model_returns(actor, step_fn, start, args.gauge_horizon, lam),
                                          seed), device)
    out["evaluation"] = {"s": seconds, "episodes": n, "mean_return": float(episodes["return"].mean()),
                         "steps": int(episodes["length"].sum()), "gauge_graph": cuda}
    out["gauge"] = {"s": gauge_s, "mean_model_length": float(gauge["model_length"].mean())}
    with optional(out, "whole evaluation, as main"):  # evaluate hands the gauge the reset states, as in main
        def main_gauge(s):  # as main binds it: the start states moved to the training device
            return mopo.model_returns(actor, step_fn, s.to(device), args.gauge_horizon, lam, cuda)

        out["evaluation"]["with_gauge_s"], _ = timed(lambda: mopo.evaluate(eval_actor, envs, seed, main_gauge), device)
    envs.close()

    # full length: HalfCheetah never terminates, so 10 × 1000 env steps whatever the policy, and 1000 model steps
    hc = mopo.make_task("halfcheetah-medium-v2")
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(hc)] * n)
    hc_obs, hc_act = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    hc_actor = mopo.Actor(hc_obs, hc_act, envs.single_action_space.low, envs.single_action_space.high)  # CPU
    seconds, episodes = timed(lambda: mopo.evaluate(hc_actor, envs, seed), device)
    start = start_states(envs, seed, torch.device("cpu"))
    envs.close()
    env_steps, vector_steps = int(episodes["length"].sum()), int(episodes["length"].max())
    full = {"sync_s": seconds, "episodes": n, "env_steps": env_steps, "sync_us_per_env_step": seconds / env_steps * 1e6,
            "sync_ms_per_vector_step": seconds / vector_steps * 1e3}
    if args.async_eval:  # workers from a server that imported gymnasium and mujoco (each still imports this script)
        with optional(out, "AsyncVectorEnv evaluation"):
            multiprocessing.get_context("forkserver").set_forkserver_preload(["gymnasium", "mujoco"])
            began = time.perf_counter()
            envs = gym.vector.AsyncVectorEnv([functools.partial(mopo.make_env, hc)] * n, context="forkserver")
            startup = time.perf_counter() - began
            seconds, a_episodes = timed(lambda: mopo.evaluate(hc_actor, envs, seed), device)
            envs.close()
            full |= {"async_s": seconds, "async_startup_s": startup, "async_env_steps": int(a_episodes["length"].sum())}
    hc_dynamics = mopo.EnsembleDynamics(hc_obs, hc_act).eval()
    with torch.no_grad():
        hc_dynamics.mean_head.weight.zero_()  # Δs = noise only: 1000 steps stay finite; the same compute

    def gauge(actor, model, s0, horizon=args.gauge_horizon, graph=False):
        step_fn = functools.partial(mopo.model_step, model, penalty_kind="aleatoric",
                                    termination_fn=mopo.halfcheetah_done)
        return seeded(lambda: mopo.model_returns(actor, step_fn, s0, horizon, lam, graph=graph), seed)
    gauge(hc_actor, hc_dynamics, start, 5)  # warm-up
    seconds, g = timed(lambda: gauge(hc_actor, hc_dynamics, start), device)
    model_steps = int(g["model_length"].max())
    full |= {"gauge_cpu_s": seconds, "gauge_steps": model_steps, "gauge_cpu_ms_per_step": seconds / model_steps * 1e3}
    if cuda:  # the gauge on GPU modules, as main's training modules, instead of CPU twins
        with optional(out, "gauge on the GPU"):
            d_actor, d_dynamics, d_start = copy.deepcopy(hc_actor).to(device), hc_dynamics.to(device), start.to(device)
            gauge(d_actor, d_dynamics, d_start, 5)  # warm-up
            seconds, _ = timed(lambda: gauge(d_actor, d_dynamics, d_start), device)
            full |= {"gauge_device_s": seconds, "gauge_device_ms_per_step": seconds / model_steps * 1e3}
        with optional(out, "gauge as a CUDA graph"):  # as main runs it with --cuda-graph: one graph per evaluation
            gauge(d_actor, d_dynamics, d_start, graph=True)  # warm-up
            seconds, _ = timed(lambda: gauge(d_actor, d_dynamics, d_start, graph=True), device)
            full |= {"gauge_graph_s": seconds, "gauge_graph_ms_per_step": seconds / args.gauge_horizon * 1e3}
    out["evaluation_full_length"] = full


def main_gauge_s(full: dict) -> float:
    """The full-length gauge as main runs it: a CUDA graph on CUDA (its default), else on the training modules."""
    return full.get("gauge_graph_s", full.get("gauge_device_s", full["gauge_cpu_s"]))


def gauge_path(full: dict) -> str:
    return "cuda graph" if "gauge_graph_s" in full else "cuda eager" if "gauge_device_s" in full else "cpu"


class OutOfTime(Exception):
    pass


def train_to_early_stop(model, data, margs, device, max_s) -> dict:
    """train_dynamics as main runs it (early stopping, graphs on CUDA): epochs and seconds, or where max_s stops it
    (at the first epoch end past it: `on_epoch`, main's checkpoint hook, raises)."""
    epochs, end = [], time.perf_counter() + max_s

    def on_epoch(state):  # after each epoch but the last
        epochs.append(state["epoch"])
        if time.perf_counter() > end:
            raise OutOfTime()
    sync(device)
    began = time.perf_counter()
    try:
        stats = mopo.train_dynamics(model, data, margs, on_epoch=on_epoch)
        done = True
    except OutOfTime:
        stats, done = None, False
    sync(device)
    seconds = time.perf_counter() - began
    n = stats["epochs"] if done else (epochs[-1] if epochs else 0)
    return {"early_stopped": done, "epochs": n, "s": seconds, "s_per_epoch": seconds / max(n, 1), "stats": stats,
            "max_s": max_s}


def end_to_end(args, dataset, dyn_path, device, cuda_graph, epochs, tmp, label) -> dict:
    """mopo.main on hopper-medium-v2 in a fresh folder; its parts timed by wrapping the functions main calls."""
    margs = mopo.Args(env_id="hopper-medium-v2", dataset_path=str(dataset), dynamics_path=str(dyn_path),
                      epochs=epochs, device=str(device), cuda_graph=cuda_graph,
                      rollout_batch_size=args.rollout_batch_size, seed=args.seed)
    # (name in mopo, device-synced): an evaluation runs in main's thread, in turn with training: `evaluate` (the
    # episodes and the gauge) then `record` (logging, results.json)
    wrapped = [("rollout", True), ("save_checkpoint", True), ("evaluate", True), ("record", False)]
    spans = {name: [] for name, _ in wrapped}

    def wrap(name, fn, synced):
        def timed_call(*a, **k):
            if synced:
                sync(device)
            began = time.perf_counter()
            out = fn(*a, **k)
            if synced:
                sync(device)
            spans[name].append((began, time.perf_counter()))
            return out
        return timed_call
    folder = Path(tempfile.mkdtemp(dir=tmp))
    cwd = os.getcwd()
    os.chdir(folder)
    originals = [(name, getattr(mopo, name)) for name, _ in wrapped]
    for (name, synced), (_, fn) in zip(wrapped, originals):
        setattr(mopo, name, wrap(name, fn, synced))
    try:
        began = time.perf_counter()
        mopo.main(margs)
        ended = time.perf_counter()
    finally:
        for name, fn in originals:
            setattr(mopo, name, fn)
        os.chdir(cwd)
    total = lambda name: sum(b - a for a, b in spans[name])  # noqa: E731
    first_rollout = spans["rollout"][0][0]
    checkpoint_s = sum(b - a for a, b in spans["save_checkpoint"] if a > first_rollout)
    evaluation_s = total("evaluate") + total("record")
    policy_s = ended - first_rollout
    updates = epochs * margs.steps_per_epoch
    return {"label": label, "epochs": epochs, "updates": updates, "wall_s": ended - began,
            "setup_s": first_rollout - began, "policy_phase_s": policy_s, "evaluations": len(spans["evaluate"]),
            "evaluation_s": evaluation_s, "evaluate_s": total("evaluate"), "rollout_s": total("rollout"),
            "checkpoint_s": checkpoint_s, "updates_per_s_excl_eval": updates / (policy_s - evaluation_s - checkpoint_s),
            "updates_per_s_incl_eval": updates / policy_s, "tensorboard_last_sps": last_sps(folder)}


def last_sps(folder: Path) -> Optional[float]:
    """charts/SPS at the run's last update, as TensorBoard shows it (a cross-check of the timing above)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        run_dir = next((folder / "runs").iterdir())
        events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        events.Reload()
        return events.Scalars("charts/SPS")[-1].value
    except Exception as e:  # informational only
        print(f"TensorBoard SPS not read: {e!r}")
        return None


def projection(r: dict) -> dict:
    """A D4RL-sized default run (FULL_RUN) projected from the measured parts, not measured itself; E = dynamics
    epochs. Evaluations run in turn with training: each costs a whole evaluation (full-length episodes + gauge)."""
    full, dyn = r["evaluation_full_length"], r["dynamics_epoch"]
    gauge_s = main_gauge_s(full)
    graph = "graph_updates_per_s" in r["mopo_phase"]  # as main runs it: with CUDA graphs where they ran
    updates_per_s = r["mopo_phase"]["graph_updates_per_s" if graph else "updates_per_s"]
    epoch_s = dyn["s"]
    if "graph_s" in dyn:  # the marginal graph epoch (one capture per call), unless noise made it ≤ 0
        epoch_s = dyn["graph_marginal_s"] if dyn["graph_marginal_s"] > 0 else dyn["graph_s"]
    epoch_s *= FULL_RUN["transitions"] / r["dataset_size"]
    parts = {"updates_s": FULL_RUN["updates"] / updates_per_s,
             "evaluations_s": FULL_RUN["evaluations"] * (full["sync_s"] + gauge_s),
             "checkpoints_s": FULL_RUN["checkpoints"] * r["checkpoint"]["s"]}
    fixed = sum(parts.values())
    out = {"projected": "from the measured parts above, not a measured run", "epochs": FULL_RUN["epochs"],
           "updates": FULL_RUN["updates"], "eval_freq": FULL_RUN["eval_freq"],
           "evaluations": FULL_RUN["evaluations"], "checkpoints": FULL_RUN["checkpoints"],
           "updates_per_s": updates_per_s, "updates_path": "cuda graph" if graph else "eager",
           "evaluation_s": full["sync_s"], "gauge_s": gauge_s, "gauge_path": gauge_path(full),
           "checkpoint_s": r["checkpoint"]["s"], "dynamics_epoch_s_at_1M": epoch_s, **parts,
           "break_even_dynamics_epochs": max(0, math.floor((FULL_RUN["budget_s"] - fixed) / epoch_s)),
           "without_dynamics_s": fixed}
    stop = r.get("dynamics_early_stop")
    if stop:
        out |= {"early_stop_epochs": stop["epochs"], "early_stopped": stop["early_stopped"],
                "dynamics_s": stop["epochs"] * epoch_s, "total_s": fixed + stop["epochs"] * epoch_s}
    return out


def platform_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def hm(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def table(r):
    lines = loops_table(r) + graph_table(r) + evaluation_table(r) + end_to_end_table(r) + projection_table(r)
    for part, error in r.get("errors", {}).items():
        lines.append(f"FAILED: {part}: {error}")
    return "\n".join(lines)


def loops_table(r) -> list:
    """The three loops and the MOPO phase as mopo.py runs them (eager on CUDA), next to their bare compute."""
    dyn, sac, phase = r["dynamics_epoch"], r["sac_update"], r["mopo_phase"]
    return [
        f"device {r['device']} ({r['cpu'] if r['device'] == 'cpu' else r['gpu']}), {r['threads']} thread(s), torch "
        f"{r['torch']}, dataset {r['dataset_size']} transitions",
        "| loop | mopo.py | bare compute | bare / ours |", "|---|---|---|---|",
        f"| dynamics epoch ({dyn['steps']} steps of 7×256) | {dyn['s']:.2f} s | "
        f"{dyn['bare_s']:.2f} s | {dyn['ratio_bare_over_ours']:.2f} |",
        f"| rollout round ({r['rollout_round']['transitions']} transitions) | {r['rollout_round']['s']:.2f} s "
        f"({r['rollout_round']['transitions_per_s']:.0f}/s) | {r['rollout_round']['bare_s']:.2f} s | "
        f"{r['rollout_round']['ratio_bare_over_ours']:.2f} |",
        f"| SAC update incl. sampling | {sac['ms']:.2f} ms | {sac['bare_ms']:.2f} ms | "
        f"{sac['ratio_bare_over_ours']:.2f} |",
        f"| MOPO phase incl. rollouts | {phase['updates_per_s']:.1f} updates/s | "
        f"{phase['bare_updates_per_s']:.1f} updates/s | {phase['ratio_ours_over_bare']:.2f} |",
        f"| evaluation ({r['evaluation']['episodes']} episodes) | {r['evaluation']['s']:.2f} s | | |",
        f"peak memory {r['peak_memory_mb']:.0f} MB"]


def graph_table(r) -> list:
    """On CUDA: eager vs CUDA graph, for the loops where the graph path ran."""
    if r["device"] == "cpu":
        return []
    dyn, sac, phase = r["dynamics_epoch"], r["sac_update"], r["mopo_phase"]
    lines = ["", "| loop (CUDA) | eager | CUDA graph | eager / graph |", "|---|---|---|---|"]
    if "graph_ms" in sac:
        lines.append(f"| SAC update incl. sampling | {sac['ms']:.2f} ms | {sac['graph_ms']:.2f} ms | "
                     f"{sac['eager_over_graph']:.1f}× |")
    if "graph_s" in dyn:
        lines.append(f"| dynamics epoch ({dyn['steps']} steps of 7×256) | {dyn['s']:.3f} s | "
                     f"{dyn['graph_s']:.3f} s ({dyn['graph_marginal_s']:.3f} s marginal) | "
                     f"{dyn['eager_over_graph']:.1f}× |")
    if "graph_updates_per_s" in phase:
        lines.append(f"| MOPO phase incl. rollouts | {phase['updates_per_s']:.1f} updates/s | "
                     f"{phase['graph_updates_per_s']:.1f} updates/s | {phase['graph_over_eager']:.1f}× |")
    return lines


def evaluation_table(r) -> list:
    """Evaluations as main runs them, the checkpoint write, and the dynamics to early stopping."""
    full, ev, g = r["evaluation_full_length"], r["evaluation"], r["gauge"]
    lines = ["", "| evaluation, as main runs it | s | steps | per step |", "|---|---|---|---|",
             f"| hopper, {ev['episodes']} episodes, SyncVectorEnv, CPU copy | {ev['s']:.3f} | {ev['steps']} env | "
             f"{ev['s'] / max(ev['steps'], 1) * 1e6:.0f} µs |",
             f"| hopper gauge, training modules | {g['s']:.3f} | {g['mean_model_length']:.0f} model (mean) | |",
             f"| hopper, one whole `evaluate` (episodes + gauge{', CUDA graph' if ev['gauge_graph'] else ''}) | "
             f"{ev.get('with_gauge_s', float('nan')):.3f} | | |",
             f"| halfcheetah, {full['episodes']} × 1000, SyncVectorEnv, CPU copy | {full['sync_s']:.2f} | "
             f"{full['env_steps']} env | {full['sync_us_per_env_step']:.0f} µs ({full['sync_ms_per_vector_step']:.2f} "
             f"ms per vector step) |"]
    if "async_s" in full:
        lines.append(f"| halfcheetah, AsyncVectorEnv (forkserver; start-up {full['async_startup_s']:.1f} s) | "
                     f"{full['async_s']:.2f} | {full['async_env_steps']} env | "
                     f"{full['async_s'] / max(full['async_env_steps'], 1) * 1e6:.0f} µs |")
    lines.append(f"| gauge, {full['episodes']} starts × {full['gauge_steps']}, CPU twins | {full['gauge_cpu_s']:.2f} | "
                 f"{full['gauge_steps']} model | {full['gauge_cpu_ms_per_step']:.2f} ms |")
    if "gauge_device_s" in full:
        lines.append(f"| gauge on the GPU modules | {full['gauge_device_s']:.2f} | {full['gauge_steps']} model | "
                     f"{full['gauge_device_ms_per_step']:.2f} ms |")
    if "gauge_graph_s" in full:
        lines.append(f"| gauge on the GPU modules, CUDA graph (as main) | {full['gauge_graph_s']:.2f} | "
                     f"{full['gauge_steps']} model | {full['gauge_graph_ms_per_step']:.3f} ms |")
    lines.append(f"| policy checkpoint ({r['checkpoint']['model_buffer_rows']} model rows, "
                 f"{r['checkpoint']['mb']:.0f} MB) | {r['checkpoint']['s']:.2f} | | |")
    if "dynamics_early_stop" in r:
        s = r["dynamics_early_stop"]
        cut = "" if s["early_stopped"] else ", stopped by --early-stop-max-s"
        lines.append(f"\ndynamics to early stopping: {s['epochs']} epochs in {s['s']:.1f} s ({s['s_per_epoch']:.3f} "
                     f"s/epoch){cut}")
    return lines


def end_to_end_table(r) -> list:
    """The measured stretches of `mopo.main`, or why they were skipped."""
    lines = []
    if r.get("end_to_end"):
        lines += ["", "| mopo.main, hopper | epochs | wall | setup | policy phase | updates/s excl. eval | "
                  "evaluations (in turn) | checkpoints | TensorBoard SPS |", "|---|---|---|---|---|---|---|---|---|"]
        for e in r["end_to_end"]:
            lines.append(f"| {e['label']} | {e['epochs']} | {e['wall_s']:.1f} s | {e['setup_s']:.1f} s | "
                         f"{e['policy_phase_s']:.1f} s | {e['updates_per_s_excl_eval']:.0f} | {e['evaluations']} × "
                         f"{e['evaluation_s'] / max(e['evaluations'], 1):.2f} s | {e['checkpoint_s']:.1f} s | "
                         f"{e['tensorboard_last_sps']} |")
    if "end_to_end_skipped" in r:
        lines.append(f"end-to-end skipped: {r['end_to_end_skipped']}")
    return lines


def projection_table(r) -> list:
    """The full run projected from the measured parts (`projection`)."""
    p = r["projection"]
    lines = ["", f"| full run, projected from the measured parts (1M transitions, {p['epochs']} epochs, "
             f"{p['updates']:,} updates) | from | projected |", "|---|---|---|",
             f"| updates incl. rollouts | {p['updates']:,} / {p['updates_per_s']:.0f} updates/s "
             f"({p['updates_path']}) | {hm(p['updates_s'])} |",
             f"| evaluations, {p['evaluations']} (every {p['eval_freq']} epochs, in turn with training) × "
             f"({r['evaluation_full_length']['episodes']} full-length episodes + gauge) | {p['evaluations']} × "
             f"({p['evaluation_s']:.2f} + {p['gauge_s']:.2f} ({p['gauge_path']})) s | {hm(p['evaluations_s'])} |",
             f"| checkpoints, {p['checkpoints']} (every {DEFAULTS.checkpoint_freq} epochs and before the first "
             "update) | "
             f"{p['checkpoints']} × {p['checkpoint_s']:.2f} s | {hm(p['checkpoints_s'])} |"]
    if "early_stop_epochs" in p:
        lines += [f"| dynamics, {p['early_stop_epochs']} epochs (early stop on the generated data"
                  f"{'' if p['early_stopped'] else ', not reached'}) | × {p['dynamics_epoch_s_at_1M']:.2f} s per "
                  f"1M-row epoch | {hm(p['dynamics_s'])} |", f"| total | | {hm(p['total_s'])} |"]
    lines.append(f"projected, without the dynamics {hm(p['without_dynamics_s'])}; dynamics epochs that still fit "
                 f"30 min: {p['break_even_dynamics_epochs']} (at {p['dynamics_epoch_s_at_1M']:.2f} s per 1M-row "
                 f"epoch)")
    return lines


if __name__ == "__main__":
    main(tyro.cli(Args))
