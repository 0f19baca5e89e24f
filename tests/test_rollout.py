"""Model rollouts (D7, D8): terminated branches stop; one elite per transition."""
import torch
import torch.nn as nn

import mopo
from test_penalty import FixedModel, ZeroActor, stepper


def done_when_marked(obs, act, next_obs):
    """Branches marked with s₁ = 1 terminate at their second step (s₀ counts the steps taken)."""
    return (obs[:, 1] >= 0.5) & (next_obs[:, 0] >= 2.0 - 1e-3)


def test_terminated_branches_stop():
    start = torch.zeros(6, 2)
    start[::2, 1] = 1.0  # rows 0, 2, 4 terminate at step 2
    model = FixedModel(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), torch.full((2, 3), 1e-6), elites=[0, 1])
    rows, stats = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", done_when_marked), start, 4, 0.0)
    obs, _, _, next_obs, done = mopo.ReplayBuffer(1, 2, 1, "cpu").split(rows)
    # 3 branches run 4 steps, 3 stop after 2 steps (their terminal transition is kept with done = 1)
    assert len(rows) == 3 * 4 + 3 * 2
    assert int(done.sum()) == 3
    assert (done[next_obs[:, 0] > 2.5] == 0).all()
    steps_of_terminating = next_obs[obs[:, 1] >= 0.5, 0].round()
    assert sorted(steps_of_terminating.tolist()) == [1.0] * 3 + [2.0] * 3  # nothing after the terminal step
    torch.testing.assert_close(stats["terminal_frac"], torch.tensor(3 / 18))


def test_all_branches_terminated_ends_the_rollout():
    model = FixedModel(torch.zeros(2, 3), torch.full((2, 3), 1e-6), elites=[0])
    always = lambda obs, act, next_obs: torch.ones(len(obs), dtype=torch.bool)  # noqa: E731
    rows, _ = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", always), torch.zeros(5, 2), 10, 0.0)
    assert len(rows) == 5 and (rows[:, -1] == 1).all()


def test_each_transition_uses_a_random_elite():
    # elites 0 and 2 predict Δs = +1 and −1; the non-elite member 1 predicts +100 and must never be sampled
    model = FixedModel(torch.tensor([[0.0, 1.0], [0.0, 100.0], [0.0, -1.0]]), torch.full((3, 2), 1e-6), elites=[0, 2])
    never = lambda obs, act, next_obs: torch.zeros(len(obs), dtype=torch.bool)  # noqa: E731
    torch.manual_seed(0)
    rows, _ = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", never), torch.zeros(4000, 1), 1, 0.0)
    delta = (rows[:, 3] - rows[:, 0]).round()  # columns [s, a, r, s′, done]
    assert set(delta.tolist()) == {1.0, -1.0}
    assert abs((delta == 1).float().mean().item() - 0.5) < 0.05


def test_rollout_with_real_model_and_actor_shapes():
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(11, 3, num_ensemble=7, num_elites=5, hidden_dim=32)
    actor = mopo.Actor(11, 3, -torch.ones(3), torch.ones(3))
    start = torch.randn(300, 11) * 0.1
    start[:, 0] = 1.25
    rows, stats = mopo.rollout(actor, stepper(model, "aleatoric", mopo.hopper_done), start, 3, 1.0, chunk_size=128)
    assert rows.shape[1] == 11 + 3 + 1 + 11 + 1 and 300 <= len(rows) <= 900
    assert torch.isfinite(rows).all() and all(torch.isfinite(v) for v in stats.values())


class Echo(nn.Module):
    """A stand-in ensemble whose predictions depend on (s, a), s = (branch id, steps taken t): every member predicts
    reward 100·id + t + a and Δs = (0, 1). The elite (member 0) is near-deterministic; member 1's std on the reward
    dim is 1 + id + t, so u(s, a) = 1 + id + t: each row's reward and penalty name the (s, a) that produced them."""

    def __init__(self):
        super().__init__()
        self.register_buffer("elites", torch.tensor([0]))

    def forward(self, obs, act):
        b, ones = len(obs), torch.ones(len(obs))
        mean = torch.stack([100 * obs[:, 0] + obs[:, 1] + act[:, 0], 0 * ones, ones], 1).expand(2, b, 3)
        std = torch.stack([torch.full((b, 3), 1e-6), torch.stack([1 + obs[:, 0] + obs[:, 1], 1e-6 * ones,
                                                                   1e-6 * ones], 1)])  # [E=2, B, 3]
        return mean, 2 * std.log()


class ScaledIdActor:
    def sample(self, obs):
        return 0.01 * obs[:, :1], torch.zeros(len(obs))


def stop_odd_branches(obs, act, next_obs):
    """Odd branches end on reaching step 1 + id % 3 (1, 2 or 3); even ones run the whole horizon."""
    branch = next_obs[:, 0].round()
    return (branch % 2 == 1) & (next_obs[:, 1] > branch % 3 + 0.5)


def test_each_row_has_the_reward_and_penalty_of_its_own_s_a_before_and_after_branches_end():
    start = torch.stack([torch.arange(12.0), torch.zeros(12)], 1)  # [12, 2]: ids 0..11, t = 0
    lam, h = 0.5, 4
    rows, stats = mopo.rollout(ScaledIdActor(), stepper(Echo(), "aleatoric", stop_odd_branches), start, h, lam)
    obs, act, rew, next_obs, done = mopo.ReplayBuffer(1, 2, 1, "cpu").split(rows)
    branch, t = obs[:, 0].round(), obs[:, 1].round()
    torch.testing.assert_close(act[:, 0], 0.01 * branch)
    torch.testing.assert_close(next_obs, obs + torch.tensor([0.0, 1.0]), atol=1e-4, rtol=0)
    u = 1 + branch + t  # the penalty at s (at s′ it would be one more)
    torch.testing.assert_close(rew, 100 * branch + t + 0.01 * branch - lam * u, atol=1e-3, rtol=0)
    ends_at = torch.where(branch % 2 == 1, 1 + branch % 3, torch.full_like(branch, 99))
    assert torch.equal(done.bool(), t + 1 == ends_at)  # done on its last step, never before
    lengths = torch.bincount(branch.long(), minlength=12)
    assert lengths.tolist() == [h if i % 2 == 0 else 1 + i % 3 for i in range(12)]
    torch.testing.assert_close(stats["penalty_mean"], u.mean())


def test_model_noise_is_drawn_with_the_elites_std():
    """D7: (r, Δs) = μ + σ·ε for the chosen elite: the sampled values scatter with σ around μ."""
    model = FixedModel(torch.tensor([[2.0, 0.5], [-4.0, 9.0]]), torch.tensor([[0.3, 0.2], [5.0, 5.0]]), elites=[0])
    never = lambda obs, act, next_obs: torch.zeros(len(obs), dtype=torch.bool)  # noqa: E731
    torch.manual_seed(0)
    rows, _ = mopo.rollout(ZeroActor(), stepper(model, "aleatoric", never), torch.zeros(20_000, 1), 1, 0.0)
    rew, delta = rows[:, 2], rows[:, 3] - rows[:, 0]
    assert abs(rew.mean().item() - 2.0) < 0.01 and abs(rew.std().item() - 0.3) < 0.01
    assert abs(delta.mean().item() - 0.5) < 0.01 and abs(delta.std().item() - 0.2) < 0.01
