"""Termination functions (D11) agree with the gymnasium envs' own `terminated`."""

import numpy as np
import pytest
import torch

import mopo

ENVS = {"hopper": ("Hopper-v4", {}), "walker2d": ("Walker2d-v4", {}), "halfcheetah": ("HalfCheetah-v4", {}),
        "ant": ("Ant-v4", {"use_contact_forces": True}), "invertedpendulum": ("InvertedPendulum-v4", {})}


def visited_transitions(gym_id, kwargs, num_steps=1500, seed=0):
    """(s, a, s', terminated) from random actions, plus states with perturbed positions so both outcomes occur."""
    env = mopo.make_env(mopo.Task(gym_id, "", None, gym_id, kwargs))  # as mopo.py builds envs: no MUJOCO_LOG.TXT
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


EPS = 1e-3
HEALTHY = {"hopper": (11, {0: 1.25}), "walker2d": (17, {0: 1.25}), "halfcheetah": (17, {}), "ant": (111, {0: 0.55}),
           "invertedpendulum": (4, {})}
# family: [(dimension, value, done?)], each threshold from both sides (D11; MBPO/MOPO's static termination functions)
BOUNDARIES = {
    "hopper": [(0, 0.7 + EPS, False), (0, 0.7, True), (0, 0.7 - EPS, True),  # height > 0.7
               (1, 0.2 - EPS, False), (1, 0.2 + EPS, True), (1, -0.2 + EPS, False), (1, -0.2 - EPS, True),  # |angle|
               (5, 100 - EPS, False), (5, 100 + EPS, True), (10, -100 + EPS, False), (10, -100 - EPS, True),
               (3, float("nan"), True), (4, float("inf"), True)],
    "walker2d": [(0, 0.8 + EPS, False), (0, 0.8 - EPS, True), (0, 2.0 - EPS, False), (0, 2.0 + EPS, True),
                 (1, 1.0 - EPS, False), (1, 1.0 + EPS, True), (1, -1.0 + EPS, False), (1, -1.0 - EPS, True)],
    "halfcheetah": [(0, -1e3, False), (1, 1e3, False), (8, -1e3, False)],  # never terminates
    "ant": [(0, 0.2, False), (0, 0.2 - EPS, True), (0, 1.0, False), (0, 1.0 + EPS, True),
            (5, float("nan"), True)],
    "invertedpendulum": [(1, 0.2, False), (1, 0.2 + EPS, True), (1, -0.2, False), (1, -0.2 - EPS, True),
                         (2, float("nan"), True)],
}


@pytest.mark.parametrize("family", list(BOUNDARIES))
def test_each_threshold_from_both_sides(family):
    dim, base = HEALTHY[family]
    cases = BOUNDARIES[family]
    next_obs = torch.zeros(len(cases) + 1, dim)  # the last row: the healthy state itself
    for d, value in base.items():
        next_obs[:, d] = value
    for i, (d, value, _) in enumerate(cases):
        next_obs[i, d] = value
    done = mopo.TERMINATION_FNS[family](None, None, next_obs)
    assert done.tolist() == [c[2] for c in cases] + [False], [(c, bool(x)) for c, x in zip(cases, done)]
