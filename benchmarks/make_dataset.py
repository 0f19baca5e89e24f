"""Write an offline dataset in D4RL's hdf5 layout from a gymnasium MuJoCo env, without any download.

    python benchmarks/make_dataset.py --env-id Hopper-v4 --num-steps 100000 --out hopper_random.hdf5

D4RL's "random" recipe: uniformly random actions, episodes capped at 1000 steps, `terminals` (the env's own
termination) and `timeouts` (the time limit) recorded separately, `next_observations` stored explicitly.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mopo  # noqa: E402


@dataclass
class Args:
    env_id: str = "Hopper-v4"
    """gymnasium env id"""
    num_steps: int = 100_000
    """transitions to record"""
    out: str = "dataset.hdf5"
    """output hdf5 path"""
    max_episode_steps: int = 1000
    """episode cap (D4RL: 1000)"""
    seed: int = 0
    """seed of env and actions"""


def make_dataset(path, env_id="Hopper-v4", num_steps=100_000, max_episode_steps=1000, seed=0, **gym_kwargs):
    """Roll out uniformly random actions and write D4RL's keys; returns the completed episodes' returns."""
    env = mopo.make_env(mopo.Task(env_id, "", None, env_id, {"max_episode_steps": max_episode_steps, **gym_kwargs}))
    env.action_space.seed(seed)
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    data = {k: [] for k in keys}
    returns, episode_return = [], 0.0
    obs, _ = env.reset(seed=seed)
    for _ in range(num_steps):
        act = env.action_space.sample()
        next_obs, rew, terminated, truncated, _ = env.step(act)
        for k, v in zip(keys, (obs, act, rew, next_obs, terminated, truncated and not terminated)):
            data[k].append(v)
        episode_return += rew
        if terminated or truncated:
            returns.append(episode_return)
            episode_return, obs = 0.0, env.reset()[0]
        else:
            obs = next_obs
    env.close()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32))
    return np.asarray(returns)


if __name__ == "__main__":
    args = tyro.cli(Args)
    returns = make_dataset(args.out, args.env_id, args.num_steps, args.max_episode_steps, args.seed)
    print(f"{args.out}: {args.num_steps} transitions, {len(returns)} complete episodes, "
          f"return {returns.mean():.1f} ± {returns.std():.1f}")
