"""Evaluation (D14): deterministic actions, and D4RL's normalized score per episode, then mean and std."""
import gymnasium as gym
import numpy as np
import pytest
import torch

import mopo

# D4RL's reference returns (d4rl/infos.py), written out here so that a changed constant fails
REFERENCE = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3),
             "ant": (-325.6, 3879.7)}


@pytest.mark.parametrize("family", list(REFERENCE))
def test_normalized_score_is_d4rls_formula_per_episode(family):
    low, high = REFERENCE[family]
    returns = np.array([low, high, 0.5 * (low + high), 1234.5])
    summary = mopo.summarize(mopo.make_task(f"{family}-medium-v2"), {"return": returns.copy()})
    scores = 100 * (returns - low) / (high - low)  # 0, 100, 50, ...
    assert summary["normalized_score"] == pytest.approx(scores.mean(), rel=1e-9)
    assert summary["normalized_score_std"] == pytest.approx(scores.std(), rel=1e-9)  # not the std normalized
    assert summary["return"] == pytest.approx(returns.mean()) and summary["return_std"] == pytest.approx(returns.std())


def test_tasks_without_reference_scores_report_returns_only():
    summary = mopo.summarize(mopo.make_task("Hopper-v4"), {"return": np.array([1.0, 3.0])})
    assert summary == {"return": 2.0, "return_std": 1.0}


def test_evaluation_takes_the_deterministic_action():
    """A wide policy (σ ≈ e²): `evaluate` gives the same episodes whatever the random state, and they are the
    episodes of tanh(mean) stepped by hand."""
    torch.manual_seed(0)
    task = mopo.make_task("hopper-medium-v2")
    envs = gym.vector.SyncVectorEnv([lambda: mopo.make_env(task)] * 2)
    actor = mopo.Actor(11, 3, envs.single_action_space.low, envs.single_action_space.high)
    with torch.no_grad():
        actor.log_std.bias.fill_(2.0)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(mopo.evaluate(actor, envs, 7))
    np.testing.assert_array_equal(runs[0]["return"], runs[1]["return"])
    env = mopo.make_env(task)
    for i, (ret, length) in enumerate(zip(runs[0]["return"], runs[0]["length"])):
        obs, total, steps, over = env.reset(seed=7 + i)[0], 0.0, 0, False
        while not over:
            with torch.no_grad():
                mean = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
            action = (torch.tanh(mean) * actor.action_scale + actor.action_bias)[0].numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total, steps, over = total + reward, steps + 1, terminated or truncated
        assert (ret, length) == (pytest.approx(total, rel=1e-6), steps)


class Steps(gym.Env):
    """Reward 1 per step; sub-env i's episodes end after 2·(i + 1) steps (terminated), then it auto-resets."""
    observation_space = gym.spaces.Box(-1.0, 1.0, (2,))
    action_space = gym.spaces.Box(-1.0, 1.0, (1,))

    def __init__(self, length):
        self.length, self.t = length, 0

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.zeros(2, dtype=np.float32), 1.0, self.t >= self.length, False, {}


def test_each_sub_env_counts_only_its_own_first_episode():
    """Episodes of 2, 4 and 6 steps side by side: their returns and lengths are 2, 4, 6. Counting a sub-env's rewards
    after it ended (it auto-resets and goes on earning while the longest one runs) gives 6, 6, 6."""
    envs = gym.vector.SyncVectorEnv([lambda n=n: Steps(n) for n in (2, 4, 6)])
    actor = mopo.Actor(2, 1, envs.single_action_space.low, envs.single_action_space.high)
    episodes = mopo.evaluate(actor, envs, seed=0)
    np.testing.assert_array_equal(episodes["return"], [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(episodes["length"], [2, 4, 6])
