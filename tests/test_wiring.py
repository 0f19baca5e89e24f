"""main's wiring, through `mopo.main` in-process with spies: which columns of the file become (s, a, r, s′, done), the
real/model mix of every SAC batch (D10), the model buffer's capacity (D9), rollout start states (D8) and the model's
targets (D1). The dataset is tagged so that no two columns can be confused and real rows are told from model rows."""
import h5py
import numpy as np
import pytest
import torch

import mopo

N, OBS, ACT = 600, 11, 3  # hopper's dimensions: evaluation runs in Hopper-v4
FLAGS = dict(env_id="hopper-medium-v2", lam=1.0, rollout_length=2, epochs=1, steps_per_epoch=20, rollout_freq=10,
             rollout_batch_size=50, model_retain_epochs=3, batch_size=70, eval_episodes=1, dynamics_max_epochs=1,
             dynamics_hidden_dim=32, log_freq=10, device="cpu")


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """Columns that cannot pass for each other: rewards 10 + i/N (unique, never 0 or 1), terminals on every 5th row,
    next states 0.5 + s + noise (never a state of the file), actions in (−1, 1)."""
    rng = np.random.default_rng(0)
    data = {"observations": rng.normal(size=(N, OBS)), "actions": rng.uniform(-1, 1, size=(N, ACT)),
            "rewards": 10 + np.arange(N) / N, "terminals": np.arange(N) % 5 == 0, "timeouts": np.zeros(N, bool)}
    data["next_observations"] = data["observations"] + 0.5 + 0.01 * rng.normal(size=(N, OBS))
    path = tmp_path_factory.mktemp("tagged") / "tagged.hdf5"
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f.create_dataset(k, data=v.astype(bool if v.dtype == bool else np.float32))
    return path, {k: torch.as_tensor(v, dtype=torch.float32) for k, v in data.items()}


def row_of(rows, table):
    """For each row of rows [B, D], the index of the identical row of table [N, D], or −1."""
    same = (rows[:, None, :] == table[None]).all(-1)  # [B, N]
    return torch.where(same.any(1), same.float().argmax(1), -1)


def spied_run(path, monkeypatch, tmp_path, **overrides):
    seen = {"batches": [], "starts": [], "capacities": []}
    sac_update, rollout, train_dynamics = mopo.sac_update, mopo.rollout, mopo.train_dynamics

    def sac_update_spy(sac, opts, batch, args):
        seen["batches"].append(tuple(x.clone() for x in batch))
        return sac_update(sac, opts, batch, args)

    def rollout_spy(actor, step_fn, start_obs, *args, **kwargs):
        seen["starts"].append(start_obs.clone())
        return rollout(actor, step_fn, start_obs, *args, **kwargs)

    def train_dynamics_spy(model, data, *args, **kwargs):
        seen["model_data"] = tuple(x.clone() for x in data)
        return train_dynamics(model, data, *args, **kwargs)

    class Buffer(mopo.ReplayBuffer):
        def __init__(self, capacity, *args):
            seen["capacities"].append(capacity)
            super().__init__(capacity, *args)
    for name, spy in (("sac_update", sac_update_spy), ("rollout", rollout_spy),
                      ("train_dynamics", train_dynamics_spy), ("ReplayBuffer", Buffer)):
        monkeypatch.setattr(mopo, name, spy)
    monkeypatch.chdir(tmp_path)
    mopo.main(mopo.Args(dataset_path=str(path), **FLAGS | overrides))
    return seen


@pytest.mark.parametrize("real_ratio", [0.0, 0.05, 0.5, 1.0])
def test_every_batch_is_real_rows_first_then_model_rows(real_ratio, tagged, monkeypatch, tmp_path):
    path, data = tagged
    seen = spied_run(path, monkeypatch, tmp_path, real_ratio=real_ratio)
    n_real = int(real_ratio * 70)  # 0, 3 (3.5 truncated), 35, 70
    assert len(seen["batches"]) == 20
    keys = torch.cat([data["observations"], data["actions"]], 1)
    for obs, act, rew, next_obs, done in seen["batches"]:
        assert obs.shape == next_obs.shape == (70, OBS) and act.shape == (70, ACT) and rew.shape == done.shape == (70,)
        idx = row_of(torch.cat([obs, act], 1), keys)  # real: (s, a) of the file; a model row's a is the policy's
        assert (idx[:n_real] >= 0).all() and (idx[n_real:] == -1).all()
        real = idx[:n_real]
        assert torch.equal(rew[:n_real], data["rewards"][real])  # each column from its own key
        assert torch.equal(next_obs[:n_real], data["next_observations"][real])
        assert torch.equal(done[:n_real], data["terminals"][real])
    if real_ratio == 1.0:  # plain SAC on the data: no model rollouts, no model buffer to speak of
        assert seen["starts"] == [] and seen["capacities"] == [N, 1]
    else:
        assert len(seen["starts"]) == 2 and seen["capacities"] == [N, 3 * 50 * 2]  # retain × rollout batch × h


def test_rollouts_start_from_states_s_and_the_model_learns_r_and_delta_s(tagged, monkeypatch, tmp_path):
    path, data = tagged
    seen = spied_run(path, monkeypatch, tmp_path)
    for start in seen["starts"]:
        assert start.shape == (50, OBS)
        assert (row_of(start, data["observations"]) >= 0).all()  # states s of the file, never s′
        assert (row_of(start, data["next_observations"]) == -1).all()
    assert not torch.equal(seen["starts"][0], seen["starts"][1])  # a new draw each round
    obs, act, target = seen["model_data"]
    assert torch.equal(obs, data["observations"]) and torch.equal(act, data["actions"])
    torch.testing.assert_close(target, torch.cat([data["rewards"][:, None],  # D1: [r, Δs = s′ − s], reward first
                                                  data["next_observations"] - data["observations"]], 1))
