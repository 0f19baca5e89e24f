"""Alg. 2's penalty u(s,a) and the penalized reward r̃ = r − λ·u, by hand."""
import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import tyro

import mopo

# Hand-set std vectors [r, Δs] of a 3-member ensemble at one (s, a): their L2 norms are 3, 7 and √0.75.
STDS = torch.tensor([[1.0, 2.0, 2.0], [2.0, 3.0, 6.0], [0.5, 0.5, 0.5]])


def test_aleatoric_penalty_is_max_over_all_members_of_std_norm():
    logvar = (2 * STDS.log())[:, None, :].repeat(1, 4, 1)  # [E=3, B=4, 3]
    mean = torch.randn(3, 4, 3)
    u = mopo.penalty(mean, logvar, "aleatoric")
    assert u.shape == (4,)
    torch.testing.assert_close(u, torch.full((4,), 7.0))  # not the mean (3.62), not elites {0, 2} only (3.0)


def test_penalty_per_row_picks_its_own_max():
    logvar = torch.stack([2 * STDS.log(), 2 * STDS.flip(0).log()], dim=1)  # [3, 2, 3]
    logvar[1, 1] = 2 * math.log(10.0)  # row 1: member 1 now has std norm 10·√3
    u = mopo.penalty(torch.zeros(3, 2, 3), logvar, "aleatoric")
    torch.testing.assert_close(u, torch.tensor([7.0, 10 * math.sqrt(3)]))


def test_ensemble_std_penalty_is_max_distance_to_mean_prediction_on_state_dims():
    mean = torch.zeros(3, 1, 3)
    mean[:, 0, 0] = torch.tensor([100.0, -100.0, 0.0])  # the reward dim is ignored
    mean[:, 0, 1:] = torch.tensor([[3.0, 0.0], [0.0, 0.0], [-3.0, 4.0]])  # mean over members: (0, 4/3)
    u = mopo.penalty(mean, torch.zeros(3, 1, 3), "ensemble-std")
    expected = max(math.hypot(3, 4 / 3), math.hypot(0, 4 / 3), math.hypot(-3, 8 / 3))
    torch.testing.assert_close(u, torch.tensor([expected]))


def test_unknown_penalty_is_an_error():
    with pytest.raises(ValueError, match="aleatoric or ensemble-std"):
        mopo.penalty(torch.zeros(2, 1, 3), torch.zeros(2, 1, 3), "bogus")


class FixedModel(nn.Module):
    """A stand-in ensemble predicting hand-set means and std vectors for every (s, a)."""

    def __init__(self, mean, std, elites):
        super().__init__()
        self.mean, self.logvar = mean, 2 * std.log()  # [E, D]
        self.register_buffer("elites", torch.tensor(elites))

    def forward(self, obs, act):
        b = len(obs)
        return self.mean[:, None].expand(-1, b, -1), self.logvar[:, None].expand(-1, b, -1)


def stepper(model, kind, termination_fn):
    """`model_step` with its model, penalty and termination function bound, as main binds it."""
    return partial(mopo.model_step, model, penalty_kind=kind, termination_fn=termination_fn)


class ZeroActor:
    def sample(self, obs):
        return torch.zeros(len(obs), 1), torch.zeros(len(obs))


def fixed_model():
    # member 0 (the only elite) is near-deterministic: r = 1.5, Δs = (0.1, -0.2); member 1 is uncertain (norm 7).
    mean = torch.tensor([[1.5, 0.1, -0.2], [0.0, 0.0, 0.0]])
    std = torch.tensor([[1e-6, 1e-6, 1e-6], [2.0, 3.0, 6.0]])
    return FixedModel(mean, std, elites=[0])


def never_done(obs, act, next_obs):
    return torch.zeros(len(obs), dtype=torch.bool)


@pytest.mark.parametrize("lam", [0.0, 0.7, 2.5])
def test_penalized_reward_in_rollout_is_r_minus_lambda_u(lam):
    rows, stats = mopo.rollout(ZeroActor(), stepper(fixed_model(), "aleatoric", never_done), torch.zeros(8, 2), 3, lam)
    obs, act, rew, next_obs, done = mopo.ReplayBuffer(1, 2, 1, "cpu").split(rows)
    assert rew.shape == (24,)
    torch.testing.assert_close(rew, torch.full((24,), 1.5 - lam * 7.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(next_obs - obs, torch.tensor([0.1, -0.2]).expand(24, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats["raw_reward_mean"], torch.tensor(1.5), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats["penalty_mean"], torch.tensor(7.0))


def test_lambda_zero_leaves_model_reward_unchanged():
    torch.manual_seed(0)
    model = FixedModel(torch.tensor([[0.3, 0.0], [0.0, 0.0]]), torch.tensor([[0.5, 0.1], [4.0, 4.0]]), elites=[0])
    torch.manual_seed(1)
    rows0, _ = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", never_done), torch.zeros(64, 1), 1, 0.0)
    torch.manual_seed(1)
    rows1, _ = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", never_done), torch.zeros(64, 1), 1, 1.0)
    rew0, rew1 = rows0[:, 2], rows1[:, 2]
    assert rew0.std() > 0.3  # the sampled (noisy) reward of the elite, untouched
    torch.testing.assert_close(rew0 - rew1, torch.full((64,), math.hypot(4.0, 4.0)))


def test_lambda_from_the_command_line_reaches_the_reward(hopper_file, tmp_path, monkeypatch):
    """Another PyTorch MOPO ignored --lam; here the value typed reaches every penalized model reward."""
    args = tyro.cli(mopo.Args, args=["--env-id", "hopper-medium-v2", "--dataset-path", str(hopper_file),
                                     "--lam", "3.25", "--rollout-length", "2", "--epochs", "1",
                                     "--steps-per-epoch", "2", "--rollout-batch-size", "64", "--eval-episodes", "1",
                                     "--dynamics-max-epochs", "1", "--log-freq", "1"])
    seen = []

    def spy(actor, step_fn, start_obs, rollout_length, lam):
        rows, stats = rollout(actor, step_fn, start_obs, rollout_length, lam)
        seen.append((lam, rows[:, 11 + 3], stats))
        return rows, stats

    rollout = mopo.rollout
    monkeypatch.setattr(mopo, "rollout", spy)
    monkeypatch.chdir(tmp_path)
    results = mopo.main(args)
    assert results["lam"] == 3.25 and len(seen) == 1
    lam, rew, stats = seen[0]
    assert lam == 3.25
    expected = stats["raw_reward_mean"] - 3.25 * stats["penalty_mean"]
    torch.testing.assert_close(rew.mean(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats["penalized_reward_mean"], expected)
    assert stats["penalty_mean"] > 0.01  # a real penalty, so the check above could fail
