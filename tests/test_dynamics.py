"""The Gaussian ensemble (D1-D5): batched layer, NLL, log-variance bounds, fitting, elites."""
import math
import types

import torch
import torch.nn.functional as F

import mopo


def test_batched_layer_equals_per_member_loop():
    torch.manual_seed(0)
    layer = mopo.EnsembleLinear(5, 6, 4)
    x = torch.randn(5, 9, 6)
    looped = torch.stack([F.linear(x[i], layer.weight[i].T, layer.bias[i, 0]) for i in range(5)])
    torch.testing.assert_close(layer(x), looped)


def test_model_forward_equals_member_by_member():
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=16)
    model.input_mean.copy_(torch.randn(5))
    model.input_std.copy_(torch.rand(5) + 0.5)
    obs, act = torch.randn(7, 3), torch.randn(7, 2)
    mean, logvar = model(obs, act)
    assert mean.shape == logvar.shape == (4, 7, 4)  # [E, B, 1 + obs_dim]
    for i in range(4):
        h = (torch.cat([obs, act], 1) - model.input_mean) / model.input_std
        for layer in model.hidden:
            h = F.silu(h @ layer.weight[i] + layer.bias[i])
        torch.testing.assert_close(mean[i], h @ model.mean_head.weight[i] + model.mean_head.bias[i])


def test_gaussian_nll_matches_torch_distributions():
    torch.manual_seed(0)
    mean, logvar, target = torch.randn(3, 50, 4), torch.randn(3, 50, 4), torch.randn(3, 50, 4)
    nll = mopo.gaussian_nll(mean, logvar, target)
    log_prob = torch.distributions.Normal(mean, (0.5 * logvar).exp()).log_prob(target)
    expected = (-2 * log_prob - math.log(2 * math.pi)).mean(dim=(1, 2))
    assert nll.shape == (3,)
    torch.testing.assert_close(nll, expected)


def test_dynamics_loss_adds_the_log_variance_bound_terms():
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(2, 1, num_ensemble=3, num_elites=2, hidden_dim=8)
    obs, act, target = torch.randn(3, 10, 2), torch.randn(3, 10, 1), torch.randn(3, 10, 3)
    expected = (mopo.gaussian_nll(*model(obs, act), target).sum()
                + 0.01 * model.max_logvar.sum() - 0.01 * model.min_logvar.sum())
    torch.testing.assert_close(mopo.dynamics_loss(model, obs, act, target), expected)


def test_optimizer_weight_decay_equals_the_authors_l2_term_in_the_loss():
    """Adam's coupled weight decay per layer takes the same steps as adding 0.5·wd·Σw² (wd per layer) to the loss."""
    torch.manual_seed(0)
    with_decay = mopo.EnsembleDynamics(2, 1, num_ensemble=3, num_elites=2, hidden_dim=8)
    with_term = mopo.EnsembleDynamics(2, 1, num_ensemble=3, num_elites=2, hidden_dim=8)
    with_term.load_state_dict(with_decay.state_dict())
    decays = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4, 1e-4)
    opt_decay = mopo.dynamics_optimizer(with_decay, lr=1e-3)
    opt_term = torch.optim.Adam(with_term.parameters(), lr=1e-3, fused=True)
    for _ in range(5):
        obs, act, target = torch.randn(3, 10, 2), torch.randn(3, 10, 1), torch.randn(3, 10, 3)
        for model, opt, l2 in ((with_decay, opt_decay, False), (with_term, opt_term, True)):
            loss = mopo.dynamics_loss(model, obs, act, target)
            if l2:
                loss = loss + sum(0.5 * wd * layer.weight.pow(2).sum() for layer, wd in zip(model.layers(), decays))
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(with_decay.named_parameters(), with_term.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert [g["weight_decay"] for g in opt_decay.param_groups] == [*decays, 0.0]  # biases and bounds: no decay


def test_log_variance_stays_inside_its_bounds():
    torch.manual_seed(0)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=3, num_elites=2, hidden_dim=32)
    with torch.no_grad():
        model.logvar_head.weight.mul_(1e4)  # push raw log-variances far beyond both bounds
    x = torch.randn(2000, 5) * 100
    _, logvar = model(x[:, :3], x[:, 3:])
    # the second soft clamp, min + softplus(lv − min), can exceed max by log(1 + e^{min − max}) ≈ 2.8e-5
    overshoot = torch.log1p(torch.exp(model.min_logvar - model.max_logvar))
    assert (logvar <= model.max_logvar + overshoot + 1e-6).all() and (logvar >= model.min_logvar).all()
    assert logvar.max() > model.max_logvar.max() - 0.1 and logvar.min() < model.min_logvar.min() + 0.1


def known_system(n, seed=0, noise=0.01):
    """s' = s + 0.1·tanh(A s) + B a, r = 0.1·(a₀ − s₁²), plus small Gaussian noise as in real data."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))  # the system is fixed; the draws vary
    B = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    obs, act = torch.randn(n, 3, generator=g), torch.rand(n, 2, generator=g) * 2 - 1
    next_obs = obs + 0.1 * torch.tanh(obs @ A) + 0.1 * act @ B
    rew = 0.1 * (act[:, 0] - obs[:, 1] ** 2)
    target = torch.cat([rew[:, None], next_obs - obs], 1)
    return obs, act, target + noise * torch.randn(target.shape, generator=g)


def test_ensemble_fits_a_known_system():
    torch.manual_seed(0)
    obs, act, target = known_system(3000)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=7, num_elites=5, hidden_dim=64)
    args = types.SimpleNamespace(num_ensemble=7, num_elites=5, holdout_size=500, dynamics_lr=3e-3,
                                 dynamics_batch_size=256, dynamics_max_epochs=60)
    stats = mopo.train_dynamics(model, (obs, act, target), args)
    assert stats["epochs"] <= 60
    variance = target.var(0).mean().item()
    assert stats["holdout_mse"] < 0.02 * variance, (stats, variance)
    fresh_obs, fresh_act, fresh_target = known_system(1000, seed=1)  # same system, new draws
    fresh = mopo.holdout_mse(model, fresh_obs, fresh_act, fresh_target)
    assert fresh[model.elites].mean() < 0.02 * variance
    assert (model.input_std != 1).all()  # inputs were normalised with the data's statistics


def test_elites_are_the_lowest_holdout_members():
    torch.manual_seed(0)
    obs, act, target = known_system(400)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=7, num_elites=5, hidden_dim=16)
    with torch.no_grad():
        model.mean_head.bias[2] += 10.0  # spoil members 2 and 5
        model.mean_head.bias[5] -= 3.0
    mse = mopo.select_elites(model, obs, act, target)
    assert mse.shape == (7,)
    assert set(model.elites.tolist()) == set(range(7)) - {2, 5}


class RecordingWriter:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append(value)


def test_early_stopping_restores_best_snapshot():
    """On a tiny noisy dataset the holdout MSE rises as the model overfits; training stops by patience and the
    restored members beat the last epoch's weights."""
    torch.manual_seed(0)
    obs, act, target = known_system(300, noise=0.3)
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=3, num_elites=2, hidden_dim=64)
    args = types.SimpleNamespace(num_ensemble=3, num_elites=2, holdout_size=1000, dynamics_lr=3e-3,
                                 dynamics_batch_size=32, dynamics_max_epochs=300)
    writer = RecordingWriter()
    stats = mopo.train_dynamics(model, (obs, act, target), args, writer)
    history = writer.scalars["dynamics/holdout_mse"]  # mean over members, per epoch
    assert len(history) == stats["epochs"] < 300  # stopped by patience, not by the cap
    assert stats["holdout_mse"] < history[-1]  # the snapshots were restored
    assert stats["holdout_mse"] <= min(history) * 1.05


def index_of_rows(obs):
    return {tuple(row.tolist()): i for i, row in enumerate(obs)}


def test_each_member_trains_on_its_own_bootstrap_of_the_training_split(monkeypatch):
    """D5: in one epoch each member sees N rows drawn with replacement from the N non-holdout rows (about 63% of them
    distinct), its own draw, and never a holdout row."""
    torch.manual_seed(0)
    obs, act, target = known_system(1200)  # 1000 to train on, 200 held out
    seen, loss = [], mopo.dynamics_loss

    def spy(model, obs_batch, act_batch, target_batch):
        seen.append(obs_batch.detach().clone())  # [E, B, obs_dim]
        return loss(model, obs_batch, act_batch, target_batch)
    monkeypatch.setattr(mopo, "dynamics_loss", spy)
    holdout = {}
    select = mopo.select_elites
    monkeypatch.setattr(mopo, "select_elites", lambda m, o, a, t: holdout.update(obs=o) or select(m, o, a, t))
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=4, num_elites=2, hidden_dim=8)
    args = types.SimpleNamespace(num_ensemble=4, num_elites=2, holdout_size=200, dynamics_lr=1e-3,
                                 dynamics_batch_size=64, dynamics_max_epochs=1)
    mopo.train_dynamics(model, (obs, act, target), args)
    index = index_of_rows(obs)
    held = {index[tuple(r.tolist())] for r in holdout["obs"]}
    assert len(held) == 200
    drawn = torch.cat(seen, 1)  # [E, 1000, 3]: the epoch
    members = [[index[tuple(r.tolist())] for r in drawn[e]] for e in range(4)]
    for rows in members:
        assert len(rows) == 1000 and not held & set(rows)
        assert 0.58 < len(set(rows)) / 1000 < 0.68  # with replacement: 1 − 1/e ≈ 0.632 distinct
    assert len({tuple(sorted(rows)) for rows in members}) == 4  # four different draws


def test_training_stops_by_the_patience_rule_and_keeps_each_members_best(monkeypatch):
    """D5, replayed from the per-member holdout MSEs of every epoch: a member improves when its MSE beats its best by
    > 1% (relative); training stops once no member improved for more than 5 epochs; each member ends with the weights
    of its best epoch; the elites are the members with the lowest of those MSEs."""
    torch.manual_seed(0)
    obs, act, target = known_system(300, noise=0.3)
    per_epoch, holdout_mse = [], mopo.holdout_mse
    monkeypatch.setattr(mopo, "holdout_mse", lambda *a: per_epoch.append(holdout_mse(*a)) or per_epoch[-1])
    model = mopo.EnsembleDynamics(3, 2, num_ensemble=3, num_elites=2, hidden_dim=64)
    args = types.SimpleNamespace(num_ensemble=3, num_elites=2, holdout_size=1000, dynamics_lr=3e-3,
                                 dynamics_batch_size=32, dynamics_max_epochs=300)
    stats = mopo.train_dynamics(model, (obs, act, target), args)
    history, final = per_epoch[:-1], per_epoch[-1]  # the last call: select_elites on the restored weights
    best, since, stop = torch.full((3,), 1e10), 0, None
    for epoch, mse in enumerate(history, 1):
        improved = (best - mse) / best > 0.01
        best = torch.where(improved, mse, best)
        since = 0 if improved.any() else since + 1
        if since > 5:
            stop = epoch
            break
    assert stop is not None and stats["epochs"] == stop == len(history) < 300
    torch.testing.assert_close(final, best, rtol=1e-6, atol=0)  # every member's best snapshot restored
    assert stats["member_holdout_mse"] == final.tolist()
    assert sorted(model.elites.tolist()) == sorted(final.argsort()[:2].tolist())
