"""Model rollouts (D7, D8): terminated branches stop; one elite per transition."""
import torch

import mopo
from test_penalty import FixedModel, ZeroActor


def done_when_marked(obs, act, next_obs):
    """Branches marked with s₁ = 1 terminate at their second step (s₀ counts the steps taken)."""
    return (obs[:, 1] >= 0.5) & (next_obs[:, 0] >= 2.0 - 1e-3)


def test_terminated_branches_stop():
    start = torch.zeros(6, 2)
    start[::2, 1] = 1.0  # rows 0, 2, 4 terminate at step 2
    model = FixedModel(torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), torch.full((2, 3), 1e-6), elites=[0, 1])
    rows, stats = mopo.rollout(ZeroActor(), model, start, 4, 0.0, "aleatoric", done_when_marked)
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
    rows, _ = mopo.rollout(ZeroActor(), model, torch.zeros(5, 2), 10, 0.0, "aleatoric", always)
    assert len(rows) == 5 and (rows[:, -1] == 1).all()


def test_each_transition_uses_a_random_elite():
    # elites 0 and 2 predict Δs = +1 and −1; the non-elite member 1 predicts +100 and must never be sampled
    model = FixedModel(torch.tensor([[0.0, 1.0], [0.0, 100.0], [0.0, -1.0]]), torch.full((3, 2), 1e-6), elites=[0, 2])
    never = lambda obs, act, next_obs: torch.zeros(len(obs), dtype=torch.bool)  # noqa: E731
    torch.manual_seed(0)
    rows, _ = mopo.rollout(ZeroActor(), model, torch.zeros(4000, 1), 1, 0.0, "aleatoric", never)
    delta = (rows[:, 3] - rows[:, 0]).round()  # columns [s, a, r, s′, done]
    assert set(delta.tolist()) == {1.0, -1.0}
    assert abs((delta == 1).float().mean().item() - 0.5) < 0.05


def test_rollout_with_real_model_and_actor_shapes():
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(11, 3, num_ensemble=7, num_elites=5, hidden_dim=32)
    actor = mopo.Actor(11, 3, -torch.ones(3), torch.ones(3))
    start = torch.randn(300, 11) * 0.1
    start[:, 0] = 1.25
    rows, stats = mopo.rollout(actor, model, start, 3, 1.0, "aleatoric", mopo.hopper_done, chunk_size=128)
    assert rows.shape[1] == 11 + 3 + 1 + 11 + 1 and 300 <= len(rows) <= 900
    assert torch.isfinite(rows).all() and all(torch.isfinite(v) for v in stats.values())
