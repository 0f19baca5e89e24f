"""Shared fixtures: tiny datasets in D4RL layout, made from gymnasium MuJoCo envs with random actions."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_dataset import make_dataset  # noqa: E402


def make_d4rl_file(path, gym_id="Hopper-v4", num_steps=2000, max_episode_steps=1000, seed=0, **gym_kwargs):
    make_dataset(path, gym_id, num_steps, max_episode_steps, seed, **gym_kwargs)
    return path


@pytest.fixture(scope="session")
def hopper_file(tmp_path_factory):
    return make_d4rl_file(tmp_path_factory.mktemp("data") / "hopper_tiny.hdf5")
