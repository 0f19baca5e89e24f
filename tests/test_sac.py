"""SAC pieces (D13): Bellman target masking, tanh-Gaussian log-probability, batched critics, target update."""
import copy
import math
import types

import gymnasium as gym
import pytest
import torch
from torch.distributions import Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform

import mopo


def test_bellman_target_masks_terminals():
    rew, done = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    next_q, next_log_prob = torch.tensor([10.0, 10.0]), torch.tensor([-2.0, -2.0])
    y = mopo.soft_bellman_target(rew, done, next_q, next_log_prob, alpha=0.5, gamma=0.9)
    torch.testing.assert_close(y, torch.tensor([1.0 + 0.9 * (10.0 + 1.0), 1.0]))


def test_bellman_target_rejects_column_vectors():
    """A [B, 1] reward would broadcast against [B] into [B, B]; a ValueError (an assert would vanish under -O)."""
    with pytest.raises(ValueError, match="reward, done"):
        mopo.soft_bellman_target(torch.zeros(4, 1), torch.zeros(4), torch.zeros(4), torch.zeros(4), 1.0, 0.99)


def test_actor_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    actor = mopo.Actor(4, 3, torch.tensor([-2.0, -1.0, 0.0]), torch.tensor([2.0, 1.0, 1.0]))
    obs = torch.randn(64, 4)
    torch.manual_seed(1)
    action, log_prob = actor.sample(obs)
    mean, log_std = actor(obs)
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform(cache_size=1),
                                                                  AffineTransform(actor.action_bias, actor.action_scale)])
    expected = dist.log_prob(action.clamp(-2 + 1e-6, 2 - 1e-6)).sum(-1)
    assert log_prob.shape == (64,)
    ok = (action - actor.action_bias).abs() < 0.99 * actor.action_scale  # away from tanh saturation (atanh is exact)
    torch.testing.assert_close(log_prob[ok.all(1)], expected[ok.all(1)], atol=1e-3, rtol=1e-4)
    assert ((action >= actor.action_bias - actor.action_scale) & (action <= actor.action_bias + actor.action_scale)).all()


def test_twin_critics_batched_equal_separate_mlps():
    torch.manual_seed(0)
    qf = mopo.TwinQ(5, 2, hidden_dim=16)
    obs, act = torch.randn(9, 5), torch.randn(9, 2)
    q = qf(obs, act)
    assert q.shape == (2, 9)
    for i in range(2):
        h = torch.cat([obs, act], 1)
        for j, layer in enumerate(qf.net[::2]):
            h = h @ layer.weight[i] + layer.bias[i]
            h = torch.relu(h) if j < 2 else h
        torch.testing.assert_close(q[i], h.squeeze(-1))


def sac_setup(**overrides):
    """Tiny SAC on a 3-dim task with a 1-dim action, its optimizers, and one batch (done 0)."""
    torch.manual_seed(0)
    args = types.SimpleNamespace(**{"autotune": True, "alpha": 1.0, "gamma": 0.99, "tau": 0.005,
                                    "target_entropy": -1.0, "q_lr": 3e-4, "policy_lr": 3e-4, "alpha_lr": 3e-4,
                                    **overrides})
    sac = mopo.SAC(3, 1, gym.spaces.Box(-1.0, 1.0, (1,)), args.alpha)
    opts = mopo.sac_optimizers(sac, args, torch.device("cpu"), capturable=False)
    batch = (torch.randn(32, 3), torch.rand(32, 1) * 2 - 1, torch.randn(32), torch.randn(32, 3), torch.zeros(32))
    return types.SimpleNamespace(args=args, sac=sac, opts=opts, batch=batch)


def update(setup):
    """One `sac_update` on the setup's batch; returns its info dict with floats."""
    return {k: float(v) for k, v in mopo.sac_update(setup.sac, setup.opts, setup.batch, setup.args).items()}


def constant_twins(qf, values):
    """Make twin j output values[j] for every (s, a): last layer's weights 0, its bias the value."""
    with torch.no_grad():
        qf.net[-1].weight.zero_()
        qf.net[-1].bias.copy_(torch.tensor(values).view(2, 1, 1))  # [E=2, 1, 1]


def test_sac_update_steps_the_critics():
    setup = sac_setup()
    before = [p.clone() for p in setup.sac.qf.parameters()]
    update(setup)
    assert all(not torch.equal(p, p0) for p, p0 in zip(setup.sac.qf.parameters(), before))  # every tensor moved


@pytest.mark.parametrize("flip", [False, True], ids=["min-is-twin-0", "min-is-twin-1"])
def test_target_takes_the_min_of_the_target_twins_and_masks_terminals(flip):
    """y = r + γ(1 − d)(min_j Q'_j(s', a') − α log π): with constant twins (targets −3 and 5, critics 2 and 1, in
    either order) and α ≈ 0, q_loss = ½ Σ_j mean_B (Q_j − y)² has one value by hand. The max, the mean, one fixed
    twin or an unmasked terminal each give another."""
    setup = sac_setup(autotune=False, alpha=1e-9, gamma=0.9)
    targets, critics = [-3.0, 5.0], [2.0, 1.0]
    constant_twins(setup.sac.qf_target, targets[::-1] if flip else targets)
    constant_twins(setup.sac.qf, critics[::-1] if flip else critics)
    rew, done = setup.batch[2], setup.batch[4]
    done[::2] = 1.0
    y = rew + 0.9 * (1 - done) * -3.0
    info = update(setup)
    expected = 0.5 * ((2.0 - y).pow(2).mean() + (1.0 - y).pow(2).mean())
    assert info["losses/q_loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("flip", [False, True], ids=["min-is-twin-1", "min-is-twin-0"])
def test_actor_loss_takes_the_min_of_the_twins(flip):
    """actor loss = mean(α log π(ã|s) − min_j Q_j(s, ã)); with constant critics 2 and 1 (kept by lr 0) and α ≈ 0 it
    is −1 (the other twin or the max: −2; the mean: −1.5)."""
    setup = sac_setup(autotune=False, alpha=1e-9, q_lr=0.0)
    constant_twins(setup.sac.qf, [1.0, 2.0] if flip else [2.0, 1.0])
    assert update(setup)["losses/actor_loss"] == pytest.approx(-1.0, abs=1e-6)


def test_actor_loss_adds_the_entropy_term_and_a_flat_critic_makes_the_policy_wider():
    """actor loss = mean(α log π(ã|s) − min Q): with constant critics (lr 0) it is α·mean log π of the very actions
    drawn (replayed from the same seed), and its step lowers that mean log π (raises the entropy). The sign flipped
    (−α log π − Q) gives −α·mean log π and a step that narrows the policy."""
    setup = sac_setup(autotune=False, alpha=2.0, q_lr=0.0, policy_lr=1e-4)
    constant_twins(setup.sac.qf, [0.0, 0.0])
    before, obs, next_obs = copy.deepcopy(setup.sac.actor), setup.batch[0], setup.batch[3]

    def log_prob(actor):  # the update's own draws: the target's first, then the actor loss's
        torch.manual_seed(7)
        with torch.no_grad():
            actor.sample(next_obs)
            return actor.sample(obs)[1].mean().item()
    torch.manual_seed(7)
    info = update(setup)
    assert info["losses/actor_loss"] == pytest.approx(2.0 * log_prob(before), rel=1e-5)
    assert log_prob(setup.sac.actor) < log_prob(before)


@pytest.mark.parametrize("target_entropy", [50.0, -50.0])
def test_alpha_rises_when_entropy_is_below_the_target_and_falls_above(target_entropy):
    setup = sac_setup(target_entropy=target_entropy)
    before = setup.sac.log_alpha.item()
    info = update(setup)
    after = setup.sac.log_alpha.item()
    assert (info["charts/entropy"] < target_entropy) == (after > before) and after != before


def test_sac_update_moves_targets_by_tau_and_learns():
    setup = sac_setup(tau=0.25)
    sac = setup.sac
    with torch.no_grad():  # targets away from the critics, so a step toward them shows
        for t in sac.qf_target.parameters():
            t.add_(torch.randn_like(t))
    target_before = [p.clone() for p in sac.qf_target.parameters()]
    actor_before = [p.clone() for p in sac.actor.parameters()]
    critic_before = [p.clone() for p in sac.qf.parameters()]
    info = update(setup)
    for t0, t1, p, p0 in zip(target_before, sac.qf_target.parameters(), sac.qf.parameters(), critic_before):
        assert not torch.equal(p, p0)  # the critic stepped
        torch.testing.assert_close(t1, t0 + 0.25 * (p - t0))  # θ' ← θ' + τ(θ − θ'), with θ already updated
    assert any(not torch.equal(a, b) for a, b in zip(actor_before, sac.actor.parameters()))
    assert sac.log_alpha.item() != 0.0 and all(p.requires_grad for p in sac.qf.parameters())
    assert not any(p.requires_grad for p in sac.qf_target.parameters())
    assert all(math.isfinite(v) for v in info.values())


def test_fixed_alpha_without_autotune():
    setup = sac_setup(autotune=False, alpha=0.2)
    before = setup.sac.log_alpha.item()
    info = update(setup)
    assert info["losses/alpha"] == pytest.approx(0.2) and "losses/alpha_loss" not in info
    assert setup.sac.log_alpha.item() == before  # untouched


def test_sac_module_holds_every_parameter_and_targets_start_as_the_critics():
    sac = mopo.SAC(3, 1, gym.spaces.Box(-1.0, 1.0, (1,)), alpha=0.5)
    keys = sac.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"actor", "qf", "qf_target", "log_alpha"}
    assert sac.log_alpha.item() == pytest.approx(math.log(0.5))
    assert all(torch.equal(a, b) for a, b in zip(sac.qf.parameters(), sac.qf_target.parameters()))


def test_a_loaded_optimizer_keeps_this_runs_flags():
    """A checkpoint written on the CPU (capturable off) may resume on a GPU whose CUDA graph needs capturable Adam."""
    setup = sac_setup()
    update(setup)
    saved = setup.opts["q"].state_dict()
    assert not saved["param_groups"][0]["capturable"]
    capturable = mopo.adam(setup.sac.qf.parameters(), 3e-4, torch.device("cpu"), capturable=True)
    mopo.load_optimizer(capturable, saved)
    assert all(g["capturable"] and g["fused"] for g in capturable.param_groups)
    assert torch.equal(capturable.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
