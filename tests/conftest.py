"""Shared fixtures: tiny datasets in D4RL layout, made from gymnasium MuJoCo envs with random actions."""
import sys
import warnings
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_d4rl_file(path, gym_id="Hopper-v4", num_steps=2000, max_episode_steps=1000, seed=0, **gym_kwargs):
    """Roll out uniformly random actions and write D4RL's keys (terminals and timeouts recorded separately)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(gym_id, max_episode_steps=max_episode_steps, **gym_kwargs)
    env.action_space.seed(seed)
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    data = {k: [] for k in keys}
    obs, _ = env.reset(seed=seed)
    for _ in range(num_steps):
        act = env.action_space.sample()
        next_obs, rew, terminated, truncated, _ = env.step(act)
        for k, v in zip(keys, (obs, act, rew, next_obs, terminated, truncated and not terminated)):
            data[k].append(v)
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32))
    return path


@pytest.fixture(scope="session")
def hopper_file(tmp_path_factory):
    return make_d4rl_file(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5")
