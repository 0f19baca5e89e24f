"""The paper's out-of-distribution tasks (Sec. 5.2), D4RL-ant evaluation, and Minari datasets."""
import math
import sys

import numpy as np
import pytest

import mopo
from conftest import make_d4rl_file

TINY = dict(epochs=1, steps_per_epoch=40, rollout_freq=20, rollout_batch_size=100, eval_episodes=2,
            dynamics_max_epochs=2, log_freq=10, batch_size=64)
DIRECTION = np.array([math.cos(math.pi / 6), math.sin(math.pi / 6)])


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


def test_halfcheetah_jump_relabel_equals_the_wrapped_env_and_the_simulator():
    task = mopo.make_task("halfcheetah-jump")
    assert (task.family, task.file_name, task.ref_min) == ("halfcheetah", "halfcheetah_full_replay-v2.hdf5", None)
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, _ in wrapped_steps(task):
        truth = min(qvel[0], 3.0) - 0.1 * np.square(act).sum() + 15.0 * (qpos[1] - init_qpos[1])
        relabelled = task.reward_fn(obs[None], act[None], next_obs[None])[0]
        assert reward == pytest.approx(truth, abs=1e-9) and relabelled == pytest.approx(truth, abs=1e-9)
    assert init_qpos[1] == 0.0  # z_init is a constant, so relabelling needs only the observation


def test_ant_angle_relabel_equals_the_wrapped_env_and_the_simulator():
    task = mopo.make_task("ant-angle")
    assert task.zero_contact and task.file_name == "ant_full_replay-v2.hdf5"
    steps = wrapped_steps(task)
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, _ in steps:
        truth = qvel[:2] @ DIRECTION - 0.5 * np.square(act).sum() + 1.0  # contact forces zero, as in D4RL's data
        relabelled = task.reward_fn(obs[None], act[None], next_obs[None])[0]
        assert reward == pytest.approx(truth, abs=1e-9) and relabelled == pytest.approx(truth, abs=1e-9)
        assert not next_obs[27:].any()
    assert np.ptp([s[5][1] for s in steps]) > 0.1  # y velocity varies, so the 30° direction is exercised


def test_d4rl_ant_eval_zeroes_contact_forces_and_their_cost():
    task = mopo.make_task("ant-medium-v2")
    for obs, act, next_obs, reward, qpos, qvel, init_qpos, info in wrapped_steps(task, 200):
        assert next_obs.shape == (111,) and not next_obs[27:].any()
        assert reward == pytest.approx(info["x_velocity"] + 1.0 - 0.5 * np.square(act).sum(), abs=1e-9)
    plain = mopo.make_env(mopo.make_task("Ant-v4"))  # a gymnasium task keeps the env as it is
    assert not isinstance(plain, mopo.TaskEnv)


def test_jump_task_relabels_the_full_replay_file(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    make_d4rl_file(tmp_path / "halfcheetah_full_replay-v2.hdf5", "HalfCheetah-v4", num_steps=600)
    original = mopo.load_dataset(tmp_path / "halfcheetah_full_replay-v2.hdf5", 17, 6)
    data = mopo.get_dataset(mopo.make_task("halfcheetah-jump"), None, 17, 6)
    expected = mopo.halfcheetah_jump_reward(original["observations"], original["actions"],
                                            original["next_observations"])
    np.testing.assert_allclose(data["rewards"], expected, rtol=1e-6)
    assert data["rewards"].dtype == np.float32 and not np.allclose(data["rewards"], original["rewards"])
    monkeypatch.chdir(tmp_path)
    results = mopo.main(mopo.Args(env_id="halfcheetah-jump", **TINY))
    assert results["final_normalized_score"] is None and math.isfinite(results["final_return"])
    assert (results["rollout_length"], results["lam"]) == (5, 0.5)


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
