"""D4RL-ant evaluation and Minari datasets."""
import sys

import gymnasium as gym
import numpy as np
import pytest

import mopo

TINY = dict(epochs=1, steps_per_epoch=40, rollout_freq=20, rollout_batch_size=100, eval_episodes=2,
            dynamics_max_epochs=2, log_freq=10, batch_size=64)


def wrapped_steps(task, n=300, seed=0):
    """(obs, act, next_obs, env reward, simulator state after the step) from random actions in the task's env."""
    env = mopo.make_env(task)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = []
    for _ in range(n):
        act = env.action_space.sample()
        next_obs, reward, terminated, truncated, info = env.step(act)
        base = env.unwrapped
        out.append((obs, act, next_obs, reward, base.data.qpos.copy(), base.data.qvel.copy(), base.init_qpos.copy(),
                    info))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return out


def test_d4rl_ant_eval_zeroes_contact_forces_and_their_cost():
    task = mopo.make_task("ant-medium-v2")
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, info in wrapped_steps(task, 200):
        assert next_obs.shape == (111,) and not next_obs[27:].any()
        assert reward == pytest.approx(info["x_velocity"] + 1.0 - 0.5 * np.square(act).sum(), abs=1e-9)
    plain = mopo.make_env(mopo.make_task("Ant-v4"))  # a gymnasium task keeps the env as it is
    assert not isinstance(plain, (gym.wrappers.TransformObservation, gym.wrappers.TransformReward))


@pytest.fixture
def minari_dataset(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    env = mopo.make_env(mopo.Task("x", "hopper", None, "Hopper-v5", {}, None, None, None))
    env.action_space.seed(0)
    buffers = []
    for episode in range(40):
        obs, _ = env.reset(seed=episode)
        o, a, r, te, tr = [obs], [], [], [], []
        for t in range(100):
            act = env.action_space.sample()
            obs, rew, terminated, truncated, _ = env.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(terminated), tr.append(t == 99 and not terminated)
            if terminated:
                break
        buffers.append(EpisodeBuffer(id=episode, seed=episode, observations=o, actions=a, rewards=r, terminations=te,
                                     truncations=tr))
    minari.create_dataset_from_buffers("mopotest/hopper/random-v0", buffers, env="Hopper-v5", ref_min_score=-20.0,
                                       ref_max_score=3000.0, algorithm_name="random", data_format="hdf5")
    return "mopotest/hopper/random-v0", sum(len(b.rewards) for b in buffers)


def test_minari_dataset_trains_and_uses_its_reference_scores(minari_dataset, tmp_path, monkeypatch):
    dataset_id, steps = minari_dataset
    task = mopo.make_task(dataset_id)
    assert (task.family, task.gym_id, task.ref_min, task.ref_max) == ("hopper", "Hopper-v5", -20.0, 3000.0)
    data = mopo.get_dataset(task, None, 11, 3)
    assert len(data["rewards"]) == steps and data["terminals"].sum() > 0
    np.testing.assert_array_equal(data["observations"][1:50][data["terminals"][:49] == 0],
                                  data["next_observations"][:49][data["terminals"][:49] == 0])
    monkeypatch.chdir(tmp_path)
    results = mopo.main(mopo.Args(env_id=dataset_id, **TINY))
    last = results["evaluations"][-1]
    assert last["normalized_score"] == pytest.approx(100 * (last["return"] + 20.0) / 3020.0)


def test_minari_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "minari", None)  # `import minari` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'minari\[hdf5\]' pillow"):
        mopo.make_task("mujoco/hopper/medium-v0")
