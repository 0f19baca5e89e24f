"""How fast are mopo.py's three loops? Each measured as the program runs it, next to the bare compute of the same
networks on pre-made tensors, in the same process.

    python benchmarks/speed.py --threads 1            # CPU, ~2-3 min
    python benchmarks/speed.py --threads 2 --out speed_2threads.json
    python benchmarks/speed.py --device cuda          # on a GPU machine
    python benchmarks/speed.py --dataset-size 1000000 # D4RL-sized data

Loops (hopper dims: obs 11, act 3; the dataset is generated from Hopper-v4 with random actions):
- dynamics epoch: one epoch of `train_dynamics` on the dataset (bootstrap batches of 7×256); bare = the same number of
  forward+backward+Adam steps of the same ensemble on one pre-made batch.
- rollout round: `rollout` of `--rollout-batch-size` start states × h steps with the hopper termination function,
  after the ensemble is trained for one epoch (so terminations are realistic); bare = actor + ensemble forward on
  pre-made tensors with the same number of rows per step.
- SAC update: batch sampling (`sample_mixed`, real_ratio 0.05) + `sac_update`; bare = `sac_update` on one pre-made
  batch.
- MOPO phase: `--rollout-freq` updates plus one rollout round, as in `main` → updates/s.
- evaluation: one `evaluate` call (10 episodes, vector env), reported separately.
Peak memory: max RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA.
"""

import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import mopo  # noqa: E402
from make_dataset import make_dataset  # noqa: E402


@dataclass
class Args:
    threads: int = 1
    """torch CPU threads"""
    device: str = "cpu"
    """torch device"""
    dataset_size: int = 100_000
    """transitions in the generated hopper dataset"""
    rollout_batch_size: int = 50_000
    """start states per rollout round"""
    rollout_length: int = 5
    """h"""
    rollout_freq: int = 1000
    """updates per rollout round in the MOPO-phase measurement"""
    sac_updates: int = 300
    """timed SAC updates (after warm-up)"""
    seed: int = 0
    """seed"""
    out: str = "speed.json"
    """where the JSON goes"""


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


def main(args: Args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    margs = mopo.Args(env_id="hopper-medium-v2", dynamics_max_epochs=1, rollout_batch_size=args.rollout_batch_size,
                      rollout_length=args.rollout_length, rollout_freq=args.rollout_freq)
    task = mopo.make_task(margs.env_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "hopper_random.hdf5"
        make_dataset(path, "Hopper-v4", args.dataset_size, seed=args.seed)
        data = mopo.load_dataset(path, 11, 3)
    obs_dim, act_dim, h = 11, 3, args.rollout_length
    real = mopo.ReplayBuffer(len(data["observations"]), obs_dim, act_dim, device)
    real.add(mopo.to_rows(*(torch.as_tensor(data[k], device=device) for k in
                            ("observations", "actions", "rewards", "next_observations", "terminals"))))
    results = {"device": str(device), "threads": args.threads, "torch": torch.__version__,
               "dataset_size": args.dataset_size, "cpu": platform_name()}

    # --- dynamics epoch -------------------------------------------------------------------------------------------
    dynamics = mopo.EnsembleDynamics(obs_dim, act_dim).to(device)
    obs, act, target = mopo.make_model_data(real)
    warm_up = mopo.EnsembleDynamics(obs_dim, act_dim).to(device)  # first calls pay one-time library set-up
    mopo.train_dynamics(warm_up, obs[:5000], act[:5000], target[:5000], margs)
    seconds, stats = timed(lambda: mopo.train_dynamics(dynamics, obs, act, target, margs), device)
    n_train = len(obs) - min(int(0.2 * len(obs)), margs.holdout_size)
    steps = -(-n_train // margs.dynamics_batch_size)
    bare_model = mopo.EnsembleDynamics(obs_dim, act_dim).to(device)
    optimizer = mopo.dynamics_optimizer(bare_model, lr=1e-3)
    idx = torch.randint(len(obs), (7, margs.dynamics_batch_size), device=device)
    x_obs, x_act, y = obs[idx], act[idx], target[idx]

    def bare_step():
        loss = mopo.dynamics_loss(bare_model, x_obs, x_act, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    timed(bare_step, device, 5)
    bare_step_s, _ = timed(bare_step, device, 50)
    results["dynamics_epoch"] = {"s": seconds, "bare_s": bare_step_s * steps, "steps": steps,
                                 "ratio_bare_over_ours": bare_step_s * steps / seconds}

    # --- rollout round ----------------------------------------------------------------------------------------------
    actor = mopo.Actor(obs_dim, act_dim, -torch.ones(act_dim), torch.ones(act_dim)).to(device)
    start_obs = real.split(real.sample(args.rollout_batch_size))[0]
    roll = lambda: mopo.rollout(actor, dynamics, start_obs, h, 1.0, "aleatoric", mopo.hopper_done)  # noqa: E731
    timed(lambda: mopo.rollout(actor, dynamics, start_obs[:4096], h, 1.0, "aleatoric", mopo.hopper_done), device)
    seconds, (rows, _) = timed(roll, device)
    pre_made = torch.randn(len(rows), obs_dim, device=device)  # one forward row per transition the rollout made

    @torch.no_grad()
    def bare_rollout():
        for chunk in pre_made.split(mopo.ROLLOUT_CHUNK_CPU if device.type == "cpu" else len(pre_made)):
            a, _ = actor.sample(chunk)
            dynamics(chunk, a)
    bare_s, _ = timed(bare_rollout, device)
    results["rollout_round"] = {"s": seconds, "transitions": len(rows), "transitions_per_s": len(rows) / seconds,
                                "bare_s": bare_s, "ratio_bare_over_ours": bare_s / seconds}

    # --- SAC update ---------------------------------------------------------------------------------------------------
    model_buffer = mopo.ReplayBuffer(margs.model_retain_epochs * args.rollout_batch_size * h, obs_dim, act_dim, device)
    while model_buffer.size < model_buffer.capacity:
        model_buffer.add(rows)
    qf, qf_target = mopo.TwinQ(obs_dim, act_dim).to(device), mopo.TwinQ(obs_dim, act_dim).to(device)
    qf_target.load_state_dict(qf.state_dict())
    qf_target.requires_grad_(False)
    log_alpha = torch.zeros((), device=device, requires_grad=True)
    fused = mopo.fused_adam(device)
    opts = (torch.optim.Adam(qf.parameters(), lr=3e-4, fused=fused), torch.optim.Adam(actor.parameters(), lr=3e-4,
            fused=fused), torch.optim.Adam([log_alpha], lr=3e-4, fused=fused))

    def update():
        batch = real.split(mopo.sample_mixed(real, model_buffer, margs.batch_size, margs.real_ratio))
        return mopo.sac_update(batch, actor, qf, qf_target, log_alpha, *opts, margs)
    fixed = real.split(mopo.sample_mixed(real, model_buffer, margs.batch_size, margs.real_ratio))
    timed(update, device, 20)
    seconds, _ = timed(update, device, args.sac_updates)
    bare_s, _ = timed(lambda: mopo.sac_update(fixed, actor, qf, qf_target, log_alpha, *opts, margs), device,
                      args.sac_updates)
    results["sac_update"] = {"ms": seconds * 1e3, "bare_ms": bare_s * 1e3, "ratio_bare_over_ours": bare_s / seconds}

    # --- MOPO phase: rollout_freq updates + one rollout round -------------------------------------------------------
    def phase():
        rows, _ = roll()
        model_buffer.add(rows)
        for _ in range(args.rollout_freq):
            update()
    seconds, _ = timed(phase, device)
    bare_phase = results["rollout_round"]["bare_s"] + args.rollout_freq * bare_s
    results["mopo_phase"] = {"updates_per_s": args.rollout_freq / seconds, "bare_updates_per_s":
                             args.rollout_freq / bare_phase, "ratio_ours_over_bare": bare_phase / seconds}

    # --- evaluation ------------------------------------------------------------------------------------------------
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(task)] * 10)
    seconds, returns = timed(lambda: mopo.evaluate(actor, envs, seed=0), device)
    results["evaluation"] = {"s": seconds, "episodes": 10, "mean_return": float(returns.mean())}
    results["peak_memory_mb"] = peak_memory_mb(device)
    results["dynamics_stats"] = stats
    print(table(results))
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


def platform_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def table(r):
    return "\n".join([
        f"device {r['device']} ({r['cpu'] if r['device'] == 'cpu' else ''}), {r['threads']} thread(s), torch "
        f"{r['torch']}, dataset {r['dataset_size']} transitions",
        "| loop | mopo.py | bare compute | bare / ours |", "|---|---|---|---|",
        f"| dynamics epoch ({r['dynamics_epoch']['steps']} steps of 7×256) | {r['dynamics_epoch']['s']:.2f} s | "
        f"{r['dynamics_epoch']['bare_s']:.2f} s | {r['dynamics_epoch']['ratio_bare_over_ours']:.2f} |",
        f"| rollout round ({r['rollout_round']['transitions']} transitions) | {r['rollout_round']['s']:.2f} s "
        f"({r['rollout_round']['transitions_per_s']:.0f}/s) | {r['rollout_round']['bare_s']:.2f} s | "
        f"{r['rollout_round']['ratio_bare_over_ours']:.2f} |",
        f"| SAC update incl. sampling | {r['sac_update']['ms']:.2f} ms | {r['sac_update']['bare_ms']:.2f} ms | "
        f"{r['sac_update']['ratio_bare_over_ours']:.2f} |",
        f"| MOPO phase incl. rollouts | {r['mopo_phase']['updates_per_s']:.1f} updates/s | "
        f"{r['mopo_phase']['bare_updates_per_s']:.1f} updates/s | {r['mopo_phase']['ratio_ours_over_bare']:.2f} |",
        f"| evaluation (10 episodes) | {r['evaluation']['s']:.2f} s | | |",
        f"peak memory {r['peak_memory_mb']:.0f} MB"])


if __name__ == "__main__":
    main(tyro.cli(Args))
