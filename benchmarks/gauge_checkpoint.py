"""One evaluation of a run's checkpoint, episode by episode: real and (penalized) model returns, and D18's verdict.

    python benchmarks/gauge_checkpoint.py runs/<run>                 # the run's λ
    python benchmarks/gauge_checkpoint.py runs/<run> --lam 0.0       # another λ on the same policy and model
    OMP_NUM_THREADS=1 python benchmarks/gauge_checkpoint.py runs/<run>   # a learns.py run (1 thread): bit for bit

Loads `runs/<run>/checkpoint.pt` (the policy and ensemble at its step), runs mopo.py's `evaluate` with the gauge as
`main` binds it (episodes seeded with seed + step, as `main` seeds the evaluation at that step, the env's horizon),
prints each episode's real return, penalized model return and gap, then the evaluation line and, where Theorem 4.4's
bound broke, the warning, both exactly as `record` prints them. Then the model's error where the policy goes: the
elites' mean prediction of [r, Δs] on the real episodes' transitions (the same episodes), as an MSE beside the run's
holdout MSE on the data, as an error norm ‖μ − y‖ beside the penalty u(s, a) meant to bound it (Sec. 4.3), and the
reward's mean error (a model that over-rates the policy's states by b per step over-rates an episode by about b·H).
"""

import json
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mopo  # noqa: E402


@dataclass
class Args:
    run: tyro.conf.Positional[str]
    """a run folder holding checkpoint.pt"""
    lam: Optional[float] = None
    """λ of the penalized model return (default: the run's)"""


@torch.no_grad()
def model_error(dynamics, actor, task, seed: int, episodes: int, penalty_kind: str) -> dict:
    """The ensemble on the deterministic policy's real transitions, episodes seeded as `evaluate` seeds them."""
    rows, env = [], mopo.make_env(task)
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)  # sub-env i of evaluate's vector env is reset with seed + i
        done = False
        while not done:
            act = actor.act(torch.as_tensor(obs[None], dtype=torch.float32))[0].numpy()
            next_obs, reward, terminated, truncated, _ = env.step(act)
            rows.append((obs, act, [reward], next_obs - obs))
            obs, done = next_obs, terminated or truncated
    obs, act, rew, delta = (torch.as_tensor(np.array(x), dtype=torch.float32) for x in zip(*rows))
    target = torch.cat([rew, delta], dim=1)  # [N, 1 + obs_dim], as the model's training targets (D1)
    mean, logvar = dynamics(obs, act)  # [E, N, 1 + obs_dim]
    error = mean[dynamics.elites] - target  # [K, N, 1 + obs_dim]: the elites' mean predictions
    return {"transitions": len(obs), "mse": error.pow(2).mean().item(),  # as holdout_mse, over the elites
            "error_norm": error.norm(dim=-1).mean().item(), "reward_bias": error[..., 0].mean().item(),
            "penalty": mopo.penalty(mean, logvar, penalty_kind).mean().item()}


def main(args: Args) -> dict:
    ckpt = torch.load(Path(args.run) / "checkpoint.pt", map_location="cpu", weights_only=True)
    run_args, results = mopo.Args(**ckpt["args"]), ckpt["results"]
    lam = results["lam"] if args.lam is None else args.lam
    task = mopo.make_task(run_args.env_id)
    env = mopo.make_env(task)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    dynamics = mopo.EnsembleDynamics(obs_dim, act_dim, run_args.num_ensemble, run_args.num_elites,
                                     run_args.dynamics_hidden_dim, run_args.spectral_norm)
    dynamics.load_state_dict(ckpt["dynamics"])
    dynamics.eval()
    sac = mopo.SAC(obs_dim, act_dim, env.action_space, run_args.alpha)
    sac.load_state_dict(ckpt["sac"])
    step_fn = partial(mopo.model_step, dynamics, penalty_kind=run_args.penalty,
                      termination_fn=mopo.TERMINATION_FNS[task.family])
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(task)] * run_args.eval_episodes)
    horizon = env.spec.max_episode_steps or 1000
    gauge = lambda s: mopo.model_returns(sac.actor, step_fn, s, horizon, lam)  # noqa: E731
    seed = run_args.seed + ckpt["step"]
    episodes = mopo.evaluate(sac.actor, envs, seed, gauge)
    real, penalized = episodes["return"], np.asarray(episodes["penalized_model_return"], dtype=np.float64)
    for i, (r, p) in enumerate(zip(real, penalized)):
        print(f"episode {i}: real {r:.1f}, penalized model {p:.1f}, gap {p - r:.1f}")
    summary = mopo.summarize(task, dict(episodes))
    with tempfile.TemporaryDirectory() as tmp:  # record's lines, not its files
        writer = SummaryWriter(tmp)
        mopo.record(writer, {"lam": lam, "evaluations": [], "bound_broken_evaluations": 0}, Path(tmp), summary,
                    ckpt["step"] // run_args.steps_per_epoch, ckpt["step"])
        writer.close()
    error = model_error(dynamics, sac.actor, task, seed, run_args.eval_episodes, run_args.penalty)
    holdout = results["dynamics"]["elite_holdout_mse"]
    print(f"model on the policy's own states ({error['transitions']} real transitions): MSE {error['mse']:.4g}, "
          f"{error['mse'] / holdout:.1f}× its elite holdout MSE on the data ({holdout:.4g}); error ‖μ − y‖ "
          f"{error['error_norm']:.3g} against penalty u {error['penalty']:.3g}; predicted − real reward "
          f"{error['reward_bias']:+.3g} (means per step)")
    print(json.dumps({"step": ckpt["step"], "lam": lam, **summary, "model_error": error}))
    return {"evaluation": summary, "model_error": error}


if __name__ == "__main__":
    main(tyro.cli(Args))
