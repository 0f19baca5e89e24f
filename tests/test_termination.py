"""Termination functions (D11) agree with the gymnasium envs' own `terminated`."""
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

import mopo

ENVS = {"hopper": ("Hopper-v4", {}), "walker2d": ("Walker2d-v4", {}), "halfcheetah": ("HalfCheetah-v4", {}),
        "ant": ("Ant-v4", {"use_contact_forces": True}), "invertedpendulum": ("InvertedPendulum-v4", {})}


def visited_transitions(gym_id, kwargs, num_steps=1500, seed=0):
    """(s, a, s', terminated) from random actions, plus states with perturbed positions so both outcomes occur."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(gym_id, **kwargs)
    env.action_space.seed(seed)
    rng = np.random.default_rng(seed)
    rows = []
    obs, _ = env.reset(seed=seed)
    for t in range(num_steps):
        if t % 3 == 0:  # jolt the body: heights and angles outside the healthy range
            base = env.unwrapped
            qpos = base.data.qpos.copy() + rng.normal(0, 0.3 if base.model.nq > 2 else 0.1, size=base.model.nq)
            qvel = np.clip(base.data.qvel.copy() + rng.normal(0, 1.0, size=base.model.nv), -9, 9)
            base.set_state(qpos, qvel)
            obs = base._get_obs()
        act = env.action_space.sample()
        next_obs, _, terminated, truncated, _ = env.step(act)
        rows.append((obs, act, next_obs, terminated))
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    obs, act, next_obs, term = (np.array(x) for x in zip(*rows))
    return (torch.as_tensor(obs, dtype=torch.float32), torch.as_tensor(act, dtype=torch.float32),
            torch.as_tensor(next_obs, dtype=torch.float32), torch.as_tensor(term))


@pytest.mark.parametrize("family", list(ENVS))
def test_termination_matches_gymnasium(family):
    obs, act, next_obs, terminated = visited_transitions(*ENVS[family])
    done = mopo.TERMINATION_FNS[family](obs, act, next_obs)
    assert done.dtype == torch.bool and done.shape == terminated.shape
    assert torch.equal(done, terminated), f"{family}: {int((done != terminated).sum())} of {len(done)} disagree"
    if family != "halfcheetah":  # both outcomes were seen, so the comparison above could fail
        assert 0 < int(terminated.sum()) < len(terminated)


def test_hopper_state_bound_applies_to_each_dim():
    """The old code wrapped `abs(next_obs[:, 1:] < 100)`, a no-op bound; a huge velocity must terminate."""
    next_obs = torch.zeros(2, 11)
    next_obs[:, 0] = 1.25
    next_obs[1, 5] = -150.0
    assert mopo.hopper_done(None, None, next_obs).tolist() == [False, True]


def test_nan_states_terminate():
    for family, dim in [("hopper", 11), ("ant", 111)]:
        next_obs = torch.full((1, dim), float("nan"))
        assert mopo.TERMINATION_FNS[family](None, None, next_obs).item()
