"""Theorem 4.4's gauge (D17, D18): the deterministic policy's return in the learned model, raw and penalized, per
evaluation; summed by hand on a stand-in model, and logged by a real run to results.json and TensorBoard."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import gauge_checkpoint
import mopo
from conftest import run_dir_of
from test_penalty import stepper

TINY_STD = 1e-6  # the elite's std: a sampled reward is its mean to ~1e-6


class StepCounter(nn.Module):
    """A stand-in ensemble on states s = (steps taken t, marker m). Every member predicts Δs = (1, 0) and reward t + 1
    (the number of the step being taken); the elite (member 0) is near-deterministic, member 1 is uncertain: its std
    vector (2, 3, 6) has norm 7, so the aleatoric penalty is u = 7, and its mean is off by (6, 8) on the Δs dims, so
    the ensemble-std penalty is u = ‖(3, 4)‖ = 5."""

    def __init__(self):
        super().__init__()
        self.register_buffer("elites", torch.tensor([0]))
        self.calls = 0

    def forward(self, obs, act):
        self.calls += 1
        b = len(obs)
        mean = torch.stack([obs[:, 0] + 1, torch.ones(b), torch.zeros(b)], dim=1)  # [B, 3]: r, Δs
        mean = torch.stack([mean, mean + torch.tensor([0.0, 6.0, 8.0])])  # [E=2, B, 3]
        std = torch.tensor([[TINY_STD] * 3, [2.0, 3.0, 6.0]])[:, None].expand(2, b, 3)
        return mean, 2 * std.log()


class ZeroPolicy:
    """The gauge follows the deterministic policy: `act`, never `sample`."""

    def act(self, obs):
        return torch.zeros(len(obs), 1)

    def sample(self, obs):
        raise AssertionError("the gauge must use the deterministic action")


def done_at_marker(obs, act, next_obs):
    return next_obs[:, 0] > obs[:, 1] - 0.5  # the episode ends on the step that reaches its marker


MARKERS = [1.0, 3.0, 5.0, 100.0, 100.0]  # three episodes terminate (at steps 1, 3, 5), two run into the horizon


def start_states(markers=MARKERS):
    return torch.stack([torch.zeros(len(markers)), torch.tensor(markers)], dim=1)


@pytest.mark.parametrize("penalty_kind, u", [("aleatoric", 7.0), ("ensemble-std", 5.0)])
def test_model_returns_sum_rewards_and_penalties_up_to_and_including_the_terminal_step(penalty_kind, u):
    lam = 0.5
    out = mopo.model_returns(ZeroPolicy(), stepper(StepCounter(), penalty_kind, done_at_marker), start_states(), 8,
                             lam)
    assert set(out) == {"model_return", "penalized_model_return", "model_length"}
    lengths = torch.tensor([1.0, 3.0, 5.0, 8.0, 8.0])  # the terminal transition counts; horizon 8 caps the rest
    returns = lengths * (lengths + 1) / 2  # r = 1, 2, ..., L: nothing after the terminal step is added
    torch.testing.assert_close(out["model_length"], lengths, atol=0, rtol=0)
    torch.testing.assert_close(out["model_return"], returns, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["penalized_model_return"], returns - lam * u * lengths, atol=1e-4, rtol=0)


def test_horizon_caps_every_episode():
    out = mopo.model_returns(ZeroPolicy(), stepper(StepCounter(), "aleatoric", done_at_marker), start_states(), 2, 1.0)
    torch.testing.assert_close(out["model_length"], torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0]), atol=0, rtol=0)
    torch.testing.assert_close(out["model_return"], torch.tensor([1.0, 3.0, 3.0, 3.0, 3.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out["penalized_model_return"], torch.tensor([-6.0, -11.0, -11.0, -11.0, -11.0]),
                               atol=1e-4, rtol=0)


def test_stepping_stops_once_every_episode_ended():
    model = StepCounter()
    out = mopo.model_returns(ZeroPolicy(), stepper(model, "aleatoric", done_at_marker), start_states([1.0, 2.0, 2.0]),
                             1000, 0.0)
    assert out["model_length"].tolist() == [1.0, 2.0, 2.0] and model.calls == 2  # not 1000 model steps


class TwoElites(nn.Module):
    """Elites 0 and 2 predict reward +1 and −1 with std 0.5; member 1 (not an elite) predicts +100."""

    def __init__(self):
        super().__init__()
        self.register_buffer("elites", torch.tensor([0, 2]))

    def forward(self, obs, act):
        mean = torch.zeros(3, len(obs), 2)
        mean[:, :, 0] = torch.tensor([1.0, 100.0, -1.0])[:, None]
        return mean, torch.full((3, len(obs), 2), 2 * math.log(0.5))


def test_each_step_samples_a_random_elite_with_its_noise():
    """As rollouts do (D7): per step one random elite, reward μ + σ·ε, not the mean."""
    torch.manual_seed(0)
    never = lambda obs, act, next_obs: torch.zeros(len(obs), dtype=torch.bool)  # noqa: E731
    ret = mopo.model_returns(ZeroPolicy(), stepper(TwoElites(), "aleatoric", never), torch.zeros(20_000, 1), 1,
                             0.0)["model_return"]
    plus = ret > 0  # elite 0's draws: N(1, 0.5²) is positive with probability 0.977
    assert abs(plus.float().mean().item() - 0.5) < 0.03 and ret.max() < 5  # both elites, never member 1
    assert abs(ret.std().item() - math.sqrt(1 + 0.25)) < 0.03  # the mixture of N(±1, 0.5²): the noise is drawn
    assert abs(ret.mean().item()) < 0.03


# --- a real run logs the gauge with every evaluation ---
OLD_EVAL_KEYS = {"step", "epoch", "return", "return_std", "normalized_score", "normalized_score_std"}
GAUGE_KEYS = {"length", "model_return", "penalized_model_return", "model_length"}
OLD_TOP_KEYS = {"env_id", "seed", "lam", "rollout_length", "run_name", "dynamics", "final_return", "final_return_std",
                "final_normalized_score", "final_normalized_score_std", "evaluations", "args"}


def test_run_logs_the_gauge_to_results_and_tensorboard(hopper_file, tmp_path, monkeypatch):
    calls = {"start": [], "gauge": []}
    evaluate, model_returns = mopo.evaluate, mopo.model_returns

    def evaluate_spy(actor, envs, seed, gauge):
        calls["start"].append((envs.reset(seed=seed)[0].copy(), seed))
        return evaluate(actor, envs, seed, gauge)

    def model_returns_spy(actor, step_fn, start_obs, horizon, lam, graph):
        calls["gauge"].append((start_obs.clone(), step_fn.keywords, (horizon, lam, graph), torch.random.initial_seed()))
        return model_returns(actor, step_fn, start_obs, horizon, lam, graph)
    monkeypatch.setattr(mopo, "evaluate", evaluate_spy)
    monkeypatch.setattr(mopo, "model_returns", model_returns_spy)
    monkeypatch.chdir(tmp_path)
    results = mopo.main(mopo.Args(
        env_id="hopper-medium-v2", dataset_path=str(hopper_file), lam=2.0, epochs=2, steps_per_epoch=10,
        rollout_freq=10, rollout_batch_size=50, eval_freq=1, eval_episodes=3, dynamics_max_epochs=1,
        dynamics_hidden_dim=32, batch_size=32, log_freq=5, device="cpu"))

    # the gauge runs from the evaluation's own start states, as long as the env's episodes, with the run's λ
    assert len(calls["gauge"]) == len(calls["start"]) == 2
    for (start, seed), (start_obs, step, settings, gauge_seed) in zip(calls["start"], calls["gauge"]):
        assert start.shape == (3, 11) and torch.equal(start_obs, torch.as_tensor(start, dtype=torch.float32))
        assert settings == (1000, 2.0, False)
        assert step == {"penalty_kind": "aleatoric", "termination_fn": mopo.hopper_done}
        assert gauge_seed == seed  # its own seed per evaluation (seed + update): training's RNG untouched
    assert [c[1] for c in calls["start"]] == [1 + 10, 1 + 20]

    run_dir = next((tmp_path / "runs").iterdir())
    assert results == json.loads((run_dir / "results.json").read_text())
    assert OLD_TOP_KEYS <= set(results)
    assert [e["step"] for e in results["evaluations"]] == [10, 20]
    new_keys = GAUGE_KEYS | {f"{k}_std" for k in GAUGE_KEYS}
    for e in results["evaluations"]:
        assert OLD_EVAL_KEYS | new_keys <= set(e), sorted(OLD_EVAL_KEYS | new_keys - set(e))
        assert all(math.isfinite(v) for v in e.values()), e
        assert 1 <= e["length"] <= 1000 and 1 <= e["model_length"] <= 1000
        assert e["penalized_model_return"] <= e["model_return"]  # λ·u ≥ 0 at every step
    last = results["evaluations"][-1]
    assert (results["final_return"], results["final_normalized_score"]) == (last["return"], last["normalized_score"])

    scalars = EventAccumulator(str(run_dir))
    scalars.Reload()
    for key in ("model_return", "penalized_model_return", "model_length", "length", "model_return_std"):
        events = scalars.Scalars(f"eval/{key}")
        assert [ev.step for ev in events] == [10, 20]
        assert [ev.value for ev in events] == pytest.approx([e[key] for e in results["evaluations"]], rel=1e-6)


def test_evaluation_settings_do_not_change_training(hopper_file, tmp_path, monkeypatch):
    """The gauge seeds its own random numbers and restores training's: evaluating more often leaves the trained
    policy as it was."""
    weights = []
    for eval_freq in (1, 2):
        (tmp_path / str(eval_freq)).mkdir()
        monkeypatch.chdir(tmp_path / str(eval_freq))
        mopo.main(mopo.Args(env_id="hopper-medium-v2", dataset_path=str(hopper_file), lam=1.0, epochs=2,
                            steps_per_epoch=10, rollout_freq=10, rollout_batch_size=50, eval_episodes=2,
                            eval_freq=eval_freq, dynamics_max_epochs=1, dynamics_hidden_dim=32, batch_size=32,
                            log_freq=5, device="cpu"))
        (run_dir,) = (tmp_path / str(eval_freq) / "runs").iterdir()
        weights.append(torch.load(run_dir / "checkpoint.pt", weights_only=False)["sac"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


class Diverging(nn.Module):
    """The stand-in model of StepCounter, but its prediction turns NaN once s₀ (steps taken) reaches s₁ (a marker)."""

    def __init__(self):
        super().__init__()
        self.counter = StepCounter()
        self.register_buffer("elites", torch.tensor([0]))

    def forward(self, obs, act):
        mean, logvar = self.counter(obs, act)
        bad = (obs[:, 0] >= obs[:, 1] - 0.5)[None, :, None]
        return torch.where(bad, float("nan"), mean), logvar


def test_a_diverging_model_ends_the_episode_before_its_non_finite_step():
    """HalfCheetah never terminates, so a model that blows up would turn every later sum into NaN: the episode ends
    at the first non-finite step, which earns nothing."""
    never = lambda obs, act, next_obs: torch.zeros(len(obs), dtype=torch.bool)  # noqa: E731
    out = mopo.model_returns(ZeroPolicy(), stepper(Diverging(), "aleatoric", never), start_states([2.0, 4.0, 100.0]),
                             10, 0.5)
    lengths = torch.tensor([2.0, 4.0, 10.0])  # steps 1..L are finite; the next one is NaN
    torch.testing.assert_close(out["model_length"], lengths, atol=0, rtol=0)
    torch.testing.assert_close(out["model_return"], lengths * (lengths + 1) / 2, atol=1e-4, rtol=0)
    assert torch.isfinite(out["penalized_model_return"]).all()


@pytest.mark.parametrize("gaps, broken", [
    ([10.0] * 5, True),  # every episode's penalized model return 10 above its real return: broken
    ([-10.0] * 5, False),  # 10 below: the bound holds
    ([30.0, -30.0, 30.0, -30.0, 25.0], False),  # 5 above on average, within the noise of that mean
    ([100.0, 100.0, 100.0, 100.0, -1.0], True),  # one episode below, the mean 4 standard errors above 0
    ([1e6, 1.0, 1.0, 1.0, 1.0], True),  # a diverging episode: the mean is within its huge noise, but all are above
], ids=["broken", "holds", "within-noise", "mean-above", "all-above-diverging"])
def test_a_broken_bound_is_one_warning_and_is_recorded(gaps, broken, tmp_path, capsys):
    """D18 on a stand-in model's penalized returns (−2.5, −4.5, −2.5, 8, 8) against real returns below them by `gaps`:
    the warning is printed, counted in results.json and logged to TensorBoard exactly when the mean gap exceeds two
    standard errors or every gap is above 0; when the bound holds, only the usual evaluation line is printed."""
    torch.manual_seed(0)
    out = mopo.model_returns(ZeroPolicy(), stepper(StepCounter(), "aleatoric", done_at_marker), start_states(), 8, 0.5)
    torch.testing.assert_close(out["penalized_model_return"], torch.tensor([-2.5, -4.5, -2.5, 8.0, 8.0]), atol=1e-4,
                               rtol=0)
    real = out["penalized_model_return"].numpy() - np.array(gaps)
    summary = mopo.summarize(mopo.make_task("hopper-medium-v2"), {"return": real, "length": np.ones(5)} | out)
    results = {"lam": 0.5, "evaluations": [], "bound_broken_evaluations": 0}
    writer = SummaryWriter(str(tmp_path))
    mopo.record(writer, results, tmp_path, summary, 1, 10)
    writer.close()
    assert summary["bound_gap"] == pytest.approx(np.mean(gaps), rel=1e-6, abs=1e-4)
    assert summary["bound_broken"] == float(broken) and results["bound_broken_evaluations"] == int(broken)
    assert json.loads((tmp_path / "results.json").read_text())["evaluations"][-1]["bound_broken"] == float(broken)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + broken and printed[0].startswith("epoch 1 step 10: return")
    if broken:
        assert printed[1] == (f"warning: Theorem 4.4's bound broken: penalized model − real return "
                              f"{np.mean(gaps):.1f} ± {np.std(gaps):.1f}; λ = 0.5 is likely too small for this model "
                              f"and data")
    scalars = EventAccumulator(str(tmp_path))
    scalars.Reload()
    assert [ev.value for ev in scalars.Scalars("eval/bound_broken")] == [float(broken)]


def test_few_episodes_cannot_tell_a_broken_bound_from_noise():
    episodes = {"return": np.array([0.0]), "penalized_model_return": torch.tensor([50.0])}
    assert "bound_broken" not in mopo.summarize(mopo.make_task("Hopper-v4"), episodes)
    episodes = {"return": np.zeros(4), "penalized_model_return": torch.tensor([1e6, 1.0, 1.0, 1.0])}
    assert mopo.summarize(mopo.make_task("Hopper-v4"), episodes)["bound_broken"] == 0.0  # all above, but 2⁻⁴ > 5%


def test_a_checkpoint_regauged_episode_by_episode_gives_the_runs_last_evaluation(hopper_file, tmp_path, monkeypatch,
                                                                                 capsys):
    """benchmarks/gauge_checkpoint.py re-runs the evaluation at a checkpoint's step as main ran it: the same numbers."""
    monkeypatch.chdir(tmp_path)
    results = mopo.main(mopo.Args(dataset_path=str(hopper_file), epochs=1, steps_per_epoch=20, rollout_freq=10,
                                  rollout_batch_size=50, eval_episodes=5, dynamics_max_epochs=1,
                                  dynamics_hidden_dim=16, batch_size=32, device="cpu"))
    out = gauge_checkpoint.main(gauge_checkpoint.Args(str(run_dir_of(tmp_path))))
    assert out["evaluation"] == {k: v for k, v in results["evaluations"][-1].items() if k not in ("step", "epoch")}
    printed = capsys.readouterr().out.splitlines()
    assert len([line for line in printed if line.startswith("episode ")]) == 5
    assert out["model_error"]["transitions"] == out["evaluation"]["length"] * 5  # the same 5 real episodes
    assert sum(line.startswith("model on the policy's own states (") for line in printed) == 1


class ConstantPolicy:
    def __init__(self, action):
        self.action = action

    def act(self, obs):
        return self.action.expand(len(obs), -1)


class Recorder(nn.Module):
    """A stand-in ensemble that predicts [r, Δs] = 0 with std 1 from two members (elite: member 1), and keeps what
    it was asked: its error is then the true [r, Δs] of each transition it saw."""

    def __init__(self):
        super().__init__()
        self.register_buffer("elites", torch.tensor([1]))

    def forward(self, obs, act):
        self.seen = obs, act
        return torch.zeros(2, len(obs), 1 + obs.shape[1]), torch.zeros(2, len(obs), 1 + obs.shape[1])


def test_the_model_error_is_on_the_policys_own_real_transitions():
    task, actor = mopo.make_task("Hopper-v4"), ConstantPolicy(torch.tensor([0.7, -0.3, 0.1]))
    model, true_rows = Recorder(), []
    for seed in (40, 41, 42):  # evaluate's seeds for 3 episodes at seed 40
        env = mopo.make_env(task)
        obs, _ = env.reset(seed=seed)
        for _ in range(1000):
            next_obs, reward, terminated, truncated, _ = env.step(np.array([0.7, -0.3, 0.1]))
            true_rows.append(np.concatenate([obs, [reward], next_obs - obs]))
            obs = next_obs
            if terminated or truncated:
                break
    true_rows = np.array(true_rows)
    error = gauge_checkpoint.model_error(model, actor, task, seed=40, episodes=3, penalty_kind="aleatoric")
    np.testing.assert_allclose(model.seen[0].numpy(), true_rows[:, :11], rtol=0, atol=1e-6)  # the states it visits
    assert error["transitions"] == len(true_rows)
    y = true_rows[:, 11:]  # the model predicts 0: its error is the true [r, Δs]
    assert error["mse"] == pytest.approx(np.mean(y ** 2), rel=1e-5)
    assert error["error_norm"] == pytest.approx(np.linalg.norm(y, axis=1).mean(), rel=1e-5)
    assert error["reward_bias"] == pytest.approx(-np.mean(y[:, 0]), rel=1e-5)
    assert error["penalty"] == pytest.approx(math.sqrt(12), rel=1e-6)  # ‖σ‖ of 12 unit stds
